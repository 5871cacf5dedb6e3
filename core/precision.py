"""Precisions: the bundle's ONNX variant for each (``ONNX_VARIANTS``, the one map the exporter,
the engine builder and the runtime's backend registry read), and which operations stay float32
in a reduced-precision build (torch-, ONNX- and TensorRT-free).

One rule for the fp16 ONNX variant (``ssd_export.onnx_export.to_fp16``), the int8 ONNX variant
(``ssd_export.quantize``: these nodes are left out of quantization, and a step graph's
posterior update is never quantized) and TensorRT 10's weakly typed fp16 engines
(``ssd_engines.build``): normalisation and softmax stay float32,
and so does everything computed from the timestep ``t`` alone (the sinusoidal embedding and
the per-block scale/shift MLPs), because float16 cannot hold ``t * freq`` for t near 1000 to
a useful precision. Those are the usual causes of NaN or black images in fp16.
"""
from __future__ import annotations

from typing import Iterable

# precision -> the bundle file format of its ONNX graphs (add, never change: manifests name them)
ONNX_VARIANTS = {"fp32": "onnx", "fp16": "onnx-fp16", "int8": "onnx-int8"}

Node = tuple[str, str, list[str], list[str]]  # (name, kind, input names, output names)


def fp32_nodes(nodes: Iterable[Node], sources: set[str], fp32_kinds: frozenset[str] | set[str]) -> set[str]:
    """Names of the nodes that stay float32.

    ``nodes`` in topological order; ``sources``: the timestep input and the constants
    (values computed from nothing else). A node stays float32 when its kind is in
    ``fp32_kinds`` or every one of its inputs comes from ``sources`` or such nodes.
    """
    from_t, keep = set(sources), set()
    for name, kind, inputs, outputs in nodes:
        inputs = [value for value in inputs if value]
        time_path = bool(inputs) and all(value in from_t for value in inputs)
        if kind in fp32_kinds or time_path:
            keep.add(name)
        if time_path:
            from_t.update(outputs)
    return keep
