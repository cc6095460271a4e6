r"""The passes of the streaming scores, written once for device arrays and for host data.

Both paths see the dual matrix one chunk of examples at a time, as the ``(chunk, k, p+1)`` rows of
:func:`chunk_rows` (padding rows zero, half precision widened by :func:`nlis_jax.routes.compute_dtype`),
and differ only in how a pass visits the chunks. A path supplies that as :class:`Chunks`:

- ``reduce(pass_, init, *args)``: ``carry = pass_.step(carry, rows, *args)`` over the chunks;
- ``first(pass_, init)``: the same, for the first pass (host data also counts the examples and the
  non-finite inputs there, and raises before any score is computed);
- ``scores(kernel, *args)``: the ``(n,)`` per-example values ``kernel(rows, *args)`` of every chunk;
- ``transform(G, gram_pass, r_factor, run_pass, rtol, route)``: the route's transform. Device arrays
  take :func:`nlis_jax.routes.transform_from_pass`, which asks for every pass through ``run_pass`` (one
  call site in the program, so the dual rows are traced once for all of them); host data a caller of the
  same :mod:`nlis_jax.routes` steps that runs only the passes the route needs from Python.

The device path (:mod:`nlis_jax._streaming`) is one ``jit`` with ``lax.scan`` and ``lax.map`` over the
chunks of a padded array; the host path (:mod:`nlis_jax._host`) a Python loop over chunks read from
numpy, memmaps or a chunk source, each step one jitted call, the next chunk's transfer overlapping it.
Under ``jax.distributed`` host data combines the per-process carries with ``pass_.combine`` (a sharded
device array needs nothing: its reductions are all-reduces).

:func:`leverage_passes` runs the passes of the leverage (their maths: :mod:`nlis_jax._streaming`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nlis_jax import routes
from nlis_jax._colscale import add_scaled_gram, rescale_gram, scale_columns, scaled_gram_start
from nlis_jax._dual import dual_block
from nlis_jax._types import Array


def chunk_rows(model, xc, yc, valid, *, num_nodes, mode) -> Array:
    """The dual rows ``(chunk, k, p+1)`` of one chunk of a flat model (traced); rows from ``valid`` on
    (padding) are zero."""
    chunk = jax.tree.leaves(xc)[0].shape[0]
    block = dual_block(model, xc, yc, num_nodes=num_nodes, mode=mode, chunk_size=chunk)
    keep = jnp.arange(chunk) < valid  # where, not a product: a NaN row copied into the padding stays out
    block = jnp.where(keep.reshape((chunk,) + (1,) * (block.ndim - 1)), block, 0)
    k = math.prod(model.out_shape)
    return block.reshape(chunk, k, block.shape[-1]).astype(routes.compute_dtype(model.theta.dtype))


def _flat(rows: Array, colmax: Array | None = None) -> Array:
    """``(chunk·k, p+1)`` rows, their columns scaled for the maxima ``colmax`` when given."""
    flat = rows.reshape(-1, rows.shape[-1])
    return flat if colmax is None else scale_columns(flat, colmax)


class Pass(NamedTuple):
    """A reduction over the chunks: ``step(carry, rows, *args)``, and ``combine`` of the per-process
    carries stacked along a new first axis (host data under ``jax.distributed``)."""

    step: Callable
    combine: Callable


def _sum(stacked):
    return jax.tree.map(lambda a: a.sum(0), stacked)


def _scaled_gram_step(carry, rows):
    return add_scaled_gram(*carry, _flat(rows))


def _combine_scaled_grams(stacked):
    """Every process's prescaled Gram matrix at the common (largest) column maxima, summed."""
    G, colmax = stacked
    top = colmax.max(0)
    return jax.vmap(rescale_gram, (0, 0, None))(G, colmax, top).sum(0), top


def _gram_step(G, rows, M, colmax):
    return G + routes.gram(_flat(rows, colmax) @ M)


def _qr_step(R, rows, colmax):
    return jnp.linalg.qr(jnp.concatenate([R, _flat(rows, colmax)]), mode="r")


def _combine_r(stacked):
    return jnp.linalg.qr(stacked.reshape(-1, stacked.shape[-1]), mode="r")


def _any_step(carry, rows, kind, M, colmax):
    """A step of the pass :func:`nlis_jax.routes.transform_from_pass` asks for: TSQR or Gram of ``A M``."""
    return lax.cond(
        kind == routes.PASS_TSQR,
        lambda c: _qr_step(c, rows, colmax),
        lambda c: _gram_step(c, rows, M, colmax),
        carry,
    )


SCALED_GRAM = Pass(_scaled_gram_step, _combine_scaled_grams)
GRAM = Pass(_gram_step, _sum)
TSQR = Pass(_qr_step, _combine_r)
ANY = Pass(_any_step, None)  # traced code only (device arrays): one pass of either kind


def leverage_rows(rows: Array, transform: routes.Transform, colmax: Array) -> Array:
    """Block leverage ``(chunk,)`` of the rows of a chunk (the scoring pass)."""
    h = routes.apply_transform(_flat(rows, colmax), transform, row_norms=True)
    return h.reshape(rows.shape[:2]).sum(axis=1)


def norm_rows(rows: Array) -> Array:
    """Squared block norms ``(chunk,)`` of the rows of a chunk."""
    return jnp.sum(jnp.square(rows), axis=2).sum(axis=1)


class Chunks(NamedTuple):
    """How a path visits the chunks (see the module docstring)."""

    first: Callable
    reduce: Callable
    scores: Callable
    transform: Callable


def leverage_passes(chunks: Chunks, dim: int, dtype, rtol, route: str | None):
    """``(h, transform)``: the raw block leverage of every example and the route's transform."""
    G, colmax = chunks.first(SCALED_GRAM, scaled_gram_start(dim, dtype))
    zeros = jnp.zeros((dim, dim), dtype)

    def gram_pass(M):
        return chunks.reduce(GRAM, zeros, M, colmax)

    def r_factor():
        return chunks.reduce(TSQR, zeros, colmax)

    def run_pass(kind, M):
        return chunks.reduce(ANY, zeros, kind, M, colmax)

    transform = chunks.transform(G, gram_pass, r_factor, run_pass, rtol, route)
    return chunks.scores(leverage_rows, transform, colmax), transform
