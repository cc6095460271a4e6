"""Adaptive quadrature (the default of ``nj.adjoint``) against the fixed 16-node Gauss-Legendre rule.

Main model: the benchmark MLP of bench_adjoint.py (``8-32-32-1`` tanh with biases, ``p = 1377``,
``n = 20,000``), where 16 nodes already suffice: the default must stay within 1.25x of the fixed rule.
Correctness first: the fixed rule, as timed and batched as the default's first pass, agrees with an
independent reference, bench_adjoint.py's loop baseline (a per-example ``jax.grad`` at the same 16 nodes;
max-norm relative, float64 1e-10, float32 1e-5); the adaptive adjoints agree with the fixed rule (the same
limits) and satisfy the identity ``<f*, θ> + f(0) = f(θ)``; when they do not, nothing is timed (the
record has ``ok: false``, the failing checks and ``skipped``), and a hard case, random model or the
roundoff case whose own check fails is recorded untimed (``median_s: null``). Timed:
``nj.adjoint(..., num_nodes=16)`` compiled ahead (``jax.jit``), the adaptive default called eagerly as a
user would (its first call holds the compilations; median of the steady state), and the adaptive default
under a user's ``jax.jit`` (the traced, device-compacted scheme).

Hard cases (float64, small ``n``), the issue's measurements of the fixed rule: ``sin(<θ, x>)`` with
``|<θ, x>|`` up to 60, a tanh MLP with inputs ×25, a 2-layer ReLU MLP with biases, random small models
(tanh, sigmoid, softplus, sin, bounded Swish; inputs up to ×5). For each: the identity error of the fixed
rule and of the default, panels used (16 gradients each) and time. These are checked by the identity
alone (an error orthogonal to θ would pass it); the benchmark MLP's check against the loop baseline runs
first, and a failure there stops the run.

Roundoff (``--roundoff-n``): the tanh MLP with inputs ×25 in float32, where ``1 − tanh²`` carries rounding
noise above rtol = 1e-6: panels, examples stopped at the rounding level, warnings, the steady-state time
of the default and its true error against the float64 adjoint of the same numbers (fixed 16 and 64-node
rules alongside). Reliability: for the smooth hard cases and 8-32-32-1 MLPs with inputs ×5 (activations
saturate), how many accepted examples have a true error (against a 128-node rule) above rtol, and the
worst true error over rtol. ``--probes`` overrides the estimate's number of probes (an experiment).

    python benchmarks/bench_quadrature.py                    # float64, the sizes above
    python benchmarks/bench_quadrature.py --dtype float32
    python benchmarks/bench_quadrature.py --n 256 --hard-n 8 --models 1   # smoke size
"""

from __future__ import annotations

import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    Compiled,
    all_ok,
    base_parser,
    check,
    environment,
    interleaved,
    max_rel_error,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    report_failures,
    time_eager,
    write_record,
)
from bench_adjoint import MLP, LoopBaseline, identity_error, mlp_params
from jax.flatten_util import ravel_pytree

import nlis_jax as nj
from nlis_jax import _adaptive as adaptive
from nlis_jax._adaptive import CACHE_ELEMENTS
from nlis_jax._adjoint import default_chunk_size
from nlis_jax.experiments import nets

NAME = "bench_quadrature"
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
HARD_RTOL = 1e-10  # identity error of the default on the hard cases and random models (float64)
HARD_MODELS = {
    "tanh_x25": nets.mlp(jnp.tanh),
    "relu_biases": nets.mlp(jax.nn.relu),
    "sin_index": nets.single_index(jnp.sin),
}
RANDOM_ACTIVATIONS = {
    "tanh": nets.mlp(jnp.tanh),
    "sigmoid": nets.mlp(jax.nn.sigmoid),
    "softplus": nets.mlp(jax.nn.softplus),
    "sin": nets.mlp(jnp.sin),
    "bounded_swish": nets.mlp(nj.bounded_swish),
}


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=positive_int, default=20_000, help="examples (benchmark MLP)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float64")
    parser.add_argument(
        "--budget", type=nonnegative_float, default=30.0, help="seconds of repeats per case (>= 1 rep)"
    )
    parser.add_argument("--hard-n", type=positive_int, default=200, help="examples per hard case")
    parser.add_argument(
        "--models", type=positive_int, default=8, help="random small models per activation (>= 1)"
    )
    parser.add_argument(
        "--activations", default=",".join(RANDOM_ACTIVATIONS), help="activations of the random small models"
    )
    parser.add_argument("--skip-traced", action="store_true", help="do not time the default under jax.jit")
    parser.add_argument("--skip-hard", action="store_true", help="only the benchmark MLP")
    parser.add_argument(
        "--roundoff-n", type=nonnegative_int, default=200, help="examples of the roundoff case (0: skip)"
    )
    parser.add_argument(
        "--saturating", default=",".join(RANDOM_ACTIVATIONS), help="activations of the x5 MLPs ('' for none)"
    )
    parser.add_argument(
        "--probes", type=positive_int, default=None, help="override the estimate's probes (experiment)"
    )
    args = parser.parse_args(argv)
    # Names are checked here, before anything runs: a typo would otherwise select no model silently.
    for option, empty_ok in (("activations", False), ("saturating", True)):
        text = getattr(args, option)
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in RANDOM_ACTIVATIONS]
        if unknown or not (names or empty_ok):
            bad = f"unknown {','.join(unknown)!r}" if unknown else "no activation"
            parser.error(f"--{option}: {bad} in {text!r}; choose from {','.join(RANDOM_ACTIVATIONS)}")
    return args


def eager_timing(call, *, reps: int, budget_s: float) -> dict:
    """The first call (compilations included) and the median of the steady state of an eager call."""
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    timing = time_eager(call, reps=reps, budget_s=budget_s).as_dict()
    return timing | {"compile_s": max(0.0, first - timing["median_s"]), "first_call_s": first}


def pass_batch(n: int, p: int) -> int:
    """Examples per vectorised batch of the default's first pass, as ``nlis_jax._adaptive`` picks it."""
    chunk = default_chunk_size(n, p, 1)
    return chunk if jax.default_backend() != "cpu" else max(1, min(chunk, CACHE_ELEMENTS // p))


def benchmark_mlp(args, dtype, key) -> dict:
    kp, kx = jax.random.split(key)
    params = mlp_params(kp, (8, 32, 32, 1), dtype)
    xs = jax.random.normal(kx, (args.n, 8), dtype)
    num_params = int(ravel_pytree(params)[0].shape[0])
    tol = TOLERANCE[args.dtype]
    # The fixed rule, as timed and as batched like the default's first pass on this platform (``pass_batch``
    # examples per vectorised batch: the default's overhead at equal batching), against an independent
    # reference: bench_adjoint's loop baseline, a per-example ``jax.grad`` at the same 16 nodes, summed
    # eagerly (an error orthogonal to θ passes the identity <f*, θ> + f(0) = f(θ), not this).
    loop = LoopBaseline(MLP, params, xs, 16)()
    fixed = Compiled(lambda p, x: nj.adjoint(MLP, p, x, num_nodes=16, mode="reverse"), params, xs)
    batch = pass_batch(args.n, num_params)
    same = Compiled(
        lambda p, x: nj.adjoint(MLP, p, x, num_nodes=16, mode="reverse", chunk_size=batch), params, xs
    )
    ref = fixed()
    checks = {
        "fixed16_vs_loop_max_rel": check(max_rel_error(ref, loop), tol),
        "fixed16_same_batch_vs_loop_max_rel": check(max_rel_error(same(), loop), tol),
    }
    record = {"p": num_params, "pass_batch": batch, "checks": checks, "ok": all_ok(checks)}
    if not record["ok"]:  # the fixed rule is the reference of the default below
        return record
    traced = Compiled(lambda p, x: nj.adjoint(MLP, p, x, mode="reverse"), params, xs)
    adj, info = nj.adjoint(MLP, params, xs, mode="reverse", return_info=True)
    checks["adaptive_vs_fixed16_max_rel"] = check(max_rel_error(adj, ref), tol)
    checks["traced_vs_eager_max_rel"] = check(max_rel_error(traced(), adj), tol)
    checks["identity_max_rel"] = check(identity_error(MLP, params, xs, adj), tol)
    record["ok"] = all_ok(checks)
    record["refined_examples"] = int(np.sum(np.asarray(info.panels) > 1))
    record["max_estimated_error"] = float(np.max(info.error))
    if not record["ok"]:
        return record
    adaptive = lambda: nj.adjoint(MLP, params, xs, mode="reverse")  # eager, as a user calls it
    # The fixed rule (both batchings) and the eager default in turn, under the same load (round robin).
    calls = {"fixed16": fixed, "adaptive": adaptive, "fixed16_same_batch": same}
    timings = interleaved(calls, reps=args.reps)
    record["timings"] = timings
    base = timings["fixed16"]["median_s"]
    record["ratio_adaptive_to_fixed16"] = timings["adaptive"]["median_s"] / base
    same_base = timings["fixed16_same_batch"]["median_s"]
    record["ratio_adaptive_to_fixed16_same_batch"] = timings["adaptive"]["median_s"] / same_base
    pairs = zip(timings["adaptive"]["times_s"], timings["fixed16"]["times_s"], strict=True)
    record["ratio_adaptive_to_fixed16_paired_median"] = float(np.median([a / f for a, f in pairs]))
    if not args.skip_traced:
        timings["adaptive_traced"] = traced.time(reps=args.reps, budget_s=args.budget).as_dict()
        record["ratio_traced_to_fixed16"] = timings["adaptive_traced"]["median_s"] / base
    return record


def hard_cases(args, key) -> list[tuple[str, object, object, object]]:
    """``(name, apply_fn, params, xs)`` of the issue's hard cases (float64)."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    n = args.hard_n
    theta = jax.random.normal(k1, (8,))
    xs = jax.random.normal(k2, (n, 8))
    sin_xs = xs * (60.0 * jnp.linspace(1.0 / n, 1.0, n) / jnp.abs(xs @ theta))[:, None]  # |<θ, x>| <= 60
    cases = [("sin_index", HARD_MODELS["sin_index"], theta, sin_xs)]
    tanh_params = mlp_params(k3, (8, 32, 32, 1), jnp.float64)
    cases.append(("tanh_x25", HARD_MODELS["tanh_x25"], tanh_params, 25 * xs))
    relu = [layer | {"b": 5 * layer["b"]} for layer in mlp_params(k4, (8, 16, 16, 1), jnp.float64)]
    cases.append(("relu_biases", HARD_MODELS["relu_biases"], relu, jax.random.normal(k5, (n, 8))))
    return cases


def random_models(args, key):
    chosen = {name for name in args.activations.split(",") if name}  # names checked by parse_args
    for j, (name, model) in enumerate(RANDOM_ACTIVATIONS.items()):
        if name not in chosen:
            continue
        for i in range(args.models):  # model i of each activation: its own weights and inputs
            kp, kx, ks = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, j), i), 3)
            params = mlp_params(kp, (4, 8, 8, 1), jnp.float64)
            params = jax.tree.map(lambda a: 2 * a, params)
            scale = jax.random.uniform(ks, (), minval=1.0, maxval=5.0)
            yield f"{name}_{i}", model, params, scale * jax.random.normal(kx, (max(4, args.hard_n // 10), 4))


def measure_case(args, model, params, xs, *, smooth: bool = True, limit: float | None = None) -> dict:
    """One case's identity errors, panels and reliability, then (correctness first) its time: not timed
    (``median_s`` None) when the default's identity error exceeds ``limit``, or (smooth integrands) its
    true error against the 128-node rule exceeds :data:`HARD_RTOL` (the case's checks: the identity alone
    misses an error orthogonal to θ)."""
    fixed = nj.adjoint(model, params, xs, num_nodes=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", nj.QuadratureWarning)
        adj, info = nj.adjoint(model, params, xs, return_info=True)
    panels = np.asarray(info.panels)
    out = {
        "fixed16_identity": identity_error(model, params, xs, fixed),
        "adaptive_identity": identity_error(model, params, xs, adj),
        "max_estimated_error": float(np.max(info.error)),
        "panels_mean": float(panels.mean()),
        "panels_max": int(panels.max()),
        "gradients_per_example": 16 + 18 * float(panels.mean() - 1),  # refined panels: 16 nodes + ends
        "warnings": len(caught),
        "median_s": None,
        "reliability": estimate_reliability(model, params, xs, adj, info) if smooth else None,
    }
    if (limit is None or out["adaptive_identity"] <= limit) and true_error_ok(out):
        timing = eager_timing(lambda: nj.adjoint(model, params, xs), reps=args.reps, budget_s=args.budget)
        out["median_s"] = timing["median_s"]
    return out


def true_error_ok(case: dict) -> bool:
    """Whether the accepted examples' worst true error (against 128 nodes) is within :data:`HARD_RTOL`
    (true for a non-smooth case, which has no 128-node reference)."""
    reliability = case["reliability"]
    return reliability is None or reliability["worst_over_rtol"] * RELIABILITY_RTOL <= HARD_RTOL


def run_hard(args, root) -> dict:
    k_hard, k_random, k_saturating = (jax.random.fold_in(root, i) for i in (2, 4, 5))  # see main
    with jax.enable_x64(True):
        out = {
            name: measure_case(args, m, p, x, smooth=name != "relu_biases", limit=HARD_RTOL)
            for name, m, p, x in hard_cases(args, k_hard)
        }
        rand = {
            name: measure_case(args, m, p, x, limit=HARD_RTOL)
            for name, m, p, x in random_models(args, k_random)
        }
        saturating = {  # no identity limit; the true error is checked (and gates the timing)
            name: measure_case(args, m, p, x) for name, m, p, x in saturating_cases(args, k_saturating)
        }
    summary = {
        "count": len(rand),
        "fixed16_missing_1e-9": sum(r["fixed16_identity"] > 1e-9 for r in rand.values()),
        "fixed16_worst": max(r["fixed16_identity"] for r in rand.values()),
        "adaptive_worst": max(r["adaptive_identity"] for r in rand.values()),
        "panels_mean": float(np.mean([r["panels_mean"] for r in rand.values()])),
        "accepted_above_rtol": sum(r["reliability"]["accepted_above_rtol"] for r in rand.values()),
        "worst_over_rtol": max(r["reliability"]["worst_over_rtol"] for r in rand.values()),
    }
    checks = {f"{k}_identity": check(v["adaptive_identity"], HARD_RTOL) for k, v in out.items()}
    checks["random_models_identity_worst"] = check(summary["adaptive_worst"], HARD_RTOL)
    # the true error of accepted examples against the 128-node rule (smooth integrands)
    for name, case in [*out.items(), *saturating.items()]:
        if case["reliability"] is not None:
            worst = case["reliability"]["worst_over_rtol"] * RELIABILITY_RTOL
            checks[f"{name}_true_error"] = check(worst, HARD_RTOL)
    checks["random_models_true_error_worst"] = check(summary["worst_over_rtol"] * RELIABILITY_RTOL, HARD_RTOL)
    return {"hard": out, "random_models": summary, "saturating": saturating, "checks": checks}


def run_roundoff(args, key) -> dict:
    """The float32 tanh MLP with inputs ×25: rounding noise above rtol, against the float64 truth."""
    kp, kx = jax.random.split(key)
    params = mlp_params(kp, (8, 32, 32, 1), jnp.float32)
    xs = 25 * jax.random.normal(kx, (args.roundoff_n, 8), jnp.float32)
    with jax.enable_x64(True):
        to64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
        ref = np.asarray(nj.adjoint(MLP, jax.tree.map(to64, params), to64(xs)))

    def true_error(adj):
        err = np.linalg.norm(np.asarray(adj, np.float64) - ref, axis=1) / np.linalg.norm(ref, axis=1)
        return {"max": float(err.max()), "median": float(np.median(err))}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", nj.QuadratureWarning)
        adj, info = nj.adjoint(MLP, params, xs, return_info=True)
    panels = np.asarray(info.panels)
    out = {
        "n": args.roundoff_n,
        "true_error": true_error(adj),
        "panels_mean": float(panels.mean()),
        "panels_max": int(panels.max()),
        "roundoff_examples": int(np.sum(np.asarray(info.roundoff))),
        "unconverged": int(np.sum(~np.asarray(info.converged))),
        "warnings": [str(w.message) for w in caught],
        "median_s": None,
    }
    for nodes in (16, 64):
        out[f"fixed{nodes}_true_error"] = true_error(nj.adjoint(MLP, params, xs, num_nodes=nodes))
    out["checks"] = {"roundoff_true_error_max": check(out["true_error"]["max"], 1e-5)}
    if all_ok(out["checks"]):  # correctness first: a wrong result is not timed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", nj.QuadratureWarning)
            timing = eager_timing(lambda: nj.adjoint(MLP, params, xs), reps=args.reps, budget_s=args.budget)
        out["median_s"] = timing["median_s"]
    return out


#: The tolerance the reliability counts against (``worst_over_rtol`` is the worst true error over it).
RELIABILITY_RTOL = 1e-12


def estimate_reliability(model, params, xs, adj, info, rtol: float = RELIABILITY_RTOL) -> dict:
    """Accepted examples whose true error (against a 128-node rule: smooth integrands only) exceeds
    ``rtol``: how many, and the worst true error over ``rtol``."""
    ref = np.asarray(nj.adjoint(model, params, xs, num_nodes=128))
    flat = lambda a: np.asarray(a).reshape(a.shape[0], -1)  # noqa: E731
    true = np.linalg.norm(flat(adj) - flat(ref), axis=1) / np.linalg.norm(flat(ref), axis=1)
    accepted = np.asarray(info.converged)
    worst = float(np.max(true[accepted], initial=0.0)) / rtol
    return {"accepted_above_rtol": int(np.sum(accepted & (true > rtol))), "worst_over_rtol": worst}


def saturating_cases(args, key):
    """``(name, model, params, xs)``: 8-32-32-1 MLPs with inputs ×5, where activations saturate."""
    chosen = {name for name in args.saturating.split(",") if name}
    for i, (name, model) in enumerate(RANDOM_ACTIVATIONS.items()):
        if name not in chosen:
            continue
        kp, kx = jax.random.split(jax.random.fold_in(key, i))
        yield (
            f"{name}_x5",
            model,
            mlp_params(kp, (8, 32, 32, 1), jnp.float64),
            5 * jax.random.normal(kx, (args.hard_n, 8)),
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probes is not None:  # before anything is traced: the probes are read at trace time
        adaptive.PROBES = args.probes
        jax.clear_caches()
    # One root: split(root) = fold_in(root, 0 and 1) for the benchmark MLP (the same weights and inputs as
    # bench_adjoint.py's main model); fold_in(root, ·): 2 hard cases, 3 roundoff, 4 random, 5 saturating.
    root = jax.random.key(args.seed)
    with jax.enable_x64(args.dtype == "float64"):
        dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
        record = {"bench": NAME, "params": vars(args), "environment": environment()}
        record["mlp"] = benchmark_mlp(args, dtype, root)
    if not record["mlp"]["ok"]:  # correctness first: nothing more is timed after a failed check
        record["skipped"] = "benchmark MLP check failed: hard, random, saturating and roundoff cases not run"
    elif not args.skip_hard:
        record |= run_hard(args, root)
    if args.roundoff_n and record["mlp"]["ok"]:
        record["roundoff"] = roundoff = run_roundoff(args, jax.random.fold_in(root, 3))
        record["checks"] = {**record.get("checks", {}), **roundoff["checks"]}
    record["checks"] = {**record["mlp"]["checks"], **record.get("checks", {})}
    record["ok"] = all_ok(record["checks"])
    report_failures(record["checks"])
    write_record(record, args.out, NAME, quiet=args.quiet)
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
