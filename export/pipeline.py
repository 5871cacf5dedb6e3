"""The export steps ``ssd-export`` names, as importable functions.

    source = find_source(checkpoint, options.weights)   # resolve + hash, no weights yet
    with replaced_folder(out, "bundle", ...) as stage:   # out locked; a folder beside it
        target = inspect_target(out, stage.found, ...)   # new / up-to-date / replace
        model = load_weights(source)
        manifest = build_bundle(model, source, options, stage.path, echo)  # export, verify
        stage.commit()                                   # swapped into place
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ssd_core import __version__
from ssd_core.bundle import (BACKEND_FORMATS, QUANTIZED_FORMATS, process_section, route_contract, sha256_file,
                             step_contract)
from ssd_core.cases import route_cases, step_coefficients
from ssd_core.config import SSDConfig
from ssd_core.method import ScaleSpace
from ssd_core.step_plans import plans_section

from . import bundle_writer, verify
from .options import OPSET, ExportOptions

Echo = Callable[[str], None]


@dataclass
class Source:
    """A checkpoint chosen for export: where it is, what it is, and the hashes that name it."""

    checkpoint: Path  # the checkpoint folder (a run folder resolves to its latest)
    run: str  # absolute path of the run folder: with the config, the model's identity
    step: int
    config: SSDConfig
    weights: str  # "ema" | "raw"
    sha256: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "run": self.run, "step": self.step,
                "weights": self.weights, "sha256": dict(self.sha256)}


def find_source(path, weights: str) -> Source:
    """Resolve and read a checkpoint's config and step and hash its files; loads no weights."""
    from ssd.checkpoint import STATE_FILE, TENSOR_FILES, CheckpointError, read_checkpoint, resolve_checkpoint

    folder = resolve_checkpoint(path)
    info = read_checkpoint(folder, parts=())
    weights_file = TENSOR_FILES["ema" if weights == "ema" else "model"]
    if weights_file not in info.state.files:
        raise CheckpointError(f"{folder} is a weights-only release: it holds only EMA weights, so it cannot be "
                              "exported with --raw")
    hashes = {STATE_FILE: sha256_file(folder / STATE_FILE), weights_file: info.state.files[weights_file].sha256}
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    return Source(folder, str(run.resolve()), info.step, info.config, weights, hashes)


def load_weights(source: Source):
    """The FlexiUNet with the chosen weights, in eval mode on the CPU (non-finite weights
    are refused by ``load_model`` with one line)."""
    from ssd.checkpoint import load_model

    _, model = load_model(source.checkpoint, ema=source.weights == "ema", device="cpu")
    return model.eval()


def created_by() -> dict:
    """Versions of everything that shapes the exported bytes."""
    import importlib.metadata as metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"ssd": __version__, "torch": version("torch"), "onnx": version("onnx"),
            "onnxscript": version("onnxscript"), "onnxruntime": version("onnxruntime"),
            "opset": OPSET, "exporter": "torch.onnx.export(dynamo=True)"}


def export_fingerprint(source: Source, options: ExportOptions) -> str:
    return bundle_writer.fingerprint(options.to_dict(), source.sha256, created_by())


# --------------------------------------------------------------------------- export
def contracts_for(config: SSDConfig, options: ExportOptions) -> dict[str, dict]:
    """The route contracts (docs/method.md §9), smallest route first; batch fixed or the "batch" axis."""
    from ssd.unet import parse_route, route_names

    batch = options.batch_min if options.fixed_batch else "batch"
    return {name: route_contract(name, *parse_route(name), config.model.in_channels, batch)
            for name in route_names(config)}


@dataclass
class Written:
    """The files an export wrote: ``paths[route][format]`` (``steps[route][format]`` for the
    step graphs) and each ONNX format's shared weights."""

    paths: dict[str, dict[str, Path]]
    steps: dict[str, dict[str, Path]]
    stores: dict  # format -> weights.SharedWeights
    initializers: dict[str, dict[str, dict[str, dict[str, int]]]]  # route -> "files"|"step_files" -> ONNX format -> name -> index
    feeds: object = None  # quantize.Feeds: the int8 variant's calibration and held-out inputs


def export_files(model, space, contracts: dict[str, dict], options: ExportOptions, folder: Path,
                 echo: Echo) -> Written:
    """Write every route (and its step graph) in every format into ``folder`` and run
    ``onnx.checker`` on the graphs. The int8 variant is calibrated on sampling trajectories
    of ``model`` (``quantize.trajectories``) recorded first."""
    from ssd.step_graph import StepModule, update_for

    from . import onnx_export, quantize, torchscript_export
    from .weights import SharedWeights, save_route

    formats = options.formats
    feeds = None
    if "onnx-int8" in formats:
        started, channels = time.perf_counter(), next(iter(contracts.values()))["inputs"][0]["shape"][1]
        feeds = quantize.trajectories(model, space, channels, options.batch)
        echo(f"  int8 calibration: {quantize.describe(feeds)} ({time.perf_counter() - started:.1f} s)")
    for fmt in formats:
        (folder / fmt).mkdir()
    stores = {fmt: SharedWeights(folder / fmt / "weights.bin") for fmt in formats if fmt.startswith("onnx")}
    paths: dict[str, dict[str, Path]] = {name: {} for name in contracts}
    steps: dict[str, dict[str, Path]] = {name: {} for name in contracts}
    initializers = {name: {"files": {}, "step_files": {}} for name in contracts}
    for name, contract in contracts.items():
        route, started = model.route(name), time.perf_counter()
        update = update_for(space, contract["in_size"], contract["out_size"]) if options.step_graphs else None
        step_io = step_contract(contract)
        if "onnx" in formats:
            graph = onnx_export.export_route(route, contract, options.batch)
            variants = {"onnx": graph}
            if "onnx-fp16" in formats:
                variants["onnx-fp16"] = onnx_export.to_fp16(graph)
            if "onnx-int8" in formats:  # before save_route moves the fp32 weights out of ``graph``
                variants["onnx-int8"] = quantize.quantize_route(graph, feeds.calibration[name], contract)
            fused = {}
            if update is not None:
                update_graph = onnx_export.export_update(update, contract, options.batch)
                fused = {fmt: onnx_export.fuse_step(proto, update_graph, step_io, options.batch)
                         for fmt, proto in variants.items()}
            for fmt, proto in variants.items():  # route graphs first: they own the weights' layout
                paths[name][fmt] = folder / fmt / f"{name}.onnx"
                initializers[name]["files"][fmt] = save_route(proto, paths[name][fmt], stores[fmt])
            for fmt, proto in fused.items():
                steps[name][fmt] = folder / fmt / f"{name}.step.onnx"
                initializers[name]["step_files"][fmt] = save_route(proto, steps[name][fmt], stores[fmt])
        if "torchscript" in formats:
            paths[name]["torchscript"] = folder / "torchscript" / f"{name}.pt"
            paths[name]["torchscript"].write_bytes(torchscript_export.export_route(route, contract, options.batch))
            if update is not None:
                steps[name]["torchscript"] = folder / "torchscript" / f"{name}.step.pt"
                steps[name]["torchscript"].write_bytes(torchscript_export.export_route(
                    StepModule(route, update), contract, options.batch, step=True))
        kinds = ", ".join(paths[name]) + (" + step graphs" if steps[name] else "")
        echo(f"  exported {name:<12} {kinds} ({time.perf_counter() - started:.1f} s)")
    for store in stores.values():
        store.close()
    for name in contracts:
        for fmt, path in [*paths[name].items(), *steps[name].items()]:
            if fmt.startswith("onnx"):
                onnx_export.check_file(path)
    return Written(paths, steps, stores, initializers, feeds)


def sizes_of(written: Written) -> dict:
    """Bytes per format: graphs, shared weights, total, and the naive self-contained sum."""
    stores, sizes = written.stores, {}
    every = [*written.paths.values(), *written.steps.values()]  # route and step graphs
    for fmt in sorted({fmt for files in written.paths.values() for fmt in files}, key=BACKEND_FORMATS.index):
        files = sum(files[fmt].stat().st_size for files in every if fmt in files)
        entry = {"route_files_bytes": files, "total_bytes": files}
        if fmt in stores:
            store = stores[fmt]
            entry.update(weights_bytes=store.path.stat().st_size, total_bytes=files + store.path.stat().st_size,
                         naive_bytes=store.naive_bytes, tensor_bytes_referenced=store.referenced_bytes,
                         tensor_bytes_stored=store.stored_bytes)
        sizes[fmt] = entry
    return sizes


# --------------------------------------------------------------------------- the bundle
def build_bundle(model, source: Source, options: ExportOptions, folder: Path, echo: Echo) -> dict:
    """Export, verify and describe a bundle in ``folder``; returns the manifest written."""
    config = source.config
    space = ScaleSpace.from_config(config)
    contracts = contracts_for(config, options)
    echo(f"exporting {len(contracts)} routes ({', '.join(options.formats)}), batch "
         f"{options.batch_min}:{options.batch_max}, from {source.checkpoint} step {source.step} ({source.weights})")
    written = export_files(model, space, contracts, options, folder, echo)
    for name, contract in contracts.items():
        contract["files"] = {fmt: bundle_writer.file_entry(folder, p) for fmt, p in written.paths[name].items()}
        contract["step_files"] = {fmt: bundle_writer.file_entry(folder, p) for fmt, p in written.steps[name].items()}
        for key, formats in written.initializers[name].items():
            for fmt, indices in formats.items():
                contract[key][fmt]["initializers"] = indices
    shared = {fmt: {**bundle_writer.file_entry(folder, store.path), "tensors": store.tensors}
              for fmt, store in written.stores.items()}
    manifest = bundle_writer.new_manifest(
        config, process_section(space), options.batch, list(contracts.values()), shared, created_by(),
        source.to_dict(), options.to_dict(), export_fingerprint(source, options), sizes_of(written),
        quantization_section(written), plans_section(space))
    if options.verify:
        verify_bundle(model, config, manifest, written, options, folder, echo)
    if written.feeds is not None:  # always: the int8 variant is only as good as its check
        check_quantized(manifest, written, echo)
    if options.verify and "onnx" in options.formats:  # what --precision auto may run, measured here
        from .precision_check import check_precisions

        bundle_writer.write_manifest(folder, manifest)  # the runtime reads the bundle from disk
        precisions = check_precisions(folder, options.formats, echo)
        if precisions:
            manifest["verification"]["precisions"] = precisions
    bundle_writer.write_manifest(folder, manifest)
    return manifest


def quantization_section(written: Written) -> dict:
    """The manifest's ``quantization``: per quantized format its calibration settings and
    how many recorded calls calibrated and checked each route."""
    from . import quantize

    if written.feeds is None:
        return {}
    calls = lambda feeds: {name: len(route_feeds) for name, route_feeds in feeds.items()}
    return {quantize.FORMAT: {**quantize.CALIBRATION.to_dict(), "calibration_calls": calls(written.feeds.calibration),
                              "held_out_calls": calls(written.feeds.held_out)}}


def check_quantized(manifest: dict, written: Written, echo: Echo) -> None:
    """The int8 variant against the fp32 graphs on held-out trajectory inputs, per route and
    step graph, into each route's ``verification`` ("onnx-int8", "onnx-int8 step") and the
    ``quantization`` section; refused beyond ``quantize.MAX_ERROR`` / ``MEAN_ERROR``."""
    from . import quantize

    fmt, report = quantize.FORMAT, {}
    for route in manifest["routes"]:
        name, feeds = route["name"], written.feeds.held_out[route["name"]]
        report[name] = {fmt: quantize.check_variant(written.paths[name]["onnx"], written.paths[name][fmt], feeds)}
        if fmt in written.steps[name]:
            report[name][f"{fmt} step"] = quantize.check_variant(
                written.steps[name]["onnx"], written.steps[name][fmt], feeds, quantize.STEP_INPUTS)
        route["verification"].update(report[name])
    echo(quantize.format_table(report))
    checks = [check for checks in report.values() for check in checks.values()]
    manifest["quantization"][fmt]["check"] = {
        "max_error": max(c["max_error"] for c in checks), "mean_error": max(c["mean_error"] for c in checks),
        "passed": all(c["passed"] for c in checks)}
    failed = quantize.failures(report)
    if failed:
        raise quantize.QuantizationError(
            f"the int8 variant differs from fp32 beyond its bound (largest {quantize.MAX_ERROR}, mean "
            f"{quantize.MEAN_ERROR} of the output's std): {'; '.join(failed)}; export without --precision int8")


def against_torch(files: dict[str, Path]) -> dict[str, Path]:
    """The files checked against PyTorch on seeded random inputs: all but the quantized ones,
    which are checked against fp32 on trajectory inputs (:func:`check_quantized`)."""
    return {fmt: path for fmt, path in files.items() if fmt not in QUANTIZED_FORMATS}


def verify_bundle(model, config: SSDConfig, manifest: dict, written: Written, options: ExportOptions,
                  folder: Path, echo: Echo) -> None:
    """Per-route checks into each route's ``verification`` (step graphs as "<format> step"),
    then the end-to-end runs, fused and unfused."""
    from ssd.step_graph import step_module

    space = ScaleSpace.from_config(config)
    t_values = verify.check_timesteps(space)
    report = {}
    for route in manifest["routes"]:
        name = route["name"]
        cases = route_cases(route, t_values, options.batch)
        report[name] = verify.verify_route(model.route(name), cases, against_torch(written.paths[name]), t_values)
        if written.steps[name]:
            cases = route_cases(route, t_values, options.batch, coefs=step_coefficients(space, name))
            steps = verify.verify_route(step_module(model, space, name), cases, against_torch(written.steps[name]),
                                        t_values)
            report[name].update({f"{fmt} step": result for fmt, result in steps.items()})
        route["verification"] = report[name]
    echo(verify.format_table(report))
    failed = verify.failures(report)
    if failed:
        raise verify.VerificationError(f"export does not match PyTorch: {'; '.join(failed)}")
    backend = "onnxruntime" if "onnx" in options.formats else "torchscript"
    bundle_writer.write_manifest(folder, manifest)  # the runtime reads the bundle from disk
    e2e = verify.end_to_end(folder, model, config, backend, fused=(True, False) if options.step_graphs else (False,))
    manifest["verification"]["end_to_end"] = e2e
    for run in e2e["runs"]:
        echo(f"end to end, {run['steps']} steps, ssd_runtime ({backend}, {'fused' if run['fused'] else 'unfused'}) "
             f"vs PyTorch: max |x0| diff {run['max_abs']:.2e}, uint8 levels {run['max_uint8_diff']} "
             f"({'ok' if run['passed'] else 'FAILED'})")
    if not e2e["passed"]:
        raise verify.VerificationError(
            f"runtime sampling differs from PyTorch beyond {e2e['tolerance']:.0e} "
            f"(or {e2e['max_uint8_levels']} uint8 level): {e2e['runs']}")
