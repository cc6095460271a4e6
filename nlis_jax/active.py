r"""Active learning: choose which unlabelled points to label from response-free nonlinear leverage.

The scores of the dual matrix WITHOUT a response, :math:`[F^*(\theta) \mid f(0)]`, need no labels, so a
model can rank an unlabelled pool by how much its fit at :math:`\theta` depends on each point
(:func:`label_free_leverage_scores`). A query picks the next batch from the pool (the points not yet
labelled) in one of two ways:

* ``strategy="sample"``: draw from the pool probabilities
  :math:`p_i = (1 - \alpha)\, s_i / \sum_{j \in U} s_j + \alpha / |U|` for :math:`i \in U` (0 on labelled
  points), with importance weights that make :math:`\sum_j w_j v_{i_j}` unbiased for
  :math:`\sum_{i \in U} v_i`. With replacement: ``b`` i.i.d. draws, :math:`w_j = 1/(b\, p_{i_j})` (a point
  drawn twice is labelled once and its weights add up). Without replacement (the default: no label is
  paid for twice): priority sampling (:func:`nlis_jax.sample` with ``replace=False``), ``b`` distinct
  points with :math:`w_i = \max(1, \tau / p_i)`.
* ``strategy="topk"``: the ``b`` pool points of highest score (deterministic; weights are ones, and the
  weighted loss is NOT an unbiased estimate of the full loss).

**The estimator across rounds.** Round :math:`r` (the seed set is round 0, drawn uniformly) draws
:math:`b_r` points from the pool :math:`U_r` and gives :math:`E_r = \sum_{i \in L_r} \ell_i +
\sum_{j} w^{(r)}_j \ell_{i_j}`, with :math:`L_r` the points labelled before round :math:`r` (their loss is
known exactly). Given the history, :math:`E[E_r] = \sum_{L_r} \ell + \sum_{U_r} \ell = L(\theta)` for any
fixed :math:`\theta`, even though the probabilities of round :math:`r` depend on the fits of earlier rounds.
The combination :math:`\hat L = \sum_r c_r E_r` with the fixed coefficients :math:`c_r = b_r / S`,
:math:`S = \sum_r b_r`, is therefore unbiased, and uses every label. Its weight on a point labelled in round
:math:`r` is

.. math:: w_i = \frac{m_i + S - S_r}{S}, \qquad m_i = b_r \sum_{\text{draws } j \text{ of } i} w^{(r)}_j,

where :math:`S_r = b_0 + \dots + b_r`: the part :math:`m_i/S` comes from the round that drew :math:`i`
(:math:`m_i/S = \text{count}_i/(S p_i)` with replacement, the familiar :math:`1/(s p_i)` with ``s`` all
draws so far), the part :math:`(S - S_r)/S` from the later rounds, in which :math:`i` is an exactly known
term. With :math:`c_r \propto b_r` the rounds' martingale differences are weighted as one sample of size
:math:`S` would be. :class:`ActiveState` keeps :math:`m_i`, :math:`S_r` and :math:`S`;
:func:`estimator_weights` returns :math:`w`.

The argument needs every pool point to have a positive probability in every ``"sample"`` round (true
whenever ``alpha > 0``). With ``alpha = 0`` a point of score 0 (e.g. a zero response-free dual row), or a
score that rounds to probability 0 beside the largest, can never be drawn: its loss is missing from
:math:`E_r`, and :math:`\hat L` is biased low by the loss of such points. :func:`active_learning` warns
when a round has them.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nlis_jax import _traced as traced
from nlis_jax._checks import (
    as_probs_vector,
    check_bool,
    check_choice,
    check_key,
    check_positive_int,
    check_real,
    float_bits,
    flushes_subnormals,
    is_concrete,
)
from nlis_jax._dual import dual_matrix
from nlis_jax._precision import at_least_float32, times_power_of_two
from nlis_jax._sampling import priority_reachable, sample
from nlis_jax._scores import leverage_scores
from nlis_jax._streaming import streaming_leverage_scores
from nlis_jax._types import ApplyFn, Array, PRNGKey, PyTree
from nlis_jax.distributed import gather

#: Ways to choose a batch from the pool.
STRATEGIES = ("sample", "topk")


@traced.entry
def label_free_leverage_scores(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: Array,
    *,
    num_nodes: int | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
) -> Array:
    r"""Response-free nonlinear leverage: leverage-score probabilities of :math:`[F^*(\theta) \mid f(0)]`.

    Args:
      apply_fn: ``apply_fn(params, x)`` for ONE example (scalar or ``(k,)``; block leverage for ``k``).
      params: the current parameters :math:`\theta` (pytree).
      xs: ``(n, ...)`` inputs of every point, labelled or not (no labels are used).
      num_nodes, mode: quadrature nodes and differentiation mode, as in :func:`nlis_jax.adjoint`.
      chunk_size: ``None`` materialises the ``(n, p+1)`` dual matrix (:func:`nlis_jax.dual_matrix`); an
        int streams it ``chunk_size`` rows at a time (:func:`nlis_jax.streaming_leverage_scores`), for
        pools too large for memory.

    Returns:
      ``(n,)`` probabilities :math:`h_i / \mathrm{rank}`.
    """
    if chunk_size is None:
        return leverage_scores(dual_matrix(apply_fn, params, xs, None, num_nodes=num_nodes, mode=mode))
    chunk_size = check_positive_int("chunk_size", chunk_size)
    return streaming_leverage_scores(
        apply_fn, params, xs, None, chunk_size=chunk_size, num_nodes=num_nodes, mode=mode
    )


class Query(NamedTuple):
    """A chosen batch.

    Attributes:
      indices: ``(b,)`` int32 pool indices (distinct unless sampled with replacement).
      weights: ``(b,)`` this round's weights: ``Σ_j weights_j v[indices_j]`` is unbiased for the sum of
        ``v`` over the pool points of positive probability (``strategy="sample"``; all of them when
        ``alpha > 0``); ones for ``"topk"``.
      probs: ``(n,)`` the pool probabilities the batch was drawn from (0 on labelled points).
    """

    indices: Array
    weights: Array
    probs: Array


class ActiveState(NamedTuple):
    r"""Bookkeeping of the labelled set for the unbiased weights (see the module docstring).

    Attributes:
      labelled: ``(n,)`` bool, whether each point has a label.
      mass: ``(n,)`` :math:`m_i = b_r \sum_j w^{(r)}_j` of the round ``r`` that labelled ``i`` (0 if none).
      labelled_at: ``(n,)`` :math:`S_r`, the draws made up to and including that round (0 if none).
      draws: scalar :math:`S`, all draws so far.
    """

    labelled: Array
    mass: Array
    labelled_at: Array
    draws: Array


def init_state(n: int, dtype=None) -> ActiveState:
    """An empty :class:`ActiveState` for a pool of ``n`` points, its sums in ``dtype`` (default float).

    Half precision is kept in float32: the running sums ``m_i`` and ``S`` reach the pool size and beyond
    (float16 overflows at 65,504 and counts draws exactly only to 2,048). ``TypeError`` for a dtype that
    is not floating point (integer weights would be truncated).
    """
    n = check_positive_int("n", n)
    dtype = jnp.dtype(dtype or jnp.result_type(float))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating point dtype (the weights' sums), got {dtype}.")
    dtype = at_least_float32(dtype)
    zeros = jnp.zeros((n,), dtype)
    return ActiveState(jnp.zeros((n,), bool), zeros, zeros, jnp.zeros((), dtype))


def _pool_probs(scores, labelled, alpha):
    pool = ~labelled
    # at least float32, and scaled by a power of two near the largest score: large finite scores must
    # not overflow the sum (a division by the largest score would take its reciprocal, a denormal)
    s = jnp.where(pool, scores, 0).astype(at_least_float32(scores.dtype))
    top = jnp.max(s)
    s = times_power_of_two(s, -jnp.frexp(jnp.where(jnp.isfinite(top) & (top > 0), top, 1))[1])
    total = jnp.sum(s)
    size = jnp.sum(pool).astype(s.dtype)
    base = jnp.where(total > 0, s / jnp.where(total > 0, total, 1), pool.astype(s.dtype) / size)
    return jnp.where(pool, (1 - alpha) * base + alpha / size, 0).astype(scores.dtype)


def _check_alpha(alpha) -> float:
    """``alpha`` as a float: a real number (Python, numpy or 0-d array; ``TypeError`` otherwise) in
    ``[0, 1]`` (``ValueError``, NaN included)."""
    value = check_real("alpha", alpha)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    return value


def _check_pool(scores, labelled, alpha) -> tuple[int, Array, Array, float]:
    """Shape and value checks of ``(scores, labelled, alpha)``; returns ``(pool size or -1, scores,
    labelled, alpha as a float)``. Global arrays spanning processes are gathered whole on every process
    (two ``(n,)`` vectors; the choice is then the same local result on each)."""
    if any(
        is_concrete(a) and isinstance(a, jax.Array) and not a.is_fully_addressable for a in (scores, labelled)
    ):
        scores, labelled = gather((scores, labelled))
    scores = jnp.asarray(as_probs_vector(scores, "scores"))
    labelled = jnp.asarray(labelled)
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (n,) vector, got shape {scores.shape}.")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"scores must be floating point, got {scores.dtype}.")
    if labelled.shape != scores.shape or labelled.dtype != jnp.bool_:
        raise ValueError(
            f"labelled must be a bool mask of shape {scores.shape}, got {labelled.dtype}{labelled.shape}."
        )
    alpha = _check_alpha(alpha)
    if not (is_concrete(scores) and is_concrete(labelled)):  # the same checks by checkify, when asked
        pool = ~labelled
        traced.check(jnp.any(pool), "the pool is empty: every point is already labelled.")
        fit = jnp.where(pool, jnp.isfinite(scores) & (scores >= 0), True)
        traced.check(
            jnp.all(fit), "scores must be finite and non-negative on the pool (the unlabelled points)."
        )
        if traced.enabled() and flushes_subnormals(scores.dtype):  # eagerly rescaled on the host instead
            top = jnp.max(jnp.where(pool, float_bits(scores)[1], 0))
            finfo = jnp.finfo(scores.dtype)
            low = float_bits(jnp.asarray(finfo.smallest_normal / finfo.eps, scores.dtype))[1]
            traced.check(
                (top == 0) | (top >= low),
                "the pool's scores are all below the smallest normal number divided by eps: traced, such "
                "scores are refused (a CPU flushes subnormal ones to 0, and the pool turned uniform); "
                "rescale the scores (the probabilities do not depend on their scale), or call query "
                "outside jax.jit, which rescales them.",
            )
        return -1, scores, labelled, alpha
    mask = np.asarray(labelled)
    pool = int(np.sum(~mask))
    if pool == 0:
        raise ValueError("the pool is empty: every point is already labelled.")
    s = np.asarray(scores)[~mask]  # labelled points' scores are never used
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("scores must be finite and non-negative on the pool (the unlabelled points).")
    top = float(np.max(s))
    finfo = jnp.finfo(scores.dtype)
    if 0 < top < finfo.smallest_normal / finfo.eps and flushes_subnormals(scores.dtype):
        # pool scores below the smallest normal number that are not below the largest one's rounding: the
        # device flushes them to 0 (all of them subnormal: the pool turned uniform). Scaled on the host by
        # a power of two (exact; the probabilities do not change); labelled points' scores set to 0
        e = np.frexp(top)[1]
        scaled = np.ldexp(np.where(mask, 0.0, np.asarray(scores, np.float64)), -e)
        scores = jnp.asarray(scaled.astype(scores.dtype))
    return pool, scores, labelled, alpha


def pool_probabilities(scores: Array, labelled: Array, *, alpha: float = 0.0) -> Array:
    r"""Pool probabilities :math:`p_i = (1 - \alpha) s_i / \sum_{j \in U} s_j + \alpha/|U|` on the pool.

    Args:
      scores: ``(n,)`` non-negative scores (need not sum to 1), e.g. :func:`label_free_leverage_scores`.
      labelled: ``(n,)`` bool mask of the labelled points (probability 0).
      alpha: weight of the uniform distribution on the pool, in ``[0, 1]``; ``α > 0`` keeps every pool
        point reachable (:math:`p_i \ge \alpha / |U|`). When the pool's scores are all 0 the uniform
        distribution on the pool is used.

    Returns:
      ``(n,)`` probabilities, summing to 1 over the pool, 0 on labelled points.
    """
    _, scores, labelled, alpha = _check_pool(scores, labelled, alpha)
    return _pool_probs(scores, labelled, alpha)


@functools.partial(traced.jit, static_argnames=("batch", "strategy", "replace"))
def _query(key, scores, labelled, alpha, *, batch, strategy, replace):
    probs = _pool_probs(scores, labelled, alpha.astype(scores.dtype))
    if strategy == "topk":  # by the scores themselves: rounded or underflowed probabilities tie
        _, idx = jax.lax.top_k(jnp.where(labelled, -jnp.inf, scores), batch)
        return Query(idx.astype(jnp.int32), jnp.ones((batch,), scores.dtype), probs)
    if not replace:  # traced (checkify, when asked): before the sampler's own check, in the query's words
        traced.check(
            jnp.sum(priority_reachable(probs)[1]) >= batch,
            f"fewer pool points of positive probability than batch={batch}: sampling without "
            "replacement cannot reach the rest (use alpha > 0).",
        )
    idx, w = sample(key, probs, batch, replace=replace)
    return Query(idx.astype(jnp.int32), w.astype(scores.dtype), probs)


def _check_replace(strategy: str, replace: bool) -> None:
    """``ValueError`` for ``replace=True`` with ``"topk"``, which takes distinct points and ignores it."""
    if replace and strategy == "topk":
        raise ValueError(
            'replace=True is an option of strategy="sample" (i.i.d. draws); strategy="topk" takes the '
            "batch highest-scored distinct points: leave replace=False."
        )


@traced.entry
def query(
    key: PRNGKey | None,
    scores: Array,
    labelled: Array,
    batch: int,
    *,
    strategy: str = "sample",
    alpha: float = 0.0,
    replace: bool = False,
) -> Query:
    r"""Choose the next ``batch`` points to label from the pool (the points with ``labelled == False``).

    Args:
      key: PRNG key for ``strategy="sample"`` (used once); ignored (may be ``None``) for ``"topk"``.
      scores: ``(n,)`` non-negative scores of every point (only the pool's are used).
      labelled: ``(n,)`` bool mask; labelled points are never chosen.
      batch: ``b``, points to choose (distinct by default; draws with ``replace=True``); at most the
        pool size (static).
      strategy: ``"sample"`` (by the pool probabilities, unbiased weights) or ``"topk"`` (highest scores).
      alpha: uniform mixing weight in ``[0, 1]`` (:func:`pool_probabilities`).
      replace: with ``"sample"``: i.i.d. draws (weights ``1/(b p_i)``) or, by default, ``b`` distinct
        points by priority sampling (weights ``max(1, τ/p_i)``); ``ValueError`` with ``"topk"``.

    Returns:
      :class:`Query` ``(indices (b,), weights (b,), probs (n,))``; with ``"topk"`` the weights are ones and
      ``probs`` the pool probabilities of ``alpha`` (the choice itself does not depend on ``alpha``).

    Raises:
      ValueError: bad shapes, negative or non-finite scores of pool points, ``alpha`` outside ``[0, 1]``,
        an empty pool, a batch larger than the pool, (without replacement) fewer pool points of
        positive probability than ``batch`` (mix with uniform: ``alpha > 0``), ``key=None`` with
        ``"sample"``, or ``replace=True`` with ``"topk"``.
      TypeError: ``alpha`` not a real number, ``replace`` not a bool, or (``"sample"``) ``key`` neither
        ``None`` nor a PRNG key.
    """
    check_choice("strategy", strategy, STRATEGIES)
    batch = check_positive_int("batch", batch)
    replace = check_bool("replace", replace)
    _check_replace(strategy, replace)
    pool, scores, labelled, alpha = _check_pool(scores, labelled, alpha)
    if pool >= 0 and batch > pool:
        raise ValueError(f"batch={batch} exceeds the {pool} unlabelled points in the pool.")
    if pool < 0:  # traced: checkify, when asked
        traced.check(
            jnp.sum(~jnp.asarray(labelled)) >= batch, f"batch={batch} exceeds the unlabelled points."
        )
    if strategy == "sample":
        if key is None:
            raise ValueError('strategy="sample" needs a PRNG key (jax.random.key(seed)).')
        check_key("key", key)
    else:
        key = jax.random.key(0)  # unused by top-k; keeps one compiled signature
    alpha = jnp.asarray(alpha, jnp.asarray(scores).dtype)
    labelled = jnp.asarray(labelled)
    chosen = _query(key, scores, labelled, alpha, batch=batch, strategy=strategy, replace=replace)
    if strategy == "sample" and not replace:
        # on the probabilities as computed: a tiny score (or alpha/|U|) can round to probability 0, and
        # priority sampling then returns such points with weight 0
        # counted as the sampler counts them (float16 probabilities below float16's smallest normal, every
        # point of a 20,000-point pool at alpha = 0.5, are positive in its float32)
        if pool < 0 or not is_concrete(chosen.probs):  # traced (a key under jit or vmap too): checked
            return chosen  # inside _query (checkify, when asked)
        probs = np.asarray(chosen.probs)
        positive = int(np.sum(priority_reachable(probs)[1]))
        if positive < batch:
            raise ValueError(
                f"only {positive} pool points have a positive probability in {probs.dtype}, fewer than "
                f"batch={batch}: sampling without replacement cannot reach the rest (use alpha > 0, or "
                "a larger alpha; scores far below the largest round to probability 0)."
            )
    return chosen


def record(state: ActiveState, chosen: Query) -> ActiveState:
    r"""Add a sampled batch to the labelled set: :math:`m_i \mathrel{+}= b\, w_j`, :math:`S \mathrel{+}= b`.

    Args:
      state: the current :class:`ActiveState`.
      chosen: a :class:`Query` drawn from the pool of ``state.labelled`` (its indices must be unlabelled).

    Returns:
      The new state; :func:`estimator_weights` of it is unbiased for the full loss when every query was
      ``"sample"`` with every pool point of positive probability (always when ``alpha > 0``).

    Raises:
      ValueError: (concrete input) an index out of range or already labelled, e.g. the same query recorded
        twice or one drawn from an older mask; the weights would then count those draws twice.
    """
    if is_concrete(chosen.indices) and is_concrete(state.labelled):
        idx = np.asarray(chosen.indices)
        n = state.labelled.shape[0]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(
                f"chosen.indices must lie in [0, {n}), got values from {idx.min()} to {idx.max()}."
            )
        again = np.unique(idx[np.asarray(state.labelled)[idx]])
        if again.size:
            raise ValueError(
                f"chosen.indices holds {again.size} point(s) already labelled (e.g. {again[:5].tolist()}): "
                "record each query once, drawn from the current state's pool."
            )
    return _record(state, chosen)


@traced.jit
def _record(state: ActiveState, chosen: Query) -> ActiveState:
    b = chosen.indices.shape[0]
    dtype = state.mass.dtype
    mass = state.mass.at[chosen.indices].add(b * chosen.weights.astype(dtype))
    draws = state.draws + b
    labelled = state.labelled.at[chosen.indices].set(True)
    new = labelled & ~state.labelled
    labelled_at = jnp.where(new, draws, state.labelled_at)
    return ActiveState(labelled, mass, labelled_at, draws)


@traced.jit
def estimator_weights(state: ActiveState) -> Array:
    r"""``(n,)`` weights :math:`w_i = (m_i + S - S_{r(i)})/S` on labelled points, 0 elsewhere.

    :math:`\sum_i w_i \ell_i(\theta)` is unbiased for :math:`L(\theta) = \sum_{i=1}^n \ell_i(\theta)` at any
    fixed :math:`\theta` when every round was a ``"sample"`` query that gave every pool point a positive
    probability (always when ``alpha > 0``; a point of probability 0 is never drawn and its loss is
    missing from the estimate: module docstring).
    """
    s = jnp.maximum(state.draws, 1)
    w = (state.mass + state.draws - state.labelled_at) / s
    return jnp.where(state.labelled, w, 0).astype(state.mass.dtype)


# --------------------------------------------------------------------------------------------------
# The loop: seed set -> fit -> score the pool -> query a batch -> refit


@dataclasses.dataclass(frozen=True)
class ActiveConfig:
    """Options of :func:`active_learning` (frozen, hashable).

    Attributes:
      seed_size: points of the seed set, drawn uniformly without replacement (round 0).
      batch: points queried per round after the seed.
      rounds: query rounds after the seed fit (labels at the end: at most ``seed_size + rounds·batch``).
      strategy: ``"sample"`` or ``"topk"`` (:func:`query`).
      alpha: uniform mixing weight of every query (:func:`pool_probabilities`). With ``alpha = 0`` a
        pool point of score 0 can never be drawn, and the weights of ``weighted`` miss its loss
        (:func:`active_learning` warns); ``alpha > 0`` keeps every point reachable.
      replace: sample with replacement (weights ``1/(b p_i)``; a repeated draw is labelled once); only
        with ``strategy="sample"`` (``ValueError`` with ``"topk"``).
      weighted: fit on :func:`estimator_weights` (``True``) or on unit weights. ``"topk"`` always fits
        on unit weights (a deterministic choice has no unbiased weights).
    """

    seed_size: int
    batch: int
    rounds: int
    strategy: str = "sample"
    alpha: float = 0.0
    replace: bool = False
    weighted: bool = True

    def __post_init__(self):
        # stored as Python ints (numpy integers accepted alike: rounds refused np.int64 before)
        object.__setattr__(self, "seed_size", check_positive_int("seed_size", self.seed_size))
        object.__setattr__(self, "batch", check_positive_int("batch", self.batch))
        object.__setattr__(self, "rounds", check_positive_int("rounds", self.rounds, allow_zero=True))
        check_choice("strategy", self.strategy, STRATEGIES)
        # stored as Python scalars: a numpy or 0-d array alpha compares and hashes as a float
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))
        object.__setattr__(self, "replace", check_bool("replace", self.replace))
        object.__setattr__(self, "weighted", check_bool("weighted", self.weighted))
        _check_replace(self.strategy, self.replace)

    @property
    def capacity(self) -> int:
        """Rows handed to ``fit_fn`` every round: the most labels the loop can hold."""
        return self.seed_size + self.rounds * self.batch


class ActiveResult(NamedTuple):
    """Outcome of :func:`active_learning`.

    Attributes:
      params: parameters of the last fit.
      state: the final :class:`ActiveState` (``state.labelled`` marks the labelled points).
      labels: ``(n, ...)`` NumPy labels from the oracle, zeros where unlabelled.
      order: ``(L,)`` NumPy indices in the order they were labelled (each once).
      weights: ``(n,)`` the weights of the last fit (0 on unlabelled points).
      history: parameters after each fit (``rounds + 1`` entries: the seed fit, then one per round).
      num_labels: labels held at each fit (``rounds + 1`` ints).
    """

    params: PyTree
    state: ActiveState
    labels: np.ndarray
    order: np.ndarray
    weights: Array
    history: tuple
    num_labels: tuple


def _new_distinct(indices, labelled) -> np.ndarray:
    """The distinct, not yet labelled entries of ``indices``, in order of first appearance."""
    idx = np.asarray(indices)
    _, first = np.unique(idx, return_index=True)
    idx = idx[np.sort(first)]
    return idx[~np.asarray(labelled)[idx]]


def _ask(oracle, new: np.ndarray, labels: np.ndarray | None, n: int) -> np.ndarray:
    """Call the oracle on ``new`` once; check and store its answers in ``labels`` (allocated on first use,
    widened when an answer's dtype does not fit: integer labels, then a fractional one)."""
    answer = np.asarray(oracle(new.copy()))
    if answer.ndim == 0 or answer.shape[0] != new.shape[0]:
        raise ValueError(f"oracle returned shape {answer.shape} for {new.shape[0]} indices.")
    if not any(np.issubdtype(answer.dtype, kind) for kind in (np.bool_, np.integer, np.floating)):
        raise TypeError(f"oracle must return real labels (ints, floats or bools), got dtype {answer.dtype}.")
    if not np.all(np.isfinite(answer)):
        raise ValueError("oracle returned non-finite labels.")
    if labels is None:
        labels = np.zeros((n,) + answer.shape[1:], answer.dtype)
    elif answer.shape[1:] != labels.shape[1:]:
        raise ValueError(f"oracle label shape changed from {labels.shape[1:]} to {answer.shape[1:]}.")
    elif not np.can_cast(answer.dtype, labels.dtype):  # ints first, then 0.5: keep 0.5, not 0
        labels = labels.astype(np.result_type(labels.dtype, answer.dtype))
    labels[new] = answer
    return labels


def _warn_unreachable(probs, labelled, r: int) -> None:
    """Warn when pool points of round ``r`` have probability 0 (as the sampler counts them): the
    estimator's weights then miss their loss."""
    pool = ~np.asarray(labelled)
    zero = int(np.sum(pool & ~np.asarray(priority_reachable(np.asarray(probs))[1])))
    if zero:
        warnings.warn(
            f"round {r}: {zero} of the {int(np.sum(pool))} pool points have probability 0 (a score of 0 "
            "with alpha=0, or one that rounds to 0 beside the largest) and can never be drawn: the "
            "estimator weights are unbiased only for the loss of the other points. Use alpha > 0 "
            "(e.g. ActiveConfig(alpha=0.1)) to keep every point reachable.",
            UserWarning,
            stacklevel=4,  # the caller of active_learning (through traced.entry's wrapper)
        )


def _pool_scores(scores_fn, params, xs, n: int) -> Array:
    """``scores_fn(params, xs)``, refused (naming ``scores_fn``) unless one score per point, ``(n,)``."""
    scores = as_probs_vector(scores_fn(params, xs), "scores_fn(params, xs)")
    if jnp.shape(scores) != (n,):
        raise ValueError(
            f"scores_fn must return one score per point of xs: expected shape ({n},), got shape "
            f"{jnp.shape(scores)}."
        )
    return scores


def _fit_round(fit_fn, params, xs, labels, weights, order, capacity):
    """``fit_fn`` on the labelled rows, padded to ``capacity`` rows of weight 0 (one shape every round)."""
    rows = np.zeros((capacity,), np.int64)
    rows[: order.size] = order
    w = jnp.where(jnp.arange(capacity) < order.size, jnp.asarray(weights)[rows], 0)
    fitted = fit_fn(params, xs[rows], jnp.asarray(labels[rows]), w)
    # the leaves' shapes, not the tree structure: a Flax fit may turn a dict into a FrozenDict
    want, got = (tuple(jnp.shape(leaf) for leaf in jax.tree.leaves(t)) for t in (params, fitted))
    if want != got:  # e.g. the FitResult itself: it failed one round later, as an apply_fn error
        hint = ": return its .params" if hasattr(fitted, "params") else ""
        raise ValueError(
            f"fit_fn must return the fitted params, with leaves of the shapes of params {want}; got a "
            f"{type(fitted).__name__} with leaves of shapes {got}{hint}."
        )
    return fitted


@traced.entry
def active_learning(
    key: PRNGKey,
    params: PyTree,
    xs: Array,
    oracle: Callable[[np.ndarray], Any],
    *,
    fit_fn: Callable[[PyTree, Array, Array, Array], PyTree],
    scores_fn: Callable[[PyTree, Array], Array],
    config: ActiveConfig,
) -> ActiveResult:
    r"""Pool-based active learning: seed set → fit → score the pool → query a batch → refit.

    Round 0 labels ``config.seed_size`` points drawn uniformly without replacement; then each of
    ``config.rounds`` rounds scores every point at the current parameters, queries ``config.batch`` pool
    points (:func:`query`), asks ``oracle`` for their labels and refits (warm-started). No point is
    labelled twice.

    .. code-block:: python

        tx = optax.sgd(0.1)
        fit_fn = lambda p, x, y, w: nj.fit(apply_fn, p, x, y, w, optimizer=tx, num_steps=300).params
        scores_fn = lambda p, x: nj.label_free_leverage_scores(apply_fn, p, x)
        result = nj.active_learning(key, params0, xs, oracle, fit_fn=fit_fn, scores_fn=scores_fn,
                                    config=nj.ActiveConfig(seed_size=20, batch=20, rounds=5, alpha=0.1))

    Args:
      key: PRNG key (split once per round).
      params: initial parameters (pytree).
      xs: ``(n, ...)`` inputs of the whole pool.
      oracle: ``oracle(indices) -> labels``; called once per round with the NEW distinct indices (a NumPy
        int array), returns an array with one label per index (leading axis ``len(indices)``).
      fit_fn: ``fit_fn(params, xs_l, ys_l, weights_l) -> params``, given ``config.capacity`` rows every
        round (the labelled rows, then padding rows with weight 0), so a jitted fit compiles once.
      scores_fn: ``scores_fn(params, xs) -> (n,)`` non-negative scores, e.g. response-free leverage
        (:func:`label_free_leverage_scores`); only the pool's entries are used.
      config: :class:`ActiveConfig`.

    Returns:
      :class:`ActiveResult`.

    Warns:
      UserWarning: (``strategy="sample"``, ``weighted``) a round in which pool points had probability 0
        (scores of 0 with ``alpha = 0``): they can never be drawn, and the weights are unbiased only for
        the loss of the other points. Mix with uniform (``alpha > 0``).
    """
    if not isinstance(config, ActiveConfig):
        raise TypeError(f"config must be an ActiveConfig, got {type(config).__name__}.")
    check_key("key", key)
    for name, fn in (("oracle", oracle), ("fit_fn", fit_fn), ("scores_fn", scores_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {fn!r}.")
    if not hasattr(xs, "shape"):  # a pytree of arrays: the loop indexes xs[rows]
        raise TypeError(f"xs must be one array of pool points (examples first), got {type(xs).__name__}.")
    n = int(jnp.shape(xs)[0]) if jnp.ndim(xs) else 0
    if n < config.capacity:
        need = config.capacity
        raise ValueError(f"the pool has n={n} points, fewer than seed_size + rounds·batch = {need}.")
    x_dtype = jnp.result_type(xs)
    dtype = x_dtype if jnp.issubdtype(x_dtype, jnp.floating) else None
    state = init_state(n, dtype)
    keys = jax.random.split(key, config.rounds + 1)
    uniform = jnp.ones((n,), state.mass.dtype)
    chosen = query(keys[0], uniform, state.labelled, config.seed_size, replace=config.replace)
    labels, order, history, counts = None, np.zeros((0,), np.int64), [], []
    for r in range(config.rounds + 1):
        if r > 0:
            scores = _pool_scores(scores_fn, params, xs, n)
            chosen = query(keys[r], scores, state.labelled, config.batch, strategy=config.strategy,
                           alpha=config.alpha, replace=config.replace)  # fmt: skip
            if config.weighted and config.strategy == "sample":
                _warn_unreachable(chosen.probs, state.labelled, r)
        new = _new_distinct(chosen.indices, state.labelled)
        labels = _ask(oracle, new, labels, n)
        order = np.concatenate([order, new])
        state = record(state, chosen)
        unbiased = config.weighted and config.strategy == "sample"
        weights = estimator_weights(state) if unbiased else state.labelled.astype(state.mass.dtype)
        params = _fit_round(fit_fn, params, xs, labels, weights, order, config.capacity)
        history.append(params)
        counts.append(int(order.size))
    return ActiveResult(params, state, labels, order, weights, tuple(history), tuple(counts))


__all__ = [
    "ActiveConfig",
    "ActiveResult",
    "ActiveState",
    "Query",
    "STRATEGIES",
    "active_learning",
    "estimator_weights",
    "init_state",
    "label_free_leverage_scores",
    "pool_probabilities",
    "query",
    "record",
]
