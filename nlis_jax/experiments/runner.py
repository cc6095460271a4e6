r"""The sampling study's runner: every scheme at every sample size with repeats, and its summary.

:func:`run_study` names each step: the full-data fit (θ*), the scores shared by a scheme's samples, the
pilot, the grid of sample fits, the wall-time comparison and the JSON-ready summary.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

import nlis_jax as nj
from nlis_jax._checks import check_key
from nlis_jax.experiments import kernels
from nlis_jax.experiments import keys as prng
from nlis_jax.experiments.configs import METHODS, ORACLE_METHODS, StudyConfig, resolve_size, resolve_sizes
from nlis_jax.experiments.problems import Problem, make_problem
from nlis_jax.experiments.report import environment, number, quantiles
from nlis_jax.experiments.study import (
    FullFit,
    batch1,
    draw,
    fit_full,
    fit_samples,
    full_losses,
    linear_scores,
    pad_rows,
    score_batch,
    score_params,
    tail_change,
    test_accuracy,
)
from nlis_jax.experiments.wall_time import TIMED_METHODS, compare_wall_time

__all__ = ["StudyResult", "run_study"]


# --------------------------------------------------------------------------------------------------
# Studies


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


def _study_keys(key):
    """``(init, pilot, timing, draw keys per scheme)`` from ``split(key, 4)`` (on the host:
    :mod:`~nlis_jax.experiments.keys`)."""
    k_init, k_pilot, k_draw, k_timing = prng.split_tuple(key, 4)
    return k_init, k_pilot, k_timing, prng.split_tuple(k_draw, len(METHODS))


def _cell_keys(key, size: int, *, num: int):
    """The ``num`` draw keys of a scheme at a sample size: ``split(fold_in(key, size), num)``."""
    return prng.split(prng.fold_in(key, size), num)


def _config_dict(config: StudyConfig) -> dict:
    out = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


class _Run(NamedTuple):
    """What every stage of a study shares: problem, config, sizes, keys, the start point, θ* and the
    padded width of every sample (one compiled draw and fit for all sizes)."""

    problem: Problem
    config: StudyConfig
    sizes: tuple[int, ...]
    method_keys: dict
    params0: Any
    full: FullFit
    log: Any
    bucket: int


class _Fit(NamedTuple):
    """``R`` sample fits and their per-call seconds (``score_s`` per repeat)."""

    params: Any
    trace: Any
    score_s: float
    draw_s: float
    fit_s: float


def _finite_max(values) -> float | None:
    """The largest finite entry of ``values`` (``None`` if there is none)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return number(np.max(finite)) if finite.size else None


class _Grid:
    """Results of the grid: ratio and accuracy arrays and per-size records, per scheme."""

    def __init__(self, run: _Run):
        shape = (len(run.sizes), run.config.repeats)
        self.run = run
        self.ratios = {m: np.zeros(shape) for m in run.config.methods}
        classification = run.problem.task == "classification"
        self.accuracies = {m: np.zeros(shape) for m in run.config.methods} if classification else None
        self.records: dict[str, list] = {m: [] for m in run.config.methods}

    def add(self, method: str, i: int, size: int, fit: _Fit) -> None:
        problem, R = self.run.problem, self.run.config.repeats
        losses, _ = full_losses(problem, fit.params)
        ratio = np.asarray(losses, dtype=np.float64) / self.run.full.loss
        self.ratios[method][i] = ratio
        record = {
            "size": int(size),
            "fraction": size / problem.n,
            "ratio": quantiles(ratio),
            "values": [number(v) for v in ratio],
            "score_s": fit.score_s,
            "sample_s": fit.draw_s / R,
            "train_s": fit.fit_s / R,
            # over the repeats that did not diverge (a NaN change would hide the others' as None)
            "max_rel_change": _finite_max(tail_change(fit.trace)),
        }
        if self.accuracies is not None:
            acc, _ = test_accuracy(problem, fit.params)
            # a diverged fit (non-finite loss) has no accuracy: a NaN model's argmax is class 0, whose
            # share of the test set (0.087 on digits) was reported as the fit's accuracy
            acc = np.where(np.isfinite(ratio), np.asarray(acc, dtype=np.float64), np.nan)
            self.accuracies[method][i] = acc
            record["test_accuracy"] = quantiles(acc, worst=-np.inf)
        self.records[method].append(record)


def _draw_and_fit(keys, run: _Run, probs, size: int, score_s: float) -> _Fit:
    (idx, w), draw_s = draw(keys, probs, size, bucket=run.bucket)
    steps = run.config.num_steps
    (params, trace), fit_s = fit_samples(run.problem, run.params0, idx, w, num_steps=steps, size=size)
    return _Fit(params, trace, score_s, draw_s, fit_s)


def _shared_scores(run: _Run) -> tuple[dict, dict]:
    """Probabilities computed once per scheme (uniform, linear, oracle) and their seconds."""
    problem, config, methods = run.problem, run.config, run.config.methods
    probs: dict[str, jax.Array] = {}
    seconds: dict[str, float] = {}
    if "uniform" in methods:
        probs["uniform"], seconds["uniform"] = nj.uniform_scores(problem.n, problem.dtype), 0.0
    if "linear_leverage" in methods:
        probs["linear_leverage"], seconds["linear_leverage"] = linear_scores(problem, mix=config.mix)
    for method in ORACLE_METHODS:
        if method in methods:
            run.log(f"scores {method}")
            kind = "norm" if method == "nonlinear_norm" else "leverage"
            probs[method], seconds[method] = score_params(problem, run.full.params, kind=kind, mix=config.mix)
    return probs, seconds


def _pilot(key, run: _Run) -> tuple[jax.Array, float]:
    """One pilot per repeat: uniform sample, fit, leverage at its solution -> ``((R, n), s per repeat)``."""
    run.log("pilot")
    problem, R = run.problem, run.config.repeats
    pilot_size = resolve_size(run.config.pilot_size, problem.n)
    uniform = nj.uniform_scores(problem.n, problem.dtype)
    fit = _draw_and_fit(prng.split(key, R), run, uniform, pilot_size, 0.0)
    probs, score_s = score_batch(problem, fit.params, kind="leverage", mix=run.config.mix)
    return probs, (fit.draw_s + fit.fit_s + score_s) / R


def _practical_fits(run: _Run, size: int, pilot_probs, pilot_cost: float) -> dict[str, _Fit]:
    """``pilot_leverage`` and ``refined_leverage`` at one size (the refinement starts from the pilot
    scheme's sample solution θ_S of the same repeat)."""
    R, methods = run.config.repeats, run.config.methods
    pkeys = _cell_keys(run.method_keys["pilot_leverage"], size, num=R)
    pilot = _draw_and_fit(pkeys, run, pilot_probs, size, pilot_cost)
    fits = {"pilot_leverage": pilot}
    if "refined_leverage" in methods:
        probs, rescore_s = score_batch(run.problem, pilot.params, kind="leverage", mix=run.config.mix)
        keys = _cell_keys(run.method_keys["refined_leverage"], size, num=R)
        refine_cost = pilot_cost + (pilot.draw_s + pilot.fit_s + rescore_s) / R
        fits["refined_leverage"] = _draw_and_fit(keys, run, probs, size, refine_cost)
    return fits


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C during the grid of :func:`run_study`; ``summary`` holds the finished cells (``partial``)."""

    def __init__(self, summary: dict):
        super().__init__("study interrupted")
        self.summary = summary


def _run_grid(run: _Run, shared: tuple[dict, dict], pilot, bar, grid: _Grid) -> _Grid:
    """Every scheme at every size: draw ``R`` samples, fit them, evaluate on the full data (into ``grid``)."""
    shared_probs, shared_s = shared
    for i, size in enumerate(run.sizes):
        practical = None
        for method in run.config.methods:
            run.log(f"{method} s={size}")
            if method in shared_probs:
                keys = _cell_keys(run.method_keys[method], size, num=run.config.repeats)
                fit = _draw_and_fit(keys, run, shared_probs[method], size, shared_s[method])
            else:
                practical = practical or _practical_fits(run, size, *pilot)
                fit = practical[method]
            grid.add(method, i, size, fit)
            if bar is not None:
                bar.update(run.config.repeats)
    return grid


def _full_summary(run: _Run) -> dict:
    full, radius = run.full, run.config.radius
    leaves = jax.tree.leaves(full.params)
    theta_norm = float(np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in leaves)))
    out = {
        "loss": full.loss,
        "time_s": full.time_s,
        "step_s": full.seconds_per_step,
        "compile_s": full.compile_s,
        "num_steps": full.num_steps,
        "rel_change": full.rel_change,
        "theta_norm": theta_norm,
        "constraint_active": None if radius is None else bool(theta_norm >= radius * (1 - 1e-6)),
    }
    if run.problem.task == "classification":
        acc, _ = test_accuracy(run.problem, batch1(full.params))
        out["test_accuracy"] = float(acc[0])
    return out


def _summary(run: _Run, grid: _Grid, score_s: dict, timing, compile0: dict) -> dict:
    problem, config, methods = run.problem, run.config, run.config.methods
    need_pilot = any(m in methods for m in ("pilot_leverage", "refined_leverage"))
    stats = kernels.compile_stats()
    return {
        "dataset": problem.name,
        "n": problem.n,
        "p": problem.num_params,
        "info": problem.info,
        "config": _config_dict(config),
        "sizes": list(run.sizes),
        "pilot_size": resolve_size(config.pilot_size, problem.n) if need_pilot else None,
        "full": _full_summary(run),
        "methods": {m: {"score_s": score_s.get(m), "results": grid.records[m]} for m in methods},
        "timing": timing,
        "compile": {k: stats[k] - compile0[k] for k in ("count", "seconds")},
        **environment(),
    }


def _progress_bar(run_total: int, name: str, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=run_total, desc=name, unit="fit", leave=False)


def run_study(
    key: jax.Array,
    config: StudyConfig,
    *,
    problem: Problem | None = None,
    progress: bool = False,
    on_grid: Callable[[dict], concurrent.futures.Future | None] | None = None,
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

    Every sample is drawn and fitted padded to one width (the largest size or pilot, rounded up to
    :data:`~nlis_jax.experiments.kernels.FIT_CHUNK`) with weight 0 beyond its size: the same samples and
    objective as a sample of its own size, and one compiled draw and fit for every size.

    Args:
        key: ``jax.random.key(seed)``.
        config: the study (:class:`CaliforniaConfig`, :class:`SyntheticConfig`, ...).
        problem: a prebuilt :func:`make_problem` (else built from ``config``).
        progress: tqdm bar over methods × sizes × repeats on stderr.
        on_grid: called with the summary of the grid (``timing`` still ``None``) once the grid is done,
            before the wall-time comparison. It may return a future of work it started in a thread
            (``nlis-jax run`` writes the plots): that work runs beside the comparison's warm-up
            (compilation, untimed) and is waited for before anything is timed.

    Returns:
        :class:`StudyResult`. ``summary`` holds ``dataset``, ``n``, ``p``, ``info``, ``config``, ``full``
        (θ*'s loss, time, steps, norm, convergence), ``methods`` (per scheme: ``score_s``, the seconds of
        its scores per repeat, ``None`` for ``refined_leverage``, scored anew at each size from that
        size's pilot fits, so its cost is in each record; and a list of per-size records with ``size``,
        ``fraction``, ``ratio`` quantiles and ``values``, ``test_accuracy`` (classification), ``score_s`` /
        ``sample_s`` / ``train_s`` per repeat (the vmapped wall time divided by ``R``) and
        ``max_rel_change`` (convergence of the sample fits)), ``timing`` (:func:`compare_wall_time`, when
        ``config.timing_size``) and ``compile``.

    Raises:
        StudyInterrupted: on Ctrl-C after the full-data fit (scores, grid, plots callback, wall-time
            comparison), with the summary of the finished cells.
    """
    check_key("key", key)
    problem = make_problem(config) if problem is None else problem
    sizes = resolve_sizes(config.sizes, problem.n)
    compile0 = kernels.compile_stats()
    k_init, k_pilot, k_timing, draw_keys = _study_keys(key)
    method_keys = dict(zip(METHODS, draw_keys, strict=True))
    params0 = problem.init(k_init)
    bar = _progress_bar(len(config.methods) * len(sizes) * config.repeats, problem.name, progress)
    try:  # the bar is closed however the study ends (an error of a fit, Ctrl-C, success)
        log = (lambda text: bar.set_postfix_str(text)) if bar is not None else (lambda text: None)
        log("full-data fit")
        full = fit_full(problem, params0, num_steps=config.steps_full)
        bucket = pad_rows(max(*sizes, resolve_size(config.pilot_size, problem.n)))
        run = _Run(problem, config, sizes, method_keys, params0, full, log, bucket)
        grid, score_s, timing = _Grid(run), {}, None
        try:  # from here on, Ctrl-C keeps what is finished (scores, grid cells)
            probs, shared_s = _shared_scores(run)
            score_s.update(shared_s)
            pilot = (None, 0.0)
            if any(m in config.methods for m in ("pilot_leverage", "refined_leverage")):
                pilot = _pilot(k_pilot, run)
                score_s["pilot_leverage"] = pilot[1]
            _run_grid(run, (probs, score_s), pilot, bar, grid)
            if bar is not None:
                bar.close()
            background = None
            if on_grid is not None:
                background = on_grid(_summary(run, grid, score_s, None, compile0))
            methods = tuple(m for m in TIMED_METHODS if m in config.methods)  # the schemes asked for
            if config.timing_size is not None and methods:
                log("wall-time comparison")
                size = resolve_size(config.timing_size, problem.n)
                timing = compare_wall_time(
                    k_timing, problem, full, params0, size=size, config=config, methods=methods,
                    wait_for=background,
                )  # fmt: skip
        except KeyboardInterrupt:
            raise StudyInterrupted(dict(_summary(run, grid, score_s, None, compile0), partial=True)) from None
        summary = _summary(run, grid, score_s, timing, compile0)
        return StudyResult(summary, grid.ratios, grid.accuracies, sizes, full)
    finally:
        if bar is not None:
            bar.close()
