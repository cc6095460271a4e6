"""Sampling studies of nlis_jax: ``L(θ_S)/L(θ*)`` against the sample size for uniform, linear leverage,
nonlinear leverage and norm sampling (oracle scores at θ*), and the practical pilot and refinement schemes.

Typical use (notebooks, ``nlis-jax run``)::

    import jax
    from nlis_jax import experiments as ex

    jax.config.update("jax_enable_x64", True)        # California and synthetic studies run in float64
    config = ex.CaliforniaConfig(sizes=(0.005, 0.01), repeats=10)
    result = ex.run_study(config, jax.random.key(0))
    print(ex.format_table(result.summary))          # result.summary is JSON-ready

The pieces are public for custom studies: :func:`make_problem`, :func:`fit_full`, :func:`score`,
:func:`draw`, :func:`fit_samples`, :func:`full_losses`, :func:`test_accuracy`, :func:`compare_wall_time`.
"""

from nlis_jax.experiments._configs import (
    CONFIGS,
    METHODS,
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
from nlis_jax.experiments._problems import Problem, make_optimizer, make_problem, single_index_model
from nlis_jax.experiments._study import (
    FullFit,
    StudyResult,
    compare_wall_time,
    compile_stats,
    draw,
    fit_full,
    fit_samples,
    format_table,
    full_losses,
    quantiles,
    run_study,
    score,
    score_batch,
    steps_to_converge,
    steps_to_loss,
    test_accuracy,
)

__all__ = [
    "CONFIGS",
    "METHODS",
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
    "compare_wall_time",
    "compile_stats",
    "draw",
    "fit_full",
    "fit_samples",
    "format_table",
    "full_losses",
    "make_optimizer",
    "make_problem",
    "quantiles",
    "resolve_size",
    "resolve_sizes",
    "run_study",
    "score",
    "score_batch",
    "shrink",
    "single_index_model",
    "steps_to_converge",
    "steps_to_loss",
    "test_accuracy",
]
