"""Row sharding on a 4-device CPU mesh: results equal the unsharded ones and stay sharded by example."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BETA_TARGET,
    TV_TARGET,
    conditioned_float32,
    matrix_with_condition,
    mlp,
    mlp_params,
    normal,
    small_matrices_take_the_sketch_stage,
    tv_beta,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nlis_jax as nj

N, D = 48, 3  # n divisible by the 4 devices


@functools.cache
def _mesh():
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:4])


def _rows(x):
    return jax.device_put(x, NamedSharding(_mesh(), P("data")))


def _assert_row_sharded(a):
    expected = NamedSharding(_mesh(), P("data"))
    assert a.sharding.is_equivalent_to(expected, a.ndim), a.sharding
    assert len(a.sharding.device_set) == 4


@functools.cache
def _case(k_out):
    params = mlp_params(k_out, (D, 4, k_out))
    xs = normal(10 + k_out, N, D)
    ys = normal(20 + k_out, *((N,) if k_out == 1 else (N, k_out)))
    return params, xs, ys


def test_mesh_has_four_cpu_devices():
    assert len(_mesh().devices.ravel()) == 4
    assert {d.platform for d in _mesh().devices.ravel()} == {"cpu"}


@pytest.mark.parametrize(("k_out", "mode"), [(1, "forward"), (2, "reverse")])
def test_dual_matrix_and_scores_sharded(k_out, mode):
    params, xs, ys = _case(k_out)
    apply_fn = mlp(jnp.tanh)
    F = nj.dual_matrix(apply_fn, params, xs, ys, mode=mode)
    xs_s, ys_s = _rows(xs), _rows(ys)
    _assert_row_sharded(xs_s)
    Fs = nj.dual_matrix(apply_fn, params, xs_s, ys_s, mode=mode)
    np.testing.assert_allclose(Fs, F, rtol=1e-12, atol=1e-14)
    _assert_row_sharded(Fs)
    _assert_row_sharded(nj.adjoint(apply_fn, params, xs_s, mode=mode))

    for score in (nj.leverage_scores, nj.norm_scores):
        h, hs = score(F), score(Fs)
        assert hs.shape == (N,)
        np.testing.assert_allclose(hs, h, rtol=1e-12, atol=1e-14)
        _assert_row_sharded(hs)


@pytest.mark.parametrize(("k_out", "chunk_size"), [(1, 16), (2, 16), (1, 10), (2, 6)])
def test_streaming_scores_stay_row_sharded_across_chunks(k_out, chunk_size):
    """Several chunks (chunk_size < n, the usual case): contiguous chunks put the row sharding on the
    scanned axis, so XLA gathered every row onto every device and the scores came back replicated. The
    strided chunks keep each chunk row-sharded: no all-gather in the program, scores row-sharded and
    equal to the dense ones. A chunk length that is not a multiple of the 4 devices (10: balanced to 10
    rows, 6) lost the sharding the same way; device chunks are rounded to a multiple of the devices."""
    params, xs, ys = _case(k_out)
    apply_fn = mlp(jnp.tanh)
    xs_s, ys_s = _rows(xs), _rows(ys)
    F = nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=8)
    kw = dict(chunk_size=chunk_size, num_nodes=8)
    for streamed, dense in (
        (nj.streaming_leverage_scores, nj.leverage_scores),
        (nj.streaming_norm_scores, nj.norm_scores),
    ):
        hs = streamed(apply_fn, params, xs_s, ys_s, **kw)
        np.testing.assert_allclose(hs, dense(F), rtol=1e-10, atol=1e-14)
        _assert_row_sharded(hs)
    from nlis_jax import _streaming

    text = _streaming._norm_jit.lower(apply_fn, params, xs_s, ys_s, mode="auto", **kw)
    assert " all-gather(" not in text.compile().as_text()


@pytest.mark.parametrize(("embedding", "chunk_size"), [("sparse", 16), ("khatri_rao", 16), ("sparse", 10)])
def test_projected_rows_stay_row_sharded_across_chunks(embedding, chunk_size):
    """``projected_dual_matrix`` over several chunks gathered every row onto every device (2 all-gathers)
    and returned Y replicated; strided chunks keep Y row-sharded, equal to the one-device Y (also for a
    chunk_size that is not a multiple of the devices)."""
    params, xs, ys = _case(1)
    apply_fn = mlp(jnp.tanh)
    kw = dict(dim=12, chunk_size=chunk_size, embedding=embedding)
    ref = nj.projected_dual_matrix(jax.random.key(3), apply_fn, params, xs, ys, **kw)
    Y = nj.projected_dual_matrix(jax.random.key(3), apply_fn, params, _rows(xs), _rows(ys), **kw)
    np.testing.assert_allclose(Y, ref, rtol=1e-12, atol=1e-14)
    _assert_row_sharded(Y)
    from nlis_jax import _projected

    args = (jax.random.key(3), apply_fn, params, _rows(xs), _rows(ys))
    lowered = _projected._projected_jit.lower(
        *args, dim=12, chunk_size=chunk_size, num_nodes=16, mode="auto", embedding=embedding, sparsity=1
    )
    assert " all-gather(" not in lowered.compile().as_text()


def test_basis_routes_sharded():
    """Gram, two-pass Gram and QR routes all give the unsharded leverage on row-sharded input."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((N, 5))
    matrices = {
        "gram": A,
        "gram2": matrix_with_condition(rng, N, 5, 1e4)[0],
        "stable": A[:, :2] @ rng.standard_normal((2, 5)),
    }
    for route, F in matrices.items():
        U, rank, idx = nj.orthonormal_basis(_rows(jnp.asarray(F)))
        assert nj.routes.ROUTES[int(idx)] == route
        _assert_row_sharded(U)
        hs = nj.leverage_scores(_rows(jnp.asarray(F)))
        np.testing.assert_allclose(hs, nj.leverage_scores(jnp.asarray(F)), rtol=1e-12, atol=1e-14)
        _assert_row_sharded(hs)


def test_ill_conditioned_float32_scores_stay_row_sharded():
    """The eager host float64 Gram route (wide ill-conditioned float32 input on a CPU) took a matrix
    sharded over 4 CPU devices to the host and returned its scores on one device; sharded input now
    keeps the one-program routes, row-sharded, with the unsharded scores to float32's targets."""
    F = conditioned_float32(3, 1e3, 800, 40)  # κ(G_eq) ≈ 1e6: past route "gram" in float32
    with small_matrices_take_the_sketch_stage(host_float64_gram=True):
        ref = nj.leverage_scores(jnp.asarray(F), return_info=True)
        assert nj.routes.ROUTES[int(ref.route)] == "gram"  # one device: the host float64 Gram route
        info = nj.leverage_scores(
            jax.device_put(jnp.asarray(F), NamedSharding(_mesh(), P("data"))), return_info=True
        )
    _assert_row_sharded(info.probs)
    _assert_row_sharded(info.leverage)
    tv, beta = tv_beta(info.probs, np.asarray(ref.probs, np.float64))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (tv, beta)


def test_dual_operator_sharded():
    params, xs, ys = _case(1)
    apply_fn = mlp(jnp.tanh)
    F = nj.dual_matrix(apply_fn, params, xs, ys)
    op = nj.dual_operator(apply_fn, params, _rows(xs), _rows(ys))
    v = jnp.linspace(-1.0, 1.0, F.shape[1])
    mv = op.mv(v)
    np.testing.assert_allclose(mv, F @ v, rtol=0, atol=1e-12)
    _assert_row_sharded(mv)
    np.testing.assert_allclose(op.rmv(_rows(ys)), F.T @ ys, rtol=0, atol=1e-12)


def test_sample_of_row_sharded_probabilities_draws_on_gathered_probabilities():
    """With x64, sampling from row-sharded probabilities (the scores of a row-sharded dual matrix) ran
    jax.random.choice's search on the sharded cumulative sum: all-reduces and collective permutes in the
    search loop, ~1000× the one-device time (n = 2^18, s = 2^14: 18 s against 0.015 s; benchmark figures,
    not asserted here). The probabilities are gathered once first: the draw program holds one all-gather
    and no other collective, and the sample is the one-device sample."""
    from nlis_jax import _sampling

    probs = np.random.default_rng(5).exponential(size=4096)
    probs /= probs.sum()
    key = jax.random.key(4)
    rows = _rows(probs)
    seen = []
    draw = _sampling._sample_with_replacement

    def spy(*args):
        seen.append(args)
        return draw(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_sampling, "_sample_with_replacement", spy)
        idx, w = nj.sample(key, rows, 64)
    ref_idx, ref_w = nj.sample(key, jnp.asarray(probs), 64)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(w, ref_w, rtol=1e-14)
    text = draw.lower(*seen[0]).compile().as_text()
    collectives = {
        op: text.count(f" {op}(") + text.count(f" {op}-start(")
        for op in ("all-gather", "all-reduce", "collective-permute")
    }
    assert collectives == {"all-gather": 1, "all-reduce": 0, "collective-permute": 0}, collectives


def test_adaptive_streaming_keeps_its_error_vectors_on_their_devices():
    """The adaptive rule's QuadratureWarning report was a host callback given each chunk's per-example
    error, residual and convergence vectors: on row-sharded input XLA gathered them onto device 0 ("[SPMD]
    Involuntary full rematerialization", 12 warnings per call; 4 extra all-gathers). They are reduced
    to nine scalars on the devices first: no floating or boolean vector is gathered, and the scores are
    the dense ones."""
    import re

    from nlis_jax import _streaming

    params, xs, ys = _case(1)
    apply_fn = mlp(jnp.tanh)
    xs_s, ys_s = _rows(xs), _rows(ys)
    kw = dict(chunk_size=16, num_nodes=None, mode="auto")
    text = _streaming._norm_jit.lower(apply_fn, params, xs_s, ys_s, **kw).compile().as_text()
    gathered = re.findall(r"= (\w+)\[[\d,]*\]\{[^}]*\} all-gather(?:-start)?\(", text)
    assert not [t for t in gathered if t.startswith(("f", "pred"))], gathered
    dense = nj.norm_scores(nj.dual_matrix(apply_fn, params, xs, ys))
    hs = nj.streaming_norm_scores(apply_fn, params, xs_s, ys_s, chunk_size=16)
    np.testing.assert_allclose(hs, dense, rtol=1e-12)
    _assert_row_sharded(hs)


def test_subnormal_weights_sharded_over_devices_are_refused():
    """float32 weights all 1e-39, sharded over the devices: the weighted loss was 0 (the device flushed
    them; only weights on one device were read), while the same weights on one device were refused."""
    xs = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    ys, w = np.ones(N, np.float32), np.full(N, 1e-39, np.float32)
    params = np.ones(D, np.float32)

    def model(p, x):
        return jnp.tanh(x @ p)

    for weights in (jnp.asarray(w), _rows(w)):
        with pytest.raises(ValueError, match="weights sum to 0 in float32"):
            nj.weighted_loss(model, params, _rows(xs), _rows(ys), weights)


def test_weighted_loss_with_sharded_weights_closed_over_in_a_jit():
    """The subnormal-weights check of weights held elsewhere (sharded; any device array on a GPU) ran its
    reduction under the user's trace: TracerBoolConversionError inside jax.jit."""
    xs = np.random.default_rng(1).standard_normal((N, D))
    ys, w = np.ones(N), np.linspace(0.5, 1.5, N)
    gx, gy, gw = _rows(xs), _rows(ys), _rows(w)

    def model(p, x):
        return jnp.tanh(x @ p)

    def loss(p):
        return nj.weighted_loss(model, p, gx, gy, gw)

    params = jnp.full(D, 0.3)
    want = np.sum(w * (np.tanh(xs @ np.full(D, 0.3)) - ys) ** 2)
    np.testing.assert_allclose(jax.jit(loss)(params), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(params), jax.grad(loss)(params), rtol=1e-12)
