"""Property-based tests (hypothesis) over random small models, shapes, dtypes and scales (issue 7).

- The identity ``<f*(θ), θ> + f(0) = f(θ)`` holds at default settings (adaptive quadrature) to ``1e-10``
  (float64) / ``1e-5`` (float32) for every activation (tanh, sigmoid, softplus, sin, bounded Swish,
  GELU, ReLU with biases), ``k`` outputs and ``n`` from 1 to ``3p``, with inputs scaled by ``10^a``
  and outputs by ``10^b`` (``a, b`` in ``[-30, 30]``); see :func:`test_identity_at_default_settings`
  for what the scales mean.
- Probabilities are always valid: finite, non-negative, summing to one (leverage and norm scores),
  for ``n`` from 1 to ``3p`` (fewer rows than columns included), ``k`` outputs, float32/float64 and the
  dual matrix scaled by ``10^e``, ``e`` in ``[-30, 30]``.
- Leverage is exactly invariant under power-of-two column scalings (``2^j``, ``|j| ≤ 100``): the
  routes prescale every column by a power of two, so the scaled matrix is bit-identical after it.
- Malformed input is always a clear ``ValueError``/``TypeError`` naming the argument, raised before any
  computation (the model is never called with values).
- Nothing a user passes is modified.
- Sampling: indices in range and of positive probability, weights ``1/(s p_i)``, the same key gives the
  same draw; priority sampling draws distinct rows with weights ``≥ 1`` (exactly 1 when it keeps every row).
- Leverage equals the SVD's ``‖U_i‖²`` and sums to the rank on low-rank matrices scaled by ``10^e``
  (``|e| ≤ 100``), and is equivariant under row permutations and invariant under column permutations.
- The dual matrix of a linear model is ``[X | −y]`` for every quadrature rule; projections land in their
  set, are idempotent and non-expansive; Gauss–Legendre with ``q`` nodes integrates degree ``2q − 1``
  exactly; streamed scores equal the in-memory ones for every chunk size.

Pinned (``derandomize=True``) so that CI never flakes; example counts keep the file to a few seconds of
compilation per test.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nlis_jax as nj  # noqa: E402
from nlis_jax.quadrature import gauss_legendre  # noqa: E402

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "sin": jnp.sin,
    "bounded_swish": nj.bounded_swish,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
}


def _make_apply(act, k):
    # module-level cache: one apply_fn object per (activation, k), so compilations are reused
    def apply_fn(params, x):
        out = ACTIVATIONS[act](x @ params["W"] + params["b"]) @ params["V"]
        return out if k > 1 else out[0]

    return apply_fn


APPLY = {(a, k): _make_apply(a, k) for a in ACTIVATIONS for k in (1, 2)}


@st.composite
def models(draw):
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    k = draw(st.sampled_from((1, 2)))
    d, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from((np.float32, np.float64)))
    p = d * h + h + h * k
    n = draw(st.integers(1, 3 * p))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    params = {
        "W": rng.normal(size=(d, h)).astype(dtype),
        "b": rng.normal(size=h).astype(dtype),
        "V": rng.normal(size=(h, k)).astype(dtype),
    }
    xs = (rng.normal(size=(n, d)) * 10.0 ** draw(st.integers(-2, 2))).astype(dtype)
    ys = rng.normal(size=(n, k) if k > 1 else (n,)).astype(dtype)
    return APPLY[(act, k)], params, xs, ys


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@st.composite
def scaled_models(draw):
    """A random small model whose inputs are scaled by ``10^a`` and outputs by ``10^b``.

    The first-layer weights are divided by ``10^a`` (the pre-activations ``xW + b`` keep their O(1)
    size) and the output layer multiplied by ``10^b``: the model is the unscaled one up to rounding and
    ``10^b``, while its parameters, inputs and adjoint columns span up to 60 decades. Scaling the inputs
    alone would move the pre-activations to ``10^30``, where a saturating activation is constant and
    ``sin`` oscillates ``10^30`` times along the path: no quadrature can resolve that, and the identity
    would only test rounding. In float32 ``|a + b| <= 30`` keeps the gradients ``x·V`` finite.
    """
    apply_fn, params, xs, _ = draw(models())
    dtype = xs.dtype.type
    b = draw(st.integers(-30, 30))
    a = draw(st.integers(-30, 30) if dtype == np.float64 else st.integers(max(-30, -30 - b), min(30, 30 - b)))
    params = {
        "W": (params["W"].astype(np.float64) / 10.0**a).astype(dtype),
        "b": params["b"],
        "V": (params["V"].astype(np.float64) * 10.0**b).astype(dtype),
    }
    return apply_fn, params, (xs.astype(np.float64) * 10.0**a).astype(dtype)


@settings(derandomize=True, max_examples=12, deadline=None)
@given(scaled_models())
def test_identity_at_default_settings(model):
    # The adjoint of the given (rounded) parameters and inputs, checked against f(θ) − f(0) of the SAME
    # numbers evaluated in float64: only the adjoint's error is measured. Normwise over the examples and
    # outputs, relative to the largest of |f(θ)|, |f(0)| and the size Σ_j |f*_j θ_j| of the identity's
    # terms: where the terms cancel (f(θ) ≈ f(0) ≈ 0 while xW ≈ −b), rounding the EXACT adjoint to the
    # working precision already leaves a gap of ~eps·Σ_j |f*_j θ_j|, which is no quadrature error.
    #
    # float32 may warn: where tanh saturates (|xW + b| ≳ 5), JAX's derivative 1 − tanh² carries an
    # absolute rounding error of ~eps, so the integrand of the W-columns, x·V·(1 − tanh²), has noise of
    # ~eps·|x·V| that can exceed rtol = 1e-6 of ‖f*‖: the estimate then cannot certify the tolerance and
    # says so (a QuadratureWarning), while the identity still holds to 1e-5. float64 never warns here.
    apply_fn, params, xs = model
    dtype = xs.dtype
    with warnings.catch_warnings():
        action = "error" if dtype == np.float64 else "ignore"
        warnings.simplefilter(action, nj.QuadratureWarning)
        adj = np.asarray(nj.adjoint(apply_fn, params, xs), np.float64)  # (n, p) or (n, k, p)
    assert adj.dtype == np.float64 and np.all(np.isfinite(adj))
    theta = np.concatenate([np.ravel(_f64(params)[name]) for name in sorted(params)])  # ravel_pytree order
    p64, x64 = _f64(params), np.asarray(xs, np.float64)
    with jax.enable_x64(True):
        f_theta = np.asarray(jax.vmap(apply_fn, in_axes=(None, 0))(p64, x64))
        zeros = jax.tree.map(np.zeros_like, p64)
        f_zero = np.asarray(jax.vmap(apply_fn, in_axes=(None, 0))(zeros, x64))
    gap = np.abs(adj @ theta + f_zero - f_theta)
    terms = np.abs(adj) @ np.abs(theta)
    scale = max(np.max(np.abs(f_theta)), np.max(np.abs(f_zero)), np.max(terms))
    tol = 1e-10 if dtype == np.float64 else 1e-5
    assert np.max(gap) <= tol * scale, (np.max(gap) / scale, xs.shape, dtype)


def _assert_probabilities(probs, n, dtype):
    probs = np.asarray(probs)
    assert probs.shape == (n,) and probs.dtype == dtype
    assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
    atol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(np.sum(probs, dtype=np.float64), 1.0, atol=atol)


@settings(derandomize=True, max_examples=6, deadline=None)
@given(models(), st.integers(-30, 30))
def test_probabilities_always_valid_and_inputs_untouched(model, exponent):
    apply_fn, params, xs, ys = model
    copies = [np.copy(a) for a in (params["W"], params["b"], params["V"], xs, ys)]
    F = np.asarray(nj.dual_matrix(apply_fn, params, xs, ys))
    if not np.any(F):
        return  # an all-zero dual matrix is a clear error, tested elsewhere
    dtype, n = xs.dtype, xs.shape[0]
    scaled = (F.astype(np.float64) * 10.0**exponent).astype(dtype)
    if not np.any(scaled):  # underflowed to zero in float32 (10^-30 of a small matrix)
        scaled = F
    _assert_probabilities(nj.leverage_scores(scaled), n, dtype)
    _assert_probabilities(nj.norm_scores(scaled), n, dtype)
    for a, b in zip((params["W"], params["b"], params["V"], xs, ys), copies, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(derandomize=True, max_examples=8, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 6),
    st.sampled_from((np.float32, np.float64)),
    st.integers(0, 2**16),
    st.data(),
)
def test_leverage_invariant_under_power_of_two_column_scaling(n, m, dtype, seed, data):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(n, m)).astype(dtype)
    limit = 100 if dtype == np.float64 else 60  # keep every entry a normal number
    j = np.asarray(data.draw(st.lists(st.integers(-limit, limit), min_size=m, max_size=m)))
    G = np.ldexp(F, j[None, :]).astype(dtype)
    F_copy = F.copy()
    ref, got = nj.leverage_scores(F, return_info=True), nj.leverage_scores(G, return_info=True)
    assert int(got.rank) == int(ref.rank) <= min(n, m)
    np.testing.assert_array_equal(np.asarray(got.probs), np.asarray(ref.probs))
    _assert_probabilities(got.probs, n, dtype)
    np.testing.assert_array_equal(F, F_copy)


def _counting(apply_fn, calls):
    def wrapped(params, x):
        if not isinstance(x, jax.core.Tracer):
            calls.append(1)  # the model ran on values: work started
        return apply_fn(params, x)

    return wrapped


MALFORMED = st.sampled_from(
    [
        ("nan_xs", ValueError, "xs contains"),
        ("inf_params", ValueError, r"params\['W'\] contains"),  # the leaf, by its path
        ("ys_shape", ValueError, "ys has shape"),
        ("empty_xs", ValueError, "no examples"),
        ("list_xs", TypeError, "Python list"),
        ("scalar_xs", ValueError, "at least 1 axis"),
        ("int_params", TypeError, r"params\['b'\] must hold floating"),
        ("nan_ys", ValueError, "ys contains"),
    ]
)


@settings(derandomize=True, max_examples=24, deadline=None)
@given(models(), MALFORMED, st.sampled_from(("dual_matrix", "adjoint", "streaming", "fit")))
def test_malformed_input_is_a_clear_error_before_any_work(model, case, entry):
    apply_fn, params, xs, ys = model
    kind, error, match = case
    params, xs, ys = dict(params), xs.copy(), ys.copy()
    if kind == "nan_xs":
        xs[0, 0] = np.nan
    elif kind == "inf_params":
        params["W"] = params["W"].copy()
        params["W"][0, 0] = np.inf
    elif kind == "ys_shape":
        ys = ys[:-1] if ys.shape[0] > 1 else np.concatenate([ys, ys])
    elif kind == "empty_xs":
        xs, ys = xs[:0], ys[:0]
    elif kind == "list_xs":
        xs = xs.tolist()
    elif kind == "scalar_xs":
        xs = xs.dtype.type(1.0)
    elif kind == "int_params":
        params["b"] = np.arange(params["b"].shape[0])
    elif kind == "nan_ys":
        ys[0] = np.nan
    if entry in ("adjoint",) and kind in ("ys_shape", "nan_ys"):
        return  # adjoint takes no ys
    if entry == "fit" and kind in ("list_xs", "scalar_xs") or entry == "fit" and kind == "ys_shape":
        return  # fit's own shape messages differ (tested in test_train.py)
    calls = []
    fn = _counting(apply_fn, calls)
    with pytest.raises(error, match=match):
        if entry == "dual_matrix":
            nj.dual_matrix(fn, params, xs, ys)
        elif entry == "adjoint":
            nj.adjoint(fn, params, xs)
        elif entry == "streaming":
            nj.streaming_leverage_scores(fn, params, xs, ys, chunk_size=4)
        else:
            import optax

            nj.fit(fn, params, xs, ys, optimizer=optax.sgd(0.1), num_steps=1)
    assert not calls


# Thirty-fifth session: laws of sampling, leverage, duals, projections, quadrature and streaming


@st.composite
def prob_vectors(draw):
    """A probability vector with some exact zeros, float32 or float64, n from 1 to 10."""
    n = draw(st.integers(1, 10))
    raw = np.asarray(draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=n, max_size=n)))
    if not raw.any():
        raw[draw(st.integers(0, n - 1))] = 1.0
    return (raw / raw.sum()).astype(draw(st.sampled_from((np.float32, np.float64))))


@settings(derandomize=True, max_examples=12, deadline=None)
@given(prob_vectors(), st.integers(1, 30), st.integers(0, 2**31 - 1), st.data())
def test_sample_laws(p, s, seed, data):
    # With replacement: indices in range and of positive probability, weights 1/(s·p_i) (the weights are
    # computed from the normalised vector, so rtol is a few float32 roundings), same key -> same draw.
    key = jax.random.key(seed)
    idx, w = (np.asarray(a) for a in nj.sample(key, p, s))
    assert idx.shape == w.shape == (s,) and idx.dtype == np.int32 and w.dtype == p.dtype
    assert np.all((idx >= 0) & (idx < p.size)) and np.all(p[idx] > 0)
    np.testing.assert_allclose(w, 1.0 / (s * p.astype(np.float64)[idx]), rtol=1e-5)
    again = nj.sample(key, p, s)
    np.testing.assert_array_equal(np.asarray(again[0]), idx)
    np.testing.assert_array_equal(np.asarray(again[1]), w)
    # Without replacement (priority sampling): distinct rows of positive probability, weights >= 1, and
    # with every positive row kept the threshold is 0, so every weight is exactly 1.
    pos = int(np.count_nonzero(p))
    k = data.draw(st.integers(1, pos))
    idx, w = (np.asarray(a) for a in nj.sample(key, p, k, replace=False))
    assert len(set(idx.tolist())) == k and np.all(p[idx] > 0) and np.all(w >= 1)
    if k == pos:
        np.testing.assert_array_equal(w, np.ones(k, p.dtype))


@st.composite
def low_rank_matrices(draw):
    """(n, m) float64 with rank <= r, sometimes a zero column, scaled by 10^e."""
    n, m = draw(st.integers(1, 9)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    r = draw(st.integers(1, m))
    F = rng.normal(size=(n, r)) @ rng.normal(size=(r, m))
    if draw(st.booleans()):
        F[:, draw(st.integers(0, m - 1))] = 0.0
    return F * 10.0 ** draw(st.integers(-100, 100)), rng


@settings(derandomize=True, max_examples=12, deadline=None)
@given(low_rank_matrices())
def test_leverage_matches_svd_and_is_permutation_equivariant(case):
    # h_i = ‖U_i‖² of the SVD's leading r left vectors, summing to r; permuting rows permutes the scores
    # and permuting columns leaves them alone. Random low-rank factors keep κ below ~1e3 on range(F), so
    # the routes agree with the SVD to ~1e3·eps; 1e-9 leaves a wide margin.
    F, rng = case
    if not F.any():
        return
    info = nj.leverage_scores(F, return_info=True)
    U, sv, _ = np.linalg.svd(F, full_matrices=False)
    r = int(np.sum(sv > sv[0] * 1e-10))
    assert int(info.rank) == r
    np.testing.assert_allclose(np.asarray(info.leverage), np.sum(U[:, :r] ** 2, axis=1), atol=1e-9)
    np.testing.assert_allclose(np.sum(np.asarray(info.leverage)), r, rtol=1e-9)
    rows, cols = rng.permutation(F.shape[0]), rng.permutation(F.shape[1])
    permuted = np.asarray(nj.leverage_scores(F[rows][:, cols]))
    np.testing.assert_allclose(permuted, np.asarray(info.probs)[rows], atol=1e-10)


@settings(derandomize=True, max_examples=6, deadline=None)
@given(st.integers(1, 8), st.integers(1, 3), st.integers(0, 2**16), st.sampled_from((None, 1, 2)))
def test_dual_matrix_of_a_linear_model_is_its_design_matrix(n, d, seed, num_nodes):
    # f(θ; x) = <θ, x> has ∇f = x on the whole path, so F* = X exactly for any rule and f(0) − y = −y;
    # its leverage is the linear baseline's, and F̃·[θ; 1] is the residual.
    rng = np.random.default_rng(seed)
    X, theta, y = rng.normal(size=(n, d)), rng.normal(size=d), rng.normal(size=n)
    F = np.asarray(nj.dual_matrix(lambda t, x: x @ t, theta, X, y, num_nodes=num_nodes))
    np.testing.assert_allclose(F, np.c_[X, -y], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(F @ np.r_[theta, 1.0], X @ theta - y, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(
        np.asarray(nj.leverage_scores(F)), np.asarray(nj.linear_leverage_scores(X, y)), atol=1e-12
    )


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


@settings(derandomize=True, max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=4),
    st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=4),
    st.sampled_from((np.float32, np.float64)),
    st.floats(1e-2, 1e2),
    st.floats(-10, 10),  # subnormal bounds included: they clip to ±tiny (a CPU flushes them)
)
def test_projections_land_in_the_set_idempotent_and_non_expansive(a, b, dtype, radius, lower):
    # l2_ball lands on the sphere to a couple of roundings (documented: up to ~1.4e-7 above r in float32);
    # box rounds its bounds inwards, so its result lies inside exactly and a second call changes nothing.
    t1 = {"w": jnp.asarray(a, dtype)}
    t2 = {"w": jnp.asarray((b * len(a))[: len(a)], dtype)}
    eps = float(np.finfo(dtype).eps)
    ball, box = nj.l2_ball(radius), nj.box(lower, lower + radius)
    for proj in (ball, box):
        out = proj(t1)
        assert out["w"].dtype == t1["w"].dtype and out["w"].shape == t1["w"].shape
        np.testing.assert_allclose(_flat(proj(out)), _flat(out), rtol=4 * eps, atol=4 * eps * radius)
        d0, d1 = np.linalg.norm(_flat(t1) - _flat(t2)), np.linalg.norm(_flat(out) - _flat(proj(t2)))
        assert d1 <= d0 * (1 + 8 * eps) + 8 * eps * radius
    assert np.linalg.norm(_flat(ball(t1))) <= radius * (1 + 4 * eps)
    inside = _flat(box(t1))
    assert np.all(inside >= lower) and np.all(inside <= lower + radius)
    np.testing.assert_array_equal(_flat(box(box(t1))), inside)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(st.integers(1, 100), st.data())
def test_gauss_legendre_is_exact_on_polynomials_of_degree_2q_minus_1(q, data):
    # ∫_0^1 t^k dt = 1/(k+1) for k ≤ 2q − 1; nodes in (0, 1), positive weights summing to 1. The rule
    # comes from numpy's eigenproblem in float64: errors ~q·eps, so 1e-13 holds to q = 100.
    k = data.draw(st.integers(0, 2 * q - 1))
    t, w = (np.asarray(a) for a in gauss_legendre(q, jnp.float64))
    assert np.all((t > 0) & (t < 1)) and np.all(w > 0) and abs(w.sum() - 1) < 1e-13
    assert abs(np.sum(w * t**k) - 1 / (k + 1)) < 1e-13


def _tanh_index(theta, x):
    return jnp.tanh(x @ theta)


@settings(derandomize=True, max_examples=6, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from((1, 2, 8)))
def test_streaming_scores_equal_in_memory_for_every_chunk_size(seed, chunk):
    # Chunks of 1, 2 (the last one ragged) and more than n give the in-memory scores:
    # the same rule, the same Gram matrix up to summation order (float64: 1e-9 on leverage).
    rng = np.random.default_rng(seed)
    n = 5  # one shape: each chunk size compiles once (n itself varies in test_streaming.py)
    X, theta, y = rng.normal(size=(n, 2)), rng.normal(size=2), rng.normal(size=n)
    F = nj.dual_matrix(_tanh_index, theta, X, y, num_nodes=8)
    ref_lev, ref_norm = np.asarray(nj.leverage_scores(F)), np.asarray(nj.norm_scores(F))
    xs, ys = jnp.asarray(X), jnp.asarray(y)  # device arrays (host data: the same check with X, y)
    kw = dict(chunk_size=chunk, num_nodes=8)
    lev = np.asarray(nj.streaming_leverage_scores(_tanh_index, theta, xs, ys, **kw))
    np.testing.assert_allclose(lev, ref_lev, atol=1e-9)
    norm = np.asarray(nj.streaming_norm_scores(_tanh_index, theta, xs, ys, **kw))
    np.testing.assert_allclose(norm, ref_norm, rtol=1e-12, atol=1e-15)
