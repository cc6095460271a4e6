r"""Sampling studies: ``L(θ_S) / L(θ*)`` on the full data against the sample size, per scheme.

The pieces are pure functions over a :class:`~nlis_jax.experiments.Problem`:

* :func:`fit_full` -- θ*, the full-data solution under the constraint, by :func:`nlis_jax.fit`;
* :func:`score` -- a scheme's sampling probabilities (uniform, linear leverage, dual leverage or norm);
* :func:`draw` -- ``R`` independent weighted samples (:func:`nlis_jax.sample`, vmapped over keys);
* :func:`fit_samples` -- the ``R`` sample fits at once: :func:`nlis_jax.make_train_step` in a
  ``lax.scan``, vmapped over the repeats, so repeats cost one compiled call;
* :func:`full_losses` / :func:`test_accuracy` -- evaluation of the ``R`` solutions on the full data;
* :func:`run_study` -- the grid of schemes × sizes × repeats, and :func:`compare_wall_time` -- a
  practical scheme's end-to-end wall time against full-data training to the same loss.

Kernels are compiled ahead of time (``jit(...).lower(...).compile()``) once per shape signature and kept
in a module cache, so compile time is reported apart from run time, and repeats, methods and studies of
the same shapes never recompile (:func:`compile_stats` counts compilations).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nlis_jax._sampling import sample
from nlis_jax._scores import leverage_scores, norm_scores, uniform_scores
from nlis_jax._train import TrainState, fit, make_train_step
from nlis_jax.experiments._configs import (
    METHODS,
    ORACLE_METHODS,
    StudyConfig,
    resolve_size,
    resolve_sizes,
)
from nlis_jax.experiments._problems import Problem, make_optimizer, make_problem

# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation cache


class _Compiled:
    def __init__(self):
        self.executables: dict[Any, Any] = {}
        self.count = 0
        self.seconds = 0.0

    def __call__(self, fn, *args):
        """Run ``fn(*args)`` (a jitted function) from a cached executable; return ``(out, seconds)``."""
        leaves, treedef = jax.tree.flatten(args)
        signature = (fn, treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
        exe = self.executables.get(signature)
        if exe is None:
            t0 = time.perf_counter()
            exe = fn.lower(*args).compile()
            self.seconds += time.perf_counter() - t0
            self.count += 1
            self.executables[signature] = exe
        t0 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        return out, time.perf_counter() - t0


_COMPILED = _Compiled()


def compile_stats() -> dict:
    """``{"count": compilations so far, "seconds": time spent compiling}`` (module-wide)."""
    return {"count": _COMPILED.count, "seconds": _COMPILED.seconds}


def _run(fn, *args):
    return _COMPILED(fn, *args)


# --------------------------------------------------------------------------------------------------
# Kernels (built once per static options)


def _sum_squares(apply_fn, params, xs, ys, w=None):
    pred = jax.vmap(apply_fn, in_axes=(None, 0))(params, xs)
    r = jnp.reshape(pred - ys.astype(pred.dtype), (xs.shape[0], -1))
    per_example = jnp.sum(r * r, axis=1)
    return jnp.sum(per_example) if w is None else jnp.sum(w.astype(r.dtype) * per_example)


@functools.lru_cache(maxsize=64)
def _fit_kernel(apply_fn, curvature, optimizer, num_steps: int):
    """Jitted ``(params0, xs, ys, idx (R, s), w (R, s), projection) -> (params (R, ...), trace (R, T))``.

    Each repeat minimises the weighted mean ``J = Σ w ℓ / Σ w`` over its sample by projected steps; with a
    ``curvature`` bound the objective handed to the optimizer is ``J / L̂`` (so plain SGD steps by
    ``learning_rate / L̂``). ``trace[t]`` is ``J`` before update ``t``.
    """

    def objective(params, batch):
        xb, yb, wb, scale = batch
        return _sum_squares(apply_fn, params, xb, yb, wb) / jnp.sum(wb) * scale

    def one(params0, xb, yb, wb, projection):
        dtype = xb.dtype
        scale = jnp.ones((), dtype) if curvature is None else (1.0 / curvature(xb, wb)).astype(dtype)
        step = make_train_step(objective, optimizer, projection)
        params0 = params0 if projection is None else projection(params0)
        state = TrainState(params0, optimizer.init(params0))

        def body(state, _):
            return step(state, (xb, yb, wb, scale))

        state, trace = lax.scan(body, state, None, length=num_steps)
        return state.params, trace / scale

    @jax.jit
    def kernel(params0, xs, ys, idx, w, projection):
        return jax.vmap(one, in_axes=(None, 0, 0, 0, None))(params0, xs[idx], ys[idx], w, projection)

    return kernel


def _map_batch(n: int, k: int = 1) -> int:
    """Repeats evaluated together by ``lax.map`` (about 4M elements per batch)."""
    return max(1, 4_000_000 // max(1, n * k))


@functools.lru_cache(maxsize=64)
def _loss_kernel(apply_fn):
    @jax.jit
    def kernel(params_batch, xs, ys):
        one = functools.partial(_sum_squares, apply_fn, xs=xs, ys=ys)
        k = math.prod(ys.shape[1:])
        return lax.map(one, params_batch, batch_size=_map_batch(xs.shape[0], k))

    return kernel


@functools.lru_cache(maxsize=64)
def _accuracy_kernel(apply_fn):
    @jax.jit
    def kernel(params_batch, xs, labels):
        def one(params):
            out = jax.vmap(apply_fn, in_axes=(None, 0))(params, xs)
            guess = (out > 0).astype(labels.dtype) if out.ndim == 1 else jnp.argmax(out, axis=1)
            return jnp.mean((guess == labels).astype(xs.dtype))

        return lax.map(one, params_batch, batch_size=_map_batch(xs.shape[0]))

    return kernel


def _mix(probs, mix: float):
    return probs if mix == 0 else (1 - mix) * probs + mix / probs.shape[-1]


@functools.lru_cache(maxsize=64)
def _dual_score_kernel(dual_fn, kind: str, mix: float):
    """Jitted ``(params_batch, xs, ys) -> (R, n)``: scores of the dual matrix at each of ``R`` params."""
    scores = leverage_scores if kind == "leverage" else norm_scores

    @jax.jit
    def kernel(params_batch, xs, ys):
        return lax.map(lambda params: _mix(scores(dual_fn(params, xs, ys)), mix), params_batch)

    return kernel


@functools.lru_cache(maxsize=64)
def _matrix_score_kernel(kind: str, mix: float):
    scores = leverage_scores if kind == "leverage" else norm_scores
    return jax.jit(lambda design: _mix(scores(design), mix))


@functools.lru_cache(maxsize=64)
def _draw_kernel(num_samples: int, shared: bool):
    @jax.jit
    def kernel(keys, probs):
        return jax.vmap(lambda k, p: sample(k, p, num_samples), in_axes=(0, None if shared else 0))(
            keys, probs
        )

    return kernel


def _batch1(params):
    return jax.tree.map(lambda a: jnp.asarray(a)[None], params)


def _index(params_batch, i: int):
    return jax.tree.map(lambda a: a[i], params_batch)


# --------------------------------------------------------------------------------------------------
# Public pure functions


class FullFit(NamedTuple):
    """The full-data solution θ* and the cost of computing it.

    Attributes:
        params: θ*.
        loss: ``L(θ*)`` (sum of squared residuals over the full data).
        losses: ``(num_steps,)`` NumPy array, ``L(θ_t)`` before each update (the training curve).
        time_s: wall time of the (compiled) training run.
        compile_s: wall time of the warm-up that compiled it (one scan segment).
        num_steps: steps run.
        rel_change: ``|L_T − L_{0.9T}| / L_T``, a convergence diagnostic.
    """

    params: Any
    loss: float
    losses: np.ndarray
    time_s: float
    compile_s: float
    num_steps: int
    rel_change: float


def _full_optimizer(problem: Problem, num_steps: int):
    """The optimizer of the full-data fit: the sample fits' iteration with ``w = 1``."""
    if problem.optimizer == "gd":
        lr = problem.learning_rate
        if problem.curvature is not None:
            ones = jnp.ones((problem.n,), problem.dtype)
            lr = lr / float(jax.jit(problem.curvature)(problem.xs, ones))
        return make_optimizer("gd", float(lr), num_steps)
    return make_optimizer(problem.optimizer, problem.learning_rate, num_steps)


def fit_full(problem: Problem, params0, *, num_steps: int, num_segments: int = 10) -> FullFit:
    r"""θ* by :func:`nlis_jax.fit` on the full data (unit weights), with the study's optimizer.

    ``"gd"`` takes the step ``learning_rate / L̂(X, 1)``, the same iteration as :func:`fit_samples` with
    unit weights. A warm-up of one scan segment compiles first, so ``time_s`` is steady-state wall time.
    """
    optimizer = _full_optimizer(problem, num_steps)
    num_segments = max(1, min(num_segments, num_steps))
    segment_len = math.ceil(num_steps / num_segments)
    common = dict(optimizer=optimizer, projection=problem.projection, loss="squared", progress=False)
    t0 = time.perf_counter()
    jax.block_until_ready(
        fit(
            problem.apply_fn, params0, problem.xs, problem.ys, num_steps=segment_len, num_segments=1, **common
        )
    )
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = fit(
        problem.apply_fn,
        params0,
        problem.xs,
        problem.ys,
        num_steps=num_steps,
        num_segments=num_segments,
        **common,
    )
    jax.block_until_ready(result)
    time_s = time.perf_counter() - t0
    losses = np.asarray(result.losses, dtype=np.float64)
    loss = float(result.final_loss)
    tail = losses[int(0.9 * num_steps)] if num_steps >= 10 else losses[0]
    return FullFit(
        params=result.params,
        loss=loss,
        losses=losses,
        time_s=time_s,
        compile_s=compile_s,
        num_steps=num_steps,
        rel_change=abs(tail - loss) / abs(loss),
    )


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
        return uniform_scores(problem.n, problem.dtype)
    if method in ("linear_leverage", "linear_norm"):
        kind = "leverage" if method == "linear_leverage" else "norm"
        return _run(_matrix_score_kernel(kind, float(mix)), problem.linear_design)[0]
    if method in ("nonlinear_leverage", "pilot_leverage", "refined_leverage", "nonlinear_norm"):
        if params is None:
            raise ValueError(f"method {method!r} scores the dual matrix at some params; pass params.")
        kind = "norm" if method == "nonlinear_norm" else "leverage"
        kernel = _dual_score_kernel(problem.dual_fn, kind, float(mix))
        return _run(kernel, _batch1(params), problem.xs, problem.ys)[0][0]
    raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS) + ['linear_norm']}.")


def score_batch(problem: Problem, params_batch, *, kind: str = "leverage", mix: float = 0.0):
    """Dual scores at each of ``R`` parameter sets (leading axis): ``((R, n) probs, seconds)``."""
    return _run(_dual_score_kernel(problem.dual_fn, kind, float(mix)), params_batch, problem.xs, problem.ys)


def draw(keys: jax.Array, probs: jax.Array, num_samples: int):
    """``R = len(keys)`` independent samples with replacement: ``((idx (R, s), w (R, s)), seconds)``.

    ``probs`` is ``(n,)`` (shared) or ``(R, n)`` (one distribution per repeat); weights ``1/(s p_i)``.
    """
    return _run(_draw_kernel(int(num_samples), probs.ndim == 1), keys, probs)


def _sample_optimizer(problem: Problem, num_steps: int):
    return make_optimizer(problem.optimizer, problem.learning_rate, num_steps)


def fit_samples(problem: Problem, params0, idx: jax.Array, weights: jax.Array, *, num_steps: int):
    """Fit ``R`` weighted samples at once (vmapped ``lax.scan`` of projected steps from ``params0``).

    Returns:
        ``((params (R, ...), trace (R, num_steps)), seconds)``; ``trace`` is the weighted mean sample
        loss before each update.
    """
    kernel = _fit_kernel(
        problem.apply_fn, problem.curvature, _sample_optimizer(problem, num_steps), num_steps
    )
    return _run(kernel, params0, problem.xs, problem.ys, idx, weights, problem.projection)


def full_losses(problem: Problem, params_batch):
    """``((R,) full-data losses L(θ_r), seconds)``."""
    return _run(_loss_kernel(problem.apply_fn), params_batch, problem.xs, problem.ys)


def test_accuracy(problem: Problem, params_batch):
    """``((R,) test accuracies, seconds)`` (classification problems only)."""
    if problem.task != "classification":
        raise ValueError("test_accuracy needs a classification problem.")
    return _run(_accuracy_kernel(problem.apply_fn), params_batch, problem.x_test, problem.labels_test)


# --------------------------------------------------------------------------------------------------
# Studies


def _number(x) -> float | None:
    """A finite float, or ``None`` (JSON has no infinity) for a diverged fit."""
    x = float(x)
    return x if math.isfinite(x) else None


def quantiles(values) -> dict:
    """``{"median", "q25", "q75", "min", "max", "diverged"}`` of a sample.

    A non-finite value (a diverged fit) counts as +inf: quantiles then take sample values (no
    interpolation), and an infinite quantile is reported as ``None``; ``diverged`` counts them.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    v = np.where(finite, v, np.inf)
    method = "linear" if finite.all() else "inverted_cdf"
    q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75], method=method)
    return {
        "median": _number(med),
        "q25": _number(q25),
        "q75": _number(q75),
        "min": _number(v.min()),
        "max": _number(v.max()),
        "diverged": int(np.sum(~finite)),
    }


class StudyResult(NamedTuple):
    """A study's results.

    Attributes:
        summary: JSON-ready dict (see :func:`run_study`).
        ratios: ``{method: (num_sizes, repeats) array}`` of ``L(θ_S)/L(θ*)``.
        accuracies: the same layout of test accuracies (classification), else ``None``.
        sizes: the sample sizes in rows, ascending.
        full: the :class:`FullFit`.
    """

    summary: dict
    ratios: dict
    accuracies: dict | None
    sizes: tuple[int, ...]
    full: FullFit


def _rel_change(trace) -> np.ndarray:
    trace = np.asarray(trace, dtype=np.float64)
    T = trace.shape[-1]
    tail = trace[..., int(0.9 * T)] if T >= 10 else trace[..., 0]
    last = trace[..., -1]
    return np.abs(tail - last) / np.maximum(np.abs(last), np.finfo(np.float64).tiny)


def _config_dict(config: StudyConfig) -> dict:
    out = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def run_study(
    config: StudyConfig,
    key: jax.Array,
    *,
    problem: Problem | None = None,
    progress: bool = False,
) -> StudyResult:
    r"""Run every scheme of ``config.methods`` at every size with ``config.repeats`` repeats.

    For each scheme and sample size ``s``: draw ``R`` samples (with replacement, weights ``1/(s p_i)``),
    fit each from the same initial point with ``config.num_steps`` projected steps (one vmapped call),
    and report ``L(θ_S)/L(θ*)`` on the full data. Oracle schemes score at θ* (:func:`fit_full`);
    ``pilot_leverage`` at a pilot fitted on a uniform sample of ``pilot_size`` rows (one pilot per repeat,
    shared by all sizes); ``refined_leverage`` re-scores at the ``pilot_leverage`` solution of the same
    repeat and size and fits a fresh sample.

    Keys: ``key`` splits into (init, pilot, draws, timing); the draws of a scheme at size ``s`` come from
    ``fold_in(split(draws, len(METHODS))[scheme], s)`` split into ``R`` keys, so a scheme's samples at a
    size do not depend on which other schemes or sizes run. No key is used twice.

    Args:
        config: the study (:class:`CaliforniaConfig`, :class:`SyntheticConfig`, ...).
        key: ``jax.random.key(seed)``.
        problem: a prebuilt :func:`make_problem` (else built from ``config``).
        progress: tqdm bar over methods × sizes × repeats on stderr.

    Returns:
        :class:`StudyResult`. ``summary`` holds ``dataset``, ``n``, ``p``, ``info``, ``config``, ``full``
        (θ*'s loss, time, steps, norm, convergence), ``methods`` (per scheme: ``score_s`` and a list of
        per-size records with ``size``, ``fraction``, ``ratio`` quantiles and ``values``,
        ``test_accuracy`` (classification), ``score_s`` / ``sample_s`` / ``train_s`` per repeat (the
        vmapped wall time divided by ``R``) and ``max_rel_change`` (convergence of the sample fits)),
        ``timing`` (:func:`compare_wall_time`, when ``config.timing_size``) and ``compile``.
    """
    if problem is None:
        problem = make_problem(config)
    n, R = problem.n, config.repeats
    sizes = resolve_sizes(config.sizes, n)
    methods = config.methods
    compile0 = dict(compile_stats())
    k_init, k_pilot, k_draw, k_timing = jax.random.split(key, 4)
    method_keys = dict(zip(METHODS, jax.random.split(k_draw, len(METHODS)), strict=True))
    params0 = problem.init(k_init)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(methods) * len(sizes) * R, desc=problem.name, unit="fit", leave=False)

    def log(text):
        if bar is not None:
            bar.set_postfix_str(text)

    log("full-data fit")
    full = fit_full(problem, params0, num_steps=config.steps_full)
    theta_star = full.params

    # ---- scores computed once per scheme (per repeat for the pilot)
    shared_probs: dict[str, jax.Array] = {}
    score_s: dict[str, float] = {}
    if "uniform" in methods:
        shared_probs["uniform"] = uniform_scores(n, problem.dtype)
        score_s["uniform"] = 0.0
    if "linear_leverage" in methods:
        probs, seconds = _run(_matrix_score_kernel("leverage", float(config.mix)), problem.linear_design)
        shared_probs["linear_leverage"], score_s["linear_leverage"] = probs, seconds
    for method in ORACLE_METHODS:
        if method in methods:
            log(f"scores {method}")
            kind = "norm" if method == "nonlinear_norm" else "leverage"
            probs, seconds = score_batch(problem, _batch1(theta_star), kind=kind, mix=config.mix)
            shared_probs[method], score_s[method] = probs[0], seconds

    need_pilot = any(m in methods for m in ("pilot_leverage", "refined_leverage"))
    pilot_probs = None
    pilot_cost = 0.0  # per repeat: pilot draw + fit + scoring
    pilot_size = resolve_size(config.pilot_size, n)
    if need_pilot:
        log("pilot")
        keys = jax.random.split(k_pilot, R)
        (idx, w), t_draw = draw(keys, uniform_scores(n, problem.dtype), pilot_size)
        (pilot_params, _), t_fit = fit_samples(problem, params0, idx, w, num_steps=config.num_steps)
        pilot_probs, t_score = score_batch(problem, pilot_params, kind="leverage", mix=config.mix)
        pilot_cost = (t_draw + t_fit + t_score) / R
        score_s["pilot_leverage"] = pilot_cost

    # ---- the grid
    ratios = {m: np.zeros((len(sizes), R)) for m in methods}
    accuracies = {m: np.zeros((len(sizes), R)) for m in methods} if problem.task == "classification" else None
    records: dict[str, list] = {m: [] for m in methods}

    def evaluate(method, i, s, params, trace, t_score, t_draw, t_fit):
        losses, _ = full_losses(problem, params)
        ratio = np.asarray(losses, dtype=np.float64) / full.loss
        ratios[method][i] = ratio
        record = {
            "size": int(s),
            "fraction": s / n,
            "ratio": quantiles(ratio),
            "values": [_number(v) for v in ratio],
            "score_s": t_score,
            "sample_s": t_draw / R,
            "train_s": t_fit / R,
            "max_rel_change": _number(np.max(_rel_change(trace))),
        }
        if accuracies is not None:
            acc, _ = test_accuracy(problem, params)
            accuracies[method][i] = np.asarray(acc)
            record["test_accuracy"] = quantiles(acc)
        records[method].append(record)
        if bar is not None:
            bar.update(R)

    for i, s in enumerate(sizes):
        pilot_fit = None
        for method in methods:
            log(f"{method} s={s}")
            keys = jax.random.split(jax.random.fold_in(method_keys[method], s), R)
            if method in shared_probs:
                (idx, w), t_draw = draw(keys, shared_probs[method], s)
                (params, trace), t_fit = fit_samples(problem, params0, idx, w, num_steps=config.num_steps)
                evaluate(method, i, s, params, trace, score_s[method], t_draw, t_fit)
                continue
            if pilot_fit is None:  # the pilot-scored sample (also the first stage of the refinement)
                pkeys = jax.random.split(jax.random.fold_in(method_keys["pilot_leverage"], s), R)
                (idx, w), t_draw = draw(pkeys, pilot_probs, s)
                (params, trace), t_fit = fit_samples(problem, params0, idx, w, num_steps=config.num_steps)
                pilot_fit = (params, trace, t_draw, t_fit)
            params, trace, t_draw, t_fit = pilot_fit
            if method == "pilot_leverage":
                evaluate(method, i, s, params, trace, pilot_cost, t_draw, t_fit)
                continue
            # refined_leverage: rescore at θ_S of the pilot stage, draw afresh, fit again.
            probs, t_rescore = score_batch(problem, params, kind="leverage", mix=config.mix)
            (idx, w), t_draw2 = draw(keys, probs, s)
            (params2, trace2), t_fit2 = fit_samples(problem, params0, idx, w, num_steps=config.num_steps)
            refine_score = pilot_cost + (t_draw + t_fit + t_rescore) / R
            evaluate(method, i, s, params2, trace2, refine_score, t_draw2, t_fit2)
    if bar is not None:
        bar.close()

    timing = None
    if config.timing_size is not None:
        log("wall-time comparison")
        timing = compare_wall_time(
            problem, full, params0, k_timing, size=resolve_size(config.timing_size, n), config=config
        )

    theta_norm = float(
        np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree.leaves(theta_star)))
    )
    full_summary = {
        "loss": full.loss,
        "time_s": full.time_s,
        "compile_s": full.compile_s,
        "num_steps": full.num_steps,
        "rel_change": full.rel_change,
        "theta_norm": theta_norm,
        "constraint_active": None
        if config.radius is None
        else bool(theta_norm >= config.radius * (1 - 1e-6)),
    }
    if problem.task == "classification":
        acc, _ = test_accuracy(problem, _batch1(theta_star))
        full_summary["test_accuracy"] = float(acc[0])
    stats = compile_stats()
    summary = {
        "dataset": problem.name,
        "n": n,
        "p": problem.num_params,
        "info": problem.info,
        "config": _config_dict(config),
        "sizes": list(sizes),
        "pilot_size": pilot_size if need_pilot else None,
        "full": full_summary,
        "methods": {m: {"score_s": score_s.get(m), "results": records[m]} for m in methods},
        "timing": timing,
        "compile": {
            "count": stats["count"] - compile0["count"],
            "seconds": stats["seconds"] - compile0["seconds"],
        },
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
    return StudyResult(summary, ratios, accuracies, sizes, full)


def steps_to_loss(losses: np.ndarray, target: float) -> int | None:
    """First step ``t`` with ``losses[t] <= target`` (``losses[t]`` is after ``t`` updates), else ``None``."""
    hit = np.nonzero(np.asarray(losses) <= target)[0]
    return int(hit[0]) if hit.size else None


def steps_to_converge(trace, rtol: float = 1e-6) -> int:
    """Steps after which a fit's objective stays within ``rtol`` (relative) of its final value."""
    trace = np.asarray(trace, dtype=np.float64)
    final = trace[-1]
    bad = np.nonzero(np.abs(trace - final) > rtol * abs(final))[0]
    return int(bad[-1]) + 1 if bad.size else 0


def compare_wall_time(
    problem: Problem,
    full: FullFit,
    params0,
    key: jax.Array,
    *,
    size: int,
    config: StudyConfig,
    methods: tuple[str, ...] = ("pilot_leverage", "linear_leverage", "uniform"),
    runs: int = 3,
) -> dict:
    r"""End-to-end wall time of practical schemes against full-data training to the same loss.

    For each scheme and each of ``runs`` independent runs (one sample each, ``R = 1``): time the pilot
    (uniform draw + fit; ``pilot_leverage`` only), the scoring, the draw and the training on ``size``
    rows, each a compiled call timed after its compilation. The sample solution's full-data loss
    ``L(θ_S)`` sets the target; full-data training (:func:`fit_full`'s run) reaches it after
    ``t = steps_to_loss(full.losses, L(θ_S))`` steps, which take ``t · full.time_s / full.num_steps``.

    The sample fits run the study's fixed ``num_steps``; as the full-data side is charged only the steps
    it needs, ``*_converged`` entries also charge the pilot and sample fits only their
    :func:`steps_to_converge` (objective within ``1e-6`` of its final value), pro rata.

    Returns:
        JSON-ready dict: ``size``, ``full`` (``time_s``, ``num_steps``, ``step_s``) and per scheme the
        ``runs`` list (``pilot_s``, ``score_s``, ``sample_s``, ``train_s``, ``total_s``,
        ``total_converged_s``, ``ratio``, ``full_steps_to_loss``, ``full_time_to_loss_s``) with medians
        ``total_s``, ``total_converged_s``, ``full_time_to_loss_s``, ``speedup`` and
        ``speedup_converged`` (full-data time to the loss over the scheme's time).
    """
    n = problem.n
    step_s = full.time_s / full.num_steps
    pilot_size = resolve_size(config.pilot_size, n)
    out = {
        "size": int(size),
        "pilot_size": pilot_size,
        "full": {"time_s": full.time_s, "num_steps": full.num_steps, "step_s": step_s, "loss": full.loss},
        "methods": {},
    }
    uniform = uniform_scores(n, problem.dtype)
    method_keys = jax.random.split(key, len(methods))
    for method, mkey in zip(methods, method_keys, strict=True):
        rows = []
        for rkey in jax.random.split(mkey, runs):
            k_pilot, k_sample = jax.random.split(rkey)
            pilot_s = score_s = pilot_conv_s = 0.0
            if method == "uniform":
                probs = uniform
            elif method == "linear_leverage":
                probs, score_s = _run(
                    _matrix_score_kernel("leverage", float(config.mix)), problem.linear_design
                )
            elif method == "pilot_leverage":
                (idx, w), t_draw = draw(k_pilot[None], uniform, pilot_size)
                (pilot, pilot_trace), t_fit = fit_samples(
                    problem, params0, idx, w, num_steps=config.num_steps
                )
                pilot_s = t_draw + t_fit
                pilot_conv_s = t_draw + t_fit * steps_to_converge(pilot_trace[0]) / config.num_steps
                probs, score_s = score_batch(problem, pilot, kind="leverage", mix=config.mix)
                probs = probs[0]
            else:
                raise ValueError(f"compare_wall_time: {method!r} is not a practical scheme here.")
            (idx, w), sample_s = draw(k_sample[None], probs, size)
            (params, trace), train_s = fit_samples(problem, params0, idx, w, num_steps=config.num_steps)
            loss = float(full_losses(problem, params)[0][0])
            steps = steps_to_loss(full.losses, loss)
            total = pilot_s + score_s + sample_s + train_s
            train_steps = steps_to_converge(trace[0])
            total_conv = pilot_conv_s + score_s + sample_s + train_s * train_steps / config.num_steps
            rows.append(
                {
                    "pilot_s": pilot_s,
                    "score_s": score_s,
                    "sample_s": sample_s,
                    "train_s": train_s,
                    "total_s": total,
                    "train_steps_to_converge": train_steps,
                    "total_converged_s": total_conv,
                    "ratio": loss / full.loss,
                    "full_steps_to_loss": steps,
                    "full_time_to_loss_s": None if steps is None else steps * step_s,
                }
            )
        totals = [r["total_s"] for r in rows]
        to_loss = [r["full_time_to_loss_s"] for r in rows if r["full_time_to_loss_s"] is not None]
        med_total = float(np.median(totals))
        med_conv = float(np.median([r["total_converged_s"] for r in rows]))
        med_full = float(np.median(to_loss)) if to_loss else None
        out["methods"][method] = {
            "runs": rows,
            "total_s": med_total,
            "total_converged_s": med_conv,
            "full_time_to_loss_s": med_full,
            "speedup": None if med_full is None or med_total == 0 else med_full / med_total,
            "speedup_converged": None if med_full is None or med_conv == 0 else med_full / med_conv,
            "ratio": float(np.median([r["ratio"] for r in rows])),
        }
    return out


def _cell(q: dict, width: int) -> str:
    f = lambda v, spec: "inf" if v is None else format(v, spec)
    return f"{f(q['median'], '>10.4f')} [{f(q['q25'], '.3f')}, {f(q['q75'], '.3f')}]".rjust(width)


def format_table(summary: dict) -> str:
    """The study summary as a plain-text table (one row per size, one column block per scheme)."""
    methods = list(summary["methods"])
    classification = any("test_accuracy" in r for m in methods for r in summary["methods"][m]["results"])
    lines = []
    info = summary["info"]
    full = summary["full"]
    lines.append(
        f"{summary['dataset']}: n = {summary['n']}, p = {summary['p']}, {info.get('model', '')}, "
        f"radius = {info.get('radius')}"
    )
    extra = f", test accuracy {full['test_accuracy']:.4f}" if "test_accuracy" in full else ""
    lines.append(
        f"full-data fit: L(θ*) = {full['loss']:.6g} in {full['num_steps']} steps, {full['time_s']:.3f} s "
        f"(compile {full['compile_s']:.2f} s), ‖θ*‖ = {full['theta_norm']:.4f}{extra}"
    )
    lines.append("L(θ_S)/L(θ*) on the full data: median [q25, q75] over repeats; s = sample rows")
    width = 26
    header = f"{'s':>7} {'s/n':>7}  " + "".join(f"{m:>{width}}" for m in methods)

    def table(key):  # one row per sample size, one column per method
        lines.append(header)
        for i, s in enumerate(summary["sizes"]):
            cells = "".join(_cell(summary["methods"][m]["results"][i][key], width) for m in methods)
            lines.append(f"{s:>7d} {s / summary['n']:>7.4f}  " + cells)

    table("ratio")
    if classification:
        lines.append("test accuracy: median [q25, q75]")
        table("test_accuracy")
    lines.append("seconds per repeat at the largest size: scoring (incl. pilot) + training")
    for m in methods:
        r = summary["methods"][m]["results"][-1]
        lines.append(
            f"  {m:<20} score {r['score_s']:.4f} s, sample {r['sample_s']:.4f} s, train {r['train_s']:.4f} s"
        )
    timing = summary.get("timing")
    if timing:
        runs = len(next(iter(timing["methods"].values()))["runs"])
        lines.append(
            f"wall time at s = {timing['size']} (one sample, compiled; medians of {runs} runs) vs full-data "
            f"training to the same loss ({timing['full']['step_s'] * 1e3:.3f} ms/step):"
        )
        for m, t in timing["methods"].items():
            full_t = (
                "not reached" if t["full_time_to_loss_s"] is None else f"{t['full_time_to_loss_s']:.4f} s"
            )
            speed = ""
            if t["speedup"] is not None:
                speed = f", speed-up {t['speedup']:.2f}x ({t['speedup_converged']:.2f}x)"
            lines.append(
                f"  {m:<20} total {t['total_s']:.4f} s ({t['total_converged_s']:.4f} s to convergence), "
                f"ratio {t['ratio']:.4f}; full data to that loss: {full_t}{speed}"
            )
    comp = summary["compile"]
    lines.append(f"compilations: {comp['count']} ({comp['seconds']:.1f} s, not in the times above)")
    return "\n".join(lines)
