r"""End-to-end wall time of practical sampling schemes against full-data training to the same loss."""

from __future__ import annotations

import concurrent.futures
import math

import jax
import numpy as np

import nlis_jax as nj
from nlis_jax._checks import check_key
from nlis_jax.experiments import kernels
from nlis_jax.experiments import keys as prng
from nlis_jax.experiments.configs import StudyConfig, resolve_size
from nlis_jax.experiments.problems import Problem
from nlis_jax.experiments.report import number, quantiles, steps_to_converge, steps_to_loss
from nlis_jax.experiments.study import (
    FullFit,
    draw,
    fit_samples,
    full_losses,
    linear_scores,
    pad_rows,
    score_params,
)

__all__ = ["compare_wall_time"]

#: The schemes :func:`compare_wall_time` knows how to time.
TIMED_METHODS = ("pilot_leverage", "linear_leverage", "uniform")


def _draw_and_fit(keys, probs, size: int, bucket: int, problem: Problem, params0, config: StudyConfig):
    """One sample (``R = len(keys) = 1``) drawn and fitted by the study's padded kernels (one compilation
    for the pilot and the timed size): ``(params, trace, draw_s, fit_s)``."""
    (idx, w), draw_s = draw(keys, probs, size, bucket=bucket)
    steps = config.num_steps
    (params, trace), fit_s = fit_samples(problem, params0, idx, w, num_steps=steps, size=size)
    return params, trace, draw_s, fit_s


def _scheme_probs(key, method: str, problem: Problem, params0, config: StudyConfig, bucket: int) -> tuple:
    """``(probs, score_s, pilot_s, pilot_converged_s)`` of one run of a practical scheme."""
    uniform = nj.uniform_scores(problem.n, problem.dtype)
    if method == "uniform":
        return uniform, 0.0, 0.0, 0.0
    if method == "linear_leverage":
        probs, score_s = linear_scores(problem, mix=config.mix)
        return probs, score_s, 0.0, 0.0
    if method == "pilot_leverage":
        pilot_size = resolve_size(config.pilot_size, problem.n)
        fit = _draw_and_fit(key, uniform, pilot_size, bucket, problem, params0, config)
        pilot, trace, t_draw, t_fit = fit
        converged_s = t_draw + t_fit * steps_to_converge(np.asarray(trace)[0]) / config.num_steps
        pilot, row_s = kernels.timed(kernels.row_kernel, pilot, 0)
        probs, score_s = score_params(problem, pilot, kind="leverage", mix=config.mix)
        return probs, row_s + score_s, t_draw + t_fit, converged_s
    raise ValueError(f"compare_wall_time: {method!r} is not a practical scheme here.")


def full_steps_to_loss(full: FullFit, loss: float) -> int | None:
    """Updates of the full-data run until its loss is at most ``loss`` (its final iterate included)."""
    return steps_to_loss(np.append(full.losses, full.loss), loss)  # L(θ_t) after t = 0..T updates


def _one_run(keys, method: str, problem: Problem, full: FullFit, params0, size: int, config) -> dict:
    """Pilot, score, draw and train once (``R = 1``; ``keys = (pilot, sample)``); the full-data time to
    the same loss."""
    k_pilot, k_sample = keys
    bucket = pad_rows(max(size, resolve_size(config.pilot_size, problem.n)))
    probs, score_s, pilot_s, pilot_conv_s = _scheme_probs(k_pilot, method, problem, params0, config, bucket)
    params, trace, sample_s, train_s = _draw_and_fit(k_sample, probs, size, bucket, problem, params0, config)
    loss = float(np.asarray(full_losses(problem, params)[0])[0])
    diverged = not math.isfinite(loss)
    # a diverged fit's loss counts as +inf: full-data training "reaches" it at once (time 0, speed-up 0)
    steps = full_steps_to_loss(full, math.inf if diverged else loss)
    train_steps = steps_to_converge(np.asarray(trace)[0])  # all steps for a diverged fit
    step_s = full.seconds_per_step
    return {
        "pilot_s": pilot_s,
        "score_s": score_s,
        "sample_s": sample_s,
        "train_s": train_s,
        "total_s": pilot_s + score_s + sample_s + train_s,
        "train_steps_to_converge": train_steps,
        "total_converged_s": pilot_conv_s + score_s + sample_s + train_s * train_steps / config.num_steps,
        "ratio": number(loss / full.loss),  # None: diverged
        "diverged": diverged,
        "full_steps_to_loss": steps,
        "full_time_to_loss_s": None if steps is None else steps * step_s,
    }


def _median(values) -> float | None:
    """The median over every run, ``None`` (+inf: a diverged ratio, a loss full-data training never
    reached) counting as the largest value (:func:`~nlis_jax.experiments.report.quantiles`); ``None``
    when the median is such a run."""
    return quantiles([math.inf if v is None else v for v in values])["median"]


def _medians(rows: list[dict]) -> dict:
    """Medians over runs and the speed-ups (full-data time to the loss over the scheme's time), every
    median over the same runs: a diverged run has ratio +inf, full-data time 0 and the time it spent."""
    med_total = _median([r["total_s"] for r in rows])
    med_conv = _median([r["total_converged_s"] for r in rows])
    med_full = _median([r["full_time_to_loss_s"] for r in rows])
    return {
        "runs": rows,
        "total_s": med_total,
        "total_converged_s": med_conv,
        "full_time_to_loss_s": med_full,
        "speedup": None if med_full is None or med_total == 0 else med_full / med_total,
        "speedup_converged": None if med_full is None or med_conv == 0 else med_full / med_conv,
        "ratio": _median([r["ratio"] for r in rows]),
        "diverged": sum(r["diverged"] for r in rows),
    }


def compare_wall_time(
    key: jax.Array,
    problem: Problem,
    full: FullFit,
    params0,
    *,
    size: int,
    config: StudyConfig,
    methods: tuple[str, ...] = TIMED_METHODS,
    runs: int = 3,
    wait_for: concurrent.futures.Future | None = None,
) -> dict:
    r"""End-to-end wall time of practical schemes against full-data training to the same loss.

    For each scheme and each of ``runs`` independent runs (one sample each, ``R = 1``): time the pilot
    (uniform draw + fit; ``pilot_leverage`` only), the scoring, the draw and the training on ``size``
    rows, each a compiled call timed apart from its compilation. The sample solution's full-data loss
    ``L(θ_S)`` sets the target; full-data training (:func:`fit_full`'s run) reaches it after
    ``t = full_steps_to_loss(full, L(θ_S))`` steps, which take ``t · full.seconds_per_step`` (the
    marginal cost of a step, :attr:`FullFit.step_s`). A diverged sample fit (``L(θ_S)`` not finite) has
    ``ratio`` ``None`` (+inf in the medians), ``diverged`` true, full-data time 0 and its whole time.

    Each scheme runs once more before the timed runs, with keys of its own (a warm-up: every program
    the timed runs call is compiled then). ``wait_for``, work started in a thread (the study's plots, see
    :func:`~nlis_jax.experiments.run_study`), may run beside that warm-up; it is waited for before the
    first timed run.

    The sample fits run the study's fixed ``num_steps``; as the full-data side is charged only the steps
    it needs, ``*_converged`` entries also charge the pilot and sample fits only their
    :func:`steps_to_converge` (objective within ``1e-6`` of its final value), pro rata.

    Returns:
        JSON-ready dict: ``size``, ``full`` (``time_s``, ``num_steps``, ``step_s``) and per scheme the
        ``runs`` list (``pilot_s``, ``score_s``, ``sample_s``, ``train_s``, ``total_s``,
        ``total_converged_s``, ``ratio``, ``diverged``, ``full_steps_to_loss``, ``full_time_to_loss_s``)
        with medians ``total_s``, ``total_converged_s``, ``full_time_to_loss_s``, ``ratio``, ``speedup``
        and ``speedup_converged`` (full-data time to the loss over the scheme's time), and the count of
        ``diverged`` runs. A scheme's keys depend on its name, not on the other schemes timed.
    """
    check_key("key", key)
    step_s = full.seconds_per_step
    out = {
        "size": int(size),
        "pilot_size": resolve_size(config.pilot_size, problem.n),
        "full": {"time_s": full.time_s, "num_steps": full.num_steps, "step_s": step_s, "loss": full.loss},
        "methods": {},
    }
    unknown = [m for m in methods if m not in TIMED_METHODS]
    if unknown:
        raise ValueError(f"compare_wall_time: {unknown[0]!r} is not one of {TIMED_METHODS}.")
    method_keys = dict(zip(TIMED_METHODS, prng.split_tuple(key, len(TIMED_METHODS)), strict=True))
    run_keys = {  # per scheme: each timed run's (pilot, sample) keys, then the warm-up's; each of shape (1,)
        method: [
            prng.split_tuple(rkey, 2, batched=True)
            for rkey in prng.split_tuple(method_keys[method], runs + 1)
        ]
        for method in methods
    }
    for method in methods:  # warm-up, untimed: compiles every program of the timed runs
        _one_run(run_keys[method][-1], method, problem, full, params0, size, config)
    if wait_for is not None:  # nothing runs beside the timed runs
        concurrent.futures.wait([wait_for])
    for method in methods:
        timed = run_keys[method][:-1]
        rows = [_one_run(keys, method, problem, full, params0, size, config) for keys in timed]
        out["methods"][method] = _medians(rows)
    return out
