"""Streaming leverage (chunked Gram/TSQR passes) against the materialised dual matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import matrix_with_condition, mlp, mlp_init

import nlis_jax as nj


@pytest.fixture(scope="module")
def problem():
    apply_fn = mlp()
    params = mlp_init(jax.random.key(0), (3, 6, 1), dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (203, 3), jnp.float64)
    ys = jax.random.normal(jax.random.key(2), (203,), jnp.float64)
    return apply_fn, params, xs, ys


def _svd_leverage(F):
    u, s, _ = np.linalg.svd(np.asarray(F).reshape(-1, F.shape[-1]), full_matrices=False)
    r = int(np.sum(s > s[0] * max(u.shape) * np.finfo(s.dtype).eps))
    return np.sum(u[:, :r] ** 2, axis=1), r


@pytest.mark.parametrize("route", [None, "gram", "gram2", "stable"])
def test_streaming_matches_materialised(problem, route):
    apply_fn, params, xs, ys = problem
    # The default (adaptive) rule once; the forced routes with the fixed 16-node rule on both sides: the
    # routes see the same kind of matrix, and a streaming program holding the adaptive rule compiles for
    # 10-15 s (one per route: the route is static).
    nodes = None if route is None else 16
    F = nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=nodes)
    ref, r = _svd_leverage(F)
    # chunk of 50 does not divide n = 203: the padded rows must not leak into the Gram matrix.
    _, h, rank, taken = nj.streaming_leverage_scores(
        apply_fn, params, xs, ys, chunk_size=50, route=route, return_info=True, num_nodes=nodes
    )
    assert int(rank) == r
    if route is not None:
        assert nj.routes.ROUTES[int(taken)] == route
    else:  # the route the dense call takes on the materialised matrix
        assert int(taken) == int(nj.leverage_scores(F, return_info=True).route)
    # gram route error ~ eps·κ(G); this MLP dual has κ(G) ~ 1e4, so ~1e-11; the others are ~1e-14.
    tol = 1e-10 if route == "gram" else 1e-12
    np.testing.assert_allclose(h, ref, rtol=tol)
    probs = nj.streaming_leverage_scores(apply_fn, params, xs, ys, chunk_size=50, num_nodes=nodes)
    np.testing.assert_allclose(jnp.sum(probs), 1.0, rtol=1e-12)


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
def test_rows_formed_in_blocks_match_dense(monkeypatch, problem, host):
    """A fixed rule in reverse mode forms and uses a chunk's dual rows a block at a time
    (_passes.fold_blocks), with blocks of at most 64 examples (the floor). Device arrays (n = 203,
    chunk_size = 130) take two balanced chunks of 112 (_passes.balanced_chunk), two blocks of 56 each, the
    last chunk 91 valid rows. A host chunk source is cut into pieces of exactly 130 (its n is unknown
    until read): three blocks of 44 (the last padded by 2), and the 73-example last piece leaves the
    third block empty. Every route, the norm scores and the NaN count of the inputs must be those of the
    dense matrix."""
    from nlis_jax import _adjoint, _passes

    model, params, xs, ys = problem
    monkeypatch.setattr(_adjoint, "REVERSE_CHUNK_ELEMENTS", 1)  # blocks of at most 64 examples
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # CPU decisions, also on a GPU
    sizes = []

    def counted(model, xc, *args, **kwargs):
        sizes.append(jax.tree.leaves(xc)[0].shape[0])
        return chunk_rows(model, xc, *args, **kwargs)

    chunk_rows = _passes.chunk_rows
    monkeypatch.setattr(_passes, "chunk_rows", counted)

    def apply_fn(params, x):  # a new function: no compiled program of another test is reused
        return model(params, x)

    x_np, y_np = np.asarray(xs), np.asarray(ys)

    def pieces():  # a chunk source in pieces of uneven sizes: rechunked to 130 and 73
        return iter([(x_np[:100], y_np[:100]), (x_np[100:], y_np[100:])])

    data = (pieces, None) if host else (xs, ys)
    kw = dict(chunk_size=130, num_nodes=16, mode="reverse", return_info=True)
    F = nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=16)
    ref, r = _svd_leverage(F)
    for route in ("gram", "gram2", "stable"):
        _, h, rank, taken = nj.streaming_leverage_scores(apply_fn, params, *data, route=route, **kw)
        assert int(rank) == r and nj.routes.ROUTES[int(taken)] == route
        np.testing.assert_allclose(h, ref, rtol=1e-10 if route == "gram" else 1e-12)
    assert (44 if host else 56) in sizes  # the rows were formed in blocks
    norms = nj.streaming_norm_scores(apply_fn, params, *data, chunk_size=130, num_nodes=16, mode="reverse")
    np.testing.assert_allclose(norms, nj.norm_scores(F), rtol=1e-12)
    if host:  # one NaN in the third block of the first chunk is counted once, not once per block
        bad, y = np.asarray(xs).copy(), np.asarray(ys)
        bad[120, 1] = np.nan

        def source():  # a chunk source: its values are checked as the passes read them
            return iter([(bad[:130], y[:130]), (bad[130:], y[130:])])

        with pytest.raises(ValueError, match="contains 1 NaN"):
            nj.streaming_leverage_scores(apply_fn, params, source, **kw)


def test_default_chunk_by_platform(monkeypatch):
    """``chunk_size=None``: 4,096 examples on a CPU; on a GPU or TPU ``clip(2²⁷ // (p + 1), 4096, 65536)``
    (fewer, larger copies and launches), for host data and device arrays, leverage and norm scores."""
    from nlis_jax import _streaming

    def params(p):
        return {"w": jnp.zeros((p - 1,)), "b": jnp.zeros(())}

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert _streaming.stream_chunk_size(params(529)) == 4096
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    sizes = {529: 65536, 1377: 65536, 2048: 65504, 26_401: 5083, 40_000: 4096, 10**6: 4096}
    assert {p: _streaming.stream_chunk_size(params(p)) for p in sizes} == sizes
    seen = []

    def spy(name):
        real = getattr(_streaming, name)

        def wrapped(*args, **kwargs):
            seen.append(kwargs["chunk_size"])
            return real(*args, **kwargs)

        monkeypatch.setattr(_streaming, name, wrapped)

    for name in ("host_streaming_leverage", "host_norm_scores", "_streaming_staged", "_norm_jit"):
        spy(name)
    w = {"w": jnp.ones(3) / 3}
    xs = np.random.default_rng(0).standard_normal((40, 3))
    ys = np.tanh(xs.sum(1))

    def model(w, x):
        return jnp.tanh(x @ w["w"])

    for data in ((xs, ys), (jnp.asarray(xs), jnp.asarray(ys))):
        nj.streaming_leverage_scores(model, w, *data, num_nodes=4)
        nj.streaming_norm_scores(model, w, *data, num_nodes=4)
    assert seen == [65536] * 4


def test_blocks_only_on_a_cpu(monkeypatch):
    """Cache-sized chunks and blocks of a fixed rule in reverse mode are for CPUs: on a GPU or TPU the
    memory chunk stays one vectorised call (n / 64 sequential lax.map steps would each launch kernels).
    Everywhere a block is at most the memory chunk 2^23 / (k·p), never the whole streaming chunk."""
    from nlis_jax import _adjoint, _passes

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # CPU decisions, also on a GPU
    model = _adjoint.FlatModel(None, jnp.zeros(1377), None, 8192, ())
    kw = dict(num_nodes=8, mode="reverse")
    memory = _adjoint.default_chunk_size(20_000, 1377, 1)  # 2^23 / 1377 = 6091
    assert _adjoint.fixed_rule_chunk_size(20_000, 1377, 1, "reverse") == (1 << 18) // 1377 < memory
    assert _passes.block_size(model, **kw) == (1 << 18) // 1377
    assert _passes.block_size(model, num_nodes=None, mode="reverse") == 8192  # the adaptive rule
    assert _adjoint.fixed_rule_chunk_size(20_000, 1377, 1, "forward") == memory
    assert _passes.block_size(model, num_nodes=8, mode="forward") == memory < 8192
    wide = _adjoint.FlatModel(None, jnp.zeros(200_000), None, 8192, ())  # k·p > 2^17: under 64 examples
    assert _passes.block_size(wide, **kw) == (1 << 23) // 200_000 == 41
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _adjoint.fixed_rule_chunk_size(20_000, 1377, 1, "reverse") == memory
    assert _passes.block_size(model, **kw) == memory  # not the streaming chunk of 8,192
    assert _passes.block_size(model._replace(n=4096), **kw) == 4096
    assert _passes.block_size(wide, **kw) == 41


def test_streaming_rank_deficient_and_block():
    # Two identical hidden units make two parameter columns of F* equal: the dual matrix is rank-deficient.
    apply_fn = mlp(squeeze=False)
    params = mlp_init(jax.random.key(3), (2, 3, 2), dtype=jnp.float64)
    params[0]["w"] = params[0]["w"].at[1].set(params[0]["w"][0])
    params[1]["w"] = params[1]["w"].at[:, 1].set(params[1]["w"][:, 0])
    xs = jax.random.normal(jax.random.key(4), (97, 2), jnp.float64)
    F = nj.dual_matrix(apply_fn, params, xs, num_nodes=16)  # (97, 2, p + 1); the rule as above
    ref_rows, r = _svd_leverage(F)
    assert r < F.shape[-1]
    _, h, rank, taken = nj.streaming_leverage_scores(
        apply_fn, params, xs, chunk_size=32, return_info=True, num_nodes=16
    )
    assert int(rank) == r and nj.routes.ROUTES[int(taken)] == "stable"
    assert int(nj.leverage_scores(F, return_info=True).route) == int(taken)
    np.testing.assert_allclose(h, ref_rows.reshape(97, 2).sum(axis=1), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("host", [False, True])
def test_streaming_wide_dual_in_float64(host):
    # n < p + 1: the dual is wide and its streamed R factor rank-deficient (route "stable"). The first
    # chunk's TSQR step stacked its rows below the zero R, which came back NaN from the CPU's QR in
    # float64 from about p = 700 on: every score NaN, reported as a NaN adjoint (p = 1,105 here). Host
    # data is streamed so; device arrays now take the dense wide route (the test below).
    apply_fn = mlp()
    params = mlp_init(jax.random.key(5), (90, 12, 1), dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(6), (64, 90), jnp.float64)
    ys = jax.random.normal(jax.random.key(7), (64,), jnp.float64)
    F = nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=8)
    assert F.shape == (64, 1106)
    ref, r = _svd_leverage(F)
    data = (np.asarray(xs), np.asarray(ys)) if host else (xs, ys)  # host: numpy, streamed from the host
    _, h, rank, taken = nj.streaming_leverage_scores(
        apply_fn, params, *data, chunk_size=16, num_nodes=8, return_info=True
    )
    assert int(rank) == r == 64 and nj.routes.ROUTES[int(taken)] == "stable"
    np.testing.assert_allclose(h, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("host", [False, True])
def test_fewer_dual_rows_than_columns_skip_the_gram_matrix(monkeypatch, host):
    """Arrays with ``n·k < p + 1`` streamed the ``(p+1)²`` Gram matrix and factorised it (n = 500,
    p = 8,321: 205 s against 9 s dense; at p = 200,000 the Gram check refused 8 rows whose dual matrix
    takes 12.8 MB). Now their dual matrix is formed and scored by the wide route: on device arrays the
    same result as ``leverage_scores(dual_matrix(...))``, on host arrays to rounding (the rows of another
    program), both checked against numpy's SVD of that matrix."""
    from nlis_jax import _checks

    def f(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    def two(p, x):
        return jnp.stack([f(p, x), f(p, 2 * x)])

    rng = np.random.default_rng(11)
    params = {"w": rng.standard_normal((4, 40_000)) / 10, "v": rng.standard_normal(40_000) / 200}
    xs, ys = jnp.asarray(rng.standard_normal((8, 4))), jnp.asarray(rng.standard_normal(8))
    monkeypatch.setattr(_checks, "available_memory", lambda *_: (2**30, "in this process's memory"))
    data = (np.asarray(xs), np.asarray(ys)) if host else (xs, ys)
    info = nj.streaming_leverage_scores(f, params, *data, num_nodes=4, return_info=True)
    F = nj.dual_matrix(f, params, xs, ys, num_nodes=4)
    ref = nj.leverage_scores(F, return_info=True)
    ref_h, r = _svd_leverage(F)
    assert int(info.rank) == int(ref.rank) == r and nj.routes.ROUTES[int(info.route)] == "stable"
    if host:
        np.testing.assert_allclose(info.probs, ref.probs, rtol=1e-10)
        plain = nj.streaming_leverage_scores(f, params, *data, num_nodes=4)  # divided in place
        np.testing.assert_allclose(plain, ref.probs, rtol=1e-10)
        out = np.full(8, np.nan)  # and into an out
        assert nj.streaming_leverage_scores(f, params, *data, num_nodes=4, out=out) is out
        np.testing.assert_allclose(out, ref.probs, rtol=1e-10)
    else:
        np.testing.assert_array_equal(info.probs, ref.probs)
    np.testing.assert_allclose(info.leverage, ref_h, rtol=1e-10, atol=1e-13)
    # two outputs: 8 examples give 16 dual rows (block leverage, the sum over an example's rows)
    info = nj.streaming_leverage_scores(two, params, data[0], num_nodes=4, return_info=True)
    ref_h, r = _svd_leverage(nj.dual_matrix(two, params, xs, num_nodes=4))
    assert int(info.rank) == r
    np.testing.assert_allclose(info.leverage, ref_h.reshape(8, 2).sum(axis=1), rtol=1e-10, atol=1e-13)
    # the dual matrix and the wide route's workspace (3 such arrays on a device, 4 from the host: 38.4 and
    # 51.2 MB) checked before any work
    copies = 4 if host else 3
    budget = copies * 8 * 200_001 * 8
    monkeypatch.setattr(_checks, "available_memory", lambda *_: (budget, "in this process's memory"))
    nj.streaming_leverage_scores(f, params, *data, num_nodes=4)
    monkeypatch.setattr(_checks, "available_memory", lambda *_: (budget - 1, "in this process's memory"))
    message = (
        rf"the dual matrix F̃ \(fewer rows than columns.*\({copies} arrays .*nj.projected_leverage_scores"
    )
    with pytest.raises(MemoryError, match=message):
        nj.streaming_leverage_scores(f, params, *data, num_nodes=4)


def test_combined_r_factors_of_wide_blocks():
    # Under jax.distributed each process's R factor of a wide block is zero below its rank, and the
    # stacked factors [R₁; R₂] put a zero block as tall as R between nonzero rows, which the CPU's QR in
    # float64 answered with NaN (as the first streamed chunk above: test_streaming_wide_dual_in_float64).
    from nlis_jax._passes import TSQR

    rng = np.random.default_rng(0)
    m = 1500
    blocks = [rng.standard_normal((16, m)) for _ in range(2)]
    stacked = jnp.stack([np.vstack([np.linalg.qr(b, mode="r"), np.zeros((m - 16, m))]) for b in blocks])
    R = TSQR.combine(stacked)
    A = np.vstack(blocks)
    assert np.isfinite(R).all()
    np.testing.assert_allclose(R.T @ R, A.T @ A, rtol=0, atol=1e-12 * np.abs(A.T @ A).max())


@pytest.mark.parametrize("host", [False, True])
def test_a_failed_factorization_is_not_blamed_on_the_model(monkeypatch, problem, host):
    # A QR that returns NaN from finite rows (as jaxlib's did: test_streaming_wide_dual_in_float64) was
    # reported as "the adjoint is NaN or Inf" (device arrays) or "the dual matrix is all zeros" (host).
    monkeypatch.setattr(nj.routes, "qr_r", lambda A: jnp.full((A.shape[1],) * 2, jnp.nan, A.dtype))
    apply_fn, params, xs, ys = problem
    data = (np.asarray(xs), np.asarray(ys)) if host else (xs, ys)
    with pytest.raises(ValueError, match="although every row of the dual matrix is finite"):
        nj.streaming_leverage_scores(
            lambda p, x: apply_fn(p, x), params, *data, chunk_size=64, num_nodes=4, route="stable"
        )


def test_streaming_bad_input(problem):
    apply_fn, params, xs, ys = problem
    with pytest.raises(ValueError, match="chunk_size"):
        nj.streaming_leverage_scores(apply_fn, params, xs, ys, chunk_size=0)
    with pytest.raises(ValueError, match="route"):
        nj.streaming_leverage_scores(apply_fn, params, xs, ys, route="cholesky")
    with pytest.raises(ValueError, match="ys has shape"):
        nj.streaming_leverage_scores(apply_fn, params, xs, ys[:-1])


def test_streaming_zero_offset_column_is_not_counted():
    # Without ys and with zero biases, the last dual column f(0) is exactly zero: rank p, fast route.
    apply_fn = mlp()
    params = mlp_init(jax.random.key(5), (3, 4, 1), dtype=jnp.float64)  # zero biases: f(0) = 0
    xs = jax.random.normal(jax.random.key(6), (120, 3), jnp.float64)
    F = nj.dual_matrix(apply_fn, params, xs, num_nodes=16)  # the rule as above
    assert float(jnp.max(jnp.abs(F[:, -1]))) == 0.0
    ref, r = _svd_leverage(F)
    _, h, rank, taken = nj.streaming_leverage_scores(
        apply_fn, params, xs, chunk_size=50, return_info=True, num_nodes=16
    )
    assert int(rank) == r == F.shape[1] - 1
    assert nj.routes.ROUTES[int(taken)] != "stable"
    np.testing.assert_allclose(h, ref, rtol=1e-10)


@pytest.mark.parametrize("dtype, call_sites", [(jnp.float64, 3), (jnp.float32, 3)])
def test_each_pass_traces_the_dual_rows_once(monkeypatch, problem, dtype, call_sites):
    """The one streaming program traces the dual rows three times: the first Gram pass, the loop that runs
    every pass the route asks for (routes.transform_from_pass), the scoring pass. Held by every branch of
    a switch over the routes they were 7 (float64) and 9 (below) copies, each compiling for seconds with
    the adaptive rule."""
    from nlis_jax import _passes, _streaming

    model, params, xs, ys = problem
    params, xs, ys = jax.tree.map(lambda a: a.astype(dtype), (params, xs, ys))
    traced = []

    def apply_fn(params, x):  # a new function: no trace of an earlier test is reused
        return model(params, x)

    def counted(*args, **kwargs):
        traced.append(1)
        return chunk_rows(*args, **kwargs)

    chunk_rows = _passes.chunk_rows
    monkeypatch.setattr(_passes, "chunk_rows", counted)
    kw = dict(chunk_size=64, num_nodes=16, mode="auto", route=None)
    _streaming._streaming_jit.lower(apply_fn, params, xs, ys, jnp.asarray(1e-6, dtype), **kw)
    assert len(traced) == call_sites


def test_balanced_chunks_bound_the_padding(problem):
    """_passes.balanced_chunk: never more chunks than ceil(n / chunk_size), never longer than
    chunk_size, padding below m·chunk_size/8 rows (it was up to chunk_size − 1: n = chunk_size + 1 formed
    2·chunk_size rows), and at most five chunk lengths (compiled programs) over every n > chunk_size.
    Host arrays are read in those chunks."""
    from nlis_jax._host import leverage_source
    from nlis_jax._passes import balanced_chunk

    for size in (1, 2, 3, 8, 130, 4097):
        lengths = set()
        for n in range(1, 12 * size + 2):
            chunk = balanced_chunk(n, size)
            m = -(-n // chunk)
            assert 1 <= chunk <= size and m == -(-n // size), (n, size, chunk)
            assert m * chunk - n < m * max(size // 8, 1), (n, size, chunk)
            if n > size:
                lengths.add(chunk)
        assert len(lengths) <= 5, (size, sorted(lengths))
    assert balanced_chunk(4097, 4096) == 2560  # 5,120 rows formed, not 8,192

    apply_fn, params, xs, ys = problem
    source, chunk = leverage_source(apply_fn, params, np.asarray(xs), np.asarray(ys), 130)
    assert chunk == 112 and [len(x) for x, _ in source()] == [112, 91]


def test_the_folded_scoring_transform_is_a_highest_precision_product():
    """The host path folds the refinement into the first factor eagerly, outside the jitted passes that
    trace under ``highest_precision``: at the user's ``jax_default_matmul_precision`` (bfloat16, or TF32
    by default for float32 on recent GPUs) it rounded the transform (emulated: scores 0.11 off, summing to
    1.0064). The product is traced at HIGHEST whatever the setting."""
    from nlis_jax import routes
    from nlis_jax._passes import combined_transform

    m = jnp.eye(3, dtype=jnp.float32)
    t = routes.Transform(m, 2 * m, jnp.asarray(True), jnp.asarray(3), jnp.asarray(1))
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(combined_transform)(t)

    def eqns(jaxpr):  # with those of nested programs (combined_transform is jitted)
        for e in jaxpr.eqns:
            yield e
            inner = e.params.get("jaxpr")
            if inner is not None:
                yield from eqns(getattr(inner, "jaxpr", inner))

    dots = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(
        e.params["precision"] in (jax.lax.Precision.HIGHEST, (jax.lax.Precision.HIGHEST,) * 2) for e in dots
    ), [e.params["precision"] for e in dots]
    np.testing.assert_array_equal(combined_transform(t).first, 2 * m)


@pytest.mark.parametrize("host", [False, True])
def test_streaming_norm_scores_default_rule_matches_the_closed_form(host):
    """The default rule of the streamed norm scores certifies each adjoint, as the leverage scores'
    default does: the fixed 16-node rule it had before was 8% off on a row (140% on the largest score
    at a column ×1e6) of ``tanh(<θ, x>)`` with ``|<θ, x>|`` in the hundreds. Reference: the closed form
    ``f*(θ; x) = tanh(z)/z · x``, ``z = <θ, x>``."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 6))
    X[:, 0] *= 100.0
    theta = np.full(6, 0.3)
    y = np.tanh(X @ theta) + 0.1 * rng.normal(size=400)
    z = X @ theta
    F = np.concatenate([(np.tanh(z) / z)[:, None] * X, -y[:, None]], axis=1)
    exact = np.sum(F**2, axis=1) / np.sum(F**2)
    data = (X, y) if host else (jnp.asarray(X), jnp.asarray(y))
    got = nj.streaming_norm_scores(lambda th, x: jnp.tanh(x @ th), jnp.asarray(theta), *data)
    np.testing.assert_allclose(np.asarray(got), exact, rtol=1e-9)


@pytest.mark.parametrize("where", ["device", "host", "out"])
def test_ill_conditioned_streaming_probabilities_sum_to_one(tmp_path, where):
    """On float64 route "stable" the streamed basis ``A D⁻¹VS⁻¹`` is orthonormal only to ``eps·κ``: the
    raw leverage of degree-15 polynomial features (``κ`` of the equilibrated matrix 1.8e13) summed to
    ``rank·(1 + 9e-7)``, and ``h / rank`` was refused by ``nj.sample`` (float64 tolerance 1e-8). The
    probabilities are ``h / Σh``: they sum to 1 to rounding and stay within ``eps·κ`` of the dense ones."""
    t = np.random.default_rng(0).uniform(0, 1, 4000)
    X, y = np.vander(t, 16, increasing=True), np.sin(6 * t)

    def linear(theta, x):
        return x @ theta

    xs = jnp.asarray(X) if where == "device" else X
    out = np.lib.format.open_memmap(tmp_path / "p.npy", "w+", np.float64, (4000,)) if where == "out" else None
    info = nj.streaming_leverage_scores(linear, jnp.zeros(16), xs, y, return_info=True, out=out)
    p = np.asarray(info.probs)
    assert int(info.rank) == 17 and nj.routes.ROUTES[int(info.route)] == "stable"
    assert abs(p.sum() - 1) < 1e-13
    dense = np.asarray(nj.linear_leverage_scores(X, y))
    A = np.c_[X, -y]
    kappa = np.linalg.cond(A / np.linalg.norm(A, axis=0))  # 1.8e13: eps·κ = 4e-3 (measured 5e-4)
    assert np.max(np.abs(p - dense)) < np.finfo(np.float64).eps * kappa * dense.max()
    idx, _ = nj.sample(jax.random.key(0), jnp.asarray(p), 10)
    assert idx.shape == (10,)


def _linear_problem(kappa: float, dtype, dependent: bool = False):
    """A linear model ``x @ θ`` whose inputs (400 × 8) have singular values from 1 to ``1/kappa``; with
    ``dependent`` column 1 repeats column 0."""
    rng = np.random.default_rng(0)
    X, _ = matrix_with_condition(rng, 400, 8, kappa, heavy_rows=False)
    if dependent:
        X[:, 1] = X[:, 0]
    ys = rng.standard_normal(400)

    def model(theta, x):
        return x @ theta

    return model, jnp.ones(8, dtype), jnp.asarray(X, dtype), jnp.asarray(ys, dtype)


def _passes_run(monkeypatch):
    """The passes an eager streamed leverage runs, in order: ``"first"``, ``"gram"`` or ``"tsqr"``."""
    from nlis_jax import _passes, _streaming

    kinds, reduce = [], _streaming._device_reduce

    def spy(apply_fn, params, xs, ys, init, args, *, pass_, **kw):
        if pass_ is _passes.SCALED_GRAM:
            kinds.append("first")
        else:
            assert pass_ is _passes.ANY  # every later pass through its one program
            kinds.append("tsqr" if int(args[0]) == nj.routes.PASS_TSQR else "gram")
        return reduce(apply_fn, params, xs, ys, init, args, pass_=pass_, **kw)

    monkeypatch.setattr(_streaming, "_device_reduce", spy)
    return kinds


@pytest.mark.parametrize(
    "case, route, passes",
    [
        ("mlp64", "gram", ["first"]),
        ("mlp64", "gram2", ["first", "gram"]),
        ("mlp64", "stable", ["first", "tsqr"]),
        ("mlp64", None, None),
        ("mlp32", "stable", ["first", "tsqr", "gram"]),
        ("linear32", None, ["first", "gram"]),  # route "shifted", one CholeskyQR step
        ("dependent32", None, ["first", "gram", "tsqr", "gram"]),  # "shifted"'s rank check fails: "stable"
    ],
)
def test_eager_call_runs_only_its_routes_passes(monkeypatch, problem, case, route, passes):
    """An eager call on device arrays runs the first pass, decides the route from its Gram matrix, and
    then runs only the passes that route asks for, each a program of its own
    (routes.transform_stepwise); the one program of a traced call (_streaming_jit, kept for calls under
    a user's jit) holds every route's stages, and XLA reserved 19–21 (p+1)² arrays for it on every
    route. Both must take the same route to the same rank and the same scores: the same operations in
    separate programs, where XLA may only fuse sums differently (1e-12 in float64, 1e-5 in float32)."""
    from nlis_jax import _streaming

    if case.startswith("mlp"):
        dtype = jnp.float64 if case == "mlp64" else jnp.float32
        apply_fn, params, xs, ys = problem
        params, xs, ys = jax.tree.map(lambda a: a.astype(dtype), (params, xs, ys))
        if dtype == jnp.float32:  # a column of the inputs 10^1.75 times larger: route "stable"
            xs = xs * jnp.asarray([[1, 10**1.75, 10**-1.75]], dtype)
    else:
        dtype = jnp.float32
        apply_fn, params, xs, ys = _linear_problem(1e4, dtype, dependent=case == "dependent32")
    tol = nj.routes.tolerance(nj.routes.default_rtol(dtype), dtype)
    kw = dict(chunk_size=64, num_nodes=8, mode="auto", route=route)
    kinds = _passes_run(monkeypatch)
    staged = _streaming._streaming_staged(apply_fn, params, xs, ys, tol, **kw)
    fused = _streaming._streaming_jit(apply_fn, params, xs, ys, tol, **kw)
    names = {"mlp32": "stable", "linear32": "shifted", "dependent32": "stable"}
    assert nj.routes.ROUTES[int(staged[2])] == (route or names.get(case, nj.routes.ROUTES[int(fused[2])]))
    if passes is not None:
        assert kinds == passes
    for got, want in zip(staged[1:], fused[1:], strict=True):  # rank, route, NaN counts, lost
        assert int(got) == int(want)
    rtol = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(staged[0], fused[0], rtol=rtol, atol=rtol * float(jnp.max(fused[0])))


def test_eager_shifted_route_with_its_second_step(monkeypatch):
    """Route "shifted" takes a second CholeskyQR step, with one more Gram pass, when the first leaves
    Y·M1 ill-conditioned (cholesky_start's needs_pass). Forced here on a float32 linear model (κ = 1e4)
    that needs only one: the scores must still be those of the SVD (float32: 1e-4) and the extra pass
    run."""
    from nlis_jax import routes

    first = routes._cholesky_first

    def always_two(G_a, M):
        start, M1 = first(G_a, M)
        return start._replace(needs_pass=jnp.asarray(True)), M1

    monkeypatch.setattr(routes, "_cholesky_first", always_two)
    apply_fn, params, xs, ys = _linear_problem(1e4, jnp.float32)
    kinds = _passes_run(monkeypatch)
    lev = nj.streaming_leverage_scores(apply_fn, params, xs, ys, chunk_size=64, num_nodes=4, return_info=True)
    assert kinds == ["first", "gram", "gram"] and nj.routes.ROUTES[int(lev.route)] == "shifted"
    F = np.concatenate([np.asarray(xs, np.float64), -np.asarray(ys, np.float64)[:, None]], axis=1)
    ref, r = _svd_leverage(F)
    assert int(lev.rank) == r == 9
    np.testing.assert_allclose(lev.leverage, ref, rtol=1e-4, atol=1e-4 * ref.max())


def test_eager_passes_hold_no_route_workspace():
    """XLA's buffer plan of the eager call's pass programs: the later passes' one program (Gram or TSQR of
    a chunk: the TSQR step stacks the chunk's rows on R and factors them) reserves at most 3 (p+1)²
    arrays besides its arguments and outputs, the scoring pass at most 1, where the one program of
    every route (_streaming_jit) reserves more than 15: the peak of an eager call is that of its
    largest stage (measured: benchmarks/README.md (a), "Streamed workspace")."""
    from nlis_jax import _passes, _streaming

    apply_fn = mlp()
    params = mlp_init(jax.random.key(0), (3, 40, 1), dtype=jnp.float64)  # p + 1 = 202
    xs = jax.random.normal(jax.random.key(1), (600, 3), jnp.float64)
    ys = jnp.zeros(600)
    m = 202
    gram = m * m * 8
    kw = dict(chunk_size=32, num_nodes=8, mode="auto")
    G = jnp.zeros((m, m))
    colmax = jnp.ones(m)

    def temp(lowered):
        return lowered.compile().memory_analysis().temp_size_in_bytes / gram

    later = _streaming._device_reduce.lower(
        apply_fn, params, xs, ys, G, (0, G, colmax), pass_=_passes.ANY, **kw
    )
    t = nj.routes.Transform(G, G, jnp.asarray(True), jnp.int32(m), jnp.int32(1))
    scores = _streaming._device_scores.lower(
        apply_fn, params, xs, ys, (t, colmax), kernel=_passes.leverage_rows, **kw
    )
    fused = _streaming._streaming_jit.lower(apply_fn, params, xs, ys, jnp.asarray(1e-15), route=None, **kw)
    assert temp(later) <= 3 and temp(scores) <= 1 and temp(fused) > 15, (
        temp(later),
        temp(scores),
        temp(fused),
    )
