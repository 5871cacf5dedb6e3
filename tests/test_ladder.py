"""Gradual ladders and the separable posterior (docs/method.md §10) against the authors'
rule, torch's resize, dense reference matrices, Monte Carlo and the 2x code of core/method.py."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssd_core.config import ConfigError, make_config
from ladder_oracle import (LadderProcess, Separable, compose, halving_matrix, ladder_sizes, posterior,
                           resize_matrix)
from ssd_core.method import ScaleSpace, linear_abar, p_step, resolution_levels

# ------------------------------------------------------------------ the ladder rule
# (image_size, channel_mult, ds_factor, levels) -> (the authors' list largest first, their
# UNet map size -> nominal size). Produced by running get_resolutions_array of
# prateksha/ScaleSpaceDiffusion (commit 86d02c2, guided_diffusion/ssd_utils.py) on each
# setting; the first, second and fourth were also derived by hand from reading it.
AUTHORS = {
    (32, (1, 2, 2, 2), 1.25, 6): ((32, 24, 24, 16, 12, 12), {32: 32, 24: 32, 16: 32, 12: 16}),
    (32, (1, 2, 2, 2), 1.5, 4): ((32, 24, 12, 8), {32: 32, 24: 32, 12: 16, 8: 16}),
    (32, (1, 2, 2, 2), 2, 4): ((32, 16, 8, 4), {32: 32, 16: 16, 8: 8, 4: 4}),
    (28, (1, 2, 2), 1.5, 4): ((28, 20, 12, 8), {28: 28, 20: 28, 12: 14, 8: 14}),
    (64, (1, 2, 3, 4), 2, 4): ((64, 32, 16, 8), {64: 64, 32: 32, 16: 16, 8: 8}),
    (64, (1, 2, 3, 4), 1.5, 6): ((64, 40, 28, 20, 12, 8), {64: 64, 40: 64, 28: 32, 20: 32, 12: 16, 8: 16}),
    (64, (1, 2, 2, 2), 1.25, 8): ((64, 48, 40, 32, 24, 20, 16, 14),
                                  {64: 64, 48: 64, 40: 64, 32: 64, 24: 32, 20: 32, 16: 32, 14: 16}),
    (32, (1, 2, 2), 1.25, 10): ((32, 24, 20, 16, 14, 10, 8, 7, 6, 5),
                                {32: 32, 24: 32, 20: 32, 16: 32, 14: 16, 10: 16, 8: 16, 7: 8, 6: 8, 5: 8}),
    (32, (1, 2, 2, 2), 1.1, 12): ((32, 32, 24, 24, 24, 16, 16, 16, 16, 12, 12, 12),
                                  {32: 32, 24: 32, 16: 16, 12: 16}),
    (256, (1, 1, 2, 2, 4, 4), 1.25, 12): ((256, 192, 160, 128, 112, 80, 64, 56, 40, 32, 28, 20), None),
    (45, (1,), 2, 3): ((45, 22, 11), None),  # round(22.5) = 22: Python rounds half to even
    (8, (1, 2), 2, 4): ((8, 4, 2, 1), None),
}


@pytest.mark.parametrize("setting", list(AUTHORS), ids=str)
def test_ladder_follows_the_authors_rule(setting):
    image_size, mults, factor, levels = setting
    raw, authors_map = AUTHORS[setting]
    ladder = ladder_sizes(image_size, mults, factor, levels)
    assert ladder.raw == raw
    assert ladder.sizes == tuple(sorted(set(raw), reverse=True))
    assert [m for _, m in ladder.removed] == [m for k, m in enumerate(raw) if k and raw[k - 1] == m]
    depth = len(mults)
    for m in ladder.sizes:
        level = ladder.unet_level[m]
        nominal = ladder.nominal_size(m)
        # the smallest nominal size at or above m, and every remaining halving exact
        assert nominal >= m and (level == depth - 1 or image_size >> (level + 1) < m)
        assert m % 2 ** (depth - 1 - level) == 0
        if authors_map is not None:
            # theirs picks the level from the size before its last rounding: the same level,
            # or the one above where that rounding landed on a nominal size from above
            assert authors_map[m] in (nominal, 2 * nominal)
    assert ladder.routes() == [(m, m) for m in ladder.sizes] + list(zip(ladder.sizes[1:], ladder.sizes))


def test_ladder_example_of_the_issue_keeps_repeats_once_and_says_so():
    ladder = ladder_sizes(32, (1, 2, 2, 2), 1.25, 6)
    assert ladder.raw == (32, 24, 24, 16, 12, 12) and ladder.sizes == (32, 24, 16, 12)
    assert ladder.removed == ((2, 24), (5, 12))
    assert {m: ladder.nominal_size(m) for m in ladder.sizes} == {32: 32, 24: 32, 16: 16, 12: 16}
    assert "24, 12" in ladder.note() and ladder_sizes(32, (1, 2, 2, 2), 1.5, 4).note() == ""
    # a repeated size owns the union of its intervals of the schedule
    k = resolution_levels(1000, 6, "convex", 0.5)
    r = np.asarray(ladder.size_schedule(k))
    assert sorted(set(r.tolist()), reverse=True) == [32, 24, 16, 12]
    assert np.all(np.diff(r) <= 0) and r[0] == 32 and r[-1] == 12


@pytest.mark.parametrize("args, match", [
    ((8, (1, 2), 2, 5), "levels=5 is too many"),
    ((32, (1, 2, 2), 1.0, 3), "ds_factor"),
    ((32, (1, 2, 2), float("nan"), 3), "ds_factor"),
    ((30, (1, 2, 2), 1.5, 3), "divisible"),
    ((32, (1, 2, 2), 1.5, 0), "levels"),
])
def test_ladder_refuses_impossible_settings(args, match):
    with pytest.raises(ConfigError, match=match):
        ladder_sizes(*args)


@pytest.mark.parametrize("preset, levels", [("cpu64", 4), ("tiny32", 3), ("adm256", 6)])
def test_factor_two_ladder_is_todays_schedule(preset, levels):
    config = make_config(preset, levels=levels)
    space = ScaleSpace.from_config(config)
    d = config.diffusion
    ladder = ladder_sizes(config.model.image_size, config.model.channel_mult, 2.0, levels)
    k = resolution_levels(d.timesteps, levels, d.resolution_schedule, d.gamma)
    np.testing.assert_array_equal(ladder.size_schedule(k), space.sizes)
    assert ladder.removed == () and all(ladder.nominal_size(m) == m for m in ladder.sizes)


# ------------------------------------------------------------------ resize matrices
def torch_resize(x: np.ndarray, size) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                         align_corners=False, antialias=True).numpy()


@pytest.mark.parametrize("pair", [(32, 24), (24, 16), (16, 12), (12, 8), (10, 8), (9, 6), (64, 40),
                                  (40, 28), (7, 5), (5, 4), (13, 3), (8, 1), (8, 12), (5, 9), (6, 6)])
def test_resize_matrix_equals_torch_interpolate(pair):
    n_in, n_out = pair
    x = np.random.default_rng(0).standard_normal((2, 3, n_in, n_in))
    A = resize_matrix(n_in, n_out)
    np.testing.assert_allclose(A @ x @ A.T, torch_resize(x, (n_out, n_out)), rtol=0, atol=1e-13)
    np.testing.assert_allclose(A.sum(axis=1), 1.0, atol=1e-15)


def test_separable_map_with_two_axes_equals_torch():
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 10))
    A = Separable(resize_matrix(12, 9), resize_matrix(10, 8))
    np.testing.assert_allclose(A.apply(x), torch_resize(x, (9, 8)), atol=1e-13)
    y = np.random.default_rng(2).standard_normal((2, 3, 9, 8))
    assert np.sum(A.apply(x) * y) == pytest.approx(np.sum(x * A.adjoint(y)), rel=1e-12)
    np.testing.assert_allclose(A.dense() @ x[0, 0].ravel(), A.apply(x)[0, 0].ravel(), atol=1e-14)


@pytest.mark.parametrize("size", [2, 4, 8, 16, 32, 64, 256])
def test_factor_two_resize_is_todays_halving_matrix_bit_for_bit(size):
    np.testing.assert_array_equal(resize_matrix(size, size // 2), halving_matrix(size))
    np.testing.assert_array_equal(resize_matrix(size, size), np.eye(size))


def test_forward_marginal_is_the_product_of_consecutive_resizes():
    """(10.5): R_{full->r} is the chain of consecutive resizes, as torch applied one by one
    (not one direct resize, which differs)."""
    ladder = ladder_sizes(32, (1, 2, 2, 2), 1.25, 6)
    process = LadderProcess(linear_abar(6, 0.02, 0.4), ladder.raw)
    x0 = np.random.default_rng(3).uniform(-1, 1, (2, 3, 32, 32))
    chained = x0
    for m in ladder.sizes[1:]:
        chained = torch_resize(chained, (m, m))
    eps = np.zeros((2, 3, 12, 12))
    expected = math.sqrt(process.abar[5]) * chained
    np.testing.assert_allclose(process.q_sample(x0, 5, eps), expected, atol=1e-13)
    direct = torch_resize(x0, (12, 12))
    assert np.abs(chained - direct).max() > 1e-3


@pytest.mark.parametrize("ladder", [(32, 24, 16, 12), (64, 48, 40, 32, 24, 20, 16, 14),
                                    (64, 40, 28, 20, 12, 8), (28, 20, 12, 8), (10, 8, 6, 4)])
def test_every_downsizing_step_admits_a_forward_process(ladder):
    """lambda_max(A A^T) <= max column sum < 1 (rows are non-negative and sum to 1), so
    (10.6) is PSD for every step, as the posterior's own check confirms."""
    for big, small in zip(ladder, ladder[1:]):
        A = resize_matrix(big, small)
        assert np.linalg.eigvalsh(A @ A.T).max() <= A.sum(axis=0).max() < 1.0
        posterior(0.5, 0.50001, Separable(A, A))  # rho alpha = 0.99996: refused if lambda > 1


def test_posterior_refuses_a_degradation_without_a_forward_process():
    with pytest.raises(ConfigError, match="lambda_max"):
        posterior(0.5, 0.51, Separable.resize(8, 12))  # upsizing: lambda_max(A^T A) = 2.25


# ------------------------------------------------------------------ posterior and noise
def dense_conditioning(abar_t, abar_s, A: Separable, x_t, x0_s):
    """x_s ~ N(a_s x0_s, sigma_s^2 I), x_t = sqrt(alpha) A x_s + eta with the forward covariance
    (10.6); Gaussian conditioning on dense matrices."""
    alpha = abar_t / abar_s
    var_t, var_s = 1 - abar_t, 1 - abar_s
    M = math.sqrt(alpha) * A.dense()
    n_s, n_t = M.shape[1], M.shape[0]
    prior_mean = math.sqrt(abar_s) * x0_s.ravel()
    prior_cov = var_s * np.eye(n_s)
    step_cov = var_t * np.eye(n_t) - var_s * M @ M.T
    assert np.linalg.eigvalsh(step_cov).min() > 0
    joint = M @ prior_cov @ M.T + step_cov
    gain = prior_cov @ M.T @ np.linalg.inv(joint)
    mean = prior_mean + gain @ (x_t.ravel() - M @ prior_mean)
    return mean, prior_cov - gain @ M @ prior_cov


def noise_covariance(post, shape) -> np.ndarray:
    """Covariance of Posterior.noise, read off its action on every basis image."""
    n = shape[0] * shape[1]
    columns = post.noise(np.eye(n).reshape(n, *shape)).reshape(n, n)
    return columns.T @ columns


DEGRADATIONS = {
    "F=1.25 10->8": Separable.resize(10, 8),
    "F=1.5 12->8": Separable.resize(12, 8),
    "F=1.5 9->6": Separable.resize(9, 6),
    "F=2 8->4": Separable.resize(8, 4),
    "F=2 12->6": Separable.resize(12, 6),
    "two axes 10->8, 9->6": Separable(resize_matrix(10, 8), resize_matrix(9, 6)),
    "respaced gap 12->10->8": compose([Separable.resize(12, 10), Separable.resize(10, 8)]),
    "identity 8": Separable.identity(8),
}


@pytest.mark.parametrize("name", list(DEGRADATIONS))
@pytest.mark.parametrize("abar_t, abar_s", [(0.3, 0.5), (0.05, 0.06), (0.9, 0.99)])
def test_posterior_equals_dense_gaussian_conditioning(name, abar_t, abar_s):
    A = DEGRADATIONS[name]
    rng = np.random.default_rng(4)
    x_t = rng.standard_normal((1, 1, *A.out_shape))
    x0 = rng.uniform(-1, 1, (1, 1, *A.in_shape))
    post = posterior(abar_t, abar_s, A)
    mean, cov = dense_conditioning(abar_t, abar_s, A, x_t, x0)
    np.testing.assert_allclose(post.mean(x_t, x0).ravel(), mean, atol=1e-12)
    np.testing.assert_allclose(post.sigma_s**2 * noise_covariance(post, A.in_shape), cov, atol=1e-12)
    z = rng.standard_normal((1, 1, *A.in_shape))
    np.testing.assert_allclose(post.sample(x_t, x0, z), post.mean(x_t, x0) + post.sigma_s * post.noise(z),
                               atol=1e-13)


def test_noise_at_a_gradual_size_change_is_correlated():
    A = Separable.resize(10, 8)
    post = posterior(0.3, 0.5, A)
    cov = noise_covariance(post, (10, 10))
    expected = np.eye(100) - post.rho_alpha * A.dense().T @ A.dense()
    np.testing.assert_allclose(cov, expected, atol=1e-13)
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 0.05


def monte_carlo_case(A: Separable, abar_t, abar_s, n, seed):
    """Forward samples (x_s, x_t) of one step with a random clean image x0_s at size s."""
    process_sizes = [A.in_shape[0], A.out_shape[0]]
    process = LadderProcess([abar_s, abar_t], process_sizes, {tuple(process_sizes): A.rows})
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, A.in_shape)
    x_s = math.sqrt(abar_s) * x0 + math.sqrt(1 - abar_s) * rng.standard_normal((n, *A.in_shape))
    x_t = process.q_step(x_s, 1, 0, rng.standard_normal((n, *A.out_shape)))
    return process, rng, x0, x_s, x_t


def empirical_cov(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a - a.mean(0)).T @ (b - b.mean(0)) / (len(a) - 1)


@pytest.mark.parametrize("pair", [(10, 8), (9, 6), (8, 4)], ids=["F=1.25", "F=1.5", "F=2"])
def test_posterior_monte_carlo(pair):
    """Sample the forward step, then check (a) x_t's marginal is N(a_t A x0, sigma_t^2 I);
    (b) the empirical posterior: x_s - E[x_s | x_t] has mean 0, the posterior covariance
    (element-wise, and per eigen-direction of A^T A, where isotropic noise would be off by 19-45 %
    at the largest eigenvalue) and no correlation with x_t; (c) a posterior draw given x_t restores the
    joint law of (x_s, x_t)."""
    A = Separable.resize(*pair)
    abar_t, abar_s, n = 0.45, 0.5, 30_000  # rho alpha = 0.82: strongly correlated noise
    process, rng, x0, x_s, x_t = monte_carlo_case(A, abar_t, abar_s, n, seed=5)
    post = process.posterior(1, 0)
    n_t = A.out_shape[0] ** 2
    np.testing.assert_allclose(x_t.mean(0), math.sqrt(abar_t) * A.apply(x0), atol=0.025)
    np.testing.assert_allclose(empirical_cov(x_t, x_t), (1 - abar_t) * np.eye(n_t), atol=0.035)

    residual = x_s - post.mean(x_t, x0)
    _, dense_cov = dense_conditioning(abar_t, abar_s, A, x_t[0], x0)
    np.testing.assert_allclose(residual.mean(0), 0.0, atol=0.025)
    np.testing.assert_allclose(empirical_cov(residual, residual), dense_cov, atol=0.03)
    np.testing.assert_allclose(empirical_cov(residual, x_t), 0.0, atol=0.03)
    (_, U_h), (_, U_w) = post.eig_h, post.eig_w
    variances = (U_h.T @ residual @ U_w).var(axis=0)
    expected = post.sigma_s**2 * post.noise_scale**2
    np.testing.assert_allclose(variances / expected, 1.0, atol=0.06)
    assert (expected.max() - expected.min()) / expected.max() > 0.15

    drawn = post.sample(x_t, x0, rng.standard_normal(x_s.shape))
    np.testing.assert_allclose(empirical_cov(drawn, drawn), (1 - abar_s) * np.eye(pair[0] ** 2), atol=0.03)
    cross = (1 - abar_s) * math.sqrt(abar_t / abar_s) * A.dense().T
    np.testing.assert_allclose(empirical_cov(drawn, x_t), cross, atol=0.03)


def test_forward_chain_over_a_gradual_ladder_monte_carlo():
    """Chaining the exact forward steps through 10 -> 8 -> 6 gives the marginal (10.5)."""
    sizes = [10, 10, 8, 8, 6, 6]
    process = LadderProcess(linear_abar(len(sizes), 0.05, 0.3), sizes)
    rng = np.random.default_rng(6)
    x0 = rng.uniform(-1, 1, (10, 10))
    n = 30_000
    x = math.sqrt(process.abar[0]) * x0 + math.sqrt(1 - process.abar[0]) * rng.standard_normal((n, 10, 10))
    for t in range(1, len(sizes)):
        x = process.q_step(x, t, t - 1, rng.standard_normal((n, sizes[t], sizes[t])))
    last = len(sizes) - 1
    expected = math.sqrt(process.abar[last]) * process.degradation(10, 6).apply(x0)
    np.testing.assert_allclose(x.mean(0), expected, atol=0.02)
    np.testing.assert_allclose(empirical_cov(x, x), (1 - process.abar[last]) * np.eye(36), atol=0.03)


# ------------------------------------------------------------------ F = 2 is today's code
@pytest.mark.parametrize("preset, steps, levels, factor", [
    ("cpu64", None, None, 2.0), ("cpu64", 37, None, 2.0), ("tiny32", 20, None, 2.0),
    ("tiny32", 30, 4, 1.5), ("tiny32", None, 7, 1.25), ("cpu64", 41, 6, 1.5)])
def test_core_method_equals_the_general_posterior(preset, steps, levels, factor):
    """ScaleSpace (the sampler's and runtime's code) gives the step constants and draws of the
    general separable posterior, bit for bit: for F = 2 (today's process) and gradual ladders."""
    config = make_config(preset, levels, ds_factor=factor)
    space = ScaleSpace.from_config(config)
    d = config.diffusion
    ladder = ladder_sizes(config.model.image_size, config.model.channel_mult, factor, d.levels)
    assert space.ladder == config.ladder == tuple(reversed(ladder.sizes))
    assert space.is_halving == (factor == 2.0)
    process = LadderProcess(space.abar, ladder.size_schedule(
        resolution_levels(d.timesteps, d.levels, d.resolution_schedule, d.gamma)))
    rng = np.random.default_rng(7)
    plan = space.plan(steps)
    checked_up = False
    for step in plan[:-1]:
        post = process.posterior(step.t, step.s)
        assert post.degradation.in_shape == (step.out_size,) * 2
        if step.changes_size:
            np.testing.assert_array_equal(post.degradation.rows, step.halve)
            np.testing.assert_array_equal(post.eig_h[1], step.eigvecs)
            np.testing.assert_array_equal(post.noise_scale, step.noise_scale)
            ours = post.up_coefficients()
            theirs = [step.a_s, step.k_fwd, step.k_res, step.sigma_s, step.rho_alpha]
            checked_up = True
        else:
            ours, theirs = post.keep_coefficients(), [step.c_x0, step.c_xt, step.noise_std]
        np.testing.assert_array_equal(ours, theirs)  # bit for bit
        if step.t % 7 == 0 or step.changes_size:  # the update itself, on a subset of steps
            x_t = rng.standard_normal((1, 2, step.in_size, step.in_size))
            x0 = rng.uniform(-1, 1, (1, 2, step.out_size, step.out_size))
            z = rng.standard_normal((1, 2, step.out_size, step.out_size))
            np.testing.assert_array_equal(post.sample(x_t, x0, z), p_step(step, x_t, x0, z))
    assert checked_up
