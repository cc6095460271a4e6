"""The library under ``jax_numpy_dtype_promotion="strict"``, which some users set to catch accidental
mixing of dtypes in their own code: inputs of one dtype must not fail inside nlis_jax.

Strict mode made every float64 call fail (the library widened half precision with
``jnp.promote_types(dtype, float32)``, an error for float64 there), float32 host data under x64 fail on
int32/int64 counts, and ``query`` on a bool/float32 division. The values must be those of the standard mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nlis_jax as nj
from nlis_jax import projections


def _model(t, x):
    return jnp.tanh(x @ t["w"]) @ t["v"]


def _calls(dtype):
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((64, 3)).astype(dtype)
    ys = rng.standard_normal(64).astype(dtype)
    w, v = 0.5 * rng.standard_normal((3, 4)), rng.standard_normal(4)
    theta = {"w": w.astype(dtype), "v": v.astype(dtype)}
    jx, jy = jnp.asarray(xs), jnp.asarray(ys)
    stream = dict(chunk_size=16, num_nodes=4)  # a fixed rule: the adaptive one compiles for 6 s
    probs = jnp.full(64, 1 / 64, dtype)
    key = jax.random.key(0)
    return {
        "dual_matrix": lambda: nj.dual_matrix(_model, theta, jx, jy),
        "leverage_scores": lambda: nj.leverage_scores(nj.dual_matrix(_model, theta, jx, jy, num_nodes=8)),
        "norm_scores": lambda: nj.norm_scores(nj.dual_matrix(_model, theta, jx, jy, num_nodes=8)),
        "streaming_host": lambda: nj.streaming_leverage_scores(_model, theta, xs, ys, **stream),
        "streaming_norms_host": lambda: nj.streaming_norm_scores(_model, theta, xs, ys, chunk_size=16),
        "projected": lambda: nj.projected_leverage_scores(key, _model, theta, jx, jy, dim=16),
        "sample": lambda: nj.sample(key, probs, 8),
        "sample_priority": lambda: nj.sample(key, probs, 8, replace=False),
        "weighted_loss_device": lambda: nj.weighted_loss(_model, theta, jx, jy, probs),
        "weighted_loss_host": lambda: nj.weighted_loss(_model, theta, xs, ys, np.asarray(probs)),
        "fit": lambda: (
            nj.fit(
                _model,
                theta,
                jx,
                jy,
                optimizer=optax.sgd(0.05),
                num_steps=3,
                projection=projections.l2_ball(9.0),
            ).final_loss
        ),
        "query": lambda: nj.query(key, jnp.linspace(0.1, 1, 64, dtype=dtype), jnp.zeros(64, bool), 5),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_public_calls_work_under_strict_dtype_promotion(dtype):
    standard = {name: call() for name, call in _calls(dtype).items()}
    with jax.numpy_dtype_promotion("strict"):
        strict = {name: call() for name, call in _calls(dtype).items()}
    for name, value in standard.items():
        for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(strict[name]), strict=True):
            assert a.dtype == b.dtype, name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
