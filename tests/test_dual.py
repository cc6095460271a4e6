r"""The dual matrix ``F̃ = [F* | f(0) − y]`` and the matrix-free dual operator (float64).

``F̃ θ̃ = f(θ) − y`` is the adjoint identity plus the offset column; with 32 nodes the quadrature has
converged to ~1e-15 (see test_adjoint.py), so the residual identity holds to 1e-12 absolute on O(1)
residuals. ``mv``/``rmv`` evaluate the same quadrature sums as the matrix, in another order: 1e-12.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flat_theta, mlp, mlp_params, normal, outputs, outputs_at_zero, sigmoid_head_mlp

import nlis_jax as nj

N, D, K = 30, 3, 3
NODES = 32


@functools.cache
def _scalar_case():
    params = mlp_params(0, (D, 5, 1))
    xs, ys = normal(1, N, D), normal(2, N)
    return params, xs, ys


@functools.cache
def _vector_case():
    params = mlp_params(3, (D, 4, K))
    xs, ys = normal(4, N, D), normal(5, N, K)
    return params, xs, ys


VECTOR_FN = mlp(jnp.tanh)


@functools.cache
def _scalar_dual(with_ys):
    params, xs, ys = _scalar_case()
    return nj.dual_matrix(sigmoid_head_mlp, params, xs, ys if with_ys else None, num_nodes=NODES)


@functools.cache
def _vector_dual():
    params, xs, ys = _vector_case()
    return nj.dual_matrix(VECTOR_FN, params, xs, ys, num_nodes=NODES)


def test_dual_matrix_columns_scalar():
    params, xs, ys = _scalar_case()
    p = flat_theta(params).shape[0]
    F = _scalar_dual(True)
    assert F.shape == (N, p + 1) and F.dtype == jnp.float64
    f0 = outputs_at_zero(sigmoid_head_mlp, params, xs)
    np.testing.assert_allclose(f0, 0.5, atol=0)  # the offset column is non-trivial
    np.testing.assert_allclose(F[:, -1], f0 - ys, rtol=1e-15, atol=0)
    np.testing.assert_allclose(
        F[:, :p], nj.adjoint(sigmoid_head_mlp, params, xs, num_nodes=NODES), rtol=1e-14, atol=1e-16
    )
    F_noy = _scalar_dual(False)
    np.testing.assert_allclose(F_noy[:, -1], f0, atol=0)
    np.testing.assert_array_equal(F_noy[:, :p], F[:, :p])


def test_dual_matrix_residual_identity_scalar():
    params, xs, ys = _scalar_case()
    theta_tilde = jnp.concatenate([flat_theta(params), jnp.ones(1)])
    residual = outputs(sigmoid_head_mlp, params, xs) - ys
    np.testing.assert_allclose(_scalar_dual(True) @ theta_tilde, residual, rtol=0, atol=1e-12)
    # without ys the same product gives f(θ)
    np.testing.assert_allclose(
        _scalar_dual(False) @ theta_tilde, outputs(sigmoid_head_mlp, params, xs), rtol=0, atol=1e-12
    )
    # the loss is the squared norm of the residual
    np.testing.assert_allclose(
        jnp.sum((_scalar_dual(True) @ theta_tilde) ** 2), jnp.sum(residual**2), rtol=1e-12
    )


def test_dual_matrix_k_outputs():
    params, xs, ys = _vector_case()
    p = flat_theta(params).shape[0]
    F = _vector_dual()
    assert F.shape == (N, K, p + 1)
    theta_tilde = jnp.concatenate([flat_theta(params), jnp.ones(1)])
    residual = outputs(VECTOR_FN, params, xs) - ys
    np.testing.assert_allclose(jnp.einsum("nkq,q->nk", F, theta_tilde), residual, rtol=0, atol=1e-12)
    np.testing.assert_allclose(F[..., -1], outputs_at_zero(VECTOR_FN, params, xs) - ys, atol=1e-15)


def test_dual_matrix_chunked_and_modes_agree():
    params, xs, ys = _scalar_case()
    F = _scalar_dual(True)
    G = nj.dual_matrix(sigmoid_head_mlp, params, xs, ys, num_nodes=NODES, mode="forward", chunk_size=7)
    np.testing.assert_allclose(G, F, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["scalar", "vector"])
def test_dual_operator_matches_matrix(case):
    if case == "scalar":
        (params, xs, ys), fn, F = _scalar_case(), sigmoid_head_mlp, _scalar_dual(True)
    else:
        (params, xs, ys), fn, F = _vector_case(), VECTOR_FN, _vector_dual()
    op = nj.dual_operator(fn, params, xs, ys, num_nodes=NODES)
    assert op.shape == F.shape and op.dtype == jnp.float64
    p1 = F.shape[-1]
    v = normal(7, p1)
    u = normal(8, *F.shape[:-1])
    Fmat = np.asarray(F).reshape(-1, p1)
    mv = np.asarray(op.mv(v))
    rmv = np.asarray(op.rmv(u))
    assert mv.shape == F.shape[:-1] and rmv.shape == (p1,)
    np.testing.assert_allclose(mv.reshape(-1), Fmat @ np.asarray(v), rtol=0, atol=1e-12)
    np.testing.assert_allclose(rmv, Fmat.T @ np.asarray(u).reshape(-1), rtol=0, atol=1e-12)
    # adjointness <F v, u> = <v, Fᵀ u>
    np.testing.assert_allclose(np.vdot(mv, u), np.vdot(v, rmv), rtol=1e-12)
    # mv(θ̃) is the residual
    theta_tilde = jnp.concatenate([flat_theta(params), jnp.ones(1)])
    np.testing.assert_allclose(op.theta_tilde, theta_tilde, atol=0)
    np.testing.assert_allclose(op.mv(op.theta_tilde), outputs(fn, params, xs) - ys, rtol=0, atol=1e-12)
    # wrong shapes
    with pytest.raises(ValueError, match=rf"mv expects a vector of shape \({p1},\)"):
        op.mv(jnp.ones(p1 - 1))
    with pytest.raises(ValueError, match=r"mv expects"):
        op.mv(jnp.ones((p1, 1)))
    with pytest.raises(ValueError, match=r"rmv expects an array of shape"):
        op.rmv(jnp.ones((N + 1,) + F.shape[1:-1]))
    with pytest.raises(ValueError, match=r"rmv expects an array of shape"):
        op.rmv(jnp.ones(F.shape[:-1] + (1,)))


@pytest.mark.parametrize("case", ["wider output", "narrower output"])
def test_dual_operator_rmv_when_the_output_dtype_is_not_the_params(case):
    """rmv handed jax.vjp a cotangent in the params' dtype, which it refuses when the model's outputs have
    another ("unexpected JAX type ... got float32[5], but expected float64[5]"): float64 xs with float32
    params, or a model casting its output to float32, while mv and dual_matrix worked. rmv now gives
    F̃ᵀu as dual_matrix does, to the rounding of the narrower dtype."""
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(5, 3)), rng.normal(size=5)
    if case == "wider output":
        theta = rng.normal(size=3).astype(np.float32)

        def model(th, x):
            return jnp.tanh(x @ th)

    else:
        theta = rng.normal(size=3)

        def model(th, x):
            return jnp.tanh(x @ th).astype(jnp.float32)

    F = np.asarray(nj.dual_matrix(model, theta, xs, ys, num_nodes=16), np.float64)
    op = nj.dual_operator(model, theta, xs, ys, num_nodes=16)
    u = rng.normal(size=5)
    got = op.rmv(u)
    assert got.dtype == theta.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), F.T @ u, rtol=0, atol=1e-6 * np.abs(F).sum())


def test_dual_operator_is_a_snapshot_of_numpy_inputs():
    """The operator kept the caller's numpy params and xs and passed them to its programs at every call,
    while [θ; 1] and the offset were fixed when it was built: after an in-place change of θ (an optimiser
    step, a reused buffer) mv(theta_tilde) was 0.447 from the old residual and 0.499 from the new one.
    Now the operator is the dual matrix at the call, whatever happens to the arrays afterwards."""
    rng = np.random.default_rng(1)
    xs, ys, theta = rng.normal(size=(6, 3)), rng.normal(size=6), rng.normal(size=3)

    def model(th, x):
        return jnp.tanh(x @ th)

    F = np.asarray(nj.dual_matrix(model, theta, xs, ys, num_nodes=16))
    op = nj.dual_operator(model, theta, xs, ys, num_nodes=16)
    v, u = rng.normal(size=4), rng.normal(size=6)
    theta *= 2.0
    xs[:] = rng.normal(size=(6, 3))
    np.testing.assert_allclose(op.mv(op.theta_tilde), F @ np.r_[theta / 2, 1.0], rtol=0, atol=1e-14)
    np.testing.assert_allclose(op.mv(v), F @ v, rtol=0, atol=1e-14)
    np.testing.assert_allclose(op.rmv(u), F.T @ u, rtol=0, atol=1e-14)


def test_dual_operator_and_difference_quotient_take_int64_beyond_int32_as_before():
    """Integer operands are cast to the operator's float dtype on the host, so int64 entries past int32
    are products of their values (the session's new check for jax's integer cast refused them at first,
    as if they would wrap around); an int64 z in difference_quotient is refused as not floating point."""
    import jax

    rng = np.random.default_rng(2)
    xs, ys, theta = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=3)

    def model(th, x):
        return jnp.tanh(x @ th)

    with jax.enable_x64(False):
        theta32 = theta.astype(np.float32)
        op = nj.dual_operator(model, theta32, xs.astype(np.float32), ys.astype(np.float32), num_nodes=8)
        v = np.array([3_000_000_000, 0, 1, 0], np.int64)
        np.testing.assert_allclose(op.mv(v), op.mv(v.astype(np.float32)), rtol=1e-6)
        u = np.array([0, 2**40, 0, 0, 1], np.int64)
        np.testing.assert_allclose(op.rmv(u), op.rmv(u.astype(np.float32)), rtol=1e-6)
        with pytest.raises(TypeError, match="z must hold floating"):
            nj.closed_forms.difference_quotient(jnp.tanh, np.array([3_000_000_000], np.int64))
