"""Reading serialized requests: the few header fields admission needs, straight
from the protobuf wire format, and the full parse with a reason a client can read.

A ModelInferRequest carries ``model_name`` (1), ``model_version`` (2) and ``id``
(3) as length-delimited strings beside its tensors; walking the top-level tags
and lengths finds them without copying or parsing the tensor bytes, so a request
for a model whose queue is full is refused before it costs a full parse.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from daemon.errors import InvalidArgument

# A well-formed request has a handful of top-level fields (names, a few inputs,
# outputs, parameters, raw contents); a scan that meets more stops, leaving
# the request to the full parse instead of costing Python time per field.
MAX_SCANNED_FIELDS = 256
_FIELDS = {1: "model_name", 2: "model_version", 3: "id"}


@dataclass(frozen=True)
class Head:
    model_name: memoryview
    model_version: memoryview
    id: memoryview


class _Malformed(Exception):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(data)
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def peek(data: bytes) -> Head | None:
    """Fields 1-3 of a serialized ModelInferRequest (the last occurrence wins, as in
    protobuf), or None when its top level is malformed or too long to scan cheaply."""
    view = memoryview(data)
    found = {1: view[:0], 2: view[:0], 3: view[:0]}
    pos, end = 0, len(view)
    try:
        for _ in range(MAX_SCANNED_FIELDS):
            if pos == end:
                return Head(found[1], found[2], found[3])
            key, pos = _varint(view, pos)
            number, kind = key >> 3, key & 7
            if number == 0:
                raise _Malformed
            if kind == 0:
                _, pos = _varint(view, pos)
            elif kind == 1:
                pos += 8
            elif kind == 5:
                pos += 4
            elif kind == 2:
                length, pos = _varint(view, pos)
                if number in _FIELDS:
                    found[number] = view[pos:pos + length]
                pos += length
            else:  # groups are not in this message
                raise _Malformed
            if pos > end:
                raise _Malformed
    except _Malformed:
        return None
    return None


def parse(message_type, data: bytes):
    """``message_type`` parsed from ``data``; InvalidArgument naming the type otherwise."""
    try:
        return message_type.FromString(data)
    except (DecodeError, ValueError) as exc:
        name = message_type.DESCRIPTOR.name
        raise InvalidArgument(
            f"cannot parse {name}: {exc} ({len(data)} bytes that are not a serialized "
            f"{message_type.DESCRIPTOR.full_name}; is the client built from the KServe v2 protos?)"
        ) from None
