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

from nlis_jax._checks import check_positive_int, check_probs, is_concrete, probs_summary
from nlis_jax._precision import highest_precision
from nlis_jax._scores import orthonormal_basis
from nlis_jax._types import Array, PRNGKey


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _sample_with_replacement(key, probs, num_samples):
    n = probs.shape[0]
    idx = jax.random.choice(key, n, shape=(num_samples,), replace=True, p=probs)
    # choice draws from probs / Σ probs; weights from the same normalised vector (a traced probs
    # vector is not checked to sum to one)
    return idx, jnp.sum(probs) / (num_samples * probs[idx])


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
      key: a ``jax.random`` key (used once; split it yourself for further draws).
      probs: ``(n,)`` probabilities, non-negative and summing to 1.
      num_samples: ``s`` (static). With replacement any ``s ≥ 1``; without, ``1 ≤ s ≤ #{p_i > 0}``.
      replace: ``True``: i.i.d. draws, weights ``1/(s·p_i)``. ``False``: priority sampling, weights
        ``max(1, τ/p_i)`` (see the module docstring).

    Returns:
      ``(indices (s,) int32, weights (s,))``; ``Σ_j weights_j v[indices_j]`` is unbiased for ``Σ_i v_i``.
    """
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
      rank: ``d ≥ 1``, the rank of the dual matrix.
      beta: ``β ∈ (0, 1]`` (1 for exact leverage; ``c1/c2`` for linear scores of a bounded-Swish model).

    Returns:
      The smallest integer ``s`` satisfying the bound.
    """
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")
    d = check_positive_int("rank", int(rank) if isinstance(rank, (np.integer,)) else rank)
    if not 0 < beta <= 1:
        raise ValueError(f"beta must lie in (0, 1], got {beta}.")
    m = max(d / beta - 1.0, 1.0)
    log_s = math.log(2.0 + 2.0 * epsilon / 3.0) - 2.0 * math.log(epsilon) + math.log(m)
    log_s += math.log(math.log(2.0 * d / delta))
    if log_s > math.log(2.0**62):
        raise ValueError(
            f"epsilon={epsilon:g} asks for about 10^{log_s / math.log(10):.0f} rows (more than 2^62); "
            "choose a larger epsilon."
        )
    return int(math.ceil((2.0 / epsilon**2 + 2.0 / (3.0 * epsilon)) * m * math.log(2.0 * d / delta)))


@jax.jit
@highest_precision
def _distortion_from_basis(U, indices, weights):
    Us = U[indices]
    M = jnp.einsum("sr,s,sq->rq", Us, weights.astype(U.dtype), Us)
    # Columns of U beyond the rank are zero: compare with the projector onto the used columns.
    used = (jnp.sum(jnp.square(U), axis=0) > 0.5).astype(U.dtype)
    return jnp.max(jnp.abs(jnp.linalg.eigvalsh(M - jnp.diag(used))))


def distortion(
    F: Array, indices: Array, weights: Array, *, rtol: float | None = None, basis: Array | None = None
) -> Array:
    r"""Measured distortion of a weighted sample: :math:`\hat\varepsilon = \|U_S^\top W U_S - I\|_2`.

    ``U`` is an orthonormal basis of ``range(F)``; ``(1 − ε̂)‖Fv‖² ≤ Σ_j w_j (F v)_{i_j}² ≤
    (1 + ε̂)‖Fv‖²`` for every ``v``.

    Args:
      F: ``(n, m)`` matrix (ignored when ``basis`` is given).
      indices: ``(s,)`` sampled rows; weights: ``(s,)`` their weights (from :func:`sample`).
      rtol: rank tolerance passed to :func:`orthonormal_basis`.
      basis: optional precomputed ``(n, m)`` basis from :func:`orthonormal_basis` (reuse across samples).

    Returns:
      Scalar ``ε̂ ≥ 0``.
    """
    if basis is None:
        basis, _, _ = orthonormal_basis(F, rtol=rtol)
    indices, weights = jnp.asarray(indices), jnp.asarray(weights)
    if indices.ndim != 1 or weights.shape != indices.shape:
        raise ValueError(
            f"indices and weights must be matching vectors, got {indices.shape} and {weights.shape}."
        )
    if (
        is_concrete(indices)
        and indices.size
        and (int(jnp.min(indices)) < 0 or int(jnp.max(indices)) >= basis.shape[0])
    ):
        raise ValueError(f"indices out of range [0, {basis.shape[0]}).")
    return _distortion_from_basis(basis, indices, weights)
