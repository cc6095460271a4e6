"""The eager public call against ``jax.jit`` of the same call: what input checks and host decisions cost.

Each public function called eagerly validates its input, reads a few values back (the rank, NaN counts,
the adaptive rule's per-example summaries) and runs compiled programs; called inside a user's
``jax.jit`` the same function is one program with no read back. At small sizes the difference is the
eager call's overhead (dispatches, synchronisations, Python), which on a GPU is a launch or a wait
apiece. Functions (``--functions``): the adaptive and fixed-rule adjoint, the fixed-rule dual matrix,
leverage and norm scores of that dual, ``sample``, ``mix_with_uniform``, the linear baseline's
leverage, streaming leverage and the weighted loss, on a tanh MLP ``d-h-1`` (float64 by default).

Correctness first: each eager result against the jitted one (the adaptive rule's traced scheme to its
tolerance, everything else to rounding; ``sample``'s indices equal). Then each pair is timed round robin
(``_common.interleaved``); the record holds both medians, their ratio and the eager call's extra
microseconds. The jitted call's compile time and the eager call's first call (which compiles its own
programs) are recorded apart.

    python benchmarks/bench_eager.py                    # n = 256, d = 8, h = 16, float64
    python benchmarks/bench_eager.py --n 4096 --dtype float32 --functions adjoint,leverage_scores
"""

from __future__ import annotations

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
    max_rel_error,
    names_text,
    positive_int,
    progress,
    report_failures,
    run_and_write,
)

import nlis_jax as nj

NAME = "bench_eager"
FUNCTIONS = (
    "adjoint",
    "adjoint_fixed",
    "dual_matrix_fixed",
    "leverage_scores",
    "norm_scores",
    "sample",
    "mix_with_uniform",
    "linear_leverage_scores",
    "streaming_leverage_scores",
    "weighted_loss",
)
# eager against jitted: the adaptive rule's two schemes (host-driven, traced) each meet its tolerance
# (default_rtol: 1e-10 in float64, 1e-5 in float32) relative to each example's norm, so they differ by up
# to about twice it; every other function runs the same arithmetic and differs by rounding only
ADAPTIVE_LIMIT = {"float64": 1e-8, "float32": 1e-4}
ROUNDING_LIMIT = {"float64": 1e-12, "float32": 1e-5}


def mlp(params, x):
    """A tanh MLP ``d-h-1``: one object, a static argument of the library's programs."""
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0], reps=101)
    parser.add_argument("--n", type=positive_int, default=256, help="examples")
    parser.add_argument("--d", type=positive_int, default=8, help="features")
    parser.add_argument("--hidden", type=positive_int, default=16, help="hidden units")
    parser.add_argument("--nodes", type=positive_int, default=8, help="nodes of the fixed rule")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument(
        "--functions",
        type=names_text(FUNCTIONS),
        default=",".join(FUNCTIONS),
        help=f"comma list from {','.join(FUNCTIONS)} (default all)",
    )
    return parser.parse_args(argv)


def make_problem(key, n: int, d: int, hidden: int, dtype):
    """``(params, xs, ys)``: Glorot-scaled weights, standard normal inputs, targets from the model plus
    noise (keys split, one per draw)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "w1": jax.random.normal(k1, (d, hidden), dtype) / np.sqrt(d),
        "b1": jnp.zeros(hidden, dtype),
        "w2": jax.random.normal(k2, (hidden,), dtype) / np.sqrt(hidden),
        "b2": jnp.zeros((), dtype),
    }
    xs = jax.random.normal(k3, (n, d), dtype)
    ys = jax.vmap(lambda x: mlp(params, x))(xs) + 0.1 * jax.random.normal(k4, (n,), dtype)
    return params, xs, ys


def cases(args, params, xs, ys, F, probs, key) -> dict:
    """``{name: (function, arguments)}``: one function of arrays, called eagerly and under ``jax.jit``."""
    nodes, chunk = args.nodes, max(1, args.n // 4)
    every = {
        "adjoint": (lambda p, x: nj.adjoint(mlp, p, x), (params, xs)),
        "adjoint_fixed": (lambda p, x: nj.adjoint(mlp, p, x, num_nodes=nodes), (params, xs)),
        "dual_matrix_fixed": (
            lambda p, x, y: nj.dual_matrix(mlp, p, x, y, num_nodes=nodes),
            (params, xs, ys),
        ),
        "leverage_scores": (nj.leverage_scores, (F,)),
        "norm_scores": (nj.norm_scores, (F,)),
        "sample": (lambda k, q: nj.sample(k, q, max(1, args.n // 8)), (key, probs)),
        "mix_with_uniform": (lambda q: nj.mix_with_uniform(q, 0.25), (probs,)),
        "linear_leverage_scores": (lambda x, y: nj.linear_leverage_scores(x, y, bias=True), (xs, ys)),
        "streaming_leverage_scores": (
            lambda p, x, y: nj.streaming_leverage_scores(mlp, p, x, y, chunk_size=chunk, num_nodes=nodes),
            (params, xs, ys),
        ),
        "weighted_loss": (lambda p, x, y: nj.weighted_loss(mlp, p, x, y), (params, xs, ys)),
    }
    return {name: every[name] for name in args.functions.split(",")}


def agreement(name: str, eager, jitted, dtype: str) -> dict:
    """Eager against jitted: equal indices and weights for ``sample``, else the max-norm relative error."""
    if name == "sample":
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(eager, jitted, strict=True))
        return check(0 if same else 1, 0)
    limit = (ADAPTIVE_LIMIT if name == "adjoint" else ROUNDING_LIMIT)[dtype]
    return check(max_rel_error(eager, jitted), limit)


def run(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    data_key, sample_key = jax.random.split(jax.random.key(args.seed))
    params, xs, ys = make_problem(data_key, args.n, args.d, args.hidden, dtype)
    F = nj.dual_matrix(mlp, params, xs, ys, num_nodes=args.nodes)
    probs = nj.leverage_scores(F)
    checks, compiled, first_call = {}, {}, {}
    todo = cases(args, params, xs, ys, F, probs, sample_key)
    for name, (fn, fargs) in progress(todo.items(), desc=f"{NAME}: compile and check", quiet=args.quiet):
        t0 = time.perf_counter()
        eager = jax.block_until_ready(fn(*fargs))  # the eager call compiles its programs on first use
        first_call[name] = time.perf_counter() - t0
        compiled[name] = Compiled(fn, *fargs)
        checks[f"{name}_eager_vs_jit"] = agreement(name, eager, compiled[name](), args.dtype)
    record = {"checks": checks, "ok": all_ok(checks), "dual_dtype": F.dtype.name}
    if not record["ok"]:
        report_failures(checks)
        return record
    results = {}
    for name, (fn, fargs) in progress(todo.items(), desc=f"{NAME}: time", quiet=args.quiet):
        pair = interleaved(
            {"eager": lambda fn=fn, fargs=fargs: fn(*fargs), "jit": compiled[name]}, reps=args.reps
        )
        for entry in pair.values():
            del entry["times_s"]
        eager_s, jit_s = pair["eager"]["median_s"], pair["jit"]["median_s"]
        results[name] = {
            "eager": pair["eager"],
            "jit": pair["jit"],
            "ratio": eager_s / jit_s,
            "extra_us": (eager_s - jit_s) * 1e6,
            "jit_compile_s": compiled[name].compile_s,
            "eager_first_call_s": first_call[name],
        }
    record["results"] = results
    return record


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_and_write(NAME, args, run, x64=args.dtype == "float64")


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
