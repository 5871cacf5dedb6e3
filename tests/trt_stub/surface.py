"""Print the Python API surface of the TensorRT bindings importable here, as JSON.

Run in a subprocess whose LD_LIBRARY_PATH holds the stub libraries (``stub.c``) and whose
sys.path holds an unpacked ``tensorrt-cu12-bindings`` wheel (``tests/test_tensorrt_api.py``
sets both up). For the classes in ``CLASSES``: every public member, its kind (method,
property with or without a setter, value) and, for methods, each overload's parameter names
(from pybind11's signatures in the docstring); for enums, their members; and the names at
module level. Standalone: ``python surface.py`` (also works on a machine with TensorRT).
"""
from __future__ import annotations

import json
import re
import sys

# the classes whose objects ssd's builder and backend call (instances, not only modules' names)
CLASSES = ["Logger", "Builder", "INetworkDefinition", "ILayer", "ITensor", "OnnxParser", "ParserError",
           "IBuilderConfig", "IOptimizationProfile", "ITimingCache", "IHostMemory", "Runtime", "ICudaEngine",
           "IExecutionContext", "Refitter", "OnnxParserRefitter"]
SIGNATURE = re.compile(r"^(?:\d+\. )?(\w+)\((.*)\) -> .*$")


def split_top(text: str) -> list[str]:
    """Split ``text`` at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def overloads(name: str, doc: str | None) -> list[dict]:
    """Each overload of method ``name``: its parameters (after self) and how many are required."""
    found = []
    for line in (doc or "").splitlines():
        match = SIGNATURE.match(line.strip())
        if not match or match.group(1) != name or match.group(2) == "*args, **kwargs":
            continue
        params = [p for p in split_top(match.group(2)) if not p.startswith("self")]
        names = [p.split(":", 1)[0].split("=", 1)[0].strip() for p in params]
        required = sum(1 for p in params if " = " not in p and not p.startswith("*"))
        found.append({"params": names, "required": required})
    return found


def members(cls) -> dict:
    out = {"__init__": {"kind": "method", "overloads": overloads("__init__", cls.__init__.__doc__)}}
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        raw = None
        for klass in type.mro(cls):
            if name in vars(klass):
                raw = vars(klass)[name]
                break
        if isinstance(raw, property):
            out[name] = {"kind": "property", "settable": raw.fset is not None}
        elif callable(raw) and not isinstance(raw, type) and not hasattr(raw, "__members__"):
            out[name] = {"kind": "method", "overloads": overloads(name, getattr(raw, "__doc__", None))}
        else:
            out[name] = {"kind": "value"}
    return out


def surface(trt) -> dict:
    enums = {name: sorted(obj.__members__) for name in dir(trt) if not name.startswith("_")
             for obj in [getattr(trt, name)] if isinstance(obj, type) and hasattr(obj, "__members__")}
    return {"version": trt.__version__, "module": sorted(n for n in dir(trt) if not n.startswith("_")),
            "classes": {name: members(getattr(trt, name)) for name in CLASSES if hasattr(trt, name)},
            "enums": enums}


if __name__ == "__main__":
    try:
        import tensorrt_bindings as module
    except ImportError:
        import tensorrt as module
    json.dump(surface(module), sys.stdout, indent=1, sort_keys=True)
