"""The Khatri–Rao route of projected leverage (dense-layer taps found in the jaxpr) against explicit Ω."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlis_jax as nj
from nlis_jax._factored import (
    KHATRI_RAO_COST_RATIO,
    analyse,
    embedding_matrix,
    khatri_rao_cost,
    khatri_rao_embedding,
)
from nlis_jax._projected import _projected_jit, projected_dual_matrix, projected_leverage_scores
from nlis_jax.experiments.nets import mlp, mlp_init, single_index
from nlis_jax.models import from_linen

MLP = mlp(jnp.tanh)


class Dense3(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(4)(x))
        x = nn.relu(nn.Dense(3)(x))
        return nn.Dense(1)(x)


def sequence_model(params, x):
    """x (3, 4): a transposed weight on a sequence axis, and a weight also used elementwise (not tapped)."""
    h = jnp.tanh(x @ params["a"].T + params["b"][None, :])  # (3, 5): tapped, w on the right, S = 3
    z = params["c"] @ jnp.mean(h, axis=0)  # (2,): c also appears in the penalty below -> generic
    return jnp.dot(params["v"], jnp.tanh(z)) + 0.1 * jnp.sum(params["c"] ** 2)


def mlp_problem(n=23):
    params = mlp_init(jax.random.key(0), (3, 4, 3, 1), dtype=jnp.float64)
    params = [dict(layer, b=layer["b"] + 0.1) for layer in params]  # f(0) ≠ 0
    rng = np.random.default_rng(1)
    return params, jnp.asarray(rng.standard_normal((n, 3))), jnp.asarray(rng.standard_normal(n))


def linen_problem(n=23):
    module = Dense3()
    variables = module.init(jax.random.key(2), jnp.ones((3,), jnp.float64))
    apply_fn, params = from_linen(module, jax.tree.map(lambda a: a.astype(jnp.float64), variables))
    rng = np.random.default_rng(3)
    return apply_fn, params, jnp.asarray(rng.standard_normal((n, 3))), jnp.asarray(rng.standard_normal(n))


def sequence_problem(n=23):
    ks = jax.random.split(jax.random.key(4), 4)
    params = {
        "a": jax.random.normal(ks[0], (5, 4), jnp.float64),
        "b": 0.1 * jnp.ones((5,), jnp.float64),
        "c": jax.random.normal(ks[1], (2, 5), jnp.float64),
        "v": jax.random.normal(ks[2], (2,), jnp.float64),
    }
    return params, jax.random.normal(ks[3], (n, 3, 4), jnp.float64)


def test_taps_found_in_pure_jax_and_linen_models():
    params, xs, _ = mlp_problem()
    fac = analyse(MLP, params, xs)
    assert fac.leaves == (1, 3, 5) and fac.rest == (0, 2, 4)  # leaves: b, w per layer; every w tapped
    assert [tap.node_free for tap in fac.taps] == [True, False, False]  # only x is free of θ
    apply_fn, lparams, xs, _ = linen_problem()
    fac = analyse(apply_fn, lparams, xs)
    paths = [str(path) for path, _ in jax.tree_util.tree_leaves_with_path(lparams)]
    kernels = [i for i, path in enumerate(paths) if "kernel" in path]
    assert fac.leaves == tuple(kernels) and len(kernels) == 3
    fac = analyse(sequence_model, *sequence_problem())
    assert fac.leaves == (0,) and fac.taps[0].delta_axis == 0 and not fac.taps[0].w_first  # a only


@pytest.mark.parametrize("case", ["mlp", "linen", "sequence"])
def test_projection_equals_dual_matrix_times_explicit_embedding(case):
    ys = None
    if case == "mlp":
        apply_fn, (params, xs, ys) = MLP, mlp_problem()
    elif case == "linen":
        apply_fn, params, xs, ys = linen_problem()
    else:
        apply_fn, (params, xs) = sequence_model, sequence_problem()
    key, dim = jax.random.key(5), 7
    Y = projected_dual_matrix(key, apply_fn, params, xs, ys, dim=dim, embedding="khatri_rao", chunk_size=10)
    fac = analyse(apply_fn, params, xs)
    omega = embedding_matrix(khatri_rao_embedding(key, fac, dim, jnp.float64), fac)
    F = np.asarray(nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=16))
    ref = F @ np.asarray(omega)
    # Same sums in a different order: agreement to rounding (~1e-16 relative to the largest entry).
    assert float(np.max(np.abs(np.asarray(Y) - ref)) / np.max(np.abs(ref))) < 1e-12


def test_exact_scores_at_dim_equal_to_a_deficient_rank():
    # Duplicated input features: rank(F̃) < p + 1. Khatri–Rao Gaussian columns keep the range almost
    # surely once dim ≥ rank, so dim = rank already gives the exact scores.
    rng = np.random.default_rng(6)
    base = rng.standard_normal((200, 2))
    xs = jnp.asarray(np.column_stack([base, base[:, :1]]))
    ys = jnp.asarray(rng.standard_normal(200))
    params = mlp_problem()[0]  # p + 1 = 36
    F = nj.dual_matrix(MLP, params, xs, ys, num_nodes=16)
    ref = nj.leverage_scores(F, return_info=True)
    assert int(ref.rank) == 36 - 4  # the 4 first-layer weights of the copied feature
    info = projected_leverage_scores(
        jax.random.key(7), MLP, params, xs, ys, dim=int(ref.rank), embedding="khatri_rao", return_info=True
    )
    assert int(info.rank) == int(ref.rank)
    np.testing.assert_allclose(info.probs, ref.probs, rtol=1e-8, atol=1e-14)


def test_ridge_matches_numpy_reference():
    params, xs, ys = mlp_problem(40)
    key, lam = jax.random.key(8), 0.2
    kw = dict(dim=9, embedding="khatri_rao")
    Y = np.asarray(projected_dual_matrix(key, MLP, params, xs, ys, **kw))
    ref = np.einsum("ij,ji->i", Y, np.linalg.solve(Y.T @ Y + lam * np.eye(9), Y.T))
    info = projected_leverage_scores(key, MLP, params, xs, ys, ridge=lam, return_info=True, **kw)
    np.testing.assert_allclose(info.leverage, ref, rtol=1e-10)
    np.testing.assert_allclose(info.probs, ref / ref.sum(), rtol=1e-10)


def test_no_recompilation_on_new_values():
    params, xs, ys = mlp_problem()
    kw = dict(dim=6, embedding="khatri_rao", chunk_size=8)
    projected_leverage_scores(jax.random.key(9), MLP, params, xs, ys, **kw)
    before = _projected_jit._cache_size()
    new = jax.tree.map(lambda a: 1.1 * a, params)
    out = projected_leverage_scores(jax.random.key(10), MLP, new, xs + 1.0, 2.0 * ys, **kw)
    assert _projected_jit._cache_size() == before and np.all(np.isfinite(np.asarray(out)))


def test_auto_takes_the_cheaper_route():
    # This MLP at dim = 4: 9e2 estimated multiply-adds per example for the Khatri–Rao route against
    # KHATRI_RAO_COST_RATIO·q·(p + 1) = 12·16·36 for the generic one: "auto" is Khatri–Rao. At dim = 64
    # the estimate (1.4e4) exceeds it, and "auto" would be the sparse sign route.
    params, xs, ys = mlp_problem()
    fac = analyse(MLP, params, xs)
    budget = KHATRI_RAO_COST_RATIO * 16 * 36
    assert khatri_rao_cost(fac, 1, 4, 16) <= budget < khatri_rao_cost(fac, 1, 64, 16)
    key = jax.random.key(14)
    auto = projected_dual_matrix(key, MLP, params, xs, ys, dim=4)
    np.testing.assert_array_equal(
        auto, projected_dual_matrix(key, MLP, params, xs, ys, dim=4, embedding="khatri_rao")
    )


def test_model_without_dense_weights_falls_back():
    # A single-index model has a 1-D parameter: nothing to tap. "auto" is then the sparse sign route and
    # "khatri_rao" the dense Gaussian one, bit for bit (same key).
    rng = np.random.default_rng(11)
    xs, ys = jnp.asarray(rng.standard_normal((30, 4))), jnp.asarray(rng.standard_normal(30))
    model, theta = single_index(jnp.tanh), jnp.asarray(rng.standard_normal(4))
    key = jax.random.key(12)
    for chosen, generic in (("auto", "sparse"), ("khatri_rao", "gaussian")):
        a = projected_dual_matrix(key, model, theta, xs, ys, dim=5, embedding=chosen)
        b = projected_dual_matrix(key, model, theta, xs, ys, dim=5, embedding=generic)
        np.testing.assert_array_equal(a, b)


def test_float32_in_float32_out():
    params, xs, ys = mlp_problem(60)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    probs = projected_leverage_scores(
        jax.random.key(13), MLP, p32, xs.astype(jnp.float32), ys.astype(jnp.float32), dim=36,
        embedding="khatri_rao",
    )  # fmt: skip
    assert probs.dtype == jnp.float32
    ref = nj.leverage_scores(nj.dual_matrix(MLP, params, xs, ys, num_nodes=16))
    np.testing.assert_allclose(probs, ref, rtol=5e-3)  # dim ≥ p + 1: exact up to float32 rounding


def test_khatri_rao_needs_fixed_nodes_and_reverse_mode():
    params, xs, ys = mlp_problem()
    for kw in (dict(num_nodes=None), dict(mode="forward")):
        with pytest.raises(ValueError, match="khatri_rao"):
            projected_leverage_scores(
                jax.random.key(0), MLP, params, xs, ys, dim=4, embedding="khatri_rao", **kw
            )
