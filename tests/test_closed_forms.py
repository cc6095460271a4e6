r"""Closed-form adjoints against quadrature and cancellation-free references, and bounded Swish.

References near ``z = 0`` avoid the cancellation in ``(ϕ(z) − ϕ(0))/z`` by exact rewrites:
``tanh(z)/z`` (ϕ(0) = 0), ``(σ(z) − 1/2)/z = tanh(z/2)/(2z)``, and for bounded Swish
``ϕ(z)/z = √c1 + (√c2 − √c1) σ(ζz)``; each is accurate to a few ulps for every ``z ≠ 0``, with the limits
``1``, ``1/4`` and ``√c1 + (√c2 − √c1)/2`` at ``z = 0``. Quadrature with 32 nodes has converged to
~1e-15 on these data (measured: 1.9e-13 at 16 nodes for tanh, 3e-16 at 24), so 1e-10 is a safe bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import normal

import nlis_jax as nj

N, D = 30, 4
NODES = 32
THETA = jnp.array([1.0, -0.8, 0.6, 1.2])
# Rows x = [z0, 0, 0, 0] give z = <θ, x> = z0 exactly (θ_0 = 1); 1.2e-4 and 1.25e-4 straddle the switch
# eps^{1/4} ≈ 1.22e-4 between the series and the direct formula.
SMALL_Z = np.array([0.0, 1e-9, -1e-9, 1e-5, -1e-5, 1.2e-4, 1.25e-4, -1.25e-4, 1e-3, -1e-3])


def _xs():
    rand = np.random.default_rng(0).standard_normal((N, D))
    small = np.zeros((SMALL_Z.size, D))
    small[:, 0] = SMALL_Z
    return jnp.asarray(np.concatenate([rand, small]))


C1, C2, ZETA = 0.5, 3.0, 2.0
PHIS = {
    "tanh": (jnp.tanh, lambda z: np.where(z == 0, 1.0, np.tanh(z) / np.where(z == 0, 1.0, z))),
    "sigmoid": (
        jax.nn.sigmoid,
        lambda z: np.where(z == 0, 0.25, np.tanh(z / 2) / (2 * np.where(z == 0, 1.0, z))),
    ),
    "bounded_swish": (
        nj.bounded_swish,
        lambda z: 1.0 + (np.sqrt(2.0) - 1.0) / (1.0 + np.exp(-z)),
    ),
    "bounded_swish_c": (
        functools.partial(nj.bounded_swish, c1=C1, c2=C2, zeta=ZETA),
        lambda z: np.sqrt(C1) + (np.sqrt(C2) - np.sqrt(C1)) / (1.0 + np.exp(-ZETA * z)),
    ),
}


@pytest.mark.parametrize("name", sorted(PHIS))
def test_single_index_matches_quadrature_and_reference(name):
    phi, quotient = PHIS[name]
    xs = _xs()
    closed = nj.single_index_adjoint(phi, THETA, xs)
    assert closed.shape == xs.shape
    quad = nj.adjoint(lambda th, x: phi(x @ th), THETA, xs, num_nodes=NODES)
    np.testing.assert_allclose(closed, quad, rtol=1e-10, atol=1e-15)
    # cancellation-free reference, row by row (including z = 0 and |z| in {1e-9, 1e-5, 1.2e-4, 1e-3})
    z = np.asarray(xs) @ np.asarray(THETA)
    np.testing.assert_array_equal(z[N:], SMALL_Z)
    expected = quotient(z)[:, None] * np.asarray(xs)
    np.testing.assert_allclose(closed, expected, rtol=1e-10, atol=0)
    # the small-z rows: the quotient itself (the only non-zero column) to 1e-10 relative
    np.testing.assert_allclose(
        np.asarray(closed)[N + 1 :, 0] / SMALL_Z[1:], quotient(SMALL_Z[1:]), rtol=1e-10
    )
    np.testing.assert_allclose(np.asarray(closed)[N], 0.0, atol=0)  # x = 0 row


def test_naive_quotient_would_fail_the_reference():
    """Teeth: the direct ``(σ(z) − σ(0))/z`` loses ~8 digits at z = 1e-9, which the test above catches."""
    z = 1e-9
    naive = (float(jax.nn.sigmoid(z)) - 0.5) / z
    assert abs(naive - np.tanh(z / 2) / (2 * z)) / 0.25 > 1e-10
    dq = float(nj.closed_forms.difference_quotient(jax.nn.sigmoid, jnp.asarray(z)))
    assert abs(dq - np.tanh(z / 2) / (2 * z)) / 0.25 < 1e-14


def test_difference_quotient_float32():
    """float32: within 3e-5 on both sides of the switch at eps32^{1/4} ≈ 0.019.

    Just above it the direct formula's rounding, ~2 ulp(σ(z)) / z = 1.2e-7 / 0.0187 ≈ 6e-6 absolute
    (2.6e-5 relative to σ'(0) = 1/4), was the floor (measured 1.0e-5) before the rule also took the band
    where the subtraction cancels (test below); at 1e-4, where a float64 switch point would still use the
    direct formula, its error would be ~1e-3.
    """
    z = np.array([0.0, 1e-7, 1e-4, 0.0185, 0.0187, 0.5, -3.0], np.float32)
    got = nj.closed_forms.difference_quotient(jax.nn.sigmoid, jnp.asarray(z))
    assert got.dtype == jnp.float32
    z64 = z.astype(np.float64)
    ref = np.where(z64 == 0, 0.25, np.tanh(z64 / 2) / (2 * np.where(z64 == 0, 1.0, z64)))
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=3e-5)


# (g, an accurate form of (g(z) − g(0))/z): no subtraction of nearly equal values
CANCELLING = {
    "cos": (jnp.cos, lambda z: -2 * np.sin(z / 2) ** 2 / z),
    "cosh": (jnp.cosh, lambda z: 2 * np.sinh(z / 2) ** 2 / z),
    "gaussian": (lambda z: jnp.exp(-z * z), lambda z: np.expm1(-z * z) / z),
    "exp": (jnp.exp, lambda z: np.expm1(z) / z),
    "sigmoid": (jax.nn.sigmoid, lambda z: np.tanh(z / 2) / (2 * z)),
    "softplus": (jax.nn.softplus, lambda z: np.log1p(np.expm1(z) / 2) / z),
}


@pytest.mark.parametrize("name", sorted(CANCELLING))
@pytest.mark.parametrize("dtype, bound", [(np.float64, 1e-13), (np.float32, 5e-6)])
def test_difference_quotient_where_the_subtraction_cancels(name, dtype, bound):
    """Above ``|z| = eps^{1/4}`` the direct quotient still cancels where ``g(z) ≈ g(0) ≠ 0``: ``eps/z²``
    for ``g'(0) = 0`` (cos: 5e-9 at ``z = 1.3e-4`` in float64, 1e-4 at 0.02 in float32; sigmoid 1e-5 in
    float32). The rule now covers that band (``|g(z) − g(0)| < 0.1·|g(0)|``, ``|z| ≤ 1``); outside it the
    direct formula loses at most ``eps·(|g(z)| + |g(0)|)/|g(z) − g(0)| ≤ 21·eps`` (5e-15; 2.5e-6 in float32,
    measured 1.3e-6), the bounds' margin over the measured 2.1e-15 and 1.3e-6."""
    g, exact = CANCELLING[name]
    z = np.concatenate([np.geomspace(1e-6, 3, 600), -np.geomspace(1e-6, 3, 600)])
    got = np.asarray(nj.closed_forms.difference_quotient(g, jnp.asarray(z, dtype)), np.float64)
    z_stored = z.astype(dtype).astype(np.float64)
    ref = exact(z_stored)
    assert np.max(np.abs(got - ref) / np.abs(ref)) < bound


def test_difference_quotient_keeps_the_direct_form_past_a_kink():
    """In the band the rule is used only where it agrees with the direct quotient: a kink of ``g``
    inside ``(0, z)`` (here at 0.3, where ``|g(z) − g(0)| < 0.1·|g(0)|``) leaves the direct form, exact to
    rounding, instead of the rule's ``O(1/q²)`` error."""

    def g(z):
        return 10.0 + jax.nn.relu(z - 0.3)

    z = np.array([0.5, 0.8, 1.0])
    got = np.asarray(nj.closed_forms.difference_quotient(g, jnp.asarray(z)))
    np.testing.assert_allclose(got, (z - 0.3) / z, rtol=1e-13)


def test_difference_quotient_names_bad_input():
    """It had no checks: an integer z failed with numpy's "data type int32 not inexact", a non-callable g
    with "'int' object is not callable", and a NaN z gave NaN silently."""
    dq = nj.closed_forms.difference_quotient
    with pytest.raises(TypeError, match=r"z must hold floating-point arrays, got dtype int"):
        dq(jnp.tanh, np.array([0, 1]))
    with pytest.raises(
        TypeError, match=r"g must be a callable scalar function \(e\.g\. jnp\.tanh\), got int"
    ):
        dq(3, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"z contains 1 NaN or Inf"):
        dq(jnp.tanh, np.array([np.nan, 1.0]))
    z = np.array([0.0, 0.5, -2.0])
    want = np.array([1.0, np.tanh(0.5) / 0.5, np.tanh(2.0) / 2.0])  # tanh'(0) = 1; tanh odd
    np.testing.assert_allclose(dq(jnp.tanh, z), want, rtol=1e-15)
    np.testing.assert_allclose(jax.jit(functools.partial(dq, jnp.tanh))(z), want, rtol=1e-15)  # traced z


def _relu_net(params, x):
    """Bias-free 3-layer ReLU network: positively homogeneous of degree 3 in all its weights."""
    w1, w2, w3 = params
    return w3 @ jax.nn.relu(w2 @ jax.nn.relu(w1 @ x))


@functools.cache
def _relu_data():
    params = [normal(1, 5, D), normal(2, 5, 5) / 2, normal(3, 5) / 2]
    xs = normal(4, N, D)
    return params, xs


def test_relu_network_is_homogeneous():
    params, xs = _relu_data()
    t = 0.37
    h = jax.vmap(_relu_net, (None, 0))(params, xs)
    ht = jax.vmap(_relu_net, (None, 0))([t * w for w in params], xs)
    np.testing.assert_allclose(ht, t**3 * h, rtol=1e-13, atol=1e-15)
    # non-trivial outputs, and some rows with h = 0 exactly (the closed form's limit branch)
    assert np.max(np.abs(h)) > 0.5 and np.sum(h != 0) >= N // 2 and np.sum(h == 0) >= 1


def test_homogeneous_adjoint_identity_g():
    """g = identity: ``∇f(tθ) = t² ∇h(θ)`` is a polynomial in t, so 2 Gauss nodes are already exact."""
    params, xs = _relu_data()
    closed = nj.homogeneous_adjoint(_relu_net, params, xs, degree=3)
    quad = nj.adjoint(_relu_net, params, xs, num_nodes=2)
    assert closed.shape == (N, 5 * D + 25 + 5)
    np.testing.assert_allclose(closed, quad, rtol=1e-10, atol=1e-14)
    grad = jax.vmap(jax.grad(_relu_net), (None, 0))(params, xs)
    flat_grad = jnp.concatenate([g.reshape(N, -1) for g in grad], axis=1)
    np.testing.assert_allclose(closed, flat_grad / 3, rtol=1e-14, atol=1e-15)


def test_closed_forms_name_bad_maps_and_a_new_degree_compiles_nothing():
    """g = 3 gave "'int' object is not callable"; a vector-valued phi or g a broadcasting error from
    inside the program; every new degree compiled the program again (degree was static)."""
    from helpers import COMPILE_EVENT, count_events

    params, xs = _relu_data()
    with pytest.raises(TypeError, match="g must be a callable scalar output map or None, got int"):
        nj.homogeneous_adjoint(_relu_net, params, xs, degree=3, g=3)
    with pytest.raises(ValueError, match=r"g must be a scalar map applied elementwise .* returned \(2, 16\)"):
        nj.homogeneous_adjoint(_relu_net, params, xs[:16], degree=3, g=lambda z: jnp.stack([z, z]))
    theta, X = normal(5, 4), normal(6, 10, 4)
    with pytest.raises(TypeError, match="phi must be a callable scalar activation"):
        nj.single_index_adjoint("tanh", theta, X)
    with pytest.raises(
        ValueError, match=r"phi must be a scalar map applied elementwise .* returned \(\), not"
    ):
        nj.single_index_adjoint(jnp.sum, theta, X)
    first = nj.homogeneous_adjoint(_relu_net, params, xs, degree=3, g=jnp.tanh)
    with count_events() as counts:
        other = nj.homogeneous_adjoint(_relu_net, params, xs, degree=1.5, g=jnp.tanh)
    assert counts[COMPILE_EVENT] == 0
    # the same path integral with h of degree 1.5 instead of 3: f* = (g(h) − g(0))/(α h) ∇h scales as 1/α
    np.testing.assert_allclose(other, 2 * first, rtol=1e-14, atol=1e-15)


def test_homogeneous_adjoint_tanh_g():
    params, xs = _relu_data()
    closed = nj.homogeneous_adjoint(_relu_net, params, xs, degree=3, g=jnp.tanh)
    quad = nj.adjoint(lambda p, x: jnp.tanh(_relu_net(p, x)), params, xs, num_nodes=NODES)
    np.testing.assert_allclose(closed, quad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("c1", "c2", "zeta"), [(1.0, 2.0, 1.0), (0.5, 3.0, 2.0), (2.0, 2.0, 1.0)])
def test_bounded_swish_bounds(c1, c2, zeta):
    t = np.concatenate([-np.logspace(-8, 2, 200), np.logspace(-8, 2, 200)])
    phi = np.asarray(nj.bounded_swish(jnp.asarray(t), c1, c2, zeta))
    ratio = phi**2 / t**2
    slack = 1e-13
    assert np.all(ratio >= c1 * (1 - slack)) and np.all(ratio <= c2 * (1 + slack))
    # the bounds are attained in the limits t -> -inf (c1) and t -> +inf (c2)
    np.testing.assert_allclose(ratio[np.argmin(t)], c1, rtol=1e-12)
    np.testing.assert_allclose(ratio[np.argmax(t)], c2, rtol=1e-12)
    assert float(nj.bounded_swish(0.0, c1, c2, zeta)) == 0.0
    # the definition
    sig = 1.0 / (1.0 + np.exp(-zeta * t))
    np.testing.assert_allclose(phi, t * (np.sqrt(c1) + (np.sqrt(c2) - np.sqrt(c1)) * sig), rtol=1e-14)


@pytest.mark.parametrize(("c1", "c2"), [(0.0, 2.0), (-1.0, 2.0), (3.0, 2.0), ("1", 2.0)])
def test_bounded_swish_rejects_bad_constants(c1, c2):
    with pytest.raises(ValueError, match=r"0 < c1 <= c2"):
        nj.bounded_swish(jnp.ones(3), c1, c2)
