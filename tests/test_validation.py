"""Bad inputs raise clear exceptions naming the problem; inputs are never modified."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlis_jax as nj

N, D = 12, 3


def apply_fn(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


def _inputs():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(D), "b": np.asarray(0.3)}
    return params, rng.standard_normal((N, D)), rng.standard_normal(N)


def _with_bad(value, where):
    params, xs, ys = _inputs()
    if where == "params":
        params["w"][1] = value
    elif where == "xs":
        xs[2, 1] = value
    else:
        ys[5] = value
    return params, xs, ys


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["params", "xs", "ys"])
def test_non_finite_inputs(value, where):
    params, xs, ys = _with_bad(value, where)
    label = "params['w']" if where == "params" else where  # the leaf of params, by its path
    match = re.escape(label) + " contains 1 NaN or Inf"
    with pytest.raises(ValueError, match=match):
        nj.dual_matrix(apply_fn, params, xs, ys)
    with pytest.raises(ValueError, match=match):
        nj.dual_operator(apply_fn, params, xs, ys)
    if where != "ys":
        with pytest.raises(ValueError, match=match):
            nj.adjoint(apply_fn, params, xs)


def _norm_scores_closed_over(F):
    """``norm_scores`` of ``F`` held as a constant of a jitted function (not its argument)."""
    return jax.jit(lambda: nj.norm_scores(F))()


def test_non_finite_matrices_and_probs():
    F = np.random.default_rng(1).standard_normal((N, 4))
    F[3, 2] = np.nan
    for fn in (nj.leverage_scores, nj.norm_scores, nj.orthonormal_basis):
        with pytest.raises(ValueError, match=r"F contains 1 NaN or Inf"):
            fn(F)
    # norm_scores names them from its total (no pass of its own over F): Inf of either sign, blocks,
    # device arrays and half precision too
    for bad in (np.inf, -np.inf):
        G = F.copy()
        G[3, 2] = bad
        for given in (G, jnp.asarray(G), G.reshape(N // 2, 2, 4), G.astype(np.float16)):
            with pytest.raises(ValueError, match=r"F contains 1 NaN or Inf"):
                nj.norm_scores(given)
        # a concrete F closed over by a user's jit: checked as it is traced (not NaN scores)
        for held in (jnp.asarray(G), G):  # a numpy F too: its jnp.asarray under the jit is traced
            with pytest.raises(ValueError, match=r"F contains 1 NaN or Inf"):
                _norm_scores_closed_over(held)
    with pytest.raises(ValueError, match=r"theta contains 1 NaN or Inf"):
        nj.single_index_adjoint(jnp.tanh, np.array([1.0, np.inf, 0.0, 1.0]), np.ones((N, 4)))
    with pytest.raises(ValueError, match=r"xs contains 1 NaN or Inf"):
        nj.single_index_adjoint(jnp.tanh, np.ones(4), F)


def test_shape_mismatches():
    params, xs, ys = _inputs()
    with pytest.raises(
        ValueError, match=r"ys has shape \(11,\) but the model gives outputs of shape \(12,\)"
    ):
        nj.dual_matrix(apply_fn, params, xs, ys[:-1])
    with pytest.raises(
        ValueError, match=r"ys has shape \(12, 1\) but the model gives outputs of shape \(12,\)"
    ):
        nj.dual_matrix(apply_fn, params, xs, ys[:, None])
    with pytest.raises(ValueError, match=r"ys has shape \(12, 1\)"):
        nj.dual_operator(apply_fn, params, xs, ys[:, None])
    with pytest.raises(ValueError, match=r"xs has 12 examples but another leaf of xs has 11"):
        nj.adjoint(lambda p, x: apply_fn(p, x["a"]) * x["b"], params, {"a": xs, "b": ys[:-1]})
    # was "theta (d) has 3 examples but xs columns has 4": they are weights and features
    with pytest.raises(ValueError, match=r"theta has 3 weights but xs has 4 columns \(features\)"):
        nj.single_index_adjoint(jnp.tanh, np.ones(3), np.ones((N, 4)))
    # a pytree theta failed inside numpy ("entry not a 2- or 3- tuple")
    for theta in ({"w": np.ones(3)}, [np.ones(3), np.ones(2)]):
        with pytest.raises(
            TypeError,
            match=r"theta must be one array of shape \(d,\), got a (dict|list that is not one array).*; "
            r"for a pytree of parameters use nj\.adjoint",
        ):
            nj.single_index_adjoint(jnp.tanh, theta, np.ones((N, 3)))
    with pytest.raises(TypeError, match=r"xs must be one array of shape \(n, d\) .*got a dict"):
        nj.single_index_adjoint(jnp.tanh, np.ones(3), {"a": np.ones((N, 3))})
    # one array given as a list: of numbers (theta), of rows or of jax rows (xs), as before the check
    X, th = np.random.default_rng(3).normal(size=(N, 3)), np.array([0.1, 0.2, 0.3])
    want = nj.single_index_adjoint(jnp.tanh, th, X)
    for theta, rows in (([0.1, 0.2, 0.3], X), (th, list(X)), (th, tuple(jnp.asarray(X)))):
        np.testing.assert_allclose(nj.single_index_adjoint(jnp.tanh, theta, rows), want, rtol=0)
    traced_rows = jax.jit(lambda a: nj.single_index_adjoint(jnp.tanh, th, list(a)))  # rows as tracers
    np.testing.assert_allclose(traced_rows(jnp.asarray(X)), want, rtol=1e-15)
    with pytest.raises(ValueError, match=r"theta must be a vector of shape \(d,\)"):
        nj.single_index_adjoint(jnp.tanh, np.ones((3, 1)), np.ones((N, 3)))
    with pytest.raises(ValueError, match=r"ys must have shape \(12,\) to match xs"):
        nj.linear_leverage_scores(xs, ys[:-1])
    # a pytree of inputs (as a model takes them) read as "xs must have shape (n, d, ...), got ()"
    for tree in ({"a": xs, "b": ys}, [xs[:, :2, None], xs[:, 2:, None]]):
        with pytest.raises(
            TypeError, match=r"xs must be one array of shape \(n, d, \.\.\.\), got a (dict|list)"
        ):
            nj.linear_norm_scores(tree)
    rows = [list(map(float, row)) for row in np.asarray(xs)]  # a list of rows is one array
    np.testing.assert_allclose(nj.linear_leverage_scores(rows), nj.linear_leverage_scores(xs), rtol=1e-13)
    per_example = list(np.asarray(xs).reshape(N, -1, 1))  # a list of (d, 1) inputs: (n, d, 1) flattened
    np.testing.assert_allclose(
        nj.linear_leverage_scores(per_example), nj.linear_leverage_scores(xs), rtol=1e-13
    )
    with pytest.raises(ValueError, match=r"F must be a matrix \(n, m\) or a block matrix"):
        nj.leverage_scores(ys)
    with pytest.raises(ValueError, match=r"xs has no examples"):
        nj.adjoint(apply_fn, params, xs[:0])


def test_apply_fn_returning_a_matrix():
    params, xs, _ = _inputs()
    with pytest.raises(ValueError, match=r"must return a scalar or a vector of k outputs for ONE example"):
        nj.adjoint(lambda p, x: jnp.outer(x, x) * p["b"], params, xs)
    with pytest.raises(ValueError, match=r"must return a scalar or a vector"):
        nj.dual_matrix(lambda p, x: jnp.outer(x, x) * p["b"], params, xs)
    with pytest.raises(TypeError, match=r"apply_fn must be callable"):
        nj.adjoint("not a function", params, xs)
    with pytest.raises(TypeError, match=r"params\['w'\] must hold floating-point arrays, got dtype int32"):
        nj.adjoint(apply_fn, {"w": np.ones(D, np.int32), "b": np.asarray(0.0)}, xs)


def test_a_bad_leaf_of_params_is_named_by_its_path():
    """An integer or NaN leaf deep in params was reported as "params must hold floating-point arrays":
    in a model of many layers the user had to search for it. The message names the leaf's path; a single
    array keeps the argument's name alone."""
    xs = np.ones((4, 3))

    def model(p, x):
        return jnp.tanh(x @ p["layers"][0]["w"]) * p["layers"][1]["scale"] + p["bias"]

    good = {"layers": [{"w": np.ones(3)}, {"scale": np.asarray(2.0)}], "bias": np.asarray(0.5)}
    integer = {**good, "layers": [{"w": np.ones(3)}, {"scale": np.asarray(2, np.int32)}]}
    with pytest.raises(TypeError, match=r"^params\['layers'\]\[1\]\['scale'\] must hold floating-point"):
        nj.adjoint(model, integer, xs)
    nan = {**good, "layers": [{"w": np.array([1.0, np.nan, 1.0])}, {"scale": np.asarray(2.0)}]}
    with pytest.raises(ValueError, match=r"^params\['layers'\]\[0\]\['w'\] contains 1 NaN or Inf"):
        nj.dual_matrix(model, nan, xs)
    with pytest.raises(TypeError, match=r"^params must hold floating-point arrays, got dtype int32"):
        nj.adjoint(lambda p, x: x @ p, np.ones(3, np.int32), xs)


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        (np.array([0.5, -0.1, 0.6]), r"probs has 1 negative entries"),
        (np.array([0.5, 0.4, 0.05]), r"probs must sum to 1, got sum 0.95"),
        (np.array([0.5, np.nan, 0.5]), r"probs contains NaN or Inf"),
        (np.array([[0.5, 0.5]]), r"probs must be a 1-D probability vector, got shape \(1, 2\)"),
        (np.array([]), r"probs must be a 1-D probability vector|probs is empty"),
    ],
)
def test_bad_probs(probs, match):
    with pytest.raises(ValueError, match=match):
        nj.sample(jax.random.key(0), probs, 2)
    with pytest.raises(ValueError, match=match):
        nj.mix_with_uniform(probs, 0.1)


@pytest.mark.parametrize(
    ("num_samples", "error", "match"),
    [
        (0, ValueError, r"num_samples must be a positive integer, got 0"),
        (-3, ValueError, r"num_samples must be a positive integer, got -3"),
        (2.0, TypeError, r"num_samples must be a Python int, got 2.0"),
        (True, TypeError, r"num_samples must be a Python int, got True"),
    ],
)
def test_bad_num_samples(num_samples, error, match):
    with pytest.raises(error, match=match):
        nj.sample(jax.random.key(0), np.full(4, 0.25), num_samples)


def test_without_replacement_too_many():
    with pytest.raises(ValueError, match=r"num_samples=5 exceeds n=4: cannot sample without replacement"):
        nj.sample(jax.random.key(0), np.full(4, 0.25), 5, replace=False)
    with pytest.raises(ValueError, match=r"exceeds the 2 rows with positive probability"):
        nj.sample(jax.random.key(0), np.array([0.5, 0.5, 0.0, 0.0]), 3, replace=False)


def test_bad_path_arguments():
    params, xs, ys = _inputs()
    with pytest.raises(ValueError, match=r"Unknown mode 'backward'; expected one of"):
        nj.adjoint(apply_fn, params, xs, mode="backward")
    with pytest.raises(ValueError, match=r"Unknown mode 'sideways'"):
        nj.dual_matrix(apply_fn, params, xs, ys, mode="sideways")
    for nodes in (0, -2):
        with pytest.raises(ValueError, match=rf"num_nodes must be a positive integer, got {nodes}"):
            nj.adjoint(apply_fn, params, xs, num_nodes=nodes)
        with pytest.raises(ValueError, match=r"num_nodes must be a positive integer"):
            nj.dual_operator(apply_fn, params, xs, num_nodes=nodes)
        with pytest.raises(ValueError, match=r"num_nodes must be a positive integer"):
            nj.quadrature.gauss_legendre(nodes)
    with pytest.raises(TypeError, match=r"num_nodes must be a Python int, got 4.5"):
        nj.dual_matrix(apply_fn, params, xs, num_nodes=4.5)
    # numpy builds the rule from a q × q eigenproblem: 10**6 nodes asked it for 7 TiB (a MemoryError)
    top = nj.quadrature.MAX_NODES
    for call in (
        lambda q: nj.adjoint(apply_fn, params, xs, num_nodes=q),
        lambda q: nj.dual_operator(apply_fn, params, xs, num_nodes=q),
        lambda q: nj.streaming_leverage_scores(apply_fn, params, xs, ys, num_nodes=q),
        nj.quadrature.gauss_legendre,
    ):
        for q in (top + 1, 10**6):
            with pytest.raises(
                ValueError, match=rf"num_nodes must be at most {top}, got {q}: .*\(num_nodes=None\)"
            ):
                call(q)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer, got 0"):
        nj.adjoint(apply_fn, params, xs, chunk_size=0)


def test_bad_scalars():
    with pytest.raises(ValueError, match=r"epsilon must lie in \(0, 1\)"):
        nj.sample_size(1.5, 0.1, 3)
    with pytest.raises(ValueError, match=r"delta must lie in \(0, 1\)"):
        nj.sample_size(0.5, 0.0, 3)
    with pytest.raises(ValueError, match=r"rank must be a positive integer"):
        nj.sample_size(0.5, 0.1, 0)
    with pytest.raises(ValueError, match=r"beta must lie in \(0, 1\]"):
        nj.sample_size(0.5, 0.1, 3, beta=2.0)
    with pytest.raises(ValueError, match=r"ridge must be non-negative"):
        nj.leverage_scores(np.eye(3), ridge=-1.0)
    with pytest.raises(ValueError, match=r"degree must be positive"):
        nj.homogeneous_adjoint(apply_fn, _inputs()[0], _inputs()[1], degree=0)
    with pytest.raises(ValueError, match=r"norm_scores: F is all zeros"):
        nj.norm_scores(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"indices out of range \[0, 3\)"):
        nj.distortion(np.eye(3), np.array([0, 3]), np.ones(2))


def test_inputs_are_not_modified():
    params, xs, ys = _inputs()
    copies = jax.tree.map(np.copy, (params, xs, ys))
    F = np.asarray(nj.dual_matrix(apply_fn, params, xs, ys))
    F_copy = F.copy()
    op = nj.dual_operator(apply_fn, params, xs, ys)
    v, u = np.linspace(0, 1, D + 2), np.linspace(-1, 1, N)
    v_copy, u_copy = v.copy(), u.copy()
    op.mv(v), op.rmv(u)
    probs = np.asarray(nj.leverage_scores(F))
    probs_copy = probs.copy()
    nj.norm_scores(F), nj.linear_leverage_scores(xs, ys, bias=True), nj.mix_with_uniform(probs, 0.3)
    idx, w = nj.sample(jax.random.key(0), probs, 5)
    nj.sample(jax.random.key(0), probs, 5, replace=False)
    idx, w = np.asarray(idx), np.asarray(w)
    idx_copy, w_copy = idx.copy(), w.copy()
    nj.distortion(F, idx, w)
    for a, b in zip(jax.tree.leaves((params, xs, ys)), jax.tree.leaves(copies), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in ((F, F_copy), (v, v_copy), (u, u_copy), (probs, probs_copy), (idx, idx_copy), (w, w_copy)):
        np.testing.assert_array_equal(a, b)


def test_value_checks_on_the_host(tmp_path, monkeypatch):
    """Values in this process's memory (numpy arrays, memmaps, scalars, single-device CPU arrays) are
    checked with numpy, chunk by chunk, compiling nothing; the counts match a direct count."""
    from nlis_jax import _checks
    from nlis_jax.experiments import kernels

    monkeypatch.setattr(_checks, "HOST_CHECK_ELEMENTS", 64)  # several chunks of rows (10 x 7 = 70 each)
    rng = np.random.default_rng(2)
    a = rng.standard_normal((1001, 10, 7))
    a[0, 0, 0], a[500, 3, 2], a[-1, -1, -1] = np.nan, np.inf, -np.inf  # first, middle and last chunks
    stored = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=a.dtype, shape=a.shape)
    stored[:] = a
    stored.flush()
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    before = kernels.compile_stats()["count"]
    for value in (a, mapped, jax.device_put(a)):
        assert _checks.host_values(value) is not None
        with pytest.raises(ValueError, match=r"xs contains 3 NaN or Inf"):
            _checks.check_finite("xs", {"x": value})
    _checks.check_finite("s", 1.5)
    with pytest.raises(ValueError, match=r"s contains 1 NaN or Inf"):
        _checks.check_finite("s", np.float32("nan"))
    w = rng.standard_normal(1001)
    with pytest.raises(ValueError, match=rf"w must be non-negative; {int(np.sum(w < 0))} are negative"):
        _checks.check_nonnegative("w", w)
    assert kernels.compile_stats()["count"] == before
    assert np.isnan(a[0, 0, 0]) and np.isinf(a[500, 3, 2])  # nothing modified
