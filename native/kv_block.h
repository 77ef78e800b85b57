/* Block format v1 hot loops for kvstore._native (see docs/block-format.md).
 *
 * Header-only: the repository ignores *.c files (Cython output), so the C
 * code is in headers compiled into the extension through _native.pyx.
 */
#ifndef KV_BLOCK_H
#define KV_BLOCK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kv_crc32c.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvstore._native writes the little-endian block header with memcpy: little-endian CPUs only"
#endif

#define KV_HEADER_SIZE 64
/* Gathers / scatters / copies moving at least this many bytes use streaming
 * stores (measured: from ~8-16 MiB up they beat cached stores on a part with a
 * 32 MiB L3). A variable so that tests and benchmarks can move it. */
static size_t kv_nt_min_bytes = (size_t)8 << 20;

/* Cache lines of the next page to prefetch before copying the current one:
 * each page starts a new stream for the hardware prefetcher (measured: a few
 * per cent on 16-32 KiB pages; 4 lines were as good as more). */
static int kv_prefetch_lines = 4;

static inline void kv_prefetch(const char *p, int write) {
    for (int i = 0; i < kv_prefetch_lines; i++) {
        if (write) __builtin_prefetch(p + 64 * i, 1, 3);
        else __builtin_prefetch(p + 64 * i, 0, 3);
    }
}
#define KV_HEADER_CRC_OFFSET 60

static inline uint16_t kv_get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t kv_get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t kv_get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void kv_put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void kv_put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void kv_put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* The 64 header bytes; see docs/block-format.md for the table. */
static void kv_encode_header(uint8_t *h, uint8_t dtype, uint8_t kv_count, uint32_t layers,
                             uint32_t tokens, uint32_t kv_heads, uint32_t head_dim,
                             uint64_t payload_bytes, uint32_t payload_crc) {
    memset(h, 0, KV_HEADER_SIZE);
    memcpy(h, "KVCB", 4);
    kv_put16(h + 4, 1);                 /* version */
    kv_put16(h + 6, KV_HEADER_SIZE);    /* header size */
    h[8] = dtype;
    h[9] = 1;                           /* layout: layer, K/V, token, head, dim */
    h[10] = kv_count;
    h[11] = 1;                          /* checksum algorithm: CRC-32C */
    /* 12..15 flags = 0 */
    kv_put32(h + 16, layers);
    kv_put32(h + 20, tokens);
    kv_put32(h + 24, kv_heads);
    kv_put32(h + 28, head_dim);
    kv_put64(h + 32, payload_bytes);
    kv_put64(h + 40, payload_crc);
    /* 48..59 reserved = 0 */
    kv_put32(h + KV_HEADER_CRC_OFFSET, kv_crc32c(0, h, KV_HEADER_CRC_OFFSET));
}

/* Copy `span` bytes of each array (in order) out of the listed pages into dst,
 * page after page (the last page may be cut short), checksumming as it goes.
 * Array a's page p starts at bases[a] + p * strides[a]. Returns the CRC-32C
 * continuing from crc. */
static uint32_t kv_gather(uint8_t *dst, char *const *bases, const Py_ssize_t *strides,
                          size_t narrays, const int64_t *pages, size_t npages,
                          size_t page_bytes, size_t span, uint32_t crc) {
    int nt = span * narrays >= kv_nt_min_bytes;
    for (size_t a = 0; a < narrays; a++) {
        size_t left = span;
        for (size_t i = 0; i < npages && left; i++) {
            size_t n = left < page_bytes ? left : page_bytes;
            const char *src = bases[a] + (ptrdiff_t)pages[i] * strides[a];
            if (i + 1 < npages && n < left)
                kv_prefetch(bases[a] + (ptrdiff_t)pages[i + 1] * strides[a], 0);
            else if (a + 1 < narrays)
                kv_prefetch(bases[a + 1] + (ptrdiff_t)pages[0] * strides[a + 1], 0);
            crc = nt ? kv_crc32c_copy_nt(crc, dst, src, n) : kv_crc32c_copy(crc, dst, src, n);
            dst += n;
            left -= n;
        }
    }
    return crc;
}

/* The inverse of kv_gather: src into the pages. With check, returns the
 * CRC-32C of the bytes copied (continuing from crc); without, crc unchanged. */
static uint32_t kv_scatter(const uint8_t *src, char *const *bases, const Py_ssize_t *strides,
                           size_t narrays, const int64_t *pages, size_t npages,
                           size_t page_bytes, size_t span, int check, uint32_t crc) {
    int nt = span * narrays >= kv_nt_min_bytes;
    for (size_t a = 0; a < narrays; a++) {
        size_t left = span;
        for (size_t i = 0; i < npages && left; i++) {
            size_t n = left < page_bytes ? left : page_bytes;
            char *dst = bases[a] + (ptrdiff_t)pages[i] * strides[a];
            if (i + 1 < npages && n < left)
                kv_prefetch(bases[a] + (ptrdiff_t)pages[i + 1] * strides[a], 1);
            else if (a + 1 < narrays)
                kv_prefetch(bases[a + 1] + (ptrdiff_t)pages[0] * strides[a + 1], 1);
            if (check)
                crc = nt ? kv_crc32c_copy_nt(crc, dst, src, n) : kv_crc32c_copy(crc, dst, src, n);
            else
                memcpy(dst, src, n);
            src += n;
            left -= n;
        }
    }
    return crc;
}

/* The first i < j with ids[i] == ids[j] for the smallest such j (quadratic:
 * for short lists). Returns j, or -1 when all ids differ; *first gets i. */
static Py_ssize_t kv_first_repeat(const int64_t *ids, Py_ssize_t n, Py_ssize_t *first) {
    for (Py_ssize_t j = 1; j < n; j++)
        for (Py_ssize_t i = 0; i < j; i++)
            if (ids[i] == ids[j]) { *first = i; return j; }
    return -1;
}

/* Little-endian u32 token ids into dst, checking each is in [0, 2**32).
 * Returns the index of the first bad one, or -1. */
static Py_ssize_t kv_encode_tokens_i64(uint8_t *dst, const int64_t *src, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t t = src[i];
        if (t < 0 || t > 0xFFFFFFFFLL) return i;
        kv_put32(dst + 4 * i, (uint32_t)t);
    }
    return -1;
}

#endif /* KV_BLOCK_H */
