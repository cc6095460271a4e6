"""Tests of the projected-gradient trainer (nlis_jax._train) and nlis_jax.projections.

References are independent of the code under test: numpy/scipy closed forms and solvers (ridge path
+ root finding, ``scipy.optimize.lsq_linear``, SLSQP, ``logsumexp``), exact integer arithmetic, and
KKT conditions. Sizes are tiny (n = 40, p <= 6; one float16 case n = 2000); objects that fix the
compiled function (model, optimizer, loss) are built once at module level so the tests share compiled code.
"""

import copy
import functools
import math
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from scipy import optimize, special

import nlis_jax as nj
from nlis_jax._train import (
    LOSSES,
    FitResult,
    TrainState,
    fit,
    make_train_step,
    weighted_loss,
)
from nlis_jax.projections import (
    Box,
    L2Ball,
    box,
    identity,
    l2_ball,
    project_params,
    projection_l2_ball,
)

N, D = 40, 5


def linear(params, x):
    return x @ params["w"]


def _matmul(params, x):  # params a bare array
    return x @ params


SGD = dict(optimizer=optax.sgd(0.1), num_steps=2)


def single_index(params, x):
    return jnp.tanh(x @ params["w"])


def affine(params, x):  # a two-leaf pytree
    return x @ params["w"] + params["b"]


def softmax_model(params, x):  # k = 3 logits
    return params["W"] @ x + params["b"]


def logit_model(params, x):
    return x @ params["w"] + params["b"]


ADAM = optax.adam(0.05)
SGD_FAST = optax.sgd(0.3)


def norm(tree):
    squares = [np.sum(np.asarray(l, np.float64) ** 2) for l in jax.tree.leaves(tree)]
    return float(np.sqrt(sum(squares)))


@pytest.fixture(scope="module")
def ls_data():
    """Linear least squares with a constraint that is active: R = half the unconstrained norm."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D))
    theta_true = np.array([1.0, -2.0, 0.5, 1.5, -1.0])
    y = X @ theta_true + 0.1 * rng.normal(size=N)
    theta_ls = np.linalg.lstsq(X, y, rcond=None)[0]
    R = 0.5 * np.linalg.norm(theta_ls)
    return X, y, R


def constrained_ls_reference(X, y, R):
    r"""argmin ||X t - y||^2 s.t. ||t|| <= R (active).

    t(lam) = (X'X + lam I)^-1 X'y with lam > 0 found by root finding so that ||t(lam)|| = R.
    """
    G, b = X.T @ X, X.T @ y
    theta = lambda lam: np.linalg.solve(G + lam * np.eye(G.shape[0]), b)
    assert np.linalg.norm(theta(0.0)) > R  # the constraint is active
    hi = 1.0
    while np.linalg.norm(theta(hi)) > R:
        hi *= 2.0
    lam = optimize.brentq(lambda l: np.linalg.norm(theta(l)) - R, 0.0, hi, xtol=1e-14, rtol=1e-15)
    t = theta(lam)
    return t, float(np.sum((X @ t - y) ** 2)), lam


# ---------------------------------------------------------------------------------------------
# projections


def test_projection_builders_basic():
    tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}
    out = l2_ball(1.0)(tree)
    np.testing.assert_allclose(norm(out), 1.0, rtol=1e-15)
    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-15)
    inside = {"a": jnp.array([0.3, -0.1]), "b": jnp.array(0.2)}
    chex.assert_trees_all_equal(l2_ball(1.0)(inside), inside)  # interior points are fixed exactly
    # Same as optax's own function; equal builders compare equal (hashable, cache-friendly).
    chex.assert_trees_all_close(out, projection_l2_ball(tree, scale=1.0), rtol=1e-15)
    assert l2_ball(1.0) == l2_ball(1.0) and hash(l2_ball(2)) == hash(l2_ball(2.0))
    assert identity(tree) is tree
    clipped = box(-1.0, 1.0)({"a": jnp.array([-3.0, 0.5]), "b": jnp.array(2.0)})
    np.testing.assert_array_equal(clipped["a"], [-1.0, 0.5])
    assert float(clipped["b"]) == 1.0


def test_projections_keep_dtypes():
    tree = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones((), jnp.float64) * 5}
    for proj in (l2_ball(1.0), box(-0.5, 0.5), box({"a": -jnp.ones(3), "b": 0.0}, 1.0)):
        out = proj(tree)
        assert out["a"].dtype == jnp.float32 and out["b"].dtype == jnp.float64


def test_projection_builders_reject_bad_input():
    with pytest.raises(ValueError, match="positive"):
        l2_ball(0.0)
    with pytest.raises(ValueError, match="finite"):
        l2_ball(float("nan"))
    with pytest.raises(ValueError, match="lower must be <= upper"):
        box(1.0, -1.0)
    with pytest.raises(ValueError, match="NaN"):
        box(float("nan"), 1.0)
    with pytest.raises(ValueError, match="needs params"):
        project_params(l2_ball(1.0)).update({"w": jnp.ones(2)}, optax.EmptyState())


def test_box_rounds_its_bounds_inwards_to_the_parameters_dtype():
    """A box's bounds rounded to nearest could leave the box: ``lower = 1e-8`` is 0 in float16 (0 came
    back), ``upper = 1e5`` is Inf, and ``7e4 ≤ θ ≤ 8e4`` holds no float16 number (Inf came back, and
    ``fit`` blamed the model). Now every result lies in the box (compared in float64) or the call
    raises; bounds a dtype holds exactly clip to themselves, concrete or traced."""
    x16 = jnp.asarray([-1.5, 0.5, 2.0, 6e4], jnp.float16)
    for lo, hi in ((1e-8, 1.0), (-1e5, 1e5), (-0.1, 0.1), (0.3, 0.31)):
        for proj in (box(lo, hi), jax.jit(lambda t, lo=lo, hi=hi: Box(lo, hi)(t))):
            for x in (x16, x16.astype(jnp.float32), x16.astype(jnp.bfloat16)):
                out = np.asarray(proj(x)).astype(np.float64)
                assert np.all((lo <= out) & (out <= hi)) and proj(x).dtype == x.dtype
                # the nearest point of the box the dtype holds: one step outwards leaves the box
                step_out = np.nextafter(np.asarray(proj(x)), np.asarray(np.inf, x.dtype)).astype(np.float64)
                assert np.all(step_out[np.asarray(x).astype(np.float64) > hi] > hi)
    traced = jax.jit(lambda t, lo, hi: Box(lo, hi)(t))(x16, jnp.float32(1e-8), jnp.float32(1.0))
    assert float(jnp.min(traced)) >= 1e-8
    np.testing.assert_array_equal(box(-1.0, 0.5)(x16), [-1.0, 0.5, 0.5, 0.5])  # exact bounds: unchanged
    with pytest.raises(ValueError, match="no float16 number lies between lower and upper"):
        box(7e4, 8e4)(x16)
    np.testing.assert_array_equal(box(7e4, 8e4)(x16.astype(jnp.float32)), [7e4, 7e4, 7e4, 7e4])


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"),
    [
        (jnp.float32, 1e-39, 1.0),
        (jnp.float32, 1e-45, 1.0),
        (jnp.bfloat16, 1e-39, 1.0),
        (jnp.float64, 1e-310, 1.0),
        (jnp.float32, -1.0, -1e-39),
    ],
)
def test_box_with_a_subnormal_bound_stays_in_the_box(dtype, lo, hi):
    """A bound below the dtype's smallest normal number became 0 in a CPU's clip (it flushes subnormal
    numbers): box(1e-39, 1) returned 0 for float32 zeros, outside the box, and so did fit with it
    (thirty-fifth session). The bound now clips to ±tiny, concrete or traced; float16, clipped in
    float32 where its subnormal numbers are normal, keeps the nearest point."""
    x = jnp.asarray([0.0, -2.0, 2.0, 0.5], dtype)
    traced = jax.jit(lambda t, lo, hi: Box(lo, hi)(t))
    for out in (box(lo, hi)(x), traced(x, jnp.asarray(lo, dtype), jnp.asarray(hi, dtype))):
        got = np.asarray(out).astype(np.float64)
        assert np.all((lo <= got) & (got <= hi)) and out.dtype == x.dtype, got
    tiny = float(jnp.finfo(dtype).smallest_normal)
    np.testing.assert_array_equal(np.asarray(box(lo, hi)(x)).astype(np.float64)[0], tiny if lo > 0 else -tiny)
    half = np.asarray(box(1e-6, 1.0)(jnp.zeros(2, jnp.float16))).astype(np.float64)
    assert np.all((1e-6 <= half) & (half < 1.1e-6))  # float16: 1e-6 is subnormal, and kept


def test_fit_stays_in_a_box_with_a_subnormal_lower_bound():
    X, y = np.ones((4, 2), np.float32), -np.ones(4, np.float32)  # pulls w below the lower bound
    res = nj.fit(_matmul, jnp.zeros(2, jnp.float32), X, y, optimizer=optax.sgd(0.1), num_steps=5,
                 projection=box(1e-39, 1.0))  # fmt: skip
    assert np.all(np.asarray(res.params).astype(np.float64) >= 1e-39)


def test_cross_entropy_refuses_one_logit():
    """One logit per example made the cross-entropy 0 whatever the parameters (fit ran and changed
    nothing); it is refused with the message a scalar output gets."""
    X = np.random.default_rng(0).normal(size=(30, 3))
    labels = np.zeros(30, int)
    with pytest.raises(ValueError, match="k >= 2"):
        nj.fit(_matmul, np.ones((3, 1)), X, labels, **SGD, loss="cross_entropy")
    with pytest.raises(ValueError, match="k >= 2"):
        nj.weighted_loss(_matmul, np.ones((3, 1)), X, labels, loss="cross_entropy")
    two = nj.weighted_loss(_matmul, np.ones((3, 2)), X, labels, loss="cross_entropy")
    np.testing.assert_allclose(two, 30 * np.log(2.0), rtol=1e-12)  # equal logits: log k each


def test_fit_names_a_projection_builder_passed_unbuilt():
    X, y = np.random.default_rng(0).normal(size=(30, 3)), np.zeros(30)
    with pytest.raises(TypeError, match=r"pass a built one, e\.g\. projection=nj\.l2_ball\(1\.0\)"):
        nj.fit(_matmul, np.zeros(3), X, y, **SGD, projection=nj.l2_ball)
    fitted = nj.fit(_matmul, np.zeros(3), X, y, **SGD, projection=nj.l2_ball(1.0))
    np.testing.assert_array_equal(fitted.params, np.zeros(3))  # y = 0: the gradient at 0 is 0


def test_make_train_step_and_project_params_refuse_a_builder_and_non_bool_flags():
    """make_train_step(loss, opt, nj.l2_ball) was accepted: with scalar params the jitted step returned an
    L2Ball as the new params (no error), with vector params it failed with "radius must be a scalar"; the
    builders are now refused at construction, as fit refuses them, and so are has_aux / value_and_grad
    that are not bools (has_aux="no" counted as True)."""
    loss_fn = lambda p, b: jnp.sum((b * p - 1.0) ** 2)
    match = r"projection is the builder (l2_ball|box), not a projection: pass a built one"
    for builder in (nj.l2_ball, nj.box):
        with pytest.raises(TypeError, match=match):
            make_train_step(loss_fn, optax.sgd(0.1), builder)
        with pytest.raises(TypeError, match=match):
            project_params(builder)
    with pytest.raises(TypeError, match=r"has_aux must be True or False, got 'no'"):
        make_train_step(loss_fn, optax.sgd(0.1), has_aux="no")
    with pytest.raises(TypeError, match=r"value_and_grad must be True or False, got 1"):
        make_train_step(loss_fn, optax.sgd(0.1), value_and_grad=1)
    step = jax.jit(make_train_step(loss_fn, optax.sgd(0.1), nj.l2_ball(0.6)))
    new, loss = step(TrainState(jnp.asarray(0.5), optax.sgd(0.1).init(jnp.asarray(0.5))), jnp.arange(3.0))
    # gradient 2·Σ b(bp − 1) = 2·(0 − 0.5 + 0) = −1: 0.5 + 0.1 = 0.6, on the edge of the ball
    np.testing.assert_allclose(new.params, 0.6, rtol=1e-15)
    np.testing.assert_allclose(loss, 1.0 + 0.25 + 0.0, rtol=1e-15)


def test_the_projection_base_class_says_what_it_lacks():
    with pytest.raises(NotImplementedError, match=r"Projection does not define __call__: .* nj\.l2_ball"):
        nj.projections.Projection()(np.ones(2))  # was a NotImplementedError with no message


def test_projections_are_pytrees():
    leaves, treedef = jax.tree.flatten(l2_ball(2.0))
    assert leaves == [2.0] and jax.tree.unflatten(treedef, [3.0]) == L2Ball(3.0)
    assert isinstance(box(0.0, 1.0), Box)
    # Usable as a traced argument (how fit passes them).
    out = jax.jit(lambda p, t: p(t))(l2_ball(0.5), {"w": jnp.array([3.0, 4.0])})
    np.testing.assert_allclose(norm(out), 0.5, rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# Feasibility and the projected step


def test_iterates_stay_in_l2_ball(ls_data):
    X, y, R = ls_data
    start = {"w": 10.0 * jnp.ones(D)}  # infeasible: fit projects the initial point first
    for num_steps in (1, 2, 5):
        # num_segments = num_steps: one compiled one-step segment serves every num_steps.
        res = fit(
            linear,
            start,
            X,
            y,
            optimizer=SGD_FAST,
            num_steps=num_steps,
            projection=l2_ball(R),
            num_segments=num_steps,
        )
        assert res.losses.shape == (num_steps,)
        assert norm(res.params) <= R + 1e-12
    # A per-step record with make_train_step: every iterate is in the ball.
    proj = l2_ball(R)
    loss_fn = lambda p, batch: jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2)
    step = make_train_step(loss_fn, SGD_FAST, proj)

    def body(state, _):
        state, loss = step(state, (X, y))
        return state, (optax.tree.norm(state.params), loss)

    p0 = proj(start)
    _, (norms, losses) = jax.lax.scan(body, TrainState(p0, SGD_FAST.init(p0)), length=30)
    assert float(jnp.max(norms)) <= R + 1e-12
    assert float(losses[-1]) < float(losses[0])


def test_train_step_takes_a_value_and_grad_function(ls_data):
    """``value_and_grad=True``: a loss-and-gradient function (here summed over two chunks of rows, as the
    studies' padded fits do) drives the same projected step as the loss itself, aux included."""
    X, y, R = ls_data
    proj = l2_ball(R)
    loss_fn = lambda p, batch: jnp.sum((batch[0] @ p["w"] - batch[1]) ** 2)
    grad_fn = jax.value_and_grad(loss_fn)

    def chunked(p, batch):
        half = batch[0].shape[0] // 2
        parts = [grad_fn(p, (batch[0][sl], batch[1][sl])) for sl in (slice(0, half), slice(half, None))]
        return jax.tree.map(jnp.add, *parts)

    plain = jax.jit(make_train_step(loss_fn, SGD_FAST, proj))
    given = jax.jit(make_train_step(chunked, SGD_FAST, proj, value_and_grad=True))
    p0 = proj({"w": jnp.ones(D)})
    a = b = TrainState(p0, SGD_FAST.init(p0))
    for _ in range(5):
        (a, la), (b, lb) = plain(a, (X, y)), given(b, (X, y))
        np.testing.assert_allclose(lb, la, rtol=1e-13)
        np.testing.assert_allclose(b.params["w"], a.params["w"], rtol=1e-12)
    assert norm(b.params) <= R + 1e-12
    with_aux = lambda p, batch: (loss_fn(p, batch), 2.0)
    aux_grad = jax.value_and_grad(with_aux, has_aux=True)
    step = make_train_step(aux_grad, SGD_FAST, has_aux=True, value_and_grad=True)
    _, (loss, aux) = step(TrainState(p0, SGD_FAST.init(p0)), (X, y))
    assert aux == 2.0 and np.isclose(loss, loss_fn(p0, (X, y)), rtol=1e-14)


def test_chain_with_project_params_matches_explicit_projection(ls_data):
    X, y, R = ls_data
    proj = l2_ball(R)
    p0 = {"w": jnp.zeros(D)}  # feasible start, so both variants see the same theta_0
    explicit = fit(linear, p0, X, y, optimizer=ADAM, num_steps=60, projection=proj)
    chained = fit(linear, p0, X, y, optimizer=optax.chain(ADAM, project_params(proj)), num_steps=60)
    # Identical maths; the chain only adds (new - old) + old, a rounding of ~1e-16 per step.
    chex.assert_trees_all_close(chained.params, explicit.params, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chained.losses, explicit.losses, rtol=1e-10)
    assert norm(chained.params) <= R + 1e-12


def test_plain_callable_projection_matches_builder(ls_data):
    X, y, R = ls_data
    # A user's own callable takes the static (closed-over) path; the builder travels as data.
    own = functools.partial(projection_l2_ball, scale=R)
    a = fit(linear, {"w": jnp.ones(D)}, X, y, optimizer=ADAM, num_steps=20, projection=own)
    b = fit(linear, {"w": jnp.ones(D)}, X, y, optimizer=ADAM, num_steps=20, projection=l2_ball(R))
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-13, atol=1e-15)
    assert norm(a.params) <= R + 1e-12


# ---------------------------------------------------------------------------------------------
# Convergence to the constrained optimum, against independent references


def test_constrained_least_squares_matches_ridge_root_finding(ls_data):
    X, y, R = ls_data
    theta_ref, loss_ref, lam = constrained_ls_reference(X, y, R)
    assert lam > 0  # active constraint
    # Projected GD with step 1/L on J = ||X t - y||^2 / n, L = 2 lmax(X'X)/n, contracts the
    # distance to the optimum by (1 - 1/kappa) per step (strongly convex). 400 steps leave < 1e-20
    # of the start, so only rounding (~1e-15) and the reference's root finding (xtol 1e-14)
    # remain: rtol 1e-10.
    eig = np.linalg.eigvalsh(X.T @ X)
    kappa = eig[-1] / eig[0]
    num_steps = 400
    assert (1 - 1 / kappa) ** num_steps < 1e-20
    opt = optax.sgd(N / (2 * eig[-1]))
    res = fit(
        linear,
        {"w": jnp.zeros(D)},
        X,
        y,
        optimizer=opt,
        num_steps=num_steps,
        projection=l2_ball(R),
    )
    atol = 1e-10 * np.linalg.norm(theta_ref)
    np.testing.assert_allclose(res.params["w"], theta_ref, rtol=0, atol=atol)
    full = weighted_loss(linear, res.params, X, y)
    np.testing.assert_allclose(full, loss_ref, rtol=1e-10)
    np.testing.assert_allclose(res.final_loss, full, rtol=1e-14)
    np.testing.assert_allclose(norm(res.params), R, rtol=1e-12)
    # losses[t] is the SUM-form objective before update t; the last one is one step from the end.
    np.testing.assert_allclose(res.losses[-1], loss_ref, rtol=1e-10)
    assert float(res.normalizer) == N
    assert np.all(np.diff(np.asarray(res.losses)) <= 1e-12 * loss_ref)  # monotone for step 1/L


def test_box_constrained_least_squares_matches_lsq_linear(ls_data):
    X, y, _ = ls_data
    lo, hi = -0.5, 0.8
    ref = optimize.lsq_linear(X, y, bounds=(lo, hi), method="bvls", tol=1e-14)
    assert np.any(np.isclose(ref.x, lo)) and np.any(np.isclose(ref.x, hi))  # both bounds active
    eig = np.linalg.eigvalsh(X.T @ X)
    res = fit(
        linear,
        {"w": jnp.zeros(D)},
        X,
        y,
        optimizer=optax.sgd(N / (2 * eig[-1])),
        num_steps=400,
        projection=box(lo, hi),
    )
    w = np.asarray(res.params["w"])
    assert np.all(w >= lo) and np.all(w <= hi)  # a clip: exact
    # Same contraction argument as the l2 case; bvls is an exact active-set solver.
    np.testing.assert_allclose(w, ref.x, atol=1e-10)
    np.testing.assert_allclose(res.final_loss, np.sum((X @ ref.x - y) ** 2), rtol=1e-10)


def test_box_with_pytree_bounds_on_two_leaf_params(ls_data):
    X, y, _ = ls_data
    lower = {"w": jnp.full(D, -0.3), "b": 0.0}
    upper = {"w": jnp.full(D, 0.3), "b": 0.05}
    res = fit(
        affine,
        {"w": jnp.zeros(D), "b": jnp.zeros(())},
        X,
        y + 1.0,
        optimizer=ADAM,
        num_steps=50,
        projection=box(lower, upper),
    )
    assert np.all(np.abs(np.asarray(res.params["w"])) <= 0.3)
    assert 0.0 <= float(res.params["b"]) <= 0.05
    assert float(res.params["b"]) == 0.05  # y + 1 pushes the bias to its upper bound


@pytest.fixture(scope="module")
def tanh_data():
    rng = np.random.default_rng(1)
    X = 0.7 * rng.normal(size=(N, 3))
    theta_true = np.array([1.5, -1.0, 0.5])
    y = np.tanh(X @ theta_true) + 0.05 * rng.normal(size=N)
    return X, y, 1.0


def test_nonlinear_single_index_matches_slsqp_and_kkt(tanh_data):
    X, y, R = tanh_data

    def L(t):
        return np.sum((np.tanh(X @ t) - y) ** 2)

    def grad(t):
        z = np.tanh(X @ t)
        return X.T @ (2 * (z - y) * (1 - z**2))

    ref = optimize.minimize(
        L,
        np.zeros(3),
        jac=grad,
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 1000},
        constraints=[{"type": "ineq", "fun": lambda t: R**2 - t @ t, "jac": lambda t: -2 * t}],
    )
    assert ref.success and np.linalg.norm(ref.x) > R - 1e-8  # constraint active
    lmax = np.linalg.eigvalsh(X.T @ X)[-1]
    res = fit(
        single_index,
        {"w": jnp.zeros(3)},
        X,
        y,
        optimizer=optax.sgd(N / (2 * lmax)),
        num_steps=400,
        projection=l2_ball(R),
    )
    theta = np.asarray(res.params["w"])
    np.testing.assert_allclose(norm(res.params), R, rtol=1e-12)
    # SLSQP stops when f changes by < ftol = 1e-12 (relative), so its loss is good to ~1e-12 and its
    # point to ~sqrt(1e-12) = 1e-6 in the worst case (measured: they agree to ~1e-13 / ~1e-9).
    np.testing.assert_allclose(float(res.final_loss), ref.fun, rtol=1e-10)
    np.testing.assert_allclose(theta, ref.x, atol=1e-6)
    # KKT at the trainer's point: grad L = -mu * theta with mu > 0 (no tangential component).
    g = grad(theta)
    tangential = g - (g @ theta) / (theta @ theta) * theta
    assert g @ theta < 0
    assert np.linalg.norm(tangential) <= 1e-9 * np.linalg.norm(g)


# ---------------------------------------------------------------------------------------------
# Weights and losses


def test_integer_weights_equal_duplicated_rows_exactly():
    rng = np.random.default_rng(2)
    X = rng.integers(-3, 4, size=(12, 3)).astype(np.float64)
    y = rng.integers(-5, 6, size=12).astype(np.float64)
    w = rng.integers(0, 4, size=12)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}  # dyadic: every residual and square is exact
    rep = np.repeat(np.arange(12), w)
    weighted = weighted_loss(linear, params, X, y, w.astype(np.float64))
    duplicated = weighted_loss(linear, params, X[rep], y[rep])
    assert float(weighted) == float(duplicated)
    assert float(weighted_loss(linear, params, X, y)) == float(
        weighted_loss(linear, params, X, y, np.ones(12))
    )
    # The same through training (nonlinear model): only the summation order differs.
    a = fit(
        single_index,
        {"w": jnp.zeros(3)},
        X,
        y / 5,
        w.astype(np.float64),
        optimizer=ADAM,
        num_steps=50,
        projection=l2_ball(1.0),
    )
    b = fit(
        single_index,
        {"w": jnp.zeros(3)},
        X[rep],
        y[rep] / 5,
        optimizer=ADAM,
        num_steps=50,
        projection=l2_ball(1.0),
    )
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-11)
    assert float(a.normalizer) == float(b.normalizer) == w.sum()


def test_objective_is_normalised_by_weight_sum(ls_data):
    X, y, R = ls_data
    w = np.random.default_rng(3).uniform(0.5, 2.0, size=N)
    kw = dict(optimizer=ADAM, num_steps=30, projection=l2_ball(R))
    a = fit(linear, {"w": jnp.zeros(D)}, X, y, w, **kw)
    b = fit(
        linear,
        {"w": jnp.zeros(D)},
        X,
        y,
        1000 * w,
        optimizer=ADAM,
        num_steps=30,
        projection=l2_ball(R),
    )
    # Scaling all weights leaves J = L_w / sum(w), hence the iterates, unchanged ...
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-12, atol=1e-14)
    # ... while `losses` reports the sum form L_w, which scales.
    np.testing.assert_allclose(b.losses, 1000 * a.losses, rtol=1e-12)
    np.testing.assert_allclose(a.losses[0], np.sum(w * y**2), rtol=1e-13)  # theta_0 = 0


def test_cross_entropy_and_logistic_match_numpy():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(N, 4))
    w = rng.uniform(0.1, 3.0, size=N)
    params = {"W": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=3))}
    labels = rng.integers(0, 3, size=N)
    z = X @ np.asarray(params["W"]).T + np.asarray(params["b"])
    ce_ref = np.sum(w * (special.logsumexp(z, axis=1) - z[np.arange(N), labels]))
    got = weighted_loss(softmax_model, params, X, labels, w, loss="cross_entropy")
    np.testing.assert_allclose(got, ce_ref, rtol=1e-12)

    p2 = {"w": jnp.asarray(rng.normal(size=4)), "b": jnp.asarray(0.3)}
    y01 = rng.integers(0, 2, size=N).astype(np.float64)
    s = X @ np.asarray(p2["w"]) + 0.3
    log_ref = np.sum(w * (np.logaddexp(0.0, s) - y01 * s))  # -y log sig(s) - (1-y) log(1-sig(s))
    got = weighted_loss(logit_model, p2, X, y01, w, loss="logistic")
    np.testing.assert_allclose(got, log_ref, rtol=1e-12)
    # A callable per-example loss, and chunked evaluation.
    absolute = lambda pred, t: jnp.abs(pred - t)
    got = weighted_loss(logit_model, p2, X, y01, w, loss=absolute, chunk_size=7)
    np.testing.assert_allclose(got, np.sum(w * np.abs(s - y01)), rtol=1e-12)
    assert set(LOSSES) == {"squared", "cross_entropy", "logistic"}


def test_weighted_loss_under_jit_and_grad(ls_data):
    X, y, _ = ls_data
    params = {"w": jnp.ones(D)}
    val, g = jax.jit(jax.value_and_grad(lambda p: weighted_loss(linear, p, X, y)))(params)
    np.testing.assert_allclose(val, np.sum((X @ np.ones(D) - y) ** 2), rtol=1e-13)
    np.testing.assert_allclose(g["w"], 2 * X.T @ (X @ np.ones(D) - y), rtol=1e-12)


def test_per_example_loss_matches_reference(class_data):
    """Per-example losses against closed forms: squared residuals and softmax cross-entropy."""
    X, labels, _ = class_data
    rng = np.random.default_rng(9)
    p = {"W": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=3))}
    z = X @ np.asarray(p["W"]).T + np.asarray(p["b"])
    ce = special.logsumexp(z, axis=1) - z[np.arange(N), labels]
    for chunk_size in (None, 7):
        got = nj.per_example_loss(softmax_model, p, X, labels, loss="cross_entropy", chunk_size=chunk_size)
        assert got.shape == (N,)
        np.testing.assert_allclose(got, ce, rtol=1e-12)
    y = rng.normal(size=N)
    w = {"w": jnp.asarray(rng.normal(size=4))}
    sq = nj.per_example_loss(linear, w, X, y)
    np.testing.assert_allclose(sq, (X @ np.asarray(w["w"]) - y) ** 2, rtol=1e-12)
    # jit-friendly, and consistent with weighted_loss
    weights = rng.uniform(size=N)
    jitted = jax.jit(lambda q: nj.per_example_loss(linear, q, X, y))(w)
    np.testing.assert_allclose(jitted, sq, rtol=1e-13)
    np.testing.assert_allclose(np.sum(weights * sq), weighted_loss(linear, w, X, y, weights), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Minibatches, segments, resuming


@pytest.fixture(scope="module")
def class_data():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(N, 4))
    W = rng.normal(size=(3, 4)) * 2
    labels = np.argmax(X @ W.T + 0.3 * rng.normal(size=(N, 3)), axis=1)
    params = {"W": jnp.zeros((3, 4)), "b": jnp.zeros(3)}
    return X, labels, params


def test_minibatch_decreases_loss_and_is_reproducible(class_data):
    X, labels, params = class_data
    kw = dict(optimizer=ADAM, num_steps=80, loss="cross_entropy", batch_size=8)
    kw["projection"] = l2_ball(5.0)
    a = fit(softmax_model, params, X, labels, key=jax.random.key(0), **kw)
    b = fit(softmax_model, params, X, labels, key=jax.random.key(0), **kw)
    c = fit(softmax_model, params, X, labels, key=jax.random.key(1), **kw)
    start = float(weighted_loss(softmax_model, params, X, labels, loss="cross_entropy"))
    np.testing.assert_allclose(start, N * np.log(3.0), rtol=1e-14)  # uniform softmax
    assert float(a.final_loss) < 0.5 * start
    chex.assert_trees_all_equal(a.params, b.params)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.allclose(np.asarray(a.params["W"]), np.asarray(c.params["W"]))
    # losses[0] is the unbiased (n/b) * batch-sum estimate at theta_0, where every loss is log 3.
    np.testing.assert_allclose(a.losses[0], N * np.log(3.0), rtol=1e-14)


def test_segments_and_padding_do_not_change_the_result(ls_data):
    X, y, R = ls_data
    kw = dict(optimizer=ADAM, num_steps=7, projection=l2_ball(R))
    mb = dict(batch_size=10, key=jax.random.key(3))
    one = fit(linear, {"w": jnp.zeros(D)}, X, y, num_segments=1, **kw, **mb)
    # 3 segments of 3 steps: the last 2 are skipped.
    three = fit(linear, {"w": jnp.zeros(D)}, X, y, num_segments=3, **kw, **mb)
    chex.assert_trees_all_close(one.params, three.params, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(one.losses, three.losses, rtol=1e-13)
    # batch_size = n draws a permutation: the full-batch gradient up to summation order.
    full = fit(linear, {"w": jnp.zeros(D)}, X, y, **kw)
    perm = fit(linear, {"w": jnp.zeros(D)}, X, y, batch_size=N, key=jax.random.key(4), **kw)
    chex.assert_trees_all_close(full.params, perm.params, rtol=1e-12, atol=1e-14)


def test_resume_from_opt_state_equals_one_long_run(ls_data):
    X, y, _ = ls_data
    p0 = {"w": jnp.zeros(D)}
    long = fit(linear, p0, X, y, optimizer=ADAM, num_steps=20, num_segments=2)
    first = fit(linear, p0, X, y, optimizer=ADAM, num_steps=10, num_segments=1)
    second = fit(
        linear,
        first.params,
        X,
        y,
        optimizer=ADAM,
        num_steps=10,
        num_segments=1,
        opt_state=first.opt_state,
    )
    # Same compiled 10-step segment, same inputs: bit-for-bit equal.
    chex.assert_trees_all_equal(second.params, long.params)
    np.testing.assert_array_equal(np.concatenate([first.losses, second.losses]), long.losses)


def test_progress_bar_shows_only_when_asked(ls_data, capsys):
    X, y, _ = ls_data
    fit(
        linear,
        {"w": jnp.zeros(D)},
        X,
        y,
        optimizer=ADAM,
        num_steps=4,
        num_segments=2,
        progress=True,
    )
    assert "fit" in capsys.readouterr().err
    fit(linear, {"w": jnp.zeros(D)}, X, y, optimizer=ADAM, num_steps=4, num_segments=2)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Failures


def nan_above_six(params, x):
    t = params["w"][0]
    return jnp.where(t > 6.0, jnp.nan, t * x[0])


def test_nan_loss_raises_naming_the_step():
    # J = (t - 10)^2, sgd(0.25): t_{k+1} = t_k + (10 - t_k)/2 -> 0, 5, 7.5: NaN from step 2 on.
    xs, ys = np.ones((4, 1)), np.full(4, 10.0)
    with pytest.raises(nj.NonFiniteLossError, match=r"loss is nan at step 2\b") as info:
        fit(
            nan_above_six,
            {"w": jnp.zeros(1)},
            xs,
            ys,
            optimizer=optax.sgd(0.25),
            num_steps=50,
            num_segments=25,
        )
    # Frozen at the last finite iterate, t_2 = 7.5 (the update from step 2 was discarded).
    assert float(info.value.state.params["w"][0]) == 7.5
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value.state, TrainState)
    assert info.value.step == 2
    # pickle (a process pool sends it back to the parent) and copies keep the message, state and step:
    # they raised "__init__() missing 2 required keyword-only arguments" (BrokenProcessPool in a pool)
    for again in (pickle.loads(pickle.dumps(info.value)), copy.copy(info.value), copy.deepcopy(info.value)):
        assert type(again) is nj.NonFiniteLossError and str(again) == str(info.value) and again.step == 2
        assert float(again.state.params["w"][0]) == 7.5


def test_overflow_raises():
    xs, ys = np.ones((4, 1)), np.ones(4)
    exp_model = lambda p, x: jnp.exp(x @ p["w"])
    # w_0 = -1: gradient 2(e^-1 - 1)e^-1 ~ -0.47, so w_1 ~ 465 and the loss (e^465)^2 overflows.
    with pytest.raises(FloatingPointError, match=r"loss is inf at step 1\b"):
        fit(exp_model, {"w": -jnp.ones(1)}, xs, ys, optimizer=optax.sgd(1e3), num_steps=20)


BAD_INPUTS = [
    (dict(ys=np.zeros(N - 1)), ValueError, "examples"),
    (dict(xs=np.full((N, D), np.nan)), ValueError, "xs contains"),
    (dict(ys=np.full(N, np.inf)), ValueError, "ys contains"),
    (dict(params={"w": jnp.full(D, jnp.nan)}), ValueError, "params contains"),
    (dict(weights=np.full(N, np.nan)), ValueError, "weights contains"),
    (dict(weights=-np.ones(N)), ValueError, "non-negative"),
    (dict(weights=np.zeros(N)), ValueError, "all be zero"),
    (dict(weights=np.ones(N + 1)), ValueError, "shape"),
    (dict(weights=np.ones((N, 1))), ValueError, "shape"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(num_steps=2.5), TypeError, "num_steps"),
    (dict(batch_size=0, key=jax.random.key(0)), ValueError, "batch_size"),
    (dict(batch_size=N + 1, key=jax.random.key(0)), ValueError, "batch_size"),
    (dict(batch_size=4), ValueError, "key"),
    (dict(loss="hinge"), ValueError, "Unknown loss"),
    (dict(loss=3), TypeError, "loss"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
    (dict(num_segments=0), ValueError, "num_segments"),
    (dict(params={"w": jnp.zeros(D, jnp.int32)}), TypeError, "floating"),
]


@pytest.mark.parametrize("change, exc, match", BAD_INPUTS)
def test_bad_inputs_raise_before_work(ls_data, change, exc, match):
    X, y, _ = ls_data
    args = dict(params={"w": jnp.zeros(D)}, xs=X, ys=y, weights=None, optimizer=ADAM, num_steps=5)
    args.update(change)
    params, xs, ys, weights = (args.pop(k) for k in ("params", "xs", "ys", "weights"))
    calls = []
    counting = lambda p, x: calls.append(1) or linear(p, x)
    with pytest.raises(exc, match=match):
        fit(counting, params, xs, ys, weights, **args)
    assert not calls  # nothing was traced or run


def test_bad_model_output_shapes_raise(ls_data):
    X, y, _ = ls_data
    with pytest.raises(ValueError, match="squared"):
        weighted_loss(lambda p, x: jnp.stack([x @ p["w"]] * 2), {"w": jnp.zeros(D)}, X, y)
    with pytest.raises(ValueError, match="integer class label"):
        params = {"W": jnp.zeros((3, D)), "b": jnp.zeros(3)}
        weighted_loss(softmax_model, params, X, y, loss="cross_entropy")
    with pytest.raises(ValueError, match="non-negative"):
        weighted_loss(linear, {"w": jnp.zeros(D)}, X, y, -np.ones(N))


# ---------------------------------------------------------------------------------------------
# Dtypes and compilation


def test_float32_inputs_give_float32_params(ls_data):
    X, y, R = ls_data
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    lmax = np.linalg.eigvalsh(X.T @ X)[-1]
    res = fit(
        linear,
        {"w": jnp.zeros(D, jnp.float32)},
        X32,
        y32,
        optimizer=optax.sgd(float(N / (2 * lmax))),
        num_steps=400,
        projection=l2_ball(R),
    )
    assert res.params["w"].dtype == jnp.float32
    assert res.losses.dtype == jnp.float32 and res.final_loss.dtype == jnp.float32
    _, loss_ref, _ = constrained_ls_reference(X, y, R)
    # float32 eps ~ 6e-8; a sum of 40 squares and a well-conditioned (kappa ~ 4) problem: 1e-5.
    np.testing.assert_allclose(float(res.final_loss), loss_ref, rtol=1e-5)
    assert norm(res.params) <= R * (1 + 1e-6)


def test_second_call_with_new_values_does_not_retrace(ls_data):
    X, y, R = ls_data
    traces = []

    def model(params, x):  # a fresh function: its own cache entries
        traces.append(1)
        return jnp.tanh(x @ params["w"])

    opt = optax.adam(0.1)
    kw = dict(optimizer=opt, num_steps=12, batch_size=10)
    fit(model, {"w": jnp.zeros(D)}, X, y, key=jax.random.key(0), projection=l2_ball(R), **kw)
    first = len(traces)
    assert first > 0
    # New data, params, weights, key and even radius (projections are data): no new trace.
    fit(
        model,
        {"w": jnp.ones(D) * 0.1},
        X + 1.0,
        y * 2,
        np.full(N, 0.5),
        key=jax.random.key(1),
        projection=l2_ball(R / 2),
        **kw,
    )
    assert len(traces) == first
    weighted_loss(model, {"w": jnp.ones(D)}, X, y)
    n_wl = len(traces)
    weighted_loss(model, {"w": jnp.zeros(D)}, X * 2, y, np.ones(N))
    weighted_loss(model, {"w": jnp.zeros(D)}, X * 3, y, np.full(N, 2.0))
    assert len(traces) - n_wl <= 1  # weights=None vs array is one more signature, then cached


def test_fit_result_fields(ls_data):
    X, y, _ = ls_data
    res = fit(linear, {"w": jnp.zeros(D)}, X, y, optimizer=ADAM, num_steps=3)
    assert isinstance(res, FitResult) and res.losses.shape == (3,)
    chex.assert_tree_all_finite(res)
    assert math.isclose(float(res.normalizer), N)


# --------------------------------------------------------------------------------------------------
# Review fixes (fifteenth session): each case failed before


def _linear_problem(dtype=np.float64):
    X = np.random.default_rng(0).normal(size=(20, 2)).astype(dtype)
    return (lambda th, x: x @ th), X, X.sum(1)


def test_opt_state_of_another_dtype_is_named():
    """A float32 fit's Adam state resumed on float64 params was an internal `lax.cond` type error."""
    model, X, y = _linear_problem()
    first = fit(model, jnp.zeros(2, jnp.float32), X, y, optimizer=optax.adam(0.1), num_steps=3)
    with pytest.raises(ValueError, match="opt_state does not match.*dtype float32 where.*float64"):
        fit(model, first.params.astype(jnp.float64), X, y, optimizer=optax.adam(0.1), num_steps=3,
            opt_state=first.opt_state)  # fmt: skip


def test_complex_weights_refused_on_the_host_path_too():
    """numpy xs took the host path, which dropped the imaginary part of complex weights (loss 0.0)."""
    model, X, y = _linear_problem()
    for xs in (X, jnp.asarray(X)):
        with pytest.raises(TypeError, match="weights must be real numbers"):
            weighted_loss(model, jnp.zeros(2), xs, y, 1j * np.ones(20))


def test_list_weights_work_on_every_path():
    """A list of weights: 'Cannot determine dtype' on the device path, a value on the host path."""
    model, X, y = _linear_problem()
    w = [0.5] * 20
    ref = 0.5 * np.sum(y**2)
    np.testing.assert_allclose(weighted_loss(model, jnp.zeros(2), jnp.asarray(X), y, w), ref, rtol=1e-12)
    np.testing.assert_allclose(weighted_loss(model, jnp.zeros(2), X, y, w), ref, rtol=1e-12)
    res = fit(model, jnp.zeros(2), X, y, w, optimizer=optax.sgd(0.01), num_steps=2)
    assert np.isfinite(float(res.final_loss))


def test_final_loss_overflow_is_an_error():
    """sgd(10) diverges: 15 steps left finite parameters whose loss overflows float32, returned as
    final_loss = inf with no error (16 steps raised)."""
    model, X, y = _linear_problem(np.float32)
    with pytest.raises(nj.NonFiniteLossError, match="loss at the final parameters is inf") as err:
        fit(model, jnp.zeros(2, jnp.float32), X, y, optimizer=optax.sgd(10.0), num_steps=15)
    assert err.value.step == 15 and bool(jnp.all(jnp.isfinite(err.value.state.params)))


def test_l2_ball_gradient_at_zero_and_empty_leaves():
    """At θ = 0 the reverse-mode gradient was NaN (optax: the identity); a zero-size leaf raised
    'zero-size array to reduction operation max'."""
    grad = jax.grad(lambda t: l2_ball(1.0)(t).sum())(jnp.zeros(2))
    ref = jax.grad(lambda t: optax.projections.projection_l2_ball(t, 1.0).sum())(jnp.zeros(2))
    np.testing.assert_array_equal(grad, ref)
    np.testing.assert_array_equal(grad, np.ones(2))
    out = l2_ball(1.0)({"e": jnp.zeros(0), "w": jnp.array([3.0, 4.0])})
    assert out["e"].shape == (0,)
    np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-15)


def test_apply_fn_failing_on_an_example_is_named_on_device_arrays():
    """A wrong width of xs or a missing params leaf: fit, and weighted_loss / per_example_loss on jax
    arrays, raised jax's TypeError from deep inside the loss (or a KeyError); the host path and adjoint
    gave the ValueError showing the shapes. Now every entry point does."""
    X, y = jnp.ones((20, 3)), jnp.ones(20)
    wide = jnp.zeros(4)  # one entry too many for x @ theta

    def index(th, x):
        return jnp.tanh(x @ th)

    def affine(p, x):
        return x @ p["w"] + p["b"]

    calls = [
        lambda: nj.weighted_loss(index, wide, X, y),
        lambda: nj.per_example_loss(index, wide, X, y),
        lambda: nj.fit(index, wide, X, y, optimizer=optax.sgd(0.1), num_steps=3),
        lambda: nj.fit(affine, {"w": jnp.zeros(3)}, X, y, optimizer=optax.sgd(0.1), num_steps=3),
    ]
    for call in calls:
        with pytest.raises(
            ValueError, match=r"apply_fn\(params, x\) failed on one example x = xs\[0\] \(x shape \(3,\)\)"
        ):
            call()


def test_fit_under_a_transformation_names_the_cause():
    """fit under a user's jit was a ConcretizationTypeError from float() deep inside (traced weights or
    params): a TypeError saying fit cannot run there and pointing to make_train_step."""
    xs, ys = np.ones((6, 2)), np.ones(6)

    def run(params, weights):
        return nj.fit(
            lambda p, x: x @ p, params, xs, ys, weights, optimizer=optax.sgd(0.1), num_steps=2
        ).params

    with pytest.raises(TypeError, match="fit cannot run under a jax transformation.*make_train_step"):
        jax.jit(run)(jnp.ones(2), jnp.ones(6))
    np.testing.assert_allclose(run(jnp.ones(2), jnp.ones(6)), run(jnp.ones(2), jnp.ones(6)))


# --------------------------------------------------------------------------------------------------
# Review fixes (twenty-second session): each case failed before


def _half_problem(n, theta, seed=0):
    """Noise-free ``y = X θ*`` in float16: every weighting has the minimiser θ*."""
    X = np.random.default_rng(seed).normal(size=(n, 3))
    return X.astype(np.float16), (X @ np.asarray(theta)).astype(np.float16)


HALF_CASES = {
    # Σ w_i ℓ_i ≈ 200 · 100 · 5 at θ = 0: overflowed float16 (loss inf at step 0)
    "200 each": (100, [1.0, -2.0, 0.5], lambda n: np.full(n, 200.0, np.float32)),
    # the weight itself is inf in float16
    "one weight 1e5": (100, [1.0, -2.0, 0.5], lambda n: np.r_[1e5, np.ones(n - 1)].astype(np.float32)),
    # Σw = 1e8 (each weight < 65,504): 1/Σw flushed to 0 in float16, the params never moved, no error
    "sum 1e8": (2000, [0.003, -0.006, 0.003], lambda n: np.full(n, 5e4, np.float32)),
}


@pytest.mark.parametrize("case", list(HALF_CASES))
def test_float16_fit_with_large_importance_weights(case):
    """float16 params: the weights, Σ w_i ℓ_i and 1/Σw were float16, so weights of 200 or 1e5 gave
    NonFiniteLossError at step 0 ("lower the learning rate") and Σw = 1e8 gave zero gradients, though the
    normalised objective is in range. Now the sums are float32: the float16 fit follows the float32 one,
    and with equal weights the float16 fit with unit weights (J does not depend on the weight scale)."""
    n, theta, weights = HALF_CASES[case]
    X, y = _half_problem(n, theta)
    w = weights(n)
    model = lambda th, x: x @ th
    kw = dict(optimizer=optax.sgd(0.5), num_steps=40)
    half = fit(model, jnp.zeros(3, jnp.float16), X, y, w, **kw)
    single = fit(model, jnp.zeros(3, jnp.float32), X.astype(np.float32), y.astype(np.float32), w, **kw)
    assert half.params.dtype == jnp.float16
    assert half.losses.dtype == half.final_loss.dtype == half.normalizer.dtype == jnp.float32
    np.testing.assert_allclose(float(half.normalizer), float(np.sum(w, dtype=np.float64)), rtol=1e-6)
    scale = float(np.max(np.abs(theta)))
    # float16 rounding (eps 1e-3) of the data, the losses and the params: 1% of the parameters' scale
    np.testing.assert_allclose(np.asarray(half.params, np.float32), single.params, atol=1e-2 * scale)
    np.testing.assert_allclose(np.asarray(half.losses), single.losses, rtol=2e-2, atol=1e-3 * half.losses[0])
    assert norm(single.params) > 0.5 * scale  # it moved (one weight of 1e5 is slow away from x_0's line)
    if np.all(w == w[0]):
        np.testing.assert_allclose(np.asarray(half.params, np.float32), theta, atol=1e-2 * scale)
        unit = fit(model, jnp.zeros(3, jnp.float16), X, y, **kw)
        np.testing.assert_allclose(np.asarray(half.params, np.float32), np.asarray(unit.params, np.float32),
                                   atol=1e-2 * scale)  # fmt: skip


def test_out_of_range_labels_are_checkify_errors_under_jit(class_data):
    """Under a user's jit the label ranges were not checked at all (ys traced), even inside
    traced_checks(): a cross_entropy label of -1 or k gave a wrong finite loss or NaN, a logistic label of
    5 a wrong loss, while NaN in xs was reported. Now each is a checkify error there."""
    X, labels, _ = class_data
    d = X.shape[1]
    params = {"W": jnp.asarray(np.random.default_rng(1).normal(size=(3, d))), "b": jnp.zeros(3)}

    def ce(ys, xs):
        with nj.traced_checks():
            return weighted_loss(softmax_model, params, xs, ys, loss="cross_entropy")

    def logistic(ys):
        with nj.traced_checks():
            return nj.per_example_loss(logit_model, {"w": jnp.ones(d), "b": jnp.zeros(())}, X, ys,
                                       loss="logistic")  # fmt: skip

    labels = jnp.asarray(labels, jnp.int32)
    checked = jax.jit(checkify.checkify(ce, errors=checkify.user_checks))
    err, value = checked(labels, X)
    assert err.get() is None
    np.testing.assert_allclose(value, weighted_loss(softmax_model, params, X, labels, loss="cross_entropy"))
    for bad in (labels.at[0].set(3), labels.at[5].set(-1)):
        assert "labels must be integers in [0, 3) for the 3 logits" in checked(bad, X)[0].get()
    checked = jax.jit(checkify.checkify(logistic, errors=checkify.user_checks))
    binary = jnp.asarray(np.arange(N) % 2, jnp.float64)
    assert checked(binary)[0].get() is None
    assert "labels must lie in [0, 1]" in checked(binary.at[3].set(5.0))[0].get()
    assert "labels must lie in [0, 1]" in checked(binary.at[3].set(-0.5))[0].get()
    # outside traced_checks nothing is emitted: a plain jit of the same call runs
    plain = jax.jit(lambda ys: weighted_loss(softmax_model, params, X, ys, loss="cross_entropy"))
    assert plain(labels.at[0].set(3)).shape == ()


def _offset_model(th, x):
    return th[0] + x @ th[1:]


def test_integer_responses_the_squared_loss_would_round_are_refused():
    """Integer ys of loss="squared" were rounded to the model output's dtype by f − y, silently: a float32
    model predicting 2^24 with int64 ys of 2^24 + 1 gave losses of 0 (float64 ys of the same values: 1
    each), a float16 model with int32 ys of 2049 the same. Now every path (device, numpy, chunk source,
    fit, per-example) refuses them; integers within the exact range give the float ys' losses."""
    n = 8
    xs = np.zeros((n, 2), np.float32)
    th = np.array([2.0**24, 0.0, 0.0], np.float32)
    ys = np.full(n, 2**24 + 1, np.int64)
    assert float(weighted_loss(_offset_model, th, jnp.asarray(xs), ys.astype(np.float64))) == n  # exact
    dev, sgd0 = jnp.asarray(xs), optax.sgd(0.0)
    calls = {
        "device": lambda y: weighted_loss(_offset_model, th, dev, y),
        "numpy": lambda y: weighted_loss(_offset_model, th, xs, y),
        "chunks": lambda y: weighted_loss(
            _offset_model, th, lambda: iter([(xs[:4], y[:4]), (xs[4:], y[4:])])
        ),
        "per example": lambda y: nj.per_example_loss(_offset_model, th, dev, jnp.asarray(y)).sum(),
        "fit": lambda y: fit(_offset_model, th, dev, y, optimizer=sgd0, num_steps=1).final_loss,
    }
    exact = r"integer ys with values in \[16,777,217, 16,777,217\].*float32.*exactly only up to 16,777,216"
    for name, call in calls.items():
        with pytest.raises(ValueError, match=exact):
            call(ys)
        # the largest exact integer, and a residual of 1 below it: the float ys' losses
        assert float(call(ys - 1)) == 0.0, name
        assert float(call(ys - 2)) == n, name
    with pytest.raises(ValueError, match=r"chunk 1 of the chunk source"):
        calls["chunks"](np.r_[ys[:4] - 2, ys[4:]])
    # float64 params: f − y in float64 holds them, up to 2^53 (compared as integers: 2^53 + 1 is not
    # rounded to the bound on its way)
    th64 = th.astype(np.float64)
    assert float(weighted_loss(_offset_model, th64, jnp.asarray(xs), ys)) == n
    for path in (jnp.asarray(xs), xs):
        with pytest.raises(
            ValueError, match=r"values in \[9,007,199,254,740,993, .*up to 9,007,199,254,740,992"
        ):
            weighted_loss(_offset_model, th64, path, np.full(n, 2**53 + 1, np.int64))
    # a float16 model and int32 counts, without x64's help
    th16 = np.array([2048.0, 0.0, 0.0], np.float16)
    with pytest.raises(ValueError, match=r"float16.*exactly only up to 2,048"):
        weighted_loss(_offset_model, th16, xs.astype(np.float16), np.full(n, 2049, np.int32))

    # under a user's jit: a checkify check inside traced_checks()
    def traced(y):
        with nj.traced_checks():
            return weighted_loss(_offset_model, th, jnp.asarray(xs), y)

    checked = jax.jit(checkify.checkify(traced, errors=checkify.user_checks))
    assert "exactly only up to 16,777,216" in checked(jnp.asarray(ys))[0].get()
    err, value = checked(jnp.asarray(ys - 2))
    assert err.get() is None and float(value) == n
    # unsigned: no lower bound (its negation wrapped around, refusing every uint32 ys)
    err, value = checked(jnp.asarray(ys - 2, jnp.uint32))
    assert err.get() is None and float(value) == n
    assert "exactly only up to 16,777,216" in checked(jnp.asarray(ys, jnp.uint32))[0].get()


def test_numpy_losses_do_not_take_the_offset_columns_range_check():
    """The numpy path of the losses refused ys beyond the params' dtype ("become Inf in the offset column
    f(0) − y", a check of the scores) where the device path and a chunk source computed the loss: a
    float16 model whose output is float32 has responses far beyond 65,504."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(16, 3)).astype(np.float32)
    th = np.ones(3, np.float16)
    model = lambda t, x: 1000.0 * (x @ t.astype(jnp.float32))  # float32 outputs up to ~7e4
    ys = (7e4 + 100 * rng.normal(size=16)).astype(np.float32)
    device = weighted_loss(model, th, jnp.asarray(xs), ys)
    host = weighted_loss(model, th, xs, ys)
    reference = np.sum((1000.0 * (xs.astype(np.float64) @ np.ones(3)) - ys) ** 2)
    np.testing.assert_allclose(float(host), float(device), rtol=1e-6)
    np.testing.assert_allclose(float(host), reference, rtol=1e-5)  # float32 rounding of 16 terms
    np.testing.assert_allclose(
        nj.per_example_loss(model, th, xs, ys), nj.per_example_loss(model, th, jnp.asarray(xs), ys)
    )


def test_listed_labels_and_container_ys_on_device_arrays(class_data):
    """A Python list of labels gave jax's "Cannot determine dtype of [0, 1, ...]" on device arrays (the
    numpy path took it); a dict of responses said "ys must have at least 1 axis, got shape ()"."""
    X, labels, _ = class_data
    X, d = jnp.asarray(X), X.shape[1]
    params = {"W": jnp.asarray(np.random.default_rng(1).normal(size=(3, d))), "b": jnp.zeros(3)}
    listed = [int(v) for v in labels]
    expected = weighted_loss(softmax_model, params, X, jnp.asarray(labels, jnp.int32), loss="cross_entropy")
    np.testing.assert_allclose(
        weighted_loss(softmax_model, params, X, listed, loss="cross_entropy"), expected
    )
    np.testing.assert_allclose(
        nj.per_example_loss(softmax_model, params, X, listed, loss="cross_entropy").sum(), expected
    )
    trained = fit(
        softmax_model, params, X, listed, optimizer=optax.sgd(0.0), num_steps=1, loss="cross_entropy"
    )
    np.testing.assert_allclose(trained.final_loss, expected)
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\)"):
        weighted_loss(softmax_model, params, X, [3] + listed[1:], loss="cross_entropy")
    for data in (X, np.asarray(X)):  # device and numpy paths
        with pytest.raises(TypeError, match=r"ys must be one array of shape \(n, ...\), got a dict"):
            weighted_loss(softmax_model, params, data, {"a": labels}, loss=lambda p, y: jnp.sum(p))


def test_fit_names_a_failing_apply_fn_before_the_label_check():
    """fit(loss="cross_entropy") called apply_fn on xs[0] for the label check before checking the model:
    a wrong input width was jax's raw TypeError (weighted_loss named the shapes), and bad arguments
    (num_steps=0) were reported only after apply_fn had been traced."""
    X, labels = jnp.ones((20, 5)), jnp.zeros(20, jnp.int32)
    model = lambda W, x: x @ W  # expects 4 features, X has 5
    failed = r"apply_fn\(params, x\) failed on one example x = xs\[0\] \(x shape \(5,\)\)"
    with pytest.raises(ValueError, match=failed):
        fit(model, jnp.ones((4, 3)), X, labels, optimizer=ADAM, num_steps=2, loss="cross_entropy")
    calls = []
    counting = lambda W, x: calls.append(1) or x @ W
    with pytest.raises(ValueError, match="num_steps"):
        fit(counting, jnp.ones((5, 3)), X, labels, optimizer=ADAM, num_steps=0, loss="cross_entropy")
    assert not calls


BAD_DIRECT_PROJECTIONS = [
    (lambda: L2Ball(-1.0), "radius must be positive, got -1.0"),
    (lambda: L2Ball(0.0), "radius must be positive, got 0.0"),
    (lambda: L2Ball(float("nan")), "radius must be finite"),
    (lambda: L2Ball(np.inf), "radius must be finite"),
    (lambda: L2Ball(jnp.asarray(-2.0)), "radius must be positive"),
    (lambda: L2Ball(np.ones(2)), "radius must be a scalar"),
    (lambda: Box(1.0, -1.0), "lower must be <= upper"),
    (lambda: Box(np.nan, 1.0), "contains NaN"),
    (lambda: Box(np.inf, np.inf), "the same infinite value"),
    (lambda: Box({"w": np.zeros(2)}, {"w": np.array([1.0, -1.0])}), "lower must be <= upper"),
]


@pytest.mark.parametrize("make, match", BAD_DIRECT_PROJECTIONS)
def test_projections_built_directly_are_checked(make, match):
    """L2Ball and Box are public, but only the builders l2_ball/box checked their numbers: L2Ball(-1)
    mapped θ to -θ/‖θ‖ and Box(1, -1) clipped everything to -1, also in fit. Now calling them raises the
    builders' ValueError (fit: before any work)."""
    tree = {"w": jnp.array([3.0, 4.0])}
    projection = make()
    with pytest.raises(ValueError, match=match):
        projection(tree)
    calls = []
    counting = lambda p, x: calls.append(1) or x @ p["w"]
    X, y = np.ones((4, 2)), np.ones(4)
    with pytest.raises(ValueError, match=match):
        fit(counting, tree, X, y, optimizer=ADAM, num_steps=2, projection=projection)
    assert not calls


def test_projections_built_directly_still_work():
    tree = {"w": jnp.array([3.0, 4.0])}
    np.testing.assert_allclose(L2Ball(1.0)(tree)["w"], l2_ball(1.0)(tree)["w"], rtol=0)
    np.testing.assert_allclose(L2Ball(jnp.asarray(2.0))(tree)["w"], [1.2, 1.6], rtol=1e-15)
    np.testing.assert_array_equal(Box(-1.0, 3.5)(tree)["w"], [3.0, 3.5])
    np.testing.assert_array_equal(Box(np.inf * -1, np.inf)(tree)["w"], [3.0, 4.0])


def test_optimizers_needing_extra_arguments_are_named():
    """optax.contrib.reduce_on_plateau and optax.lbfgs (GradientTransformationExtraArgs whose update
    needs value=/value_fn=) were refused with "optimizer must be an optax.GradientTransformation",
    which they are."""
    X, y, _ = _linear_problem()[1:] + (None,)
    for optimizer, missing in (
        (optax.chain(optax.adam(0.1), optax.contrib.reduce_on_plateau()), "'value'"),
        (optax.lbfgs(), "'value_fn'"),
    ):
        with pytest.raises(TypeError, match="needs extra arguments that fit does not pass") as err:
            fit(lambda th, x: x @ th, jnp.zeros(2), X, y, optimizer=optimizer, num_steps=2)
        assert "optimizer.update(grads, opt_state, params)" in str(err.value) and missing in str(err.value)
        assert "must be an optax.GradientTransformation" not in str(err.value)


def test_cross_entropy_with_a_scalar_model_names_the_output_shape(class_data):
    """A scalar-output model with loss="cross_entropy": "labels must be integers in [0, 1) for the 1
    logits" or "must return a vector of k logits", depending on the labels' values."""
    X, labels, _ = class_data
    scalar = lambda p, x: x @ p["w"]
    params = {"w": jnp.zeros(X.shape[1])}
    message = r"needs apply_fn to return a vector of k logits per example .*got output shape \(\)"
    for ys in (jnp.asarray(labels, jnp.int32), jnp.zeros(N, jnp.int32)):
        with pytest.raises(ValueError, match=message):
            weighted_loss(scalar, params, X, ys, loss="cross_entropy")
        with pytest.raises(ValueError, match=message):
            fit(scalar, params, X, ys, optimizer=ADAM, num_steps=2, loss="cross_entropy")
        with pytest.raises(ValueError, match=message):  # host data
            nj.per_example_loss(scalar, params, np.asarray(X), np.asarray(ys), loss="cross_entropy")


def test_loss_non_finite_at_the_initial_parameters_is_not_blamed_on_the_learning_rate():
    """NaN at the initial parameters (before any update) said "lower the learning rate"."""
    xs = np.random.default_rng(3).normal(size=(10, 2))
    log_model = lambda p, x: jnp.log(x @ p)  # negative arguments for some x
    with pytest.raises(nj.NonFiniteLossError, match="nan at the initial parameters") as err:
        fit(log_model, jnp.ones(2), xs, np.ones(10), optimizer=optax.sgd(1e-9), num_steps=3)
    message = str(err.value)
    assert "learning rate is not the cause" in message and "lower the learning rate" not in message
    assert err.value.step == 0
    np.testing.assert_array_equal(err.value.state.params, np.ones(2))
    # a failure after an update still points to the step size
    with pytest.raises(nj.NonFiniteLossError, match="step 2.*lower the learning rate"):
        fit(nan_above_six, {"w": jnp.zeros(1)}, np.ones((4, 1)), np.full(4, 10.0), optimizer=optax.sgd(0.25),
            num_steps=5)  # fmt: skip


@pytest.mark.parametrize(
    "projection, match",
    [
        (lambda t: t["w"], r"params is PyTreeDef\(\{'w': \*\}\), projection\(params\) is PyTreeDef\(\*\)"),
        (
            lambda t: {"w": t["w"].astype(jnp.float32)},
            r"params\['w'\] has shape \(5,\) and dtype float64, projection\(params\) returns shape "
            r"\(5,\) and dtype float32",
        ),
        (lambda t: {"w": t["w"][:3]}, r"returns shape \(3,\)"),
    ],
)
def test_projection_changing_structure_shape_or_dtype_is_refused(ls_data, projection, match):
    """A projection returning another pytree structure failed deep in the step ("JAX does not support
    string indexing"); one casting float64 params to float32 silently made FitResult.params float32."""
    X, y, _ = ls_data
    with pytest.raises(ValueError, match=match):
        fit(linear, {"w": jnp.zeros(D)}, X, y, optimizer=ADAM, num_steps=2, projection=projection)


def test_a_float16_weighted_loss_past_its_range_is_named(tmp_path):
    """Every loss finite, the weighted sum 9e5 past float16's 65,504: weighted_loss returned inf with no
    error (device and host paths); now a ValueError naming the dtype. In range, the float16 result is the
    float32 sum rounded once."""
    f = lambda p, x: x @ p  # noqa: E731
    p = jnp.ones(3, jnp.float16)
    xs, ys = np.ones((100, 3), np.float16), np.zeros(100, np.float16)
    w = np.full(100, 1000.0, np.float16)
    for data in ("device", "host"):
        args = (jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(w)) if data == "device" else (xs, ys, w)
        with pytest.raises(ValueError, match="exceeds the range of the losses' dtype float16"):
            nj.weighted_loss(f, p, *args)
    small = np.full(100, 50.0, np.float16)  # 9 · 50 · 100 = 45,000: in range
    for args in ((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(small)), (xs, ys, small)):
        got = nj.weighted_loss(f, p, *args)
        assert got.dtype == jnp.float16 and float(got) == float(np.float16(45000.0))  # 44,992


def test_fit_keeps_float32_params_inside_a_box_without_x64():
    """Without x64, fit passed the box's Python-float bounds into its programs as float32 (0.1 became
    0.10000000149 at the boundary) and the inward rounding inside saw nothing to round: the fitted float32
    params were 0.10000000149, outside [-0.1, 0.1], and not a fixed point of the box the user passed
    (which gives 0.099999994). Now the bounds are rounded on the host, per leaf dtype."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(N, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -1.0, 2.0])).astype(np.float32)
    with jax.enable_x64(False):
        for proj in (box(-0.1, 0.1), box({"w": np.float64(-0.1)}, {"w": np.full(3, 0.1)})):
            result = fit(linear, {"w": np.zeros(3, np.float32)}, X, y, projection=proj, **SGD)
            w = np.asarray(result.params["w"])
            assert w.dtype == np.float32
            assert np.all(np.abs(w.astype(np.float64)) <= 0.1), w.tolist()
            np.testing.assert_array_equal(w, np.asarray(proj(result.params)["w"]))  # a fixed point
            np.testing.assert_array_equal(np.abs(w), np.float32(0.099999994))


def test_fit_box_does_not_hide_a_diverging_update():
    """The finiteness check ran after the projection, and traced bounds skip the box's own check: an
    update to ±Inf (learning rate inf, or 1e308 overflowing) was clipped to the box's corner, with finite
    losses and no error, while the same call with l2_ball or no projection raised. Now the update is
    checked before the projection."""
    X, y = np.random.default_rng(8).normal(size=(N, 3)), np.ones(N)
    for lr in (np.inf, -np.inf, 1e308):
        for proj in (box(-1.0, 1.0), box({"w": -np.ones(3)}, 1.0), l2_ball(1.0), None):
            with pytest.raises(
                nj.NonFiniteLossError, match="update at step 0 made the parameters non-finite"
            ):
                fit(
                    linear,
                    {"w": np.full(3, 0.5)},
                    X,
                    y,
                    optimizer=optax.sgd(lr),
                    num_steps=3,
                    projection=proj,
                )


def test_fit_with_a_projection_runs_inside_traced_checks():
    """Inside nj.traced_checks(), fit with any l2_ball or box failed on valid input with "Cannot abstractly
    evaluate a checkify.check which was not functionalized": fit compiles its own programs, which no
    checkify wraps, and the projection's traced checks were emitted there. fit now gives the same result
    as outside the block, and a checkify of a user's jitted step still reports a bad radius."""
    rng = np.random.default_rng(9)
    X, y = rng.normal(size=(N, 3)), rng.normal(size=N)
    step = make_train_step(lambda p, b: jnp.sum((b[0] @ p["w"] - b[1]) ** 2), optax.sgd(0.1), None)
    state = TrainState({"w": jnp.zeros(3)}, optax.sgd(0.1).init({"w": jnp.zeros(3)}))

    def projected_step(state, radius):
        return L2Ball(radius)(step(state, (X, y))[0].params)

    for proj in (l2_ball(0.2), box(-0.05, 0.05)):
        outside = fit(linear, {"w": np.zeros(3)}, X, y, projection=proj, **SGD)
        with nj.traced_checks():
            inside = fit(linear, {"w": np.zeros(3)}, X, y, projection=proj, **SGD)
            err, _ = jax.jit(checkify.checkify(projected_step, errors=checkify.user_checks))(state, -1.0)
            with pytest.raises(Exception, match="radius must be positive"):
                err.throw()
        np.testing.assert_array_equal(inside.params["w"], outside.params["w"])


def test_fit_reuses_its_programs_for_numpy_scalar_bounds():
    """A box with np.float32 / np.int64 bounds (numpy scalars, not np.ndarray) was treated as a static
    projection: fit compiled its start and segment programs again on every call with new bound values,
    against its docstring ("a new radius or box also reuses the cache")."""
    from nlis_jax import _train

    rng = np.random.default_rng(10)
    X, y = rng.normal(size=(N, 3)), rng.normal(size=N)
    p0 = {"w": np.zeros(3)}
    fit(linear, p0, X, y, projection=box({"w": np.float32(-0.5)}, {"w": np.float32(0.5)}), **SGD)
    fit(linear, p0, X, y, projection=L2Ball(np.float32(0.5)), **SGD)
    sizes = _train._start._cache_size(), _train._segment._cache_size()
    for s in (0.25, 0.125):
        fit(linear, p0, X, y, projection=box({"w": np.float32(-s)}, {"w": np.int64(1)}), **SGD)
        result = fit(linear, p0, X, y, projection=L2Ball(np.float32(s)), **SGD)
        assert norm(result.params) <= s * (1 + 1e-6)
    assert (_train._start._cache_size(), _train._segment._cache_size()) == sizes


def test_optimizers_fit_cannot_drive_are_not_called_non_optax():
    """optax.MultiSteps around an optimizer needing value= and optax.lookahead (gradients of its fast/slow
    params, not of params) were refused with "optimizer must be an optax.GradientTransformation (e.g.
    optax.adam(1e-3))", which they are. The message now says how fit calls update and what does not fit."""
    X, y = _linear_problem()[1:]
    for optimizer in (
        optax.MultiSteps(optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau()), 2),
        optax.lookahead(optax.sgd(0.1), sync_period=2, slow_step_size=0.5),
    ):
        with pytest.raises(TypeError, match=r"do not run on params as fit calls them") as err:
            fit(lambda th, x: x @ th, jnp.zeros(2), X, y, optimizer=optimizer, num_steps=2)
        assert "must be an optax.GradientTransformation" not in str(err.value)
        assert "optax.MultiSteps" in str(err.value) and "optax.lookahead" in str(err.value)


def test_non_finite_loss_error_says_what_its_state_holds():
    """After a loss that overflowed at step t, the message said .state "holds the last finite iterate",
    but its loss is the non-finite one: a fit resumed from it (even with a lower learning rate) stopped at
    once, blaming the model. The message now says so."""
    xs, ys = np.ones((4, 1)), np.ones(4)
    with pytest.raises(nj.NonFiniteLossError, match=r"loss is inf at step") as info:
        fit(linear, {"w": jnp.full(1, 2.0)}, xs, ys, optimizer=optax.sgd(1.5), num_steps=2000)
    step = info.value.step
    assert f"holds the parameters of step {step}: finite, but their loss is inf" in str(info.value)
    assert np.all(np.isfinite(info.value.state.params["w"]))
    with pytest.raises(nj.NonFiniteLossError, match="at the initial parameters"):
        fit(linear, info.value.state.params, xs, ys, optimizer=optax.sgd(1e-3), num_steps=2)


def test_a_weakly_typed_optimizer_state_reuses_fits_programs():
    """optax.inject_hyperparams keeps the learning rate in opt_state; set between fits to jnp.asarray(4e-3)
    or a Python float (weak types) it compiled fit's segment again (0.37 s) and the returned state stayed
    weak, so fresh and resumed runs used two programs. The state is now strongly typed on entry."""
    from nlis_jax import _train

    model, X, y = _linear_problem()
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    first = fit(model, jnp.zeros(2), X, y, optimizer=opt, num_steps=4)
    segments = _train._segment._cache_size()  # the start point's small program is compiled per leaf kind
    for lr in (jnp.asarray(4e-3), 2e-3, np.asarray(1e-3), jnp.asarray(5e-3), 3e-3):
        state = first.opt_state._replace(hyperparams={**first.opt_state.hyperparams, "learning_rate": lr})
        result = fit(model, first.params, X, y, optimizer=opt, num_steps=4, opt_state=state)
        assert not result.opt_state.hyperparams["learning_rate"].weak_type
        assert float(result.opt_state.hyperparams["learning_rate"]) == float(lr)
    assert _train._segment._cache_size() == segments


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_a_weakly_typed_learning_rate_takes_the_states_dtype(dtype):
    """With params narrower than jax's default float (float32 under x64), a Python float or a weak
    jnp.asarray learning rate was refused: "a leaf of dtype float64 where optimizer.init(params) has
    float32"; optax itself takes it. It is cast to the state's dtype."""
    model, X, y = _linear_problem()
    X, y = X.astype(dtype), y.astype(dtype)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=1e-2)
    first = fit(model, jnp.zeros(2, dtype), X, y, optimizer=opt, num_steps=2)
    for lr in (2e-3, jnp.asarray(2e-3)):
        state = first.opt_state._replace(hyperparams={**first.opt_state.hyperparams, "learning_rate": lr})
        result = fit(model, first.params, X, y, optimizer=opt, num_steps=2, opt_state=state)
        got = result.opt_state.hyperparams["learning_rate"]
        assert got.dtype == first.opt_state.hyperparams["learning_rate"].dtype and not got.weak_type
        assert float(got) == pytest.approx(2e-3, rel=1e-3)


def test_a_float_put_into_an_integer_state_leaf_is_refused():
    """Only weak leaves of the state's own kind are cast: a Python float where optimizer.init has a
    count (Adam's) would be truncated silently."""
    model, X, y = _linear_problem()
    opt = optax.adam(1e-2)
    first = fit(model, jnp.zeros(2), X, y, optimizer=opt, num_steps=2)
    adam = first.opt_state[0]
    state = (adam._replace(count=2.7), *first.opt_state[1:])
    with pytest.raises(ValueError, match="a leaf of dtype float.* where optimizer.init.params. has int32"):
        fit(model, first.params, X, y, optimizer=opt, num_steps=2, opt_state=state)
