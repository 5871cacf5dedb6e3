"""One ONNX graph per route (docs/method.md §7, §9): export, clean-up, fp16 variant, checks.

Exporter **[decision]**: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript),
torch's default and maintained path since 2.9; the TorchScript-based ``dynamo=False`` warns
that it will be removed. Measured on this UNet with torch 2.13: both write the same operators
(GroupNorm as InstanceNormalization, attention as MatMul/Softmax/MatMul, nearest and bilinear
Resize), but the dynamo graph is ~2.5x smaller (a tiny route: 236 nodes against 617, none of
the legacy Constant/Shape/Gather/Cast chains) and onnxscript's optimizer folds constants. Its
cost is export time: ~6-8 s per route on a 2-core CPU against ~1-2 s for the legacy exporter.

Opset **18** **[decision]**: the dynamo exporter's lowest native opset (asking for 17 makes it
run the onnx version converter afterwards); ONNX Runtime >= 1.14 and the TensorRT 10 / 11 ONNX
parsers accept it. Below opset 21 the exporter writes GroupNorm as ``Reshape ->
InstanceNormalization -> Reshape -> Mul -> Add``, which TensorRT has always parsed (and fuses
into its normalisation layer); opset 18's ``GroupNormalization`` was ill-specified and is
deprecated, and opset 21's corrected one needs newer runtimes than we want to require.
Attention stays the UNet's own ``MatMul -> Softmax -> MatMul`` (no SDPA op), which TensorRT
parses and fuses itself. (Not checked against a TensorRT install here: no TensorRT runs on
these machines; docs/tensorrt.md.)

Each graph is cleaned of the exporter's per-node metadata (stack traces with absolute source
paths) so that bytes depend only on the weights and the tool versions. The route's
top-transition choice travels inside the graph: an "interp" top route starts with a bilinear
``Resize`` of ``x``; an "up" route runs the extra decoder level.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ssd_core.bundle import OUTPUT_NAME, STEP_OUTPUTS, step_contract
from ssd_core.precision import fp32_nodes

from .options import OPSET, example_shapes, sample_batch

# Ops that stay float32 in the fp16 variant: normalisation statistics and softmax.
FP32_OPS = frozenset({"InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax"})
# Inputs that ONNX requires to be float32 whatever the data type (Resize's roi and scales).
FP32_INPUTS = {"Resize": {1, 2}}
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


class ExportError(RuntimeError):
    """The exporter produced a graph that breaks the route contract (a bug, not user input)."""


def export_route(route, contract: dict, batch: tuple[int, int], opset: int = OPSET) -> onnx.ModelProto:
    """Export one route module ``forward(x [N,C,r,r], t [N]) -> x0_pred [N,C,o,o]`` to ONNX.

    The batch axis is dynamic ("batch") unless ``batch`` is one fixed size; H and W are static.
    Weights are inline; :mod:`ssd_export.weights` moves them out afterwards.
    """
    import torch

    inputs = {name: torch.zeros(shape) for name, shape in example_shapes(contract, batch).items()}
    return _finish(_export(route, inputs, [OUTPUT_NAME], batch, opset), contract, batch)


def export_update(update, contract: dict, batch: tuple[int, int], opset: int = OPSET) -> onnx.ModelProto:
    """Export a posterior update ``(x, x0_raw, coef, z) -> (x_s, x0_pred)`` (``ssd.step_graph``)
    for the route of ``contract``, to be joined to the route graph by :func:`fuse_step`."""
    import torch

    shapes = example_shapes(step_contract(contract), batch)  # x, t, coef, z
    inputs = {"x": shapes["x"], "x0_raw": shapes["z"], "coef": shapes["coef"], "z": shapes["z"]}
    return _export(update, {name: torch.zeros(shape) for name, shape in inputs.items()}, list(STEP_OUTPUTS),
                   batch, opset)


def _export(module, inputs: dict, output_names: list[str], batch: tuple[int, int], opset: int) -> onnx.ModelProto:
    """``torch.onnx.export`` (dynamo) of ``module(**inputs)``; every input but ``coef`` has a
    batch axis, dynamic ("batch") unless the batch is fixed."""
    import torch

    dynamic = None
    if batch[0] != batch[1]:
        # torch 2.8/2.9 fix the axis to the traced size when that size is the declared max,
        # so torch.export gets a max above it; the ONNX axis carries no bound anyway (the
        # manifest's batch range is what the runtime enforces and verification covers).
        n = sample_batch(batch)  # the traced size
        axis = torch.export.Dim("batch", min=batch[0], max=max(batch[1], n + 1))
        dynamic = {name: ({0: axis} if name != "coef" else None) for name in inputs}
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), tuple(inputs.values()), None, input_names=list(inputs), output_names=output_names,
            opset_version=opset, dynamo=True, optimize=True, dynamic_shapes=dynamic,
            verbose=False, external_data=False,
        )
    model = program.model_proto
    strip_metadata(model)
    return model


def _finish(model: onnx.ModelProto, contract: dict, batch: tuple[int, int]) -> onnx.ModelProto:
    """Name the graph after its route, record route and batch, check the I/O contract."""
    model.graph.name = contract["name"]
    helper.set_model_props(model, {"ssd.route": contract["name"], "ssd.batch": f"{batch[0]}:{batch[1]}"})
    check_contract(model, contract)
    return model


def fuse_step(route: onnx.ModelProto, update: onnx.ModelProto, contract: dict,
              batch: tuple[int, int]) -> onnx.ModelProto:
    """One step graph from a route graph and its update graph (either may be the fp16
    variant's route): the route's ``x0_pred`` feeds the update's ``x0_raw``, both read ``x``;
    the update's nodes and initializers are prefixed ``update/``. ``contract`` is the
    step contract (``ssd_core.bundle.step_contract``)."""
    fused = onnx.ModelProto()
    fused.CopyFrom(route)
    graph = fused.graph
    for node in graph.node:
        node.output[:] = ["x0_raw" if name == OUTPUT_NAME else name for name in node.output]
        node.input[:] = ["x0_raw" if name == OUTPUT_NAME else name for name in node.input]
    shared = {"x", "x0_raw", "coef", "z", *STEP_OUTPUTS}
    rename = lambda name: name if not name or name in shared else f"update/{name}"
    for original in update.graph.node:
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in original.attribute):
            raise ExportError(f"update graph of {contract['name']}: subgraphs are not expected")
        node = graph.node.add()
        node.CopyFrom(original)
        node.name = f"update/{original.name}"
        node.input[:] = [rename(name) for name in original.input]
        node.output[:] = [rename(name) for name in original.output]
    for original in update.graph.initializer:
        tensor = graph.initializer.add()
        tensor.CopyFrom(original)
        tensor.name = rename(original.name)
    graph.input.extend(value for value in update.graph.input if value.name in ("coef", "z"))
    del graph.output[:]
    graph.output.extend(update.graph.output)
    opsets = {(o.domain, o.version) for o in (*route.opset_import, *update.opset_import)}
    if len({domain for domain, _ in opsets}) != len(opsets):
        raise ExportError(f"route and update graphs of {contract['name']} import different opsets: {opsets}")
    del fused.opset_import[:]
    fused.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in sorted(opsets))
    known = {f.name for f in fused.functions}
    fused.functions.extend(f for f in update.functions if f.name not in known)
    return _finish(fused, contract, batch)


class _quiet_logger:
    """Silence a logger (the exporter logs optional-dependency notices as warnings)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def strip_metadata(model: onnx.ModelProto) -> None:
    """Drop stack traces and FX names (they hold absolute source paths: not reproducible)."""
    del model.metadata_props[:]
    model.doc_string = ""
    graph = model.graph
    del graph.metadata_props[:]
    graph.doc_string = ""
    del graph.value_info[:]  # intermediate types: re-derivable, and stale after fp16
    for items in (graph.node, graph.input, graph.output, graph.initializer):
        for item in items:
            del item.metadata_props[:]
            item.doc_string = ""


def _shape(value: onnx.ValueInfoProto) -> list:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


def check_contract(model: onnx.ModelProto, contract: dict) -> None:
    """The graph's inputs and outputs must be exactly the route contract's."""
    declared = contract["inputs"] + contract["outputs"]
    graph_io = list(model.graph.input) + list(model.graph.output)
    found = [(v.name, helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, _shape(v))
             for v in graph_io]
    wanted = [(d["name"], d["dtype"], list(d["shape"])) for d in declared]
    if found != wanted:
        raise ExportError(f"route {contract['name']}: graph I/O {found} differs from its contract {wanted}")


# --------------------------------------------------------------------------- fp16 variant
def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp16 copy of a route graph: float32 I/O, float32 normalisation, softmax and time path.

    Nodes fed only by ``t`` (the timestep embedding and the per-block scale/shift MLPs) stay
    float32 because fp16 cannot hold ``t * freq`` for t near 1000 to a useful precision.
    Every other float tensor is float16; a Cast is inserted wherever the two meet.
    """
    model = _with_types(model)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({init.name: init.data_type for init in graph.initializer})
    keep32 = fp32_node_names(graph)
    inits = {init.name: init for init in graph.initializer}
    home = {name: FLOAT for name, kind in types.items() if kind == FLOAT}  # precision of each value
    for node in graph.node:
        if node.name not in keep32:
            _node_to_fp16(node)
            for out in node.output:
                if types.get(out) == FLOAT:
                    home[out] = FLOAT16
    wanted = _wanted_precision(graph, keep32, types)
    _convert_initializers(graph, inits, wanted, home)
    _insert_casts(graph, home, wanted)
    del graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    del inferred.graph.value_info[:]
    return inferred


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return onnx.shape_inference.infer_shapes(copy, strict_mode=True)


def fp32_node_names(graph: onnx.GraphProto) -> set[str]:
    """Names of nodes that stay float32 in a reduced-precision variant (fp16 and int8):
    FP32_OPS and everything computed from ``t`` alone."""
    nodes = ((node.name, node.op_type, list(node.input), list(node.output)) for node in graph.node)
    return fp32_nodes(nodes, {"t"} | {init.name for init in graph.initializer}, FP32_OPS)


def _node_to_fp16(node: onnx.NodeProto) -> None:
    """Retarget a node's own float attributes (Cast targets, constants) to float16."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_tensor_fp16(attr.t, attr.t.name))


def _wanted_precision(graph, keep32: set[str], types: dict) -> dict[tuple[int, int], int]:
    """(node index, input index) -> the float type that input must have."""
    wanted = {}
    for i, node in enumerate(graph.node):
        for j, name in enumerate(node.input):
            if name and types.get(name) == FLOAT:
                fp32 = node.name in keep32 or j in FP32_INPUTS.get(node.op_type, ())
                wanted[(i, j)] = FLOAT if fp32 else FLOAT16
    return wanted


def _convert_initializers(graph, inits: dict, wanted: dict, home: dict) -> None:
    """Initializers read only as float16 become float16; shared ones get an fp16 twin (cast)."""
    readers: dict[str, set[int]] = {}
    for (i, j), kind in wanted.items():
        name = graph.node[i].input[j]
        if name in inits:
            readers.setdefault(name, set()).add(kind)
    for name, kinds in readers.items():
        if kinds == {FLOAT16}:
            inits[name].CopyFrom(_tensor_fp16(inits[name], name))
            home[name] = FLOAT16


def _tensor_fp16(tensor: TensorProto, name: str) -> TensorProto:
    array = numpy_helper.to_array(tensor)
    if np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
        raise ExportError(f"weight {name!r} overflows float16 (max |w| = {np.abs(array).max():.3g})")
    return numpy_helper.from_array(array.astype(np.float16), name)


def _insert_casts(graph, home: dict, wanted: dict) -> None:
    """Insert one Cast per (value, target type) where a value is read in the other precision."""
    nodes, casts = [], {}
    output_names = {out.name for out in graph.output}
    for i, original in enumerate(graph.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)
        for j, name in enumerate(node.input):
            kind = wanted.get((i, j))
            if kind is None or home.get(name, FLOAT) == kind:
                continue
            key = (name, kind)
            if key not in casts:
                casts[key] = f"{name}__{'fp16' if kind == FLOAT16 else 'fp32'}"
                nodes.append(helper.make_node("Cast", [name], [casts[key]], name=f"cast_{casts[key]}", to=kind))
            node.input[j] = casts[key]
        nodes.append(node)
    for out in output_names:  # graph outputs stay float32
        if home.get(out) == FLOAT16:
            inner = f"{out}__fp16"
            for node in nodes:
                node.output[:] = [inner if o == out else o for o in node.output]
                node.input[:] = [inner if o == out else o for o in node.input]
            nodes.append(helper.make_node("Cast", [inner], [out], name=f"cast_{out}", to=FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)


# --------------------------------------------------------------------------- checks
def check_file(path) -> None:
    """``onnx.checker`` with full shape inference on a saved route (external data included)."""
    onnx.checker.check_model(str(path), full_check=True)
