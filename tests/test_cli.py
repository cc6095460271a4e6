"""End-to-end tests of the ``nlis-jax`` command line at tiny size."""

from __future__ import annotations

import json
import re
import sys
import types

import jax
import numpy as np
import pytest

from nlis_jax import cli

#: The same study as tests/test_experiments.py's TINY config (shared compiled kernels).
TINY = [
    "run",
    "--dataset",
    "synthetic",
    "--n",
    "200",
    "--d",
    "4",
    "--sizes",
    "20,40",
    "--repeats",
    "2",
    "--steps",
    "50",
    "--pilot-size",
    "20",
    "--timing-size",
    "20",
]


def test_run_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "res"
    assert cli.main(TINY + ["--out", str(out), "--seed", "3"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["dataset"] == "synthetic" and summary["n"] == 200 and summary["p"] == 4
    assert summary["seed"] == 3 and summary["config"]["repeats"] == 2
    # x64 changes the sampler's draws (JAX_ENABLE_X64=1 gave other samples, the record did not say so)
    assert summary["x64"] is True and summary["devices"] == jax.device_count() and summary["backend"] == "cpu"
    assert summary["full"]["loss"] > 0 and summary["full"]["time_s"] > 0
    for method in ("uniform", "linear_leverage", "nonlinear_leverage", "nonlinear_norm"):
        records = summary["methods"][method]["results"]
        assert [r["size"] for r in records] == [20, 40]
        assert {"median", "q25", "q75"} <= set(records[0]["ratio"])
        assert records[0]["train_s"] > 0 and "score_s" in records[0]
    assert (out / "ratio.png").stat().st_size > 1000
    printed = capsys.readouterr()
    assert "L(θ_S)/L(θ*)" in printed.out and "nonlinear_leverage" in printed.out
    assert summary["full"]["rel_change"] < cli.FULL_FIT_RTOL and "warning" not in printed.err


def test_run_options_reach_the_config(tmp_path):
    args = cli.build_parser().parse_args(
        [
            "run",
            "--dataset",
            "synthetic",
            "--radius",
            "none",
            "--tails",
            "3",
            "--sizes",
            "0.01,100",
            "--methods",
            "uniform,nonlinear_leverage",
            "--timing-size",
            "none",
            "--lr",
            "0.5",
        ]
    )
    config = cli.make_config(args)
    assert config.radius is None and config.tails == 3.0 and config.timing_size is None
    assert config.sizes == (0.01, 100) and config.methods == ("uniform", "nonlinear_leverage")
    assert config.learning_rate == 0.5
    args = cli.build_parser().parse_args(
        ["run", "--dataset", "digits", "--components", "none", "--classes", "3,8"]
    )
    config = cli.make_config(args)
    assert config.components is None and config.classes == (3, 8)
    args = cli.build_parser().parse_args(["run", "--dataset", "fashion-mnist", "--classes", "all"])
    assert cli.make_config(args).classes is None  # all ten classes (the default is a binary pair)


def test_help_names_every_fashion_mnist_folder_and_the_small_rows(capsys, monkeypatch, tmp_path):
    """The help listed four of the six folders searched for Fashion-MNIST (not the two under
    $SCIKIT_LEARN_DATA that docs/outliers.md relies on), and promised NLIS_SMALL=1 runs "at most 2,000
    rows" while California keeps all 20,640. Every environment-derived folder the loader searches is named
    in the help text now."""
    from nlis_jax.experiments import datasets

    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "skl"))
    monkeypatch.setenv("NLIS_FASHION_MNIST", str(tmp_path / "fm"))
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    whys = [why for _, why in datasets.fashion_mnist_search_dirs()]
    assert len(whys) == 5
    for why in whys:
        if why.startswith("$"):
            assert why in text, why
    assert "~/scikit_learn_data/fashion-mnist" in text and str(datasets.FASHION_MNIST_SYSTEM_DIR) in text
    assert "at most 2,000 rows of generated or subsampled data (California keeps its 20,640)" in text


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--dataset",
        "--sizes",
        "--repeats",
        "--seed",
        "--out",
        "--steps",
        "--methods",
        "--radius",
        "--n",
        "--data-home",
        "--download",
        "--timing-size",
        "--pilot-size",
        "--classes",
    ):
        assert option in text, option
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "outliers" in capsys.readouterr().out


def test_missing_data_set_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli.main(["run", "--data-home", str(empty), "--no-download", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "not found" in err and "cal_housing_py3.pkz" in err and "SCIKIT_LEARN_DATA" in err
    assert "--data-home" in err and "--no-download" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_option_for_another_data_set_is_an_error(capsys):
    assert cli.main(["run", "--dataset", "california", "--d", "3"]) == 2
    assert "--d does not apply" in capsys.readouterr().err


def test_bad_option_value_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--sizes", "0.1,abc"])
    assert info.value.code == 2


def test_outliers_not_available(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nlis_jax.experiments.outliers", None)  # as if the module were absent
    assert cli.main(["outliers"]) == 2
    assert "not available" in capsys.readouterr().err


def test_outliers_help_lists_the_study_options(capsys):
    pytest.importorskip("nlis_jax.experiments.outliers")
    with pytest.raises(SystemExit) as info:
        cli.main(["outliers", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--seed" in text and "--out" in text and "--flip-fraction" in text


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("--flip-fraction", "0.7", "--flip-fraction: flip_fraction"),
        ("--n", "-5", "n"),
        ("--noise-scale", "-1", "noise"),
        ("--lr", "-1", "--lr: learning_rate"),
        ("--lr", "inf", "--lr: learning_rate"),
        # named fields or Python's "invalid literal for int()" before the twenty-ninth session
        ("--classes", "a,b", "--classes: not a list of integers: 'a,b'"),
        ("--hidden", "a", "--hidden: not a list of integers"),
        ("--batch-size", "100000", "--batch-size: batch_size must be at most n = 12000"),
        ("--pca", "100000", "--pca: components = 100000 exceeds"),
    ],
)
def test_outliers_bad_option_value_is_a_usage_error(option, value, match, tmp_path, capsys):
    """They raised from the study's config with a traceback (exit 1); now exit 2, naming the value."""
    pytest.importorskip("nlis_jax.experiments.outliers")
    assert cli.main(["outliers", option, value, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    # (after the study's progress line when the data decide)
    assert err.splitlines()[-1].startswith("nlis-jax outliers: error:") and match in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_outliers_delegates_to_module(monkeypatch, tmp_path):
    seen = {}
    fake = types.ModuleType("nlis_jax.experiments.outliers")
    fake.run = lambda args: seen.setdefault("args", args) and 0
    fake.add_arguments = lambda parser: parser.add_argument("--top", type=int)
    monkeypatch.setitem(sys.modules, "nlis_jax.experiments.outliers", fake)
    assert cli.main(["outliers", "--seed", "5", "--top", "10", "--out", str(tmp_path / "o")]) == 0
    assert seen["args"].seed == 5 and seen["args"].top == 10 and seen["args"].extra == []
    with pytest.raises(SystemExit) as info:  # unknown options are usage errors (no silent extras)
        cli.main(["outliers", "--flip-fration", "0.3"])
    assert info.value.code == 2


# --------------------------------------------------------------------------------------------------
# Fifteenth session's review: each failed before


def test_a_diverging_fit_is_a_message_and_exit_2(tmp_path, monkeypatch, capsys):
    """A full-data fit that diverged (too large --lr) ended in a NonFiniteLossError traceback, exit 1."""
    import nlis_jax as nj
    from nlis_jax.experiments import runner

    def diverged(*args, **kwargs):
        raise nj.NonFiniteLossError(
            "fit stopped: the loss is inf at step 97; lower the learning rate", state=None, step=97
        )

    monkeypatch.setattr(runner, "fit_full", diverged)
    assert cli.main(TINY + ["--out", str(tmp_path / "res"), "--no-plots"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "nlis-jax run: error: fit stopped: the loss is inf at step 97" in err and "Traceback" not in err


def test_ctrl_c_in_the_wall_time_comparison_keeps_the_grid(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the grid (plots, wall-time comparison) wrote nothing; now the finished cells."""
    from nlis_jax.experiments import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "compare_wall_time", interrupted)
    out = tmp_path / "res"
    assert cli.main(TINY + ["--out", str(out), "--no-plots"]) == cli.EXIT_INTERRUPTED
    summary = json.loads((out / "results.json").read_text())
    assert summary["partial"] is True and summary["timing"] is None
    assert [r["size"] for r in summary["methods"]["uniform"]["results"]] == [20, 40]


def test_methods_limit_the_wall_time_comparison(tmp_path, monkeypatch):
    from nlis_jax.experiments import runner

    seen = {}

    def record(*args, methods, **kwargs):
        seen["methods"] = methods
        return None

    monkeypatch.setattr(runner, "compare_wall_time", record)
    args = TINY + ["--methods", "uniform,nonlinear_leverage", "--no-plots", "--out", str(tmp_path / "r")]
    assert cli.main(args) == 0
    assert seen["methods"] == ("uniform",)  # was every timed scheme, whatever --methods said


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--num-nodes", "3"], "--num-nodes does not apply"),  # was accepted and ignored
        (["--pilot-size", "60,500"], "expected one sample size"),  # kept 60 silently
        (["--timing-size", "100,300"], "expected one sample size"),
        # the three sample-size options and a config field failed with the same unnamed message
        (["--sizes", "20,9000000"], "--sizes: sample size 9000000 means 9000000 rows, more than n"),
        (["--pilot-size", "9000000"], "--pilot-size: sample size 9000000"),
        (["--timing-size", "9000000"], "--timing-size: sample size 9000000"),
        (["--lr", "-1"], "--lr: learning_rate must be positive"),
        # checked when the data were made, without the option's name (twenty-ninth session)
        (["--noise=-1"], "--noise: noise must be a finite number >= 0"),
        (["--correlation", "1"], "--correlation: correlation must lie in (-1, 1)"),
        (["--methods", "residual_leverage"], "--methods: methods has unknown name(s) ['residual_leverage']"),
        (["--methods", ","], "argument --methods: name at least one method, got ','"),
    ],
)
def test_run_option_errors(args, match, capsys):
    code = None
    try:
        code = cli.main(["run", "--dataset", "synthetic", *args])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and match in capsys.readouterr().err


def test_a_data_set_too_big_for_memory_is_a_usage_error(capsys, monkeypatch, tmp_path):
    """--dataset synthetic --n 100000000000 printed numpy's MemoryError traceback (exit 1). The allocation
    is simulated: with memory overcommit a real one may succeed, and filling it would not."""
    from nlis_jax import experiments

    def too_big(config):
        raise MemoryError("Unable to allocate 5.82 TiB for an array with shape (100000000000, 8)")

    monkeypatch.setattr(experiments, "make_problem", too_big)
    code = cli.main(["run", "--dataset", "synthetic", "--n", "100000000000", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "the synthetic data set does not fit in memory; use a smaller --n or --d" in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_out_that_cannot_be_written_is_refused_before_any_work(capsys):
    """/proc accepts no new files, though os.access says yes to root: the study ran, then a traceback."""
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--out", "/proc/nlis-no-such-folder"])
    assert info.value.code == 2 and "cannot write in /proc" in capsys.readouterr().err


def test_full_data_steps_to_a_loss_count_the_final_iterate():
    """A sample fit whose loss the full-data run reaches only after its last update was 'not reached'."""
    import numpy as np

    from nlis_jax.experiments.study import FullFit
    from nlis_jax.experiments.wall_time import full_steps_to_loss

    full = FullFit(None, 1.0, np.array([10.0, 5.0]), 1.0, 0.0, 2, 0.0)
    assert full_steps_to_loss(full, 1.5) == 2 and full_steps_to_loss(full, 7.0) == 1
    assert full_steps_to_loss(full, 0.5) is None


def test_active_n_past_the_data_set_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """A traceback with exit 1 before (and a missing data set exited 1)."""
    monkeypatch.setenv("NLIS_SMALL", "1")
    assert cli.main(["active", "--n", "30000", "--out", str(tmp_path / "a")]) == 2
    assert "30000" in capsys.readouterr().err


def test_outliers_n_past_the_chosen_classes_is_a_usage_error(tmp_path, capsys):
    """--n 20000 of two classes (12,000 images) ran on 12,000 and recorded n = 20000."""
    from nlis_jax.experiments import datasets

    pytest.importorskip("nlis_jax.experiments.outliers")
    try:
        datasets.load_fashion_mnist(flatten=False, classes=(7, 9), limit=10, download_if_missing=False)
    except datasets.DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not in the data folder (CI has it: ../shared/data)")
    assert cli.main(["outliers", "--n", "20000", "--out", str(tmp_path / "o")]) == 2
    assert "n = 20000 is more than the 12000 images" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# User-journey review: each failed before


def test_overwrite_names_an_earlier_runs_figures(tmp_path, capsys):
    """``--overwrite`` into a digits run's folder left its ``accuracy.png`` beside a regression's results,
    without a word; the run now names the figures it did not write."""
    out = tmp_path / "res"
    out.mkdir()
    (out / "accuracy.png").write_bytes(b"an earlier run's figure")
    assert cli.main(TINY + ["--out", str(out), "--overwrite", "--timing-size", "none"]) == 0
    err = capsys.readouterr().err
    assert f"nlis-jax run: note: {out} also holds accuracy.png from an earlier run." in err
    assert (out / "ratio.png").stat().st_size > 1000 and "ratio.png" not in err


def test_an_unconverged_full_fit_is_a_warning(tmp_path, monkeypatch, capsys):
    """A full-data fit far from convergence (results.json: full.rel_change 1.7) printed ratios below 1
    with no word; now a warning on stderr, and the table still (exit 0)."""
    from nlis_jax.experiments import runner

    fit_full = runner.fit_full
    monkeypatch.setattr(runner, "fit_full", lambda *a, **k: fit_full(*a, **k)._replace(rel_change=1.7))
    args = TINY + ["--out", str(tmp_path / "res"), "--no-plots", "--timing-size", "none"]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert "L(θ_S)/L(θ*)" in printed.out
    assert (
        "nlis-jax run: warning: the full-data fit has not converged (its loss moved by up to 1.7"
        in printed.err
    )
    assert "raise --full-steps or lower --lr" in printed.err


def test_unconverged_sample_fits_are_a_warning(tmp_path, capsys):
    """results.json recorded each cell's max_rel_change, but nothing looked at it: sample fits stopped far
    from their optimum printed ratios that mix optimisation error into the sampling error, with no word.
    Two steps per sample fit (the full fit keeps its 50): a warning naming the cells, and the table."""
    args = TINY + ["--out", str(tmp_path / "res"), "--no-plots", "--timing-size", "none"]
    args += ["--steps", "2", "--full-steps", "50"]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert "L(θ_S)/L(θ*)" in printed.out
    match = re.search(
        r"warning: the sample fits of (\d+) of (\d+) cells \(scheme, size\) have not converged", printed.err
    )
    assert match and 0 < int(match[1]) <= int(match[2]), printed.err
    assert "raise --steps or lower --lr" in printed.err
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    changes = [r["max_rel_change"] for m in summary["methods"].values() for r in m["results"]]
    assert int(match[1]) == sum(c > 1e-3 for c in changes)  # the cells the record shows unconverged
    assert cli.main(TINY + ["--out", str(tmp_path / "ok"), "--no-plots", "--timing-size", "none"]) == 0
    assert "sample fits" not in capsys.readouterr().err  # 50 steps: converged, no warning


def test_one_diverged_repeat_does_not_hide_a_cells_unconverged_repeats():
    """A cell's max_rel_change was the max over its repeats: one diverged repeat (NaN change) made it
    NaN, recorded as None, which the warning skips. Now the largest change of the repeats that did not
    diverge (the diverged one is counted in the ratios, as +inf)."""
    from nlis_jax.experiments.runner import _finite_max

    assert _finite_max([np.nan, 0.5, 1e-9]) == 0.5 and _finite_max([np.nan, np.inf]) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--bogus"], "unrecognized arguments: --bogus"), (["--out", "FILE"], "exists and is not a folder")],
)
def test_run_usage_errors_show_the_run_usage(args, message, tmp_path, capsys):
    """They printed the top-level usage with 'nlis-jax: error:'."""
    (tmp_path / "file").touch()
    args = [str(tmp_path / "file") if a == "FILE" else a for a in args]
    with pytest.raises(SystemExit) as info:
        cli.main(["run", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert (
        err.startswith("usage: nlis-jax run ")
        and last.startswith("nlis-jax run: error: ")
        and message in last
    )


def test_a_closed_stdout_is_not_a_traceback(tmp_path):
    """`nlis-jax ... | head` ended in a BrokenPipeError traceback once head exited (the results were
    written already): now exit code 1, nothing on stderr, the scores written. stdout here is a pipe whose
    reader is closed, so the summary line `score` prints fails with EPIPE."""
    import os
    import subprocess
    import sys

    import numpy as np

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((50, 3)))
    read, write = os.pipe()
    os.close(read)  # every write to stdout fails with EPIPE
    code = "import sys; from nlis_jax.cli import main; sys.exit(main())"
    argv = ["score", "--x", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s.npy")]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=300
        )
    finally:
        os.close(write)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "BrokenPipe" not in proc.stderr and np.load(tmp_path / "s.npy").shape == (50,)


#: The jax settings a command may change: float64 studies turn on x64, ``run`` the compilation cache.
JAX_SETTINGS = (
    "jax_enable_x64",
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
    "jax_compilation_cache_max_size",
)


def test_compilation_cache_settings_that_cannot_hold(tmp_path, monkeypatch, capsys):
    """Both cache options were accepted together (the cache silently off); ``$NLIS_JAX_COMPILATION_CACHE``
    naming a file turned the cache off without a word, where ``--compilation-cache`` said so."""
    argv = TINY + ["--no-plots", "--no-progress", "--timing-size", "none"]
    both = ["--compilation-cache", str(tmp_path / "c"), "--no-compilation-cache"]
    assert cli.main(argv + both + ["--out", str(tmp_path / "a")]) == cli.EXIT_USAGE
    assert "--compilation-cache and --no-compilation-cache contradict" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    monkeypatch.setenv(cli.CACHE_ENV, str(a_file))
    assert cli.main(argv + ["--out", str(tmp_path / "b")]) == 0
    assert f"cannot write {cli.CACHE_ENV}={a_file}; compiling afresh" in capsys.readouterr().err


def test_no_compilation_cache_also_bypasses_the_callers_cache(tmp_path, capsys):
    """``--no-compilation-cache`` ("compile every program afresh and keep none on disk") kept writing to a
    persistent cache that the caller had configured before calling ``cli.main`` in-process; the
    caller's configuration is back afterwards, and its own programs go to its cache again."""
    import os

    import jax
    import jax.numpy as jnp
    from jax._src import compilation_cache

    def files(folder):
        return sum(len(names) for _, _, names in os.walk(folder))

    caller = tmp_path / "caller_cache"
    before = {name: getattr(jax.config, name) for name in JAX_SETTINGS}
    try:
        jax.config.update("jax_compilation_cache_dir", str(caller))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        compilation_cache.reset_cache()
        configured = {name: getattr(jax.config, name) for name in JAX_SETTINGS}
        argv = ["run", "--dataset", "synthetic", "--n", "89", "--d", "4", "--sizes", "10", "--repeats", "1"]
        argv += ["--steps", "5", "--pilot-size", "10", "--timing-size", "none", "--methods", "uniform"]
        argv += ["--no-plots", "--no-progress", "--out", str(tmp_path / "out"), "--no-compilation-cache"]
        assert cli.main(argv) == 0
        capsys.readouterr()
        assert files(caller) == 0  # nothing of the run on disk
        assert {name: getattr(jax.config, name) for name in JAX_SETTINGS} == configured
        jax.jit(lambda v: jnp.sin(v) * 5 - 3)(jnp.ones(11)).block_until_ready()  # the caller's own program
        assert files(caller) > 0
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def test_main_in_process_restores_jax_settings_and_honours_later_cache_options(tmp_path, capsys, monkeypatch):
    """``cli.main`` called in a notebook or test left x64 on and its compilation cache configured for the
    rest of the process: the caller's own programs went into it, and a later ``--no-compilation-cache``
    (or another ``--compilation-cache DIR``) in the same process still wrote there. Each call compiles
    new shapes (n = 97 and a d of its own), so that each writes to the cache it was given, if any."""
    import os

    import jax
    import jax.numpy as jnp
    from jax._src import compilation_cache

    from nlis_jax import experiments

    def files(folder):
        return sum(len(names) for _, _, names in os.walk(folder))

    def run(name, d, *cache):
        argv = [
            "run",
            "--dataset",
            "synthetic",
            "--n",
            "97",
            "--d",
            str(d),
            "--sizes",
            "10",
            "--repeats",
            "1",
        ]
        argv += ["--steps", "5", "--pilot-size", "10", "--timing-size", "none", "--methods", "uniform"]
        argv += ["--no-plots", "--no-progress", "--out", str(tmp_path / name), *cache]
        assert cli.main(argv) == 0
        capsys.readouterr()

    first, other = tmp_path / "cache_a", tmp_path / "cache_b"
    before = {name: getattr(jax.config, name) for name in JAX_SETTINGS}
    jax.config.update("jax_enable_x64", False)  # as in a user's session (the suite runs with x64 on)
    try:
        expected = dict(before, jax_enable_x64=False)
        run("a", 3, "--compilation-cache", str(first))  # float64 study, cache on
        assert {name: getattr(jax.config, name) for name in JAX_SETTINGS} == expected
        written = files(first)
        assert written > 0
        jax.jit(lambda v: jnp.cos(v) * 7 - 2)(jnp.ones(9)).block_until_ready()  # the caller's own program
        assert jnp.ones(3).dtype == jnp.float32 and files(first) == written
        run("b", 5, "--no-compilation-cache")
        assert files(first) == written  # compiled afresh, written nowhere
        run("c", 6, "--compilation-cache", str(other))
        assert files(other) > 0 and files(first) == written
        assert {name: getattr(jax.config, name) for name in JAX_SETTINGS} == expected

        def broken(*args, **kwargs):
            raise RuntimeError("simulated failure of the study")

        monkeypatch.setattr(experiments, "run_study", broken)
        with pytest.raises(RuntimeError, match="simulated failure"):  # an error that main does not catch
            run("d", 6, "--compilation-cache", str(first))
        assert {name: getattr(jax.config, name) for name in JAX_SETTINGS} == expected
    finally:  # the rest of the suite runs as before, also when this test fails
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


# --------------------------------------------------------------------------------------------------
# Thirty-fifth session


def test_ctrl_c_in_the_wall_time_comparison_waits_for_the_plots(tmp_path, monkeypatch, capsys):
    """The grid's plots, drawn in a thread beside the wall-time comparison, were left half done (on the
    console, os._exit then killed the thread: results.json alone, or ratio.png without excess.png)."""
    from nlis_jax.experiments import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "compare_wall_time", interrupted)
    out = tmp_path / "res"
    assert cli.main(TINY + ["--out", str(out)]) == cli.EXIT_INTERRUPTED
    assert (out / "ratio.png").stat().st_size > 0 and (out / "excess.png").stat().st_size > 0
    assert str(out / "excess.png") in capsys.readouterr().err


def test_a_diverged_accuracy_quantile_reads_minus_inf():
    """A quantile taken by a diverged fit (None) printed as 'inf' in the accuracy table too, above the
    median it lies below."""
    from nlis_jax.experiments import report

    q = {"median": 0.5, "q25": None, "q75": 0.55}
    assert report._cell(q, 26, "-inf").split() == ["0.5000", "[-inf,", "0.550]"]
    assert report._cell(q, 26).split() == ["0.5000", "[inf,", "0.550]"]
