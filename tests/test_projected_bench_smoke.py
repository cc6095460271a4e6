"""benchmarks/bench_projected.py runs end to end at a tiny size: its checks pass and its record is written."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import pytest
from helpers import load_benchmark

import nlis_jax as nj
from nlis_jax.experiments import datasets


def test_bench_projected(tmp_path, monkeypatch):
    module = load_benchmark("bench_projected", monkeypatch)
    out = tmp_path / "bench_projected.json"
    # dim = 2(p + 1) = 36: the sparse hashing is injective (Y = F̃ with signed, permuted columns) and the
    # oversampled Gaussian / Khatri–Rao embeddings keep the rank, well conditioned, so the timed float32
    # scores equal the exact float32 ones to rounding (measured TV 1e-6 sparse, 3e-5 Gaussian and
    # Khatri–Rao; at dim = p + 1 the square Khatri–Rao Ω was ill-conditioned enough in float32 for TV 0.03)
    args = ["--n", "120", "--d", "6", "--widths", "2", "--dim", "36"]
    record = module.main([*args, "--reps", "1", "--quiet", "--out", str(out)])
    assert json.loads(out.read_text())["bench"] == "bench_projected"
    assert record["ok"], record["checks"]
    assert all(entry["ok"] for entry in record["checks"].values())
    for name in ("outer_product_vs_explicit", "khatri_rao_vs_explicit", "sparse_s1_dim20_scores_vs_explicit"):
        assert record["checks"][f"{name}_max_rel"]["ok"]
    colliding = record["checks"]["sparse_s2_dim20_scores_vs_explicit_max_rel"]
    assert colliding["max_bucket_load"] >= 2 and colliding["rank"] == 20  # buckets collide, rank kept
    (point,) = record["points"]
    assert point["p"] == (6 + 2) * 2 + 1
    # every timed configuration of the library checked before its timing, here on the timed problem itself
    for name in ("sparse_s1", "gaussian", "khatri_rao", "exact"):
        assert record["checks"][f"h2_{name}_tv_vs_float64"]["problem"] == "timed"
    assert set(point["cases"]) == {"sparse_s1", "gaussian", "outer_product", "khatri_rao", "exact"}
    assert point["sparse_over_khatri_rao"]["cpu"] > 0
    for case in point["cases"].values():
        timing = case["timing"]
        assert timing["median_s"] > 0 and timing["compile_s"] > 0 and case["cpu_s_per_run"] > 0
        assert case["rss_before_bytes"] > 0  # RssAnon was read (PeakRss)
    assert point["cases"]["sparse_s1"]["tv_vs_exact"] < 1e-4  # the float32 target, same matrix
    assert (
        point["cases"]["gaussian"]["tv_vs_exact"] < 1e-3
        and point["cases"]["khatri_rao"]["tv_vs_exact"] < 1e-3
    )
    assert math.isfinite(point["cases"]["outer_product"]["tv_vs_exact"])  # a TensorSketch: not exact


@pytest.mark.parametrize(
    "argv, problem",
    [
        # dim = 2(p + 1): the timed problem's projections are exact, its warm-up output is checked
        (["--dim", "36"], "timed"),
        # dim < 2(p + 1): a small problem (n, d, h) of the same family on which they are exact
        (["--dim", "20"], {"n_d_h": [40, 6, 1]}),
    ],
    ids=["timed_problem", "small_problem"],
)
def test_bench_projected_checks_what_it_times(argv, problem, tmp_path, monkeypatch):
    """Scores wrong in float32 only (the timed dtype; a one-row shift) fail the check of the timed
    configuration and nothing is timed (audit s34: timed, tv_vs_exact 0.29 recorded, ok: true). The
    float64 checks before (correctness) are stubbed: test_bench_projected runs them."""
    module = load_benchmark("bench_projected", monkeypatch)
    monkeypatch.setattr(module, "correctness", lambda key: {})
    original = nj.projected_leverage_scores

    def shifted(*args, **kwargs):
        out = original(*args, **kwargs)
        return jnp.roll(out, 1) if out.dtype == jnp.float32 else out

    monkeypatch.setattr(nj, "projected_leverage_scores", shifted)
    out = tmp_path / "bench_projected.json"
    args = ["--n", "120", "--d", "6", "--widths", "2", *argv, "--cases", "sparse"]
    record = module.main([*args, "--reps", "1", "--quiet", "--out", str(out)])
    assert record["ok"] is False and json.loads(out.read_text())["ok"] is False
    entry = record["checks"]["h2_sparse_s1_tv_vs_float64"]
    assert not entry["ok"] and entry["problem"] == problem
    assert all(case["timing"] is None for case in record["points"][0]["cases"].values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cases", "sparse,exat"], "--cases: unknown 'exat'"),
        (["--nodes", "8"], "--cases outer_product is the hand-written sketch of the 16-node rule"),
        (["--reps", "0"], "--reps: must be an integer >= 1, got 0"),
    ],
)
def test_bench_projected_bad_options_are_usage_errors(argv, message, monkeypatch, capsys):
    """Unknown cases, and the 16-node outer-product case with other nodes, are refused when parsed."""
    with pytest.raises(SystemExit) as exc:
        load_benchmark("bench_projected", monkeypatch).parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    if "--nodes" in argv:  # other nodes are fine once outer_product is left out
        args = load_benchmark("bench_projected", monkeypatch).parse_args([*argv, "--cases", "sparse,exact"])
        assert args.nodes == 8 and args.cases == "sparse,exact"


def test_study_projected_warm(tmp_path, monkeypatch):
    # where study_projected's datasets.load_california looks (data_home=None): $SCIKIT_LEARN_DATA (which
    # tests/conftest.py points at ../shared/data/scikit_learn_data when unset), else ~/scikit_learn_data
    california = datasets._sklearn_data_home(None) / "cal_housing_py3.pkz"
    if not california.is_file():
        pytest.skip(f"California Housing cache not found at {california} ($SCIKIT_LEARN_DATA or ~)")
    module = load_benchmark("study_projected", monkeypatch)
    out = tmp_path / "study_projected.json"
    args = ["--n", "120", "--hidden", "2", "--full-steps", "20", "--steps", "10", "--repeats", "2"]
    args += ["--sizes", "40", "--dims", "4", "--quiet", "--out", str(out)]
    record = module.main(args)
    assert json.loads(out.read_text())["bench"] == "study_projected" and record["ok"]
    assert record["problem"]["p"] == 8 * 2 + 2 + 2 * 1 + 1  # 8–2–1 MLP: weights and biases
    assert set(record["quality"]) == {"exact", "projected_4", "linear", "uniform"}
    cell = record["quality"]["exact"]["40"]
    assert cell["q25"] <= cell["median"] <= cell["q75"] and len(cell["ratios"]) == 2
    assert cell["vs_refit"]["median"] > 0 and record["noise_floor"]["loss"] > 0
    assert record["scores"]["exact"]["tv_vs_exact"] == 0.0 and record["noise_floor"]["ratio"] > 0
    plotter = load_benchmark("plot_study_projected", monkeypatch)
    png = plotter.main([str(out), "--out", str(tmp_path / "study.png")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_projected_checks_an_ill_conditioned_timed_problem_on_a_small_one(tmp_path, monkeypatch):
    """The timed problem's uniform inputs at d = 3, width 8 have κ = 5.3e6: checked on itself, correct
    float32 scores were 0.012 in total variation from the float64 reference (float32 loses a direction)
    and the run failed with nothing wrong. Above TIMED_KAPPA_MAX the Gaussian small problem is checked."""
    module = load_benchmark("bench_projected", monkeypatch)
    monkeypatch.setattr(module, "correctness", lambda key: {})  # the float64 checks: test_bench_projected
    out = tmp_path / "bench_projected.json"
    args = ["--n", "200", "--d", "3", "--widths", "8", "--dim", "128", "--cases", "sparse"]
    record = module.main([*args, "--reps", "1", "--quiet", "--out", str(out)])
    entry = record["checks"]["h8_sparse_s1_tv_vs_float64"]
    assert record["ok"] and entry["ok"] and entry["problem"] != "timed", entry
    assert entry["condition_number"] <= module.TIMED_KAPPA_MAX
