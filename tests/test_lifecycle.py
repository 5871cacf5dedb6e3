"""Backends with a lifecycle: ``close()`` releases what a backend acquired (ONNX Runtime
sessions and their file handles, TorchScript modules, TensorRT device memory, stream,
CUDA graphs, contexts and engines), ``Sampler`` is a context manager, a closed one refuses
use with one line, and a failure part-way through loading releases what was taken.
TensorRT runs against ``fake_tensorrt``, which tracks what is live."""
from __future__ import annotations

import gc
import math
import os
import shutil
import weakref
from pathlib import Path

import pytest
from click.testing import CliRunner

import fake_tensorrt
from ssd_core.bundle import BundleError
from ssd_core.errors import UserError
from ssd_runtime import Sampler
from ssd_runtime.backend import BackendError
from ssd_runtime.cuda import CudaError, Stream, check

NOTHING_LIVE = {"memory": 0, "host": 0, "events": 0, "streams": 0, "graphs": 0, "graph_execs": 0}


def held(folder: Path) -> list[str]:
    """Files under ``folder`` this process holds open (/proc/self/fd) or mapped (/proc/self/maps)."""
    gc.collect()
    prefix = str(Path(folder).resolve()) + os.sep
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the fd of the listing itself, closed by now
            pass
    with open("/proc/self/maps") as maps:
        paths += [line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6]
    return sorted(p for p in paths if p.startswith(prefix))


def assert_one_line(err: Exception, pattern: str) -> None:
    assert isinstance(err, UserError) and "\n" not in str(err), repr(err)
    assert pattern in str(err), str(err)


def sample(sampler: Sampler):
    return sampler.sample_float(1, seed=0, steps=4, batch=1)


# --------------------------------------------------------------------------- ONNX Runtime
needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


@needs_proc
@pytest.mark.parametrize("low_memory", [False, True])
def test_onnxruntime_close_releases_sessions_and_bundle_files(bundles, low_memory):
    bundle = bundles[3][1]
    before = held(bundle)
    sampler = Sampler.from_bundle(bundle, backend="onnxruntime", low_memory=low_memory)
    sample(sampler)
    backend = sampler.backend
    sessions = [weakref.ref(s) for s in backend.sessions.values()]
    sampler.close()
    assert backend.sessions == {} and backend.shared == [] and sampler.closed
    assert held(bundle) == before
    assert all(ref() is None for ref in sessions)
    sampler.close()  # twice: harmless
    for use in (lambda: sample(sampler), sampler.info, lambda: sampler.plan(4),
                lambda: sampler.iter_batches(1, steps=4)):
        with pytest.raises(BackendError) as err:
            use()
        assert_one_line(err.value, "the sampler is closed")
    with pytest.raises(BackendError) as err:
        backend.warmup(1)
    assert_one_line(err.value, "backend 'onnxruntime' is closed")


def test_a_sampler_closed_between_batches_refuses_the_next(bundles):
    sampler = Sampler.from_bundle(bundles[1][1], warmup=False, backend="onnxruntime")
    batches = sampler.iter_float_batches(2, steps=4, batch=1)
    next(batches)
    sampler.close()
    with pytest.raises(BackendError, match="the sampler is closed"):
        next(batches)


@needs_proc
def test_with_block_closes_the_sampler_also_when_it_raises(bundles):
    bundle = bundles[1][1]
    before = held(bundle)
    with Sampler.from_bundle(bundle, backend="onnxruntime") as sampler:
        assert sample(sampler).shape[0] == 1
    assert sampler.closed and held(bundle) == before
    with pytest.raises(ZeroDivisionError):
        with Sampler.from_bundle(bundle, backend="onnxruntime") as sampler:
            1 / 0
    assert sampler.closed and sampler.backend.sessions == {} and held(bundle) == before
    with pytest.raises(BackendError, match="the sampler is closed"):
        with sampler:
            pass


@needs_proc
def test_onnxruntime_a_later_session_failing_drops_the_earlier_ones(bundles, monkeypatch):
    import onnxruntime as ort

    bundle = bundles[3][1]
    before = held(bundle)
    made, real = [], ort.InferenceSession

    def second_fails(*args, **kwargs):
        if len(made) == 1:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : out of memory\nsecond line")
        session = real(*args, **kwargs)
        made.append(weakref.ref(session))
        return session

    monkeypatch.setattr(ort, "InferenceSession", second_fails)
    with pytest.raises(BundleError) as err:  # kept: its frames hold the backend
        Sampler.from_bundle(bundle, backend="onnxruntime")
    assert_one_line(err.value, "ONNX Runtime cannot load onnx/")
    gc.collect()
    assert len(made) == 1 and made[0]() is None
    assert held(bundle) == before


def test_a_failed_warmup_closes_the_backend(bundles, monkeypatch):
    import ssd_runtime.sampler as sampler_module

    made, real = [], sampler_module.make_backend

    def fail(batch):
        raise BackendError("warmup failed")

    def make_backend(*args, **kwargs):
        made.append(real(*args, **kwargs))
        made[-1].warmup = fail
        return made[-1]

    monkeypatch.setattr(sampler_module, "make_backend", make_backend)
    with pytest.raises(BackendError, match="warmup failed"):
        Sampler.from_bundle(bundles[1][1], backend="onnxruntime")
    assert made[0].closed and made[0].sessions == {}


# --------------------------------------------------------------------------- TorchScript
def test_torchscript_close_releases_the_modules(bundles):
    sampler = Sampler.from_bundle(bundles[3][1], backend="torchscript")
    sample(sampler)
    modules = [weakref.ref(m) for m in sampler.backend.modules.values()]
    with sampler:
        pass
    gc.collect()
    assert sampler.backend.modules == {} and all(ref() is None for ref in modules)
    with pytest.raises(BackendError, match="the sampler is closed"):
        sample(sampler)


def test_torchscript_a_later_module_failing_drops_the_earlier_ones(bundles, monkeypatch):
    import ssd_runtime.torchscript_backend as backends

    made, real = [], backends.load_checked

    def second_fails(data, where, *args):
        if len(made) == 1:
            raise BundleError(f"TorchScript cannot load {where}: broken")
        module = real(data, where, *args)
        made.append(weakref.ref(module))
        return module

    monkeypatch.setattr(backends, "load_checked", second_fails)
    with pytest.raises(BundleError, match="TorchScript cannot load") as err:  # kept: its frames hold the backend
        Sampler.from_bundle(bundles[3][1], backend="torchscript")
    gc.collect()
    assert len(made) == 1 and made[0]() is None and err.value


# --------------------------------------------------------------------------- TensorRT (stand-in)
@pytest.fixture(scope="module")
def engines(bundles, tmp_path_factory):
    """A copy of the 3-level bundle (five routes) with fake TensorRT 10 engines."""
    from ssd_export.cli import export_command

    folder = tmp_path_factory.mktemp("lifecycle") / "bundle"
    shutil.copytree(bundles[3][1], folder)
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_tensorrt.install(monkeypatch)
        result = CliRunner().invoke(export_command, [str(folder), "--engine", "trt"])
    assert result.exit_code == 0, result.output
    return folder


def live(trt, cudart) -> tuple[dict, int]:
    """What the stand-in holds: CUDA resources, and TensorRT engines and contexts."""
    gc.collect()
    return cudart.live(), len(trt.live)


def test_tensorrt_close_releases_memory_stream_graphs_contexts_and_engines(engines, monkeypatch):
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    with Sampler.from_bundle(engines, backend="tensorrt") as sampler:
        sample(sampler)
        during, objects = live(trt, cudart)
        assert during["graphs"] == 0 and during["graph_execs"] == calls.number("capture") > 0
        assert during["memory"] > 0 and during["streams"] == 1 and objects == 2 * 5  # engine + context per route
        backend = sampler.backend
    assert live(trt, cudart) == (NOTHING_LIVE, 0)
    assert calls.number("cudaStreamDestroy") == 1 and calls.number("cudaGraphExecDestroy") == during["graph_execs"]
    sampler.close()  # twice: harmless
    with pytest.raises(BackendError) as err:
        backend.run_step("keep_8", None, None, None, None)
    assert_one_line(err.value, "backend 'tensorrt' is closed")
    with pytest.raises(BackendError, match="the sampler is closed"):
        sample(sampler)


def inside(fake, name: str):
    """What the stand-in recorded on one of its objects (not part of TensorRT's API)."""
    return object.__getattribute__(fake, name)


def test_tensorrt_engine_phases_each_take_and_give_back_their_part(engines, monkeypatch):
    """load, activate, allocate, deactivate, unload: NVIDIA's demo phases, one engine."""
    from ssd_core.bundle import load_bundle
    from ssd_runtime.cuda import DeviceBuffer
    from ssd_runtime.tensorrt_backend import ALIGN, EngineRunner

    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    bundle = load_bundle(engines)
    record = bundle.engine_sets[0].engines[0]
    runner = EngineRunner(trt, cudart, record.path).load(trt.Runtime(trt.Logger()), bundle.read(record))
    assert live(trt, cudart) == (NOTHING_LIVE, 1)  # the engine alone
    scratch = DeviceBuffer.allocate(cudart, runner.scratch_bytes)
    runner.activate(scratch)
    assert inside(runner.context, "scratch") == (scratch.ptr, runner.scratch_bytes) and len(trt.live) == 2
    runner.allocate(4, use_graphs=True)
    assert calls.number("cudaMalloc") == 2  # the scratch and one block for all six I/O tensors
    addresses = runner.addresses
    assert sorted(addresses) == ["coef", "t", "x", "x0_pred", "x_s", "z"] and addresses == inside(runner.context, "addresses")
    assert all(a % ALIGN == 0 for a in addresses.values()) and addresses["t"] == addresses["coef"] + ALIGN
    ends = sorted((a, a + 4 * math.prod(runner.shape(n, 4))) for n, a in addresses.items())
    assert all(end <= start for (_, end), (start, _) in zip(ends, ends[1:]))  # no two overlap
    runner.deactivate()
    assert live(trt, cudart)[1] == 1 and runner.engine is not None and cudart.live()["memory"] == 1  # the scratch
    runner.unload()
    scratch.free()
    assert live(trt, cudart) == (NOTHING_LIVE, 0)


def test_tensorrt_routes_share_one_scratch_block_and_step_tables_last_one_call(engines, monkeypatch):
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    with Sampler.from_bundle(engines, backend="tensorrt") as sampler:
        backend = sampler.backend
        needs = {runner.scratch_bytes for runner in backend.runners.values()}
        assert len(needs) > 1  # the stand-in's engines differ, so "the largest" is tested
        assert {inside(runner.context, "scratch") for runner in backend.runners.values()} == {(backend.scratch.ptr, max(needs))}
        batches = sampler.iter_float_batches(8, seed=0, steps=6, batch=4)
        next(batches)
        assert len(backend.tables) == 1  # one table for batch 4, bound for the whole call
        next(batches)
        assert len(backend.tables) == 1 and calls.number("cudaMemcpyAsync", bytes=6 * (64 + 4) * 4) == 1
        batches.close()
        assert backend.tables == {}
        sample(sampler)
        assert backend.tables == {}
    assert live(trt, cudart) == (NOTHING_LIVE, 0)


@pytest.mark.parametrize("point, k, pattern", [
    ("deserialize_cuda_engine", 2, "TensorRT cannot load engines/"),
    ("cudaMalloc", 1, "CUDA call cudaMalloc failed: cudaErrorMemoryAllocation"),  # the shared scratch block
    ("cudaMalloc", 3, "CUDA call cudaMalloc failed"),  # the 2nd engine's I/O block
    ("cudaMallocHost", 2, "CUDA call cudaMallocHost failed"),  # the noise staging's second page-locked slot
    ("cudaStreamCreate", 1, "CUDA call cudaStreamCreate failed"),
    # TensorRT's own failure values (issue 16), each one line naming the engine
    ("Runtime", 1, "TensorRT cannot create its Runtime (the factory returned nullptr"),
    ("create_execution_context", 2, "TensorRT cannot create an execution context for engines/"),
    ("set_tensor_address", 8, "TensorRT refused the address of I/O tensor"),
    ("set_input_shape", 2, "TensorRT refused input 't' at batch 1 (shape (1,)): outside the engine's optimisation"),  # warmup
])
def test_tensorrt_a_failure_while_loading_releases_what_was_taken(engines, monkeypatch, point, k, pattern):
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    cudart.faults.fail(point, k)
    with pytest.raises(UserError) as err:
        Sampler.from_bundle(engines, backend="tensorrt")
    assert_one_line(err.value, pattern)
    assert point not in cudart.faults.armed  # the failure did happen where asked
    assert live(trt, cudart) == (NOTHING_LIVE, 0)


def test_tensorrt_a_failed_warmup_releases_everything(engines, monkeypatch):
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    Sampler.from_bundle(engines, backend="tensorrt", warmup=False).close()
    loading = calls.number("cudaMalloc")  # the I/O buffers and the scratch block
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    cudart.faults.fail("cudaMalloc", loading + 2)  # a constant's upload during warmup
    with pytest.raises(CudaError, match="cudaMalloc failed"):
        Sampler.from_bundle(engines, backend="tensorrt")
    assert calls.number("execute") == 0 and live(trt, cudart) == (NOTHING_LIVE, 0)


def test_tensorrt_a_graph_that_fails_to_instantiate_is_still_destroyed(engines, monkeypatch):
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    cudart.faults.fail("cudaGraphInstantiate", 1)
    with pytest.warns(RuntimeWarning, match="no CUDA graphs for this engine .*cudaGraphInstantiate failed"):
        with Sampler.from_bundle(engines, backend="tensorrt") as sampler:
            sample(sampler)  # runs on without CUDA graphs for that engine, and says so
            assert cudart.live()["graphs"] == 0
            (why,) = sampler.backend.providers()[1:]
            assert "runs without CUDA graphs: CUDA call cudaGraphInstantiate failed" in why
    assert live(trt, cudart) == (NOTHING_LIVE, 0)


@pytest.mark.parametrize("k, pattern", [
    (1, "TensorRT failed to run the engine (execute_async_v3 returned False"),  # a plain run
    (2, "TensorRT failed to run the engine during CUDA graph capture (execute_async_v3 returned False"),
])
def test_tensorrt_a_failed_run_or_capture_is_one_line_and_releases_everything(engines, monkeypatch, k, pattern):
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    cudart.faults.fail("execute_async_v3", k)
    with pytest.raises(BackendError) as err:
        with Sampler.from_bundle(engines, backend="tensorrt") as sampler:
            sample(sampler)
    assert_one_line(err.value, pattern)
    assert live(trt, cudart) == (NOTHING_LIVE, 0)


def test_tensorrt_batch_changes_run_plainly_before_replaying_a_graph(engines, monkeypatch):
    """The stand-in freezes shapes and addresses into a graph and refuses a capture or replay
    after a shape change without a plain run in between; batches 4, 2, 4 on one context."""
    calls, trt, cudart = fake_tensorrt.install(monkeypatch)
    reference = Sampler.from_bundle(engines, warmup=False, backend="onnxruntime")
    with Sampler.from_bundle(engines, backend="tensorrt", warmup=False) as sampler:
        for batch in (4, 2, 4):  # one context, its input shapes changed twice
            images = sampler.sample_float(batch, seed=3, steps=20, batch=batch)
            assert abs(images - reference.sample_float(batch, seed=3, steps=20, batch=batch)).max() < 1e-4
        assert calls.number("capture") == cudart.live()["graph_execs"] == 2 * 5  # per route and batch size
        assert calls.number("cudaGraphLaunch") > 0
        runner = sampler.backend.runners["keep_32"]
        with pytest.raises(BackendError) as err:  # beyond the profile: set_input_shape returns False
            runner.infer(sampler.backend.stream, 5)
        assert_one_line(err.value, "TensorRT refused input 'x' at batch 5 (shape (5, ")
        # the stand-in's check itself: a replay at batch 4 right after a shape change is refused
        runner.set_batch(2)
        runner.context.set_input_shape("x", runner.shape("x", 4))
        with pytest.raises(RuntimeError, match="replayed after its context's input shapes changed"):
            sampler.backend.stream.launch(runner.graphs[4])
    reference.close()
    assert live(trt, cudart) == (NOTHING_LIVE, 0)


def test_fake_destroy_calls_refuse_unknown_or_destroyed_handles(monkeypatch):
    _, _, cudart = fake_tensorrt.install(monkeypatch)
    stream = Stream(cudart)
    handle = stream.handle
    stream.close()
    stream.close()  # ours: a second close does nothing
    for call, name in ((lambda: cudart.cudaStreamDestroy(handle), "cudaStreamDestroy"),
                       (lambda: cudart.cudaGraphDestroy(object()), "cudaGraphDestroy"),
                       (lambda: cudart.cudaGraphExecDestroy(object()), "cudaGraphExecDestroy"),
                       (lambda: cudart.cudaFree(12345), "cudaFree")):
        with pytest.raises(CudaError, match=f"{name} failed"):
            check(cudart, call(), name)
