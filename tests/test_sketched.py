r"""Route ``"shifted"`` preconditioned from a CountSketch (``nlis_jax.routes.sketched_basis``).

Below float64 with at least ``routes.SKETCH_MIN`` columns the shifted Cholesky factor comes from the Gram
matrix of a sparse sketch ``S F`` instead of ``FᵀF``. The threshold is lowered here so that small
matrices (fast tests) take that path; it is read when ``basis`` is traced, so the caches are cleared
around this module (and around the tests that replace the fallback). The host float64 Gram matrix that
concrete CPU input tries first is switched off here (it has its own tests, ``test_host_gram.py``).
Every test uses one shape, so the programs compile once. References: float64 leverage of the float32
data (numpy Householder QR), held to the benchmark's targets (total variation ≤ 1e-4, smallest ratio
≥ 0.999).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BETA_TARGET,
    COMPILE_EVENT,
    TV_TARGET,
    assert_rank_deficient_falls_back_to_stable,
    conditioned_float32,
    count_events,
    float32_leverage,
    float32_leverage_ref,
    matrix_with_condition,
    small_matrices_take_the_sketch_stage,
    tv_beta,
)

import nlis_jax as nj
from nlis_jax import routes

N, M = 800, 40


@pytest.fixture(autouse=True, scope="module")
def small_sketch_threshold():
    # the sketched route itself: concrete CPU input would try the host float64 Gram matrix first
    # (route "gram", tests/test_host_gram.py)
    with small_matrices_take_the_sketch_stage(host_float64_gram=False):
        yield


def _matrix(seed, kappa):
    return conditioned_float32(seed, kappa, N, M)


def test_sketched_path_answers_without_the_gram_matrix(monkeypatch):
    """With the fallback (``gram_basis``) replaced by NaN, a finite result came from the sketched path:
    κ = 1e2 (past route "gram") and 1e5 (past "gram2" in float32) meet the targets; float64 is never
    sketched."""

    def nan_basis(A, rtol, route, row_norms):
        shape = A.shape[:1] if row_norms else A.shape
        return jnp.full(shape, jnp.nan, A.dtype), jnp.int32(-1), jnp.int32(-1)

    monkeypatch.setattr(routes, "gram_basis", nan_basis)
    jax.clear_caches()
    try:
        for kappa in (1e2, 1e5):
            A = _matrix(1, kappa)
            h, rank, route = routes.basis(jnp.asarray(A), routes.default_rtol(jnp.float32), row_norms=True)
            assert routes.ROUTES[int(route)] == "shifted" and int(rank) == M and h.dtype == jnp.float32
            tv, beta = tv_beta(h, float32_leverage_ref(A))
            assert tv <= TV_TARGET and beta >= BETA_TARGET, (kappa, tv, beta)
        A64 = jnp.asarray(A, jnp.float64)
        h, _, route = routes.basis(A64, routes.default_rtol(A64.dtype), row_norms=True)
        assert np.all(np.isnan(np.asarray(h))) and int(route) == -1
    finally:
        jax.clear_caches()


def test_basis_is_orthonormal_and_columns_scale_out():
    """The basis (``row_norms=False``) is orthonormal; scaling columns (not by powers of two) changes
    neither the leverage nor the rank, and a zero column is set aside."""
    rng = np.random.default_rng(2)
    A = _matrix(2, 1e4)
    U, rank, route = nj.orthonormal_basis(jnp.asarray(A))
    assert routes.ROUTES[int(route)] == "shifted" and int(rank) == M
    U = np.asarray(U, np.float64)
    np.testing.assert_allclose(U.T @ U, np.eye(M), atol=1e-4)
    scaled = A * np.exp(rng.uniform(-6, 6, M)).astype(np.float32)
    scaled[:, 9] = 0.0  # a dead unit
    info, route = float32_leverage(scaled)
    assert route == "shifted" and int(info.rank) == M - 1
    tv, beta = tv_beta(info.leverage, float32_leverage_ref(np.delete(A, 9, axis=1)))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (tv, beta)


def test_rows_repeating_with_the_sketch_period_are_still_answered():
    """Rows that repeat with period ``s`` (the sketch folds row ``i`` onto row ``i mod s``): ten tiled
    copies of one design (κ = 1e5) meet the targets, whichever route the checks let answer."""
    s = routes.SKETCH_ROWS * M
    base = np.asarray(matrix_with_condition(np.random.default_rng(8), s, M, 1e5)[0], np.float32)
    A = np.tile(base, (N // s, 1))
    info, route = float32_leverage(A)
    assert int(info.rank) == M, route
    tv, beta = tv_beta(info.leverage, float32_leverage_ref(A))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (route, tv, beta)


@pytest.mark.parametrize("case", ["rank5_product", "kappa_1e8"])
def test_rank_deficient_input_falls_back_to_stable(case):
    assert_rank_deficient_falls_back_to_stable(case, 3, N, M)


def test_well_conditioned_input_keeps_the_gram_route():
    """κ(G_s) ≤ eps^{-1/4} on the sketch: the Gram matrix decides (route "gram", one product fewer);
    forced, the sketched path gives the same scores."""
    A = np.random.default_rng(4).standard_normal((N, M))
    info, route = float32_leverage(A)
    assert route == "gram" and int(info.rank) == M
    forced, route_forced = float32_leverage(A, route="shifted")
    assert route_forced == "shifted"
    np.testing.assert_allclose(np.asarray(forced.leverage), np.asarray(info.leverage), rtol=1e-4)


def test_overflowing_column_and_nonfinite_input_go_to_the_gram_path():
    A = _matrix(5, 1e3)
    ref = nj.leverage_scores(A)
    big = A.copy()
    big[:, 2] *= 1e20  # Σ F_i2² overflows float32: the sketched path steps aside, the prescaled Gram decides
    np.testing.assert_allclose(nj.leverage_scores(big), ref, rtol=1e-3)
    bad = A.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"F contains 1 NaN or Inf"):
        nj.leverage_scores(bad)


def test_no_recompilation_for_new_values():
    A, B = _matrix(7, 1e4), _matrix(8, 1e5)
    nj.leverage_scores(A).block_until_ready()
    with count_events() as counts:
        nj.leverage_scores(B).block_until_ready()
    assert counts[COMPILE_EVENT] == 0


@pytest.mark.parametrize(
    ("kappa", "route", "expected"),
    [(1e4, None, "shifted"), (None, None, "gram"), (1e8, None, "stable"), (1e2, "shifted", "shifted")],
)
def test_staged_call_matches_the_one_program(kappa, route, expected):
    """A concrete call runs the sketched case in stages (``routes.staged_sketched_leverage``); under a
    user's ``jax.jit`` it is the one program of ``routes.basis``. Both take the same route and give the
    same scores (the same functions, compiled apart: identical here, the tolerance allows a few float32
    roundings) for input that takes the sketched route, that the test sends to the Gram route, that
    fails the sketched checks (numerically rank-deficient: route "stable"), and with the route forced."""
    rng = np.random.default_rng(9)
    A = rng.standard_normal((N, M)) if kappa is None else matrix_with_condition(rng, N, M, kappa)[0]
    A = jnp.asarray(A, jnp.float32)
    staged = nj.leverage_scores(A, route=route, return_info=True)
    traced = jax.jit(lambda F: nj.leverage_scores(F, route=route, return_info=True))(A)
    assert routes.ROUTES[int(staged.route)] == routes.ROUTES[int(traced.route)] == expected
    assert int(staged.rank) == int(traced.rank)
    np.testing.assert_allclose(np.asarray(staged.probs), np.asarray(traced.probs), rtol=1e-5, atol=0)


def test_staged_call_compiles_only_the_stages_it_runs():
    """Input that the sketched route answers compiles the test and the sketched stage, not the Gram-route
    fallback (whose branches make most of the one program's compile time)."""
    jax.clear_caches()
    nj.leverage_scores(_matrix(10, 1e4)).block_until_ready()
    assert routes._sketched_rows._cache_size() == 1
    assert routes._gram_leverage._cache_size() == 0
    nj.leverage_scores(np.random.default_rng(11).standard_normal((N, M)).astype(np.float32))
    assert routes._gram_leverage._cache_size() == 1
