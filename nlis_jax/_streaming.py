r"""Leverage scores of a dual matrix too large to hold: stream the examples in chunks.

Memory ``O(chunk·p + p²)``, time linear in ``n``. The dual rows of each chunk are recomputed on every
pass (adjoints are cheap next to holding ``n × (p+1)``), following :mod:`nlis_jax._scores`:

- pass 1 accumulates the Gram matrix ``G = Σ_c F̃_cᵀ F̃_c`` (decisions are made on its column-equilibrated
  form, as in :func:`nlis_jax.leverage_scores`) (a ``lax.scan`` over chunks; on a sharded
  ``xs`` each chunk's product becomes an all-reduce) and takes ``G = V Λ Vᵀ``;
- well-conditioned (``κ(G) ≤ eps^{-1/4}``): pass 2 scores each chunk, ``h = ‖F̃_c V Λ^{-1/2}‖²`` by row;
- moderately ill-conditioned (``κ(G) ≤ 1/(1000 eps)``): one more Gram pass on ``F̃_c V Λ^{-1/2}``
  (CholeskyQR2 / SVQB), then the scoring pass;
- otherwise (ill-conditioned or rank-deficient): a streaming TSQR pass,
  ``R ← qr([R; F̃_c]).R``, then ``R = W S Vᵀ`` and ``h = ‖F̃_c V S^{-1}‖²`` over the singular values
  above ``rtol·s_max``: backward stable, the same accuracy as a Householder QR of the whole matrix.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from nlis_jax._adjoint import flatten_model, validate_path_args
from nlis_jax._checks import check_choice, check_positive_int
from nlis_jax._dual import _check_ys, dual_block
from nlis_jax._precision import highest_precision
from nlis_jax._scores import ROUTES, _default_rtol, _gram, choose_route, equilibrated_eigh, inverse_sqrt_basis
from nlis_jax._types import ApplyFn, Array, PyTree


def _pad_chunks(tree, n: int, chunk: int):
    """Reshape every leaf ``(n, ...)`` to ``(m, chunk, ...)``, padding with copies of row 0."""
    m = -(-n // chunk)
    pad = m * chunk - n

    def one(a):
        if pad:
            a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])])
        return a.reshape((m, chunk) + a.shape[1:])

    return jax.tree.map(one, tree), m


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk_size", "num_nodes", "mode", "route"))
@highest_precision
def _streaming_jit(apply_fn, params, xs, ys, rtol, *, chunk_size, num_nodes, mode, route):
    model = flatten_model(apply_fn, params, xs, check_values=False)
    n, p = model.n, model.theta.shape[0]
    k = math.prod(model.out_shape)
    dtype = model.theta.dtype
    chunk = min(chunk_size, n)
    xs_c, m = _pad_chunks(xs, n, chunk)
    ys_c = None if ys is None else _pad_chunks(jnp.asarray(ys, dtype), n, chunk)[0]
    valid = (jnp.arange(m * chunk) < n).reshape(m, chunk).astype(dtype)

    def dual_rows(i):
        """Rows of chunk ``i`` of the dual matrix, ``(chunk·k, p+1)``; padding rows are zero."""
        xc = jax.tree.map(lambda a: a[i], xs_c)
        yc = None if ys_c is None else ys_c[i]
        block = dual_block(model, xc, yc, num_nodes=num_nodes, mode=mode, batch_size=chunk)
        block = block * valid[i].reshape((chunk,) + (1,) * (block.ndim - 1))
        return block.reshape(chunk * k, p + 1)

    def gram_pass(M):
        def body(G, i):
            Y = dual_rows(i) @ M
            return G + _gram(Y), None

        return lax.scan(body, jnp.zeros((M.shape[1],) * 2, dtype), jnp.arange(m))[0]

    eye = jnp.eye(p + 1, dtype=dtype)
    lam, V, d, num_zero = equilibrated_eigh(gram_pass(eye))
    branch = choose_route(lam[0] / lam[-1]) if route is None else jnp.asarray(ROUTES.index(route))

    def one_pass():
        M, rank = inverse_sqrt_basis(lam, V, rtol)
        return M / d[:, None], rank - num_zero

    def two_pass():
        M1, _ = one_pass()
        lam2, V2 = jnp.linalg.eigh(gram_pass(M1))
        M2, rank = inverse_sqrt_basis(lam2, V2, rtol)
        return M1 @ M2, rank

    def stable():
        def body(R, i):
            return jnp.linalg.qr(jnp.concatenate([R, dual_rows(i)]), mode="r"), None

        R = lax.scan(body, jnp.zeros((p + 1, p + 1), dtype), jnp.arange(m))[0]
        # F D⁻¹ = Q (R D⁻¹) = Q W S Vᵀ, so F · D⁻¹ V S⁻¹ = Q W is an orthonormal basis.
        _, s, Vt = jnp.linalg.svd(R / d[None, :])
        keep = s > rtol * s[0]
        inv_s = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
        return (Vt.T * inv_s[None, :]) / d[:, None], jnp.sum(keep)

    M, rank = lax.switch(branch, (one_pass, two_pass, stable))

    def score_chunk(i):
        h = jnp.sum(jnp.square(dual_rows(i) @ M), axis=1)
        return h.reshape(chunk, k).sum(axis=1)

    h = lax.map(score_chunk, jnp.arange(m)).reshape(-1)[:n]
    return h, rank.astype(jnp.int32), branch


def streaming_leverage(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    ys: Array | None = None,
    *,
    chunk_size: int = 4096,
    num_nodes: int = 16,
    mode: str = "auto",
    rtol: float | None = None,
    route: str | None = None,
) -> tuple[Array, Array, Array]:
    r"""Leverage of the dual matrix ``[F*(θ) | f(0) − y]`` without materialising it.

    Args:
      apply_fn, params, xs, ys, num_nodes, mode: as in :func:`nlis_jax.dual_matrix`.
      chunk_size: examples per chunk (static); memory is ``O(chunk_size·k·p + p²)``.
      rtol: rank tolerance on the singular values of the column-equilibrated dual matrix, relative to
        the largest (default ``10·eps``, as :func:`nlis_jax.leverage_scores`).
      route: force ``"gram"``, ``"gram2"`` or ``"stable"`` (default: chosen from ``κ(G)``).

    Returns:
      ``(h, rank, route)``: raw (block) leverage ``h`` of shape ``(n,)`` with ``Σ h = rank``, the rank
      (int32), and the index of the route taken in :data:`nlis_jax.ROUTES`.
    """
    validate_path_args(num_nodes, mode, None)
    check_positive_int("chunk_size", chunk_size)
    if route is not None:
        check_choice("route", route, ROUTES)
    model = flatten_model(apply_fn, params, xs)
    _check_ys(model, ys)
    dtype = model.theta.dtype
    if rtol is None:
        rtol = _default_rtol(dtype)
    return _streaming_jit(
        apply_fn,
        params,
        xs,
        ys,
        jnp.asarray(rtol, dtype),
        chunk_size=chunk_size,
        num_nodes=num_nodes,
        mode=mode,
        route=route,
    )


def streaming_leverage_scores(apply_fn, params, xs, ys=None, **kwargs) -> Array:
    r"""Leverage-score probabilities ``h_i / rank`` of the dual matrix, streamed in chunks.

    Same result as ``leverage_scores(dual_matrix(apply_fn, params, xs, ys))`` (to rounding) with memory
    ``O(chunk_size·p + p²)``; keyword arguments as in :func:`streaming_leverage`. Returns shape ``(n,)``.
    """
    h, rank, _ = streaming_leverage(apply_fn, params, xs, ys, **kwargs)
    return h / rank.astype(h.dtype)
