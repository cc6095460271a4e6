r"""The shifted-Cholesky route (``"shifted"``) for ill-conditioned input below float64.

References are float64 leverage of the float32 data itself (numpy Householder QR), so what is measured
is the route's own error. Any backward-stable float32 method (LAPACK QR/SVD, the ``"stable"`` route) is
off by about ``eps32·κ`` per row; the shifted route is held to the total variation and the smallest
ratio (the two figures sampling sees) of the ``"stable"`` route on the same matrix, within a factor 2,
and to the benchmark's targets (TV ≤ 1e-4, ``min τ/τ_ref ≥ 0.999``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BETA_TARGET,
    TV_TARGET,
    assert_rank_deficient_falls_back_to_stable,
    float32_leverage,
    float32_leverage_ref,
    matrix_with_condition,
    mlp,
    mlp_params,
    normal,
    tv_beta,
)

import nlis_jax as nj
from nlis_jax import _precondition

N, M = 2000, 40


@pytest.mark.parametrize("kappa", [1e3, 1e4, 1e5])
def test_shifted_route_matches_stable_accuracy(kappa):
    A = matrix_with_condition(np.random.default_rng(1), N, M, kappa)[0]
    ref = float32_leverage_ref(A)
    info, route = float32_leverage(A)
    assert route == "shifted" and int(info.rank) == M
    assert info.leverage.dtype == jnp.float32
    tv, beta = tv_beta(info.leverage, ref)
    stable, stable_route = float32_leverage(A, route="stable")
    assert stable_route == "stable"
    tv_s, beta_s = tv_beta(stable.leverage, ref)
    msg = f"κ = {kappa:.0e}: shifted TV {tv:.2e} β {beta:.6f}; stable TV {tv_s:.2e} β {beta_s:.6f}"
    assert tv <= 2 * tv_s + 1e-6 and 1 - beta <= 2 * (1 - beta_s) + 1e-6, msg
    assert tv <= TV_TARGET and beta >= BETA_TARGET, msg


def test_ill_conditioned_mlp_dual_float32_dense_and_streaming():
    """A float32 MLP dual matrix with κ(F) > 1e6: the shifted route, dense and streamed, both accurate.

    The routes equilibrate columns, so what bounds their accuracy is ``κ(F D⁻¹)`` (``D`` the column norms),
    7.3e4 here. The targets (TV ≤ 1e-4, β ≥ 0.999) are within float32's reach up to ``κ(F D⁻¹) ≈ 1e5``:
    at 3e5 every float32 method misses β (synthetic 2000 × 40, three seeds: shifted and Householder both
    0.9983–0.9987). The network of seed 0, used before, has κ(F) = 1.9e6 but ``κ(F D⁻¹)`` = 2.2e5, where
    β rests on BLAS rounding: 0.99889 dense on an AMD EPYC host (0.99920–0.99925 on others), Householder
    0.99941, and even the exact float64 transform applied in float32 only 0.99942 (2026-12-02)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), mlp_params(2, (3, 6, 6, 1)))
    xs = jnp.asarray(normal(1, 300, 3), jnp.float32)
    ys = jnp.asarray(normal(2, 300), jnp.float32)
    apply_fn = mlp(jnp.tanh)
    # the fixed 16-node rule, dense and streamed: a streaming program holding the adaptive rule compiles
    # for 10-15 s, and the routes see the same matrix either way
    F = np.asarray(nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=16))
    assert F.dtype == np.float32 and np.linalg.cond(F.astype(np.float64)) > 1e6
    ref = float32_leverage_ref(F)
    info, route = float32_leverage(F)
    assert route == "shifted" and int(info.rank) == F.shape[1]
    tv, beta = tv_beta(info.leverage, ref)
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (tv, beta)
    streamed = nj.streaming_leverage_scores(
        apply_fn, params, xs, ys, chunk_size=64, return_info=True, num_nodes=16
    )
    assert nj.routes.ROUTES[int(streamed.route)] == "shifted" and int(streamed.rank) == F.shape[1]
    tv_stream, beta_stream = tv_beta(streamed.leverage, ref)  # its dual rows are recomputed per chunk
    assert tv_stream <= TV_TARGET and beta_stream >= BETA_TARGET, (tv_stream, beta_stream)


@pytest.mark.parametrize("case", ["rank5_product", "kappa_1e8"])
def test_rank_deficient_input_falls_back_to_stable(case):
    assert_rank_deficient_falls_back_to_stable(case, 2, N, M)


@pytest.mark.parametrize("case", ["kappa_2e5", "rank5_product"])
def test_wide_matrices_take_the_triangular_products(case):
    """``m = TRIANGULAR_MIN`` columns (the products skip the transforms' zero blocks): κ = 2e5 in float32
    (κ·eps32 = 0.02, near the rank tolerance) meets the targets against float64 leverage on the shifted
    route; an exactly rank-5 matrix goes on to route ``"stable"`` with rank 5."""
    rng = np.random.default_rng(6)
    n, m = 1100, nj.routes.TRIANGULAR_MIN
    if case == "rank5_product":
        info, route = float32_leverage(rng.standard_normal((n, 5)) @ rng.standard_normal((5, m)))
        assert route == "stable" and int(info.rank) == 5
        return
    A = matrix_with_condition(rng, n, m, 2e5)[0]
    info, route = float32_leverage(A)
    assert route == "shifted" and int(info.rank) == m
    tv, beta = tv_beta(info.leverage, float32_leverage_ref(A))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (tv, beta)


def test_upper_rows_is_the_full_product():
    """The split product with an upper-triangular transform equals ``A @ U`` (and its row norms)."""
    rng = np.random.default_rng(7)
    m = nj.routes.TRIANGULAR_MIN + 3
    A, U = rng.standard_normal((40, m)), np.triu(rng.standard_normal((m, m)))
    got = nj.routes.upper_rows(jnp.asarray(A), jnp.asarray(U))
    np.testing.assert_allclose(np.asarray(got), A @ U, rtol=1e-12, atol=1e-12 * np.abs(A @ U).max())
    norms = nj.routes.upper_rows(jnp.asarray(A), jnp.asarray(U), row_norms=True)
    np.testing.assert_allclose(np.asarray(norms), np.sum((A @ U) ** 2, axis=1), rtol=1e-12)


def test_zero_columns_are_set_aside():
    rng = np.random.default_rng(3)
    A = matrix_with_condition(rng, N, M, 1e4)[0]
    padded = np.insert(A, [3, 17], 0.0, axis=1)  # two dead units
    info, route = float32_leverage(padded)
    assert route == "shifted" and int(info.rank) == M
    tv, beta = tv_beta(info.leverage, float32_leverage_ref(A))
    assert tv <= TV_TARGET and beta >= BETA_TARGET, (tv, beta)


def test_forced_shifted_route_in_float64_matches_svd():
    """Forced in float64 the route is exact to ``eps64·κ`` (the default float64 route is Householder)."""
    A, *_ = matrix_with_condition(np.random.default_rng(4), 500, 12, 1e4)
    U, rank, route = nj.orthonormal_basis(jnp.asarray(A), route="shifted")
    assert nj.routes.ROUTES[int(route)] == "shifted" and int(rank) == 12
    h_ref = np.sum(np.linalg.svd(A, full_matrices=False)[0] ** 2, axis=1)
    np.testing.assert_allclose(np.sum(np.asarray(U) ** 2, axis=1), h_ref, atol=1e-10)
    np.testing.assert_allclose(np.asarray(U).T @ np.asarray(U), np.eye(12), atol=1e-12)


@pytest.mark.parametrize("kappa", [1e3, 1e5])
def test_transform_gives_the_condition_number(kappa):
    """``ratio`` (σ_min/σ_max of the equilibrated matrix, from the transform alone) against the SVD."""
    A = np.asarray(matrix_with_condition(np.random.default_rng(5), N, M, kappa)[0], np.float32)
    Aj = jnp.asarray(A)
    G = Aj.T @ Aj
    first, ok = _precondition.shifted_first(G)
    Y = Aj @ first
    pre = _precondition.shifted_transform(G, Y.T @ Y, first, lambda Mx: (Y @ Mx).T @ (Y @ Mx), 1e-6)
    assert bool(ok) and bool(pre.ok)
    A64 = A.astype(np.float64)
    s = np.linalg.svd(A64 / np.linalg.norm(A64, axis=0), compute_uv=False)
    np.testing.assert_allclose(float(pre.ratio), s[-1] / s[0], rtol=0.05)


def test_shift_is_raised_until_cholesky_succeeds(monkeypatch):
    """With a shift far below the Gram rounding the factorisation fails; raising it tenfold recovers."""
    A = matrix_with_condition(np.random.default_rng(6), 1000, 30, 1e5)[0]
    G = jnp.asarray(A, jnp.float32).T @ jnp.asarray(A, jnp.float32)
    monkeypatch.setattr(_precondition, "SHIFT", 1e-9)
    monkeypatch.setattr(_precondition, "SHIFT_TRIES", 0)
    assert not bool(_precondition.shifted_first(G)[1])
    monkeypatch.setattr(_precondition, "SHIFT_TRIES", 12)
    first, ok = _precondition.shifted_first(G)
    assert bool(ok) and np.all(np.isfinite(np.asarray(first)))


@pytest.mark.parametrize("n", [50, 128, 300])
def test_count_sketch_matches_the_dense_embedding(n):
    """``count_sketch(A, s)`` equals ``S A`` for the dense ``S`` with ``S[i mod s, i] = ±1``, the sign
    from the documented hash of ``i`` (fewer rows than ``s``, a multiple of ``s``, and neither)."""
    s, m = 64, 5
    A = np.random.default_rng(9).standard_normal((n, m))
    h = (np.arange(n, dtype=np.uint64) * 0x9E3779B1) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x85EBCA77) & 0xFFFFFFFF
    h ^= h >> 13
    S = np.zeros((s, n))
    S[np.arange(n) % s, np.arange(n)] = np.where((h >> 7) & 1 == 1, 1.0, -1.0)
    out = jax.jit(_precondition.count_sketch, static_argnums=1)(jnp.asarray(A), s)
    np.testing.assert_allclose(np.asarray(out), S @ A, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("m", [_precondition.SUBSTITUTION_MAX, _precondition.SUBSTITUTION_MAX + 1])
def test_lower_inverse_t_substitution_and_lapack(m):
    """Both branches (substitution for small ``m``, LAPACK above) give ``L⁻ᵀ``."""
    rng = np.random.default_rng(7)
    L = np.tril(rng.standard_normal((m, m))) + m * np.eye(m)
    np.testing.assert_allclose(
        np.asarray(_precondition.lower_inverse_t(jnp.asarray(L))), np.linalg.inv(L).T, atol=1e-14
    )


# ---------------------------------------------------------------------------------------------------------
# The NaN/Inf check of leverage_scores, fused into the Gram pass


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_is_named_after_the_gram_pass(dtype, bad):
    F = np.random.default_rng(8).standard_normal((300, 6)).astype(dtype)
    F[[5, 200], [1, 4]] = bad
    with pytest.raises(ValueError, match=r"F contains 2 NaN or Inf value\(s\)"):
        nj.leverage_scores(F)
    with pytest.raises(ValueError, match=r"F contains 2 NaN or Inf"):
        nj.leverage_scores(F.reshape(100, 3, 6))  # block dual matrix
    assert np.isfinite(F).sum() == F.size - 2  # the input is not modified


def test_column_whose_gram_would_overflow_is_scored_exactly():
    """Σ F_i2² overflows float32, but columns are rescaled by powers of two before the Gram matrix is
    formed (issue: leverage does not change when a column is scaled), so the scores are those of F/1e20."""
    F = np.random.default_rng(9).standard_normal((300, 6)).astype(np.float32)
    ref = nj.leverage_scores(F)
    F[:, 2] *= 1e20  # finite entries, but Σ F_i2² overflows float32
    got = nj.leverage_scores(F)
    np.testing.assert_allclose(got, ref, rtol=1e-4)  # float32, rounding of the scaled column only


@pytest.mark.parametrize("route", [None, *nj.routes.ROUTES])
def test_nonfinite_input_under_jit_gives_nan_on_every_route(route):
    """Under a user's jit nothing can raise: every route returns NaN (and runs no factorisation)."""
    F = np.random.default_rng(10).standard_normal((300, 6))
    F[7, 3] = np.nan
    h = jax.jit(lambda A: nj.leverage_scores(A, route=route))(jnp.asarray(F))
    assert np.all(np.isnan(np.asarray(h)))


# ---------------------------------------------------------------------------------------------------------
# Kernels chosen per platform: both branches of the route decision, run here on the CPU


@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e5, 1e9])
def test_platform_branches_of_the_decision_agree(kappa):
    """``cholesky_decision_xla`` (CPU) and ``cholesky_decision_solver`` (GPU/TPU): the same ``L⁻ᵀ`` and
    the same route. The solver's ratio is exact (1e-6 against numpy); 30 power/inverse iterations give it
    to ~1e-5 on these spectra (1e-3 asserted), ample for thresholds orders of magnitude apart."""
    A = matrix_with_condition(np.random.default_rng(11), 400, 10, kappa)[0] if kappa > 1 else None
    if A is None:
        A = np.random.default_rng(11).standard_normal((400, 10))
    Geq, _, _ = _precondition.equilibrate(jnp.asarray(A.T @ A))
    inv_x, ratio_x = _precondition.cholesky_decision_xla(Geq)
    inv_s, ratio_s = _precondition.cholesky_decision_solver(Geq)
    np.testing.assert_allclose(
        np.asarray(inv_x), np.asarray(inv_s), rtol=1e-9, atol=1e-12 * np.abs(inv_s).max()
    )
    assert int(nj.routes.choose_route(ratio_x)) == int(nj.routes.choose_route(ratio_s))
    lam = np.linalg.eigvalsh(np.asarray(Geq))
    if kappa <= 1e5:  # at κ(G) = 1e18 both are rounding-level (route "stable" either way)
        np.testing.assert_allclose(float(ratio_s), lam[0] / lam[-1], rtol=1e-6)
        np.testing.assert_allclose(float(ratio_x), float(ratio_s), rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# The main job: jax's persistent compilation cache, on by default in the CLI


def test_cli_compilation_cache_is_written_and_reused(tmp_path):
    """By default ``nlis-jax run`` fills $XDG_CACHE_HOME/nlis_jax/jax on the first run; a second run (a new
    process, as a user's repeated run) finds its programs there and adds (almost) nothing."""
    from test_cli import TINY

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "NLIS_JAX_COMPILATION_CACHE"}
    env |= {"PYTHONPATH": str(root), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    cache = tmp_path / "xdg" / "nlis_jax" / "jax"
    args = [sys.executable, "-m", "nlis_jax.cli", *TINY, "--no-plots", "--no-progress"]
    for out in ("a", "b"):
        if out == "b":
            first = {p.name for p in cache.iterdir()}
            assert len(first) > 5, first
        done = subprocess.run([*args, "--out", str(tmp_path / out)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    added = {p.name for p in cache.iterdir()} - first
    assert len(added) <= len(first) // 10, added


def test_cli_compilation_cache_options(monkeypatch, tmp_path):
    """``--compilation-cache DIR`` picks the folder, ``--no-compilation-cache`` (or the environment
    variable set to ``off``) keeps the cache off."""
    from nlis_jax import cli

    calls = []
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda where: calls.append(Path(where)) or True)
    # off is recorded, not done: the real one turns the process's cache off (conftest checks that none leaks)
    monkeypatch.setattr(cli, "disable_compilation_cache", lambda: calls.append(None))
    parser = cli.build_parser()
    monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "env"))
    for argv, expected in (
        ([], tmp_path / "env"),
        (["--compilation-cache", str(tmp_path / "opt")], tmp_path / "opt"),
        (["--no-compilation-cache"], None),
    ):
        calls.clear()
        cli.setup_compilation_cache(parser.parse_args(["run", *argv]))
        assert calls == [expected], argv
    monkeypatch.setenv(cli.CACHE_ENV, "off")
    calls.clear()
    cli.setup_compilation_cache(parser.parse_args(["run"]))
    assert calls == [None]


def test_default_compilation_cache_folder(monkeypatch, tmp_path):
    from nlis_jax import cli

    monkeypatch.delenv(cli.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.default_compilation_cache() == tmp_path / "nlis_jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cli.default_compilation_cache() == Path("~/.cache/nlis_jax/jax").expanduser()
    monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "mine"))
    assert cli.default_compilation_cache() == tmp_path / "mine"
    monkeypatch.setenv(cli.CACHE_ENV, "off")
    assert cli.default_compilation_cache() is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert not cli.enable_compilation_cache(blocked / "jax")  # a file where the folder should be
