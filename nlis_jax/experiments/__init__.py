"""The experiments layer of nlis_jax: data sets, small nets, plots, the sampling studies and the outlier
study, built on the public API of :mod:`nlis_jax` only.

Sampling studies: ``L(θ_S)/L(θ*)`` against the sample size for uniform, linear leverage, nonlinear
leverage and norm sampling (oracle scores at θ*), and the practical pilot and refinement schemes.

Typical use (notebooks, ``nlis-jax run``)::

    import jax
    from nlis_jax import experiments as ex

    jax.config.update("jax_enable_x64", True)        # California and synthetic studies run in float64
    config = ex.CaliforniaConfig(sizes=(0.005, 0.01), repeats=10)
    result = ex.run_study(jax.random.key(0), config)
    print(ex.format_table(result.summary))          # result.summary is JSON-ready

The pieces are public for custom studies: :func:`make_problem`, :func:`fit_full`, :func:`score`,
:func:`draw`, :func:`fit_samples`, :func:`full_losses`, :func:`test_accuracy`, :func:`compare_wall_time`.

Submodules: :mod:`~nlis_jax.experiments.datasets` (loaders), :mod:`~nlis_jax.experiments.nets` (small
models), :mod:`~nlis_jax.experiments.features` (pooling, standardising, PCA),
:mod:`~nlis_jax.experiments.plots`, :mod:`~nlis_jax.experiments.outliers` (the outlier study),
:mod:`~nlis_jax.experiments.checks` (argument checks shared with the CLI),
:mod:`~nlis_jax.experiments.keys` (the studies' key derivations, on the host).
"""

from nlis_jax.experiments import checks, datasets, features, keys, nets
from nlis_jax.experiments.configs import (
    CONFIGS,
    METHODS,
    OPTIMIZERS,
    ORACLE_METHODS,
    PRACTICAL_METHODS,
    CaliforniaConfig,
    DigitsConfig,
    FashionMNISTConfig,
    StudyConfig,
    SyntheticConfig,
    resolve_size,
    resolve_sizes,
    shrink,
)
from nlis_jax.experiments.kernels import compile_stats
from nlis_jax.experiments.problems import Problem, make_optimizer, make_problem, single_index_model
from nlis_jax.experiments.report import format_table, quantiles, steps_to_converge, steps_to_loss
from nlis_jax.experiments.runner import StudyInterrupted, StudyResult, run_study
from nlis_jax.experiments.study import (
    FullFit,
    draw,
    fit_full,
    fit_samples,
    full_losses,
    score,
    score_batch,
    score_params,
    test_accuracy,
)
from nlis_jax.experiments.wall_time import compare_wall_time

__all__ = [
    "CONFIGS",
    "METHODS",
    "OPTIMIZERS",
    "ORACLE_METHODS",
    "PRACTICAL_METHODS",
    "CaliforniaConfig",
    "DigitsConfig",
    "FashionMNISTConfig",
    "FullFit",
    "Problem",
    "StudyConfig",
    "StudyResult",
    "SyntheticConfig",
    "checks",
    "compare_wall_time",
    "compile_stats",
    "datasets",
    "draw",
    "features",
    "fit_full",
    "fit_samples",
    "format_table",
    "full_losses",
    "keys",
    "make_optimizer",
    "make_problem",
    "nets",
    "quantiles",
    "resolve_size",
    "resolve_sizes",
    "run_study",
    "StudyInterrupted",
    "score",
    "score_batch",
    "score_params",
    "shrink",
    "single_index_model",
    "steps_to_converge",
    "steps_to_loss",
    "test_accuracy",
]
