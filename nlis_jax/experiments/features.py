"""Model inputs from raw examples: average pooling, standardisation and principal components.

One implementation for every study (the sampling studies' Fashion-MNIST and digits problems and the
outlier study). Statistics (means, scales, principal axes) always come from the training array and are
applied unchanged to any held-out arrays passed beside it.
"""

from __future__ import annotations

import numpy as np

from nlis_jax.experiments.checks import positive_int

__all__ = ["label_targets", "pool_images", "prepare_features", "principal_components", "standardize"]


def pool_images(images, pool: int) -> np.ndarray:
    """Average-pool ``(n, h, w)`` images by ``pool × pool`` blocks (cropping ``h, w`` to multiples of
    ``pool``) -> ``(n, h // pool, w // pool)``; ``pool = 1`` returns the images as they are."""
    x = np.asarray(images)
    pool = positive_int("pool", pool)
    if x.ndim != 3:
        raise ValueError(f"images must have shape (n, h, w), got {x.shape}.")
    if pool == 1:
        return x
    n, h, w = x.shape
    hp, wp = h // pool, w // pool
    if hp == 0 or wp == 0:
        raise ValueError(f"pool={pool} is larger than the images ({h} × {w}).")
    return x[:, : hp * pool, : wp * pool].reshape(n, hp, pool, wp, pool).mean(axis=(2, 4))


def _column_stats(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale per column; a constant column (zero spread up to rounding) gets scale 1."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    constant = ~(std > 1e-10 * np.abs(mean)) | (std == 0)
    return mean, np.where(constant, 1.0, std)


def standardize(train, *others) -> tuple[np.ndarray, ...]:
    """``(x − mean) / std`` per column with the TRAINING mean and std (``ddof = 0``), for ``train`` and
    every array of ``others``; constant training columns are only centred.

    Returns:
        ``(train, *others)`` standardised, then the ``mean`` and ``std`` used (std 1 for constant columns):
        ``len(others) + 3`` arrays.
    """
    train = np.asarray(train, dtype=np.float64)
    mean, std = _column_stats(train)
    scaled = tuple((np.asarray(x, dtype=np.float64) - mean) / std for x in (train, *others))
    return (*scaled, mean, std)


def principal_components(train, components: int, *others) -> tuple[np.ndarray, ...]:
    """Project the centred ``train`` (and ``others``, centred with the training mean) on the leading
    ``components`` principal axes of ``train`` -> ``(train, *others)``, each ``(m, components)``."""
    train = np.asarray(train, dtype=np.float64)
    components = positive_int("components", components)
    if components > min(train.shape):
        raise ValueError(f"components = {components} exceeds min(n, d) = {min(train.shape)}.")
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    basis = vt[:components].T
    return tuple((np.asarray(x, dtype=np.float64) - mean) @ basis for x in (train, *others))


def prepare_features(images, *others, pool: int = 1, pca: int | None = None, dtype=np.float32):
    r"""Model inputs: pool images, flatten, standardise; with ``pca``, project on that many principal axes
    and standardise again. Statistics come from ``images``; ``others`` (held-out data) reuse them.

    Args:
        images: ``(n, h, w)`` images (pooled by ``pool``) or ``(n, d)`` feature vectors (not pooled).
        others: held-out arrays of the same kind.
        pool: pooling factor for images (1: none).
        pca: principal components to keep (``None``: none).
        dtype: floating dtype of the result.

    Returns:
        ``(n, d')`` features with mean 0 and standard deviation 1 per column (constant columns only
        centred) when no ``others`` are given, else the tuple ``(train, *others)``.
    """
    arrays = [np.asarray(x, dtype=np.float64) for x in (images, *others)]
    if arrays[0].ndim == 3 and pool > 1:
        arrays = [pool_images(x, pool) for x in arrays]
    arrays = [x.reshape(x.shape[0], -1) for x in arrays]
    arrays = list(standardize(*arrays)[: len(arrays)])
    if pca is not None:
        arrays = principal_components(arrays[0], pca, *arrays[1:])
        arrays = list(standardize(*arrays)[: len(arrays)])
    out = tuple(x.astype(dtype) for x in arrays)
    return out[0] if not others else out


def label_targets(labels, num_classes: int, dtype=np.float32) -> np.ndarray:
    """Squared-loss targets of integer labels: ``±1`` ``(n,)`` for two classes (label 1 -> +1), one-hot
    ``(n, K)`` otherwise."""
    labels = np.asarray(labels)
    if num_classes == 2:
        return (2.0 * labels - 1.0).astype(dtype)
    return np.eye(num_classes, dtype=dtype)[labels]
