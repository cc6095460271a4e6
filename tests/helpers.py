"""Small models and independent numpy references shared by the core tests."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import nlis_jax as nj
from nlis_jax.experiments.nets import mlp, mlp_init  # noqa: F401  (re-exported for the core tests)


def normal(seed, *shape, dtype=np.float64):
    """Standard normal test data from numpy (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def mlp_params(seed, sizes, *, dtype=np.float64, bias_scale=0.5, weight_scale=1.0):
    """Params in the layout of ``mlp_init`` (list of ``{"w": (out, in), "b": (out,)}``), LeCun-normal
    weights and NON-zero biases (so bias gradients and ``f(0)`` are exercised)."""
    rng = np.random.default_rng(seed)
    params = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = weight_scale * rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
        b = bias_scale * rng.standard_normal(d_out)
        params.append({"w": jnp.asarray(w.astype(dtype)), "b": jnp.asarray(b.astype(dtype))})
    return params


def sigmoid_head_mlp(params, x):
    """A tanh MLP followed by a sigmoid: a scalar model with ``f(0) = 1/2 ≠ 0``."""
    return jax.nn.sigmoid(mlp(jnp.tanh)(params, x))


@functools.partial(jax.jit, static_argnums=0)
def outputs(apply_fn, params, xs):
    """``f(θ; x_i)`` for every example, by an explicit ``vmap`` (jitted: one compilation, not one per op)."""
    return jax.vmap(apply_fn, in_axes=(None, 0))(params, xs)


def outputs_at_zero(apply_fn, params, xs):
    return outputs(apply_fn, jax.tree.map(jnp.zeros_like, params), xs)


def flat_theta(params):
    return ravel_pytree(params)[0]


def svd_leverage(F, rank=None):
    """Raw leverage ``h_i = ‖U_i‖²`` from numpy's SVD (first ``rank`` left singular vectors)."""
    F = np.asarray(F, np.float64)
    U, s, _ = np.linalg.svd(F, full_matrices=False)
    if rank is None:
        rank = int(np.sum(s > max(F.shape) * np.finfo(np.float64).eps * s[0]))
    return np.sum(U[:, :rank] ** 2, axis=1), rank


def exact_leverage(F):
    """The exact leverage ``h_i = F_i (FᵀF)⁻¹ F_iᵀ`` of a float matrix of full column rank, rounded once.

    In rational arithmetic: the entries scaled by one power of two to Python integers (``h`` does not
    change under ``F → cF``), the Gram matrix exact, its inverse by Gauss-Jordan in ``Fraction`` over one
    common denominator ``D``, then ``h_i = F_i (D·G⁻¹) F_iᵀ / D`` in integers. An SVD in float64 is a
    reference only to ``~eps·κ(F)`` (the backward error of its QR), and a library calling the same LAPACK
    QR shares its rounding errors: it can agree with it far better than either agrees with this.
    """
    F = np.asarray(F, np.float64)
    n, m = F.shape
    scale = Fraction(2) ** (53 - int(np.frexp(F)[1].min()))  # every entry times it is an integer
    ints = [[int(Fraction(v) * scale) for v in row] for row in F.tolist()]
    G = [[sum(r[i] * r[j] for r in ints) for j in range(m)] for i in range(m)]
    A = [[Fraction(v) for v in G[i]] + [Fraction(int(i == j)) for j in range(m)] for i in range(m)]
    for c in range(m):  # Gauss-Jordan with row pivoting on exact values
        p = next(r for r in range(c, m) if A[r][c] != 0)
        A[c], A[p] = A[p], A[c]
        A[c] = [v / A[c][c] for v in A[c]]
        for r in range(m):
            if r != c and A[r][c] != 0:
                A[r] = [a - A[r][c] * b for a, b in zip(A[r], A[c], strict=True)]
    D = math.lcm(*(v.denominator for row in A for v in row[m:]))
    inv = [[v.numerator * (D // v.denominator) for v in row[m:]] for row in A]
    h = [sum(r[a] * sum(inv[a][b] * r[b] for b in range(m)) for a in range(m)) for r in ints]
    return np.array([float(Fraction(v, D)) for v in h])


def matrix_with_condition(rng, n, m, kappa, heavy_rows=True):
    """``Q diag(σ) Wᵀ`` with ``σ`` log-spaced from 1 to ``1/kappa``; returns ``(F, Q)``.

    With ``heavy_rows`` the rows of ``Q`` come from a t(2) scaling, so the leverage spans a wide range.
    """
    G = rng.standard_normal((n, m))
    if heavy_rows:
        G = G * rng.standard_t(2, size=(n, 1))
    Q, _ = np.linalg.qr(G)
    W, _ = np.linalg.qr(rng.standard_normal((m, m)))
    sigma = np.logspace(0.0, -np.log10(kappa), m)
    return (Q * sigma[None, :]) @ W.T, Q


#: jax.monitoring event of one XLA compilation.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_events():
    """Count jax.monitoring duration events (e.g. :data:`COMPILE_EVENT`) inside the ``with`` block."""
    counts = collections.Counter()

    def listener(event, duration, **kwargs):
        counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str, monkeypatch):
    """The script ``benchmarks/<name>.py`` as a module (its folder on ``sys.path`` for ``_common``)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The benchmark's float32 accuracy targets against float64 leverage: total variation, smallest ratio.
TV_TARGET, BETA_TARGET = 1e-4, 0.999


@contextlib.contextmanager
def small_matrices_take_the_sketch_stage(*, host_float64_gram: bool):
    """``routes.SKETCH_MIN`` lowered to 16, so that small float32 matrices take the stage of the sketched
    route, which starts, for concrete CPU input, with the host float64 Gram matrix when
    ``host_float64_gram``. Both are read when programs are traced: caches cleared around."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nj.routes, "SKETCH_MIN", 16)
        mp.setattr(nj.routes, "HOST_FLOAT64_GRAM", host_float64_gram)
        jax.clear_caches()
        yield
    jax.clear_caches()


def conditioned_float32(seed: int, kappa: float, n: int = 800, m: int = 40) -> np.ndarray:
    """A float32 ``(n, m)`` matrix of condition number ``kappa`` (:func:`matrix_with_condition`)."""
    return np.asarray(matrix_with_condition(np.random.default_rng(seed), n, m, kappa)[0], np.float32)


def float32_leverage_ref(A) -> np.ndarray:
    """float64 leverage of the float32-rounded ``A`` (full column rank)."""
    Q = np.linalg.qr(np.asarray(A, np.float32).astype(np.float64))[0]
    return np.sum(Q**2, axis=1)


def tv_beta(h, h_ref) -> tuple[float, float]:
    """Total variation between the normalised ``h`` and ``h_ref``, and their smallest ratio."""
    tau, ref = np.asarray(h, np.float64) / np.sum(h), h_ref / np.sum(h_ref)
    return 0.5 * np.sum(np.abs(tau - ref)), np.min(tau / ref)


def float32_leverage(A, **kw):
    """``(Leverage, route name)`` of ``A`` in float32."""
    info = nj.leverage_scores(jnp.asarray(A, jnp.float32), return_info=True, **kw)
    return info, nj.routes.ROUTES[int(info.route)]


def assert_rank_deficient_falls_back_to_stable(case: str, seed: int, n: int, m: int) -> None:
    """A rank-5 product, or a matrix below the float32 rank tolerance, takes route ``stable`` with its
    exact result."""
    rng = np.random.default_rng(seed)
    if case == "rank5_product":
        A, rank = rng.standard_normal((n, 5)) @ rng.standard_normal((5, m)), 5
    else:  # below the float32 rank tolerance: numerically rank-deficient
        A, rank = matrix_with_condition(rng, n, m, 1e8)[0], None
    info, route = float32_leverage(A)
    forced, _ = float32_leverage(A, route="stable")
    assert route == "stable"
    assert int(info.rank) == int(forced.rank) and (rank is None or int(info.rank) == rank)
    np.testing.assert_array_equal(np.asarray(info.leverage), np.asarray(forced.leverage))
