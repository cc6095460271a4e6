r"""Closed-form adjoints and the bounded Swish activation.

If ``f = g ∘ h`` with ``h`` positively homogeneous of degree ``α`` (``h(tθ) = t^α h(θ)``), then

.. math:: f^*(\theta) = \frac{g(h(\theta)) - g(0)}{\alpha\, h(\theta)}\, \nabla h(\theta),

with the limit ``g'(0)/α · ∇h`` as ``h → 0``. The single-index model ``ϕ(<θ, x>)`` is the case ``α = 1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from nlis_jax import _traced as traced
from nlis_jax._adjoint import check_model, count_bad_examples, flatten_model, nonfinite_adjoint
from nlis_jax._checks import (
    check_finite_each,
    check_floating,
    check_leading_axis,
    check_one_array,
    check_real,
    is_concrete,
    report_nonfinite,
)
from nlis_jax._precision import at_least_float32, highest_precision
from nlis_jax._types import ApplyFn, Array, PyTree
from nlis_jax.quadrature import gauss_legendre


def bounded_swish(t, c1: float = 1.0, c2: float = 2.0, zeta: float = 1.0):
    r"""Bounded Swish :math:`\phi(t) = t\,(\sqrt{c_1} + (\sqrt{c_2} - \sqrt{c_1})\,\sigma(\zeta t))`.

    It satisfies ``c1 <= ϕ(t)²/t² <= c2`` for every ``t != 0`` (when ``0 < c1 <= c2`` and ``zeta >= 0``),
    which bounds nonlinear leverage by linear leverage within a factor ``c2/c1``.

    Args:
      t: array of any shape.
      c1, c2: the bounds on ``(ϕ(t)/t)²``; require ``0 < c1 <= c2`` (``ValueError``; traced values, e.g.
        leaves of ``params``, are checked inside :func:`nlis_jax.traced_checks`).
      zeta: slope of the sigmoid gate.

    Returns:
      Array of the shape and dtype of ``t`` (the default float dtype for integer or bool ``t``).
    """
    # c1, c2, zeta: Python, numpy or 0-d array numbers (check_real); traced ones (under a user's jit, or
    # leaves of params) a checkify check inside nlis_jax.traced_checks()
    traced_bounds = not (is_concrete(c1) and is_concrete(c2))
    if traced_bounds:
        c1, c2 = jnp.asarray(c1), jnp.asarray(c2)
        if (
            jnp.shape(c1) != ()
            or jnp.shape(c2) != ()
            or not all(
                jnp.issubdtype(c.dtype, jnp.floating) or jnp.issubdtype(c.dtype, jnp.integer)
                for c in (c1, c2)
            )
        ):
            raise ValueError(f"bounded_swish needs real scalars c1, c2; got {c1} and {c2}.")
        traced.check((0 < c1) & (c1 <= c2) & jnp.isfinite(c2), "bounded_swish needs finite 0 < c1 <= c2.")
    else:
        message = f"bounded_swish needs real numbers, finite 0 < c1 <= c2; got c1={c1!r}, c2={c2!r}."
        try:
            c1, c2 = check_real("c1", c1), check_real("c2", c2)
        except TypeError:
            raise ValueError(message) from None
        if not 0 < c1 <= c2 < math.inf:
            raise ValueError(message)
    if is_concrete(zeta):
        if not 0 <= check_real("zeta", zeta) < math.inf:
            raise ValueError(f"bounded_swish needs a finite zeta >= 0 (the bounds hold then), got {zeta}.")
    else:
        traced.check((zeta >= 0) & jnp.isfinite(zeta), "bounded_swish needs a finite zeta >= 0.")
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.inexact):  # integer or bool t: the default float, not c1 truncated
        t = t.astype(jnp.result_type(float))
    # the square roots in float64 (traced: at least float32), then rounded once: c2 = 1e5 overflowed float16
    # before its root (√c2 = 316)
    if traced_bounds:
        wide = at_least_float32(t.dtype)
        lo, hi = (jnp.sqrt(c.astype(wide)).astype(t.dtype) for c in (c1, c2))
    else:
        lo, hi = (jnp.asarray(math.sqrt(c), t.dtype) for c in (c1, c2))
    zeta = jnp.asarray(zeta).astype(t.dtype)  # a float64 zeta must not promote float32 t
    return t * (lo + (hi - lo) * jax.nn.sigmoid(zeta * t))


#: Gauss–Legendre nodes of :func:`difference_quotient` near 0.
QUOTIENT_NODES = 8

#: :func:`difference_quotient` integrates ``g'`` for ``|z| ≤ 1`` where ``|g(z) − g(0)|`` is below this
#: share of ``|g(0)|`` (the subtraction would cancel all but ``eps/share`` of the quotient).
CANCELLATION_SHARE = 0.1


def difference_quotient(g: Callable[[Array], Array], z: Array) -> Array:
    r"""``(g(z) - g(0)) / z`` elementwise, accurate through ``z = 0``.

    The quotient computed directly loses ``eps·(|g(z)| + |g(0)|) / |g(z) − g(0)|`` to the subtraction: all
    of it as ``z → 0``, and still ``eps/z²`` for ``g'(0) = 0`` (cos, cosh, a Gaussian: ``5e-9`` at
    ``z = 1.3e-4`` in float64, ``1e-4`` at ``z = 0.02`` in float32, where the threshold was ``|z|`` alone).
    So it is computed as ``∫_0^1 g'(tz) dt`` by the :data:`QUOTIENT_NODES`-node Gauss–Legendre rule for
    ``|z| < eps^{1/4}``, and for ``|z| ≤ 1`` where ``|g(z) − g(0)| < `` :data:`CANCELLATION_SHARE`
    ``·|g(0)|`` if it agrees with the direct quotient to 16 times the direct one's rounding bound (else
    the direct one: a ``g`` with a kink inside ``(0, z)``, where the rule is inexact). The rule's error for
    smooth ``g`` is ``O(z^{2q})``, and it evaluates ``g'`` only strictly between 0 and ``z``: one-sided, so
    also right for a ``g`` with a kink at 0 (relu, leaky relu, abs), where a Taylor series at 0 is not
    (it gave 0 for ``relu`` at ``z = 1e-5``). ``g'`` comes from ``jax.grad``; the ``where`` calls keep
    gradients of the result finite.

    Args:
      g: a scalar function, elementwise on arrays (e.g. ``jnp.tanh``), differentiable by ``jax.grad``.
      z: floating-point array of any shape; finite (checked when concrete).

    Returns:
      Array of ``z``'s shape and dtype.

    Raises:
      TypeError: ``g`` not callable, or ``z`` not floating point.
      ValueError: ``z`` (concrete) holds NaN or Inf.
    """
    if not callable(g):
        raise TypeError(f"g must be a callable scalar function (e.g. jnp.tanh), got {type(g).__name__}.")
    check_floating("z", z)  # first: an int64 z past int32 is refused as an integer, not as wrapping around
    check_finite_each(("z", z))
    return _difference_quotient(g, jnp.asarray(z))


def _difference_quotient(g: Callable[[Array], Array], z: Array) -> Array:
    """:func:`difference_quotient` without its input checks (the library's own calls)."""
    dtype = z.dtype
    eps = jnp.finfo(dtype).eps
    g0 = g(jnp.zeros((), dtype))
    small = jnp.abs(z) < eps**0.25
    safe_z = jnp.where(small, jnp.ones_like(z), z)
    g_z = g(safe_z)
    direct = (g_z - g0) / safe_z
    cancels = (jnp.abs(z) <= 1) & (jnp.abs(g_z - g0) < CANCELLATION_SHARE * jnp.abs(g0))
    near = small | cancels
    nodes, weights = gauss_legendre(QUOTIENT_NODES, dtype)
    slope = jnp.vectorize(jax.grad(g))
    near_z = jnp.where(near, z, jnp.zeros_like(z))
    points = nodes.reshape((-1,) + (1,) * z.ndim) * near_z[None]  # (q,) + z.shape
    path = jnp.tensordot(weights, slope(points), axes=1)
    rounding = 16 * eps * (jnp.abs(g_z) + jnp.abs(g0)) / jnp.abs(safe_z)
    return jnp.where(small | (cancels & (jnp.abs(path - direct) <= rounding)), path, direct)


def single_index_adjoint(phi: Callable[[Array], Array], theta: Array, xs: Array) -> Array:
    r"""Closed-form adjoint of the single-index model ``f(θ; x) = ϕ(<θ, x>)``.

    .. math:: f^*(\theta; x_i) = \frac{\phi(z_i) - \phi(0)}{z_i}\, x_i,\qquad z_i = \langle\theta, x_i\rangle,

    with the limit ``ϕ'(0) x_i`` at ``z_i = 0``. A bias is a ones column in ``xs``.

    Args:
      phi: scalar activation, elementwise on arrays (e.g. ``jnp.tanh``, :func:`bounded_swish`).
      theta: parameters, shape ``(d,)``.
      xs: data, shape ``(n, d)``.

    Returns:
      Array of shape ``(n, d)``: ``diag((ϕ(z) - ϕ(0))/z) · xs``, in ``theta``'s dtype (computed in the
      wider of ``theta``'s and ``xs``'s).
    """
    if not callable(phi):
        raise TypeError(
            f"phi must be a callable scalar activation (e.g. jnp.tanh), got {type(phi).__name__}."
        )
    # a pytree failed inside numpy ("entry not a 2- or 3- tuple")
    check_one_array("theta", theta, "of shape (d,)", "for a pytree of parameters use nj.adjoint")
    check_one_array("xs", xs, "of shape (n, d) (or its rows)", "for a pytree of inputs use nj.adjoint")
    # before the cast: float64 values past float32's range named as such
    check_finite_each(("theta", theta), ("xs", xs))
    theta, xs = jnp.asarray(theta), jnp.asarray(xs)
    if theta.ndim != 1:
        raise ValueError(f"theta must be a vector of shape (d,), got shape {theta.shape}.")
    if xs.ndim != 2:
        raise ValueError(f"xs must be a matrix of shape (n, d), got shape {xs.shape}.")
    check_leading_axis("xs", xs)
    if theta.shape[0] != xs.shape[1]:
        raise ValueError(
            f"theta has {theta.shape[0]} weights but xs has {xs.shape[1]} columns (features): they must "
            "agree."
        )
    check_floating("theta", theta)
    check_floating("xs", xs)
    check_finite_each(("theta", theta), ("xs", xs))
    dtype = jnp.result_type(theta, xs)  # computed in the wider dtype, returned in theta's (as nj.adjoint)
    _check_elementwise("phi", phi, xs.shape[0], dtype)
    adj, bad = _single_index_jit(phi, theta.astype(dtype), xs.astype(dtype), theta.dtype)
    report_nonfinite(bad, xs.shape[0], nonfinite_adjoint)
    return adj


def _check_elementwise(name: str, fn: Callable, n: int, dtype) -> None:
    """``ValueError`` unless ``fn`` maps an ``(n,)`` vector of ``dtype`` to an ``(n,)`` vector (traced
    by shape only): a scalar map applied elementwise, as the closed forms need."""
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct((n,), dtype))
    if getattr(out, "shape", None) != (n,):
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"{name} must be a scalar map applied elementwise (like jnp.tanh): {name} of the ({n},) vector "
            f"of pre-activations returned {got}, not shape ({n},)."
        )


@functools.partial(traced.jit, static_argnames=("phi", "out_dtype"))
@highest_precision
def _single_index_jit(phi, theta, xs, out_dtype):
    adj = (_difference_quotient(phi, xs @ theta)[:, None] * xs).astype(out_dtype)
    return adj, count_bad_examples(adj)


def homogeneous_adjoint(
    h_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    *,
    degree: float,
    g: Callable[[Array], Array] | None = None,
) -> Array:
    r"""Closed-form adjoint of ``f = g ∘ h`` with ``h`` positively homogeneous of degree ``α``.

    .. math:: f^*(\theta; x) = \frac{g(h) - g(0)}{\alpha\, h}\,\nabla_\theta h(\theta; x),

    (limit ``g'(0)/α · ∇h`` at ``h = 0``). Example: a bias-free ``L``-layer ReLU network is
    homogeneous of degree ``L`` in all its weights.

    Args:
      h_fn: ``h_fn(params, x) -> scalar``, positively homogeneous of degree ``degree`` in ``params``.
      params: pytree, flattened with ``ravel_pytree`` to ``p`` entries.
      xs: inputs with a leading example axis ``(n, ...)``.
      degree: ``α > 0``.
      g: scalar output map (default identity, giving ``∇h / α``).

    Returns:
      Array of shape ``(n, p)``.
    """
    if not 0 < check_real("degree", degree) < math.inf:
        raise ValueError(f"degree must be positive and finite, got {degree}.")
    if g is not None and not callable(g):
        raise TypeError(f"g must be a callable scalar output map or None, got {type(g).__name__}.")
    shape = check_model(h_fn, params, xs)
    if shape.out_shape != ():
        raise ValueError(f"h_fn must return a scalar per example, got shape {shape.out_shape}.")
    if g is not None:
        _check_elementwise("g", g, shape.n, shape.dtype)
    # degree traced (a Python float: weakly typed, the params' dtype): a new degree compiles nothing
    adj, bad = _homogeneous_jit(h_fn, params, xs, float(degree), g)
    report_nonfinite(bad, shape.n, nonfinite_adjoint)
    return adj


@functools.partial(traced.jit, static_argnums=(0, 4))
@highest_precision
def _homogeneous_jit(h_fn, params, xs, degree, g):
    model = flatten_model(h_fn, params, xs)
    h, grad_h = jax.vmap(jax.value_and_grad(model.fn), in_axes=(None, 0))(model.theta, xs)
    if g is None:
        coef = jnp.full_like(h, 1.0 / degree)
    else:
        coef = _difference_quotient(g, h) / degree
    adj = (coef[:, None] * grad_h).astype(model.theta.dtype)  # the params' dtype, as nj.adjoint
    return adj, count_bad_examples(adj)


__all__ = ["bounded_swish", "difference_quotient", "homogeneous_adjoint", "single_index_adjoint"]
