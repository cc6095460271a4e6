"""nlis_jax: importance sampling of training data for nonlinear models (Rajmohan & Roosta, ICML 2025).

The adjoint ``f*(θ) = ∫_0^1 ∇f(tθ) dt`` of a nonlinear model, stacked over the data into the dual matrix
``F̃(θ) = [F*(θ) | f(0) − y]``, gives leverage and row-norm sampling probabilities with ``(1 ± ε)`` loss
guarantees. The data flow: ``apply_fn`` → :func:`adjoint` → :func:`dual_matrix` (or :func:`dual_operator`)
→ :func:`leverage_scores` / :func:`norm_scores` (or :func:`streaming_leverage_scores`,
:func:`projected_leverage_scores` without the matrix) → :func:`sample` → :func:`fit` on the weighted sample.

Submodules: :mod:`nlis_jax.routes` (the leverage routes), :mod:`nlis_jax.quadrature`,
:mod:`nlis_jax.closed_forms`, :mod:`nlis_jax.projections`, :mod:`nlis_jax.active` (choosing which points
to label), and :mod:`nlis_jax.models` (Flax adapters; imports flax, so ``import nlis_jax`` does not
import it).
"""

from nlis_jax import active as active
from nlis_jax import closed_forms as closed_forms
from nlis_jax import projections as projections
from nlis_jax import quadrature as quadrature
from nlis_jax import routes as routes
from nlis_jax._adaptive import QuadratureInfo as QuadratureInfo
from nlis_jax._adaptive import QuadratureWarning as QuadratureWarning
from nlis_jax._adjoint import adjoint as adjoint
from nlis_jax._dual import DualOperator as DualOperator
from nlis_jax._dual import dual_matrix as dual_matrix
from nlis_jax._dual import dual_operator as dual_operator
from nlis_jax._host import gather_rows as gather_rows
from nlis_jax._projected import projected_dual_matrix as projected_dual_matrix
from nlis_jax._projected import projected_leverage_scores as projected_leverage_scores
from nlis_jax._sampling import distortion as distortion
from nlis_jax._sampling import sample as sample
from nlis_jax._sampling import sample_size as sample_size
from nlis_jax._scores import Leverage as Leverage
from nlis_jax._scores import leverage_scores as leverage_scores
from nlis_jax._scores import linear_leverage_scores as linear_leverage_scores
from nlis_jax._scores import linear_norm_scores as linear_norm_scores
from nlis_jax._scores import mix_with_uniform as mix_with_uniform
from nlis_jax._scores import norm_scores as norm_scores
from nlis_jax._scores import orthonormal_basis as orthonormal_basis
from nlis_jax._scores import uniform_scores as uniform_scores
from nlis_jax._streaming import streaming_leverage_scores as streaming_leverage_scores
from nlis_jax._streaming import streaming_norm_scores as streaming_norm_scores
from nlis_jax._traced import traced_checks as traced_checks
from nlis_jax._train import FitResult as FitResult
from nlis_jax._train import NonFiniteLossError as NonFiniteLossError
from nlis_jax._train import TrainState as TrainState
from nlis_jax._train import fit as fit
from nlis_jax._train import make_train_step as make_train_step
from nlis_jax._train import per_example_loss as per_example_loss
from nlis_jax._train import weighted_loss as weighted_loss
from nlis_jax.active import ActiveConfig as ActiveConfig
from nlis_jax.active import active_learning as active_learning
from nlis_jax.active import label_free_leverage_scores as label_free_leverage_scores
from nlis_jax.active import query as query
from nlis_jax.closed_forms import bounded_swish as bounded_swish
from nlis_jax.closed_forms import homogeneous_adjoint as homogeneous_adjoint
from nlis_jax.closed_forms import single_index_adjoint as single_index_adjoint
from nlis_jax.projections import box as box
from nlis_jax.projections import l2_ball as l2_ball

__version__ = "0.1.0"

__all__ = [
    "QuadratureInfo",
    "QuadratureWarning",
    "ActiveConfig",
    "DualOperator",
    "FitResult",
    "Leverage",
    "NonFiniteLossError",
    "TrainState",
    "active",
    "active_learning",
    "adjoint",
    "bounded_swish",
    "box",
    "closed_forms",
    "distortion",
    "dual_matrix",
    "dual_operator",
    "fit",
    "gather_rows",
    "homogeneous_adjoint",
    "l2_ball",
    "label_free_leverage_scores",
    "leverage_scores",
    "linear_leverage_scores",
    "linear_norm_scores",
    "make_train_step",
    "mix_with_uniform",
    "norm_scores",
    "orthonormal_basis",
    "per_example_loss",
    "projections",
    "projected_dual_matrix",
    "projected_leverage_scores",
    "quadrature",
    "query",
    "routes",
    "sample",
    "sample_size",
    "single_index_adjoint",
    "streaming_leverage_scores",
    "streaming_norm_scores",
    "traced_checks",
    "uniform_scores",
    "weighted_loss",
]
