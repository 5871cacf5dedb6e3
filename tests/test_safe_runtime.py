"""Hostile bundles and options for the runtime: TorchScript files are code and are checked
before they run, threads are bounded by the cores, NaN stops sampling, graphs must match the
manifest's contract, and API options must have their types. Each case is one line."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from ssd_core.bundle import BundleError
from ssd_core.errors import UserError
from ssd.evaluate import Inception
from ssd_core.torchscript_check import INCEPTION_OPS, ROUTE_OPS, load_checked
from ssd_runtime import Sampler
from ssd_runtime.backend import BackendError
from ssd_runtime.registry import available_cores
from ssd_runtime.cli import main as ssd_run
from ssd_runtime.sampler import check_plan

from conftest import assert_one_line_error, run_main


@pytest.fixture
def copy(bundles, tmp_path):
    """A writable copy of the shared 3-level bundle (ONNX + TorchScript, batch 1:4)."""
    folder = tmp_path / "bundle"
    shutil.copytree(bundles[3][1], folder)
    return folder


def replace(folder: Path, relative: str, data: bytes) -> None:
    """Write a bundle file and update its manifest hash, so the manifest check passes."""
    (folder / relative).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    for route in manifest["routes"]:
        for entry in [*route["files"].values(), *route["step_files"].values()]:
            if entry["path"] == relative:
                entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def node_kinds(block, kinds: set) -> set:
    for node in block.nodes():
        kinds.add(node.kind())
        for inner in node.blocks():
            node_kinds(inner, kinds)
    return kinds


# --------------------------------------------------------------------------- TorchScript is code
def test_exported_modules_stay_inside_the_allowlist(bundles):
    """The allowlist is what our exporter emits: a fresh export uses nothing else."""
    for _, folder in bundles.values():
        for path in sorted((folder / "torchscript").glob("*.pt")):
            module = torch.jit.load(str(path))
            graph = module.inlined_graph
            assert node_kinds(graph, set()) <= ROUTE_OPS, (path.name, node_kinds(graph, set()) - ROUTE_OPS)


@torch.jit.script
def leak(x: torch.Tensor, target: str) -> torch.Tensor:
    torch.save(x, target)
    return x


class Saves(torch.nn.Module):
    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        torch.save(x, self.target)
        return x, x


class ReadsFiles(Saves):
    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        secret = torch.from_file("/etc/passwd", False, 16, dtype=torch.uint8)
        return x + secret.sum(), x


class SavesInABranch(Saves):
    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        if bool(t.sum() >= 0):
            for _ in range(2):
                torch.save(x, self.target)
        return x, x


class SavesInAFunction(Saves):
    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        return leak(x, self.target), x


class Printer(torch.nn.Module):
    def shout(self, x: torch.Tensor) -> torch.Tensor:
        print("hello from the bundle")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PrintsInASubmodule(Saves):
    def __init__(self, target: str):
        super().__init__(target)
        self.inner = Printer()

    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        return self.inner.shout(x), x


class SavesWhenLoaded(Saves):
    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        return x, x

    @torch.jit.export
    def __getstate__(self):
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        torch.save(torch.zeros(1), state[0])
        self.target, self.training = state


def save_hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
              output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.save(output[0], "/nonexistent/never-written")
    return output


def scripted(kind, target: Path) -> bytes:
    module = kind(str(target))
    path = target.with_suffix(".pt")
    torch.jit.save(torch.jit.script(module), str(path))
    return path.read_bytes()


class Harmless(Saves):
    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor):
        return x, x


def with_hook(target: str) -> torch.nn.Module:
    module = Harmless(target)
    module.register_forward_hook(save_hook)
    return module


@pytest.mark.parametrize("kind, pattern", [
    (Saves, r"calls aten::save in forward\(\)"),
    (ReadsFiles, r"calls aten::from_file, aten::sum in forward"),
    (SavesInABranch, r"calls .*aten::save"),  # inside nested blocks
    (SavesInAFunction, r"calls .*aten::save"),  # inside an inlined TorchScript function
    (PrintsInASubmodule, r"calls prim::Print"),  # inside a submodule's other method
    (SavesWhenLoaded, r"defines __setstate__"),  # would run inside torch.jit.load
    (with_hook, r"has forward hooks"),
])
def test_hostile_torchscript_is_refused_before_it_runs(copy, tmp_path, capsys, kind, pattern):
    target = tmp_path / "written-by-the-bundle"
    replace(copy, "torchscript/keep_8.step.pt", scripted(kind, target))
    out = tmp_path / "out"
    result = run_main(ssd_run, [copy, "--backend", "torchscript", "--steps", "3", "--n", "1", "--out", out], capsys)
    assert_one_line_error(result, rf"torchscript/keep_8\.step\.pt {pattern}")
    assert not target.exists() and not out.exists()


class MiniInception(torch.nn.Module):
    """The structure of NVIDIA's FID Inception (conv + batch norm + ReLU, pooling towers,
    concatenation, the affine-grid resize to 299 px, linear, softmax) at a small width."""

    def __init__(self):
        super().__init__()

        def conv(cin, cout, k, stride=1, padding=0):
            return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, stride, padding, bias=False),
                                       torch.nn.BatchNorm2d(cout, eps=0.001), torch.nn.ReLU())

        self.stem = torch.nn.Sequential(conv(3, 8, 3, 2), torch.nn.MaxPool2d(3, 2))
        self.tower = conv(8, 8, 1)
        self.pool = torch.nn.Sequential(torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv(8, 8, 1))
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.AvgPool2d(8, 8))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        batch, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device).unsqueeze(0).repeat([batch, 1, 1])
        grid = torch.nn.functional.affine_grid(theta, [batch, channels, 299, 299], False)
        x = (torch.nn.functional.grid_sample(x, grid, "bilinear", "border", False) - 127.5) / 127.5
        x = self.stem(x)
        x = torch.cat([self.tower(x), self.pool(x)], 1)
        features = torch.reshape(self.head(x).repeat(1, 128, 1, 1), [-1, 2048])
        if return_features:
            return features
        return torch.nn.functional.softmax(self.output(features), 1)


def test_inception_weights_are_checked_like_bundles(tmp_path):
    weights = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(MiniInception().eval()), str(weights))
    images = np.zeros((2, 1, 16, 16), np.uint8)
    assert Inception(weights, trust=True).raw_features(images).shape == (2, 2048)
    with pytest.raises(UserError, match=r"inception\.pt calls aten::.* and \d+ more in forward"):  # routes use fewer
        load_checked(weights.read_bytes(), "inception.pt", ROUTE_OPS)
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(scripted(Saves, tmp_path / "leak"))
    with pytest.raises(UserError, match=r"--inception-weights .*hostile\.pt calls aten::save"):
        Inception(hostile, trust=True)
    assert not (tmp_path / "leak").exists() and "aten::save" not in INCEPTION_OPS


# --------------------------------------------------------------------------- threads
@pytest.mark.parametrize("threads", [available_cores() + 1, 10_000, 2**31])
def test_threads_are_bounded_by_the_cores(bundles, tmp_path, capsys, threads):
    with pytest.raises(BackendError, match=rf"threads={threads}; expected an integer in 1\.\.{available_cores()}"):
        Sampler.from_bundle(bundles[1][1], threads=threads, warmup=False, backend="onnxruntime")
    out = tmp_path / "out"
    assert_one_line_error(run_main(ssd_run, [bundles[1][1], "--threads", threads, "--out", out], capsys),
                          rf"threads={threads}")
    assert not out.exists()


def test_all_cores_are_allowed(bundles):
    sampler = Sampler.from_bundle(bundles[1][1], backend="onnxruntime", threads=available_cores(), warmup=False)
    session = next(iter(sampler.backend.sessions.values()))
    assert session.get_session_options().intra_op_num_threads == available_cores()


# --------------------------------------------------------------------------- NaN
def onnx_graph(inputs: dict, outputs: dict, nodes: list, initializers=()) -> bytes:
    """A float32 ONNX graph with the given ``{name: shape}`` inputs and outputs."""
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "hostile", [value(n, s) for n, s in inputs.items()],
                              [value(n, s) for n, s in outputs.items()], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


KEEP_8_STEP = {"x": ["batch", 3, 8, 8], "t": ["batch"], "coef": [3], "z": ["batch", 3, 8, 8]}
STATE_8 = ["batch", 3, 8, 8]


def nan_step() -> bytes:
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])
    nodes = [helper.make_node("Mul", ["x", "nan"], ["x_s"]), helper.make_node("Identity", ["x_s"], ["x0_pred"])]
    return onnx_graph(KEEP_8_STEP, {"x_s": STATE_8, "x0_pred": STATE_8}, nodes, [nan])


def nan_route() -> bytes:
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])
    return onnx_graph({"x": STATE_8, "t": ["batch"]}, {"x0_pred": STATE_8},
                      [helper.make_node("Mul", ["x", "nan"], ["x0_pred"])], [nan])


@pytest.mark.parametrize("file, graph, flag", [("onnx/keep_8.step.onnx", nan_step, "--fused"),
                                               ("onnx/keep_8.onnx", nan_route, "--unfused")])
def test_nan_from_a_graph_stops_naming_the_first_step(copy, tmp_path, capfd, file, graph, flag):
    replace(copy, file, graph())
    out = tmp_path / "out"
    code, _, err = run_main(ssd_run, [copy, flag, "--backend", "onnxruntime", "--steps", "5", "--n", "1", "--out", out],
                            capfd)
    err = "\n".join(line for line in err.splitlines() if "step/s" not in line)  # the progress bar, before it
    assert_one_line_error((code, "", err), rf"NaN or inf at step 1/5 \(t=999, route keep_8, {file}\)")
    assert not out.exists()


def test_halving_matrices_that_break_the_covariance_are_refused(copy, tmp_path, capsys):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["process"]["halving"]["16"] = [[1.0] * 16 for _ in range(8)]  # in range, but no average
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_main(ssd_run, [copy, "--steps", "5", "--out", tmp_path / "out"], capsys)
    assert_one_line_error(result, r"resize matrix 16 -> 8 px is not the one its config's ladder implies")


def test_a_plan_with_a_nan_square_root_is_refused(bundles):
    bundle = Sampler.from_bundle(bundles[3][1], warmup=False, backend="onnxruntime").bundle
    plan = bundle.space.plan(5)
    up = next(step for step in plan if step.changes_size)
    broken = dataclasses.replace(up, noise_scale=np.full_like(up.noise_scale, np.nan))
    with pytest.raises(BundleError, match=rf"gives step {up.index + 1}/5 \(t={up.t}, route {up.route}\) a negative"):
        check_plan(bundle, [*plan[:up.index], broken, *plan[up.index + 1:]])


# --------------------------------------------------------------------------- graphs vs contract
def lying_shape() -> bytes:
    """Declares x0_pred [batch, 3, 8, 8] but computes [batch, 3, 16, 8] (ONNX Runtime's shape
    inference shows it at load)."""
    nodes = [helper.make_node("Concat", ["x", "x"], ["x0_pred"], axis=2)]
    return onnx_graph({"x": STATE_8, "t": ["batch"]}, {"x0_pred": STATE_8}, nodes)


def huge_constant() -> bytes:
    """Asks for a 4 TiB tensor when run."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [1 << 40])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("ReduceSum", ["big"], ["s"]),
             helper.make_node("Add", ["x", "s"], ["x0_pred"])]
    return onnx_graph({"x": STATE_8, "t": ["batch"]}, {"x0_pred": STATE_8}, nodes, [shape])


def file_of(name: str):
    return lambda folder: (folder / name).read_bytes()


@pytest.mark.parametrize("file, data, flag, pattern", [
    ("onnx/keep_8.step.onnx", file_of("onnx/keep_16.step.onnx"), "--fused",
     r"onnx/keep_8\.step\.onnx: x is tensor\(float\) \['batch', 3, 16, 16\]; .*keep_8 says float32 \['batch', 3, 8, 8\]"),
    ("onnx/keep_8.step.onnx", file_of("onnx/up_8_16.step.onnx"), "--fused",
     r"onnx/keep_8\.step\.onnx: coef is tensor\(float\) \[5\]; .* says float32 \[3\]"),  # routes swapped
    ("onnx/keep_8.onnx", file_of("onnx/up_8_16.onnx"), "--unfused",
     r"onnx/keep_8\.onnx: x0_pred is tensor\(float\) \['batch', 3, 16, 16\]"),
    ("onnx/keep_8.onnx", file_of("onnx/keep_8.step.onnx"), "--unfused", r"onnx/keep_8\.onnx has inputs"),
    ("onnx/keep_8.onnx", lambda folder: lying_shape(), "--unfused",
     r"onnx/keep_8\.onnx: x0_pred is tensor\(float\) \['batch', 3, None, 8\]"),
    ("onnx/keep_8.onnx", lambda folder: huge_constant(), "--unfused",
     r"ONNX Runtime failed running onnx/keep_8\.onnx: .*Failed to allocate memory"),
    ("torchscript/keep_8.step.pt", file_of("torchscript/up_8_16.step.pt"), "--fused",
     r"TorchScript failed running torchscript/keep_8\.step\.pt: RuntimeError: "),
    ("torchscript/keep_8.pt", file_of("torchscript/up_8_16.pt"), "--unfused",
     r"torchscript/keep_8\.pt returned shapes \[\(1, 3, 16, 16\)\]; route keep_8 must return 1 of \[1, 3, 8, 8\]"),
])
def test_graphs_that_break_the_contract_are_one_line(copy, tmp_path, capfd, file, data, flag, pattern):
    """One line on the file descriptor too: ONNX Runtime's own error log is silenced."""
    replace(copy, file, data(copy))
    backend = "torchscript" if file.startswith("torchscript") else "onnxruntime"
    out = tmp_path / "out"
    result = run_main(ssd_run, [copy, "--backend", backend, flag, "--steps", "3", "--n", "1", "--out", out], capfd)
    assert_one_line_error(result, pattern)
    assert not out.exists()


# --------------------------------------------------------------------------- API types
@pytest.mark.parametrize("kwargs, pattern", [
    ({"fused": "no"}, r"fused='no'; expected True or False or None"),
    ({"low_memory": "no"}, r"low_memory='no'; expected True or False"),
    ({"warmup": 0}, r"warmup=0; expected True or False"),
    ({"threads": "4"}, r"threads='4'; expected an integer"),
    ({"threads": True}, r"threads=True; expected an integer"),
    ({"threads": 2.0}, r"threads=2\.0; expected an integer"),
    ({"backend": 1}, r"backend=1; choose from"),
    ({"device": ["cpu"]}, r"device=\['cpu'\]; choose from"),
    ({"precision": 32}, r"precision=32; choose from"),
    ({"precision": "fp64"}, r"precision='fp64'; choose from \['auto', 'fp32', 'fp16', 'bf16', 'int8'\]"),
])
def test_api_options_must_have_their_types(bundles, kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        Sampler.from_bundle(bundles[1][1], **kwargs)


def test_bundle_path_must_be_a_path():
    with pytest.raises(BundleError, match="bundle path 123"):
        Sampler.from_bundle(123, backend="onnxruntime")


# --------------------------------------------------------------------------- the backend registry
def test_every_registered_backend_names_its_class_and_what_it_runs():
    """Each entry's class is the backend of that name (its module imports without its
    library), and the CLI's choices are exactly the registry's."""
    from ssd_runtime.registry import BACKENDS, PRECISIONS, REGISTRY

    assert BACKENDS == ("auto", *REGISTRY)
    for name, spec in REGISTRY.items():
        assert spec.load().name == name and spec.devices and set(spec.formats) <= set(PRECISIONS), name


def test_backend_options_travel_whole_or_by_keyword(bundles):
    from ssd_runtime import BackendOptions

    bundle = bundles[1][1]
    options = BackendOptions("onnxruntime", threads=1, fused=False)
    with Sampler.from_bundle(bundle, options, warmup=False) as whole, \
            Sampler.from_bundle(bundle, backend="onnxruntime", threads=1, fused=False, warmup=False) as keywords:
        assert whole.backend.fused is keywords.backend.fused is False
        np.testing.assert_array_equal(whole.sample(1, steps=3), keywords.sample(1, steps=3))
    with pytest.raises(TypeError, match="not also as"):  # make_backend says it
        Sampler.from_bundle(bundle, options, threads=2)
    for wrong, pattern in ((BackendOptions("tensorrt", device="cpu"), "runs on cuda, not device 'cpu'"),
                           (BackendOptions("openvino", low_memory=True), "--low-memory is onnxruntime's option"),
                           (BackendOptions("torchscript", precision="bf16"), "runs fp32, not bf16; bf16 runs on openvino")):
        with pytest.raises(BackendError, match=pattern):
            Sampler.from_bundle(bundle, wrong, warmup=False)
