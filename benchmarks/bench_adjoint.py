"""Figure (b): per-example adjoints by quadrature, forward vs reverse mode, and where ``auto`` should switch.

Main model: an MLP with ``d = 8`` inputs, two tanh hidden layers of 32 and a scalar output, with biases
(``p = 1377``), ``n = 20,000`` examples, 16 Gauss-Legendre nodes. Timed: ``nj.adjoint`` with
``mode="reverse"``, ``"forward"`` and ``"auto"``, against the baseline a user would write first: a Python
loop over the nodes calling a jitted ``vmap(grad)`` at ``t_k θ`` and summing with the weights. Correctness
first: every mode against the baseline (float32: 1e-5, float64: 1e-10, max-norm relative) and the
identity ``<f*(θ), θ> + f(0) = f(θ)``.

Then a sweep over the parameter count ``p``: one-hidden-layer MLPs of growing width and single-index
models ``tanh(<θ, x>)`` with ``d = p``, and ``k = 10``-output models ``tanh(W x)`` (``p = k·d``), each
checked first against the loop baseline (``jax.jacrev`` for ``k`` outputs) and forward against reverse,
timing forward against reverse mode, to locate the crossover in ``p/k`` that
``nlis_jax._adjoint.FORWARD_MAX_PARAMS`` (forward when ``p <= FORWARD_MAX_PARAMS · k``) should match.

Then a CNN (flax: ``Conv(8, 3×3)`` relu ``avg_pool(2)`` ``Conv(16, 3×3)`` relu ``avg_pool(2)`` ``Dense(32)``
tanh ``Dense(1)`` on ``28×28`` images, ``p = 26,401``; ``n = 256``, 8 nodes): ``nj.adjoint(...,
mode="reverse")`` with its default chunk (on a CPU, for a model that convolves, the memory chunk with the
nodes in a ``lax.scan`` around a vmapped per-example gradient: ``nlis_jax._adjoint.nodes_outside``; one
example per chunk from 7db7af7 to 2026-12-04) against the same call with ``chunk_size=64`` (the default
before 7db7af7) and the loop baseline; ``--cnn-n 0`` skips it.

    python benchmarks/bench_adjoint.py                     # float32, the sizes above (forward: minutes)
    python benchmarks/bench_adjoint.py --dtype float64
    python benchmarks/bench_adjoint.py --modes reverse,auto   # main model without the slow forward mode
    python benchmarks/bench_adjoint.py --n 256 --sweep-n 256 --widths 1,4 --index-dims 2 --output-dims 1
    python benchmarks/bench_adjoint.py --modes reverse --n 2048 --no-sweep   # quick main model, the CNN
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    Compiled,
    all_ok,
    base_parser,
    check,
    max_rel_error,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    positive_int_list,
    progress,
    report_failures,
    run_and_write,
    time_eager,
)
from jax.flatten_util import ravel_pytree

import nlis_jax as nj
from nlis_jax._adjoint import FORWARD_MAX_PARAMS, fixed_rule_chunk_size, flatten_model
from nlis_jax.experiments import nets
from nlis_jax.models import from_linen

NAME = "bench_adjoint"
MODES = ("reverse", "forward", "auto")
SWEEP_MODES = ("forward", "reverse")
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
MLP = nets.mlp(jnp.tanh)  # one object each: a static argument of nj.adjoint's jit
SINGLE_INDEX = nets.single_index(jnp.tanh)
OLD_CNN_CHUNK = 64  # the CNN's reverse-mode CPU chunk before 7db7af7: max(64, 2^18 / p), p = 26,401


def str_list(text: str) -> list[str]:
    modes = [v for v in text.split(",") if v]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    if not modes:  # '' or ',' ran the loop baseline alone: a record with no subject timed, ok True
        raise argparse.ArgumentTypeError(f"must list at least one mode, got {text!r}; choose from {MODES}")
    return modes


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=positive_int, default=20_000, help="examples (main model)")
    parser.add_argument("--d", type=positive_int, default=8, help="MLP inputs")
    parser.add_argument(
        "--hidden", type=positive_int_list, default=[32, 32], help="hidden widths, comma separated"
    )
    parser.add_argument("--nodes", type=positive_int, default=16, help="Gauss-Legendre nodes")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    parser.add_argument(
        "--budget", type=nonnegative_float, default=30.0, help="seconds of repeats per case (>= 1 rep)"
    )
    parser.add_argument("--sweep-n", type=positive_int, default=4096, help="examples in the p sweep")
    parser.add_argument(
        "--widths",
        type=positive_int_list,
        default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 150],
        help="one-hidden-layer widths of the sweep (p = (d + 2)·h + 1)",
    )
    parser.add_argument(
        "--index-dims",
        type=positive_int_list,
        default=[2, 4, 8, 12, 16, 24, 32, 64],
        help="single-index d (p = d)",
    )
    parser.add_argument(
        "--outputs", type=positive_int, default=10, help="k of the multi-output sweep model tanh(W x)"
    )
    parser.add_argument(
        "--output-dims",
        type=positive_int_list,
        default=[1, 2, 4, 8, 16],
        help="inputs d of tanh(W x) (p = k·d)",
    )
    parser.add_argument(
        "--modes", type=str_list, default=list(MODES), help="modes for the main model (forward takes minutes)"
    )
    parser.add_argument("--no-sweep", action="store_true", help="no p sweep")
    parser.add_argument("--cnn-n", type=nonnegative_int, default=256, help="CNN examples (0: no CNN case)")
    parser.add_argument("--cnn-size", type=positive_int, default=28, help="CNN image side (>= 4)")
    parser.add_argument("--cnn-nodes", type=positive_int, default=8, help="Gauss-Legendre nodes (CNN)")
    args = parser.parse_args(argv)
    if args.cnn_size < 4:  # two 2×2 pools
        parser.error(f"argument --cnn-size: must be an integer >= 4 (two 2x2 pools), got {args.cnn_size}")
    return args


# ------------------------------------------------------------------------------------------ the models
@functools.partial(jax.jit, static_argnames=("sizes", "dtype"))  # one compile, not one per eager op
def mlp_params(key, sizes: tuple[int, ...], dtype):
    """``nets.mlp_init`` weights with small random biases (zero biases would make their columns trivial)."""
    kw, kb = jax.random.split(key)
    params = nets.mlp_init(kw, sizes, dtype=dtype)
    bias_keys = jax.random.split(kb, len(params))
    return [
        layer | {"b": 0.1 * jax.random.normal(k, layer["b"].shape, dtype)}
        for layer, k in zip(params, bias_keys, strict=True)
    ]


def adjoint_fn(model, *, mode: str, num_nodes: int, chunk_size: int | None = None):
    """``(params, xs) -> nj.adjoint(model, params, xs, ...)``: all arrays are arguments."""

    def fn(params, xs):
        return nj.adjoint(model, params, xs, num_nodes=num_nodes, mode=mode, chunk_size=chunk_size)

    return fn


def auto_choice(p: int, k: int = 1) -> str:
    """The mode ``"auto"`` takes (nlis_jax: forward when ``p <= FORWARD_MAX_PARAMS · k``)."""
    return "forward" if p <= FORWARD_MAX_PARAMS * k else "reverse"


# ------------------------------------------------------------------------------------------- baseline
class LoopBaseline:
    """The straightforward adjoint: ``Σ_k w_k · vmap(grad f)(t_k θ, X)`` with a Python loop over nodes.

    ``grad`` is taken with respect to the point ``u = t_k θ`` (the gradient AT ``t_k θ``), one jitted
    ``vmap(grad)`` call per node; the scaling and the weighted sum run eagerly, as in a plain loop. A
    model with ``k`` outputs gets ``jax.jacrev`` instead of ``jax.grad``: adjoints of shape ``(n, k, p)``.
    """

    def __init__(self, model, params, xs, num_nodes: int):
        self.theta, unravel = ravel_pytree(params)
        self.xs = xs
        nodes, weights = nj.quadrature.gauss_legendre(num_nodes, self.theta.dtype)
        self.nodes_weights = list(zip(nodes, weights, strict=True))
        scalar = jax.eval_shape(model, params, xs[0]).shape == ()
        derivative = jax.grad if scalar else jax.jacrev
        per_example_grad = jax.vmap(derivative(lambda flat, x: model(unravel(flat), x)), in_axes=(None, 0))
        self.grad = Compiled(per_example_grad, self.theta, xs)
        self.shape = jax.eval_shape(per_example_grad, self.theta, xs).shape  # (n, p) or (n, k, p)

    def __call__(self):
        acc = jnp.zeros(self.shape, self.theta.dtype)
        for t, w in self.nodes_weights:
            acc = acc + w * self.grad.compiled(t * self.theta, self.xs)
        return jax.block_until_ready(acc)


# ------------------------------------------------------------------------------------------ main model
def identity_error(model, params, xs, adj) -> float:
    """``max |<f*_i, θ> + f_i(0) − f_i(θ)| / max |f_i(θ)|``, in float64 on the host."""
    theta, unravel = ravel_pytree(params)
    outputs = jax.vmap(model, in_axes=(None, 0))
    f_theta = np.asarray(outputs(params, xs), np.float64)
    f_zero = np.asarray(outputs(unravel(jnp.zeros_like(theta)), xs), np.float64)
    lhs = np.asarray(adj, np.float64) @ np.asarray(theta, np.float64) + f_zero
    return float(np.max(np.abs(lhs - f_theta)) / np.max(np.abs(f_theta)))


def main_model(args, dtype) -> dict:
    sizes = (args.d, *args.hidden, 1)
    kp, kx = jax.random.split(jax.random.key(args.seed))
    params = mlp_params(kp, sizes, dtype)
    xs = jax.random.normal(kx, (args.n, args.d), dtype)
    p = ravel_pytree(params)[0].shape[0]
    tol = TOLERANCE[args.dtype]

    baseline = LoopBaseline(MLP, params, xs, args.nodes)
    ref = baseline()
    modes = args.modes
    runs = {m: Compiled(adjoint_fn(MLP, mode=m, num_nodes=args.nodes), params, xs) for m in modes}
    outs = {m: run() for m, run in progress(runs.items(), desc="check modes", quiet=args.quiet)}
    checks = {f"{m}_vs_loop_max_rel": check(max_rel_error(outs[m], ref), tol) for m in modes}
    checks["identity_max_rel"] = check(identity_error(MLP, params, xs, ref), 10 * tol)  # of the baseline
    record = {"sizes": sizes, "p": p, "auto_mode": auto_choice(p), "checks": checks, "ok": all_ok(checks)}
    if not record["ok"]:
        return record

    record["timings"] = timings = _time_with_loop(baseline, runs, modes, args, "time modes")
    loop_s = timings["loop_baseline"]["median_s"]
    record["speedup_vs_loop"] = {m: loop_s / timings[m]["median_s"] for m in modes}
    return record


def _time_with_loop(baseline, runs, names, args, desc: str) -> dict:
    """Steady-state timings of the loop baseline and of ``runs[name]`` for each name (one budget)."""
    budget = dict(reps=args.reps, budget_s=args.budget)
    loop = time_eager(baseline, **budget)._replace(compile_s=baseline.grad.compile_s)
    timings = {"loop_baseline": loop.as_dict()}
    for name in progress(names, desc=desc, quiet=args.quiet):
        timings[name] = runs[name].time(**budget).as_dict()
    return timings


# ---------------------------------------------------------------------------------------------- sweep
def multi_output(W, x):
    """``tanh(W x)``: ``k`` outputs, ``W`` of shape ``(k, d)``, ``p = k·d`` (reverse needs ``k`` vjps)."""
    return jnp.tanh(W @ x)


def sweep_cases(args) -> list[tuple[str, int]]:
    return (
        [("mlp_1_hidden", w) for w in args.widths]
        + [("single_index", d) for d in args.index_dims]
        + [(f"multi_output_k{args.outputs}", d) for d in args.output_dims]
    )


def sweep_model(family: str, size: int, args, dtype, key):
    """``(model, params, input_dim)`` of a sweep case; ``size`` is the hidden width or the input dim."""
    if family == "mlp_1_hidden":
        return MLP, mlp_params(key, (args.d, size, 1), dtype), args.d
    if family == "single_index":
        return SINGLE_INDEX, jax.random.normal(key, (size,), dtype) / math.sqrt(size), size
    return multi_output, jax.random.normal(key, (args.outputs, size), dtype) / math.sqrt(size), size


def sweep_point(family: str, size: int, args, dtype, key) -> dict:
    """Forward and reverse adjoints of one model: checked against the loop baseline (the same nodes, a
    per-example ``jax.grad``, or ``jax.jacrev`` for ``k`` outputs) and against each other, then timed."""
    k_model, k_x = jax.random.split(key)
    model, params, d = sweep_model(family, size, args, dtype, k_model)
    xs = jax.random.normal(k_x, (args.sweep_n, d), dtype)
    p = ravel_pytree(params)[0].shape[0]
    k = math.prod(jax.eval_shape(model, params, xs[0]).shape)
    ref = LoopBaseline(model, params, xs, args.nodes)()
    runs = {m: Compiled(adjoint_fn(model, mode=m, num_nodes=args.nodes), params, xs) for m in SWEEP_MODES}
    outs = {m: run() for m, run in runs.items()}
    diff = max_rel_error(outs["forward"], outs["reverse"])
    vs_loop = max(max_rel_error(outs[m], ref) for m in SWEEP_MODES)
    point = {"family": family, "size": size, "p": p, "k": k, "forward_vs_reverse_max_rel": diff}
    point["vs_loop_max_rel"] = vs_loop  # the worse of the two modes
    if max(diff, vs_loop) > TOLERANCE[args.dtype]:
        return point
    times = {m: runs[m].time(reps=args.reps, budget_s=args.budget).median_s for m in SWEEP_MODES}
    best, auto = min(times, key=times.get), auto_choice(p, k)
    return point | {
        "forward_s": times["forward"],
        "reverse_s": times["reverse"],
        "forward_over_reverse": times["forward"] / times["reverse"],
        "best": best,
        "auto": auto,
        "auto_over_best": times[auto] / times[best],
    }


def crossover(points: list[dict]) -> dict:
    """Where ``t_forward / t_reverse`` first reaches 1 along increasing ``p/k`` (log-log interpolation).

    ``forward_max_p_per_output`` estimates the largest ``p/k`` at which forward mode still wins: the
    crossing; just below the smallest ``p/k`` when reverse already wins there; or the largest ``p/k``
    measured when forward wins throughout (then a lower bound). ``auto`` should switch there.
    """
    pts = sorted(points, key=lambda pt: pt["p"] / pt["k"])
    xs, ratios = [pt["p"] / pt["k"] for pt in pts], [pt["forward_over_reverse"] for pt in pts]
    result = {"p_per_output": xs, "forward_over_reverse": ratios}
    first = next((i for i, r in enumerate(ratios) if r >= 1.0), None)
    if first is None:  # forward wins throughout: a lower bound
        return result | {"crossover": None, "forward_max_p_per_output": xs[-1], "note": "forward wins"}
    if first == 0:  # reverse wins throughout
        below = math.ceil(xs[0]) - 1
        return result | {"crossover": None, "forward_max_p_per_output": below, "note": "reverse wins"}
    (x0, r0), (x1, r1) = (xs[first - 1], ratios[first - 1]), (xs[first], ratios[first])
    crossing = math.exp(math.log(x0) - math.log(r0) * math.log(x1 / x0) / math.log(r1 / r0))
    return result | {
        "crossover": crossing,
        "forward_max_p_per_output": math.floor(crossing),
        "between": [x0, x1],
        "reverse_wins_after": all(r >= 1.0 for r in ratios[first:]),
    }


def threshold_verdict(points: list[dict], crossovers: dict, *, slack: float = 1.1) -> dict:
    """Does ``auto`` (forward iff ``p <= FORWARD_MAX_PARAMS · k``) pick a mode within ``slack`` of best?"""
    timed_points = [pt for pt in points if "best" in pt]
    keys = ("family", "p", "k", "auto", "best", "auto_over_best")
    wrong = [{key: pt[key] for key in keys} for pt in timed_points if pt["auto_over_best"] > slack]
    estimates = [c["forward_max_p_per_output"] for c in crossovers.values()]
    return {
        "FORWARD_MAX_PARAMS": FORWARD_MAX_PARAMS,
        "slack": slack,
        "mismatches": wrong,
        "matches": not wrong,
        "recommended_FORWARD_MAX_PARAMS": max(0, min(estimates)) if estimates else None,
        "worst_auto_over_best": max((pt["auto_over_best"] for pt in timed_points), default=None),
    }


def sweep(args, dtype) -> dict:
    base = jax.random.key(args.seed + 1)
    cases = sweep_cases(args)
    points = [
        sweep_point(family, size, args, dtype, jax.random.fold_in(base, i))
        for i, (family, size) in enumerate(progress(cases, desc="p sweep", quiet=args.quiet))
    ]
    diffs = [pt["forward_vs_reverse_max_rel"] for pt in points]
    checks = {"sweep_forward_vs_reverse_max_rel": check(max(diffs), TOLERANCE[args.dtype])}
    vs_loop = [pt["vs_loop_max_rel"] for pt in points]
    checks["sweep_vs_loop_max_rel"] = check(max(vs_loop), TOLERANCE[args.dtype])
    timed_points = [pt for pt in points if "best" in pt]
    families = sorted({pt["family"] for pt in timed_points})
    crossovers = {f: crossover([pt for pt in timed_points if pt["family"] == f]) for f in families}
    return {
        "checks": checks,
        "points": points,
        "crossover": crossovers,
        "threshold": threshold_verdict(points, crossovers),
    }


# ------------------------------------------------------------------------------------------------ CNN
def small_cnn(dtype) -> linen.Module:
    """One image ``(s, s)`` -> a scalar: ``Conv(8, 3×3)`` relu ``avg_pool(2)`` ``Conv(16, 3×3)`` relu
    ``avg_pool(2)`` ``Dense(32)`` tanh ``Dense(1)`` (SAME convolutions; ``s = 28``: ``p = 26,401``).

    A ``linen.Sequential``, not a ``linen.Module`` subclass: a subclass is a dataclass, which needs its
    module in ``sys.modules`` (the smoke tests load this script by path)."""
    kw = dict(dtype=dtype, param_dtype=dtype)

    def pool(h):
        return linen.avg_pool(h, (2, 2), (2, 2))

    return linen.Sequential(
        [
            lambda x: x[..., None],
            linen.Conv(8, (3, 3), **kw),
            linen.relu,
            pool,
            linen.Conv(16, (3, 3), **kw),
            linen.relu,
            pool,
            lambda h: h.reshape(-1),
            linen.Dense(32, **kw),
            jnp.tanh,
            linen.Dense(1, **kw),
            lambda y: y[0],
        ]
    )


def cnn_case(args, dtype) -> dict:
    """A model that convolves: ``nj.adjoint(mode="reverse")`` with its default chunk (the memory chunk,
    nodes outside, on a CPU) against ``chunk_size=64`` and the loop baseline, checked, then timed."""
    kp, kx = jax.random.split(jax.random.key(args.seed + 2))
    xs = jax.random.normal(kx, (args.cnn_n, args.cnn_size, args.cnn_size), dtype)
    module = small_cnn(dtype)
    model, params = from_linen(module, module.init(kp, xs[0]))
    p = ravel_pytree(params)[0].shape[0]
    convolves = flatten_model(model, params, xs).convolves
    tol, q = TOLERANCE[args.dtype], args.cnn_nodes

    baseline = LoopBaseline(model, params, xs, q)
    ref = baseline()
    runs = {
        "reverse": Compiled(adjoint_fn(model, mode="reverse", num_nodes=q), params, xs),
        f"reverse_chunk{OLD_CNN_CHUNK}": Compiled(
            adjoint_fn(model, mode="reverse", num_nodes=q, chunk_size=OLD_CNN_CHUNK), params, xs
        ),
    }
    outs = {name: run() for name, run in progress(runs.items(), desc="check CNN", quiet=args.quiet)}
    checks = {f"cnn_{name}_vs_loop_max_rel": check(max_rel_error(outs[name], ref), tol) for name in runs}
    checks["cnn_identity_max_rel"] = check(identity_error(model, params, xs, ref), 10 * tol)
    record = {
        "image_side": args.cnn_size,
        "n": args.cnn_n,
        "nodes": q,
        "p": p,
        "convolves": convolves,
        "default_chunk_size": fixed_rule_chunk_size(args.cnn_n, p, 1, "reverse", convolves),
        "checks": checks,
        "ok": all_ok(checks),
    }
    if not record["ok"]:
        return record

    record["timings"] = timings = _time_with_loop(baseline, runs, list(runs), args, "time CNN")
    default_s = timings["reverse"]["median_s"]
    record["time_over_reverse"] = {name: t["median_s"] / default_s for name, t in timings.items()}
    return record


# ----------------------------------------------------------------------------------------------- main
def run(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    record = {"main": main_model(args, dtype)}
    checks = dict(record["main"]["checks"])
    if record["main"]["ok"] and not args.no_sweep:
        record["sweep"] = sweep(args, dtype)
        checks |= record["sweep"]["checks"]
    if args.cnn_n:
        record["cnn"] = cnn_case(args, dtype)
        checks |= record["cnn"]["checks"]
    record["ok"] = all_ok(checks)
    if not record["ok"]:
        report_failures(checks)
    return record


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_and_write(NAME, args, run, x64=args.dtype == "float64")


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
