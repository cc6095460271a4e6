"""Bad input to ``sample``, ``sample_size`` and ``distortion`` gets a clear error; the valid neighbouring
input keeps its answer (checked against independent numpy references). Includes the distortion of a block
dual matrix ``(n, k, m)``, whose indices are example indices owning ``k`` rows each."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import nlis_jax as nj

N, K, M = 10, 3, 5


@functools.cache
def _block():
    """A block dual matrix ``(N, K, M)`` of full column rank, with some heavy examples."""
    F = np.random.default_rng(0).standard_normal((N, K, M))
    F[2] *= 8.0
    return F


@functools.cache
def _flat():
    return np.random.default_rng(1).standard_normal((20, 4))


def _numpy_block_distortion(F, idx, w):
    """``‖U_Sᵀ W U_S − I‖₂`` from an SVD of the ``(n·k, m)`` rows, each example's rows with its weight."""
    n, k, m = F.shape
    U, sv, _ = np.linalg.svd(F.reshape(n * k, m), full_matrices=False)
    r = int(np.sum(sv > sv[0] * 1e-12))
    Us = U[:, :r].reshape(n, k, r)[idx].reshape(-1, r)
    ws = np.repeat(w, k)
    return np.linalg.norm(Us.T @ (ws[:, None] * Us) - np.eye(r), 2)


def _sample_block():
    F = _block()
    idx, w = nj.sample(jax.random.key(3), nj.leverage_scores(F), 6)
    return F, np.asarray(idx), np.asarray(w)


# ------------------------------------------------------------------------------------------------
# distortion of a block dual matrix


def test_block_distortion_of_the_full_sample_is_zero():
    F = _block()
    rows = F.reshape(N * K, M)
    Q, _ = np.linalg.qr(rows)  # independent basis: the full unweighted sample reproduces Qᵀ Q = I
    assert np.linalg.norm(Q.T @ Q - np.eye(M), 2) < 1e-12
    full = nj.distortion(F, np.arange(N), np.ones(N))
    assert float(full) < 1e-12
    # the flattened rows, one index per row, agree
    assert float(nj.distortion(rows, np.arange(N * K), np.ones(N * K))) < 1e-12


def test_block_distortion_matches_numpy():
    F, idx, w = _sample_block()
    expected = _numpy_block_distortion(F, idx, w)
    assert expected > 0.05  # a real measurement
    np.testing.assert_allclose(nj.distortion(F, idx, w), expected, rtol=1e-10)
    U, _, _ = nj.orthonormal_basis(F)
    assert U.shape == (N * K, M)
    # a precomputed basis: laid out by F's shape, or reshaped to (n, k, m) by the user
    np.testing.assert_allclose(nj.distortion(F, idx, w, basis=U), expected, rtol=1e-10)
    np.testing.assert_allclose(
        nj.distortion(None, idx, w, basis=jnp.reshape(U, (N, K, M))), expected, rtol=1e-10
    )


@pytest.mark.parametrize("bad", [N, -1])
def test_block_distortion_refuses_row_indices(bad):
    F = _block()
    with pytest.raises(ValueError, match=rf"indices out of range \[0, {N}\).*example indices.*n = {N}"):
        nj.distortion(F, np.array([0, bad]), np.ones(2))
    # the last example is in range
    assert 0 <= float(nj.distortion(F, np.array([0, N - 1]), np.ones(2)))


def test_distortion_refuses_rtol_with_a_basis():
    """``rtol`` beside ``basis`` was silently ignored (the basis fixes the rank): ε̂ of the full-rank
    basis came back where the user's tolerance would have dropped a direction."""
    F, idx, w = _sample_block()
    U, _, _ = nj.orthonormal_basis(F)
    with pytest.raises(ValueError, match="rtol is not used with basis"):
        nj.distortion(F, idx, w, rtol=1e-2, basis=U)
    with_rtol = nj.orthonormal_basis(F, rtol=1e-2)[0]  # the advice of the message works
    assert np.isfinite(float(nj.distortion(F, idx, w, basis=with_rtol)))


def test_distortion_names_the_basis_tuple():
    """orthonormal_basis's whole (U, rank, route) passed as basis failed inside numpy ("inhomogeneous
    shape")."""
    F, idx, w = _sample_block()
    with pytest.raises(TypeError, match=r"not a tuple of 3: pass nj.orthonormal_basis\(F\)\[0\]"):
        nj.distortion(F, idx, w, basis=nj.orthonormal_basis(F))


def test_block_basis_must_match_block_f():
    F, idx, w = _sample_block()
    U, _, _ = nj.orthonormal_basis(F)
    with pytest.raises(
        ValueError, match=r"basis of shape \(29, 5\) does not belong to F of shape \(10, 3, 5\)"
    ):
        nj.distortion(F, idx, w, basis=U[:-1])


def test_basis_must_match_f():
    """A basis of another matrix (5 rows for F's 6) was accepted: 0.977, and index 5 of F was refused as
    "out of range (n = 5)"."""
    rng = np.random.default_rng(0)
    F = rng.standard_normal((6, 2))
    B = np.linalg.qr(rng.standard_normal((5, 2)))[0]
    with pytest.raises(ValueError, match=r"basis of shape \(5, 2\) does not belong to F of shape \(6, 2\)"):
        nj.distortion(F, np.array([0, 4]), np.ones(2), basis=B)
    U, _, _ = nj.orthonormal_basis(F)  # F's own basis: accepted
    assert np.isfinite(float(nj.distortion(F, np.array([0, 5]), np.ones(2), basis=U)))


def test_index_range_is_checked_under_checkify():
    F, idx, w = _sample_block()

    def measure(i, w):
        with nj.traced_checks():
            return nj.distortion(F, i, w)

    checked = jax.jit(checkify.checkify(measure, errors=checkify.user_checks))
    err, value = checked(jnp.asarray(idx), jnp.asarray(w))
    assert err.get() is None
    np.testing.assert_allclose(value, _numpy_block_distortion(F, idx, w), rtol=1e-10)
    assert "indices out of range [0, 10)" in checked(jnp.asarray(idx) + N, jnp.asarray(w))[0].get()
    assert "weights contains NaN or Inf" in checked(jnp.asarray(idx), jnp.full(w.shape, jnp.nan))[0].get()


# ------------------------------------------------------------------------------------------------
# distortion: weights, indices, basis


@pytest.mark.parametrize(
    ("value", "match"),
    [(np.nan, r"weights contains 1 NaN or Inf"), (np.inf, r"weights contains 1 NaN or Inf")],
)
def test_non_finite_weights(value, match):
    F, idx, w = _sample_block()
    bad = w.copy()
    bad[1] = value
    with pytest.raises(ValueError, match=match):
        nj.distortion(F, idx, bad)


def test_negative_weights():
    F, idx, w = _sample_block()
    with pytest.raises(ValueError, match=r"weights must be non-negative; 1 are negative"):
        nj.distortion(F, idx, np.where(np.arange(w.size) == 0, -w, w))


def test_weights_shape_and_dtype():
    F, idx, w = _sample_block()
    with pytest.raises(ValueError, match=r"indices and weights must be matching vectors.*\(6,\) and \(5,\)"):
        nj.distortion(F, idx, w[:-1])
    with pytest.raises(ValueError, match=r"indices and weights must be matching vectors.*\(1, 6\)"):
        nj.distortion(F, idx[None], w[None])
    with pytest.raises(TypeError, match=r"weights must be real numbers, got dtype bool"):
        nj.distortion(F, idx, np.ones(idx.shape, bool))
    with pytest.raises(TypeError, match=r"weights must be real numbers, got dtype complex"):
        nj.distortion(F, idx, w.astype(complex))
    # integer weights are real: the same as their float values
    ints = np.array([1, 2, 0, 3, 1, 1])
    np.testing.assert_allclose(
        nj.distortion(F, idx, ints), _numpy_block_distortion(F, idx, ints.astype(float)), rtol=1e-10
    )


@pytest.mark.parametrize("dtype", [np.float64, bool])
def test_indices_must_be_integers(dtype):
    F = _flat()
    with pytest.raises(TypeError, match=r"indices must be integer example indices.*got dtype"):
        nj.distortion(F, np.ones(20, dtype), np.ones(20))


def test_basis_checks():
    F = _flat()
    U, r, _ = nj.orthonormal_basis(F)
    U = np.asarray(U)
    idx, w = np.arange(20), np.ones(20)
    with pytest.raises(ValueError, match=r"basis must be a non-empty \(n, m\) matrix.*shape \(20,\)"):
        nj.distortion(None, idx, w, basis=U[:, 0])
    bad = U.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"basis contains 1 NaN or Inf"):
        nj.distortion(None, idx, w, basis=bad)
    with pytest.raises(TypeError, match=r"basis must hold floating-point arrays, got dtype int"):
        nj.distortion(None, idx, w, basis=np.eye(20, dtype=int))
    with pytest.raises(ValueError, match=r"distortion needs F or a precomputed basis"):
        nj.distortion(None, idx, w)
    # the valid basis: the full sample is exact, a sub-sample matches numpy
    assert float(nj.distortion(None, idx, w, basis=U)) < 1e-12
    sub, sw = np.array([0, 5, 5, 19]), np.array([2.0, 1.5, 1.5, 4.0])
    Us = U[sub][:, : int(r)]
    expected = np.linalg.norm(Us.T @ (sw[:, None] * Us) - np.eye(int(r)), 2)
    np.testing.assert_allclose(nj.distortion(None, sub, sw, basis=U), expected, rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, jnp.bfloat16])
def test_basis_that_is_not_orthonormal_is_named(dtype):
    """F itself, or a matrix of ones, passed as the basis gave a number (3.9e7 against 0.55) and no
    error. Its squared column norms (taken in the same pass as before) must lie within 0.1 of 1, or of 0
    beyond the rank; the library's own bases, half precision included, pass, eagerly and under checkify."""
    F = _flat()
    idx, w = np.array([0, 5, 5, 19]), np.array([2.0, 1.5, 1.5, 4.0])
    U = jnp.asarray(nj.orthonormal_basis(jnp.asarray(F, dtype))[0])
    assert np.isfinite(float(nj.distortion(None, idx, w, basis=U)))
    for bad in (F, np.ones_like(F), 1.5 * np.asarray(U, np.float32)):
        with pytest.raises(
            ValueError, match=r"basis is not orthonormal: a column's squared norm is [0-9.e+]+ away"
        ):
            nj.distortion(None, idx, w, basis=bad)

    def measure(basis):
        with nj.traced_checks():
            return nj.distortion(None, idx, w, basis=basis)

    checked = jax.jit(checkify.checkify(measure, errors=checkify.user_checks))
    assert checked(U)[0].get() is None
    assert "basis is not orthonormal" in checked(jnp.asarray(F))[0].get()


def test_inputs_are_not_modified():
    F, idx, w = _sample_block()
    idx.flags.writeable = False
    w.flags.writeable = False
    copies = F.copy(), idx.copy(), w.copy()
    nj.distortion(F, idx, w)
    for a, b in zip((F, idx, w), copies, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# sample: replace, keys, lists, half precision


@pytest.mark.parametrize("replace", ["no", None, 0])
def test_replace_must_be_bool(replace):
    p = nj.uniform_scores(4)
    with pytest.raises(TypeError, match=r"replace must be True or False"):
        nj.sample(jax.random.key(0), p, 2, replace=replace)


def test_numpy_bool_replace_is_accepted():
    p = nj.uniform_scores(4)
    a = nj.sample(jax.random.key(0), p, 2, replace=np.bool_(False))
    b = nj.sample(jax.random.key(0), p, 2, replace=False)
    np.testing.assert_array_equal(a[0], b[0])
    assert len(set(np.asarray(a[0]).tolist())) == 2  # without replacement


@pytest.mark.parametrize("key", [0, None, np.array([0.0, 1.0])])
def test_key_must_be_a_prng_key(key):
    with pytest.raises(TypeError, match=r"key must be a PRNG key, e.g. jax.random.key\(0\)"):
        nj.sample(key, nj.uniform_scores(4), 2)


def test_raw_prng_key_is_accepted():
    idx, w = nj.sample(jax.random.PRNGKey(0), nj.uniform_scores(4), 3)
    assert idx.shape == (3,)
    np.testing.assert_allclose(w, 1.0 / (3 * 0.25))


def test_probs_as_a_list():
    key = jax.random.key(5)
    for probs in ([0.25, 0.75], (0.25, 0.75)):
        idx, w = nj.sample(key, probs, 4)
        ref_idx, ref_w = nj.sample(key, np.array([0.25, 0.75]), 4)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(w, ref_w)
        np.testing.assert_allclose(w, 1.0 / (4 * np.array([0.25, 0.75])[np.asarray(idx)]))
    with pytest.raises(TypeError, match=r"probs must hold floating-point arrays"):
        nj.sample(key, [0, 1], 2)
    with pytest.raises(ValueError, match=r"probs must sum to 1"):
        nj.sample(key, [0.5, 0.6], 2)


def test_half_precision_probs_from_the_library():
    F = _flat()
    probs = nj.leverage_scores(F.astype(np.float16))
    assert probs.dtype == np.float16
    idx, w = nj.sample(jax.random.key(0), probs, 5)
    assert idx.shape == (5,) and bool(jnp.all(jnp.isfinite(w))) and bool(jnp.all(w > 0))
    bad = np.full(10, 0.11, np.float16)  # sums to 1.1
    with pytest.raises(ValueError, match=r"probs must sum to 1, got sum 1.09"):
        nj.sample(jax.random.key(0), bad, 5)


# ------------------------------------------------------------------------------------------------
# sample_size: numbers and ranks


def _reference_size(eps, delta, d, beta=1.0):
    m = max(d / beta - 1.0, 1.0)
    return math.ceil((2 / eps**2 + 2 / (3 * eps)) * m * math.log(2 * d / delta))


@pytest.mark.parametrize("name", ["epsilon", "delta", "beta"])
@pytest.mark.parametrize("value", ["0.5", np.array([0.5, 0.6]), None, True])
def test_sample_size_real_arguments(name, value):
    kwargs = {"epsilon": 0.5, "delta": 0.1, "beta": 1.0, name: value}
    with pytest.raises(TypeError, match=rf"{name} must be a real number"):
        nj.sample_size(kwargs["epsilon"], kwargs["delta"], 5, beta=kwargs["beta"])


def test_sample_size_accepts_scalar_arrays():
    expected = _reference_size(0.5, 0.1, 5, 0.5)
    assert nj.sample_size(np.float64(0.5), jnp.asarray(0.1), 5, beta=np.array(0.5)) == expected
    assert nj.sample_size(0.5, 0.1, 5, beta=0.5) == expected


def test_sample_size_rank_from_leverage_info():
    info = nj.leverage_scores(_flat(), return_info=True)
    assert info.rank.dtype == jnp.int32 and info.rank.shape == ()
    expected = _reference_size(0.5, 0.1, 4)
    assert nj.sample_size(0.5, 0.1, info.rank) == expected
    assert nj.sample_size(0.5, 0.1, np.array(4)) == expected
    assert nj.sample_size(0.5, 0.1, np.int32(4)) == expected


@pytest.mark.parametrize(
    "rank", [2.5, 4.0, True, np.bool_(True), np.array(2.5), jnp.asarray(4.0), np.array([4])]
)
def test_sample_size_rank_must_be_an_integer(rank):
    with pytest.raises(TypeError, match=r"rank must be a Python int"):
        nj.sample_size(0.5, 0.1, rank)


def test_sample_size_rank_zero_array():
    with pytest.raises(ValueError, match=r"rank must be a positive integer, got 0"):
        nj.sample_size(0.5, 0.1, jnp.asarray(0, jnp.int32))


def test_traced_alpha_and_all_zero_norms_are_checked_under_checkify():
    """A traced ``alpha`` outside [0, 1] gave negative probabilities (alpha = 3: -0.65) and a traced
    all-zero F gave NaN norm scores, with no error even inside ``traced_checks``; both are checks now."""

    def mix(p, alpha):
        with nj.traced_checks():
            return nj.mix_with_uniform(p, alpha)

    def norms(F):
        with nj.traced_checks():
            return nj.norm_scores(F)

    p = jnp.asarray([0.7, 0.1, 0.1, 0.1])
    mixed = jax.jit(checkify.checkify(mix, errors=checkify.user_checks))
    err, value = mixed(p, 0.5)
    assert err.get() is None
    np.testing.assert_allclose(value, 0.5 * np.asarray(p) + 0.125, rtol=1e-15)
    for alpha in (3.0, -0.5):
        assert "alpha must lie in [0, 1]" in mixed(p, alpha)[0].get()
    scored = jax.jit(checkify.checkify(norms, errors=checkify.user_checks))
    err, value = scored(jnp.eye(3))
    assert err.get() is None
    np.testing.assert_allclose(value, np.full(3, 1 / 3), rtol=1e-15)
    assert "F is all zeros" in scored(jnp.zeros((5, 3)))[0].get()


@pytest.mark.parametrize("route", [None, "gram", "gram2", "stable"])
def test_basis_puts_its_orthonormal_columns_first(route):
    """An all-zero input column left its zero basis column in place on the Gram routes, so the first
    ``rank`` columns missed a direction of range(F) (relative residual 0.48 instead of ~1e-16)."""
    X = np.random.default_rng(15).standard_normal((50, 4))
    F = np.c_[np.zeros(50), X[:, :2], np.zeros(50), X[:, 2:]]
    U, rank, _ = nj.orthonormal_basis(F, route=route)
    U = np.asarray(U)
    assert int(rank) == 4
    np.testing.assert_allclose(np.linalg.norm(U, axis=0), [1, 1, 1, 1, 0, 0], atol=1e-12)
    first = U[:, :4]
    np.testing.assert_allclose(first.T @ first, np.eye(4), atol=1e-12)
    assert np.linalg.norm(X - first @ (first.T @ X)) < 1e-12 * np.linalg.norm(X)


def test_float64_host_input_beyond_float32_is_named_without_x64():
    """Without jax_enable_x64 a finite 1e100 column became Inf in the cast, reported as "F contains
    NaN or Inf" (norm scores) or "FᵀF overflows float32" (leverage); the cast is named now."""
    F = np.random.default_rng(0).standard_normal((20, 3)) * np.array([1e100, 1, 1])
    with jax.enable_x64(False):
        for fn in (nj.leverage_scores, nj.norm_scores):
            with pytest.raises(ValueError, match="F holds 20 finite value.s. beyond float32's range .*cast"):
                fn(F)


def test_float64_host_input_below_float32_is_named_without_x64():
    """Without x64 a float64 column of 1e-60 became zeros in the cast: rank 4 of 5, leverage 2.6x off."""
    B = np.random.default_rng(0).standard_normal((200, 5))
    B[:, 2] *= 1e-60
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="F holds 200 non-zero value.*become 0 once cast to float32"):
            nj.leverage_scores(B)


@pytest.mark.parametrize("as_list", [False, True])
def test_distortion_index_range_is_checked_before_the_int32_cast(as_list):
    """Without x64, jnp.asarray narrowed int64 indices to int32 before the range check: 2**32 + 5 read
    as row 5 and distortion returned the value of another sample (a list raised jax's OverflowError)."""
    F = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    far = np.array([0, 2**32 + 5, 7], np.int64)
    weights = np.full(3, 5.0, np.float32)
    with jax.enable_x64(False):
        near = float(nj.distortion(F, np.array([0, 5, 7]), weights))
        assert np.isfinite(near)
        with pytest.raises(ValueError, match=r"out of range \[0, 20\): got values from 0 to 4294967301"):
            nj.distortion(F, far.tolist() if as_list else far, weights)


def test_float64_weights_and_probs_beyond_float32_are_named_without_x64():
    """Without x64 a finite float64 1e39 became Inf in the cast and was reported as "NaN or Inf"
    (numpy's overflow warning first, an error under this suite's filters); the cast is named now, and a
    real NaN keeps its message."""
    F = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    beyond = "holds 1 finite value.s. beyond float32's range that become Inf once cast to float32"
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="weights " + beyond):
            nj.distortion(F, np.array([0, 1]), np.array([1.0, 1e39]))
        for call in (
            lambda p: nj.sample(jax.random.key(0), p, 2),
            lambda p: nj.mix_with_uniform(p, 0.5),
        ):
            with pytest.raises(ValueError, match="probs " + beyond):
                call(np.array([1.0, 1e39]))
            with pytest.raises(ValueError, match="probs contains NaN or Inf"):
                call(np.array([0.5, np.nan]))


def test_traced_sample_without_replacement_checks_the_positive_rows():
    """Eagerly, s above the number of rows with positive probability is refused (replace=False); under
    jit with traced_checks() and checkify it passed unchecked (indices of zero-probability rows at weight
    0). Now the same check as a checkify check."""
    probs = jnp.array([0.5, 0.25, 0.25, 0.0, 0.0])

    def draw(p, s):
        with nj.traced_checks():
            return nj.sample(jax.random.key(0), p, s, replace=False)

    for s, fails in ((3, False), (4, True)):
        err, _ = jax.jit(checkify.checkify(draw, errors=checkify.user_checks), static_argnums=1)(probs, s)
        message = err.get()
        assert (message is not None) == fails
        if fails:
            assert f"num_samples={s} exceeds the number of rows with positive probability" in message


def test_sample_size_names_a_traced_rank():
    """A Leverage.rank computed under jit was refused as "must be a Python int or a 0-d integer array (such
    as Leverage.rank), got JitTracer(int32[])", though it was one."""
    F = np.random.default_rng(0).normal(size=(20, 3))
    assert nj.sample_size(0.5, 0.1, nj.leverage_scores(F, return_info=True).rank) > 0
    with pytest.raises(TypeError, match="rank must be a concrete integer, not a traced value"):
        jax.jit(lambda F: nj.sample_size(0.5, 0.1, nj.leverage_scores(F, return_info=True).rank))(F)


def test_float32_probs_cast_to_float64_are_told_to_renormalise():
    """float32 scores (sum 1 to float32's rounding) cast to float64 miss float64's tolerance: the error
    says why and what to do."""
    p32 = np.random.default_rng(0).random(100_000).astype(np.float32)
    p32 /= p32.sum(dtype=np.float32)
    probs = p32.astype(np.float64)
    assert 1e-8 < abs(probs.sum() - 1) < 1e-3  # the situation itself
    with pytest.raises(ValueError, match=r"cast to float64 keeps float32's rounding: renormalise"):
        nj.sample(jax.random.key(0), probs, 5)
    nj.sample(jax.random.key(0), probs / probs.sum(), 5)  # as advised
