"""Figure (c): leverage scores of an MLP, nlis_jax against the straightforward PyTorch ``torch.func`` code.

The MLP of figure (b) (``d = 8`` inputs, tanh hidden layers 32 and 32, scalar output, biases; ``p = 1377``),
``n = 20,000`` examples, 16 Gauss-Legendre nodes, float32. PyTorch, written the way one would first write
it: a Python loop over the nodes calling ``torch.func.vmap(torch.func.grad(f))`` at ``t_k θ`` (once with a
parameter dict through ``torch.func.functional_call``, once with a flat ``θ`` unflattened by hand), the
column ``f(0) − y``, then ``torch.linalg.qr`` leverage. nlis_jax: ``nj.dual_matrix`` + ``nj.leverage_scores``,
jitted as one program (compile time reported apart), and as a user calls them: the compiled dual matrix, then
the eager public ``nj.leverage_scores`` (``*_eager``; on a CPU its staged path may take route ``"gram"`` from
a float64 Gram matrix on the host, which a jitted program does not).

Correctness first. Dual matrices: torch against nlis_jax to 1e-4 (max-norm relative, float32). Scores: each
implementation against the exact leverage of the same float32 dual matrix (a float64 QR of it), by the total
variation distance ``½‖τ − τ_ref‖₁`` (every sampling probability of any event moves by at most that) and
``β = min τ/τ_ref`` (a β-approximation: the sample-size bound grows by the factor ``1/β``): nlis_jax (jitted,
eager and route ``"stable"``) to the issue's float32 targets TV ≤ 1e-4 and β ≥ 0.999 (at most 0.1 % more
samples), torch's float32 QR to TV ≤ 1e-3 and β ≥ 0.99 (``TV_LIMIT``, ``BETA_LIMIT``).
Elementwise relative error is recorded, not checked: perturbation theory bounds the float32 error of each
``τ_i`` only by about ``κ · eps32 / m`` in absolute terms, large against the smallest scores (the rows that
matter least for sampling).

PyTorch is a benchmark-only extra (``pip install -e .[bench]``, torch==2.13.0, CPU build); the library
never imports it.

    python benchmarks/bench_torch.py
    python benchmarks/bench_torch.py --n 256 --hidden 4,4 --nodes 4 --reps 1
    python benchmarks/bench_torch.py --leverage-only --reps 5   # the leverage step alone, without torch
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
    environment,
    interleaved,
    max_rel_error,
    positive_int,
    positive_int_list,
    progress,
    report_failures,
    time_eager,
    write_record,
    xla_gram,
)
from jax.flatten_util import ravel_pytree

import nlis_jax as nj
from nlis_jax.experiments import nets

NAME = "bench_torch"
TORCH_MISSING = "torch not installed (benchmark-only extra: pip install -e .[bench])"
DUAL_RTOL = 1e-4
TV_LIMIT = {"nlis_jax": 1e-4, "nlis_jax_eager": 1e-4, "nlis_jax_stable": 1e-4, "torch": 1e-3}  # torch: its QR
BETA_LIMIT = {"nlis_jax": 0.999, "nlis_jax_eager": 0.999, "nlis_jax_stable": 0.999, "torch": 0.99}
MLP = nets.mlp(jnp.tanh)  # one object: a static argument of nj.dual_matrix's jit


def import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(f"{TORCH_MISSING}; e.g. /work/venv/bin/pip install torch==2.13.0") from None
    return torch


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=positive_int, default=20_000, help="examples")
    parser.add_argument("--d", type=positive_int, default=8, help="inputs")
    parser.add_argument(
        "--hidden", type=positive_int_list, default=[32, 32], help="hidden widths, comma separated"
    )
    parser.add_argument("--nodes", type=positive_int, default=16, help="Gauss-Legendre nodes")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--leverage-only",
        action="store_true",
        help="only the leverage step of the dual matrix against the floors (no torch, no end to end)",
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data
@functools.partial(jax.jit, static_argnames=("n", "sizes"))  # one compile, not one per eager op
def make_problem(key, n: int, sizes: tuple[int, ...]):
    """float32 MLP parameters (``nets.mlp_init`` weights, small random biases), inputs and responses."""
    kw, kb, kx, ke = jax.random.split(key, 4)
    params = nets.mlp_init(kw, sizes, dtype=jnp.float32)
    bias_keys = jax.random.split(kb, len(params))
    params = [
        layer | {"b": 0.1 * jax.random.normal(k, layer["b"].shape, jnp.float32)}
        for layer, k in zip(params, bias_keys, strict=True)
    ]
    xs = jax.random.normal(kx, (n, sizes[0]), jnp.float32)
    ys = jax.vmap(MLP, in_axes=(None, 0))(params, xs) + 0.1 * jax.random.normal(ke, (n,), jnp.float32)
    return params, xs, ys


# ------------------------------------------------------------------------------------------ nlis_jax
def jax_dual(params, xs, ys, *, num_nodes):
    return nj.dual_matrix(MLP, params, xs, ys, num_nodes=num_nodes)


def jax_scores(params, xs, ys, *, num_nodes):
    return nj.leverage_scores(jax_dual(params, xs, ys, num_nodes=num_nodes))


# ---------------------------------------------------------------------------------------------- torch
class TorchScores:
    """The straightforward ``torch.func`` computation of the same dual matrix and its QR leverage.

    Columns follow ``jax.flatten_util.ravel_pytree`` of the JAX parameters (per layer: bias, then the
    row-major ``(out, in)`` weight), so the two dual matrices compare entry by entry.
    """

    def __init__(self, torch, params, xs, ys, num_nodes: int):
        self.torch = torch
        nn, func = torch.nn, torch.func
        layers = []
        for i, layer in enumerate(params):
            d_out, d_in = layer["w"].shape
            layers.append(nn.Linear(d_in, d_out))
            if i < len(params) - 1:
                layers.append(nn.Tanh())
        self.module = nn.Sequential(*layers)
        linear = [i for i, m in enumerate(self.module) if isinstance(m, nn.Linear)]
        # Parameter names in the JAX column order.
        self.names = [f"{i}.{kind}" for i in linear for kind in ("bias", "weight")]
        values = [np.asarray(layer[k]) for layer in params for k in ("b", "w")]
        self.params = {name: torch.from_numpy(v.copy()) for name, v in zip(self.names, values, strict=True)}
        self.shapes = [v.shape for v in values]
        self.sizes = [v.size for v in values]
        self.theta = torch.cat([v.reshape(-1) for v in self.params.values()])
        self.xs, self.ys = torch.from_numpy(np.array(xs)), torch.from_numpy(np.array(ys))  # writable copies
        nodes, weights = nj.quadrature.gauss_legendre(num_nodes, jnp.float32)
        self.nodes_weights = [(float(t), float(w)) for t, w in zip(nodes, weights, strict=True)]
        self.grad_dict = func.vmap(func.grad(self.f_dict), in_dims=(None, 0))
        self.grad_flat = func.vmap(func.grad(self.f_flat), in_dims=(None, 0))

    # f(θ; x) for ONE example, as torch.func wants it.
    def f_dict(self, params, x):
        return self.torch.func.functional_call(self.module, params, (x,)).squeeze(-1)

    def unflatten(self, theta):
        parts = self.torch.split(theta, self.sizes)
        views = zip(self.names, parts, self.shapes, strict=True)
        return {name: part.view(shape) for name, part, shape in views}

    def f_flat(self, theta, x):
        return self.f_dict(self.unflatten(theta), x)

    def offset(self):
        """``f(0; x_i) − y_i``, shape ``(n, 1)``."""
        zeros = {name: self.torch.zeros_like(v) for name, v in self.params.items()}
        with self.torch.no_grad():
            f0 = self.torch.func.functional_call(self.module, zeros, (self.xs,)).squeeze(-1)
        return (f0 - self.ys)[:, None]

    def dual_dict(self):
        """Adjoint with a parameter dict: per node ``vmap(grad)`` over a scaled dict, summed per name."""
        acc = {name: 0.0 for name in self.names}
        for t, w in self.nodes_weights:
            grads = self.grad_dict({name: t * v for name, v in self.params.items()}, self.xs)
            acc = {name: acc[name] + w * grads[name] for name in self.names}
        n = self.xs.shape[0]
        return self.torch.cat([acc[name].reshape(n, -1) for name in self.names] + [self.offset()], dim=1)

    def dual_flat(self):
        """Adjoint with a flat ``θ``: per node ``vmap(grad)`` at ``t_k θ`` gives the ``(n, p)`` block."""
        acc = 0.0
        for t, w in self.nodes_weights:
            acc = acc + w * self.grad_flat(t * self.theta, self.xs)
        return self.torch.cat([acc, self.offset()], dim=1)

    def leverage(self, dual):
        """``τ_i = ‖Q_i‖² / m`` from the thin Householder QR (full column rank assumed)."""
        Q = self.torch.linalg.qr(dual, mode="reduced").Q
        return Q.square().sum(dim=1) / dual.shape[1]

    def scores_dict(self):
        return self.leverage(self.dual_dict())

    def scores_flat(self):
        return self.leverage(self.dual_flat())


# ------------------------------------------------------------------------------------------ checking
def exact_leverage(F: np.ndarray) -> tuple[np.ndarray, float]:
    """Leverage of the float32 matrix ``F`` computed in float64, and ``κ(F)``.

    CholeskyQR2 in float64 (``U = F R₁⁻¹ R₂⁻¹``; exact to ``eps64·κ(F)`` when ``eps64·κ(F)² < 1``, checked
    by the orthogonality of ``U``), which takes seconds where a float64 Householder QR of this matrix
    takes minutes on a small CPU; the QR otherwise.
    """
    A = np.asarray(F, np.float64)
    try:
        R1 = np.linalg.cholesky(A.T @ A).T
        U1 = A @ np.linalg.inv(R1)
        R2 = np.linalg.cholesky(U1.T @ U1).T
        U = U1 @ np.linalg.inv(R2)
        R = R2 @ R1
        if np.linalg.norm(U.T @ U - np.eye(A.shape[1])) > 1e-10:
            raise np.linalg.LinAlgError("CholeskyQR2 not orthonormal")
    except np.linalg.LinAlgError:
        U, R = np.linalg.qr(A)
    s = np.linalg.svd(R, compute_uv=False)
    return np.sum(np.square(U), axis=1) / F.shape[1], float(s[0] / s[-1])


def score_agreement(tau, ref: np.ndarray) -> dict:
    tau = np.asarray(tau, np.float64)
    return {
        "tv": 0.5 * float(np.sum(np.abs(tau - ref))),
        "beta_min_ratio": float(np.min(tau / ref)),
        "max_ratio": float(np.max(tau / ref)),
        "max_rel": float(np.max(np.abs(tau - ref) / ref)),
    }


# ---------------------------------------------------------------------------------------------- main
def run(args, torch) -> dict:
    sizes = (args.d, *args.hidden, 1)
    params, xs, ys = make_problem(jax.random.key(args.seed), args.n, sizes)
    p = ravel_pytree(params)[0].shape[0]
    ts = TorchScores(torch, params, xs, ys, args.nodes)
    jx_dual = Compiled(lambda a, b, c: jax_dual(a, b, c, num_nodes=args.nodes), params, xs, ys)
    jx_scores = Compiled(lambda a, b, c: jax_scores(a, b, c, num_nodes=args.nodes), params, xs, ys)

    # Correctness before timing.
    F = np.asarray(jx_dual())
    ref, kappa = exact_leverage(F)
    tau_jax = np.asarray(jx_scores())
    dual_dict, dual_flat = ts.dual_dict().numpy(), ts.dual_flat().numpy()
    tau_torch = ts.leverage(torch.from_numpy(dual_dict)).numpy()
    jx_lev = Compiled(nj.leverage_scores, jnp.asarray(F))
    jx_stable = Compiled(lambda A: nj.leverage_scores(A, route="stable"), jnp.asarray(F))  # the old route
    Fj = jnp.asarray(F)
    eager_lev = lambda: nj.leverage_scores(Fj)  # noqa: E731  (the public call outside jax.jit)
    eager_scores = lambda: nj.leverage_scores(jx_dual())  # noqa: E731  (compiled dual, eager scores)
    agree = {
        "nlis_jax": score_agreement(tau_jax, ref),
        "nlis_jax_eager": score_agreement(np.asarray(eager_scores()), ref),
        "nlis_jax_stable": score_agreement(np.asarray(jx_stable()), ref),
        "torch": score_agreement(tau_torch, ref),
    }
    checks = {
        "torch_dict_dual_vs_jax_max_rel": check(max_rel_error(dual_dict, F), DUAL_RTOL),
        "torch_flat_dual_vs_jax_max_rel": check(max_rel_error(dual_flat, F), DUAL_RTOL),
    } | agreement_checks(agree)
    record = {"p": p, "checks": checks, "ok": all_ok(checks), "score_agreement": agree}
    record |= {"condition_number": kappa, "nlis_jax_basis": basis_info(F)}
    if not record["ok"]:
        report_failures(checks)
        return record

    budget = dict(reps=args.reps)
    # The figures, timed round robin (the same load for all): the leverage step against the float32
    # floor (2 × numpy FᵀF) before (route "stable") and after (default route), end to end against torch.
    F_np = np.ascontiguousarray(F)
    record["timings_interleaved"] = interleaved(
        {
            "numpy_gram": lambda: F_np.T @ F_np,
            "xla_gram": xla_gram(F_np),
            "nlis_jax_leverage": jx_lev,
            "nlis_jax_leverage_eager": eager_lev,
            "nlis_jax_leverage_stable": jx_stable,
            "nlis_jax_scores": jx_scores,
            "nlis_jax_scores_eager": eager_scores,
            "torch_scores_dict": ts.scores_dict,
        },
        reps=args.reps,
    )
    tasks = {
        "nlis_jax_dual": lambda: jx_dual.time(**budget),
        "torch_scores_flat": lambda: time_eager(ts.scores_flat, **budget),
        "torch_dual_dict": lambda: time_eager(ts.dual_dict, **budget),
        "torch_dual_flat": lambda: time_eager(ts.dual_flat, **budget),
        "torch_qr_leverage": lambda: time_eager(lambda: ts.leverage(torch.from_numpy(dual_dict)), **budget),
    }
    timings = {k: task().as_dict() for k, task in progress(tasks.items(), desc=NAME, quiet=args.quiet)}
    inter = record["timings_interleaved"]
    floor_s = 2 * inter["numpy_gram"]["median_s"]
    med = {k: v["median_s"] for k, v in inter.items()}
    best_torch = min(med["torch_scores_dict"], timings["torch_scores_flat"]["median_s"])
    record["timings"] = timings
    record["floor_s"] = floor_s
    record["leverage_ratio_to_floor"] = med["nlis_jax_leverage"] / floor_s
    record["leverage_eager_ratio_to_floor"] = med["nlis_jax_leverage_eager"] / floor_s
    record["leverage_stable_ratio_to_floor"] = med["nlis_jax_leverage_stable"] / floor_s
    record["floor_xla_s"] = 2 * med["xla_gram"]
    record["leverage_ratio_to_xla_floor"] = med["nlis_jax_leverage"] / record["floor_xla_s"]
    record["leverage_stable_ratio_to_xla_floor"] = med["nlis_jax_leverage_stable"] / record["floor_xla_s"]
    record["leverage_ratio_target"] = 2.0
    record["speedup_vs_torch_dict"] = med["torch_scores_dict"] / med["nlis_jax_scores"]
    record["speedup_vs_best_torch"] = best_torch / med["nlis_jax_scores"]
    record["speedup_eager_vs_torch_dict"] = med["torch_scores_dict"] / med["nlis_jax_scores_eager"]
    record["speedup_eager_vs_best_torch"] = best_torch / med["nlis_jax_scores_eager"]
    record["speedup_target"] = 2.0
    return record


def basis_info(F: np.ndarray) -> dict:
    """Rank and route of ``nj.orthonormal_basis`` (the scores divide by that rank), and the route of the
    eager public call ``nj.leverage_scores`` (on a CPU it may take the host float64 Gram matrix)."""
    _, rank, route = nj.orthonormal_basis(jnp.asarray(F))
    eager = nj.leverage_scores(jnp.asarray(F), return_info=True)
    return {
        "rank": int(rank),
        "columns": F.shape[1],
        "route": nj.routes.ROUTES[int(route)],
        "eager_route": nj.routes.ROUTES[int(eager.route)],
    }


def agreement_checks(agree: dict) -> dict:
    """Each implementation's scores against the exact leverage: total variation and smallest ratio."""
    checks = {}
    for impl, a in agree.items():
        checks[f"{impl}_scores_tv"] = check(a["tv"], TV_LIMIT[impl])
        checks[f"{impl}_scores_beta"] = check(a["beta_min_ratio"], BETA_LIMIT[impl], at_least=True)
    return checks


def run_leverage(args) -> dict:
    """``--leverage-only``: ``nj.leverage_scores`` of the dual matrix, checked against its float64
    leverage, then timed round robin against the floors ``2 × numpy FᵀF`` and ``2 × XLA FᵀF``."""
    params, xs, ys = make_problem(jax.random.key(args.seed), args.n, (args.d, *args.hidden, 1))
    F = np.asarray(Compiled(lambda a, b, c: jax_dual(a, b, c, num_nodes=args.nodes), params, xs, ys)())
    ref, kappa = exact_leverage(F)
    jx_lev = Compiled(nj.leverage_scores, jnp.asarray(F))
    Fj = jnp.asarray(F)
    eager_lev = lambda: nj.leverage_scores(Fj)  # noqa: E731  (the public call outside jax.jit)
    agree = {"nlis_jax": score_agreement(jx_lev(), ref), "nlis_jax_eager": score_agreement(eager_lev(), ref)}
    checks = agreement_checks(agree)
    record = {"checks": checks, "ok": all_ok(checks), "score_agreement": agree}
    record |= {"condition_number": kappa, "nlis_jax_basis": basis_info(F), "compile_s": jx_lev.compile_s}
    if not record["ok"]:
        report_failures(checks)
        return record
    F_np = np.ascontiguousarray(F)
    inter = interleaved(
        {
            "numpy_gram": lambda: F_np.T @ F_np,
            "xla_gram": xla_gram(F_np),
            "nlis_jax_leverage": jx_lev,
            "nlis_jax_leverage_eager": eager_lev,
        },
        reps=args.reps,
    )
    med = {k: v["median_s"] for k, v in inter.items()}
    record["timings_interleaved"] = inter
    record["floor_s"], record["floor_xla_s"] = 2 * med["numpy_gram"], 2 * med["xla_gram"]
    record["leverage_ratio_to_floor"] = med["nlis_jax_leverage"] / record["floor_s"]
    record["leverage_ratio_to_xla_floor"] = med["nlis_jax_leverage"] / record["floor_xla_s"]
    record["leverage_eager_ratio_to_floor"] = med["nlis_jax_leverage_eager"] / record["floor_s"]
    record["leverage_eager_ratio_to_xla_floor"] = med["nlis_jax_leverage_eager"] / record["floor_xla_s"]
    record["leverage_ratio_target"] = 2.0
    return record


def main(argv=None) -> dict:
    args = parse_args(argv)
    params = vars(args) | {"dtype": "float32"}
    if args.leverage_only:
        record = {"bench": NAME, "params": params, "environment": environment()}
        record |= run_leverage(args)
        write_record(record, args.out, NAME, quiet=args.quiet)
        return record
    torch = import_torch()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch_info = {"torch_threads": torch.get_num_threads(), "torch_mkl": torch.backends.mkl.is_available()}
    params |= torch_info
    record = {"bench": NAME, "params": params, "environment": environment(torch=torch.__version__)}
    record |= run(args, torch)
    write_record(record, args.out, NAME, quiet=args.quiet)
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
