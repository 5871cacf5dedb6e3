"""The files an ONNX graph reads besides itself: every external-data ``location`` in it
(torch-free, and without the onnx package: the runtime has only ONNX Runtime).

ONNX Runtime and OpenVINO open a tensor's external data at ``location`` relative to the
graph, so a bundle must check those names before a backend sees the graph: a graph naming
any file but its format's hash-checked weights would read an unchecked file. This walks the
protobuf wire format through exactly the fields that can hold a tensor: the model's graph and
functions, a graph's nodes, initializers and sparse initializers, a node's attributes and an
attribute's tensors and subgraphs, to each ``TensorProto.external_data`` entry.
"""
from __future__ import annotations

# message -> {field number: message it holds} (onnx.proto; only the paths to tensors)
_SCHEMA = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
MAX_MESSAGES = 1_000_000


class MalformedGraph(ValueError):
    """Bytes that are not a well-formed ONNX protobuf."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedGraph("a truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int):
    """(field, start, end) of each length-delimited field of the message at ``start..end``."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise MalformedGraph("a field runs past its message")
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise MalformedGraph(f"wire type {wire}")
        if pos > end:
            raise MalformedGraph("a field runs past its message")


def external_locations(data: bytes) -> set[str]:
    """Every external-data ``location`` named anywhere in the serialized ONNX model ``data``."""
    found: set[str] = set()
    stack = [("model", 0, len(data))]
    visited = 0
    while stack:
        kind, start, end = stack.pop()
        visited += 1
        if visited > MAX_MESSAGES:
            raise MalformedGraph("too many messages")
        if kind == "entry":  # StringStringEntryProto: key = 1, value = 2
            entry = {field: data[s:e] for field, s, e in _fields(data, start, end)}
            if entry.get(1) == b"location":
                found.add(entry.get(2, b"").decode("utf-8", errors="replace"))
            continue
        children = _SCHEMA[kind]
        for field, s, e in _fields(data, start, end):
            if field in children:
                stack.append((children[field], s, e))
    return found
