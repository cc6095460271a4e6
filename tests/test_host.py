"""Streaming scores of host data (numpy, memmap, chunk sources): same scores, bounded anonymous memory."""

from __future__ import annotations

import gc
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import BETA_TARGET, TV_TARGET, matrix_with_condition, mlp_params, tv_beta

import nlis_jax as nj
from nlis_jax._passes import balanced_chunk
from nlis_jax.experiments import nets
from nlis_jax.experiments.memory import PeakRss

N, D = 300, 3
MLP = nets.mlp(jnp.tanh)


def _data(dtype=np.float64):
    rng = np.random.default_rng(5)
    return rng.standard_normal((N, D)).astype(dtype), rng.standard_normal(N).astype(dtype)


@pytest.mark.parametrize("route", [None, "gram", "gram2", "stable"])
def test_numpy_input_matches_dense_scores(route):
    """Host path (a Python loop over chunks) = dense leverage of the dual matrix, on every route."""
    params = mlp_params(0, (D, 4, 1))
    xs, ys = _data()
    # The default (adaptive) rule once; the forced routes with the fixed 16-node rule on both sides (the
    # route is static: each would compile the adaptive rule's steps again, ~3 s a step).
    nodes = None if route is None else 16
    ref = nj.leverage_scores(nj.dual_matrix(MLP, params, xs, ys, num_nodes=nodes))
    h = nj.streaming_leverage_scores(MLP, params, xs, ys, chunk_size=64, route=route, num_nodes=nodes)
    assert isinstance(h, jax.Array) and h.shape == (N,)
    # float64, rows and Gram sums in another order than the dense route: rounding only
    np.testing.assert_allclose(h, ref, rtol=1e-10, atol=1e-13)


def test_chunk_source_of_uneven_pieces_and_block_outputs():
    """A callable of (x, y) pieces of any sizes (regrouped into chunks); k = 2 outputs (block leverage)."""
    params = mlp_params(1, (D, 4, 2))
    xs, _ = _data()
    ys = np.random.default_rng(6).standard_normal((N, 2))
    bounds = [0, 1, 70, 71, 200, N]
    calls = []

    def source():
        calls.append(1)
        return ((xs[a:b], ys[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))

    ref = nj.leverage_scores(nj.dual_matrix(MLP, params, xs, ys, num_nodes=16))  # fixed rule: compiles fast
    h = nj.streaming_leverage_scores(MLP, params, source, chunk_size=64, num_nodes=16)
    np.testing.assert_allclose(h, ref, rtol=1e-10, atol=1e-13)
    assert len(calls) >= 2  # one call per pass


def test_float32_follows_params_and_matches_device_path():
    params = mlp_params(2, (D, 4, 1), dtype=np.float32)
    xs, ys = _data(np.float32)
    # This float32 dual matrix is ill-conditioned: both paths take route "shifted" (host data took
    # "stable" for it before: test_float32_host_data_take_route_shifted); forced to the same route
    # "stable", the same sums chunk by chunk. The fixed 16-node rule: the device path's program with the
    # adaptive rule compiles for 10-15 s. One chunk (chunk_size ≥ n): the same rows summed in the same
    # order, so the same values to a few float32 roundings. Several chunks: the device path's chunks are
    # strided (rows i, i + m, …: a row-sharded xs stays sharded) where the host's are contiguous, so the
    # sums group rows differently; both then meet float32's targets against the float64 leverage of the
    # same float32 values.
    for chunk_size in (N, 64):
        kw = dict(chunk_size=chunk_size, route="stable", num_nodes=16)
        h = nj.streaming_leverage_scores(MLP, params, xs, ys, **kw)
        h_dev = nj.streaming_leverage_scores(MLP, params, jnp.asarray(xs), jnp.asarray(ys), **kw)
        assert h.dtype == h_dev.dtype == jnp.float32
        if chunk_size == N:
            np.testing.assert_allclose(h, h_dev, rtol=1e-5, atol=1e-7)
            continue
        wide = jax.tree.map(lambda a: np.asarray(a, np.float64), (params, xs, ys))
        ref = np.asarray(nj.leverage_scores(nj.dual_matrix(MLP, *wide, num_nodes=16)))
        for got in (h, h_dev):
            tv, beta = tv_beta(got, ref)
            assert tv <= TV_TARGET and beta >= BETA_TARGET, (tv, beta)


def test_bad_host_input_named(tmp_path):
    params = mlp_params(0, (D, 4, 1))
    xs, ys = _data()
    bad = xs.copy()
    bad[N - 1, 0] = np.nan  # in the last, padded chunk
    with pytest.raises(ValueError, match="xs contains 1 NaN or Inf"):  # in memory: checked before any work
        nj.streaming_leverage_scores(MLP, params, bad, ys, chunk_size=64)
    bad_mm = np.lib.format.open_memmap(tmp_path / "bad.npy", mode="w+", dtype=bad.dtype, shape=bad.shape)
    bad_mm[:] = bad
    with pytest.raises(ValueError, match="1 NaN or Inf"):  # a memmap: found chunk by chunk, in pass 1
        nj.streaming_leverage_scores(MLP, params, bad_mm, ys, chunk_size=64)
    with pytest.raises(ValueError, match=r"ys has shape \(299,\) but xs has 300 examples"):
        nj.streaming_leverage_scores(MLP, params, xs, ys[:-1], chunk_size=64)
    with pytest.raises(ValueError, match=r"ys has shape \(300, 1\) but the model gives outputs of shape"):
        nj.streaming_leverage_scores(MLP, params, xs, ys[:, None], chunk_size=64)
    with pytest.raises(ValueError, match="pass ys=None"):
        nj.streaming_leverage_scores(MLP, params, lambda: iter([]), ys)
    with pytest.raises(ValueError, match="yielded no examples"):
        nj.streaming_leverage_scores(MLP, params, lambda: iter([]))
    with pytest.raises(TypeError, match=r"\(x_chunk, y_chunk\) pairs"):
        nj.streaming_leverage_scores(MLP, params, lambda: iter([xs]))


def _peak_growth(fn) -> tuple[int, object]:
    """Peak RssAnon growth while ``fn`` runs, sampled every 2 ms in a thread."""
    with PeakRss(0.002) as rss:
        result = fn()
    return rss.peak - rss.before, result


def _single_index(theta, x):
    return jnp.tanh(x @ theta)


def test_nan_in_a_float32_memmap_without_x64_is_not_blamed_on_a_cast(tmp_path):
    """Without x64, a NaN in a float32 memmap (counted on the device, in pass 1) was reported as "NaN or
    Inf once cast to float32 (float64 data without jax_enable_x64 ...) or enable jax_enable_x64": no
    float64 data was involved. That wording stays for float64 data and a user's chunk source."""
    xs = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    xs[7, 1] = np.nan
    for dtype in (np.float32, np.float64):
        mm = np.lib.format.open_memmap(tmp_path / f"{np.dtype(dtype).name}.npy", "w+", dtype, xs.shape)
        mm[:] = xs
    f32 = np.load(tmp_path / "float32.npy", mmap_mode="r")
    f64 = np.load(tmp_path / "float64.npy", mmap_mode="r")

    def f(p, x):
        return jnp.tanh(x @ p)

    p = np.ones(3, np.float32)
    with jax.enable_x64(False):
        for call in (nj.streaming_leverage_scores, nj.streaming_norm_scores):
            with pytest.raises(ValueError, match=r"^xs or ys contains 1 NaN or Inf value\(s\); clean"):
                call(f, p, f32, chunk_size=16)
            with pytest.raises(ValueError, match="once cast to float32 .float64 data without jax_enable_x64"):
                call(f, p, f64, chunk_size=16)
            with pytest.raises(ValueError, match="once cast to float32"):
                call(f, p, lambda: iter([(f32[:20], None), (f32[20:], None)]), chunk_size=16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memmap_scores_in_bounded_anonymous_memory(tmp_path):
    """A 128 MB float32 memmap: anonymous memory grows by the (n,) scores and a few chunks, not the array.

    Copying the array to the device, as the jax-array path does, grows it by at least 128 MiB (measured
    312 MiB with the padded chunk copy). The host path keeps the scores (n·4 bytes) on the host, divided
    in place, and moves them to the device once, plus a few chunks of 4096 rows: two vectors; the bound
    3·n·4 + 16 MiB leaves one for the allocator. (Its end held four or five vectors before: a copy by
    jnp.asarray and the probabilities and h of a compiled program, which failed the bound in 1 of 5 runs
    on a loaded machine.)
    """
    n, d, chunk = 2_000_000, 16, 4096
    xs = np.lib.format.open_memmap(tmp_path / "xs.npy", mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(0)
    for start in range(0, n, 1 << 18):  # written in pieces: the test itself stays in bounded memory
        stop = min(n, start + (1 << 18))
        xs[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
    xs.flush()
    del xs
    xs = np.load(tmp_path / "xs.npy", mmap_mode="r")
    theta = jnp.full((d,), 0.1, jnp.float32)
    # compiles the chunk shapes of the measured call first: 2·chunk + 7 rows were balanced to chunks of
    # 3,072 rows, so the measured call compiled its own steps inside the window (the test's flakiness)
    small = np.ascontiguousarray(xs[: 2 * chunk])
    assert balanced_chunk(small.shape[0], chunk) == balanced_chunk(n, chunk) == chunk
    kw = dict(chunk_size=chunk, route="gram", num_nodes=16)  # the fixed rule: its steps compile fast
    expected_small = nj.leverage_scores(nj.dual_matrix(_single_index, theta, small, num_nodes=16))
    got_small = nj.streaming_leverage_scores(_single_index, theta, small, **kw)
    np.testing.assert_allclose(got_small, expected_small, rtol=2e-3, atol=1e-8)

    gc.collect()  # an earlier test's garbage is not freed inside the window
    growth, h = _peak_growth(
        lambda: jax.block_until_ready(nj.streaming_leverage_scores(_single_index, theta, xs, **kw))
    )  # blocked inside the window: the end of the call is asynchronous
    bound = 3 * n * 4 + (16 << 20)
    assert growth <= bound, f"anonymous memory grew by {growth / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    assert h.shape == (n,) and h.dtype == jnp.float32
    # probabilities (correctness against dense scores: the tests above, on the same code path)
    assert np.all(np.asarray(h) >= 0)
    assert abs(float(jnp.sum(h.astype(jnp.float64))) - 1.0) < 1e-3


def test_norm_scores_host_and_device_match_dense(tmp_path):
    """One pass of squared block norms: host numpy, chunk source, device arrays and an out= memmap.

    A fixed 16-node rule on every side: the adaptive default refines examples per chunk, so two chunkings
    agree only to the quadrature tolerance; this test is about the plumbing (summation order only).
    """
    params = mlp_params(3, (D, 4, 2))
    xs, _ = _data()
    ys = np.random.default_rng(7).standard_normal((N, 2))
    ref = nj.norm_scores(nj.dual_matrix(MLP, params, xs, ys, num_nodes=16))
    host = nj.streaming_norm_scores(MLP, params, xs, ys, chunk_size=64, num_nodes=16)
    dev = nj.streaming_norm_scores(MLP, params, jnp.asarray(xs), jnp.asarray(ys), chunk_size=64, num_nodes=16)
    src = nj.streaming_norm_scores(
        MLP, params, lambda: iter([(xs[:100], ys[:100]), (xs[100:], ys[100:])]), num_nodes=16
    )
    out = np.lib.format.open_memmap(tmp_path / "norms.npy", mode="w+", dtype=np.float64, shape=(N,))
    got = nj.streaming_norm_scores(MLP, params, xs, ys, chunk_size=64, out=out, num_nodes=16)
    assert got is out
    from_source = np.empty(N)
    assert (
        nj.streaming_norm_scores(MLP, params, lambda: iter([(xs, ys)]), out=from_source, num_nodes=16)
        is from_source
    )
    for h in (host, dev, src, np.load(tmp_path / "norms.npy"), from_source):
        np.testing.assert_allclose(h, ref, rtol=1e-12, atol=1e-15)  # float64, summation order only
    with pytest.raises(ValueError, match="out must be a writable numpy array"):
        nj.streaming_norm_scores(MLP, params, xs, ys, out=np.empty(N - 1), num_nodes=16)
    with pytest.raises(ValueError, match=r"out must be a writable numpy array .* got list"):  # AttributeError
        nj.streaming_norm_scores(MLP, params, xs, ys, out=[0.0] * N, num_nodes=16)
    with pytest.raises(ValueError, match="out= is for host data"):
        nj.streaming_norm_scores(MLP, params, jnp.asarray(xs), jnp.asarray(ys), out=np.empty(N), num_nodes=16)


def test_leverage_into_memmap_then_sample_and_gather(tmp_path):
    """Scores written to a memmap, indices drawn from them, the sampled rows read back from the store."""
    params = mlp_params(0, (D, 4, 1))
    xs, ys = _data()
    np.save(tmp_path / "xs.npy", xs)
    np.save(tmp_path / "ys.npy", ys)
    xs_m, ys_m = np.load(tmp_path / "xs.npy", mmap_mode="r"), np.load(tmp_path / "ys.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(tmp_path / "scores.npy", mode="w+", dtype=np.float64, shape=(N,))
    info = nj.streaming_leverage_scores(MLP, params, xs_m, ys_m, chunk_size=64, out=out, return_info=True)
    ref = nj.leverage_scores(nj.dual_matrix(MLP, params, xs, ys), return_info=True)
    assert info.probs is out and info.leverage is None and int(info.rank) == int(ref.rank)
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), ref.probs, rtol=1e-10, atol=1e-13)
    key = jax.random.key(0)
    idx, w = nj.sample(key, out, 50)
    idx_ref, w_ref = nj.sample(key, ref.probs, 50)
    np.testing.assert_array_equal(idx, idx_ref)  # same probabilities (to 1e-13), same key
    np.testing.assert_allclose(w, w_ref, rtol=1e-9)
    xs_s, ys_s = nj.gather_rows((xs_m, ys_m), idx)
    np.testing.assert_array_equal(xs_s, xs[np.asarray(idx)])  # order of idx, repeats kept
    np.testing.assert_array_equal(ys_s, ys[np.asarray(idx)])
    with pytest.raises(ValueError, match="out of range"):
        nj.gather_rows(xs_m, np.array([0, N]))
    with pytest.raises(ValueError, match="1-D integer"):
        nj.gather_rows(xs_m, np.array([0.5]))


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_full_data_loss_of_host_data(loss):
    """weighted_loss / per_example_loss over host chunks = the device functions (float64 rounding)."""
    params = mlp_params(4, (D, 4, 1))
    xs, ys = _data()
    if loss == "logistic":
        ys = (ys > 0).astype(np.float64)
    w = np.random.default_rng(8).uniform(0, 2, N)
    kw = dict(loss=loss)
    ref = nj.weighted_loss(MLP, params, jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(w), **kw)
    got = nj.weighted_loss(MLP, params, xs, ys, w, chunk_size=64, **kw)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    ref_each = nj.per_example_loss(MLP, params, jnp.asarray(xs), jnp.asarray(ys), **kw)
    np.testing.assert_allclose(
        nj.per_example_loss(MLP, params, xs, ys, chunk_size=64, **kw), ref_each, rtol=1e-12
    )
    pairs = lambda: iter([(xs[:7], ys[:7]), (xs[7:], ys[7:])])  # noqa: E731
    np.testing.assert_allclose(
        nj.weighted_loss(MLP, params, pairs, None, **kw), jnp.sum(ref_each), rtol=1e-12
    )
    bad = w.copy()
    bad[-1] = -1.0
    with pytest.raises(ValueError, match="non-negative; 1 are negative"):
        nj.weighted_loss(MLP, params, xs, ys, bad, chunk_size=64)
    bad_x = xs.copy()
    bad_x[-1, 0] = np.inf
    with pytest.raises(ValueError, match="contains 1 NaN or Inf"):
        nj.weighted_loss(MLP, params, bad_x, ys)


@pytest.mark.parametrize(
    ("theta_dtype", "x_dtype"),
    [
        (jnp.float16, np.float32),
        (jnp.bfloat16, np.float32),
        (jnp.float32, np.float64),
        (jnp.float16, np.float16),
    ],
)
def test_host_losses_follow_the_model_output_dtype(theta_dtype, x_dtype):
    """Host data (numpy, chunked) gives the device path's dtype, the model output's, not the params':
    float16 params on float32 data used to give float16 losses (a loss of 9.2e4 raised about an `out`
    the function does not have); the running total sums in float32 at least (float16: 6.7e-4 off)."""
    linear = lambda th, x: jnp.dot(th.astype(x.dtype), x)  # noqa: E731
    rng = np.random.default_rng(12)
    n, d = 6000, 4
    xs = rng.uniform(0, 1, (n, d)).astype(x_dtype)
    ys = (rng.uniform(0, 1, n) * (300 if x_dtype != np.float16 else 3)).astype(x_dtype)
    theta = jnp.ones(d, theta_dtype)
    dev = nj.per_example_loss(linear, theta, jnp.asarray(xs), jnp.asarray(ys))
    host = nj.per_example_loss(linear, theta, xs, ys, chunk_size=64)
    assert host.dtype == dev.dtype == x_dtype
    np.testing.assert_array_equal(np.asarray(host), np.asarray(dev))
    total = nj.weighted_loss(linear, theta, xs, ys, chunk_size=64)
    exact = np.sum(np.asarray(dev, np.float64))
    assert total.dtype == x_dtype
    # float16: one rounding of a float32 sum (half an ulp; the float16 running total was 1.2e-3 off here);
    # float32: 94 chunks' partial sums; float64: rounding
    rtol = {np.float16: 0.6 * float(jnp.finfo(jnp.float16).eps), np.float32: 1e-5, np.float64: 1e-12}[x_dtype]
    np.testing.assert_allclose(float(total), exact, rtol=rtol)


def test_dual_rows_compile_once_for_all_passes():
    """With the adaptive rule the passes of the host path share one program for the dual rows of a chunk
    (the large part of a step); each pass adds only its kernel, which depends on shapes, not on the model.
    Route "stable" runs three passes here (the Gram pass, the TSQR pass, the scoring pass)."""
    from nlis_jax import _host

    params = mlp_params(6, (D, 4, 1))
    xs, ys = _data()
    for first in (True, False):

        def apply_fn(params, x):  # a new function each time: a new cache key for the rows program
            return MLP(params, x)

        rows_before, kernels_before = _host._rows_step._cache_size(), _host._kernel_step._cache_size()
        lev = nj.streaming_leverage_scores(apply_fn, params, xs, ys, chunk_size=64, route="stable")
        assert _host._rows_step._cache_size() == rows_before + 1
        if not first:  # the kernels compiled for the first model serve the second
            assert _host._kernel_step._cache_size() == kernels_before
    dense = nj.leverage_scores(nj.dual_matrix(apply_fn, params, jnp.asarray(xs), jnp.asarray(ys)))
    np.testing.assert_allclose(np.asarray(lev), np.asarray(dense), rtol=1e-9, atol=1e-15)


def test_second_host_call_does_not_recompile():
    """New values of the same shapes reuse every compiled step (counted by jax.monitoring)."""
    import collections

    event = "/jax/core/compile/backend_compile_duration"
    counts = collections.Counter()

    def listener(name, duration, **kwargs):
        counts[name] += 1

    params = mlp_params(5, (D, 4, 1))
    (xs, ys), rng = _data(), np.random.default_rng(11)
    xs2, ys2 = rng.standard_normal((N, D)), rng.standard_normal(N)
    params2 = jax.tree.map(lambda a: a * 1.1, params)

    def calls(p, x, y):
        return (
            nj.streaming_leverage_scores(MLP, p, x, y, chunk_size=64),
            nj.streaming_norm_scores(MLP, p, x, y, chunk_size=64),
            nj.weighted_loss(MLP, p, x, y, chunk_size=64),
        )

    first = jax.block_until_ready(calls(params, xs, ys))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = jax.block_until_ready(calls(params2, xs2, ys2))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert counts[event] == 0, f"recompiled {counts[event]} time(s)"
    assert not np.allclose(first[0], second[0])


def _rechunked(sizes, chunk):
    """Items of the given sizes (rows numbered 0..), regrouped by ``_host.rechunk``."""
    from nlis_jax import _host

    bounds = np.cumsum([0, *sizes])
    rows = np.arange(bounds[-1], dtype=np.float64)[:, None] * np.ones((1, 2))
    items = [(rows[a:b], rows[a:b, 0]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return rows, list(_host.rechunk(lambda: iter(items), chunk))


def test_rechunk_keeps_every_row_once_in_order():
    """Pieces of exactly ``chunk`` rows, the valid rows of all pieces the items' rows in order, the last
    piece padded with copies of its row 0: for items of every size around the chunk, empty ones too. A
    source of fewer than ``chunk`` rows in all is one piece of its own length, unpadded."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(derandomize=True, max_examples=200, deadline=None)
    @hypothesis.given(st.lists(st.integers(0, 12), max_size=8), st.integers(1, 5))
    def law(sizes, chunk):
        rows, pieces = _rechunked(sizes, chunk)
        length = chunk if len(rows) >= chunk else len(rows)
        assert all(x.shape == (length, 2) and y.shape == (length,) for (x, y), _ in pieces)
        assert all(valid == chunk for _, valid in pieces[:-1])
        valid = [(x[:v], y[:v]) for (x, y), v in pieces]
        got_x = np.concatenate([x for x, _ in valid]) if valid else np.zeros((0, 2))
        np.testing.assert_array_equal(got_x, rows)
        np.testing.assert_array_equal(np.concatenate([y for _, y in valid]) if valid else [], rows[:, 0])
        if pieces and pieces[-1][1] < length:
            (x, _), v = pieces[-1]
            np.testing.assert_array_equal(x[v:], np.broadcast_to(x[:1], (length - v, 2)))

    law()


def test_chunk_source_may_reuse_its_buffer():
    """A reader that refills one buffer per item (a common pattern): rows carried over to the next chunk
    were held by reference and overwritten (norm scores off by 2e-2); they are copies now."""
    params = mlp_params(3, (D, 4, 1))
    xs, ys = _data()
    bx, by = np.empty((7, D)), np.empty(7)

    def source():
        for start in range(0, N, 7):
            stop = min(N, start + 7)
            bx[: stop - start], by[: stop - start] = xs[start:stop], ys[start:stop]
            yield bx[: stop - start], by[: stop - start]

    ref = nj.norm_scores(nj.dual_matrix(MLP, params, xs, ys, num_nodes=16))
    got = nj.streaming_norm_scores(MLP, params, source, chunk_size=64, num_nodes=16)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


def _aligned(shape):
    """A 64-byte aligned float64 buffer: the alignment at which a CPU ``device_put`` shares numpy memory."""
    size = int(np.prod(shape))
    raw = np.empty(size + 8)
    offset = (-raw.ctypes.data % 64) // 8
    return raw[offset : offset + size].reshape(shape)


def test_chunk_source_may_refill_whole_chunks():
    """A reader that refills one aligned buffer of exactly ``chunk_size`` rows: each whole piece was a
    view of it, put on the device (where the CPU aliases it) one piece ahead, so the next refill overwrote
    it before use (norm scores off by 2.5e-2, leverage off or a false "different data" error). Whole
    pieces of a chunk source are copies now."""
    params = mlp_params(3, (D, 4, 1))
    xs, ys = _data()
    chunk = 10
    bx, by = _aligned((chunk, D)), _aligned((chunk,))

    def source():
        for start in range(0, N - N % chunk, chunk):
            bx[:], by[:] = xs[start : start + chunk], ys[start : start + chunk]
            yield bx, by

    n = N - N % chunk
    dual = nj.dual_matrix(MLP, params, xs[:n], ys[:n], num_nodes=16)
    got = nj.streaming_norm_scores(MLP, params, source, chunk_size=chunk, num_nodes=16)
    np.testing.assert_allclose(got, nj.norm_scores(dual), rtol=1e-12, atol=1e-15)
    got = nj.streaming_leverage_scores(MLP, params, source, chunk_size=chunk, num_nodes=16)
    np.testing.assert_allclose(got, nj.leverage_scores(dual), rtol=1e-9, atol=1e-12)
    # the losses too: their source was wrapped out of sight of the copy (weighted_loss 59.86 for 52.56)
    want = nj.per_example_loss(MLP, params, xs[:n], ys[:n])
    got = nj.per_example_loss(MLP, params, source, None, chunk_size=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    got = nj.weighted_loss(MLP, params, source, None, chunk_size=chunk)
    np.testing.assert_allclose(got, nj.weighted_loss(MLP, params, xs[:n], ys[:n]), rtol=1e-13)


def test_chunk_source_loss_sums_in_the_data_dtype():
    """float32 params, float64 chunks: the weighted loss is summed in float64 as for arrays (it was
    summed in float32 for a chunk source: relative error 4e-9, labelled float64)."""
    params = jax.tree.map(lambda a: a.astype(np.float32), mlp_params(3, (D, 4, 1)))
    xs, ys = _data()

    def source():
        for start in range(0, N, 7):
            yield xs[start : start + 7], ys[start : start + 7]

    want = nj.weighted_loss(MLP, params, xs, ys)
    got = nj.weighted_loss(MLP, params, source, None, chunk_size=7)
    assert got.dtype == want.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_rechunk_never_copies_a_shard_whole(tmp_path):
    """A shard that does not start on a chunk boundary (after a 10-row shard) is sliced, not copied:
    traced allocations stay about one chunk (measured 16.2 MB, the whole 16 MB shard, before)."""
    import tracemalloc

    from nlis_jax import _host

    n, chunk = 1_000_000, 4096
    big = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float64, shape=(n, 2))
    big[:] = 1.0
    big.flush()
    del big
    big = np.load(tmp_path / "x.npy", mmap_mode="r")
    items = [(np.zeros((10, 2)),), (big,)]
    tracemalloc.start()
    try:
        rows = sum(v for _, v in _host.rechunk(lambda: iter(items), chunk))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == n + 10
    assert peak < 4 * chunk * 2 * 8, f"peak traced memory {peak / 2**20:.1f} MiB for 64 KiB chunks"


def test_float32_host_data_take_route_shifted():
    """Ill-conditioned float32 host data took route "stable" (a TSQR pass: 2.6× slower on a 16–32–1 MLP,
    benchmarks/README.md (f)) where device arrays take "shifted" (Gram passes on a preconditioned matrix):
    the stages now run from Python for both. The route, rank and scores are those of the device path
    (float32: the host's chunks are contiguous, the device's strided, so sums group rows differently;
    both against float64 leverage of the same values, at float32's targets). Where "shifted" misses a
    dependent direction (a duplicated column: Σh one short of the rank), host data redo the passes on
    route "stable", as device arrays do: in 1 of these 20 cases."""
    from nlis_jax import _host

    rng = np.random.default_rng(0)
    X = matrix_with_condition(rng, 400, 8, 1e4, heavy_rows=False)[0].astype(np.float32)
    y = rng.standard_normal(400).astype(np.float32)

    def model(theta, x):
        return x @ theta

    theta = jnp.ones(8, jnp.float32)
    kw = dict(chunk_size=128, return_info=True)
    host = nj.streaming_leverage_scores(model, theta, X, y, **kw)
    device = nj.streaming_leverage_scores(model, theta, jnp.asarray(X), jnp.asarray(y), **kw)
    assert nj.routes.ROUTES[int(host.route)] == nj.routes.ROUTES[int(device.route)] == "shifted"
    assert int(host.rank) == int(device.rank) == 9
    F = np.concatenate([X.astype(np.float64), -y.astype(np.float64)[:, None]], axis=1)
    ref = np.asarray(nj.leverage_scores(jnp.asarray(F)))
    for got in (host.probs, device.probs):
        tv, beta = tv_beta(got, ref)
        assert tv <= TV_TARGET and beta >= BETA_TARGET, (tv, beta)

    redone, passes = [], _host.leverage_passes

    def spy(chunks, dim, dtype, rtol, route):
        redone.append(route == "stable")
        return passes(chunks, dim, dtype, rtol, route)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_host, "leverage_passes", spy)
        theta = jnp.ones(5, jnp.float32)
        for _ in range(20):
            X = rng.standard_normal((400, 5)).astype(np.float32)
            a, b, z = rng.choice(5, 3, replace=False)
            X[:, b], X[:, z] = X[:, a], 0.0
            y = rng.standard_normal(400).astype(np.float32)
            dense = nj.leverage_scores(nj.dual_matrix(model, theta, jnp.asarray(X), jnp.asarray(y)))
            lev = nj.streaming_leverage_scores(model, theta, X, y, **kw)
            assert int(lev.rank) == 4
            np.testing.assert_allclose(lev.probs, dense, rtol=1e-3, atol=1e-7)
    assert sum(redone) >= 1
