r"""Sampling scores of a (dual) matrix: leverage, row norms, linear baselines, uniform, mixing.

Leverage of row ``i`` of ``F`` (shape ``(n, m)``, rank ``r``):

.. math:: h_i = \|U_i\|^2 = \langle e_i, F F^\dagger e_i \rangle,\qquad \tau_i = h_i / r,

``U`` an orthonormal basis of ``range(F)``. Three exact routes, chosen at run time from the conditioning
of the ``m × m`` column-equilibrated Gram matrix ``G = D⁻¹FᵀFD⁻¹ = L Lᵀ`` (``κ(G)`` estimated by power and
inverse iteration; a failed Cholesky counts as singular):

1. **one Gram pass** (``κ(G) ≤ eps^{-1/4}``): ``U = F D⁻¹ L⁻ᵀ``. Two BLAS passes over ``F`` (``FᵀF`` and
   ``F·M``, the row norms fused into the second), orthogonality error ``~ eps·κ(G)`` (``≤ 2e-12`` in
   float64).
2. **two Gram passes** (``κ(G) ≤ 1/(1000·eps)``): one more CholeskyQR step on ``U`` (CholeskyQR2,
   Fukaya et al. 2014), which restores orthogonality to ``O(eps)`` whenever ``eps·κ(F)² < 1``.
3. **stable** (otherwise: ill-conditioned or rank-deficient): a Householder QR ``F = QR`` and an SVD
   ``R = W S Vᵀ``; ``U = Q W`` over the singular values above ``rtol · σ_max`` (rank = their number). In
   float32 and below ``Q`` is never formed (that costs ~15× the ``R`` factor on a CPU):
   ``U = F V S^{-1}`` followed by one CholeskyQR step, whose extra error ``~eps·κ`` is the size of the
   error the input's own rounding already causes.

The fast routes call no LAPACK routine after the Gram product (on a CPU such a call waits 20–40 ms for its
threads, as long as a whole pass): the Cholesky factor, the ``κ`` estimate and ``L⁻ᵀ`` are pure XLA.

All three work on the column-equilibrated ``F D^{-1}`` (``D`` the column norms; same range, so the same
leverage), which makes the route and the rank independent of the scale of each parameter; exactly-zero
columns are set aside (see :func:`equilibrate`).

The Gram routes cost about the floor of two BLAS passes; QR/SVD cost ~17× that on a CPU. Gram +
Cholesky alone would be silently wrong on an ill-conditioned float32 matrix (a ``κ(F) ≈ 1.6e6`` MLP dual
matrix: ``κ(G) ≈ 2.7e12 ≫ 1/eps``); the conditioning test sends such input to route 3.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from nlis_jax._checks import (
    check_choice,
    check_finite,
    check_floating,
    check_positive_int,
    check_probs,
    is_concrete,
)
from nlis_jax._precision import highest_precision
from nlis_jax._types import Array

#: Names of the routes, indexed by the ``route`` output of :func:`orthonormal_basis`.
ROUTES = ("gram", "gram2", "stable")


def _as_rows(F: Array, name: str = "F") -> tuple[Array, tuple[int, ...]]:
    """Accept ``(n, m)`` or block ``(n, k, m)``; return the ``(n·k, m)`` row matrix and the leading shape."""
    F = jnp.asarray(F)
    if F.ndim not in (2, 3):
        raise ValueError(f"{name} must be a matrix (n, m) or a block matrix (n, k, m), got shape {F.shape}.")
    if 0 in F.shape:
        raise ValueError(f"{name} must be non-empty, got shape {F.shape}.")
    check_floating(name, F)
    check_finite(name, F)
    return F.reshape(-1, F.shape[-1]), F.shape[:-1]


def _default_rtol(dtype) -> float:
    # 10·eps, independent of n: the trailing singular values of exactly rank-deficient inputs come out at
    # 0.06-2.2·eps·σ_max (measured for float32, n up to 20,000, m up to 600), so 10·eps separates them,
    # while numpy's max(n, m)·eps grows with n and, in float32, drops genuine directions (n = 20,000:
    # rtol = 2.4e-3 would truncate any κ > 417; a κ ≈ 3e5 MLP dual matrix lost 9 of 74 directions).
    return 10.0 * float(jnp.finfo(dtype).eps)


def inverse_sqrt_basis(lam: Array, V: Array, rtol) -> tuple[Array, Array]:
    """``M = V Λ^{-1/2}`` over eigenpairs with ``λ > rtol² λ_max`` (others zeroed); returns ``(M, rank)``."""
    keep = lam > (rtol**2) * lam[-1]
    scale = jnp.where(keep, lax.rsqrt(jnp.where(keep, lam, 1)), 0)
    return V * scale[None, :], jnp.sum(keep)


def choose_route(ratio: Array) -> Array:
    """Index into :data:`ROUTES` from ``1/κ(G) = λ_min/λ_max`` of the equilibrated Gram (0: singular)."""
    eps = jnp.finfo(ratio.dtype).eps
    return jnp.where(ratio >= eps**0.25, 0, jnp.where(ratio >= 1000 * eps, 1, 2))


def _gram(F: Array) -> Array:
    return jnp.einsum("np,nq->pq", F, F)


def equilibrate(G: Array) -> tuple[Array, Array, Array]:
    """Column-equilibrate a Gram matrix: ``(D⁻¹ G D⁻¹ + E, d, num_zero)``, ``D`` = column norms.

    ``range(F)`` is unchanged by scaling columns, so rank and route are decided on ``F D⁻¹`` (the norms
    are read off the Gram diagonal: no extra pass). Columns of a dual matrix differ in scale by orders of
    magnitude between layers; unscaled, a float32 MLP dual matrix with ``κ ≈ 1.4e6`` but
    ``κ(F D⁻¹) ≈ 5e4`` had its smallest singular value at ``6·eps·σ_max`` and lost genuine directions.
    Exactly-zero columns (dead ReLU units, a zero offset column) get a unit diagonal ``E``: they then add
    an isolated eigenvalue 1 whose basis column ``F e_j`` is zero, so they neither count in the rank nor
    push a well-conditioned matrix off the fast route. ``d`` is 1 for zero columns.
    """
    norms = jnp.sqrt(jnp.diagonal(G))
    zero = norms == 0
    d = jnp.where(zero, jnp.ones_like(norms), norms)
    return G / (d[:, None] * d[None, :]) + jnp.diag(zero.astype(G.dtype)), d, jnp.sum(zero)


def equilibrated_eigh(G: Array) -> tuple[Array, Array, Array, Array]:
    """``(lam, V, d, num_zero)``: ascending eigenpairs of :func:`equilibrate`'s matrix, and its extras."""
    Geq, d, num_zero = equilibrate(G)
    lam, V = jnp.linalg.eigh(Geq)
    return lam, V, d, num_zero


def _extreme_eigenvalues(G: Array, L: Array, iters: int = 30) -> tuple[Array, Array]:
    """``(λ_max, λ_min)`` of an SPD ``G = L Lᵀ`` by power and inverse iteration (Rayleigh quotients).

    Pure XLA (matrix-vector products and triangular solves on ``m``-vectors): no LAPACK call, which on
    a CPU costs ~20 ms after a large matrix product (thread hand-over), as much as a whole BLAS pass.
    """
    m = G.shape[0]
    x0 = 1.0 + jnp.arange(m, dtype=G.dtype) / m  # not orthogonal to any eigenvector in practice
    x0 = x0 / jnp.linalg.norm(x0)

    def power(x, _):
        y = G @ x
        return y / jnp.linalg.norm(y), None

    def inverse(x, _):
        y = jax.scipy.linalg.solve_triangular(L, x, lower=True)
        y = jax.scipy.linalg.solve_triangular(L, y, lower=True, trans=1)
        return y / jnp.linalg.norm(y), None

    top = lax.scan(power, x0, None, length=iters)[0]
    bottom = lax.scan(inverse, x0, None, length=iters)[0]
    return top @ (G @ top), bottom @ (G @ bottom)


def _lower_inverse_t(L: Array) -> Array:
    """``L⁻ᵀ`` of a lower-triangular ``(m, m)`` ``L`` by forward substitution, row by row (``O(m³)``).

    A ``lax.fori_loop`` of vector operations rather than ``solve_triangular`` on the identity: on a CPU
    the latter is a BLAS call that, right after a large matrix product, waits ~40 ms for its threads.
    """
    m = L.shape[0]
    eye = jnp.eye(m, dtype=L.dtype)

    def row(i, X):  # rows >= i of X are still zero, so L[i] @ X only sees rows < i
        return X.at[i].set((eye[i] - L[i] @ X) / L[i, i])

    return lax.fori_loop(0, m, row, jnp.zeros_like(L)).T


@functools.partial(jax.jit, static_argnames=("route", "row_norms"))
@highest_precision
def _basis(
    F: Array, rtol: Array, route: str | None = None, row_norms: bool = False
) -> tuple[Array, Array, Array]:
    """``(U, rank, route)``, or ``(‖U_i‖², rank, route)`` with ``row_norms``.

    Every route ends in a product ``U = A M`` (``A`` an ``(n, m)`` matrix, ``M`` small). For leverage only
    the row norms of ``U`` are needed: ``sum((A @ M)², axis=1)`` fuses into the product, so ``U`` is never
    written to memory (writing it costs as much as a whole BLAS pass).
    """
    # Fast routes: Cholesky of the equilibrated Gram matrix G_eq = L Lᵀ, and U = F D⁻¹ L⁻ᵀ. The route
    # comes from κ(G_eq) estimated by power/inverse iteration; a failed Cholesky means "stable".
    Geq, d, num_zero = equilibrate(_gram(F))
    m = Geq.shape[0]
    L = jnp.linalg.cholesky(Geq)
    chol_ok = jnp.all(jnp.isfinite(L))
    L = jnp.where(chol_ok, L, jnp.eye(m, dtype=L.dtype))
    lam_max, lam_min = _extreme_eigenvalues(Geq, L)
    ratio = jnp.where(chol_ok & (lam_min > 0), lam_min / lam_max, 0.0)
    branch = choose_route(ratio) if route is None else jnp.asarray(ROUTES.index(route))

    def finish(A, M):
        return jnp.sum(jnp.square(A @ M), axis=1) if row_norms else A @ M

    def refine(U1, rank):  # one CholeskyQR step: U1 spans the range; make it orthonormal to O(eps)
        G2, d2, _ = equilibrate(_gram(U1))  # columns dropped by the rank tolerance are exactly zero
        L2 = jnp.linalg.cholesky(G2)
        ok = jnp.all(jnp.isfinite(L2))  # U1 is near-orthonormal, so this holds but for a broken input
        M2 = jnp.where(
            ok,
            _lower_inverse_t(jnp.where(ok, L2, jnp.eye(m, dtype=L2.dtype))) / d2[:, None],
            jnp.eye(m, dtype=L2.dtype),
        )
        return finish(U1, M2), rank

    def one_pass(F):
        return finish(F, _lower_inverse_t(L) / d[:, None]), m - num_zero

    def two_pass(F):
        return refine(F @ (_lower_inverse_t(L) / d[:, None]), m - num_zero)

    def stable(F):
        if F.dtype == jnp.float64:
            # Householder Q: orthonormal to O(eps) whatever κ; matches an SVD to ~1e-10 up to κ ~ 1e9.
            Q, R = jnp.linalg.qr(F)  # R D⁻¹ is the R factor of F D⁻¹: same Q, same range
            W, s, _ = jnp.linalg.svd(R / d[None, :])
            keep = s > rtol * s[0]
            return finish(Q, W * keep[None, :]), jnp.sum(keep)
        # Lower precision: the input's own rounding already moves leverage by ~eps·κ, so the R factor
        # alone (forming Q costs ~15x more on a CPU) is as good: F D⁻¹ = Q (R D⁻¹) = Q W S Vᵀ gives the
        # basis F D⁻¹ V S⁻¹ = Q W over the kept singular values, orthonormal to ~eps·κ; one SVQB step
        # (as in route 2) then restores orthogonality to O(eps).
        R = jnp.linalg.qr(F, mode="r")
        _, s, Vt = jnp.linalg.svd(R / d[None, :])
        keep = s > rtol * s[0]
        inv_s = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
        return refine(F @ ((Vt.T * inv_s[None, :]) / d[:, None]), jnp.sum(keep))

    out, rank = lax.switch(branch, (one_pass, two_pass, stable), F)
    return out, rank.astype(jnp.int32), branch


def orthonormal_basis(
    F: Array, *, rtol: float | None = None, route: str | None = None
) -> tuple[Array, Array, Array]:
    r"""An orthonormal basis ``U`` of ``range(F)``, its rank, and the route taken.

    Args:
      F: ``(n, m)`` matrix (or ``(n, k, m)``, treated as ``n·k`` rows).
      rtol: relative tolerance on the singular values of the column-equilibrated ``F`` for the rank
        (default ``10·eps`` of the dtype).
      route: force ``"gram"``, ``"gram2"`` or ``"stable"``; default chooses from ``κ(FᵀF)``.

    Returns:
      ``(U, rank, route)``: ``U`` of shape ``(n·k, m)`` whose first ``rank`` columns span ``range(F)``
      (the others are zero, in some order), ``rank`` an int32 scalar, and ``route`` an index into
      :data:`ROUTES`.
    """
    rows, _ = _as_rows(F)
    if route is not None:
        check_choice("route", route, ROUTES)
    if rtol is None:
        rtol = _default_rtol(rows.dtype)
    return _basis(rows, jnp.asarray(rtol, rows.dtype), route=route)


def leverage(F: Array, *, rtol: float | None = None, ridge: float = 0.0) -> tuple[Array, Array]:
    r"""Raw leverage ``h_i`` (``Σ h_i = rank``) and the rank.

    With ``ridge = λ > 0``: ridge leverage ``h_i = [F (FᵀF + λI)^{-1} Fᵀ]_ii`` and, in place of the rank,
    the effective dimension ``Σ h_i``. For a block matrix ``(n, k, m)`` the block leverage
    ``h_i = Σ_j h_{(i, j)}`` is returned, shape ``(n,)``.
    """
    rows, lead = _as_rows(F)
    if ridge < 0:
        raise ValueError(f"ridge must be non-negative, got {ridge}.")
    if rtol is None:
        rtol = _default_rtol(rows.dtype)
    return _leverage_jit(rows, jnp.asarray(rtol, rows.dtype), jnp.asarray(ridge, rows.dtype), lead, ridge > 0)


@functools.partial(jax.jit, static_argnames=("lead", "use_ridge"))
@highest_precision
def _leverage_jit(rows, rtol, ridge, lead, use_ridge):
    if use_ridge:
        lam, V = jnp.linalg.eigh(_gram(rows))
        h = jnp.sum(jnp.square(rows @ V) / (jnp.maximum(lam, 0) + ridge)[None, :], axis=1)
        h = h.reshape(lead).sum(axis=tuple(range(1, len(lead))))
        return h, jnp.sum(h)
    h, rank, _ = _basis(rows, rtol, row_norms=True)
    return h.reshape(lead).sum(axis=tuple(range(1, len(lead)))), rank


def leverage_scores(F: Array, *, rtol: float | None = None, ridge: float = 0.0) -> Array:
    r"""Leverage-score sampling probabilities :math:`\tau_i = h_i / \mathrm{rank}(F)`.

    Args:
      F: the dual matrix ``(n, p+1)``, or a block dual matrix ``(n, k, p+1)`` (block leverage: the sum
        of each example's ``k`` row leverages).
      rtol: rank tolerance relative to the largest singular value of the column-equilibrated ``F``
        (default ``10·eps`` of the dtype).
      ridge: ``λ ≥ 0``; with ``λ > 0`` ridge leverage normalised by the effective dimension.

    Returns:
      ``(n,)`` probabilities (non-negative, summing to 1), dtype of ``F``.
    """
    h, rank = leverage(F, rtol=rtol, ridge=ridge)
    return h / rank.astype(h.dtype)


def norm_scores(F: Array) -> Array:
    r"""Row-norm probabilities :math:`\|F_i\|^2 / \|F\|_F^2`; block Frobenius norms for ``(n, k, m)``."""
    rows, lead = _as_rows(F)
    sq = jnp.sum(jnp.square(rows), axis=1).reshape(lead)
    sq = sq.sum(axis=tuple(range(1, len(lead))))
    total = jnp.sum(sq)
    if is_concrete(total) and not float(total) > 0:
        raise ValueError("norm_scores: F is all zeros, so row norms give no distribution.")
    return sq / total


def linear_design(xs: Array, ys: Array | None = None, *, bias: bool = False) -> Array:
    """The linear baseline's data matrix ``[X, 1?, −y?]`` of shape ``(n, d + bias + (ys given))``."""
    xs = jnp.asarray(xs)
    if xs.ndim < 2:
        raise ValueError(f"xs must have shape (n, d, ...), got {xs.shape}.")
    X = xs.reshape(xs.shape[0], -1)
    cols = [X]
    if bias:
        cols.append(jnp.ones((X.shape[0], 1), X.dtype))
    if ys is not None:
        ys = jnp.asarray(ys)
        if ys.shape != (X.shape[0],):
            raise ValueError(f"ys must have shape ({X.shape[0]},) to match xs, got {ys.shape}.")
        cols.append(-ys.astype(X.dtype)[:, None])
    return jnp.concatenate(cols, axis=1)


def linear_leverage_scores(xs, ys=None, *, bias: bool = False, rtol: float | None = None) -> Array:
    """Leverage scores of the data matrix itself, ``[X, 1?, −y?]``: the linear baseline."""
    return leverage_scores(linear_design(xs, ys, bias=bias), rtol=rtol)


def linear_norm_scores(xs, ys=None, *, bias: bool = False) -> Array:
    """Row-norm scores of the data matrix ``[X, 1?, −y?]``: the linear baseline."""
    return norm_scores(linear_design(xs, ys, bias=bias))


def uniform_scores(n: int, dtype=None) -> Array:
    """``(n,)`` vector of ``1/n``."""
    check_positive_int("n", n)
    dtype = dtype or jnp.result_type(float)
    return jnp.full((n,), 1.0 / n, dtype)


def mix_with_uniform(probs: Array, alpha: float) -> Array:
    r"""``(1 − α)·p + α/n``: keeps every point reachable (``p_i ≥ α/n``).

    Args:
      probs: ``(n,)`` probabilities.
      alpha: mixing weight in ``[0, 1]``.
    """
    check_probs(probs)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    probs = jnp.asarray(probs)
    return (1 - alpha) * probs + alpha / probs.shape[0]
