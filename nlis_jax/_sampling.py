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
from nlis_jax._precision import highest_precision
from nlis_jax._scores import orthonormal_basis
from nlis_jax._types import Array, PRNGKey


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _sample_with_replacement(key, probs, num_samples):
    n = probs.shape[0]
    idx = jax.random.choice(key, n, shape=(num_samples,), replace=True, p=probs).astype(jnp.int32)
    # choice draws from probs / Σ probs; weights from the same normalised vector (a traced probs
    # vector is not checked to sum to one), at least in float32: s·p_i overflows float16 from s ≈ 65,520
    wide = probs.astype(jnp.promote_types(probs.dtype, jnp.float32))
    return idx, (jnp.sum(wide) / (num_samples * wide[idx])).astype(probs.dtype)


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _sample_priority(key, probs, num_samples):
    n = probs.shape[0]
    tiny = jnp.finfo(probs.dtype).tiny
    probs = jnp.where(probs >= tiny, probs, 0)  # denormals count as zero (flushed on most devices)
    u = jax.random.uniform(key, (n,), probs.dtype, minval=tiny, maxval=1.0)
    priority = probs / u
    k = min(num_samples + 1, n)
    top, idx = jax.lax.top_k(priority, k)
    tau = top[num_samples] if num_samples < n else jnp.zeros((), probs.dtype)
    idx = idx[:num_samples]
    p = probs[idx]
    # a zero-probability row is kept only when fewer than s rows are positive (traced probs): weight 0
    return idx, jnp.where(p > 0, jnp.maximum(1.0, tau / jnp.where(p > 0, p, 1)), 0)


def sample(key: PRNGKey, probs: Array, num_samples: int, *, replace: bool = True) -> tuple[Array, Array]:
    r"""Draw ``num_samples`` row indices by ``probs`` with unbiased importance weights.

    Args:
      key: a ``jax.random`` key (used once; split it yourself for further draws): ``jax.random.key(0)``
        or a raw ``jax.random.PRNGKey(0)``; a plain int is refused (``TypeError``).
      probs: ``(n,)`` floating probabilities, non-negative and summing to 1 (an array, or a list or tuple
        of floats).
      num_samples: ``s`` (static). With replacement any ``s ≥ 1``; without, ``1 ≤ s ≤ #{p_i > 0}``.
      replace: ``True``: i.i.d. draws, weights ``1/(s·p_i)``. ``False``: priority sampling, weights
        ``max(1, τ/p_i)`` (see the module docstring). Must be a bool (``TypeError`` otherwise: a string
        such as ``"no"`` would decide by its truthiness).

    Returns:
      ``(indices (s,) int32, weights (s,))``; ``Σ_j weights_j v[indices_j]`` is unbiased for ``Σ_i v_i``.
    """
    check_key("key", key)
    replace = check_bool("replace", replace)
    if isinstance(probs, list | tuple):
        probs = jnp.asarray(probs)  # as leverage_scores accepts a nested list for F
    n = check_probs(probs)
    s = check_positive_int("num_samples", num_samples)
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
        return _sample_priority(key, probs, s)
    return _sample_with_replacement(key, probs, s)


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

    ``epsilon``, ``delta`` and ``beta`` must be real numbers (``TypeError`` for strings, arrays, bools).

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
    m = max(d / beta - 1.0, 1.0)
    log_s = math.log(2.0 + 2.0 * epsilon / 3.0) - 2.0 * math.log(epsilon) + math.log(m)
    log_term = math.log(2.0 * d) - math.log(delta)  # log(2d/δ): 2d/δ itself overflows for tiny δ
    log_s += math.log(log_term)
    if log_s > math.log(2.0**62):
        raise ValueError(
            f"epsilon={epsilon:g}, delta={delta:g} ask for about 10^{log_s / math.log(10):.0f} rows "
            "(more than 2^62); choose a larger epsilon."
        )
    return int(math.ceil((2.0 / epsilon**2 + 2.0 / (3.0 * epsilon)) * m * log_term))


def _check_rank(rank) -> int:
    """``rank`` as a positive Python int: an int, a numpy integer or a concrete 0-d integer array (e.g. the
    int32 ``Leverage.rank``); ``TypeError`` for floats, bools and other arrays, ``ValueError`` for ``< 1``."""
    dtype = getattr(rank, "dtype", None)
    if dtype is not None and not isinstance(rank, np.generic):
        if not (jnp.shape(rank) == () and is_concrete(rank) and jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"rank must be a Python int or a 0-d integer array (such as Leverage.rank), got {rank!r}; "
                "round an effective dimension up with math.ceil."
            )
        rank = int(rank)
    return check_positive_int("rank", rank)


@functools.partial(jax.jit, static_argnames=("k",))
@highest_precision
def _distortion_from_basis(U, indices, weights, k):
    """``‖U_Sᵀ W U_S − I‖₂`` with ``U`` the basis rows ``(n·k, m)`` (or ``(n, k, m)``) of ``n`` examples of
    ``k`` rows each: a sampled example contributes all its ``k`` rows, each with the example's weight."""
    m, dtype = U.shape[-1], U.dtype
    U = U.astype(jnp.promote_types(dtype, jnp.float32)).reshape(-1, k, m)  # eigvalsh has no half kernels
    Us = U[indices].reshape(-1, m)
    w = jnp.repeat(weights.astype(U.dtype), k)
    M = jnp.einsum("sr,s,sq->rq", Us, w, Us)
    # Columns of U beyond the rank are zero: compare with the projector onto the used columns.
    used = (jnp.sum(jnp.square(U.reshape(-1, m)), axis=0) > 0.5).astype(U.dtype)
    return jnp.max(jnp.abs(jnp.linalg.eigvalsh(M - jnp.diag(used)))).astype(dtype)


def _check_sample(indices, weights) -> tuple[Array, Array]:
    """``indices`` and ``weights`` as arrays: matching 1-D vectors, integer indices, real weights (shapes
    and dtypes always); finite, non-negative weights (values, where concrete)."""
    indices, weights = jnp.asarray(indices), jnp.asarray(weights)
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
    shape = jnp.shape(basis)
    if len(shape) not in (2, 3) or 0 in shape:
        raise ValueError(
            "basis must be a non-empty (n, m) matrix from orthonormal_basis (or (n, k, m) for a block "
            f"dual matrix), got shape {shape}."
        )
    check_floating("basis", basis)
    check_finite("basis", basis)
    n, k = (shape[0], shape[1]) if len(shape) == 3 else (shape[0], 1)
    if F is not None and len(shape) == 2 and jnp.ndim(F) == 3:
        n, k = jnp.shape(F)[:2]
        if n * k != shape[0]:
            raise ValueError(
                f"basis has {shape[0]} rows but the block F of shape {jnp.shape(F)} has n·k = {n * k}."
            )
    return basis, n, k


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
      indices: ``(s,)`` integer example indices in ``[0, n)``; weights: ``(s,)`` their finite,
        non-negative weights (from :func:`sample`).
      rtol: rank tolerance passed to :func:`orthonormal_basis`.
      basis: optional precomputed basis from :func:`orthonormal_basis` (reuse across samples): ``(n, m)``,
        or for a block ``F`` its ``(n·k, m)`` rows with ``F`` given too (for its shape) or reshaped to
        ``(n, k, m)``.

    Returns:
      Scalar ``ε̂ ≥ 0``.

    Raises:
      TypeError: non-integer indices, non-real weights, a non-floating basis.
      ValueError: mismatched shapes, indices outside ``[0, n)``, NaN/Inf or negative weights, a NaN basis.
    """
    indices, weights = _check_sample(indices, weights)
    U, n, k = _basis_blocks(F, rtol, basis)
    _check_index_range(indices, n)
    return _distortion_from_basis(U, indices, weights, k)
