r"""Route ``"gram"`` from a float64 Gram matrix taken on the host (``nlis_jax._host_gram``).

Concrete float32 input on a CPU that the column test finds ill-conditioned tries it before the sketched
shifted route. The sketch threshold is lowered so that small matrices take that path (it is read when the
programs are traced: caches cleared around the module). References: float64 leverage of the
float32-rounded data (numpy Householder QR), held to the benchmark's targets (total variation ≤ 1e-4,
smallest ratio ≥ 0.999), and the sketched route on the same input.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BETA_TARGET,
    TV_TARGET,
    assert_rank_deficient_falls_back_to_stable,
    conditioned_float32,
    float32_leverage,
    float32_leverage_ref,
    small_matrices_take_the_sketch_stage,
    tv_beta,
)

import nlis_jax as nj
from nlis_jax import _host_gram, routes

N, M = 800, 40


@pytest.fixture(autouse=True, scope="module")
def small_sketch_threshold():
    with small_matrices_take_the_sketch_stage(host_float64_gram=True):
        yield


def _matrix(seed, kappa):
    return conditioned_float32(seed, kappa, N, M)


def test_host_gram_is_the_float64_gram_matrix(monkeypatch):
    """Chunk by chunk (several chunks and a remainder) its upper triangle equals that of numpy's float64
    ``AᵀA`` of the float32 data to rounding, its lower one is zero, and the input is left as it was."""
    monkeypatch.setattr(_host_gram, "HOST_CHUNK_BYTES", 8 * M * 300)  # 300 rows a chunk: 2 + a remainder
    A = _matrix(0, 1e3)
    before = A.copy()
    G = _host_gram.host_float64_gram(jnp.asarray(A))
    A64 = A.astype(np.float64)
    ref = A64.T @ A64
    assert G.dtype == np.float64 and not np.any(np.tril(G, -1))
    np.testing.assert_allclose(G, np.triu(ref), rtol=0, atol=1e-13 * np.abs(ref).max())
    np.testing.assert_array_equal(A, before)


def test_host_row_norms_match_the_product(monkeypatch):
    """``‖(A T)_i‖²`` for an upper-triangular ``T``, by chunks (several and a remainder), against the
    float64 product of the same float32 values to float32 rounding; the input is left as it was."""
    monkeypatch.setattr(_host_gram, "HOST_CHUNK_BYTES", 4 * M * 300)  # 300 float32 rows a chunk
    rng = np.random.default_rng(9)
    A = _matrix(9, 1e2)
    T = np.triu(rng.standard_normal((M, M))).astype(np.float32)
    before = A.copy()
    h = _host_gram.host_row_norms(jnp.asarray(A), T)
    ref = np.sum(np.square(A.astype(np.float64) @ T.astype(np.float64)), axis=1)
    assert h.dtype == np.float32 and h.shape == (N,)
    np.testing.assert_allclose(h, ref, rtol=1e-4)
    np.testing.assert_array_equal(A, before)


@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e5])
def test_ill_conditioned_float32_takes_gram_with_the_targets(kappa):
    """Past route "gram" in float32 (κ(G_eq) > eps^{-1/4}) up to κ = 1e5: route "gram", full rank, the
    benchmark's targets against float64, and the sketched route's scores to the same targets."""
    A = _matrix(1, kappa)
    info, route = float32_leverage(A)
    assert route == "gram" and int(info.rank) == M and info.leverage.dtype == jnp.float32
    tv, beta = tv_beta(info.leverage, float32_leverage_ref(A))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (kappa, tv, beta)
    sketched, sketched_route = float32_leverage(A, route="shifted")
    assert sketched_route == "shifted"
    tv, beta = tv_beta(info.leverage, np.asarray(sketched.leverage, np.float64))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (kappa, tv, beta)


def test_zero_column_is_set_aside_and_columns_scale_out():
    """A dead unit does not count in the rank; scaling columns by non-powers of two leaves the scores."""
    rng = np.random.default_rng(2)
    A = _matrix(2, 1e4)
    scaled = A * np.exp(rng.uniform(-6, 6, M)).astype(np.float32)
    scaled[:, 9] = 0.0
    info, route = float32_leverage(scaled)
    assert route == "gram" and int(info.rank) == M - 1
    tv, beta = tv_beta(info.leverage, float32_leverage_ref(np.delete(A, 9, axis=1)))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (tv, beta)


@pytest.mark.parametrize("case", ["rank5_product", "kappa_1e8"])
def test_rank_deficient_input_still_falls_back_to_stable(case):
    assert_rank_deficient_falls_back_to_stable(case, 3, N, M)


def test_conditioning_past_the_bound_is_refused():
    """``eps₆₄·κ(G_eq) > eps₃₂^{3/4}`` (κ(A) = 1e6, with a rank tolerance that keeps every column): no
    host transform; well inside the bound, one whose ``A·T`` is orthonormal to float32 rounding."""
    A = jnp.asarray(_matrix(4, 1e6))
    assert _host_gram.float64_gram_transform(A, 1e-12) is None
    B = _matrix(4, 1e3)
    host = _host_gram.float64_gram_transform(jnp.asarray(B), float(routes.default_rtol(jnp.float32)))
    assert host is not None and host.rank == M and host.transform.dtype == np.float32
    assert np.allclose(host.transform, np.triu(host.transform))
    U = B.astype(np.float64) @ host.transform.astype(np.float64)
    np.testing.assert_allclose(U.T @ U, np.eye(M), atol=1e-4)
    assert 1e-4 < host.ratio < 1e-2  # σ_min/σ_max of the equilibrated matrix


@pytest.mark.parametrize("exponent", [-60, 60])
def test_columns_whose_squares_leave_float32_range_are_refused(exponent):
    """A column scaled by ``2^±60`` (its squared norm outside ``[n·tiny/eps, max·eps]`` of float32, where
    ``R⁻¹`` could over- or underflow in float32): no host transform; the other routes answer, to the
    targets against the float64 leverage of the unscaled matrix (leverage ignores column scales)."""
    A = _matrix(10, 1e3)
    scaled = A.copy()
    scaled[:, 3] *= np.float32(2.0**exponent)
    assert _host_gram.float64_gram_transform(jnp.asarray(scaled), 1e-6) is None
    info, route = float32_leverage(scaled)
    assert route != "gram" and int(info.rank) == M
    tv, beta = tv_beta(info.leverage, float32_leverage_ref(A))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (route, tv, beta)


def test_non_finite_input_is_refused_and_reported():
    A = _matrix(5, 1e4)
    A[3, 4] = np.nan
    assert _host_gram.float64_gram_transform(jnp.asarray(A), 1e-6) is None
    with pytest.raises(ValueError, match="NaN"):
        nj.leverage_scores(A)


def test_only_float32_values_held_on_this_cpu_qualify():
    A = _matrix(6, 1e4)
    assert _host_gram.on_host_cpu(jnp.asarray(A))
    assert not _host_gram.on_host_cpu(A)  # numpy: converted by the public call first
    assert not _host_gram.on_host_cpu(jnp.asarray(A, jnp.bfloat16))
    assert not _host_gram.on_host_cpu(jnp.asarray(A, jnp.float64))  # the tests run with x64 on


def test_switching_the_host_path_off_gives_the_sketched_route(monkeypatch):
    A = _matrix(7, 1e4)
    monkeypatch.setattr(routes, "HOST_FLOAT64_GRAM", False)
    _, route = float32_leverage(A)
    assert route == "shifted"
