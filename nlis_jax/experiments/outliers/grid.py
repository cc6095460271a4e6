"""The outlier study's image grid: per class, the highest- and lowest-scored examples, outliers in red."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["save_score_grid"]


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


def _chosen(labels, scores, c: int, per_class: int) -> list[tuple[int, int]]:
    """``(column, example)`` pairs of class ``c``: top scores left, a spacer, bottom scores right."""
    members = np.flatnonzero(labels == c)
    order = members[np.argsort(-scores[members], kind="stable")]
    top, bottom = order[:per_class], order[::-1][:per_class][::-1]
    return [(j, int(top[j])) for j in range(top.size)] + [
        (per_class + 1 + j, int(bottom[j])) for j in range(bottom.size)
    ]


def _caption(i: int, names, true_labels, mark_title: str | None) -> str:
    if mark_title is not None:
        return mark_title
    return f"true: {names[int(true_labels[i])]}" if true_labels is not None else "flipped"


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _mark_flipped(ax, title: str) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("red")
        spine.set_linewidth(2.5)
    ax.set_title(title, fontsize=6, color="red", pad=2)


def _annotate(fig, axes, per_class: int, title: str) -> None:
    for col, text in (
        (0, "highest-scored (highest at left)"),
        (per_class + 1, "lowest-scored (lowest at right)"),
    ):
        axes[0, col].annotate(
            f"{per_class} {text}", (0, 1.45), xycoords="axes fraction", fontsize=8, annotation_clip=False
        )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.12, right=0.99, bottom=0.02, top=1 - 0.9 / fig.get_figheight(), wspace=0.08)


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
    mark_title: str | None = None,
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
        mark_title: the red caption of every marked example (e.g. ``"invert"`` for corrupted inputs);
            ``None``: ``"true: <class>"`` from ``true_labels``, else ``"flipped"``.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    imgs = _as_images(images)
    labels, flipped = np.asarray(labels), np.asarray(flipped, bool)
    scores = np.asarray(scores, np.float64)
    num_classes = int(labels.max()) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    cols, cell = 2 * per_class + 1, 0.9  # a blank spacer column between top and bottom
    aspect = imgs.shape[2] / imgs.shape[1]
    fig = Figure(figsize=(cols * cell * min(aspect, 4.0), num_classes * cell * 1.25 + 0.8), dpi=100)
    axes = fig.subplots(num_classes, cols, squeeze=False)
    vmin, vmax = float(np.min(imgs)), float(np.max(imgs))
    for c in range(num_classes):
        for ax in axes[c]:
            _blank(ax)
        for col, i in _chosen(labels, scores, c, per_class):
            axes[c, col].imshow(
                imgs[i], cmap="gray_r", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
            )
            if flipped[i]:
                _mark_flipped(axes[c, col], _caption(i, names, true_labels, mark_title))
        axes[c, 0].set_ylabel(names[c] if c < len(names) else str(c), fontsize=7, rotation=0, ha="right")
    _annotate(fig, axes, per_class, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
