r"""Sampling: unbiased weights (with and without replacement), the sample-size calculator and its
guarantee, leverage vs uniform distortion, reproducibility, and the distortion measure.

Statistical checks use fixed keys and bounds of at least 5 Monte-Carlo standard errors (SE estimated
from the same draws), so a correct sampler fails with probability < 1e-6 for any key, while a biased
estimator (shown explicitly below) misses by far more.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import svd_leverage

import nlis_jax as nj

N = 50


@functools.cache
def _probs_and_losses():
    rng = np.random.default_rng(0)
    losses = rng.standard_normal(N) ** 2 * (1 + 5 * rng.random(N))  # r_i² of some model
    # importance-like, skewed probabilities (max ≈ 0.088, min ≈ 5e-4)
    probs = 0.6 * losses / losses.sum() + 0.4 * rng.dirichlet(np.ones(N))
    return probs, losses


def test_with_replacement_unbiased():
    probs, losses = _probs_and_losses()
    s = 100_000
    idx, w = nj.sample(jax.random.key(0), jnp.asarray(probs), s)
    idx, w = np.asarray(idx), np.asarray(w)
    assert idx.shape == w.shape == (s,) and idx.min() >= 0 and idx.max() < N
    np.testing.assert_allclose(w, 1.0 / (s * probs[idx]), rtol=1e-14)
    estimate = np.sum(w * losses[idx])  # L_S(θ) = Σ_j w_j r_{i_j}²
    per_draw = losses[idx] / probs[idx]  # i.i.d. terms with mean L(θ); estimate is their average
    se = per_draw.std(ddof=1) / math.sqrt(s)
    assert abs(estimate - losses.sum()) <= 5 * se, (estimate, losses.sum(), se)
    assert se < 0.01 * losses.sum()  # the check is sharp enough to mean something
    # empirical frequencies follow probs (chi-square-like bound per cell, 5 SE)
    freq = np.bincount(idx, minlength=N) / s
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / s) + 1e-12)


def test_with_replacement_without_x64_follows_float32_probs():
    """Without x64 the draws search a double-float cumulative sum (float32 probs): the same checks."""
    probs, losses = _probs_and_losses()
    s = 100_000
    with jax.enable_x64(False):
        p32 = jnp.asarray(probs, jnp.float32)
        idx, w = nj.sample(jax.random.key(5), p32, s)
        idx, w = np.asarray(idx), np.asarray(w)
    assert w.dtype == np.float32 and idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < N
    estimate = np.sum(w.astype(np.float64) * losses[idx])
    se = (losses[idx] / probs[idx]).std(ddof=1) / math.sqrt(s)
    assert abs(estimate - losses.sum()) <= 5 * se + 1e-6 * losses.sum(), (estimate, losses.sum(), se)
    freq = np.bincount(idx, minlength=N) / s
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / s) + 1e-6)


def test_rows_below_float32_cumsum_rounding_are_drawn():
    """float32 probabilities over 2^20 rows (exponential): about 3% of the rows are below the rounding of
    a float32 cumulative sum near 1 (6e-8), so jax.random.choice never drew them (0 hits) while the
    weights assumed it could. They hold ~3.7e-4 of the mass: ~97 of 2^18 draws must land there."""
    n, s = 1 << 20, 1 << 18
    q = np.random.default_rng(6).exponential(size=n).astype(np.float32)
    q /= q.sum(dtype=np.float64)
    with jax.enable_x64(False):
        p = jnp.asarray(q)
        dead = np.asarray(jnp.diff(jnp.cumsum(p), prepend=0) == 0)  # empty intervals of a float32 cumsum
        idx = np.asarray(nj.sample(jax.random.key(7), p, s)[0])
    expected = s * float(np.sum(q[dead], dtype=np.float64))
    hits = int(np.sum(dead[idx]))
    assert expected > 50 and abs(hits - expected) <= 5 * math.sqrt(expected), (hits, expected)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_probs_reach_every_row(dtype):
    """float16/bfloat16 probs were searched with half-precision uniforms: of 16,000 uniform rows only
    ~1,024 (float16) could be drawn with replacement; without replacement 1/n below float16's smallest
    normal number gave weights 0, and bfloat16 priorities were biased (E[w 1{kept}] far from 1)."""
    n = 16_000
    p = nj.uniform_scores(n, dtype)
    idx, w = nj.sample(jax.random.key(8), p, 200_000)
    assert len(np.unique(np.asarray(idx))) >= n - 3  # P(a row is never drawn) = e^-12.5
    idx, w = nj.sample(jax.random.key(9), nj.uniform_scores(20_000, dtype), 10, replace=False)
    assert w.dtype == dtype and np.all(np.asarray(w, np.float64) > 500)  # about n/s = 2,000
    probs = jnp.asarray([0.4, 0.05, 0.2, 0.15, 0.1, 0.1], dtype)
    trials = 40_000
    keys = jax.random.split(jax.random.key(10), trials)
    idx, w = jax.jit(jax.vmap(lambda k: nj.sample(k, probs, 2, replace=False)))(keys)
    kept = np.zeros((trials, 6))
    np.put_along_axis(kept, np.asarray(idx), np.asarray(w, np.float64), axis=1)
    se = kept.std(0, ddof=1) / math.sqrt(trials)
    # each row's E[w 1{kept}] is 1 up to the weights' rounding to the half-precision dtype
    assert np.all(np.abs(kept.mean(0) - 1) <= 5 * se + float(jnp.finfo(dtype).eps)), kept.mean(0)


def test_half_precision_weights_that_overflow_are_named():
    with pytest.raises(ValueError, match="overflows float16"):
        nj.sample(jax.random.key(11), nj.uniform_scores(100_000, jnp.float16), 1, replace=False)


def _priority_estimates(probs, values, s, trials, key):
    keys = jax.random.split(key, trials)
    idx, w = jax.vmap(lambda k: nj.sample(k, jnp.asarray(probs), s, replace=False))(keys)
    return np.asarray(idx), np.asarray(w)


def test_without_replacement_unbiased_and_distinct():
    probs, losses = _probs_and_losses()
    s, trials = 20, 4000
    assert s * probs.max() > 1  # some inclusion probabilities are capped: naive weights would be biased
    idx, w = _priority_estimates(probs, losses, s, trials, jax.random.key(1))
    assert idx.shape == w.shape == (trials, s)
    for row in idx:
        assert len(np.unique(row)) == s  # exactly s distinct rows
    assert np.all(w >= 1.0)
    estimates = np.sum(w * losses[idx], axis=1)
    se = estimates.std(ddof=1) / math.sqrt(trials)
    assert abs(estimates.mean() - losses.sum()) <= 5 * se, (estimates.mean(), losses.sum(), se)
    assert se < 0.02 * losses.sum()
    # Teeth: the with-replacement weights 1/(s p_i) applied to this sample are biased, by far more than 5 SE.
    naive = np.sum(losses[idx] / (s * probs[idx]), axis=1)
    naive_se = naive.std(ddof=1) / math.sqrt(trials)
    assert abs(naive.mean() - losses.sum()) > 10 * naive_se


def test_without_replacement_all_rows():
    probs, _ = _probs_and_losses()
    idx, w = nj.sample(jax.random.key(2), jnp.asarray(probs), N, replace=False)
    assert sorted(np.asarray(idx).tolist()) == list(range(N))
    np.testing.assert_array_equal(w, np.ones(N))


def test_same_key_same_sample():
    probs, _ = _probs_and_losses()
    for replace in (True, False):
        a = nj.sample(jax.random.key(3), jnp.asarray(probs), 20, replace=replace)
        b = nj.sample(jax.random.key(3), jnp.asarray(probs), 20, replace=replace)
        c = nj.sample(jax.random.key(4), jnp.asarray(probs), 20, replace=replace)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    ("eps", "delta", "rank", "beta"), [(0.5, 0.1, 5, 1.0), (0.1, 0.01, 20, 1.0), (0.3, 0.05, 10, 0.5)]
)
def test_sample_size_formula(eps, delta, rank, beta):
    s = nj.sample_size(eps, delta, rank, beta=beta)
    m = max(rank / beta - 1.0, 1.0)
    assert s == math.ceil((2 / eps**2 + 2 / (3 * eps)) * m * math.log(2 * rank / delta))
    # derivation: matrix Bernstein with L = σ² = m/s gives P(ε̂ ≥ ε) ≤ 2d exp(−s ε² / (2m(1 + ε/3)))
    tail = lambda s_: 2 * rank * math.exp(-s_ * eps**2 / (2 * m * (1 + eps / 3)))
    assert tail(s) <= delta * (1 + 1e-12) and tail(s - 1) > delta  # the smallest such s
    assert nj.sample_size(eps / 2, delta, rank, beta=beta) > s  # monotone in each argument
    assert nj.sample_size(eps, delta / 2, rank, beta=beta) > s
    assert nj.sample_size(eps, delta, rank, beta=beta / 2) > s


def _heavy_matrix(n=200, m=8, seed=5):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, m))
    X[:m] = 40.0 * np.eye(m) + rng.standard_normal((m, m))  # m rows of very high leverage (h_i ≈ 1)
    return X


def _distortions(basis, probs, s, trials, key, replace=True):
    keys = jax.random.split(key, trials)

    def one(k):
        idx, w = nj.sample(k, probs, s, replace=replace)
        return nj.distortion(None, idx, w, basis=basis)

    return np.asarray(jax.vmap(one)(keys))


def test_calculator_sample_size_achieves_epsilon():
    F = jnp.asarray(_heavy_matrix())
    U, rank, _ = nj.orthonormal_basis(F)
    probs = nj.leverage_scores(F)
    eps, delta, trials = 0.5, 0.1, 60
    s = nj.sample_size(eps, delta, int(rank))
    eps_hat = _distortions(U, probs, s, trials, jax.random.key(6))
    share = np.mean(eps_hat <= eps)
    assert share >= 1 - delta, f"ε̂ ≤ ε in {share:.2f} of trials (s = {s}), max ε̂ = {eps_hat.max():.3f}"
    assert eps_hat.max() > 0.05  # ε̂ is a real measurement, not identically 0


def test_calculator_with_beta_for_linear_scores():
    """Linear leverage scores of X for a bounded-Swish single-index model are a β = c1/c2 approximation."""
    X = _heavy_matrix(seed=7)
    theta = jnp.asarray(np.random.default_rng(8).standard_normal(X.shape[1]))
    Fstar = nj.single_index_adjoint(nj.bounded_swish, theta, jnp.asarray(X))
    U, rank, _ = nj.orthonormal_basis(Fstar)
    probs = nj.linear_leverage_scores(jnp.asarray(X))
    eps, delta, trials = 0.5, 0.1, 60
    s = nj.sample_size(eps, delta, int(rank), beta=1.0 / 2.0)
    eps_hat = _distortions(U, probs, s, trials, jax.random.key(9))
    assert np.mean(eps_hat <= eps) >= 1 - delta


def test_leverage_beats_uniform_on_high_leverage_rows():
    F = jnp.asarray(_heavy_matrix())
    U, _, _ = nj.orthonormal_basis(F)
    s, trials = 100, 60
    lev = _distortions(U, nj.leverage_scores(F), s, trials, jax.random.key(10))
    uni = _distortions(U, nj.uniform_scores(F.shape[0]), s, trials, jax.random.key(11))
    ratio = np.median(uni) / np.median(lev)
    assert ratio >= 3, f"median ε̂: uniform {np.median(uni):.3f}, leverage {np.median(lev):.3f}"


def test_distortion_matches_numpy():
    rng = np.random.default_rng(12)
    for F in (_heavy_matrix(seed=13), rng.standard_normal((200, 3)) @ rng.standard_normal((3, 8))):
        h, r = svd_leverage(F)
        Uref = np.linalg.svd(F, full_matrices=False)[0][:, :r]
        idx, w = nj.sample(jax.random.key(14), jnp.asarray(h / r), 30)
        idx, w = np.asarray(idx), np.asarray(w)
        Us = Uref[idx]
        expected = np.linalg.norm(Us.T @ (w[:, None] * Us) - np.eye(r), 2)
        np.testing.assert_allclose(nj.distortion(jnp.asarray(F), idx, w), expected, rtol=1e-10)
        U, _, _ = nj.orthonormal_basis(jnp.asarray(F))
        np.testing.assert_allclose(nj.distortion(None, idx, w, basis=U), expected, rtol=1e-10)
        # the full, unweighted sample has no distortion
        full = nj.distortion(jnp.asarray(F), np.arange(F.shape[0]), np.ones(F.shape[0]))
        assert float(full) < 1e-12


def test_the_draws_bisection_past_two_to_the_thirty_rows():
    """The float32 draws' bisection computed (lo + hi) // 2 in int32, which wraps from n > 2^30: rows
    near 2^30 and the last came back as one wrong row (886,433,244 for n = 1.5e9). Checked on a
    closed-form cumulative sum (p_i = 1/n: row i holds (i, i + 1]/n), no 6 GB vector."""
    from nlis_jax._sampling import first_above

    n = 1_500_000_000
    rows = jnp.asarray([0, 5, 2**30 - 10, 2**30 + 10, 1_000_000_000, 1_200_000_000, n - 1], jnp.int32)
    targets = rows.astype(jnp.float64) + 0.5  # inside row i's interval, in units of 1/n
    got = jax.jit(lambda t: first_above(lambda mid: mid.astype(jnp.float64) + 1 > t, n, t.shape[0]))(targets)
    np.testing.assert_array_equal(got, rows)
