"""Options of the outlier study and the names of its scores."""

from __future__ import annotations

import dataclasses

from nlis_jax.experiments.checks import positive_int

__all__ = ["BASELINE_SCORES", "DEFAULT_CLASSES", "NONLINEAR_SCORES", "OutlierConfig"]

#: Scores computed from the dual matrix at the fitted θ, in report order.
NONLINEAR_SCORES = ("leverage", "adjoint_leverage", "response_leverage", "norm")
#: Baselines at the same θ.
BASELINE_SCORES = ("loss", "grad_norm")

#: The default binary task: Sneaker (7) vs. Ankle boot (9), distinguishable yet not trivially separable.
DEFAULT_CLASSES = (7, 9)


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
            residual ``range(F*)`` absorbs, and the weaker ``response_leverage`` gets (README.md, Results).
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
        download_if_missing: let :func:`nlis_jax.experiments.datasets.load_fashion_mnist` download
            Fashion-MNIST when it is not found (needs internet); by default a missing data set raises at once.
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
            positive_int(name, getattr(self, name))
        positive_int("pca", self.pca, optional=True)
        positive_int("batch_size", self.batch_size, optional=True)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")
