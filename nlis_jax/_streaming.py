r"""Leverage scores of a dual matrix too large to hold: stream the examples in chunks.

Memory ``O(chunk·p + p²)``, time linear in ``n``. The dual rows of each chunk are recomputed on every
pass (adjoints are cheap next to holding ``n × (p+1)``). The route is the one of
:func:`nlis_jax.leverage_scores` on the same matrix, decided by the same code (:mod:`nlis_jax.routes`):

- pass 1 accumulates the Gram matrix ``G = Σ_c F̃_cᵀ F̃_c`` of the rows with every column prescaled by a
  power of two, as the dense route does (the column maxima found on the way, :mod:`nlis_jax._colscale`; the
  later passes scale each chunk alike), so a column ``×1e154`` neither overflows nor drops the rank
  (a ``lax.scan`` over chunks; on a sharded ``xs`` each chunk's product becomes an all-reduce); the
  route is picked from it and asks for the passes it needs, all through one pass program (so the dual
  rows are traced three times: this pass, that program and the scoring pass; four when a fixed rule
  takes blocks on a CPU, the Gram and TSQR passes each tracing their own,
  :func:`nlis_jax._passes.reduce_chunk`). An eager call runs each pass and each of the route's
  stages as a program of its own, and only the passes its route needs
  (:func:`nlis_jax.routes.transform_stepwise`: :func:`_streaming_staged`); a call traced by a user's
  ``jit`` is one program (:func:`_streaming_jit`, :func:`nlis_jax.routes.transform_from_pass`: a
  loop whose stages hold every route's state, for which XLA reserved 19–21 ``(p+1)²`` arrays where the
  eager call grew memory by 6–11, ``benchmarks/README.md`` (a), "Streamed workspace");
- ``"gram"``: the scoring pass, ``h = ‖F̃_c D⁻¹ L⁻ᵀ‖²`` by row;
- ``"gram2"``: one more Gram pass on ``F̃_c D⁻¹ L⁻ᵀ`` (CholeskyQR2), then the scoring pass;
- ``"stable"``: a streaming TSQR pass, ``R ← qr([F̃_c; R]).R`` (zero rows last:
  :func:`nlis_jax.routes.qr_r`), then ``R D⁻¹ = W S Vᵀ`` and ``h = ‖F̃_c D⁻¹ V S^{-1}‖²`` over the
  singular values above ``rtol·s_max`` (below float64 after one more CholeskyQR pass, as the dense
  route): backward stable;
- ``"shifted"`` (below float64): Gram passes on ``F̃_c D⁻¹ L₀⁻ᵀ`` (shifted Cholesky factor ``L₀``), then
  the scoring pass; route ``"stable"`` when the matrix is numerically rank-deficient.

The passes are written once (:mod:`nlis_jax._passes`) for device arrays (here) and host data
(:mod:`nlis_jax._host`). Arrays with fewer dual rows than columns (``n·k < p + 1``; device arrays, or
host arrays in one process) are not streamed: their dual matrix is smaller than its Gram matrix, and it
is scored by the ``O(n²p)`` route of wide matrices (:func:`nlis_jax.routes.wide_basis`, as
:func:`nlis_jax.leverage_scores`) where the Gram matrix cost ``O(np² + p³)``: n = 500, p = 8,321 took
187–252 s streamed against 0.35 s (``benchmarks/README.md`` (a), "Wide matrices").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nlis_jax import _traced as traced
from nlis_jax import routes
from nlis_jax._adjoint import (
    check_model,
    check_path_args,
    flatten_model,
    model_mode,
    nonfinite_dual_rows,
    params_shape,
)
from nlis_jax._checks import (
    check_bool,
    check_fits_in_memory,
    check_floating,
    check_native,
    check_positive,
    check_positive_int,
    check_tolerances,
    fetch,
    is_concrete,
    report_nonfinite,
    under_trace,
)
from nlis_jax._dual import dual_matrix
from nlis_jax._host import (
    check_wide_fits,
    divide_in_place,
    host_norm_scores,
    host_streaming_leverage,
    is_host_data,
)
from nlis_jax._passes import (
    Chunks,
    chunk_values,
    device_chunk,
    leverage_passes,
    norm_rows,
    reduce_chunk,
    squared_ratios,
    strided_chunks,
    strided_valid,
)
from nlis_jax._precision import highest_precision
from nlis_jax._scores import (
    LINEAR_ALGEBRA_FAILED,
    STREAMED_ZERO_NORMS,
    Leverage,
    as_leverage,
    leverage_scores,
)
from nlis_jax._types import ApplyFn, Array, PyTree

#: Examples per chunk by default on a CPU, whose memory is also the device's.
CPU_CHUNK = 4096
#: On an accelerator (GPU, TPU) the default chunk is the most examples whose dual rows hold at most
#: ``ACCELERATOR_CHUNK_ENTRIES / (p + 1)`` entries per output, between ``CPU_CHUNK`` and this.
ACCELERATOR_CHUNK_MAX = 65536
ACCELERATOR_CHUNK_ENTRIES = 1 << 27  # 512 MiB of float32 rows per output of the model


def stream_chunk_size(params: PyTree) -> int:
    """The default ``chunk_size`` of the streaming scores: :data:`CPU_CHUNK` examples on a CPU; on an
    accelerator ``clip(2²⁷ // (p + 1), CPU_CHUNK, ACCELERATOR_CHUNK_MAX)``.

    On a GPU each chunk costs a host → device copy and a few launches and synchronisations whatever its
    size: on an H200 (2026-12-04, 10⁷ rows of 64 float32 from a file, a tanh MLP with ``p = 529``, 8
    nodes) chunks of 8,192 rows ran at 3.3 million rows/s (1.64× the floor of the copies and two Gram
    products on the device), chunks of 65,536 at 7.7 million rows/s (at that floor). The bound in ``p``
    keeps a chunk's dual rows (formed whole by the adaptive rule) within 512 MiB of float32 per output.
    """
    if jax.default_backend() == "cpu":
        return CPU_CHUNK
    p = sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params))
    return min(ACCELERATOR_CHUNK_MAX, max(CPU_CHUNK, ACCELERATOR_CHUNK_ENTRIES // (p + 1)))


def _device_chunks(apply_fn, params, xs, ys, *, chunk_size, num_nodes, mode) -> tuple[Chunks, object]:
    """The chunks of device arrays (:mod:`nlis_jax._passes`): ``lax.scan`` / ``lax.map`` over a padded
    copy in strided chunks (:func:`~nlis_jax._passes.strided_chunks`: row-sharded ``xs`` stays sharded,
    each chunk's product an all-reduce), padding rows zero (they add nothing to a Gram matrix or an R
    factor); and the flat model."""
    model = flatten_model(apply_fn, params, xs)
    n = model.n
    chunk = device_chunk(n, chunk_size)
    xs_c, m = strided_chunks(xs, n, chunk)
    ys_c = None if ys is None else strided_chunks(jnp.asarray(ys, model.theta.dtype), n, chunk)[0]
    kw = dict(num_nodes=num_nodes, mode=mode)
    chunk_model = model._replace(n=chunk)

    def piece(i):  # (x, y, valid) of chunk i
        return jax.tree.map(lambda a: a[i], xs_c), None if ys_c is None else ys_c[i], strided_valid(n, m, i)

    def reduce(pass_, init, *args):
        def one(c, i):
            return reduce_chunk(chunk_model, *piece(i), pass_, c, args, **kw), None

        return lax.scan(one, init, jnp.arange(m))[0]

    def scores(kernel, *args):
        values = lax.map(lambda i: chunk_values(chunk_model, *piece(i), kernel, args, **kw), jnp.arange(m))
        return values.T.reshape(-1)[:n]  # (m, chunk): value c of chunk i is row c·m + i

    # every pass through one call site
    return Chunks(reduce, reduce, scores, routes.transform_from_pass), model


@functools.partial(traced.jit, static_argnames=("apply_fn", "chunk_size", "num_nodes", "mode", "route"))
@highest_precision
def _streaming_jit(apply_fn, params, xs, ys, rtol, *, chunk_size, num_nodes, mode, route):
    kw = dict(chunk_size=chunk_size, num_nodes=num_nodes, mode=mode)
    chunks, model = _device_chunks(apply_fn, params, xs, ys, **kw)
    dim, dtype = model.theta.shape[0] + 1, routes.compute_dtype(model.theta.dtype)
    h, transform, rows_finite = leverage_passes(chunks, dim, dtype, rtol, route)
    return h, transform.rank, transform.route, *_outcome(h, transform, rows_finite)


def _staged_chunks(apply_fn, params, xs, ys, **kw) -> Chunks:
    """The chunks of device arrays for an eager call (:func:`_streaming_staged`): each pass one jitted
    program over the arrays (:func:`_device_reduce`, :func:`_device_scores`), the route's stages run
    from Python (:func:`nlis_jax.routes.transform_stepwise`) with every later pass through the one
    program of :data:`~nlis_jax._passes.ANY`."""

    def reduce(pass_, init, *args):
        return _device_reduce(apply_fn, params, xs, ys, init, args, pass_=pass_, **kw)

    def scores(kernel, *args):
        return _device_scores(apply_fn, params, xs, ys, args, kernel=kernel, **kw)

    return Chunks(reduce, reduce, scores, routes.transform_stepwise)


_STATIC = ("apply_fn", "chunk_size", "num_nodes", "mode")


@functools.partial(traced.jit, static_argnames=(*_STATIC, "pass_"), donate_argnames=("init",))
@highest_precision
def _device_reduce(apply_fn, params, xs, ys, init, args, *, pass_, chunk_size, num_nodes, mode):
    """One pass ``pass_`` (:mod:`nlis_jax._passes`) over the chunks of device arrays, from ``init``."""
    chunks, _ = _device_chunks(
        apply_fn, params, xs, ys, chunk_size=chunk_size, num_nodes=num_nodes, mode=mode
    )
    return chunks.reduce(pass_, init, *args)


@functools.partial(traced.jit, static_argnames=(*_STATIC, "kernel"))
@highest_precision
def _device_scores(apply_fn, params, xs, ys, args, *, kernel, chunk_size, num_nodes, mode):
    """The per-example values ``kernel(rows, *args)`` of device arrays, chunk by chunk."""
    chunks, _ = _device_chunks(
        apply_fn, params, xs, ys, chunk_size=chunk_size, num_nodes=num_nodes, mode=mode
    )
    return chunks.scores(kernel, *args)


def _streaming_staged(apply_fn, params, xs, ys, rtol, *, chunk_size, num_nodes, mode, route):
    """:func:`_streaming_jit`'s outputs from an eager call on concrete arrays, pass by pass."""
    kw = dict(chunk_size=chunk_size, num_nodes=num_nodes, mode=mode)
    flat = params_shape(params)  # the dtype ravel_pytree gives the flat parameters (a weakly typed leaf)
    dim, dtype = flat.shape[0] + 1, routes.compute_dtype(flat.dtype)
    h, transform, rows_finite = leverage_passes(
        _staged_chunks(apply_fn, params, xs, ys, **kw), dim, dtype, rtol, route
    )
    return h, transform.rank, transform.route, *_outcome(h, transform, rows_finite)


@traced.jit
def _outcome(h, transform, rows_finite):
    """``(non-finite scores from non-finite rows, from the linear algebra, lost)`` of the leverage ``h``."""
    bad = jnp.sum(~jnp.isfinite(h))
    # route "shifted" on a dependent column it could not see: Σh one short of the rank (routes.gram_basis
    # falls back in the program; here the caller redoes the passes on route "stable")
    lost = (transform.route == routes.SHIFTED) & ~routes.kept_every_direction(h, transform.rank, True)
    # a NaN row makes the Gram matrix and so every score NaN; NaN from finite rows is the linear algebra's
    return jnp.where(rows_finite, 0, bad), jnp.where(rows_finite, bad, 0), lost


#: ``(p+1) × (p+1)`` arrays the streamed leverage scores hold at their peak, the Gram matrix and the
#: workspace of its factorisations, for the memory check of an eager call (under a trace XLA may never
#: form them, and nothing is checked). ``"device"``: a program per pass and per stage of the route
#: (``_streaming_staged``) grew the process's anonymous memory by 6.2–11.0 Gram matrices on repeated
#: calls and by 8.6–17.6 on the first (compilation included: a constant, against Gram matrices of 28–77
#: MiB) at p+1 = 2,701, 3,002 and 4,501 (benchmarks/README.md (a), "Streamed workspace"); as one program for
#: every route (``_streaming_jit``, what a call under a user's ``jit`` runs) XLA reserved 19–21 of them
#: on every route at p+1 = 642 to 21,250 (a budget of the Gram matrix alone let p+1 = 21,250 in float32
#: pass against 21.9 GiB free, then XLA asked for 37.9 GB: RESOURCE_EXHAUSTED). ``"host"``: host data
#: (the same stages) grew it by 9–12 at p+1 = 4,226 and 8,322.
GRAM_COPIES = {"device": 12, "host": 12}


def _check_gram_fits(params, where: str) -> None:
    """``MemoryError`` before any work when the ``(p+1) × (p+1)`` Gram matrix of the streamed scores and
    its factorisations' workspace (:data:`GRAM_COPIES`, ``where`` ``"device"`` or ``"host"``) cannot be
    held (p = 804,865: 5 TB in float64 for the Gram matrix alone; it was XLA's raw
    RESOURCE_EXHAUSTED after the compilation)."""
    check_native("params", params)
    leaves = jax.tree.leaves(params)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(leaf), jnp.floating) for leaf in leaves):
        return  # the checks of the params name it
    p = sum(int(jnp.size(leaf)) for leaf in leaves)
    dtype = routes.compute_dtype(jnp.result_type(*leaves))
    hint = (
        "for many parameters score a random projection instead: nj.projected_leverage_scores(key, apply_fn, "
        "params, xs, ys, dim=...) (memory O(chunk·p + n·dim + dim²); ys=None for label-free scores), or "
        "use nj.streaming_norm_scores (no Gram matrix)."
    )
    what = f"the Gram matrix of the streamed scores (p = {p:,})"
    why = "the workspace of its factorisations"
    check_fits_in_memory(what, (p + 1, p + 1), dtype, hint, GRAM_COPIES[where], why, whole=True)  # each
    # process holds the Gram matrix and factorises it


@traced.entry
def streaming_leverage_scores(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    ys: Array | None = None,
    *,
    chunk_size: int | None = None,
    num_nodes: int | None = None,
    mode: str = "auto",
    rtol: float | None = None,
    route: str | None = None,
    return_info: bool = False,
    out=None,
) -> Array | Leverage:
    r"""Leverage-score probabilities of the dual matrix ``[F*(θ) | f(0) − y]``, streamed in chunks.

    Same result as ``leverage_scores(dual_matrix(apply_fn, params, xs, ys))`` (to rounding, and by the
    same route) with memory ``O(chunk_size·k·p + p²)``; the dual matrix is never materialised, except
    for arrays with fewer dual rows than columns (``n·k < p + 1``; device arrays, or host arrays in one
    process), whose dual matrix is smaller than the Gram matrix: they are scored from it by the wide
    route of :func:`nlis_jax.leverage_scores` (device arrays: ``leverage_scores(dual_matrix(...))``
    exactly), and no ``(p+1)²`` Gram matrix is formed.

    Args:
      apply_fn, params, xs, ys, num_nodes, mode: as in :func:`nlis_jax.dual_matrix`. ``xs`` may also be
        host data that never travels to the device whole (out of core): numpy arrays or
        ``numpy.memmap`` (``np.load(path, mmap_mode="r")``, with ``ys`` numpy or ``None``), or a
        callable returning an iterable of ``(x_chunk, y_chunk)`` pairs (then ``ys=None``); chunks are
        copied one at a time, overlapped with the device's work. Under ``jax.distributed`` each
        process passes its own block and gets a global array. A chunk source is called once per pass
        and must yield the same rows in the same order each time (it may refill one buffer for every
        chunk: a chunk's rows are used or copied before the next is asked for): each chunk is checked as
        it arrives, every pass must yield as many examples as the first, with a digest of sampled
        rows of each piece of ``chunk_size`` rows equal to the first pass's, and with the route chosen
        automatically the raw leverage must sum to the rank (``ValueError`` otherwise).
      chunk_size: examples per memory chunk (static); default 4,096 on a CPU, up to 65,536 on a GPU or
        TPU, fewer for large ``p``.
      rtol: rank tolerance on the singular values of the column-equilibrated dual matrix, relative to
        the largest (default ``10·eps``), as ``rtol`` of :func:`nlis_jax.leverage_scores`; NOT the
        quadrature tolerance that ``rtol`` sets in :func:`nlis_jax.dual_matrix`: the adaptive rule runs
        at its default tolerance here (pass ``num_nodes=q`` for a cheaper fixed rule).
      route: force ``"gram"``, ``"gram2"``, ``"stable"`` or ``"shifted"`` (default: chosen from the
        conditioning and ``rtol``). The fast routes ``"gram"`` and ``"gram2"`` count every column in the
        rank: forced on input that is rank-deficient for ``rtol`` they raise ``ValueError``. Route
        ``"shifted"`` (below float64) gives way to ``"stable"`` where its rank check fails or its scores
        miss a dependent direction (the passes are then redone), which ``return_info`` reports.
      return_info: return a :class:`nlis_jax.Leverage` (probabilities, raw block leverage, rank, route).
      out: host data only: a writable ``(n,)`` numpy array or memmap (``np.lib.format.open_memmap``)
        that receives the probabilities (this process's block under ``jax.distributed``) and is
        returned, so the scores need no anonymous memory; with ``return_info`` the
        :class:`nlis_jax.Leverage` then holds ``out`` as ``probs`` and ``None`` as ``leverage``.
        When the call raises, ``out`` may hold part of the work (raw leverage, unnormalised norms).

    Returns:
      ``(n,)`` probabilities summing to 1, or a :class:`nlis_jax.Leverage`.
    """
    num_nodes, *_ = check_path_args(num_nodes, mode, None, inputs=(params, xs, ys))
    chunk_size = stream_chunk_size(params) if chunk_size is None else chunk_size
    chunk_size = check_positive_int("chunk_size", chunk_size)
    routes.check_route(route)
    check_tolerances(rtol, 0.0)
    check_bool("return_info", return_info)
    if is_host_data(xs, (params, ys)):  # not check_model, which would read a memmap whole
        args = (chunk_size, num_nodes, mode, rtol, route, return_info, out)
        return _host_leverage(apply_fn, params, xs, ys, *args)
    if out is not None:
        raise ValueError("out= is for host data (numpy arrays, memmaps, chunk sources) only.")
    shape = check_model(apply_fn, params, xs, ys)
    mode = model_mode(mode, shape)
    if shape.n * math.prod(shape.out_shape) < shape.p + 1:  # the dual matrix is smaller than its Gram
        check_wide_fits((shape.n, *shape.out_shape, shape.p + 1), shape.dtype, "device")
        F = dual_matrix(apply_fn, params, xs, ys, num_nodes=num_nodes, mode=mode, chunk_size=chunk_size)
        return leverage_scores(F, rtol=rtol, route=route, return_info=return_info)
    _check_gram_fits(params, "device")
    dtype = shape.dtype
    rtol = routes.default_rtol(dtype) if rtol is None else rtol
    tol = routes.tolerance(rtol, routes.compute_dtype(dtype))
    kw = dict(chunk_size=chunk_size, num_nodes=num_nodes, mode=mode)
    run = _streaming_jit if under_trace() else _streaming_staged  # one program, or one per pass
    h, rank, taken, bad_rows, bad_algebra, lost = run(apply_fn, params, xs, ys, tol, route=route, **kw)
    rank_seen = None
    if is_concrete(rank):  # the four checks from one read back
        bad_rows, bad_algebra, rank_seen, lost = fetch(bad_rows, bad_algebra, rank, lost)
    # one NaN row makes the Gram matrix and so every score NaN: the count is of scores, not of examples
    report_nonfinite(bad_rows, shape.n, lambda count: nonfinite_dual_rows("some"))
    report_nonfinite(bad_algebra, shape.n, lambda count: LINEAR_ALGEBRA_FAILED.format(count=count))
    if rank_seen is None:
        traced.check(~lost, LOST_DIRECTION_MESSAGE)
    elif lost:  # route "shifted" missed a dependent column (float32): the rank-revealing route instead
        h, rank, taken, *_ = run(apply_fn, params, xs, ys, tol, **kw, route="stable")
        rank_seen = int(rank)
    return as_leverage(h, rank, taken, return_info, dtype, forced=route, rank_seen=rank_seen)


#: Under a user's jit (inside ``traced_checks()``): route ``"shifted"`` missed a dependent column.
LOST_DIRECTION_MESSAGE = (
    'streaming_leverage_scores: route "shifted" counted a numerically dependent column in the rank (the raw '
    'leverage sums to one less); eagerly the passes are redone on route "stable": pass route="stable".'
)


def _host_leverage(apply_fn, params, xs, ys, chunk_size, num_nodes, mode, rtol, route, return_info, out):
    """:func:`streaming_leverage_scores` of host data (:mod:`nlis_jax._host`)."""
    check_floating("params", params)  # before default_rtol, which needs a floating dtype
    dtype = jnp.result_type(*jax.tree.leaves(params))
    rtol = routes.default_rtol(dtype) if rtol is None else rtol
    kwargs = dict(chunk_size=chunk_size, num_nodes=num_nodes, mode=mode, rtol=rtol, route=route, out=out)
    check_gram = functools.partial(_check_gram_fits, params, "host")  # after the shape checks
    h, rank, taken, total = host_streaming_leverage(apply_fn, params, xs, ys, **kwargs, check_gram=check_gram)
    if out is not None:
        divide_in_place(out, total, chunk_size)  # Σh, as as_leverage divides by
        return Leverage(out, None, rank, taken) if return_info else out
    if not isinstance(h, np.ndarray):  # a global array (jax.distributed)
        return as_leverage(h, rank, taken, return_info, dtype)
    # one process: h / Σh on the host and one transfer. as_leverage's program held four or five (n,)
    # vectors at its end (jnp.asarray's copy, the probabilities, h in the dtype) where two suffice.
    if return_info:
        probs = h / np.asarray(total, h.dtype)
        probs, h = probs.astype(dtype, copy=False), h.astype(dtype, copy=False)
        return Leverage(jax.device_put(probs), jax.device_put(h), rank, taken)
    divide_in_place(h, total, chunk_size)
    return jax.device_put(h.astype(dtype, copy=False))


@functools.partial(traced.jit, static_argnames=("apply_fn", "chunk_size", "num_nodes", "mode"))
@highest_precision
def _norm_jit(apply_fn, params, xs, ys, *, chunk_size, num_nodes, mode):
    kw = dict(chunk_size=chunk_size, num_nodes=num_nodes, mode=mode)
    norms = _device_chunks(apply_fn, params, xs, ys, **kw)[0].scores(norm_rows)
    bad = jnp.sum(~jnp.isfinite(norms))
    return *squared_ratios(jnp.where(jnp.isfinite(norms), norms, 0)), bad


@traced.entry
def streaming_norm_scores(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    ys: Array | None = None,
    *,
    chunk_size: int | None = None,
    num_nodes: int | None = None,
    mode: str = "auto",
    out=None,
) -> Array:
    r"""Row-norm probabilities ``‖F̃_i‖² / ‖F̃‖_F²`` of the dual matrix, streamed in chunks (one pass).

    Same result as ``norm_scores(dual_matrix(apply_fn, params, xs, ys, num_nodes=num_nodes))`` with
    memory ``O(chunk_size·k·p)``. The default is the adaptive rule, as in :func:`nlis_jax.dual_matrix` and
    :func:`streaming_leverage_scores`: each adjoint certified to its tolerance. A fixed Gauss-Legendre
    rule (``num_nodes=16``) is several times faster but has no error control: exact for polynomial
    integrands of degree ≤ 31, it was 8% off on one row (140% on the largest score) of a single-index
    ``tanh`` model whose ``|⟨θ, x⟩|`` reaches the hundreds (a column of ``x`` scaled by 100 to 10⁶).
    ``xs`` may be host data (numpy, memmap, chunk source) and ``out`` a memmap for the scores, and
    ``chunk_size`` has its default, as in :func:`streaming_leverage_scores`.

    Args:
      apply_fn, params, xs, ys, chunk_size, num_nodes, out: as in :func:`streaming_leverage_scores`.
      mode: the adjoint engine, ``"forward"`` (``jax.jvp``), ``"reverse"`` (``jax.vjp``) or ``"auto"``
        (chosen from the output count and ``p``), as in :func:`nlis_jax.adjoint`.

    Returns:
      ``(n,)`` probabilities summing to 1 in the dtype of ``params`` (``out`` when given).
    """
    num_nodes, *_ = check_path_args(num_nodes, mode, None, inputs=(params, xs, ys))
    chunk_size = stream_chunk_size(params) if chunk_size is None else chunk_size
    chunk_size = check_positive_int("chunk_size", chunk_size)
    if is_host_data(xs, (params, ys)):
        kwargs = dict(chunk_size=chunk_size, num_nodes=num_nodes, mode=mode, out=out)
        probs = host_norm_scores(apply_fn, params, xs, ys, **kwargs)
        return probs if out is not None else probs.astype(jnp.result_type(*jax.tree.leaves(params)))
    if out is not None:
        raise ValueError("out= is for host data (numpy arrays, memmaps, chunk sources) only.")
    shape = check_model(apply_fn, params, xs, ys)
    kwargs = dict(chunk_size=chunk_size, num_nodes=num_nodes, mode=model_mode(mode, shape))
    sq, total, bad = _norm_jit(apply_fn, params, xs, ys, **kwargs)
    report_nonfinite(bad, shape.n, nonfinite_dual_rows)
    check_positive(total, STREAMED_ZERO_NORMS)  # traced under a user's jit or vmap: checkify, when asked
    return (sq / total).astype(shape.dtype)
