"""The export steps ``ssd-export`` names, as importable functions.

    source = find_source(checkpoint, options.weights)   # resolve + hash, no weights yet
    target = inspect_target(out, ...)                    # new / up-to-date / replace
    with Staging(out) as stage:                          # temp folder beside out
        model = load_weights(source)
        manifest = build_bundle(model, source, options, stage.path, echo)  # export, verify
        stage.commit()                                   # rename into place
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ssd.bundle import BACKEND_FORMATS, process_section, route_contract, sha256_file
from ssd.config import SSDConfig

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
    from ssd.checkpoint import STATE_FILE, TENSOR_FILES, read_checkpoint, resolve_checkpoint

    folder = resolve_checkpoint(path)
    info = read_checkpoint(folder, parts=())
    weights_file = TENSOR_FILES["ema" if weights == "ema" else "model"]
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

    import ssd

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"ssd": ssd.__version__, "torch": version("torch"), "onnx": version("onnx"),
            "onnxscript": version("onnxscript"), "onnxruntime": version("onnxruntime"),
            "opset": OPSET, "exporter": "torch.onnx.export(dynamo=True)"}


def export_fingerprint(source: Source, options: ExportOptions) -> str:
    return bundle_writer.fingerprint(options.to_dict(), source.sha256, created_by())


# --------------------------------------------------------------------------- export
def contracts_for(config: SSDConfig, options: ExportOptions) -> dict[str, dict]:
    """The route contracts (SPEC §9), smallest route first; batch fixed or the "batch" axis."""
    from ssd.unet import parse_route, route_names

    batch = options.batch_min if options.fixed_batch else "batch"
    return {name: route_contract(name, *parse_route(name), config.model.in_channels, batch)
            for name in route_names(config)}


@dataclass
class Written:
    """The files an export wrote: ``paths[route][format]`` and each ONNX format's shared weights."""

    paths: dict[str, dict[str, Path]]
    stores: dict  # format -> weights.SharedWeights
    initializers: dict[str, dict[str, dict[str, int]]]  # route -> ONNX format -> name -> tensor index


def export_files(model, contracts: dict[str, dict], options: ExportOptions, folder: Path,
                 echo: Echo) -> Written:
    """Write every route in every format into ``folder`` and run ``onnx.checker`` on the graphs."""
    from . import onnx_export, torchscript_export
    from .weights import SharedWeights, save_route

    formats = options.formats
    for fmt in formats:
        (folder / fmt).mkdir()
    stores = {fmt: SharedWeights(folder / fmt / "weights.bin") for fmt in formats if fmt.startswith("onnx")}
    paths: dict[str, dict[str, Path]] = {name: {} for name in contracts}
    initializers: dict[str, dict[str, dict[str, int]]] = {name: {} for name in contracts}
    for name, contract in contracts.items():
        route, started = model.route(name), time.perf_counter()
        if "onnx" in formats:
            graph = onnx_export.export_route(route, contract, options.batch)
            variants = {"onnx": graph}
            if "onnx-fp16" in formats:
                variants["onnx-fp16"] = onnx_export.to_fp16(graph)
            for fmt, proto in variants.items():
                paths[name][fmt] = folder / fmt / f"{name}.onnx"
                initializers[name][fmt] = save_route(proto, paths[name][fmt], stores[fmt])
        if "torchscript" in formats:
            paths[name]["torchscript"] = folder / "torchscript" / f"{name}.pt"
            paths[name]["torchscript"].write_bytes(torchscript_export.export_route(route, contract, options.batch))
        echo(f"  exported {name:<12} {', '.join(paths[name])} ({time.perf_counter() - started:.1f} s)")
    for store in stores.values():
        store.close()
    for name in contracts:
        for fmt, path in paths[name].items():
            if fmt.startswith("onnx"):
                onnx_export.check_file(path)
    return Written(paths, stores, initializers)


def sizes_of(written: Written) -> dict:
    """Bytes per format: graphs, shared weights, total, and the naive self-contained sum."""
    paths, stores, sizes = written.paths, written.stores, {}
    for fmt in sorted({fmt for files in paths.values() for fmt in files}, key=BACKEND_FORMATS.index):
        files = sum(files[fmt].stat().st_size for files in paths.values() if fmt in files)
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
    from ssd.method import ScaleSpace

    config = source.config
    space = ScaleSpace.from_config(config)
    contracts = contracts_for(config, options)
    echo(f"exporting {len(contracts)} routes ({', '.join(options.formats)}), batch "
         f"{options.batch_min}:{options.batch_max}, from {source.checkpoint} step {source.step} ({source.weights})")
    written = export_files(model, contracts, options, folder, echo)
    for name, contract in contracts.items():
        contract["files"] = {fmt: bundle_writer.file_entry(folder, p) for fmt, p in written.paths[name].items()}
        for fmt, indices in written.initializers[name].items():
            contract["files"][fmt]["initializers"] = indices
    shared = {fmt: {**bundle_writer.file_entry(folder, store.path), "tensors": store.tensors}
              for fmt, store in written.stores.items()}
    manifest = bundle_writer.new_manifest(
        config, process_section(space), options.batch, list(contracts.values()), shared, created_by(),
        source.to_dict(), options.to_dict(), export_fingerprint(source, options), sizes_of(written))
    if options.verify:
        verify_bundle(model, config, manifest, written.paths, options, folder, echo)
    bundle_writer.write_manifest(folder, manifest)
    return manifest


def verify_bundle(model, config: SSDConfig, manifest: dict, paths: dict, options: ExportOptions,
                  folder: Path, echo: Echo) -> None:
    """Per-route checks into each route's ``verification``, then the end-to-end run."""
    from ssd.method import ScaleSpace

    t_values = verify.check_timesteps(ScaleSpace.from_config(config))
    report = {}
    for route in manifest["routes"]:
        name = route["name"]
        report[name] = verify.verify_route(model.route(name), route, paths[name], t_values, options.batch)
        route["verification"] = report[name]
    echo(verify.format_table(report))
    failed = verify.failures(report)
    if failed:
        raise verify.VerificationError(f"export does not match PyTorch: {'; '.join(failed)}")
    backend = "onnxruntime" if "onnx" in options.formats else "torchscript"
    bundle_writer.write_manifest(folder, manifest)  # the runtime reads the bundle from disk
    e2e = verify.end_to_end(folder, model, config, backend)
    manifest["verification"]["end_to_end"] = e2e
    for run in e2e["runs"]:
        echo(f"end to end, {run['steps']} steps, ssd_runtime ({backend}) vs PyTorch: max |x0| diff "
             f"{run['max_abs']:.2e}, uint8 levels {run['max_uint8_diff']} "
             f"({'ok' if run['passed'] else 'FAILED'})")
    if not e2e["passed"]:
        raise verify.VerificationError(
            f"runtime sampling differs from PyTorch beyond {e2e['tolerance']:.0e} "
            f"(or {e2e['max_uint8_levels']} uint8 level): {e2e['runs']}")
