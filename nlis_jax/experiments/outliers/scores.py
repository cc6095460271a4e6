r"""Scores of the outlier study at the fitted θ: nonlinear leverage and its parts, norms, and baselines.

With the dual matrix :math:`\tilde F = [F^* \mid c]`, :math:`c = f(0) - y`, the leverage of
:math:`\tilde F` splits into the leverage of :math:`F^*` and the response part
:math:`e_i^2/\|e\|^2`, :math:`e = (I - P_{F^*})\,c` (see :mod:`nlis_jax.experiments.outliers`).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import nlis_jax as nj

__all__ = ["gradient_norms", "outlier_scores"]

#: Examples per memory chunk of the per-example baselines.
BASELINE_CHUNK = 2048


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size"))
def gradient_norms(apply_fn, params, xs, ts, *, chunk_size: int):
    r"""``(n,)`` l2 norms of :math:`\nabla_\theta \|f(\theta; x_i) - t_i\|^2`, ``chunk_size`` examples at a
    time."""

    def one(xt):
        x, t = xt
        grad = jax.grad(lambda p: nj.weighted_loss(apply_fn, p, x[None], t[None], loss="squared"))(params)
        return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grad)))

    return jax.lax.map(one, (xs, ts), batch_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("n",))
def _adjoint_parts(basis: jax.Array, c: jax.Array, *, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From an orthonormal basis ``(n·k, p)`` of ``range(F*)`` and the last column ``c = f(0) − y``
    ``(n·k,)``: block leverage of ``F*`` ``(n,)``, response leverage ``e_i²/‖e‖²`` ``(n,)`` with
    ``e = (I − P_{F*}) c`` (all zeros when ``e = 0``: ``c ∈ range(F*)``, an interpolating model), and
    ``‖e‖/‖c‖``."""
    h_adj = jnp.sum(jnp.square(basis), axis=1).reshape(n, -1).sum(axis=1)
    e = c - basis @ (basis.T @ c)
    e_sq = jnp.square(e).reshape(n, -1).sum(axis=1)
    e_total = jnp.sum(e_sq)
    resp = jnp.where(e_total > 0, e_sq / jnp.where(e_total > 0, e_total, 1), 0)
    return h_adj, resp, jnp.sqrt(e_total) / jnp.linalg.norm(c)


def _timed(timings: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    timings[name] = time.perf_counter() - t0
    return out


def _dual_scores(dual, n: int, timings: dict) -> tuple[dict, dict]:
    """Leverage of ``F̃``, of ``F*`` and the response part, and norm scores, with diagnostics."""
    lev = _timed(timings, "leverage_s", nj.leverage_scores, dual, return_info=True)
    t0 = time.perf_counter()
    basis, rank_adj, route_adj = nj.orthonormal_basis(dual[..., :-1])  # (n·k, p)
    h_adj, resp, outside = jax.block_until_ready(_adjoint_parts(basis, dual[..., -1].reshape(-1), n=n))
    timings["adjoint_leverage_s"] = time.perf_counter() - t0
    norm = _timed(timings, "norm_s", nj.norm_scores, dual)
    h_dual, h_adj, resp = (np.asarray(a, np.float64) for a in (lev.leverage, h_adj, resp))
    info = dict(
        rank_dual=int(lev.rank),
        rank_adjoint=int(rank_adj),
        route_adjoint=nj.routes.ROUTES[int(route_adj)],
        residual_outside_adjoint_range=float(outside),
        decomposition_gap=float(np.max(np.abs(h_dual - h_adj - resp))),
    )
    scores = {
        "leverage": h_dual / max(int(lev.rank), 1),
        "adjoint_leverage": h_adj / max(int(rank_adj), 1),
        "response_leverage": resp,
        "norm": np.asarray(norm, np.float64),
    }
    return scores, info


def outlier_scores(
    apply_fn, params, xs: jax.Array, ts: jax.Array, *, num_nodes: int = 4
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    r"""Every score of the study at ``params``: the nonlinear ones and the two baselines.

    Args:
        apply_fn: ``apply_fn(params, x)`` for ONE example: a scalar or ``(k,)`` outputs.
        params: the fitted parameters (``p`` entries).
        xs: ``(n, d)`` inputs.
        ts: ``(n,)`` or ``(n, k)`` targets (the training targets, noisy labels included).
        num_nodes: Gauss-Legendre nodes of the adjoint.

    Returns:
        ``(scores, info)``: ``scores`` maps each name of :data:`NONLINEAR_SCORES` and
        :data:`BASELINE_SCORES` to an ``(n,)`` float64 array (higher = more suspicious). ``info`` holds
        diagnostics (``p``, ranks, routes, ``decomposition_gap`` = max over i of
        ``|h_i(F̃) − h_i(F*) − e_i²/‖e‖²|``, which is 0 in exact arithmetic when
        ``rank(F̃) = rank(F*) + 1``) and timings.
    """
    n = xs.shape[0]
    timings: dict[str, float] = {}
    chunk = min(n, BASELINE_CHUNK)
    t0 = time.perf_counter()
    loss = nj.per_example_loss(apply_fn, params, xs, ts, loss="squared", chunk_size=chunk)
    grad_norm = jax.block_until_ready(gradient_norms(apply_fn, params, xs, ts, chunk_size=chunk))
    timings["baselines_s"] = time.perf_counter() - t0
    dual = _timed(timings, "dual_matrix_s", nj.dual_matrix, apply_fn, params, xs, ts, num_nodes=num_nodes)
    scores, info = _dual_scores(dual, n, timings)
    scores["loss"] = np.asarray(loss, np.float64)
    scores["grad_norm"] = np.asarray(grad_norm, np.float64)
    info = {"dual_shape": list(dual.shape), "p": int(dual.shape[-1] - 1), **info, "timings": timings}
    return scores, info
