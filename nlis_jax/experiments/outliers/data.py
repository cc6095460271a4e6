"""Data of the outlier study: loading, planted outliers (flipped labels or corrupted inputs) at a known set
of examples."""

from __future__ import annotations

import jax
import numpy as np

from nlis_jax._checks import check_positive_int, check_real
from nlis_jax.experiments import datasets
from nlis_jax.experiments.outliers.config import OutlierConfig

__all__ = ["corrupt_inputs", "flip_labels", "load_data", "load_foreign", "plant_outliers"]


def _outlier_count(n: int, fraction: float | None, count: int | None) -> int:
    """``count``, or ``round(fraction · n)`` (at least 1), checked to lie in ``[1, n]``."""
    if n == 0:
        raise ValueError("there are no examples to make outliers of (n = 0).")
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction and count.")
    if count is None:
        value = check_real("fraction", fraction)  # True is not a fraction (it made every example an outlier)
        if not (np.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")
        count = max(1, int(round(value * n)))  # Python's round: half to even (2.5 -> 2)
    else:
        count = check_positive_int("count", count)  # 2.5 was truncated to 2, True taken as 1
        if count > n:
            raise ValueError(f"count must lie in [1, n = {n}], got {count}.")
    return int(count)


def _choose(key: jax.Array, n: int, fraction: float | None, count: int | None):
    """The planted examples, drawn uniformly without replacement with one half of ``key``:
    ``(indices (count,), mask (n,) bool, the other half of key)``."""
    count = _outlier_count(n, fraction, count)
    k_idx, k_rest = jax.random.split(key)
    idx = np.asarray(jax.random.choice(k_idx, n, (count,), replace=False))
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return idx, mask, k_rest


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
    num_classes = check_positive_int("num_classes", num_classes)  # 2.5 drew labels 2 for a binary task
    if num_classes < 2 or y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} with num_classes ≥ 2.")
    idx, flipped, k_cls = _choose(key, y.size, fraction, count)
    shift = np.asarray(jax.random.randint(k_cls, idx.shape, 1, num_classes))
    noisy = y.astype(np.int32).copy()
    noisy[idx] = (noisy[idx] + shift) % num_classes
    return noisy, flipped


def corrupt_inputs(
    key: jax.Array,
    inputs,
    kind: str,
    *,
    fraction: float | None = None,
    count: int | None = None,
    noise_scale: float = 0.5,
    foreign=None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Corrupt the inputs of a known set of examples (their labels are not touched).

    ``count`` (or ``round(fraction · n)``, at least 1) distinct examples are drawn uniformly without
    replacement with one half of ``key``; the other half draws the corruption. On the pixel scale of
    ``[0, 1]`` images:

    * ``"invert"``: ``1 − x`` (a negative image);
    * ``"noise"``: ``x + noise_scale · z``, ``z`` standard normal per pixel (not clipped);
    * ``"foreign"``: ``x`` replaced by a row of ``foreign`` (images of classes outside the task), drawn
      uniformly without replacement.

    Args:
        key: a ``jax.random.key``.
        inputs: ``(n, ...)`` inputs, e.g. ``(n, 28, 28)`` images in ``[0, 1]``; not modified.
        kind: ``"invert"``, ``"noise"`` or ``"foreign"``.
        fraction, count: how many to corrupt (exactly one of them).
        noise_scale: standard deviation of ``"noise"`` (positive).
        foreign: for ``"foreign"``, ``(m, ...)`` replacement inputs (same shape per example, ``m ≥ count``).

    Returns:
        ``(corrupted (n, ...) float array, a new array; corrupted_mask (n,) bool)``: rows differ from
        ``inputs`` only where the mask is set.
    """
    x = np.asarray(inputs)
    if x.ndim < 1 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"inputs must be a numeric array (n, ...), got shape {x.shape}, dtype {x.dtype}.")
    if kind not in ("invert", "noise", "foreign"):
        raise ValueError(f"kind must be 'invert', 'noise' or 'foreign', got {kind!r}.")
    idx, mask, k_draw = _choose(key, x.shape[0], fraction, count)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    out = x.astype(dtype, copy=True)
    out[idx] = _corrupted_rows(k_draw, out[idx], kind, noise_scale, foreign, x.shape[1:])
    return out, mask


def _corrupted_rows(key, rows: np.ndarray, kind: str, noise_scale: float, foreign, shape) -> np.ndarray:
    """The ``kind`` corruption of ``rows`` (``(count, ...)``, a copy)."""
    if kind == "invert":
        return 1 - rows
    if kind == "noise":
        if not (np.isfinite(noise_scale) and noise_scale > 0):
            raise ValueError(f"noise_scale must be a positive number, got {noise_scale}.")
        z = np.asarray(jax.random.normal(key, rows.shape, np.float32))  # float32 draws for every dtype
        return rows + noise_scale * z.astype(rows.dtype)
    if foreign is None:
        raise ValueError('kind="foreign" needs foreign: replacement inputs (m, ...).')
    pool = np.asarray(foreign)
    if pool.shape[1:] != shape or pool.shape[0] < rows.shape[0]:
        raise ValueError(
            f"foreign must have shape (m ≥ {rows.shape[0]}, {', '.join(map(str, shape))}), got {pool.shape}."
        )
    pick = np.asarray(jax.random.choice(key, pool.shape[0], (rows.shape[0],), replace=False))
    return pool[pick].astype(rows.dtype)


def load_foreign(config: OutlierConfig, count: int) -> np.ndarray:
    """``(m, 28, 28)`` Fashion-MNIST train images of the classes outside ``config.classes`` (the first
    ``m = max(10·count, 1000)`` of them, fewer if the split has fewer), in ``[0, 1]``."""
    if config.classes is None or len(config.classes) >= 10:
        raise ValueError('corruption="foreign" needs a class outside classes; all 10 are in the task.')
    others = tuple(c for c in range(10) if c not in config.classes)
    ds = datasets.load_fashion_mnist(
        flatten=False,
        classes=others,
        limit=max(10 * count, 1000),
        download_if_missing=config.download_if_missing,
    )
    return ds.x


def plant_outliers(key, config: OutlierConfig, images, labels, num_classes: int, foreign=None):
    """The study's outliers: ``(inputs, given_labels, outlier_mask)``. For ``config.corruption == "flip"``
    the labels are flipped (:func:`flip_labels`) and ``inputs`` is ``images``; otherwise the inputs are
    corrupted (:func:`corrupt_inputs`) and the labels kept. ``foreign``: replacement images for
    ``"foreign"`` (``None``: :func:`load_foreign`)."""
    if config.corruption == "flip":
        noisy, mask = flip_labels(key, labels, num_classes, fraction=config.flip_fraction)
        return images, noisy, mask
    count = _outlier_count(np.shape(labels)[0], config.flip_fraction, None)
    if config.corruption == "foreign" and foreign is None:
        foreign = load_foreign(config, count)
    corrupted, mask = corrupt_inputs(
        key, images, config.corruption, count=count, noise_scale=config.noise_scale, foreign=foreign
    )
    return corrupted, np.asarray(labels, np.int32).copy(), mask


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
        if config.n is not None and ds.x.shape[0] < config.n:
            raise ValueError(f"n = {config.n} is more than the {ds.x.shape[0]} images of the chosen classes.")
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
