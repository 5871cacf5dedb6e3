"""ssd.metrics against closed forms and known cases, and ssd-eval end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd import metrics
from ssd.cli import eval_main
from ssd.evaluate import ImageSet, classifier_for, evaluate

import oracles
from conftest import run_main


def test_frechet_distance_of_gaussians_has_its_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.random(6) + 0.1, rng.random(6) + 0.1
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # diagonal covariances
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))  # rotating both changes nothing
    got = oracles.frechet_distance_gaussians(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_from_samples():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20000, 4))
    assert oracles.frechet_distance(x, rng.standard_normal((20000, 4))) < 0.01
    shifted = rng.standard_normal((20000, 4)) * 2.0 + 1.0
    assert oracles.frechet_distance(x, shifted) == pytest.approx(4 * 1.0 + 4 * (2.0 - 1.0) ** 2, rel=0.03)


def test_kid_is_unbiased_near_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
    same, spread = oracles.kernel_inception_distance(x, y, subsets=20, subset_size=500)
    assert abs(same) < 3 * spread + 1e-3
    small = oracles.kernel_inception_distance(x, y + 0.2, subsets=20, subset_size=500)[0]
    large = oracles.kernel_inception_distance(x, y + 1.0, subsets=20, subset_size=500)[0]
    assert 0 < small < large


def test_precision_and_recall_on_known_manifolds():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((1000, 2))
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
    half = real[real[:, 0] > 0]  # a model that covers half the modes: precise, half the recall
    precision, recall = metrics.precision_recall(real, half)
    assert precision == 1.0 and 0.4 < recall < 0.65


def test_sliced_wasserstein_is_zero_for_identical_sets_and_ranks_damage():
    rng = np.random.default_rng(4)
    images = rng.random((64, 1, 32, 32))
    same = metrics.sliced_wasserstein(images, images)
    assert set(same) == {"32", "16", "8", "mean"} and same["mean"] == pytest.approx(0.0, abs=1e-9)
    noisy = metrics.sliced_wasserstein(images, np.clip(images + 0.1 * rng.standard_normal(images.shape), 0, 1))
    noisier = metrics.sliced_wasserstein(images, np.clip(images + 0.5 * rng.standard_normal(images.shape), 0, 1))
    assert 0 < noisy["mean"] < noisier["mean"]


def test_laplacian_pyramid_sums_back_to_the_image():
    images = np.random.default_rng(5).random((2, 3, 32, 32))
    levels = metrics.laplacian_pyramid(images)
    assert [level.shape[-1] for level in levels] == [32, 16, 8]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + rebuilt.repeat(2, axis=-2).repeat(2, axis=-1)
    np.testing.assert_allclose(rebuilt, images, atol=1e-12)


# --------------------------------------------------------------------------- ssd-eval
def striped_classes(n: int, seed: int) -> ImageSet:
    """Two classes of 16-px grey images: horizontal or vertical stripes, jittered."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    phase = rng.integers(0, 4, n)
    grid = np.arange(16)
    stripes = ((grid[None, :] + phase[:, None]) // 2 % 2).astype(np.float64)  # [n, 16]
    images = np.where(labels[:, None, None] == 0, stripes[:, :, None], stripes[:, None, :]) * np.ones((1, 16, 16))
    images = np.clip(images * 200 + 28 + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8)
    return ImageSet(images[:, None], f"stripes {seed}", labels)


def test_evaluation_ranks_real_above_noise_and_blur(tmp_path):
    train, reference, good = striped_classes(2000, 0), striped_classes(200, 1), striped_classes(200, 2)
    noise = ImageSet(np.random.default_rng(3).integers(0, 256, good.images.shape, dtype=np.uint8), "noise")
    blurred = ImageSet(np.asarray(good.images.reshape(200, 1, 8, 2, 8, 2).mean(axis=(3, 5)).repeat(2, 2).repeat(2, 3),
                                  np.uint8), "blur")
    scores = {s.source: evaluate(s, train, reference, cache=tmp_path, log=lambda text: None)
              for s in (good, noise, blurred)}
    fd = {name: r["classifier"]["fd"] for name, r in scores.items()}
    swd = {name: r["swd"]["mean"] for name, r in scores.items()}
    assert fd["stripes 2"] < min(fd["blur"], fd["noise"])
    assert swd["stripes 2"] < min(swd["blur"], swd["noise"])
    assert scores["stripes 2"]["classifier"]["precision"] > scores["noise"]["classifier"]["precision"]
    assert scores["stripes 2"]["classifier"]["accuracy_on_reference"] > 0.95


def test_classifier_is_cached(tmp_path):
    train = striped_classes(600, 0)
    logs = []
    classifier_for(train, tmp_path, log=logs.append)
    classifier_for(train, tmp_path, log=logs.append)
    assert sum("training the feature classifier" in line for line in logs) == 1
    assert len(list(tmp_path.glob("classifier-*.safetensors"))) == 1


def write_pngs(folder, images: np.ndarray, labels=None):
    for i, image in enumerate(images):
        target = folder / (f"class{labels[i]}" if labels is not None else "")
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(target / f"{i:04d}.png")


def test_ssd_eval_command_writes_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "cache"))
    reference = striped_classes(300, 0)
    write_pngs(tmp_path / "ref", reference.images, reference.labels)
    write_pngs(tmp_path / "samples", striped_classes(100, 1).images)
    code, out, err = run_main(eval_main, [tmp_path / "samples", "--ref", tmp_path / "ref"], capsys)
    assert code == 0, err
    assert "classifier FD (not FID)" in out and "SWD" in out and "| precision |" in out and "| recall |" in out
    report = json.loads((tmp_path / "samples" / "metrics.json").read_text())
    assert report["n_samples"] == 100 and "NOT comparable" in report["classifier"]["note"]
    code, _, err = run_main(eval_main, [tmp_path / "nothing", "--ref", tmp_path / "ref"], capsys)
    assert code == 1 and err.startswith("error: no image folder")


def test_fid_with_a_local_torchscript_inception(tmp_path):
    """The --inception-weights path with a stand-in of NVIDIA's TorchScript Inception's
    calling convention (uint8 RGB in, 2048 features with return_features=True); the real
    file was not available here."""
    import torch

    class StandIn(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)  # [N, 48]
            return pooled.repeat(1, 43)[:, :2048]

    weights = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(StandIn()), str(weights))
    good, noise = striped_classes(200, 1), ImageSet(np.random.default_rng(0).integers(0, 256, (200, 1, 16, 16),
                                                                                      dtype=np.uint8), "noise")
    reference = striped_classes(200, 0)
    fid = {s.source: evaluate(s, None, reference, inception=weights, log=lambda text: None,
                                  trust_inception=True)["fid"] for s in (good, noise)}
    assert 0 <= fid["stripes 1"] < fid["noise"]
    (tmp_path / "broken.pt").write_bytes(b"not torchscript")
    with pytest.raises(Exception, match="cannot load --inception-weights"):
        evaluate(good, None, reference, inception=tmp_path / "broken.pt", log=lambda text: None, trust_inception=True)


@pytest.mark.slow  # samples the shipped model and scores it (CI's time budget)
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_the_shipped_model_ranks_above_noise_and_blurred_data(tmp_path):
    """ssd-eval's classifier FD and SWD put the shipped model's samples (100, 50 steps, drawn
    by the runtime as a user draws them) ahead of noise and of a blurred copy of the data (a
    classifier trained on 6,000 images here, for time)."""
    from ssd.evaluate import fashion_mnist_split
    from ssd_runtime import Sampler
    from ssd_runtime.default_model import packaged_bundle

    with Sampler.from_bundle(packaged_bundle(), backend="onnxruntime") as sampler:
        samples = sampler.sample(100, seed=0, steps=50, batch=50)
    train, test = fashion_mnist_split("train"), fashion_mnist_split("test")
    train = ImageSet(train.images[:6000], train.source, train.labels[:6000])
    reference = ImageSet(test.images[:500], test.source, test.labels[:500])
    model_set = ImageSet(samples.mean(axis=-1).round().astype(np.uint8)[:, None], "model")
    noise = ImageSet(np.random.default_rng(0).integers(0, 256, model_set.images.shape, dtype=np.uint8), "noise")
    data = test.images[500:600].astype(np.float64)
    blurred = ImageSet(data.reshape(100, 1, 8, 4, 8, 4).mean(axis=(3, 5)).repeat(4, 2).repeat(4, 3).round()
                       .astype(np.uint8), "blur")
    scores = {s.source: evaluate(s, train, reference, cache=tmp_path, log=lambda text: None)
              for s in (model_set, noise, blurred)}
    fd = {name: r["classifier"]["fd"] for name, r in scores.items()}
    swd = {name: r["swd"]["mean"] for name, r in scores.items()}
    print(f"classifier FD {fd}, SWD {swd}")
    assert fd["model"] < fd["blur"] and fd["model"] < fd["noise"], fd
    assert swd["model"] < swd["blur"] and swd["model"] < swd["noise"], swd


# --------------------------------------------------------------------------- intervals
def test_interval_moves_the_percentiles_by_the_bootstrap_bias():
    replicates = np.arange(1001.0)  # mean 500, percentiles 25 and 975
    assert metrics.interval(490.0, replicates) == pytest.approx((15.0, 965.0))


def test_fd_bootstrap_interval_covers_the_expected_fd_at_this_count():
    """Coverage on a case with a known answer: 150 independent sample sets (n = 100, d = 8)
    against a fixed reference Gaussian; the expected FD at n = 100 (biased above the
    population's 1.04) from 3,000 draws. The 95% intervals must cover it about 95% of the
    time; the plain percentile interval, which sits above the estimate, falls short."""
    rng = np.random.default_rng(0)
    reference = metrics.FrechetReference(np.zeros(8), np.eye(8))
    draw = lambda: rng.standard_normal((100, 8)) * 1.2 + 0.3
    expected = np.mean([reference.distance(draw()) for _ in range(3000)])
    covered = plain = 0
    for trial in range(150):
        x = draw()
        estimate, replicates = reference.distance(x), reference.bootstrap(x, 200, seed=trial)
        low, high = metrics.interval(estimate, replicates)
        covered += low <= expected <= high
        plain += np.quantile(replicates, 0.025) <= expected <= np.quantile(replicates, 0.975)
    assert 0.88 <= covered / 150 <= 1.0, covered
    assert plain < covered


def test_precision_recall_bootstrap_spread_matches_the_true_spread():
    """The bootstrap's spread of precision and recall against their spread over 400
    independent sample sets (n = 150, 3-d Gaussians), and the intervals' coverage of their
    expected values over 60 sets."""
    rng = np.random.default_rng(1)
    real = rng.standard_normal((150, 3))
    draw = lambda: rng.standard_normal((150, 3)) * 1.1 + 0.2
    values = np.array([metrics.precision_recall(real, draw()) for _ in range(400)])
    expected, spread = values.mean(axis=0), values.std(axis=0)
    covered, spreads = np.zeros(2), []
    for trial in range(60):
        fake = draw()
        estimate = metrics.precision_recall(real, fake)
        replicates = metrics.precision_recall_bootstrap(real, fake, resamples=100, seed=trial)
        spreads.append(replicates.std(axis=0))
        for j in range(2):
            low, high = metrics.interval(estimate[j], replicates[:, j])
            covered[j] += low <= expected[j] <= high
    ratio = np.mean(spreads, axis=0) / spread
    assert np.all((0.7 < ratio) & (ratio < 1.4)), ratio
    assert np.all(covered / 60 >= 0.83), covered


def test_kid_subsets_give_the_mean_and_spread():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((400, 8)), rng.standard_normal((400, 8)) + 0.5
    values = metrics.kid_subsets(x, y, subsets=20, subset_size=200)
    assert values.shape == (20,) and values.std() > 0
    assert oracles.kernel_inception_distance(x, y, subsets=20, subset_size=200) == (values.mean(), values.std())
