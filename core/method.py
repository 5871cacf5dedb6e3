"""The method's numbers and the one sampling loop, in numpy (docs/method.md §2-§6).

Everything here is computed once, in float64, from the noise schedule ``abar`` and the
resolution schedule ``sizes`` (r(t) for every t). The trainer, the torch reference sampler,
the exporter's checks and the torch-free runtime all import this module; torch code turns
the arrays into tensors once. Nothing here imports torch.

Shapes: images are ``[N, C, H, W]`` with square ``H == W``; the 1-D resize matrix ``A`` from
one ladder size ``m`` to the next smaller ``n`` is ``[n, m]`` and acts as ``R x = A x A^T`` on the
last two axes (a halving for the 2x ladder, any antialiased bilinear resize for a gradual one,
docs/method.md §10).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .config import NOISE_SCHEDULES as SCHEDULE_NAMES
from .checks import integer
from .config import ConfigError, DiffusionConfig, SSDConfig


# --------------------------------------------------------------------------- schedules
def linear_abar(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM's linear beta schedule as ``abar_t = prod_{i<=t} (1 - beta_i)``, float64 [T]."""
    betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


# The noise schedules a config names (``diffusion.noise_schedule``): name -> abar [T] from
# (timesteps, beta_start, beta_end). Add, never change: a trained model and its bundles
# depend on these numbers (a bundle carries its abar, checked against its config's schedule
# when loaded). A new entry also needs its name in ``ssd_core.config.NOISE_SCHEDULES``.
NOISE_SCHEDULES: dict[str, Callable[[int, float, float], np.ndarray]] = {
    "linear": linear_abar,
}
assert tuple(NOISE_SCHEDULES) == SCHEDULE_NAMES, "ssd_core.config.NOISE_SCHEDULES must list these names"


def noise_schedule(diffusion: DiffusionConfig) -> np.ndarray:
    """abar [T] (float64) of the schedule ``diffusion`` names."""
    return NOISE_SCHEDULES[diffusion.noise_schedule](diffusion.timesteps, diffusion.beta_start, diffusion.beta_end)


def resolution_levels(timesteps: int, levels: int, schedule: str, gamma: float) -> np.ndarray:
    """k(t): how many halvings below full size the state x_t lives at, int64 [T]."""
    tau = np.arange(timesteps, dtype=np.float64) / (timesteps - 1)
    if schedule == "convex":
        f = 1.0 - (1.0 - tau) ** gamma
    elif schedule == "equal":
        f = tau
    else:
        raise ConfigError(f"unknown resolution schedule {schedule!r}; expected convex or equal")
    return np.minimum(np.floor(levels * f), levels - 1).astype(np.int64)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The 1-D matrix ``[out_size, in_size]`` of torch's antialiased bilinear resize.

    Reproduces ``F.interpolate(x, size=..., mode="bilinear", align_corners=False,
    antialias=True)`` per axis (ATen's ``_compute_indices_min_size_weights_aa``): output
    pixel ``i`` centred at ``scale (i + 1/2)`` with ``scale = in/out``; a triangle filter of
    half-width ``max(scale, 1)`` (stretched when downsizing, which is the antialiasing),
    truncated at the borders and renormalised. ``resize_matrix(m, m // 2)`` is the 2x
    halving (taps [1,3,3,1]/8 inside); ``resize_matrix(m, m)`` is the identity.
    """
    if not (isinstance(in_size, int) and isinstance(out_size, int) and in_size >= 1 and out_size >= 1):
        raise ValueError(f"cannot resize {in_size!r} -> {out_size!r}; sizes must be positive ints")
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear half-width 1, times the scale when shrinking
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = np.maximum(0.0, 1.0 - np.abs((taps - center + 0.5) / support))
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix


def checked_schedule(abar, sizes) -> tuple[np.ndarray, np.ndarray]:
    """``abar`` as float64 [T], strictly decreasing inside (0, 1), and ``sizes`` r(t) as int
    [T], at least 1 and never growing with t; a ConfigError otherwise."""
    abar, sizes = np.asarray(abar, dtype=np.float64), np.asarray(sizes, dtype=np.int64)
    if abar.ndim != 1 or abar.shape != sizes.shape:
        raise ConfigError(f"abar {abar.shape} and sizes {sizes.shape} must be [T]")
    if not (np.all(np.diff(abar) < 0) and 0 < abar[-1] and abar[0] < 1):
        raise ConfigError("abar must decrease strictly inside (0, 1)")
    if np.any(np.diff(sizes) > 0) or sizes[-1] < 1:
        raise ConfigError("r(t) must be >= 1 and must not grow with t")
    return abar, sizes


def route_name(in_size: int, out_size: int) -> str:
    """Name of the network route from ``in_size`` to ``out_size`` (``keep_32``, ``up_16_32``,
    ``up_20_32`` on a gradual ladder)."""
    if out_size == in_size:
        return f"keep_{in_size}"
    if out_size > in_size:
        return f"up_{in_size}_{out_size}"
    raise ValueError(f"no route from size {in_size} to {out_size}")


def parse_route(name: str) -> tuple[int, int]:
    """``"keep_16"`` -> ``(16, 16)``; ``"up_8_16"`` -> ``(8, 16)``."""
    kind, *sizes = name.split("_")
    try:
        sizes = [int(s) for s in sizes]
    except ValueError:
        sizes = []
    if kind == "keep" and len(sizes) == 1:
        return sizes[0], sizes[0]
    if kind == "up" and len(sizes) == 2 and 0 < sizes[0] < sizes[1]:
        return sizes[0], sizes[1]
    raise ValueError(f"malformed route name {name!r}; expected keep_R or up_R_S with R < S")


# --------------------------------------------------------------------------- sampling plan
@dataclass(frozen=True)
class Step:
    """One reverse step from kept timestep ``t`` to the next kept ``s`` (``s = -1``: final).

    The update (docs/method.md §5), with ``mu = a_s * x0_pred`` and ``z`` white noise at ``out_size``:
    - same size:  ``x_s = c_x0 * x0_pred + c_xt * x_t + noise_std * z``
    - size up:    ``x_s = mu + k_res * R^T (x_t - k_fwd * R mu) + sigma_s * U (S * (U^T z U)) U^T``
    - final:      ``x_s = x0_pred``
    """

    index: int
    t: int
    s: int
    in_size: int
    out_size: int
    a_s: float = 0.0
    c_x0: float = 0.0
    c_xt: float = 0.0
    noise_std: float = 0.0
    k_res: float = 0.0
    k_fwd: float = 0.0
    sigma_s: float = 0.0
    rho_alpha: float = 0.0  # rho * alpha, which shapes the correlated noise S
    halve: Any = None  # A [in, out]: the resize out -> in, R for this step (size-increasing steps only)
    eigvecs: Any = None  # U [out, out]: eigenvectors of A^T A
    noise_scale: Any = None  # S [out, out]: sqrt(1 - rho * alpha * l_i * l_j)
    route: str = dataclasses.field(init=False)  # named once, not per call in the hot loop

    def __post_init__(self):
        object.__setattr__(self, "route", route_name(self.in_size, self.out_size))

    @property
    def is_final(self) -> bool:
        return self.s < 0

    @property
    def changes_size(self) -> bool:
        return self.out_size != self.in_size

    @property
    def kind(self) -> str:
        return "up" if self.changes_size else "keep"

    def coefficients(self) -> np.ndarray:
        """The step's scalars as one float32 vector in the order of ``COEFFICIENTS[kind]``,
        the ``coef`` input of a fused step graph. The final step is an update whose result
        is ``x0_pred`` (``c_x0 = 1``, or ``a_s = 1`` with no residual and no noise)."""
        if self.is_final:
            values = {"c_x0": 1.0, "a_s": 1.0}
            return np.array([values.get(name, 0.0) for name in COEFFICIENTS[self.kind]], np.float32)
        return np.array([getattr(self, name) for name in COEFFICIENTS[self.kind]], np.float32)

    def map_arrays(self, convert: Callable[[np.ndarray], Any]) -> "Step":
        """A copy whose matrices went through ``convert`` (e.g. to torch tensors on a GPU)."""
        arrays = {
            name: convert(getattr(self, name))
            for name in ("halve", "eigvecs", "noise_scale")
            if getattr(self, name) is not None
        }
        return dataclasses.replace(self, **arrays)


# The scalars of each kind of step, in the order a fused step graph's ``coef`` input holds them.
COEFFICIENTS = {"keep": ("c_x0", "c_xt", "noise_std"), "up": ("a_s", "k_fwd", "k_res", "sigma_s", "rho_alpha")}


def keep_update(x_t, x0_pred, z, c_x0, c_xt, noise_std):
    """Same-size posterior draw (docs/method.md §5): ``c_x0 x0 + c_xt x_t + noise_std z``."""
    return c_x0 * x0_pred + c_xt * x_t + noise_std * z


def up_update(x_t, x0_pred, z, a_s, k_fwd, k_res, sigma_s, A, U, S):
    """Size-increasing posterior draw (docs/method.md §5, §10) with the exact correlated noise
    ``U (S * (U^T z U)) U^T``; ``A`` resizes the output size to the input size, ``U`` and ``S``
    as in :class:`Step`."""
    mu = a_s * x0_pred
    residual = x_t - k_fwd * (A @ mu @ A.mT)
    mean = mu + k_res * (A.mT @ residual @ A)
    noise = U @ (S * (U.mT @ z @ U)) @ U.mT
    return mean + sigma_s * noise


def p_step(step: Step, x_t, x0_pred, z):
    """Draw ``x_s`` from the posterior ``q(x_s | x_t, x0 = x0_pred)`` of docs/method.md §5.

    Works on numpy arrays and torch tensors alike (only ``@``, ``*``, ``+``, ``.mT``);
    ``x0_pred`` must already be clamped; ``z`` is white noise ``[N, C, out, out]``.
    """
    if step.is_final:
        return x0_pred
    if not step.changes_size:
        return keep_update(x_t, x0_pred, z, step.c_x0, step.c_xt, step.noise_std)
    return up_update(x_t, x0_pred, z, step.a_s, step.k_fwd, step.k_res, step.sigma_s,
                     step.halve, step.eigvecs, step.noise_scale)


class ScaleSpace:
    """The scale-space process: noise schedule, resolution schedule and resize operators.

    Built from arrays so that the runtime can rebuild it from a bundle without trusting any
    formula: ``abar`` float64 [T], ``sizes`` int [T] (r(t), never growing), and optionally the
    1-D resize matrices between consecutive ladder sizes keyed ``(big, small)`` (``resize``;
    default :func:`resize_matrix`), or, as bundles of format version 3 carry them, keyed by
    the size they halve (``halving``).
    """

    def __init__(self, abar, sizes, resize: dict[tuple[int, int], np.ndarray] | None = None,
                 halving: dict[int, np.ndarray] | None = None):
        self.abar, self.sizes = checked_schedule(abar, sizes)
        self.timesteps = len(self.abar)
        self.image_size = int(self.sizes[0])
        self.ladder = tuple(int(r) for r in sorted(set(self.sizes.tolist())))  # smallest first
        # A change step t has r(t-1) > r(t): input at r(t), output at the next ladder size.
        self.change_steps = np.flatnonzero(self.sizes[:-1] > self.sizes[1:]) + 1
        given = dict(resize or {})
        given.update({(int(m), int(m) // 2): a for m, a in (halving or {}).items()})
        self.resize = {}
        for small, big in zip(self.ladder, self.ladder[1:]):
            matrix = given.get((big, small))
            matrix = resize_matrix(big, small) if matrix is None else np.asarray(matrix, np.float64)
            if matrix.shape != (small, big):
                raise ConfigError(f"resize matrix {big}->{small} has shape {matrix.shape}; expected {(small, big)}")
            self.resize[big, small] = matrix
        self.below = {big: small for big, small in self.resize}  # the next smaller ladder size
        self._eig = {big: np.linalg.eigh(a.T @ a) for (big, _), a in self.resize.items()}
        self._plans: dict[int, tuple[Step, ...]] = {}  # by step count, see plan()

    @classmethod
    def from_config(cls, config: SSDConfig) -> "ScaleSpace":
        d = config.diffusion
        abar = noise_schedule(d)
        levels = resolution_levels(d.timesteps, d.levels, d.resolution_schedule, d.gamma)
        return cls(abar, config.resolution_ladder().size_schedule(levels))

    @property
    def is_halving(self) -> bool:
        """Whether every resize halves (the 2x process, format version 3 bundles)."""
        return all(big == 2 * small for big, small in self.resize)

    # ---------------------------------------------------------------- operators
    def downsample(self, x: np.ndarray, to_size: int) -> np.ndarray:
        """``R_{m -> to_size} x``: the consecutive resizes down the ladder; ``x`` is [..., m, m]."""
        while x.shape[-1] > to_size and x.shape[-1] in self.below:
            A = self.resize[x.shape[-1], self.below[x.shape[-1]]]
            x = A @ x @ A.T
        if x.shape[-1] != to_size:
            raise ValueError(f"cannot downsample size {x.shape[-1]} to {to_size} on ladder {self.ladder}")
        return x

    def adjoint(self, y: np.ndarray, to_size: int) -> np.ndarray:
        """``R^T y``: the adjoint of :meth:`downsample` from ``to_size`` down to y's size."""
        above = {small: big for big, small in self.resize}
        while y.shape[-1] < to_size:
            big = above[y.shape[-1]]
            A = self.resize[big, y.shape[-1]]
            y = A.T @ y @ A
        return y

    def q_sample(self, x0: np.ndarray, t: int, eps: np.ndarray) -> np.ndarray:
        """Forward marginal ``x_t = a_t R_{full->r(t)} x0 + sigma_t eps`` (docs/method.md §4)."""
        abar = self.abar[t]
        return np.sqrt(abar) * self.downsample(x0, int(self.sizes[t])) + np.sqrt(1 - abar) * eps

    def update_constants(self, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What a size-increasing update to ``out_size`` needs besides its scalars: the resize
        matrix ``A`` [in, out] down to the next ladder size, the eigenvectors ``U`` of ``A^T A``
        and the outer product of its (clipped) eigenvalues, from which
        ``S = sqrt(1 - rho alpha l l^T)`` (docs/method.md (10.10))."""
        eigvals, eigvecs = self._eig[out_size]
        return self.resize[out_size, self.below[out_size]], eigvecs, np.outer(eigvals.clip(0), eigvals.clip(0))

    # ---------------------------------------------------------------- training
    def loss_weight(self, t) -> np.ndarray:
        """Min-SNR-5 weight ``min(abar_t / (1 - abar_t), 5)`` (docs/method.md §6)."""
        abar = self.abar[np.asarray(t)]
        return np.minimum(abar / (1.0 - abar), 5.0)

    def sample_timesteps(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """The batch timestep rule of docs/method.md §6: one batch shares input and output sizes.

        Draw one t uniformly; a change step is used by the whole batch, otherwise every
        element draws its own t among the non-change steps of t's level.
        """
        t = int(rng.integers(self.timesteps))
        if t in self.change_steps:
            return np.full(batch, t, dtype=np.int64)
        same_level = np.flatnonzero(self.sizes == self.sizes[t])
        candidates = np.setdiff1d(same_level, self.change_steps)
        return rng.choice(candidates, size=batch).astype(np.int64)

    def target_size(self, t: int) -> int:
        """Size of the network's output at step t: r(t-1), with r(-1) = r(0)."""
        return int(self.sizes[max(t - 1, 0)])

    # ---------------------------------------------------------------- sampling
    def required_timesteps(self) -> list[int]:
        """The timesteps every plan keeps: T-1 and every change step."""
        return sorted({self.timesteps - 1, *self.change_steps.tolist()})

    def check_steps(self, steps: int | None) -> int:
        """The number of network calls ``steps`` asks for (None: T); refused, naming the
        range, outside one per level .. T."""
        if steps is None:
            return self.timesteps
        fewest = len(self.required_timesteps())
        try:
            steps = integer(steps, "steps", fewest, self.timesteps)
        except ConfigError:
            raise ConfigError(f"steps={repr(steps)[:40]}; this model needs between {fewest} (one per level) "
                              f"and {self.timesteps} (T)") from None
        return steps

    def timesteps_for(self, steps: int) -> np.ndarray:
        """Kept timesteps, descending: ``steps`` of them, T-1 and every change step included.

        An even grid over [0, T-1] in which the grid point nearest each required timestep is
        replaced by it, so levels keep about their share of steps.
        """
        steps = self.check_steps(steps)
        grid = np.round(np.linspace(0, self.timesteps - 1, steps)).astype(np.int64)
        taken = np.zeros(steps, dtype=bool)
        for t in self.required_timesteps():
            distance = np.where(taken, np.iinfo(np.int64).max, np.abs(grid - t))
            index = int(np.argmin(distance))
            grid[index], taken[index] = t, True
        kept = np.unique(grid)[::-1]
        assert len(kept) == steps, (steps, kept)
        return kept

    def plan(self, steps: int | None = None) -> list[Step]:
        """Per-step coefficients for sampling with ``steps`` network calls (default T), made
        once per step count and kept (every batch of a run shares them)."""
        steps = self.check_steps(steps)
        if steps not in self._plans:
            kept = self.timesteps_for(steps)
            following = np.append(kept[1:], -1)
            self._plans[steps] = tuple(self._step(i, int(t), int(s)) for i, (t, s) in enumerate(zip(kept, following)))
        return list(self._plans[steps])

    def _step(self, index: int, t: int, s: int) -> Step:
        in_size = int(self.sizes[t])
        out_size = int(self.sizes[s]) if s >= 0 else self.target_size(t)
        if s < 0:
            return Step(index, t, s, in_size, out_size)
        abar_t, abar_s = float(self.abar[t]), float(self.abar[s])  # python floats keep float32 arrays float32
        alpha = abar_t / abar_s  # the step's alpha over a respaced gap (docs/method.md §5)
        var_t, var_s = 1.0 - abar_t, 1.0 - abar_s
        rho = var_s / var_t
        a_s = math.sqrt(abar_s)
        if in_size == out_size:
            return Step(
                index, t, s, in_size, out_size,
                a_s=a_s,
                c_x0=a_s * (1.0 - alpha) / var_t,
                c_xt=math.sqrt(alpha) * var_s / var_t,
                noise_std=math.sqrt(var_s * (1.0 - alpha) / var_t),
            )
        _, eigvecs, eig_outer = self.update_constants(out_size)
        scale = np.sqrt(1.0 - rho * alpha * eig_outer)
        return Step(
            index, t, s, in_size, out_size,
            a_s=a_s,
            k_res=rho * math.sqrt(alpha),
            k_fwd=math.sqrt(alpha),
            sigma_s=math.sqrt(var_s),
            rho_alpha=rho * alpha,
            halve=self.resize[out_size, in_size],
            eigvecs=eigvecs,
            noise_scale=scale,
        )


# --------------------------------------------------------------------------- the loop
@dataclass
class SampleState:
    """What the loop yields after each step: the new state and the clean prediction."""

    step: Step
    x: Any  # x_s [N, C, out, out]
    x0_pred: Any  # clamped clean prediction [N, C, out, out]


# --------------------------------------------------------------------------- noise streams
# Which noise a seed makes (recorded in every PNG): "per-sample-v1" is one stream per sample.
NOISE_VERSION = "per-sample-v1"


def sample_stream(seed: int, index: int) -> np.random.Generator:
    """The noise generator of sample ``index`` in a run with ``seed``: PCG64 seeded by
    ``SeedSequence(seed, spawn_key=(index,))``, which is child ``index`` of
    ``SeedSequence(seed).spawn(...)`` (distinct for every (seed, index), seeds up to 2^128)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(int(index),))))


def draw_sizes(plan: list[Step]) -> list[int]:
    """The sizes a sample's stream is drawn at over ``plan``, in order: the initial noise at
    the first step's input size, then ``z`` at each step's output size but the final one's
    (what :func:`sample_loop` draws; the browser page's noise file follows it)."""
    return [plan[0].in_size, *(step.out_size for step in plan[:-1])]


class SampleNoise:
    """The white noise of samples ``indices`` of a run with ``seed``, a batch at a time.

    Every sample draws from its own stream (:func:`sample_stream`) in a fixed order: the
    initial noise ``[C, r, r]`` at the smallest size, then ``z`` ``[C, out, out]`` for every
    step but the final one. :meth:`draw` stacks the samples' draws, so sample ``i`` gets the
    same noise whatever batch it is in, whatever ``n`` and ``first`` are, on every backend.
    """

    def __init__(self, seed: int, indices, channels: int):
        self.seed, self.indices, self.channels = seed, tuple(int(i) for i in indices), int(channels)
        self._streams = [sample_stream(seed, i) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def draw(self, size: int) -> np.ndarray:
        """The next draw of every sample, float32 ``[len(indices), C, size, size]``."""
        out = np.empty((len(self._streams), self.channels, size, size), np.float32)
        for stream, row in zip(self._streams, out):
            stream.standard_normal(dtype=np.float32, out=row)
        return out


def noise_for(noise, n: int, channels: int) -> SampleNoise:
    """``noise`` as :class:`SampleNoise` for ``n`` samples: a :class:`SampleNoise` as is, or
    an int seed for samples ``0..n-1``."""
    if isinstance(noise, SampleNoise):
        if len(noise) != n:
            raise ValueError(f"noise for {len(noise)} samples, batch of {n}")
        return noise
    if isinstance(noise, bool) or not isinstance(noise, (int, np.integer)) or noise < 0:
        raise TypeError(f"noise {noise!r}; expected a seed (a non-negative int) or SampleNoise")
    return SampleNoise(int(noise), range(n), channels)


def sample_indices(n: int, first: int = 0, shard: tuple[int, int] = (0, 1)) -> range:
    """The global indices a process samples: shard ``k`` of ``count`` takes every
    ``count``-th index of ``first .. first + n - 1``, starting at ``first + k``."""
    k, count = shard
    if not (isinstance(count, int) and isinstance(k, int) and count >= 1 and 0 <= k < count):
        raise ConfigError(f"shard {k}/{count}; expected K/N with 0 <= K < N")
    return range(first + k, first + n, count)


def check_done(done) -> frozenset:
    """The indices of samples already written (``done=`` of the samplers), checked."""
    try:
        done = frozenset(done)
    except TypeError:
        raise ConfigError(f"done={str(done)[:40]}; expected a collection of sample indices") from None
    if not all(isinstance(index, int) and not isinstance(index, bool) for index in done):
        raise ConfigError("done= holds something that is not a sample index (an int)")
    return done


def pending_chunks(indices: range, batch: int, done=frozenset()) -> list[range]:
    """The batches of ``indices`` (``batch`` at a time) that hold a sample not in ``done``:
    a resumed run skips whole batches, so each batch it runs is the one an uninterrupted
    run of the same ``batch`` runs."""
    chunks = (indices[start:start + batch] for start in range(0, len(indices), batch))
    return [chunk for chunk in chunks if not all(index in done for index in chunk)]


StepFn = Callable[[Step, Any, Any], tuple[Any, Any]]


def sample_loop(
    plan: list[Step],
    step_fn: StepFn,
    x: Any,
    noise: SampleNoise,
    to_array: Callable[[np.ndarray], Any] = np.asarray,
) -> Iterator[SampleState]:
    """The one reverse-process loop, shared by the torch sampler and the runtime.

    ``step_fn(step, x_t, z) -> (x_s, x0_pred)`` makes one step: a fused step graph, or
    :func:`denoise_then_update` around a network. ``x`` is the initial noise (the first draw
    of ``noise``) already in the backend's array type; ``to_array`` moves numpy noise there
    (``z`` is None at the final step). ``noise``'s per-sample streams are the only noise
    source, drawn in a fixed order, so two backends fed the same seed and indices see the
    same noise, whatever the batch. ``plan`` steps must already hold ``to_array``'d matrices.
    """
    if x.shape[0] != len(noise):
        raise ValueError(f"noise for {len(noise)} samples, batch of {x.shape[0]}")
    for step in plan:
        z = None
        if not step.is_final:
            z = to_array(noise.draw(step.out_size))
        x, x0_pred = step_fn(step, x, z)
        yield SampleState(step, x, x0_pred)


def denoise_then_update(denoise: Callable[[Step, Any], Any]) -> StepFn:
    """A step made of a network call ``denoise(step, x_t) -> x0_pred`` and :func:`p_step`."""

    def step_fn(step: Step, x_t, z):
        x0_pred = denoise(step, x_t).clip(-1.0, 1.0)  # the prior lives in [-1, 1]
        return p_step(step, x_t, x0_pred, z), x0_pred

    return step_fn
