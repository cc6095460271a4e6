r"""Scores of the outlier study at the fitted θ: nonlinear leverage and its parts, norms, and baselines.

With the dual matrix :math:`\tilde F = [F^* \mid c]`, :math:`c = f(0) - y`, the leverage of
:math:`\tilde F` splits into the leverage of :math:`F^*` and the response part
:math:`e_i^2/\|e\|^2`, :math:`e = (I - P_{F^*})\,c` (see :mod:`nlis_jax.experiments.outliers`).

Two ways to the dual matrix: the dense ``F̃`` (:func:`nlis_jax.dual_matrix`, ``n × (p+1)`` in memory), or,
for large ``p``, the projected ``[F*Ω | c]`` (:func:`projected_dual`): the parameter columns embedded by a
random ``p × m`` sparse sign matrix ``Ω``, the response column kept as it is. The block-diagonal embedding
``diag(Ω, 1)`` keeps the split of the leverage exact for the projected matrix, and when ``m ≥ p + 1`` the
sparse embedding only signs and permutes the columns, so every score equals the dense one.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import nlis_jax as nj
from nlis_jax._adjoint import origin
from nlis_jax._checks import check_tolerances
from nlis_jax.experiments.memory import measured

__all__ = [
    "baseline_chunk",
    "dual_scores",
    "gradient_norms",
    "outlier_scores",
    "projected_dual",
    "ridge_lambda",
]

#: Most examples per memory chunk of the per-example baselines.
BASELINE_CHUNK = 2048
#: Elements of one chunk of per-example gradients (``chunk · p``) of the gradient-norm baseline.
BASELINE_CHUNK_ELEMENTS = 1 << 23


def baseline_chunk(n: int, p: int) -> int:
    """Examples per chunk of the baselines: at most :data:`BASELINE_CHUNK`, and ``chunk · p`` at most
    :data:`BASELINE_CHUNK_ELEMENTS` (the per-example gradients of a chunk are held at once)."""
    return max(1, min(n, BASELINE_CHUNK, BASELINE_CHUNK_ELEMENTS // max(p, 1)))


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


@functools.lru_cache(maxsize=32)
def _without_offset(apply_fn):
    """``f(θ; x) − f(0; x)``: the same adjoint as ``apply_fn``, and ``0`` at ``θ = 0``."""

    def shifted(params, x):
        zero = origin(params)
        return apply_fn(params, x) - jax.lax.stop_gradient(apply_fn(zero, x))

    return shifted


def _outputs_at_zero(apply_fn, params, xs):
    zero = origin(params)
    return jax.vmap(apply_fn, in_axes=(None, 0))(zero, xs)


def projected_dual(
    key: jax.Array,
    apply_fn,
    params,
    xs,
    ts,
    *,
    dim: int,
    num_nodes: int = 4,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""``[F*Ω | c]``: the adjoint embedded by a random ``p × dim`` sparse sign matrix ``Ω``
    (:func:`nlis_jax.projected_dual_matrix`, streamed in chunks), and the response column
    ``c = f(0) − t`` appended unprojected.

    This is the dual matrix times the block-diagonal embedding ``diag(Ω, 1)``, so
    ``h([F*Ω | c]) = h(F*Ω) + e_i²/‖e‖²`` with ``e = (I − P_{F*Ω}) c``, as for the dense matrix. When
    ``f(0) ≠ 0``, ``F*Ω`` is taken of ``f(θ; x) − f(0; x)`` (same adjoint, zero offset), so that the
    embedded last column of :func:`nlis_jax.projected_dual_matrix` is zero.

    Returns:
        ``(n, dim + 1)``, or ``(n, k, dim + 1)`` for ``k`` outputs.
    """
    f0 = _outputs_at_zero(apply_fn, params, xs)
    model = apply_fn if not bool(jnp.any(f0 != 0)) else _without_offset(apply_fn)
    # The sparse sign embedding, as recorded in docs/outliers.md (embedding="auto" would pick the faster
    # Khatri-Rao route for dense layers: another random Ω, hence other figures).
    Y = nj.projected_dual_matrix(
        key, model, params, xs, None, dim=dim, num_nodes=num_nodes, chunk_size=chunk_size, embedding="sparse"
    )
    c = (f0 - jnp.asarray(ts, f0.dtype)).astype(Y.dtype)
    return jnp.concatenate([Y, c[..., None]], axis=-1)


def ridge_lambda(adjoint, ridge: float) -> float:
    r"""``λ = ridge · ‖A‖_F² / (n·k)`` for the adjoint part ``A`` (``(n, m)`` or ``(n, k, m)``): ``ridge``
    times the mean diagonal of the kernel ``A Aᵀ``."""
    rows = adjoint.reshape(-1, adjoint.shape[-1])
    return float(ridge) * float(jnp.sum(jnp.square(rows))) / rows.shape[0]


def _exact_parts(dual, n: int, costs: dict) -> tuple[dict, dict]:
    """Leverage of ``F̃``, of ``F*`` and the response part (exact, rank-revealing), with diagnostics."""
    lev = measured(costs, "leverage", nj.leverage_scores, dual, return_info=True)

    def adjoint_parts():
        basis, rank_adj, route_adj = nj.orthonormal_basis(dual[..., :-1])  # (n·k, p)
        return _adjoint_parts(basis, dual[..., -1].reshape(-1), n=n), rank_adj, route_adj

    (h_adj, resp, outside), rank_adj, route_adj = measured(costs, "adjoint_leverage", adjoint_parts)
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
    }
    return scores, info


def _ridge_parts(dual, lam: float, costs: dict) -> tuple[dict, dict]:
    r"""Ridge leverage of ``F̃`` and of ``F*``; the response part is their difference, which equals
    ``e_i²/s`` with ``e = (I − H_λ) c``, ``H_λ = A(AᵀA + λI)⁻¹Aᵀ``, ``s = cᵀe + λ`` (a rank-one update of
    ``(F̃ᵀF̃ + λI)⁻¹``), normalised to sum to 1."""
    lev = measured(costs, "leverage", nj.leverage_scores, dual, ridge=lam, return_info=True)
    adj = measured(costs, "adjoint_leverage", nj.leverage_scores, dual[..., :-1], ridge=lam, return_info=True)
    h_dual, h_adj = np.asarray(lev.leverage, np.float64), np.asarray(adj.leverage, np.float64)
    resp = np.maximum(h_dual - h_adj, 0.0)
    total = resp.sum()
    info = dict(
        ridge_lambda=lam,
        effective_dim_dual=float(lev.rank),
        effective_dim_adjoint=float(adj.rank),
        decomposition_gap=None,
    )
    scores = {
        "leverage": np.asarray(lev.probs, np.float64),
        "adjoint_leverage": np.asarray(adj.probs, np.float64),
        "response_leverage": resp / total if total > 0 else resp,
    }
    return scores, info


def dual_scores(dual, *, ridge: float = 0.0, costs: dict | None = None) -> tuple[dict, dict]:
    """The nonlinear scores (:data:`NONLINEAR_SCORES`) of a dual matrix ``[A | c]`` (``(n, m)`` or
    ``(n, k, m)``, dense or projected), exact (``ridge = 0``) or with ``λ`` of :func:`ridge_lambda`.

    Returns ``(scores, info)``; the cost of each part goes into ``costs`` (:func:`measured`)."""
    check_tolerances(None, ridge)  # NaN or a negative ridge fell through to the exact scores
    costs = {} if costs is None else costs
    n = dual.shape[0]
    if ridge > 0:
        scores, info = _ridge_parts(dual, ridge_lambda(dual[..., :-1], ridge), costs)
    else:
        scores, info = _exact_parts(dual, n, costs)
    scores["norm"] = np.asarray(measured(costs, "norm", nj.norm_scores, dual), np.float64)
    return scores, info


def outlier_scores(
    apply_fn,
    params,
    xs: jax.Array,
    ts: jax.Array,
    *,
    num_nodes: int = 4,
    projection_dim: int | None = None,
    key: jax.Array | None = None,
    ridge: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    r"""Every score of the study at ``params``: the nonlinear ones and the two baselines.

    Args:
        apply_fn: ``apply_fn(params, x)`` for ONE example: a scalar or ``(k,)`` outputs.
        params: the fitted parameters (``p`` entries).
        xs: ``(n, d)`` inputs.
        ts: ``(n,)`` or ``(n, k)`` targets (the training targets, noisy labels included).
        num_nodes: Gauss-Legendre nodes of the adjoint.
        projection_dim: ``None``: the dense dual matrix. An integer ``m``: the projected ``[F*Ω | c]`` of
            :func:`projected_dual` (memory ``O(chunk·p + n·m)``), drawn with ``key``.
        key: PRNG key of the embedding (needed with ``projection_dim``).
        ridge: ``ρ ≥ 0``: ridge leverage with ``λ`` of :func:`ridge_lambda` (``0``: exact leverage).

    Returns:
        ``(scores, info)``: ``scores`` maps each name of :data:`NONLINEAR_SCORES` and
        :data:`BASELINE_SCORES` to an ``(n,)`` float64 array (higher = more suspicious). ``info`` holds
        diagnostics (``p``, ranks, routes, ``decomposition_gap`` = max over i of
        ``|h_i(F̃) − h_i(F*) − e_i²/‖e‖²|``, which is 0 in exact arithmetic when
        ``rank(F̃) = rank(F*) + 1``), ``timings`` (seconds) and ``costs`` (per stage: wall time and
        peak ``RssAnon``, :func:`nlis_jax.experiments.memory.measured`).
    """
    if projection_dim is not None and key is None:
        raise ValueError("projection_dim needs key (the PRNG key of the embedding).")
    check_tolerances(None, ridge)  # before any work
    n = xs.shape[0]
    p = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    chunk = baseline_chunk(n, p)
    costs: dict[str, dict] = {}
    loss = measured(
        costs, "loss", nj.per_example_loss, apply_fn, params, xs, ts, loss="squared", chunk_size=chunk
    )
    grad_norm = measured(costs, "grad_norm", gradient_norms, apply_fn, params, xs, ts, chunk_size=chunk)
    if projection_dim is None:
        dual = measured(costs, "dual_matrix", nj.dual_matrix, apply_fn, params, xs, ts, num_nodes=num_nodes)
    else:
        dual = measured(
            costs,
            "dual_matrix",
            projected_dual,
            key,
            apply_fn,
            params,
            xs,
            ts,
            dim=projection_dim,
            num_nodes=num_nodes,
        )
    scores, info = dual_scores(dual, ridge=ridge, costs=costs)
    scores["loss"] = np.asarray(loss, np.float64)
    scores["grad_norm"] = np.asarray(grad_norm, np.float64)
    timings = {f"{name}_s": c["wall_s"] for name, c in costs.items()}
    timings["baselines_s"] = timings["loss_s"] + timings["grad_norm_s"]
    info = {
        "dual_shape": list(dual.shape),
        "p": p,
        "projection_dim": projection_dim,
        "ridge": ridge,
        **info,
        "timings": timings,
        "costs": costs,
    }
    return scores, info
