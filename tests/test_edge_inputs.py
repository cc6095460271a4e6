"""Extreme and malformed inputs to the public API found in the twelfth session's review: each was a
crash, a silent wrong answer or a misleading message before (the observed value is in each docstring)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nlis_jax as nj


def test_distortion_of_half_precision_input():
    """float16/bfloat16: ``NotImplementedError: Unsupported dtype float16`` (eigvalsh) before; now the
    float32 computation's value, within half precision's rounding of the input."""
    rng = np.random.default_rng(0)
    F = rng.normal(size=(8, 3))
    idx, w = np.array([0, 2, 5, 7]), np.full(4, 2.0)
    ref = float(nj.distortion(F.astype(np.float16).astype(np.float32), idx, w))
    for dtype in (jnp.float16, jnp.bfloat16):
        got = nj.distortion(jnp.asarray(F, dtype), idx, jnp.asarray(w, dtype))
        assert got.dtype == dtype
        assert abs(float(got) - ref) <= 0.05 * ref


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_rank_uses_the_inputs_eps(dtype):
    """Half-precision F is computed in float32, and the default rank tolerance was float32's 10·eps: the
    input's own rounding (σ/σ_max ~1e-4 in float16, ~1e-3 in bfloat16) counted as rank, so an exactly
    rank-2 matrix had rank 5 and probabilities up to 122% / 188% off (streamed scores of the same model
    used the input's eps and were right). Now 10·eps of F's dtype, as documented: rank 2, the scores
    within the input's rounding of the float64 rank-2 leverage, and a basis of two columns."""
    rng = np.random.default_rng(0)
    F = rng.normal(size=(60, 2)) @ rng.normal(size=(2, 5))
    want = np.sum(np.linalg.svd(F, full_matrices=False)[0][:, :2] ** 2, axis=1) / 2
    Fh = jnp.asarray(F, dtype)
    info = nj.leverage_scores(Fh, return_info=True)
    assert int(info.rank) == 2 and info.probs.dtype == dtype
    # the input's rounding moves rank-2 leverage by ~eps·κ: float16 2e-5, bfloat16 2e-4 (of max 0.11)
    atol = 20 * float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(info.probs, np.float64), want, atol=atol)
    U, rank, _ = nj.orthonormal_basis(Fh)
    assert int(rank) == 2 and np.count_nonzero(np.linalg.norm(np.asarray(U, np.float64), axis=0)) == 2


def test_half_precision_weights_of_large_samples():
    """``s·p_i`` overflowed float16 from s = 65,520: every weight was 0. Now ``1/(s·p_i)`` rounded once."""
    idx, w = nj.sample(jax.random.key(0), nj.uniform_scores(4, jnp.float16), 70_000)
    assert w.dtype == jnp.float16 and idx.dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(w, np.float64), 4 / 70_000 / 4 * 4, rtol=2e-3)


def test_sample_indices_are_int32_as_documented():
    """With replacement under x64 the indices were int64 (without: int32), the docstring says int32."""
    probs = nj.uniform_scores(10, jnp.float64)
    for replace in (True, False):
        assert nj.sample(jax.random.key(1), probs, 3, replace=replace)[0].dtype == jnp.int32


def test_pool_probabilities_of_large_finite_scores():
    """Scores near float32's maximum summed to Inf: all-zero probabilities and NaN weights, silently."""
    labelled = np.zeros(3, bool)
    scores = np.array([3e38, 3e38, 1.0], np.float32)
    probs = nj.active.pool_probabilities(scores, labelled)
    assert probs.dtype == jnp.float32
    # the third, 1.7e-39, is below float32's smallest normal number: 0 where denormals are flushed
    np.testing.assert_allclose(probs, [0.5, 0.5, 1 / 6e38], rtol=1e-6, atol=2e-39)
    w = nj.active.query(jax.random.key(0), scores, labelled, 2, replace=True).weights
    assert np.all(np.isfinite(w)) and np.all(np.asarray(w) > 0)


def test_bounded_swish_of_integer_input_and_wide_zeta():
    """Integer ``t`` truncated ``c1 = 0.25`` to 0 (values 0); a float64 ``zeta`` promoted float32 ``t``."""
    np.testing.assert_allclose(
        nj.bounded_swish(np.array([1, 2]), c1=0.25, c2=0.81),
        nj.bounded_swish(np.array([1.0, 2.0]), 0.25, 0.81),
    )
    assert nj.bounded_swish(np.ones(2, np.float32), zeta=np.float64(2.0)).dtype == jnp.float32


def test_ridge_must_be_concrete_and_finite_leverage():
    """A traced ridge was a ``TracerBoolConversionError``; a ridge beyond float32 and a Gram matrix out of
    range were both reported as "the dual matrix is all zeros"."""
    with pytest.raises(TypeError, match="ridge must be a concrete number"):
        jax.jit(lambda F, r: nj.leverage_scores(F, ridge=r))(np.eye(3), 0.5)
    F = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="overflows"):
        nj.leverage_scores(F, ridge=1e39)
    F[:, 1] *= 1e20
    with pytest.raises(ValueError, match="not finite in float32"):
        nj.leverage_scores(F, ridge=1e-3)
    np.testing.assert_allclose(  # the same matrix in float64: fine
        nj.leverage_scores(F.astype(np.float64), ridge=1e-3).sum(), 1.0, rtol=1e-12
    )


def test_linear_scores_check_bias():
    with pytest.raises(TypeError, match="bias"):
        nj.linear_leverage_scores(np.ones((4, 2)), bias="no")


def test_mix_with_uniform_follows_probs():
    """A float64 alpha returned float64 from float32 probs; a list was "Cannot determine dtype"; a traced
    alpha was "alpha must be a real number, got JitTracer"."""
    p = jnp.asarray([0.25, 0.75], jnp.float32)
    assert nj.mix_with_uniform(p, np.float64(0.5)).dtype == jnp.float32
    np.testing.assert_allclose(nj.mix_with_uniform([0.5, 0.5], 0.1), [0.5, 0.5])
    np.testing.assert_allclose(jax.jit(nj.mix_with_uniform)(p, 0.5), [0.375, 0.625])
    with pytest.raises(TypeError, match="concrete real number, not a traced value"):
        jax.jit(lambda a: nj.active.pool_probabilities(np.ones(3), np.zeros(3, bool), alpha=a))(0.5)


def test_numpy_float64_without_x64_warns_nothing():
    """Without x64 a numpy float64 matrix is computed in float32; the scores asked for float64 and jax
    warned "float64 ... truncated to float32" on every call."""
    F = np.random.default_rng(2).random((10, 3))
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (nj.leverage_scores, nj.norm_scores):
            assert fn(F).dtype == jnp.float32
        assert nj.leverage_scores(F, ridge=1e-3).dtype == jnp.float32


def test_l2_ball_of_large_and_small_parameters():
    """``‖θ‖²`` overflowed for float32 parameters of 3e38 (projected to 0) and underflowed for 1e-30;
    in range the projection is optax's bit for bit, mixed dtypes included."""
    big = nj.l2_ball(1.0)({"w": jnp.array([3e38, 3e38], jnp.float32)})["w"]
    np.testing.assert_allclose(big, [2**-0.5, 2**-0.5], rtol=1e-6)
    tiny = jnp.array([1e-30, 0.0], jnp.float32)
    np.testing.assert_array_equal(nj.l2_ball(2.0)([tiny])[0], tiny)
    rng = np.random.default_rng(3)
    for _ in range(50):
        tree = {
            "a": jnp.asarray(rng.normal(size=5) * 10 ** rng.uniform(-3, 3)),
            "b": jnp.asarray((rng.normal(size=3) * 10 ** rng.uniform(-3, 3)).astype(np.float32)),
        }
        radius = 10 ** rng.uniform(-2, 2)
        ours = nj.l2_ball(radius)(tree)
        theirs = optax.projections.projection_l2_ball(tree, radius)
        for a, b, leaf in zip(
            jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(tree), strict=True
        ):
            np.testing.assert_array_equal(a, b.astype(leaf.dtype))


def test_gauss_legendre_default_dtype_without_x64_warns_nothing():
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        t, w = nj.quadrature.gauss_legendre(4)
    assert t.dtype == w.dtype == jnp.float32
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)  # nodes on [0, 1]: weights sum to 1


# Found in the thirteenth session's review of the trainer and the projections.


def _linear(p, x):
    return jnp.dot(p["w"], x) + p["b"]


def _linear_data(dtype=np.float32):
    X = np.random.default_rng(0).normal(size=(200, 3)).astype(dtype)
    return X, (X @ np.array([1.0, 2.0, 3.0]) + 0.5).astype(dtype)


def test_fit_with_half_precision_weights_summing_past_float16():
    """float16 weights summing to 80,000 overflowed their own sum: normaliser Inf, every gradient 0, the
    parameters never moved (silently). Now the same fit as with float32 weights."""
    X, y = _linear_data()
    p = {"w": jnp.zeros(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    fits = [
        nj.fit(_linear, p, X, y, np.full(200, 400.0, dtype), optimizer=optax.sgd(0.1), num_steps=50)
        for dtype in (np.float16, np.float32)
    ]
    assert float(fits[0].normalizer) == 80_000.0
    np.testing.assert_allclose(fits[0].params["w"], fits[1].params["w"], rtol=1e-6)
    np.testing.assert_allclose(fits[1].params["w"], [1.0, 2.0, 3.0], atol=1e-3)
    with pytest.raises(ValueError, match="overflow"):
        nj.fit(_linear, p, X, y, np.full(200, 3e38, np.float32), optimizer=optax.sgd(0.1), num_steps=1)


def test_l2_ball_of_many_half_precision_parameters():
    """float16 leaves: ``‖θ/2^e‖²`` of 300,000 entries overflowed float16, so every parameter became 0."""
    theta = {"w": jnp.full((300_000,), 0.5, jnp.float16)}  # norm 273.9
    inside = nj.l2_ball(1000.0)(theta)["w"]
    assert inside.dtype == jnp.float16 and np.all(np.asarray(inside) == 0.5)
    projected = nj.l2_ball(100.0)(theta)["w"]
    assert projected.dtype == jnp.float16
    assert abs(float(jnp.linalg.norm(projected.astype(jnp.float32))) - 100.0) <= 0.1


def test_losses_of_numpy_data_under_a_trace_of_labels_or_weights():
    """numpy ``xs`` with traced ``weights``/``ys`` (concrete params) went to the host path, which refused
    the tracers (``TypeError: weights must be a numpy array``). Now the device path's values."""
    X, y = _linear_data()
    p = {"w": jnp.ones(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    w = np.linspace(0.5, 1.5, 200).astype(np.float32)
    ref = float(nj.weighted_loss(_linear, p, jnp.asarray(X), jnp.asarray(y), jnp.asarray(w)))
    jitted = jax.jit(lambda ww: nj.weighted_loss(_linear, p, X, y, ww))
    assert float(jitted(w)) == pytest.approx(ref, rel=1e-6)
    batched = jax.vmap(lambda ww: nj.weighted_loss(_linear, p, X, y, ww))(np.stack([w, 2 * w]))
    np.testing.assert_allclose(batched, [ref, 2 * ref], rtol=1e-6)
    grad = jax.grad(lambda yy: nj.weighted_loss(_linear, p, X, yy, w))(y)
    np.testing.assert_allclose(grad, 2 * w * (y - X @ np.ones(3)), rtol=1e-4, atol=1e-4)
    per = jax.jit(lambda yy: nj.per_example_loss(_linear, p, X, yy))(y)
    device = nj.per_example_loss(_linear, p, jnp.asarray(X), jnp.asarray(y))
    np.testing.assert_allclose(per, device, rtol=1e-6)


def test_box_with_an_array_bound_for_several_leaves():
    """A bare array bound for a dict of parameters was broadcast into every leaf: the scalar ``b`` came out
    with shape (3,), and ``fit`` then blamed ``apply_fn``."""
    with pytest.raises(ValueError, match=r"array of shape \(3,\)"):
        nj.box(np.zeros(3), np.ones(3))({"w": jnp.full(3, 2.0), "b": jnp.array(-1.0)})
    same_structure = nj.box({"w": np.zeros(3), "b": 0.0}, 1.0)({"w": jnp.full(3, 2.0), "b": jnp.array(-1.0)})
    np.testing.assert_array_equal(same_structure["w"], np.ones(3))
    assert float(same_structure["b"]) == 0.0


def test_trainer_arguments_of_the_wrong_kind():
    """``progress="no"`` showed a bar (truthy); complex weights failed in ``float()``; a uint32 array of the
    wrong length passed as a key failed inside jax; ``project_params("ball")`` failed only at update."""
    X, y = _linear_data()
    p = {"w": jnp.zeros(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    kw = dict(optimizer=optax.sgd(0.1), num_steps=2)
    with pytest.raises(TypeError, match="progress must be True or False"):
        nj.fit(_linear, p, X, y, progress="no", **kw)
    with pytest.raises(TypeError, match="weights must be real"):
        nj.fit(_linear, p, X, y, np.ones(200, np.complex64), **kw)
    with pytest.raises(TypeError, match=r"raw uint32 key has shape \(2,\)"):
        nj.fit(_linear, p, X, y, batch_size=10, key=np.zeros(3, np.uint32), **kw)
    nj.fit(_linear, p, X, y, batch_size=10, key=jax.random.PRNGKey(0), **kw)  # a raw key still works
    with pytest.raises(TypeError, match="projection must be a callable"):
        nj.projections.project_params("ball")


# Found in the thirteenth session's review of sampling, active learning and the CLI.


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--dataset", "synthetic", "--seed", str(2**64 + 1)],
        ["run", "--dataset", "synthetic", "--data-seed", "-1"],
        ["run", "--dataset", "synthetic", "--tails", "inf"],
        ["run", "--dataset", "synthetic", "--tails", "0.01"],  # χ² draws of 0: a traceback (29th session)
        ["run", "--dataset", "digits", "--classes", "3"],
        ["active", "--seed", str(2**32)],
        ["active", "--radius", "abc"],  # was "invalid _radius_arg value" (eighteenth session)
        ["score", "--x", "x.npy", "--out", "s.npy", "--seed", str(2**64)],
        ["score", "--x", "x.npy", "--out", "s.npy", "--chunk-size", "0"],
    ],
)
def test_cli_usage_errors_before_any_work(argv, capsys):
    """A seed past 2**32 ended in ``OverflowError`` (or without x64 repeated a smaller seed), ``--tails inf``
    made NaN data, one class a shape error after loading, ``--chunk-size 0`` wiped ``--out``: now argparse
    errors (exit 2) naming the option."""
    from nlis_jax import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    option = next(a for a in argv[::-1] if a.startswith("--"))
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "invalid _" not in err  # no private function names


def test_sample_size_of_a_tiny_delta_and_single_keys():
    """``2d/δ`` overflowed for δ = 1e-320 (the message then blamed ε); a batch of keys reached jax's
    internals (``uniform accepts a single key``); ``n`` past the data was cut silently in active studies."""
    from nlis_jax.experiments import active

    s = nj.sample_size(0.5, 1e-320, 5)
    expected = (2 / 0.25 + 2 / 1.5) * 4 * (np.log(10.0) - np.log(1e-320))
    assert s == int(np.ceil(expected))
    with pytest.raises(TypeError, match="batch of keys"):
        nj.sample(jax.random.split(jax.random.key(0), 2), nj.uniform_scores(5), 2)
    with pytest.raises(ValueError, match="more than the 10 rows"):
        active._subsample(10, 11, 5, 0)
    assert active._subsample(10, None, 20, 0).size == 10  # the default is capped, as documented


# Found in the thirteenth session's review of the adjoints and closed forms.


def test_forward_mode_with_wider_inputs_than_params():
    """float32 params with float64 inputs: forward mode failed inside jax (the scan carry float32 against
    the float64 tangents; in the adaptive rule ``jvp`` primal and tangent dtypes differed). Now forward
    and reverse agree, in the params' dtype."""

    def f(p, x):
        return jnp.tanh(x @ p)

    theta = jnp.full(3, 0.3, jnp.float32)
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    for num_nodes in (8, None):
        fwd, rev = (nj.adjoint(f, theta, xs, num_nodes=num_nodes, mode=m) for m in ("forward", "reverse"))
        assert fwd.dtype == rev.dtype == jnp.float32
        np.testing.assert_allclose(fwd, rev, rtol=1e-6, atol=1e-6)
    ref = nj.single_index_adjoint(jnp.tanh, theta.astype(jnp.float64), xs)
    dual = nj.dual_matrix(
        f, theta, xs, num_nodes=8, mode="forward"
    )  # the adjoints, then the offset column f(0)
    np.testing.assert_allclose(dual[:, :3], ref, atol=1e-6)
    np.testing.assert_array_equal(dual[:, 3], 0.0)


@pytest.mark.parametrize(
    ("phi", "slopes"),
    [(jax.nn.relu, (1.0, 0.0)), (lambda z: jax.nn.leaky_relu(z, 0.01), (1.0, 0.01)), (jnp.abs, (1.0, -1.0))],
)
def test_closed_form_of_activations_with_a_kink_at_zero(phi, slopes):
    """``(ϕ(z) − ϕ(0))/z`` near 0 came from a Taylor series at 0, wrong for a kink there: relu gave 0 at
    ``z = 1e-5`` (float64) and at ``z = 0.01`` (float32). Now the one-sided slope, as ``adjoint`` gives."""
    for dtype, z in ((jnp.float64, 1e-5), (jnp.float32, 0.01)):
        theta = jnp.asarray([z, 1.0], dtype)
        xs = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]], dtype)
        got = nj.single_index_adjoint(phi, theta, xs)[:, 0]
        # row 1: z > 0, slope on the right; row 2: z < 0, (ϕ(-z) − ϕ(0))/(-z) times x = -1
        np.testing.assert_allclose(got, [slopes[0], -slopes[1]], rtol=1e-6)
        np.testing.assert_allclose(got, nj.adjoint(lambda p, x: phi(x @ p), theta, xs)[:, 0], rtol=1e-6)


def test_adaptive_budget_is_a_bound_and_its_arguments_need_the_adaptive_rule():
    """``max_panels`` was exceeded by up to two panels per entry left on the bisection stack (2,069 of
    2,048); ``rtol``/``max_panels`` were ignored silently with ``num_nodes`` given."""

    def steep(p, x):
        return jnp.tanh(200.0 * (x @ p) - 100.0)

    theta, xs = jnp.asarray([1.0, 0.5]), jnp.asarray([[1.0, 0.3], [0.7, -0.2], [1.2, 0.1]])
    for budget in (12,):  # one compiled refinement per budget: one suffices for the bound
        # the cause named: the budget (it was reported as "the rounding noise" when a panel of the flat
        # tails had been accepted at the noise level)
        with pytest.warns(nj.QuadratureWarning, match=f"panel budget \\(max_panels={budget}\\)"):
            _, info = nj.adjoint(steep, theta, xs, max_panels=budget, return_info=True)
        assert int(jnp.max(info.panels)) <= budget, (budget, info.panels)
        assert not bool(jnp.any(info.roundoff & ~info.converged))
    for kw in ({"rtol": 1e-8}, {"max_panels": 100}):
        with pytest.raises(ValueError, match="ignored"):
            nj.adjoint(steep, theta, xs, num_nodes=8, **kw)


def test_mixed_precision_params_take_the_narrow_leaf_tolerance():
    """A float32 weight with a float64 bias: the tolerance was float64's (1e-12) while the integrand carries
    float32 rounding, so every example spent the whole budget (2,059–2,071 panels, 5.8 s) and warned."""

    def model(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.asarray(0.2, jnp.float64)}
    xs = jnp.asarray(rng.normal(size=(6, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", nj.QuadratureWarning)
        adj, info = nj.adjoint(model, params, xs, return_info=True)
    assert bool(jnp.all(info.converged)) and int(jnp.max(info.panels)) < 50
    wide = jnp.concatenate([jnp.ones((6, 1)), xs], axis=1)
    theta = jnp.concatenate([params["b"][None], params["w"].astype(jnp.float64)])
    np.testing.assert_allclose(adj, nj.single_index_adjoint(jnp.tanh, theta, wide), rtol=1e-5, atol=1e-6)


def test_refinement_goes_on_while_the_identity_check_fails():
    """A narrow ramp between the nodes of the first two passes: the estimates pass, the identity check
    fails. The rule bisected once and stopped (adjoint 0 against 0.0187, residual 1.0), and the warning
    advised raising max_panels. Now it refines with narrower panels while the check fails, jitted too."""
    t = np.asarray(nj.quadrature.gauss_legendre(16)[0])  # the first pass's nodes, then its halves'
    nodes = np.sort(np.r_[t, t / 2, 0.5 + t / 2, 0.0, 0.5, 1.0])
    gap = int(np.argmax(np.diff(nodes)))
    lo = nodes[gap] + 0.3 * (nodes[gap + 1] - nodes[gap])
    hi = nodes[gap] + 0.7 * (nodes[gap + 1] - nodes[gap])

    def plateau(p, x):
        return jnp.clip(x @ p - lo, 0.0, hi - lo)

    theta, xs = jnp.asarray([1.0, 0.0]), jnp.asarray([[1.0, 0.0], [0.5, 0.0]])
    ref = nj.single_index_adjoint(lambda z: jnp.clip(z - lo, 0.0, hi - lo), theta, xs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nj.QuadratureWarning)
        adj, info = nj.adjoint(plateau, theta, xs, return_info=True)
    assert bool(jnp.all(info.converged))
    np.testing.assert_allclose(adj, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        jax.jit(lambda th: nj.adjoint(plateau, th, xs))(theta), ref, rtol=1e-12, atol=1e-15
    )


# ------------------------------------------------------------------ sixteenth session's review
def test_uniform_scores_and_mixing_refuse_what_half_precision_cannot_hold():
    """float16: ``uniform_scores(10**6)`` summed to 1.0133 (``sample`` refused it) and ``4·10**7`` gave
    zeros; ``mix_with_uniform(p, 0.01)`` at ``n = 10**6`` had a minimum of 0 against its promise
    ``p_i ≥ α/n``. Each is a ValueError naming the dtype; float32 keeps both."""
    with pytest.raises(ValueError, match="1/n = 1/1000000 rounds to .* in float16"):
        nj.uniform_scores(1_000_000, jnp.float16)
    assert float(jnp.sum(nj.uniform_scores(1_000_000, jnp.float32))) == pytest.approx(1.0, abs=1e-3)
    p = np.zeros(1_000_000, np.float16)
    p[0] = 1.0
    with pytest.raises(
        ValueError, match="alpha/n = 0.01/1000000 is below the smallest normal number of float16"
    ):
        nj.mix_with_uniform(jnp.asarray(p), 0.01)
    mixed = nj.mix_with_uniform(jnp.asarray(p, jnp.float32), 0.01)
    assert float(jnp.min(mixed)) >= 0.01 / 1_000_000 * (1 - 1e-6)


@pytest.mark.parametrize(
    ("dtype", "alpha", "advice"),
    [
        (jnp.float32, 1e-45, r"use alpha >= 4.75e-38, or float64 probabilities \(with jax_enable_x64\)\.$"),
        (jnp.bfloat16, 1e-45, r"use alpha >= 4.75e-38, or float64 probabilities"),  # float32 is no wider
        (jnp.float16, 1e-9, r"use alpha >= 0.000247, or float32 probabilities\.$"),
        (jnp.float64, 1e-320, r"use alpha >= 8.99e-308\.$"),
    ],
)
def test_a_tiny_alpha_gets_advice_that_helps(dtype, alpha, advice):
    """float32 probabilities with alpha = 1e-45 were told to "use float32 or wider", and the alpha first
    advised (n·tiny to 3 digits, rounded down) was itself refused (thirty-fifth session): the advice names
    an alpha that passes and a dtype that holds alpha/n, if any."""
    probs = jnp.full(4, 0.25, dtype)
    with pytest.raises(ValueError, match=advice) as info:
        nj.mix_with_uniform(probs, alpha)
    advised = float(str(info.value).split("use alpha >= ")[1].split(",")[0].rstrip("."))
    mixed = np.asarray(nj.mix_with_uniform(probs, advised)).astype(np.float64)
    assert np.all(mixed >= np.finfo(dtype).smallest_normal)
    # alpha = n·tiny rounded to nearest in float64 can round below it in the dtype: the host check now
    # divides as the device does (it passed and returned a floor of 0)
    n, tiny = 3, float(np.finfo(dtype).smallest_normal)
    edge = float(np.nextafter(np.asarray(n * tiny, dtype), np.asarray(0, dtype)))
    with pytest.raises(ValueError, match="is below the smallest normal number"):
        nj.mix_with_uniform(jnp.asarray([1.0, 0.0, 0.0], dtype), edge)


def test_sample_refuses_more_draws_than_int32_indices_hold():
    """``num_samples ≥ 2**31`` (``sample_size`` gives 4,218,866,444 for ε = 1e-3) was an OverflowError
    about an internal argument; now a ValueError naming ``num_samples``."""
    s = nj.sample_size(1e-3, 0.01, 200)
    assert s > 2**31 - 1
    with pytest.raises(ValueError, match=r"num_samples=4218866444 exceeds 2147483647"):
        nj.sample(jax.random.key(0), nj.uniform_scores(4), s)


def test_bounded_swish_roots_in_float64_and_zeta_arrays_checked():
    """float16 ``t`` with ``c2 = 1e5``: the constant overflowed float16 before its square root (316), so
    the outputs were ±inf and NaN; ``zeta`` given as an array (NaN) was not checked; ``c1``, ``c2`` as
    0-d arrays were refused."""
    t = np.array([-1.0, 0.0, 0.5, 1.7])
    ref = np.asarray(nj.bounded_swish(jnp.asarray(t, jnp.float32), 1.0, 1e5))
    got = nj.bounded_swish(jnp.asarray(t, jnp.float16), 1.0, 1e5)
    assert got.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(got, np.float32)))
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-3)
    for zeta in (np.array(np.nan), jnp.asarray(-1.0), jnp.asarray(np.inf)):
        with pytest.raises(ValueError, match="finite zeta >= 0"):
            nj.bounded_swish(jnp.ones(3), 1.0, 2.0, zeta)
    np.testing.assert_allclose(
        nj.bounded_swish(jnp.ones(3), np.asarray(1.0), jnp.asarray(2.0), jnp.asarray(0.5)),
        nj.bounded_swish(jnp.ones(3), 1.0, 2.0, 0.5),
    )


def test_model_adapters_take_bools_only():
    """``batched="no"`` and ``squeeze="False"`` acted as True by their truthiness, ``squeeze=None`` as
    False."""
    from flax import nnx

    from nlis_jax import models

    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    for kwargs in (dict(batched="no"), dict(squeeze="False"), dict(squeeze=None)):
        with pytest.raises(TypeError, match="must be True or False"):
            models.from_nnx(model, **kwargs)
    apply_fn, params = models.from_nnx(model, batched=True, squeeze=True)
    assert apply_fn(params, jnp.ones(3)).shape == ()


def test_linear_scores_refuse_complex_ys_and_leverage_tuples_name_probs():
    """Complex ``ys`` lost its imaginary part in the linear baselines (the scores of ``ys.real``); a
    ``Leverage`` passed as ``probs`` to ``sample``/``mix_with_uniform`` was "Cannot concatenate arrays"."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(20, 3))
    with pytest.raises(TypeError, match="ys must be real, got complex"):
        nj.linear_leverage_scores(xs, rng.normal(size=20) + 1j)
    info = nj.leverage_scores(jnp.asarray(xs), return_info=True)
    with pytest.raises(TypeError, match=r"got a Leverage: pass its \.probs"):
        nj.sample(jax.random.key(0), info, 4)
    with pytest.raises(TypeError, match=r"got a Leverage: pass its \.probs"):
        nj.mix_with_uniform(info, 0.1)
    idx, _ = nj.sample(jax.random.key(0), info.probs, 4)
    assert idx.shape == (4,)


def test_integers_beyond_float64_are_infinite_for_the_range_checks():
    """``float(10**400)`` raised a bare OverflowError naming no argument."""
    with pytest.raises(ValueError, match="c2"):
        nj.bounded_swish(jnp.ones(3), c2=10**400)
    with pytest.raises(ValueError, match="zeta"):
        nj.bounded_swish(jnp.ones(3), zeta=10**400)
    with pytest.raises(ValueError, match="radius must be finite"):
        nj.l2_ball(10**400)
    proj = nj.box(-(10**400), 1)  # an infinite lower bound, as -inf itself
    out = proj({"w": jnp.array([-1e30, 2.0])})
    np.testing.assert_array_equal(out["w"], [-1e30, 1.0])
    with pytest.raises(TypeError, match="lower must be a real number"):
        nj.box("0", 1)


@pytest.mark.parametrize(
    "call",
    ["streaming_device", "streaming_host", "streaming_norm", "projected", "dual_matrix", "fit", "memmap"],
)
def test_float64_ys_beyond_float32_without_x64_are_named_by_every_path(call, tmp_path):
    """A finite 1e39 in float64 ``ys`` becomes Inf in the cast to float32 (x64 off): it was "the adjoint
    is NaN or Inf" (device streaming, projected), "xs or ys contains NaN or Inf" (host streaming) or "the
    offset column ... is NaN or Inf" (dual_matrix); the cast is named now, before any work."""
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((40, 3)), rng.standard_normal(40)
    ys[3] = 1e39
    np.save(tmp_path / "ys.npy", ys)

    def f(p, x):
        return jnp.tanh(x @ p)

    p = np.ones(3, np.float32)
    calls = {
        "streaming_device": lambda: nj.streaming_leverage_scores(f, p, jnp.asarray(xs, jnp.float32), ys),
        "streaming_host": lambda: nj.streaming_leverage_scores(f, p, xs, ys, chunk_size=16),
        "streaming_norm": lambda: nj.streaming_norm_scores(f, p, xs, ys, chunk_size=16),
        "projected": lambda: nj.projected_leverage_scores(jax.random.key(0), f, p, xs, ys, dim=3),
        "dual_matrix": lambda: nj.dual_matrix(f, p, xs, ys),
        "fit": lambda: nj.fit(f, p, xs, ys, optimizer=optax.sgd(1e-3), num_steps=2),
        # a memmap is read piece by piece in the pass: the message names the piece's examples
        "memmap": lambda: nj.streaming_leverage_scores(
            f, p, xs, np.load(tmp_path / "ys.npy", mmap_mode="r"), chunk_size=16
        ),
    }
    message = (
        r"ys, in examples 0–\d+, holds 1 finite value.s. beyond float32's range that become Inf once cast"
        if call == "memmap"
        else ("ys holds 1 finite value.s. beyond float32's range that become Inf once cast to float32")
    )
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax's truncation warning of the cast
        with pytest.raises(ValueError, match=message + ".*enable jax_enable_x64"):
            calls[call]()


def test_float64_host_data_beyond_float32_without_x64_names_the_cast():
    """Finite 1e300 in float64 host data, computed in float32 (x64 off), was "contains NaN or Inf"."""
    ys = np.zeros(4)
    ys[0] = 1e300
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax's truncation and numpy's overflow warnings of the cast
        with pytest.raises(ValueError, match="once cast to float32 .* enable jax_enable_x64"):
            nj.weighted_loss(lambda w, x: jnp.dot(x, w), jnp.ones(2, jnp.float32), np.ones((4, 2)), ys)


def test_single_index_adjoint_names_float64_data_beyond_float32_without_x64():
    """closed_forms.single_index_adjoint cast before its checks: a finite 1e39 read as "xs contains NaN or
    Inf" without x64, where nj.adjoint names the cast."""
    xs = np.ones((5, 2))
    xs[1, 0] = 1e39
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="xs holds 1 finite value.s. beyond float32's range"):
            nj.closed_forms.single_index_adjoint(jnp.tanh, np.ones(2, np.float32), xs)


def test_float64_values_flushed_to_zero_by_a_narrowing_cast_are_named():
    """float64 values below float32's smallest normal number become 0 on the device: without x64, a
    column of xs scaled by 1e-60 made linear leverage 0.033 off, and dual, streamed and projected leverage
    0.021 off, with no error (only leverage_scores(F) named the cast); with x64 and float32 params, ys
    scaled by 1e-60 became an offset column of -0 (streamed leverage 0.037 off). Now named before any
    work, as values beyond the range are."""
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((40, 3)), rng.standard_normal(40)
    xs[:, 1] *= 1e-60

    def f(p, x):
        return jnp.tanh(x @ p)

    p = np.ones(3, np.float32)
    message = "xs holds 40 non-zero value.s. below float32's smallest normal number that become 0 once cast"
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax's truncation warning of the cast
        for call in (
            lambda: nj.linear_leverage_scores(xs),
            lambda: nj.dual_matrix(f, p, xs, ys),
            lambda: nj.streaming_leverage_scores(f, p, xs, ys, chunk_size=16),
            lambda: nj.projected_leverage_scores(jax.random.key(0), f, p, xs, ys, dim=3),
        ):
            with pytest.raises(ValueError, match=message + ".*enable jax_enable_x64"):
                call()
    xs, tiny_ys = rng.standard_normal((40, 3)), ys * 1e-60
    message = "ys has 40 non-zero value.s. below the smallest normal number of the params' dtype float32"
    for call in (
        lambda: nj.dual_matrix(f, p, xs, tiny_ys),
        lambda: nj.streaming_leverage_scores(f, p, jnp.asarray(xs, jnp.float32), jnp.asarray(tiny_ys)),
        lambda: nj.streaming_leverage_scores(f, p, xs.astype(np.float32), tiny_ys, chunk_size=16),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    nj.dual_matrix(f, p, xs, ys)  # float64 ys in float32's normal range: accepted


def test_narrowing_cast_of_memmaps_and_chunk_sources_is_named(tmp_path):
    """The same float64 values below float32's smallest normal number, from a memmap or a chunk source
    (read chunk by chunk, never whole): they were counted on the device after the cast, where they are
    zeros, so streamed, norm and loss passes ran on a column of zeros with no error. Each piece is now
    checked on the host before its transfer; values beyond float32's range get their own message."""
    rng = np.random.default_rng(1)
    xs, ys = rng.standard_normal((40, 3)), rng.standard_normal(40)
    xs[:, 1] *= 1e-60
    path = tmp_path / "xs.npy"
    np.save(path, xs)
    mapped = np.load(path, mmap_mode="r")
    huge = xs.copy()
    huge[3, 1] = 1e300
    np.save(tmp_path / "huge.npy", huge)
    mapped_huge = np.load(tmp_path / "huge.npy", mmap_mode="r")

    def f(p, x):
        return jnp.tanh(x @ p)

    p = np.ones(3, np.float32)
    small = r"xs, in examples 0–\d+, holds \d+ non-zero value.s. below float32's smallest normal number"
    big = r"xs, in examples 0–\d+, holds 1 finite value.s. beyond float32's range that become Inf once cast"
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax's truncation warning of the cast
        for data, message in ((mapped, small), (mapped_huge, big)):
            for call in (
                lambda d=data: nj.streaming_leverage_scores(f, p, d, ys, chunk_size=16),
                lambda d=data: nj.streaming_norm_scores(f, p, d, ys, chunk_size=16),
                lambda d=data: nj.weighted_loss(f, p, d, ys, chunk_size=16),
                lambda d=data: nj.streaming_leverage_scores(
                    f, p, lambda: ((d[i : i + 10], ys[i : i + 10]) for i in range(0, 40, 10)), chunk_size=16
                ),
            ):
                with pytest.raises(ValueError, match=message + ".*enable jax_enable_x64"):
                    call()
        assert not np.shares_memory(mapped, xs) and mapped[0, 1] == xs[0, 1]  # nothing modified


def test_64_bit_integers_that_the_cast_wraps_around_are_named(tmp_path):
    """Without x64 jax's cast wraps int64 values past int32 around (3e9 becomes -1.29e9): an int64 column
    of epoch times or ids gave leverage 48% off the float64 reference, from a memmap, a numpy array, a
    chunk source or dual_matrix, with no warning; int64 weights of 2**32 read as 0 in distortion. Each is
    named now (in-memory arrays before any work, memmaps and chunks piece by piece); values in range are
    scored as before, and x64 takes them all."""
    xs = np.ones((40, 2), np.int64)
    xs[:, 0] = np.arange(40) % 7
    wide = xs.copy()
    wide[29, 1] = 3_000_000_000
    np.save(tmp_path / "wide.npy", wide)
    mapped = np.load(tmp_path / "wide.npy", mmap_mode="r")
    before = wide.copy()

    def f(p, x):
        return jnp.tanh(x @ p)

    p = np.asarray([0.3, 1e-9], np.float32)
    message = r"xs(, in examples \d+–\d+,)? holds 1 integer value.s. outside the range of 32-bit integers"
    with jax.enable_x64(False):
        reference = nj.streaming_leverage_scores(f, p, xs, chunk_size=16)  # in range: scored
        np.testing.assert_allclose(reference, nj.leverage_scores(nj.dual_matrix(f, p, xs)), rtol=1e-5)
        for call in (
            lambda: nj.streaming_leverage_scores(f, p, wide, chunk_size=16),
            lambda: nj.streaming_leverage_scores(f, p, mapped, chunk_size=16),
            lambda: nj.streaming_norm_scores(f, p, mapped, chunk_size=16),
            lambda: nj.streaming_leverage_scores(
                f, p, lambda: ((wide[i : i + 10], None) for i in range(0, 40, 10)), chunk_size=16
            ),
            lambda: nj.dual_matrix(f, p, wide),
        ):
            with pytest.raises(ValueError, match=message + ".*astype.np.float32.*enable jax_enable_x64"):
                call()
        with pytest.raises(ValueError, match="weights holds 1 integer value.s. outside the range"):
            nj.distortion(jnp.eye(4), np.array([0, 1]), np.array([2**32, 1], np.int64))
    np.testing.assert_array_equal(wide, before)
    exact = nj.leverage_scores(nj.dual_matrix(f, p.astype(np.float64), wide.astype(np.float64)))
    np.testing.assert_allclose(nj.streaming_leverage_scores(f, p, mapped, chunk_size=16), exact, rtol=1e-5)


def test_host_data_is_checked_for_the_narrowing_cast_once(tmp_path, monkeypatch):
    """In-memory float64 arrays are checked for the cast without x64 before any work, memmaps piece by
    piece: the pieces of arrays in memory were checked a second time on every pass (one more read of the
    data per pass), and memmaps again on every pass after the first. A user's chunk source, whose rows
    are only sampled from pass to pass, is still checked on every pass."""
    from nlis_jax import _host

    rng = np.random.default_rng(2)
    xs, ys, w = rng.standard_normal((64, 3)), rng.standard_normal(64), rng.uniform(0.5, 1.5, 64)
    np.save(tmp_path / "xs.npy", xs)
    mapped = np.load(tmp_path / "xs.npy", mmap_mode="r")
    calls = []
    counted = _host.narrowing_counts
    monkeypatch.setattr(_host, "narrowing_counts", lambda tree: calls.append(1) or counted(tree))

    def f(p, x):
        return jnp.tanh(x @ p)

    p = np.ones(3, np.float32)
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax's truncation warning of the cast
        nj.streaming_leverage_scores(f, p, xs, ys, chunk_size=16)  # several passes over 4 pieces
        nj.weighted_loss(f, p, xs, ys, w, chunk_size=16)
        assert calls == []
        nj.streaming_leverage_scores(f, p, mapped, ys, chunk_size=16)
        assert len(calls) == 4 * 2  # the first pass only: 4 pieces, xs and ys
        calls.clear()
        source = lambda: ((xs[i : i + 16], ys[i : i + 16]) for i in range(0, 64, 16))  # noqa: E731
        nj.streaming_leverage_scores(f, p, source, chunk_size=16)
        assert len(calls) > 4 * 2  # every pass
        tiny_w = w.copy()
        tiny_w[5] = 1e-60  # in memory: named before any work, not weighted by 0 silently
        with pytest.raises(ValueError, match="weights holds 1 non-zero value.s. below float32's smallest"):
            nj.weighted_loss(f, p, xs, ys, tiny_w, chunk_size=16)


def test_shard_rows_names_what_the_cast_and_the_rows_do_not_allow():
    """One process: float64 values that the cast without x64 flushes to 0 (a column in 1e-60 units: rank
    145 against 161 and scores up to 68% off, unnamed) or makes Inf ("NaN or Inf" later) are named by
    shard_rows itself; arrays of different row counts in one call are refused."""
    from nlis_jax import distributed

    n = 4 * jax.device_count()
    xs = np.random.default_rng(3).standard_normal((n, 3))
    xs[:, 1] *= 1e-60
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = f"shard_rows: the block holds {n} non-zero value.s. below float32's smallest normal number"
        with pytest.raises(ValueError, match=message):
            distributed.shard_rows((xs, np.ones(n)))
        xs[:, 1] = 1.0
        xs[2, 0] = 1e300
        with pytest.raises(ValueError, match="shard_rows: the block holds 1 finite value.s. beyond float32"):
            distributed.shard_rows(xs)
    with pytest.raises(ValueError, match="different numbers of rows"):
        distributed.shard_rows((xs, np.ones(n - 1)))
    assert xs[2, 0] == 1e300  # nothing modified


def test_results_that_cannot_fit_in_memory_are_named_before_any_work(monkeypatch):
    """A dual matrix of n·(p+1) = 2e11 entries (745 GiB) or a Gram matrix of p = 200,000 (149 GiB): jax
    failed with a raw RESOURCE_EXHAUSTED after compiling, or hung (a jitted program whose output cannot
    be allocated, then a read of its scalar count, never returned). Now a MemoryError naming the array,
    its size and the route that fits, from shapes alone (nothing of that size is touched)."""
    from nlis_jax import _checks

    def f(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    params = {"w": np.full((1, 100_000), 1e-3, np.float32), "v": np.full(100_000, 1e-3, np.float32)}
    xs, ys = np.ones((1_000_000, 1), np.float32), np.zeros(1_000_000, np.float32)
    monkeypatch.setattr(_checks, "available_memory", lambda *_: (64 * 2**30, "in this process's memory"))
    dense = r"\(1000000, 200001\) \(float32\) would take 745.1 GiB, more than the 64.0 GiB .*nj.projected_lev"
    gram = r"Gram matrix of the streamed scores \(p = 200,000\) of shape \(200001, 200001\) \(float32\) with "
    gram += r"the workspace of its factorisations \({} arrays of that shape in all\) would take {} GiB"
    host_gram = device_gram = gram.format(12, "1,788.2")  # eager: a program per pass and route stage
    # as many rows as dual columns: fewer are not streamed (their dual matrix is smaller than the Gram's)
    on_device = (jnp.asarray(xs[:200_001]), jnp.asarray(ys[:200_001]))
    for call, message in (
        (lambda: nj.dual_matrix(f, params, xs, ys, num_nodes=4), "the dual matrix F̃ of shape " + dense),
        (lambda: nj.dual_matrix(f, params, xs, ys), "the dual matrix F̃ of shape " + dense),
        (lambda: nj.adjoint(f, params, xs), r"the adjoints F\* of shape \(1000000, 200000\)"),
        (lambda: nj.label_free_leverage_scores(f, params, xs), "the dual matrix F̃ of shape"),
        (lambda: nj.streaming_leverage_scores(f, params, xs, ys), host_gram),
        (lambda: nj.streaming_leverage_scores(f, params, *on_device), device_gram),
        (lambda: nj.label_free_leverage_scores(f, params, xs, chunk_size=1000), host_gram),
    ):
        with pytest.raises(MemoryError, match=message):
            call()
    # at the boundary: an array that fits is computed (8 × 200,001 float32 against 6.4 MB available)
    monkeypatch.setattr(_checks, "available_memory", lambda *_: (8 * 200_001 * 4, "in this process's memory"))
    assert nj.dual_matrix(f, params, xs[:8], ys[:8], num_nodes=2).shape == (8, 200_001)
    monkeypatch.setattr(
        _checks, "available_memory", lambda *_: (8 * 200_001 * 4 - 1, "in this process's memory")
    )
    with pytest.raises(MemoryError, match="more than the 0.0 GiB available"):
        nj.dual_matrix(f, params, xs[:8], ys[:8], num_nodes=2)


@pytest.mark.parametrize("where, copies", [("host", 12), ("device", 12)])
def test_streamed_gram_budgets_its_factorisations(monkeypatch, where, copies):
    """The streamed scores' memory check counted the Gram matrix once, but the device program reserves
    about 21 matrices of its shape (XLA's buffer plan: every route's factorisation) and host data grew
    memory by 9–12: at p+1 = 21,250 in float32 the check passed against 21.9 GiB and XLA then asked for
    37.9 GB. Now the budget is that many Gram matrices, and exactly that many fit. An eager call on
    device arrays now runs a program per pass and per stage of its route, which grew memory by 6–11:
    its budget is 12, as host data's (the 21 of the one program was budgeted before)."""
    from nlis_jax import _checks

    rng = np.random.default_rng(3)
    params, xs, ys = rng.standard_normal(40), rng.standard_normal((60, 40)), rng.standard_normal(60)
    gram = (params.size + 1) ** 2 * params.dtype.itemsize
    if where == "device":
        xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    model = lambda theta, x: jnp.tanh(x @ theta)
    here = "in this process's memory"
    monkeypatch.setattr(_checks, "available_memory", lambda *_: (copies * gram - 1, here))
    with pytest.raises(MemoryError, match=rf"\({copies} arrays of that shape in all\)"):
        nj.streaming_leverage_scores(model, params, xs, ys, num_nodes=4)
    monkeypatch.setattr(_checks, "available_memory", lambda *_: (copies * gram, "in this process's memory"))
    probs = nj.streaming_leverage_scores(model, params, xs, ys, num_nodes=4)
    np.testing.assert_allclose(float(np.sum(probs)), 1.0, rtol=1e-12)


def test_available_memory_of_accelerators_sums_devices_or_takes_the_smallest(monkeypatch):
    """On GPUs or TPUs the free memory of a process's devices is summed for an array spread over them,
    and for one every device holds whole (the streamed Gram matrix and its workspace) the smallest is
    what counts: the sum let a Gram matrix 8 times too big for one of 8 GPUs pass the check."""
    from nlis_jax import _checks

    class Device:
        platform = "gpu"

        def __init__(self, free):
            self.free = free

        def memory_stats(self):
            return {"bytes_limit": self.free + 100, "bytes_in_use": 100}

    monkeypatch.setattr(jax, "local_devices", lambda: [Device(5 * 2**30), Device(3 * 2**30)])
    assert _checks.available_memory() == (8 * 2**30, "on this process's 2 GPU device(s)")
    assert _checks.available_memory(True) == (3 * 2**30, "on each of this process's 2 GPU device(s)")
    with pytest.raises(MemoryError, match="would take 4.0 GiB, more than the 3.0 GiB available on each of"):
        _checks.check_fits_in_memory("a matrix", (2**15, 2**15), np.float32, "", whole=True)
    _checks.check_fits_in_memory("a matrix", (2**15, 2**15), np.float32, "")  # spread: 4 of 8 GiB


def test_available_memory_is_read_from_the_system():
    """On Linux the host's available memory (MemAvailable + free swap, within a cgroup limit): positive
    and at most MemTotal + SwapTotal."""
    from nlis_jax._checks import _read_int, available_memory

    found = available_memory()
    if _read_int("/proc/meminfo", "MemTotal") is None:
        assert found is None  # not Linux: unknown, and the check is skipped
        return
    total = _read_int("/proc/meminfo", "MemTotal") + (_read_int("/proc/meminfo", "SwapTotal") or 0)
    assert 0 < found[0] <= total and found[1] == "in this process's memory"


def test_a_model_with_no_outputs_is_named():
    """``apply_fn`` returning shape ``(0,)``: "zero-size array to reduction operation max which has no
    identity" from inside the quadrature (adjoint, dual_matrix, streaming and label-free scores), or an
    empty adjoint with a fixed rule. Now a ValueError naming the output shape, on device and host data."""
    xs, ys = np.ones((30, 3)), np.ones((30, 0))
    params = {"w": jnp.ones(3)}

    def apply_fn(p, x):
        return (x * p["w"])[:0]

    message = r"apply_fn\(params, x\) returns no outputs \(shape \(0,\)"
    calls = [
        lambda: nj.adjoint(apply_fn, params, xs),
        lambda: nj.adjoint(apply_fn, params, xs, num_nodes=8),
        lambda: nj.dual_matrix(apply_fn, params, xs, ys),
        lambda: nj.streaming_leverage_scores(apply_fn, params, jnp.asarray(xs), jnp.asarray(ys)),
        lambda: nj.streaming_leverage_scores(apply_fn, params, xs, ys),  # host data
        lambda: nj.label_free_leverage_scores(apply_fn, params, xs),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_huge_rank_and_subnormal_weights_are_named():
    """``sample_size(rank=10**400)`` was a bare ``OverflowError: int too large to convert to float`` (now the
    message of every rank asking for more than 2^62 rows), and
    ``fit`` with subnormal weights (flushed to zero on a CPU) said they were all zero."""
    with pytest.raises(
        ValueError, match="rank=about 10\\^400, beta=1 ask for about 10\\^404 rows .*check the rank"
    ):
        nj.sample_size(0.5, 0.1, rank=10**400)
    xs, ys = np.ones((5, 3), np.float32), np.ones(5, np.float32)
    kwargs = dict(optimizer=optax.sgd(0.1), num_steps=2)
    with pytest.raises(ValueError, match="weights sum to 0 in float32: .* below its smallest normal"):
        nj.fit(lambda p, x: x @ p, jnp.ones(3), xs, ys, weights=np.full(5, 1e-40, np.float32), **kwargs)
    with pytest.raises(ValueError, match="weights must not all be zero"):
        nj.fit(lambda p, x: x @ p, jnp.ones(3), xs, ys, weights=np.zeros(5, np.float32), **kwargs)


@pytest.mark.parametrize(
    "dtype, scale",
    [(np.float32, 1e-19), (np.float32, 1e-30), (np.float32, 1e30), (np.float64, 1e-154), (np.float64, 1e300)],
)
def test_streaming_norm_scores_at_extreme_scales(dtype, scale, tmp_path):
    """Streamed norm scores squared the dual rows unscaled: float32 data of 1e-19 scored 12 of 40 rows 0
    (0.015 off; host path summing to 1.10), 1e-30 was "the dual matrix is all zeros", 1e30 "the adjoint is
    NaN or Inf" (float64: 1e-154 and 1e300 the same), where norm_scores(dual_matrix(...)) is exact. Now
    each row's norm with its own power-of-two scale, squared relative to the largest: the exact
    probabilities of a linear model's dual [x | -y] on every path, a float32 memmap out of float64 scores
    included."""
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((40, 3)), rng.standard_normal(40)
    F = np.hstack([xs, -ys[:, None]])
    want = np.sum(F**2, axis=1) / np.sum(F**2)
    X, Y, theta = (xs * scale).astype(dtype), (ys * scale).astype(dtype), jnp.full(3, 0.3, dtype)

    def linear(t, x):
        return x @ t

    rtol = 1e-5 if dtype == np.float32 else 1e-12
    out = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(40,))
    for name, call in {
        "device": lambda: nj.streaming_norm_scores(linear, theta, jnp.asarray(X), jnp.asarray(Y)),
        "host": lambda: nj.streaming_norm_scores(linear, theta, X, Y, chunk_size=16),
        "out": lambda: nj.streaming_norm_scores(linear, theta, X, Y, chunk_size=16, out=out),
    }.items():
        if name == "out" and dtype == np.float32:
            continue  # the narrowing out (float32 out of float64 scores) only
        got = np.asarray(call(), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5 if name == "out" else rtol, err_msg=name)


def test_mixed_dtypes_follow_the_params():
    """float32 params with float64 data (x64 on): nj.adjoint returns float32 (the params' dtype), but the
    closed forms returned float64 and fit's final_loss was float64 beside float32 losses. All follow the
    params now, and agree with the float64 computation to float32's rounding."""
    rng = np.random.default_rng(0)
    theta64, xs = rng.normal(size=3) * 0.3, rng.normal(size=(20, 3))
    theta32 = theta64.astype(np.float32)
    single = nj.single_index_adjoint(jnp.tanh, theta32, xs)
    assert single.dtype == jnp.float32
    np.testing.assert_allclose(
        single, nj.single_index_adjoint(jnp.tanh, theta32.astype(np.float64), xs), rtol=1e-6
    )
    homog = nj.homogeneous_adjoint(lambda t, x: x @ t, theta32, xs, degree=1.0, g=jnp.tanh)
    assert homog.dtype == jnp.float32
    np.testing.assert_allclose(homog, single, rtol=1e-5)
    result = nj.fit(
        lambda t, x: x @ t, theta32, xs, rng.normal(size=20), optimizer=optax.sgd(1e-2), num_steps=3
    )
    assert result.losses.dtype == result.final_loss.dtype == jnp.float32


def test_tiny_ys_beside_large_ones_are_accepted():
    """float32 ``ys`` of size 1 with one ``3e-5`` among them, for float16 params, were refused ("become 0
    in the offset column"): about one target in 20,000 of a standard normal falls below float16's smallest
    normal number 6.1e-5, so realistic float16 fits failed. Losing it changes the column by less than the
    cast's own rounding of its largest entry (``eps16·2 = 2e-3``): accepted, as if cast first. A ``ys``
    whose every value is below ``tiny/eps`` (the column itself at the subnormal scale) is still refused."""

    def f(p, x):
        return jnp.tanh(x @ p)

    p = jnp.full(3, 0.2, jnp.float16)
    xs = jnp.ones((3, 3), jnp.float16)
    ys = jnp.asarray([1.0, 3e-5, -2.0], jnp.float32)
    got = nj.dual_matrix(f, p, xs, ys)
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(nj.dual_matrix(f, p, xs, ys.astype(jnp.float16)))
    )
    for call in (
        lambda: nj.streaming_leverage_scores(f, p, np.asarray(xs), np.asarray(ys)),
        lambda: nj.streaming_norm_scores(f, p, xs, ys),
    ):
        assert np.isfinite(np.asarray(call(), np.float32)).all()
    message = "ys has 1 non-zero value.s. below the smallest normal number of the params' dtype float16"
    for small in (jnp.asarray([1e-2, 3e-5, -2e-2], jnp.float32), np.asarray([1e-2, 3e-5, -2e-2], np.float32)):
        with pytest.raises(ValueError, match=message):
            nj.dual_matrix(f, p, xs, small)


def test_subnormal_ys_of_the_params_dtype_are_named():
    """float32 ys of 1e-39 (subnormal) with float32 params: the offset column f(0) − y was flushed to 0
    inside the compiled program, so every dual path gave rank 4 of 5 (probabilities 43% off) with no word,
    while float64 ys of the same values and leverage_scores of [X, −y] itself were refused (thirty-fifth
    session)."""

    def f(p, x):
        return x @ p

    rng = np.random.default_rng(3)
    xs = rng.standard_normal((40, 4)).astype(np.float32)
    ys = (rng.uniform(0.5, 1.0, 40) * 1e-39).astype(np.float32)
    assert np.all((ys != 0) & (np.abs(ys) < np.finfo(np.float32).smallest_normal))
    p = np.ones(4, np.float32)
    message = "ys has 40 non-zero value.s. below the smallest normal number of the params' dtype float32"
    for call in (
        lambda: nj.dual_matrix(f, p, xs, ys),
        lambda: nj.streaming_leverage_scores(f, p, jnp.asarray(xs), jnp.asarray(ys), chunk_size=16),
        lambda: nj.streaming_leverage_scores(f, p, xs, ys, chunk_size=16),
        lambda: nj.projected_leverage_scores(jax.random.key(0), f, p, xs, ys, dim=8),
    ):
        with pytest.raises(ValueError, match=message + r".*subnormal, they become 0"):
            call()
    ys[0] = 1.0  # a normal y beside them: their loss is below its own rounding, accepted as before
    assert np.isfinite(np.asarray(nj.dual_matrix(f, p, xs, ys))).all()


def test_subnormal_weights_of_a_weighted_loss_are_named_on_every_path():
    """float32 weights of 1e-39 gave a weighted loss of 0 on the device and host paths, though fit refused
    them; a negative subnormal weight passed the host path's count (made on the device, where it is 0)
    while the device path named it (thirty-fifth session)."""

    def f(p, x):
        return x @ p

    xs, ys, p = np.ones((6, 3), np.float32), np.zeros(6, np.float32), np.ones(3, np.float32)
    tiny_w = np.full(6, 1e-39, np.float32)
    message = "weights sum to 0 in float32: their non-zero values are below its smallest normal number"
    for data in ((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(tiny_w)), (xs, ys, tiny_w)):
        with pytest.raises(ValueError, match=message):
            nj.weighted_loss(f, p, *data)
    negative = np.ones(6, np.float32)
    negative[2] = -1e-39
    for data in ((jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(negative)), (xs, ys, negative)):
        with pytest.raises(ValueError, match="weights must be non-negative; 1 are negative"):
            nj.weighted_loss(f, p, *data)
    np.testing.assert_allclose(float(nj.weighted_loss(f, p, xs, ys, np.full(6, 0.5, np.float32))), 27.0)


def test_mix_advice_stays_within_zero_and_one():
    """For float16 at n = 16,380 the advice read "use alpha >= 1.01" though alpha = 1 passes; where even
    alpha = 1 cannot help (1/n below the smallest normal number) it advised an impossible alpha."""
    p = jnp.zeros(16_380, jnp.float16).at[0].set(1.0)
    with pytest.raises(ValueError, match=r"use alpha >= 1, or float32 probabilities\.$"):
        nj.mix_with_uniform(p, 0.5)
    assert float(jnp.min(nj.mix_with_uniform(p, 1.0))) >= float(jnp.finfo(jnp.float16).smallest_normal)
    p = jnp.zeros(20_000, jnp.float16).at[0].set(1.0)
    with pytest.raises(ValueError, match=r"no alpha <= 1 can \(1/n is below it too\); use float32"):
        nj.mix_with_uniform(p, 0.5)
