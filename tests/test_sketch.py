"""Matrix-free sketched leverage against the materialised dual matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mlp, mlp_init

import nlis_jax as nj


@pytest.fixture(scope="module")
def problem():
    apply_fn = mlp()
    params = mlp_init(jax.random.key(0), (3, 5, 1), dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (301, 3), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (301,), jnp.float64)
    return apply_fn, params, xs, ys


def test_full_sketch_is_exact(problem):
    # s = p + 1 test vectors span the row space almost surely, so range(F̃ V) = range(F̃) exactly.
    apply_fn, params, xs, ys = problem
    F = nj.dual_matrix(apply_fn, params, xs, ys)
    _, ref, rank, _ = nj.leverage_scores(F, return_info=True)
    _, h, r, _ = nj.sketched_leverage_scores(
        jax.random.key(3), apply_fn, params, xs, ys, sketch_size=F.shape[1], return_info=True
    )
    assert int(r) == int(rank)
    np.testing.assert_allclose(h, ref, rtol=1e-9)
    probs = nj.sketched_leverage_scores(jax.random.key(3), apply_fn, params, xs, ys, sketch_size=F.shape[1])
    np.testing.assert_allclose(probs, ref / rank, rtol=1e-9)


def test_low_rank_sketch_finds_dominant_subspace():
    # A dual matrix whose spectrum has a clear gap after s singular values: a linear model on data with
    # s strong directions and weak noise. The rank-s leverage (top-s left singular vectors) is then
    # recovered closely with one power iteration.
    s, d, n = 4, 12, 400
    kx, kn = jax.random.split(jax.random.key(4))
    basis = jax.random.normal(kx, (n, s)) @ jax.random.normal(jax.random.key(5), (s, d))
    xs = basis + 1e-3 * jax.random.normal(kn, (n, d))

    def linear(theta, x):
        return jnp.dot(x, theta)

    theta = jnp.zeros((d,))
    F = nj.dual_matrix(linear, theta, xs)  # = [X | 0]
    u, _, _ = np.linalg.svd(np.asarray(F), full_matrices=False)
    ref = np.sum(u[:, :s] ** 2, axis=1)
    _, h, r, _ = nj.sketched_leverage_scores(
        jax.random.key(6), linear, theta, xs, sketch_size=s, power_iters=1, return_info=True
    )
    assert int(r) == s
    np.testing.assert_allclose(h, ref, atol=1e-4 * ref.max())


def test_block_outputs_and_bad_input(problem):
    apply_fn = mlp(squeeze=False)
    params = mlp_init(jax.random.key(7), (3, 4, 2), dtype=jnp.float64)
    xs = problem[2]
    F = nj.dual_matrix(apply_fn, params, xs)
    _, ref, rank, _ = nj.leverage_scores(F, return_info=True)
    _, h, r, _ = nj.sketched_leverage_scores(
        jax.random.key(8), apply_fn, params, xs, sketch_size=F.shape[-1], return_info=True
    )
    assert h.shape == (xs.shape[0],) and int(r) == int(rank)
    np.testing.assert_allclose(h, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="sketch_size"):
        nj.sketched_leverage_scores(jax.random.key(0), apply_fn, params, xs, sketch_size=F.shape[-1] + 1)
    with pytest.raises(ValueError, match="power_iters"):
        nj.sketched_leverage_scores(jax.random.key(0), apply_fn, params, xs, sketch_size=2, power_iters=-1)
