"""nlis_jax: importance sampling of training data for nonlinear models (Rajmohan & Roosta, ICML 2025).

The adjoint ``f*(θ) = ∫_0^1 ∇f(tθ) dt`` of a nonlinear model, stacked over the data into the dual matrix
``F̃(θ) = [F*(θ) | f(0) − y]``, gives leverage and row-norm sampling probabilities with ``(1 ± ε)`` loss
guarantees. ``import nlis_jax`` does not import flax (see :mod:`nlis_jax.models`).
"""

from nlis_jax import projections as projections
from nlis_jax._adjoint import FORWARD_MAX_PARAMS as FORWARD_MAX_PARAMS
from nlis_jax._adjoint import adjoint as adjoint
from nlis_jax._closed_forms import bounded_swish as bounded_swish
from nlis_jax._closed_forms import difference_quotient as difference_quotient
from nlis_jax._closed_forms import homogeneous_adjoint as homogeneous_adjoint
from nlis_jax._closed_forms import single_index_adjoint as single_index_adjoint
from nlis_jax._dual import DualOperator as DualOperator
from nlis_jax._dual import dual_matrix as dual_matrix
from nlis_jax._dual import dual_operator as dual_operator
from nlis_jax._projected import projected_dual_matrix as projected_dual_matrix
from nlis_jax._projected import projected_leverage_scores as projected_leverage_scores
from nlis_jax._quadrature import gauss_legendre as gauss_legendre
from nlis_jax._sampling import distortion as distortion
from nlis_jax._sampling import sample as sample
from nlis_jax._sampling import sample_size as sample_size
from nlis_jax._scores import ROUTES as ROUTES
from nlis_jax._scores import leverage as leverage
from nlis_jax._scores import leverage_scores as leverage_scores
from nlis_jax._scores import linear_design as linear_design
from nlis_jax._scores import linear_leverage_scores as linear_leverage_scores
from nlis_jax._scores import linear_norm_scores as linear_norm_scores
from nlis_jax._scores import mix_with_uniform as mix_with_uniform
from nlis_jax._scores import norm_scores as norm_scores
from nlis_jax._scores import orthonormal_basis as orthonormal_basis
from nlis_jax._scores import uniform_scores as uniform_scores
from nlis_jax._sketch import sketched_leverage as sketched_leverage
from nlis_jax._sketch import sketched_leverage_scores as sketched_leverage_scores
from nlis_jax._streaming import streaming_leverage as streaming_leverage
from nlis_jax._streaming import streaming_leverage_scores as streaming_leverage_scores
from nlis_jax._train import FitResult as FitResult
from nlis_jax._train import TrainState as TrainState
from nlis_jax._train import fit as fit
from nlis_jax._train import make_train_step as make_train_step
from nlis_jax._train import weighted_loss as weighted_loss
from nlis_jax.projections import box as box
from nlis_jax.projections import l2_ball as l2_ball
from nlis_jax.projections import project_params as project_params

__version__ = "0.1.0"

__all__ = [
    "FORWARD_MAX_PARAMS",
    "FitResult",
    "TrainState",
    "box",
    "fit",
    "l2_ball",
    "make_train_step",
    "project_params",
    "projections",
    "weighted_loss",
    "ROUTES",
    "DualOperator",
    "adjoint",
    "bounded_swish",
    "difference_quotient",
    "distortion",
    "dual_matrix",
    "dual_operator",
    "gauss_legendre",
    "homogeneous_adjoint",
    "leverage",
    "leverage_scores",
    "linear_design",
    "linear_leverage_scores",
    "linear_norm_scores",
    "mix_with_uniform",
    "norm_scores",
    "orthonormal_basis",
    "projected_dual_matrix",
    "projected_leverage_scores",
    "sample",
    "sample_size",
    "single_index_adjoint",
    "sketched_leverage",
    "sketched_leverage_scores",
    "streaming_leverage",
    "streaming_leverage_scores",
    "uniform_scores",
]
