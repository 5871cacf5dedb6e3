"""One traced TorchScript module per route (format "torchscript", ``torchscript/<route>.pt``).

Tracing records only the route's own ops and parameters. Three fix-ups make the archive
portable and reproducible:

- **Device.** Tracing records every ``device=x.device`` argument as the constant "cpu",
  which would pin the timestep embedding to the CPU after ``torch.jit.load(...,
  map_location="cuda")``; :func:`make_device_agnostic` rewrites the graph to take the
  device from the input ``x`` at run time.
- **Type names.** TorchScript names traced types ``___torch_mangle_<n>`` from a
  process-wide counter, so a second export in one process would differ; each route is
  traced in a fresh compilation unit (:func:`_fresh_compilation_unit`).
- **Debug records.** ``*.debug_pkl`` records hold absolute source paths;
  :func:`canonical_archive` rewrites the archive without them (its ``serialization_id``
  is then a hash of the content).

Batch-dependent shapes (``x.shape[0]``) are traced as ``aten::size`` ops, so the batch can
vary. Uses the private but stable ``torch.jit._state._python_cu`` and
``torch._C.PyTorchFile{Reader,Writer}`` (what ``torch.save`` itself uses).
"""
from __future__ import annotations

import contextlib
import io
import warnings

import torch

from ssd_core.bundle import step_contract

from .options import example_shapes


def export_route(route: torch.nn.Module, contract: dict, batch: tuple[int, int], step: bool = False) -> bytes:
    """Trace ``route.forward(x [N,C,r,r], t [N]) -> x0_pred [N,C,o,o]``, or with ``step`` a
    fused step module ``forward(x, t, coef [K], z [N,C,o,o]) -> (x_s, x0_pred)``; the
    archive's bytes."""
    route = route.eval()
    shapes = example_shapes(step_contract(contract) if step else contract, batch)
    inputs = tuple(torch.zeros(shape) for shape in shapes.values())
    with _fresh_compilation_unit() as unit, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(route, {"forward": inputs}, check_trace=False,
                                        _compilation_unit=unit)
        make_device_agnostic(traced)
        return canonical_archive(to_bytes(traced))


@contextlib.contextmanager
def _fresh_compilation_unit():
    """Trace into a new compilation unit, so type names restart at ``___torch_mangle_0``."""
    import torch.jit._state as state

    saved, state._python_cu = state._python_cu, torch._C.CompilationUnit()
    try:
        yield state._python_cu
    finally:
        state._python_cu = saved


def make_device_agnostic(module: torch.jit.ScriptModule) -> None:
    """Replace every constant ``Device`` in ``forward`` by ``prim::device(x)``."""
    graph = module.graph
    x = list(graph.inputs())[1]  # (self, x, t)
    device = graph.create("prim::device", [x])
    device.output().setType(torch._C.DeviceObjType.get())
    device.insertBefore(next(iter(graph.nodes())))
    for node in list(graph.findAllNodes("prim::Constant", recurse=True)):
        if node.output().type().kind() == "DeviceObjType":
            node.output().replaceAllUsesWith(device.output())
            node.destroy()
    torch._C._jit_pass_lint(graph)


def to_bytes(module: torch.jit.ScriptModule) -> bytes:
    """The module as a ``torch.jit.save`` archive."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def canonical_archive(data: bytes) -> bytes:
    """Rewrite a TorchScript archive without debug records (source paths), in sorted order."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    writer.set_min_version(int(reader.get_record("version").decode().strip()))
    for name in sorted(reader.get_all_records()):
        if name.endswith(".debug_pkl") or name.startswith(".data/") or name == "version":
            continue  # the writer adds version and serialization_id itself
        record = reader.get_record(name)
        writer.write_record(name, record, len(record))
    writer.write_end_of_file()
    return out.getvalue()
