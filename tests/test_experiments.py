"""Tests of nlis_jax.experiments: study structure, optimality of θ*, kernels against references.

Sizes are tiny. The synthetic config below is shared with tests/test_cli.py (same shapes), so the
compiled kernels (module-level jitted kernels in nlis_jax.experiments.kernels) are reused across both files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import nlis_jax as nj
from nlis_jax import experiments as ex
from nlis_jax.experiments.datasets import DatasetNotFoundError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: The tiny synthetic study (also run through the CLI in tests/test_cli.py).
TINY = ex.SyntheticConfig(
    n=200,
    d=4,
    sizes=(20, 40),
    repeats=2,
    num_steps=50,
    pilot_size=20,
    timing_size=20,
)


def _california_home() -> str:
    for folder in (SHARED_DATA / "scikit_learn_data", os.environ.get("SCIKIT_LEARN_DATA")):
        if folder and (Path(folder) / "cal_housing_py3.pkz").is_file():
            return str(folder)
    pytest.skip("California Housing cache (cal_housing_py3.pkz) not found")


@pytest.fixture(scope="module")
def tiny():
    problem = ex.make_problem(TINY)
    result = ex.run_study(jax.random.key(0), TINY, problem=problem)
    return problem, result


# --------------------------------------------------------------------------------------------------
# Configs


def test_resolve_sizes():
    assert ex.resolve_sizes((0.1, 20, 0.05), 200) == (10, 20)
    assert ex.resolve_size(0.001, 200) == 1
    with pytest.raises(ValueError, match="more than n"):
        ex.resolve_size(300, 200)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sizes=()), "non-empty"),
        (dict(sizes=(0.5, 2.5)), "whole number"),
        (dict(methods=("magic",)), "methods has unknown name"),
        (dict(repeats=0), "repeats"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(mix=1.5), "mix"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ex.SyntheticConfig(**kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        # an int32 dtype rounded 68% of the inputs to 0 and failed later without naming the field
        (lambda: ex.SyntheticConfig(dtype="int32"), "dtype must be 'float32' or 'float64', got 'int32'"),
        (lambda: ex.CaliforniaConfig(dtype="float16"), "dtype must be 'float32' or 'float64'"),
        (lambda: ex.SyntheticConfig(data_seed=2**32 + 5), r"data_seed must lie in \[0, 2\*\*32\)"),
        # a reshape error deep in the split; a constant model of the output biases alone; nothing
        (lambda: ex.DigitsConfig(test_fraction=0.0), r"test_fraction must lie in \(0, 1\), got 0.0"),
        (lambda: ex.DigitsConfig(test_fraction=1.5), r"test_fraction must lie in \(0, 1\)"),
        (lambda: ex.DigitsConfig(hidden=0), "hidden must be a positive integer, got 0"),
        (lambda: ex.FashionMNISTConfig(pool=0), "pool must be a positive integer, got 0"),
        (lambda: ex.FashionMNISTConfig(n=-5), "n must be a positive integer, got -5"),
        (lambda: ex.FashionMNISTConfig(components=0), "components must be a positive integer, got 0"),
    ],
)
def test_data_set_config_fields_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()
    for config in (ex.DigitsConfig(components=None), ex.FashionMNISTConfig(components=None)):
        assert config.components is None  # the documented "no projection" still allowed


def test_configs_are_hashable():
    assert hash(TINY) == hash(dataclasses.replace(TINY))
    assert {ex.CaliforniaConfig(), ex.CaliforniaConfig()} == {ex.CaliforniaConfig()}


# --------------------------------------------------------------------------------------------------
# The study


def test_study_structure(tiny):
    problem, result = tiny
    s = result.summary
    json.dumps(s, allow_nan=False)  # plain JSON
    assert s["dataset"] == "synthetic" and s["n"] == 200 and s["p"] == 4
    assert s["sizes"] == [20, 40] and result.sizes == (20, 40)
    assert list(s["methods"]) == list(ex.METHODS)
    for method in ex.METHODS:
        assert result.ratios[method].shape == (2, 2)
        records = s["methods"][method]["results"]
        assert [r["size"] for r in records] == [20, 40]
        for r in records:
            q = r["ratio"]
            assert q["min"] <= q["q25"] <= q["median"] <= q["q75"] <= q["max"]
            assert len(r["values"]) == TINY.repeats
            assert r["score_s"] >= 0 and r["train_s"] > 0 and r["sample_s"] >= 0
    assert s["full"]["constraint_active"] is True
    assert s["full"]["theta_norm"] == pytest.approx(TINY.radius, rel=1e-9)
    timing = s["timing"]
    assert timing["size"] == 20
    for method in ("pilot_leverage", "linear_leverage", "uniform"):
        t = timing["methods"][method]
        assert len(t["runs"]) == 3 and t["total_s"] >= t["total_converged_s"] > 0
    assert "uniform" in ex.format_table(s)


def test_ratios_at_least_one(tiny):
    """θ* minimises L over the ball, so L(θ_S)/L(θ*) >= 1 up to the convergence of the full fit."""
    _, result = tiny
    assert result.full.rel_change < 1e-10
    for method, ratios in result.ratios.items():
        assert np.all(np.isfinite(ratios)), method
        assert np.all(ratios >= 1 - 1e-9), (method, ratios.min())


def test_study_is_reproducible_and_does_not_recompile(tiny):
    problem, first = tiny
    again = ex.run_study(jax.random.key(0), TINY, problem=problem)
    assert again.summary["compile"]["count"] == 0  # same shapes: every kernel comes from the cache
    for method in ex.METHODS:
        np.testing.assert_array_equal(again.ratios[method], first.ratios[method])
    other = ex.run_study(jax.random.key(1), dataclasses.replace(TINY, timing_size=None), problem=problem)
    assert other.summary["compile"]["count"] == 0  # a new key is new data, not new code
    assert not np.array_equal(other.ratios["uniform"], first.ratios["uniform"])


@pytest.mark.parametrize(
    ("where", "error", "raised"),
    [
        ("fit_full", RuntimeError, RuntimeError),  # before the grid (e.g. the full-data fit diverged)
        ("_shared_scores", ValueError, ValueError),  # inside the grid
        ("_run_grid", KeyboardInterrupt, ex.StudyInterrupted),  # Ctrl-C keeps the finished cells
    ],
)
def test_progress_bar_is_closed_when_the_study_fails(tiny, monkeypatch, where, error, raised):
    """The tqdm bar of ``progress=True`` is closed however the study ends, not left in ``tqdm._instances``
    (where it would stay alive through the kept traceback and push later bars one line down)."""
    from tqdm import tqdm

    from nlis_jax.experiments import runner

    problem, _ = tiny
    before = set(tqdm._instances)

    def fail(*args, **kwargs):
        raise error("simulated failure")

    monkeypatch.setattr(runner, where, fail)
    config = dataclasses.replace(TINY, timing_size=None)
    with pytest.raises(raised) as info:
        ex.run_study(jax.random.key(0), config, problem=problem, progress=True)
    assert info.traceback  # the traceback (and so the bar, had it stayed open) is still alive here
    assert set(tqdm._instances) == before


def test_on_grid_and_the_timed_runs(tiny, monkeypatch):
    """``on_grid`` gets the grid's summary before the wall-time comparison; the work it starts runs
    beside the comparison's warm-up only: every timed run starts after it finished and compiles nothing."""
    import concurrent.futures
    import threading
    import time

    from nlis_jax.experiments import kernels, wall_time

    problem, first = tiny
    begun, seen, futures, calls = threading.Event(), [], [], []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def on_grid(summary):
        seen.append(summary)
        futures.append(pool.submit(lambda: (begun.wait(10), time.sleep(0.2))))
        return futures[-1]

    original, used = wall_time._one_run, []  # used: every (pilot, sample) key the runs consumed

    def one_run(*args, **kwargs):
        begun.set()  # the background work ends 0.2 s after the comparison's first run begins
        done, before = futures[0].done(), kernels.compile_stats()["count"]
        out = original(*args, **kwargs)
        calls.append((done, kernels.compile_stats()["count"] - before))
        used.extend(tuple(np.asarray(jax.random.key_data(k)).ravel().tolist()) for k in args[0])
        return out

    monkeypatch.setattr(wall_time, "_one_run", one_run)
    result = ex.run_study(jax.random.key(0), TINY, problem=problem, on_grid=on_grid)
    pool.shutdown()
    assert len(seen) == 1 and seen[0]["timing"] is None
    assert seen[0]["methods"]["uniform"]["results"] == result.summary["methods"]["uniform"]["results"]
    methods = len(wall_time.TIMED_METHODS)
    warm, timed = calls[:methods], calls[methods:]
    assert not warm[0][0]  # the warm-up began beside the background work
    assert len(timed) == 3 * methods and all(done and compiled == 0 for done, compiled in timed), timed
    assert set(result.summary["timing"]["methods"]) == set(wall_time.TIMED_METHODS)
    assert len(used) == 2 * len(calls) == len(set(used))  # the warm-up's keys are not a timed run's
    for method in ex.METHODS:  # the same values as without on_grid
        np.testing.assert_array_equal(result.ratios[method], first.ratios[method])


def test_light_and_full_matrix_score_programs_agree():
    """Matrices under LIGHT_COLUMNS columns are scored by a program compiled without LLVM's optimisation
    passes: the same scores as the optimised program (float64, a few roundings)."""
    from nlis_jax.experiments import kernels

    design = jnp.asarray(np.random.default_rng(4).standard_normal((300, 12)) * np.logspace(0, 3, 12))
    for kind in ("leverage", "norm"):
        light = kernels._light_matrix_scores(design, kind=kind, mix=0.1)
        full = kernels._full_matrix_scores(design, kind=kind, mix=0.1)
        np.testing.assert_allclose(light, full, rtol=1e-12)
        np.testing.assert_array_equal(kernels.matrix_score_kernel(design, kind=kind, mix=0.1), light)


def test_programs_keep_only_the_compiler_options_xla_knows():
    """A study program's XLA options are probed: one this XLA does not know is left out (an older or newer
    jaxlib), a long-standing one is kept; the draws, compiled with the CPU's legacy emitters where known,
    give the values of a plain jit of the same function, bit for bit."""
    from nlis_jax.experiments import kernels

    options = {"xla_backend_optimization_level": 0, "xla_nlis_jax_no_such_option": True}
    assert kernels.known_options(options) == {"xla_backend_optimization_level": 0}
    probs = jnp.asarray(np.random.default_rng(6).dirichlet(np.ones(200), size=3))
    keys = jax.random.split(jax.random.key(7), 3)
    size = np.int32(40)
    ours = kernels.draw_padded_kernel(keys, probs, size, bucket=64)
    plain = jax.jit(kernels.draw_padded_kernel.__wrapped__, static_argnames="bucket")(
        keys, probs, size, bucket=64
    )
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    wrapped = kernels.program({"xla_nlis_jax_no_such_option": 1})(lambda x: x + 1)
    assert float(wrapped(np.float32(1))) == 2.0  # compiled without the unknown option


def test_method_subset_keeps_draws(tiny):
    """A scheme's samples at a size do not depend on which other schemes run."""
    problem, first = tiny
    subset = dataclasses.replace(TINY, methods=("linear_leverage",), timing_size=None)
    result = ex.run_study(jax.random.key(0), subset, problem=problem)
    np.testing.assert_array_equal(result.ratios["linear_leverage"], first.ratios["linear_leverage"])


# --------------------------------------------------------------------------------------------------
# The pieces against references


def test_scores_against_library(tiny):
    problem, result = tiny
    theta = result.full.params
    design = np.concatenate([np.asarray(problem.xs), -np.asarray(problem.ys)[:, None]], axis=1)
    np.testing.assert_allclose(ex.score("linear_leverage", problem), nj.leverage_scores(design), rtol=1e-10)
    np.testing.assert_allclose(ex.score("uniform", problem), np.full(200, 1 / 200), rtol=0)
    # Closed-form dual (single_index_adjoint) against the library's quadrature dual matrix.
    quad = nj.dual_matrix(problem.apply_fn, theta, problem.xs, problem.ys, num_nodes=32)
    np.testing.assert_allclose(problem.dual_fn(theta, problem.xs, problem.ys), quad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        ex.score("nonlinear_leverage", problem, theta), nj.leverage_scores(quad), rtol=1e-8
    )
    np.testing.assert_allclose(ex.score("nonlinear_norm", problem, theta), nj.norm_scores(quad), rtol=1e-8)
    mixed = ex.score("nonlinear_leverage", problem, theta, mix=0.5)
    np.testing.assert_allclose(mixed.sum(), 1.0, rtol=1e-12)
    assert float(mixed.min()) >= 0.5 / 200
    with pytest.raises(ValueError, match="pass params"):
        ex.score("pilot_leverage", problem)


def test_draw_weights(tiny):
    problem, _ = tiny
    probs = ex.score("linear_leverage", problem)
    (idx, w), _ = ex.draw(jax.random.split(jax.random.key(3), 4), probs, 25)
    assert idx.shape == w.shape == (4, 25)
    np.testing.assert_allclose(w, 1.0 / (25 * np.asarray(probs)[np.asarray(idx)]), rtol=1e-12)


def test_sample_kernel_matches_trainer(tiny):
    """The vmapped sample fit with every row at weight 1 is the full-data iteration of nlis_jax.fit."""
    problem, result = tiny
    n = problem.n
    idx = jnp.arange(n)[None]
    w = jnp.ones((1, n), problem.dtype)
    params0 = problem.init(jax.random.key(0))
    (params, trace), _ = ex.fit_samples(problem, params0, idx, w, num_steps=TINY.num_steps)
    np.testing.assert_allclose(params[0], result.full.params, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(trace[0] * n, result.full.losses, rtol=1e-10)
    losses, _ = ex.full_losses(problem, params)
    np.testing.assert_allclose(losses[0], result.full.loss, rtol=1e-12)


def test_padded_draw_and_fit_match_exact(tiny):
    """A padded draw holds the exact draw's samples (weight 0 beyond them) and the padded, chunked fit
    is the exact fit up to summation order: the same objective, one compiled program for all sizes."""
    problem, _ = tiny
    probs = ex.score("linear_leverage", problem)
    keys = jax.random.split(jax.random.key(5), 3)
    params0 = problem.init(jax.random.key(0))
    for size in (150,):  # two chunks of the 256-row bucket: the first, and one through the loop
        (idx, w), _ = ex.draw(keys, probs, size)
        (ip, wp), _ = ex.draw(keys, probs, size, bucket=256)
        assert ip.shape == wp.shape == (3, 256)
        np.testing.assert_array_equal(ip[:, :size], idx)
        np.testing.assert_array_equal(wp[:, :size], w)
        assert np.all(np.asarray(wp[:, size:]) == 0)
        (pe, te), _ = ex.fit_samples(problem, params0, idx, w, num_steps=30)
        (pp, tp), _ = ex.fit_samples(problem, params0, ip, wp, num_steps=30, size=size)
        np.testing.assert_allclose(pp, pe, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(tp, te, rtol=1e-12)
    with pytest.raises(ValueError, match="bucket"):
        ex.draw(keys, probs, 300, bucket=256)
    with pytest.raises(ValueError, match="size"):
        ex.fit_samples(problem, params0, ip, wp, num_steps=3, size=300)


@pytest.mark.parametrize("workers", [2, 3])
def test_split_repeats_match_one_call(tiny, monkeypatch, workers):
    """Repeats fitted in parallel slices (5 repeats in 2 or 3 slices, the last padded) give the values
    of one vmapped call bit for bit, through the padded and the exact-size fit."""
    from nlis_jax.experiments import kernels

    problem, _ = tiny
    probs = ex.score("linear_leverage", problem)
    keys = jax.random.split(jax.random.key(7), 5)
    params0 = problem.init(jax.random.key(0))
    (idx, w), _ = ex.draw(keys, probs, 40)
    (ip, wp), _ = ex.draw(keys, probs, 40, bucket=128)
    idx_copy, w_copy = np.array(idx), np.array(w)
    fits = {}
    for k in (1, workers):
        monkeypatch.setattr(kernels, "repeat_workers", lambda R, k=k: min(k, R))
        fits[k] = (
            ex.fit_samples(problem, params0, idx, w, num_steps=20)[0],
            ex.fit_samples(problem, params0, ip, wp, num_steps=20, size=40)[0],
        )
    for one, split in zip(fits[1], fits[workers], strict=True):
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(split), strict=True):
            assert a.shape == b.shape and a.shape[0] == 5
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(idx, idx_copy)  # the caller's arrays are not modified
    np.testing.assert_array_equal(w, w_copy)


def test_split_repeats_follow_the_callers_configuration():
    """jax's config contexts hold per thread: with x64 off globally and on in the caller
    (``with jax.enable_x64(True)``), float64 slices computed in worker threads keep float64 (a bare
    worker would canonicalise them to float32 and lose the 1e-12 below)."""
    from nlis_jax.experiments import kernels

    @jax.jit
    def fn(rows, scale):
        return rows * scale

    rows = 1.0 + np.arange(10, dtype=np.float64).reshape(5, 2) * 1e-12
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with jax.enable_x64(True):
            split = kernels.split_repeats(fn, (rows, np.float64(3.0)), (0,), workers=2)
            one = kernels.split_repeats(fn, (rows, np.float64(3.0)), (0,), workers=1)
            split_dtype, one_dtype = split.dtype, one.dtype
            split, one = np.asarray(split), np.asarray(one)
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert split_dtype == one_dtype == jnp.float64
    np.testing.assert_array_equal(split, one)
    np.testing.assert_array_equal(one, rows * 3.0)


def test_compilations_do_not_grow_with_sizes():
    """One compiled draw and fit serve every sample size: a study of four sizes compiles no more than one
    of two (each on fresh shapes, d = 3 and d = 5, 3 repeats, so that neither reuses the other's programs
    or those of other tests; the keys of all sizes come from one program per number of sizes)."""
    counts = []
    for d, sizes in ((3, (20, 40)), (5, (10, 20, 40, 60))):
        config = dataclasses.replace(
            TINY, d=d, sizes=sizes, repeats=3, methods=("uniform",), timing_size=None
        )
        result = ex.run_study(jax.random.key(0), config)
        counts.append(result.summary["compile"]["count"])
    assert counts[0] > 0 and counts[1] <= counts[0], counts  # old: one draw and one fit more per size


def test_steps_to_loss_and_convergence():
    losses = np.array([5.0, 3.0, 2.0, 1.5, 1.2])
    assert ex.steps_to_loss(losses, 2.0) == 2
    assert ex.steps_to_loss(losses, 1.0) is None
    assert ex.steps_to_loss(losses, 9.0) == 0
    trace = np.array([5.0, 1.0, 3.0, 2.0 + 1e-9, 2.0, 2.0])
    assert ex.steps_to_converge(trace) == 3
    assert ex.steps_to_converge(np.full(4, 2.0)) == 0


def test_heavy_tails_and_correlation_keep_noise():
    base = ex.make_problem(ex.SyntheticConfig(n=300, d=3))
    hard = ex.make_problem(ex.SyntheticConfig(n=300, d=3, tails=3.0, correlation=0.9))
    phi = ex.single_index_model().phi
    theta = jnp.asarray(base.info["theta_true"])
    noise = lambda p: np.asarray(p.ys - phi(p.xs @ theta))
    np.testing.assert_allclose(noise(hard), noise(base), atol=1e-12)
    assert np.abs(np.asarray(hard.xs)).max() > np.abs(np.asarray(base.xs)).max()


def test_classification_study():
    config = ex.DigitsConfig(
        classes=(0, 1),
        components=6,
        hidden=3,
        sizes=(30,),
        repeats=2,
        num_steps=30,
        methods=("uniform", "nonlinear_norm"),
        timing_size=None,
    )
    result = ex.run_study(jax.random.key(0), config)
    s = result.summary
    assert s["p"] == 6 * 3 + 3 + 3 + 1 and s["info"]["k"] == 1
    assert 0.0 <= s["full"]["test_accuracy"] <= 1.0
    for method in config.methods:
        record = s["methods"][method]["results"][0]
        assert 0.0 <= record["test_accuracy"]["median"] <= 1.0
        assert np.all(np.isfinite(result.accuracies[method]))
    json.dumps(s, allow_nan=False)


def test_a_diverged_fit_has_no_test_accuracy(monkeypatch):
    """A diverged sample fit (``--lr 0.3`` without the ball on digits) was given the accuracy of its NaN
    model, whose argmax is class 0: the class's share (0.087) reported as a fit's accuracy, with
    ``diverged: 0``. Its accuracy is now NaN, counted as diverged and as the worst value."""
    from nlis_jax.experiments import runner

    full_losses = runner.full_losses

    def second_repeat_diverges(problem, params):
        losses, seconds = full_losses(problem, params)
        losses = np.array(losses, dtype=np.float64)
        losses[1] = np.nan
        return losses, seconds

    monkeypatch.setattr(runner, "full_losses", second_repeat_diverges)
    config = ex.DigitsConfig(
        classes=(0, 1), components=6, hidden=3, sizes=(30,), repeats=3, num_steps=30,
        methods=("uniform",), timing_size=None,
    )  # fmt: skip
    result = ex.run_study(jax.random.key(0), config)
    acc = result.accuracies["uniform"][0]
    assert np.isnan(acc[1]) and np.all(np.isfinite(acc[[0, 2]]))
    record = result.summary["methods"]["uniform"]["results"][0]
    assert record["ratio"]["diverged"] == 1 and record["test_accuracy"]["diverged"] == 1
    assert record["test_accuracy"]["min"] is None and record["test_accuracy"]["max"] == max(acc[[0, 2]])
    assert record["test_accuracy"]["median"] == min(acc[[0, 2]])  # the diverged fit ranks last


def test_plots(tiny, tmp_path):
    from nlis_jax.experiments.plots import plot_study

    _, result = tiny
    paths = plot_study(result.summary, tmp_path)
    assert [p.name for p in paths] == ["ratio.png", "excess.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plots_of_diverged_or_underfitted_grids(tiny, tmp_path, monkeypatch):
    """Every fit diverged (all quantiles None): a log y axis of nothing raised at savefig, after
    results.json, so the table never printed (exit 1). No median above L(θ*): excess.png was blank with
    x ticks 1–10. Both figures are now written, with a note, over the sizes' range."""
    import copy

    from nlis_jax.experiments import plots
    from nlis_jax.experiments.plots import plot_study

    _, result = tiny
    summary = copy.deepcopy(result.summary)
    for m in summary["methods"].values():
        for r in m["results"]:
            r["ratio"] = {key: None for key in r["ratio"]}
    paths = plot_study(summary, tmp_path / "diverged")
    assert all(p.stat().st_size > 1000 for p in paths)
    for m in summary["methods"].values():
        for r in m["results"]:
            r["ratio"] = {key: 0.9 for key in r["ratio"]}
    made = []
    figure = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda *a, **k: made.append(figure(*a, **k)) or made[-1])
    plot_study(summary, tmp_path / "below")
    sizes = [r["size"] for m in summary["methods"].values() for r in m["results"]]
    lo, hi = made[1].axes[0].get_xlim()  # excess.png
    assert lo <= min(sizes) and hi >= max(sizes) and hi / lo < 10 * max(sizes) / min(sizes)


def test_tail_change_sees_a_full_fit_that_oscillates():
    """A step size too large (``--lr 3``) made the full-data fit alternate between two losses 4× above the
    optimum, above its starting loss; the check compared the two ends of the last tenth, in the same
    phase (1.2e-11), and the CLI printed ratios below 1 as converged. It now takes the largest change."""
    cycle = np.tile([33365.1, 38274.7], 100)
    assert ex.study.tail_change(cycle) == pytest.approx(abs(33365.1 - 38274.7) / 38274.7)
    assert ex.study.tail_change(np.arange(100.0, 0.0, -1.0)) == 9.0  # L_90..L_99 = 10..1 against L_T = 1
    assert ex.study.tail_change(np.arange(8.0, 0.0, -1.0), last=0.5) == 15.0  # under 10 steps: all of it
    smooth = 1 + np.exp(-np.arange(200.0))  # settled: the last tenth moves by e^-180
    assert ex.study.tail_change(smooth) < 1e-70
    config = ex.CaliforniaConfig(data_home=_california_home(), learning_rate=3.0)
    problem = ex.make_problem(config)
    full = ex.fit_full(problem, problem.init(jax.random.key(0)), num_steps=200)
    assert full.loss > full.losses[0]  # worse than where it started: no optimum
    assert full.rel_change > 0.1


# --------------------------------------------------------------------------------------------------
# The trainer reaches the constrained optimum on California Housing


def test_california_full_fit_matches_slsqp():
    """θ* from nlis_jax.fit (projected Nesterov GD, step 1/L̂) against SciPy's SLSQP with the ball."""
    config = ex.CaliforniaConfig(data_home=_california_home(), num_steps=300)
    try:
        problem = ex.make_problem(config)
    except DatasetNotFoundError:  # pragma: no cover - guarded by _california_home
        pytest.skip("California Housing not available")
    assert problem.xs.dtype == jnp.float64 and problem.n == 20640
    full = ex.fit_full(problem, problem.init(jax.random.key(0)), num_steps=config.num_steps)

    X, y = np.asarray(problem.xs), np.asarray(problem.ys)
    phi = ex.single_index_model(config.c1, config.c2).phi
    value_and_grad = jax.jit(jax.value_and_grad(lambda t: jnp.sum((phi(X @ t) - y) ** 2)))

    def fun(t):
        v, g = value_and_grad(jnp.asarray(t))
        return float(v), np.asarray(g)

    radius = config.radius
    ball = {"type": "ineq", "fun": lambda t: radius**2 - t @ t, "jac": lambda t: -2 * t}
    kw = dict(jac=True, method="SLSQP", constraints=[ball], options={"ftol": 1e-15})
    ref = optimize.minimize(fun, np.zeros(X.shape[1]), **kw)
    if not ref.success:  # "Positive directional derivative for linesearch" on an AMD EPYC host (scipy
        # 1.17): SLSQP stopped without its flag; its point is accepted only if it satisfies the KKT
        # conditions of the ball (on the sphere, the gradient antiparallel to θ)
        g, u = fun(ref.x)[1], ref.x / np.linalg.norm(ref.x)
        assert abs(np.linalg.norm(ref.x) - radius) <= 1e-8 * radius, ref.message
        assert g @ u < 0 and np.linalg.norm(g - (g @ u) * u) <= 1e-6 * np.linalg.norm(g), ref.message
    assert abs(full.loss - ref.fun) <= 1e-4 * ref.fun
    assert float(jnp.linalg.norm(full.params)) <= radius * (1 + 1e-12)
    assert full.rel_change < 1e-12
    # The constraint is active: the unconstrained optimum lies outside the ball.
    free = optimize.minimize(fun, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B", options={"gtol": 1e-10})
    assert np.linalg.norm(free.x) > 1.1 * radius and free.fun < full.loss


@pytest.mark.parametrize("sizes", [[67, 135], [30, 100, 1000, 10000]])
def test_study_plots_label_each_sample_size(sizes):
    """On a span of 8× or less (what NLIS_SMALL's two sizes give) the x axis was labelled 60, 70, ..., 100
    and the point at s = 135 had no label; now each size is a labelled tick, and nothing else is."""
    import matplotlib.pyplot as plt

    from nlis_jax.experiments import plots

    fig, ax = plt.subplots()
    try:
        ax.set_xscale("log")
        ax.plot(sizes, np.ones(len(sizes)))
        plots._plain_x(ax, sizes)
        fig.canvas.draw()
        lo, hi = ax.get_xlim()
        shown = [
            t.get_text()
            for t in ax.get_xticklabels(which="both")
            if t.get_text() and lo <= t.get_position()[0] <= hi
        ]
    finally:
        plt.close(fig)
    assert shown == [f"{s:g}" for s in sizes]


# --------------------------------------------------------------------------------------------------
# Thirty-fifth session: the wall-time comparison and the tables with diverged fits


def test_a_diverged_trace_never_converges():
    """A NaN final value compared as 'within rtol' of every step: 0 steps to convergence, so a diverged
    timed fit was charged almost nothing 'to convergence'."""
    assert ex.steps_to_converge(np.array([5.0, 3.0, np.nan, np.nan])) == 4
    assert ex.steps_to_converge(np.array([5.0, np.inf])) == 2


def _timed_row(total, ratio, full_time):
    return {
        "total_s": total,
        "total_converged_s": total,
        "ratio": ratio,
        "diverged": ratio is None,
        "full_time_to_loss_s": full_time,
    }


def test_wall_time_medians_rank_a_diverged_run_worst_over_the_same_runs():
    """A diverged run made the median ratio NaN (a bare NaN in results.json) and its full-data time was
    left out of one median but its own time kept in the other (a speed-up of mixed run sets)."""
    from nlis_jax.experiments import wall_time

    rows = [_timed_row(1.0, 1.2, 0.5), _timed_row(3.0, None, 0.0), _timed_row(2.0, 1.3, 0.7)]
    m = wall_time._medians(rows)
    assert m["ratio"] == 1.3 and m["diverged"] == 1  # ranked +inf: the median is the worse finite run
    assert m["full_time_to_loss_s"] == 0.5 and m["total_s"] == 2.0 and m["speedup"] == 0.25
    json.dumps(m, allow_nan=False)  # strict JSON
    m = wall_time._medians(
        [_timed_row(1.0, None, 0.0), _timed_row(1.0, None, 0.0), _timed_row(1.0, 1.1, 0.4)]
    )
    assert m["ratio"] is None and m["full_time_to_loss_s"] == 0.0 and m["speedup"] == 0.0
    not_reached = [_timed_row(1.0, 0.9, None), _timed_row(1.0, 0.95, None), _timed_row(2.0, 1.01, 0.3)]
    m = wall_time._medians(not_reached)  # a loss below every full-data iterate ranks as the longest time
    assert m["full_time_to_loss_s"] is None and m["speedup"] is None and m["ratio"] == 0.95


def test_wall_time_keys_do_not_depend_on_the_other_schemes(monkeypatch):
    """The keys were split by position among the schemes timed: uniform's samples changed when
    pilot_leverage was timed too (run_study keys every scheme by its name)."""
    from types import SimpleNamespace

    from nlis_jax.experiments import wall_time

    def keys_of(methods):
        seen = {}

        def record(keys, method, *args):
            seen.setdefault(method, []).append([np.asarray(jax.random.key_data(k)) for k in keys])
            return _timed_row(1.0, 1.0, 0.1)

        monkeypatch.setattr(wall_time, "_one_run", record)
        full = ex.FullFit(None, 1.0, np.ones(3), 1.0, 0.0, 3, 0.0)
        problem, config = SimpleNamespace(n=100), SimpleNamespace(pilot_size=10)
        wall_time.compare_wall_time(
            jax.random.key(3), problem, full, None, size=10, config=config, methods=methods, runs=2
        )
        return seen

    alone, both = keys_of(("uniform",)), keys_of(("pilot_leverage", "uniform"))
    np.testing.assert_array_equal(np.asarray(alone["uniform"]), np.asarray(both["uniform"]))
    assert not np.array_equal(np.asarray(both["uniform"]), np.asarray(both["pilot_leverage"]))
    with pytest.raises(ValueError, match="'nonlinear_leverage' is not one of"):
        keys_of(("nonlinear_leverage",))


def test_full_fit_step_cost_leaves_out_the_fixed_cost_of_a_call(monkeypatch):
    """time_s / num_steps charged nlis_jax.fit's fixed cost per call (checks, set-up: 6–8 ms on 2
    cores) to every step, overstating full-data training time, hence the speed-ups of sampling. A fake
    clock makes each call cost 8 ms + 1 ms per step: the marginal step cost is 1 ms exactly."""
    from types import SimpleNamespace

    from nlis_jax.experiments import study

    clock = [0.0]
    real_fit = nj.fit

    def fit(*args, num_steps, **kwargs):
        clock[0] += 8e-3 + 1e-3 * num_steps
        return real_fit(*args, num_steps=num_steps, **kwargs)

    monkeypatch.setattr(study.nj, "fit", fit)
    monkeypatch.setattr(study, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    problem = ex.make_problem(TINY)
    full = ex.fit_full(problem, problem.init(jax.random.key(0)), num_steps=40)
    assert full.time_s == pytest.approx(8e-3 + 40e-3) and full.step_s == pytest.approx(1e-3)
    assert full.seconds_per_step == full.step_s
    one = ex.fit_full(problem, problem.init(jax.random.key(0)), num_steps=1)  # one segment: no estimate
    assert one.step_s is None and one.seconds_per_step == pytest.approx(9e-3)


def test_experiment_keys_are_checked():
    """A float array seeded make_single_index as a key (two different arrays, the same data); draw took a
    single raw key as two keys; the entry points gave jax's "invalid PRNG key data" for an int."""
    from nlis_jax.experiments import datasets, nets, study

    with pytest.raises(TypeError, match="seed_or_key must be a PRNG key"):
        datasets.make_single_index(jnp.array([0.2, 3.7]), n=8, d=2)
    with pytest.raises(TypeError, match="keys must be a batch of R PRNG keys"):
        study.draw(jax.random.PRNGKey(0), jnp.full(4, 0.25), 2)
    with pytest.raises(TypeError, match="keys must be a batch of R PRNG keys"):
        study.draw(jax.random.key(0), jnp.full(4, 0.25), 2)
    with pytest.raises(TypeError, match="key must be a PRNG key, e.g. jax.random.key"):
        nets.mlp_init(3, (2, 3, 1))
    assert datasets.make_single_index(jnp.asarray(3), n=8, d=2) is not None  # an int seed as a jax scalar
    (idx, w), _ = study.draw(jax.random.split(jax.random.key(0), 3), jnp.full(4, 0.25), 2)
    assert idx.shape == w.shape == (3, 2)
