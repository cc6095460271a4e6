"""Data of the outlier study: loading, a known set of flipped labels, and the regression targets."""

from __future__ import annotations

import jax
import numpy as np

from nlis_jax.experiments import datasets
from nlis_jax.experiments.outliers.config import OutlierConfig

__all__ = ["flip_labels", "load_data"]


def flip_labels(
    key: jax.Array,
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


def load_data(config: OutlierConfig, data=None) -> tuple[np.ndarray, np.ndarray, int, tuple[str, ...] | None]:
    """``(images, labels, K, class_names)`` from ``data`` (a
    :class:`~nlis_jax.experiments.datasets.Dataset` or a pair ``(x, labels)``) or, for ``data=None``, from
    Fashion-MNIST (``config.classes``, ``config.n``)."""
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
