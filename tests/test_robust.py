"""Issue 7: every shape, every scale, no silent NaN, losses and the trainer, checkify, the command line.

One test (or a parametrised few) per defect; each asserts against a closed form (leverage of ``n``
independent rows is 1 each; leverage is invariant under column scaling) or an exact message.
"""

from __future__ import annotations

import json
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import COMPILE_EVENT, count_events
from jax.experimental import checkify

import nlis_jax as nj
from nlis_jax import cli

DTYPES = (jnp.float32, jnp.float64)
# Tolerances: leverage of a well-conditioned (cond < 10) 6-column matrix moves by ~m·eps·κ.
RTOL = {jnp.float32: 2e-5, jnp.float64: 1e-12}


def _matrix(n, m, dtype, seed=0):
    return np.random.default_rng(seed).normal(size=(n, m)).astype(dtype)


# ------------------------------------------------------------------------------------------------
# 2. Every shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_rows_than_columns_every_leverage_is_one(dtype):
    F = _matrix(4, 9, dtype)
    info = nj.leverage_scores(F, return_info=True)
    assert int(info.rank) == 4 and info.probs.dtype == dtype
    np.testing.assert_allclose(info.leverage, 1.0, rtol=RTOL[dtype] * 10)
    U, rank, _ = nj.orthonormal_basis(F)
    assert U.shape == (4, 9) and int(rank) == 4
    np.testing.assert_allclose(U @ U.T, np.eye(4), atol=RTOL[dtype] * 10)
    # two rows, each leverage 1: sampled with weight 2 the distortion is exactly 1 (eigenvalues 2-1, 0-1)
    eps = nj.distortion(F, jnp.array([0, 1]), jnp.array([2.0, 2.0], dtype))
    np.testing.assert_allclose(float(eps), 1.0, rtol=RTOL[dtype] * 10)


def test_fewer_rows_rank_deficient():
    F = _matrix(5, 9, np.float64)
    F[3] = F[0] + F[1]
    F[4] = 2 * F[2]  # rank 3: rank ≤ min(n, m)
    info = nj.leverage_scores(F, return_info=True)
    assert int(info.rank) == 3
    np.testing.assert_allclose(np.sum(info.leverage), 3.0, rtol=1e-12)


def _tanh_model():
    def f(th, x):
        return jnp.tanh(x @ th["w"]) @ th["v"]

    params = {"w": jnp.full((3, 4), 0.3), "v": jnp.full(4, 0.5)}
    return f, params


def test_projection_dim_above_n_is_exact():
    f, _ = _tanh_model()
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "v": jnp.asarray(rng.normal(size=4))}
    xs = _matrix(6, 3, np.float64)  # n = 6 < dim = 10 < p + 1 = 17: rank n, every leverage 1
    info = nj.projected_leverage_scores(jax.random.key(0), f, params, xs, dim=10, return_info=True)
    assert int(info.rank) == 6
    np.testing.assert_allclose(info.probs, nj.leverage_scores(nj.dual_matrix(f, params, xs)), rtol=1e-10)


def test_xs_python_list_says_what_is_wrong():
    f, params = _tanh_model()
    with pytest.raises(TypeError, match=r"Python list of numbers.*jnp.asarray\(xs\)"):
        nj.dual_matrix(f, params, _matrix(6, 3, np.float32).tolist())


@pytest.mark.parametrize("dtype", (jnp.float16, jnp.bfloat16))
def test_half_precision_computes_in_float32_returns_input_dtype(dtype):
    F32 = _matrix(30, 4, np.float32)
    F = jnp.asarray(F32, dtype)
    probs = nj.leverage_scores(F)
    assert probs.dtype == dtype
    ref = nj.leverage_scores(np.asarray(F.astype(jnp.float32)))  # same rounded input, in float32
    np.testing.assert_allclose(np.asarray(probs, np.float32), ref, rtol=1e-2)  # output rounding only
    assert nj.norm_scores(F).dtype == dtype
    assert nj.orthonormal_basis(F)[0].dtype == dtype
    f, params = _tanh_model()
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    xs = jnp.asarray(F32[:, :3], dtype)
    streamed = nj.streaming_leverage_scores(f, params, xs, chunk_size=8, num_nodes=16)  # compiles fast
    assert streamed.dtype == dtype and abs(float(jnp.sum(streamed.astype(jnp.float32))) - 1) < 1e-2


@pytest.mark.parametrize("dtype", (jnp.float16, jnp.bfloat16))
def test_half_precision_adjoint_at_default_is_float32_accurate_without_warning(dtype):
    # The adaptive rule integrates half-precision models in float32 to float32's tolerance (1e-6), so
    # the result differs from the float32 adjoint of the same (rounded) inputs by the final rounding
    # only: half an ulp of the half-precision format, relative to each entry.
    f, params = _tanh_model()
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    xs = jnp.asarray(_matrix(12, 3, np.float32) * 2, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nj.QuadratureWarning)
        adj, info = nj.adjoint(f, params, xs, return_info=True)
        dual = nj.dual_matrix(f, params, xs)
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    ref = np.asarray(nj.adjoint(f, params32, xs.astype(jnp.float32)))
    assert adj.dtype == dual.dtype == dtype and info.error.dtype == jnp.float32
    assert bool(np.all(info.converged)) and float(np.max(info.error)) <= 1e-6
    ulp = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(adj, np.float32), ref, rtol=ulp, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(dual[:, :-1]), np.asarray(adj))


@pytest.mark.parametrize("dtype", (jnp.float16, jnp.bfloat16))
@pytest.mark.parametrize("mode", ("forward", "reverse"))
def test_half_precision_fixed_rule_sums_in_float32(dtype, mode):
    """A fixed rule on a half-precision model evaluates and sums its nodes in float32 and rounds once, as
    the adaptive rule does. sin(θ·x) near θ·x = π cancels along the path: the half-precision sum was
    21–33 ulps off; θ·x has the adjoint x exactly, whose half-precision sum of 32 weights gave 0.9922."""
    sine = lambda th, x: jnp.sin(jnp.dot(th, x))  # noqa: E731
    rng = np.random.default_rng(21)
    xs = jnp.asarray(rng.uniform(0.9, 1.1, (20, 4)), dtype)
    theta = jnp.asarray(np.full(4, np.pi / 4), dtype)
    ulp = float(jnp.finfo(dtype).eps)
    for f, q in ((sine, 16), (lambda th, x: jnp.dot(th, x), 32)):
        adj = nj.adjoint(f, theta, xs, num_nodes=q, mode=mode)
        dual = nj.dual_matrix(f, theta, xs, jnp.zeros(20, dtype), num_nodes=q, mode=mode)
        ref = nj.adjoint(f, theta.astype(jnp.float32), xs.astype(jnp.float32), num_nodes=q, mode=mode)
        assert adj.dtype == dual.dtype == dtype
        np.testing.assert_allclose(np.asarray(adj, np.float32), ref, rtol=ulp / 2 + 1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(dual[:, :-1]), np.asarray(adj))
    if mode == "forward":  # the matrix-free operator too: F̃v and F̃ᵀu in float32, rounded once
        op = nj.dual_operator(sine, theta, xs, num_nodes=16)
        op32 = nj.dual_operator(sine, theta.astype(jnp.float32), xs.astype(jnp.float32), num_nodes=16)
        v, u = jnp.asarray(rng.standard_normal(5), dtype), jnp.asarray(rng.standard_normal(20), dtype)
        for got, ref in (
            (op.mv(v), op32.mv(v.astype(jnp.float32))),
            (op.rmv(u), op32.rmv(u.astype(jnp.float32))),
        ):
            assert got.dtype == dtype
            np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=ulp / 2 + 1e-5, atol=1e-5)


def test_float32_adjoint_columns_near_1e19_keep_a_finite_error_estimate():
    # x ≈ −4.5e23 with W ≈ 2e-22 (pre-activation −95): the W-column of the adjoint is ~1e19, whose square
    # overflows float32. The error estimate and the norms are scaled, so they stay finite, the identity
    # check drives the refinement, and the small columns match float64 (they were 7e-5 off, with a NaN
    # estimate and no warning, when the squares overflowed).
    def f(th, x):
        return jax.nn.sigmoid(x @ th["W"] + th["b"]) @ th["V"]

    params = {"W": np.array([[2.0409191e-22]]), "b": np.array([-2.555665]), "V": np.array([[0.418, -0.568]])}
    xs = np.array([[-4.526493e23]])
    params32 = jax.tree.map(lambda a: a.astype(np.float32), params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nj.QuadratureWarning)
        adj, info = nj.adjoint(f, params32, xs.astype(np.float32), return_info=True)
    assert np.all(np.isfinite(info.error)) and bool(np.all(info.converged))
    ref = nj.adjoint(f, jax.tree.map(lambda a: a.astype(np.float32).astype(np.float64), params), xs)
    adj = np.asarray(adj, np.float64)
    np.testing.assert_allclose(adj[..., :2], ref[..., :2], rtol=1e-6)  # the b-columns: 7e-5 off before
    # the W- and V-columns move with the float32 rounding of x·W + b ≈ −95 itself: ~|z|·eps ≈ 1e-5
    np.testing.assert_allclose(adj, ref, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# 3. Every scale, and never a NaN probability

COLUMN_SCALES = [(jnp.float32, 1e18), (jnp.float32, 1e-20), (jnp.float64, 1e154), (jnp.float64, 1e-160)]


@pytest.mark.parametrize(("dtype", "scale"), COLUMN_SCALES)
def test_column_scale_does_not_change_leverage(dtype, scale):
    F = _matrix(50, 6, dtype)
    ref = nj.leverage_scores(F, return_info=True)
    G = F.copy()
    G[:, 2] *= dtype(scale)
    got = nj.leverage_scores(G, return_info=True)
    assert int(got.rank) == int(ref.rank) == 6
    np.testing.assert_allclose(got.probs, ref.probs, rtol=RTOL[dtype])


TOP_COLUMNS = [
    (jnp.float32, 100),
    (jnp.float32, 125),
    (jnp.float32, 127),
    (jnp.float64, 1021),
    (jnp.float64, 1023),
]


def _linear(theta, x):
    return x @ theta


@pytest.mark.parametrize(("dtype", "exponent"), TOP_COLUMNS)
def test_columns_at_the_top_of_the_range_keep_their_leverage(dtype, exponent):
    # A column whose maximum is 2^exponent (up to the largest binade). Its power-of-two scale was
    # subnormal from 2^(maxexp-2) on, which XLA flushes to zero (the column vanished: rank 2, 99% off),
    # and the fast routes folded the scales into their transforms, whose entries ~1/(colmax·√n)
    # underflowed from about 2^124 in float32 (9% off at n = 40). Dense (every route, forced or not) and
    # streamed (a linear model: its dual matrix is [x, −y]) must give the unscaled scores.
    rng = np.random.default_rng(5)
    xs, ys = rng.normal(size=(40, 2)).astype(dtype), rng.normal(size=40).astype(dtype)
    xs[:, 1] /= np.abs(xs[:, 1]).max()
    ref = nj.leverage_scores(np.column_stack([xs, -ys]).astype(np.float64))
    big = xs.copy()
    big[:, 1] *= dtype(2.0**exponent)
    assert np.all(np.isfinite(big)) and not np.shares_memory(big, xs)
    F = np.column_stack([big, -ys])
    got = {f"dense {r}": nj.leverage_scores(F, route=r, return_info=True) for r in (None, *nj.routes.ROUTES)}
    theta, q = np.zeros(2, dtype), dict(num_nodes=2, return_info=True)  # a fixed rule, exact here
    got["streaming"] = nj.streaming_leverage_scores(_linear, theta, jnp.asarray(big), ys, **q)
    got["host"] = nj.streaming_leverage_scores(_linear, theta, big, ys, chunk_size=16, **q)
    for name, info in got.items():
        assert int(info.rank) == 3, name
        np.testing.assert_allclose(info.probs, ref, rtol=RTOL[dtype] * 5, err_msg=name)


def _tanh_index(theta, x):
    return jnp.tanh(x @ theta)


@pytest.mark.parametrize(("dtype", "scale"), COLUMN_SCALES)
def test_column_scale_does_not_change_streaming_leverage(dtype, scale):
    # x_2 · c with θ_2 / c leaves the model unchanged and multiplies column 2 of the dual matrix by c;
    # ys · c multiplies its last column [f(0) − y] by c (f(0) = 0). Dense, streamed on the device and
    # streamed from host (numpy) data must all give the unscaled scores. chunk_size=16 over n=40: three
    # chunks, so the running column exponents of the streaming pass are exercised.
    rng = np.random.default_rng(3)
    xs, ys = rng.normal(size=(40, 4)).astype(dtype), rng.normal(size=40).astype(dtype)
    theta = (0.4 * rng.normal(size=4)).astype(dtype)
    xs_s, ys_s, theta_s = xs.copy(), ys * dtype(scale), theta.copy()
    xs_s[:, 2] *= dtype(scale)
    theta_s[2] /= dtype(scale)
    q = dict(num_nodes=8)  # a fixed rule: the quadrature is not under test here, and compiles fast
    ref = nj.leverage_scores(nj.dual_matrix(_tanh_index, theta, xs, ys, **q))
    kw = dict(chunk_size=16, return_info=True, **q)
    got = {
        "dense": nj.leverage_scores(nj.dual_matrix(_tanh_index, theta_s, xs_s, ys_s, **q), return_info=True),
        "streaming": nj.streaming_leverage_scores(_tanh_index, theta_s, jnp.asarray(xs_s), ys_s, **kw),
        "host": nj.streaming_leverage_scores(_tanh_index, theta_s, xs_s, ys_s, **kw),
    }
    for name, info in got.items():
        assert int(info.rank) == 5, name
        np.testing.assert_allclose(info.probs, ref, rtol=RTOL[dtype] * 5, err_msg=name)


WHOLE_SCALES = [(jnp.float32, 1e18), (jnp.float32, 1e-18), (jnp.float64, 1e154), (jnp.float64, 1e-300)]


@pytest.mark.parametrize(("dtype", "scale"), WHOLE_SCALES)
def test_whole_matrix_scale_gives_valid_probabilities(dtype, scale):
    F = _matrix(50, 6, dtype)
    G = F * dtype(scale)
    np.testing.assert_allclose(nj.leverage_scores(G), nj.leverage_scores(F), rtol=RTOL[dtype])
    np.testing.assert_allclose(nj.norm_scores(G), nj.norm_scores(F), rtol=RTOL[dtype])


def test_ridge_leverage_at_extreme_scale():
    F = _matrix(40, 5, np.float64)
    ref = nj.leverage_scores(F, ridge=3.0)
    for j in (500, -500):  # ridge leverage of cF with c²λ equals that of F with λ (c a power of two)
        got = nj.leverage_scores(np.ldexp(F, j), ridge=float(np.ldexp(3.0, 2 * j)))
        np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "scale", "ridge"),
    [
        (jnp.float32, 1.0, 3e37),
        (jnp.float32, 1e-3, 1e37),
        (jnp.float32, 1e-20, 1e-7),
        (jnp.float64, 1.0, 1e305),
    ],
)
def test_ridge_far_above_the_gram_gives_row_norm_probabilities(dtype, scale, ridge):
    """As λ/‖F‖² → ∞, F(FᵀF + λI)⁻¹Fᵀ = FFᵀ/λ − O(‖F‖⁴/λ²): the probabilities tend to the row norms.
    Here λ/‖F‖² ≥ 1e28 and the raw leverage is subnormal or 0; the probabilities used to come from it
    (relative errors up to 1, a row given probability 0) and must match the row norms to rounding."""
    F = _matrix(200, 5, np.float64) * scale
    out = nj.leverage_scores(jnp.asarray(F, dtype), ridge=ridge, return_info=True)
    ref = np.sum(F * F, axis=1) / np.sum(F * F)
    np.testing.assert_allclose(np.asarray(out.probs, np.float64), ref, rtol=RTOL[dtype])
    h, eff = np.asarray(out.leverage, np.float64), float(out.rank)
    assert out.probs.dtype == dtype and np.all(h >= 0) and 0 <= eff <= 1e-25
    np.testing.assert_allclose(h, eff * ref, rtol=1e-3, atol=float(np.finfo(dtype).smallest_normal) * 1e-3)


@pytest.mark.parametrize(
    ("dtype", "span", "ridge"), [(jnp.float64, 8, 1.0), (jnp.float64, 20, 1.0), (jnp.float32, 2, 1.0)]
)
def test_ridge_leverage_of_columns_of_very_different_scales(dtype, span, ridge):
    """Columns scaled 10^-span .. 10^span: an eigendecomposition of the raw Gram matrix lost the small
    directions (float64, span 8: effective dimension 39.55 for 5.98, above the 10 columns). Reference:
    QR of [A; √λ I] in float64."""
    A = _matrix(2000, 10, np.float64, seed=1) * np.logspace(-span, span, 10)
    A = A.astype(dtype).astype(np.float64)
    Q = np.linalg.qr(np.vstack([A, np.sqrt(ridge) * np.eye(10)]))[0]
    h = np.sum(Q[:2000] ** 2, axis=1)
    out = nj.leverage_scores(jnp.asarray(A, dtype), ridge=ridge, return_info=True)
    rtol = {jnp.float32: 1e-5, jnp.float64: 1e-12}[dtype]
    np.testing.assert_allclose(np.asarray(out.leverage, np.float64), h, rtol=rtol)
    np.testing.assert_allclose(float(out.rank), h.sum(), rtol=rtol)


def test_all_zero_dual_is_a_clear_error():
    def constant(th, x):  # does not depend on θ; f(0) = y = 0 on every point
        return 0.0 * jnp.sum(th) * jnp.sum(x)

    F = nj.dual_matrix(constant, jnp.ones(3), jnp.ones((5, 2)), jnp.zeros(5))
    for fn in (nj.leverage_scores, nj.orthonormal_basis, lambda F: nj.leverage_scores(F, ridge=1.0)):
        with pytest.raises(ValueError, match=r"all zeros.*does not depend on θ.*fits every point"):
            fn(F)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rtol": float("nan")}, "rtol must lie in"),
        ({"rtol": 1.5}, "rtol must lie in"),
        ({"rtol": 0.0}, "rtol must lie in"),
        ({"ridge": float("nan")}, "ridge must be non-negative and finite"),
        ({"ridge": float("inf")}, "ridge must be non-negative and finite"),
    ],
)
def test_bad_tolerances_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nj.leverage_scores(_matrix(10, 3, np.float64), **kwargs)


def test_without_replacement_zero_and_denormal_probabilities_no_nan():
    probs = jnp.array([0.5, 0.5 - 1e-310, 1e-310, 0.0])
    idx, w = nj.sample(jax.random.key(0), probs, 2, replace=False)
    assert set(np.asarray(idx)) == {0, 1} and np.all(np.isfinite(w))
    # traced probs skip the value checks: asking for more rows than are positive gives weight 0, not NaN
    idx, w = jax.jit(lambda k, p: nj.sample(k, p, 4, replace=False))(jax.random.key(1), probs)
    assert np.all(np.isfinite(w)) and np.all(np.asarray(w)[np.asarray(idx) >= 2] == 0)


def test_sample_size_tiny_epsilon_is_a_clear_error():
    with pytest.raises(ValueError, match="choose a larger epsilon"):
        nj.sample_size(1e-300, 0.1, 3)
    assert nj.sample_size(1e-4, 0.1, 3) > 1e8  # still a (correct) large number
    with pytest.raises(ValueError, match=r"rank=1e\+30, beta=1 ask .* or check the rank"):
        nj.sample_size(0.5, 0.1, 10**30)  # the rank's fault: the message blamed epsilon alone


# ------------------------------------------------------------------------------------------------
# 4. Losses and the trainer


def _softmax(th, x):
    return x @ th


FIT = {"optimizer": optax.sgd(0.1), "num_steps": 2}


def test_cross_entropy_labels_out_of_range():
    xs, params = jnp.ones((5, 3)), jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 4\).*\[0, 4\]"):
        nj.fit(_softmax, params, xs, jnp.arange(5), **FIT, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 4\)"):
        nj.weighted_loss(_softmax, params, xs, -jnp.ones(5, jnp.int32), loss="cross_entropy")


def test_logistic_labels_outside_the_two_classes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        ys = jnp.array([0, 1, 2, 1.0])
        nj.per_example_loss(lambda th, x: x @ th, jnp.zeros(3), jnp.ones((4, 3)), ys, loss="logistic")


def test_optimizer_that_is_not_a_transformation():
    xs, ys = jnp.ones((4, 3)), jnp.zeros(4)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        nj.fit(lambda th, x: x @ th, jnp.zeros(3), xs, ys, optimizer=optax.sgd, num_steps=2)
    broken = optax.GradientTransformation(lambda p: None, lambda g, s, p=None: None)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        nj.fit(lambda th, x: x @ th, jnp.zeros(3), xs, ys, optimizer=broken, num_steps=2)


def test_opt_state_from_another_optimizer():
    xs, ys, params = jnp.ones((4, 3)), jnp.zeros(4), jnp.zeros(3)
    with pytest.raises(ValueError, match="opt_state does not match"):
        nj.fit(
            lambda th, x: x @ th,
            params,
            xs,
            ys,
            optimizer=optax.sgd(0.1),
            num_steps=2,
            opt_state=optax.adam(0.1).init(params),
        )


# ------------------------------------------------------------------------------------------------
# 5. Inside a user's jit


def _draw(key, F):
    with nj.traced_checks():
        return nj.sample(key, nj.leverage_scores(F), 8)


def test_checkify_reports_value_errors_under_jit():
    checked = jax.jit(checkify.checkify(_draw, errors=checkify.user_checks))
    F = _matrix(20, 3, np.float64)
    err, (idx, w) = checked(jax.random.key(0), F)
    assert err.get() is None and idx.shape == (8,)
    bad = F.copy()
    bad[0, 0] = np.nan
    assert "F contains NaN or Inf" in checked(jax.random.key(0), bad)[0].get()
    assert "all zeros" in checked(jax.random.key(0), 0 * F)[0].get()

    def draw_probs(key, p):
        with nj.traced_checks():
            return nj.sample(key, p, 4)

    checked = jax.jit(checkify.checkify(draw_probs, errors=checkify.user_checks))
    assert "must sum to 1" in checked(jax.random.key(0), jnp.ones(4))[0].get()
    assert "negative" in checked(jax.random.key(0), jnp.array([-0.5, 1.5]))[0].get()
    with pytest.raises(Exception, match="checkify"):  # without checkify.checkify: refused, documented
        jax.jit(_draw)(jax.random.key(0), F)


def test_checkify_reports_traced_projection_bounds():
    """Under a user's jit a negative radius flipped the sign of the parameters and lower > upper returned
    the upper bound everywhere, with nothing reported even inside traced_checks(); [inf, inf] projected
    every entry to inf."""

    def ball(r, x):
        with nj.traced_checks():
            return nj.l2_ball(r)({"w": x})

    def clip(lo, hi, x):
        with nj.traced_checks():
            return nj.box(lo, hi)({"w": x})

    x = jnp.array([3.0, 4.0])
    checked = jax.jit(checkify.checkify(ball, errors=checkify.user_checks))
    assert "radius must be positive" in checked(-1.0, x)[0].get()
    err, out = checked(2.0, x)
    assert err.get() is None and np.allclose(out["w"], [1.2, 1.6])
    checked = jax.jit(checkify.checkify(clip, errors=checkify.user_checks))
    assert "lower must be <= upper" in checked(1.0, -1.0, x)[0].get()
    assert checked(-1.0, 3.5, x)[0].get() is None
    for bound in (np.inf, -np.inf):
        with pytest.raises(ValueError, match="the same infinite value"):
            nj.box(bound, bound)
        assert "both inf or both -inf" in checked(bound, bound, x)[0].get()  # traced: was no error
    checked = jax.jit(checkify.checkify(ball, errors=checkify.user_checks))
    assert "radius must be finite" in checked(np.inf, x)[0].get()  # traced: was the identity


def test_checkify_reports_traced_subnormal_values():
    """Checks the eager calls make on flushed subnormal values, skipped under a user's jit (wrong answers
    with no error inside traced_checks()): a float32 column of F all below the smallest normal number
    (rank 3 of 4, probabilities 60% off), weights all subnormal (a loss of 0, steps that never move), pool
    scores all below tiny/eps (the pool turned uniform)."""

    def checked(fn):
        def inner(*args):
            with nj.traced_checks():
                return fn(*args)

        return jax.jit(checkify.checkify(inner, errors=checkify.user_checks))

    normal = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    F = normal.copy()
    F[:, 3] *= 1e-39
    err, _ = checked(nj.leverage_scores)(F)
    assert "whose values are all subnormal" in err.get()
    assert checked(nj.leverage_scores)(normal)[0].get() is None

    def model(p, x):
        return x @ p

    xs, ys = F[:, :3], np.ones(30, np.float32)
    loss = checked(lambda w: nj.weighted_loss(model, jnp.ones(3, jnp.float32), xs, ys, w))
    assert "weights sum to 0 in float32" in loss(np.full(30, 1e-39, np.float32))[0].get()
    assert loss(np.full(30, 1e-30, np.float32))[0].get() is None

    scores = np.float32([0, 0, 1, 2, 3, 4, 5, 30]) * np.float32(1e-40)
    labelled = np.arange(8) < 2
    probs = checked(lambda s: nj.active.pool_probabilities(s, labelled))
    assert "all below the smallest normal number divided by eps" in probs(scores)[0].get()
    err, got = probs(scores * np.float32(1e20))
    assert err.get() is None
    np.testing.assert_allclose(got, nj.active.pool_probabilities(scores, labelled), rtol=1e-6)


def _swish_index(p, x):
    return nj.bounded_swish(x @ p["w"], zeta=p["zeta"])  # zeta a traced parameter: checked in the trace


@pytest.mark.parametrize("plain_first", [True, False])
def test_traced_checks_never_reuse_a_trace_of_the_other_state(plain_first):
    """The checks' state was read while the library's own jax.jit functions traced the model, but was
    not in their cache keys: a plain call first cached a trace without the check (the checked call then
    skipped it silently), a checked call first cached one with it (a plain call then failed:
    'checkify.check which was not functionalized')."""
    xs = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    good = {"w": np.ones(3, np.float32), "zeta": np.float32(1.0)}
    bad = {"w": np.ones(3, np.float32), "zeta": np.float32(-1.0)}

    def checked(p):
        with nj.traced_checks():
            return nj.dual_matrix(_swish_index, p, xs, num_nodes=4)

    run_checked = checkify.checkify(checked, errors=checkify.user_checks)
    if plain_first:
        nj.dual_matrix(_swish_index, good, xs, num_nodes=4)
    assert "finite zeta >= 0" in run_checked(bad)[0].get()
    assert run_checked(good)[0].get() is None
    F = nj.dual_matrix(_swish_index, good, xs, num_nodes=4)  # plain again: no check in its program
    assert F.shape == (8, 5) and np.all(np.isfinite(F))


def test_the_library_compiled_functions_copy_as_themselves():
    """copy.deepcopy of a structure holding one of the library's compiled functions (e.g. a config dict
    holding nj.active.estimator_weights) raised "cannot pickle '_thread.lock' object" once they kept a
    lock per function; it returns the function itself, as for any function."""
    import copy

    fn = nj.active.estimator_weights
    assert copy.deepcopy({"w": fn})["w"] is fn and copy.copy(fn) is fn
    state = nj.active.init_state(4, jnp.float64)
    np.testing.assert_array_equal(copy.deepcopy(fn)(state), fn(state))


@pytest.mark.parametrize("plain_first", [True, False])
def test_traced_checks_on_one_thread_leave_other_threads_alone(plain_first):
    """The state is per thread but the library's program caches were shared: a plain call on thread B
    while thread A was inside traced_checks() made A's checkify call skip its check silently (err None
    for zeta = -1), a checked trace on A made B's plain call fail ('checkify.check which was not
    functionalized'), and A's eager calls cleared the caches under B, which recompiled every call. Each
    compiled function now keeps one cache per state."""
    xs = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    good = {"w": np.ones(3, np.float32), "zeta": np.float32(1.0)}
    bad = {"w": np.ones(3, np.float32), "zeta": np.float32(-1.0)}
    plain = lambda: nj.dual_matrix(_swish_index, good, xs, num_nodes=4)
    checked = checkify.checkify(
        lambda p: nj.dual_matrix(_swish_index, p, xs, num_nodes=4), errors=checkify.user_checks
    )
    a_inside, b_done, out = threading.Event(), threading.Event(), {}

    def thread_a():
        with nj.traced_checks():
            if not plain_first:
                out["good"] = checked(good)[0].get()
            a_inside.set()
            b_done.wait(timeout=120)
            out["bad"] = checked(bad)[0].get()
            nj.leverage_scores(np.asarray(plain()))  # eager inside the block: host checks, B's programs

    def thread_b():
        a_inside.wait(timeout=120)
        try:
            out["plain"] = plain()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            out["plain"] = e
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not isinstance(out["plain"], Exception), out["plain"]
    np.testing.assert_array_equal(out["plain"], plain())
    assert "finite zeta >= 0" in out["bad"]
    if not plain_first:
        assert out["good"] is None


def _tanh_index(t, x):
    return jnp.tanh(x @ t)


def test_eager_calls_inside_traced_checks_give_their_values():
    """Inside nj.traced_checks(), an eager leverage_scores, sample, projected_leverage_scores or
    label_free_leverage_scores (valid input, no user trace) failed with "Cannot abstractly evaluate a
    checkify.check which was not functionalized": the library's own programs emitted the checks, which no
    checkify wraps. Eager calls now run with the checks on the host, give the values of a call outside the
    block, and a checkified function in the same block still reports bad input (before and after them)."""
    rng = np.random.default_rng(1)
    xs, ys, th = rng.normal(size=(20, 3)), rng.normal(size=20), np.full(3, 0.3)
    F = nj.dual_matrix(_tanh_index, th, xs, ys, num_nodes=8)
    key = jax.random.key(4)
    calls = {
        "leverage": lambda: nj.leverage_scores(F),
        "norm": lambda: nj.norm_scores(F),
        "sample": lambda: nj.sample(key, nj.leverage_scores(F), 5),
        "distortion": lambda: nj.distortion(F, *nj.sample(key, nj.leverage_scores(F), 10)),
        "projected": lambda: nj.projected_leverage_scores(key, _tanh_index, th, xs, ys, dim=3),
        "label_free": lambda: nj.label_free_leverage_scores(_tanh_index, th, xs),
        "query": lambda: nj.query(key, nj.leverage_scores(F), np.zeros(20, bool), batch=3),
        "streaming": lambda: nj.streaming_leverage_scores(_tanh_index, th, xs, ys),
    }
    outside = {name: call() for name, call in calls.items()}

    def checked(probs):
        with nj.traced_checks():
            return nj.sample(key, probs, 3)

    run_checked = jax.jit(checkify.checkify(checked, errors=checkify.user_checks))
    bad = np.full(20, 2.0 / 20)
    with nj.traced_checks():
        assert "probs must sum to 1" in run_checked(bad)[0].get()
        with count_events() as counts:  # the programs of the calls outside (the caches were cleared)
            for name, call in calls.items():
                for got, want in zip(jax.tree.leaves(call()), jax.tree.leaves(outside[name]), strict=True):
                    np.testing.assert_array_equal(got, want, err_msg=name)
        assert counts[COMPILE_EVENT] == 0
        assert "probs must sum to 1" in run_checked(bad)[0].get()
        assert run_checked(np.full(20, 1.0 / 20))[0].get() is None


def test_checkify_of_the_adaptive_rule_is_named():
    """Under checkify inside traced_checks(), the adaptive rule (the default of dual_matrix, the streaming
    and label-free scores) failed with checkify's "does not support batched while-loops ... move the vmap
    to the outer level", about a vmap the user never wrote. Now a ValueError saying to pass num_nodes; with
    it the same function runs and reports bad input."""
    rng = np.random.default_rng(2)
    xs, ys, th = rng.normal(size=(12, 3)), rng.normal(size=12), np.full(3, 0.3)
    for score in (
        lambda t, **kw: nj.leverage_scores(nj.dual_matrix(_tanh_index, t, xs, ys, **kw)),
        lambda t, **kw: nj.streaming_leverage_scores(_tanh_index, t, xs, ys, **kw),
        lambda t, **kw: nj.label_free_leverage_scores(_tanh_index, t, xs, **kw),
    ):

        def checked(t, score=score, **kw):
            with nj.traced_checks():
                return score(t, **kw)

        with pytest.raises(ValueError, match="checkify cannot transform the adaptive rule.*Pass num_nodes=q"):
            jax.jit(checkify.checkify(checked, errors=checkify.user_checks))(th)
        fixed = jax.jit(checkify.checkify(lambda t: checked(t, num_nodes=16), errors=checkify.user_checks))
        err, probs = fixed(th)
        assert err.get() is None
        np.testing.assert_allclose(np.sum(probs), 1.0, rtol=1e-12)
        assert "NaN" in fixed(np.array([np.nan, 0.3, 0.3]))[0].get()


def test_reverse_mode_through_the_streamed_and_projected_adaptive_scores_is_named():
    """jax.grad through streaming_leverage_scores, streaming_norm_scores (device or numpy data) or
    projected_leverage_scores(num_nodes=None) gave jax's "Reverse-mode differentiation does not work for
    lax.while_loop", while adjoint and dual_matrix said to pass num_nodes: the check ran inside the
    library's own programs, where the gradient's tracers cannot be seen. Now the same ValueError; with
    num_nodes=16 the gradient matches the dense path's."""
    rng = np.random.default_rng(3)
    xs, ys, th = rng.normal(size=(16, 3)), rng.normal(size=16), np.full(3, 0.3)
    key = jax.random.key(5)
    for score in (
        lambda t: nj.streaming_leverage_scores(_tanh_index, t, xs, ys)[0],
        lambda t: nj.streaming_norm_scores(_tanh_index, t, jnp.asarray(xs), ys)[0],
        lambda t: nj.projected_leverage_scores(key, _tanh_index, t, xs, ys, dim=3, num_nodes=None)[0],
    ):
        with pytest.raises(
            ValueError, match="reverse-mode differentiation .* cannot go through the adaptive"
        ):
            jax.grad(score)(th)
    dense = jax.grad(lambda t: nj.leverage_scores(nj.dual_matrix(_tanh_index, t, xs, ys, num_nodes=16))[0])(
        th
    )
    streamed = jax.grad(lambda t: nj.streaming_leverage_scores(_tanh_index, t, xs, ys, num_nodes=16)[0])(th)
    np.testing.assert_allclose(streamed, dense, rtol=1e-10, atol=1e-14)


def test_traced_sample_weights_use_the_normalised_vector():
    probs = jnp.array([0.8, 1.2])  # sums to 2: choice draws from [0.4, 0.6]
    idx, w = jax.jit(lambda k, p: nj.sample(k, p, 4))(jax.random.key(0), probs)
    np.testing.assert_allclose(w, 2.0 / (4 * np.asarray(probs)[np.asarray(idx)]), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# 6. The command line

TINY = ["run", "--dataset", "synthetic", "--n", "120", "--d", "3", "--repeats", "2", "--steps", "20"]
TINY += ["--methods", "uniform,linear_leverage", "--timing-size", "none", "--no-plots", "--no-progress"]


@pytest.mark.parametrize("command", ["run", "outliers", "active"])
def test_unknown_options_are_usage_errors(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--flip-fration", "0.3"])
    assert info.value.code == 2 and "unrecognized arguments: --flip-fration" in capsys.readouterr().err


def test_out_checked_before_any_work(tmp_path, monkeypatch, capsys):
    from nlis_jax import experiments

    monkeypatch.setattr(experiments, "make_problem", lambda *a: pytest.fail("work started"))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out in (afile, afile / "sub"):
        with pytest.raises(SystemExit) as info:
            cli.main([*TINY, "--sizes", "10", "--out", str(out)])
        assert info.value.code == 2 and "not a folder" in capsys.readouterr().err
    assert afile.read_text() == "keep"


def test_earlier_results_are_never_overwritten(tmp_path):
    out = tmp_path / "res"
    assert cli.prepare_out(str(out), False) == out  # fresh: used as is (not created yet)
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert cli.prepare_out(str(out), False) == out / "run-1"
    (out / "run-1").mkdir()
    assert cli.prepare_out(str(out), False) == out / "run-2"
    assert cli.prepare_out(str(out), True) == out


def test_an_empty_out_and_a_list_of_rows_are_named():
    """``--out ''`` wrote into ``./run-N`` of the working folder; ``shard_rows([1.0, 2.0])`` said "got shape
    ()" (a list is a pytree of scalars). Twenty-ninth session."""
    from nlis_jax import distributed

    with pytest.raises(ValueError, match="--out is empty: name the output folder"):
        cli.prepare_out("", False)
    with pytest.raises(ValueError, match=r"a Python list is a pytree of its items: pass np\.asarray"):
        distributed.shard_rows([1.0, 2.0])
    rows = np.arange(4.0 * jax.local_device_count())  # rows split evenly over the devices
    np.testing.assert_array_equal(distributed.shard_rows(rows), rows)


def test_sizes_above_n_is_a_usage_error(tmp_path, capsys):
    assert cli.main([*TINY, "--sizes", "500", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "more than n = 120" in err and "Traceback" not in err


def test_corrupt_cache_names_the_file_exit_2(tmp_path, capsys):
    pytest.importorskip("sklearn")
    (tmp_path / "cal_housing_py3.pkz").write_bytes(b"\x78\x9c" + b"\x00" * 300)  # not a valid cache
    code = cli.main(["run", "--data-home", str(tmp_path), "--no-download", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "cal_housing_py3.pkz" in err and "truncated or corrupt" in err and "rm " in err


def test_ctrl_c_writes_finished_cells_exit_130(tmp_path, monkeypatch, capsys):
    from nlis_jax.experiments import runner

    real, calls = runner._draw_and_fit, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_draw_and_fit", interrupt_second)
    out = tmp_path / "o"
    assert cli.main([*TINY, "--sizes", "10,20", "--out", str(out)]) == 130
    summary = json.loads((out / "results.json").read_text())
    assert summary["partial"] is True
    assert [len(summary["methods"][m]["results"]) for m in ("uniform", "linear_leverage")] == [1, 0]
    assert "interrupted" in capsys.readouterr().err


def test_ctrl_c_before_the_grid_exit_130(tmp_path, monkeypatch, capsys):
    from nlis_jax import experiments

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "make_problem", interrupt)
    assert cli.main([*TINY, "--sizes", "10", "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "nlis-jax run: interrupted." in err and "Traceback" not in err


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_outliers_writes_finished_stages_exit_130(tmp_path, monkeypatch, capsys):
    # Ctrl-C while scoring (after the data and the fit): results.json holds those two stages, "partial".
    # Synthetic data and a stand-in fit keep the test to the command line's plumbing.
    from collections import namedtuple

    from nlis_jax.experiments.outliers import study

    rng = np.random.default_rng(0)
    data = (rng.normal(size=(40, 6)), np.arange(40) % 2)
    real_prepare = study._prepare
    fit = namedtuple("Fit", "params final_loss")(None, jnp.asarray(8.0))
    monkeypatch.setattr(study, "_prepare", lambda key, config, *_: real_prepare(key, config, data, None))
    monkeypatch.setattr(study, "_fit", lambda *args: fit)
    monkeypatch.setattr(study, "outlier_scores", _interrupt)
    out = tmp_path / "o"
    argv = ["outliers", "--n", "40", "--pca", "none", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 130
    result = json.loads((out / "results.json").read_text())
    assert result["partial"] is True and result["stages_done"] == ["data", "fit"]
    assert result["n"] == 40 and result["final_mean_loss"] == 8.0 / 40 and "metrics" not in result
    err = capsys.readouterr().err
    assert "nlis-jax outliers: interrupted" in err and "Traceback" not in err


def test_ctrl_c_active_writes_finished_repeats_exit_130(tmp_path, monkeypatch, capsys):
    # The second repeat is interrupted: the first strategy's finished repeat is written, "partial".
    pytest.importorskip("sklearn")
    from nlis_jax.experiments import active

    calls = []

    def one_repeat(keys, strategy, problem, config, loss_star):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.full(len(config.budgets), 1.5)

    monkeypatch.setattr(active, "fit_star", lambda problem, config, params0: (params0, 2.0))
    monkeypatch.setattr(active, "_run_repeat", one_repeat)
    out = tmp_path / "o"
    assert cli.main(["active", "--small", "--strategies", "uniform,egl", "--out", str(out)]) == 130
    result = json.loads((out / "results.json").read_text())
    assert result["partial"] is True and list(result["strategies"]) == ["uniform"]
    assert result["strategies"]["uniform"]["repeats_done"] == 1
    assert result["strategies"]["uniform"]["median"] == [1.5] * 3 and result["settings"]["loss_star"] == 2.0
    err = capsys.readouterr().err
    assert "nlis-jax active: interrupted" in err and "Traceback" not in err


def test_adaptive_rule_with_a_gradient_undefined_only_at_theta_zero_and_float_leaves():
    """∇‖θ‖ is NaN at θ = 0 only: the refinement panels' end samples (weight 0) put 0·NaN into the
    integral, so the adaptive rule raised "the adjoint is NaN or Inf" on an exact, smooth integrand
    (∫₀¹ 30 sech²(30t) dt · θ/‖θ‖ · x = tanh(30) θ/‖θ‖ x). A Python-float leaf of params made the
    adaptive rule fail ('float' object has no attribute 'dtype')."""
    f = lambda t, x: jnp.tanh(30 * jnp.linalg.norm(t)) * x[0]  # noqa: E731
    theta, xs = jnp.array([0.6, 0.8]), jnp.array([[1.0], [2.0]])
    adj, info = nj.adjoint(f, theta, xs, return_info=True)
    ref = np.tanh(30.0) * np.outer([1.0, 2.0], [0.6, 0.8])
    assert bool(np.all(info.converged))
    np.testing.assert_allclose(adj, ref, rtol=1e-11)
    params = {"w": jnp.array([0.3, -0.2]), "b": 0.5}
    g = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])  # noqa: E731
    X = jnp.asarray(_matrix(4, 2, np.float64))
    np.testing.assert_allclose(
        nj.dual_matrix(g, params, X)[:, :-1], nj.adjoint(g, params, X, num_nodes=16), rtol=1e-9
    )


def test_fixed_rule_refuses_a_model_not_finite_at_zero_and_max_panels_below_three():
    """log(x·θ) is -inf at θ = 0, so its adjoint diverges: the fixed rule's interior nodes returned finite
    numbers that moved with the node count (3.62 with 8 nodes, 6.33 with 64). max_panels = 1 was exceeded
    (3 panels: the first bisection always runs)."""
    f = lambda t, x: jnp.log(x @ t)  # noqa: E731
    theta, xs = jnp.array([0.5, 0.5]), jnp.array([[1.0, 2.0], [0.5, 1.0]])
    with pytest.raises(ValueError, match="adjoint is NaN or Inf for 2 of 2"):
        nj.adjoint(f, theta, xs, num_nodes=8)
    with pytest.raises(ValueError, match="max_panels must be at least 3"):
        nj.adjoint(lambda t, x: jnp.tanh(x @ t), theta, xs, max_panels=1)


def test_routes_review_fixes():
    """One row holding a NaN was 'the dual matrix is all zeros'; a fast route forced on fewer rows than
    columns (rank-deficient) ran 'stable' silently, while streaming refused it; a traced rtol outside
    (0, 1) was unchecked under traced_checks (NaN probabilities, reported as all zeros)."""
    from jax.experimental import checkify

    with pytest.raises(ValueError, match="F contains 1 NaN or Inf"):
        nj.leverage_scores(np.array([[1.0, np.nan, 2.0]], np.float32))
    with pytest.raises(ValueError, match='route="gram" was forced on a matrix that is rank-deficient'):
        nj.leverage_scores(_matrix(4, 8, np.float64), route="gram")

    def scores(F, rtol):
        with nj.traced_checks():
            return nj.leverage_scores(F, rtol=rtol)

    err, _ = jax.jit(checkify.checkify(scores, errors=checkify.user_checks))(_matrix(6, 2, np.float64), 2.0)
    assert "rtol must lie in (0, 1)" in err.get()


def test_dual_operator_products_that_overflow_are_named():
    """mv gave [inf, 4.5] silently where dual_matrix raises."""
    sq = lambda t, x: (x @ t) ** 2  # noqa: E731
    op = nj.dual_operator(sq, jnp.array([0.5, 0.5]), jnp.array([[1e200, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="dual_operator.mv: the product is NaN or Inf"):
        op.mv(jnp.ones(3))
    with pytest.raises(ValueError, match="dual_operator.rmv: the product is NaN or Inf"):
        op.rmv(jnp.ones(2))


def test_closed_form_adjoints_that_are_not_finite_are_named():
    """log at z = <θ, x> ≠ 0 but log(0) = -inf in the quotient (ϕ(z) − ϕ(0))/z: [[inf inf] ...] silently."""
    with pytest.raises(ValueError, match="adjoint is NaN or Inf for 2 of 2"):
        nj.single_index_adjoint(jnp.log, jnp.array([0.5, 0.5]), jnp.array([[1.0, 2.0], [0.5, 1.0]]))
    with pytest.raises(ValueError, match="adjoint is NaN or Inf for 1 of 1"):
        nj.homogeneous_adjoint(
            lambda p, x: x @ p, jnp.array([1.0, 1.0]), jnp.ones((1, 2)), degree=1.0, g=jnp.log
        )


@pytest.mark.parametrize(("dtype", "exponent"), [(np.float32, 120), (np.float32, 125), (np.float64, 1020)])
def test_adaptive_rule_on_gradients_near_the_largest_float(dtype, exponent):
    """A linear model whose inputs reach 2^125 (float32): the adjoint is exact, but the error estimate's
    Legendre coefficients overflowed, so every example ran to the panel budget and warned "worst
    estimated relative error inf". (From 2^126 on the probes' projections of the gradient themselves
    overflow: not covered.)"""
    xs = np.random.default_rng(0).normal(size=(6, 3)).astype(dtype)
    xs[:, 1] *= dtype(2.0**exponent) / np.abs(xs[:, 1]).max()
    with warnings.catch_warnings():
        warnings.simplefilter("error", nj.QuadratureWarning)
        adj, info = nj.adjoint(_linear, np.zeros(3, dtype), xs, return_info=True)
    assert np.all(info.error == 0) or np.all(np.isfinite(info.error))
    assert int(np.max(info.panels)) == 1  # the first panel is exact: no refinement
    np.testing.assert_allclose(np.asarray(adj).reshape(xs.shape), xs, rtol=8 * np.finfo(dtype).eps)


@pytest.mark.parametrize(("dtype", "j"), [(np.float32, -70), (np.float64, -520)])
def test_a_subnormal_ridge_is_scaled_with_f_not_flushed(dtype, j):
    """Ridge leverage of (cF, c²λ) equals that of (F, λ). With F's entries normal but c²λ below the
    dtype's smallest normal number, the ridge was cast first and flushed to 0 on the CPU: plain leverage
    (effective dimension 5.0 for 4.91) with no word (thirty-fifth session). c = 2^j keeps both exact."""
    F = _matrix(40, 5, np.float64)
    ridge = float(np.sum(F * F) / 100)
    ref = nj.leverage_scores(jnp.asarray(F, dtype), ridge=ridge, return_info=True)
    small_ridge = float(np.ldexp(ridge, 2 * j))
    assert 0 < small_ridge < np.finfo(dtype).smallest_normal
    got = nj.leverage_scores(jnp.asarray(np.ldexp(F, j), dtype), ridge=small_ridge, return_info=True)
    np.testing.assert_allclose(np.asarray(got.probs), np.asarray(ref.probs), rtol=RTOL[dtype])
    np.testing.assert_allclose(float(got.rank), float(ref.rank), rtol=RTOL[dtype])
    assert float(ref.rank) < 4.99  # the ridge matters: plain leverage would give 5
