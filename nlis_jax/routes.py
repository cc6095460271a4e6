r"""The one implementation of the leverage routes: equilibration, rank tolerance, route choice, bases.

Leverage of row ``i`` of an ``(n, m)`` row matrix ``A`` of rank ``r`` is ``h_i = ‖U_i‖²``, ``U`` an
orthonormal basis of ``range(A)``. Every route writes ``U = A M`` with a small ``(m, m)`` transform ``M``,
decided on the ``m × m`` Gram matrix ``G = AᵀA`` only, so the same code serves a dense ``A`` (one Gram
product), a streamed ``A`` (the Gram matrix accumulated chunk by chunk) and a sketched or projected ``A``.

Decisions are made on the column-equilibrated ``G_eq = D⁻¹GD⁻¹ = L Lᵀ`` (``D`` the column norms, read off
the diagonal of ``G``; see :func:`equilibrate`), with ``κ(G_eq)`` estimated by power iteration on ``G_eq``
and on ``G_eq⁻¹ = L⁻ᵀL⁻¹`` (a failed Cholesky counts as singular):

0. ``"gram"`` (``κ(G_eq) ≤ eps^{-1/4}`` in float64, ``≤ 840`` in float32: :func:`one_step_ratio_min`):
   ``M = D⁻¹ L⁻ᵀ``; orthogonality error ``~ eps·κ(G_eq)``.
1. ``"gram2"`` (``κ(G_eq) ≤ 1/(1000·eps)``): one more CholeskyQR step on ``U₁ = A D⁻¹ L⁻ᵀ``
   (CholeskyQR2, Fukaya et al. 2014), which restores orthogonality to ``O(eps)`` whenever
   ``eps·κ(A)² < 1``: ``M = M₁ M₂`` with ``M₂`` from the Gram matrix of ``U₁`` (:func:`refine_transform`).
2. ``"stable"`` (otherwise: ill-conditioned or rank-deficient): an R factor of ``A`` (Householder QR, or
   a streaming TSQR), ``R D⁻¹ = W S Vᵀ`` and ``M = D⁻¹ V S⁻¹`` over the singular values above
   ``rtol · σ_max`` (rank = their number), see :func:`stable_transform`. In float64 the default
   for everything past route 1.
3. ``"shifted"`` (below float64, the default past route 1): shifted CholeskyQR
   (:mod:`nlis_jax._precondition`): ``G_eq + s·I = L₀L₀ᵀ`` with a tiny shift, ``Y = A D⁻¹ L₀⁻ᵀ``
   (``κ(Y)`` small), then one or two CholeskyQR steps on ``Y`` from its Gram matrix: Gram passes only,
   as accurate as route 2 on a matrix of full numerical rank. When the transform shows ``σ_min/σ_max``
   under ``2·rtol``, or ``Y`` could not be made orthonormal, route 2 is taken instead (and reported).
   For a row matrix held whole with at least :data:`SKETCH_MIN` columns, ``L₀`` comes from the Gram
   matrix of a sparse sketch of ``A`` instead of ``AᵀA`` (:func:`sketched_basis`: one product of
   ``A``'s size fewer).

Entry points: :func:`basis` / :func:`row_leverage` for a row matrix held whole (dense scores, the
sketched ``Y = F̃V``, a projected ``F̃Ω``); :func:`transform_from_passes` and :func:`apply_transform` for a
row matrix seen only through passes over chunks of rows (streaming), from the accumulated Gram matrix.

The fast routes call no LAPACK routine after the Gram product for small ``m``: the Cholesky factor, the
``κ`` estimate and ``L⁻ᵀ`` are pure XLA (see benchmarks/README.md for the measurements behind this choice).
Exactly-zero columns (dead ReLU units, a zero offset column) are set aside by the equilibration: they
count neither in the rank nor against the conditioning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nlis_jax import _traced as traced
from nlis_jax._checks import (
    check_choice,
    check_finite,
    check_floating,
    check_native,
    check_tolerances,
    is_concrete,
)
from nlis_jax._host_gram import float64_gram_transform, host_row_norms, on_host_cpu
from nlis_jax._precision import at_least_float32, highest_precision, times_power_of_two
from nlis_jax._precondition import (
    SKETCH_ROWS,
    CholeskyStart,
    cholesky_decision_solver,
    cholesky_decision_xla,
    cholesky_finish,
    cholesky_start,
    cholesky_steps,
    count_sketch,
    equilibrate,
    lower_inverse_t,
    norms_in_range,
    one_step_ratio_min,
    shifted_cholesky,
    shifted_first,
    shifted_transform,
)
from nlis_jax._types import Array

#: Names of the routes; a ``route`` output is an int32 index into this tuple.
ROUTES = ("gram", "gram2", "stable", "shifted")
GRAM, STABLE, SHIFTED = ROUTES.index("gram"), ROUTES.index("stable"), ROUTES.index("shifted")
#: The fast routes: their rank counts every non-zero column (no rank decision of their own).
FAST_ROUTES = ROUTES[:STABLE]


class GramDecision(NamedTuple):
    """What the Gram matrix decides: the route, the first transform, the rank of the fast routes, ``D``."""

    route: Array  # int32 index into ROUTES
    transform: Array  # (m, m): U₁ = A @ transform (orthonormal to ~eps·κ on the fast routes)
    rank: Array  # m minus the exactly-zero columns (the rank on the fast routes); -1 for a fast route
    #              forced on input rank-deficient for rtol (nlis_jax._scores.check_rank raises)
    scale: Array  # (m,) column norms D (1 for zero columns)


def default_rtol(dtype) -> float:
    """Rank tolerance relative to ``σ_max`` of the equilibrated matrix: ``10·eps`` of ``dtype``.

    Independent of ``n``: the trailing singular values of exactly rank-deficient inputs come out at
    a few ``eps·σ_max``, so ``10·eps`` separates them, while ``max(n, m)·eps`` (numpy's default) grows
    with ``n`` and, in float32, drops genuine directions of ill-conditioned dual matrices.
    """
    return 10.0 * float(jnp.finfo(dtype).eps)


def check_route(route: str | None) -> None:
    """Raise ``ValueError`` unless ``route`` is ``None`` or a name in :data:`ROUTES`."""
    if route is not None:
        check_choice("route", route, ROUTES)


def as_rows(F: Array, name: str = "F", check_values: bool = True) -> tuple[Array, tuple[int, ...]]:
    """Accept ``(n, m)`` or block ``(n, k, m)``; return the ``(n·k, m)`` row matrix and the leading shape.

    ``check_values=False`` skips the NaN/Inf check (a pass over ``F``): for callers that check the
    result instead (:func:`raise_if_nonfinite`), since every route puts NaN in its output for such input.
    """
    given = F
    check_native(name, F)
    with np.errstate(over="ignore"):  # a narrowing cast's overflow is reported below, by name
        F = jnp.asarray(F)
    if F.ndim not in (2, 3):
        raise ValueError(f"{name} must be a matrix (n, m) or a block matrix (n, k, m), got shape {F.shape}.")
    if 0 in F.shape:
        raise ValueError(f"{name} must be non-empty, got shape {F.shape}.")
    check_floating(name, F)
    if not isinstance(given, jax.Array) and np.dtype(getattr(given, "dtype", F.dtype)) != F.dtype:
        # a host array narrowed by the cast (float64 without jax_enable_x64): check_finite names finite
        # values beyond the narrower range (Inf after the cast), not "F contains Inf" or "FᵀF overflows",
        # and non-zero values below its smallest normal number (0 after the cast: a column of them would
        # drop out of the rank silently)
        check_finite(name, given)
    elif check_values:  # (a narrowed array was just checked, under the cast's name); a host array's own
        # values: under a user's jit its jnp.asarray is traced, and NaN scores came back without a word
        check_finite(name, given if isinstance(given, np.ndarray) else F)
    return F.reshape(-1, F.shape[-1]).astype(compute_dtype(F.dtype)), F.shape[:-1]


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for half precision (float16, bfloat16: no LAPACK kernels, too few digits), else ``dtype``."""
    return at_least_float32(dtype)


def column_scales(colmax: Array) -> Array:
    """``(m,)`` powers of two bringing each column maximum ``colmax`` into ``[0.5, 1)`` (1 for zero).

    Every scale is a normal number: a column maximum from ``2^(maxexp−2)`` on (``8.5e37`` in float32,
    ``4.5e307`` in float64) is brought into ``[0.5, 4)`` instead, as a smaller scale would be subnormal,
    which XLA flushes to zero on a CPU (the column would vanish). A subnormal column is raised as far as
    a finite scale goes.
    """
    _, e = jnp.frexp(colmax)
    info = jnp.finfo(colmax.dtype)
    exponent = jnp.clip(-e.astype(jnp.int32), info.minexp, info.maxexp - 1)
    return jnp.ldexp(jnp.ones_like(colmax), exponent)


def prescale_columns(A: Array) -> Array:
    """``A`` with each column multiplied by the power of two of :func:`column_scales` of its max-abs.

    Exact (only exponents change) and leaves ``range(A)`` unchanged, so leverage is too; it keeps the
    Gram matrix and the column norms of :func:`equilibrate` from overflowing (a column ``×1e154`` in
    float64) or underflowing (``×1e-160``) when squared. Zero columns stay zero.
    """
    return A * column_scales(jnp.max(jnp.abs(A), axis=0))[None, :]


def scaled_gram(A: Array) -> tuple[Array, Array]:
    """``(G, s)``: the Gram matrix of ``A·diag(s)`` with ``s`` powers of two (see :func:`prescale_columns`).

    Ordinary input takes one product and ``s = 1``: no pass over ``A`` to scale it. A zero diagonal
    entry (a zero column, or a tiny one flushed to zero) costs one read of ``A`` for its column maxima;
    only when the unscaled Gram matrix over- or underflows (:func:`norms_in_range`) is ``A`` scaled and
    multiplied again. Either way ``G`` is that of the prescaled ``A`` up to exact powers of two, which
    the equilibration removes, and row passes use ``A·(s M)`` for ``(A s)·M`` (the same numbers:
    scaling by powers of two commutes with rounding).
    """
    G0 = gram(A)
    n, diag = A.shape[0], jnp.diagonal(G0)
    fine = norms_in_range(diag, n)

    def keep(A):
        return G0, jnp.ones_like(diag)

    def check_zero_columns(A):
        colmax = jnp.max(jnp.abs(A), axis=0)
        ok = jnp.all(fine | (colmax == 0))

        def rescaled(A):
            s = column_scales(colmax)
            return gram(A * s[None, :]), s

        return lax.cond(ok, keep, rescaled, A)

    return lax.cond(jnp.all(fine), keep, check_zero_columns, A)


def wide_basis(A: Array, rtol: Array, row_norms: bool) -> tuple[Array, Array, Array]:
    """:func:`basis` of a prescaled ``(n, m)`` row matrix with fewer rows than columns (``n < m``).

    ``range(A) ⊆ Rⁿ``, so no ``m × m`` Gram matrix is formed. With ``B = A D⁻¹`` (unit columns):

    - full row rank certified from the ``n × n`` Gram matrix ``G = B Bᵀ`` (one BLAS pass): when its
      computed eigenvalues satisfy ``λ_min ≥ τ·λ_max`` with ``τ = max(5·rtol², 10·n·m·eps)``, every
      singular value of ``B`` is above ``2·rtol·σ_max`` (the rounding of ``G``, at most ``n·m·eps·λ_max``
      in the 2-norm, and of the eigenvalues are a tenth of ``τ``), so ``range(B) = Rⁿ``: ``U = I``, every
      row's leverage exactly 1;
    - otherwise the Householder QR ``Bᵀ = Q R`` (``O(n²m)``, ``R`` of shape ``(n, n)``) gives
      ``B = Rᵀ Qᵀ``, whose left singular vectors and singular values are those of ``Rᵀ = W S Zᵀ``;
      ``U = W`` over the singular values above ``rtol · s_max``.

    ``U`` is padded with zero columns to ``m`` (rank ``≤ n``). Reported as route ``"stable"``. The row
    norms (``row_norms``) are differentiable (:func:`wide_leverage`); the basis itself, uncertified,
    comes from the thin SVD of ``B`` (``O(n²m)`` too, slower), whose derivative is finite for a zero
    row. The leverage at 500 × 131,586 in float64 on 2 CPU cores: full row rank (certified) 1.8 s, rank
    450 (factored) 3.7 s, against 13.8–14.1 s for the thin SVD of ``B`` (which forms ``Vᵀ`` too):
    ``benchmarks/README.md`` (a), "Wide matrices".
    """
    if row_norms:
        out, rank = wide_leverage(A, rtol)
    else:  # the basis itself: uncertified input by the thin SVD of B, whose derivative is finite for a
        # zero row of A (the QR's is NaN there); the leverage's own derivative is wide_leverage's
        f = _wide_factors(A, rtol, thin_svd=True)
        # NaN/Inf input, or a failed SVD (NaN singular values, rank 0): NaN out, as gram_basis
        out = jnp.where(f.finite, jnp.pad(f.U, ((0, 0), (0, A.shape[1] - A.shape[0]))), jnp.nan)
        rank = f.rank
    return out, rank, jnp.asarray(ROUTES.index("stable"), jnp.int32)


class _WideFactors(NamedTuple):
    """What :func:`_wide_factors` finds for :func:`wide_basis`."""

    B: Array  # (n, m): A D⁻¹, columns of unit norm
    D: Array  # (m,): the column norms (1 for a zero column)
    U: Array  # (n, n): the kept left singular vectors (I when full row rank is certified), 0 elsewhere
    s: Array  # (n,): the singular values (ones when certified)
    keep: Array  # (n,) bool: the kept singular values
    rank: Array  # int32: their number
    finite: Array  # bool: the input and s are finite


def _wide_factors(A: Array, rtol: Array, thin_svd: bool = False) -> _WideFactors:
    """The factors of :func:`wide_basis`. ``thin_svd``: uncertified input by the thin SVD of ``B`` (zero
    columns last) instead of the QR of ``Bᵀ``."""
    n, m = A.shape
    norms = jnp.linalg.norm(A, axis=0)
    D = jnp.where(norms > 0, norms, 1)
    scaled = A / D[None, :]
    lam = jnp.linalg.eigvalsh(scaled @ scaled.T)  # ascending
    tau = jnp.maximum(5 * jnp.square(rtol), 10.0 * n * m * float(jnp.finfo(A.dtype).eps)).astype(lam.dtype)
    certified = (lam[-1] > 0) & (lam[0] >= tau * lam[-1])  # False for NaN

    def identity(scaled):
        return jnp.eye(n, dtype=scaled.dtype), jnp.ones((n,), scaled.dtype)

    def factored(scaled):  # qr_r takes the zero rows of scaledᵀ (zero columns of A) last: the float64 CPU
        # SVD came back NaN for a block of zero columns between nonzero ones (550 × 1,100, 1,084 zero
        # columns: zero_rows_last)
        if thin_svd:
            W, s, _ = jnp.linalg.svd(scaled[:, zero_rows_last(scaled.T)], full_matrices=False)
        else:
            W, s, _ = jnp.linalg.svd(qr_r(scaled.T).T)
        return W, s

    W, s = lax.cond(certified, identity, factored, scaled)
    keep = s > rtol * s[0]
    finite = jnp.all(jnp.isfinite(norms)) & jnp.all(jnp.isfinite(s))
    U = W * keep[None, :].astype(W.dtype)
    return _WideFactors(scaled, D, U, s, keep, jnp.sum(keep).astype(jnp.int32), finite)


def _wide_row_norms(f: _WideFactors) -> Array:
    """``‖U_i‖²`` of :func:`_wide_factors`' basis, NaN for NaN/Inf input or a failed SVD."""
    return jnp.where(f.finite, jnp.sum(jnp.square(f.U), axis=1), jnp.nan)


@jax.custom_jvp
def wide_leverage(A: Array, rtol: Array) -> tuple[Array, Array]:
    """``(‖U_i‖², rank)`` of :func:`wide_basis`, differentiable as :func:`stable_leverage`: the projector's
    derivative at fixed rank, ``dh_i = 2 ⟨[(I − P) dB M]_i, U_i⟩`` with ``M = Bᵀ U S⁻²`` over the kept
    singular values (``B M = U``), ``dB = dA D⁻¹`` (the leverage does not depend on the column scales, so
    ``D`` is held fixed); 0 where full row rank is certified (``P = I``). Differentiating the QR gave NaN
    for a zero row of ``A`` (a zero on R's diagonal), and the SVD for repeated singular values."""
    f = _wide_factors(A, rtol)
    return _wide_row_norms(f), f.rank


@wide_leverage.defjvp
def _wide_leverage_jvp(primals, tangents):
    A, rtol = primals
    dA = tangents[0]
    f = _wide_factors(A, rtol)
    inv_s2 = jnp.where(f.keep, 1 / jnp.square(jnp.where(f.keep, f.s, 1)), 0)
    X = ((dA / f.D[None, :]) @ f.B.T) @ (f.U * inv_s2[None, :])  # dB M
    dh = 2 * jnp.sum(f.U * (X - f.U @ (f.U.T @ X)), axis=1)
    return (_wide_row_norms(f), f.rank), (dh, np.zeros(f.rank.shape, jax.dtypes.float0))


def gram_is_finite(G: Array) -> Array:
    """False if the row matrix behind ``G = AᵀA`` had a NaN or Inf (it reaches its column's diagonal
    entry ``Σ_i A_ij²``), or if that sum overflowed: the check of the input, at the cost of ``m`` values."""
    return jnp.all(jnp.isfinite(jnp.diagonal(G)))


def raise_if_nonfinite(name: str, F: Array, out: Array) -> None:
    """After a route ran on unchecked input (``as_rows(check_values=False)``): raise ``ValueError`` if
    ``out`` (NaN throughout for such input) says ``F`` held a NaN or Inf, or its Gram matrix overflowed.

    One scalar is read back; the full check of ``F`` (to count the bad values) runs only on failure.
    Skipped under tracing, like :func:`nlis_jax._checks.check_finite`.
    """
    if not is_concrete(out) or not bool(jnp.isnan(out.reshape(-1)[0])):
        return
    check_finite(name, F)
    raise ValueError(
        f"{name} is finite but its leverage (or basis) came out NaN: {name}ᵀ{name} overflows "
        f"{jnp.result_type(F).name} (rescale {name}: divide it by its largest entry), or the linear algebra "
        "of the route failed on it (a fault of the numerical library, not of the input: please report it; "
        "forcing another route, "
        "route='gram2', 'stable' or 'shifted', may step around it)."
    )


def gram(A: Array) -> Array:
    """``AᵀA`` of an ``(n, m)`` row matrix (trace under :func:`highest_precision`).

    From :data:`TRIANGULAR_MIN` columns on, as three products of column halves (``A₁ᵀA₁``, ``A₁ᵀA₂``,
    ``A₂ᵀA₂``; the fourth block is the transpose of the second): 3/4 of the flops, as BLAS ``syrk``.
    """
    m = A.shape[1]
    if m < TRIANGULAR_MIN:
        return jnp.einsum("np,nq->pq", A, A)
    h = m // 2
    A1, A2 = A[:, :h], A[:, h:]
    G11, G12, G22 = A1.T @ A1, A1.T @ A2, A2.T @ A2
    return jnp.block([[G11, G12], [G12.T, G22]])


#: Rows per chunk of :func:`upper_gram` (the chunk of ``A M`` stays in cache between its two products).
GRAM_CHUNK_ROWS = 2048


def fold_row_chunks(A: Array, rows: int, step: Callable, init):
    """Fold ``state = step(state, chunk, start)`` over consecutive chunks of ``rows`` rows of ``A``.

    A ``fori_loop`` over ``dynamic_slice`` chunks of ``min(rows, n)`` rows, then the remainder (a
    shorter chunk, traced once): one compiled body whatever ``n``, and no padding copy of ``A``.
    ``start`` is the chunk's first row (traced inside the loop, a Python int for the remainder).
    """
    n = A.shape[0]
    c = min(rows, n)
    k = n // c
    state = lax.fori_loop(0, k, lambda i, s: step(s, lax.dynamic_slice_in_dim(A, i * c, c), i * c), init)
    return step(state, A[k * c :], k * c) if k * c < n else state


def upper_gram(A: Array, U: Array) -> tuple[Array, Array]:
    """``(Y, YᵀY)`` with ``Y = A U`` for an upper-triangular ``U``, chunk by chunk.

    Chunks of :data:`GRAM_CHUNK_ROWS` rows (:func:`fold_row_chunks`): each chunk of ``Y``
    (:func:`upper_rows`) is written once and its Gram matrix (:func:`gram`) taken while it is still in
    cache, instead of reading all of ``Y`` back from memory.
    """
    n, m = A.shape

    def step(state, chunk, start):
        G, Y = state
        Yc = upper_rows(chunk, U)
        return G + gram(Yc), lax.dynamic_update_slice_in_dim(Y, Yc, start, 0)

    G, Y = fold_row_chunks(A, GRAM_CHUNK_ROWS, step, (jnp.zeros((m, m), A.dtype), jnp.zeros((n, m), A.dtype)))
    return Y, G


#: Bytes of ``A`` per chunk of :func:`transformed_gram` (a chunk and its product stay in cache).
TRANSFORMED_GRAM_BYTES = 1 << 22


def transformed_gram(A: Array, T: Array) -> Array:
    """``(A T)ᵀ(A T)`` of an ``(n, m)`` row matrix without writing ``A T``: chunk by chunk.

    Chunks of about :data:`TRANSFORMED_GRAM_BYTES` of ``A`` (at least :data:`GRAM_CHUNK_ROWS` rows,
    :func:`fold_row_chunks`): each chunk's product is taken and its Gram matrix added while the chunk is
    in cache. One read of ``A``, against a read, a write and a read of ``A T``.
    """
    rows = max(GRAM_CHUNK_ROWS, TRANSFORMED_GRAM_BYTES // (A.shape[1] * A.dtype.itemsize))
    init = jnp.zeros((T.shape[1],) * 2, A.dtype)
    return fold_row_chunks(A, rows, lambda G, chunk, _: G + gram(chunk @ T), init)


def choose_route(ratio: Array, rtol: Array | None = None) -> Array:
    """Index into :data:`ROUTES` from ``1/κ(G_eq) = λ_min/λ_max`` (0: singular).

    The fast routes count every non-zero column in the rank, so they are taken only when
    ``σ_min/σ_max = √ratio`` is at least ``2·rtol`` (the margin route ``"shifted"`` asks too): a user's
    ``rtol`` above the smallest singular value ratio sends the matrix to route ``"stable"``, whose rank is
    the number of singular values above ``rtol·σ_max``. The default ``rtol`` (``10·eps``) never does: the
    fast routes need ``ratio ≥ 1000·eps`` anyway (:func:`fast_route_ratio_min`, the bound of ``"gram2"``)."""
    gram2 = fast_route_ratio_min("gram2", ratio.dtype)
    branch = jnp.where(ratio >= one_step_ratio_min(ratio.dtype), 0, jnp.where(ratio >= gram2, 1, 2))
    if rtol is not None:
        branch = jnp.where(full_rank_for(ratio, rtol), branch, 2)
    return branch.astype(jnp.int32)


def full_rank_for(ratio: Array, rtol) -> Array:
    """``σ_min/σ_max = √ratio ≥ 2·rtol``: every column counts in the rank for ``rtol``, with the margin
    the fast routes keep (``ratio = λ_min/λ_max`` of the equilibrated Gram matrix)."""
    return ratio >= jnp.square(2 * jnp.asarray(rtol, ratio.dtype))


@functools.partial(traced.jit, static_argnames=("route",))  # called alone, it reuses its compiled program
@highest_precision
def decide(G: Array, route: str | None = None, rtol: Array | None = None) -> GramDecision:
    """The route (chosen from ``κ(G_eq)`` and ``rtol``, or forced by name) and the Cholesky transform
    ``D⁻¹L⁻ᵀ``.

    Shared by :func:`basis` (``A`` held whole) and :func:`transform_from_passes` (only the Gram matrix
    ``G = AᵀA``, accumulated over chunks of rows), so both take the same route for the same matrix.
    """
    Geq, d, num_zero = equilibrate(G)
    m = Geq.shape[0]
    # CPU: pure-XLA iterations (a LAPACK call right after the Gram product waits for its threads);
    # GPU/TPU: the vendor solvers (a few hundred tiny sequential kernels cost more there).
    inv_t, ratio = lax.platform_dependent(Geq, cpu=cholesky_decision_xla, default=cholesky_decision_solver)
    if route is None:
        branch = choose_route(ratio, rtol)
        if G.dtype != jnp.float64:  # below float64, try the shifted route before Householder
            branch = jnp.where(branch == STABLE, SHIFTED, branch).astype(jnp.int32)
    else:
        branch = jnp.asarray(ROUTES.index(route), jnp.int32)
    rank = (m - num_zero).astype(jnp.int32)
    if route in FAST_ROUTES:  # forced: on input beyond the route's own limit -2, rank-deficient for rtol -1
        rank = jnp.where(ratio >= fast_route_ratio_min(route, ratio.dtype), rank, FORCED_ILL_CONDITIONED)
        if rtol is not None:
            rank = jnp.where(full_rank_for(ratio, rtol), rank, FORCED_RANK_DEFICIENT)
    return GramDecision(branch, inv_t / d[:, None], rank, d)


#: The rank :func:`decide` reports for a forced fast route on input rank-deficient for ``rtol``, and on
#: input more ill-conditioned than that route's limit (:func:`fast_route_ratio_min`).
FORCED_RANK_DEFICIENT, FORCED_ILL_CONDITIONED = -1, -2


def fast_route_ratio_min(route: str, dtype) -> float:
    """Smallest ``1/κ(G_eq)`` a forced fast route is run on: ``1000·eps``, where one Cholesky factor of
    the Gram matrix is still orthonormal to ``eps·κ(G_eq) ≤ 1e-3`` (the automatic choice keeps tighter
    bounds for ``"gram"``: :func:`one_step_ratio_min`) and ``"gram2"`` is taken automatically. Forced
    beyond it, a float32 matrix of ``κ(F)`` = 1e4 gave scores 49% off that did not sum to 1 (or a false
    "rank-deficient"); float64 at ``κ(F)`` = 1e7, 3.5e-3 off. ``route`` is ``"gram"`` or ``"gram2"``."""
    del route  # the same bound: past it the first factor is unusable, and "gram2" refines that factor
    return 1000 * float(jnp.finfo(dtype).eps)


@traced.jit
@highest_precision
def refine_transform(G2: Array) -> Array:
    """``M₂`` of one CholeskyQR step: ``U₁ M₂`` is orthonormal to ``O(eps)`` given ``G2 = U₁ᵀU₁``.

    Columns of ``U₁`` dropped by a rank tolerance are exactly zero and stay zero.
    """
    Geq, d, _ = equilibrate(G2)
    eye = jnp.eye(Geq.shape[0], dtype=Geq.dtype)
    L = jnp.linalg.cholesky(Geq)
    ok = jnp.all(jnp.isfinite(L))  # U₁ is near-orthonormal, so this holds but for a broken input
    return jnp.where(ok, lower_inverse_t(jnp.where(ok, L, eye)) / d[:, None], eye)


@traced.jit
@highest_precision
def stable_transform(R: Array, scale: Array, rtol: Array) -> tuple[Array, Array]:
    """``(M, rank)`` from an R factor of ``A``: ``A D⁻¹ = Q (R D⁻¹) = Q W S Vᵀ``, ``M = D⁻¹ V S⁻¹``.

    ``A M = Q W`` over the singular values above ``rtol · s_max``: orthonormal to ``~eps·κ``; the other
    columns of ``M`` are zero.
    """
    _, keep, M = _svd_transform(R, scale, rtol)
    return M, jnp.sum(keep).astype(jnp.int32)


def _svd_transform(R: Array, scale: Array, rtol: Array) -> tuple[Array, Array, Array]:
    """``(W, keep, M)`` of :func:`stable_transform`: ``R D⁻¹ = W S Vᵀ``, the kept singular values and
    ``M = D⁻¹ V S⁻¹`` over them (zero columns elsewhere)."""
    W, s, Vt = jnp.linalg.svd(R / scale[None, :])
    keep = s > rtol * s[0]
    inv_s = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
    return W, keep, (Vt.T * inv_s[None, :]) / scale[:, None]


def zero_rows_last(A: Array) -> Array:
    """The row order ``(n,)`` that moves the all-zero rows of ``A`` after the others (stably), for its QR.

    ``AᵀA``, and so the R factor up to the signs of its rows, does not depend on the order of the rows;
    the CPU's QR does. In float64 (jaxlib 0.10.2, its OpenBLAS on 2 threads; 1 thread was fine) a block of
    zero rows about as tall as ``A`` is wide followed by a few nonzero rows came back NaN from about
    ``m = 700`` columns on: the zero R of a streamed TSQR's first chunk above the chunk's rows, rank-
    deficient R factors stacked, a dual matrix with such a block (reported as "FᵀF overflows"). The SVD
    of a wide matrix failed alike for a block of zero columns between nonzero ones (:func:`wide_basis`)."""
    return jnp.argsort(~jnp.any(A != 0, axis=1), stable=True)


def qr_r(A: Array) -> Array:
    """The R factor ``(m, m)`` of a tall ``(N, m)`` row matrix, its zero rows taken last
    (:func:`zero_rows_last`)."""
    return jnp.linalg.qr(A[zero_rows_last(A)], mode="r")


def stable_parts(A: Array, scale: Array, rtol: Array) -> tuple[Array, Array, Array]:
    """``(U, M, rank)`` of route ``"stable"`` on an ``(n, m)`` row matrix: ``U = A M`` orthonormal on the
    singular values above ``rtol · s_max`` of ``A D⁻¹`` (``D = diag(scale)``), zero columns elsewhere.

    In float64 ``U`` is the Householder ``Q`` times the SVD's ``W`` of ``R D⁻¹ = W S Vᵀ`` (orthonormal to
    ``O(eps)`` whatever ``κ``), ``M = D⁻¹ V S⁻¹``; below float64 ``U = A M`` with ``M`` from the R factor
    alone and one CholeskyQR step (:func:`refine_transform`).
    """
    if A.dtype == jnp.float64:
        order = zero_rows_last(A)
        Q, R = jnp.linalg.qr(A[order])  # R D⁻¹ is the R factor of A D⁻¹: same Q, same range
        W, keep, M = _svd_transform(R, scale, rtol)
        U = Q[jnp.argsort(order)] @ (W * keep[None, :].astype(W.dtype))  # rows back in A's order
        return U, M, jnp.sum(keep).astype(jnp.int32)
    M, rank = stable_transform(qr_r(A), scale, rtol)
    U1 = A @ M
    second = refine_transform(gram(U1))
    return U1 @ second, M @ second, rank


@jax.custom_jvp
def stable_leverage(A: Array, scale: Array, rtol: Array) -> tuple[Array, Array]:
    """``(‖U_i‖², rank)`` of :func:`stable_parts`: route ``"stable"``'s row norms, differentiable.

    The derivative is that of the projector ``P = U Uᵀ`` at fixed rank (rank-preserving changes; the
    same convention as a truncated SVD): ``dP = (I − P) dA A⁺ + ((I − P) dA A⁺)ᵀ`` with ``A⁺ = M Uᵀ``, so
    ``dh_i = 2 ⟨[(I − P) dA M]_i, U_i⟩``. Differentiating the QR and SVD themselves gave NaN for input
    with an exactly-zero column (a dead unit) or repeated singular values. ``scale`` and ``rtol`` choose
    the rank only: their tangents do not enter.
    """
    U, _, rank = stable_parts(A, scale, rtol)
    return jnp.sum(jnp.square(U), axis=1), rank


@stable_leverage.defjvp
def _stable_leverage_jvp(primals, tangents):
    A, scale, rtol = primals
    dA = tangents[0]
    U, M, rank = stable_parts(A, scale, rtol)
    B = dA @ M  # (n, m)
    dh = 2 * jnp.sum(U * (B - U @ (U.T @ B)), axis=1)
    rank_tangent = np.zeros(rank.shape, jax.dtypes.float0)
    return (jnp.sum(jnp.square(U), axis=1), rank), (dh, rank_tangent)


class Transform(NamedTuple):
    """``U = A first`` (``refine`` false) or ``(A first) second``: an orthonormal basis of ``range(A)``."""

    first: Array  # (m, m)
    second: Array  # (m, m): the CholeskyQR refinement (route "gram2", or "stable" below float64)
    refine: Array  # bool: apply ``second``
    rank: Array  # int32; negative for a forced fast route on input it cannot take (see basis)
    route: Array  # int32 index into ROUTES


#: The kinds of pass :func:`transform_from_pass` asks for: ``(A M)ᵀ(A M)``, or an R factor of ``A``.
PASS_GRAM, PASS_TSQR = 0, 1


def transform_from_passes(
    G: Array,
    gram_pass: Callable[[Array], Array],
    r_factor: Callable[[], Array],
    rtol: Array,
    route: str | None = None,
) -> Transform:
    """The route and its :class:`Transform` for a row matrix ``A`` seen only through passes over its rows.

    ``G = AᵀA`` decides the route (:func:`decide`); ``gram_pass(M)`` must return ``(A M)ᵀ(A M)`` (one
    more pass, taken on routes ``"gram2"`` and ``"shifted"``, and on ``"stable"`` below float64) and
    ``r_factor()`` an R factor of ``A`` (a TSQR pass, route ``"stable"`` only). :func:`apply_transform`
    then gives the basis or the leverage of any rows of ``A``: the route, rank and arithmetic of
    :func:`basis` on ``A`` (whose float64 stable route forms the Householder ``Q`` instead, which needs
    all of ``A``). ``rtol``: the rank tolerance, as in :func:`basis`; ``route`` forces a route, as there.
    See :func:`transform_from_pass`, which asks for every pass through one function. It takes the passes
    as functions, so call it inside your own ``jax.jit`` (with the passes): called
    alone, it traces its conditionals anew each time (:func:`decide`, :func:`refine_transform` and
    :func:`apply_transform` are jitted themselves).
    """

    def run_pass(kind, M):
        return lax.cond(kind == PASS_TSQR, lambda M: r_factor(), gram_pass, M)

    return transform_from_pass(G, run_pass, rtol, route)


class _Stages(NamedTuple):
    """What the route's stages have found so far (:func:`transform_from_pass`)."""

    G_a: Array  # the Gram pass after the decision (routes "gram2" and "shifted")
    start: CholeskyStart  # route "shifted": its first CholeskyQR step
    second_s: Array  # route "shifted": its second transform
    need_stable: Array  # bool: route "stable", chosen or as the fallback of "shifted"
    M_st: Array  # route "stable": its transform
    rank_st: Array
    kind: Array  # the pass asked for by the last stage, and whether it is needed
    M: Array
    active: Array


def transform_from_pass(
    G: Array, run_pass: Callable[[Array, Array], Array], rtol: Array, route: str | None = None
) -> Transform:
    """:func:`transform_from_passes` with every pass asked of one function, called from one place.

    ``run_pass(kind, M)`` must return ``(A M)ᵀ(A M)`` for ``kind == PASS_GRAM`` and an R factor of ``A``
    for ``kind == PASS_TSQR`` (``M`` is then the identity). The routes' passes are stages of a
    ``lax.fori_loop`` whose body calls ``run_pass`` once (under a ``lax.cond``: only the passes the route
    needs run): the Gram pass after the decision (routes ``"gram2"`` and ``"shifted"``); route
    ``"shifted"``'s second CholeskyQR pass when ``YᵀY`` needs it; route ``"stable"``'s TSQR pass, chosen
    or as the fallback of ``"shifted"``; below float64, its CholeskyQR pass. A streamed pass traces the
    dual rows once per call site, and with the adaptive quadrature rule each copy compiles for seconds
    (benchmarks/README.md (e)), so the streaming program holds one copy for all of them.
    """
    dec = decide(G, route, rtol)
    m, dtype = G.shape[0], G.dtype
    eye, zeros = jnp.eye(m, dtype=dtype), jnp.zeros((m, m), dtype)
    no, yes = jnp.asarray(False), jnp.asarray(True)
    two_pass, shifted = dec.route == ROUTES.index("gram2"), dec.route == SHIFTED
    gram_kind, tsqr_kind = jnp.int32(PASS_GRAM), jnp.int32(PASS_TSQR)

    # Route "shifted": the shifted-Cholesky preconditioner (m × m work).
    first_s, ok_s = lax.cond(shifted, lambda: shifted_first(G), lambda: (eye, no))
    try_shifted = shifted & ok_s

    def ask(st, kind, M, active):
        return st._replace(kind=kind, M=M, active=active)

    def after_decision(st, _):  # the Gram pass after the decision
        return ask(st, gram_kind, jnp.where(two_pass, dec.transform, first_s), two_pass | try_shifted)

    def cholesky_first(st, G_a):  # route "shifted": the first CholeskyQR step on A·first
        start = lax.cond(try_shifted, cholesky_start, lambda Gy: _no_start(eye), G_a)
        st = st._replace(G_a=G_a, start=start)
        return ask(st, gram_kind, first_s @ start.M1, try_shifted & start.needs_pass)

    def cholesky_last(st, G2):  # its second step and rank check; route "stable" if they fail
        def finish():
            Geq, d, _ = equilibrate(G)
            pre = cholesky_finish(st.start, G2, first_s, d, lambda x: Geq @ x, rtol)
            return pre.second, pre.ok

        second_s, ok_pre = lax.cond(try_shifted, finish, lambda: (eye, no))
        need_stable = (dec.route == STABLE) | (shifted & ~(try_shifted & ok_pre))
        return ask(st._replace(second_s=second_s, need_stable=need_stable), tsqr_kind, eye, need_stable)

    def stable_first(st, R):  # route "stable": the transform from R; below float64 a CholeskyQR pass
        args = (R, dec.scale, rtol)
        M_st, rank_st = lax.cond(st.need_stable, stable_transform, lambda *a: (eye, dec.rank), *args)
        st = st._replace(M_st=M_st, rank_st=rank_st)
        return ask(st, gram_kind, M_st, st.need_stable & (dtype != jnp.float64))

    stages = (after_decision, cholesky_first, cholesky_last, stable_first)

    def body(i, carry):
        st, out = carry
        st = lax.switch(i, stages, st, out)
        return st, lax.cond(st.active, lambda: run_pass(st.kind, st.M), lambda: zeros)

    init = _Stages(zeros, _no_start(eye), eye, no, eye, dec.rank, gram_kind, eye, no)
    st, G_st = lax.fori_loop(0, len(stages), body, (init, zeros))
    second_2 = lax.cond(two_pass, refine_transform, lambda G2: eye, st.G_a)
    refine_st = st.need_stable & (dtype != jnp.float64)
    second_st = lax.cond(refine_st, refine_transform, lambda G2: eye, G_st)
    taken = jnp.where(st.need_stable, STABLE, dec.route).astype(jnp.int32)
    outcomes = (  # indexed by ROUTES
        (dec.transform, eye, no, dec.rank),
        (dec.transform, second_2, yes, dec.rank),
        (st.M_st, second_st, refine_st, st.rank_st),
        (first_s, st.second_s, yes, dec.rank),
    )
    first, second, refine, rank = lax.switch(taken, [lambda o=o: o for o in outcomes])
    return Transform(first, second, refine, rank, taken)


def _no_start(eye: Array) -> CholeskyStart:
    return CholeskyStart(eye, jnp.ones((), eye.dtype), jnp.asarray(False))


def transform_stepwise(
    G: Array,
    run_pass: Callable[[int, Array], Array],
    rtol: Array,
    route: str | None = None,
) -> Transform:
    """:func:`transform_from_pass` with its stages run from Python on concrete values (an eager call).

    The same route, rank and arithmetic, each stage one small jitted program, and only the passes the
    route asks for run: ``run_pass(kind, M)`` as there, each call a program of its own. The route is read
    back once, after the decision (and route ``"shifted"``'s checks after its passes). The fused loop
    holds every stage's ``(m, m)`` state, and XLA's buffer plan of the streaming program that calls it
    reserved 19–21 ``(m, m)`` arrays on every route, a forced ``"gram"`` too (benchmarks/README.md (a),
    "Streamed workspace"); here a stage holds only what it reads.
    """
    dec = decide(G, route, rtol)
    taken = int(dec.route)
    if taken == GRAM:
        return _finished(dec.transform, None, dec.rank, taken)
    if taken == ROUTES.index("gram2"):
        return _finished(dec.transform, refine_transform(run_pass(PASS_GRAM, dec.transform)), dec.rank, taken)
    scale, rank = dec.scale, dec.rank
    del dec  # its (m, m) Cholesky transform is not used below
    if taken == SHIFTED:
        done = _shifted_stages(G, run_pass, rtol, rank)
        if done is not None:
            return done
    m, dtype = G.shape[0], G.dtype
    M_st, rank_st = stable_transform(run_pass(PASS_TSQR, _eye(m, dtype)), scale, rtol)
    if dtype == jnp.float64:
        return _finished(M_st, None, rank_st, STABLE)
    return _finished(M_st, refine_transform(run_pass(PASS_GRAM, M_st)), rank_st, STABLE)


def _shifted_stages(G: Array, run_pass: Callable, rtol: Array, rank: Array) -> Transform | None:
    """Route ``"shifted"`` of :func:`transform_stepwise`, or ``None`` where its factor or its rank check
    fails (route ``"stable"`` then)."""
    first, ok = _shifted_first(G)
    if not bool(ok):
        return None
    start, M = _cholesky_first(run_pass(PASS_GRAM, first), first)
    G2 = run_pass(PASS_GRAM, M) if bool(start.needs_pass) else square_zeros(M.shape[1], M.dtype)
    del M
    second, ok = _cholesky_last(G, start, G2, first, rtol)
    return _finished(first, second, rank, SHIFTED) if bool(ok) else None


@functools.partial(traced.jit, static_argnames=("route",))
def _finished(first: Array, second: Array | None, rank: Array, route: int) -> Transform:
    """The :class:`Transform` of a route taken by :func:`transform_stepwise` (``second`` ``None``: no
    refinement), built in one program (no operation dispatched on its own: a GPU launch each)."""
    refine = second is not None
    second = second if refine else jnp.eye(first.shape[0], dtype=first.dtype)
    return Transform(first, second, jnp.asarray(refine), rank, jnp.asarray(route, jnp.int32))


@functools.partial(traced.jit, static_argnums=(0, 1))
def _eye(m: int, dtype) -> Array:
    return jnp.eye(m, dtype=dtype)


@functools.partial(traced.jit, static_argnums=(0, 1))
def square_zeros(m: int, dtype) -> Array:
    """``(m, m)`` zeros, one program (eagerly not two operations dispatched on their own)."""
    return jnp.zeros((m, m), dtype)


_shifted_first = traced.jit(highest_precision(shifted_first))


@traced.jit
@highest_precision
def _cholesky_first(G_a: Array, first: Array) -> tuple[CholeskyStart, Array]:
    """Route ``"shifted"``'s first CholeskyQR step on ``A·first`` and the transform of its optional pass."""
    start = cholesky_start(G_a)
    return start, first @ start.M1


@functools.partial(traced.jit, donate_argnames=("G2",))
@highest_precision
def _cholesky_last(
    G: Array, start: CholeskyStart, G2: Array, first: Array, rtol: Array
) -> tuple[Array, Array]:
    """Route ``"shifted"``'s second step and rank check (``ok`` false: route ``"stable"`` instead)."""
    Geq, d, _ = equilibrate(G)
    pre = cholesky_finish(start, G2, first, d, lambda x: Geq @ x, rtol)
    return pre.second, pre.ok


@functools.partial(traced.jit, static_argnames=("row_norms",))
@highest_precision
def apply_transform(A: Array, t: Transform, row_norms: bool = False) -> Array:
    """Rows ``A`` (``(c, m)``) mapped to the basis of the :class:`Transform` ``t``: ``(A first) second``
    where ``t.refine``, else ``A first``; with ``row_norms`` their squared row norms ``(c,)`` instead."""
    U1 = A @ t.first
    return lax.cond(
        t.refine,
        lambda U: transform_rows(U, t.second, row_norms),
        lambda U: jnp.sum(jnp.square(U), axis=1) if row_norms else U,
        U1,
    )


def transform_rows(A: Array, M: Array, row_norms: bool = False) -> Array:
    """``A M``, or its squared row norms ``‖(A M)_i‖²`` (fused: ``A M`` is never written to memory)."""
    return jnp.sum(jnp.square(A @ M), axis=1) if row_norms else A @ M


#: From this many columns on, products with an upper-triangular transform skip its zero lower-left block.
TRIANGULAR_MIN = 512


def upper_rows(A: Array, U: Array, row_norms: bool = False) -> Array:
    """:func:`transform_rows` for an upper-triangular ``U`` (the Cholesky transforms ``D⁻¹L⁻ᵀ``).

    With ``h = m/2``: ``A U = [A₁ U₁₁, A U₋₂]`` (``A₁`` the first ``h`` columns, ``U₋₂`` the last
    ``m − h`` columns of ``U``), 3/4 of the flops of the full product (the zero block ``U₂₁`` is skipped).
    From :data:`TRIANGULAR_MIN` columns on; below that the product is not compute-bound.
    """
    m = U.shape[0]
    if m < TRIANGULAR_MIN:
        return transform_rows(A, U, row_norms)
    h = m // 2
    left, right = A[:, :h] @ U[:h, :h], A @ U[:, h:]
    if row_norms:
        return jnp.sum(jnp.square(left), axis=1) + jnp.sum(jnp.square(right), axis=1)
    return jnp.concatenate([left, right], axis=1)


def ridge_transform(G: Array, ridge: Array) -> tuple[Array, Array]:
    """``(M, scale)``: ``scale·‖(A M)_i‖² = [A (G + λI)^{-1} Aᵀ]_ii`` (ridge leverage), ``G = AᵀA``.

    Equilibrated: with ``d = diag(G)``, ``R = S⁻¹ G S⁻¹ + diag(λ/(d_j + λ))``, ``S = diag(√(d_j + λ))``
    (unit diagonal, so columns of very different scales keep their small directions: an eigendecomposition
    of ``G`` itself loses them to ``eps·‖G‖``), ``R = V diag(w) Vᵀ`` and ``M = diag(f) V diag(w)^{-1/2}``
    with ``f_j² = c/(d_j + λ)``, ``scale = 1/c``. ``c = max(1, λ/max d)``: for a ridge far above the
    Gram matrix ``‖(A M)_i‖²`` stays of order ``‖A_i‖²/max d`` (and the probabilities drawn from it
    exact) where the leverage itself is subnormal or underflows; every term is finite for ``λ = inf``.
    """
    d = jnp.maximum(jnp.diagonal(G), 0)
    top = jnp.max(d)
    top = jnp.where(top > 0, top, 1)
    big = ridge > top
    f2 = jnp.where(big, 1 / (top * (1 + d / ridge)), 1 / (d + ridge))  # c/(d_j + λ)
    s = jnp.sqrt(d + ridge)
    shrink = 1 - d / (d + ridge)  # λ/(d_j + λ), finite for λ = inf
    R = G / s[:, None] / s[None, :] + jnp.diag(shrink)
    w, V = jnp.linalg.eigh(R)
    w = jnp.maximum(w, jnp.min(shrink))  # Weyl: λ_min(R) ≥ min_j λ/(d_j + λ); rounding only
    M = jnp.sqrt(f2)[:, None] * V * lax.rsqrt(w)[None, :]
    return M, jnp.where(big, top / ridge, 1)


def basis(
    A: Array, rtol: Array, route: str | None = None, row_norms: bool = False
) -> tuple[Array, Array, Array]:
    """``(U, rank, route)`` of an ``(n, m)`` row matrix, or ``(‖U_i‖², rank, route)`` with ``row_norms``.

    ``route=None`` chooses from ``κ``; a name forces that route (not with fewer rows than columns,
    :func:`wide_basis`). A forced fast route (``"gram"``, ``"gram2"``, ``"shifted"``) on input it cannot
    take reports ``rank`` :data:`FORCED_RANK_DEFICIENT` (``-1``: rank-deficient for ``rtol``, where ``U``
    is not orthonormal; or fewer rows than columns, where ``U`` is route ``"stable"``'s basis) or
    :data:`FORCED_ILL_CONDITIONED` (``-2``: beyond the route's own limit, ``U`` not orthonormal): check
    ``rank >= 0`` (``nlis_jax.leverage_scores`` raises there).
    Below float64 with at least :data:`SKETCH_MIN` columns the choice starts from a
    sketch (:func:`sketched_basis`), else from the Gram matrix (:func:`gram_basis`). ``rtol`` must lie in
    ``(0, 1)`` (a NaN or out-of-range tolerance gave rank 0 or every column silently): ``ValueError``
    when concrete, a checkify check inside ``nlis_jax.traced_checks()`` when traced.
    """
    check_route(route)  # a static name: "tuple.index(x): x not in tuple" deep inside before
    check_tolerances(rtol, 0.0)
    return _basis(A, rtol, route, row_norms)


@functools.partial(traced.jit, static_argnames=("route", "row_norms"))
@highest_precision
def _basis(A: Array, rtol: Array, route: str | None, row_norms: bool) -> tuple[Array, Array, Array]:
    if A.shape[0] < A.shape[1]:
        out, rank, taken = wide_basis(prescale_columns(A), rtol, row_norms)
        # fewer rows than columns is rank-deficient: a forced fast route is refused (rank -1), as streamed
        return out, jnp.int32(-1) if route in FAST_ROUTES else rank, taken
    if takes_sketch(A, route):
        return sketched_basis(A, rtol, route, row_norms)
    return gram_basis(A, rtol, route, row_norms)


#: From this many columns on (below float64), route ``"shifted"`` is preconditioned from a sketch.
SKETCH_MIN = 512


def sketched_basis(A: Array, rtol: Array, route: str | None, row_norms: bool) -> tuple[Array, Array, Array]:
    """:func:`basis` below float64 for many columns: route ``"shifted"`` preconditioned from a sketch.

    The Gram matrix ``G_s`` of a CountSketch ``S A`` (:func:`count_sketch`, ``SKETCH_ROWS·m`` rows: a
    small fraction of a Gram pass) replaces ``AᵀA`` in the shifted Cholesky factorisation (randomized
    preconditioning, Rokhlin & Tygert 2008; Fan, Guo & Lin 2021), equilibrated by the exact column norms
    of ``A`` (read with its column maxima in one pass): ``Y = A D⁻¹L₀⁻ᵀ`` has ``κ(Y)`` of a few units
    (the distortion of the sketch times that of the shift), and the CholeskyQR step(s) of
    :func:`~nlis_jax._precondition.cholesky_steps` on ``YᵀY`` make it orthonormal. Three products of
    ``A``'s size (``Y`` and ``YᵀY`` in one pass, :func:`upper_gram`; the rows of ``Y`` times the
    CholeskyQR transform), against four when the route starts from ``AᵀA``. (Multiplying ``A`` by the
    product of the two transforms instead, without storing ``Y``, doubled the error of the scores.)

    Taken (with ``route=None``) when :func:`columns_show_ill_conditioning`, i.e. past route ``"gram"``;
    otherwise, or when its checks fail (numerical rank deficiency, a sketch that lost a
    direction, columns whose squares over- or underflow, NaN or Inf), :func:`gram_basis` decides, as it
    does for every other input.
    """
    take = columns_show_ill_conditioning(A) if route is None else jnp.asarray(True)

    def skipped(A):
        return jnp.zeros(A.shape[:1] if row_norms else A.shape, A.dtype), jnp.asarray(False), jnp.int32(0)

    out, done, rank = lax.cond(take, lambda A: sketched_rows(A, rtol, row_norms), skipped, A)
    return lax.cond(
        done, lambda A: (out, rank, jnp.int32(SHIFTED)), lambda A: gram_basis(A, rtol, route, row_norms), A
    )


#: Columns of the principal submatrix of ``G_eq`` on which :func:`columns_show_ill_conditioning` decides.
DECISION_COLUMNS = 256


def columns_show_ill_conditioning(A: Array) -> Array:
    """True when ``κ(G_eq) > eps^{-1/4}`` shows on :data:`DECISION_COLUMNS` evenly spaced columns of ``A``.

    By interlacing, the eigenvalues of a principal submatrix of ``G_eq`` lie between its extreme
    eigenvalues, and so do the squared pivots of the submatrix's Cholesky factor: their ratio is a lower
    bound of ``κ(G_eq)`` (a failed factorisation: singular). The cost is a Gram product of
    ``(k/m)²`` of the full one and a ``k × k`` Cholesky factorisation, so well-conditioned input (route
    ``"gram"``, decided on the full Gram matrix) pays little for the test.
    """
    m = A.shape[1]
    k = min(DECISION_COLUMNS, m)
    Geq, _, _ = equilibrate(gram(A[:, :: m // k][:, :k]))
    L = jnp.linalg.cholesky(Geq)
    pivots = jnp.square(jnp.diagonal(L))
    # a lower bound of κ, so the screen keeps eps^{-1/4} (54 in float32), stricter than route "gram"'s own
    # limit below float64 (one_step_ratio_min: 840): what it passes goes to decide()'s full estimate
    eps = jnp.finfo(A.dtype).eps
    return ~jnp.all(jnp.isfinite(L)) | (jnp.min(pivots) < eps**0.25 * jnp.max(pivots))


def sketched_rows(A: Array, rtol: Array, row_norms: bool) -> tuple[Array, Array, Array]:
    """``(out, ok, rank)``: the basis or its row norms by the sketched shifted route (:func:`sketched_basis`);
    ``ok`` false when a check failed (``out`` is then not an answer)."""
    n, m = A.shape
    sq, colmax = jnp.sum(jnp.square(A), axis=0), jnp.max(jnp.abs(A), axis=0)
    zero = sq == 0
    d = jnp.where(zero, 1, jnp.sqrt(sq))
    Gs = gram(count_sketch(A, SKETCH_ROWS * m))
    Gs_eq = Gs / (d[:, None] * d[None, :]) + jnp.diag(zero.astype(A.dtype))
    L0, ok = shifted_cholesky(jnp.where(jnp.isfinite(Gs_eq), Gs_eq, 0))
    ok &= jnp.all(jnp.isfinite(Gs)) & jnp.all(norms_in_range(sq, n) | (colmax == 0))

    def sketched(A):  # Y and YᵀY in one pass (upper_gram), then the rows of Y·second
        first = lower_inverse_t(L0) / d[:, None]
        Y, Gy = upper_gram(A, first)
        steps = cholesky_steps(
            Gy, first, d, lambda M: gram(upper_rows(Y, M)), lambda x: L0 @ (Gy @ (x @ L0)), rtol
        )
        return upper_rows(Y, steps.second, row_norms), steps.ok

    def skipped(A):
        return jnp.zeros(A.shape[:1] if row_norms else A.shape, A.dtype), jnp.asarray(False)

    out, done = lax.cond(ok, sketched, skipped, A)
    return out, done, (m - jnp.sum(zero)).astype(jnp.int32)


#: How far ``Σh = ‖U‖_F²`` may lie from the rank route ``"shifted"`` reports before it is taken to have
#: lost a direction (:func:`kept_every_direction`; also the streamed scores' check).
LOST_DIRECTION = 0.5


def kept_every_direction(out: Array, rank: Array, row_norms: bool) -> Array:
    """Whether route ``"shifted"``'s output (the basis ``U``, or its row norms ``h``) keeps all ``rank``
    directions it counts (its non-zero columns): ``Σh = ‖U‖_F² = rank`` to within :data:`LOST_DIRECTION`.

    Its rank test bounds ``σ_min/σ_max`` from the transform, which in float32 cannot see below about
    ``1e3·eps`` on input with an exactly dependent column (a duplicated feature): the test passed there
    in 11 of 60 random 300 × 6 cases and the rank came out ``m`` while the dependent direction of ``U``
    came out near zero (``Σh = m − 1``, probabilities summing to ``(m−1)/m``). Full-rank input keeps
    ``Σh`` within ``m·1e-3`` of ``m`` on this route, far inside the margin; the check costs a sum.
    """
    total = jnp.sum(out if row_norms else jnp.square(out), dtype=jnp.promote_types(out.dtype, jnp.float32))
    return jnp.abs(total - rank.astype(total.dtype)) <= LOST_DIRECTION


def gram_basis(A: Array, rtol: Array, route: str | None, row_norms: bool) -> tuple[Array, Array, Array]:
    """:func:`basis` from the Gram matrix ``AᵀA`` (``n ≥ m``): the route chosen by :func:`decide`.

    In float64 the stable route forms the Householder ``Q`` (orthonormal to ``O(eps)`` whatever ``κ``);
    in lower precision the input's own rounding already moves leverage by ``~eps·κ``, so the R factor
    alone (forming ``Q`` costs many times more on a CPU) followed by one CholeskyQR step is as good.
    """
    G, cs = scaled_gram(A)  # of A·diag(cs): the transforms below act on A·diag(cs), so scale them by cs
    dec = decide(G, route, rtol)
    # Columns so large that their scales (powers of two) times the transform entries could fall below the
    # smallest normal number, which XLA flushes to zero on a CPU: the routes that fold cs into their
    # transforms would lose those columns (a column near 2^125 in float32 came out zero); route "stable"
    # scales A itself. Only the rescaled path of scaled_gram (an overflowing Gram matrix) gets here.
    extreme = jnp.min(cs) < jnp.ldexp(jnp.ones((), cs.dtype), -(jnp.finfo(cs.dtype).maxexp // 2))

    def refine(U1, rank):
        return transform_rows(U1, refine_transform(gram(U1)), row_norms), rank

    def one_pass(A):
        return transform_rows(A, cs[:, None] * dec.transform, row_norms), dec.rank

    def two_pass(A):
        first = cs[:, None] * dec.transform
        if not row_norms:  # the basis: CholeskyQR2 proper, orthonormal to O(eps)
            return refine(A @ first, dec.rank)
        # leverage: U₁ = A T₁ is never written (its Gram matrix by chunks, then the rows of A (T₁ T₂)):
        # two reads of A fewer; the rows then carry rounding ~eps·κ(A), which the input's own rounding
        # already causes in the leverage (the basis above stays orthonormal to O(eps) instead)
        both = first @ refine_transform(transformed_gram(A, first))
        return transform_rows(A, both, row_norms=True), dec.rank

    def stable(A):
        A = A * cs[None, :]
        if row_norms:
            return *stable_leverage(A, dec.scale, rtol), jnp.int32(STABLE)
        U, _, rank = stable_parts(A, dec.scale, rtol)
        return U, rank, jnp.int32(STABLE)

    def shifted(A):  # Y = A D⁻¹L₀⁻ᵀ is formed once: its Gram matrix, then its rows
        first, ok = shifted_first(G)
        Y = upper_rows(A, cs[:, None] * first)  # the transforms of this route are upper triangular
        pre = shifted_transform(G, gram(Y), first, lambda M: gram(upper_rows(Y, M)), rtol)

        def rows():
            return upper_rows(Y, pre.second, row_norms)

        good = ok & pre.ok & ~extreme
        skipped = jax.eval_shape(rows)
        out = lax.cond(good, rows, lambda: jnp.zeros(skipped.shape, skipped.dtype))
        # one rank-revealing branch (traced once) for a failed check and for a lost direction
        take = good & kept_every_direction(out, dec.rank, row_norms)
        return lax.cond(take, lambda: (out, dec.rank, jnp.int32(SHIFTED)), lambda: stable(A))

    def fast(branch):
        return lambda A: (*branch(A), dec.route)

    def route_taken(A):  # only the branches this dtype and route can take are compiled
        branches = (fast(one_pass), fast(two_pass), stable, shifted)
        if route is not None:  # forced by name ("stable" for extreme columns: see above)
            forced = branches[ROUTES.index(route)]
            return forced(A) if route in ("stable", "shifted") else lax.cond(extreme, stable, forced, A)
        if A.dtype == jnp.float64:  # decide() sends nothing to "shifted" in float64
            return lax.switch(jnp.where(extreme, STABLE, dec.route), branches[:SHIFTED], A)
        # below float64 decide() sends nothing to "stable" (reached from "shifted" when it fails)
        index = jnp.where((dec.route == SHIFTED) | extreme, STABLE, dec.route)
        return lax.switch(index, (*branches[:STABLE], shifted), A)

    # NaN or Inf in A (or an overflowing Gram matrix): NaN out, rank 0. Masked, not a lax.cond around the
    # routes: with A an operand of nested conditionals, XLA copied it (float64 200,000 × 65, route
    # "gram": 145-172 ms against 68-81 ms masked)
    out, rank, taken = route_taken(A)
    finite = gram_is_finite(G)
    return jnp.where(finite, out, jnp.nan), jnp.where(finite, rank, 0), jnp.asarray(taken, jnp.int32)


def sum_per_example(h: Array, lead: tuple[int, ...]) -> Array:
    """Values of the ``n·k`` rows summed per example: ``(n,)``; ``lead`` is ``(n,)`` or ``(n, k)``."""
    return h.reshape(lead).sum(axis=tuple(range(1, len(lead))))


def tolerance(rtol: float | Array, dtype) -> Array:
    """``rtol`` in ``dtype`` for the compiled routes: a number as a numpy scalar (passed with the call: no
    conversion dispatched on the device, and nothing to read back when it is checked), an array as is."""
    return jnp.asarray(rtol, dtype) if isinstance(rtol, jax.Array) else np.asarray(rtol, dtype)


def row_leverage(A: Array, rtol: float | Array, lead: tuple[int, ...], route: str | None = None):
    """``(h, rank, route)``: leverage of the rows of ``A`` summed per example (``lead`` the leading shape).

    One compiled program (:func:`basis` and the sum); concrete input that :func:`basis` would start from a
    sketch runs in stages instead (:func:`staged_sketched_leverage`). ``rtol`` as in :func:`basis`; so is a
    negative ``rank`` of a forced fast route (``h`` is then not a leverage: check ``rank >= 0``).
    """
    check_route(route)
    check_tolerances(rtol, 0.0)  # (a Python float is checked without reading a device value back)
    rtol = tolerance(rtol, A.dtype)
    if is_concrete(A) and takes_sketch(A, route):
        h, rank, taken = staged_sketched_leverage(A, rtol, route)
        return sum_per_example(h, lead), rank, taken
    return _row_leverage(A, rtol, lead, route)


@functools.partial(traced.jit, static_argnames=("lead", "route"))
@highest_precision
def _row_leverage(A: Array, rtol: Array, lead: tuple[int, ...], route: str | None = None):
    h, rank, taken = basis(A, rtol, route=route, row_norms=True)
    return sum_per_example(h, lead), rank, taken


def takes_sketch(A: Array, route: str | None) -> bool:
    """Whether :func:`basis` goes to :func:`sketched_basis` for a row matrix of ``A``'s shape and dtype."""
    n, m = A.shape
    return n >= m and A.dtype != jnp.float64 and m >= SKETCH_MIN and route in (None, "shifted")


def staged_sketched_leverage(A: Array, rtol: Array, route: str | None) -> tuple[Array, Array, Array]:
    """:func:`sketched_basis` (row norms) for concrete input, one compiled stage at a time.

    The test :func:`columns_show_ill_conditioning`, then :func:`sketched_rows`, then (when the test said
    no, or a check of the sketched route failed) :func:`gram_basis`, each its own program, with a scalar
    read back between them: the same functions and values, but a first call compiles only the stages it
    runs (the one program of :func:`basis` compiles every branch: at 20,000 × 1,378 in float32, 2.5 s
    against 1.9 s for the test and the sketched route).

    On a CPU (float32 values held by this process, :data:`HOST_FLOAT64_GRAM`), input the test finds
    ill-conditioned first tries route ``"gram"`` with its Gram matrix in float64, by BLAS and LAPACK on
    the host (:mod:`nlis_jax._host_gram`): a float64 ``syrk`` and a float32 ``trmm`` instead of three
    float32 products of ``A``'s size. It is reported as route ``"gram"``; when its checks fail (NaN or
    Inf, rank deficiency for ``rtol``, ``κ`` past its bound) the sketched route follows.
    """
    if route is None:
        if not bool(_ill_conditioned(A)):
            return _gram_leverage(A, rtol, route)
        if HOST_FLOAT64_GRAM and on_host_cpu(A):  # route "gram" from a float64 Gram matrix on the host
            host = float64_gram_transform(A, float(rtol))
            if host is not None:
                h = jnp.asarray(host_row_norms(A, host.transform))
                return h, jnp.asarray(host.rank, jnp.int32), jnp.asarray(GRAM, jnp.int32)
    h, done, rank = _sketched_rows(A, rtol)
    if bool(done):
        return h, rank, jnp.asarray(SHIFTED, jnp.int32)
    return _gram_leverage(A, rtol, route)


#: Whether concrete float32 input on a CPU that would take the sketched shifted route tries route
#: ``"gram"`` with a float64 Gram matrix on the host first (:mod:`nlis_jax._host_gram`).
HOST_FLOAT64_GRAM = True


@traced.jit
@highest_precision
def _ill_conditioned(A: Array) -> Array:
    return columns_show_ill_conditioning(A)


@traced.jit
@highest_precision
def _sketched_rows(A: Array, rtol: Array) -> tuple[Array, Array, Array]:
    return sketched_rows(A, rtol, True)


@functools.partial(traced.jit, static_argnames=("route",))
@highest_precision
def _gram_leverage(A: Array, rtol: Array, route: str | None) -> tuple[Array, Array, Array]:
    return gram_basis(A, rtol, route, True)


@functools.partial(traced.jit, static_argnames=("lead",))
@highest_precision
def ridge_row_leverage(
    A: Array, mantissa: Array, exponent: Array, lead: tuple[int, ...]
) -> tuple[Array, Array, Array, Array]:
    """``(probs, h, eff_dim, total)``: ridge leverage ``h`` of the rows of ``A`` summed per example, its
    probabilities ``h/Σh``, the effective dimension ``Σ h`` and ``total``, 0 only for an all-zero ``A``
    (NaN or Inf when the Gram matrix plus the ridge is out of the dtype's range).

    The ridge is ``λ = mantissa·2^exponent`` (``math.frexp`` of it on the host; ``mantissa`` in ``A``'s
    dtype, ``exponent`` int32): it is scaled with ``A`` before it exists as a number of ``A``'s dtype, so
    a ridge below the dtype's smallest normal number is not flushed to 0 when ``A`` is as small.

    The probabilities come from the relatively weighted row norms of :func:`ridge_transform`, not from
    ``h``: with a ridge far above ``‖A‖²`` the leverage is subnormal or 0 while they stay exact.
    """
    # A (AᵀA + λI)⁻¹ Aᵀ = (cA)((cA)ᵀ(cA) + c²λI)⁻¹(cA)ᵀ: one power of two c for the whole matrix
    # (the ridge fixes a scale, so columns cannot be scaled apart) keeps AᵀA from overflowing
    _, e = jnp.frexp(jnp.max(jnp.abs(A)))
    A, ridge = times_power_of_two(A, -e), jnp.ldexp(mantissa, exponent - 2 * e)
    M, scale = ridge_transform(gram(A), ridge)
    # materialised: XLA:CPU fused the row sums into each of their three consumers (see _row_norms)
    rel = jax.lax.optimization_barrier(sum_per_example(transform_rows(A, M, row_norms=True), lead))
    total = jnp.sum(rel)
    return rel / total, rel * scale, total * scale, total


__all__ = [
    "FAST_ROUTES",
    "ROUTES",
    "Transform",
    "apply_transform",
    "basis",
    "row_leverage",
    "transform_from_passes",
    "transform_stepwise",
]
