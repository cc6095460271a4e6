r"""Matrix-free sketched leverage for models with many parameters.

When ``p`` is so large that neither the ``n × (p+1)`` dual matrix nor the ``(p+1)²`` Gram matrix fits,
the scores can come from ``O(s)`` products with the dual operator instead (a randomized range finder,
Halko, Martinsson & Tropp 2011, applied to ``F̃ᵀ``):

1. ``B = F̃ᵀ Ω`` with a Gaussian ``Ω`` of ``s`` columns: ``s`` calls of ``rmv`` (one ``vjp`` per node each);
   optionally ``q`` power iterations ``B ← F̃ᵀ orth(F̃ orth(B))`` sharpen it;
2. ``V = orth(B)``, shape ``(p+1, s)``, spans (approximately) the top-``s`` right singular subspace;
3. ``Y = F̃ V``, shape ``(n, s)``: ``s`` calls of ``mv`` (one ``jvp`` per node each), vmapped in batches;
4. exact leverage of ``Y`` by the routes of :func:`nlis_jax.leverage_scores` (:mod:`nlis_jax.routes`).

If ``s ≥ rank(F̃)``, ``range(Y) = range(F̃)`` almost surely and the scores are exact; otherwise they are the
leverage scores of ``F̃`` restricted to its dominant rank-``s`` subspace (the rank-``s`` leverage scores
of Drineas et al. 2012, approximately). Memory ``O((n + p)·s)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from nlis_jax import routes
from nlis_jax._checks import check_positive_int
from nlis_jax._dual import dual_operator
from nlis_jax._scores import Leverage, as_leverage
from nlis_jax._types import ApplyFn, Array, PRNGKey, PyTree


def _orth(A: Array) -> Array:
    """Orthonormal columns spanning ``range(A)``, shape of ``A`` (zero columns past ``min(n, s)``)."""
    Q = jnp.linalg.qr(A)[0]
    return jnp.pad(Q, ((0, 0), (0, A.shape[1] - Q.shape[1])))


def sketched_leverage_scores(
    key: PRNGKey,
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    ys: Array | None = None,
    *,
    sketch_size: int,
    power_iters: int = 1,
    num_nodes: int = 16,
    chunk_size: int = 8,
    return_info: bool = False,
) -> Array | Leverage:
    r"""Approximate (rank-``s``) leverage probabilities of the dual matrix from ``2·s·(1 + q)`` products.

    Args:
      key: PRNG key for the Gaussian test matrix (used once).
      apply_fn, params, xs, ys, num_nodes: as in :func:`nlis_jax.dual_operator`.
      sketch_size: ``s``, the number of test vectors; ``s ≥ rank`` gives exact scores.
      power_iters: ``q ≥ 0`` power iterations (each ``s`` more ``mv`` and ``rmv`` calls).
      chunk_size: operator products evaluated together (memory ``chunk_size · num_nodes · n``).
      return_info: return a :class:`nlis_jax.Leverage` (probabilities, raw leverage with
        ``Σ h = rank ≤ s``, rank, route of the final exact step).

    Returns:
      ``(n,)`` probabilities summing to 1, or a :class:`nlis_jax.Leverage`.
    """
    s = check_positive_int("sketch_size", sketch_size)
    check_positive_int("chunk_size", chunk_size)
    check_positive_int("power_iters", power_iters, allow_zero=True)
    op = dual_operator(apply_fn, params, xs, ys, num_nodes=num_nodes)
    m = op.shape[-1]
    if s > m:
        raise ValueError(f"sketch_size={s} exceeds the {m} columns of the dual matrix; use leverage_scores.")
    out_shape = op.shape[:-1]

    def mv_all(V):  # (m, s) -> (n·k, s)
        cols = lax.map(op.mv, V.T, batch_size=chunk_size)  # (s,) + out_shape
        return cols.reshape(s, -1).T

    def rmv_all(U):  # (n·k, s) -> (m, s)
        return lax.map(op.rmv, U.T.reshape((s,) + out_shape), batch_size=chunk_size).T

    omega = jax.random.normal(key, (math.prod(out_shape), s), op.dtype)
    B = rmv_all(omega)
    for _ in range(power_iters):  # a handful of static iterations (not a loop over data)
        B = rmv_all(_orth(mv_all(_orth(B))))
    Y = mv_all(_orth(B))
    rtol = jnp.asarray(routes.default_rtol(Y.dtype), Y.dtype)
    h, rank, taken = routes.row_leverage(Y, rtol, out_shape)
    return as_leverage(h, rank, taken, return_info)
