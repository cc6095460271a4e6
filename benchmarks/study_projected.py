"""Sampling quality with projected leverage: ``L(θ_S)/L(θ*)`` for projected scores at several ``dim``.

California Housing (20,640 × 8, standardised features and response), an ``8–32–32–1`` tanh MLP
(``p = 1,377``, float64), squared loss, no constraint, Adam with a cosine schedule. θ* is the full-data
fit; the scores are taken at θ*: exact leverage of ``F̃(θ*)`` (``dual_matrix`` + ``leverage_scores``),
projected leverage (sparse sign embedding) at each ``--dims``, and uniform. For each score and sample
size, ``--repeats`` samples (with replacement, weights ``1/(s p_i)``) are fitted from the same initial
point with the same optimizer and step count, and ``L(θ_S)/L(θ*)`` is reported on the full data
(median and 90% quantile), with the total-variation distance of each score from the exact one.

    python benchmarks/study_projected.py                         # the recorded run
    python benchmarks/study_projected.py --n 2000 --full-steps 200 --steps 100 --repeats 2 --sizes 100
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import base_parser, environment, write_record

import nlis_jax as nj
from nlis_jax import datasets
from nlis_jax import experiments as ex
from nlis_jax.experiments.nets import mlp, mlp_init

jax.config.update("jax_enable_x64", True)

NAME = "study_projected"
MODEL = mlp(jnp.tanh)


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="first n rows only (default: all 20,640)")
    parser.add_argument("--hidden", default="32,32", help="hidden widths (8–32–32–1: p = 1,377)")
    parser.add_argument("--dims", default="64,256,1024", help="embedding widths")
    parser.add_argument("--sizes", default="250,500,1000", help="sample sizes")
    parser.add_argument("--repeats", type=int, default=8, help="samples per score and size")
    parser.add_argument("--full-steps", type=int, default=3000, help="Adam steps of the full fit (θ*)")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps of every sample fit")
    parser.add_argument("--lr", type=float, default=1e-2, help="initial Adam learning rate")
    return parser.parse_args(argv)


def make_problem(args) -> ex.Problem:
    ds = datasets.load_california(add_bias=False, dtype=np.float64)
    x, y = ds.x[: args.n], ds.y[: args.n]
    sizes = (x.shape[1], *[int(h) for h in args.hidden.split(",")], 1)

    def init(key):
        return mlp_init(key, sizes, dtype=jnp.float64)

    def dual_fn(params, xs, ys):
        return nj.dual_matrix(MODEL, params, xs, ys)

    p = sum(a.size for a in jax.tree.leaves(init(jax.random.key(0))))
    return ex.Problem(
        name="california_mlp",
        task="regression",
        apply_fn=MODEL,
        init=init,
        xs=jnp.asarray(x),
        ys=jnp.asarray(y),
        dual_fn=dual_fn,
        linear_design=jnp.asarray(x),
        curvature=None,
        projection=None,
        optimizer="adam",
        learning_rate=args.lr,
        x_test=None,
        labels_test=None,
        info={"n": int(x.shape[0]), "p": int(p), "sizes": sizes},
    )


def scores_at(problem, params, dims, key) -> tuple[dict, dict]:
    """Probabilities of every scheme at ``params`` and, per scheme, its time, rank and TV from exact."""
    t0 = time.perf_counter()
    F = nj.dual_matrix(MODEL, params, problem.xs, problem.ys)
    h, rank = jax.block_until_ready(nj.leverage_scores(F, return_info=True)[1:3])
    exact = h / rank.astype(h.dtype)
    info = {"exact": {"time_s": time.perf_counter() - t0, "rank": int(rank)}}
    probs = {"exact": exact, "uniform": nj.uniform_scores(problem.n, problem.xs.dtype)}
    for dim, k in zip(dims, jax.random.split(key, len(dims)), strict=True):
        t0 = time.perf_counter()
        res = nj.projected_leverage_scores(
            k, MODEL, params, problem.xs, problem.ys, dim=dim, embedding="sparse", return_info=True
        )  # the embedding of the recorded study (benchmarks/README.md (d)), not the "auto" default
        jax.block_until_ready(res)
        name = f"projected_{dim}"
        probs[name] = res.probs
        info[name] = {"time_s": time.perf_counter() - t0, "rank": int(res.rank)}
    for name, pr in probs.items():
        info.setdefault(name, {})["tv_vs_exact"] = 0.5 * float(jnp.sum(jnp.abs(pr - exact)))
        info[name]["min_ratio_to_exact"] = float(jnp.min(pr / exact))
    return probs, info


def quality(problem, params0, probs, full_loss, sizes, repeats, steps, key) -> dict:
    out = {}
    for name, pr in probs.items():
        out[name] = {}
        for s, k in zip(sizes, jax.random.split(key, len(sizes)), strict=True):
            (idx, w), _ = ex.draw(jax.random.split(k, repeats), pr, s)
            (params_s, _), _ = ex.fit_samples(problem, params0, idx, w, num_steps=steps)
            losses, _ = ex.full_losses(problem, params_s)
            ratio = np.asarray(losses) / full_loss
            out[name][str(s)] = {
                "median": float(np.median(ratio)),
                "q90": float(np.quantile(ratio, 0.9)),
                "ratios": ratio.tolist(),
            }
    return out


def table(record) -> str:
    sizes = record["args"]["sizes"].split(",")
    lines = ["| scores | rank | TV vs exact | " + " | ".join(f"s = {s}: median (q90)" for s in sizes) + " |"]
    lines.append("|" + "---|" * (3 + len(sizes)))
    for name, q in record["quality"].items():
        info = record["scores"][name]
        cells = [f"{q[s]['median']:.4f} ({q[s]['q90']:.4f})" for s in sizes]
        rank = info.get("rank", "")
        lines.append(f"| {name} | {rank} | {info['tv_vs_exact']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    key_init, key_scores, key_draw = jax.random.split(jax.random.key(args.seed), 3)
    problem = make_problem(args)
    params0 = problem.init(key_init)
    full = ex.fit_full(problem, params0, num_steps=args.full_steps)
    dims = [int(d) for d in args.dims.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    probs, score_info = scores_at(problem, full.params, dims, key_scores)
    record = {"bench": NAME, "args": vars(args), "problem": problem.info, "environment": environment()}
    record["full_fit"] = {"loss": full.loss, "time_s": full.time_s, "rel_change": full.rel_change}
    record["scores"] = score_info
    record["quality"] = quality(problem, params0, probs, full.loss, sizes, args.repeats, args.steps, key_draw)
    record["table"] = table(record)
    record["ok"] = bool(np.isfinite(full.loss))
    write_record(record, args.out, NAME, quiet=args.quiet)
    if not args.quiet:
        print(record["table"])
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
