r"""Sampling scores of a (dual) matrix: leverage, row norms, linear baselines, uniform, mixing.

Leverage of row ``i`` of ``F`` (shape ``(n, m)``, rank ``r``):

.. math:: h_i = \|U_i\|^2 = \langle e_i, F F^\dagger e_i \rangle,\qquad \tau_i = h_i / r,

``U`` an orthonormal basis of ``range(F)``, computed by one of three exact routes chosen at run time
from the conditioning of the column-equilibrated Gram matrix (:mod:`nlis_jax.routes`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nlis_jax import _traced as traced
from nlis_jax import routes
from nlis_jax._checks import (
    as_probs_vector,
    check_bool,
    check_finite,
    check_floating,
    check_leading_axis,
    check_one_array,
    check_positive,
    check_positive_int,
    check_probs,
    check_real,
    check_tolerances,
    is_concrete,
    probs_tolerance,
    subnormal_only,
    under_trace,
)
from nlis_jax._precision import times_power_of_two
from nlis_jax._types import Array


class Leverage(NamedTuple):
    """Leverage scores with their by-products (``return_info=True`` of the leverage functions).

    Attributes:
      probs: ``(n,)`` sampling probabilities ``leverage / Σ leverage`` (``leverage / rank``: the raw
        leverage sums to the rank to ``eps·κ``, the orthonormality of the basis computed).
      leverage: ``(n,)`` raw (block) leverage ``h_i``, summing to ``rank`` (to ``eps·κ``).
      rank: int32 scalar rank (with ``ridge > 0``: the float effective dimension ``Σ h_i``).
      route: int32 index into :data:`nlis_jax.routes.ROUTES` of the route taken.
    """

    probs: Array
    leverage: Array
    rank: Array
    route: Array


#: An all-zero dual matrix in the streamed norm scores (device and host data).
STREAMED_ZERO_NORMS = "norm scores: the dual matrix is all zeros, so row norms give no distribution."

#: Scores that came out NaN from finite dual rows (streamed leverage, device and host data).
LINEAR_ALGEBRA_FAILED = (
    "the streamed leverage scores came out NaN for {count} examples although every row of the dual matrix "
    "is finite: the linear algebra of the route failed on them (a fault of the numerical library, not of "
    "the model or the data; jaxlib 0.10.2's float64 CPU QR returned NaN for some rank-deficient input). "
    "Please report it with the shapes and dtype; forcing another route (route='gram2', 'stable' or "
    "'shifted') may step around it."
)

ALL_ZERO_MESSAGE = (
    "the dual matrix is all zeros (rank 0), so leverage gives no distribution. Its adjoint columns are "
    "zero, so the model does not depend on θ along the path tθ (constant model, all-zero parameters of a "
    "bias-free ReLU network, every unit dead), and its last column f(0) − y is zero, so f(0) already "
    "fits every point exactly. Check the model and params (or score with uniform_scores). Entries below "
    "the smallest normal number of the dtype (subnormal, e.g. 1e-310 in float64) count as zero on CPUs: "
    "rescale such a matrix first. After a QuadratureWarning the adjoints themselves may be wrong: inputs so "
    "large that ∇f(tθ) is a spike at t = 0 narrower than the rule resolves (standardise the inputs)."
)


def check_rank(rank: Array, route: str | None = None) -> None:
    """Raise ``ValueError`` when a concrete rank (or effective dimension) is 0: all-zero input; or when
    ``route`` forced a fast route on rank-deficient input (:func:`check_forced_route`)."""
    check_forced_route(route, rank)
    check_positive(rank, ALL_ZERO_MESSAGE)


def check_forced_route(route: str | None, rank) -> None:
    """``ValueError`` when ``route`` forced a fast route (``"gram"``, ``"gram2"``) on a matrix that is
    rank-deficient for ``rtol``: those routes count every non-zero column in the rank, and on such input
    their basis spans rounding noise. :func:`nlis_jax.routes.decide` then reports the rank as ``-1``
    (``σ_min/σ_max`` below ``2·rtol``, the margin the automatic choice keeps), and as ``-2`` on a matrix
    more ill-conditioned than the route's limit (:func:`nlis_jax.routes.fast_route_ratio_min`), where its
    scores would be off by ``~eps·κ``. Under tracing, a
    ``checkify`` check (inside ``nlis_jax.traced_checks()``)."""
    if route not in routes.FAST_ROUTES:
        return
    fix = 'Use route="stable", or route=None (chosen from the conditioning).'
    deficient = (
        f'route="{route}" was forced on a matrix that is rank-deficient for rtol (σ_min/σ_max below '
        "2·rtol), or too ill-conditioned for its Gram matrix to tell: that route counts every column in the "
        f"rank. {fix}"
    )
    ill = (
        f'route="{route}" was forced on a matrix too ill-conditioned for it (κ of the column-equilibrated '
        f"Gram matrix beyond 1/(1000·eps), routes.fast_route_ratio_min): its scores would be off by more "
        f"than 1e-3 (eps·κ) and need not sum to 1. {fix}"
    )
    if not is_concrete(rank):
        traced.check(rank != routes.FORCED_RANK_DEFICIENT, deficient)
        traced.check(rank != routes.FORCED_ILL_CONDITIONED, ill)
    elif int(rank) == routes.FORCED_RANK_DEFICIENT:
        raise ValueError(deficient)
    elif int(rank) == routes.FORCED_ILL_CONDITIONED:
        raise ValueError(ill)


def input_dtype(F) -> jnp.dtype:
    """The floating dtype results are returned in: that of ``F`` (computed in float32 if lower)."""
    # canonical: a numpy float64 F without jax_enable_x64 is float32, the dtype jax computes it in
    return jax.dtypes.canonicalize_dtype(F.dtype if hasattr(F, "dtype") else jnp.asarray(F).dtype)


def as_leverage(
    h: Array,
    rank: Array,
    route: Array,
    return_info: bool,
    dtype=None,
    forced: str | None = None,
    rank_seen: int | None = None,
) -> Array | Leverage:
    """Probabilities ``h / Σh`` (:func:`_finish_leverage`), or the whole :class:`Leverage` with
    ``return_info`` (in ``dtype``).

    Raises ``ValueError`` (concrete ``rank`` 0: an all-zero matrix) instead of returning NaN, and for a
    ``forced`` fast route on rank-deficient input (:func:`check_rank`); on ``rank_seen`` (the rank already
    read back with other values) when given, instead of reading ``rank`` back.
    """
    check_rank(rank if rank_seen is None else rank_seen, forced)
    probs, h, _ = _finish_leverage(h, rank, h.dtype if dtype is None else jnp.dtype(dtype))
    return Leverage(probs, h, rank, route) if return_info else probs


@traced.entry
def orthonormal_basis(
    F: Array, *, rtol: float | None = None, route: str | None = None
) -> tuple[Array, Array, Array]:
    r"""An orthonormal basis ``U`` of ``range(F)``, its rank, and the route taken.

    Args:
      F: ``(n, m)`` matrix (or ``(n, k, m)``, treated as ``n·k`` rows).
      rtol: relative tolerance on the singular values of the column-equilibrated ``F`` for the rank
        (default ``10·eps`` of the dtype).
      route: force ``"gram"``, ``"gram2"``, ``"stable"`` or ``"shifted"``; default chooses from ``κ(FᵀF)``
        and ``rtol`` (a fast route forced on input rank-deficient for ``rtol``, or more ill-conditioned
        than the route's limit, :func:`nlis_jax.routes.fast_route_ratio_min`, raises ``ValueError``).

    Returns:
      ``(U, rank, route)``: ``U`` of shape ``(n·k, m)`` whose first ``rank`` columns span ``range(F)``
      (the others are zero, in some order), ``rank`` an int32 scalar, and ``route`` an index into
      :data:`nlis_jax.routes.ROUTES`.
    """
    routes.check_route(route)
    check_tolerances(rtol, 0.0)
    rows, _ = routes.as_rows(F)
    # the input's own eps (half precision is computed in float32, but its rounding is that of F's dtype)
    rtol = routes.default_rtol(input_dtype(F)) if rtol is None else rtol
    U, rank, taken = routes.basis(rows, routes.tolerance(rtol, rows.dtype), route=route)
    U_out, status = _finish_basis(U, rank, input_dtype(F))
    check_outputs(F, U, rank, status, route, rows)  # F was checked: NaN in U is a failed factorization
    return U_out, rank, taken


@functools.partial(traced.jit, static_argnames="dtype")
def _finish_basis(U: Array, rank: Array, dtype) -> tuple[Array, Array]:
    """``U``'s columns in ``dtype``, the orthonormal ones first (a stable order: the Gram routes leave the
    zero column of an all-zero input column where that column was, so the first ``rank`` columns missed a
    direction), and :func:`output_status`."""
    zero = jnp.sum(jnp.square(U), axis=0) < 0.25  # an orthonormal column has norm 1, the others 0
    return U[:, jnp.argsort(zero, stable=True)].astype(dtype), output_status(U, rank)


@traced.entry
def leverage_scores(
    F: Array,
    *,
    rtol: float | None = None,
    ridge: float = 0.0,
    route: str | None = None,
    return_info: bool = False,
) -> Array | Leverage:
    r"""Leverage-score sampling probabilities :math:`\tau_i = h_i / \mathrm{rank}(F)` (divided by
    :math:`\sum_i h_i`, equal to the rank to rounding: they sum to 1).

    Args:
      F: the dual matrix ``(n, p+1)``, or a block dual matrix ``(n, k, p+1)`` (block leverage: the sum
        of each example's ``k`` row leverages).
      rtol: rank tolerance relative to the largest singular value of the column-equilibrated ``F``
        (default ``10·eps`` of the dtype). In bfloat16 that is 0.078: a direction whose singular value
        is below 7.8% of the largest is not counted (a tanh model's residual direction at 6.8%: rank 5
        of 6, probabilities up to 79% off), though bfloat16's rounding moves them by only about
        ``2⁻⁸·√m``; pass a smaller ``rtol`` (``1e-2``) or compute ``F`` in float32 where that matters
        (:func:`nlis_jax.projected_leverage_scores` forms its ``Y`` in float32 and uses float32's).
        On a CPU, values below the dtype's smallest normal number count as 0 (a column of float32
        ``1e-39`` is not counted): rescale such columns.
      ridge: ``λ ≥ 0``; with ``λ > 0`` ridge leverage ``h_i = [F (FᵀF + λI)^{-1} Fᵀ]_ii`` normalised by
        the effective dimension ``Σ h_i`` (one Gram pass, then the eigendecomposition of the
        column-equilibrated ``FᵀF + λI``: :func:`nlis_jax.routes.ridge_transform`).
      route: force ``"gram"``, ``"gram2"``, ``"stable"`` or ``"shifted"`` (default: chosen from the
        conditioning and ``rtol``). The fast routes ``"gram"`` and ``"gram2"`` count every column in the
        rank: forced on input that is rank-deficient for ``rtol``, or more ill-conditioned than they
        can handle (:func:`nlis_jax.routes.fast_route_ratio_min`: ``κ(G_eq) > 1/(1000·eps)``), they
        raise ``ValueError``.
      return_info: return a :class:`Leverage` (probabilities, raw leverage, rank, route) instead.

    Returns:
      ``(n,)`` probabilities (non-negative, summing to 1), dtype of ``F``; or a :class:`Leverage`.

    Fewer rows than columns (``n·k < m``, e.g. a model with more parameters than examples): no ``m × m``
    Gram matrix; full row rank certified from the eigenvalues of the ``n·k × n·k`` Gram matrix of the
    column-equilibrated rows (every leverage then exactly 1), else the Householder QR of the
    column-equilibrated ``Fᵀ`` and the SVD of its R factor (``O(n²m)``,
    :func:`nlis_jax.routes.wide_basis`); reported as route ``"stable"``.

    Every magnitude of normal numbers is handled (columns are scaled by powers of two), but XLA on a CPU
    flushes subnormal numbers (below ``finfo(dtype).smallest_normal``: ``1.2e-38`` in float32) to zero:
    a column made of them counts as a zero column. Rescale such data before scoring.
    """
    routes.check_route(route)
    check_tolerances(rtol, ridge)
    check_bool("return_info", return_info)
    # NaN/Inf of concrete input: checked on the result below (one pass fewer); traced input: checkify
    if not is_concrete(ridge):
        raise TypeError(
            "ridge must be a concrete number, not a traced value: it chooses the algorithm (ridge > 0: "
            "ridge leverage, 0: the rank-revealing routes); under jax.jit close over it or make it static."
        )
    if ridge > 0 and (route is not None or rtol is not None):  # they were ignored silently
        raise ValueError(
            "ridge > 0 computes ridge leverage from the eigendecomposition of the equilibrated FᵀF + λI "
            "(one Gram pass, no rank tolerance): route and rtol would be ignored; pass them only with "
            "ridge=0."
        )
    rows, lead = routes.as_rows(F, check_values=ridge > 0 or not is_concrete(F))
    if ridge > 0:
        if float(ridge) > float(jnp.finfo(rows.dtype).max):
            raise ValueError(f"ridge = {ridge} overflows F's dtype {rows.dtype}.")
        mantissa, exponent = math.frexp(float(ridge))  # exact; scaled with F before it is cast
        lam = (jnp.asarray(mantissa, rows.dtype), jnp.asarray(exponent, jnp.int32))
        probs, h, eff_dim, total = routes.ridge_row_leverage(rows, *lam, lead)
        if is_concrete(probs) and not (bool(total == 0) or bool(jnp.all(jnp.isfinite(probs)))):
            raise ValueError(
                f"the ridge leverage of F is not finite in {rows.dtype}: F's Gram matrix plus the ridge "
                "is out of this dtype's range (columns whose squared norms span more than the range, or a "
                "ridge far below them); compute in float64 or rescale F's columns."
            )
        check_rank(total)  # 0 only for an all-zero F
        dtype = input_dtype(F)
        probs, h = probs.astype(dtype), h.astype(dtype)
        return Leverage(probs, h, eff_dim.astype(dtype), jnp.asarray(0, jnp.int32)) if return_info else probs
    rtol = routes.default_rtol(input_dtype(F)) if rtol is None else rtol  # F's eps, as orthonormal_basis
    h, rank, taken = routes.row_leverage(rows, rtol, lead, route=route)
    probs, h_out, status = _finish_leverage(h, rank, input_dtype(F))
    check_outputs(F, h, rank, status, route, rows)
    return Leverage(probs, h_out, rank, taken) if return_info else probs


@functools.partial(traced.jit, static_argnames="dtype")
def _finish_leverage(h: Array, rank: Array, dtype) -> tuple[Array, Array, Array]:
    """The end of :func:`leverage_scores` as one program: the probabilities ``h / Σh`` and ``h`` in
    ``dtype``, and :func:`output_status`.

    ``Σh = ‖U‖_F² = rank`` for an orthonormal basis ``U``; dividing by the sum rather than the rank keeps
    the probabilities summing to 1 where ``U`` is orthonormal only to ``eps·κ`` (float64 streaming on
    route ``"stable"``, forced fast routes), where ``h / rank`` summed to ``1 + 3e-8`` at ``κ ≈ 3e10``
    and to ``1 + 2.5e-3`` near the rank tolerance (more than :func:`nlis_jax.sample` accepts).
    """
    probs = h / jnp.sum(h)
    return probs.astype(dtype), h.astype(dtype), output_status(h, rank)


def output_status(out: Array, rank: Array) -> Array:
    """``[rank, out is NaN]`` as one ``(2,)`` int32 array, to read back in one transfer (every route's
    output is NaN throughout for non-finite input: :func:`nlis_jax.routes.raise_if_nonfinite`)."""
    return jnp.stack([rank.astype(jnp.int32), jnp.isnan(out.reshape(-1)[0]).astype(jnp.int32)])


def check_outputs(
    F: Array, out: Array, rank: Array, status: Array, route: str | None, rows: Array | None = None
) -> None:
    """The checks after a route on unchecked ``F``, from one read back of :func:`output_status`: NaN in
    ``out`` first (NaN input is not an all-zero matrix; for checked ``F``, a failed factorization), then,
    below full column rank, columns of ``rows`` (``F`` as rows) lost to flushed subnormal numbers
    (:func:`check_flushed_columns`), then the rank (:func:`check_rank`). Under tracing, the rank's
    ``checkify`` checks."""
    if not is_concrete(status):
        if rows is not None and traced.enabled():  # inside traced_checks(): a checkify check of its own
            lost = jnp.any(_flushed_columns(rows)) & (rank < rows.shape[-1])  # as eagerly: rank-deficient
            traced.check(~lost, FLUSHED_COLUMNS)
        check_rank(rank, route)
        return
    rank_seen, nan_seen = status.tolist()
    if nan_seen:
        routes.raise_if_nonfinite("F", F, out)
    if rows is not None and rank_seen < rows.shape[-1]:  # the rank-deficient path only: no cost otherwise
        check_flushed_columns(rows)
    check_rank(rank_seen, route)


def check_flushed_columns(rows: Array) -> None:
    """``ValueError`` naming the columns of ``rows`` whose non-zero values are all below the dtype's
    smallest normal number: a CPU (and XLA's GPU kernels) flush them to 0, so such a column was not counted
    in the rank (a float32 column of ``1e-39``: rank 3 of 4, probabilities 96% off), and an all-subnormal
    ``F`` was called all zeros."""
    tiny = jnp.finfo(rows.dtype).smallest_normal
    lost = np.flatnonzero(np.asarray(_flushed_columns(rows)))
    if lost.size:
        shown = ", ".join(str(int(c)) for c in lost[:8]) + (", ..." if lost.size > 8 else "")
        why = FLUSHED_COLUMNS[FLUSHED_COLUMNS.index("the device") :]
        raise ValueError(
            f"F has {lost.size} column(s) ({shown}) whose values are all subnormal, below {rows.dtype}'s "
            f"smallest normal number ({float(tiny):.3g}): {why}"
        )


#: Why subnormal-only columns are refused, and what to do (the traced check says it without the counts).
FLUSHED_COLUMNS = (
    "F has a column whose values are all subnormal, below its dtype's smallest normal number: the device "
    "flushes them to 0, so they would not count in the rank. Rescale those columns (leverage does not "
    "change when a column is scaled) or compute in a wider dtype."
)


#: ``(m,)`` bool: the column of the rows has a non-zero value and all of them are subnormal.
_flushed_columns = traced.jit(functools.partial(subnormal_only, axis=0))


@traced.entry
def norm_scores(F: Array) -> Array:
    r"""Row-norm probabilities :math:`\|F_i\|^2 / \|F\|_F^2`; block Frobenius norms for ``(n, k, m)``.

    Args:
      F: ``(n, m)`` matrix (a dual matrix ``(n, p+1)``), or ``(n, k, m)`` blocks (one per example).

    Returns:
      ``(n,)`` probabilities (non-negative, summing to 1), dtype of ``F`` (half precision computed in
      float32). An all-zero ``F`` raises ``ValueError``.

    Every magnitude of normal numbers is handled, but XLA on a CPU flushes subnormal numbers (below
    ``finfo(dtype).smallest_normal``: ``1.2e-38`` in float32) to zero: they count as 0, and a row made of
    them gets probability 0 (never sampled). Rescale such data before scoring (the scores do not change).
    """
    # NaN or Inf in a concrete F makes the total NaN (the scaling by its largest entry): named from there,
    # not by a pass of its own over F (40% of the call at 200,000 × 65 in float32)
    # (a concrete F closed over by a user's jit is checked as it is traced, as before)
    rows, lead = routes.as_rows(F, check_values=not is_concrete(F) or under_trace())
    sq = _row_norms(rows, lead)
    total = jnp.sum(sq)
    if is_concrete(total) and not bool(jnp.isfinite(total)):
        check_finite("F", F)
    message = (
        "norm_scores: F is all zeros, so row norms give no distribution (entries below the smallest "
        "normal number of the dtype, subnormal, count as zero on CPUs: rescale such a matrix first)."
    )
    check_positive(total, message)
    return (sq / total).astype(input_dtype(F))


@functools.partial(traced.jit, static_argnames=("lead",))
def _row_norms(rows: Array, lead: tuple[int, ...]) -> Array:
    """Squared (block) row norms of ``rows · 2^-e``, ``2^e`` near the max-abs: squares cannot overflow.

    Materialised (``optimization_barrier``): inside one program (a user's ``jax.jit`` of
    :func:`norm_scores`) XLA:CPU fused the row sums into both of their consumers, the total and the
    division by it, and computed them again: 20-30 ms where the eager call's separate programs took 5
    (200,000 × 72, float32)."""
    _, e = jnp.frexp(jnp.max(jnp.abs(rows)))
    sq = routes.sum_per_example(jnp.sum(jnp.square(times_power_of_two(rows, -e)), axis=1), lead)
    return jax.lax.optimization_barrier(sq)


def linear_design(xs: Array, ys: Array | None = None, *, bias: bool = False) -> Array:
    """The linear baseline's data matrix ``[X, 1?, −y?]`` of shape ``(n, d + bias + (ys given))``."""
    # a pytree of inputs, as a model takes them: it read as "got ()"
    check_one_array("xs", xs, "of shape (n, d, ...)", "concatenate a pytree's features into one (n, d) array")
    # Python lists as numpy arrays (jnp.shape and jnp.result_type of a list are deprecated or fail)
    xs, ys = (np.asarray(a) if isinstance(a, list | tuple) else a for a in (xs, ys))
    if jnp.ndim(xs) < 2:
        raise ValueError(f"xs must have shape (n, d, ...), got {jnp.shape(xs)}.")
    check_leading_axis("xs", xs)
    check_floating("xs", xs)
    bias = check_bool("bias", bias)
    if 0 in jnp.shape(xs)[1:] and not bias and ys is None:  # else the route's error named an internal F
        raise ValueError(
            f"xs has no features (shape {np.shape(xs)}) and neither bias=True nor ys adds a column: the "
            "linear design [X, 1?, −y?] would be empty."
        )
    check_finite("xs", xs)  # before any cast: finite values beyond float32 are reported as such below
    xs = jnp.asarray(xs)
    check_finite("xs cast to a jax array (finite values beyond its dtype's range)", xs)
    n = xs.shape[0]
    if ys is not None:
        if jnp.shape(ys) != (n,):
            raise ValueError(f"ys must have shape ({n},) to match xs, got {jnp.shape(ys)}.")
        if jnp.issubdtype(jnp.result_type(ys), jnp.complexfloating):  # the cast would drop the imaginary part
            raise TypeError(f"ys must be real, got {jnp.result_type(ys)}.")
        check_finite("ys", ys)
        ys = jnp.asarray(ys).astype(xs.dtype)
        check_finite(f"ys cast to xs's dtype {xs.dtype} (finite ys beyond that dtype's range)", ys)
    return _design(xs, ys, bias=bias)


@functools.partial(traced.jit, static_argnames="bias")
def _design(xs: Array, ys: Array | None, *, bias: bool) -> Array:
    """``[X, 1?, −y?]`` in one program (``ys`` already in ``xs``'s dtype)."""
    X = xs.reshape(xs.shape[0], -1)
    cols = [X]
    if bias:
        cols.append(jnp.ones((X.shape[0], 1), X.dtype))
    if ys is not None:
        cols.append(-ys[:, None])
    return jnp.concatenate(cols, axis=1)


@traced.entry
def linear_leverage_scores(xs, ys=None, *, bias: bool = False, rtol: float | None = None) -> Array:
    r"""Leverage scores of the data matrix itself, ``[X, 1?, −y?]``: the linear baseline.

    Args:
      xs: ``(n, d)`` inputs (higher-rank inputs are flattened per example).
      ys: ``(n,)`` targets; when given, ``−y`` is appended as the last column.
      bias: append a column of ones.
      rtol: rank tolerance, as in :func:`leverage_scores`.

    Returns:
      ``(n,)`` probabilities :math:`h_i/\mathrm{rank}` of ``[X, 1?, −y?]``, dtype of ``xs``.
    """
    return leverage_scores(linear_design(xs, ys, bias=bias), rtol=rtol)


@traced.entry
def linear_norm_scores(xs, ys=None, *, bias: bool = False) -> Array:
    r"""Row-norm scores of the data matrix ``[X, 1?, −y?]``: the linear baseline.

    Args:
      xs, ys, bias: as in :func:`linear_leverage_scores`.

    Returns:
      ``(n,)`` probabilities :math:`\|[X, 1?, −y?]_i\|^2 / \|[X, 1?, −y?]\|_F^2`.
    """
    return norm_scores(linear_design(xs, ys, bias=bias))


def uniform_scores(n: int, dtype=None) -> Array:
    """Uniform sampling probabilities, :math:`p_i = 1/n`.

    Args:
      n: number of points, a positive int.
      dtype: a floating dtype; default jax's default float (float32 unless ``jax_enable_x64``).

    Returns:
      ``(n,)`` vector of ``1/n`` in ``dtype``.

    Raises:
      TypeError: ``n`` not an int, ``dtype`` not floating.
      ValueError: ``n < 1``, or ``n`` copies of ``1/n`` rounded to ``dtype`` do not sum to 1 (half
        precision at large ``n``).
    """
    check_positive_int("n", n)
    dtype = dtype or jnp.result_type(float)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"uniform_scores: dtype must be a floating dtype, got {jnp.dtype(dtype)}.")
    value = np.asarray(1.0 / n, dtype)
    if abs(float(value) * n - 1) > probs_tolerance(jnp.dtype(dtype)):
        raise ValueError(
            f"uniform_scores: 1/n = 1/{n} rounds to {float(value):.4g} in {jnp.dtype(dtype)}, whose n copies "
            "do not sum to 1; use float32 or wider."
        )
    return jax.device_put(np.full((n,), value, dtype))  # jnp.full would compile a program per n


@traced.entry
def mix_with_uniform(probs: Array, alpha: float) -> Array:
    r"""``(1 − α)·p + α/n``: keeps every point reachable (``p_i ≥ α/n``).

    Args:
      probs: ``(n,)`` probabilities.
      alpha: mixing weight in ``[0, 1]``.

    Returns:
      ``(n,)`` probabilities in the dtype of ``probs``, each at least ``α/n``.
    """
    probs = as_probs_vector(probs)  # a list or tuple of floats, as sample accepts them
    check_probs(probs)
    if is_concrete(alpha) and not 0.0 <= check_real("alpha", alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    probs = jnp.asarray(probs)
    if not jnp.issubdtype(jnp.result_type(alpha), jnp.number) or jnp.ndim(alpha) != 0:
        raise TypeError(f"alpha must be a real scalar, got {alpha!r}.")
    if not is_concrete(alpha):  # a checkify check inside nlis_jax.traced_checks(), else nothing
        traced.check((alpha >= 0) & (alpha <= 1), "alpha must lie in [0, 1].")
    if is_concrete(alpha) and float(alpha) > 0:
        n = probs.shape[0]

        def share(a: float):  # a/n as the device forms it (a cast to the dtype, then divided): below the
            # smallest normal number it is flushed to 0 there; n past float16's range is Inf there too
            with np.errstate(over="ignore"):
                return np.asarray(a, probs.dtype) / np.asarray(n, probs.dtype)

        tiny = np.finfo(probs.dtype).smallest_normal
        if not share(float(alpha)) >= tiny:  # the promise p_i ≥ α/n would fail
            wider = [
                t for t in ("float32", "float64") if tiny > np.finfo(t).smallest_normal <= float(alpha) / n
            ]
            other = "".join(f"{t} probabilities" for t in wider[:1])
            other += " (with jax_enable_x64)" if wider[:1] == ["float64"] else ""
            advice = n * float(tiny) * 1.01  # rounded up: the advised alpha passes
            if advice > 1:  # α = 1, the uniform distribution, is the last resort
                advice = 1.0 if share(1.0) >= tiny else None
            if advice is None:
                fix = f"no alpha <= 1 can (1/n is below it too){'; use ' + other if other else ''}"
            else:
                fix = f"use alpha >= {advice:.3g}{', or ' + other if other else ''}"
            raise ValueError(
                f"alpha/n = {float(alpha)}/{n} is below the smallest normal number of {probs.dtype} "
                f"({float(tiny):.3g}): the mixture cannot keep every point reachable; {fix}."
            )
    return _mix(probs, alpha)


@traced.jit
def _mix(probs: Array, alpha) -> Array:
    """``(1 − α)·p + α/n`` in one program, ``α`` in ``probs``' dtype (not ``alpha``'s)."""
    alpha = jnp.asarray(alpha).astype(probs.dtype)
    return (1 - alpha) * probs + alpha / probs.shape[0]
