r"""Shifted-Cholesky preconditioning: exact leverage of ill-conditioned low-precision matrices in Gram passes.

In float32 the Gram matrix ``G = AᵀA`` of a matrix with ``κ(A) ≳ 3·10³`` has lost its smallest
eigenvalues to rounding (``eps·κ² > 1``), so a plain Cholesky of ``G`` either fails or gives a basis far
from orthonormal. Householder QR is backward stable but costs many Gram passes on a CPU. Instead
(shifted CholeskyQR, Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2020), the equilibrated
``G_eq = D⁻¹GD⁻¹`` (unit diagonal) is factored with a small shift, ``G_eq + s·I = L₀L₀ᵀ`` with
``s = SHIFT·eps·m``, which always succeeds and damps the directions rounding has spoiled. The matrix
``Y = A D⁻¹ L₀⁻ᵀ`` then has ``κ(Y) ≈ √(s/λ_min)`` (``λ_min`` the smallest eigenvalue of ``G_eq``),
a few units to a few thousand, so the float32 Gram matrix of ``Y`` (one more pass) is accurate, and
one CholeskyQR step ``U = Y D_Y⁻¹ L₁⁻ᵀ`` (two when ``κ(YᵀY)`` exceeds ``eps^{-1/4}``) is an orthonormal
basis of ``range(A)`` to ``O(eps)``. What remains is the rounding of the product ``A D⁻¹ L₀⁻ᵀ`` itself,
``~eps·κ(A)`` per row: the error the rounding of the input already causes, as with Householder QR.

The route only applies to matrices of full numerical rank. With ``T`` the accumulated transform
(``U = A T``), ``A D⁻¹ = U (D T)⁻¹``, so the singular values of ``A D⁻¹`` are the reciprocals of those of
``D T``; :func:`inverse_sigma_min_sq` estimates them by power iteration on ``m``-vectors (no LAPACK
call, no pass over ``A``), and a matrix whose ``σ_min/σ_max`` falls below the rank tolerance (or whose
Gram matrix of ``Y`` is still too ill-conditioned) is left to the rank-revealing stable route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nlis_jax._types import Array

#: Shift of the equilibrated Gram matrix, in units of ``eps·m`` (``m`` its size, an upper bound of its
#: norm): above the rounding of the Cholesky factorisation, small enough to keep ``κ(Y)`` near 1.
SHIFT = 0.1

#: Above this size, triangular inverses go to LAPACK (``O(m³)`` flops in one call) rather than a loop
#: of ``m`` vector-matrix products, which is memory-bound and slower for large ``m``.
SUBSTITUTION_MAX = 256


class Preconditioned(NamedTuple):
    """``U = (A first) second``: an orthonormal basis of ``range(A)`` when ``ok``."""

    first: Array  # (m, m): Y = A first, κ(Y) small
    second: Array  # (m, m): the CholeskyQR step(s) on Y
    ok: Array  # bool: the route applies (full numerical rank, Y well enough conditioned)
    ratio: Array  # estimated σ_min/σ_max of the column-equilibrated A (0 when not ok)


def unit_equilibrate(G: Array) -> tuple[Array, Array]:
    """``(D⁻¹ G D⁻¹ + E, d)`` with ``d`` the column norms (1, and ``E_jj = 1``, for zero columns)."""
    norms = jnp.sqrt(jnp.diagonal(G))
    zero = norms == 0
    d = jnp.where(zero, jnp.ones_like(norms), norms)
    return G / (d[:, None] * d[None, :]) + jnp.diag(zero.astype(G.dtype)), d


def lower_inverse_t(L: Array) -> Array:
    """``L⁻ᵀ`` of a lower-triangular ``L``: substitution up to :data:`SUBSTITUTION_MAX`, else LAPACK.

    The substitution is a ``lax.fori_loop`` of vector operations: for small ``m`` it avoids a LAPACK call,
    which on a CPU waits for its threads right after a large matrix product; for large ``m`` its ``m``
    sequential vector-matrix products are slower than one triangular solve.
    """
    m = L.shape[0]
    eye = jnp.eye(m, dtype=L.dtype)
    if m > SUBSTITUTION_MAX:
        return jax.scipy.linalg.solve_triangular(L, eye, lower=True).T

    def row(i, X):  # rows >= i of X are still zero, so L[i] @ X only sees rows < i
        return X.at[i].set((eye[i] - L[i] @ X) / L[i, i])

    return lax.fori_loop(0, m, row, jnp.zeros_like(L)).T


def _power(apply: Callable[[Array], Array], m: int, dtype, iters: int) -> Array:
    """Largest eigenvalue of the SPD operator ``apply`` by power iteration (Rayleigh quotient)."""
    x0 = 1.0 + jnp.arange(m, dtype=dtype) / m  # not orthogonal to any eigenvector in practice
    x0 = x0 / jnp.linalg.norm(x0)

    def step(x, _):
        y = apply(x)
        return y / jnp.linalg.norm(y), None

    x = lax.scan(step, x0, None, length=iters)[0]
    return x @ apply(x)


def spd_ratio(G: Array, L: Array, iters: int = 30) -> Array:
    """``λ_min/λ_max`` of an SPD ``G = L Lᵀ`` (power iteration on ``G`` and on ``G⁻¹``); 0 if ``L`` failed."""
    ok = jnp.all(jnp.isfinite(L))
    L = jnp.where(ok, L, jnp.eye(G.shape[0], dtype=G.dtype))

    def inverse(x):
        y = jax.scipy.linalg.solve_triangular(L, x, lower=True)
        return jax.scipy.linalg.solve_triangular(L, y, lower=True, trans=1)

    lam_max = _power(lambda x: G @ x, G.shape[0], G.dtype, iters)
    inv_min = _power(inverse, G.shape[0], G.dtype, iters)
    return jnp.where(ok & (lam_max > 0) & (inv_min > 0), 1 / (inv_min * lam_max), 0.0)


def inverse_sigma_min_sq(T: Array, d: Array, iters: int = 30) -> Array:
    """``1/σ_min(A D⁻¹)²`` given an orthonormalising transform ``U = A T``: ``σ_max(D T)²``.

    ``A D⁻¹ = U (D T)⁻¹`` with ``U`` orthonormal, so ``σ(A D⁻¹) = 1/σ(D T)``: power iteration on
    ``(DT)ᵀ(DT)`` (matrix-vector products only).
    """
    DT = T * d[:, None]
    return _power(lambda x: DT.T @ (DT @ x), T.shape[0], T.dtype, iters)


def shifted_transform(
    G: Array, gram_pass: Callable[[Array], Array], rtol: Array, iters: int = 30
) -> Preconditioned:
    """Shifted CholeskyQR on a row matrix ``A`` seen through its Gram matrix ``G = AᵀA`` and Gram passes.

    ``gram_pass(M)`` must return ``(A M)ᵀ(A M)``: taken once, or twice when ``YᵀY`` itself is moderately
    ill-conditioned. ``ok`` is false (use a rank-revealing route instead) when ``A`` is numerically
    rank-deficient for ``rtol`` or ``Y`` could not be made orthonormal.
    """
    Geq, d = unit_equilibrate(G)
    m = Geq.shape[0]
    eye = jnp.eye(m, dtype=G.dtype)
    shift = SHIFT * jnp.finfo(G.dtype).eps * m
    L0 = jnp.linalg.cholesky(Geq + shift * eye)
    ok0 = jnp.all(jnp.isfinite(L0))
    first = lower_inverse_t(jnp.where(ok0, L0, eye)) / d[:, None]
    Gy, dy = unit_equilibrate(gram_pass(first))
    L1 = jnp.linalg.cholesky(Gy)
    ratio_y = spd_ratio(Gy, L1, iters)
    eps = jnp.finfo(G.dtype).eps
    M1 = lower_inverse_t(jnp.where(jnp.isfinite(L1), L1, eye)) / dy[:, None]

    def two_steps():
        G2, d2 = unit_equilibrate(gram_pass(first @ M1))
        L2 = jnp.linalg.cholesky(G2)
        good = jnp.all(jnp.isfinite(L2))
        return M1 @ (lower_inverse_t(jnp.where(good, L2, eye)) / d2[:, None]), good

    second, ok2 = lax.cond(ratio_y >= eps**0.25, lambda: (M1, jnp.asarray(True)), two_steps)
    # σ(A D⁻¹) = 1/σ(D T) with T = first @ second: σ_max² from the Gram matrix, σ_min² from D T.
    lam_max = _power(lambda x: Geq @ x, m, G.dtype, iters)
    inv_min = inverse_sigma_min_sq(first @ second, d, iters)
    ratio = jnp.sqrt(1 / jnp.maximum(lam_max * inv_min, 1))
    ok = ok0 & (ratio_y >= 1000 * eps) & ok2 & (ratio > 2 * rtol)
    return Preconditioned(first, second, ok, jnp.where(ok, ratio, 0.0))
