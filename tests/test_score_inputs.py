"""Bad input to the scores, closed forms, quadrature and projections: a clear error that names the problem,
and the valid neighbouring input still right (findings of an input audit, 2026-12-02)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import nlis_jax as nj

RNG = np.random.default_rng(0)
F = RNG.standard_normal((20, 4))


def _reference_leverage(A):
    """Leverage of the rows of a full-column-rank ``A`` from numpy's SVD."""
    U = np.linalg.svd(A, full_matrices=False)[0]
    return np.sum(U**2, axis=1)


@pytest.mark.parametrize("flag", ["yes", None, 1])
def test_return_info_must_be_a_bool(flag):
    with pytest.raises(TypeError, match="return_info must be True or False"):
        nj.leverage_scores(F, return_info=flag)
    f = lambda p, x: jnp.tanh(x @ p)  # noqa: E731
    with pytest.raises(TypeError, match="return_info must be True or False"):
        nj.streaming_leverage_scores(f, np.ones(4), F, num_nodes=4, return_info=flag)
    with pytest.raises(TypeError, match="return_info must be True or False"):
        nj.projected_leverage_scores(jax.random.key(0), f, np.ones(4), F, dim=4, return_info=flag)


def test_numpy_bool_return_info_works():
    info = nj.leverage_scores(F, return_info=np.bool_(True))
    np.testing.assert_allclose(info.leverage, _reference_leverage(F), rtol=1e-10)


@pytest.mark.parametrize("bad", ["0.1", True, np.array([1e-6, 1e-7])])
def test_rtol_and_ridge_must_be_real_numbers(bad):
    with pytest.raises(TypeError, match="rtol must be a real number"):
        nj.leverage_scores(F, rtol=bad)
    with pytest.raises(TypeError, match="ridge must be a real number"):
        nj.leverage_scores(F, ridge=bad)


def test_numpy_scalar_rtol_works():
    probs = nj.leverage_scores(F, rtol=np.float32(1e-6))
    np.testing.assert_allclose(probs, _reference_leverage(F) / 4, rtol=1e-10)


def test_projected_scores_need_a_key():
    f = lambda p, x: jnp.tanh(x @ p)  # noqa: E731
    with pytest.raises(TypeError, match=r"key must be a PRNG key, e.g. jax.random.key\(0\)"):
        nj.projected_leverage_scores(0, f, np.ones(4), F, dim=4)
    with pytest.raises(TypeError, match="ridge must be a real number"):
        nj.projected_leverage_scores(jax.random.key(0), f, np.ones(4), F, dim=4, ridge="0")


def test_old_style_keys_still_work():
    f = lambda p, x: jnp.tanh(x @ p)  # noqa: E731
    new = nj.projected_leverage_scores(jax.random.key(0), f, np.ones(4), F, dim=5, embedding="sparse")
    old = nj.projected_leverage_scores(jax.random.PRNGKey(0), f, np.ones(4), F, dim=5, embedding="sparse")
    exact = nj.leverage_scores(nj.dual_matrix(f, np.ones(4), F, num_nodes=16))
    np.testing.assert_allclose(new, exact, rtol=1e-8)  # sparse embedding, dim = p + 1: exact
    np.testing.assert_allclose(old, exact, rtol=1e-8)


@pytest.mark.parametrize("dtype", [jnp.int32, bool, np.int64])
def test_uniform_scores_and_quadrature_need_a_floating_dtype(dtype):
    with pytest.raises(TypeError, match="uniform_scores: dtype must be a floating dtype"):
        nj.uniform_scores(5, dtype)
    with pytest.raises(TypeError, match="gauss_legendre: dtype must be a floating dtype"):
        nj.quadrature.gauss_legendre(3, dtype)


def test_uniform_scores_and_quadrature_in_float32():
    np.testing.assert_array_equal(nj.uniform_scores(4, jnp.float32), np.full(4, 0.25, np.float32))
    t, w = nj.quadrature.gauss_legendre(3, jnp.float32)
    x, v = np.polynomial.legendre.leggauss(3)
    np.testing.assert_allclose(t, (x + 1) / 2, rtol=1e-7)
    np.testing.assert_allclose(w, v / 2, rtol=1e-7)


def test_linear_scores_name_xs_and_ys():
    with pytest.raises(TypeError, match="xs must hold floating-point arrays"):
        nj.linear_leverage_scores(np.ones((5, 3), int))
    with pytest.raises(ValueError, match="xs has no examples"):
        nj.linear_leverage_scores(np.ones((0, 3)), np.ones(0))
    xs = F.copy()
    xs[0, 0] = np.nan
    with pytest.raises(ValueError, match="xs contains 1 NaN"):
        nj.linear_norm_scores(xs)
    with pytest.raises(ValueError, match="ys contains 1 NaN"):
        nj.linear_leverage_scores(F, np.r_[np.nan, np.ones(19)])


def test_finite_ys_beyond_float32_are_reported_as_such():
    xs = F.astype(np.float32)
    with pytest.raises(ValueError, match=r"ys cast to xs's dtype float32 \(finite ys beyond"):
        nj.linear_leverage_scores(xs, np.full(20, 1e300))
    ys = RNG.standard_normal(20)
    design = np.concatenate([xs.astype(np.float64), -ys.astype(np.float32)[:, None]], axis=1)
    got = nj.linear_leverage_scores(xs, ys)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_leverage(design) / 5, rtol=1e-4)


def test_mix_with_uniform_alpha_must_be_a_real_number():
    p = nj.uniform_scores(4)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        nj.mix_with_uniform(p, "a")
    with pytest.raises(TypeError, match="alpha must be a real number"):
        nj.mix_with_uniform(p, np.array([0.1, 0.2]))
    q = np.array([0.7, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(nj.mix_with_uniform(q, np.float32(0.5)), 0.5 * q + 0.125, rtol=1e-7)


def test_subnormal_matrices_are_explained():
    with pytest.raises(ValueError, match="subnormal"):
        nj.norm_scores(F * 1e-310)
    with pytest.raises(ValueError, match="subnormal"):
        nj.leverage_scores(F * 1e-310)
    # the smallest normal scale works, and leverage is scale-free
    np.testing.assert_allclose(nj.leverage_scores(F * 1e-300), _reference_leverage(F) / 4, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(zeta=float("nan")), "finite zeta >= 0"),
        (dict(zeta=-1.0), "finite zeta >= 0"),
        (dict(c2=float("inf")), "finite 0 < c1 <= c2"),
        (dict(c1=3.0), "finite 0 < c1 <= c2"),
    ],
)
def test_bounded_swish_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nj.bounded_swish(1.0, **kwargs)


def test_bounded_swish_numpy_parameters_and_its_bounds():
    t = np.linspace(-5, 5, 101)
    t = t[t != 0]
    phi = np.asarray(nj.bounded_swish(t, c1=np.float32(1.0), c2=np.float64(4.0), zeta=np.float32(2.0)))
    ratio = (phi / t) ** 2
    assert ratio.min() >= 1 - 1e-12 and ratio.max() <= 4 + 1e-12
    sigma = 1 / (1 + np.exp(-2 * t))
    np.testing.assert_allclose(phi, t * (1 + sigma), rtol=1e-12)


def test_closed_form_adjoints_refuse_bad_degree_and_empty_data():
    h = lambda p, x: x @ p  # noqa: E731
    for degree in (np.inf, float("nan"), 0.0, "1"):
        with pytest.raises((ValueError, TypeError), match="degree must be"):
            nj.homogeneous_adjoint(h, jnp.ones(3), jnp.ones((4, 3)), degree=degree)
    with pytest.raises(ValueError, match="xs has no examples"):
        nj.single_index_adjoint(jnp.tanh, jnp.ones(3), jnp.ones((0, 3)))
    xs = RNG.standard_normal((6, 3))
    np.testing.assert_allclose(nj.homogeneous_adjoint(h, jnp.ones(3), xs, degree=np.float32(1.0)), xs)


def test_projections_refuse_integer_params_and_non_numbers():
    with pytest.raises(TypeError, match="parameters of a projection must hold floating-point"):
        nj.l2_ball(1.0)({"w": np.array([3, 4])})
    with pytest.raises(TypeError, match="parameters of a projection must hold floating-point"):
        nj.box(-0.5, 0.5)({"w": np.array([3, 4])})
    for bad in ("1", True):
        with pytest.raises(TypeError, match="radius must be a real number"):
            nj.l2_ball(bad)
    np.testing.assert_allclose(nj.l2_ball(np.float32(1.0))({"w": np.array([3.0, 4.0])})["w"], [0.6, 0.8])


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("projection", [nj.l2_ball(1.0), nj.box(-1.0, 1.0)], ids=["l2_ball", "box"])
def test_projections_refuse_non_finite_params(projection, bad):
    """l2_ball turned an Inf into NaN ([inf, 4] → [nan, 0]) and left a NaN's partner outside the ball
    ([nan, 4] → [nan, 4]); box passed NaN through: a NaN the caller did not see. Concrete values raise
    now; traced ones raise inside traced_checks() and pass the values through unchanged outside it."""
    params = {"w": np.array([bad, 4.0]), "b": np.asarray(0.5)}
    with pytest.raises(ValueError, match=r"the projection's input contains 1 NaN or Inf value\(s\)"):
        projection(params)
    good = {"w": np.array([0.3, 4.0]), "b": np.asarray(0.5)}
    expected = projection(good)

    def project(tree):
        with nj.traced_checks():
            return projection(tree)

    checked = jax.jit(checkify.checkify(project, errors=checkify.user_checks))
    err, out = checked(good)
    assert err.get() is None
    np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-12)
    assert "the projection's input contains NaN or Inf" in checked(params)[0].get()
    assert np.isfinite(np.asarray(jax.jit(projection)(good)["w"])).all()


def test_box_bounds_that_do_not_broadcast_are_named():
    params = {"w": np.zeros(3), "b": np.zeros(())}
    with pytest.raises(ValueError, match=r"lower\['w'\] has shape \(5,\), which does not broadcast"):
        nj.box({"w": -np.ones(5), "b": -1.0}, 1.0)(params)
    out = nj.box({"w": -np.ones(3), "b": -1.0}, 1.0)({"w": np.array([5.0, -5.0, 0.5]), "b": np.asarray(-3.0)})
    np.testing.assert_array_equal(out["w"], [1.0, -1.0, 0.5])
    assert float(out["b"]) == -1.0


def test_bounded_swish_with_traced_bounds():
    """A traced c1/c2 (under a user's jit, or c2 a leaf of params under nj.adjoint) was "bounded_swish
    needs real numbers, finite 0 < c1 <= c2" although they were, or the library's advice about the layout
    of xs. Now computed: under jit equal to the eager value; as a parameter, the (adaptive) adjoint
    satisfies ⟨f*, θ⟩ + f(0) = f(θ) and its c2 entry is ∫_0^1 ∂f/∂c2(tθ) dt of the closed form;
    out-of-order bounds are a checkify error inside nj.traced_checks()."""
    t = jnp.linspace(-2.0, 2.0, 9)
    jitted = jax.jit(lambda c1, c2: nj.bounded_swish(t, c1, c2))(0.5, 3.0)
    np.testing.assert_allclose(jitted, nj.bounded_swish(t, 0.5, 3.0), rtol=1e-14)
    xs = np.random.default_rng(0).normal(size=(10, 3))
    params = {"w": np.full(3, 0.2), "c2": np.asarray(2.0)}

    def model(p, x):
        return nj.bounded_swish(x @ p["w"], 1.0, p["c2"])

    adj = np.asarray(nj.adjoint(model, params, xs))  # (n, p): ravel_pytree order, c2 then w
    assert adj.shape == (10, 4)
    f = np.asarray(jax.vmap(lambda x: model(params, x))(xs))
    identity = adj[:, 1:] @ params["w"] + adj[:, 0] * 2.0  # f(0) = 0
    np.testing.assert_allclose(identity, f, rtol=1e-10)
    # ∂f/∂c2 at tθ = u·σ(u)/(2√(t·c2)), u = t⟨w, x⟩; with t = s² the integrand is smooth: 64 nodes
    nodes, weights = np.polynomial.legendre.leggauss(64)
    s_, ws = (nodes + 1) / 2, weights / 2
    u = (s_**2)[None, :] * (xs @ params["w"])[:, None]
    want = np.sum(ws * 2 * s_ * u / (1 + np.exp(-u)) / (2 * s_ * np.sqrt(2.0)), axis=1)
    np.testing.assert_allclose(adj[:, 0], want, rtol=1e-10)
    checked = jax.jit(checkify.checkify(lambda c2: nj.bounded_swish(t, 1.0, c2), errors=checkify.user_checks))
    with nj.traced_checks():
        err, _ = checked(0.5)
    assert "finite 0 < c1 <= c2" in str(err.get())
