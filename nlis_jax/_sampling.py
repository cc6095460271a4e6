r"""Weighted row sampling, the sample-size calculator, and the measured distortion of a sample.

**With replacement** (the paper's scheme): ``s`` i.i.d. draws with ``P(i) = p_i`` and weights
``w_j = 1/(s·p_{i_j})``, so that ``L_S(θ) = Σ_j w_j r_{i_j}(θ)²`` is unbiased for ``L(θ) = Σ_i r_i(θ)²``.

**Without replacement**: priority sampling (Duffield, Lund & Thorup, J. ACM 54(6), 2007). Draw
``u_i ~ U(0, 1]``, give row ``i`` the priority ``q_i = p_i / u_i``, keep the ``s`` rows of highest priority
and let ``τ`` be the ``(s+1)``-th highest priority (``τ = 0`` when ``s = n``). The weight of a kept row is
``w_i = max(1, τ / p_i)``. Conditioned on the other rows, row ``i`` is kept exactly when ``q_i > τ'``
(``τ'`` the ``s``-th highest priority among the others, which equals ``τ`` when ``i`` is kept), which has
probability ``min(1, p_i/τ')``, so ``E[w_i 1{i kept}] = 1``: ``Σ_{kept} w_i v_i`` is unbiased for
``Σ_i v_i`` for any values ``v``, with exactly ``s`` distinct rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from nlis_jax import _traced as traced
from nlis_jax._checks import (
    as_probs_vector,
    check_bool,
    check_finite,
    check_floating,
    check_key,
    check_nonnegative,
    check_positive_int,
    check_probs,
    check_real,
    is_concrete,
    probs_summary,
    value_range,
)
from nlis_jax._precision import at_least_float32, highest_precision
from nlis_jax._scores import orthonormal_basis
from nlis_jax._types import Array, PRNGKey

# ---------------------------------------------------------------------------------------------------
# Draws with replacement: inverse CDF at a resolution finer than any row's probability.
#
# ``jax.random.choice`` searches a float32 uniform in the float32 cumulative sum: a row whose probability
# is below the sum's rounding near 1 (6e-8) gets an empty interval, so at n = 4·10⁶ (exponential scores)
# 7.7% of the rows could never be drawn while their weights assumed they could. With x64 the search runs
# in float64 (53-bit uniforms, resolution 1e-16). Without, the cumulative sum is a double-float (a
# float32 pair ``hi + lo``, ~48 bits) and so is the uniform (two 24-bit words): resolution 2^-48 ≈ 4e-15.


#: The most draws one :func:`sample` call makes (its indices are int32).
INT32_MAX = 2**31 - 1


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _dd_add(x: tuple[Array, Array], y: tuple[Array, Array]) -> tuple[Array, Array]:
    """Double-float addition of ``(hi, lo)`` pairs, renormalised (``|lo| ≤ ulp(hi)/2``)."""
    s, e = _two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    hi = s + e
    return hi, e - (hi - s)


def _dd_greater(a: tuple[Array, Array], b: tuple[Array, Array]) -> Array:
    """``a > b`` for renormalised double-floats (lexicographic on ``(hi, lo)``)."""
    return (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] > b[1]))


def first_above(above, n: int, num_samples: int) -> Array:
    """``(num_samples,)`` int32: for each sample the first index ``i < n`` where ``above(i)`` holds (or
    ``n - 1``), by bisection; ``above(mid)`` maps ``(num_samples,)`` int32 indices to bools and must be
    monotone in the index (a cumulative sum against a target)."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2  # (lo + hi) wrapped around in int32 from n > 2^30: wrong rows, silently
        up = above(mid)
        return jnp.where(up, lo, mid + 1), jnp.where(up, mid, hi)

    start = (jnp.zeros((num_samples,), jnp.int32), jnp.full((num_samples,), n - 1, jnp.int32))
    return jax.lax.fori_loop(0, max(1, n.bit_length()), halve, start)[0]


def _double_float_draws(key: PRNGKey, probs: Array, num_samples: int) -> Array:
    """``num_samples`` indices drawn by ``probs`` (float32, non-negative, positive sum): the first row
    whose double-float cumulative sum exceeds ``u·T``, ``u`` a 48-bit uniform and ``T`` the total."""
    n = probs.shape[0]
    p = probs / jnp.sum(probs)  # each entry rounded once (relative 6e-8); the sum T is 1 + O(eps)
    cdf = jax.lax.associative_scan(_dd_add, (p, jnp.zeros_like(p)))  # log-depth: error O(log n · eps²)
    bits = jax.random.bits(key, (num_samples, 2), jnp.uint32) >> 8  # two 24-bit words
    u_hi = bits[:, 0].astype(jnp.float32) * 2.0**-24
    u_lo = bits[:, 1].astype(jnp.float32) * 2.0**-48
    delta = (cdf[0][-1] - 1) + cdf[1][-1]  # T − 1, exact to rounding (Sterbenz)
    target = _dd_add((u_hi, u_lo), (u_hi * delta, jnp.zeros_like(u_hi)))  # u·T = u + u·(T − 1)

    idx = first_above(lambda mid: _dd_greater((cdf[0][mid], cdf[1][mid]), target), n, num_samples)
    last = n - 1 - jnp.argmax(p[::-1] > 0)  # a target rounded up to T: the last row of positive probability
    return jnp.minimum(idx, last).astype(jnp.int32)


def _replicated(probs) -> jax.sharding.NamedSharding | None:
    """The replicated sharding over the mesh of a sharded concrete ``probs`` (``None`` otherwise).

    The draws search the whole cumulative sum for every sample: on a vector sharded over the devices
    (the scores of a row-sharded dual matrix) XLA's partitioned search took ~1000× the time of the same
    draw on one device (``jax.random.choice``, ``n = 2^18``, ``s = 2^14``: 18 s against 0.015 s). One
    all-gather of the ``(n,)`` vector first costs far less and changes no draw."""
    sharding = getattr(probs, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.is_fully_replicated:
        return None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


@functools.partial(traced.jit, static_argnames=("num_samples", "replicated"))
def _sample_with_replacement(key, probs, num_samples, replicated=None):
    n = probs.shape[0]
    # at least float32 (s·p_i overflows float16 from s ≈ 65,520); weights from the normalised vector,
    # as the draws (a traced probs vector is not checked to sum to one)
    wide = probs.astype(at_least_float32(probs.dtype))
    if replicated is not None:
        wide = jax.lax.with_sharding_constraint(wide, replicated)
    if jax.config.jax_enable_x64:
        wide64 = wide.astype(jnp.float64)
        idx = jax.random.choice(key, n, shape=(num_samples,), replace=True, p=wide64).astype(jnp.int32)
    else:
        idx = _double_float_draws(key, wide, num_samples)
    return idx, (jnp.sum(wide) / (num_samples * wide[idx])).astype(probs.dtype)


def _fine_uniform(key: PRNGKey, shape: tuple[int, ...], dtype) -> Array:
    """Uniforms in ``(0, 1)`` of relative precision ``eps(dtype)`` down to ``2^-64`` (``dtype`` float32 or
    wider): ``(k₁ + k₂·2^-32 + ½·2^-32)·2^-32`` from two 32-bit words. ``jax.random.uniform`` spaces its
    values ``2^-23`` apart, so a float32 priority ``p/u`` could not tell small ``u`` apart."""
    k = jax.random.bits(key, (2, *shape), jnp.uint32).astype(dtype)
    return (k[0] + (k[1] + 0.5) * 2.0**-32) * 2.0**-32


def priority_reachable(probs):
    """``(p, reach)``: ``probs`` (numpy or jax) in the dtype priority sampling computes in, at least
    float32 (half-precision probabilities widened), and the rows it can draw, ``p`` at least that dtype's
    smallest normal number (denormals count as zero: flushed on most devices)."""
    wide = at_least_float32(probs.dtype)
    p = probs.astype(wide)
    return p, p >= jnp.finfo(wide).tiny


@functools.partial(traced.jit, static_argnames=("num_samples",))
def _sample_priority(key, probs, num_samples):
    n = probs.shape[0]
    p_all, reach = priority_reachable(probs)
    wide = p_all.dtype
    p_all = jnp.where(reach, p_all, 0)
    priority = p_all / _fine_uniform(key, (n,), wide)
    k = min(num_samples + 1, n)
    top, idx = jax.lax.top_k(priority, k)
    tau = top[num_samples] if num_samples < n else jnp.zeros((), wide)
    idx = idx[:num_samples]
    p = p_all[idx]
    # a zero-probability row is kept only when fewer than s rows are positive (traced probs): weight 0
    w = jnp.where(p > 0, jnp.maximum(1.0, tau / jnp.where(p > 0, p, 1)), 0)
    return idx, w.astype(probs.dtype)


@traced.entry
def sample(key: PRNGKey, probs: Array, num_samples: int, *, replace: bool = True) -> tuple[Array, Array]:
    r"""Draw ``num_samples`` row indices by ``probs`` with unbiased importance weights.

    Args:
      key: a ``jax.random`` key (used once; split it yourself for further draws): ``jax.random.key(0)``
        or a raw ``jax.random.PRNGKey(0)``; a plain int is refused (``TypeError``).
      probs: ``(n,)`` floating probabilities, non-negative and summing to 1 (an array, or a list or tuple
        of floats): within 1e-8 in float64, 1e-3 in float32 and 4 units of rounding in half precision
        (``ValueError`` beyond); the draw divides by the sum, so a sum within that tolerance biases nothing.
      num_samples: ``s`` (static). With replacement any ``s ≥ 1``; without, ``1 ≤ s ≤ #{p_i > 0}``.
      replace: ``True``: i.i.d. draws, weights ``1/(s·p_i)``. ``False``: priority sampling, weights
        ``max(1, τ/p_i)`` (see the module docstring). Must be a bool (``TypeError`` otherwise: a string
        such as ``"no"`` would decide by its truthiness).

    Returns:
      ``(indices (s,) int32, weights (s,))`` (weights in the dtype of ``probs``);
      ``Σ_j weights_j v[indices_j]`` is unbiased for ``Σ_{i: p_i > 0} v_i`` (rows of probability 0 are never
      drawn: mix in the uniform distribution, :func:`nlis_jax.mix_with_uniform`, to reach every row; a
      probability below its dtype's smallest normal number counts as 0, as a CPU flushes it).
      Half-precision weights are rounded once to their dtype, a fixed relative bias up to ``2⁻⁹`` in
      bfloat16 (``1/(3·0.001)`` becomes 334): pass float32 ``probs`` for estimates finer than that.
    """
    check_key("key", key)
    replace = check_bool("replace", replace)
    probs = as_probs_vector(probs)
    n = check_probs(probs)
    s = check_positive_int("num_samples", num_samples)
    if s > INT32_MAX:  # the indices and the draw's counts are int32
        raise ValueError(f"num_samples={s} exceeds {INT32_MAX} (2**31 - 1), the most one call draws.")
    if n > INT32_MAX:  # an index past it would wrap around
        raise ValueError(
            f"probs has n={n} entries, more than the int32 indices reach ({INT32_MAX}): sample within "
            "blocks of fewer rows."
        )
    probs = jnp.asarray(probs)
    if not replace:
        if s > n:
            raise ValueError(f"num_samples={s} exceeds n={n}: cannot sample without replacement.")
        summary = probs_summary(probs)
        if summary is not None:
            positive = summary[-1]
            if s > positive:
                raise ValueError(
                    f"num_samples={s} exceeds the {positive} rows with positive probability; "
                    "sampling without replacement cannot reach the rest (mix with uniform first)."
                )
        elif not is_concrete(probs):  # traced: a checkify check inside nlis_jax.traced_checks()
            traced.check(
                jnp.count_nonzero(probs > 0) >= s,
                f"num_samples={s} exceeds the number of rows with positive probability; sampling without "
                "replacement cannot reach the rest (mix with uniform first).",
            )
        idx, w = _sample_priority(key, probs, s)
    else:
        idx, w = _sample_with_replacement(key, probs, s, _replicated(probs))
    if jnp.finfo(probs.dtype).bits < 32 and is_concrete(w) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(
            f"a weight 1/(s·p_i) overflows {probs.dtype} (beyond {float(jnp.finfo(probs.dtype).max):g}): "
            "pass probs as float32."
        )
    return idx, w


@traced.entry
def sample_size(epsilon: float, delta: float, rank: int, *, beta: float = 1.0) -> int:
    r"""Rows to sample (with replacement) for a ``(1 ± ε)`` subspace embedding w.p. ``≥ 1 − δ``.

    Sampling by ``β``-approximate leverage scores (``p_i ≥ β h_i / d``, ``d`` = rank) with

    .. math:: s \ge \Big(\frac{2}{\varepsilon^2} + \frac{2}{3\varepsilon}\Big)\, m\,
              \ln\frac{2d}{\delta},\qquad m = \max\Big(\frac{d}{\beta} - 1,\ 1\Big),

    guarantees ``‖U_Sᵀ W U_S − I‖₂ ≤ ε``, hence ``(1 − ε)‖F̃v‖² ≤ ‖S F̃ v‖² ≤ (1 + ε)‖F̃v‖²`` for all
    ``v``. Derivation (matrix Bernstein, Tropp 2015, Thm 6.1.1): ``U_SᵀWU_S − I = Σ_j Z_j`` with
    ``Z_j = (U_iᵀU_i/p_i − I)/s`` independent and centred; the eigenvalues of ``U_iᵀU_i/p_i`` are
    ``h_i/p_i ≤ d/β`` and 0, so ``‖Z_j‖ ≤ m/s =: L``; and ``Σ_j E Z_j² ⪯ (Σ_i (h_i/p_i) U_iᵀU_i − I)/s
    ⪯ (d/β − 1) I/s``, so ``σ² ≤ m/s``. Bernstein: ``P(‖ΣZ_j‖ ≥ ε) ≤ 2d exp(−(ε²/2)/(σ² + Lε/3))
    = 2d exp(−s ε² / (2m(1 + ε/3)))``; setting this to ``δ`` gives the bound above.

    Args:
      epsilon: distortion ``ε`` in ``(0, 1)``.
      delta: failure probability in ``(0, 1)``.
      rank: ``d ≥ 1``, the rank of the dual matrix: an int, or a 0-d integer array such as the ``rank``
        of ``leverage_scores(F, return_info=True)``.
      beta: ``β ∈ (0, 1]`` (1 for exact leverage; ``c1/c2`` for linear scores of a bounded-Swish model).

    ``epsilon``, ``delta`` and ``beta`` must be real numbers, 0-d numpy and jax arrays included
    (``TypeError`` for strings, bools and arrays that are not 0-d).

    Returns:
      The smallest integer ``s`` satisfying the bound.
    """
    epsilon = check_real("epsilon", epsilon)
    delta = check_real("delta", delta)
    beta = check_real("beta", beta)
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")
    d = _check_rank(rank)
    if not 0 < beta <= 1:
        raise ValueError(f"beta must lie in (0, 1], got {beta}.")
    try:
        m = max(d / beta - 1.0, 1.0)
        log_m, log_2d = math.log(m), math.log(2.0 * d)
    except OverflowError:  # a rank past 2^1024 as a float: its logarithm (math.log takes any int)
        m, log_m = math.inf, math.log(d) - math.log(beta)
        log_2d = math.log(2) + math.log(d)
    log_s = math.log(2.0 + 2.0 * epsilon / 3.0) - 2.0 * math.log(epsilon) + log_m
    log_term = log_2d - math.log(delta)  # log(2d/δ): 2d/δ itself overflows for tiny δ
    log_s += math.log(log_term)
    if log_s > math.log(2.0**62):
        rank_text = f"{d:g}" if d < 1e300 else f"about 10^{len(str(d)) - 1}"
        raise ValueError(
            f"epsilon={epsilon:g}, delta={delta:g}, rank={rank_text}, beta={beta:g} ask for about "
            f"10^{log_s / math.log(10):.0f} rows (more than 2^62; the size grows as rank/beta over "
            "epsilon²): choose a larger epsilon, or check the rank."
        )
    return int(math.ceil((2.0 / epsilon**2 + 2.0 / (3.0 * epsilon)) * m * log_term))


def _check_rank(rank) -> int:
    """``rank`` as a positive Python int: an int, a numpy integer or a concrete 0-d integer array (e.g. the
    int32 ``Leverage.rank``); ``TypeError`` for floats, bools and other arrays, ``ValueError`` for ``< 1``."""
    dtype = getattr(rank, "dtype", None)
    if dtype is not None and not isinstance(rank, np.generic):
        if not is_concrete(rank):
            raise TypeError(
                "rank must be a concrete integer, not a traced value (a Leverage.rank computed under "
                "jax.jit): sample_size returns a Python int, so call it outside the jit."
            )
        if not (jnp.shape(rank) == () and jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"rank must be a Python int or a 0-d integer array (such as Leverage.rank), got {rank!r}; "
                "round an effective dimension up with math.ceil."
            )
        rank = int(rank)
    return check_positive_int("rank", rank)


@functools.partial(traced.jit, static_argnames=("k",))
@highest_precision
def _distortion_from_basis(U, indices, weights, k):
    """``‖U_Sᵀ W U_S − I‖₂`` with ``U`` the basis rows ``(n·k, m)`` (or ``(n, k, m)``) of ``n`` examples of
    ``k`` rows each: a sampled example contributes all its ``k`` rows, each with the example's weight.
    Also returns the largest distance of a squared column norm of ``U`` from 1 or 0 (the same pass)."""
    m, dtype = U.shape[-1], U.dtype
    U = U.astype(at_least_float32(dtype)).reshape(-1, k, m)  # eigvalsh has no half kernels
    Us = U[indices].reshape(-1, m)
    w = jnp.repeat(weights.astype(U.dtype), k)
    M = jnp.einsum("sr,s,sq->rq", Us, w, Us)
    # Columns of U beyond the rank are zero: compare with the projector onto the used columns.
    norms = jnp.sum(jnp.square(U.reshape(-1, m)), axis=0)
    used = (norms > 0.5).astype(U.dtype)
    # how far a squared column norm lies from 1 (or 0): a basis that is not orthonormal (F itself) shows
    off = jnp.max(jnp.minimum(jnp.abs(norms - 1), norms))
    return jnp.max(jnp.abs(jnp.linalg.eigvalsh(M - jnp.diag(used)))).astype(dtype), off


def _check_sample(indices, weights) -> tuple:
    """``indices`` and ``weights`` as arrays: matching 1-D vectors, integer indices, real weights (shapes
    and dtypes always); finite, non-negative weights (values, where concrete).

    Host values (numpy, lists) stay numpy: without jax_enable_x64 jax's cast narrows int64 indices to
    int32 (``2**32 + 5`` would read as 5, past the range check) and float64 weights to float32 (``1e39``
    would read as Inf); :func:`distortion` moves them after the range check."""
    indices = indices if isinstance(indices, jax.Array) else np.asarray(indices)
    weights = weights if isinstance(weights, jax.Array) else np.asarray(weights)
    if indices.ndim != 1 or weights.shape != indices.shape:
        raise ValueError(
            f"indices and weights must be matching vectors of shape (s,), got {indices.shape} and "
            f"{weights.shape}."
        )
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(
            f"indices must be integer example indices (as returned by sample), got dtype {indices.dtype}."
        )
    if not (jnp.issubdtype(weights.dtype, jnp.integer) or jnp.issubdtype(weights.dtype, jnp.floating)):
        raise TypeError(f"weights must be real numbers, got dtype {weights.dtype}.")
    check_finite("weights", weights)
    check_nonnegative("weights", weights)
    return indices, weights


def _basis_blocks(F, rtol, basis) -> tuple[Array, int, int]:
    """``(U, n, k)``: the orthonormal basis rows ``(n·k, m)`` or ``(n, k, m)`` of ``n`` examples of ``k``
    rows, from ``F`` or from the given ``basis`` (2-D or 3-D, floating, finite; a 2-D basis is laid out by
    the leading shape of ``F`` when ``F`` is given too, else one row per example)."""
    if basis is None:
        if F is None:
            raise ValueError("distortion needs F or a precomputed basis; both are None.")
        U, _, _ = orthonormal_basis(F, rtol=rtol)
        lead = jnp.shape(F)[:-1]
        return U, lead[0], (lead[1] if len(lead) == 2 else 1)
    if isinstance(basis, tuple):  # orthonormal_basis's (U, rank, route) itself: numpy's ragged error before
        raise TypeError(
            f"basis must be the matrix U, not a tuple of {len(basis)}: pass nj.orthonormal_basis(F)[0]."
        )
    shape = jnp.shape(basis)
    if len(shape) not in (2, 3) or 0 in shape:
        raise ValueError(
            "basis must be a non-empty (n, m) matrix from orthonormal_basis (or (n, k, m) for a block "
            f"dual matrix), got shape {shape}."
        )
    check_floating("basis", basis)
    check_finite("basis", basis)
    n, k = (shape[0], shape[1]) if len(shape) == 3 else (shape[0], 1)
    rows_f = None if F is None else math.prod(jnp.shape(F)[:-1])  # n, or n·k of a block F
    if rows_f is not None and math.prod(shape[:-1]) != rows_f:  # a basis of another matrix
        raise ValueError(
            f"basis of shape {shape} does not belong to F of shape {jnp.shape(F)}: {math.prod(shape[:-1])} "
            f"basis rows for {rows_f} rows of F."
        )
    if F is not None and len(shape) == 2 and jnp.ndim(F) == 3:  # the basis of a block F: rows n·k
        n, k = jnp.shape(F)[:2]
    return basis, n, k


#: How far a squared column norm of a given basis may lie from 1 (or 0) in :func:`distortion`: far above
#: the rounding of any basis :func:`orthonormal_basis` returns, half precision included (whose own
#: squared norms are rounded to 3e-3), far below what a matrix that is not a basis shows.
BASIS_TOLERANCE = 0.1


def _check_index_range(indices: Array, n: int) -> None:
    """``ValueError`` unless every (concrete) index lies in ``[0, n)``: the examples of ``F``."""
    if indices.size == 0:
        return
    if not is_concrete(indices):
        if traced.enabled():
            traced.check((jnp.min(indices) >= 0) & (jnp.max(indices) < n), f"indices out of range [0, {n}).")
        return
    low, high = (int(v) for v in value_range(indices))
    if low < 0 or high >= n:
        raise ValueError(
            f"indices out of range [0, {n}): got values from {low} to {high}; indices are example "
            f"indices, one per example of F (n = {n})."
        )


@traced.entry
def distortion(
    F: Array, indices: Array, weights: Array, *, rtol: float | None = None, basis: Array | None = None
) -> Array:
    r"""Measured distortion of a weighted sample: :math:`\hat\varepsilon = \|U_S^\top W U_S - I\|_2`.

    ``U`` is an orthonormal basis of ``range(F)``; ``(1 − ε̂)‖Fv‖² ≤ Σ_j w_j (F v)_{i_j}² ≤
    (1 + ε̂)‖Fv‖²`` for every ``v``.

    For a block dual matrix ``(n, k, m)`` the indices are example indices (as :func:`sample` draws from
    block leverage scores): a sampled example contributes all its ``k`` rows with its weight.

    Args:
      F: ``(n, m)`` matrix or ``(n, k, m)`` block matrix (only its shape is used when ``basis`` is given;
        it may then be ``None``).
      indices: ``(s,)`` integer example indices in ``[0, n)`` (from :func:`sample`; an empty sample gives
        ``ε̂ = 1``).
      weights: ``(s,)`` their finite, non-negative weights (from :func:`sample`).
      rtol: rank tolerance passed to :func:`orthonormal_basis` (not with ``basis``, whose rank is chosen:
        pass ``rtol`` to :func:`orthonormal_basis` instead).
      basis: optional precomputed basis from :func:`orthonormal_basis` (reuse across samples): ``(n, m)``,
        or for a block ``F`` its ``(n·k, m)`` rows with ``F`` given too (for its shape) or reshaped to
        ``(n, k, m)``.

    Returns:
      Scalar ``ε̂ ≥ 0``.

    Raises:
      TypeError: non-integer indices, non-real weights, a non-floating basis.
      ValueError: mismatched shapes, indices outside ``[0, n)``, NaN/Inf or negative weights, a NaN basis,
        a basis whose columns do not have norm 1 (or 0 beyond the rank: not from :func:`orthonormal_basis`),
        ``rtol`` with ``basis``.
    """
    if rtol is not None and basis is not None:  # it would be ignored: the basis fixes the rank
        raise ValueError(
            "distortion: rtol is not used with basis (its rank is already chosen); pass rtol to "
            "orthonormal_basis(F, rtol=...) when computing the basis, or drop basis."
        )
    indices, weights = _check_sample(indices, weights)
    U, n, k = _basis_blocks(F, rtol, basis)
    _check_index_range(indices, n)
    value, off = _distortion_from_basis(U, jnp.asarray(indices), jnp.asarray(weights), k)
    if basis is not None:  # the columns of an orthonormal basis have norm 1, or 0 beyond the rank
        message = (
            "basis is not orthonormal: a column's squared norm is {} from 1 (or from 0 beyond the rank); "
            "pass the basis orthonormal_basis(F) returns (its first output), not F."
        )
        if is_concrete(off):
            if not float(off) <= BASIS_TOLERANCE:
                raise ValueError(message.format(f"{float(off):.3g} away"))
        else:
            traced.check(off <= BASIS_TOLERANCE, message.format(f"more than {BASIS_TOLERANCE}"))
    return value
