r"""Shifted-Cholesky preconditioning: exact leverage of ill-conditioned low-precision matrices in Gram passes.

In float32 the Gram matrix ``G = AᵀA`` of a matrix with ``κ(A) ≳ 3·10³`` has lost its smallest
eigenvalues to rounding (``eps·κ² > 1``), so a plain Cholesky of ``G`` either fails or gives a basis far
from orthonormal. Householder QR is backward stable but costs many Gram passes on a CPU. Instead
(shifted CholeskyQR, Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2020), the equilibrated
``G_eq = D⁻¹GD⁻¹`` (unit diagonal) is factored with a small shift, ``G_eq + s·I = L₀L₀ᵀ`` with
``s = SHIFT·eps·m``, which always succeeds and damps the directions rounding has spoiled. The matrix
``Y = A D⁻¹ L₀⁻ᵀ`` then has ``κ(Y) ≈ √(s/λ_min)`` (``λ_min`` the smallest eigenvalue of ``G_eq``),
a few units to a few thousand, so the float32 Gram matrix of ``Y`` (one more pass) is accurate, and
one CholeskyQR step ``U = Y D_Y⁻¹ L₁⁻ᵀ`` (two when ``κ(YᵀY)`` is past :func:`one_step_ratio_min`) is an
orthonormal basis of ``range(A)`` to ``O(eps)``. What remains is the rounding of the product
``A D⁻¹ L₀⁻ᵀ`` itself, ``~eps·κ(A)`` per row: the error the rounding of the input already causes, as
with Householder QR.

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

#: Tenfold increases of the shift tried when the shifted Cholesky factorisation still fails.
SHIFT_TRIES = 6

#: Smallest ``1/κ(YᵀY)``, in units of ``eps``, accepted: two CholeskyQR steps (CholeskyQR2) make ``Y``
#: orthonormal while ``κ(Y) < eps^{-1/2}``; 16 keeps ``κ(Y)`` under ``eps^{-1/2}/4``.
Y_RATIO_MIN = 16.0

#: Power iterations of the checks of the shifted route (conditioning of ``YᵀY``, ``σ_min/σ_max``): they
#: only compare against thresholds orders of magnitude apart (or with a factor-2 margin), so fewer suffice.
CHECK_ITERS = 15

#: Below float64, the largest first-order orthogonality error ``eps·κ(G_eq)`` accepted from one CholeskyQR
#: step (route ``"gram"``, and the step on ``Y`` here): ``κ(G_eq) ≤ 840`` in float32. Measured leverage
#: error ``≈ 0.07·eps·κ(G_eq)``: at ``κ(G_eq) = 841``, at most 7.0e-6 relative, total variation 4.9e-7,
#: for 20,000 × 65 to 1,378 float32 matrices against the float64 leverage of the same matrices
#: (benchmarks/README.md (g), "Sixteenth session"), far inside float32's targets (TV ≤ 1e-4, β ≥ 0.999).
#: The Gram matrix's own float32 rounding grows with ``n``: at ``n = 10^7`` rows of lognormal scales
#: (σ = 3) the error was ``≈ 1·eps·κ(G_eq)`` (1.0e-4 relative, TV 1.0e-5 at ``κ(G_eq) = 580``; audit of
#: the thirty-sixth session), still inside the targets but without their margin; force ``"gram2"`` for
#: tighter float32 leverage at such sizes (1.1e-6 there), or score in float64.
ONE_STEP_ERROR_LOW = 1e-4


def one_step_ratio_min(dtype) -> float:
    """Smallest ``1/κ(G_eq) = λ_min/λ_max`` for which one CholeskyQR step is trusted in ``dtype``.

    Its orthogonality error is ``~eps·κ(G_eq)``. float64: ``κ(G_eq) ≤ eps^{-1/4}`` (error ``≤ eps^{3/4}``,
    2e-12, for leverage to 1e-10); below float64: ``eps·κ(G_eq) ≤`` :data:`ONE_STEP_ERROR_LOW` (float32:
    ``κ ≤ 840``; before, ``eps^{-1/4}`` = 54), or ``eps^{-1/4}`` where that admits more (half precision).
    """
    eps = float(jnp.finfo(dtype).eps)
    if jnp.dtype(dtype) == jnp.float64:
        return eps**0.25
    return min(eps**0.25, eps / ONE_STEP_ERROR_LOW)


#: Rows of the sparse sketch (:func:`count_sketch`) per column, for the sketched shifted route.
SKETCH_ROWS = 2

#: Above this size, triangular inverses go to LAPACK (``O(m³)`` flops in one call) rather than a loop
#: of ``m`` vector-matrix products, which is memory-bound and slower for large ``m``.
SUBSTITUTION_MAX = 256


class Preconditioned(NamedTuple):
    """``U = (A first) second``: an orthonormal basis of ``range(A)`` when ``ok``."""

    first: Array  # (m, m): Y = A first, κ(Y) small
    second: Array  # (m, m): the CholeskyQR step(s) on Y
    ok: Array  # bool: the route applies (full numerical rank, Y well enough conditioned)
    ratio: Array  # estimated σ_min/σ_max of the column-equilibrated A (0 when not ok)


def norms_in_range(diag: Array, n: int) -> Array:
    """``(m,)``: squared column norms ``diag`` (of ``n`` rows) with which an unscaled Gram matrix is as good
    as a prescaled one: finite, at most ``eps·max`` (no overflow downstream) and at least ``n·tiny/eps``
    (products under ``tiny`` lose bits, or are flushed to zero: at most ``n·tiny`` per entry, under
    ``eps`` relative to norms that large)."""
    info = jnp.finfo(diag.dtype)
    low = n * float(info.tiny) / float(info.eps)
    return jnp.isfinite(diag) & (diag >= low) & (diag <= float(info.max) * float(info.eps))


def equilibrate(G: Array) -> tuple[Array, Array, Array]:
    """Column-equilibrate a Gram matrix: ``(D⁻¹ G D⁻¹ + E, d, num_zero)``, ``D`` = column norms.

    ``range(A)`` is unchanged by scaling columns, so rank and route are decided on ``A D⁻¹``: columns of
    a dual matrix differ in scale by orders of magnitude between layers, and unscaled their smallest
    singular values sink under the rank tolerance. Exactly-zero columns get a unit diagonal ``E``: they
    then add an isolated eigenvalue 1 whose basis column ``A e_j`` is zero, so they neither count in the
    rank nor push a well-conditioned matrix off the fast route. ``d`` is 1 for zero columns.
    """
    diag = jnp.diagonal(G)
    zero = diag == 0
    d = jnp.sqrt(jnp.where(zero, jnp.ones_like(diag), diag))  # not sqrt(0): its derivative is infinite
    return G / (d[:, None] * d[None, :]) + jnp.diag(zero.astype(G.dtype)), d, jnp.sum(zero)


def lower_inverse_t(L: Array) -> Array:
    """``L⁻ᵀ`` of a lower-triangular ``L``: substitution up to :data:`SUBSTITUTION_MAX` rows, else LAPACK.

    The substitution is a ``lax.fori_loop`` of vector operations: for small ``m`` it avoids a LAPACK
    call, which on a CPU waits for its threads right after a large matrix product; for large ``m`` its
    ``m`` sequential vector-matrix products cost more than one triangular solve.
    """
    m = L.shape[0]
    eye = jnp.eye(m, dtype=L.dtype)
    if m > SUBSTITUTION_MAX:
        return jax.scipy.linalg.solve_triangular(L, eye, lower=True).T

    def row(i, X):  # rows >= i of X are still zero, so L[i] @ X only sees rows < i
        return X.at[i].set((eye[i] - L[i] @ X) / L[i, i])

    return lax.fori_loop(0, m, row, jnp.zeros_like(L)).T


def top_eigenvector(apply: Callable[[Array], Array], m: int, dtype, iters: int = 30) -> Array:
    """Unit top eigenvector of the SPD operator ``apply`` on ``m``-vectors, by power iteration."""
    x0 = 1.0 + jnp.arange(m, dtype=dtype) / m  # not orthogonal to any eigenvector in practice
    x0 = x0 / jnp.linalg.norm(x0)

    def step(x, _):
        y = apply(x)
        return y / jnp.linalg.norm(y), None

    return lax.scan(step, x0, None, length=iters)[0]


def largest_eigenvalue(apply: Callable[[Array], Array], m: int, dtype, iters: int = 30) -> Array:
    """Largest eigenvalue of the SPD operator ``apply`` (Rayleigh quotient after power iteration)."""
    x = top_eigenvector(apply, m, dtype, iters)
    return x @ apply(x)


@jax.custom_jvp
def cholesky(G: Array) -> Array:
    """``jnp.linalg.cholesky``, whose derivative is zero (not NaN) where the factorisation fails.

    The routes factor the Gram matrix before they know the route; on singular input the factor is NaN and
    unused (route ``"stable"``), but jax's derivative of the failed factor put NaN into every gradient
    of the leverage scores (``0 · NaN``), even the stable route's. The tangent here is jax's formula
    ``dL = L·Φ(L⁻¹ dG L⁻ᵀ)`` on the factor replaced by the identity where it failed, then zeroed there."""
    return jnp.linalg.cholesky(G)


@cholesky.defjvp
def _cholesky_jvp(primals, tangents):
    (G,), (dG,) = primals, tangents
    L = jnp.linalg.cholesky(G)
    ok = jnp.all(jnp.isfinite(L))
    safe = jnp.where(ok, L, jnp.eye(G.shape[0], dtype=G.dtype))
    left = jax.scipy.linalg.solve_triangular(safe, dG, lower=True)  # L⁻¹ dG
    X = jax.scipy.linalg.solve_triangular(safe, left.T, lower=True).T  # L⁻¹ dG L⁻ᵀ (symmetric)
    phi = jnp.tril(X) - 0.5 * jnp.diag(jnp.diag(X))
    return L, jnp.where(ok, safe @ phi, 0)


def inverse_and_ratio(G: Array, iters: int = 30) -> tuple[Array, Array]:
    """``(L⁻ᵀ, λ_min/λ_max)`` of an SPD ``G = L Lᵀ``; identity and ratio 0 if the Cholesky failed.

    ``L⁻ᵀ`` by :func:`lower_inverse_t`, the ratio by :func:`ratio_from_inverse`. Nothing but the failed
    factorisation runs when the Cholesky fails.
    """
    m = G.shape[0]
    eye = jnp.eye(m, dtype=G.dtype)
    L = cholesky(G)
    ok = jnp.all(jnp.isfinite(L))

    def factored(L):
        inv_t = lower_inverse_t(L)
        return inv_t, ratio_from_inverse(G, inv_t, iters)

    return lax.cond(ok, factored, lambda L: (eye, jnp.zeros((), G.dtype)), jnp.where(ok, L, eye))


def ratio_from_inverse(G: Array, inv_t: Array, iters: int = 30) -> Array:
    """``λ_min(L Lᵀ)/λ_max(G)`` given ``inv_t = L⁻ᵀ`` (``L Lᵀ = G``, or ``G`` plus a shift).

    ``λ_max`` by power iteration on ``G`` and ``λ_min`` by power iteration on ``(L Lᵀ)⁻¹ = L⁻ᵀL⁻¹``
    (Rayleigh quotient of ``G`` at the result): matrix-vector products only, no triangular solve per
    iteration (each would be a library call, slow on a CPU right after a large product).
    """
    m = G.shape[0]
    bottom = top_eigenvector(lambda x: inv_t @ (x @ inv_t), m, G.dtype, iters)
    lam_max, lam_min = largest_eigenvalue(lambda x: G @ x, m, G.dtype, iters), bottom @ (G @ bottom)
    return jnp.where(lam_min > 0, lam_min / lam_max, 0.0).astype(G.dtype)


def cholesky_decision_xla(Geq: Array) -> tuple[Array, Array]:
    """``(L⁻ᵀ, λ_min/λ_max)`` of an SPD ``G_eq = L Lᵀ`` in pure XLA (for CPUs); identity and 0 if it failed.

    :func:`inverse_and_ratio`: on a CPU (for ``m`` up to :data:`SUBSTITUTION_MAX`) no LAPACK call,
    which waits for its threads right after a large matrix product.
    """
    return inverse_and_ratio(Geq)


def cholesky_decision_solver(Geq: Array) -> tuple[Array, Array]:
    """The same as :func:`cholesky_decision_xla` with the platform's solvers (for GPUs and TPUs).

    ``eigvalsh`` for the ratio and a triangular solve for ``L⁻ᵀ``: a handful of library kernels instead
    of the hundreds of tiny sequential ones of the iterations, which dominate on an accelerator.
    """
    m = Geq.shape[0]
    eye = jnp.eye(m, dtype=Geq.dtype)
    L = cholesky(Geq)
    ok = jnp.all(jnp.isfinite(L))
    L = jnp.where(ok, L, eye)
    lam = jnp.linalg.eigvalsh(Geq)
    ratio = jnp.where(ok & (lam[0] > 0), lam[0] / lam[-1], 0.0)
    return jax.scipy.linalg.solve_triangular(L, eye, lower=True).T, ratio


def inverse_sigma_min_sq(first: Array, second: Array, d: Array, iters: int = 30) -> Array:
    """``1/σ_min(A D⁻¹)²`` given an orthonormalising transform ``U = A T``, ``T = first·second``:
    ``σ_max(D T)²``.

    ``A D⁻¹ = U (D T)⁻¹`` with ``U`` orthonormal, so ``σ(A D⁻¹) = 1/σ(D T)``: power iteration on
    ``(DT)ᵀ(DT)``, applied factor by factor (matrix-vector products only; ``T`` is never formed).
    """

    def apply(x):
        y = d * (first @ (second @ x))
        return (d * y) @ first @ second

    return largest_eigenvalue(apply, first.shape[0], first.dtype, iters)


def shifted_cholesky(Geq: Array) -> tuple[Array, Array]:
    """``(L₀, ok)`` with ``G_eq + s·I = L₀L₀ᵀ`` for an equilibrated ``G_eq`` (unit diagonal).

    ``s = SHIFT·eps·m``, raised tenfold (at most :data:`SHIFT_TRIES` times, small ``m × m`` work only)
    while the factorisation fails: how much the rounding of the Gram product moved ``G_eq`` depends on
    ``n`` and on the data. ``ok`` is false if every try failed (``L₀`` is then the identity).

    ``L₀`` only preconditions: the basis is orthonormalised after it, and ``range(A D⁻¹L₀⁻ᵀ) = range(A)``
    for any fixed ``L₀``, so it is held constant under differentiation (``stop_gradient``: exact for the
    scores' derivative, and jax cannot reverse-differentiate the retry loop).
    """
    Geq = lax.stop_gradient(Geq)
    m = Geq.shape[0]
    eye = jnp.eye(m, dtype=Geq.dtype)
    shift0 = SHIFT * jnp.finfo(Geq.dtype).eps * m

    def attempt(k):
        return jnp.linalg.cholesky(Geq + shift0 * jnp.asarray(10.0, Geq.dtype) ** k * eye)

    def failed(state):
        k, L = state
        return (k < SHIFT_TRIES) & ~jnp.all(jnp.isfinite(L))

    _, L0 = lax.while_loop(failed, lambda state: (state[0] + 1, attempt(state[0] + 1)), (0, attempt(0)))
    ok = jnp.all(jnp.isfinite(L0))
    return jnp.where(ok, L0, eye), ok


def shifted_first(G: Array) -> tuple[Array, Array]:
    """``(first, ok)``: the shifted-Cholesky transform ``D⁻¹L₀⁻ᵀ`` (:func:`shifted_cholesky` of ``G_eq``)."""
    Geq, d, _ = equilibrate(G)
    L0, ok = shifted_cholesky(Geq)
    return lower_inverse_t(L0) / d[:, None], ok


def shifted_transform(
    G: Array, Gy: Array, first: Array, gram_pass_y: Callable[[Array], Array], rtol: Array
) -> Preconditioned:
    """The CholeskyQR step(s) on ``Y = A first`` (:func:`shifted_first`), given ``Gy = YᵀY`` and ``G = AᵀA``.

    See :func:`cholesky_steps`, with ``G_eq`` (for ``σ_max``) and ``D`` from the equilibration of ``G``.
    """
    Geq, d, _ = equilibrate(G)
    return cholesky_steps(Gy, first, d, gram_pass_y, lambda x: Geq @ x, rtol)


def cholesky_steps(
    Gy: Array,
    first: Array,
    d: Array,
    gram_pass_y: Callable[[Array], Array],
    apply_geq: Callable[[Array], Array],
    rtol: Array,
) -> Preconditioned:
    """The CholeskyQR step(s) on ``Y = A first``, given ``Gy = YᵀY``, ``first = D⁻¹·(upper triangular)``.

    ``gram_pass_y(M)`` must return ``(Y M)ᵀ(Y M)``; it is taken only when ``YᵀY`` is itself moderately
    ill-conditioned (a second CholeskyQR step). ``apply_geq(x)`` is ``G_eq x`` for the equilibrated Gram
    matrix ``G_eq = D⁻¹AᵀAD⁻¹`` (its largest eigenvalue is ``σ_max(A D⁻¹)²``). ``ok`` is false (use a
    rank-revealing route instead) when ``A`` is numerically rank-deficient for ``rtol`` or ``Y`` could not
    be made orthonormal.
    """
    start = cholesky_start(Gy)
    G2 = lax.cond(start.needs_pass, gram_pass_y, jnp.zeros_like, start.M1)
    return cholesky_finish(start, G2, first, d, apply_geq, rtol)


class CholeskyStart(NamedTuple):
    """The first CholeskyQR step on ``Y`` (:func:`cholesky_start`)."""

    M1: Array  # (m, m): Y M1 is orthonormal to about eps·κ(Y)²
    ratio_y: Array  # its conditioning estimate (λ_min/λ_max of the equilibrated YᵀY)
    needs_pass: Array  # bool: a second step, with one more pass (Y M1)ᵀ(Y M1), is needed


def cholesky_start(Gy: Array) -> CholeskyStart:
    """:func:`cholesky_steps` up to its optional pass: ``M1`` from ``Gy = YᵀY``, and whether ``Y M1`` needs
    a second step (``YᵀY`` itself moderately ill-conditioned)."""
    Gy_eq, dy, _ = equilibrate(Gy)
    inv1, ratio_y = inverse_and_ratio(Gy_eq, CHECK_ITERS)
    return CholeskyStart(inv1 / dy[:, None], ratio_y, ~(ratio_y >= one_step_ratio_min(Gy.dtype)))


def cholesky_finish(
    start: CholeskyStart, G2: Array, first: Array, d: Array, apply_geq: Callable[[Array], Array], rtol: Array
) -> Preconditioned:
    """:func:`cholesky_steps` after its optional pass: ``G2 = (Y M1)ᵀ(Y M1)`` (used only when
    ``start.needs_pass``) and the rank check."""
    m, dtype = G2.shape[0], G2.dtype
    eps = jnp.finfo(dtype).eps
    eye = jnp.eye(m, dtype=dtype)
    M1 = start.M1

    def two_steps():
        G2_eq, d2, _ = equilibrate(G2)
        L2 = jnp.linalg.cholesky(G2_eq)
        good = jnp.all(jnp.isfinite(L2))
        return M1 @ (lower_inverse_t(jnp.where(good, L2, eye)) / d2[:, None]), good

    second, ok2 = lax.cond(start.needs_pass, two_steps, lambda: (M1, jnp.asarray(True)))
    # σ(A D⁻¹): σ_max² = λ_max(G_eq), σ_min² from the transform (see inverse_sigma_min_sq).
    lam_max = largest_eigenvalue(apply_geq, m, dtype, CHECK_ITERS)
    ratio = jnp.sqrt(1 / jnp.maximum(lam_max * inverse_sigma_min_sq(first, second, d, CHECK_ITERS), 1))
    ok = (start.ratio_y >= Y_RATIO_MIN * eps) & ok2 & (ratio > 2 * rtol)
    return Preconditioned(first, second, ok, jnp.where(ok, ratio, 0.0))


def count_sketch(A: Array, s: int) -> Array:
    """``S A`` (``s × m``) for a sparse sign embedding ``S`` (CountSketch, Clarkson & Woodruff 2013).

    Row ``i`` of ``A`` is added, with sign ``±1``, to row ``i mod s`` of the sketch: one read of ``A``, as
    a sum of its ``s``-row blocks (a loop of fused block additions; a scatter to hashed buckets,
    ``segment_sum``, took 6× longer on a CPU: 62–65 against 11 ms for 20,000 × 1,378 float32). The signs
    come from a fixed integer hash of the row index, not a PRNG key: the sketch only preconditions (the
    leverage is then computed from ``A`` itself and checked), so the result does not depend on it beyond
    rounding, and the same input always gives the same output. Input whose rows repeat with period ``s``
    (tiled copies of one design) is still embedded (a row's copies add up with a sum of independent
    signs); should a sketch lose a direction, the checks send the input to the Gram path.
    """
    n, m = A.shape
    h = jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1)
    h = (h ^ (h >> 15)) * jnp.uint32(0x85EBCA77)
    h = h ^ (h >> 13)
    sign = jnp.where((h >> 7) & 1 == 1, 1.0, -1.0).astype(A.dtype)[:, None]
    blocks, rest = divmod(n, s)

    def add_block(j, acc):  # the signs applied per block: the signed A is never written
        return acc + lax.dynamic_slice_in_dim(A, j * s, s) * lax.dynamic_slice_in_dim(sign, j * s, s)

    acc = jnp.zeros((s, m), A.dtype)
    if blocks:
        acc = lax.fori_loop(0, blocks, add_block, acc)
    if rest:
        acc = acc.at[:rest].add(A[blocks * s :] * sign[blocks * s :])
    return acc
