"""benchmarks/bench_projected.py runs end to end at a tiny size: its checks pass and its record is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark


def test_bench_projected(tmp_path, monkeypatch):
    module = load_benchmark("bench_projected", monkeypatch)
    out = tmp_path / "bench_projected.json"
    args = ["--n", "120", "--d", "6", "--widths", "2", "--dim", "8"]
    record = module.main([*args, "--reps", "1", "--quiet", "--out", str(out)])
    assert json.loads(out.read_text())["bench"] == "bench_projected"
    assert record["ok"], record["checks"]
    (point,) = record["points"]
    assert point["p"] == (6 + 2) * 2 + 1
    assert set(point["cases"]) == {"sparse_s1", "gaussian", "outer_product", "khatri_rao", "exact"}
    assert record["checks"]["outer_product_vs_explicit_max_rel"]["ok"]
    assert record["checks"]["khatri_rao_vs_explicit_max_rel"]["ok"]
    assert point["sparse_over_khatri_rao"]["cpu"] > 0
    for case in point["cases"].values():
        assert case["timing"]["median_s"] > 0 and case["rss_peak_bytes"] >= case["rss_before_bytes"] > 0
    assert 0 <= point["cases"]["sparse_s1"]["tv_vs_exact"] <= 1


SKLEARN_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scikit_learn_data"
CALIFORNIA = SKLEARN_DATA / "cal_housing_py3.pkz"


@pytest.mark.skipif(not CALIFORNIA.exists(), reason=f"California Housing cache {CALIFORNIA} is missing")
def test_study_projected_warm(tmp_path, monkeypatch):
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
