r"""Outlier detection with nonlinear leverage: find flipped labels by ranking the training data.

The study (``nlis-jax outliers``): flip the labels of a known share (default 2%) of a Fashion-MNIST training
set, fit a small ReLU network to the noisy labels with the squared loss, score every example at the fitted
:math:`\theta`, and measure how well each ranking finds the flipped points (AUROC, precision at
``k = #flipped`` and at ``2k``), beside two baselines: the per-example loss and the per-example gradient
norm. An image grid of the top- and bottom-scored examples of each class is saved as a PNG.

**Scores** (higher = more suspicious). With the dual matrix
:math:`\tilde F = [F^* \mid c]`, :math:`c = f(0) - y` (``(n, p+1)``, or ``(n, k, p+1)`` blocks for ``k``
outputs; block scores sum over an example's ``k`` rows):

* ``leverage``: leverage of :math:`\tilde F` (:func:`nlis_jax.leverage_scores`), the library's nonlinear
  leverage score.
* ``adjoint_leverage``: leverage of :math:`F^*` alone. It does not depend on the labels ``y`` except
  through :math:`\theta`.
* ``response_leverage``: :math:`e_i^2 / \|e\|^2` with :math:`e = (I - P_{F^*})\,c`, the part of the last
  column outside ``range(F*)``. Because :math:`\mathrm{range}(\tilde F) = \mathrm{range}(F^*) \oplus
  \mathrm{span}(e)`, in exact arithmetic ``leverage(F̃) = leverage(F*) + response_leverage`` (unnormalised).
  This is the nonlinear analogue of the regression identity
  :math:`h([X, y]) - h(X) = e_i^2/\|e\|^2`. Since :math:`F^*\theta + c = r` (the residual) and
  :math:`F^*\theta \in \mathrm{range}(F^*)`, :math:`e = (I - P_{F^*})\,r`: it is the residual with its
  component along the model's (path-averaged) tangent space projected out.
* ``norm``: row-norm score :math:`\|\tilde F_i\|^2 / \|\tilde F\|_F^2`. For these networks
  :math:`f(0) = 0` and the targets have unit norm (``±1`` or one-hot), so the last column has the same
  norm in every row. This score then ranks exactly like :math:`\|F^*_i\|^2` and cannot see the labels
  directly.

Baselines: ``loss`` :math:`\|f(\theta; x_i) - y_i\|^2` and ``grad_norm``
:math:`\|\nabla_\theta \|f(\theta; x_i) - y_i\|^2\|_2` at the same :math:`\theta`.

Since ``response_leverage`` is a projected residual, expect it to track the ``loss`` baseline closely.
The ``y``-independent part ``leverage(F*)`` has total mass ``rank(F*) ≈ p``, against 1 for the response
part, so when ``p`` is much larger than the number of flipped points it swamps the signal in
``leverage(F̃)``. :func:`run_outlier_study` reports every score as measured.

Entry points: :func:`run_outlier_study` (Python), and :func:`add_arguments` + :func:`run` (the CLI).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nlis_jax as nj
from nlis_jax import datasets, nets
from nlis_jax._types import Array, PRNGKey, PyTree

__all__ = [
    "BASELINE_SCORES",
    "NONLINEAR_SCORES",
    "OutlierConfig",
    "add_arguments",
    "auroc",
    "flip_labels",
    "format_table",
    "outlier_scores",
    "precision_at_k",
    "prepare_features",
    "run",
    "run_outlier_study",
    "save_score_grid",
]

#: Scores computed from the dual matrix at the fitted θ, in report order.
NONLINEAR_SCORES = ("leverage", "adjoint_leverage", "response_leverage", "norm")
#: Baselines at the same θ.
BASELINE_SCORES = ("loss", "grad_norm")

#: The default binary task: Sneaker (7) vs. Ankle boot (9), distinguishable (≈ 97% training accuracy
#: with the default network) yet not trivially separable.
DEFAULT_CLASSES = (7, 9)

#: The model: ``nets.mlp`` with ReLU, built ONCE so that the compiled kernels (``nj.fit``,
#: ``nj.dual_matrix``, the baselines), cached on ``apply_fn``, are reused across studies.
_APPLY_FN = nets.mlp(jax.nn.relu)


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class OutlierConfig:
    r"""Options of an outlier study (frozen, hence hashable).

    Attributes:
        n: training examples (the first ``n`` of the train split after the class filter); ``None`` for all.
        classes: Fashion-MNIST classes to keep, relabelled ``0, 1, …`` in this order. Two classes give a
            binary task with ``±1`` targets and a scalar output; more give one-hot targets, ``k`` outputs and
            block scores. ``None``: all 10 classes.
        flip_fraction: share of the training labels to flip (``round(flip_fraction · n)`` of them, at
            least 1). Binary labels are swapped; a multiclass label becomes a different class, uniformly.
        hidden: widths of the hidden ReLU layers (an int for one layer). The default 8 (``p = 409`` for the
            binary task on 7 × 7 inputs) keeps ``p`` well below ``n``: the larger ``p/n``, the more of the
            residual ``range(F*)`` absorbs, and the weaker ``response_leverage`` gets (``n = 2000``,
            ``p = 1633``: AUROC 0.76 against the loss's 0.96).
        steps: full-batch (or minibatch) Adam steps on the squared loss.
        learning_rate: Adam's learning rate.
        batch_size: minibatch size, ``None`` for full-batch steps.
        pool: average-pool the images by this factor (``28 → 28 / pool``; 4 gives 7 × 7 = 49 features);
            1 keeps every pixel. Ignored for inputs that are not ``(n, h, w)`` images.
        pca: project the (pooled) features onto this many principal components; ``None`` to skip.
        num_nodes: Gauss-Legendre nodes of the adjoint. For a one-hidden-layer ReLU network with biases,
            ``f(tθ; x) = t² a(x) + t b(x)`` exactly (first-layer signs do not depend on ``t > 0``), so 2
            nodes are already exact; deeper networks have kinks in ``t``, where more nodes help.
        seed: everything random (flips, initialisation, minibatches) comes from ``jax.random.key(seed)``.
        grid_per_class: images per class on each side (top and bottom) of the image grid.
        grid_scores: scores to draw grids for; ``None``: the best nonlinear score by AUROC, and ``loss``.
        dtype: ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``) for features, model and scores.
        download_if_missing: let :func:`nlis_jax.datasets.load_fashion_mnist` download Fashion-MNIST when it
            is not found (needs internet); by default a missing data set raises at once.
    """

    n: int | None = 12_000
    classes: tuple[int, ...] | None = DEFAULT_CLASSES
    flip_fraction: float = 0.02
    hidden: tuple[int, ...] = (8,)
    steps: int = 1000
    learning_rate: float = 1e-2
    batch_size: int | None = None
    pool: int = 4
    pca: int | None = None
    num_nodes: int = 4
    seed: int = 0
    grid_per_class: int = 8
    grid_scores: tuple[str, ...] | None = None
    dtype: str = "float32"
    download_if_missing: bool = False

    def __post_init__(self):
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(int(h) for h in self.hidden)
        object.__setattr__(self, "hidden", hidden)
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
            if len(self.classes) < 2:
                raise ValueError(f"classes must name at least two classes, got {self.classes}.")
        if self.grid_scores is not None:
            object.__setattr__(self, "grid_scores", tuple(self.grid_scores))
            unknown = set(self.grid_scores) - set(NONLINEAR_SCORES + BASELINE_SCORES)
            if unknown:
                known = NONLINEAR_SCORES + BASELINE_SCORES
                raise ValueError(f"grid_scores: unknown {sorted(unknown)}; choose from {known}.")
        if self.n is not None and self.n < 4:
            raise ValueError(f"n must be at least 4 (or None for all), got {self.n}.")
        if not 0.0 < self.flip_fraction < 0.5:
            raise ValueError(f"flip_fraction must lie in (0, 0.5), got {self.flip_fraction}.")
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be positive layer widths, got {self.hidden}.")
        for name in ("steps", "pool", "num_nodes", "grid_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.pca is not None and self.pca < 1:
            raise ValueError(f"pca must be a positive integer or None, got {self.pca}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")


# --------------------------------------------------------------------------------------------------
# Metrics


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and labels must be 1-D of the same length, got {s.shape} and {y.shape}.")
    if s.size == 0:
        raise ValueError("scores is empty.")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or Inf.")
    if y.dtype != bool:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be boolean or 0/1 (1 = positive, e.g. a flipped label).")
        y = y.astype(bool)
    return s, y


def _midranks(s: np.ndarray) -> np.ndarray:
    """Ranks ``1..n`` of ``s`` (ascending), ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid = ends - (counts - 1) / 2.0  # mean of ranks (ends - counts + 1) .. ends
    return mid[inverse.reshape(-1)]


def auroc(scores, labels) -> float:
    r"""Area under the ROC curve, by the rank-sum (Mann–Whitney U) statistic with midranks for ties.

    .. math:: \mathrm{AUROC} = \frac{1}{n_1 n_0}\sum_{i: y_i=1}\sum_{j: y_j=0}
              \big(\mathbb 1[s_i > s_j] + \tfrac12 \mathbb 1[s_i = s_j]\big)
              = \frac{R_1 - n_1(n_1+1)/2}{n_1 n_0},

    ``R_1`` the sum of the (mid)ranks of the positives. Equals :func:`sklearn.metrics.roc_auc_score`.

    Args:
        scores: ``(n,)`` real scores, higher = more likely positive.
        labels: ``(n,)`` booleans or 0/1 (1 = positive); both classes must be present.

    Returns:
        A float in ``[0, 1]``; 0.5 for an uninformative score.
    """
    s, y = _check_scores_labels(scores, labels)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(f"AUROC needs both positives and negatives; got {n1} positives and {n0} negatives.")
    r1 = float(_midranks(s)[y].sum())
    return (r1 - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def precision_at_k(scores, labels, k: int) -> float:
    r"""Share of positives among the ``k`` highest scores, ties at the cut-off shared fairly.

    When the ``k``-th largest score is tied, the result is the EXPECTED precision over a uniformly random
    order of the tied examples: with ``a`` examples strictly above the ``k``-th score (``a_1`` of them
    positive) and ``t`` tied at it (``t_1`` positive),

    .. math:: P@k = \big(a_1 + (k - a)\, t_1 / t\big) / k.

    Args:
        scores: ``(n,)`` real scores, higher = more likely positive.
        labels: ``(n,)`` booleans or 0/1 (1 = positive).
        k: ``1 ≤ k ≤ n``.

    Returns:
        A float in ``[0, 1]``.
    """
    s, y = _check_scores_labels(scores, labels)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= s.size:
        raise ValueError(f"k must be an integer in [1, {s.size}], got {k!r}.")
    kth = np.partition(s, s.size - k)[s.size - k]  # the k-th largest value
    above, tied = s > kth, s == kth
    a, t = int(above.sum()), int(tied.sum())
    return (float(y[above].sum()) + (k - a) * float(y[tied].sum()) / t) / k


# --------------------------------------------------------------------------------------------------
# Data: features and label flips


def prepare_features(images, *, pool: int = 1, pca: int | None = None, dtype=np.float32) -> np.ndarray:
    r"""Model inputs from raw examples: average pooling, optional PCA, then per-feature standardisation.

    Args:
        images: ``(n, h, w)`` images (pooled by ``pool``, cropping ``h, w`` to multiples of it) or
            ``(n, d)`` feature vectors (not pooled).
        pool: pooling factor for images (1: none).
        pca: keep this many principal components of the centred features (``None``: none).
        dtype: floating dtype of the result.

    Returns:
        ``(n, d')`` features with mean 0 and standard deviation 1 per column (constant columns only
        centred).
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3 and pool > 1:
        n, h, w = x.shape
        hp, wp = h // pool, w // pool
        if hp == 0 or wp == 0:
            raise ValueError(f"pool={pool} is larger than the images ({h} × {w}).")
        x = x[:, : hp * pool, : wp * pool].reshape(n, hp, pool, wp, pool).mean(axis=(2, 4))
    x = x.reshape(x.shape[0], -1)
    x = x - x.mean(axis=0)
    if pca is not None:
        if pca > min(x.shape):
            raise ValueError(f"pca={pca} exceeds min(n, d) = {min(x.shape)}.")
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        x = x @ vt[:pca].T
    std = x.std(axis=0)
    return (x / np.where(std > 0, std, 1.0)).astype(dtype)


def flip_labels(
    key: PRNGKey,
    labels,
    num_classes: int,
    *,
    fraction: float | None = None,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Flip a known set of labels: ``count`` (or ``round(fraction · n)``, at least 1) distinct examples.

    The examples are drawn uniformly without replacement with one half of ``key``; each chosen label ``y``
    becomes ``(y + s) mod K`` with ``s`` uniform on ``1..K-1`` from the other half, so it always changes,
    uniformly over the other classes (for ``K = 2``: ``0 ↔ 1``).

    Args:
        key: a ``jax.random.key``.
        labels: ``(n,)`` integer labels in ``0..num_classes-1``.
        num_classes: ``K ≥ 2``.
        fraction, count: how many to flip (exactly one of them).

    Returns:
        ``(noisy_labels (n,) int32, flipped (n,) bool)``; ``noisy_labels != labels`` exactly where
        ``flipped``.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {y.shape} and dtype {y.dtype}.")
    if num_classes < 2 or y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} with num_classes ≥ 2.")
    n = y.size
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction and count.")
    if count is None:
        count = max(1, int(round(fraction * n)))
    if not 1 <= count <= n:
        raise ValueError(f"count must lie in [1, n = {n}], got {count}.")
    k_idx, k_cls = jax.random.split(key)
    idx = np.asarray(jax.random.choice(k_idx, n, (count,), replace=False))
    shift = np.asarray(jax.random.randint(k_cls, (count,), 1, num_classes))
    noisy = y.astype(np.int32).copy()
    noisy[idx] = (noisy[idx] + shift) % num_classes
    flipped = np.zeros(n, dtype=bool)
    flipped[idx] = True
    return noisy, flipped


def _targets(labels: np.ndarray, num_classes: int, dtype) -> np.ndarray:
    """``±1`` targets ``(n,)`` for two classes, one-hot ``(n, K)`` otherwise."""
    if num_classes == 2:
        return (2.0 * labels - 1.0).astype(dtype)
    return np.eye(num_classes, dtype=dtype)[labels]


# --------------------------------------------------------------------------------------------------
# Scores


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def _baselines(apply_fn, params, xs, ts, *, batch_size):
    """Per-example squared loss and the l2 norm of its gradient in θ: two ``(n,)`` arrays."""

    def loss(p, x, t):
        return jnp.sum(jnp.square(apply_fn(p, x) - t))

    def one(xt):
        value, grad = jax.value_and_grad(loss)(params, *xt)
        sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grad))
        return value, jnp.sqrt(sq)

    return jax.lax.map(one, (xs, ts), batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("n",))
def _adjoint_parts(basis: Array, c: Array, *, n: int) -> tuple[Array, Array, Array]:
    """From an orthonormal basis ``(n·k, p)`` of ``range(F*)`` and the last column ``c = f(0) − y``
    ``(n·k,)``: block leverage of ``F*`` ``(n,)``, response leverage ``e_i²/‖e‖²`` ``(n,)`` with
    ``e = (I − P_{F*}) c`` (all zeros when ``e = 0``: ``c ∈ range(F*)``, an interpolating model), and
    ``‖e‖/‖c‖``."""
    h_adj = jnp.sum(jnp.square(basis), axis=1).reshape(n, -1).sum(axis=1)
    e = c - basis @ (basis.T @ c)
    e_sq = jnp.square(e).reshape(n, -1).sum(axis=1)
    e_total = jnp.sum(e_sq)
    resp = jnp.where(e_total > 0, e_sq / jnp.where(e_total > 0, e_total, 1), 0)
    return h_adj, resp, jnp.sqrt(e_total) / jnp.linalg.norm(c)


def outlier_scores(
    apply_fn, params: PyTree, xs: Array, ts: Array, *, num_nodes: int = 4
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    r"""Every score of the study at ``params``: the nonlinear ones and the two baselines.

    Args:
        apply_fn: ``apply_fn(params, x)`` for ONE example: a scalar or ``(k,)`` outputs.
        params: the fitted parameters (``p`` entries).
        xs: ``(n, d)`` inputs.
        ts: ``(n,)`` or ``(n, k)`` targets (the training targets, noisy labels included).
        num_nodes: Gauss-Legendre nodes of the adjoint.

    Returns:
        ``(scores, info)``: ``scores`` maps each name of :data:`NONLINEAR_SCORES` and
        :data:`BASELINE_SCORES` to an ``(n,)`` float64 array (higher = more suspicious). ``info`` holds
        diagnostics (``p``, ranks, routes, ``decomposition_gap`` = max over i of
        ``|h_i(F̃) − h_i(F*) − e_i²/‖e‖²|``, which is 0 in exact arithmetic when
        ``rank(F̃) = rank(F*) + 1``) and timings.
    """
    n = xs.shape[0]
    info: dict[str, Any] = {}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    loss, grad_norm = jax.block_until_ready(_baselines(apply_fn, params, xs, ts, batch_size=min(n, 2048)))
    timings["baselines_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dual = jax.block_until_ready(nj.dual_matrix(apply_fn, params, xs, ts, num_nodes=num_nodes))
    timings["dual_matrix_s"] = time.perf_counter() - t0
    info["dual_shape"] = list(dual.shape)
    info["p"] = int(dual.shape[-1] - 1)

    t0 = time.perf_counter()
    h_dual, rank_dual = nj.leverage(dual)
    h_dual = jax.block_until_ready(h_dual)
    timings["leverage_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    basis, rank_adj, route_adj = nj.orthonormal_basis(dual[..., :-1])  # (n·k, p)
    h_adj, resp, outside = jax.block_until_ready(_adjoint_parts(basis, dual[..., -1].reshape(-1), n=n))
    timings["adjoint_leverage_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    norm = jax.block_until_ready(nj.norm_scores(dual))
    timings["norm_s"] = time.perf_counter() - t0

    h_dual64, h_adj64, resp64 = (np.asarray(a, np.float64) for a in (h_dual, h_adj, resp))
    info.update(
        rank_dual=int(rank_dual),
        rank_adjoint=int(rank_adj),
        route_adjoint=nj.ROUTES[int(route_adj)],
        residual_outside_adjoint_range=float(outside),
        decomposition_gap=float(np.max(np.abs(h_dual64 - h_adj64 - resp64))),
        timings=timings,
    )
    scores = {
        "leverage": h_dual64 / max(int(rank_dual), 1),
        "adjoint_leverage": h_adj64 / max(int(rank_adj), 1),
        "response_leverage": resp64,
        "norm": np.asarray(norm, np.float64),
        "loss": np.asarray(loss, np.float64),
        "grad_norm": np.asarray(grad_norm, np.float64),
    }
    return scores, info


# --------------------------------------------------------------------------------------------------
# Image grid


def _as_images(x: np.ndarray) -> np.ndarray:
    """``(n, h, w)`` images for display: as given, square-reshaped ``(n, d)`` when ``d`` is a square,
    else ``(n, 1, d)`` strips."""
    x = np.asarray(x)
    if x.ndim == 3:
        return x
    x = x.reshape(x.shape[0], -1)
    side = math.isqrt(x.shape[1])
    if side * side == x.shape[1]:
        return x.reshape(-1, side, side)
    return x[:, None, :]


def save_score_grid(
    path,
    images,
    labels,
    flipped,
    scores,
    *,
    per_class: int = 8,
    class_names: Sequence[str] | None = None,
    true_labels=None,
    title: str = "",
) -> Path:
    """Save a PNG grid: one row per (given) class, its ``per_class`` highest-scored examples on the left
    and its ``per_class`` lowest-scored on the right. Flipped examples get a red frame and their true
    class in red.

    Args:
        path: output ``.png`` file.
        images: ``(n, h, w)`` images, or ``(n, d)`` (shown as squares when ``d`` is a square, else strips).
        labels: ``(n,)`` given (possibly flipped) integer labels: the row of each example.
        flipped: ``(n,)`` booleans.
        scores: ``(n,)`` scores, higher = more suspicious.
        per_class: examples per side.
        class_names: names of the labels ``0..K-1``.
        true_labels: ``(n,)`` clean labels, to name the true class of flipped examples.
        title: figure title.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    imgs = _as_images(images)
    labels = np.asarray(labels)
    flipped = np.asarray(flipped, bool)
    scores = np.asarray(scores, np.float64)
    num_classes = int(labels.max()) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    cols = 2 * per_class + 1  # a blank spacer column between top and bottom
    aspect = imgs.shape[2] / imgs.shape[1]
    cell = 0.9
    fig = Figure(figsize=(cols * cell * min(aspect, 4.0), num_classes * cell * 1.25 + 0.8), dpi=100)
    axes = fig.subplots(num_classes, cols, squeeze=False)
    vmin, vmax = float(np.min(imgs)), float(np.max(imgs))
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(-scores[members], kind="stable")]
        top, bottom = order[:per_class], order[::-1][:per_class][::-1]
        chosen = [(j, top[j] if j < top.size else None) for j in range(per_class)]
        chosen += [(per_class + 1 + j, bottom[j] if j < bottom.size else None) for j in range(per_class)]
        for ax in axes[c]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        for col, i in chosen:
            if i is None:
                continue
            ax = axes[c, col]
            ax.imshow(imgs[i], cmap="gray_r", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            if flipped[i]:
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color("red")
                    spine.set_linewidth(2.5)
                true_name = names[int(true_labels[i])] if true_labels is not None else "flipped"
                ax.set_title(f"true: {true_name}", fontsize=6, color="red", pad=2)
        axes[c, 0].set_ylabel(names[c] if c < len(names) else str(c), fontsize=7, rotation=0, ha="right")
    axes[0, 0].annotate(
        f"{per_class} highest-scored (highest at left)",
        (0, 1.45),
        xycoords="axes fraction",
        fontsize=8,
        annotation_clip=False,
    )
    axes[0, per_class + 1].annotate(
        f"{per_class} lowest-scored (lowest at right)",
        (0, 1.45),
        xycoords="axes fraction",
        fontsize=8,
        annotation_clip=False,
    )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.12, right=0.99, bottom=0.02, top=1 - 0.9 / fig.get_figheight(), wspace=0.08)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------------
# The study


@functools.lru_cache(maxsize=16)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    """One Adam object per learning rate, so :func:`nlis_jax.fit` reuses its compiled loop."""
    return optax.adam(learning_rate)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[outliers] {msg}", file=sys.stderr, flush=True)


def _load(config: OutlierConfig, data) -> tuple[np.ndarray, np.ndarray, int, tuple[str, ...] | None]:
    """``(images, labels, K, class_names)`` from ``data`` or from Fashion-MNIST."""
    if data is None:
        ds = datasets.load_fashion_mnist(
            flatten=False,
            classes=config.classes,
            limit=config.n,
            download_if_missing=config.download_if_missing,
        )
        num_classes = 10 if config.classes is None else len(config.classes)
        return ds.x, ds.y, num_classes, ds.class_names
    if isinstance(data, datasets.Dataset):
        x, y, names = data.x, data.y, data.class_names
    else:
        x, y = data
        names = None
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"data must be (x (n, ...), labels (n,)), got shapes {x.shape} and {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError("data labels must be non-negative integers 0..K-1.")
    if config.n is not None:
        x, y = x[: config.n], y[: config.n]
    num_classes = max(2, int(y.max()) + 1)
    return x, y.astype(np.int32), num_classes, names


def run_outlier_study(
    config: OutlierConfig = OutlierConfig(),
    *,
    data=None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Flip labels, fit, score, and measure how well each score finds the flipped labels.

    Steps: load the data (or take ``data``); flip ``round(flip_fraction · n)`` labels
    (:func:`flip_labels`); features by :func:`prepare_features`; fit a ReLU MLP
    ``d → hidden… → (1 or K)`` with :func:`nlis_jax.fit` (Adam, squared loss on ``±1`` / one-hot targets
    of the NOISY labels); compute :func:`outlier_scores` at the fitted θ; AUROC, precision at ``k`` and
    ``2k`` (``k`` = number of flipped labels) of each score against the flipped mask.

    Randomness: ``jax.random.key(config.seed)`` is split into independent keys for the flips, the
    initialisation and the minibatches.

    Args:
        config: the study's options.
        data: ``None`` to load the Fashion-MNIST train split (``config.classes``, first ``config.n``), or a
            :class:`nlis_jax.datasets.Dataset` / a pair ``(x, labels)``: ``x`` of shape ``(n, h, w)``
            (images, pooled by ``config.pool``) or ``(n, d)``, ``labels`` integers ``0..K-1`` (``K`` =
            ``max + 1``); the first ``config.n`` are used.
        out_dir: if given, write ``results.json``, ``scores.npz`` (every score, the flipped mask and the
            labels) and one ``grid_<score>.png`` per grid score there.
        progress: log the stages to stderr and show the fit's progress bar.

    Returns:
        A JSON-ready dict: ``metrics`` (per score: ``auroc``, ``precision_at_k``, ``precision_at_2k``,
        ``kind`` = ``"nonlinear"`` or ``"baseline"``), ``best_nonlinear``, ``best_overall``, ``n``, ``p``,
        ``k`` (outputs), ``num_flipped``, ``accuracy`` (training accuracy on the noisy and on the clean
        labels), ``diagnostics``, ``timings`` (seconds) and ``config``; plus ``files`` when ``out_dir``
        is given.

    Raises:
        nlis_jax.datasets.DatasetNotFoundError: when ``data`` is ``None`` and Fashion-MNIST is not found.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    dtype = np.dtype(config.dtype)
    if dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError('dtype="float64" needs jax.config.update("jax_enable_x64", True).')

    t0 = time.perf_counter()
    images, labels, num_classes, class_names = _load(config, data)
    n = labels.shape[0]
    key = jax.random.key(config.seed)
    k_flip, k_init, k_fit = jax.random.split(key, 3)
    noisy, flipped = flip_labels(k_flip, labels, num_classes, fraction=config.flip_fraction)
    num_flipped = int(flipped.sum())
    xs = jnp.asarray(prepare_features(images, pool=config.pool, pca=config.pca, dtype=dtype))
    ts = jnp.asarray(_targets(noisy, num_classes, dtype))
    timings["data_s"] = time.perf_counter() - t0
    _log(progress, f"n = {n}, K = {num_classes}, {num_flipped} flipped, features {xs.shape[1]}")

    t0 = time.perf_counter()
    out_dim = 1 if num_classes == 2 else num_classes
    params = nets.mlp_init(k_init, (xs.shape[1], *config.hidden, out_dim), dtype=dtype)
    fitted = nj.fit(
        _APPLY_FN,
        params,
        xs,
        ts,
        optimizer=_adam(config.learning_rate),
        num_steps=config.steps,
        loss="squared",
        batch_size=config.batch_size,
        key=k_fit if config.batch_size is not None else None,
        progress=progress,
    )
    params = jax.block_until_ready(fitted.params)
    timings["fit_s"] = time.perf_counter() - t0
    preds = np.asarray(jax.vmap(_APPLY_FN, in_axes=(None, 0))(params, xs))
    predicted = (preds > 0).astype(np.int32) if num_classes == 2 else preds.argmax(axis=1)
    accuracy = {
        "noisy_labels": float(np.mean(predicted == noisy)),
        "clean_labels": float(np.mean(predicted == labels)),
        "flipped_fitted": float(np.mean(predicted[flipped] == noisy[flipped])),
    }
    _log(progress, f"fit {timings['fit_s']:.1f}s, train accuracy {accuracy}")

    scores, info = outlier_scores(_APPLY_FN, params, xs, ts, num_nodes=config.num_nodes)
    timings.update(info.pop("timings"))
    _log(progress, f"scores done, p = {info['p']}")

    metrics = {}
    for name in NONLINEAR_SCORES + BASELINE_SCORES:
        s = scores[name]
        metrics[name] = {
            "kind": "nonlinear" if name in NONLINEAR_SCORES else "baseline",
            "auroc": auroc(s, flipped),
            "precision_at_k": precision_at_k(s, flipped, num_flipped),
            "precision_at_2k": precision_at_k(s, flipped, min(2 * num_flipped, n)),
        }
    best_nonlinear = max(NONLINEAR_SCORES, key=lambda s: metrics[s]["auroc"])
    best_overall = max(metrics, key=lambda s: metrics[s]["auroc"])

    result: dict[str, Any] = {
        "task": "binary" if num_classes == 2 else f"{num_classes}-class",
        "classes": list(config.classes) if (data is None and config.classes is not None) else None,
        "class_names": list(class_names) if class_names is not None else None,
        "n": int(n),
        "p": info["p"],
        "k": int(out_dim),
        "num_features": int(xs.shape[1]),
        "num_flipped": num_flipped,
        "metrics": metrics,
        "best_nonlinear": best_nonlinear,
        "best_overall": best_overall,
        "accuracy": accuracy,
        "final_mean_loss": float(fitted.final_loss) / n,
        "diagnostics": info,
        "timings": timings,
        "config": dataclasses.asdict(config),
        "environment": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind,
        },
    }

    if out_dir is not None:
        t0 = time.perf_counter()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        grid_scores = config.grid_scores or tuple(dict.fromkeys((best_nonlinear, "loss")))
        for name in grid_scores:
            m = metrics[name]
            title = (
                f"{name}: AUROC {m['auroc']:.3f}, P@k {m['precision_at_k']:.2f} (k = {num_flipped}); "
                f"red = flipped label (row = given label)"
            )
            path = save_score_grid(
                out / f"grid_{name}.png",
                images,
                noisy,
                flipped,
                scores[name],
                per_class=config.grid_per_class,
                class_names=class_names,
                true_labels=labels,
                title=title,
            )
            files[f"grid_{name}"] = str(path)
        np.savez_compressed(out / "scores.npz", flipped=flipped, labels=labels, noisy_labels=noisy, **scores)
        files["scores"] = str(out / "scores.npz")
        files["results"] = str(out / "results.json")
        result["files"] = files
        timings["write_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        (Path(out_dir) / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------------
# CLI


def _int_tuple(text) -> tuple[int, ...]:
    if isinstance(text, str):
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    if isinstance(text, int):
        return (text,)
    return tuple(int(t) for t in text)


def _parse_classes(value) -> tuple[int, ...] | None:
    """``"all"`` → ``None`` (all 10 classes); ``"7,9"`` / ``[7, 9]`` → ``(7, 9)``."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    if isinstance(value, (list, tuple)) and len(value) == 1 and str(value[0]).lower() == "all":
        return None
    return _int_tuple(value)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "full", "0") else int(text)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the outlier study's options on ``parser`` (e.g. the ``outliers`` subparser).

    Options already present on ``parser`` (say a shared ``--seed`` or ``--out``) are left as they are.
    Every option defaults to ``None``; :func:`run` then takes :class:`OutlierConfig`'s default.

    Returns:
        ``parser``.
    """
    options = [
        (("--n",), dict(type=int, help="training examples (default 12000; the binary task has 12000)")),
        (
            ("--classes",),
            dict(help="comma-separated Fashion-MNIST classes, or 'all' (default 7,9: sneaker vs ankle boot)"),
        ),
        (("--flip-fraction",), dict(type=float, help="share of labels flipped (default 0.02)")),
        (("--hidden",), dict(help="hidden widths, comma-separated (default 8)")),
        (("--steps",), dict(type=int, help="Adam steps (default 1000)")),
        (("--lr",), dict(type=float, dest="learning_rate", help="Adam learning rate (default 0.01)")),
        (("--batch-size",), dict(type=_optional_int, help="minibatch size (default: full batch)")),
        (("--pool",), dict(type=int, help="average-pooling factor of the 28×28 images (default 4)")),
        (("--pca",), dict(type=_optional_int, help="PCA components after pooling (default: none)")),
        (("--num-nodes",), dict(type=int, help="Gauss-Legendre nodes of the adjoint (default 4)")),
        (("--dtype",), dict(choices=("float32", "float64"), help="default float32")),
        (("--seed",), dict(type=int, help="PRNG seed (default 0)")),
        (("--out",), dict(help="output folder for results.json, scores.npz and the PNG grids")),
        (("--no-progress",), dict(action="store_false", dest="progress", default=None)),
    ]
    for flags, kwargs in options:
        kwargs.setdefault("default", None)
        try:
            parser.add_argument(*flags, **kwargs)
        except argparse.ArgumentError:  # already registered by the caller
            pass
    return parser


def _config_from_args(args: argparse.Namespace) -> OutlierConfig:
    fields = {}
    mapping = {
        "n": None,
        "classes": _parse_classes,
        "flip_fraction": float,
        "hidden": _int_tuple,
        "steps": int,
        "learning_rate": float,
        "batch_size": None,
        "pool": int,
        "pca": None,
        "num_nodes": int,
        "dtype": str,
        "seed": int,
    }
    for name, convert in mapping.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        fields[name] = convert(value) if convert is not None else value
    return OutlierConfig(**fields)


def format_table(result: dict[str, Any]) -> str:
    """The metrics of a :func:`run_outlier_study` result as a plain-text table."""
    k = result["num_flipped"]
    lines = [
        f"outliers: {result['task']}, n = {result['n']}, p = {result['p']}, {k} flipped labels, "
        f"{result['timings']['total_s']:.1f} s",
        f"{'score':<20}{'kind':<11}{'AUROC':>8}{'P@k':>8}{'P@2k':>8}",
    ]
    for name, m in result["metrics"].items():
        lines.append(
            f"{name:<20}{m['kind']:<11}{m['auroc']:>8.4f}{m['precision_at_k']:>8.3f}{m['precision_at_2k']:>8.3f}"
        )
    lines.append(f"best nonlinear: {result['best_nonlinear']}; best overall: {result['best_overall']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``nlis-jax outliers``: run the study from parsed CLI options, print the metrics table, return 0.

    Reads ``args.out`` (folder, or ``None`` to write nothing), ``args.seed``, ``args.n``, ``args.classes``
    (``None`` for the default pair, ``"all"``, ``"7,9"`` or a list), ``args.progress`` and any option of
    :func:`add_arguments`; a missing attribute or ``None`` means :class:`OutlierConfig`'s default.

    Raises:
        nlis_jax.datasets.DatasetNotFoundError: when Fashion-MNIST is not found.
    """
    config = _config_from_args(args)
    progress = getattr(args, "progress", None)
    out = getattr(args, "out", None)
    result = run_outlier_study(config, out_dir=out, progress=True if progress is None else bool(progress))
    print(format_table(result))
    if out is not None:
        print(f"wrote {', '.join(result['files'].values())}")
    return 0
