r"""Outlier detection with nonlinear leverage: find planted outliers by ranking the training data.

The study (``nlis-jax outliers``): plant outliers in a known share (default 2%) of a Fashion-MNIST training
set, either flipped labels (the default) or corrupted inputs with their labels kept (``corruption=``
``"invert"``, ``"noise"``, ``"foreign"``: :func:`corrupt_inputs`), fit a ReLU network to the given labels
with the squared loss, score every example at the fitted :math:`\theta`, and measure how well each
ranking finds the outliers (AUROC, precision at ``k = #outliers`` and at ``2k``), beside two baselines: the
per-example loss and the per-example gradient norm. An image grid of the top- and bottom-scored examples of
each class is saved as a PNG.

Large ``p`` (a wide MLP on 28 × 28 inputs, ``p ≥ 10⁵``): ``projection_dim = m`` scores the projected
``[F*Ω | c]`` (:func:`projected_dual`, memory ``O(chunk·p + n·m)``) instead of the dense ``n × (p+1)``
matrix. When ``p ≥ n``, ``F*`` has full row rank and its exact leverage is 1 for every example, so only a
projection with ``m < n`` or ridge leverage (``ridge > 0``) gives an informative ``adjoint_leverage``.

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

Parts: :mod:`.config` (:class:`OutlierConfig`), :mod:`.data` (loading, :func:`flip_labels`,
:func:`corrupt_inputs`),
:mod:`.metrics` (:func:`auroc`, :func:`precision_at_k`), :mod:`.scores` (:func:`outlier_scores`),
:mod:`.grid` (:func:`save_score_grid`), :mod:`.study` (:func:`run_outlier_study`), :mod:`.options` (the
CLI). Features come from :func:`nlis_jax.experiments.features.prepare_features`.
"""

from nlis_jax.experiments.features import prepare_features
from nlis_jax.experiments.outliers.config import (
    BASELINE_SCORES,
    CORRUPTIONS,
    DEFAULT_CLASSES,
    NONLINEAR_SCORES,
    OutlierConfig,
)
from nlis_jax.experiments.outliers.data import (
    corrupt_inputs,
    flip_labels,
    load_data,
    load_foreign,
    plant_outliers,
)
from nlis_jax.experiments.outliers.grid import save_score_grid
from nlis_jax.experiments.outliers.metrics import auroc, precision_at_k
from nlis_jax.experiments.outliers.options import add_arguments, config_from_args, format_table, run
from nlis_jax.experiments.outliers.scores import (
    dual_scores,
    gradient_norms,
    outlier_scores,
    projected_dual,
    ridge_lambda,
)
from nlis_jax.experiments.outliers.study import APPLY_FN, OutlierStudyInterrupted, run_outlier_study

__all__ = [
    "APPLY_FN",
    "BASELINE_SCORES",
    "CORRUPTIONS",
    "DEFAULT_CLASSES",
    "NONLINEAR_SCORES",
    "OutlierConfig",
    "OutlierStudyInterrupted",
    "add_arguments",
    "auroc",
    "config_from_args",
    "corrupt_inputs",
    "dual_scores",
    "flip_labels",
    "format_table",
    "gradient_norms",
    "load_data",
    "load_foreign",
    "outlier_scores",
    "plant_outliers",
    "precision_at_k",
    "prepare_features",
    "projected_dual",
    "ridge_lambda",
    "run",
    "run_outlier_study",
    "save_score_grid",
]
