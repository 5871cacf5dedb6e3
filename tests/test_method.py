"""The method's numbers against closed forms, dense matrices and Monte Carlo (docs/method.md §2-§6)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssd_core.config import ConfigError, DiffusionConfig, make_config
from ssd_core.schema import parse, to_json
from ladder_oracle import halving_matrix
from ssd_core.method import NOISE_SCHEDULES, ScaleSpace, linear_abar, noise_schedule, p_step
from ssd.torch_process import TorchScaleSpace


def torch_halve(x: np.ndarray) -> np.ndarray:
    """The reference 2x downsample: torch's antialiased bilinear interpolate."""
    m = x.shape[-1] // 2
    out = F.interpolate(torch.from_numpy(x), size=(m, m), mode="bilinear",
                        align_corners=False, antialias=True)
    return out.numpy()


def dense_halving(size: int) -> np.ndarray:
    """R for one channel as a dense [(size/2)^2, size^2] matrix on row-major vec(X)."""
    A = halving_matrix(size)
    return np.kron(A, A)


def small_space(levels=2, timesteps=12, size=8) -> ScaleSpace:
    """A short process whose steps are big enough that errors are visible."""
    abar = linear_abar(timesteps, 0.02, 0.4)
    k = np.minimum(np.arange(timesteps) * levels // timesteps, levels - 1)
    return ScaleSpace(abar, size >> k)


# ------------------------------------------------------------------ resize operator
@pytest.mark.parametrize("size", [2, 4, 8, 16, 32, 64, 256])
def test_halving_matrix_equals_torch_interpolate(size):
    x = np.random.default_rng(0).standard_normal((2, 3, size, size))
    A = halving_matrix(size)
    np.testing.assert_allclose(A @ x @ A.T, torch_halve(x), rtol=0, atol=1e-13)


def test_halving_matrix_interior_taps_and_mean_preserving():
    A = halving_matrix(16)
    np.testing.assert_allclose(A[3, 4:10], [0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0])
    np.testing.assert_allclose(A.sum(axis=1), 1.0)


def test_multi_halving_is_composition_of_single_steps():
    space = ScaleSpace.from_config(make_config("cpu64"))
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64))
    expected = torch_halve(torch_halve(torch_halve(x)))
    np.testing.assert_allclose(space.downsample(x, 8), expected, atol=1e-13)


def test_adjoint_identity():
    space = ScaleSpace.from_config(make_config("cpu64"))
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((2, 3, 64, 64)), rng.standard_normal((2, 3, 16, 16))
    lhs = np.sum(space.downsample(x, 16) * y)
    rhs = np.sum(x * space.adjoint(y, 64))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_step_noise_covariance_is_psd_at_every_change_step():
    """docs/method.md §4: lambda_max(R R^T) ~= 0.25 (a little above, from the renormalised borders)
    keeps sigma_t^2 I - sigma_{t-1}^2 alpha_t R R^T positive semidefinite."""
    R = dense_halving(16)
    lam = np.linalg.eigvalsh(R @ R.T).max()
    assert 0.25 <= lam < 0.26
    space = ScaleSpace.from_config(make_config("cpu64"))
    for t in space.change_steps:
        alpha = space.abar[t] / space.abar[t - 1]
        assert (1 - space.abar[t]) - (1 - space.abar[t - 1]) * alpha * lam > 0


def test_torch_downsample_matches_interpolate_float32():
    space = ScaleSpace.from_config(make_config("cpu64"))
    x = torch.randn(2, 3, 64, 64)
    ours = TorchScaleSpace(space).downsample(x, 16)
    ref = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True),
                        scale_factor=0.5, mode="bilinear", antialias=True)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize(
    "levels, counts, changes",
    [
        (4, [438, 312, 187, 63], [438, 750, 937]),
        (3, [555, 334, 111], [555, 889]),
        (6, [306, 249, 195, 139, 83, 28], None),
        (1, [1000], []),
    ],
)
def test_steps_per_level_match_spec(levels, counts, changes):
    space = ScaleSpace.from_config(make_config("adm256", levels=levels))
    sizes, per_size = np.unique(space.sizes, return_counts=True)
    assert per_size[::-1].tolist() == counts
    assert sizes[::-1].tolist() == [256 >> k for k in range(levels)]
    if changes is not None:
        assert space.change_steps.tolist() == changes


def test_equal_schedule_splits_evenly():
    space = ScaleSpace.from_config(make_config("cpu64", resolution_schedule="equal"))
    assert np.unique(space.sizes, return_counts=True)[1].tolist() == [250] * 4


def test_noise_schedule_is_ddpm_linear():
    space = ScaleSpace.from_config(make_config("tiny32"))
    betas = 1 - space.abar / np.concatenate([[1.0], space.abar[:-1]])
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), atol=1e-12)


# ------------------------------------------------------------------ posterior and noise
def dense_step_noise_cov(step) -> np.ndarray:
    """Covariance of p_step's noise, read off by applying it to every basis image."""
    m = step.out_size
    basis = np.eye(m * m).reshape(m * m, 1, m, m)
    zero = np.zeros((m * m, 1, step.in_size, step.in_size))
    columns = p_step(step, zero, np.zeros_like(basis), basis).reshape(m * m, m * m)
    return columns.T @ columns


def dense_posterior(space, t, s, x_t, x0):
    """Gaussian conditioning of x_s ~ N(a_s x0', sigma_s^2 I) on x_t = M x_s + noise."""
    alpha = space.abar[t] / space.abar[s]
    m_in, m_out = int(space.sizes[t]), int(space.sizes[s])
    R = np.eye(m_out * m_out) if m_in == m_out else dense_halving(m_out)
    M = np.sqrt(alpha) * R
    var_s, var_t = 1 - space.abar[s], 1 - space.abar[t]
    prior_mean = np.sqrt(space.abar[s]) * x0.ravel()
    prior_cov = var_s * np.eye(m_out * m_out)
    noise_cov = var_t * np.eye(m_in * m_in) - var_s * M @ M.T
    joint_cov = M @ prior_cov @ M.T + noise_cov
    gain = prior_cov @ M.T @ np.linalg.inv(joint_cov)
    mean = prior_mean + gain @ (x_t.ravel() - M @ prior_mean)
    return mean, prior_cov - gain @ M @ prior_cov


@pytest.mark.parametrize("steps", [None, 5])
def test_posterior_equals_dense_gaussian_conditioning(steps):
    space = small_space()
    rng = np.random.default_rng(3)
    checked_change = False
    for step in space.plan(steps)[:-1]:
        x_t = rng.standard_normal((1, 1, step.in_size, step.in_size))
        x0 = rng.uniform(-1, 1, (1, 1, step.out_size, step.out_size))
        z = np.zeros((1, 1, step.out_size, step.out_size))
        mean, cov = dense_posterior(space, step.t, step.s, x_t, x0)
        np.testing.assert_allclose(p_step(step, x_t, x0, z).ravel(), mean, atol=1e-12)
        np.testing.assert_allclose(dense_step_noise_cov(step), cov, atol=1e-12)
        checked_change |= step.changes_size
    assert checked_change


def test_exact_noise_covariance_is_correlated_not_isotropic():
    step = next(s for s in small_space().plan() if s.changes_size)
    cov = dense_step_noise_cov(step)
    alpha = small_space().abar[step.t] / small_space().abar[step.s]
    rho = step.sigma_s**2 / (1 - small_space().abar[step.t])
    R = dense_halving(step.out_size)
    expected = step.sigma_s**2 * (np.eye(len(cov)) - rho * alpha * R.T @ R)
    np.testing.assert_allclose(cov, expected, atol=1e-13)
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 1e-3


def test_forward_chain_reproduces_marginal_monte_carlo():
    """x_t = sqrt(alpha_t) R_t x_{t-1} + eta_t, chained from x0, has the docs/method.md §4 marginal."""
    space = small_space(timesteps=8)
    rng = np.random.default_rng(4)
    x0 = rng.uniform(-1, 1, (1, 1, 8, 8))
    n = 100_000
    x, var_prev, abar_prev = np.repeat(x0, n, axis=0), 0.0, 1.0
    for t in range(space.timesteps):
        alpha = space.abar[t] / abar_prev
        m = int(space.sizes[t])
        R = np.eye(m * m) if x.shape[-1] == m else dense_halving(x.shape[-1])
        M = np.sqrt(alpha) * R
        cov = (1 - space.abar[t]) * np.eye(m * m) - var_prev * M @ M.T
        root = np.linalg.cholesky(cov)
        flat = x.reshape(n, -1) @ M.T + rng.standard_normal((n, m * m)) @ root.T
        x, var_prev, abar_prev = flat.reshape(n, 1, m, m), 1 - space.abar[t], space.abar[t]
    t_last = space.timesteps - 1
    expected_mean = np.sqrt(space.abar[t_last]) * space.downsample(x0, x.shape[-1])
    np.testing.assert_allclose(x.mean(axis=0, keepdims=True), expected_mean, atol=0.01)
    flat = x.reshape(n, -1)
    empirical_cov = np.cov(flat, rowvar=False)
    np.testing.assert_allclose(empirical_cov, (1 - space.abar[t_last]) * np.eye(flat.shape[1]), atol=0.015)


def test_q_sample_matches_torch():
    space = ScaleSpace.from_config(make_config("tiny32"))
    rng = np.random.default_rng(5)
    x0 = rng.uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    t = np.full(4, 800)
    size = int(space.sizes[800])
    eps = rng.standard_normal((4, 3, size, size)).astype(np.float32)
    ours = TorchScaleSpace(space).q_sample(torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(eps))
    np.testing.assert_allclose(ours.numpy(), space.q_sample(x0.astype(np.float64), 800, eps), atol=1e-5)


def test_p_step_numpy_and_torch_agree():
    space = ScaleSpace.from_config(make_config("tiny32"))
    rng = np.random.default_rng(6)
    for step in space.plan(20)[:-1]:
        args = [rng.standard_normal((2, 3, s, s)).astype(np.float32)
                for s in (step.in_size, step.out_size, step.out_size)]
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)
        ours = p_step(step.map_arrays(as_tensor), *map(as_tensor, args))
        np.testing.assert_allclose(ours.double().numpy(), p_step(step, *args), atol=1e-5)


# ------------------------------------------------------------------ DDPM and respacing
def test_one_level_is_exactly_ddpm():
    space = ScaleSpace.from_config(make_config("tiny32", levels=1))
    assert space.change_steps.size == 0 and set(space.sizes.tolist()) == {32}
    abar = space.abar
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    for step in space.plan()[:-1]:
        t, s = step.t, step.s
        assert s == t - 1 and step.route == "keep_32"
        # improved-diffusion's posterior_mean_coef1/2 and posterior_variance
        assert step.c_x0 == pytest.approx(betas[t] * np.sqrt(abar[s]) / (1 - abar[t]), rel=1e-12)
        assert step.c_xt == pytest.approx((1 - abar[s]) * np.sqrt(1 - betas[t]) / (1 - abar[t]), rel=1e-12)
        assert step.noise_std**2 == pytest.approx(betas[t] * (1 - abar[s]) / (1 - abar[t]), rel=1e-10)
    assert space.plan()[-1].is_final


@pytest.mark.parametrize("steps", [4, 5, 10, 50, 250, 999, 1000])
def test_respacing_keeps_every_change_step(steps):
    space = ScaleSpace.from_config(make_config("cpu64"))
    kept = space.timesteps_for(steps)
    assert len(kept) == steps and np.all(np.diff(kept) < 0)
    assert kept[0] == 999 and set(space.change_steps) <= set(kept.tolist())
    routes = [step.route for step in space.plan(steps)]
    assert routes.count("up_8_16") == routes.count("up_16_32") == routes.count("up_32_64") == 1


@pytest.mark.parametrize("steps", [0, 3, 1001])
def test_respacing_refuses_impossible_step_counts(steps):
    space = ScaleSpace.from_config(make_config("cpu64"))
    with pytest.raises(ConfigError, match="steps="):
        space.timesteps_for(steps)


def test_final_step_returns_prediction_and_sizes_chain():
    space = ScaleSpace.from_config(make_config("cpu64"))
    plan = space.plan(30)
    for prev, step in zip(plan, plan[1:]):
        assert prev.out_size == step.in_size and prev.s == step.t
    assert plan[-1].is_final and plan[-1].out_size == 64 and plan[0].in_size == 8


# ------------------------------------------------------------------ training rule
def test_batch_timestep_rule_shares_sizes_and_is_uniform():
    space = small_space(levels=3, timesteps=30, size=16)
    rng = np.random.default_rng(7)
    counts = np.zeros(space.timesteps)
    for _ in range(6000):
        t = space.sample_timesteps(rng, 8)
        assert len({int(space.sizes[i]) for i in t}) == 1
        assert len({space.target_size(int(i)) for i in t}) == 1
        if set(t.tolist()) & set(space.change_steps.tolist()):
            assert len(set(t.tolist())) == 1
        np.add.at(counts, t, 1)
    freq = counts / counts.sum()
    np.testing.assert_allclose(freq, 1 / space.timesteps, atol=0.25 / space.timesteps)


def test_min_snr_weight():
    space = ScaleSpace.from_config(make_config("tiny32"))
    w = space.loss_weight(np.array([0, 999]))
    assert w[0] == 5.0 and w[1] == pytest.approx(space.abar[999] / (1 - space.abar[999]))


def test_scale_space_validates_arrays():
    with pytest.raises(ConfigError):
        ScaleSpace(np.linspace(0.9, 0.1, 10), np.full(9, 8))
    with pytest.raises(ConfigError):
        ScaleSpace(np.linspace(0.9, 0.1, 4), [8, 16, 8, 8])


# ------------------------------------------------------------------ the schedule registry
def test_the_linear_schedule_is_ddpms_and_configs_name_it_implicitly():
    d = DiffusionConfig()
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(noise_schedule(d), np.cumprod(1 - betas), rtol=1e-12)
    assert list(NOISE_SCHEDULES) == ["linear"] and NOISE_SCHEDULES["linear"] is linear_abar
    assert "noise_schedule" not in to_json(d)  # documents written before the field are unchanged
    assert parse(DiffusionConfig, to_json(d)).noise_schedule == "linear"
    np.testing.assert_array_equal(ScaleSpace.from_config(make_config("tiny32", 2)).abar, noise_schedule(d))


def test_an_unknown_schedule_is_refused_by_name():
    document = {**to_json(DiffusionConfig()), "noise_schedule": "cosine"}
    with pytest.raises(ConfigError, match="noise_schedule.*cosine"):
        parse(DiffusionConfig, document)
