"""Options of the outlier study and the names of its scores."""

from __future__ import annotations

import dataclasses
import math

from nlis_jax.experiments.checks import check_seed, positive_int

__all__ = ["BASELINE_SCORES", "CORRUPTIONS", "DEFAULT_CLASSES", "NONLINEAR_SCORES", "OutlierConfig"]

#: Scores computed from the dual matrix at the fitted θ, in report order.
NONLINEAR_SCORES = ("leverage", "adjoint_leverage", "response_leverage", "norm")
#: Baselines at the same θ.
BASELINE_SCORES = ("loss", "grad_norm")

#: Kinds of planted outliers: flipped labels, or corrupted inputs with their labels kept
#: (:func:`~nlis_jax.experiments.outliers.data.corrupt_inputs`).
CORRUPTIONS = ("flip", "invert", "noise", "foreign")

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
        flip_fraction: share of the training examples made outliers (``round(flip_fraction · n)`` of them,
            at least 1): labels flipped for ``corruption="flip"`` (binary labels are swapped; a multiclass
            label becomes a different class, uniformly), inputs corrupted otherwise.
        corruption: the kind of planted outlier (:data:`CORRUPTIONS`): ``"flip"`` (labels), or, with the
            labels kept, ``"invert"`` (image ``1 − x``), ``"noise"`` (``x + noise_scale · z``, ``z``
            standard normal per pixel) or ``"foreign"`` (the image is replaced by one of a Fashion-MNIST
            class outside ``classes``). Inputs are corrupted before pooling and standardisation, on the
            ``[0, 1]`` pixel scale.
        noise_scale: standard deviation of the ``"noise"`` corruption, in pixel units (``[0, 1]`` scale).
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
        projection_dim: ``None`` scores from the dense dual matrix (``n × (p+1)`` in memory). An integer
            ``m`` scores from the projected adjoint ``F*Ω`` (``Ω`` a random ``p × m`` sparse sign
            embedding, :func:`nlis_jax.projected_dual_matrix`) with the response column appended:
            ``[F*Ω | c]`` (``n × (m+1)``), memory ``O(chunk·p + n·m)``. Needed for large ``p``; and when
            ``p ≥ n``, where ``F*`` has full row rank and its exact leverage is 1 for every example,
            ``m < n`` gives the leverage in a random ``m``-dimensional view of parameter space instead.
            Exact (the dense scores) when ``m ≥ p + 1``.
        sweep_dims: extra projection dimensions scored at the same fitted θ (``diagnostics["sweep"]``),
            to show how the metrics vary with ``m``; ``None`` for none.
        sweep_ridges: ridges ``ρ`` scored at each dimension of the sweep (``sweep_dims``, else
            ``projection_dim``, else the dense matrix), on the same dual matrix; ``None``: ``ridge`` only.
        ridge: ``ρ ≥ 0``; with ``ρ > 0`` every leverage is the ridge leverage ``diag(A (AᵀA + λI)⁻¹ Aᵀ)``
            with ``λ = ρ · ‖F*‖_F² / (n·k)`` (``ρ`` times the mean diagonal of the kernel ``F* F*ᵀ``,
            measured on the matrix actually scored), another way to get meaningful leverage when
            ``p ≥ n``.
        seed: everything random (flips, initialisation, minibatches, the embedding) comes from
            ``jax.random.key(seed)``.
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
    corruption: str = "flip"
    noise_scale: float = 0.5
    projection_dim: int | None = None
    sweep_dims: tuple[int, ...] | None = None
    ridge: float = 0.0
    sweep_ridges: tuple[float, ...] | None = None

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
        check_seed("seed", self.seed)  # 2**32 + 5 ran seed 5 under a record saying otherwise
        if self.n is not None and self.n < 4:
            raise ValueError(f"n must be at least 4 (or None for all), got {self.n}.")
        if not 0.0 < self.flip_fraction < 0.5:
            raise ValueError(f"flip_fraction must lie in (0, 0.5), got {self.flip_fraction}.")
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be positive layer widths, got {self.hidden}.")
        for name in ("steps", "pool", "num_nodes", "grid_per_class"):
            positive_int(name, getattr(self, name))
        positive_int("pca", self.pca, optional=True)
        positive_int("projection_dim", self.projection_dim, optional=True)
        self._check_outliers()
        positive_int("batch_size", self.batch_size, optional=True)
        if not 0 < self.learning_rate < float("inf"):
            raise ValueError(f"learning_rate must be positive and finite, got {self.learning_rate}.")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")

    def _check_outliers(self) -> None:
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {self.corruption!r}.")
        if self.corruption == "foreign" and self.classes is not None and len(self.classes) >= 10:
            raise ValueError('corruption="foreign" needs a class outside classes; all 10 are in the task.')
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise ValueError(f"noise_scale must be a positive number, got {self.noise_scale}.")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be a non-negative number, got {self.ridge}.")
        if self.sweep_dims is not None:
            dims = self.sweep_dims
            dims = (dims,) if isinstance(dims, int) else tuple(dims)
            object.__setattr__(self, "sweep_dims", tuple(positive_int("sweep_dims", m) for m in dims))
            if not self.sweep_dims:
                raise ValueError("sweep_dims must name at least one dimension (or be None).")
        if self.sweep_ridges is not None:
            ridges = self.sweep_ridges
            ridges = (ridges,) if isinstance(ridges, (int, float)) else tuple(float(r) for r in ridges)
            object.__setattr__(self, "sweep_ridges", ridges)
            if not ridges or not all(math.isfinite(r) and r >= 0 for r in ridges):
                raise ValueError(f"sweep_ridges must be non-negative numbers, got {self.sweep_ridges}.")
