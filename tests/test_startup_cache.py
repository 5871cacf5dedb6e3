"""The start-up cache (``ssd_runtime.startup_cache``): ``auto``'s decision and OpenVINO's
compiled models are reused by the next run on this machine, are found only under the same
key (a changed bundle, CPU, option or library version misses), and a corrupt or foreign
entry is rebuilt with a warning, never trusted. Each test has its own ``$SSD_CACHE``
(conftest's ``own_cache``)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ssd_core.cache import envelope_path
from ssd_runtime import Sampler, load_bundle
from ssd_runtime import registry, startup_cache
from ssd_runtime.cpu import CpuInfo, this_cpu

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'ssd-diffusion[openvino]')")

FP32_AUTO = dict(backend="auto", precision="fp32", warmup=False, timing_batch=2)


def entries(folder: str, suffix: str):
    root = startup_cache.cache_root() / folder
    return sorted(root.glob(f"*{suffix}")) if root.exists() else []


def counting_timer(monkeypatch) -> list:
    timed = []
    real = registry.time_backends

    def time_backends(*args):
        timed.append(sorted(args[1]))
        return real(*args)

    monkeypatch.setattr(registry, "time_backends", time_backends)
    return timed


def test_the_key_names_everything_the_answer_depends_on():
    cpu = CpuInfo("Some CPU", frozenset({"avx2", "avx512_bf16"}))
    base = dict(bundle_digest="a" * 64, cpu=cpu, precision="fp32", batch=8, threads=2,
                candidates={"onnxruntime": "onnxruntime", "openvino": "openvino"}, fused=None, low_memory=False)
    key = startup_cache.decision_key(**base)
    assert startup_cache.decision_key(**base) == key  # deterministic: the next run finds it
    changed = [dict(bundle_digest="b" * 64), dict(cpu=CpuInfo("Other CPU", cpu.flags)),
               dict(cpu=CpuInfo(cpu.model, frozenset({"avx2"}))), dict(precision="bf16"), dict(batch=4),
               dict(threads=1), dict(fused=False), dict(low_memory=True),
               dict(candidates={"onnxruntime": "onnxruntime"})]
    keys = {startup_cache.decision_key(**{**base, **change}) for change in changed}
    assert key not in keys and len(keys) == len(changed)


def test_an_instruction_set_cap_misses(monkeypatch):
    cpu = CpuInfo("cpu", frozenset({"avx512_bf16", "amx_bf16"}))
    key = startup_cache.cpu_key(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # AMX off: every timing differs
    assert startup_cache.cpu_key(cpu) != key


def test_a_library_upgrade_misses(monkeypatch):
    args = ("a" * 64, CpuInfo("cpu", frozenset()), "fp32", 8, 2, {"onnxruntime": "onnxruntime"}, None, False)
    key = startup_cache.decision_key(*args)
    monkeypatch.setattr(startup_cache, "library_version", lambda name: "99.0")
    assert startup_cache.decision_key(*args) != key


def test_the_second_run_reuses_autos_decision_and_a_changed_cpu_times_again(bundles, monkeypatch):
    timed, said = counting_timer(monkeypatch), []
    with Sampler.from_bundle(bundles[1][1], say=said.append, **FP32_AUTO) as first:
        picked = first.backend.name
    assert len(timed) == 1 and len(entries("auto", ".decision")) == 1
    with Sampler.from_bundle(bundles[1][1], say=said.append, **FP32_AUTO) as second:
        assert second.backend.name == picked
    assert len(timed) == 1, "the second run timed again"
    assert said[1].endswith("; timed earlier on this machine") and said[1].split(";")[0] == said[0].split(";")[0]
    # another CPU (same bundle): another key, timed again, a second entry
    registry_cpu = CpuInfo(this_cpu().model + " (moved)", this_cpu().flags)
    monkeypatch.setattr(registry, "this_cpu", lambda: registry_cpu)
    with Sampler.from_bundle(bundles[1][1], **FP32_AUTO):
        pass
    assert len(timed) == 2 and len(entries("auto", ".decision")) == 2
    # another bundle: timed again
    with Sampler.from_bundle(bundles[3][1], **FP32_AUTO):
        pass
    assert len(timed) == 3


@pytest.mark.parametrize("damage", ["flip", "foreign backend", "no envelope"])
def test_a_damaged_decision_is_timed_again_and_rewritten(bundles, monkeypatch, capsys, damage):
    timed = counting_timer(monkeypatch)
    with Sampler.from_bundle(bundles[1][1], **FP32_AUTO):
        pass
    (entry,) = entries("auto", ".decision")
    if damage == "flip":
        entry.write_bytes(entry.read_bytes().replace(b'"ms"', b'"mS"'))
    elif damage == "foreign backend":  # a well-formed entry (envelope rewritten to match) naming no candidate
        key = json.loads(envelope_path(entry).read_text())["key"]
        startup_cache.remember_decision(key, "torchscript", {"torchscript": 1.0}, print)
    else:
        envelope_path(entry).unlink()
    capsys.readouterr()
    with Sampler.from_bundle(bundles[1][1], **FP32_AUTO):
        pass
    assert len(timed) == 2, "a damaged entry was trusted"
    assert "warning: the cache entry" in capsys.readouterr().err
    with Sampler.from_bundle(bundles[1][1], **FP32_AUTO):  # rewritten: found again, no warning
        pass
    assert len(timed) == 2 and "warning" not in capsys.readouterr().err


def test_one_candidate_is_not_timed(bundles, monkeypatch):
    timed, said = counting_timer(monkeypatch), []
    with Sampler.from_bundle(bundles[1][1], backend="auto", precision="fp32", low_memory=True, warmup=False,
                             say=said.append):
        pass
    assert not timed and said[-1] == "backend auto: onnxruntime fp32 (onnx, fused), the one backend here that runs fp32"


# --------------------------------------------------------------------------- OpenVINO compiled models
def openvino_sample(bundle, **options):
    with Sampler.from_bundle(bundle, backend="openvino", fused=False, warmup=False, **options) as sampler:
        return sampler.sample_float(2, seed=3, steps=6, batch=2)


def test_compiled_models_are_imported_the_second_time_with_the_same_images(bundles, monkeypatch):
    imported = []
    real_import = ov.Core.import_model
    monkeypatch.setattr(ov.Core, "import_model", lambda self, *a, **k: imported.append(1) or real_import(self, *a, **k))
    first = openvino_sample(bundles[3][1])
    routes = len(load_bundle(bundles[3][1]).routes)
    assert not imported and len(entries("openvino", ".blob")) == routes
    second = openvino_sample(bundles[3][1])
    assert len(imported) == routes
    np.testing.assert_array_equal(first, second)
    openvino_sample(bundles[3][1], threads=1)  # other options: other entries, compiled afresh
    assert len(imported) == routes and len(entries("openvino", ".blob")) == 2 * routes
    with Sampler.from_bundle(bundles[3][1], backend="openvino", fused=False, warmup=False) as sampler:
        sampler.sample_float(3, seed=3, steps=6, batch=3)  # another batch size: other entries too
    assert len(imported) == routes and len(entries("openvino", ".blob")) == 3 * routes


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "swap two entries"])
def test_a_damaged_compiled_model_is_compiled_again_never_imported(bundles, monkeypatch, capsys, damage):
    clean = openvino_sample(bundles[3][1])
    blobs = entries("openvino", ".blob")
    target = blobs[0]
    if damage == "flip a byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    else:  # another graph's payload and envelope under this graph's name: its key does not match
        target.write_bytes(blobs[1].read_bytes())
        envelope_path(target).write_bytes(envelope_path(blobs[1]).read_bytes())
    imported = []
    real_import = ov.Core.import_model
    monkeypatch.setattr(ov.Core, "import_model", lambda self, *a, **k: imported.append(1) or real_import(self, *a, **k))
    capsys.readouterr()
    again = openvino_sample(bundles[3][1])
    err = capsys.readouterr().err
    assert f"warning: the cache entry {target}" in err and len(imported) == len(blobs) - 1
    np.testing.assert_array_equal(again, clean)
    imported.clear()
    openvino_sample(bundles[3][1])  # rebuilt and rewritten: all imported now
    assert len(imported) == len(blobs)


def test_an_unwritable_cache_is_a_warning_not_an_error(bundles, monkeypatch, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SSD_CACHE", str(blocked))
    images = openvino_sample(bundles[1][1])
    assert images.shape[0] == 2 and "warning: cannot cache" in capsys.readouterr().err



def test_compiled_models_are_kept_within_their_budget_least_recently_used_first(bundles, monkeypatch):
    """Past MAX_COMPILED_FOLDER the oldest-used entries go; a file of the user's is never touched."""
    openvino_sample(bundles[3][1])
    folder = startup_cache.cache_root() / "openvino"
    blobs = entries("openvino", ".blob")
    mine = folder / "notes.blob"  # the user's file, with the cache's suffix but no envelope of ours
    mine.write_bytes(b"x" * 10_000)
    lookalike = folder / "copy.blob"  # a copy of an entry under another name: not on the inventory
    lookalike.write_bytes(blobs[0].read_bytes())
    envelope_path(lookalike).write_bytes(envelope_path(blobs[0]).read_bytes())
    os.utime(lookalike, (1, 1))  # the oldest of all
    sizes = sorted(p.stat().st_size for p in blobs)
    for age, blob in enumerate(blobs):  # the first one least recently used
        os.utime(blob, (1_000_000 + age, 1_000_000 + age))
    monkeypatch.setattr(startup_cache, "MAX_COMPILED_FOLDER", sum(sizes) - 1)
    openvino_sample(bundles[3][1], threads=1)  # new entries: only the oldest go, as few as needed
    left = set(entries("openvino", ".blob"))
    assert mine in left and mine.read_bytes() == b"x" * 10_000
    assert lookalike in left and envelope_path(lookalike).exists()
    kept_old = [blob in left for blob in blobs]
    assert not kept_old[0] and kept_old == sorted(kept_old)  # deleted oldest first
    assert sum(p.stat().st_size for p in left if p not in (mine, lookalike)) <= sum(sizes) - 1
    assert not envelope_path(blobs[0]).exists()
    newest = max((p for p in left if p not in (mine, lookalike)), key=lambda p: p.stat().st_mtime)
    assert newest not in blobs  # the entry just written stays
