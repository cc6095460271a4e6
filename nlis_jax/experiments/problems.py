r"""A study's *problem*: data, model, loss, constraint, optimizer and the dual matrix, built from a config.

Every callable in a :class:`Problem` (model, dual, curvature, optimizer) is built ONCE per set of static
options (``functools.lru_cache``), so the compiled kernels of :mod:`nlis_jax.experiments.kernels`, which
take them as static arguments, are reused across studies, methods, sizes and repeats.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nlis_jax as nj
from nlis_jax.experiments import datasets, nets
from nlis_jax.experiments.configs import (
    CaliforniaConfig,
    DigitsConfig,
    FashionMNISTConfig,
    StudyConfig,
    SyntheticConfig,
)
from nlis_jax.experiments.features import label_targets, prepare_features

#: Nesterov momentum of the ``"gd"`` optimizer.
MOMENTUM = 0.9


class Problem(NamedTuple):
    r"""Everything a study needs, as arrays and (cached, hashable) callables.

    The loss is always the squared loss :math:`L(\theta) = \sum_i \|f(\theta; x_i) - y_i\|^2` (for
    classification on ±1 or one-hot targets), so that :math:`L(\theta) = \|\tilde F(\theta)\tilde\theta\|^2`.

    Attributes:
        name: data set name.
        task: ``"regression"`` or ``"classification"``.
        apply_fn: ``apply_fn(params, x)`` for one example (scalar or ``(k,)``).
        init: ``init(key) -> params`` (the same initial point is used by every fit of a study).
        xs: ``(n, d)`` training inputs.
        ys: ``(n,)`` or ``(n, k)`` training targets.
        dual_fn: ``dual_fn(params, xs, ys) -> (n, p+1)`` or ``(n, k, p+1)``: the dual matrix (jittable).
        linear_design: ``(n, m)`` data matrix of the linear baseline scores.
        curvature: ``curvature(xs, w) -> L̂`` Gauss-Newton bound on the Hessian of the weighted mean
            loss, or ``None`` (then ``"gd"`` uses ``learning_rate`` as the step).
        projection: the constraint's projection (:func:`nlis_jax.projections.l2_ball`) or ``None``.
        optimizer: name, ``"gd"`` or ``"adam"``.
        learning_rate: see :class:`~nlis_jax.experiments.StudyConfig`.
        x_test, labels_test: held-out data for test accuracy (classification), else ``None``.
        info: JSON-ready description (n, p, features, constraint, choices).
    """

    name: str
    task: str
    apply_fn: Callable[..., Any]
    init: Callable[[jax.Array], Any]
    xs: jax.Array
    ys: jax.Array
    dual_fn: Callable[..., jax.Array]
    linear_design: jax.Array
    curvature: Callable[..., jax.Array] | None
    projection: Any
    optimizer: str
    learning_rate: float
    x_test: jax.Array | None
    labels_test: jax.Array | None
    info: dict

    @property
    def n(self) -> int:
        return int(self.xs.shape[0])

    @property
    def num_params(self) -> int:
        return int(self.info["p"])

    @property
    def dtype(self):
        return self.xs.dtype


# --------------------------------------------------------------------------------------------------
# Optimizers (built once per hyperparameters)


@functools.lru_cache(maxsize=64)
def make_optimizer(name: str, learning_rate: float, num_steps: int) -> optax.GradientTransformation:
    r"""The optax transformation of a study's optimizer (cached: the same object for the same options).

    ``"gd"``: ``optax.sgd(learning_rate, momentum=0.9, nesterov=True)``; the kernels divide the objective
    by the curvature bound ``L̂``, so the effective step is ``learning_rate / L̂``. ``"adam"``:
    ``optax.adam`` with a cosine decay from ``learning_rate`` to 0 over ``num_steps``.
    """
    if name == "gd":
        return optax.sgd(learning_rate, momentum=MOMENTUM, nesterov=True)
    if name == "adam":
        return optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    raise ValueError(f"unknown optimizer {name!r}; expected 'gd' or 'adam'.")


# --------------------------------------------------------------------------------------------------
# Single-index models (bounded Swish)


def _max_slope(phi: Callable[[jax.Array], jax.Array]) -> float:
    """``max_t |ϕ'(t)|`` over a fine grid of [-60, 60] (``jax.grad``), with a 0.1% margin for the grid."""

    @jax.jit
    def max_abs_slope():
        t = jnp.linspace(-60.0, 60.0, 120_001)
        return jnp.max(jnp.abs(jax.vmap(jax.grad(phi))(t)))

    return float(max_abs_slope()) * 1.001


class SingleIndexModel(NamedTuple):
    phi: Callable[[jax.Array], jax.Array]
    apply_fn: Callable[..., jax.Array]
    dual_fn: Callable[..., jax.Array]
    curvature: Callable[..., jax.Array]
    max_slope: float


@functools.lru_cache(maxsize=16)
def single_index_model(c1: float = 1.0, c2: float = 2.0) -> SingleIndexModel:
    r"""Bounded-Swish single-index model ``f(θ; x) = ϕ(<θ, x>)`` with its closed-form dual and curvature.

    * dual: ``[ (ϕ(z) − ϕ(0))/z · x | ϕ(0) − y ]`` (:func:`nlis_jax.single_index_adjoint`; exact).
    * curvature: :math:`\hat L = 2 \max|\phi'|^2 \lambda_{\max}(\sum_i w_i x_i x_i^\top / \sum_i w_i)`, the
      Gauss-Newton bound on the Hessian of the weighted mean squared loss (the residual term
      :math:`(\phi - y)\phi''` is left out; with step ``1/L̂`` the iteration is stable in practice).
    """
    c1, c2 = float(c1), float(c2)

    def phi(t):
        return nj.bounded_swish(t, c1, c2)

    apply_fn = nets.single_index(phi)

    def dual_fn(theta, xs, ys):
        adj = nj.single_index_adjoint(phi, theta, xs)
        offset = phi(jnp.zeros((), adj.dtype)) - ys.astype(adj.dtype)
        return jnp.concatenate([adj, offset[:, None]], axis=1)

    slope = _max_slope(phi)

    def curvature(xs, w):
        w = w.astype(xs.dtype)
        gram = jnp.einsum("n,ni,nj->ij", w, xs, xs) / jnp.sum(w)
        return 2.0 * slope**2 * jnp.linalg.eigvalsh(gram)[-1]

    return SingleIndexModel(phi, apply_fn, dual_fn, curvature, slope)


def _regression_problem(config, name, x, y, info) -> Problem:
    model = single_index_model(config.c1, config.c2)
    x, y = np.asarray(x), np.asarray(y)
    xs, ys = jax.device_put(x), jax.device_put(y)  # a transfer; jnp.asarray compiles a program per shape
    d = xs.shape[1]
    dtype = xs.dtype
    projection = None if config.radius is None else nj.l2_ball(config.radius)
    design = jax.device_put(np.concatenate([x, -y[:, None]], axis=1).astype(dtype))

    def init(key):
        del key  # the single-index studies all start at θ = 0 (ϕ'(0) ≠ 0, so the gradient is not 0)
        return jax.device_put(np.zeros((d,), dtype))

    info = dict(
        info,
        n=int(xs.shape[0]),
        d=int(d),
        p=int(d),
        k=1,
        dtype=str(dtype),
        model=f"single-index bounded Swish, c1={config.c1}, c2={config.c2}",
        loss="squared",
        radius=config.radius,
        optimizer=config.optimizer,
        learning_rate=config.learning_rate,
        linear_design="[X, -y]",
        max_slope=model.max_slope,
    )
    return Problem(
        name=name,
        task="regression",
        apply_fn=model.apply_fn,
        init=init,
        xs=xs,
        ys=ys,
        dual_fn=model.dual_fn,
        linear_design=design,
        curvature=model.curvature,
        projection=projection,
        optimizer=config.optimizer,
        learning_rate=1.0 if config.learning_rate is None else float(config.learning_rate),
        x_test=None,
        labels_test=None,
        info=info,
    )


def _dtype(name: str):
    """``float64`` only when JAX has x64 enabled (the library never flips the global flag)."""
    return jax.dtypes.canonicalize_dtype(np.dtype(name))


def california_problem(config: CaliforniaConfig) -> Problem:
    """California Housing, standardised features and response, bias column (n = 20,640, d = 9)."""
    ds = datasets.load_california(
        data_home=config.data_home, download_if_missing=config.download, dtype=_dtype(config.dtype)
    )
    info = dict(
        dataset="california",
        features=list(ds.feature_names),
        notes=(
            "features and response standardised; bias column; radius 1.0 < ||theta_unconstrained|| = "
            "1.186, so the l2 constraint is active"
        ),
    )
    return _regression_problem(config, "california", ds.x, ds.y, info)


def synthetic_problem(config: SyntheticConfig) -> Problem:
    """Synthetic single-index data (bounded Swish) from
    :func:`nlis_jax.experiments.datasets.make_single_index`."""

    def link(z):
        return np.asarray(nj.bounded_swish(jnp.asarray(z), config.c1, config.c2), np.float64)

    ds = datasets.make_single_index(
        config.data_seed,
        config.n,
        config.d,
        phi=link,
        noise=config.noise,
        theta_norm=config.theta_norm,
        dtype=np.float64,
    )
    x, y = ds.x, ds.y
    if config.correlation or config.tails is not None:
        eps = y - link(x @ ds.theta_star)  # the noise actually drawn, kept as is
        if config.correlation:  # (its range and the tails' are checked by SyntheticConfig)
            lags = np.abs(np.subtract.outer(np.arange(config.d), np.arange(config.d)))
            x = x @ np.linalg.cholesky(config.correlation**lags).T  # rows ~ N(0, Σ), Σ_ij = ρ^|i-j|
        if config.tails is not None:
            rng = np.random.default_rng([config.data_seed, 1])
            x = x / np.sqrt(rng.chisquare(config.tails, size=config.n) / config.tails)[:, None]
        y = link(x @ ds.theta_star) + eps
    dt = _dtype(config.dtype)
    info = dict(
        dataset="synthetic",
        theta_true=[float(v) for v in ds.theta_star],
        noise=config.noise,
        tails=config.tails,
        correlation=config.correlation,
        notes=f"radius {config.radius} vs ||theta_true|| = {config.theta_norm}",
    )
    return _regression_problem(config, "synthetic", x.astype(dt), y.astype(dt), info)


# --------------------------------------------------------------------------------------------------
# Classification with a small ReLU network


@functools.lru_cache(maxsize=16)
def relu_network(num_nodes: int):
    """``(apply_fn, dual_fn)`` of a one-hidden-layer ReLU MLP (from :func:`nlis_jax.experiments.nets.mlp`)."""
    apply_fn = nets.mlp(jax.nn.relu)

    def dual_fn(params, xs, ys):
        return nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=num_nodes, mode="reverse")

    return apply_fn, dual_fn


def _classification_info(config, info, x, x_test, num_classes, components, learning_rate) -> dict:
    k = 1 if num_classes == 2 else num_classes
    d = x.shape[1]
    p = d * config.hidden + config.hidden + config.hidden * k + k
    return dict(
        info,
        n=int(x.shape[0]),
        n_test=int(x_test.shape[0]),
        d=int(d),
        p=int(p),
        k=int(k),
        classes=num_classes,
        hidden=config.hidden,
        pca_components=components,
        dtype="float32",
        model=f"MLP {d}-{config.hidden}-{k}, ReLU, biases",
        loss="squared on ±1 targets" if k == 1 else "squared on one-hot targets (block leverage)",
        radius=config.radius,
        optimizer=config.optimizer,
        learning_rate=float(learning_rate),
        linear_design="[X, 1]",
        dual_bytes=int(x.shape[0] * k * (p + 1) * 4),
    )


def _num_classes(config) -> int:
    """10 for ``classes=None``; else the number of labels named, at least two (one is no classification)."""
    if config.classes is None:
        return 10
    if len(config.classes) < 2:
        raise ValueError(f"classes must name at least two labels (None: all ten), got {config.classes}.")
    return len(config.classes)


def _classification_problem(config, name, x, labels, x_test, labels_test, num_classes, info) -> Problem:
    dtype = np.float32
    components = config.components
    if components == "auto":
        components = None if num_classes == 2 else 24
    pool = getattr(config, "pool", 1)
    x, x_test = prepare_features(x, x_test, pool=pool, pca=components, dtype=np.float64)
    k = 1 if num_classes == 2 else num_classes
    apply_fn, dual_fn = relu_network(config.num_nodes)
    learning_rate = config.learning_rate
    if learning_rate is None:
        learning_rate = 0.01 if num_classes == 2 else 0.1
    sizes = (x.shape[1], config.hidden, k)

    def init(key):
        return nets.mlp_init(key, sizes, dtype=dtype)

    xs = jnp.asarray(x, dtype)
    return Problem(
        name=name,
        task="classification",
        apply_fn=apply_fn,
        init=init,
        xs=xs,
        ys=jnp.asarray(label_targets(labels, num_classes, dtype)),
        dual_fn=dual_fn,
        linear_design=jnp.concatenate([xs, jnp.ones((xs.shape[0], 1), dtype)], axis=1),
        curvature=None,
        projection=None if config.radius is None else nj.l2_ball(config.radius),
        optimizer=config.optimizer,
        learning_rate=float(learning_rate),
        x_test=jnp.asarray(x_test, dtype),
        labels_test=jnp.asarray(labels_test, jnp.int32),
        info=_classification_info(config, info, x, x_test, num_classes, components, learning_rate),
    )


def fashion_mnist_problem(config: FashionMNISTConfig) -> Problem:
    """Fashion-MNIST: ``n`` seeded training rows, pooled features, all test rows of the classes."""
    num_classes = _num_classes(config)  # before the images are read
    common = dict(
        path=config.path,
        classes=config.classes,
        data_home=config.data_home,
        download_if_missing=config.download,
    )
    train = datasets.load_fashion_mnist(split="train", flatten=False, **common)
    test = datasets.load_fashion_mnist(split="test", flatten=False, limit=config.n_test, **common)
    rng = np.random.default_rng(config.data_seed)
    n = config.n
    if n is None:
        n = 4000 if config.classes is not None and len(config.classes) == 2 else 3000
    if n > train.n_samples:
        raise ValueError(f"n = {n} exceeds the {train.n_samples} training images of these classes.")
    keep = np.sort(rng.permutation(train.n_samples)[:n])
    x, x_test = train.x[keep], test.x  # (n, 28, 28) images, pooled by prepare_features
    info = dict(
        dataset="fashion-mnist",
        class_names=list(train.class_names),
        features=f"{28 // config.pool}x{28 // config.pool} average-pooled pixels, standardised",
        notes=f"{n} of {train.n_samples} training images (seed {config.data_seed})",
    )
    return _classification_problem(
        config, "fashion-mnist", x, train.y[keep], x_test, test.y, num_classes, info
    )


def digits_problem(config: DigitsConfig) -> Problem:
    """scikit-learn digits: seeded train/test split, 64 pixels standardised with training statistics."""
    num_classes = _num_classes(config)
    ds = datasets.load_digits(standardize=False, classes=config.classes)
    rng = np.random.default_rng(config.data_seed)
    perm = rng.permutation(ds.n_samples)
    n_test = int(math.ceil(config.test_fraction * ds.n_samples))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    info = dict(
        dataset="digits",
        class_names=list(ds.class_names),
        features="8x8 pixels, standardised",
        notes=f"seeded split: {train.size} train / {test.size} test",
    )
    return _classification_problem(
        config, "digits", ds.x[train], ds.y[train], ds.x[test], ds.y[test], num_classes, info
    )


def make_problem(config: StudyConfig) -> Problem:
    """Build the :class:`Problem` of a config (loads or generates the data).

    Raises:
        nlis_jax.experiments.datasets.DatasetNotFoundError: the data set is not on disk (the message says
            where to put it and how to get it).
    """
    if isinstance(config, CaliforniaConfig):
        return california_problem(config)
    if isinstance(config, SyntheticConfig):
        return synthetic_problem(config)
    if isinstance(config, FashionMNISTConfig):
        return fashion_mnist_problem(config)
    if isinstance(config, DigitsConfig):
        return digits_problem(config)
    raise TypeError(f"no problem for config type {type(config).__name__}.")
