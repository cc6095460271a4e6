"""Every benchmark script runs end to end at a tiny size: its checks pass and its JSON record is written.

The scripts are not a package; they are loaded from ``benchmarks/`` by path, with that folder on
``sys.path`` for their shared ``_common`` module. ``bench_torch`` needs the benchmark-only extra.
"""

from __future__ import annotations

import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_benchmark
from jax.flatten_util import ravel_pytree

import nlis_jax as nj

TORCH_MISSING = "torch not installed (benchmark-only extra: pip install -e .[bench])"


def run_bench(name: str, args: list[str], tmp_path, monkeypatch, *, reps: int = 1) -> dict:
    out = tmp_path / f"{name}.json"
    record = load_benchmark(name, monkeypatch).main(
        [*args, "--reps", str(reps), "--quiet", "--out", str(out)]
    )
    assert out.exists()
    assert json.loads(out.read_text())["bench"] == name
    failed = {k: v for k, v in record["checks"].items() if not v["ok"]} if "checks" in record else {}
    assert record["ok"], failed
    env = record["environment"]
    assert env["device"]["platform"] and env["versions"]["jax"] and env["machine"]["cpu_count"]
    return record


def sabotage(monkeypatch, name: str, wrong) -> None:
    """``nj.<name>`` returns ``wrong(result, args, kwargs)`` instead of its result (which may be traced)."""
    original = getattr(nj, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return wrong(original(*args, **kwargs), args, kwargs)

    monkeypatch.setattr(nj, name, wrapped)


def run_sabotaged(name: str, args: list[str], tmp_path, monkeypatch, *, module=None) -> dict:
    """``main`` at a tiny size with a library function made wrong: the record says ``ok: False``."""
    out = tmp_path / f"{name}.json"
    module = module or load_benchmark(name, monkeypatch)
    record = module.main([*args, "--reps", "1", "--quiet", "--out", str(out)])
    assert record["ok"] is False and json.loads(out.read_text())["ok"] is False
    return record


def failed(checks: dict) -> set[str]:
    return {name for name, entry in checks.items() if not entry["ok"]}


def test_bench_scores(tmp_path, monkeypatch):
    args = ["--n", "64", "--d", "4", "--svd-reps", "1"]
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")  # read by the record, not by the loaded BLAS
    record = run_bench("bench_scores", args, tmp_path, monkeypatch)
    assert record["checks"]["scores_vs_svd_max_rel"]["ok"]
    assert record["checks"]["eager_scores_vs_svd_max_rel"]["ok"]  # the eager public call, timed too
    assert record["route"] in nj.routes.ROUTES
    assert record["timings"]["floor_numpy"]["floor_s"] > 0
    blas = record["environment"]["blas"]
    assert "OPENBLAS_CORETYPE" in blas and blas["OPENBLAS_THREAD_TIMEOUT"] == "4"


def test_bench_scores_checks_the_eager_call(tmp_path, monkeypatch):
    """The eager public call is timed (ratio_eager): scores wrong there only (a one-row shift; the jitted
    call is traced, left right) fail its check, before anything is timed (audit s34: passed unchecked)."""
    sabotage(
        monkeypatch,
        "leverage_scores",
        lambda o, a, k: o if isinstance(o, jax.core.Tracer) else jnp.roll(o, 1),
    )
    args = ["--n", "64", "--d", "4", "--svd-reps", "1"]
    record = run_sabotaged("bench_scores", args, tmp_path, monkeypatch)
    assert failed(record["checks"]) == {"eager_scores_vs_svd_max_rel"} and "timings" not in record


def test_bench_wide(tmp_path, monkeypatch):
    args = ["--n", "40", "--m", "300", "--rank", "30", "--stream-n", "20", "--stream-d", "4"]
    record = run_bench("bench_wide", [*args, "--stream-hidden", "8"], tmp_path, monkeypatch)
    assert record["rank"] == 30 and record["route"] == "stable"
    assert record["floor_s"] > 0 and record["speedup_vs_thin_svd"] > 0
    streaming = record["streaming"]
    assert streaming["p"] == 49 and streaming["checks"]["streaming_vs_svd_max_rel"]["ok"]
    assert set(streaming["timings"]) == {"streaming_leverage_scores", "streamed_gram_before"}


def test_bench_wide_checks_the_scores(tmp_path, monkeypatch):
    """Scores one row off (jitted and eager) fail the checks before anything is timed."""
    sabotage(monkeypatch, "leverage_scores", lambda o, a, k: o if k.get("return_info") else jnp.roll(o, 1))
    args = ["--n", "40", "--m", "300", "--rank", "30"]
    record = run_sabotaged("bench_wide", args, tmp_path, monkeypatch)
    wrong = {"scores_vs_svd_max_rel", "eager_scores_vs_svd_max_rel"}  # the jitted and the eager call
    assert failed(record["checks"]) == wrong and "timings" not in record


def test_bench_workspace(tmp_path, monkeypatch):
    """Each variant in a process of its own: scores checked, then timed, and the peaks measured."""
    args = ["--d", "3", "--hidden", "6", "--chunk", "32", "--nodes", "4"]
    record = run_bench("bench_workspace", args, tmp_path, monkeypatch)
    assert record["p_plus_1"] == 32 and set(record["variants"]) == {"staged", "fused"}
    for variant in record["variants"].values():
        assert variant["steady_s"] > 0 and variant["first_growth_bytes"] is not None


def test_bench_workspace_checks_the_scores(tmp_path, monkeypatch):
    """Eager scores one row off fail their check, and nothing is timed."""
    from nlis_jax import _streaming

    real = _streaming._streaming_staged

    def rolled(*args, **kwargs):
        h, *rest = real(*args, **kwargs)
        return jnp.roll(h, 1), *rest

    monkeypatch.setattr(_streaming, "_streaming_staged", rolled)
    args = ["--d", "3", "--hidden", "6", "--chunk", "32", "--nodes", "4", "--in-process"]
    record = run_sabotaged("bench_workspace", args, tmp_path, monkeypatch)
    assert failed(record["checks"]) == {"staged_vs_svd_max_rel"} and "variants" not in record


def test_bench_adjoint(tmp_path, monkeypatch):
    args = ["--n", "64", "--d", "3", "--hidden", "4,4", "--nodes", "8", "--sweep-n", "32"]
    args += ["--widths", "2", "--index-dims", "4", "--output-dims", "1", "--cnn-n", "4", "--cnn-size", "8"]
    record = run_bench("bench_adjoint", args, tmp_path, monkeypatch)
    main = record["main"]
    assert all(main["checks"][f"{m}_vs_loop_max_rel"]["ok"] for m in ("reverse", "forward", "auto"))
    assert set(main["timings"]) == {"loop_baseline", "reverse", "forward", "auto"}
    assert len(record["sweep"]["points"]) == 3  # one per model family
    assert record["sweep"]["checks"]["sweep_vs_loop_max_rel"]["ok"]  # each point against the loop baseline
    assert "recommended_FORWARD_MAX_PARAMS" in record["sweep"]["threshold"]
    cnn = record["cnn"]  # 8×8 images: 80 + 1168 + 2·2·16·32 + 32 + 33 parameters
    assert cnn["p"] == 3361 and cnn["convolves"] and cnn["default_chunk_size"] == 4  # the memory chunk: n
    assert all(cnn["checks"][f"cnn_{c}_vs_loop_max_rel"]["ok"] for c in ("reverse", "reverse_chunk64"))
    assert set(cnn["timings"]) == {"loop_baseline", "reverse", "reverse_chunk64"}


def test_bench_adjoint_sweep_checks_against_the_loop(tmp_path, monkeypatch):
    """The p sweep's adjoints wrong in both modes alike (k = 10 outputs, 1% too large) fail the check
    against the loop baseline and are not timed (audit s34: forward against reverse alone passed them).
    Only the multi-output point runs (the main model stubbed, checked in test_bench_adjoint)."""
    module = load_benchmark("bench_adjoint", monkeypatch)
    monkeypatch.setattr(module, "main_model", lambda args, dtype: {"checks": {}, "ok": True})
    monkeypatch.setattr(module, "sweep_cases", lambda args: [(f"multi_output_k{args.outputs}", 2)])
    sabotage(monkeypatch, "adjoint", lambda o, a, k: 1.01 * o if o.ndim == 3 else o)
    args = ["--nodes", "8", "--sweep-n", "32", "--cnn-n", "0"]
    record = run_sabotaged("bench_adjoint", args, tmp_path, monkeypatch, module=module)
    assert failed(record["sweep"]["checks"]) == {"sweep_vs_loop_max_rel"}
    (point,) = record["sweep"]["points"]
    assert point["k"] == 10 and point["forward_vs_reverse_max_rel"] < 1e-5 and "forward_s" not in point


def test_bench_torch(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason=TORCH_MISSING)
    args = ["--n", "64", "--d", "3", "--hidden", "3,3", "--nodes", "2"]
    record = run_bench("bench_torch", args, tmp_path, monkeypatch)
    assert record["checks"]["torch_dict_dual_vs_jax_max_rel"]["ok"]
    assert record["environment"]["versions"]["torch"]


def test_bench_torch_leverage_only_needs_no_torch(tmp_path, monkeypatch):
    args = ["--n", "64", "--d", "3", "--hidden", "3,3", "--nodes", "2", "--leverage-only"]
    record = run_bench("bench_torch", args, tmp_path, monkeypatch)
    assert record["checks"]["nlis_jax_scores_tv"]["ok"] and record["leverage_ratio_to_floor"] > 0


def test_bench_torch_without_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(SystemExit, match=r"pip install -e \.\[bench\]"):
        load_benchmark("bench_torch", monkeypatch).main(["--n", "8"])


def test_bench_quadrature(tmp_path, monkeypatch):
    args = ["--n", "64", "--hard-n", "8", "--models", "1", "--budget", "0", "--roundoff-n", "8"]
    # two of the five random families: each case compiles the adaptive rule anew (~5 s)
    args += ["--saturating", "tanh", "--activations", "sigmoid,sin"]
    record = run_bench("bench_quadrature", args, tmp_path, monkeypatch)
    assert set(record["saturating"]) == {"tanh_x5"}
    assert record["roundoff"]["panels_mean"] >= 1 and record["roundoff"]["true_error"]["max"] <= 1e-5
    assert set(record["mlp"]["timings"]) == {"fixed16", "adaptive", "fixed16_same_batch", "adaptive_traced"}
    assert set(record["hard"]) == {"sin_index", "tanh_x25", "relu_biases"}
    assert record["random_models"]["count"] == 2
    # every case passed its check, so every case was timed (a failing one is recorded with median_s None)
    timed = [*record["hard"].values(), *record["saturating"].values(), record["roundoff"]]
    assert all(case["median_s"] > 0 for case in timed) and "skipped" not in record


def orthogonal_to_theta(adj, args, kwargs):
    """``adj`` plus, in every row, 1% of its largest entry along a direction orthogonal to θ: the identity
    ``<f*, θ> + f(0) = f(θ)`` holds still."""
    if isinstance(adj, tuple):  # return_info=True: (adjoints, info)
        return orthogonal_to_theta(adj[0], args, kwargs), adj[1]
    theta = ravel_pytree(args[1])[0]
    v = jnp.roll(theta, 1)
    v = v - (v @ theta) / (theta @ theta) * theta
    return adj + 0.01 * jnp.max(jnp.abs(adj)) / jnp.max(jnp.abs(v)) * v[None, :]


@pytest.mark.parametrize(
    "wrong, failing",
    [
        # the fixed rule batched as the default's first pass (timed: fixed16_same_batch) wrong alone
        (
            lambda o, a, k: o if k.get("chunk_size") is None else 1.01 * o,
            "fixed16_same_batch_vs_loop_max_rel",
        ),
        # every adjoint wrong by an error orthogonal to θ: only an independent reference sees it
        (orthogonal_to_theta, "fixed16_vs_loop_max_rel"),
    ],
    ids=["same_batch_only", "orthogonal_to_theta"],
)
def test_bench_quadrature_checks_against_the_loop(wrong, failing, tmp_path, monkeypatch):
    """Wrong adjoints that the identity and the library's own fixed rule pass (audit s34: both timed with
    ok: true) fail a check against bench_adjoint's loop baseline, before anything is timed."""
    sabotage(monkeypatch, "adjoint", wrong)
    args = ["--n", "64", "--budget", "0", "--roundoff-n", "0", "--skip-hard", "--skip-traced"]
    record = run_sabotaged("bench_quadrature", args, tmp_path, monkeypatch)
    assert failing in failed(record["checks"]) and "timings" not in record["mlp"]


def test_bench_quadrature_checks_hard_cases_against_more_nodes(tmp_path, monkeypatch):
    """The default's adjoints of the hard and random models wrong by an error orthogonal to θ (the
    identity holds): checked by the identity alone they were timed with ok: true (audit s36); the true
    error against the 128-node rule is a check now, and the wrong cases are not timed."""
    module = load_benchmark("bench_quadrature", monkeypatch)

    def wrong(out, args, kwargs):  # the benchmark MLP's own checks pass (the loop baseline)
        if not kwargs.get("return_info") or args[0] is module.MLP or isinstance(out[0], jax.core.Tracer):
            return out
        return orthogonal_to_theta(out, args, kwargs)

    sabotage(monkeypatch, "adjoint", wrong)
    args = ["--n", "64", "--hard-n", "8", "--models", "1", "--budget", "0", "--roundoff-n", "0"]
    args += ["--skip-traced", "--saturating", "", "--activations", "sin"]
    record = run_sabotaged("bench_quadrature", args, tmp_path, monkeypatch, module=module)
    assert failed(record["checks"]) == {
        "sin_index_true_error",
        "tanh_x25_true_error",
        "random_models_true_error_worst",
    }
    assert all(record["hard"][name]["median_s"] is None for name in ("sin_index", "tanh_x25"))
    assert record["hard"]["relu_biases"]["median_s"] > 0  # not smooth: the identity is its check


def test_bench_quadrature_times_nothing_after_a_failed_check(tmp_path, monkeypatch):
    """Correctness first: a failed benchmark-MLP check writes a record with ok False and the failing
    check, and runs none of the timed hard, random, saturating or roundoff cases (stubs: no compiling)."""
    module = load_benchmark("bench_quadrature", monkeypatch)
    failing = {"adaptive_vs_fixed16_max_rel": {"value": 1.0, "limit": 1e-10, "ok": False}}
    monkeypatch.setattr(module, "benchmark_mlp", lambda *a: {"checks": failing, "ok": False})

    def must_not_run(*args):
        raise AssertionError("timed after a failed check")

    monkeypatch.setattr(module, "run_hard", must_not_run)
    monkeypatch.setattr(module, "run_roundoff", must_not_run)
    out = tmp_path / "q.json"
    record = module.main(["--reps", "1", "--quiet", "--out", str(out)])
    assert record["ok"] is False and record["checks"] == failing and "skipped" in record
    assert json.loads(out.read_text())["ok"] is False


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("bench_quadrature", ["--saturating", "tanh,tanhh"], "--saturating: unknown 'tanhh'"),
        ("bench_quadrature", ["--activations", "sine"], "--activations: unknown 'sine'"),
        ("bench_quadrature", ["--models", "0"], "--models: must be an integer >= 1, got 0"),
        ("bench_quadrature", ["--reps", "0"], "--reps: must be an integer >= 1, got 0"),
        ("bench_streaming", ["--reps", "-1"], "--reps: must be an integer >= 1, got -1"),
        # sizes were read as given: a crash after the setup, a library error reported as a failed
        # correctness check (--chunk-size 0), or a run of a model without its layer (--hidden 0, ok: True)
        ("bench_streaming", ["--chunk-size", "0"], "--chunk-size: must be an integer >= 1, got 0"),
        ("bench_streaming", ["--models", "mlpp"], "--models: unknown ['mlpp']"),
        ("bench_streaming", ["--n", "1e6,abc"], "--n: must be a number, got 'abc'"),
        ("bench_scores", ["--n", "-5"], "--n: must be an integer >= 1, got -5"),
        ("bench_wide", ["--n", "500", "--m", "400"], "need --rank <= --n < --m, got 450, 500, 400"),
        ("bench_wide", ["--stream-n", "9000"], "need --stream-n < p + 1 = 8322 (fewer examples than"),
        ("bench_adjoint", ["--hidden", "32,0"], "--hidden: must be an integer >= 1, got 0"),
        ("bench_workspace", ["--chunk", "0"], "--chunk: must be an integer >= 1, got 0"),
        # no mode: the loop baseline alone was timed, with ok: True (audit s34)
        ("bench_adjoint", ["--modes", ""], "--modes: must list at least one mode, got ''"),
        ("bench_adjoint", ["--modes", ","], "--modes: must list at least one mode, got ','"),
        ("bench_projected", ["--dim", "0"], "--dim: must be an integer >= 1, got 0"),
        ("bench_projected", ["--sparsity", "0"], "--sparsity: must list whole numbers >= 1, got '0'"),
        ("bench_quadrature", ["--budget", "nan"], "--budget: must be a finite number >= 0, got nan"),
        ("study_projected", ["--lr", "-1"], "--lr: must be a finite number > 0, got -1"),
        ("bench_eager", ["--functions", "adjoint,leverage"], "--functions: unknown ['leverage']"),
        # a folder or '' as --out failed when the record was written, after the whole run (29th session)
        ("bench_scores", ["--out", "."], "--out: name the JSON file to write, got the folder '.'"),
        ("bench_eager", ["--out", ""], "--out: name the JSON file to write, got the folder ''"),
        ("bench_scores", ["--out", __file__ + "/x.json"], f"--out: {__file__} is a file, not a folder"),
    ],
)
def test_bad_options_are_usage_errors(name, argv, message, monkeypatch, capsys):
    """Rejected when parsed, naming the bad value (not run as zero cases, one repeat or a late crash)."""
    with pytest.raises(SystemExit) as exc:
        load_benchmark(name, monkeypatch).parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_streaming(tmp_path, monkeypatch):
    args = ["--n", "3000", "--d", "4", "--hidden", "3", "--nodes", "4", "--chunk-size", "512"]
    args += ["--check-rows", "600", "--dir", str(tmp_path / "data")]
    record = run_bench("bench_streaming", args, tmp_path, monkeypatch, reps=2)
    assert {r["model"] for r in record["results"]} == {"single-index", "mlp"}
    # the timed output itself, on random rows, against the numpy reference of the single-index model
    assert record["checks"]["single-index_n3000_timed_rows_vs_numpy_max_rel"]["value"] < 1e-4
    for name in ("single-index", "mlp"):  # and of every model against dense float64 leverage of the file
        assert record["checks"][f"{name}_n3000_timed_rows_vs_dense_max_rel"]["value"] < 1e-4
    for r in record["results"]:
        name = r["model"]
        # the timed dtype (float32), chunk size and nodes were checked, on their route, before timing
        for check in ("host_vs_dense_max_rel", "float32_vs_dense_max_rel", "float32_vs_dense_min_ratio"):
            entry = record["checks"][f"{name}_n3000_{check}"]
            assert entry["ok"] and entry["route"] in nj.routes.ROUTES
        assert r["route"] in nj.routes.ROUTES and r["checked_route"] in nj.routes.ROUTES
        assert r["rank"] == r["p"] + 1  # full column rank: the dual matrix of random data
        assert r["reps"] == 2 and len(r["seconds_runs"]) == 2 and r["seconds"] >= r["seconds_min"] > 0
        assert all(math.isfinite(v) and v > 0 for v in (r["rows_per_s"], r["ratio_to_floor"]))
        assert r["floor"]["floor_s"] > 0 and r["first_call_small_s"] > 0


def test_bench_streaming_checks_the_timed_output(tmp_path, monkeypatch):
    """The MLP's timed scores, written through out= (another path than the checks before timing), shifted
    by one row fail the check of the timed output against dense leverage (audit s34: only their sum was
    checked). 1000 rows: the reference's last block of 600 rows overlaps the first."""

    def shifted(result, args, kwargs):
        if kwargs.get("out") is not None:
            kwargs["out"][:] = np.roll(np.asarray(kwargs["out"]), 1)
        return result

    sabotage(monkeypatch, "streaming_leverage_scores", shifted)
    args = ["--models", "mlp", "--n", "1000", "--d", "4", "--hidden", "3", "--nodes", "4"]
    args += ["--chunk-size", "512", "--check-rows", "600", "--dir", str(tmp_path / "data")]
    record = run_sabotaged("bench_streaming", args, tmp_path, monkeypatch)
    assert failed(record["checks"]) == {"mlp_n1000_timed_rows_vs_dense_max_rel"}


def test_bench_eager(tmp_path, monkeypatch):
    record = run_bench("bench_eager", ["--n", "32", "--d", "3", "--hidden", "4"], tmp_path, monkeypatch)
    module = load_benchmark("bench_eager", monkeypatch)
    assert set(record["results"]) == set(module.FUNCTIONS)  # every function checked, then timed
    assert set(record["checks"]) == {f"{name}_eager_vs_jit" for name in module.FUNCTIONS}
    for entry in record["results"].values():
        assert entry["eager"]["reps"] == entry["jit"]["reps"] == 1
        assert entry["ratio"] > 0 and entry["jit_compile_s"] > 0 and entry["eager_first_call_s"] > 0
    some = ["adjoint", "streaming_leverage_scores", "sample"]
    args = ["--n", "32", "--d", "3", "--hidden", "4", "--dtype", "float32", "--functions", ",".join(some)]
    record = run_bench("bench_eager", args, tmp_path, monkeypatch)
    assert list(record["results"]) == some and record["dual_dtype"] == "float32"


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_interleaved_orders_balance_predecessors(k, monkeypatch):
    """``_common.interleaved``'s rounds (a Williams design): every round times each call once, and over
    the design's rounds each call follows each other call, and takes each position, equally often."""
    import collections

    common = load_benchmark("_common", monkeypatch)
    rows = common.balanced_orders(k)
    assert len(rows) == (2 * k if k % 2 else k)
    assert all(sorted(row) == list(range(k)) for row in rows)
    pairs = collections.Counter((row[i - 1], row[i]) for row in rows for i in range(1, k))
    assert len(pairs) == k * (k - 1) and len(set(pairs.values())) <= 1
    positions = collections.Counter((i, x) for row in rows for i, x in enumerate(row))
    assert len(positions) == k * k and len(set(positions.values())) == 1
