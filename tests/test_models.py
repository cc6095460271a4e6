"""Flax adapters (nnx and linen) against hand-written apply functions with the same weights, and the
adjoint identity on them; ``import nlis_jax`` must not import flax."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from helpers import flat_theta, normal, outputs, outputs_at_zero

import nlis_jax as nj
from nlis_jax.models import from_linen, from_nnx

N, D, H = 25, 3, 5
NODES = 32


def _xs():
    return normal(0, N, D)


class NnxMLP(nnx.Module):
    def __init__(self, rngs, out=1):
        kw = dict(param_dtype=jnp.float64, bias_init=nnx.initializers.normal(0.5), rngs=rngs)
        self.hidden = nnx.Linear(D, H, **kw)
        self.head = nnx.Linear(H, out, **kw)

    def __call__(self, x):
        return self.head(jnp.tanh(self.hidden(x)))


class LinenMLP(linen.Module):
    out: int = 1

    @linen.compact
    def __call__(self, x):
        kw = dict(param_dtype=jnp.float64, bias_init=linen.initializers.normal(0.5))
        h = jnp.tanh(linen.Dense(H, **kw)(x))
        return linen.Dense(self.out, **kw)(h)


def _hand_written(w1, b1, w2, b2):
    def apply_fn(_, x):
        return jnp.tanh(x @ w1 + b1) @ w2 + b2

    return apply_fn


def _check_identity(apply_fn, params, xs, ys):
    theta = flat_theta(params)
    adj = nj.adjoint(apply_fn, params, xs, num_nodes=NODES)
    lhs = jnp.tensordot(adj, theta, axes=1) + outputs_at_zero(apply_fn, params, xs)
    np.testing.assert_allclose(lhs, outputs(apply_fn, params, xs), rtol=1e-10, atol=1e-12)
    F = nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=NODES)
    assert F.shape == adj.shape[:-1] + (theta.shape[0] + 1,)
    residual = jnp.tensordot(F, jnp.concatenate([theta, jnp.ones(1)]), axes=1)
    np.testing.assert_allclose(residual, outputs(apply_fn, params, xs) - ys, rtol=0, atol=1e-12)
    return adj


@pytest.mark.parametrize("batched", [False, True])
def test_from_nnx(batched):
    module = NnxMLP(nnx.Rngs(1))
    apply_fn, params = from_nnx(module, batched=batched)
    xs = _xs()
    w1, b1 = module.hidden.kernel[...], module.hidden.bias[...]
    w2, b2 = module.head.kernel[...][:, 0], module.head.bias[...][0]
    assert float(jnp.max(jnp.abs(b1))) > 0  # non-zero biases
    ref = _hand_written(w1, b1, w2, b2)
    np.testing.assert_allclose(outputs(apply_fn, params, xs), outputs(ref, None, xs), rtol=1e-14)
    assert flat_theta(params).shape == (D * H + H + H + 1,)
    if not batched:  # the batched adapter computes the same function: one identity check suffices
        _check_identity(apply_fn, params, xs, normal(2, N))
    # the module is left as it was
    np.testing.assert_array_equal(module.hidden.kernel[...], w1)


def test_from_nnx_vector_output_and_no_squeeze():
    module = NnxMLP(nnx.Rngs(3), out=2)
    apply_fn, params = from_nnx(module)
    xs = _xs()
    ys = normal(4, N, 2)
    adj = _check_identity(apply_fn, params, xs, ys)
    assert adj.shape == (N, 2, D * H + H + 2 * H + 2)
    one = NnxMLP(nnx.Rngs(5))
    fn_keep, p_keep = from_nnx(one, squeeze=False)
    assert outputs(fn_keep, p_keep, xs).shape == (N, 1)


@pytest.mark.parametrize("batched", [False, True])
def test_from_linen(batched):
    module = LinenMLP()
    xs = _xs()
    variables = module.init(jax.random.key(6), xs[0])
    apply_fn, params = from_linen(module, variables, batched=batched)
    p = variables["params"]
    ref = _hand_written(
        p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["Dense_1"]["kernel"][:, 0], p["Dense_1"]["bias"][0]
    )
    np.testing.assert_allclose(outputs(apply_fn, params, xs), outputs(ref, None, xs), rtol=1e-14)
    if not batched:
        _check_identity(apply_fn, params, xs, normal(7, N))


def test_adapters_reject_wrong_types():
    with pytest.raises(TypeError, match="from_nnx expects an nnx.Module"):
        from_nnx(LinenMLP())
    with pytest.raises(TypeError, match="from_linen expects a flax.linen.Module"):
        from_linen(NnxMLP(nnx.Rngs(0)), {"params": {}})
    with pytest.raises(ValueError, match="no 'params' collection"):
        from_linen(LinenMLP(), {"batch_stats": {}})


def test_from_linen_names_missing_variables():
    """from_linen(module, None) failed with "argument of type 'NoneType' is not iterable"."""
    for bad in (None, [("params", {})]):
        with pytest.raises(TypeError, match="from_linen expects variables, the dict from module.init"):
            from_linen(LinenMLP(), bad)


def test_from_nnx_refuses_modules_in_training_mode():
    """A new nnx module is in training mode: from_nnx accepted it and every score failed with a
    TraceContextError ("Cannot mutate RngCount from a different trace level") that the library's check
    blamed on the shapes of xs. Now a ValueError naming the submodules; after model.eval() the adapter
    gives the hand-written network (dropout off, batch norm of its running statistics)."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(D, H, param_dtype=jnp.float64, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.norm = nnx.BatchNorm(H, param_dtype=jnp.float64, rngs=rngs)
            self.head = nnx.Linear(H, 1, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.head(self.norm(self.drop(jnp.tanh(self.hidden(x)))))

    module = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="from_nnx: drop, norm in training mode.*call model.eval"):
        from_nnx(module)
    module.eval()
    apply_fn, params = from_nnx(module)
    xs = np.asarray(normal(8, N, D))
    scale = 1 / np.sqrt(1 + module.norm.epsilon)  # running mean 0, variance 1
    hidden = np.tanh(xs @ np.asarray(module.hidden.kernel[...]) + np.asarray(module.hidden.bias[...]))
    normed = hidden * scale * np.asarray(module.norm.scale[...]) + np.asarray(module.norm.bias[...])
    ref = normed @ np.asarray(module.head.kernel[...])[:, 0] + np.asarray(module.head.bias[...])[0]
    np.testing.assert_allclose(outputs(apply_fn, params, xs), ref, rtol=1e-12)


def test_from_nnx_freezes_the_other_state():
    """nnx.split shared the module's BatchNorm statistics with apply_fn: after the module's variance
    changed, apply_fn called directly saw the new value while the library's cached programs kept the one
    of their first trace (weighted_loss 0.194 against 0.0019, no error). The documented behaviour holds
    now: apply_fn and every result keep the statistics of the from_nnx call."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(D, H, param_dtype=jnp.float64, rngs=rngs)
            self.norm = nnx.BatchNorm(H, param_dtype=jnp.float64, rngs=rngs)
            self.head = nnx.Linear(H, 1, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.head(self.norm(jnp.tanh(self.hidden(x))))

    module = Net(nnx.Rngs(0))
    module.eval()
    apply_fn, params = from_nnx(module)
    xs, ys = np.asarray(normal(11, N, D)), np.asarray(normal(12, N))
    before, first = outputs(apply_fn, params, xs), float(apply_fn(params, xs[0]))  # traced, eager
    dual = np.asarray(nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=4))
    loss = float(nj.weighted_loss(apply_fn, params, xs, ys))
    module.norm.var[...] = module.norm.var[...] * 100.0
    assert float(apply_fn(params, xs[0])) == first
    np.testing.assert_array_equal(outputs(apply_fn, params, xs), before)
    np.testing.assert_array_equal(nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=4), dual)
    assert float(nj.weighted_loss(apply_fn, params, xs, ys)) == loss
    changed, _ = from_nnx(module)  # a new split reads the new statistics
    assert not np.isclose(float(changed(params, xs[0])), first)


class _TwoHeads(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(D, 1, param_dtype=jnp.float64, rngs=rngs)
        self.b = nnx.Linear(D, 1, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.a(x), self.b(x)


class _TwoHeadsLinen(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(1, param_dtype=jnp.float64)(x), linen.Dense(1, param_dtype=jnp.float64)(x)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_adapters_refuse_a_tuple_of_outputs(flavour, batched):
    """With batched=True the adapters removed the batch axis by out[0], which on a module returning a tuple
    took its FIRST OUTPUT: scores and fits saw one head of two with no error (adjoint (6, 1, 4) instead of
    (6, 2, 4)); with batched=False the tuple was stacked, while a plain apply_fn returning a tuple is
    refused. Both now give apply_fn the module's outputs (batch axis removed from each) and the library
    refuses the tuple with the message it gives any apply_fn."""
    xs = np.asarray(_xs())
    if flavour == "nnx":
        module = _TwoHeads(nnx.Rngs(0))
        apply_fn, params = from_nnx(module, batched=batched)
        direct = module(xs[0])
    else:
        module = _TwoHeadsLinen()
        variables = module.init(jax.random.key(0), xs[0])
        apply_fn, params = from_linen(module, variables, batched=batched)
        direct = module.apply(variables, xs[0])
    out = apply_fn(params, xs[0])
    assert isinstance(out, tuple) and len(out) == 2
    for got, want in zip(out, direct, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="must return one array.*got a tuple.*output\\[1\\] shape \\(1,\\)"):
        nj.adjoint(apply_fn, params, xs, num_nodes=4)


class _ReducesBatch(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Linear(D, 1, rngs=rngs)

    def __call__(self, x):
        return self.layer(x).mean()  # the batch axis is reduced away


class _BatchLast(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, x):
        return self.layer(x).T  # (2, batch): the batch axis moved last


class _BatchLastLinen(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(2)(x).T


@pytest.mark.parametrize("case", ["nnx_reduces", "nnx_moves", "linen_moves"])
def test_batched_adapters_refuse_an_output_without_the_batch_axis_first(case):
    """batched=True removed the batch axis by o[0] whatever the output's shape: a module reducing the batch
    axis failed with numpy's "Too many indices", and one returning (outputs, batch) gave its FIRST OUTPUT
    as the model's value, silently (a (2, 1) output became one scalar). The adapters now name the shape."""
    xs = np.asarray(_xs())
    if case == "linen_moves":
        module = _BatchLastLinen()
        apply_fn, params = from_linen(module, module.init(jax.random.key(0), xs[:1]), batched=True)
    else:
        module = (_ReducesBatch if case == "nnx_reduces" else _BatchLast)(nnx.Rngs(0))
        apply_fn, params = from_nnx(module, batched=True)
    shape = "\\(\\)" if case == "nnx_reduces" else "\\(2, 1\\)"
    with pytest.raises(ValueError, match=f"batched=True: .*output of shape {shape}, whose leading axis"):
        apply_fn(params, xs[0])
    with pytest.raises(ValueError, match="leading axis is not the batch axis"):
        nj.dual_matrix(apply_fn, params, xs, num_nodes=4)


def test_from_nnx_state_written_by_the_module_stays_frozen():
    """A module that writes to its own state (a counter; a draw from its nnx.Rngs advances their count)
    passed from_nnx, then changed apply_fn's result on every eager call with the same (params, x) (0.681,
    1.022, 1.362), and under jit every score failed with Flax's TraceContextError blamed on the shapes of
    xs. apply_fn now works on a fresh copy of the state at each call: the same value every time, and the
    dual matrix of the module with its state as at from_nnx."""

    class Count(nnx.Variable):
        pass

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.head = nnx.Linear(D, 1, param_dtype=jnp.float64, rngs=rngs)
            self.calls = Count(jnp.array(1.0))
            self.rngs = rngs

        def __call__(self, x):
            self.calls[...] = self.calls[...] + 1.0
            noise = jax.random.normal(self.rngs.noise(), (1,), jnp.float64)
            return self.head(x) * self.calls[...] + noise

    module = Net(nnx.Rngs(0, noise=1))
    noise = jax.random.normal(nnx.Rngs(0, noise=1).noise(), (1,), jnp.float64)[0]
    apply_fn, params = from_nnx(module)
    xs, ys = np.asarray(_xs()), np.asarray(normal(14, N))
    w, b = np.asarray(module.head.kernel[...])[:, 0], np.asarray(module.head.bias[...])[0]
    ref = (xs @ w + b) * 2.0 + float(noise)
    assert [float(apply_fn(params, xs[0])) for _ in range(3)] == [float(apply_fn(params, xs[0]))] * 3
    np.testing.assert_allclose(float(apply_fn(params, xs[0])), ref[0], rtol=1e-14)
    np.testing.assert_allclose(outputs(apply_fn, params, xs), ref, rtol=1e-13)
    F = nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=4)  # f(θ) = 2(x·w + b) + noise: linear in θ
    np.testing.assert_allclose(F[:, :-1], np.c_[2 * np.ones(N), 2 * xs], rtol=1e-13)
    np.testing.assert_allclose(F[:, -1], float(noise) - ys, rtol=1e-13)
    assert float(module.calls[...]) == 1.0


def test_from_nnx_refuses_attention_with_dropout_left_undecided():
    """nnx.MultiHeadAttention with dropout_rate > 0 has deterministic=None until model.eval(): from_nnx
    accepted it and every score failed inside Flax ("No `deterministic` argument was provided") with the
    library's advice about the shapes of xs. Now refused like a Dropout in training mode."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            kw = dict(param_dtype=jnp.float64, rngs=rngs)
            self.att = nnx.MultiHeadAttention(1, D, qkv_features=4, dropout_rate=0.5, decode=False, **kw)
            self.head = nnx.Linear(D, 1, **kw)

        def __call__(self, x):
            return self.head(self.att(x[None, :]).mean(0))

    module = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="from_nnx: att in training mode"):
        from_nnx(module)
    module.eval()
    apply_fn, params = from_nnx(module)
    xs = np.asarray(_xs())
    np.testing.assert_allclose(outputs(apply_fn, params, xs), [module(x)[0] for x in xs], rtol=1e-12)


def test_from_nnx_params_are_a_snapshot():
    """from_nnx handed back the module's own nnx.Param objects: writing a fit back into the module
    (nnx.update) silently turned the returned start point into the fit (L(params0) 28.68 became 1.66), and
    a direct change of a kernel changed every later result while the frozen statistics stayed. The
    returned params now keep the weights of the from_nnx call, and nnx.update still accepts a fit."""
    module = NnxMLP(nnx.Rngs(0))
    apply_fn, params0 = from_nnx(module)
    xs, ys = np.asarray(_xs()), np.asarray(normal(13, N))
    start = float(nj.weighted_loss(apply_fn, params0, xs, ys))
    result = nj.fit(apply_fn, params0, xs, ys, optimizer=optax.adam(0.05), num_steps=20)
    assert float(result.final_loss) < 0.9 * start
    nnx.update(module, result.params)
    assert float(nj.weighted_loss(apply_fn, params0, xs, ys)) == start
    np.testing.assert_array_equal(module.head.kernel[...], result.params["head"]["kernel"][...])
    module.hidden.kernel[...] = module.hidden.kernel[...] * 3.0
    assert float(nj.weighted_loss(apply_fn, params0, xs, ys)) == start


def test_from_linen_freezes_the_other_collections():
    """from_linen copied only the top level of the non-params collections: after an in-place change of a
    nested batch statistic, apply_fn called directly (and any program traced afterwards) used the new
    value while cached programs kept the old one (weighted_loss 17.30 against 4.08, no error). Now the
    collections are copied at the call, as documented, and every route agrees."""

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = jnp.tanh(linen.Dense(H, param_dtype=jnp.float64)(x))
            h = linen.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(h)
            return linen.Dense(1, param_dtype=jnp.float64)(h)

    xs, ys = np.asarray(_xs()), np.asarray(normal(14, N))
    variables = Net().init(jax.random.key(0), xs[0])
    variables = jax.tree.map(np.array, variables)  # numpy leaves, changeable in place
    apply_fn, params = from_linen(Net(), variables)
    first, before = float(apply_fn(params, xs[0])), outputs(apply_fn, params, xs)
    loss = float(nj.weighted_loss(apply_fn, params, xs, ys))
    variables["batch_stats"]["BatchNorm_0"]["var"] *= 100.0
    assert float(apply_fn(params, xs[0])) == first
    np.testing.assert_array_equal(outputs(apply_fn, params, xs), before)  # traced anew
    assert float(nj.weighted_loss(apply_fn, params, xs, ys)) == loss


@pytest.mark.parametrize("layer", ["dropout", "batch_norm"])
def test_from_linen_names_training_mode(layer):
    """A Linen module in training mode failed every score with Flax's own error wrapped in the library's
    "check that xs has the examples on its leading axis" (a Dropout asks for a "dropout" stream, a
    BatchNorm updates an immutable collection): now a ValueError naming training mode and the fix, from
    the scores and from fit; the same module built for evaluation scores as the hand-written network."""

    class Net(linen.Module):
        training: bool

        @linen.compact
        def __call__(self, x):
            h = jnp.tanh(linen.Dense(H, param_dtype=jnp.float64)(x))
            if layer == "dropout":
                h = linen.Dropout(0.5, deterministic=not self.training)(h)
            else:
                h = linen.BatchNorm(use_running_average=not self.training, param_dtype=jnp.float64)(h)
            return linen.Dense(1, param_dtype=jnp.float64)(h)

    xs = np.asarray(normal(9, N, D))
    ys = np.asarray(normal(10, N))
    variables = Net(training=False).init(jax.random.key(0), xs[0])
    apply_fn, params = from_linen(Net(training=True), variables)
    expected = "from_linen: the module is in training mode.*deterministic=True / use_running_average=True"
    with pytest.raises(ValueError, match=expected):
        nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=4)
    with pytest.raises(ValueError, match=expected):
        nj.fit(apply_fn, params, xs, ys, optimizer=optax.sgd(0.1), num_steps=2)
    apply_fn, params = from_linen(Net(training=False), variables)
    kernel0, kernel1 = (np.asarray(variables["params"][k]["kernel"]) for k in ("Dense_0", "Dense_1"))
    hidden = np.tanh(xs @ kernel0 + np.asarray(variables["params"]["Dense_0"]["bias"]))
    rtol = 1e-12
    if layer == "batch_norm":  # running mean 0, variance 1, scale 1, bias 0
        hidden = hidden / np.sqrt(1 + 1e-5)
        rtol = 1e-7  # Linen keeps batch statistics in float32: var + eps rounds to float32 (7e-9 here)
    ref = hidden @ kernel1[:, 0] + np.asarray(variables["params"]["Dense_1"]["bias"])[0]
    np.testing.assert_allclose(outputs(apply_fn, params, xs), ref, rtol=rtol)


def test_import_does_not_import_flax():
    code = (
        "import sys, nlis_jax; print(sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("layer", ["dropout", "batchnorm"])
# Flax keeps BatchNorm statistics in float32: its update from float64 activations warns before the check
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_from_nnx_refuses_training_mode_passed_at_call_time(layer):
    """A module ported from Linen passes its mode at call time (``__call__(x, train=True)``): after
    model.eval() its attributes said evaluation, and the adapter ran it in training mode silently (one
    dropout mask for every example, 30 zero columns of F*; a BatchNorm over a batch of one gave outputs
    all 0, rank 1). A call that draws a Dropout mask or writes BatchNorm statistics is refused; the module
    called in evaluation mode gives the hand-computed values."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, 8, param_dtype=jnp.float64, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.bn = nnx.BatchNorm(8, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
            self.head = nnx.Linear(8, 1, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x, train: bool = True):
            h = jnp.tanh(self.lin(x))
            if layer == "dropout":
                h = self.drop(h, deterministic=not train)
            else:
                h = self.bn(h, use_running_average=not train)
            return self.head(h)

    class Evaluated(nnx.Module):
        def __init__(self, model):
            self.model = model

        def __call__(self, x):
            return self.model(x, train=False)

    module = Net(nnx.Rngs(0))
    module.eval()
    apply_fn, params = from_nnx(module, batched=layer == "batchnorm")
    xs = _xs()
    with pytest.raises(ValueError, match="trained during the call .* mode is passed at call time"):
        nj.dual_matrix(apply_fn, params, xs, num_nodes=4)
    apply_fn, params = from_nnx(Evaluated(module))
    want = jnp.stack([module(x, train=False)[0] for x in xs])
    np.testing.assert_allclose(jax.vmap(apply_fn, (None, 0))(params, xs), want, rtol=1e-13)
