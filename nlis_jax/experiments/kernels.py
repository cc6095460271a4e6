r"""Compiled kernels of the sampling studies, and their timing apart from compilation.

Every kernel is a module-level ``jax.jit`` (or :func:`program`: one with XLA compiler options, for the
draws and the light programs) with its callables as static arguments (the study's callables
are built once per set of options, so they hash equal across calls): repeats, methods and studies of the
same shapes reuse one compiled executable. The padded kernels (:func:`draw_padded_kernel`,
:func:`fit_padded_kernel`) take the sample size as a traced value, so one executable serves every size;
the dual matrix (:func:`dual_kernel`, one parameter set) is scored apart, so one scoring executable
serves every scheme.
:func:`timed` runs a kernel and reports its wall time without the tracing, lowering and compilation that
happened during the call (measured by JAX's own compile events); :func:`compile_stats` counts the
compilations.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import nlis_jax as nj

__all__ = [
    "accuracy_kernel",
    "compile_stats",
    "draw_kernel",
    "draw_padded_kernel",
    "dual_kernel",
    "fit_kernel",
    "fit_padded_kernel",
    "known_options",
    "loss_kernel",
    "matrix_score_kernel",
    "program",
    "repeat_workers",
    "row_kernel",
    "split_repeats",
    "stack_kernel",
    "timed",
]

#: JAX's monitoring events of one compilation: tracing, lowering to MLIR, backend compilation.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_BACKEND_COMPILE = _COMPILE_EVENTS[-1]
#: Elements per ``lax.map`` batch when evaluating many parameter sets over the full data.
MAP_ELEMENTS = 4_000_000

#: Rows per chunk of :func:`fit_padded_kernel` (padded sample buckets are multiples of it).
FIT_CHUNK = 128

_STATS = {"count": 0, "seconds": 0.0}


def _on_event(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _STATS["seconds"] += duration
        _STATS["count"] += event == _BACKEND_COMPILE


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_stats() -> dict:
    """``{"count": compilations so far, "seconds": time spent tracing, lowering and compiling}``
    (process-wide, every jitted call included)."""
    return dict(_STATS)


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``: the result (waited for) and the wall time of the call less
    the compilation it triggered."""
    compile0 = _STATS["seconds"]
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    elapsed = time.perf_counter() - t0 - (_STATS["seconds"] - compile0)
    return out, max(elapsed, 0.0)


def repeat_workers(num_repeats: int) -> int:
    """Threads among which :func:`split_repeats` divides ``num_repeats`` independent repeats.

    On a CPU, XLA runs a vmapped fit (a loop of small, memory-bound steps) on one core, while the
    runtime executes separate calls of a compiled program in parallel from separate threads: one slice
    of the repeats per core (the process's CPU affinity). On an accelerator one call already fills the
    device: 1.
    """
    if jax.default_backend() != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(num_repeats), cores))


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nlis_jax-repeats")


def split_repeats(fn, args: tuple, batched: tuple[int, ...], *, workers: int, **kwargs):
    """``fn(*args, **kwargs)`` with the arguments at positions ``batched`` (leading axis ``R``, the
    repeats) cut into ``workers`` slices of equal length, run in parallel threads, outputs concatenated.

    ``fn`` must treat rows of the batched arguments independently (a ``vmap`` over repeats), so the
    result is that of one call. The slices are cut on the host and padded to equal length by repeating
    the last row (dropped from the output): every slice has one shape, so ``fn`` (a ``jax.jit``
    function; ``kwargs`` its static arguments) is compiled once, in the calling thread, and the threads
    run that executable. Returns the pytree of one call: arrays with leading axis ``R``.
    """
    R = args[batched[0]].shape[0]
    workers = max(1, min(int(workers), R))
    if workers == 1:  # the arrays stay where they are (no copy to the host)
        return jax.block_until_ready(fn(*args, **kwargs))
    host = [np.asarray(args[i]) for i in batched]
    per = -(-R // workers)

    shared = [None if i in batched else jax.device_put(a) for i, a in enumerate(args)]

    def part(k: int) -> list:
        call = list(shared)
        for i, a in zip(batched, host, strict=True):
            rows = a[k * per : (k + 1) * per]
            if rows.shape[0] < per:
                rows = np.concatenate([rows, np.repeat(a[-1:], per - rows.shape[0], axis=0)])
            call[i] = jax.device_put(rows)
        return call

    # Placed, traced and compiled in this thread, under the caller's configuration (jax's config
    # contexts, e.g. ``with jax.enable_x64(True)``, hold per thread): the workers only run the
    # executable (jit's caches make the repeated lowering cheap).
    calls = [part(k) for k in range(workers)]
    compiled = fn.lower(*calls[0], **kwargs).compile()
    outs = list(_pool(workers).map(lambda call: jax.block_until_ready(compiled(*call)), calls))
    return jax.tree.map(lambda *xs: jax.device_put(np.concatenate([np.asarray(x) for x in xs])[:R]), *outs)


def _map_batch(n: int, k: int = 1) -> int:
    """Parameter sets evaluated together by ``lax.map`` (about :data:`MAP_ELEMENTS` elements a batch)."""
    return max(1, MAP_ELEMENTS // max(1, n * k))


def _scores(kind: str, matrix, mix: float):
    probs = nj.leverage_scores(matrix) if kind == "leverage" else nj.norm_scores(matrix)
    return probs if mix == 0 else nj.mix_with_uniform(probs, mix)


def _fit_one(params0, xb, yb, wb, projection, *, apply_fn, curvature, optimizer, num_steps):
    """One repeat: projected steps on ``J = Σ w ℓ / Σ w`` (divided by ``L̂`` with a curvature bound)."""
    dtype = xb.dtype
    scale = jnp.ones((), dtype) if curvature is None else (1.0 / curvature(xb, wb)).astype(dtype)

    def objective(params, batch):
        x, y, w, s = batch
        return nj.weighted_loss(apply_fn, params, x, y, w, loss="squared") / jnp.sum(w) * s

    step = nj.make_train_step(objective, optimizer, projection)
    params0 = params0 if projection is None else projection(params0)
    state = nj.TrainState(params0, optimizer.init(params0))
    state, trace = lax.scan(lambda st, _: step(st, (xb, yb, wb, scale)), state, None, length=num_steps)
    return state.params, trace / scale


@functools.partial(jax.jit, static_argnames=("apply_fn", "curvature", "optimizer", "num_steps"))
def fit_kernel(params0, xs, ys, idx, w, projection, *, apply_fn, curvature, optimizer, num_steps):
    """``R`` weighted sample fits at once -> ``(params (R, ...), trace (R, num_steps))``.

    Each repeat minimises the weighted mean ``J = Σ w ℓ / Σ w`` over its sample ``idx[r]`` by projected
    steps; with a ``curvature`` bound the objective handed to the optimizer is ``J / L̂`` (so plain SGD
    steps by ``learning_rate / L̂``). ``trace[t]`` is ``J`` before update ``t``.
    """
    one = functools.partial(
        _fit_one, apply_fn=apply_fn, curvature=curvature, optimizer=optimizer, num_steps=num_steps
    )
    return jax.vmap(one, in_axes=(None, 0, 0, 0, None))(params0, xs[idx], ys[idx], w, projection)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def loss_kernel(params_batch, xs, ys, *, apply_fn):
    """``(R,)`` full-data losses ``L(θ_r)`` of ``R`` parameter sets (leading axis)."""
    batch = _map_batch(xs.shape[0], math.prod(ys.shape[1:]))
    return lax.map(
        lambda p: nj.weighted_loss(apply_fn, p, xs, ys, loss="squared"), params_batch, batch_size=batch
    )


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def accuracy_kernel(params_batch, xs, labels, *, apply_fn):
    """``(R,)`` accuracies: sign of a scalar output, else argmax of the outputs."""

    def one(params):
        out = jax.vmap(apply_fn, in_axes=(None, 0))(params, xs)
        guess = (out > 0).astype(labels.dtype) if out.ndim == 1 else jnp.argmax(out, axis=1)
        return jnp.mean((guess == labels).astype(xs.dtype))

    return lax.map(one, params_batch, batch_size=_map_batch(xs.shape[0]))


def _matrix_scores(design, *, kind: str, mix: float):
    return _scores(kind, design, mix)


#: XLA's CPU compiler option for its older loop emitters instead of the MLIR fusion emitters (jax's
#: default in recent releases). The draws and the light programs below compile 25–65 % faster with them
#: and run as fast or faster (benchmarks/README.md (h), seventh round); the sample and full-data fits,
#: whose run times the wall-time comparison sets against each other, keep XLA's defaults. Ignored by other
#: backends; left out where this jaxlib's XLA does not know it (:func:`known_options`).
LEGACY_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
#: Matrices with fewer columns than this are scored by a program compiled without LLVM's optimisation
#: passes: their time is in the Gram product and LAPACK calls, which those passes leave as they are, while
#: the route switch's many small branches compile in 0.55–0.65 s instead of 0.9 s (20,640 × 10 float64;
#: the same run time, 1.0–1.2 ms). Wider matrices may take the sketched route, whose own loops they speed.
LIGHT_COLUMNS = 512
#: The compiler options of such light programs (and of :mod:`nlis_jax.experiments.keys`' fallback).
LIGHT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, **LEGACY_EMITTERS}


@functools.cache
def _known(name: str, value) -> bool:
    try:  # an identity compiles in about 15 ms; an unknown option fails before compiling
        jax.jit(lambda x: x, compiler_options={name: value}).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option": an older or newer XLA
        return False
    return True


def known_options(options: dict) -> dict:
    """The entries of ``options`` (XLA compiler options) that this jaxlib's XLA accepts, each probed once
    per process by compiling an identity with it."""
    return {name: value for name, value in options.items() if _known(name, value)}


class _Program:
    """``jax.jit(fn, compiler_options=known_options(options), **jit_kwargs)``, built at the first call or
    ``lower`` (probing options compiles, which initialises the backend: not at import)."""

    def __init__(self, fn, options: dict, **jit_kwargs):
        functools.update_wrapper(self, fn)  # fn is self.__wrapped__
        self._options, self._jit_kwargs = dict(options), jit_kwargs
        self._jitted = None

    def _program(self):
        if self._jitted is None:
            options = known_options(self._options) or None
            self._jitted = jax.jit(self.__wrapped__, compiler_options=options, **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self._program()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._program().lower(*args, **kwargs)


def program(options: dict, **jit_kwargs):
    """Decorator: :class:`_Program` of the function with XLA compiler ``options`` (those XLA knows)."""
    return lambda fn: _Program(fn, options, **jit_kwargs)


_light_matrix_scores = program(LIGHT_COMPILER_OPTIONS, static_argnames=("kind", "mix"))(_matrix_scores)
_full_matrix_scores = jax.jit(_matrix_scores, static_argnames=("kind", "mix"))


def matrix_score_kernel(design, *, kind: str, mix: float):
    """``(n,)`` leverage or norm scores of a fixed ``(n, m)`` matrix (the linear baseline, a dual matrix),
    mixed by ``mix``: one compiled program per shape (:data:`LIGHT_COLUMNS`)."""
    light = design.shape[-1] < LIGHT_COLUMNS
    return (_light_matrix_scores if light else _full_matrix_scores)(design, kind=kind, mix=mix)


@program(LEGACY_EMITTERS, static_argnames=("num_samples",))
def draw_kernel(keys, probs, *, num_samples: int):
    """``R = len(keys)`` samples with replacement -> ``(idx (R, s), weights (R, s))``; ``probs`` is
    ``(n,)`` (shared) or ``(R, n)`` (one distribution per key)."""
    in_axes = (0, None if probs.ndim == 1 else 0)
    return jax.vmap(lambda k, p: nj.sample(k, p, num_samples), in_axes=in_axes)(keys, probs)


def _chunked_value_and_grad(objective, params, data, num_chunks, chunk):
    """``Σ_c value_and_grad(objective)(params, rows of chunk c)`` over the first ``num_chunks`` chunks
    (``num_chunks >= 1`` traced: the first chunk runs unconditionally, the rest in a ``fori_loop``)."""

    def part(c):
        return tuple(lax.dynamic_slice_in_dim(a, c * chunk, chunk) for a in data)

    grad_fn = jax.value_and_grad(objective)
    first = grad_fn(params, part(0))

    def body(c, acc):
        return jax.tree.map(jnp.add, acc, grad_fn(params, part(c)))

    return lax.fori_loop(1, num_chunks, body, first)


def _padded_fit_one(
    params0, xb, yb, wb, size, projection, *, apply_fn, curvature, optimizer, num_steps, chunk
):
    """One repeat on a padded sample (weight 0 from row ``size`` on): the iteration of :func:`_fit_one`
    with the objective and its gradient summed over the ``ceil(size / chunk)`` chunks that hold rows."""
    dtype = xb.dtype
    scale = jnp.ones((), dtype) if curvature is None else (1.0 / curvature(xb, wb)).astype(dtype)
    total = jnp.sum(wb)

    def objective(params, batch):
        x, y, w = batch
        return nj.weighted_loss(apply_fn, params, x, y, w, loss="squared") / total * scale

    num_chunks = jnp.maximum((size + chunk - 1) // chunk, 1)

    def value_and_grad(params, batch):
        return _chunked_value_and_grad(objective, params, batch, num_chunks, chunk)

    step = nj.make_train_step(value_and_grad, optimizer, projection, value_and_grad=True)
    params0 = params0 if projection is None else projection(params0)
    state = nj.TrainState(params0, optimizer.init(params0))
    state, trace = lax.scan(lambda st, _: step(st, (xb, yb, wb)), state, None, length=num_steps)
    return state.params, trace / scale


@functools.partial(jax.jit, static_argnames=("apply_fn", "curvature", "optimizer", "num_steps", "chunk"))
def fit_padded_kernel(
    params0, xs, ys, idx, w, size, projection, *, apply_fn, curvature, optimizer, num_steps, chunk
):
    """:func:`fit_kernel` on padded samples: ``idx``, ``w`` are ``(R, B)``, ``B`` a multiple of ``chunk``,
    with ``w = 0`` from column ``size`` (traced) on -> ``(params (R, ...), trace (R, num_steps))``.

    The objective is the same weighted mean ``J = Σ w ℓ / Σ w`` (zero weights add nothing), summed chunk
    by chunk over the ``ceil(size / chunk)`` chunks that hold sampled rows: one compiled program serves
    every sample size up to ``B``, and a step costs rows up to ``size``, not ``B``.
    """
    one = functools.partial(
        _padded_fit_one,
        apply_fn=apply_fn,
        curvature=curvature,
        optimizer=optimizer,
        num_steps=num_steps,
        chunk=chunk,
    )
    in_axes = (None, 0, 0, 0, None, None)
    return jax.vmap(one, in_axes=in_axes)(params0, xs[idx], ys[idx], w, size, projection)


@program(LEGACY_EMITTERS, static_argnames=("bucket",))
def draw_padded_kernel(keys, probs, size, *, bucket: int):
    """:func:`draw_kernel` with ``size`` traced: ``(idx (R, bucket), weights (R, bucket))`` whose first
    ``size`` columns are the ``size``-row sample of each key and whose weights are 0 from column ``size``
    on.

    The indices are those of a ``bucket``-row draw: with threefry's partitionable bits (JAX's default) the
    first ``s`` uniforms of a ``bucket``-row draw are the ``s`` uniforms of an ``s``-row draw, so the
    samples equal :func:`draw_kernel`'s; the weights are ``1/(size p_i)`` by the same expression.
    """
    keep = jnp.arange(bucket) < size

    def one(key, p):
        idx, _ = nj.sample(key, p, bucket)
        w = jnp.sum(p) / (size.astype(p.dtype) * p[idx])
        return idx, jnp.where(keep, w, jnp.zeros((), p.dtype))

    return jax.vmap(one, in_axes=(0, None if probs.ndim == 1 else 0))(keys, probs)


@functools.partial(jax.jit, static_argnames=("dual_fn",))
def dual_kernel(params, xs, ys, *, dual_fn):
    """The dual matrix ``dual_fn(params, xs, ys)`` at one parameter set."""
    return dual_fn(params, xs, ys)


@program(LEGACY_EMITTERS)
def row_kernel(batch, r):
    """Row ``r`` (traced) of every leaf of ``batch``: one compiled program per shape of the batch, for
    every row (indexing with a Python integer compiles one program per index)."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, r, keepdims=False), batch)


@program(LEGACY_EMITTERS)
def stack_kernel(rows):
    """``jnp.stack(rows)`` as one compiled program per number and shape of rows."""
    return jnp.stack(rows)
