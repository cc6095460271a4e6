r"""Adjoints by quadrature: the identity ``<f*(θ), θ> + f(0) = f(θ)`` and its consequences (float64).

Tolerances: the identity is the fundamental theorem of calculus along the ray ``tθ``; with 32 Gauss-Legendre
nodes the quadrature of these analytic integrands has converged to rounding (measured on the MLP below:
8e-7 at 8 nodes, 1e-13 at 16, 5e-16 at 32; up to 1e-10 at 16 nodes for other draws of larger weights), so
``rtol = 1e-10`` leaves 5 orders of margin while a wrong integrand (an extra factor ``t``) misses by > 1e-2.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flat_theta, mlp, mlp_init, mlp_params, normal, outputs, outputs_at_zero, sigmoid_head_mlp
from jax.flatten_util import ravel_pytree

import nlis_jax as nj
import nlis_jax._adjoint as adjoint_module
from nlis_jax.models import from_linen
from nlis_jax.quadrature import gauss_legendre

N, D = 40, 3
NODES = 32


@functools.cache
def _data():
    params = mlp_params(0, (D, 6, 5, 1))  # p = 65, non-zero biases
    xs = normal(1, N, D)
    return params, xs


@pytest.fixture
def xs():
    return _data()[1]


@pytest.fixture
def params():
    return _data()[0]


MODELS = {"tanh_mlp": mlp(jnp.tanh), "sigmoid_head": sigmoid_head_mlp}


def _identity_error(apply_fn, params, xs, adj):
    """Max relative error of ``<f*_i, θ> + f_i(0)`` against ``f_i(θ)`` (relative to ``max|f|``)."""
    lhs = np.asarray(adj) @ np.asarray(flat_theta(params)) + np.asarray(outputs_at_zero(apply_fn, params, xs))
    f = np.asarray(outputs(apply_fn, params, xs))
    return np.max(np.abs(lhs - f)) / np.max(np.abs(f)), lhs, f


@functools.cache
def _mlp_adjoint(model, mode):
    """One compilation per (model, mode), shared by the tests below."""
    params, xs = _data()
    return nj.adjoint(MODELS[model], params, xs, num_nodes=NODES, mode=mode)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_identity_mlp_with_biases(params, xs, model, mode):
    apply_fn = MODELS[model]
    adj = _mlp_adjoint(model, mode)
    p = flat_theta(params).shape[0]
    assert adj.shape == (N, p) and adj.dtype == jnp.float64
    err, lhs, f = _identity_error(apply_fn, params, xs, adj)
    np.testing.assert_allclose(lhs, f, rtol=1e-10, atol=1e-12, err_msg=f"max rel err {err:.2e}")
    if model == "sigmoid_head":  # f(0) = 1/2: the offset term matters
        np.testing.assert_allclose(outputs_at_zero(apply_fn, params, xs), 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_forward_and_reverse_agree(params, xs, model):
    fwd, rev = _mlp_adjoint(model, "forward"), _mlp_adjoint(model, "reverse")
    np.testing.assert_allclose(fwd, rev, rtol=1e-12, atol=1e-14)


def test_hand_written_pytree_model(xs):
    """A hand-written model whose params are a nested dict/tuple pytree with biases."""
    params = {
        "hidden": (normal(5, 4, D), jnp.array([0.3, -0.2, 0.1, 0.5])),
        "out": {"w": normal(6, 4), "b": jnp.asarray(0.7)},
        "scale": jnp.asarray(-1.3),
    }

    def apply_fn(p, x):
        w1, b1 = p["hidden"]
        h = jax.nn.softplus(w1 @ x + b1) - jnp.log(2.0)
        return p["scale"] * jnp.sin(p["out"]["w"] @ h + p["out"]["b"]) + 0.25

    for mode in ("forward", "reverse"):
        adj = nj.adjoint(apply_fn, params, xs, num_nodes=NODES, mode=mode)
        err, lhs, f = _identity_error(apply_fn, params, xs, adj)
        np.testing.assert_allclose(lhs, f, rtol=1e-10, atol=1e-12, err_msg=f"{mode}: max rel err {err:.2e}")


def test_resolve_mode_rule():
    """``mode="auto"`` -> forward iff ``p <= FORWARD_MAX_PARAMS * k`` (the docstring's rule)."""
    assert adjoint_module.FORWARD_MAX_PARAMS == 0.25  # from bench_adjoint.py (benchmarks/README.md)
    for p, k, expected in [(1, 4, "forward"), (2, 4, "reverse"), (2, 8, "forward"), (1, 1, "reverse")]:
        assert adjoint_module.resolve_mode("auto", p, k) == expected
    assert adjoint_module.resolve_mode("forward", 1000, 1) == "forward"
    assert adjoint_module.resolve_mode("reverse", 1, 1) == "reverse"


@pytest.mark.parametrize(("p_target", "k", "expected"), [(1, 4, "forward"), (3, 2, "reverse")])
def test_auto_mode_picks_documented_route(monkeypatch, p_target, k, expected):
    """``nj.adjoint(..., mode="auto")`` really runs the mode the rule picks."""
    seen = []
    original = adjoint_module._point_jacobian

    def spy(fn, mode, p, dtype):
        seen.append((mode, p))
        return original(fn, mode, p, dtype)

    monkeypatch.setattr(adjoint_module, "_point_jacobian", spy)
    params = {"w": jnp.linspace(-0.5, 0.5, p_target)}

    def apply_fn(prm, x):  # a fresh function object: forces a new trace, so the spy sees the mode
        z = jnp.tanh(prm["w"] @ x)
        return z if k == 1 else jnp.stack([z * (j + 1) + z**2 for j in range(k)])

    xs = normal(2, 5, p_target)
    nj.adjoint(apply_fn, params, xs, mode="auto")  # adaptive: traced once per pass (first, refinement)
    assert seen and set(seen) == {(expected, p_target)}


def test_mlp_init_layout_and_identity(xs):
    """``mlp_init`` params (float64 here) have the documented layout and satisfy the identity."""
    params = mlp_init(jax.random.key(0), (D, 4, 1), dtype=jnp.float64)
    assert [sorted(layer) for layer in params] == [["b", "w"], ["b", "w"]]
    assert params[0]["w"].shape == (4, D) and params[1]["b"].shape == (1,)
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero biases
    adj = nj.adjoint(MODELS["tanh_mlp"], params, xs, num_nodes=NODES, mode="reverse")
    err, lhs, f = _identity_error(MODELS["tanh_mlp"], params, xs, adj)
    np.testing.assert_allclose(lhs, f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_vector_outputs(xs, mode):
    k = 3
    params = mlp_params(3, (D, 5, k))
    apply_fn = mlp(jnp.tanh)
    adj = nj.adjoint(apply_fn, params, xs, num_nodes=NODES, mode=mode)
    p = flat_theta(params).shape[0]
    assert adj.shape == (N, k, p)
    lhs = jnp.einsum("nkp,p->nk", adj, flat_theta(params)) + outputs_at_zero(apply_fn, params, xs)
    f = outputs(apply_fn, params, xs)
    assert f.shape == (N, k)
    np.testing.assert_allclose(lhs, f, rtol=1e-10, atol=1e-12)
    # an output's adjoint is the adjoint of that output alone
    single = nj.adjoint(lambda prm, x: apply_fn(prm, x)[1], params, xs, num_nodes=NODES, mode=mode)
    np.testing.assert_allclose(adj[:, 1, :], single, rtol=1e-12, atol=1e-14)


def test_linear_model_adjoint_is_x_and_one(xs):
    """``f = <w, x> + b``: ``∇f`` is ``[x, 1]`` at every point, so the adjoint is ``[x, 1]``.

    Exact up to the rounding of ``Σ_k w_k = 1`` (the quadrature weights): a few ulps.
    """
    params = {"b": jnp.asarray(0.3), "w": jnp.array([0.5, -1.0, 2.0])}  # ravel order: b, then w

    def apply_fn(prm, x):
        return prm["w"] @ x + prm["b"]

    expected = np.concatenate([np.ones((N, 1)), np.asarray(xs)], axis=1)
    for mode in ("forward", "reverse"):
        adj = nj.adjoint(apply_fn, params, xs, mode=mode)
        np.testing.assert_allclose(adj, expected, rtol=4 * np.finfo(np.float64).eps, atol=0)


def test_adjoint_equals_jacrev_for_linear_in_params(xs):
    """``f(θ; x) = <θ, φ(x)>`` with nonlinear features: ∇f does not depend on t, so f* = J(θ)."""

    def apply_fn(prm, x):
        feats = jnp.concatenate([jnp.tanh(x), jnp.sin(x) * x, jnp.ones((1,))])
        return prm["a"] @ feats[:D] + prm["c"] @ feats[D:]

    params = {"a": jnp.array([1.0, -2.0, 0.5]), "c": jnp.array([0.1, 0.2, -0.3, 0.4])}
    theta, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda th: outputs(apply_fn, unravel(th), xs))(theta)
    for mode in ("forward", "reverse"):
        adj = nj.adjoint(apply_fn, params, xs, mode=mode, num_nodes=3)
        np.testing.assert_allclose(adj, jac, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_chunking_gives_identical_results(params, xs, mode):
    """``chunk_size = 7`` does not divide n = 40; results equal the unchunked ones."""
    full = _mlp_adjoint("tanh_mlp", mode)
    chunked = nj.adjoint(MODELS["tanh_mlp"], params, xs, num_nodes=NODES, mode=mode, chunk_size=7)
    assert chunked.shape == full.shape
    np.testing.assert_allclose(chunked, full, rtol=1e-14, atol=1e-15)


def test_pytree_inputs():
    """``xs`` as a dict of arrays (leading example axis on each leaf) equals the concatenated-array model."""
    xs_tree = {"a": normal(7, N, 3), "b": normal(8, N)}
    params = {"w": normal(9, 4), "c": jnp.asarray(0.2)}

    def tree_fn(prm, x):
        return jnp.tanh(prm["w"][:3] @ x["a"] + prm["w"][3] * x["b"] + prm["c"])

    def array_fn(prm, x):
        return jnp.tanh(prm["w"] @ x + prm["c"])

    xs_flat = jnp.concatenate([xs_tree["a"], xs_tree["b"][:, None]], axis=1)
    reference = nj.adjoint(array_fn, params, xs_flat, num_nodes=NODES, mode="reverse")
    for mode in ("forward", "reverse"):
        adj = nj.adjoint(tree_fn, params, xs_tree, num_nodes=NODES, mode=mode)
        np.testing.assert_allclose(adj, reference, rtol=1e-13, atol=1e-15)
        err, lhs, f = _identity_error(tree_fn, params, xs_tree, adj)
        np.testing.assert_allclose(lhs, f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_float32_in_float32_out(params, xs, mode):
    """float32 params/inputs give float32 adjoints within 1e-4 (relative to max |f*|) of float64."""
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    adj32 = nj.adjoint(MODELS["tanh_mlp"], p32, xs.astype(jnp.float32), num_nodes=NODES, mode=mode)
    adj64 = _mlp_adjoint("tanh_mlp", mode)
    assert adj32.dtype == jnp.float32
    err = np.max(np.abs(np.asarray(adj32, np.float64) - np.asarray(adj64))) / np.max(np.abs(adj64))
    assert err < 1e-4, f"float32 adjoint max rel error {err:.2e}"


def test_wrong_integrand_fails_the_identity(params, xs):
    """Guard: integrating ``d/dθ f(tθ) = t ∇f(tθ)`` (the published code's mistake) breaks the identity."""
    apply_fn = sigmoid_head_mlp
    theta, unravel = ravel_pytree(params)
    nodes, weights = nj.quadrature.gauss_legendre(NODES)

    @jax.jit
    def wrong_adjoint(xs):
        def one(x):
            grads = jax.vmap(lambda t: jax.grad(lambda th: apply_fn(unravel(t * th), x))(theta))(nodes)
            return weights @ grads

        return jax.vmap(one)(xs)

    wrong = wrong_adjoint(xs)
    right = _mlp_adjoint("sigmoid_head", "reverse")
    err_wrong, _, _ = _identity_error(apply_fn, params, xs, wrong)
    err_right, _, _ = _identity_error(apply_fn, params, xs, right)
    assert err_right < 1e-10
    assert err_wrong > 1e-2, f"the wrong integrand should fail the identity, error {err_wrong:.2e}"
    # and it is not what nj.adjoint computes
    assert np.max(np.abs(np.asarray(wrong) - np.asarray(right))) > 1e-2


def test_gauss_legendre_exact_for_degree_2q_minus_1():
    for q in (1, 3, 8):
        t, w = (np.asarray(a) for a in nj.quadrature.gauss_legendre(q))
        assert t.shape == w.shape == (q,)
        assert np.all((t > 0) & (t < 1))
        for deg in range(2 * q):
            np.testing.assert_allclose(np.sum(w * t**deg), 1.0 / (deg + 1), rtol=1e-14)
        # degree 2q is NOT integrated exactly (guards the claimed degree)
        assert abs(np.sum(w * t ** (2 * q)) - 1.0 / (2 * q + 1)) > 1e-12


def _pooled_dense(w, x):
    """``tanh(avg_pool(relu(x)) · W)`` summed: XLA:CPU fuses the pool and the product into one kernel."""
    h = jax.lax.reduce_window(jnp.maximum(x, 0), x.dtype.type(0), jax.lax.add, (2, 2, 1), (2, 2, 1), "VALID")
    return jnp.sum(jnp.tanh(0.25 * h.reshape(-1) @ w.reshape(-1, 4)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_origin_is_not_constant_folded(dtype):
    """``jit(vmap(f))`` at literal zeros (``jnp.zeros_like(w)`` inside the jit) gave NaN or ±4 instead of 0
    with jaxlib 0.10.2 on a CPU, in every run (XLA fused the pool and the product with a broadcast constant
    matrix into a YNNPACK kernel); at the zeros of :func:`nlis_jax._adjoint.origin` it is 0, exactly
    (tanh(0) summed). Max-pooling into a 72 × 16 product: zeros behind ``lax.optimization_barrier`` were
    still wrong in 6–10 of 10 compilations (the barrier is removed by XLA's optimisation), so ten
    programs (ten batch sizes) are compiled here."""
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((64, 8, 8, 4)), dtype)
    w = jnp.ones(256, dtype)
    at_origin = jax.jit(lambda w, xs: jax.vmap(_pooled_dense, (None, 0))(adjoint_module.origin(w), xs))
    np.testing.assert_array_equal(np.asarray(at_origin(w, xs)), np.zeros(64, dtype))

    def max_pooled(w, x):
        h = jax.lax.reduce_window(jnp.maximum(x, 0), -jnp.inf, jax.lax.max, (2, 2, 1), (2, 2, 1), "VALID")
        return h.reshape(-1) @ w

    w = jnp.ones((72, 16), dtype)
    for n in range(120, 130):  # a new program each time
        xs = jnp.asarray(rng.standard_normal((n, 6, 6, 8)), dtype)
        out = jax.jit(lambda w, xs: jax.vmap(max_pooled, (None, 0))(adjoint_module.origin(w), xs))(w, xs)
        np.testing.assert_array_equal(np.asarray(out), np.zeros((n, 16), dtype), err_msg=f"n = {n}")


class _PooledCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3))(x[..., None])), (2, 2), (2, 2))
        return nn.Dense(1)(nn.tanh(nn.Dense(8)(x.reshape(-1))))[0]


def test_pooled_cnn_adjoint_and_offset_at_zero():
    """The same fault through the library, on a flax CNN: ``adjoint``'s check of ``f(0)`` saw NaN and
    raised "the adjoint is NaN or Inf" on a finite model, and ``dual_matrix``'s offset ``f(0) − y`` was
    wrong, in most processes (2–3 of 5 runs; the kernel reads memory it should not). At ``θ = 0`` this
    CNN is exactly 0, so the offset column is ``−y``; the adjoint matches the fixed rule evaluated
    node by node with θ a run-time value (float32 rounding: 1e-5 relative)."""
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((64, 16, 16)), jnp.float32)
    ys = jnp.asarray(np.random.default_rng(2).standard_normal(64), jnp.float32)
    model = _PooledCNN()
    apply_fn, params = from_linen(model, model.init(jax.random.key(0), xs[0]))
    flat, unravel = ravel_pytree(params)
    nodes, weights = gauss_legendre(2, jnp.float32)
    grad = jax.grad(lambda th, x: apply_fn(unravel(th), x))
    with jax.default_matmul_precision("highest"):  # the library's precision (TF32 by default on a GPU)
        per_node = jax.jit(jax.vmap(jax.vmap(grad, (None, 0)), (0, None)))(jnp.outer(nodes, flat), xs)
        ref = np.asarray(jnp.tensordot(weights, per_node, axes=1))
    adj = nj.adjoint(apply_fn, params, xs, num_nodes=2, mode="reverse")
    np.testing.assert_allclose(np.asarray(adj), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    F = nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=2, mode="reverse")
    np.testing.assert_array_equal(np.asarray(F[:, -1]), -np.asarray(ys))


def test_convolutions_are_found_in_nested_jaxprs(monkeypatch):
    """``flatten_model`` marks a model that runs ``conv_general_dilated`` anywhere (inside ``jit``,
    ``lax.scan``, ``jax.checkpoint``), and a fixed rule in reverse mode on a CPU then runs the nodes
    outside a vmapped per-example gradient (``nodes_outside``: with one reverse pass over the nodes, a
    kernel's gradient is a grouped convolution whose cost per example grows with the batch) over the
    memory chunk; without a convolution, the cache chunk and one reverse pass; on a GPU, the memory chunk
    and one reverse pass."""

    def conv(w, x):
        return jax.lax.conv(x[None, None], w.reshape(1, 1, 3, 3), (1, 1), "SAME").sum()

    def scanned(w, x):
        return jax.lax.scan(lambda c, _: (c + conv(w, x), None), 0.0, None, length=2)[0]

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # CPU decisions, also on a GPU
    xs = jnp.ones((5, 6, 6), jnp.float32)
    w = jnp.ones(9, jnp.float32)
    flat = functools.partial(adjoint_module.flatten_model, xs=xs)
    assert flat(conv, w).convolves and flat(jax.jit(conv), w).convolves and flat(scanned, w).convolves
    assert flat(jax.checkpoint(conv), w).convolves
    assert not flat(lambda w, x: jnp.tanh(x.reshape(-1)[:9] @ w), w).convolves
    chunk = adjoint_module.fixed_rule_chunk_size
    assert chunk(20_000, 26_401, 1, "reverse", convolves=True) == 317  # 2^23 / p
    assert chunk(20_000, 26_401, 1, "reverse") == 64 and chunk(20_000, 26_401, 1, "forward", True) == 317
    outside = adjoint_module.nodes_outside
    assert outside(flat(conv, w), "reverse") and not outside(flat(conv, w), "forward")
    assert not outside(flat(lambda w, x: jnp.tanh(x.reshape(-1)[:9] @ w), w), "reverse")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert chunk(20_000, 26_401, 1, "reverse", convolves=True) == 317
    assert not outside(flat(conv, w), "reverse")


@pytest.mark.parametrize("outputs", [0, 2])
def test_convolving_models_reverse_mode_with_the_nodes_outside(outputs, monkeypatch):
    """On a CPU a fixed rule in reverse mode runs a convolving model's nodes in a scan around a vmapped
    per-example gradient (``nodes_outside``), over the memory chunk or a given ``chunk_size``, the scan
    unrolled up to ``MAX_UNROLL`` nodes: the same adjoints as forward mode (a different product: 1e-12 in
    float64), scalar and ``k``-output models."""

    def conv(w, x):
        h = jax.lax.conv(x[None, None], w[:9].reshape(1, 1, 3, 3), (1, 1), "SAME").reshape(-1)
        out = jnp.tanh(h @ w[9:].reshape(36, -1))  # (max(outputs, 1),)
        return out if outputs else out[0]

    rng = np.random.default_rng(11)
    xs = jnp.asarray(rng.standard_normal((20, 6, 6)))
    w = jnp.asarray(rng.standard_normal(9 + 36 * max(outputs, 1)) / 4)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # CPU decisions, also on a GPU
    assert adjoint_module.nodes_outside(adjoint_module.flatten_model(conv, w, xs), "reverse")
    for num_nodes, chunk_size in ((6, None), (6, 7), (20, None)):  # 20 nodes: unrolled 16 at a time
        want = nj.adjoint(conv, w, xs, num_nodes=num_nodes, mode="forward")
        assert want.shape == (20, *((outputs,) if outputs else ()), w.shape[0])
        got = nj.adjoint(conv, w, xs, num_nodes=num_nodes, mode="reverse", chunk_size=chunk_size)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(want))))
