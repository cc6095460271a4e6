"""Ranking metrics of the outlier study: AUROC and precision at ``k``, ties handled exactly."""

from __future__ import annotations

import numpy as np

__all__ = ["auroc", "precision_at_k"]


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
