"""Leverage scores of a wide matrix (fewer rows than columns, as the dual of a model with ``p ≥ n``).

A wide ``(n, m)`` matrix ``A`` spans at most ``Rⁿ``: ``nj.leverage_scores`` forms no ``m × m`` Gram matrix
(:func:`nlis_jax.routes.wide_basis`). With ``B = A D⁻¹`` (``D`` the column norms) it certifies full row
rank from the eigenvalues of ``B Bᵀ`` (every leverage then exactly 1), and otherwise takes the Householder
QR of ``Bᵀ`` and the SVD of its ``n × n`` R factor, ``O(n²m)``. Timed against, in the same process: the
route it replaced (jax's thin SVD of ``B``, which forms ``Vᵀ`` too), numpy's thin SVD (the reference), and
the floor of two passes over ``A``, ``2 × median(A Aᵀ)`` in numpy. The matrix has rank ``--rank`` (below
``n`` by default, so the scores are not all equal) and log-normal column scales. Correctness first:
scores and rank against numpy's SVD (target max relative error ≤ 1e-10 in float64, 1e-4 in float32).

Second part (``--stream-n``): ``nj.streaming_leverage_scores`` of a tanh MLP ``d–h–1`` on device arrays
with fewer examples than dual columns (``n < p + 1``), which is now scored from its dual matrix by the
same wide route, against the program it ran before (the streamed ``(p+1)²`` Gram matrix and its
factorisations, ``nlis_jax._streaming._streaming_jit``, called directly; ``--stream-budget`` seconds
after its warm-up, which alone took 198–252 s at p = 8,321). Both checked against numpy's SVD of
``nj.dual_matrix`` first.

    python benchmarks/bench_wide.py                         # 500 × 131,586, rank 450, float64
    python benchmarks/bench_wide.py --rank 500              # full row rank: certified, no QR
    python benchmarks/bench_wide.py --m 8192 --reps 5
    python benchmarks/bench_wide.py --dtype float32
    python benchmarks/bench_wide.py --stream-n 500 --stream-d 63 --stream-hidden 128   # p = 8,321
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    Compiled,
    all_ok,
    base_parser,
    check,
    interleaved,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    progress,
    report_failures,
    run_and_write,
    time_eager,
)
from bench_scores import SCORE_RTOL_TARGET, scores_rel_error

import nlis_jax as nj

NAME = "bench_wide"


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0], reps=3)
    parser.add_argument("--n", type=positive_int, default=500, help="rows")
    parser.add_argument("--m", type=positive_int, default=131_586, help="columns (more than --n)")
    parser.add_argument("--rank", type=positive_int, default=450, help="rank of the matrix (at most --n)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="of the matrix")
    parser.add_argument("--stream-n", type=nonnegative_int, default=0, help="examples (0: no streaming part)")
    parser.add_argument("--stream-d", type=positive_int, default=63, help="features of the streamed MLP")
    parser.add_argument("--stream-hidden", type=positive_int, default=128, help="its hidden units")
    parser.add_argument(
        "--stream-budget", type=nonnegative_float, default=60.0, help="seconds of timed runs per call"
    )
    args = parser.parse_args(argv)
    if not args.rank <= args.n < args.m:
        parser.error(f"need --rank <= --n < --m, got {args.rank}, {args.n}, {args.m}")
    p = args.stream_hidden * (args.stream_d + 2) + 1
    if args.stream_n and not args.stream_n < p + 1:
        parser.error(f"need --stream-n < p + 1 = {p + 1} (fewer examples than dual columns)")
    return args


def make_matrix(seed: int, n: int, m: int, rank: int, dtype) -> np.ndarray:
    """``B C`` (``(n, rank)`` times ``(rank, m)``, Gaussian; for ``rank = n`` a Gaussian ``(n, m)``, whose
    rows are well conditioned, as an MLP's wide dual matrix: its rows' Gram matrix has
    ``λ_min/λ_max`` 6e-5 to 0.15 at n = 200–1,000, p = 4,401–50,305) with columns scaled by
    ``exp(U(−3, 3))``."""
    rng = np.random.default_rng(seed)
    if rank == n:
        A = rng.standard_normal((n, m))
    else:
        A = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m))
    return (A * np.exp(rng.uniform(-3, 3, m))[None, :]).astype(dtype)


def svd_leverage(A: np.ndarray, rank_rtol: float) -> tuple[np.ndarray, int]:
    """Reference leverage of the column-equilibrated ``A`` (the same rank as ``A``) from numpy's thin SVD
    in float64, rank by ``rank_rtol·σ_max``."""
    A = A.astype(np.float64)
    norms = np.linalg.norm(A, axis=0)
    U, s, _ = np.linalg.svd(A / np.where(norms > 0, norms, 1), full_matrices=False)
    rank = int(np.sum(s > rank_rtol * s[0]))
    return np.sum(np.square(U[:, :rank]), axis=1) / rank, rank


def thin_svd_leverage(A):
    """The route replaced on 2026-12-06: jax's thin SVD of the column-equilibrated ``A``, rank at the
    library's default tolerance (``10·eps``)."""
    norms = jnp.linalg.norm(A, axis=0)
    W, s, _ = jnp.linalg.svd(A / jnp.where(norms > 0, norms, 1)[None, :], full_matrices=False)
    keep = s > nj.routes.default_rtol(A.dtype) * s[0]
    h = jnp.sum(jnp.square(W * keep[None, :]), axis=1)
    return h / jnp.sum(h)


def run(args) -> dict:
    A_np = make_matrix(args.seed, args.n, args.m, args.rank, args.dtype)
    A = jnp.asarray(A_np)
    # numpy's rank at a tolerance between the planted rank's gap and the library's 10·eps
    tau_ref, rank_ref = svd_leverage(A_np, 1e3 * float(np.finfo(A_np.dtype).eps))
    lev = Compiled(nj.leverage_scores, A)
    old = Compiled(thin_svd_leverage, A)
    info = nj.leverage_scores(A, return_info=True)  # its rank and route
    target = SCORE_RTOL_TARGET[args.dtype]
    checks = {
        "scores_vs_svd_max_rel": check(scores_rel_error(lev(), tau_ref), target),
        # the eager public call, as it is timed below
        "eager_scores_vs_svd_max_rel": check(scores_rel_error(nj.leverage_scores(A), tau_ref), target),
        "rank_matches_svd": check(abs(int(info.rank) - rank_ref), 0),
        "planted_rank": check(abs(rank_ref - args.rank), 0),
        "replaced_route_vs_svd_max_rel": check(scores_rel_error(old(), tau_ref), target),
    }
    record = {"checks": checks, "ok": all_ok(checks), "rank": int(info.rank)}
    record["route"] = nj.routes.ROUTES[int(info.route)]
    if not record["ok"]:
        report_failures(checks)
        return record
    calls = {
        "numpy_gram": lambda: A_np @ A_np.T,
        "leverage_scores": lev,
        "leverage_scores_eager": lambda: nj.leverage_scores(A),
        "thin_svd_jax": old,
    }
    record["compile_s"] = {"leverage_scores": lev.compile_s, "thin_svd_jax": old.compile_s}
    record["timings_interleaved"] = interleaved(calls, reps=args.reps)
    tasks = {"svd_numpy": lambda: time_eager(lambda: np.linalg.svd(A_np, full_matrices=False), reps=1)}
    record["timings"] = {
        name: task().as_dict() for name, task in progress(tasks.items(), desc=NAME, quiet=args.quiet)
    }
    inter = record["timings_interleaved"]
    floor_s = 2 * inter["numpy_gram"]["median_s"]
    record["floor_s"] = floor_s
    record["ratio"] = inter["leverage_scores"]["median_s"] / floor_s
    record["ratio_eager"] = inter["leverage_scores_eager"]["median_s"] / floor_s
    record["speedup_vs_thin_svd"] = inter["thin_svd_jax"]["median_s"] / inter["leverage_scores"]["median_s"]
    return record


def mlp(params, x):
    """A tanh MLP with one hidden layer, one example: ``v·tanh(W x + b) + c``."""
    return jnp.dot(params["v"], jnp.tanh(params["W"] @ x + params["b"])) + params["c"]


def streamed_gram(xs, ys, params, tol, *, num_nodes: int):
    """What ``nj.streaming_leverage_scores`` ran on device arrays with ``n < p + 1`` before 2026-12-06:
    the streamed Gram matrix and the route's factorisations, one program. The raw leverage ``h``."""
    from nlis_jax import _streaming

    kw = dict(chunk_size=4096, num_nodes=num_nodes, mode="auto", route=None)
    return _streaming._streaming_jit(mlp, params, xs, ys, tol, **kw)[0]


def run_streaming(args) -> dict:
    n, d, h = args.stream_n, args.stream_d, args.stream_hidden
    kw, kp, kx, ky = jax.random.split(jax.random.key(args.seed + 1), 4)
    params = {
        "W": jax.random.normal(kw, (h, d), jnp.float64) / np.sqrt(d),
        "b": jnp.zeros((h,), jnp.float64),
        "v": jax.random.normal(kp, (h,), jnp.float64) / np.sqrt(h),
        "c": jnp.zeros((), jnp.float64),
    }
    xs = jax.random.normal(kx, (n, d), jnp.float64)
    ys = jax.random.normal(ky, (n,), jnp.float64)
    nodes = 16
    F = np.asarray(nj.dual_matrix(mlp, params, xs, ys, num_nodes=nodes))
    U, s, _ = np.linalg.svd(F, full_matrices=False)
    rank = int(np.sum(s > 10 * np.finfo(np.float64).eps * s[0]))  # the library's default rtol
    h_ref = np.sum(np.square(U[:, :rank]), axis=1)

    def now():
        return nj.streaming_leverage_scores(mlp, params, xs, ys, num_nodes=nodes, return_info=True).leverage

    tol = nj.routes.tolerance(nj.routes.default_rtol(jnp.float64), jnp.float64)
    t0 = time.perf_counter()
    h_now = jax.block_until_ready(now())
    first_now = time.perf_counter() - t0
    before = Compiled(functools.partial(streamed_gram, num_nodes=nodes), xs, ys, params, tol)
    h_before = before()
    checks = {
        "streaming_vs_svd_max_rel": check(scores_rel_error(h_now, h_ref), 1e-10),
        "replaced_program_vs_svd_max_rel": check(scores_rel_error(h_before, h_ref), 1e-10),
    }
    record = {"p": int(F.shape[1] - 1), "n": n, "rank": rank, "checks": checks, "ok": all_ok(checks)}
    if not record["ok"]:
        report_failures(checks)
        return record
    budget = args.stream_budget
    steady = time_eager(now, reps=args.reps, budget_s=budget)
    record["timings"] = {
        "streaming_leverage_scores": {"first_call_s": first_now} | steady.as_dict(),
        "streamed_gram_before": before.time(reps=args.reps, budget_s=budget).as_dict()
        | {"first_call_s": before.first_call_s},
    }
    record["speedup"] = record["timings"]["streamed_gram_before"]["median_s"] / steady.median_s
    return record


def run_all(args) -> dict:
    record = run(args)
    if args.stream_n and record["ok"]:
        record["streaming"] = run_streaming(args)
        record["ok"] = record["streaming"]["ok"]
    return record


def main(argv=None) -> dict:
    return run_and_write(NAME, parse_args(argv), run_all, x64=True)


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
