// A kvstore.v1 client in JavaScript, built at run time from the proto (no
// kvstore code involved): Put, Lookup, Get, a miss and two invalid requests.
// It prints one JSON object; tests/xlang/test_node_client.py asserts on it.
//
// usage: node client.js <kvstore.proto> <host:port> <namespace>
'use strict';

const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [protoPath, target, namespace] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoPath, {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const { KVStore } = grpc.loadPackageDefinition(definition).kvstore.v1;
const client = new KVStore(target, grpc.credentials.createInsecure());

// The same pattern as blockBytes in test_node_client.py: the Python side
// checks what this client stored, and this client checks what it reads back.
function blockBytes(seed, size) {
  const out = Buffer.alloc(size);
  for (let i = 0; i < size; i++) out[i] = (i * 131 + seed * 7 + (i >> 8)) & 0xff;
  return out;
}

const CHUNK = 65536;
const blocks = [
  { key: Buffer.from('node-a'), data: blockBytes(1, 200000) },  // 4 chunks each way
  { key: crypto.createHash('sha256').update('node-b').digest(), data: blockBytes(2, 1000) },
];
const missing = Buffer.from('node-missing');

function failure(err) {
  return {
    code: grpc.status[err.code],
    details: err.details,
    kvstore_error: err.metadata ? err.metadata.get('kvstore-error').map(String) : [],
  };
}

function put(chunks) {
  return new Promise((resolve) => {
    const call = client.Put({ deadline: Date.now() + 30000 }, (err, reply) => {
      resolve(err ? { error: failure(err) } : { reply });
    });
    for (const chunk of chunks) call.write(chunk);
    call.end();
  });
}

function putChunks() {
  const chunks = [];
  for (const block of blocks) {
    for (let offset = 0; offset < block.data.length; offset += CHUNK) {
      const chunk = { data: block.data.subarray(offset, offset + CHUNK) };
      if (offset === 0) Object.assign(chunk, { key: block.key, block_size: block.data.length });
      chunks.push(chunk);
    }
  }
  Object.assign(chunks[0], { namespace, ack: 'ACK_LEVEL_LOCAL' });
  return chunks;
}

function unary(method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: Date.now() + 30000 }, (err, reply) => {
      resolve(err ? { error: failure(err) } : { reply });
    });
  });
}

function get(keys) {
  return new Promise((resolve) => {
    const call = client.Get({ namespace, keys, max_chunk_bytes: CHUNK },
      { deadline: Date.now() + 30000 });
    const found = keys.map(() => ({ hit: null, chunks: 0, parts: [], size: 0, tier: null }));
    call.on('data', (chunk) => {
      const block = found[chunk.index];
      block.chunks += 1;
      if (block.chunks === 1) {
        Object.assign(block, { hit: chunk.hit, size: Number(chunk.block_size), tier: chunk.tier });
      }
      block.parts.push({ offset: Number(chunk.offset), data: chunk.data });
    });
    call.on('error', (err) => resolve({ error: failure(err) }));
    call.on('end', () => resolve({ blocks: found }));
  });
}

async function main() {
  const result = { put: await put(putChunks()) };

  const lookup = await unary('Lookup', {
    namespace, keys: [blocks[0].key, blocks[1].key, missing], lease_ms: 1000 });
  result.lookup = lookup;

  const read = await get([blocks[0].key, missing, blocks[1].key]);
  if (read.blocks) {
    result.get = read.blocks.map((block, i) => {
      const expected = [blocks[0].data, null, blocks[1].data][i];
      const data = Buffer.concat(block.parts.map((p) => p.data));
      const inOrder = block.parts.every((p, j) =>
        p.offset === block.parts.slice(0, j).reduce((n, q) => n + q.data.length, 0));
      return {
        hit: block.hit, chunks: block.chunks, size: block.size, tier: block.tier,
        in_order: inOrder, length: data.length,
        exact: expected === null ? data.length === 0 : data.equals(expected),
      };
    });
  } else {
    result.get = read;
  }

  result.invalid_namespace = await unary('Lookup', { namespace: 'not a namespace!', keys: [missing] });
  result.empty_block = await put([{ namespace, key: Buffer.from('node-empty'), block_size: 0 }]);
  client.close();
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + '\n');
  process.exit(1);
});
