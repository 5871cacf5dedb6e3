"""One external-data file shared by every route of a format, each weight stored once.

The routes of a Flexi-UNet share most of their weights (every route runs the middle block
and the output head; ``keep_r`` and ``up_r_o`` share the whole encoder). Instead of one
self-contained ``.onnx`` per route, the exporter writes ``<format>/weights.bin`` and points
each route's initializers into it (ONNX external data: ``location``, ``offset``,
``length``). Blobs are keyed by the sha256 of their bytes, so a tensor that several routes
hold, under whatever name, is stored once. Offsets are 64-byte aligned (cheap, and friendly
to memory-mapped loading); the layout follows route and initializer order, so the file is
reproducible.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 64
MIN_EXTERNAL_BYTES = 64  # smaller tensors (shape constants, scalars) stay inside the graph


@dataclass
class SharedWeights:
    """Append-only external-data file; ``externalize`` rewrites a model to point into it.

    ``tensors`` is the file's table (offset, length, dtype, shape of every distinct tensor),
    which the manifest carries so the runtime can hand the weights to ONNX Runtime from
    memory; ``externalize`` returns each initializer's index into it.
    """

    path: Path
    align: int = ALIGN
    stored_bytes: int = 0  # distinct tensor bytes written
    referenced_bytes: int = 0  # tensor bytes the routes point at (what copies would cost)
    naive_bytes: int = 0  # what the routes would weigh as self-contained .onnx files
    tensors: list[dict] = field(default_factory=list)
    _blobs: dict[str, tuple[int, int]] = field(default_factory=dict)
    _tensor_index: dict[tuple, int] = field(default_factory=dict)
    _size: int = 0

    def __post_init__(self):
        self.path = Path(self.path)
        self._handle = open(self.path, "wb")

    def externalize(self, model: onnx.ModelProto) -> dict[str, int]:
        """Move each large initializer's bytes into the shared file (once per distinct blob);
        returns ``{initializer name: index into tensors}``."""
        indices = {}
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor)
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            offset, length = self._store(raw)
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type).name
            key = (offset, length, dtype, tuple(tensor.dims))
            if key not in self._tensor_index:
                self._tensor_index[key] = len(self.tensors)
                self.tensors.append({"offset": offset, "length": length, "dtype": dtype, "shape": list(tensor.dims)})
            indices[tensor.name] = self._tensor_index[key]
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key_, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key_, value
            self.referenced_bytes += length
        return indices

    def _store(self, raw: bytes) -> tuple[int, int]:
        key = hashlib.sha256(raw).hexdigest()
        if key not in self._blobs:
            pad = -self._size % self.align
            self._handle.write(b"\0" * pad + raw)
            self._blobs[key] = (self._size + pad, len(raw))
            self._size += pad + len(raw)
            self.stored_bytes += len(raw)
        return self._blobs[key]

    def close(self) -> int:
        """Flush and close; returns the file's size in bytes."""
        self._handle.close()
        return self._size


def _raw_bytes(tensor: TensorProto) -> bytes:
    """A tensor's little-endian bytes, converting typed fields (float_data ...) if needed."""
    if tensor.data_location == TensorProto.EXTERNAL:
        raise ValueError(f"initializer {tensor.name!r} is already external")
    if not tensor.HasField("raw_data"):
        converted = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
        tensor.CopyFrom(converted)
    return tensor.raw_data


def save_route(model: onnx.ModelProto, path: Path, weights: SharedWeights) -> dict[str, int]:
    """Externalize ``model``'s weights into ``weights`` and write the graph to ``path``;
    returns the initializers' indices into the weights table."""
    weights.naive_bytes += model.ByteSize()
    indices = weights.externalize(model)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return indices
