"""Load a TorchScript file only after checking what its code can do.

A TorchScript archive is a program: its ``code/`` records are TorchScript source, and
``torch.jit.load`` compiles them. Beyond plain tensor maths the language reaches files and
the outside world (``torch.save``, ``torch.load``, ``torch.from_file``, custom C++ classes),
so a hash-checked bundle file, or an ``--inception-weights`` file, may still be hostile.
:func:`load_checked` therefore:

1. refuses archives whose source defines ``__setstate__``: ``torch.jit.load`` runs it while
   loading, before anything could inspect the loaded module (read from the records with the
   same zip reader ``torch.jit.load`` uses, so both see the same files);
2. loads, and refuses forward hooks on any submodule (code that runs around ``forward``);
3. walks the inlined graph of every method of the top module, nested blocks included, and
   refuses any operator outside an allowlist. Inlining replaces each call of a submodule's
   method or a TorchScript function by its body, so every operator reachable from the top
   module is seen; a call that cannot be inlined (``prim::CallMethod`` on an interface or a
   C++ class, ``prim::CallFunction`` to something unknown) is not on the list and is refused.
   Submodules' other methods are unreachable and never run.

An allowlist, not a denylist: anything new (file, process, network or print operators) is
refused without our having to name it.

- :data:`ROUTE_OPS`: the node kinds of the route and step modules our exporter traces
  (``ssd_export.torchscript_export``), collected from exported tiny32 bundles of 1, 2 and 3
  levels (``tests/test_safe_runtime.py`` checks that a fresh export stays inside the list),
  plus ``aten::zeros_like``, which odd time-embedding widths add.
- :data:`INCEPTION_OPS`: those of a standard FID Inception (NVIDIA's
  ``inception-2015-12-05.pt``: convolution, batch norm, ReLU, pooling, concatenation, the
  affine-grid resize to 299 px, linear, softmax) with the shape checks, warnings and
  control flow that scripted ``torch.nn.functional`` code compiles to; collected by
  scripting that network's structure, plus the spellings older torch releases use
  (``aten::_convolution``, ``aten::__interpolate``, ...), and constant tensors (``aten::full``,
  ``zeros``, ``ones``; the test suite's stand-in Inceptions use them).

torch is imported inside the functions only, so importing this module stays torch-free.
"""
from __future__ import annotations

import io

from .errors import UserError

_GRAPH = {"prim::Constant", "prim::GetAttr", "prim::ListConstruct", "prim::ListUnpack",
          "prim::TupleConstruct", "prim::TupleUnpack", "prim::NumToTensor", "prim::device"}
ROUTE_OPS = frozenset(_GRAPH | {
    "aten::Int", "aten::_convolution", "aten::add", "aten::arange", "aten::cat", "aten::chunk",
    "aten::clamp", "aten::cos", "aten::div", "aten::dropout", "aten::exp", "aten::group_norm",
    "aten::linear", "aten::mT", "aten::matmul", "aten::mul", "aten::new_zeros", "aten::reshape",
    "aten::rsub", "aten::select", "aten::silu", "aten::sin", "aten::size", "aten::slice",
    "aten::softmax", "aten::split", "aten::sqrt", "aten::sub", "aten::to", "aten::transpose",
    "aten::unsqueeze", "aten::upsample_bilinear2d", "aten::upsample_nearest2d", "aten::zeros_like",
})
INCEPTION_OPS = frozenset(ROUTE_OPS | {
    # the network
    "aten::conv2d", "aten::batch_norm", "aten::relu", "aten::relu_", "aten::max_pool2d",
    "aten::avg_pool2d", "aten::adaptive_avg_pool2d", "aten::flatten", "aten::view", "aten::contiguous",
    "aten::mean", "aten::addmm", "aten::t", "aten::eye", "aten::repeat", "aten::affine_grid_generator",
    "aten::grid_sampler", "aten::__interpolate", "aten::add_", "aten::squeeze", "aten::floor",
    "aten::full", "aten::zeros", "aten::ones",
    # scripted nn.functional: control flow, shape checks, warnings, exceptions
    "prim::If", "prim::Loop", "prim::RaiseException", "prim::Uninitialized", "prim::unchecked_cast",
    "prim::dtype", "prim::min", "prim::max", "prim::isinstance", "aten::__getitem__", "aten::__is__",
    "aten::__isnot__", "aten::__not__", "aten::__contains__", "aten::__range_length",
    "aten::__derive_index", "aten::len", "aten::dim", "aten::numel", "aten::eq", "aten::ne",
    "aten::lt", "aten::le", "aten::gt", "aten::ge", "aten::is_floating_point", "aten::format",
    "aten::warn", "aten::str", "aten::list", "aten::append", "aten::Float", "aten::Bool",
})


# operators that allocate a tensor of a size given as a list: (kind, index of that list)
ALLOCATIONS = {"aten::zeros": 0, "aten::ones": 0, "aten::full": 0, "aten::empty": 0, "aten::new_zeros": 1,
               "aten::new_ones": 1, "aten::new_full": 1, "aten::new_empty": 1}


def load_checked(data: bytes, where: str, allowed: frozenset, error: type[UserError] = UserError,
                 map_location: str = "cpu", max_elements: int | None = None):
    """``torch.jit.load`` of ``data`` after the checks of this module; every refusal (and
    every load failure) is one line ``error`` naming ``where``. ``max_elements``: the most
    elements the constant part of an allocation's size may ask for (a route allocates at
    most its own activations' size; dimensions taken from its inputs are bounded by them)."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = reader.get_all_records()
        setstate = [name for name in records if b"__setstate__" in reader.get_record(name)]
    except Exception as err:  # not a zip, or a damaged one
        raise error(f"TorchScript cannot load {where}: {_first_line(err)}") from None
    if setstate:
        raise error(f"{where} defines __setstate__ ({setstate[0]}), code that torch.jit.load would run; "
                    "refusing to load it")
    try:
        module = torch.jit.load(io.BytesIO(data), map_location=map_location)
    except Exception as err:  # torch raises RuntimeError or its own zip/pickle errors
        raise error(f"TorchScript cannot load {where}: {_first_line(err)}") from None
    for name, submodule in module.named_modules():
        if submodule._c._get_forward_hooks() or submodule._c._get_forward_pre_hooks():
            raise error(f"{where} has forward hooks on {name or 'its top module'}; refusing to run it")
    for method in module._c._method_names():
        graph = module._c._get_method(method).inlined_graph  # keep a reference: nodes die with it
        refused = sorted(_kinds(graph, set()) - allowed)
        if refused:
            more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
            raise error(f"{where} calls {', '.join(refused[:4])}{more} in {method}(), outside the operators "
                        "this file may use (TorchScript is code); refusing to run it")
        if max_elements is not None:
            largest = max(_constant_sizes(graph, []), default=0)
            if largest > max_elements:
                raise error(f"{where} allocates a tensor of {largest} elements in {method}(), more than its "
                            f"network's largest activation ({max_elements}); refusing to run it")
    return module.eval()


def _constant_sizes(block, sizes: list) -> list:
    """For every allocation in ``block`` (nested blocks included), the product of the
    constant entries of its size list (a list given whole as a constant counts whole)."""
    for node in block.nodes():
        index = ALLOCATIONS.get(node.kind())
        if index is not None and index < len(list(node.inputs())):
            size = list(node.inputs())[index]
            constant = size.toIValue()
            if isinstance(constant, (list, tuple)):
                entries = list(constant)
            elif size.node().kind() == "prim::ListConstruct":
                entries = [value.toIValue() for value in size.node().inputs()]
            else:
                entries = []
            product = 1
            for entry in entries:
                if isinstance(entry, int):
                    product *= max(entry, 0)
            sizes.append(product)
        for inner in node.blocks():
            _constant_sizes(inner, sizes)
    return sizes


def _kinds(block, kinds: set) -> set:
    """The node kinds of ``block`` and of its nested blocks, added to ``kinds``."""
    for node in block.nodes():
        kinds.add(node.kind())
        for inner in node.blocks():
            _kinds(inner, kinds)
    return kinds


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
