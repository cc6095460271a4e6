"""Out-of-core leverage scores: rows per second and peak anonymous memory from a float32 file on disk.

For each ``n`` (``--n 1000000,10000000``) the script writes ``X`` (``n × d`` float32) and ``y`` to ``.npy``
files in chunks (never the whole array in memory), opens them as memmaps and scores them with
:func:`nlis_jax.streaming_leverage_scores` (host path: chunks go to the device one at a time, the scores
into a ``.npy`` memmap via ``out=``) for a single-index model ``tanh(<θ, x>)`` and a tanh MLP. Reported:

- correctness first, on the first ``--check-rows`` rows, against the dense float64
  ``leverage_scores(dual_matrix(...))`` (``--nodes`` nodes): the host path in float64 (chunks of 512 rows,
  max-norm relative error ≤ 1e-8) and the host path as timed, float32 with ``--chunk-size`` and
  ``--nodes`` (max-norm relative error ≤ 1e-4, smallest ratio ≥ 0.999: see ``FLOAT32_RTOL``); each
  check records its route. A failed check skips that model's timing. When the timed run takes another
  route than the float32 check did, that route is checked too, forced, on the same rows (after the
  timing: the route is known only then). The timed output itself (written through ``out=``) is checked
  after the timing, on random rows, against float64 leverage of the whole file (max-norm relative
  ≤ 1e-4; the single-index model also against a numpy reference), and its sum against 1;
- compile time (a first call on a small slice of the same chunk shape) apart from the steady state (the
  median of ``--reps`` full-file runs, default 1; each run reads the whole file through the memmap again);
- rows per second, and the ratio to a floor: reading the file once (a pass over the memmap copying
  each chunk) plus two Gram passes ``F̃_cᵀF̃_c`` of ``(chunk, p+1)`` float32 blocks with numpy's BLAS
  (the fastest of 9 timings of one block, times the number of chunks: the two passes every route
  needs at least);
  on an accelerator also ``floor.device``: the read, a copy of each ``(chunk, d)`` input block to the
  device and the two Gram passes there (``ratio_to_device_floor``);
- peak growth of anonymous memory (``RssAnon`` of /proc/self/status, sampled every 5 ms in a thread);
- with ``--scale-span S`` the input columns are scaled by ``10^-S`` to ``10^S`` (ill-conditioned float32
  dual matrices, which take route ``"shifted"``), and the same runs on route ``"stable"`` are timed
  first, as the baseline: host data took ``"stable"`` for ``"shifted"`` before the forty-first session
  (``speedup_vs_stable``; that route is checked too).

    python benchmarks/bench_streaming.py --n 1000000 --out benchmarks/records/bench_streaming_cpu.json
    python benchmarks/bench_streaming.py --n 200000 --models mlp --hidden 32 --d 16 --scale-span 2 --reps 3
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    base_parser,
    check,
    counts_text,
    environment,
    max_rel_error,
    names_text,
    nonnegative_float,
    positive_int,
    report_failures,
    write_record,
)

import nlis_jax as nj
from nlis_jax._streaming import stream_chunk_size
from nlis_jax.experiments import nets
from nlis_jax.experiments.memory import PeakRss

NAME = "bench_streaming"
#: The models timed (``--models``): a tanh single-index model and a one-hidden-layer tanh MLP.
MODELS = ("single-index", "mlp")
#: Rows written per piece when generating the files.
WRITE_ROWS = 1 << 16
#: Timed Gram products of one block for the floor (the minimum is kept).
GRAM_REPS = 9
#: The float64 host path against dense float64 leverage (same numbers, other summation order).
FLOAT64_RTOL = 1e-8
#: The timed float32 host path against dense float64 leverage of the same data (max-norm relative): the
#: route ``gram`` is taken in float32 only while ``eps32·κ(G_eq) ≤ 1e-4`` (``κ ≤ 840``, nlis_jax.routes),
#: the other routes are more accurate, and the float32 dual rows add a few ``eps32`` (measured: 2e-7 to
#: 7e-7 at the default and smoke sizes). Plus the issue's float32 target for sampling, smallest ratio
#: ``min τ/τ_ref ≥ 0.999`` (a β-approximation; measured ≥ 0.999998).
FLOAT32_RTOL = 1e-4
FLOAT32_BETA = 0.999


def parse_args(argv):
    # one full-file run unless asked (the recorded commands without --reps ran once)
    parser = base_parser(
        __doc__.splitlines()[0], reps=1, reps_help="full-file runs, each reading the file again"
    )
    parser.add_argument("--n", type=counts_text, default="1000000", help="comma-separated row counts")
    parser.add_argument("--d", type=positive_int, default=64)
    parser.add_argument(
        "--hidden", type=positive_int, default=8, help="MLP hidden width (p = (d + 2)·hidden + 1)"
    )
    parser.add_argument("--nodes", type=positive_int, default=8, help="quadrature nodes of the adjoint")
    parser.add_argument(
        "--chunk-size",
        type=lambda text: None if text == "default" else positive_int(text),
        default=8192,
        help="rows per chunk, or 'default': the library's (nlis_jax._streaming.stream_chunk_size)",
    )
    parser.add_argument("--models", type=names_text(MODELS), default=",".join(MODELS))
    parser.add_argument("--check-rows", type=positive_int, default=4096)
    parser.add_argument("--dir", default=None, help="folder for the data files (default: a temp folder)")
    parser.add_argument(
        "--scale-span",
        type=nonnegative_float,
        default=0.0,
        help="input column j scaled by 10^(span·(2j/(d-1) - 1)): heavy-tailed scales, ill-conditioned "
        "float32 duals (route 'shifted', then also timed on route 'stable', as host data took it before)",
    )
    return parser.parse_args(argv)


def write_data(folder: Path, n: int, d: int, seed: int, span: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``X.npy``, ``y.npy`` written piece by piece, the columns of ``X`` scaled by ``10^(span·[-1, 1])``;
    returned as read-only memmaps."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    scales = (10.0 ** (span * np.linspace(-1, 1, d))).astype(np.float32)
    xs = np.lib.format.open_memmap(folder / "X.npy", mode="w+", dtype=np.float32, shape=(n, d))
    ys = np.lib.format.open_memmap(folder / "y.npy", mode="w+", dtype=np.float32, shape=(n,))
    for start in range(0, n, WRITE_ROWS):
        stop = min(n, start + WRITE_ROWS)
        x = rng.standard_normal((stop - start, d), dtype=np.float32)
        xs[start:stop] = x * scales
        ys[start:stop] = np.tanh(x @ theta) + 0.1 * rng.standard_normal(stop - start, dtype=np.float32)
    xs.flush(), ys.flush()
    del xs, ys
    return np.load(folder / "X.npy", mmap_mode="r"), np.load(folder / "y.npy", mmap_mode="r")


def models(args) -> dict:
    k_si, k_mlp = jax.random.split(jax.random.key(args.seed))
    si = (nets.single_index(jnp.tanh), jax.random.normal(k_si, (args.d,), jnp.float32) / np.sqrt(args.d))
    params = nets.mlp_init(k_mlp, (args.d, args.hidden, 1), dtype=jnp.float32)
    params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)
    mlp = (nets.mlp(jnp.tanh), params)
    table = {"single-index": si, "mlp": mlp}
    return {name: table[name] for name in args.models.split(",")}


def peak_growth(fn):
    """``(result, seconds, peak RssAnon growth in bytes)`` of ``fn()``, sampled every 5 ms."""
    t0 = time.perf_counter()
    with PeakRss() as rss:
        result = fn()
        seconds = time.perf_counter() - t0
    return result, seconds, rss.peak - rss.before


def floor_seconds(xs: np.ndarray, chunk: int, width: int) -> dict:
    """Reading the file once (chunk copies) plus two Gram passes of ``(chunk, width)`` float32 blocks."""
    t0 = time.perf_counter()
    total = 0.0
    for start in range(0, xs.shape[0], chunk):
        total += float(np.array(xs[start : start + chunk])[0, 0])  # a copy: every page is read
    read_s = time.perf_counter() - t0
    block = np.random.default_rng(0).standard_normal((chunk, width)).astype(np.float32)
    block.T @ block
    times = []
    for _ in range(GRAM_REPS):  # the least disturbed run: the floor, on a machine shared with others
        t0 = time.perf_counter()
        block.T @ block
        times.append(time.perf_counter() - t0)
    gram_block_s = min(times)
    chunks = -(-xs.shape[0] // chunk)
    floor = {"read_s": read_s, "gram_block_s": gram_block_s, "floor_s": read_s + 2 * chunks * gram_block_s}
    if jax.default_backend() != "cpu":  # the Gram passes run on the accelerator, after a copy to it
        floor["device"] = device_floor(xs[:chunk], block, chunks, read_s)
    return floor


def device_floor(first: np.ndarray, block: np.ndarray, chunks: int, read_s: float) -> dict:
    """On an accelerator: reading the file once, copying each ``(chunk, d)`` input block to the device, and
    two Gram products of a ``(chunk, width)`` float32 block there (jitted, full float32 precision): the
    fastest of :data:`GRAM_REPS` timings of each, times the number of chunks."""
    host = np.ascontiguousarray(first)
    gram = jax.jit(lambda b: jnp.matmul(b.T, b, precision="highest"))
    on_device = jax.device_put(block)
    gram(on_device).block_until_ready()
    copy, product = [], []
    for _ in range(GRAM_REPS):
        t0 = time.perf_counter()
        jax.device_put(host).block_until_ready()
        copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gram(on_device).block_until_ready()
        product.append(time.perf_counter() - t0)
    copy_s, gram_s = min(copy), min(product)
    floor_s = read_s + chunks * (copy_s + 2 * gram_s)
    return {"copy_block_s": copy_s, "gram_block_s": gram_s, "floor_s": floor_s}


def correctness(apply_fn, params, xs, ys, rows: int, args) -> tuple[dict, dict]:
    """The first ``rows`` rows against dense float64 leverage (``args.nodes`` nodes): the host path in
    float64 (chunks of 512), and as timed (the params' float32, ``args.chunk_size``, ``args.nodes``).

    Returns ``(checks, reference)``: the check entries (each with its ``route``) by short name, and what
    :func:`check_route` needs to check another route on the same rows.
    """
    x32, y32 = np.ascontiguousarray(xs[:rows]), np.ascontiguousarray(ys[:rows])
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x, y = np.asarray(x32, np.float64), np.asarray(y32, np.float64)
        dense = np.asarray(nj.leverage_scores(nj.dual_matrix(apply_fn, p64, x, y, num_nodes=args.nodes)))
        host = nj.streaming_leverage_scores(
            apply_fn, p64, x, y, chunk_size=512, num_nodes=args.nodes, return_info=True
        )
    checks = {"host_vs_dense_max_rel": check(max_rel_error(host.probs, dense), FLOAT64_RTOL)}
    checks["host_vs_dense_max_rel"]["route"] = nj.routes.ROUTES[int(host.route)]
    reference = {"apply_fn": apply_fn, "params": params, "x": x32, "y": y32, "dense": dense}
    return checks | check_route(reference, args, route=None), reference


def check_route(reference: dict, args, *, route: str | None) -> dict:
    """The float32 host path as timed on the reference rows (route ``route``, default: the library's
    choice) against the dense float64 leverage: max-norm relative error and smallest ratio."""
    name = "float32" if route is None else f"float32_{route}"
    kw = dict(chunk_size=args.chunk_size, num_nodes=args.nodes, route=route, return_info=True)
    try:
        rows = reference["x"], reference["y"]
        info = nj.streaming_leverage_scores(reference["apply_fn"], reference["params"], *rows, **kw)
    except ValueError as exc:  # a forced fast route on input that is rank-deficient for it
        failed = {"value": float("inf"), "limit": FLOAT32_RTOL, "ok": False, "route": None, "forced": route}
        return {f"{name}_vs_dense_max_rel": failed | {"error": str(exc)}}
    probs, dense = np.asarray(info.probs, np.float64), reference["dense"]
    routes = {"route": nj.routes.ROUTES[int(info.route)], "forced": route}  # taken, asked for
    return {
        f"{name}_vs_dense_max_rel": check(max_rel_error(probs, dense), FLOAT32_RTOL) | routes,
        f"{name}_vs_dense_min_ratio": check(np.min(probs / dense), FLOAT32_BETA, at_least=True) | routes,
    }


def timed_rows_single_index(theta, xs, ys, scores, *, nodes: int, rank: int, rows: int = 64) -> float:
    """Max-norm relative error of the timed scores (``scores``, the full file's ``out``) on ``rows``
    random rows against an independent numpy float64 reference of the single-index model ``tanh(<θ, x>)``:
    dual rows ``[Σ_j w_j tanh'(t_j z_i)·x_i, tanh(0) − y_i]`` (``z_i = <θ, x_i>``, the same ``nodes``-point
    Gauss-Legendre rule on [0, 1]), their Gram matrix ``G`` summed over the whole file in chunks, and
    ``τ_r = F_r G⁻¹ F_rᵀ / rank``. The checks before timing use the first rows of the file in a call of
    their own; this one checks the output of the timed runs themselves (one more read of the file)."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    t, w = (t + 1) / 2, w / 2
    theta = np.asarray(theta, np.float64)

    def dual_rows(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        grad = (w[None, :] * (1 - np.tanh(np.outer(x @ theta, t)) ** 2)).sum(axis=1)
        return np.column_stack([grad[:, None] * x, -y])

    n = xs.shape[0]
    G = np.zeros((xs.shape[1] + 1,) * 2)
    for start in range(0, n, WRITE_ROWS):
        F = dual_rows(xs[start : start + WRITE_ROWS], ys[start : start + WRITE_ROWS])
        G += F.T @ F
    idx = np.sort(np.random.default_rng(0).choice(n, size=min(rows, n), replace=False))
    F = dual_rows(xs[idx], ys[idx])
    tau = np.sum(F * np.linalg.solve(G, F.T).T, axis=1) / rank
    return max_rel_error(np.asarray(scores[idx], np.float64), tau)


@jax.jit
def gram_update(gram, F, skip):
    """``gram + F[skip:]ᵀ F[skip:]`` (the rows before ``skip`` masked out: one program for every block)."""
    F = jnp.where((jnp.arange(F.shape[0]) >= skip)[:, None], F, 0)
    return gram + F.T @ F


def timed_rows_dense(reference: dict, xs, ys, scores, *, nodes: int, rank: int, rows: int = 64) -> float:
    """Max-norm relative error of the timed scores (``scores``, the full file's ``out``) on ``rows`` random
    rows, the first and the last row, against dense float64 leverage of the whole file, for any model:
    the float64 dual matrix (``nj.dual_matrix``, ``nodes`` nodes, as :func:`correctness`'s reference) in
    blocks of the check rows' shape (compiled once: the last block ends at row ``n``, its rows already
    counted masked out), its Gram matrix ``G`` summed over the file on the device, and
    ``τ_r = F_r G⁻¹ F_rᵀ / rank`` (only the blocks holding those rows come back to the host)."""
    n, block = xs.shape[0], reference["x"].shape[0]
    rng = np.random.default_rng(1)
    idx = np.union1d(rng.choice(n, size=min(rows, n), replace=False), [0, n - 1])
    gram, picked = None, []
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), reference["params"])
        for start in range(0, n, block):
            lo = min(start, n - block)  # the last block: rows lo..n, of which lo..start already counted
            x, y = (np.asarray(a[lo : lo + block], np.float64) for a in (xs, ys))
            F = nj.dual_matrix(reference["apply_fn"], p64, x, y, num_nodes=nodes)
            gram = gram_update(jnp.zeros((F.shape[1],) * 2, F.dtype) if gram is None else gram, F, start - lo)
            here = idx[(idx >= start) & (idx < lo + block)]
            if here.size:
                picked.append(np.asarray(F)[here - lo])
        gram = np.asarray(gram)
    F = np.concatenate(picked)
    tau = np.sum(F * np.linalg.solve(gram, F.T).T, axis=1) / rank
    return max_rel_error(np.asarray(scores[idx], np.float64), tau)


def one_case(apply_fn, params, xs, ys, args, folder: Path) -> dict:
    chunk = args.chunk_size or stream_chunk_size(params)  # None: the library's default, resolved here
    kw = dict(chunk_size=args.chunk_size, num_nodes=args.nodes, return_info=True)
    small = np.ascontiguousarray(xs[: 2 * chunk]), np.ascontiguousarray(ys[: 2 * chunk])
    t0 = time.perf_counter()
    nj.streaming_leverage_scores(apply_fn, params, *small, **kw).probs.block_until_ready()
    first_s = time.perf_counter() - t0
    out = np.lib.format.open_memmap(folder / "scores.npy", mode="w+", dtype=np.float32, shape=(xs.shape[0],))
    baseline = {}
    if args.scale_span > 0:  # route "stable", which host data took for "shifted" before; timed first (the
        # scores.npy checked after the timing is the default route's), warmed up on the small slice
        stable = dict(kw, route="stable")
        nj.streaming_leverage_scores(apply_fn, params, *small, **stable).probs.block_until_ready()
        stable_runs = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            nj.streaming_leverage_scores(apply_fn, params, xs, ys, out=out, **stable)
            stable_runs.append(time.perf_counter() - t0)
        baseline = {"stable_seconds": float(np.median(stable_runs))}
    runs = []  # (info, seconds, peak growth) of each full-file run: the file is read again each time
    for _ in range(args.reps):
        runs.append(
            peak_growth(lambda: nj.streaming_leverage_scores(apply_fn, params, xs, ys, out=out, **kw))
        )
    seconds_runs = [seconds for _, seconds, _ in runs]
    seconds = float(np.median(seconds_runs))
    routes = [nj.routes.ROUTES[int(info.route)] for info, _, _ in runs]
    p = sum(np.size(a) for a in jax.tree.leaves(params))
    floor = floor_seconds(xs, chunk, p + 1)
    total = float(np.sum(out, dtype=np.float64))
    return {
        "p": p,
        "chunk_size": chunk,
        "route": routes[0],
        "run_routes": routes,
        "rank": int(runs[0][0].rank),
        "first_call_small_s": first_s,
        "seconds": seconds,
        "seconds_min": min(seconds_runs),
        "seconds_runs": seconds_runs,
        "reps": len(runs),
        "rows_per_s": xs.shape[0] / seconds,
        "input_bytes_per_s": xs.nbytes / seconds,
        "peak_rss_anon_growth_mib": max(growth for _, _, growth in runs) / 2**20,
        "floor": floor,
        "ratio_to_floor": seconds / floor["floor_s"],
        **({"ratio_to_device_floor": seconds / floor["device"]["floor_s"]} if "device" in floor else {}),
        "scores_sum": total,
        **baseline,
        **({"speedup_vs_stable": baseline["stable_seconds"] / seconds} if baseline else {}),
    }


def run(args) -> dict:
    sizes = [int(float(s)) for s in args.n.split(",")]
    checks, results = {}, []
    table = models(args)
    root = Path(args.dir or tempfile.mkdtemp(prefix="nlis_stream_"))
    try:
        for n in sizes:
            folder = root / f"n{n}"
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            xs, ys = write_data(folder, n, args.d, args.seed, args.scale_span)
            write_s = time.perf_counter() - t0
            for name, (apply_fn, params) in table.items():
                rows = min(args.check_rows, n)
                case_checks, reference = correctness(apply_fn, params, xs, ys, rows, args)
                checks |= {f"{name}_n{n}_{key}": entry for key, entry in case_checks.items()}
                if not all(entry["ok"] for entry in case_checks.values()):
                    continue  # correctness first: a model that fails is not timed
                result = one_case(apply_fn, params, xs, ys, args, folder)
                result["checked_route"] = case_checks["float32_vs_dense_max_rel"]["route"]
                timed = set(result["run_routes"]) | ({"stable"} if "stable_seconds" in result else set())
                for route in sorted(timed - {result["checked_route"]}):
                    # the full file took another route than the check rows: check that one, forced
                    forced = check_route(reference, args, route=route)
                    checks |= {f"{name}_n{n}_{key}": entry for key, entry in forced.items()}
                checks[f"{name}_n{n}_sum_to_one"] = check(abs(result["scores_sum"] - 1.0), 1e-3)
                # The timed output itself (written through out=, another path than the checks above):
                # float32 scores against float64 leverage of the whole file, the float32 limit above.
                scores = np.load(folder / "scores.npy", mmap_mode="r")
                kw = dict(nodes=args.nodes, rank=result["rank"])
                err = timed_rows_dense(reference, xs, ys, scores, **kw)
                checks[f"{name}_n{n}_timed_rows_vs_dense_max_rel"] = check(err, FLOAT32_RTOL)
                if name == "single-index":  # and against numpy (closed-form model)
                    err = timed_rows_single_index(params, xs, ys, scores, **kw)
                    checks[f"{name}_n{n}_timed_rows_vs_numpy_max_rel"] = check(err, FLOAT32_RTOL)
                del scores
                results.append({"n": n, "model": name, "write_s": write_s, **result})
            del xs, ys
            shutil.rmtree(folder)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"checks": checks, "ok": all(c["ok"] for c in checks.values()), "results": results}


def main(argv=None) -> dict:
    args = parse_args(argv)
    record = {"bench": NAME, "params": vars(args) | {"dtype": "float32"}, "environment": environment()}
    record |= run(args)
    if not record["ok"]:
        report_failures(record["checks"])
    write_record(record, args.out, NAME, quiet=args.quiet)
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
