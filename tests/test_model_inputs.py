"""Bad model inputs of the adjoint, the dual matrix, the dual operator and active learning.

A gradient of ``apply_fn`` that is NaN or Inf on the path ``tθ`` (``sqrt``/``log`` singular at ``θ = 0``, an
argument out of its domain, overflow) raises instead of returning NaN rows; ``ys`` beyond the range of the
params' dtype is refused; the operator's ``mv``/``rmv`` refuse NaN or wrong shapes; ``apply_fn`` failing on
one example names the shapes; numpy scalars pass as ``rtol``/``alpha``; ``replace``/keys/``scores_fn`` are
checked. Each refusal has a valid neighbour checked against a numpy reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import nlis_jax as nj
from nlis_jax import _adaptive, _adjoint

N = 6
W = np.array([1.0, 0.5])
# x @ W: 1.5, -1.0, 2.0, 0.5, -0.5, 1.25 (two negative rows)
XS = np.array([[1.0, 1.0], [-1.0, 0.0], [1.5, 1.0], [0.0, 1.0], [0.5, -2.0], [1.0, 0.5]])
YS = np.linspace(-1.0, 1.0, N)


def sqrt_model(params, x):
    return jnp.sqrt(x @ params["w"])


def shifted_sqrt(params, x):  # finite on the whole ray for x @ w > -1
    return jnp.sqrt(1.0 + x @ params["w"])


def linear(params, x):
    return x @ params["w"] + params["b"]


def log_model(params, x):  # log(0) = -inf at θ = 0; the gradient is finite at the nodes
    return jnp.log(x @ params["w"] + params["b"])


def _shifted_sqrt_adjoint(xs, w):
    """Closed form: ∫_0^1 x / (2 sqrt(1 + t z)) dt = x (sqrt(1 + z) − 1) / z, z = x·w."""
    z = xs @ w
    return xs * ((np.sqrt(1.0 + z) - 1.0) / z)[:, None]


# ------------------------------------------------------------------------------------------------
# a gradient that is not finite on the path


@pytest.mark.parametrize("num_nodes", [4, None])
def test_nonfinite_gradient_on_the_path_raises(num_nodes):
    with pytest.raises(
        ValueError, match=r"adjoint is NaN or Inf for 2 of 6 examples: the gradient of apply_fn"
    ):
        nj.adjoint(sqrt_model, {"w": W}, XS, num_nodes=num_nodes)
    with pytest.raises(ValueError, match=r"singular at θ = 0, such as sqrt or log"):
        nj.dual_matrix(sqrt_model, {"w": W}, XS, YS, num_nodes=num_nodes)


def test_singular_at_zero_raises_in_the_adaptive_refinement():
    """sqrt(x·w) with x·w > 0: finite at the first pass's nodes, Inf at the refined panel's end t = 0."""
    pos = np.abs(XS) + 0.1
    with pytest.raises(ValueError, match=r"adjoint is NaN or Inf for 6 of 6 examples"):
        nj.adjoint(sqrt_model, {"w": W}, pos)


def test_overflowing_adjoint_raises():
    """Finite inputs whose gradient overflows float32 (exp(100) > 3.4e38)."""
    params = {"w": np.array([100.0, 0.0], np.float32)}
    xs = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"adjoint is NaN or Inf for 3 of 3 .* or overflow"):
        nj.adjoint(lambda p, x: jnp.exp(x @ p["w"]), params, xs, num_nodes=4)


def test_nonfinite_offset_raises():
    params = {"w": W, "b": np.asarray(2.0)}
    with pytest.raises(
        ValueError, match=r"offset column f\(0\) − y of the dual matrix is NaN or Inf for 6 of 6"
    ):
        nj.dual_matrix(log_model, params, XS, YS, num_nodes=4)
    with pytest.raises(ValueError, match=r"offset column f\(0\) − y"):
        nj.dual_operator(log_model, params, XS, YS, num_nodes=4)


def test_nonfinite_adjoint_under_checkify():
    def adj(p, x):
        with nj.traced_checks():
            return nj.adjoint(sqrt_model, p, x, num_nodes=4)

    checked = jax.jit(checkify.checkify(adj, errors=checkify.user_checks))
    assert "adjoint is NaN or Inf for some examples" in checked({"w": W}, XS)[0].get()
    assert checked({"w": W}, np.abs(XS) + 0.1)[0].get() is None


def test_nan_error_is_never_converged_and_is_reported():
    nan, ones = np.array([np.nan, 0.0]), np.ones(2)
    state = _adaptive._State(None, nan, np.zeros(2), ones, np.array([np.nan, 1.0]), np.zeros(2, bool))
    conv = _adaptive._converged(state, 1e-6, 1e-6)
    assert conv.tolist() == [False, True]
    missed = _adaptive._missed(
        state.error, state.residual, conv, state.roundoff, _adaptive._finite(state), np
    )
    assert [group[0] for group in missed] == [0, 0, 1]
    with pytest.warns(nj.QuadratureWarning, match=r"1 with a NaN or Inf integral or check residual"):
        _adaptive._warn(missed, 2, rtol=1e-6, check_tol=1e-6, max_panels=8)


@pytest.mark.parametrize("num_nodes", [16, None])
def test_finite_gradient_on_the_path_is_unchanged(num_nodes):
    w = np.array([0.3, 0.2])
    adj = nj.adjoint(shifted_sqrt, {"w": w}, XS, num_nodes=num_nodes)
    np.testing.assert_allclose(adj, _shifted_sqrt_adjoint(XS, w), rtol=1e-10)
    dual = nj.dual_matrix(shifted_sqrt, {"w": w}, XS, YS, num_nodes=num_nodes)
    np.testing.assert_allclose(dual[:, -1], 1.0 - YS, rtol=1e-15)


# ------------------------------------------------------------------------------------------------
# ys beyond the range of the params' dtype


@pytest.mark.parametrize("as_device", [False, True])
def test_ys_beyond_the_params_dtype(as_device):
    params = {"w": W.astype(np.float32), "b": np.asarray(0.5, np.float32)}
    ys = YS * 1e300
    ys = jnp.asarray(ys) if as_device else ys
    with pytest.raises(
        ValueError, match=r"ys has 6 value\(s\) beyond the range of the params' dtype float32"
    ):
        nj.dual_matrix(linear, params, XS.astype(np.float32), ys, num_nodes=4)


def test_ys_within_the_params_dtype():
    params = {"w": W.astype(np.float32), "b": np.asarray(0.5, np.float32)}
    ys = YS * 1e37  # float64, representable in float32
    dual = nj.dual_matrix(linear, params, XS.astype(np.float32), ys, num_nodes=4)
    assert dual.dtype == jnp.float32
    np.testing.assert_allclose(dual[:, -1], (np.float32(0.5) - ys.astype(np.float32)), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# the operator's vectors


def test_operator_refuses_bad_vectors():
    op = nj.dual_operator(linear, {"w": W, "b": np.asarray(0.5)}, XS, YS, num_nodes=4)
    with pytest.raises(ValueError, match=r"mv: v contains 1 NaN or Inf"):
        op.mv(np.array([1.0, np.nan, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"rmv: u contains 6 NaN or Inf"):
        op.rmv(jnp.full(N, jnp.inf))
    with pytest.raises(ValueError, match=r"mv expects a vector of shape \(4,\), got v of shape \(3,\)"):
        op.mv(np.ones(3))
    with pytest.raises(ValueError, match=r"rmv expects an array of shape \(6,\), got u of shape \(6, 1\)"):
        op.rmv(np.ones((N, 1)))
    with pytest.raises(TypeError, match=r"mv expects a vector of real numbers, got v of dtype complex"):
        op.mv(np.ones(4, complex))


def test_operator_products_are_unchanged():
    op = nj.dual_operator(linear, {"w": W, "b": np.asarray(0.5)}, XS, YS, num_nodes=4)
    dense = np.column_stack([np.ones(N), XS, -YS])  # [1, x | f(0) − y] (ravel order: b, w), f(0) = 0
    v, u = np.array([1.0, -2.0, 0.5, 3.0]), np.arange(N, dtype=float)
    np.testing.assert_allclose(op.mv(v), dense @ v, rtol=1e-14)
    np.testing.assert_allclose(op.rmv(u), dense.T @ u, rtol=1e-14)
    np.testing.assert_allclose(op.mv(list(v)), dense @ v, rtol=1e-14)


# ------------------------------------------------------------------------------------------------
# numpy and 0-d array scalars for rtol and alpha


def test_rtol_numpy_scalars():
    for rtol in (np.float32(1e-3), np.float64(1e-6), jnp.asarray(1e-6), 1e-6):
        _adjoint.check_path_args(None, "auto", None, rtol)
    with pytest.raises(TypeError, match=r"rtol must be a real number, got True"):
        _adjoint.check_path_args(None, "auto", None, True)
    with pytest.raises(TypeError, match=r"rtol must be a real number, got 'x'"):
        _adjoint.check_path_args(None, "auto", None, "x")
    for bad in (np.nan, 0.0, 1.0, np.float32(2.0)):
        with pytest.raises(ValueError, match=r"rtol must be a number in \(0, 1\)"):
            _adjoint.check_path_args(None, "auto", None, bad)


def test_rtol_numpy_scalar_gives_the_same_adjoint():
    w = np.array([0.3, 0.2])
    a = nj.adjoint(shifted_sqrt, {"w": w}, XS, rtol=np.float32(1e-6))
    b = nj.adjoint(shifted_sqrt, {"w": w}, XS, rtol=float(np.float32(1e-6)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, _shifted_sqrt_adjoint(XS, w), rtol=1e-5)


def _pool():
    scores = np.array([0.5, 1.0, 2.0, 0.0, 1.5, 1.0])
    mask = np.array([True, False, False, False, True, False])
    return scores, mask


def test_alpha_numpy_scalars():
    scores, mask = _pool()
    pool = ~mask
    ref = np.where(pool, 0.75 * scores * pool / np.sum(scores * pool) + 0.25 / pool.sum(), 0)
    for alpha in (np.float32(0.25), jnp.asarray(0.25), 0.25):
        np.testing.assert_allclose(nj.active.pool_probabilities(scores, mask, alpha=alpha), ref, rtol=1e-15)
    key = jax.random.key(0)
    a = nj.query(key, scores, mask, 2, alpha=np.float32(0.1))
    b = nj.query(key, scores, mask, 2, alpha=float(np.float32(0.1)))
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.weights, b.weights)
    config = nj.ActiveConfig(seed_size=2, batch=1, rounds=1, alpha=np.float32(0.5))
    assert config.alpha == 0.5 and isinstance(config.alpha, float) and hash(config)
    for bad, error, match in [
        (np.nan, ValueError, r"alpha must be a number in \[0, 1\], got nan"),
        (np.float32(1.5), ValueError, r"alpha must be a number in \[0, 1\]"),
        (True, TypeError, r"alpha must be a real number, got True"),
        ("x", TypeError, r"alpha must be a real number, got 'x'"),
    ]:
        with pytest.raises(error, match=match):
            nj.query(key, scores, mask, 2, alpha=bad)
        with pytest.raises(error, match=match):
            nj.ActiveConfig(seed_size=2, batch=1, rounds=1, alpha=bad)


# ------------------------------------------------------------------------------------------------
# apply_fn failing on one example


@pytest.mark.parametrize(
    "params, xs, shown, cause",
    [
        ({"w": W, "b": np.asarray(0.5)}, XS[:, :1], r"x shape \(1,\)", TypeError),  # wrong width
        ({"w": W, "b": np.asarray(0.5)}, XS[:, 0], r"x shape \(\)", ValueError),  # 1-D xs
        ({"w": W}, XS, r"params\['w'\] shape \(2,\)\): KeyError: 'b'", KeyError),  # missing leaf
        ({"w": W[:1], "b": np.asarray(0.5)}, XS, r"params\['w'\] shape \(1,\)", TypeError),  # wrong shape
    ],
)
def test_apply_fn_failing_on_one_example(params, xs, shown, cause):
    with pytest.raises(ValueError, match=r"apply_fn\(params, x\) failed on one example x = xs\[0\]") as info:
        nj.adjoint(linear, params, xs, num_nodes=4)
    assert isinstance(info.value.__cause__, cause)
    with pytest.raises(ValueError, match=shown):
        nj.dual_matrix(linear, params, xs, None, num_nodes=4)


@pytest.mark.parametrize(
    "output", [lambda a, b: (a, b), lambda a, b: {"a": a, "b": b}, lambda a, b: [jnp.stack([a, b])]]
)
def test_apply_fn_returning_several_arrays_is_refused_everywhere(output):
    """A model returning a tuple (or dict) of outputs failed the scores with a bare AttributeError ("'tuple'
    object has no attribute 'shape'") while fit stacked the tuple and trained on it: every entry point now
    gives the same ValueError, which names the output's parts and the fix (stack them); the stacked model
    trains as before."""
    params = {"w": W, "b": np.asarray(0.5)}
    ys2 = np.column_stack([YS, -YS])

    def several(params, x):
        return output(jnp.tanh(x @ params["w"]), params["b"] * x[0])

    calls = [
        lambda f: nj.adjoint(f, params, XS, num_nodes=4),
        lambda f: nj.dual_matrix(f, params, XS, ys2, num_nodes=4),
        lambda f: nj.streaming_leverage_scores(f, params, XS, ys2, num_nodes=4),
        lambda f: nj.streaming_norm_scores(f, params, np.asarray(XS), ys2, num_nodes=4),  # host path
        lambda f: nj.label_free_leverage_scores(f, params, XS, num_nodes=4),
        lambda f: nj.weighted_loss(f, params, XS, ys2),
        lambda f: nj.fit(f, params, XS, ys2, optimizer=optax.sgd(0.1), num_steps=2),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"must return one array .* stack the outputs into one vector"):
            call(several)

    def stacked(params, x):
        return jnp.stack([jnp.tanh(x @ params["w"]), params["b"] * x[0]])

    direct = jax.vmap(stacked, in_axes=(None, 0))(params, XS)
    np.testing.assert_allclose(
        nj.weighted_loss(stacked, params, XS, ys2), np.sum((direct - ys2) ** 2), rtol=1e-14
    )


def test_apply_fn_on_good_inputs_is_unchanged():
    adj = nj.adjoint(linear, {"w": W, "b": np.asarray(0.5)}, XS, num_nodes=4)
    np.testing.assert_allclose(adj, np.column_stack([np.ones(N), XS]), rtol=1e-15)  # ravel order: b, w


# ------------------------------------------------------------------------------------------------
# replace, keys, scores_fn


def test_query_replace_and_key():
    scores, mask = _pool()
    key = jax.random.key(3)
    with pytest.raises(TypeError, match=r"replace must be True or False, got 'x'"):
        nj.query(key, scores, mask, 2, replace="x")
    with pytest.raises(TypeError, match=r"key must be a PRNG key, e.g. jax.random.key\(0\), got 0"):
        nj.query(0, scores, mask, 2)
    with pytest.raises(TypeError, match=r"replace must be True or False, got 'no'"):
        nj.ActiveConfig(seed_size=2, batch=1, rounds=1, replace="no")
    a = nj.query(key, scores, mask, 2, replace=np.bool_(True))
    b = nj.query(key, scores, mask, 2, replace=True)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert nj.query(jax.random.PRNGKey(0), scores, mask, 2).indices.shape == (2,)  # raw uint32 key


def _loop(key, scores_fn):
    params = {"w": W, "b": np.asarray(0.5)}
    config = nj.ActiveConfig(seed_size=2, batch=2, rounds=1)
    return nj.active_learning(
        key, params, XS, lambda idx: YS[idx], fit_fn=lambda p, x, y, w: p, scores_fn=scores_fn, config=config
    )


def test_active_learning_key_and_scores_fn():
    with pytest.raises(TypeError, match=r"key must be a PRNG key"):
        _loop(0, lambda p, x: jnp.ones(N))
    match = r"scores_fn must return one score per point of xs: expected shape \(6,\), got shape \(5,\)"
    with pytest.raises(ValueError, match=match):
        _loop(jax.random.key(0), lambda p, x: jnp.ones(N - 1))
    result = _loop(jax.random.key(0), lambda p, x: jnp.ones(N))
    assert result.order.size == 4 and np.unique(result.order).size == 4
    np.testing.assert_array_equal(result.labels[result.order], YS[result.order])


def test_active_learning_names_a_leverage_or_a_fit_result_where_arrays_belong():
    """A Leverage (return_info=True) given as scores to query / pool_probabilities, or returned by
    scores_fn, failed with JAX's "Cannot concatenate arrays with different numbers of dimensions" or numpy's
    "setting an array element with a sequence"; a fit_fn returning the FitResult (not its .params) failed a
    round later as an apply_fn error about the layout of xs. Each is now named, as sample names a Leverage."""
    info = nj.leverage_scores(jnp.asarray(XS), return_info=True)
    mask = np.zeros(N, bool)
    with pytest.raises(
        TypeError, match=r"scores must be a vector of one value per point, got a Leverage: pass"
    ):
        nj.query(jax.random.key(0), info, mask, 2)
    with pytest.raises(TypeError, match=r"scores must be a vector of one value per point, got a Leverage"):
        nj.active.pool_probabilities(info, mask)
    match = r"scores_fn\(params, xs\) must be a vector of one value per point, got a Leverage"
    with pytest.raises(TypeError, match=match):
        _loop(jax.random.key(0), lambda p, x: nj.leverage_scores(jnp.asarray(x), return_info=True))
    params = {"w": W, "b": np.asarray(0.5)}
    config = nj.ActiveConfig(seed_size=2, batch=2, rounds=1)

    def fit_fn(p, x, y, w):  # the whole FitResult, as a user who forgets .params writes it
        return nj.fit(linear, p, x, y, w, optimizer=optax.sgd(0.01), num_steps=2)

    match = r"fit_fn must return the fitted params, .* got a FitResult .*: return its \.params"
    with pytest.raises(ValueError, match=match):
        nj.active_learning(
            jax.random.key(0),
            params,
            XS,
            lambda i: YS[i],
            fit_fn=fit_fn,
            scores_fn=lambda p, x: jnp.ones(N),
            config=config,
        )


# --- the streaming and projected paths: the dual rows are computed inside the library's own programs ---

SQ = {"w": np.array([1.0, 0.5])}
XPOS = np.abs(XS) + 0.1  # x @ w > 0: sqrt(t · x @ w) is singular only at t = 0


@pytest.mark.parametrize("host", [True, False])
def test_streaming_leverage_of_a_singular_gradient_raises(host):
    """The adaptive rule reaches t = 0, where the gradient of sqrt(t x @ w) is infinite: the streaming
    scores name that, on host data (counted per example in the first pass) and on device arrays (the
    scores of the one program), instead of "the dual matrix is all zeros" or NaN probabilities."""
    xs, ys = (XPOS, YS) if host else (jnp.asarray(XPOS), jnp.asarray(YS))
    count = f"{N} of {N}" if host else "some"
    message = rf"the dual matrix \[F\* \| f\(0\) − y\] is NaN or Inf for {count} examples"
    with pytest.raises(ValueError, match=message):
        nj.streaming_leverage_scores(sqrt_model, SQ, xs, ys, chunk_size=4)


def log_w(params, x):  # -inf at θ = 0 (the offset column), finite on (0, 1]
    return jnp.log(x @ params["w"])


@pytest.mark.parametrize("host", [True, False])
def test_streaming_norm_scores_of_a_nonfinite_offset_raise(host):
    """log(x @ w) at θ = 0 is -inf: the offset column f(0) − y is not finite for every example."""
    xs, ys = (XPOS, YS) if host else (jnp.asarray(XPOS), jnp.asarray(YS))
    with pytest.raises(ValueError, match=rf"\] is NaN or Inf for {N} of {N} .*The offset f\(0\) − y: apply"):
        nj.streaming_norm_scores(log_w, SQ, xs, ys, chunk_size=4, num_nodes=4)


def test_projected_scores_of_a_nonfinite_offset_raise():
    with pytest.raises(ValueError, match=rf"\] is NaN or Inf for {N} of {N} .*The offset f\(0\) − y: apply"):
        nj.projected_leverage_scores(jax.random.key(0), log_w, SQ, XPOS, YS, dim=3, embedding="gaussian")


@pytest.mark.parametrize("host", [True, False])
def test_streaming_scores_of_a_finite_model_are_unchanged(host):
    """The counts ride along in the same programs: scores equal the dense route's, padding included
    (n = 6 in chunks of 4)."""
    xs, ys = (XPOS, YS) if host else (jnp.asarray(XPOS), jnp.asarray(YS))
    F = np.asarray(nj.dual_matrix(shifted_sqrt, SQ, XPOS, YS, num_nodes=8))
    U = np.linalg.svd(F, full_matrices=False)[0]
    lev = np.asarray(nj.streaming_leverage_scores(shifted_sqrt, SQ, xs, ys, chunk_size=4, num_nodes=8))
    np.testing.assert_allclose(lev, np.sum(U**2, axis=1) / 3, rtol=1e-10)
    norms = np.asarray(nj.streaming_norm_scores(shifted_sqrt, SQ, xs, ys, chunk_size=4, num_nodes=8))
    np.testing.assert_allclose(norms, np.sum(F**2, axis=1) / np.sum(F**2), rtol=1e-12)


def test_host_ys_beyond_the_params_dtype():
    params = {"w": W.astype(np.float32)}
    with pytest.raises(ValueError, match="ys has 2 value.s. beyond the range of the params' dtype float32"):
        nj.streaming_norm_scores(linear_w, params, XS, np.r_[1e300, -1e300, YS[2:]], num_nodes=4)


def test_matrix_outputs_are_refused_by_the_host_scores_too():
    """A model with a (2, 2) output per example was refused by the dense and device paths ("a scalar or
    a vector of k outputs") but scored on the host paths (numpy xs, chunk sources, label-free scores with
    chunk_size) as its flattened vector. Every scoring path now refuses it; the losses are unchanged."""
    params = {"w": W}

    def matrix(params, x):
        return jnp.outer(jnp.tanh(x * params["w"]), jnp.asarray([1.0, 2.0]))

    def chunks():
        yield XS[:3], None
        yield XS[3:], None

    calls = [
        lambda: nj.streaming_leverage_scores(matrix, params, XS, num_nodes=4),
        lambda: nj.streaming_norm_scores(matrix, params, XS, num_nodes=4),
        lambda: nj.streaming_leverage_scores(matrix, params, chunks, num_nodes=4),
        lambda: nj.label_free_leverage_scores(matrix, params, XS, chunk_size=3, num_nodes=4),
        lambda: nj.label_free_leverage_scores(matrix, params, jnp.asarray(XS), num_nodes=4),
    ]
    for call in calls:
        with pytest.raises(
            ValueError, match=r"must return a scalar or a vector of k outputs .* got shape \(2, 2\)"
        ):
            call()


def test_integer_ys_of_the_scores_are_refused_on_every_path():
    """Integer responses were refused by dual_matrix and the device streaming path ("ys must hold
    floating-point arrays") but scored on the host path (numpy arrays, a chunk source), whose docstring
    promises the result of leverage_scores(dual_matrix(...)). Every path now refuses them; the same
    responses as floats score as the dense route."""
    params = {"w": W}
    ys = np.arange(N) % 3
    device = (jnp.asarray(XS), jnp.asarray(ys))

    def chunks():
        yield XS[:3], ys[:3]
        yield XS[3:], ys[3:]

    for scores in (nj.streaming_leverage_scores, nj.streaming_norm_scores):
        for xs, y in ((XS, ys), device, (chunks, None)):
            with pytest.raises(TypeError, match="must hold floating-point arrays, got dtype int"):
                scores(linear_w, params, xs, y, num_nodes=4)
    with pytest.raises(TypeError, match="ys must hold floating-point arrays"):
        nj.dual_matrix(linear_w, params, XS, ys, num_nodes=4)
    dense = nj.leverage_scores(nj.dual_matrix(linear_w, params, XS, ys.astype(float), num_nodes=4))
    host = nj.streaming_leverage_scores(linear_w, params, XS, ys.astype(float), num_nodes=4)
    np.testing.assert_allclose(host, dense, rtol=1e-12)


def linear_w(params, x):
    return x @ params["w"]


def test_chunk_source_of_the_wrong_width_names_the_shapes():
    def source():
        yield XS[:3, :1], YS[:3]  # one column where the model reads two

    with pytest.raises(ValueError, match=r"apply_fn\(params, x\) failed on one example"):
        nj.streaming_leverage_scores(linear_w, {"w": W}, source, num_nodes=4)


@pytest.mark.parametrize("x64", [True, False])
def test_shapes_from_leaf_types_equal_jax_eval_shape(x64):
    """``_adjoint.params_shape`` and ``_adaptive.example_shapes`` read shapes and dtypes from the leaves'
    types instead of tracing (each ``jax.eval_shape`` cost ~0.1 ms an eager call): they equal
    ``jax.eval_shape`` of ``ravel_pytree(params)[0]`` and of ``xs[0]`` leaf for leaf (dtype promotion of
    mixed leaves, Python floats, half precision, numpy float64 without x64, integer, boolean and key
    leaves, weak types)."""
    from jax.flatten_util import ravel_pytree

    with jax.enable_x64(x64):
        params_cases = [
            {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)},
            {"w": jnp.ones((3, 2), jnp.float32), "b": np.zeros(2)},  # numpy float64
            [jnp.ones(3, jnp.bfloat16), jnp.ones(2, jnp.float16)],
            (jnp.ones(4, jnp.float16), 0.5),  # a Python float leaf
            {"s": jnp.asarray(2.0), "v": jnp.ones((2, 2, 2), jnp.bfloat16)},
        ]
        for params in params_cases:
            want = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
            got = _adjoint.params_shape(params)
            assert (got.shape, got.dtype) == (want.shape, want.dtype), params
        xs = {
            "f64": np.ones((5, 3)),
            "f32": jnp.ones((5, 2, 2), jnp.float32),
            "i": np.arange(5),
            "b": jnp.ones(5, bool),
            "k": jax.random.split(jax.random.key(0), 5),
            "weak": jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0]) * 2,
        }
        want = jax.eval_shape(_adaptive.first_example, xs)
        got = _adaptive.example_shapes(xs)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert (g.shape, g.dtype, g.weak_type) == (w.shape, w.dtype, w.weak_type)


def test_python_list_ys_and_linear_xs_match_arrays():
    """A Python list ys (dual_matrix, dual_operator, fit) or xs/ys (the linear baselines) reached
    ``jnp.shape``/``jnp.ndim`` of a list: jax's DeprecationWarning (an error under this suite's filters,
    and in a later jax). Lists now give the values of the same arrays."""
    import optax

    def model(params, x):
        return jnp.tanh(x @ params["w"]) + params["b"]

    params = {"w": jnp.asarray(W), "b": jnp.asarray(0.1)}
    ys = YS.tolist()
    dual = nj.dual_matrix(model, params, XS, YS)
    np.testing.assert_array_equal(nj.dual_matrix(model, params, XS, ys), dual)
    theta = np.array([0.3, -0.2, 0.5, 1.0])
    np.testing.assert_array_equal(
        nj.dual_operator(model, params, XS, ys).mv(theta), nj.dual_operator(model, params, XS, YS).mv(theta)
    )
    opt = optax.sgd(0.1)
    fitted = [nj.fit(model, params, XS, y, optimizer=opt, num_steps=3).params["w"] for y in (ys, YS)]
    np.testing.assert_array_equal(*fitted)
    for scores in (nj.linear_leverage_scores, nj.linear_norm_scores):
        np.testing.assert_array_equal(scores(XS.tolist(), ys), scores(XS, YS))
    with pytest.raises(ValueError, match=r"ys has shape \(5,\) but the model gives outputs of shape \(6,\)"):
        nj.dual_matrix(model, params, XS, ys[:5])


def test_linear_scores_of_xs_without_features_name_xs():
    """xs of shape (n, 0) with no bias and no ys: the error named the route's internal "F"."""
    with pytest.raises(ValueError, match=r"xs has no features \(shape \(6, 0\)\) and neither bias=True"):
        nj.linear_leverage_scores(np.zeros((6, 0)))
    np.testing.assert_allclose(nj.linear_leverage_scores(np.zeros((6, 0)), bias=True), np.full(6, 1 / 6))


def test_streamed_offset_overflow_is_not_blamed_on_the_gradient():
    """f(0) − y past float16's range (4e4 − (−4e4)): the streaming scores said "the adjoint is NaN or Inf
    ... the gradient of apply_fn is not finite" although the adjoint is finite (``nj.adjoint`` of the same
    inputs); ``dual_matrix`` named the offset. The streamed passes do not tell the two apart: their
    message now names both, the offset's overflow first."""

    def offset_model(theta, x):
        return 4e4 + x @ theta

    theta = jnp.ones(3, jnp.float16)
    xs = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 3)), jnp.float16)
    ys = jnp.full(16, -4e4, jnp.float16)
    assert bool(jnp.all(jnp.isfinite(nj.adjoint(offset_model, theta, xs))))
    for call in (nj.streaming_norm_scores, nj.streaming_leverage_scores):
        for x, y in ((xs, ys), (np.asarray(xs), np.asarray(ys))):
            with pytest.raises(ValueError, match="f\\(0\\) − y is past the range of the params' dtype"):
                call(offset_model, theta, x, y)
