"""NVIDIA's Polygraphy in its field role: the engine check, debug data for a GPU user, and
constant folding, all over a bundle's step graphs.

- :func:`check_inputs`: a route's seeded check inputs (the same as every other check of
  the project, ``ssd_core.cases``: t = 0 and T-1, the route's first, middle and last step
  coefficients, at the bundle's smallest and largest batch), as a Polygraphy data loader
  (a list of feed dicts).
- :func:`compare_engine`: after a build, the engine (Polygraphy's ``TrtRunner`` on its
  bytes) against ONNX Runtime fp32 (``OnnxrtRunner`` on the same step graph, CPU) through
  ``Comparator.run`` and ``Comparator.compare_accuracy`` with the tolerance of the engine's
  precision; per-output error statistics go into the registry.
- :func:`write_debug_data`: per route, the check inputs and ONNX Runtime's outputs in
  Polygraphy's JSON formats, so that ``polygraphy run <graph> --trt --load-inputs ...
  --load-outputs ...`` compares a GPU's TensorRT with our reference in one command
  (docs/tensorrt.md).
- :func:`fold_graph`: Polygraphy's constant folding (ONNX-GraphSurgeon), measured by
  ``benchmarks/fold_constants.py``.

Polygraphy is imported only inside these functions: it is the ``trt`` extra's, and the
rest of ``ssd_engines`` (the build plan, the registry) works without it.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from ssd_core.bundle import Bundle
from ssd_core.cache import read_regular
from ssd_core.cases import route_cases, step_coefficients
from ssd_core.errors import UserError, install_hint
from ssd_core.files import write_atomic
from ssd_core.schema import to_json

DATA_MARKER = "bundle.json"  # in a debug-data folder: the digest of the bundle it was written for
OUTPUTS = ("x_s", "x0_pred")  # a step graph's outputs, as every runner names them
REFERENCE = "onnxruntime-fp32"  # the reference runner's name in saved results


def import_polygraphy():
    """Polygraphy's comparator and ONNX Runtime runner, or one line saying how to install them."""
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator, CompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise UserError("this needs NVIDIA's polygraphy and onnxruntime: pip install 'polygraphy>=0.53.6,<0.54' "
                        f"(or {install_hint('trt')})") from None
    return Comparator, CompareFunc, OnnxrtRunner, SessionFromOnnx, G_LOGGER


def check_inputs(bundle: Bundle, route: str) -> list[dict[str, np.ndarray]]:
    """The route's step-graph check inputs (x, t, coef, z) at the bundle's smallest and largest batch."""
    low, high = bundle.batch_range
    contract = to_json(bundle.routes[route])
    coefs = step_coefficients(bundle.space, route)
    return [case for size in sorted({low, high})
            for case in route_cases(contract, [0, bundle.space.timesteps - 1], (size, size), coefs=coefs)]


def step_graph(bundle: Bundle, route: str) -> Path:
    """The route's fp32 step graph, hash-checked."""
    return bundle.verified_path(bundle.route_file(route, "onnx", step=True))


def reference_runner(bundle: Bundle, route: str):
    """Polygraphy's ONNX Runtime runner on the route's fp32 step graph, on the CPU."""
    _, _, OnnxrtRunner, SessionFromOnnx, _ = import_polygraphy()
    return OnnxrtRunner(SessionFromOnnx(str(step_graph(bundle, route)), providers=["cpu"]), name=REFERENCE)


@contextlib.contextmanager
def quiet():
    """Polygraphy's logger down to errors (it reports every inference at INFO)."""
    G_LOGGER = import_polygraphy()[4]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        yield


def error_statistics(results, candidate: str) -> dict[str, dict[str, float]]:
    """Per output, over every check input: the largest and mean |candidate - reference| and
    the reference's standard deviation (the scale those are read against)."""
    runs = dict(results.items())
    stats = {}
    for output in OUTPUTS:
        diffs, refs = [], []
        for ours, ref in zip(runs[candidate], runs[REFERENCE]):
            diffs.append(np.abs(np.asarray(ours[output], np.float64) - np.asarray(ref[output], np.float64)).ravel())
            refs.append(np.asarray(ref[output], np.float64).ravel())
        diff, ref = np.concatenate(diffs), np.concatenate(refs)
        stats[output] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "ref_std": float(ref.std())}
    return stats


def compare_engine(bundle: Bundle, route: str, candidate, tolerance: float) -> dict:
    """Run ``candidate`` (a Polygraphy runner: ``TrtRunner`` on the engine bytes, or a
    stand-in with its interface) and ONNX Runtime fp32 on the route's check inputs through
    Polygraphy's ``Comparator``; the engine passes when Polygraphy's comparison with
    ``atol = tolerance`` (``rtol = 0``, on the largest error) passes. Returns the
    registry's comparison record with per-output error statistics."""
    Comparator, CompareFunc, *_ = import_polygraphy()
    cases = check_inputs(bundle, route)
    reference = reference_runner(bundle, route)
    with quiet():
        try:
            results = Comparator.run([candidate, reference], data_loader=cases)
        except UserError:
            raise
        except Exception as err:  # Polygraphy's and the runners' own exception types: one line
            message = str(err).strip().splitlines()
            raise UserError(f"the {route} engine could not be run for its check against ONNX Runtime "
                            f"({type(err).__name__}: {message[0] if message else 'no message'})") from None
        verdict = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(
            atol=tolerance, rtol=0.0, check_error_stat="max"))
    stats = error_statistics(results, candidate.name)
    worst = max(s["max_abs"] for s in stats.values())
    return {"max_abs": worst, "tolerance": tolerance, "cases": len(cases),
            "passed": bool(verdict) and worst <= tolerance, "checked_by": "polygraphy", "outputs": stats}


def check_data_folder(folder: Path, bundle: Bundle | None) -> None:
    """``folder`` may take ``bundle``'s debug data: new, empty, or holding only what an
    earlier (perhaps interrupted) run for this same bundle wrote there (its ``bundle.json``
    names the bundle's digest); with ``bundle`` None (a bundle still to be exported), new
    or empty only. Anything else is refused in one line, never replaced."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"--polygraphy-inputs {folder}: not a folder")
    present = {path.name for path in folder.iterdir()} if folder.exists() else set()
    if not present:
        return
    ours = set() if bundle is None else {DATA_MARKER, "commands.txt"} | {
        f"{route}.{kind}.json{partial}" for route in bundle.routes
        for kind in ("inputs", "outputs") for partial in ("", ".partial")}
    try:
        marker = json.loads(read_regular(folder / DATA_MARKER, 4096) or b"null")
    except ValueError:
        marker = None
    if bundle is None or marker != {"bundle": bundle.digest} or not present <= ours:
        raise UserError(f"--polygraphy-inputs {folder}: holds files this bundle's debug data did not write "
                        "(name a new or empty folder; nothing there is replaced)")


def write_debug_data(bundle: Bundle, folder: Path, echo=print) -> list[Path]:
    """Per route, ``<route>.inputs.json`` (the check inputs) and ``<route>.outputs.json``
    (ONNX Runtime fp32's outputs on them, as Polygraphy's ``RunResults``) in ``folder``, and
    ``commands.txt``: the ``polygraphy run`` lines that use them. Each file is written
    under a temporary name and renamed into place, so an interrupted run leaves only whole
    files; run again, it keeps them and writes the rest (:func:`check_data_folder`).
    Returns the data files and ``commands.txt``."""
    Comparator, *_ = import_polygraphy()
    from polygraphy.json import save_json

    folder = Path(folder)
    check_data_folder(folder, bundle)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / DATA_MARKER, json.dumps({"bundle": bundle.digest}).encode())
    written, commands = [], []
    for route in bundle.routes:
        inputs, outputs = folder / f"{route}.inputs.json", folder / f"{route}.outputs.json"
        if not (inputs.is_file() and outputs.is_file()):
            cases = check_inputs(bundle, route)
            with quiet():
                results = Comparator.run([reference_runner(bundle, route)], data_loader=cases)
                for path, save in ((inputs, lambda dest: save_json(cases, dest)), (outputs, results.save)):
                    partial = path.with_name(path.name + ".partial")  # an interrupted run's is replaced
                    save(str(partial))
                    os.replace(partial, path)
            echo(f"  {route}: {len(cases)} inputs, reference outputs of ONNX Runtime fp32")
        written += [inputs, outputs]
        commands.append(f"polygraphy run {step_graph(bundle, route)} --trt --load-inputs {inputs} "
                        f"--load-outputs {outputs} --atol 1e-3 --rtol 0 --check-error-stat max")
    write_atomic(folder / "commands.txt", ("\n".join(commands) + "\n").encode())
    return written + [folder / "commands.txt"]


def fold_graph(path: Path) -> tuple[object, int, int]:
    """Polygraphy's constant folding (``fold_constants``: ONNX-GraphSurgeon's fold, then its
    clean-up) of the graph at ``path``: (the folded ``onnx.ModelProto``, nodes before, after)."""
    import onnx
    from polygraphy.backend.onnx import fold_constants

    model = onnx.load(str(path))
    before = len(model.graph.node)
    with quiet():
        folded = fold_constants(model, num_passes=None, copy=True, error_ok=False)
    return folded, before, len(folded.graph.node)
