"""Sampling quality with projected leverage: ``L(θ_S)/L(θ*)`` for projected scores at several ``dim``.

Two problems (``--data``): California Housing (20,640 × 8, standardised features and response) with an
``8–32–32–1`` tanh MLP (``p = 1,377``, float64), and Fashion-MNIST 7 (sneaker) vs 9 (ankle boot) with ±1
targets, 2 × 2 pooled 14 × 14 standardised inputs and a ``196–8–1`` tanh MLP (``p = 1,585``; float32 by
default). Squared loss, no constraint, Adam with a cosine schedule. θ* is the full-data fit (in the
warm protocol followed by one warm full-data fit, see below); the scores
are taken at θ*: exact leverage of ``F̃(θ*)`` (``dual_matrix`` + ``leverage_scores``), projected
leverage (``projected_leverage_scores``, ``embedding="sparse"``: the sparse sign embedding of the recorded
study, not the ``"auto"`` default) at each ``--dims``, linear leverage of the
inputs (``linear_leverage_scores``), and uniform. For each score and sample size, ``--repeats`` samples
(with replacement, weights ``1/(s p_i)``) are fitted and ``L(θ_S)/L(θ*)`` is reported on the full data
(median and quartiles), with the total-variation distance of each score from the exact one.

Protocols (``--protocol``):

* ``warm`` (default): every sample fit starts FROM θ*, with Adam at ``--warm-lr`` for ``--steps``
  steps, so ``L(θ_S)/L(θ*) − 1`` measures how far the sample minimiser near θ* is from θ*, not
  cold-start optimisation noise. The noise floor is the same fit on the full data (unit weights)
  from θ*: its ratio shows what the optimiser alone does to ``L``.
* ``cold``: every sample fit starts from the common initial point with Adam at ``--lr``.

    python benchmarks/study_projected.py --data california                # see benchmarks/README.md
    python benchmarks/study_projected.py --n 300 --full-steps 50 --steps 20 --repeats 2 --sizes 100
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import base_parser, counts_text, environment, positive_float, positive_int, write_record

import nlis_jax as nj
from nlis_jax import experiments as ex
from nlis_jax.experiments import datasets
from nlis_jax.experiments.features import prepare_features
from nlis_jax.experiments.nets import mlp, mlp_init

jax.config.update("jax_enable_x64", True)

NAME = "study_projected"
MODEL = mlp(jnp.tanh)


def parse_args(argv):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("california", "fmnist"), default="california")
    parser.add_argument("--n", type=positive_int, default=None, help="first n rows only (default: all)")
    parser.add_argument("--hidden", type=counts_text, default=None, help="hidden widths (default 32,32 / 8)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None)
    parser.add_argument("--dims", type=counts_text, default="64,256,1024", help="embedding widths")
    parser.add_argument("--sizes", type=counts_text, default="2754,5508", help="sample sizes")
    parser.add_argument("--repeats", type=positive_int, default=10, help="samples per score and size")
    parser.add_argument("--protocol", choices=("warm", "cold"), default="warm")
    parser.add_argument(
        "--full-steps", type=positive_int, default=1500, help="Adam steps of the full fit (θ*)"
    )
    parser.add_argument("--steps", type=positive_int, default=300, help="Adam steps of every sample fit")
    parser.add_argument(
        "--lr", type=positive_float, default=1e-2, help="Adam learning rate of θ* (and cold fits)"
    )
    parser.add_argument(
        "--warm-lr", type=positive_float, default=1e-3, help="Adam learning rate of warm fits"
    )
    return parser.parse_args(argv)


def load_data(args):
    """``(x, y, dtype, hidden)`` of the chosen data set (first ``--n`` rows)."""
    if args.data == "california":
        dtype = np.dtype(args.dtype or "float64")
        ds = datasets.load_california(add_bias=False, dtype=dtype)
        x, y, hidden = ds.x, ds.y, args.hidden or "32,32"
    else:
        dtype = np.dtype(args.dtype or "float32")
        ds = datasets.load_fashion_mnist(split="train", classes=(7, 9), flatten=False)
        x = prepare_features(ds.x, pool=2, dtype=dtype)
        y = np.where(ds.y == 1, 1.0, -1.0).astype(dtype)
        hidden = args.hidden or "8"
    return np.asarray(x[: args.n], dtype), np.asarray(y[: args.n], dtype), dtype, hidden


def make_problem(args) -> ex.Problem:
    x, y, dtype, hidden = load_data(args)
    sizes = (x.shape[1], *[int(h) for h in hidden.split(",")], 1)

    def init(key):
        return mlp_init(key, sizes, dtype=jnp.dtype(dtype))

    def dual_fn(params, xs, ys):
        return nj.dual_matrix(MODEL, params, xs, ys)

    p = sum(a.size for a in jax.tree.leaves(init(jax.random.key(0))))
    return ex.Problem(
        name=f"{args.data}_mlp",
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
        info={"n": int(x.shape[0]), "p": int(p), "sizes": sizes, "dtype": str(dtype)},
    )


def scores_at(problem, params, dims, key) -> tuple[dict, dict]:
    """Probabilities of every scheme at ``params`` and, per scheme, its time, rank and TV from exact."""
    t0 = time.perf_counter()
    F = nj.dual_matrix(MODEL, params, problem.xs, problem.ys)
    h, rank = jax.block_until_ready(nj.leverage_scores(F, return_info=True)[1:3])
    del F
    exact = h / rank.astype(h.dtype)
    info = {"exact": {"time_s": time.perf_counter() - t0, "rank": int(rank)}}
    probs = {"exact": exact}
    for dim, k in zip(dims, jax.random.split(key, len(dims)), strict=True):
        t0 = time.perf_counter()
        res = nj.projected_leverage_scores(
            k, MODEL, params, problem.xs, problem.ys, dim=dim, embedding="sparse", return_info=True
        )  # the embedding of the recorded study (benchmarks/README.md (d)), not the "auto" default
        jax.block_until_ready(res)
        name = f"projected_{dim}"
        probs[name] = res.probs
        info[name] = {"time_s": time.perf_counter() - t0, "rank": int(res.rank)}
    probs["linear"] = nj.linear_leverage_scores(problem.xs, bias=True)
    probs["uniform"] = nj.uniform_scores(problem.n, problem.xs.dtype)
    for name, pr in probs.items():
        info.setdefault(name, {})["tv_vs_exact"] = 0.5 * float(jnp.sum(jnp.abs(pr - exact)))
        info[name]["min_ratio_to_exact"] = float(jnp.min(pr / exact))
    return probs, info


def tail_change(trace) -> np.ndarray:
    """Per repeat, the relative change of the fit's objective over its last 10% of steps."""
    trace = np.asarray(trace, dtype=np.float64)
    start = trace[:, int(0.9 * (trace.shape[1] - 1))]
    return np.abs(start - trace[:, -1]) / np.abs(trace[:, -1])


def summary(ratio) -> dict:
    q25, med, q75 = np.quantile(ratio, [0.25, 0.5, 0.75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "ratios": np.asarray(ratio).tolist()}


def polish(problem, theta, steps):
    """θ* = the cold full fit followed by one warm full-data fit: ``(θ*, L(θ*))``."""
    idx = jnp.arange(problem.n)[None]
    w = jnp.ones((1, problem.n), problem.xs.dtype)
    (params_r, _), _ = ex.fit_samples(problem, theta, idx, w, num_steps=steps)
    losses, _ = ex.full_losses(problem, params_r)
    return jax.tree.map(lambda a: a[0], params_r), float(losses[0])


def noise_floor(problem, theta, full_loss, steps) -> dict:
    """The warm fit on the full data (all rows, unit weights) from θ*: the optimiser's own effect."""
    idx = jnp.arange(problem.n)[None]
    w = jnp.ones((1, problem.n), problem.xs.dtype)
    (params_r, trace), _ = ex.fit_samples(problem, theta, idx, w, num_steps=steps)
    losses, _ = ex.full_losses(problem, params_r)
    ratio = float(losses[0] / full_loss)
    return {"ratio": ratio, "loss": float(losses[0]), "tail_change": float(tail_change(trace)[0])}


def quality(problem, start, probs, full_loss, sizes, repeats, steps, key, *, refit_loss=None) -> dict:
    """Per score and size: ``L(θ_S)/L(θ*)`` over the repeats and, with ``refit_loss``, the same ratios
    against the full-data refit from θ* (``vs_refit``), which removes what the optimiser alone does."""
    out = {}
    for i, (name, pr) in enumerate(probs.items()):  # every scheme its own draws
        out[name] = {}
        for s, k in zip(sizes, jax.random.split(jax.random.fold_in(key, i), len(sizes)), strict=True):
            (idx, w), _ = ex.draw(jax.random.split(k, repeats), pr, s)
            (params_s, trace), _ = ex.fit_samples(problem, start, idx, w, num_steps=steps)
            losses, _ = ex.full_losses(problem, params_s)
            out[name][str(s)] = summary(np.asarray(losses) / full_loss)
            if refit_loss is not None:
                out[name][str(s)]["vs_refit"] = summary(np.asarray(losses) / refit_loss)
            out[name][str(s)]["tail_change_max"] = float(np.max(tail_change(trace)))
    return out


def table(record) -> str:
    sizes = record["args"]["sizes"].split(",")
    head = " | ".join(f"s = {s}: ratio − 1, median (q25–q75)" for s in sizes)
    lines = [f"| scores | rank | TV from exact | {head} |", "|" + "---|" * (3 + len(sizes))]
    for name, q in record["quality"].items():
        info = record["scores"][name]
        cells = [f"{q[s]['median'] - 1:.4f} ({q[s]['q25'] - 1:.4f}–{q[s]['q75'] - 1:.4f})" for s in sizes]
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
    record = {"bench": NAME, "args": vars(args), "problem": problem.info, "environment": environment()}
    record["full_fit"] = {"loss": full.loss, "time_s": full.time_s, "rel_change": full.rel_change}
    fits, start, ref_loss = problem, params0, full.loss
    theta = full.params
    if args.protocol == "warm":
        fits = problem._replace(learning_rate=args.warm_lr)
        theta, ref_loss = polish(fits, full.params, args.steps)
        start = theta
        record["polished_loss"] = ref_loss
        record["noise_floor"] = noise_floor(fits, theta, ref_loss, args.steps)
    probs, record["scores"] = scores_at(problem, theta, dims, key_scores)
    t0 = time.perf_counter()
    refit = record.get("noise_floor", {}).get("loss")
    record["quality"] = quality(
        fits, start, probs, ref_loss, sizes, args.repeats, args.steps, key_draw, refit_loss=refit
    )
    record["quality_time_s"] = time.perf_counter() - t0
    record["table"] = table(record)
    record["ok"] = bool(np.isfinite(full.loss))
    write_record(record, args.out, NAME, quiet=args.quiet)
    if not args.quiet:
        print(record["table"])
        print({k: record[k] for k in ("full_fit", "polished_loss", "noise_floor") if k in record})
    return record


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["ok"] else 1)
