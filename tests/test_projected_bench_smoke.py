"""benchmarks/bench_projected.py runs end to end at a tiny size: its checks pass and its record is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_projected(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    path = BENCH_DIR / "bench_projected.py"
    spec = importlib.util.spec_from_file_location("benchmarks_bench_projected", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
