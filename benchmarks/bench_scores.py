"""Figure (a): leverage scores of a single-index model's dual matrix against the two-BLAS-pass floor.

The model is ``f(θ; x) = ϕ(<θ, x>)`` with the bounded Swish ``ϕ``; its dual matrix
``F̃ = [F* | f(0) − y]`` (``n × (d+1)``, float64, or float32 with ``--dtype float32``) comes from the closed
form ``nj.single_index_adjoint``. Timed: ``nj.leverage_scores(F̃)`` (jitted, and the eager public call),
against the floor ``2 × median(FᵀF)`` in numpy (same process; the three timed round robin); for context
Householder-QR leverage (jax), the numpy SVD (the reference), the end-to-end closed form + scores, and the
same through the quadrature adjoint (``nj.dual_matrix``). Correctness first: scores against the SVD
reference (target max relative error ≤ 1e-10; 1e-4 in float32; the jitted and the eager call) and the
closed-form dual against the quadrature dual.

    python benchmarks/bench_scores.py                       # n = 200,000, d = 64
    python benchmarks/bench_scores.py --n 2000 --d 8 --reps 3
    python benchmarks/bench_scores.py --dtype float32
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    Compiled,
    all_ok,
    base_parser,
    check,
    gram_floor,
    interleaved,
    max_rel_error,
    positive_int,
    progress,
    report_failures,
    run_and_write,
    time_eager,
    timed,
    xla_gram,
)

import nlis_jax as nj

NAME = "bench_scores"
RATIO_TARGET = 1.2  # jitted; the eager public call (input checks included): EAGER_RATIO_TARGET
EAGER_RATIO_TARGET = 1.5
SCORE_RTOL_TARGET = {"float64": 1e-10, "float32": 1e-4}  # float32: eps32·κ with κ ≈ 5 here, and margin
DUAL_RTOL = {"float64": 1e-10, "float32": 1e-5}


def MODEL(theta, x):  # one object: a static argument of nj.dual_matrix's jit
    """The single-index model ``ϕ(<θ, x>)`` with the bounded Swish ``ϕ``."""
    return nj.bounded_swish(jnp.dot(x, theta))


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=positive_int, default=200_000, help="examples")
    parser.add_argument(
        "--d", type=positive_int, default=64, help="features (the dual matrix has d + 1 columns)"
    )
    parser.add_argument(
        "--nodes", type=positive_int, default=16, help="Gauss-Legendre nodes of the quadrature dual"
    )
    parser.add_argument(
        "--svd-reps", type=positive_int, default=3, help="timed repeats of the (slow) numpy SVD"
    )
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="of the data")
    return parser.parse_args(argv)


@functools.partial(jax.jit, static_argnames=("n", "d"))  # one compile, not one per eager op
def make_data(key, n: int, d: int):
    """Gaussian design, a planted ``θ*``, ``y = ϕ(Xθ*) + noise``, and a scoring point ``θ`` away from it."""
    kx, ks, kt, ke = jax.random.split(key, 4)
    X = jax.random.normal(kx, (n, d), jnp.float64)
    theta_star = jax.random.normal(ks, (d,), jnp.float64) / np.sqrt(d)
    theta = theta_star + 0.3 * jax.random.normal(kt, (d,), jnp.float64) / np.sqrt(d)
    y = nj.bounded_swish(X @ theta_star) + 0.1 * jax.random.normal(ke, (n,), jnp.float64)
    return theta, X, y


def closed_form_dual(theta, X, y):
    """``[F* | ϕ(0) − y]`` from the closed form ``F* = diag((ϕ(z) − ϕ(0))/z) X``."""
    offset = nj.bounded_swish(jnp.zeros((), X.dtype)) - y
    return jnp.concatenate([nj.single_index_adjoint(nj.bounded_swish, theta, X), offset[:, None]], axis=1)


def quadrature_dual(theta, X, y, *, num_nodes):
    return nj.dual_matrix(MODEL, theta, X, y, num_nodes=num_nodes)


def closed_form_scores(theta, X, y):
    return nj.leverage_scores(closed_form_dual(theta, X, y))


def quadrature_scores(theta, X, y, *, num_nodes):
    return nj.leverage_scores(quadrature_dual(theta, X, y, num_nodes=num_nodes))


def qr_leverage(F):
    """Householder-QR leverage (assumes full column rank, as the SVD reference confirms)."""
    Q = jnp.linalg.qr(F)[0]
    return jnp.sum(jnp.square(Q), axis=1) / F.shape[1]


def svd_leverage(F: np.ndarray) -> tuple[np.ndarray, int]:
    """Reference leverage from numpy's thin SVD, with numpy's rank tolerance ``max(n, m)·eps·σ_max``."""
    U, s, _ = np.linalg.svd(F, full_matrices=False)
    rank = int(np.sum(s > max(F.shape) * np.finfo(F.dtype).eps * s[0]))
    return np.sum(np.square(U[:, :rank]), axis=1) / rank, rank


def scores_rel_error(tau, tau_ref) -> float:
    """``max_i |τ_i − τ_ref,i| / τ_ref,i``: the largest relative error of any one score, in float64."""
    return float(np.max(np.abs(np.asarray(tau, np.float64) - tau_ref) / tau_ref))


def correctness(F, F_quadrature, tau, rank, reference) -> dict:
    """Scores and rank against the SVD ``reference = (tau_ref, rank_ref)``; closed form vs quadrature."""
    tau_ref, rank_ref = reference
    tau64 = np.asarray(tau, np.float64)
    dtype = np.dtype(F.dtype).name
    sum_tol = 1e-12 if dtype == "float64" else 1e-5
    return {
        "scores_vs_svd_max_rel": check(scores_rel_error(tau64, tau_ref), SCORE_RTOL_TARGET[dtype]),
        "scores_sum_minus_1": check(abs(tau64.sum() - 1.0), sum_tol),
        "scores_nonnegative_min": check(tau64.min(), 0.0, at_least=True),
        "rank_matches_svd": check(abs(int(rank) - rank_ref), 0),
        "closed_form_vs_quadrature_dual": check(max_rel_error(F_quadrature, F), DUAL_RTOL[dtype]),
    }


def run(args) -> dict:
    data = make_data(jax.random.key(args.seed), args.n, args.d)
    theta, X, y = (jnp.asarray(a, args.dtype) for a in data)
    quad = functools.partial(quadrature_dual, num_nodes=args.nodes)

    # Correctness before timing: closed form vs quadrature, then scores vs the SVD reference.
    dual = Compiled(closed_form_dual, theta, X, y)
    F = dual()
    F_np = np.asarray(F)
    lev = Compiled(nj.leverage_scores, F)
    tau = lev()
    _, rank, route = nj.orthonormal_basis(F)
    tau_ref, rank_ref = svd_leverage(F_np.astype(np.float64))  # exact leverage of the data as given
    checks = correctness(F, quad(theta, X, y), tau, rank, (tau_ref, rank_ref))
    # The eager public call is timed too (ratio_eager): it runs the input checks and may take another
    # route than the jitted call (concrete float32 input: the host float64 Gram or the staged sketch).
    eager_err = scores_rel_error(nj.leverage_scores(F), tau_ref)
    checks["eager_scores_vs_svd_max_rel"] = check(eager_err, SCORE_RTOL_TARGET[np.dtype(F.dtype).name])
    route_name = nj.routes.ROUTES[int(route)]
    record = {"checks": checks, "ok": all_ok(checks), "route": route_name, "rank": int(rank)}
    if not record["ok"]:
        report_failures(checks)
        return record
    qr = Compiled(qr_leverage, F)
    record["qr_scores_vs_svd_max_rel"] = float(np.max(np.abs(np.asarray(qr()) - tau_ref) / tau_ref))

    reps = args.reps
    # The figure: floor, jitted and eager leverage, timed round robin (same load for all three).
    record["timings_interleaved"] = interleaved(
        {
            "numpy_gram": lambda: F_np.T @ F_np,
            "xla_gram": xla_gram(F_np),
            "leverage_scores": lev,
            "leverage_scores_eager": lambda: nj.leverage_scores(F),
        },
        reps=reps,
    )
    quad_scores = functools.partial(quadrature_scores, num_nodes=args.nodes)
    tasks = {
        "floor_numpy": lambda: gram_floor(F_np, reps=reps),
        "leverage_scores": lambda: lev.time(reps=reps).as_dict(),
        "leverage_scores_eager": lambda: time_eager(lambda: nj.leverage_scores(F), reps=reps).as_dict(),
        "qr_leverage_jax": lambda: qr.time(reps=reps).as_dict(),
        "svd_numpy": lambda: time_eager(lambda: svd_leverage(F_np), reps=args.svd_reps).as_dict(),
        "closed_form_dual": lambda: dual.time(reps=reps).as_dict(),
        "end_to_end_closed_form": lambda: timed(closed_form_scores, theta, X, y, reps=reps).as_dict(),
        "end_to_end_quadrature": lambda: timed(quad_scores, theta, X, y, reps=reps).as_dict(),
    }
    timings = {name: task() for name, task in progress(tasks.items(), desc=NAME, quiet=args.quiet)}

    inter = record["timings_interleaved"]
    floor_s = 2 * inter["numpy_gram"]["median_s"]
    record["timings"] = timings
    record["floor_s"] = floor_s
    record["ratio"] = inter["leverage_scores"]["median_s"] / floor_s
    record["ratio_eager"] = inter["leverage_scores_eager"]["median_s"] / floor_s
    record["floor_xla_s"] = 2 * inter["xla_gram"]["median_s"]
    record["ratio_xla_floor"] = inter["leverage_scores"]["median_s"] / record["floor_xla_s"]
    record["ratio_eager_xla_floor"] = inter["leverage_scores_eager"]["median_s"] / record["floor_xla_s"]
    record["ratio_of_minima"] = inter["leverage_scores"]["min_s"] / (2 * inter["numpy_gram"]["min_s"])
    record["ratio_target"] = RATIO_TARGET
    record["ratio_met"] = record["ratio"] <= RATIO_TARGET
    record["ratio_eager_target"] = EAGER_RATIO_TARGET
    record["ratio_eager_met"] = record["ratio_eager"] <= EAGER_RATIO_TARGET
    return record


def main(argv=None) -> dict:
    return run_and_write(NAME, parse_args(argv), run, x64=True)  # data made in float64, then cast


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
