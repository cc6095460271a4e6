"""Study configurations: one frozen (hashable) dataclass per data set, plus the method names."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from nlis_jax.experiments.checks import check_float_dtype, check_seed, check_size, check_sizes, positive_int

#: Every sampling scheme a study can run, in report order.
#:
#: * ``uniform``: ``p_i = 1/n``.
#: * ``linear_leverage``: leverage of the data matrix ``[X, -y]`` itself (parameter-free; for a
#:   bounded-Swish single-index model a ``β = c1/c2`` approximation of the nonlinear leverage at every θ).
#: * ``nonlinear_leverage`` / ``nonlinear_norm``: leverage / row-norm scores of the dual matrix
#:   ``F̃(θ*)`` at the full-data solution: the theory's ORACLE (needs θ*, so not a practical scheme).
#: * ``pilot_leverage``: leverage of ``F̃(θ̂)`` at a pilot ``θ̂`` fitted on a small uniform sample.
#: * ``refined_leverage``: one refinement round: re-score at the ``pilot_leverage`` sample's
#:   solution ``θ_S``, draw a fresh sample of the same size, fit again.
METHODS = (
    "uniform",
    "linear_leverage",
    "nonlinear_leverage",
    "nonlinear_norm",
    "pilot_leverage",
    "refined_leverage",
)
#: Schemes that score at θ* (oracle) and those that never need it (practical).
ORACLE_METHODS = ("nonlinear_leverage", "nonlinear_norm")
PRACTICAL_METHODS = ("uniform", "linear_leverage", "pilot_leverage", "refined_leverage")
OPTIMIZERS = ("gd", "adam")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Options shared by every study (the data-set subclasses add their own).

    Attributes:
        sizes: sample sizes; a value ``< 1`` is a fraction of ``n``, a value ``>= 1`` a number of rows.
        repeats: independent samples per method and size (fitted together under ``vmap``).
        methods: which of :data:`METHODS` to run.
        num_steps: projected-gradient steps of every sample fit (full batch on the sample).
        full_steps: steps of the full-data fit that defines θ*; ``None`` means ``num_steps``.
        optimizer: ``"gd"``: projected Nesterov gradient descent with step ``learning_rate / L̂``,
            ``L̂`` a Gauss-Newton curvature bound of the (weighted) objective, recomputed for every
            sample (exact constrained optimum at convergence; single-index models only). ``"adam"``:
            Adam with a cosine-decayed ``learning_rate`` (networks). Projected Adam's fixed point is
            NOT the Euclidean constrained optimum (its step is preconditioned), so constrained
            studies use ``"gd"``.
        learning_rate: the step multiplier of ``"gd"`` (with a curvature bound) or its step (networks),
            or the initial rate of ``"adam"``; ``None`` takes the data set's default.
        radius: l2-ball radius of the constraint; ``None`` for no constraint.
        mix: ``α`` of :func:`nlis_jax.mix_with_uniform` applied to every non-uniform score.
        pilot_size: uniform pilot sample for ``pilot_leverage``/``refined_leverage`` (fraction or rows).
        num_nodes: Gauss-Legendre nodes of the quadrature adjoint (networks; single-index models use
            the exact closed form).
        timing_size: sample size of the wall-time comparison against full-data training (fraction or
            rows); ``None`` skips the comparison.
    """

    sizes: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.05)
    repeats: int = 20
    methods: tuple[str, ...] = METHODS
    num_steps: int = 500
    full_steps: int | None = None
    optimizer: str = "gd"
    learning_rate: float | None = 1.0
    radius: float | None = None
    mix: float = 0.0
    pilot_size: float = 0.005
    num_nodes: int = 16
    timing_size: float | None = 0.01

    def __post_init__(self):
        check_sizes("sizes", self.sizes)
        positive_int("repeats", self.repeats)
        if not self.methods:
            raise ValueError("methods must name at least one method.")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(
                f"methods has unknown name(s) {unknown} for this data set; choose from {list(METHODS)}."
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct, got {self.methods}.")
        positive_int("num_steps", self.num_steps)
        positive_int("num_nodes", self.num_nodes)
        positive_int("full_steps", self.full_steps, optional=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        lr = self.learning_rate
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning_rate must be positive, got {lr}.")
        if self.radius is not None and not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"radius must be positive or None, got {self.radius}.")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {self.mix}.")
        check_size("pilot_size", self.pilot_size)
        if self.timing_size is not None:
            check_size("timing_size", self.timing_size)

    @property
    def steps_full(self) -> int:
        return self.num_steps if self.full_steps is None else self.full_steps


@dataclasses.dataclass(frozen=True)
class CaliforniaConfig(StudyConfig):
    """California Housing (20,640 × 8 standardised, plus a bias column; response standardised).

    Model ``f(θ; x) = ϕ(<θ, x>)``, ϕ the bounded Swish with ``c1``, ``c2``, in the l2 ball of
    ``radius``. The unconstrained least-squares optimum has ``‖θ‖ ≈ 1.186`` (loss 8115.07); with the
    default ``radius = 1.0`` the constraint is active and costs 1.05% of the loss (8200.26, checked
    against SLSQP in tests/test_experiments.py).
    """

    repeats: int = 50
    radius: float | None = 1.0
    c1: float = 1.0
    c2: float = 2.0
    data_home: str | None = None
    download: bool = True
    dtype: str = "float64"

    def __post_init__(self):
        super().__post_init__()
        check_float_dtype("dtype", self.dtype)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(StudyConfig):
    """Synthetic ``y = ϕ(<θ_true, x>) + noise·ε`` (:func:`nlis_jax.experiments.datasets.make_single_index`).

    ϕ is the bounded Swish (the fitted model is well specified), ``x ~ N(0, I_d)``. Two options make
    the design harder, with the same θ_true and noise draws: ``correlation = ρ`` maps the rows to
    ``N(0, Σ)``, ``Σ_ij = ρ^|i-j|`` (ill-conditioned for ρ near 1: full-data gradient descent needs many
    steps), and ``tails = ν`` rescales each row by ``1/sqrt(χ²_ν/ν)`` (multivariate t rows: a few rows
    of high leverage, which uniform sampling misses). The default ``radius = 0.8`` is below
    ``‖θ_true‖ = theta_norm = 1``, so the constraint is active for the isotropic design.
    """

    n: int = 20_000
    d: int = 10
    noise: float = 0.5
    theta_norm: float = 1.0
    tails: float | None = None
    correlation: float = 0.0
    data_seed: int = 0
    radius: float | None = 0.8
    c1: float = 1.0
    c2: float = 2.0
    dtype: str = "float64"

    def __post_init__(self):
        super().__post_init__()
        check_float_dtype("dtype", self.dtype)
        check_seed("data_seed", self.data_seed)
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise}.")
        if not -1 < self.correlation < 1:
            raise ValueError(f"correlation must lie in (-1, 1), got {self.correlation}.")
        if self.tails is not None and not (math.isfinite(self.tails) and self.tails >= TAILS_MIN):
            raise ValueError(
                f"tails (degrees of freedom) must be a finite number >= {TAILS_MIN:g}, got {self.tails}: "
                "with fewer, χ² draws underflow to 0 and rows become infinite (0.01 crashed the study)."
            )


#: Fewest degrees of freedom of the synthetic multivariate t rows (``SyntheticConfig.tails``; 1: Cauchy).
TAILS_MIN = 1.0


@dataclasses.dataclass(frozen=True)
class FashionMNISTConfig(StudyConfig):
    """Fashion-MNIST with a one-hidden-layer ReLU network (float32).

    Inputs: 28×28 images average-pooled ``pool × pool`` (default 4: 7×7 = 49 features), standardised
    with the training statistics. ``classes``: two labels give a binary task (one output, squared loss
    on ±1 targets, accuracy by sign); ``None`` all ten (ten outputs, squared loss on one-hot targets,
    block leverage of the ``(n, 10, p+1)`` dual, accuracy by argmax). Squared loss keeps the theory
    exact: ``L(θ) = ‖F̃(θ) θ̃‖²``. ``n`` training rows are drawn at random (seeded) so that the dual
    matrix stays small; ``components`` projects the pooled inputs on principal axes (``None``: none).
    Defaults (``n = None``, ``components = "auto"``): binary ``n = 4000`` on the 49 pooled pixels,
    ``p = 49·16 + 16 + 16 + 1 = 817``, a ``4000 × 818`` dual (13 MB); ten classes ``n = 3000`` on 24
    principal components, ``p = 24·16 + 16 + 16·10 + 10 = 570``, a ``30000 × 571`` dual (69 MB). The
    float32 dual of a ReLU network is ill-conditioned, so its leverage takes the QR + SVD route,
    ``O(n k p²)``: this, not memory, bounds ``n k`` and ``p`` (49 pooled inputs for ten classes,
    ``p = 970``, take longer per score).

    Training: projected Nesterov GD in the l2 ball of ``radius = 3`` (active: the fits end on the
    sphere) with a fixed step, ``learning_rate = None`` meaning 0.01 for two classes and 0.1 for ten
    (larger steps oscillate or diverge on the binary task), 8000 steps. With 0.02 and 2000 steps (the
    defaults until 2026-12-05) the binary full-data fit failed the study's own convergence check (its
    loss moved by 0.0024 relative over the last tenth, against 0.001) and sample fits at s = 10–20% of n
    by up to 0.07; now θ* passes (n = 4000) and sample fits move by at most 0.008 at s ≥ 5% of n
    (measured over 3 repeats of every scheme). Below s = p the sample fits stay far from converged.
    """

    classes: tuple[int, ...] | None = (0, 6)
    n: int | None = None
    n_test: int | None = None
    hidden: int = 16
    pool: int = 4
    components: int | None | str = "auto"
    data_seed: int = 0
    path: str | None = None
    data_home: str | None = None
    download: bool = True
    sizes: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    repeats: int = 5
    num_steps: int = 8000
    learning_rate: float | None = None
    radius: float | None = 3.0
    pilot_size: float = 0.05
    timing_size: float | None = 0.1

    def __post_init__(self):
        super().__post_init__()
        _check_network_fields(self)
        positive_int("n", self.n, optional=True)
        positive_int("n_test", self.n_test, optional=True)
        positive_int("pool", self.pool)


def _check_network_fields(config) -> None:
    """The fields the classification studies share: a positive ``hidden`` (0 built a constant model
    of the output biases alone), ``components`` a positive int or ``None`` (or ``"auto"`` where the
    config allows it), a seed in range."""
    positive_int("hidden", config.hidden)
    if config.components is not None and config.components != "auto":
        positive_int("components", config.components)
    check_seed("data_seed", config.data_seed)


@dataclasses.dataclass(frozen=True)
class DigitsConfig(StudyConfig):
    """scikit-learn's 8×8 digits (1,797 images): a small, fast classification study (float32).

    A seeded split keeps ``1 - test_fraction`` for training; 64 standardised pixels, one hidden ReLU
    layer, ``classes`` as in :class:`FashionMNISTConfig` (``None``: all ten, one-hot squared loss).
    The 64 standardised pixels are projected on their ``components`` leading principal axes (fitted on
    the training split) to keep ``p`` well below ``n·k``: 16 components and 8 hidden units give
    ``p = 226``. Projected Nesterov GD with step 0.1 in the l2 ball of radius 3 (active).
    """

    classes: tuple[int, ...] | None = None
    hidden: int = 8
    components: int | None = 16
    test_fraction: float = 0.25
    data_seed: int = 0
    sizes: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    repeats: int = 5
    num_steps: int = 1000
    learning_rate: float = 0.1
    radius: float | None = 3.0
    pilot_size: float = 0.1
    timing_size: float | None = 0.2

    def __post_init__(self):
        super().__post_init__()
        _check_network_fields(self)
        if self.components == "auto":
            raise ValueError("components must be a positive int or None for the digits, got 'auto'.")
        if isinstance(self.test_fraction, bool) or not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction!r}.")


#: The data sets by command-line name.
CONFIGS: dict[str, type[StudyConfig]] = {
    "california": CaliforniaConfig,
    "synthetic": SyntheticConfig,
    "fashion-mnist": FashionMNISTConfig,
    "digits": DigitsConfig,
}


def shrink(config: StudyConfig) -> StudyConfig:
    """A tiny variant of ``config`` for smoke runs (``NLIS_SMALL=1``; notebooks and CLI tests).

    Two repeats, the two smallest sizes, at most 50 steps, at most 2,000 rows for generated or subsampled
    data, no wall-time comparison.
    """
    changes = dict(
        repeats=min(config.repeats, 2),
        sizes=tuple(sorted(config.sizes))[:2],
        num_steps=min(config.num_steps, 50),
        full_steps=None,
        timing_size=None,
    )
    if hasattr(config, "n"):
        changes["n"] = min(config.n or 2000, 2000)
    return dataclasses.replace(config, **changes)


def resolve_size(size: float, n: int) -> int:
    """Rows for one size: ``size < 1`` is a fraction of ``n`` (at least 1 row), else a row count."""
    size = check_size("size", size)
    rows = max(1, round(size * n)) if size < 1 else int(round(size))
    if rows > n:
        raise ValueError(f"sample size {size} means {rows} rows, more than n = {n}.")
    return rows


def resolve_sizes(sizes: Sequence[float], n: int) -> tuple[int, ...]:
    """Distinct row counts for ``sizes``, ascending."""
    return tuple(sorted({resolve_size(s, n) for s in sizes}))
