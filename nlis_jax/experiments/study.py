r"""Sampling studies: ``L(θ_S) / L(θ*)`` on the full data against the sample size, per scheme.

The pieces are pure functions over a :class:`~nlis_jax.experiments.Problem`:

* :func:`fit_full` -- θ*, the full-data solution under the constraint, by :func:`nlis_jax.fit`;
* :func:`score` -- a scheme's sampling probabilities (uniform, linear leverage, dual leverage or norm);
* :func:`draw` -- ``R`` independent weighted samples (:func:`nlis_jax.sample`, vmapped over keys);
* :func:`fit_samples` -- the ``R`` sample fits at once: :func:`nlis_jax.make_train_step` in a
  ``lax.scan``, vmapped over the repeats, so repeats cost one compiled call;
* :func:`full_losses` / :func:`test_accuracy` -- evaluation of the ``R`` solutions on the full data;

:func:`~nlis_jax.experiments.run_study` runs them over the grid of schemes × sizes × repeats.

The kernels (:mod:`nlis_jax.experiments.kernels`) are module-level jitted functions: compile time is
reported apart from run time, and repeats, methods and studies of the same shapes never recompile
(:func:`~nlis_jax.experiments.compile_stats` counts compilations).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import nlis_jax as nj
from nlis_jax.experiments import kernels
from nlis_jax.experiments.configs import METHODS
from nlis_jax.experiments.problems import Problem, make_optimizer

__all__ = [
    "FullFit",
    "batch1",
    "draw",
    "fit_full",
    "fit_samples",
    "full_losses",
    "linear_scores",
    "pad_rows",
    "score",
    "score_batch",
    "score_params",
    "test_accuracy",
]

DUAL_METHODS = ("nonlinear_leverage", "pilot_leverage", "refined_leverage", "nonlinear_norm")


# --------------------------------------------------------------------------------------------------
# Public pure functions


class FullFit(NamedTuple):
    """The full-data solution θ* and the cost of computing it.

    Attributes:
        params: θ*.
        loss: ``L(θ*)`` (sum of squared residuals over the full data).
        losses: ``(num_steps,)`` NumPy array, ``L(θ_t)`` before each update (the training curve).
        time_s: wall time of the (compiled) training run, the median of :data:`TIMINGS` runs.
        compile_s: wall time of the warm-up that compiled it (one scan segment).
        num_steps: steps run.
        rel_change: ``max_{t ≥ 0.9T} |L_t − L_T| / L_T`` (:func:`tail_change`), a convergence diagnostic.
        step_s: wall time of one more step, ``(time_s − t_seg) / (num_steps − seg)`` with ``t_seg`` the
            median time of calls running one segment of ``seg`` steps: the cost of
            :func:`nlis_jax.fit`'s call itself (checks and set-up, 6–8 ms on 2 CPU cores) is not
            charged per step, as the sample fits' compiled kernels do not pay it. ``None`` (a fit of one
            segment) reads as ``time_s / num_steps``.
    """

    params: Any
    loss: float
    losses: np.ndarray
    time_s: float
    compile_s: float
    num_steps: int
    rel_change: float
    step_s: float | None = None

    @property
    def seconds_per_step(self) -> float:
        """:attr:`step_s`, else ``time_s / num_steps``."""
        return self.time_s / self.num_steps if self.step_s is None else self.step_s


def tail_change(trace, last=None) -> np.ndarray:
    """``max_{t ≥ 0.9T} |L_t − L_T| / |L_T|`` of ``(..., T)`` training curves (all ``T`` under 10 steps).

    ``last`` is ``L_T`` (default: the curve's last entry). The largest change over the last tenth, not
    the change between its two ends: a fit that oscillates with period two (a step size too large, the
    loss alternating between two values far above the optimum) has its two ends in the same phase,
    and their difference (1e-11) passed it as converged.
    """
    trace = np.asarray(trace, dtype=np.float64)
    T = trace.shape[-1]
    last = trace[..., -1] if last is None else np.asarray(last, dtype=np.float64)
    tail = trace[..., int(0.9 * T) if T >= 10 else 0 :]
    change = np.max(np.abs(tail - last[..., None]), axis=-1)
    return change / np.maximum(np.abs(last), np.finfo(np.float64).tiny)


def batch1(params):
    """``params`` with a leading axis of length 1 (one repeat)."""
    return jax.tree.map(lambda a: jnp.asarray(a)[None], params)


def _full_optimizer(problem: Problem, num_steps: int):
    """The optimizer of the full-data fit: the sample fits' iteration with ``w = 1``."""
    if problem.optimizer == "gd":
        lr = problem.learning_rate
        if problem.curvature is not None:
            ones = np.ones((problem.n,), problem.dtype)
            lr = lr / float(jax.jit(problem.curvature)(problem.xs, ones))
        return make_optimizer("gd", float(lr), num_steps)
    return make_optimizer(problem.optimizer, problem.learning_rate, num_steps)


#: Timed runs of the full-data fit (and of one segment) whose median :func:`fit_full` reports.
TIMINGS = 3


def fit_full(problem: Problem, params0, *, num_steps: int, num_segments: int = 10) -> FullFit:
    r"""θ* by :func:`nlis_jax.fit` on the full data (unit weights), with the study's optimizer.

    ``"gd"`` takes the step ``learning_rate / L̂(X, 1)``, the same iteration as :func:`fit_samples` with
    unit weights. A warm-up of one scan segment compiles first, so ``time_s`` is steady-state wall time
    (the median of :data:`TIMINGS` runs, which give the same result); that segment-long call, timed as
    often, gives the marginal ``step_s``.
    """
    optimizer = _full_optimizer(problem, num_steps)
    num_segments = max(1, min(num_segments, num_steps))
    segment_len = math.ceil(num_steps / num_segments)
    common = dict(optimizer=optimizer, projection=problem.projection, loss="squared", progress=False)
    data = (problem.apply_fn, params0, problem.xs, problem.ys)
    t0 = time.perf_counter()
    jax.block_until_ready(nj.fit(*data, num_steps=segment_len, num_segments=1, **common))
    compile_s = time.perf_counter() - t0

    def timed(steps, segments):  # (result, median seconds of TIMINGS calls): the same result each time
        seconds = []
        for _ in range(TIMINGS):
            t0 = time.perf_counter()
            result = jax.block_until_ready(nj.fit(*data, num_steps=steps, num_segments=segments, **common))
            seconds.append(time.perf_counter() - t0)
        return result, float(np.median(seconds))

    result, time_s = timed(num_steps, num_segments)
    step_s = None
    if num_steps > segment_len:
        step_s = max(time_s - timed(segment_len, 1)[1], 0.0) / (num_steps - segment_len)
    losses = np.asarray(result.losses, dtype=np.float64)
    loss = float(result.final_loss)
    return FullFit(
        params=result.params,
        loss=loss,
        losses=losses,
        time_s=time_s,
        compile_s=compile_s,
        num_steps=num_steps,
        rel_change=float(tail_change(losses, loss)),
        step_s=step_s,
    )


def linear_scores(problem: Problem, *, kind: str = "leverage", mix: float = 0.0):
    """Leverage or norm scores of ``problem.linear_design``: ``((n,) probs, seconds)``."""
    return kernels.timed(kernels.matrix_score_kernel, problem.linear_design, kind=kind, mix=float(mix))


def score(method: str, problem: Problem, params=None, *, mix: float = 0.0) -> jax.Array:
    r"""Sampling probabilities ``(n,)`` of one scheme.

    Args:
        method: ``"uniform"``, ``"linear_leverage"`` (leverage of ``problem.linear_design``),
            ``"linear_norm"``, or a dual-matrix scheme: ``"nonlinear_leverage"``, ``"pilot_leverage"``,
            ``"refined_leverage"`` (leverage of ``F̃(params)``) or ``"nonlinear_norm"`` (its row norms).
        problem: the :class:`Problem`.
        params: the parameters the dual matrix is taken at (θ*, a pilot θ̂ or a sample's θ_S); ignored by
            uniform and linear scores.
        mix: ``α`` of :func:`nlis_jax.mix_with_uniform` (not applied to uniform).

    Returns:
        Probabilities, shape ``(n,)``.
    """
    if method == "uniform":
        return nj.uniform_scores(problem.n, problem.dtype)
    if method in ("linear_leverage", "linear_norm"):
        kind = "leverage" if method == "linear_leverage" else "norm"
        return linear_scores(problem, kind=kind, mix=mix)[0]
    if method in DUAL_METHODS:
        if params is None:
            raise ValueError(f"method {method!r} scores the dual matrix at some params; pass params.")
        kind = "norm" if method == "nonlinear_norm" else "leverage"
        return score_params(problem, params, kind=kind, mix=mix)[0]
    raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS) + ['linear_norm']}.")


def score_params(problem: Problem, params, *, kind: str = "leverage", mix: float = 0.0):
    """Dual scores at one parameter set: ``((n,) probs, seconds)``.

    The dual matrix is built by one compiled program and scored by the compiled program of
    :func:`linear_scores` (the linear design has the same shape here): one scoring compilation for
    every scheme, parameter set and repeat.
    """
    (probs,), seconds = kernels.timed(_score_rows, problem, (params,), kind, float(mix))
    return probs, seconds


def _score_rows(problem: Problem, rows, kind: str, mix: float):
    """The ``(n,)`` scores at each parameter set of ``rows``, as a list."""
    xs, ys = problem.xs, problem.ys
    duals = (kernels.dual_kernel(params, xs, ys, dual_fn=problem.dual_fn) for params in rows)
    return [kernels.matrix_score_kernel(dual, kind=kind, mix=mix) for dual in duals]


def score_batch(problem: Problem, params_batch, *, kind: str = "leverage", mix: float = 0.0):
    """Dual scores at each of ``R`` parameter sets (leading axis): ``((R, n) probs, seconds)``, by
    :func:`score_params` one parameter set at a time (whichever parameters or how many repeats they
    come from, matrices of one shape are scored by one compilation)."""

    num = int(jax.tree.leaves(params_batch)[0].shape[0])

    def run():
        rows = (kernels.row_kernel(params_batch, r) for r in range(num))
        return kernels.stack_kernel(_score_rows(problem, rows, kind, float(mix)))

    return kernels.timed(run)


def pad_rows(rows: int) -> int:
    """The padded width of samples of up to ``rows`` rows: a multiple of the fit's chunk."""
    chunk = kernels.FIT_CHUNK
    return -(-int(rows) // chunk) * chunk


def _prefix_draws() -> bool:
    """Whether a ``b``-row draw starts with the ``s``-row draw of the same key (partitionable threefry)."""
    impl = str(jax.config.jax_default_prng_impl)
    return bool(jax.config.jax_threefry_partitionable) and impl == "threefry2x32"


def _check_keys(keys) -> None:
    """``TypeError`` unless ``keys`` is a batch of PRNG keys: typed keys of shape ``(R,)`` or raw ``uint32``
    keys of shape ``(R, words)`` (a single key was vmapped over, or its two words read as two keys)."""
    dtype = getattr(keys, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if (typed and jnp.ndim(keys) == 1) or (dtype == jnp.uint32 and jnp.ndim(keys) == 2):
        return
    shape = getattr(keys, "shape", None)
    raise TypeError(
        f"keys must be a batch of R PRNG keys, e.g. jax.random.split(key, R), got {type(keys).__name__} "
        f"of shape {shape} and dtype {dtype}."
    )


def draw(keys: jax.Array, probs: jax.Array, num_samples: int, *, bucket: int | None = None):
    """``R = len(keys)`` independent samples with replacement: ``((idx (R, s), w (R, s)), seconds)``.

    ``probs`` is ``(n,)`` (shared) or ``(R, n)`` (one distribution per repeat); weights ``1/(s p_i)``.
    With ``bucket >= num_samples`` the arrays are ``(R, bucket)``: the same samples, padded with weight 0
    (for :func:`fit_samples` with ``size=num_samples``); one compiled draw serves every size.
    """
    _check_keys(keys)
    s = int(num_samples)
    if bucket is None:
        return kernels.timed(kernels.draw_kernel, keys, probs, num_samples=s)
    bucket = int(bucket)
    if bucket < s:
        raise ValueError(f"bucket = {bucket} is smaller than num_samples = {s}.")
    if _prefix_draws():
        size = np.int32(s)  # a host scalar (jnp.asarray would compile a conversion)
        if probs.ndim == 1 and len(keys) > 1:
            # shared probabilities as one row per repeat: the per-repeat draw's compiled program serves
            # both (the same samples; a weight's Σ p, summed per row, may be one rounding apart)
            probs = jax.device_put(np.broadcast_to(np.asarray(probs), (len(keys), probs.shape[0])))
        return kernels.timed(kernels.draw_padded_kernel, keys, probs, size, bucket=bucket)
    (idx, w), seconds = kernels.timed(kernels.draw_kernel, keys, probs, num_samples=s)
    pad = ((0, 0), (0, bucket - s))
    return (jnp.pad(idx, pad), jnp.pad(w, pad)), seconds


def fit_samples(
    problem: Problem,
    params0,
    idx: jax.Array,
    weights: jax.Array,
    *,
    num_steps: int,
    size: int | None = None,
):
    """Fit ``R`` weighted samples at once (vmapped ``lax.scan`` of projected steps from ``params0``).

    With ``size``, ``idx`` and ``weights`` are padded ``(R, B)`` samples from :func:`draw` with
    ``bucket=B`` (``B`` a multiple of :data:`~nlis_jax.experiments.kernels.FIT_CHUNK`, or below it):
    the same objective, summed chunk by chunk over the rows up to ``size``, by one compiled program for
    every size.

    On a CPU the repeats are cut into one slice per core, fitted in parallel threads
    (:func:`~nlis_jax.experiments.kernels.split_repeats`): the same values as one call to rounding (the
    compiled batch of a slice may sum in another order: the same ``--seed`` on one core and on two
    differed by up to 4e-16 relative in the weighted schemes' ratios, not bit for bit).

    Returns:
        ``((params (R, ...), trace (R, num_steps)), seconds)``; ``trace`` is the weighted mean sample
        loss before each update.
    """
    common = dict(
        apply_fn=problem.apply_fn,
        curvature=problem.curvature,
        optimizer=make_optimizer(problem.optimizer, problem.learning_rate, num_steps),
        num_steps=num_steps,
    )
    data = (params0, problem.xs, problem.ys, idx, weights)
    workers = kernels.repeat_workers(idx.shape[0])
    split = functools.partial(kernels.split_repeats, batched=(3, 4), workers=workers)
    if size is None:
        return kernels.timed(split, kernels.fit_kernel, (*data, problem.projection), **common)
    width = int(idx.shape[-1])
    chunk = min(kernels.FIT_CHUNK, width)
    if width % chunk or not 1 <= int(size) <= width:
        raise ValueError(f"padded samples need 1 <= size <= width = {width}, a multiple of {chunk}.")
    size = np.int32(size)
    return kernels.timed(
        split, kernels.fit_padded_kernel, (*data, size, problem.projection), chunk=chunk, **common
    )


def full_losses(problem: Problem, params_batch):
    """``((R,) full-data losses L(θ_r), seconds)``."""
    return kernels.timed(kernels.loss_kernel, params_batch, problem.xs, problem.ys, apply_fn=problem.apply_fn)


def test_accuracy(problem: Problem, params_batch):
    """``((R,) test accuracies, seconds)`` (classification problems only)."""
    if problem.task != "classification":
        raise ValueError("test_accuracy needs a classification problem.")
    return kernels.timed(
        kernels.accuracy_kernel, params_batch, problem.x_test, problem.labels_test, apply_fn=problem.apply_fn
    )


test_accuracy.__test__ = False  # not a test: pytest would collect it from a star import
