"""Projected leverage (issue #9) against the materialised dual matrix and numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlis_jax as nj
from nlis_jax._projected import _projected_jit, projected_dual_matrix, projected_leverage_scores
from nlis_jax.experiments.nets import mlp, mlp_init

MODEL = mlp()
BLOCK_MODEL = mlp(squeeze=False)


@pytest.fixture(scope="module")
def problem():
    params = mlp_init(jax.random.key(0), (3, 5, 1), dtype=jnp.float64)  # p + 1 = 27
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((301, 3)))
    ys = jnp.asarray(rng.standard_normal(301))
    return params, xs, ys


def svd_leverage(F):
    """Raw leverage and rank from numpy's SVD (rank by numpy's default tolerance)."""
    F = np.asarray(F, np.float64).reshape(-1, np.shape(F)[-1])
    U, s, _ = np.linalg.svd(F, full_matrices=False)
    rank = int(np.sum(s > max(F.shape) * np.finfo(np.float64).eps * s[0]))
    return np.sum(U[:, :rank] ** 2, axis=1), rank


@pytest.mark.parametrize(
    "embedding, dim, sparsity",
    [("sparse", 27, 1), ("sparse", 40, 1), ("sparse", 54, 2), ("gaussian", 27, 1), ("gaussian", 35, 1)],
)
def test_exact_when_dim_covers_the_columns(problem, embedding, dim, sparsity):
    # dim ≥ p + 1: a Gaussian Ω has full row rank almost surely; the sparse embedding's hashing is then
    # injective (per block), so Y is F̃ with signed, permuted (duplicated) columns: same range, same leverage.
    params, xs, ys = problem
    F = nj.dual_matrix(MODEL, params, xs, ys)
    ref_h, ref_rank = nj.leverage_scores(F, return_info=True)[1:3]
    info = projected_leverage_scores(
        jax.random.key(3),
        MODEL,
        params,
        xs,
        ys,
        dim=dim,
        chunk_size=64,  # 301 = 4·64 + 45: exercises the padded last chunk
        embedding=embedding,
        sparsity=sparsity,
        return_info=True,
    )
    assert int(info.rank) == int(ref_rank) == 27
    np.testing.assert_allclose(info.probs, ref_h / ref_rank, rtol=1e-8)
    np.testing.assert_allclose(info.leverage, ref_h, rtol=1e-8)
    assert info.probs.dtype == jnp.float64 and info.route.dtype == jnp.int32
    np.testing.assert_allclose(np.sum(info.probs), 1.0, rtol=1e-12)


def test_projection_is_dual_times_embedding(problem):
    # Y = F̃ Ω with Ω recovered column by column from Y of unit-vector "duals": a linear model whose dual
    # matrix is exactly [X | −y], so Y must equal [X | −y] Ω for the same key and a Gaussian Ω.
    _, xs, ys = problem
    theta = jnp.zeros((3,), jnp.float64)

    def linear(t, x):
        return jnp.dot(x, t)

    key = jax.random.key(4)
    Y = projected_dual_matrix(key, linear, theta, xs, ys, dim=8, embedding="gaussian", chunk_size=100)
    eye = jnp.eye(4, dtype=jnp.float64)  # dual rows of e_j: [e_j | 0] for j < 3 and [0 | −(−1)] for j = 3
    omega = projected_dual_matrix(key, linear, theta, eye[:, :3], -eye[:, 3], dim=8, embedding="gaussian")
    X_tilde = np.column_stack([np.asarray(xs), -np.asarray(ys)])
    np.testing.assert_allclose(Y, X_tilde @ np.asarray(omega), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("embedding", ["sparse", "gaussian"])
def test_rank_deficient_dual_with_dim_between_rank_and_columns(embedding):
    # Duplicated input features give duplicated first-layer gradient columns: rank(F̃) < p + 1. With
    # rank ≤ dim < p + 1 the projection keeps the range (Gaussian: almost surely; sparse: checked through
    # rank(Y)), so the scores are the exact ones.
    rng = np.random.default_rng(5)
    base = rng.standard_normal((400, 3))
    xs = jnp.asarray(np.column_stack([base, base, base[:, :1]]))  # 7 features, 3 distinct
    ys = jnp.asarray(rng.standard_normal(400))
    params = mlp_init(jax.random.key(6), (7, 4, 1), dtype=jnp.float64)  # p + 1 = 38
    F = nj.dual_matrix(MODEL, params, xs, ys)
    ref_h, ref_rank = svd_leverage(F)
    assert ref_rank < 38 - 10  # genuinely rank-deficient
    dim = ref_rank + (0 if embedding == "gaussian" else 6)
    info = projected_leverage_scores(
        jax.random.key(7), MODEL, params, xs, ys, dim=dim, embedding=embedding, return_info=True
    )
    assert dim < 38 and int(info.rank) == ref_rank
    np.testing.assert_allclose(info.leverage, ref_h, rtol=1e-8, atol=1e-12)


def test_block_leverage_for_several_outputs(problem):
    params = mlp_init(jax.random.key(8), (3, 4, 2), dtype=jnp.float64)  # p + 1 = 27, k = 2
    xs = problem[1]
    F = nj.dual_matrix(BLOCK_MODEL, params, xs)  # (n, 2, 27)
    ref_h, ref_rank = nj.leverage_scores(F, return_info=True)[1:3]
    info = projected_leverage_scores(jax.random.key(9), BLOCK_MODEL, params, xs, dim=30, return_info=True)
    Y = projected_dual_matrix(jax.random.key(9), BLOCK_MODEL, params, xs, dim=30)
    assert Y.shape == (301, 2, 30) and info.probs.shape == (301,)
    assert int(info.rank) == int(ref_rank)
    np.testing.assert_allclose(info.leverage, ref_h, rtol=1e-8, atol=1e-13)


def test_ridge_matches_numpy_reference(problem):
    params, xs, ys = problem
    lam = 0.3
    key = jax.random.key(10)
    Y = np.asarray(projected_dual_matrix(key, MODEL, params, xs, ys, dim=16))
    ref = np.einsum("ij,ji->i", Y, np.linalg.solve(Y.T @ Y + lam * np.eye(16), Y.T))
    info = projected_leverage_scores(key, MODEL, params, xs, ys, dim=16, ridge=lam, return_info=True)
    np.testing.assert_allclose(info.leverage, ref, rtol=1e-10)
    np.testing.assert_allclose(info.rank, ref.sum(), rtol=1e-10)  # the effective dimension
    np.testing.assert_allclose(info.probs, ref / ref.sum(), rtol=1e-10)
    assert nj.routes.ROUTES[int(info.route)] == "gram"  # as nj.leverage_scores with ridge > 0
    assert float(info.rank) < 16  # ridge shrinks every direction


def test_ridge_is_meaningful_when_p_exceeds_n():
    # p + 1 = 61 > n = 20: plain leverage is 1 for every row (rank n); ridge leverage is not.
    rng = np.random.default_rng(11)
    xs = jnp.asarray(rng.standard_normal((20, 4)))
    params = mlp_init(jax.random.key(12), (4, 10, 1), dtype=jnp.float64)
    plain = projected_leverage_scores(jax.random.key(13), MODEL, params, xs, dim=64, return_info=True)
    np.testing.assert_allclose(plain.leverage, np.ones(20), rtol=1e-8)
    ridge = projected_leverage_scores(jax.random.key(13), MODEL, params, xs, dim=64, ridge=1.0)
    assert float(jnp.max(ridge) / jnp.min(ridge)) > 1.5


def test_float32_follows_input_dtype(problem):
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), problem[0])
    xs = problem[1].astype(jnp.float32)
    probs = projected_leverage_scores(jax.random.key(14), MODEL, params32, xs, dim=32)
    F = nj.dual_matrix(MODEL, problem[0], problem[1])
    ref = nj.leverage_scores(F)
    assert probs.dtype == jnp.float32
    # dim ≥ p + 1: exact up to float32 rounding of a κ ~ 1e2 matrix.
    np.testing.assert_allclose(probs, ref, rtol=2e-3)


@pytest.mark.parametrize("half", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("embedding", ["auto", "gaussian", "khatri_rao", "sparse"])
def test_half_precision_models_are_projected_in_float32(half, embedding):
    """A float16/bfloat16 model: Y was formed and rounded in half precision, and the float32 rank
    tolerance of the score routes counted that rounding as rank (88 for 22; probabilities 30–190% off,
    the default embedding included). Now Y is formed in float32 from the exactly widened params and
    inputs: rank 22, and the probabilities are those of the same call on the widened float32 values,
    rounded once to half precision (bit for bit). Those float32 probabilities are the leverage of the
    float32 dual matrix to the projected route's float32 error: up to 2.5e-3 relative, measured on an
    Intel Xeon (2026-12-04) at dim = 22 = p + 1, where the square Gaussian embedding multiplies the
    condition number (κ(F) = 6e2 for the float16 values, 6e3 for bfloat16); 8e-6–6e-5 at dim = 88. (Until
    then the test compared the half-precision result with the dense float32 leverage to one half ulp plus
    1e-5, which held on the AMD machines of earlier sessions and not on that one: 3.5e-4 at dim 22.)"""
    f = mlp(jnp.tanh)
    params = [dict(layer, b=layer["b"] + 0.1) for layer in mlp_init(jax.random.key(0), (3, 4, 1), dtype=half)]
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((200, 3)), half)
    ys = jnp.asarray(rng.standard_normal(200), half)
    wide = jax.tree.map(lambda a: a.astype(jnp.float32), (params, xs, ys))
    ref = nj.leverage_scores(nj.dual_matrix(f, *wide, num_nodes=16), return_info=True)
    assert int(ref.rank) == 22
    for dim in (22, 88):
        info = projected_leverage_scores(
            jax.random.key(3), f, params, xs, ys, dim=dim, embedding=embedding, return_info=True
        )
        assert int(info.rank) == 22 and info.probs.dtype == half, (dim, int(info.rank))
        wide_probs = projected_leverage_scores(jax.random.key(3), f, *wide, dim=dim, embedding=embedding)
        np.testing.assert_array_equal(info.probs, wide_probs.astype(half))
        np.testing.assert_allclose(
            np.float64(wide_probs), np.float64(ref.probs), rtol=1e-2 if dim == 22 else 1e-3
        )
    Y = projected_dual_matrix(jax.random.key(3), f, params, xs, ys, dim=22, embedding=embedding)
    assert Y.dtype == half  # the documented dtype: that of params


def test_no_recompilation_and_inputs_untouched(problem):
    params, xs, ys = problem
    xs_np = np.array(xs)
    ys_np = np.array(ys)
    xs_copy, ys_copy = xs_np.copy(), ys_np.copy()
    kwargs = dict(dim=12, chunk_size=50)
    projected_leverage_scores(jax.random.key(15), MODEL, params, xs_np, ys_np, **kwargs)
    before = _projected_jit._cache_size()
    new_params = jax.tree.map(lambda a: a * 1.1, params)
    out = projected_leverage_scores(jax.random.key(16), MODEL, new_params, xs_np + 1.0, ys_np * 2.0, **kwargs)
    assert _projected_jit._cache_size() == before
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(xs_np, xs_copy)
    np.testing.assert_array_equal(ys_np, ys_copy)


def test_different_keys_give_different_projections_below_rank(problem):
    params, xs, ys = problem
    a = projected_leverage_scores(jax.random.key(17), MODEL, params, xs, ys, dim=10)
    b = projected_leverage_scores(jax.random.key(18), MODEL, params, xs, ys, dim=10)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=-3), ValueError, "dim"),
        (dict(dim=2.5), TypeError, "dim"),
        (dict(dim=8, chunk_size=0), ValueError, "chunk_size"),
        (dict(dim=8, ridge=float("nan")), ValueError, "ridge"),
        (dict(dim=8, ridge=-1.0), ValueError, "ridge"),
        (dict(dim=8, embedding="srht"), ValueError, "embedding"),
        (dict(dim=9, sparsity=2), ValueError, "multiple of sparsity"),
        (dict(dim=8, sparsity=0), ValueError, "sparsity"),
        # accepted and ignored (and compiled anew for each value) before: no sparsity of those embeddings
        (dict(dim=9, sparsity=4, embedding="gaussian"), ValueError, "embedding='gaussian' has none"),
        (dict(dim=8, sparsity=2, embedding="khatri_rao"), ValueError, "embedding='khatri_rao' has none"),
        (dict(dim=8, num_nodes=0), ValueError, "num_nodes"),
        (dict(dim=8, mode="sideways"), ValueError, "mode"),
    ],
)
def test_bad_input_is_rejected(problem, kwargs, error, match):
    params, xs, ys = problem
    with pytest.raises(error, match=match):
        projected_leverage_scores(jax.random.key(0), MODEL, params, xs, ys, **kwargs)


def test_bad_data_is_rejected(problem):
    params, xs, ys = problem
    with pytest.raises(ValueError, match="ys has shape"):
        projected_leverage_scores(jax.random.key(0), MODEL, params, xs, ys[:-1], dim=4)
    with pytest.raises(ValueError, match="NaN"):
        projected_leverage_scores(jax.random.key(0), MODEL, params, xs.at[0, 0].set(jnp.nan), ys, dim=4)
    with pytest.raises(ValueError, match="NaN"):
        projected_leverage_scores(jax.random.key(0), MODEL, params, xs, ys.at[3].set(jnp.inf), dim=4)


def test_compiled_memory_stays_below_the_dual_matrix():
    # Memory O(chunk·p + n·dim): XLA's own buffer plan of the compiled projection holds far less than
    # the n × (p+1) dual matrix (n = 4000, p + 1 = 201, chunk = 100, dim = 8).
    n, d = 4000, 20
    params = mlp_init(jax.random.key(19), (d, 9, 1), dtype=jnp.float64)
    xs = jnp.asarray(np.random.default_rng(20).standard_normal((n, d)))
    compiled = _projected_jit.lower(
        jax.random.key(21), MODEL, params, xs, None,
        dim=8, chunk_size=100, num_nodes=4, mode="reverse", embedding="sparse", sparsity=1,
    ).compile()  # fmt: skip
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    dual_bytes = n * 201 * 8
    assert stats.temp_size_in_bytes < dual_bytes / 4
    assert stats.output_size_in_bytes == n * 8 * 8


def _small_conv(w, x):
    """``tanh(conv(x, K) · v)``: a 3×3 kernel ``K`` (9 params) on a 6×6 image, then 36 weights ``v``."""
    h = jax.lax.conv(x[None, None], w[:9].reshape(1, 1, 3, 3), (1, 1), "SAME")
    return jnp.tanh(jnp.dot(h.reshape(-1), w[9:]))


def test_convolutional_models_take_the_adjoints_own_chunk(monkeypatch):
    """On a CPU the sparse and Gaussian embeddings (one code path) formed a chunk's dual rows in ONE
    vmapped adjoint call even for convolutions, whose vmapped kernel gradients are grouped convolutions,
    slow in batches (a 16×16 two-convolution CNN, p = 9,505, 128 examples: 110 s against 0.89 s one at a
    time); now the adjoint's own chunk (``cache_chunk_size``: one example until 2026-12-04, since then the
    memory chunk, here the whole chunk: 70 rows in 3 strided chunks of 24, with the nodes in a scan around
    a vmapped per-example gradient: ``nodes_outside``). Same values: exact when ``dim`` covers the
    ``p + 1 = 46`` columns."""
    import nlis_jax._projected as projected

    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.standard_normal((70, 6, 6)))
    ys = jnp.asarray(rng.standard_normal(70))
    w = jnp.asarray(rng.standard_normal(45) / 4)
    seen = []
    block = projected.dual_block
    monkeypatch.setattr(
        projected, "dual_block", lambda *a, **kw: seen.append(kw["chunk_size"]) or block(*a, **kw)
    )
    _projected_jit.clear_cache()  # traced afresh, so the spy sees the call
    got = projected_leverage_scores(
        jax.random.key(6), _small_conv, w, xs, ys, dim=50, chunk_size=32, embedding="sparse"
    )
    assert seen == [24]
    ref = nj.leverage_scores(nj.dual_matrix(_small_conv, w, xs, ys, num_nodes=16))
    np.testing.assert_allclose(got, ref, rtol=1e-8)
