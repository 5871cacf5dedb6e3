"""The tests' oracle for any resolution ladder: an independent derivation, in numpy, of the
exact posterior of a separable linear degradation (docs/method.md §10), written from the
math with dense separable maps rather than ``ssd_core.method``'s per-step constants.

The 2x process of ``ssd_core.method`` is the special case ``ds_factor = 2``: its ladder,
its halving matrices and its posterior coefficients come out of this module unchanged, and
for any ladder ``ScaleSpace``'s constants and draws equal :func:`posterior`'s
(tests/test_ladder.py). It lives with the tests because only they use it.

Conventions as in ``ssd_core.method``: images ``[..., H, W]``; a separable map acts as
``X -> A_h X A_w^T`` (row-major ``vec``: ``A_h ⊗ A_w``); sizes are side lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ssd_core.config import ConfigError, Ladder, ladder_sizes  # noqa: F401  (the ladder rule: part of this API)
from ssd_core.method import checked_schedule, keep_update, resize_matrix  # noqa: F401  (resize_matrix: part of this API)


def halving_matrix(size: int) -> np.ndarray:
    """The 1-D matrix ``[size/2, size]`` of torch's 2x bilinear antialiased downsample
    (``resize_matrix`` from ``size`` to ``size/2``: taps [1,3,3,1]/8 inside,
    renormalised where they run off the border)."""
    if size < 2 or size % 2:
        raise ValueError(f"cannot halve size {size}")
    return resize_matrix(size, size // 2)



# --------------------------------------------------------------------------- separable maps
def _is_eye(a: np.ndarray) -> bool:
    return a.shape[0] == a.shape[1] and np.array_equal(a, np.eye(len(a)))


@dataclass(frozen=True)
class Separable:
    """A linear map on images ``X [..., h_in, w_in] -> A_h X A_w^T [..., h_out, w_out]``.

    As a matrix on row-major ``vec(X)`` it is ``A_h ⊗ A_w``; so is its Gram matrix
    ``A^T A = (A_h^T A_h) ⊗ (A_w^T A_w)``, whose eigenvectors and eigenvalues are the
    Kronecker products of the per-axis ones (:meth:`gram_eig`).
    """

    rows: np.ndarray  # A_h [h_out, h_in]
    cols: np.ndarray  # A_w [w_out, w_in]

    @classmethod
    def identity(cls, h: int, w: int | None = None) -> "Separable":
        return cls(np.eye(h), np.eye(h if w is None else w))

    @classmethod
    def resize(cls, in_size: int, out_size: int) -> "Separable":
        """The square antialiased bilinear resize of :func:`resize_matrix` on both axes."""
        a = resize_matrix(in_size, out_size)
        return cls(a, a)

    @property
    def is_identity(self) -> bool:
        """Whether both axes are identities (a step that keeps the size)."""
        return _is_eye(self.rows) and _is_eye(self.cols)

    @property
    def in_shape(self) -> tuple[int, int]:
        return self.rows.shape[1], self.cols.shape[1]

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.rows.shape[0], self.cols.shape[0]

    def apply(self, x):
        """``A x``: ``[..., h_in, w_in] -> [..., h_out, w_out]``."""
        return self.rows @ x @ self.cols.T

    def adjoint(self, y):
        """``A^T y``: ``[..., h_out, w_out] -> [..., h_in, w_in]``."""
        return self.rows.T @ y @ self.cols

    def then(self, other: "Separable") -> "Separable":
        """The composition ``other ∘ self`` (apply ``self`` first), still separable."""
        return Separable(other.rows @ self.rows, other.cols @ self.cols)

    def dense(self) -> np.ndarray:
        """``A_h ⊗ A_w`` as one matrix (for tests on small sizes)."""
        return np.kron(self.rows, self.cols)

    def gram_eig(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Per-axis ``(eigenvalues, eigenvectors)`` of ``A_h^T A_h`` and ``A_w^T A_w``
        (eigenvalues clipped at 0: the Gram matrices are PSD up to rounding)."""
        out = []
        for a in (self.rows, self.cols):
            if _is_eye(a):
                out.append((np.ones(len(a)), np.eye(len(a))))  # a same-size axis: nothing to solve
                continue
            values, vectors = np.linalg.eigh(a.T @ a)
            out.append((values.clip(0), vectors))
        return out[0], out[1]


def compose(maps) -> Separable:
    """``maps[-1] ∘ ... ∘ maps[0]`` (the first is applied first)."""
    maps = list(maps)
    result = maps[0]
    for m in maps[1:]:
        result = result.then(m)
    return result


# --------------------------------------------------------------------------- the posterior
def separable_update(x_t, x0_pred, z, a_s, k_fwd, k_res, sigma_s, A_h, A_w, U_h, U_w, S):
    """One posterior draw for ``x_t = sqrt(alpha) A x_s + eta``, ``A = A_h ⊗ A_w``
    (docs/method.md (10.8)-(10.10)): mean ``mu + k_res A^T (x_t - k_fwd A mu)`` with
    ``mu = a_s x0_pred``, noise ``sigma_s U_h (S * (U_h^T z U_w)) U_w^T``. With
    ``A_h = A_w`` it is ``ssd_core.method.up_update``; numpy and torch alike."""
    mu = a_s * x0_pred
    residual = x_t - k_fwd * (A_h @ mu @ A_w.mT)
    mean = mu + k_res * (A_h.mT @ residual @ A_w)
    noise = U_h @ (S * (U_h.mT @ z @ U_w)) @ U_w.mT
    return mean + sigma_s * noise


@dataclass(frozen=True)
class Posterior:
    """``q(x_s | x_t, x_0)`` for ``x_t = sqrt(alpha) A x_s + eta`` with separable ``A``
    (docs/method.md §10.3). Scalars as in ``ssd_core.method.Step``; ``eig_h``/``eig_w`` the
    per-axis ``(l, U)`` of ``A^T A``; ``noise_scale`` is ``S_ij = sqrt(1 - rho alpha l_i m_j)``."""

    degradation: Separable
    alpha: float  # abar_t / abar_s
    var_t: float  # sigma_t^2
    var_s: float  # sigma_s^2
    a_s: float
    k_fwd: float  # sqrt(alpha)
    k_res: float  # rho sqrt(alpha)
    sigma_s: float
    rho_alpha: float
    eig_h: tuple[np.ndarray, np.ndarray]
    eig_w: tuple[np.ndarray, np.ndarray]
    noise_scale: np.ndarray  # S [h_s, w_s]

    def keep_coefficients(self) -> tuple[float, float, float]:
        """``(c_x0, c_xt, noise_std)`` of docs/method.md (5.4), for an identity degradation;
        written with ``1 - alpha`` (as ``ssd_core.method``), not ``1 - rho alpha``, which
        cancels near t = 0."""
        return (self.a_s * (1.0 - self.alpha) / self.var_t,
                math.sqrt(self.alpha) * self.var_s / self.var_t,
                math.sqrt(self.var_s * (1.0 - self.alpha) / self.var_t))

    def up_coefficients(self) -> tuple[float, float, float, float, float]:
        """``(a_s, k_fwd, k_res, sigma_s, rho_alpha)``: a fused up-step graph's ``coef``."""
        return self.a_s, self.k_fwd, self.k_res, self.sigma_s, self.rho_alpha

    def mean(self, x_t, x0_pred):
        """``E[x_s | x_t, x_0 = x0_pred]`` (10.8)."""
        mu = self.a_s * x0_pred
        return mu + self.k_res * self.degradation.adjoint(x_t - self.k_fwd * self.degradation.apply(mu))

    def noise(self, z):
        """White ``z [..., h_s, w_s]`` -> noise with covariance ``I - rho alpha A^T A``
        ((10.9), drawn as in (10.10))."""
        (_, U_h), (_, U_w) = self.eig_h, self.eig_w
        return U_h @ (self.noise_scale * (U_h.T @ z @ U_w)) @ U_w.T

    def sample(self, x_t, x0_pred, z):
        """A draw of ``x_s``: :func:`separable_update` with this step's constants, or
        ``ssd_core.method.keep_update`` where the degradation is the identity."""
        if self.degradation.is_identity:
            return keep_update(x_t, x0_pred, z, *self.keep_coefficients())
        (_, U_h), (_, U_w) = self.eig_h, self.eig_w
        return separable_update(x_t, x0_pred, z, self.a_s, self.k_fwd, self.k_res, self.sigma_s,
                                self.degradation.rows, self.degradation.cols, U_h, U_w, self.noise_scale)


def posterior(abar_t: float, abar_s: float, degradation: Separable) -> Posterior:
    """The exact posterior of one reverse step ``t -> s`` (``abar_t < abar_s``) whose forward
    step is ``x_t = sqrt(abar_t / abar_s) A x_s + eta`` with marginals ``N(a R x0, sigma^2 I)``.

    Raises ``ConfigError`` where no such forward step exists, i.e. where
    ``rho alpha lambda_max(A^T A) > 1`` (the step noise covariance (10.6) is not PSD, (10.7)).
    """
    if not 0.0 < abar_t < abar_s <= 1.0:
        raise ConfigError(f"abar_t={abar_t}, abar_s={abar_s}; expected 0 < abar_t < abar_s <= 1")
    alpha = abar_t / abar_s
    var_t, var_s = 1.0 - abar_t, 1.0 - abar_s
    rho = var_s / var_t
    eig_h, eig_w = degradation.gram_eig()
    top = rho * alpha * eig_h[0].max() * eig_w[0].max()
    if top > 1.0 + 1e-12:
        raise ConfigError(f"rho*alpha*lambda_max(A^T A) = {top:.6g} > 1: this degradation has no "
                          f"Gaussian forward step with isotropic marginals (docs/method.md §10.2)")
    scale = np.sqrt(np.clip(1.0 - rho * alpha * np.outer(eig_h[0], eig_w[0]), 0.0, None))
    return Posterior(degradation, alpha, var_t, var_s, math.sqrt(abar_s), math.sqrt(alpha),
                     rho * math.sqrt(alpha), math.sqrt(var_s), rho * alpha, eig_h, eig_w, scale)


# --------------------------------------------------------------------------- the process
class LadderProcess:
    """The scale-space process on any ladder: ``abar`` float64 [T], ``sizes`` r(t) int [T]
    (non-increasing), and the 1-D resize between consecutive ladder sizes, keyed
    ``(in, out)`` (default :func:`resize_matrix`). Square images, the same matrix per axis.

    The 2x process is the case ``sizes = image_size >> k(t)``: then :meth:`posterior` gives
    ``ssd_core.method.ScaleSpace``'s step constants (docs/method.md §10.3).
    """

    def __init__(self, abar, sizes, matrices: dict[tuple[int, int], np.ndarray] | None = None):
        self.abar, self.sizes = checked_schedule(abar, sizes)
        self.ladder = tuple(int(m) for m in dict.fromkeys(self.sizes.tolist()))  # largest first
        self.matrices = {}
        for big, small in zip(self.ladder, self.ladder[1:]):
            given = (matrices or {}).get((big, small))
            matrix = resize_matrix(big, small) if given is None else np.asarray(given, np.float64)
            if matrix.shape != (small, big):
                raise ConfigError(f"resize matrix {big}->{small} has shape {matrix.shape}; "
                                  f"expected {(small, big)}")
            self.matrices[big, small] = matrix

    def degradation(self, from_size: int, to_size: int) -> Separable:
        """``R_{from -> to}``: the product of the consecutive resizes between the two sizes."""
        if from_size not in self.ladder or to_size not in self.ladder or to_size > from_size:
            raise ValueError(f"no degradation {from_size} -> {to_size} on ladder {self.ladder}")
        i, j = self.ladder.index(from_size), self.ladder.index(to_size)
        steps = [Separable(self.matrices[a, b], self.matrices[a, b])
                 for a, b in zip(self.ladder[i:j], self.ladder[i + 1:j + 1])]
        return compose(steps) if steps else Separable.identity(from_size)

    def q_sample(self, x0: np.ndarray, t: int, eps: np.ndarray) -> np.ndarray:
        """Forward marginal ``x_t = a_t R_{full->r(t)} x0 + sigma_t eps`` (10.5)."""
        R = self.degradation(self.ladder[0], int(self.sizes[t]))
        return math.sqrt(self.abar[t]) * R.apply(x0) + math.sqrt(1.0 - self.abar[t]) * eps

    def posterior(self, t: int, s: int) -> Posterior:
        """``q(x_s | x_t, x_0)`` for kept timesteps ``t > s >= 0`` (a respaced gap allowed)."""
        if not 0 <= s < t < len(self.abar):
            raise ValueError(f"need 0 <= s < t < T, got t={t}, s={s}")
        A = self.degradation(int(self.sizes[s]), int(self.sizes[t]))
        return posterior(float(self.abar[t]), float(self.abar[s]), A)

    def q_step(self, x_s: np.ndarray, t: int, s: int, z: np.ndarray) -> np.ndarray:
        """One exact forward step ``x_t = sqrt(alpha) A x_s + eta`` with ``Cov(eta)`` of (10.6),
        drawn from white ``z`` at size r(t) through the per-axis eigenvectors of ``A A^T``."""
        A = self.degradation(int(self.sizes[s]), int(self.sizes[t]))
        alpha = self.abar[t] / self.abar[s]
        var_t, var_s = 1.0 - self.abar[t], 1.0 - self.abar[s]
        (p, V_h), (q, V_w) = Separable(A.rows.T, A.cols.T).gram_eig()  # eig of A_h A_h^T, A_w A_w^T
        scale = np.sqrt(np.clip(var_t - alpha * var_s * np.outer(p, q), 0.0, None))
        eta = V_h @ (scale * (V_h.T @ z @ V_w)) @ V_w.T
        return math.sqrt(alpha) * A.apply(x_s) + eta
