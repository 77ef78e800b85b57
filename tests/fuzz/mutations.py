"""Seeded mutations of protobuf bodies, for the request fuzz suite.

Every mutation starts from a valid serialised message and damages it the
ways a buggy or foreign client does: flipped, inserted and deleted bytes, a
truncated body, fields sent with the wrong wire type, length prefixes far
larger than the body, strings that are not UTF-8, fields the schema does not
have, enum values it does not name, and integers at their limits. The field
numbers and types come from the message's descriptor, so a field added to
the proto is fuzzed without a change here.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor

# Wire types (protobuf encoding).
VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5

#: Integers at the edges of every integer type a field may hold.
EDGE_INTS = [0, 1, 2, 3, 4, 99, 127, 128, 255, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             2**53, 2**63 - 1, 2**63, 2**64 - 1]
#: Lengths a length prefix may claim: just past the end, and absurdly far.
HUGE_LENGTHS = [1, 2, 1000, 2**20, 2**31 - 1, 2**32 - 1, 2**35, 2**63, 2**64 - 1]
BAD_UTF8 = [b"\xc3\x28", b"\xff", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80",
            b"\xc0\xaf"]


def varint(n: int) -> bytes:
    n &= 2**64 - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def length_delimited(field: int, payload: bytes) -> bytes:
    return tag(field, LEN) + varint(len(payload)) + payload


class Mutator:
    """Random damage to serialised messages of one type (``descriptor``)."""

    def __init__(self, rng: random.Random, descriptor: Descriptor) -> None:
        self.rng = rng
        self.descriptor = descriptor
        self._mutations: list[Callable[[bytes], bytes]] = [
            self.flip_bytes, self.insert_bytes, self.delete_bytes, self.truncate,
            self.wrong_wire_type, self.huge_length, self.bad_utf8, self.unknown_field,
            self.enum_out_of_range, self.edge_integer, self.random_bytes, self.duplicate,
            self.nested_garbage, self.group_tags,
        ]

    def mutate(self, body: bytes) -> bytes:
        """One to three mutations of ``body``."""
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            body = self.rng.choice(self._mutations)(body)
        return body

    # ---- byte-level -------------------------------------------------------

    def flip_bytes(self, body: bytes) -> bytes:
        if not body:
            return bytes([self.rng.randrange(256)])
        data = bytearray(body)
        for _ in range(self.rng.randint(1, 4)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def insert_bytes(self, body: bytes) -> bytes:
        at = self.rng.randint(0, len(body))
        return body[:at] + self.rng.randbytes(self.rng.randint(1, 8)) + body[at:]

    def delete_bytes(self, body: bytes) -> bytes:
        if not body:
            return body
        at = self.rng.randrange(len(body))
        return body[:at] + body[at + self.rng.randint(1, 8):]

    def truncate(self, body: bytes) -> bytes:
        return body[:self.rng.randint(0, max(len(body) - 1, 0))]

    def random_bytes(self, body: bytes) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 64))

    def duplicate(self, body: bytes) -> bytes:
        """The message twice: protobuf merges (later scalars win, repeated
        fields concatenate)."""
        return body + body

    # ---- field-level ------------------------------------------------------

    def _field(self) -> FieldDescriptor:
        return self.rng.choice(self.descriptor.fields)

    def _append(self, body: bytes, field: bytes) -> bytes:
        """At the end or the start: parsers see fields in any order."""
        return body + field if self.rng.random() < 0.7 else field + body

    def wrong_wire_type(self, body: bytes) -> bytes:
        field = self._field()
        wire = self.rng.choice([w for w in (VARINT, FIXED64, LEN, FIXED32)
                                if w != _wire_type(field)])
        payload = {VARINT: varint(self.rng.choice(EDGE_INTS)),
                   FIXED64: self.rng.randbytes(8),
                   LEN: varint(3) + b"abc",
                   FIXED32: self.rng.randbytes(4)}[wire]
        return self._append(body, tag(field.number, wire) + payload)

    def huge_length(self, body: bytes) -> bytes:
        number = self._field().number if self.rng.random() < 0.8 else self.rng.randint(1, 50)
        field = tag(number, LEN) + varint(self.rng.choice(HUGE_LENGTHS)) + b"xy"
        return body + field  # a prefix claiming more than follows: always at the end

    def bad_utf8(self, body: bytes) -> bytes:
        strings = [f for f in self.descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
        number = self.rng.choice(strings).number if strings else self._field().number
        return self._append(body, length_delimited(number, self.rng.choice(BAD_UTF8)))

    def unknown_field(self, body: bytes) -> bytes:
        known = {f.number for f in self.descriptor.fields}
        number = self.rng.choice([n for n in (15, 16, 99, 1000, 2**29 - 1) if n not in known])
        wire = self.rng.choice((VARINT, FIXED64, LEN, FIXED32))
        payload = {VARINT: varint(self.rng.choice(EDGE_INTS)), FIXED64: self.rng.randbytes(8),
                   LEN: varint(5) + self.rng.randbytes(5), FIXED32: self.rng.randbytes(4)}[wire]
        return self._append(body, tag(number, wire) + payload)

    def enum_out_of_range(self, body: bytes) -> bytes:
        enums = [f for f in self.descriptor.fields if f.type == FieldDescriptor.TYPE_ENUM]
        if not enums:
            return self.edge_integer(body)
        value = self.rng.choice([4, 5, 99, 2**31 - 1, -1, -(2**31)])
        return self._append(body, tag(self.rng.choice(enums).number, VARINT) + varint(value))

    def edge_integer(self, body: bytes) -> bytes:
        ints = [f for f in self.descriptor.fields if _wire_type(f) == VARINT]
        if not ints:
            return self.wrong_wire_type(body)
        field = self.rng.choice(ints)
        return self._append(body, tag(field.number, VARINT) + varint(self.rng.choice(EDGE_INTS)))

    def nested_garbage(self, body: bytes) -> bytes:
        """A message or bytes field whose payload is itself damaged."""
        nested = [f for f in self.descriptor.fields
                  if f.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BYTES)]
        field = self.rng.choice(nested) if nested else self._field()
        inner = self.rng.randbytes(self.rng.randint(0, 24))
        if field.type == FieldDescriptor.TYPE_MESSAGE and self.rng.random() < 0.5:
            inner = Mutator(self.rng, field.message_type).mutate(b"")
        return self._append(body, length_delimited(field.number, inner))

    def group_tags(self, body: bytes) -> bytes:
        """Deprecated group wire types: a start without its end, or an end
        without a start."""
        number = self._field().number
        wire = self.rng.choice((START_GROUP, END_GROUP))
        return self._append(body, tag(number, wire))


def _wire_type(field: FieldDescriptor) -> int:
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES,
                      FieldDescriptor.TYPE_MESSAGE):
        return LEN
    if field.type in (FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
                      FieldDescriptor.TYPE_DOUBLE):
        return FIXED64
    if field.type in (FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32,
                      FieldDescriptor.TYPE_FLOAT):
        return FIXED32
    return VARINT
