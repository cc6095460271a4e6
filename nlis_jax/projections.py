r"""Projections onto constraint sets, for projected-gradient training.

A *projection* here is any callable ``projection(tree) -> tree`` that maps a parameter pytree to the
nearest point (in the Euclidean norm over all leaves) of a closed convex set :math:`C`:

.. math::

    \Pi_C(\theta) = \operatorname{argmin}_{u \in C} \|u - \theta\|_2 .

This module re-exports the functional projections of :mod:`optax.projections` (each takes the tree
first and the set's size as a keyword, e.g. ``projection_l2_ball(tree, scale=r)``) and adds small
builders that return a ready-made projection, built once:

* :func:`l2_ball` (``radius``), :func:`box` (``lower``, ``upper``) and :data:`identity`.

The builders return frozen dataclasses registered as JAX pytrees whose numbers (radius, bounds) are
*leaves*. So ``l2_ball(1.0) == l2_ball(1.0)``, and :func:`nlis_jax.fit` passes the numbers as traced
arguments: training again with another radius reuses the compiled code. Every projection returns
leaves of the same dtypes as its input (float32 stays float32).

:func:`project_params` turns a projection into an :class:`optax.GradientTransformation`, to be
used as the LAST link of an :func:`optax.chain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.projections import (
    projection_box,
    projection_halfspace,
    projection_hypercube,
    projection_hyperplane,
    projection_l1_ball,
    projection_l1_sphere,
    projection_l2_ball,
    projection_l2_sphere,
    projection_linf_ball,
    projection_non_negative,
    projection_simplex,
    projection_vector,
)

from nlis_jax import _traced as traced
from nlis_jax._checks import (
    check_finite,
    check_floating,
    check_real,
    float_bits,
    flushes_subnormals,
    is_concrete,
)
from nlis_jax._precision import at_least_float32, promoted
from nlis_jax._types import PyTree

__all__ = [
    "Projection",
    "L2Ball",
    "Box",
    "l2_ball",
    "box",
    "identity",
    "project_params",
    # re-exported from optax.projections
    "projection_box",
    "projection_halfspace",
    "projection_hypercube",
    "projection_hyperplane",
    "projection_l1_ball",
    "projection_l1_sphere",
    "projection_l2_ball",
    "projection_l2_sphere",
    "projection_linf_ball",
    "projection_non_negative",
    "projection_simplex",
    "projection_vector",
]


def _cast_like(new: PyTree, old: PyTree) -> PyTree:
    """Cast each leaf of ``new`` to the dtype of the matching leaf of ``old``."""
    return jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.result_type(b)), new, old)


def identity(tree: PyTree) -> PyTree:
    """The trivial projection (no constraint): returns ``tree`` unchanged."""
    return tree


class Projection:
    """Base class of the projections built by this module (pytree-registered frozen dataclasses)."""

    def __call__(self, tree: PyTree) -> PyTree:
        raise NotImplementedError(
            f"{type(self).__name__} does not define __call__: a Projection subclass maps a tree to its "
            "projection; build one with nj.l2_ball(radius) or nj.box(lower, upper)."
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class L2Ball(Projection):
    r"""Projection onto :math:`\{\theta : \|\theta\|_2 \le \text{radius}\}` (norm over all leaves).

    :math:`\Pi(\theta) = \theta \cdot r / \max(\|\theta\|_2, r)` (no branch, so jit-friendly), the
    formula of :func:`optax.projections.projection_l2_ball`, with ``‖θ‖`` taken on ``θ / 2^e`` (``2^e``
    near the largest ``|θ_j|``): for finite parameters ``‖θ‖²`` cannot overflow or underflow, and in range
    the result is optax's bit for bit (scaling by a power of two is exact). As optax's, the projected
    norm is ``r`` to rounding, not at most ``r``: measured in float64, about half of float32 points
    projected onto ``l2_ball(1.0)`` land above 1 by up to ``1.4e-7`` (one or two units of rounding; with
    x64, ``2.2e-16``). :class:`Box`, by contrast, rounds its bounds inwards, so its results lie inside.

    Built directly rather than by :func:`l2_ball`, a concrete ``radius`` is checked when called, as
    :func:`l2_ball` checks it (``ValueError`` unless a finite positive scalar); a traced one (as
    :func:`nlis_jax.fit` passes it) by a ``checkify`` check inside ``nlis_jax.traced_checks()``.
    """

    radius: Any

    def __call__(self, tree: PyTree) -> PyTree:
        if is_concrete(self.radius):  # built directly (not by l2_ball): the builder's checks, on the host
            _check_radius(self.radius)
        check_floating("the parameters of a projection", tree)  # an integer leaf would be truncated
        check_finite("the projection's input", tree)  # an Inf became NaN, a NaN kept θ outside
        leaves = jax.tree.leaves(tree)
        if not leaves:
            return tree
        dtype = at_least_float32(promoted(*leaves))
        top = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf), initial=0).astype(dtype) for leaf in leaves]))
        e = jnp.frexp(jnp.where(jnp.isfinite(top) & (top > 0), top, 1))[1]
        scaled = jax.tree.map(lambda a: jnp.ldexp(jnp.asarray(a), -e), tree)
        # ‖θ‖² / 4^e, half-precision leaves in float32 (their squares summed over more than 65,504
        # entries overflow float16); wider leaves as optax sums them
        widened = jax.tree.map(lambda a: a.astype(at_least_float32(a.dtype)), scaled)
        squared = optax.tree.norm(widened, squared=True)
        radius = jnp.asarray(self.radius, dtype)
        if not is_concrete(self.radius):  # a traced radius (nj.fit passes it so): checkify, when asked
            traced.check(radius > 0, "l2_ball: radius must be positive.")
            traced.check(jnp.isfinite(jnp.asarray(self.radius)), "l2_ball: radius must be finite.")
        outside = squared > jnp.square(jnp.ldexp(radius, -e))  # ‖θ‖ > r
        factor = radius / jnp.sqrt(jnp.where(outside, squared, 1))  # r / ‖θ‖ · 2^e (finite gradient at 0)
        out = jax.tree.map(lambda a, b: jnp.where(outside, a * factor, b), scaled, tree)
        return _cast_like(out, tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Box(Projection):
    r"""Projection onto the box :math:`\{\theta : \text{lower} \le \theta \le \text{upper}\}`.

    ``lower`` and ``upper`` are each a scalar (the same bound for every entry) or a pytree with the
    structure of the parameters (leaves broadcastable to the parameter leaves). Implemented by
    :func:`optax.projections.projection_box` (an elementwise clip), with the bounds rounded inwards to
    each leaf's dtype, so the result lies in the box: ``upper = 0.1`` clips float32
    entries to 0.099999994, the largest float32 number ≤ 0.1 (0.1 in float32 is 0.10000000149).
    Built directly rather than by :func:`box`, concrete bounds are checked when called, as :func:`box`
    checks them (``ValueError`` for NaN, ``lower > upper``, ``[inf, inf]`` or a box that holds no number
    of the parameters' dtype); traced ones by a ``checkify`` check inside
    ``nlis_jax.traced_checks()``.
    """

    lower: Any
    upper: Any

    def __call__(self, tree: PyTree) -> PyTree:
        _check_bounds(self.lower, self.upper)  # built directly (not by box): its checks of concrete bounds
        check_floating("the parameters of a projection", tree)  # an integer leaf would be truncated
        check_finite("the projection's input", tree)  # a NaN entry would stay NaN, unclipped
        lower = inward_bounds(self.lower, tree, "lower")
        upper = inward_bounds(self.upper, tree, "upper")
        if not all(is_concrete(b) for b in jax.tree.leaves((self.lower, self.upper))):  # traced bounds
            ordered = jax.tree.map(lambda a, b: jnp.all(a <= b), lower, upper)
            traced.check(jnp.all(jnp.stack(jax.tree.leaves(ordered))), EMPTY_BOX_MESSAGE)
            if traced.enabled():  # [inf, inf] or [-inf, -inf]: no real point (every entry became inf)
                real = jax.tree.map(lambda a, b: jnp.all(~(jnp.isinf(a) & (a == b))), lower, upper)
                traced.check(
                    jnp.all(jnp.stack(jax.tree.leaves(real))),
                    "box: lower and upper are both inf or both -inf somewhere (no real number lies there).",
                )
        elif not all(
            np.all(a <= b) for a, b in zip(jax.tree.leaves(lower), jax.tree.leaves(upper), strict=True)
        ):
            dtypes = sorted({str(jnp.result_type(x)) for x in jax.tree.leaves(tree)})
            raise ValueError(
                f"box: no {'/'.join(dtypes)} number lies between lower and upper somewhere (rounded inwards "
                "to the parameters' dtype, the bounds cross)."
            )
        return _cast_like(projection_box(tree, lower, upper), tree)


#: The box has no point: ``lower > upper`` somewhere, after the bounds are rounded inwards to the
#: parameters' dtype (:func:`_inward`).
EMPTY_BOX_MESSAGE = "box: lower must be <= upper everywhere, in the parameters' dtype."


def _inward(bound: Any, dtype, name: str):
    """``bound`` in ``dtype``, rounded towards the inside of the box: a lower bound up, an upper bound down.

    Round to nearest could put the bound outside the box: ``lower = 1e-8`` is 0 in float16, so the
    clip let 0 through, and ``upper = 1e5`` is Inf there. Rounded inwards, the clip returns the
    nearest point of the box that ``dtype`` holds; when it holds none, the bounds come out crossed
    (``7e4 ≤ θ ≤ 8e4`` in float16: ``lower`` Inf, ``upper`` 65504) and :class:`Box` raises. A subnormal
    bound that would let 0 in (a lower bound in ``(0, tiny)``, an upper one in ``(-tiny, 0)``, ``tiny``
    the dtype's smallest normal number; float32, bfloat16, float64) becomes ``±tiny``: a CPU's clip flushes
    it to 0. A concrete bound becomes a numpy array (worked out on the host, also under a trace), a traced
    one a jax array.
    """
    lower = name == "lower"
    tiny = jnp.finfo(dtype).smallest_normal
    flushes = flushes_subnormals(dtype)  # float16 is clipped in float32, where its subnormals are normal
    if is_concrete(bound):
        given = np.asarray(bound, np.float64)
        with np.errstate(over="ignore"):  # a bound past the dtype's range is Inf, then stepped inwards
            out = given.astype(dtype)
        rounded = out.astype(np.float64)
        outward = rounded < given if lower else rounded > given
        out = np.where(outward, np.nextafter(out, np.asarray(np.inf if lower else -np.inf, dtype)), out)
        # a subnormal bound is 0 to a CPU's clip (it flushes them): a lower bound in (0, tiny) lets 0 in
        flushed_out = (out > 0) & (out < tiny) if lower else (out < 0) & (out > -tiny)
        return np.where(flushed_out & flushes, np.asarray(tiny if lower else -tiny, dtype), out)
    out = jnp.asarray(bound, dtype=dtype)
    wide = jnp.promote_types(jnp.result_type(bound), dtype)
    outward = out.astype(wide) < bound if lower else out.astype(wide) > bound
    out = jnp.where(outward, jnp.nextafter(out, jnp.asarray(np.inf if lower else -np.inf, dtype)), out)
    if not flushes:
        return out
    negative, magnitude = float_bits(out)  # on the bits: a CPU compares a subnormal as 0
    subnormal = (magnitude > 0) & (magnitude < float_bits(jnp.asarray(tiny, dtype))[1])
    flushed_out = subnormal & (~negative if lower else negative)
    return jnp.where(flushed_out, jnp.asarray(tiny if lower else -tiny, dtype), out)


def inward_bounds(bound: PyTree, tree: PyTree, name: str) -> PyTree:
    """A bound as a pytree with the structure of ``tree``, each leaf in that leaf's dtype."""
    tree_def = jax.tree.structure(tree)
    if jax.tree.structure(bound) == tree_def:
        leaves = jax.tree_util.tree_leaves_with_path(bound)
        for (path, b), x in zip(leaves, jax.tree.leaves(tree), strict=True):
            try:
                fits = np.broadcast_shapes(np.shape(b), np.shape(x)) == np.shape(x)
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(
                    f"box: {name}{jax.tree_util.keystr(path)} has shape {np.shape(b)}, which does not "
                    f"broadcast to the parameter's shape {np.shape(x)}."
                )
        return jax.tree.map(lambda b, x: _inward(b, jnp.result_type(x), name), bound, tree)
    leaves = jax.tree.leaves(bound)
    if len(leaves) == 1 and jax.tree.structure(bound).num_nodes == 1:
        if np.ndim(bound) != 0:  # an array is neither a scalar nor the parameters' structure
            raise ValueError(
                f"box: {name} must be a scalar or a pytree with the structure of the parameters "
                f"({tree_def}), got an array of shape {np.shape(bound)}."
            )
        return jax.tree.map(lambda x: _inward(bound, jnp.result_type(x), name), tree)
    raise ValueError(
        f"box: {name} must be a scalar or a pytree with the structure of the parameters "
        f"({tree_def}), got {jax.tree.structure(bound)}."
    )


def _as_number(name: str, value: Any) -> Any:
    """Python float for a concrete scalar (keeps builders hashable); tracers pass through."""
    if not is_concrete(value):
        return value
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
    out = check_real(name, value)
    if not np.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}.")
    return out


def l2_ball(radius: float) -> L2Ball:
    r"""Projection onto the l2 ball of the given radius, over the whole parameter pytree.

    Args:
        radius: positive radius :math:`R`.

    Returns:
        A callable ``tree -> tree`` computing
        :math:`\Pi(\theta) = \theta \cdot R / \max(\|\theta\|_2, R)`, where
        :math:`\|\theta\|_2^2` sums the squares of every leaf. Parameters holding NaN or Inf raise
        ``ValueError`` (concrete values; traced, a ``checkify`` check inside ``nlis_jax.traced_checks()``).

    Example:
        >>> import jax.numpy as jnp
        >>> proj = l2_ball(1.0)
        >>> out = proj({"w": jnp.array([3.0, 4.0])})
        >>> [round(float(v), 6) for v in out["w"]]
        [0.6, 0.8]
    """
    return L2Ball(_check_radius(radius))


def _check_radius(radius: Any) -> Any:
    """A concrete radius as a Python float, ``ValueError`` unless a finite positive scalar; a traced one
    passes through (checked inside the projection by ``checkify``, in ``nlis_jax.traced_checks()``)."""
    radius = _as_number("radius", radius)
    if is_concrete(radius) and not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}.")
    return radius


def _as_bound(name: str, bound: Any) -> Any:
    """Python float for a concrete scalar bound (keeps builders hashable); rejects NaN."""
    leaves = jax.tree.leaves(bound)
    if not leaves:
        raise ValueError(f"box: {name} is empty.")
    if jax.tree.structure(bound).num_nodes == 1 and np.ndim(bound) == 0 and is_concrete(bound):
        bound = check_real(name, bound)  # an int beyond float64 (-10**400) is infinite, as a float would be
        leaves = [bound]
    for leaf in leaves:
        if is_concrete(leaf) and np.any(np.isnan(np.asarray(leaf))):
            raise ValueError(f"box: {name} contains NaN (infinite bounds are fine).")
    return bound


def box(lower: Any, upper: Any) -> Box:
    r"""Projection onto the box ``lower <= theta <= upper`` (elementwise clip).

    Args:
        lower: scalar, or a pytree with the structure of the parameters (``-inf`` allowed).
        upper: scalar, or a pytree with the structure of the parameters (``+inf`` allowed).

    Returns:
        A callable ``tree -> tree`` computing
        :math:`\min(\max(\theta, \text{lower}), \text{upper})`. Parameters holding NaN or Inf raise
        ``ValueError``, as for :func:`l2_ball`.

    Example:
        >>> import jax.numpy as jnp
        >>> out = box(-1.0, 1.0)({"w": jnp.array([-3.0, 0.5, 2.0])})
        >>> [float(v) for v in out["w"]]
        [-1.0, 0.5, 1.0]
    """
    return Box(*_check_bounds(lower, upper))


def _check_bounds(lower: Any, upper: Any) -> tuple[Any, Any]:
    """The bounds of :func:`box` checked (``ValueError``: empty, NaN, ``lower > upper``, ``[inf, inf]``);
    concrete scalars as Python floats. Leaves that are traced are left to the ``checkify`` check of
    :meth:`Box.__call__`."""
    lower, upper = _as_bound("lower", lower), _as_bound("upper", upper)
    lo, hi = jax.tree.leaves(lower), jax.tree.leaves(upper)
    if len(lo) == 1:
        pairs = [(lo[0], b) for b in hi]
    elif len(hi) == 1:
        pairs = [(a, hi[0]) for a in lo]
    elif jax.tree.structure(lower) == jax.tree.structure(upper):
        pairs = list(zip(lo, hi, strict=True))
    else:
        raise ValueError("box: lower and upper must be scalars or pytrees of the same structure.")
    for a, b in pairs:
        if is_concrete(a) and is_concrete(b):
            a, b = np.asarray(a), np.asarray(b)
            np.broadcast_shapes(a.shape, b.shape)
            if np.any(a > b):
                raise ValueError("box: lower must be <= upper everywhere.")
            if np.any(np.isinf(a) & (a == b)):  # [inf, inf]: no real point, every entry projected to inf
                raise ValueError("box: lower and upper are the same infinite value: the box holds no number.")
    return lower, upper


def check_projection(projection) -> None:
    """``TypeError`` unless ``projection`` is ``None`` or callable (``tree -> tree``), and not one of the
    builders :func:`l2_ball` / :func:`box` themselves: ``l2_ball(params)`` returns a projection, which a
    step would otherwise take as the new params (silently, for scalar params)."""
    if projection is not None and not callable(projection):
        raise TypeError(f"projection must be a callable tree -> tree or None, got {projection!r}.")
    if projection is l2_ball or projection is box:
        raise TypeError(
            f"projection is the builder {projection.__name__}, not a projection: pass a built one, e.g. "
            "projection=nj.l2_ball(1.0) or nj.box(lower, upper)."
        )


def project_params(projection: Callable[[PyTree], PyTree]) -> optax.GradientTransformation:
    r"""The projection as an :class:`optax.GradientTransformation`; put it LAST in a chain.

    Its update maps the incoming updates :math:`u` to :math:`\Pi(\theta + u) - \theta`, so that
    ``optax.apply_updates(params, updates)`` lands on :math:`\Pi(\theta + u)`:
    ``tx = optax.chain(optax.adam(1e-2), project_params(l2_ball(1.0)))``. Any link placed after it
    would rescale the step and could leave the set again.

    It lands there only to the rounding of ``θ + δ`` in ``θ``'s dtype, about ``eps·|θ|`` per entry: a
    float32 entry 129 projected onto ``box(0, 0.1)`` lands on 0.100006, outside the box, and from 3e7 on
    0. Where the iterate must lie in the set exactly, project after the update instead, as
    :func:`nlis_jax.fit` and :func:`nlis_jax.make_train_step` (``projection=``) do.

    Args:
        projection: callable ``tree -> tree`` (e.g. ``l2_ball(1.0)``), or ``None`` for no constraint.

    Returns:
        A stateless ``GradientTransformation`` whose ``update`` requires ``params``.
    """
    check_projection(projection)
    proj = identity if projection is None else projection

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("project_params needs params: call tx.update(grads, state, params).")
        new_params = proj(optax.apply_updates(params, updates))
        delta = lambda new, old: (new - old).astype(jnp.result_type(old))
        deltas = jax.tree.map(delta, new_params, params)
        return deltas, state

    return optax.GradientTransformation(init_fn, update_fn)
