"""``ssd-run --animate`` and ``Sampler(..., animate=Animate(...))``: frames of the clean
prediction and of ``x_t`` over a run, written as GIF/WebP; free when not asked for."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageSequence

from ssd_core.config import ConfigError
from ssd_core.images import HOLD_MS, save_animation, upscale
from ssd_runtime.cli import main
from ssd_runtime.sampler import Animate, Sampler

from conftest import assert_one_line_error, run_main

STEPS = 10


def read_frames(path) -> tuple[list[np.ndarray], list[int]]:
    """Every frame of an animated GIF/WebP as uint8 RGB [H, W, 3], and its duration in ms."""
    frames, durations = [], []
    with Image.open(path) as image:
        for frame in ImageSequence.Iterator(image):
            frames.append(np.asarray(frame.convert("RGB")))
            durations.append(frame.info["duration"])
    return frames, durations


def rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, -1) if image.shape[-1] == 1 else image


def collect(sampler, every, samples=None, **options):
    """``sample(...)`` with an :class:`Animate` keeping the frames: (images, {index: [(step, t, x0, xt)]})."""
    frames: dict[int, list] = {}
    animate = Animate(lambda i, step, t, x0, xt: frames.setdefault(i, []).append((step, t, x0, xt)), every, samples)
    return sampler.sample(animate=animate, **options), frames


def blocky(frame: np.ndarray, block: int) -> bool:
    """Whether ``frame`` is made of ``block`` x ``block`` squares of one colour."""
    coarse = frame[::block, ::block]
    return np.array_equal(np.repeat(np.repeat(coarse, block, 0), block, 1), frame)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_animate_writes_the_api_frames_ending_in_the_sample(bundles, tmp_path, capsys, fused):
    bundle = bundles[3][1]
    out = tmp_path / "samples"
    code, stdout, err = run_main(main, [bundle, "--backend", "onnxruntime", "--fused" if fused else "--unfused",
                                        "--steps", STEPS, "-n", 2, "--batch", 2, "--seed", 4, "--out", out,
                                        "--no-progress", "--animate", "--animate-every", 3,
                                        "--animate-format", "webp"], capsys)
    assert code == 0, err
    assert "and an animation" in stdout
    # the first sample of the first batch only
    assert sorted(p.name for p in out.glob("animation_*")) == ["animation_00000_x0.webp",
                                                               "animation_00000_xt.webp"]
    sample = rgb(np.asarray(Image.open(out / "sample_00000.png")))

    with Sampler.from_bundle(bundle, backend="onnxruntime", fused=fused) as sampler:
        images, api = collect(sampler, 3, {0}, n=2, seed=4, steps=STEPS, batch=2)
    assert list(api) == [0]
    assert [step for step, *_ in api[0]] == [0, 3, 6, 9]  # every 3rd and the last
    assert np.array_equal(images[0], np.asarray(Image.open(out / "sample_00000.png")))
    sizes = [x0.shape[0] for _, _, x0, _ in api[0]]
    assert sizes[0] == 8 and sizes[-1] == 32 and sizes == sorted(sizes)  # the resolution grows

    for position, what in ((2, "x0"), (3, "xt")):
        written, durations = read_frames(out / f"animation_00000_{what}.webp")
        expected = [rgb(upscale(frame[position], 32)) for frame in api[0]]
        assert len(written) == len(expected) == 4
        for got, want in zip(written, expected):
            assert np.array_equal(got, want)  # lossless WebP: the API's frames, upscaled
        assert np.array_equal(written[-1], sample)  # the last frame is the sample
        assert durations == [80, 80, 80, HOLD_MS]
        for frame, size in zip(written, sizes):  # an 8-px frame is 4x4 blocks of one colour
            assert blocky(frame, 32 // size)
        assert not blocky(written[-1], 2)
    # the clean prediction is in [-1, 1]; the first noisy state is noise, not the prediction
    assert not np.array_equal(api[0][0][2], api[0][0][3])


def test_animate_gif_defaults(bundles, tmp_path, capsys):
    out = tmp_path / "samples"
    code, stdout, err = run_main(main, [bundles[1][1], "--backend", "onnxruntime", "--steps", STEPS, "-n", 1,
                                        "--out", out, "--no-progress", "--animate", "--animate-scale", 2], capsys)
    assert code == 0, err
    sample = rgb(np.asarray(Image.open(out / "sample_00000.png")))
    for what in ("x0", "xt"):
        frames, durations = read_frames(out / f"animation_00000_{what}.gif")
        assert len(frames) == STEPS and frames[0].shape == (64, 64, 3)  # every step (10 < 60 frames)
        assert durations == [80] * (STEPS - 1) + [HOLD_MS]
        # GIF holds 256 colours a frame: this random model's colour sample is quantised
        assert np.abs(frames[-1][::2, ::2].astype(int) - sample).mean() < 8


def test_animate_all_names_frames_by_global_index(bundles, tmp_path, capsys):
    out = tmp_path / "samples"
    code, stdout, err = run_main(main, [bundles[1][1], "--backend", "onnxruntime", "--steps", 3, "-n", 3,
                                        "--first", 5, "--batch", 2, "--out", out, "--no-progress",
                                        "--animate-all", "--animate-every", 2], capsys)
    assert code == 0, err
    assert "and animations" in stdout
    assert sorted(p.name for p in out.glob("animation_*")) == [
        f"animation_{i:05d}_{w}.gif" for i in (5, 6, 7) for w in ("x0", "xt")]
    for index in (5, 6, 7):
        frames, _ = read_frames(out / f"animation_{index:05d}_x0.gif")
        assert len(frames) == 2  # steps 0 and 2
        assert np.abs(frames[-1].astype(int) - np.asarray(Image.open(out / f"sample_{index:05d}.png"))).mean() < 8


def test_no_frames_are_copied_without_animate(bundles, tmp_path, capsys):
    """A spy on the backend's device-to-numpy copies: one per batch (the images) without
    ``animate``; with it, two more per recorded step, and only for the animated batch."""
    with Sampler.from_bundle(bundles[3][1], backend="onnxruntime") as sampler:
        copies = []
        to_numpy = sampler.backend.to_numpy
        sampler.backend.to_numpy = lambda array: copies.append(array.shape) or to_numpy(array)
        plain = sampler.sample(4, seed=2, steps=STEPS, batch=2)
        assert len(copies) == 2
        copies.clear()
        animated, frames = collect(sampler, 3, {0}, n=4, seed=2, steps=STEPS, batch=2)
        assert len(copies) == 2 + 2 * 4 and np.array_equal(plain, animated)
        copies.clear()
        collect(sampler, 3, {2, 3}, n=4, seed=2, steps=STEPS, batch=2)  # samples 2, 3: one copy per frame
        assert len(copies) == 2 + 2 * 4
    out = tmp_path / "samples"
    code, _, err = run_main(main, [bundles[1][1], "--backend", "onnxruntime", "--steps", 2, "-n", 1, "--out", out,
                                   "--no-progress"], capsys)
    assert code == 0, err
    assert not list(out.glob("animation_*"))


def test_animate_all_skips_the_padding_rows(bundles):
    with Sampler.from_bundle(bundles[1][1], backend="onnxruntime") as sampler:
        _, frames = collect(sampler, 5, None, n=3, seed=0, steps=5, batch=2)  # the last batch is padded
    assert sorted(frames) == [0, 1, 2]
    assert all([step for step, *_ in frames[i]] == [0, 4] for i in frames)


@pytest.mark.parametrize("args, pattern, code", [
    (["--animate", "--animate-every", "0"], "animate-every", 2),
    (["--animate", "--animate-ms", "5"], "animate-ms", 2),
    (["--animate", "--animate-scale", "0"], "animate-scale", 2),
    (["--animate", "--animate-format", "bmp"], "animate-format", 2),
    (["--animate-every", "3"], "--animate-every needs --animate", 1),
    (["--animate-format", "webp"], "--animate-format needs --animate", 1),
])
def test_bad_animate_options_are_one_line_errors(bundles, tmp_path, capsys, args, pattern, code):
    result = run_main(main, [bundles[1][1], "--steps", 2, "-n", 1, "--out", tmp_path / "s", "--no-progress", *args],
                      capsys)
    assert_one_line_error(result, pattern, code=code)
    assert not (tmp_path / "s").exists()


def test_bad_animate_api_values(bundles):
    for every in (0, 1.5, True):
        with pytest.raises(ConfigError, match="animate every"):
            Animate(print, every)
    with pytest.raises(ConfigError, match="callable"):
        Animate("frames")
    with pytest.raises(ConfigError, match="set of sample indices"):
        Animate(print, 1, 0)
    with Sampler.from_bundle(bundles[1][1], backend="onnxruntime") as sampler:
        with pytest.raises(ConfigError, match="expected an ssd_runtime.sampler.Animate"):
            sampler.sample(1, steps=2, animate=print)


@pytest.mark.parametrize("kind", ["gif", "webp"])
def test_save_animation_round_trip(tmp_path, kind):
    """Grey frames and colour frames of at most 256 colours come back exactly from a GIF,
    any frames from a WebP; each upscaled by nearest neighbour, the last held longer."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (200, 3), dtype=np.uint8)
    grey = [rng.integers(0, 256, (r, r, 1), dtype=np.uint8) for r in (4, 8, 16)]
    colour = [palette[rng.integers(0, 200, (r, r))] for r in (4, 8, 16)]
    for frames in (grey, colour):
        path = save_animation(tmp_path / f"a.{kind}", frames, 16, ms=50, hold_ms=700)
        written, durations = read_frames(path)
        assert durations == [50, 50, 700]
        for got, frame in zip(written, frames):
            block = 16 // frame.shape[0]
            assert np.array_equal(got, rgb(np.repeat(np.repeat(frame, block, 0), block, 1)))
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="gif or .webp"):
        save_animation(tmp_path / "a.png", grey, 16)
