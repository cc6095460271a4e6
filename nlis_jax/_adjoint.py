r"""Adjoints of a nonlinear model by Gauss-Legendre quadrature along the ray ``tθ``.

.. math:: f^*(\theta; x) = \int_0^1 \nabla_u f(u; x)\big|_{u = t\theta}\, dt
          \approx \sum_k w_k\, \nabla f(t_k \theta; x)

The gradient is evaluated AT ``t_k θ`` (differentiating with respect to the point on the ray); the
derivative of ``θ ↦ f(tθ)`` would carry an extra factor ``t`` and break the identity
``f(θ) = f(0) + <f*(θ), θ>``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from nlis_jax._checks import (
    check_choice,
    check_finite,
    check_floating,
    check_leading_axis,
    check_positive_int,
    check_same_length,
)
from nlis_jax._precision import highest_precision
from nlis_jax._quadrature import gauss_legendre
from nlis_jax._types import ApplyFn, Array, PyTree

MODES = ("auto", "forward", "reverse")
#: ``mode="auto"`` takes forward mode when ``p <= FORWARD_MAX_PARAMS * k``. Forward costs about ``p``
#: tangent passes per node and reverse about ``3 k``, but measured on a CPU (benchmarks/bench_adjoint.py,
#: benchmarks/README.md) reverse was never slower: 4x faster at ``p = k`` and a tie for single-index
#: models with ``p <= 8``; linear scaling puts the break-even near ``p = k/4``.
FORWARD_MAX_PARAMS = 0.25
#: Default memory budget (array elements) of one chunk of examples: ``batch_size * k * p <= budget``.
CHUNK_ELEMENTS = 1 << 23


class FlatModel(NamedTuple):
    """A model over a flat parameter vector: ``fn(theta (p,), x) -> () or (k,)``."""

    fn: Callable[[Array, PyTree], Array]
    theta: Array  # (p,)
    unravel: Callable[[Array], PyTree]
    n: int
    out_shape: tuple[int, ...]  # () or (k,)


def _first_example(xs: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a[0], xs)


def num_examples(xs: PyTree, name: str = "xs") -> int:
    """Length of the shared leading (example) axis of every leaf of ``xs``."""
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError(f"{name} is empty (no arrays).")
    n = check_leading_axis(name, leaves[0])
    for leaf in leaves[1:]:
        check_same_length(name, n, f"another leaf of {name}", check_leading_axis(name, leaf))
    return n


def flatten_model(apply_fn: ApplyFn, params: PyTree, xs: PyTree, *, check_values: bool = True):
    """Validate ``(params, xs)`` and return a :class:`FlatModel` over ``ravel_pytree(params)``."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
    n = num_examples(xs)
    check_floating("params", params)
    if check_values:
        check_finite("params", params)
        check_finite("xs", xs)
    theta, unravel = ravel_pytree(params)
    if theta.size == 0:
        raise ValueError("params has no entries (p = 0).")

    def fn(flat, x):
        return apply_fn(unravel(flat), x)

    out = jax.eval_shape(apply_fn, params, _first_example(xs))
    if len(out.shape) > 1:
        raise ValueError(
            f"apply_fn(params, x) must return a scalar or a vector of k outputs for ONE example, "
            f"got shape {out.shape}. (Pass one example x, not a batch: nlis_jax vmaps inside.)"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"apply_fn must return floating values, got dtype {out.dtype}.")
    return FlatModel(fn, theta, unravel, n, tuple(out.shape))


def resolve_mode(mode: str, p: int, k: int) -> str:
    """``"auto"`` -> ``"forward"`` when ``p <= FORWARD_MAX_PARAMS * k``, else ``"reverse"``."""
    check_choice("mode", mode, MODES)
    if mode != "auto":
        return mode
    return "forward" if p <= FORWARD_MAX_PARAMS * k else "reverse"


def default_batch_size(n: int, p: int, k: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(1, p * k)))


def chunked_map(fn: Callable, xs: PyTree, n: int, batch_size: int) -> Array:
    """``vmap(fn)(xs)`` over the leading axis, ``batch_size`` examples at a time (``lax.map``)."""
    if batch_size >= n:
        return jax.vmap(fn)(xs)
    return lax.map(fn, xs, batch_size=batch_size)


def _point_jacobian(fn, mode: str, p: int, dtype) -> Callable[[Array, PyTree], Array]:
    """``jac(u, x) = ∇_u fn(u, x)`` of shape ``out_shape + (p,)`` evaluated at the point ``u``."""
    if mode == "reverse":
        return jax.jacrev(fn)  # per-example vjp (one per output)
    basis = jnp.eye(p, dtype=dtype)

    def jac(u, x):  # one jvp per tangent direction e_j, vmapped
        tangent_out = jax.vmap(lambda v: jax.jvp(lambda w: fn(w, x), (u,), (v,))[1])(basis)
        return jnp.moveaxis(tangent_out, 0, -1)

    return jac


def adjoint(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    *,
    num_nodes: int = 16,
    mode: str = "auto",
    batch_size: int | None = None,
) -> Array:
    r"""Per-example adjoints :math:`f_i^*(\theta) = \int_0^1 \nabla f(t\theta; x_i)\,dt`.

    Gauss-Legendre quadrature with ``num_nodes`` nodes on ``[0, 1]``; the gradient at each node is taken
    at the point ``t_k θ``, accumulated over nodes in a ``lax.scan`` carry, vmapped over examples and
    chunked ``batch_size`` examples at a time.

    Args:
      apply_fn: ``apply_fn(params, x)`` for ONE example ``x``, returning a scalar or a ``(k,)`` vector.
      params: any pytree of floating arrays; flattened by ``jax.flatten_util.ravel_pytree`` to ``p``
        entries (the column order of the result).
      xs: inputs with a leading example axis, shape ``(n, ...)`` (or a pytree of such arrays).
      num_nodes: number of Gauss-Legendre nodes ``q`` (exact for integrands of degree ``2q - 1`` in t).
      mode: ``"forward"`` (one ``jax.jvp`` per tangent direction, vmapped: ~``p`` passes per node),
        ``"reverse"`` (per-example ``jax.vjp``: ~3 passes per output per node) or ``"auto"`` (forward
        when ``p <= k/4``, see ``FORWARD_MAX_PARAMS``).
      batch_size: examples per chunk (bounds memory at ``batch_size * k * p`` per node); default
        keeps a chunk under ``2**23`` elements.

    Returns:
      Array of shape ``(n, p)`` for scalar models or ``(n, k, p)`` for ``k`` outputs, in the dtype of
      the flattened parameters. Row ``i`` satisfies ``<f_i^*(θ), θ> + f_i(0) = f_i(θ)``.

    Raises:
      ValueError: on NaN/Inf in ``params`` or ``xs`` (when concrete), inconsistent leading axes,
        a model output of rank > 1, an unknown ``mode`` or a non-positive ``num_nodes``/``batch_size``.
    """
    validate_path_args(num_nodes, mode, batch_size)
    flatten_model(apply_fn, params, xs)  # shape and value checks, before any work
    return _adjoint_jit(apply_fn, params, xs, num_nodes=num_nodes, mode=mode, batch_size=batch_size)


def validate_path_args(num_nodes, mode, batch_size) -> None:
    check_choice("mode", mode, MODES)
    check_positive_int("num_nodes", num_nodes)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_nodes", "mode", "batch_size"))
@highest_precision
def _adjoint_jit(apply_fn, params, xs, *, num_nodes, mode, batch_size):
    model = flatten_model(apply_fn, params, xs, check_values=False)
    return _adjoint_flat(model, xs, num_nodes=num_nodes, mode=mode, batch_size=batch_size)


def _adjoint_flat(model: FlatModel, xs, *, num_nodes, mode, batch_size) -> Array:
    theta, p = model.theta, model.theta.shape[0]
    k = math.prod(model.out_shape)
    jac = _point_jacobian(model.fn, resolve_mode(mode, p, k), p, theta.dtype)
    nodes, weights = gauss_legendre(num_nodes, theta.dtype)

    def one_example(x):
        def body(acc, tw):
            t, w = tw
            return acc + w * jac(t * theta, x), None

        acc0 = jnp.zeros(model.out_shape + (p,), theta.dtype)
        return lax.scan(body, acc0, (nodes, weights))[0]

    if batch_size is None:
        batch_size = default_batch_size(model.n, p, k)
    return chunked_map(one_example, xs, model.n, batch_size)


def model_outputs(model: FlatModel, xs, theta: Array | None = None) -> Array:
    """``f(θ; x_i)`` for every example: shape ``(n,) + out_shape``."""
    theta = model.theta if theta is None else theta
    return jax.vmap(model.fn, in_axes=(None, 0))(theta, xs)
