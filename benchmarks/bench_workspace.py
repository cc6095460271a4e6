"""Peak memory of the streamed leverage scores on device arrays: one program per pass against one for all.

``nj.streaming_leverage_scores`` on device arrays holds the ``(p+1)²`` Gram matrix and the workspace of
the route's factorisations. A call traced by a user's ``jit`` is one program
(``nlis_jax._streaming._streaming_jit``): a loop whose stages hold every route's ``(p+1)²`` state, for
which XLA's buffer plan reserved 19–21 Gram matrices on every route. An eager call now runs each pass and
each of the route's stages as a program of its own, and only the passes its route needs
(``nlis_jax._streaming._streaming_staged``, ``nlis_jax.routes.transform_stepwise``). This benchmark runs
each in a fresh process (the allocator's state of one does not hide the other's peak) on a tanh MLP
``d–h–1`` with ``n = 2·(p+1)`` examples and reports, for the first call (compilation included) and the
repeated calls, the wall time and the peak growth of anonymous memory (``RssAnon`` sampled every 2 ms)
in units of one Gram matrix. Correctness first: each process checks its scores against numpy's SVD of
the dense dual matrix (target max relative error ≤ 1e-10 in float64, 1e-4 in float32) before it times
the repeated calls, and the two must take the same route to the same rank.

    python benchmarks/bench_workspace.py                                  # h = 300: p + 1 = 2,701, float64
    python benchmarks/bench_workspace.py --dtype float32 --route shifted
    python benchmarks/bench_workspace.py --hidden 500 --route stable      # p + 1 = 4,501
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import all_ok, base_parser, check, positive_int, report_failures, run_and_write
from bench_scores import SCORE_RTOL_TARGET

import nlis_jax as nj
from nlis_jax import routes
from nlis_jax.experiments import nets
from nlis_jax.experiments.memory import PeakRss

NAME = "bench_workspace"
VARIANTS = ("staged", "fused")


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0], reps=2, reps_help="repeated calls after the first")
    parser.add_argument("--d", type=positive_int, default=8, help="input dimension")
    parser.add_argument(
        "--hidden", type=positive_int, default=300, help="hidden units (p + 1 = (d + 2)·h + 2)"
    )
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--route", choices=("auto", *routes.ROUTES), default="auto")
    parser.add_argument("--chunk", type=positive_int, default=256, help="examples per chunk")
    parser.add_argument(
        "--nodes", type=positive_int, default=8, help="Gauss-Legendre nodes of the fixed rule"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="both variants in this process (their peaks not isolated; tests)",
    )
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_argv(args) -> list[str]:
    """The options of a worker process: the problem's and the repeats, not the record's."""
    names = ("d", "hidden", "dtype", "route", "chunk", "nodes", "reps", "seed")
    return [text for name in names for text in (f"--{name}", str(getattr(args, name)))]


def problem(args):
    """``(apply_fn, params, xs, ys, tol)``: the MLP, its data and the rank tolerance."""
    dtype = jnp.dtype(args.dtype)
    k_p, k_x, k_y = jax.random.split(jax.random.key(args.seed), 3)
    params = nets.mlp_init(k_p, (args.d, args.hidden, 1), dtype=dtype)
    params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)  # a nonzero f(0) column
    m = sum(a.size for a in jax.tree.leaves(params)) + 1
    xs = jax.random.normal(k_x, (2 * m, args.d), dtype)
    ys = jax.random.normal(k_y, (2 * m,), dtype)
    tol = routes.tolerance(routes.default_rtol(dtype), routes.compute_dtype(dtype))
    return nets.mlp(jnp.tanh), params, xs, ys, tol


def reference(args, folder: Path) -> tuple[int, int]:
    """numpy's SVD leverage of the dense dual matrix, saved for the workers; ``(p + 1, rank)``."""
    apply_fn, params, xs, ys, tol = problem(args)
    F = np.asarray(nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=args.nodes), np.float64)
    F = F.reshape(-1, F.shape[-1])
    F = F / np.where(np.linalg.norm(F, axis=0) > 0, np.linalg.norm(F, axis=0), 1)  # as the routes scale
    u, s, _ = np.linalg.svd(F, full_matrices=False)
    rank = int(np.sum(s > float(tol) * s[0]))
    np.save(folder / "reference.npy", np.sum(u[:, :rank] ** 2, axis=1))
    return F.shape[1], rank


def worker(args) -> dict:
    """One variant in this (fresh) process: first call, check, repeated calls."""
    from nlis_jax import _streaming

    run = {"staged": _streaming._streaming_staged, "fused": _streaming._streaming_jit}[args.worker]
    apply_fn, params, xs, ys, tol = problem(args)
    kw = dict(
        chunk_size=args.chunk,
        num_nodes=args.nodes,
        mode="auto",
        route=None if args.route == "auto" else args.route,
    )
    jax.block_until_ready((params, xs, ys, tol))

    def call():
        t0 = time.perf_counter()
        with PeakRss(0.002) as rss:
            out = jax.block_until_ready(run(apply_fn, params, xs, ys, tol, **kw))
        return out, time.perf_counter() - t0, rss.peak - rss.before

    out, first_s, first_growth = call()
    ref = np.load(Path(args.dir) / "reference.npy")
    h = np.asarray(out[0], np.float64)
    error = float(np.max(np.abs(h - ref)) / np.max(ref))
    result = {
        "first_s": first_s,
        "first_growth_bytes": first_growth,
        "rank": int(out[1]),
        "route": int(out[2]),
    }
    result["checks"] = {f"{args.worker}_vs_svd_max_rel": check(error, SCORE_RTOL_TARGET[args.dtype])}
    if all_ok(result["checks"]):
        steady = [call()[1:] for _ in range(args.reps)]
        result["steady_s"] = float(np.median([s for s, _ in steady]))
        result["steady_growth_bytes"] = max(g for _, g in steady)
    return result


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        m, rank = reference(args, folder)
        gram = m * m * jnp.dtype(args.dtype).itemsize
        variants = {}
        for variant in VARIANTS:
            argv = [*worker_argv(args), "--worker", variant, "--dir", tmp]
            if args.in_process:
                variants[variant] = worker(parse_args(argv))
                continue
            done = subprocess.run(
                [sys.executable, __file__, *argv], capture_output=True, text=True, check=False
            )
            if done.returncode:
                raise RuntimeError(f"the {variant} worker failed:\n{done.stderr[-3000:]}")
            variants[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    checks = {k: v for r in variants.values() for k, v in r["checks"].items()}
    same = all(variants["staged"][key] == variants["fused"][key] for key in ("rank", "route"))
    checks["same_route_and_rank"] = check(float(same), 1.0, at_least=True)
    checks["rank_vs_svd"] = check(float(variants["staged"]["rank"] == rank), 1.0, at_least=True)
    record = {
        "p_plus_1": m,
        "n": 2 * m,
        "gram_mib": gram / 2**20,
        "route": routes.ROUTES[variants["staged"]["route"]],
    }
    record |= {"checks": checks, "ok": all_ok(checks)}
    if not record["ok"]:
        report_failures(checks)
        return record
    for r in variants.values():
        r["first_growth_grams"] = r["first_growth_bytes"] / gram
        r["steady_growth_grams"] = r["steady_growth_bytes"] / gram
    record["variants"] = variants
    record["steady_growth_ratio"] = variants["fused"]["steady_growth_bytes"] / max(
        variants["staged"]["steady_growth_bytes"], 1
    )
    return record


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker is not None:
        with jax.enable_x64(args.dtype == "float64"):
            print(json.dumps(worker(args)))
        return None
    return run_and_write(NAME, args, run, x64=args.dtype == "float64")


if __name__ == "__main__":
    main()
