r"""The passes of the streaming scores, written once for device arrays and for host data.

Both paths see the dual matrix one chunk of examples at a time, as the ``(chunk, k, p+1)`` rows of
:func:`chunk_rows` (padding rows zero, half precision widened by :func:`nlis_jax.routes.compute_dtype`),
and differ only in how a pass visits the chunks. A path supplies that as :class:`Chunks`:

- ``reduce(pass_, init, *args)``: ``carry = pass_.step(carry, rows, *args)`` over the chunks;
- ``first(pass_, init)``: the same, for the first pass (host data also counts the examples and the
  non-finite inputs there, and raises before any score is computed);
- ``scores(kernel, *args)``: the ``(n,)`` per-example values ``kernel(rows, *args)`` of every chunk;
- ``transform(G, run_pass, rtol, route)``: the route's transform, every later pass asked of
  ``run_pass(kind, M)`` (:data:`ANY`). A traced call on device arrays takes
  :func:`nlis_jax.routes.transform_from_pass` (one call site in the program, so the dual rows are traced
  once for all of them); an eager call and host data take :func:`nlis_jax.routes.transform_stepwise`,
  the same stages run from Python, which runs only the passes the route needs (host data resolve
  :data:`ANY` to :data:`GRAM` or :data:`TSQR` by its concrete kind: their passes are combined across
  processes).

The device path (:mod:`nlis_jax._streaming`) runs ``lax.scan`` and ``lax.map`` over the chunks of a
padded array, one ``jit`` per pass (eager) or one for all (traced); the host path
(:mod:`nlis_jax._host`) a Python loop over chunks read from numpy, memmaps or a chunk source, each step
one jitted call, the next chunk's transfer overlapping it.
Under ``jax.distributed`` host data combines the per-process carries with ``pass_.combine`` (a sharded
device array needs nothing: its reductions are all-reduces).

Inside a chunk, both paths visit the rows of a fixed rule a block at a time (:func:`reduce_chunk`,
:func:`chunk_values`, :func:`fold_blocks`): each block's rows are formed and used by the pass while they
are in cache. Passes that sum over rows (the Gram passes) and the scoring pass take blocks; the TSQR pass
takes the whole chunk, formed block by block.

:func:`leverage_passes` runs the passes of the leverage (their maths: :mod:`nlis_jax._streaming`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nlis_jax import _traced as traced
from nlis_jax import routes
from nlis_jax._adjoint import fixed_rule_chunk_size, resolve_mode
from nlis_jax._colscale import add_scaled_gram, rescale_gram, scale_columns, scaled_gram_start
from nlis_jax._dual import dual_block
from nlis_jax._precision import times_power_of_two
from nlis_jax._types import Array


def _padded(a, rows: int):
    """``a`` with copies of its row 0 appended up to ``rows`` rows."""
    pad = rows - a.shape[0]
    return jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])]) if pad else a


def balanced_chunk(n: int, chunk_size: int, multiple: int = 1) -> int:
    """Rows per chunk for ``n`` examples taken at most ``chunk_size`` at a time: ``n`` when it fits, else
    the fewest chunks, ``m = ceil(n / chunk_size)``, of equal length ``ceil(n / m)`` rounded up to a
    multiple of ``chunk_size / 8`` (never above ``chunk_size``), and with ``multiple`` a multiple of it
    (:func:`device_chunk`).

    Chunks of ``min(chunk_size, n)`` rows padded the last one: ``n = chunk_size + 1`` read and formed
    ``2·chunk_size`` rows. Equal chunks pad at most ``m·chunk_size/8`` rows (a quarter of ``n`` at worst,
    ``n = chunk_size + 1``; 1/16 of it at ``n`` = 8·chunk_size), and the rounding keeps the chunk
    lengths of all ``n > chunk_size`` to the multiples of ``chunk_size / 8`` from ``5/8·chunk_size`` and
    ``chunk_size`` itself: five compiled programs at most, where every length of its own would compile
    once per ``n``.
    """
    if n <= chunk_size:
        return max(n, 1)  # an empty host block of one process under jax.distributed: no chunk read
    chunk_size = chunk_size // multiple * multiple
    m = -(-n // chunk_size)
    step = -(-max(chunk_size // 8, 1) // multiple) * multiple
    return min(chunk_size, -(-n // (m * step)) * step)


def device_chunk(n: int, chunk_size: int) -> int:
    """:func:`balanced_chunk` for device arrays: with ``D > 1`` devices the length is also a multiple of
    ``D`` (when ``chunk_size ≥ D``), so that a row-sharded ``xs`` stays sharded in its strided chunks
    (:func:`strided_chunks` reshapes the rows to ``(chunk, m)``: a chunk of 10 rows on 4 devices, or the
    balanced 14 of ``n = 52`` taken 16 at a time, gathered every row onto every device)."""
    devices = jax.device_count()
    return balanced_chunk(n, chunk_size, devices if chunk_size >= devices else 1)


def pad_chunks(tree, n: int, chunk: int):
    """Reshape every leaf ``(n, ...)`` to ``(m, chunk, ...)``, padding with copies of row 0."""
    m = -(-n // chunk)
    return jax.tree.map(lambda a: _padded(a, m * chunk).reshape((m, chunk) + a.shape[1:]), tree), m


def strided_chunks(tree, n: int, chunk: int):
    """Every leaf ``(n, ...)`` as ``(m, chunk, ...)`` whose chunk ``i`` holds rows ``i, i + m, i + 2m, …``
    (padded with copies of row 0 to ``m·chunk`` rows); returns ``(tree, m)``.

    The rows of a chunk are spread over the whole array, so a row-sharded leaf stays sharded along the
    chunk axis: each chunk's product is an all-reduce of the devices' rows, where contiguous chunks
    (:func:`pad_chunks`) put the sharding on the scanned axis and XLA gathered every row onto every
    device. Row ``r`` of chunk ``i`` is valid while ``r < (n - i)/m`` (:func:`strided_valid`): padding
    is a suffix of each chunk, as for contiguous chunks. Values ``v (m, chunk)`` per chunk row come back
    in row order as ``v.T.reshape(-1)[:n]``.
    """
    m = -(-n // chunk)
    return jax.tree.map(
        lambda a: jnp.moveaxis(_padded(a, m * chunk).reshape((chunk, m) + a.shape[1:]), 1, 0), tree
    ), m


def strided_valid(n: int, m: int, i):
    """Valid rows (a prefix) of chunk ``i`` of :func:`strided_chunks`: ``ceil((n - i)/m)``."""
    return (n - i + m - 1) // m


def chunk_rows(model, xc, yc, valid, *, num_nodes, mode) -> Array:
    """The dual rows ``(chunk, k, p+1)`` of one chunk of ``model.n`` examples of a flat model (traced);
    rows from ``valid`` on (padding) are zero. A fixed rule forms them in pieces of :func:`block_size`
    examples (``lax.map``)."""
    chunk = model.n
    inner = block_size(model, num_nodes=num_nodes, mode=mode)
    block = dual_block(model, xc, yc, num_nodes=num_nodes, mode=mode, chunk_size=inner)
    keep = jnp.arange(chunk) < valid  # where, not a product: a NaN row copied into the padding stays out
    block = jnp.where(keep.reshape((chunk,) + (1,) * (block.ndim - 1)), block, 0)
    k = math.prod(model.out_shape)
    return block.reshape(chunk, k, block.shape[-1]).astype(routes.compute_dtype(model.theta.dtype))


def block_size(model, *, num_nodes, mode) -> int:
    """Examples per block of a chunk of ``model.n`` whose dual rows are formed and used together.

    A fixed rule takes the adjoint's own chunk (:func:`nlis_jax._adjoint.fixed_rule_chunk_size`): in
    reverse mode on a CPU the cache chunk (``2¹⁸ / (k·p)`` examples: the rows stay in cache between being
    written and being read by the pass), and everywhere at most the memory chunk (``2²³ / (k·p)``
    examples, :func:`nlis_jax._adjoint.default_chunk_size`), so that a large ``p`` never forms one
    vectorised adjoint call over the whole streaming chunk; the adaptive rule, which chunks its own
    work, the whole chunk.
    """
    if num_nodes is None:
        return model.n
    p, k = model.theta.shape[0], math.prod(model.out_shape)
    return fixed_rule_chunk_size(model.n, p, k, resolve_mode(mode, p, k), model.convolves)


def fold_blocks(model, xc, yc, valid, body: Callable, init, *, num_nodes, mode):
    """``(carry, values)`` of ``carry, v = body(carry, rows, j)`` over the blocks ``j`` of one chunk.

    The chunk's examples are taken at most :func:`block_size` at a time (the last block padded), each block's
    dual rows (:func:`chunk_rows`, ``(block, k, p+1)``) formed and consumed by ``body`` while they are
    in cache, instead of writing the rows of the whole chunk to memory and reading them back: on the
    64-8-1 MLP of benchmarks/README.md (f), 8,192 examples, 8 nodes, a Gram pass's step took 41–46 ms
    in blocks of 256–1,024 against 95 ms whole (rows alone: 15 against 72 ms). ``values`` are the
    per-example outputs ``v`` (leading axis the block's examples) of the chunk's ``model.n`` examples,
    or ``None``. One block (``lax.scan`` skipped) when the chunk is no larger than a block.
    """
    chunk = model.n
    size = block_size(model, num_nodes=num_nodes, mode=mode)
    kw = dict(num_nodes=num_nodes, mode=mode)
    if size >= chunk:
        return body(init, chunk_rows(model, xc, yc, valid, **kw), 0)
    size = -(-chunk // -(-chunk // size))  # as many blocks, of equal sizes: the least padding
    blocks, m = pad_chunks((xc, yc), chunk, size)
    valid = jnp.minimum(valid, chunk)  # the padding of the last block is not valid
    block_model = model._replace(n=size)

    def step(carry, jb):
        j, (xb, yb) = jb
        return body(carry, chunk_rows(block_model, xb, yb, valid - j * size, **kw), j)

    carry, values = lax.scan(step, init, (jnp.arange(m), blocks))
    return carry, jax.tree.map(lambda v: v.reshape((m * size,) + v.shape[2:])[:chunk], values)


def reduce_chunk(model, xc, yc, valid, pass_: Pass, carry, args, *, num_nodes, mode):
    """``carry = pass_.step(carry, rows, *args)`` over the dual rows of one chunk: block by block
    (:func:`fold_blocks`) when the pass is a sum over rows (``pass_.blocked``), else on the whole chunk.
    :data:`ANY` decides between its two passes on the chunk, so that its Gram pass takes blocks."""
    kw = dict(num_nodes=num_nodes, mode=mode)
    if pass_ is ANY and block_size(model, **kw) < model.n:
        kind, M, colmax = args
        return lax.cond(
            kind == routes.PASS_TSQR,
            lambda c: reduce_chunk(model, xc, yc, valid, TSQR, c, (colmax,), **kw),
            lambda c: reduce_chunk(model, xc, yc, valid, GRAM, c, (M, colmax), **kw),
            carry,
        )
    if not pass_.blocked:
        return pass_.step(carry, chunk_rows(model, xc, yc, valid, **kw), *args)

    def body(c, rows, j):
        return pass_.step(c, rows, *args), None

    return fold_blocks(model, xc, yc, valid, body, carry, **kw)[0]


def chunk_values(model, xc, yc, valid, kernel: Callable, args, *, num_nodes, mode) -> Array:
    """The per-example values ``kernel(rows, *args)`` (``(chunk,)``) of one chunk, block by block."""

    def body(c, rows, j):
        return c, kernel(rows, *args)

    return fold_blocks(model, xc, yc, valid, body, (), num_nodes=num_nodes, mode=mode)[1]


def _flat(rows: Array, colmax: Array | None = None) -> Array:
    """``(chunk·k, p+1)`` rows, their columns scaled for the maxima ``colmax`` when given."""
    flat = rows.reshape(-1, rows.shape[-1])
    return flat if colmax is None else scale_columns(flat, colmax)


class Pass(NamedTuple):
    """A reduction over the chunks: ``step(carry, rows, *args)``, ``combine`` of the per-process carries
    stacked along a new first axis (host data under ``jax.distributed``), and ``blocked``: whether the
    step may take a chunk's rows a block at a time (a sum over rows; not a QR, whose cost per call grows
    with ``p³``)."""

    step: Callable
    combine: Callable
    blocked: bool = True


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
    return routes.qr_r(jnp.concatenate([_flat(rows, colmax), R]))


def _combine_r(stacked):
    return routes.qr_r(stacked.reshape(-1, stacked.shape[-1]))


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
TSQR = Pass(_qr_step, _combine_r, blocked=False)
ANY = Pass(_any_step, None, blocked=False)  # device arrays: one program for a pass of either kind


def leverage_rows(rows: Array, transform: routes.Transform, colmax: Array) -> Array:
    """Block leverage ``(chunk,)`` of the rows of a chunk (the scoring pass)."""
    h = routes.apply_transform(_flat(rows, colmax), transform, row_norms=True)
    return h.reshape(rows.shape[:2]).sum(axis=1)


def norm_rows(rows: Array) -> Array:
    """Block norms ``‖F̃_i‖`` ``(chunk,)`` of the rows of a chunk, NOT squared: each example's rows are
    scaled by a power of two near their largest entry first, so the norm is exact wherever the entries
    are in range (their squares over- or underflowed at 1e±19 in float32: rows of 1e-19 scored 0, rows of
    1e30 Inf). :func:`squared_ratios` squares them relative to the largest."""
    top = jnp.max(jnp.abs(rows), axis=(1, 2))
    e = jnp.frexp(jnp.where(jnp.isfinite(top) & (top > 0), top, 1))[1].astype(jnp.int32)
    scaled = times_power_of_two(rows, -e[:, None, None])
    return jnp.ldexp(jnp.sqrt(jnp.sum(jnp.square(scaled), axis=(1, 2))), e)


def squared_ratios(norms: Array) -> tuple[Array, Array]:
    """``((‖F̃_i‖/t)², Σ_i (‖F̃_i‖/t)²)`` with ``t`` the largest norm (1 if all are zero): the row-norm
    probabilities are their ratio, and neither squares past the dtype's range."""
    top = jnp.max(norms)
    q = jnp.square(norms / jnp.where(top > 0, top, 1))
    return q, jnp.sum(q)


class Chunks(NamedTuple):
    """How a path visits the chunks (see the module docstring)."""

    first: Callable
    reduce: Callable
    scores: Callable
    transform: Callable


def leverage_passes(chunks: Chunks, dim: int, dtype, rtol, route: str | None):
    """``(h, transform, rows_finite)``: the raw block leverage of every example, the route's transform, and
    whether every dual row was finite (the diagonal of the first pass's Gram matrix, whose columns are
    prescaled, so it does not overflow): NaN scores from finite rows are a failure of the linear algebra,
    not of the model."""
    G, colmax = chunks.first(SCALED_GRAM, _scaled_start(dim, dtype))

    def run_pass(kind, M):  # each pass its own zero start (an eager device pass donates it)
        return chunks.reduce(ANY, routes.square_zeros(dim, dtype), kind, M, colmax)

    transform = chunks.transform(G, run_pass, rtol, route)
    h = chunks.scores(leverage_rows, combined_transform(transform), colmax)
    return h, transform, routes.gram_is_finite(G)


# Jitted: eagerly (host data, an eager call on device arrays) each is one program, not operations
# dispatched on their own (a GPU launch each).
_scaled_start = traced.jit(scaled_gram_start, static_argnums=(0, 1))


@traced.jit
def combined_transform(t: routes.Transform) -> routes.Transform:
    """``t`` with its refinement folded into the first factor, ``first·second``, for the scoring pass.

    The rows are then multiplied once (``‖F̃_c (T₁T₂)‖²``) instead of twice, which halves the scoring
    pass's products on the refined routes, as the dense leverage does (:func:`nlis_jax.routes.gram_basis`:
    the rows carry rounding ``~eps·κ(F̃)``, which the input's own rounding already causes in the
    leverage). ``first·second`` costs ``m³``, once."""
    product = jnp.matmul(t.first, t.second, precision=lax.Precision.HIGHEST)
    first = jnp.where(t.refine, product, t.first)
    return t._replace(first=first, refine=jnp.zeros_like(t.refine))
