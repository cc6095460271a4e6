"""Compile guard: entry points do not retrace ``apply_fn`` or recompile on a second call with new values of
the same shapes; every public function also works inside a user's own ``jax.jit`` (shape checks still
raise there).

Compiles are counted with ``jax.monitoring`` (the backend-compile event that every XLA compilation emits,
eager single-op dispatch included); traces of ``apply_fn`` with a Python counter inside it.
"""

from __future__ import annotations

import collections
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import COMPILE_EVENT, count_events, mlp, mlp_params

import nlis_jax as nj

N, D = 36, 3


def _make_model():
    """A fresh ``apply_fn`` (new function object, so a new cache key) and its trace counter."""
    traces = collections.Counter()

    def apply_fn(params, x):
        traces["apply_fn"] += 1
        return jnp.tanh(x @ params["w"] + params["b"])

    return apply_fn, traces


def _data(seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal(D)), "b": jnp.asarray(rng.standard_normal())}
    return params, jnp.asarray(rng.standard_normal((N, D))), jnp.asarray(rng.standard_normal(N))


def _second_call_is_free(fn, first_args, second_args, traces=None, expect_first_compile=True):
    with count_events() as first:
        a = jax.block_until_ready(fn(*first_args))
    before = dict(traces or {})
    with count_events() as second:
        b = jax.block_until_ready(fn(*second_args))
    if expect_first_compile:
        assert first[COMPILE_EVENT] >= 1  # the guard is not vacuous
    assert second[COMPILE_EVENT] == 0, f"recompiled {second[COMPILE_EVENT]} time(s) on the second call"
    if traces is not None:
        assert dict(traces) == before, "apply_fn was traced again on the second call"
    return a, b


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_adjoint_no_recompile(mode):
    apply_fn, traces = _make_model()
    p1, x1, _ = _data(0)
    p2, x2, _ = _data(1)
    a, b = _second_call_is_free(
        lambda p, x: nj.adjoint(apply_fn, p, x, mode=mode), (p1, x1), (p2, x2), traces
    )
    assert traces["apply_fn"] >= 1 and not np.allclose(a, b)


def test_dual_matrix_and_leverage_no_recompile():
    apply_fn, traces = _make_model()
    (p1, x1, y1), (p2, x2, y2) = _data(2), _data(3)
    _second_call_is_free(
        lambda p, x, y: nj.dual_matrix(apply_fn, p, x, y), (p1, x1, y1), (p2, x2, y2), traces
    )
    F1, F2 = nj.dual_matrix(apply_fn, p1, x1, y1), nj.dual_matrix(apply_fn, p2, x2, y2)
    _second_call_is_free(nj.leverage_scores, (F1,), (F2,), expect_first_compile=False)
    _second_call_is_free(nj.norm_scores, (F1,), (F2,), expect_first_compile=False)


def test_dual_operator_no_recompile():
    apply_fn, traces = _make_model()
    (p1, x1, y1), (p2, x2, y2) = _data(4), _data(5)
    op1 = nj.dual_operator(apply_fn, p1, x1, y1)
    v1, v2 = jnp.arange(D + 2.0), jnp.ones(D + 2)
    u1, u2 = jnp.arange(float(N)), jnp.ones(N)
    _second_call_is_free(op1.mv, (v1,), (v2,), traces)
    _second_call_is_free(op1.rmv, (u1,), (u2,), traces)
    # a new operator for new data of the same shapes reuses the compiled products
    op2 = nj.dual_operator(apply_fn, p2, x2, y2)
    before = dict(traces)
    with count_events() as counts:
        jax.block_until_ready((op2.mv(v1), op2.rmv(u1)))
    assert counts[COMPILE_EVENT] == 0 and dict(traces) == before


_INT_OPTIONS = {
    "adjoint num_nodes": lambda f, p, x, y, v: nj.adjoint(f, p, x, num_nodes=v),
    "adjoint chunk_size": lambda f, p, x, y, v: nj.adjoint(f, p, x, num_nodes=4, chunk_size=v),
    "dual_matrix num_nodes": lambda f, p, x, y, v: nj.dual_matrix(f, p, x, y, num_nodes=v),
    "streaming_leverage_scores num_nodes": lambda f, p, x, y, v: nj.streaming_leverage_scores(
        f, p, x, y, num_nodes=v, chunk_size=12
    ),
    "streaming_leverage_scores chunk_size": lambda f, p, x, y, v: nj.streaming_leverage_scores(
        f, p, x, y, num_nodes=4, chunk_size=v
    ),
    "streaming_norm_scores host": lambda f, p, x, y, v: nj.streaming_norm_scores(
        f, p, np.asarray(x), np.asarray(y), num_nodes=v, chunk_size=v
    ),
    "projected_leverage_scores dim": lambda f, p, x, y, v: nj.projected_leverage_scores(
        jax.random.key(0), f, p, x, y, dim=2 * v, num_nodes=4
    ),
    "label_free_leverage_scores num_nodes": lambda f, p, x, y, v: nj.label_free_leverage_scores(
        f, p, x, num_nodes=v
    ),
}


@pytest.mark.parametrize("call", list(_INT_OPTIONS), ids=list(_INT_OPTIONS))
def test_numpy_integer_options_reuse_the_compiled_program(call):
    """Integer options that are static arguments of the library's jits (``num_nodes``, ``chunk_size``,
    ``dim``) were passed on as given: jax keys ``8`` and ``np.int64(8)`` apart, so a sweep over
    ``np.arange`` values compiled every program a second time. They are taken as Python ints."""
    apply_fn, _ = _make_model()
    params, xs, ys = _data(0)
    fn = functools.partial(_INT_OPTIONS[call], apply_fn, params, xs, ys)
    _second_call_is_free(fn, (6,), (np.int64(6),))
    _second_call_is_free(fn, (np.int32(6),), (6,), expect_first_compile=False)


def test_sample_and_distortion_no_recompile():
    rng = np.random.default_rng(0)
    F1, F2 = (jnp.asarray(rng.standard_normal((N, 4))) for _ in range(2))
    p1, p2 = nj.leverage_scores(F1), nj.leverage_scores(F2)
    for replace in (True, False):
        _second_call_is_free(
            lambda k, p, replace=replace: nj.sample(k, p, 7, replace=replace),
            (jax.random.key(0), p1),
            (jax.random.key(1), p2),
            expect_first_compile=False,
        )
    U1, U2 = nj.orthonormal_basis(F1)[0], nj.orthonormal_basis(F2)[0]
    i1, w1 = nj.sample(jax.random.key(2), p1, 7)
    i2, w2 = nj.sample(jax.random.key(3), p2, 7)
    _second_call_is_free(
        lambda U, i, w: nj.distortion(None, i, w, basis=U),
        (U1, i1, w1),
        (U2, i2, w2),
        expect_first_compile=False,
    )
    _second_call_is_free(
        lambda F, i, w: nj.distortion(F, i, w), (F1, i1, w1), (F2, i2, w2), expect_first_compile=False
    )


def test_route_building_blocks_no_recompile():
    """routes.decide, refine_transform and apply_transform (the building blocks for rows seen through
    passes) called alone built their conditionals anew each call: one compilation per call (decide
    0.4 s). Jitted now: a second call with new values compiles nothing."""
    rng = np.random.default_rng(1)
    A1, A2 = (jnp.asarray(rng.standard_normal((N, 4))) for _ in range(2))
    G1, G2 = A1.T @ A1, A2.T @ A2
    rtol = jnp.asarray(1e-10)
    _second_call_is_free(lambda G: nj.routes.decide(G, rtol=rtol), (G1,), (G2,))
    _second_call_is_free(nj.routes.refine_transform, (G1,), (G2,))
    t1 = nj.routes.transform_from_passes(
        G1, lambda M: (A1 @ M).T @ (A1 @ M), lambda: jnp.linalg.qr(A1, mode="r"), rtol
    )
    t2 = nj.routes.transform_from_passes(
        G2, lambda M: (A2 @ M).T @ (A2 @ M), lambda: jnp.linalg.qr(A2, mode="r"), rtol
    )
    _second_call_is_free(lambda A, t: nj.routes.apply_transform(A, t, row_norms=True), (A1, t1), (A2, t2))


def test_user_jit_traces_once():
    """``@jax.jit`` over ``@chex.assert_max_traces(n=1)``: a user's pipeline is traced once."""
    apply_fn, _ = _make_model()
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def pipeline(params, xs, ys, key):
        F = nj.dual_matrix(apply_fn, params, xs, ys)
        probs = nj.mix_with_uniform(nj.leverage_scores(F), 0.1)
        idx, w = nj.sample(key, probs, 8)
        return probs, idx, w, nj.distortion(F, idx, w)

    (p1, x1, y1), (p2, x2, y2) = _data(6), _data(7)
    pipeline(p1, x1, y1, jax.random.key(0))
    with count_events() as counts:
        jax.block_until_ready(pipeline(p2, x2, y2, jax.random.key(1)))
    assert counts[COMPILE_EVENT] == 0


def _svd_h(A):
    U, sv, _ = np.linalg.svd(A, full_matrices=False)
    r = int(np.sum(sv > 1e-12 * sv[0]))
    return np.sum(U[:, :r] ** 2, axis=1), r, U[:, :r]


def test_public_functions_inside_user_jit():
    """Each public function, called inside one ``jax.jit``, matches an independent numpy reference.

    (32 quadrature nodes: with 16 the tanh adjoint at |z| ≈ 5 is off by 4e-10 relative.)
    """
    apply_fn, _ = _make_model()  # tanh(<w, x> + b): θ = [b, w] (ravel order), z = <θ, [1, x]>
    params, xs, ys = _data(8)
    theta = jnp.array([0.5, -1.0, 0.3])
    cases = {
        "adjoint": lambda p, x, y: nj.adjoint(apply_fn, p, x, num_nodes=32, mode="forward"),
        "dual_matrix": lambda p, x, y: nj.dual_matrix(apply_fn, p, x, y, num_nodes=32),
        "dual_operator": lambda p, x, y: nj.dual_operator(apply_fn, p, x, y, num_nodes=32).rmv(y),
        "single_index_adjoint": lambda p, x, y: nj.single_index_adjoint(jnp.tanh, theta, x),
        "homogeneous_adjoint": lambda p, x, y: nj.homogeneous_adjoint(
            lambda q, z: q["w"] @ z * q["b"], p, x, degree=2.0, g=jnp.tanh
        ),
        "bounded_swish": lambda p, x, y: nj.bounded_swish(x),
        "leverage_scores": lambda p, x, y: nj.leverage_scores(x),
        "leverage": lambda p, x, y: nj.leverage_scores(x, return_info=True)[1:3],
        "ridge": lambda p, x, y: nj.leverage_scores(x, ridge=0.5),
        "orthonormal_basis": lambda p, x, y: nj.orthonormal_basis(x)[:2],
        "norm_scores": lambda p, x, y: nj.norm_scores(x),
        "linear_leverage_scores": lambda p, x, y: nj.linear_leverage_scores(x, y, bias=True),
        "linear_norm_scores": lambda p, x, y: nj.linear_norm_scores(x, y, bias=True),
        "uniform_scores": lambda p, x, y: nj.uniform_scores(x.shape[0]),
        "mix_with_uniform": lambda p, x, y: nj.mix_with_uniform(nj.norm_scores(x), 0.2),
        "sample": lambda p, x, y: nj.sample(jax.random.key(0), nj.norm_scores(x), 5),
        "sample_no_replace": lambda p, x, y: nj.sample(
            jax.random.key(0), nj.norm_scores(x), 5, replace=False
        ),
        "distortion": lambda p, x, y: nj.distortion(x, jnp.arange(5), jnp.ones(5)),
    }

    def everything(p, x, y):
        return {name: fn(p, x, y) for name, fn in cases.items()}

    got = jax.jit(everything)(params, xs, ys)  # one compilation for all of them

    X, y, b, w = np.asarray(xs), np.asarray(ys), float(params["b"]), np.asarray(params["w"])
    ones = np.ones((N, 1))
    z = b + X @ w
    adj = (np.tanh(z) / z)[:, None] * np.concatenate([ones, X], axis=1)
    dual = np.concatenate([adj, -y[:, None]], axis=1)  # f(0) = tanh(0) = 0
    zs = X @ np.asarray(theta)
    h = (X @ w) * b
    grad_h = np.concatenate([(X @ w)[:, None], b * X], axis=1)  # ∂h/∂b, ∂h/∂w
    lev_x, rank_x, U_x = _svd_h(X)
    design = np.concatenate([X, ones, -y[:, None]], axis=1)
    norm_x = np.sum(X**2, axis=1) / np.sum(X**2)
    ridge = np.einsum("ij,ji->i", X, np.linalg.solve(X.T @ X + 0.5 * np.eye(D), X.T))
    expected = {
        "adjoint": adj,
        "dual_matrix": dual,
        "dual_operator": dual.T @ y,
        "single_index_adjoint": (np.tanh(zs) / zs)[:, None] * X,
        "homogeneous_adjoint": (np.tanh(h) / (2 * h))[:, None] * grad_h,
        "bounded_swish": X * (1 + (np.sqrt(2) - 1) / (1 + np.exp(-X))),
        "leverage_scores": lev_x / rank_x,
        "leverage": (lev_x, rank_x),
        "ridge": ridge / ridge.sum(),
        "norm_scores": norm_x,
        "linear_leverage_scores": _svd_h(design)[0] / design.shape[1],
        "linear_norm_scores": np.sum(design**2, axis=1) / np.sum(design**2),
        "uniform_scores": np.full(N, 1 / N),
        "mix_with_uniform": 0.8 * norm_x + 0.2 / N,
        "distortion": np.linalg.norm(U_x[:5].T @ U_x[:5] - np.eye(rank_x), 2),
    }
    for name, value in expected.items():
        chex.assert_trees_all_close(got[name], value, rtol=1e-10, atol=1e-13, custom_message=name)
    U, rank = got["orthonormal_basis"]
    assert int(rank) == rank_x
    np.testing.assert_allclose(np.sum(np.asarray(U) ** 2, axis=1), lev_x, atol=1e-12)
    # sampling: same key inside and outside jit gives the same draw
    eager_probs = nj.norm_scores(xs)
    for name, replace in (("sample", True), ("sample_no_replace", False)):
        idx, wts = nj.sample(jax.random.key(0), eager_probs, 5, replace=replace)
        np.testing.assert_array_equal(got[name][0], idx)
        np.testing.assert_allclose(got[name][1], wts, rtol=1e-12)


def test_shape_checks_raise_inside_user_jit():
    apply_fn, _ = _make_model()
    params, xs, ys = _data(9)
    with pytest.raises(ValueError, match=r"ys has shape \(36, 1\)"):
        jax.jit(lambda p, x, y: nj.dual_matrix(apply_fn, p, x, y[:, None]))(params, xs, ys)
    with pytest.raises(ValueError, match=r"xs has 36 examples but another leaf of xs has 35"):
        jax.jit(lambda p, x: nj.adjoint(apply_fn, p, {"a": x, "b": x[1:]}))(params, xs)
    with pytest.raises(ValueError, match=r"probs must be a 1-D probability vector"):
        jax.jit(lambda x: nj.sample(jax.random.key(0), nj.norm_scores(x)[:, None], 3))(xs)
    with pytest.raises(ValueError, match=r"F must be a matrix \(n, m\) or a block matrix"):
        jax.jit(nj.leverage_scores)(ys)
    with pytest.raises(ValueError, match=r"mv expects a vector of shape \(5,\)"):
        jax.jit(lambda p, x, y: nj.dual_operator(apply_fn, p, x, y).mv(jnp.ones(3)))(params, xs, ys)
    with pytest.raises(ValueError, match=r"indices and weights must be matching vectors"):
        jax.jit(lambda x: nj.distortion(x, jnp.arange(4), jnp.ones(3)))(xs)


def test_inputs_closed_over_inside_user_jit():
    """Concrete params and data closed over inside a user's jit (jitting over the key alone) crashed the
    adaptive rule (TracerArrayConversionError: its host-driven compaction fetched values) and the numpy
    paths of the streaming scores and losses (ConcretizationTypeError); streaming_norm_scores failed under
    any jit or vmap (a float() of its total). All now take the traced path: the eager values."""
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((24, 3)), rng.standard_normal(24)
    theta = np.array([0.3, -0.2, 0.5])

    def model(t, x):
        return jnp.tanh(x @ t)

    calls = {
        "dual_matrix (adaptive)": lambda: nj.dual_matrix(model, theta, xs, ys),
        "streaming leverage, numpy": lambda: nj.streaming_leverage_scores(model, theta, xs, ys, num_nodes=8),
        "streaming norm, numpy": lambda: nj.streaming_norm_scores(model, theta, xs, ys),
        "weighted_loss, numpy": lambda: nj.weighted_loss(model, theta, xs, ys),
    }
    for name, call in calls.items():
        np.testing.assert_allclose(jax.jit(call)(), call(), rtol=1e-12, atol=1e-15, err_msg=name)
    X, Y = jnp.asarray(xs), jnp.asarray(ys)
    norm = jax.jit(lambda t: nj.streaming_norm_scores(model, t, X, Y, chunk_size=8))
    np.testing.assert_allclose(
        norm(jnp.asarray(theta)), nj.norm_scores(nj.dual_matrix(model, theta, X, Y, num_nodes=16)), rtol=1e-12
    )
    with pytest.raises(TypeError, match="chunk source .* cannot be used inside jax.jit"):
        jax.jit(lambda: nj.streaming_norm_scores(model, theta, lambda: iter([(xs, ys)])))()


def test_pytree_xs_in_the_losses_and_fit():
    """dict or tuple xs of device arrays: weighted_loss, per_example_loss and fit refused them ("must have at
    least 1 axis", the container's shape), and a tuple as long as n was stacked and read along the wrong
    axis (3.04 for 3.79, no error); the numpy path and every score took them. Against numpy."""
    rng = np.random.default_rng(1)
    p = {"a": jnp.asarray(rng.normal(size=2)), "b": jnp.asarray(rng.normal(size=3))}
    xs = {"a": rng.normal(size=(40, 2)), "b": rng.normal(size=(40, 3))}
    ys = rng.normal(size=40)

    def model(q, x):
        return jnp.tanh(x["a"] @ q["a"] + x["b"] @ q["b"])

    r = np.tanh(xs["a"] @ np.asarray(p["a"]) + xs["b"] @ np.asarray(p["b"])) - ys
    device = jax.tree.map(jnp.asarray, xs), jnp.asarray(ys)
    np.testing.assert_allclose(nj.weighted_loss(model, p, *device), np.sum(r**2), rtol=1e-12)
    np.testing.assert_allclose(nj.per_example_loss(model, p, *device), r**2, rtol=1e-12)
    grad = jax.grad(lambda q: nj.weighted_loss(model, q, xs, ys))(p)
    np.testing.assert_allclose(grad["a"], 2 * xs["a"].T @ (r * (1 - (r + ys) ** 2)), rtol=1e-10)
    fitted = nj.fit(
        model, p, *device, optimizer=optax.sgd(1e-3), num_steps=2, batch_size=8, key=jax.random.key(0)
    )
    assert np.isfinite(fitted.losses).all()
    xa, xb, y2 = rng.normal(size=(2, 3)), rng.normal(size=(2, 3)), rng.normal(size=2)
    th = rng.normal(size=3)
    want = np.sum((np.tanh(xa @ th + xb @ th) - y2) ** 2)
    pair = (jnp.asarray(xa), jnp.asarray(xb))  # as many leaves as examples: a pytree, not one array
    got = nj.weighted_loss(lambda t, x: jnp.tanh(x[0] @ t + x[1] @ t), jnp.asarray(th), pair, jnp.asarray(y2))
    np.testing.assert_allclose(got, want, rtol=1e-12)


class _Dispatches:
    """Operations dispatched on their own and read backs of one eager call, counted through jax's private
    ``Primitive.bind`` (on concrete values; ``stage`` is a host array moved to the device) and
    ``ArrayImpl._value`` (behind ``float``, ``bool``, ``tolist`` and ``jax.device_get``). The arrays one
    ``jax.device_get`` reads count as one read back (their copies start together: one wait), listed as the
    tuple of their shapes; a lone read is listed as its shape."""

    def __init__(self, monkeypatch):
        from jax._src import array, core

        self.binds, self.reads, self._batch = [], [], None
        bind, value, device_get = core.Primitive.bind, array.ArrayImpl._value, jax.device_get

        def counting_bind(primitive, *args, **params):
            if not any(isinstance(x, core.Tracer) for x in args):
                self.binds.append(primitive.name)
            return bind(primitive, *args, **params)

        def counting_value(x):
            (self.reads if self._batch is None else self._batch).append(x.shape)
            return value.fget(x)

        def counting_device_get(tree):
            self._batch = []
            try:
                return device_get(tree)
            finally:
                self.reads.append(tuple(self._batch))
                self._batch = None

        monkeypatch.setattr(core.Primitive, "bind", counting_bind)
        monkeypatch.setattr(array.ArrayImpl, "_value", property(counting_value))
        monkeypatch.setattr(jax, "device_get", counting_device_get)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("function", ["leverage_scores", "orthonormal_basis"])
def test_eager_call_reads_back_once_and_dispatches_no_single_ops(monkeypatch, function, dtype):
    """The eager ``leverage_scores`` and ``orthonormal_basis`` on a device array run their compiled
    programs and read one small status array back (rank and the NaN flag together): no operation
    dispatched on its own and no second read back, each of which waits on the device (a GPU launch or a
    synchronisation apiece). Before, the rank and the NaN test were two read backs, a third read the
    tolerance back after moving it to the device, and four single operations (a slice, a squeeze, a
    reshape or the division, a conversion) ran eagerly."""
    call = getattr(nj, function)
    F = jnp.asarray(np.random.default_rng(3).standard_normal((256, 8)), dtype)
    expected = call(F) if function == "orthonormal_basis" else call(F, return_info=True)  # compiles
    counted = _Dispatches(monkeypatch)
    got = call(F) if function == "orthonormal_basis" else call(F, return_info=True)
    monkeypatch.undo()
    assert counted.binds == [] and counted.reads == [(2,)], (counted.binds, counted.reads)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    assert int(got[1] if function == "orthonormal_basis" else got.rank) == 8 and got[0].dtype == dtype


@pytest.mark.parametrize(
    "call",
    [
        "adjoint",
        "adjoint_refined",
        "dual_matrix",
        "adjoint_fixed",
        "dual_matrix_fixed",
        "sample",
        "mix_with_uniform",
        "linear_leverage_scores",
        "streaming_leverage_scores",
    ],
)
def test_eager_model_calls_dispatch_no_single_ops_and_read_back_together(monkeypatch, call):
    """The eager adjoints, dual matrices and ``sample`` on device arrays: no operation dispatched on its own
    (only ``stage``: host arrays moved to the device, the refined examples' indices and the convergence
    flags of the info) and one read back per host decision: the adaptive first pass's four per-example
    summaries together, and again after a refinement only if one ran (a cubic model's gradient is a
    quadratic in ``t``, which the first pass integrates exactly; the tanh network needs refining), the
    fixed rule's two NaN counts together, ``sample``'s (and ``mix_with_uniform``'s) five checks of the
    probabilities together, the streamed leverage's route (which passes to run) and then its four checks.
    Before: ``xs[0]`` sliced eagerly three times (slice, squeeze) for shapes, the tolerances converted by
    four single operations (one in ``streaming_leverage_scores``, and a second for ``h / rank``), the
    summaries read one by one (and again when nothing was refined), the counts and checks one read back
    each; ``mix_with_uniform`` moved and converted ``alpha`` alone, ``linear_leverage_scores`` built its
    design matrix by a broadcast and a concatenation of their own.
    (jax's jitted ``jnp`` functions dispatch from C++ without ``Primitive.bind``: what is counted here are
    the operations on jax's Python path.)"""
    rng = np.random.default_rng(5)
    n, d = 64, 3
    params = {"w": jnp.asarray(rng.standard_normal((d, 4))), "v": jnp.asarray(rng.standard_normal(4))}
    xs, ys = jnp.asarray(rng.standard_normal((n, d))), jnp.asarray(rng.standard_normal(n))
    probs, key = jnp.asarray(rng.dirichlet(np.ones(n))), jax.random.key(0)

    def tanh_net(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    def cubic(p, x):
        return jnp.sum((x @ p["w"]) ** 2 * p["v"])

    run = {
        "adjoint": lambda: nj.adjoint(cubic, params, xs),
        "adjoint_refined": lambda: nj.adjoint(tanh_net, params, xs, return_info=True),
        "dual_matrix": lambda: nj.dual_matrix(cubic, params, xs, ys),
        "adjoint_fixed": lambda: nj.adjoint(tanh_net, params, xs, num_nodes=8),
        "dual_matrix_fixed": lambda: nj.dual_matrix(tanh_net, params, xs, ys, num_nodes=8),
        "sample": lambda: nj.sample(key, probs, 16),
        "mix_with_uniform": lambda: nj.mix_with_uniform(probs, 0.25),
        "linear_leverage_scores": lambda: nj.linear_leverage_scores(xs, ys, bias=True),
        "streaming_leverage_scores": lambda: nj.streaming_leverage_scores(
            tanh_net, params, xs, ys, chunk_size=16
        ),
    }[call]
    summaries = ((n,),) * 4  # error, residual, norm, roundoff
    want_binds, want_reads = {
        "adjoint": (["stage"], [summaries]),
        "adjoint_refined": (["stage", "stage"], [summaries, summaries]),
        "dual_matrix": (["stage"], [summaries, ()]),
        "adjoint_fixed": ([], [()]),
        "dual_matrix_fixed": ([], [((), ())]),
        "sample": ([], [((),) * 5]),
        "mix_with_uniform": ([], [((),) * 5]),
        "linear_leverage_scores": ([], [(2,)]),  # leverage_scores' status (rank, NaN flag)
        # the route after the first pass (which passes follow), then the NaN counts of rows and of the
        # linear algebra, the rank and the lost-direction flag, together
        "streaming_leverage_scores": ([], [(), ((), (), (), ())]),
    }[call]
    expected = run()  # compiles
    counted = _Dispatches(monkeypatch)
    got = run()
    monkeypatch.undo()
    assert (counted.binds, counted.reads) == (want_binds, want_reads)
    chex.assert_trees_all_equal(got, expected)
    if call == "adjoint_refined":
        assert int(jnp.max(got[1].panels)) > 1  # a refinement ran


def test_model_inputs_held_elsewhere_are_checked_in_one_read_back(monkeypatch):
    """An eager model call on ``params``, ``xs`` (and ``ys``) held elsewhere (sharded over the test's host
    devices, as on a GPU) checks them for NaN/Inf in one program and one read back (one each before: a
    wait each on a GPU), then reads the NaN counts of its result once; the first bad input is still the
    one named, and a misshapen ``ys`` still gets its own error."""
    from nlis_jax.distributed import data_mesh

    mesh = data_mesh()
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = np.random.default_rng(8)
    params = jax.device_put(mlp_params(0, [3, 4, 1]), whole)
    xs_host = rng.standard_normal((4 * len(jax.devices()), 3))
    xs = jax.device_put(xs_host, rows)
    call = functools.partial(nj.adjoint, mlp(jnp.tanh), num_nodes=4, mode="reverse")
    call(params, xs)  # compiles
    counted = _Dispatches(monkeypatch)
    call(params, xs)
    monkeypatch.undo()
    assert counted.reads[0] == ((),) * 5 and len(counted.reads) == 2, counted.reads
    ys_host = rng.standard_normal(xs_host.shape[0])
    ys = jax.device_put(ys_host, rows)
    dual = functools.partial(nj.dual_matrix, mlp(jnp.tanh), num_nodes=4, mode="reverse")
    dual(params, xs, ys)  # compiles
    counted = _Dispatches(monkeypatch)
    dual(params, xs, ys)
    monkeypatch.undo()
    assert counted.reads[0] == ((),) * 6 and len(counted.reads) == 2, counted.reads  # with ys's count
    ys_host[3] = np.inf
    with pytest.raises(ValueError, match="^ys contains 1 NaN or Inf value"):
        dual(params, xs, jax.device_put(ys_host, rows))
    with pytest.raises(ValueError, match="^ys has shape"):  # a wrong ys is named as before
        dual(params, xs, jax.device_put(ys_host[:-4], jax.sharding.NamedSharding(mesh, rows.spec)))
    xs_host[1, 2] = np.nan
    with pytest.raises(ValueError, match="^xs contains 1 NaN or Inf value"):  # before ys's Inf
        dual(params, jax.device_put(xs_host, rows), jax.device_put(ys_host, rows))


def test_finite_check_of_leaves_held_elsewhere_is_one_program_and_one_read_back(monkeypatch):
    """Leaves whose values are not in this process's memory as one array (here sharded over the test's
    host devices, as on a GPU or over processes) are checked for NaN/Inf by one program for the whole
    tree and one read back, not a dispatch and a read back per leaf; the first bad leaf in the tree's
    order is the one named, with its count, and a leaf held on the host is still checked there."""
    from nlis_jax.distributed import data_mesh

    spread = jax.sharding.NamedSharding(data_mesh(), jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(7)
    leaves = [rng.standard_normal(8 * len(jax.devices())) for _ in range(5)]
    tree = {f"w{i}": jax.device_put(a, spread) for i, a in enumerate(leaves)}
    nj._checks.check_finite("params", tree)  # compiles
    counted = _Dispatches(monkeypatch)
    nj._checks.check_finite("params", tree)
    monkeypatch.undo()
    assert (counted.binds, counted.reads) == ([], [((),) * 5])
    for bad_leaf, count in ((3, 2), (1, 1)):
        broken = [a.copy() for a in leaves]
        broken[bad_leaf][:count] = np.nan
        broken[4][0] = np.inf  # a later bad leaf: not the one reported
        tree = {f"w{i}": jax.device_put(a, spread) for i, a in enumerate(broken)}
        with pytest.raises(ValueError, match=rf"^params\['w{bad_leaf}'\] contains {count} NaN or Inf value"):
            nj._checks.check_finite("params", tree)
    on_host = dict(tree, w0=jnp.asarray(np.full(3, np.inf)))  # one device: checked with numpy first
    with pytest.raises(ValueError, match=r"^params\['w0'\] contains 3 NaN or Inf value"):
        nj._checks.check_finite("params", on_host)


def test_auto_mode_shares_the_program_of_the_mode_it_stands_for():
    """``mode`` is a static argument of the fixed rule's and the streaming programs: ``"auto"`` compiled
    programs of its own beside those of the mode it resolves to (here ``"reverse"``: p = 17 for one
    output), so a call with the explicit mode after a default call compiled everything again. The mode
    is now resolved from the checked shapes before the programs are called."""
    from nlis_jax import _adjoint, _dual, _projected, _streaming

    rng = np.random.default_rng(11)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4))), "v": jnp.asarray(rng.standard_normal(4))}
    params["b"] = jnp.zeros(1)
    xs, ys = jnp.asarray(rng.standard_normal((40, 3))), jnp.asarray(rng.standard_normal(40))

    def f(p, x):  # a function of this test: no program of another test is reused
        return jnp.tanh(x @ p["w"]) @ p["v"] + p["b"][0]

    assert _adjoint.resolve_mode("auto", 17, 1) == "reverse"
    key = jax.random.key(0)
    calls = {
        _adjoint._adjoint_jit: lambda mode: nj.adjoint(f, params, xs, num_nodes=4, mode=mode),
        _dual._dual_matrix_jit: lambda mode: nj.dual_matrix(f, params, xs, ys, num_nodes=4, mode=mode),
        _streaming._device_scores: lambda mode: nj.streaming_leverage_scores(
            f, params, xs, ys, num_nodes=4, chunk_size=16, mode=mode
        ),
        _streaming._norm_jit: lambda mode: nj.streaming_norm_scores(
            f, params, xs, ys, num_nodes=4, chunk_size=16, mode=mode
        ),
        _projected._projected_jit: lambda mode: nj.projected_dual_matrix(
            key, f, params, xs, ys, dim=8, num_nodes=4, mode=mode
        ),
    }
    for program, call in calls.items():
        auto = call("auto")
        compiled = program._cache_size()
        chex.assert_trees_all_equal(call("reverse"), auto)
        assert program._cache_size() == compiled, program
