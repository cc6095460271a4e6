r"""Sampling scores of a (dual) matrix: leverage, row norms, linear baselines, uniform, mixing.

Leverage of row ``i`` of ``F`` (shape ``(n, m)``, rank ``r``):

.. math:: h_i = \|U_i\|^2 = \langle e_i, F F^\dagger e_i \rangle,\qquad \tau_i = h_i / r,

``U`` an orthonormal basis of ``range(F)``, computed by one of three exact routes chosen at run time
from the conditioning of the column-equilibrated Gram matrix (:mod:`nlis_jax.routes`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from nlis_jax import routes
from nlis_jax._checks import check_positive_int, check_probs, is_concrete
from nlis_jax._types import Array


class Leverage(NamedTuple):
    """Leverage scores with their by-products (``return_info=True`` of the leverage functions).

    Attributes:
      probs: ``(n,)`` sampling probabilities ``leverage / rank``.
      leverage: ``(n,)`` raw (block) leverage ``h_i``, summing to ``rank``.
      rank: int32 scalar rank (with ``ridge > 0``: the float effective dimension ``Σ h_i``).
      route: int32 index into :data:`nlis_jax.routes.ROUTES` of the route taken.
    """

    probs: Array
    leverage: Array
    rank: Array
    route: Array


def as_leverage(h: Array, rank: Array, route: Array, return_info: bool) -> Array | Leverage:
    """Probabilities ``h / rank``, or the whole :class:`Leverage` with ``return_info``."""
    probs = h / rank.astype(h.dtype)
    return Leverage(probs, h, rank, route) if return_info else probs


def orthonormal_basis(
    F: Array, *, rtol: float | None = None, route: str | None = None
) -> tuple[Array, Array, Array]:
    r"""An orthonormal basis ``U`` of ``range(F)``, its rank, and the route taken.

    Args:
      F: ``(n, m)`` matrix (or ``(n, k, m)``, treated as ``n·k`` rows).
      rtol: relative tolerance on the singular values of the column-equilibrated ``F`` for the rank
        (default ``10·eps`` of the dtype).
      route: force ``"gram"``, ``"gram2"``, ``"stable"`` or ``"shifted"``; default chooses from ``κ(FᵀF)``.

    Returns:
      ``(U, rank, route)``: ``U`` of shape ``(n·k, m)`` whose first ``rank`` columns span ``range(F)``
      (the others are zero, in some order), ``rank`` an int32 scalar, and ``route`` an index into
      :data:`nlis_jax.routes.ROUTES`.
    """
    routes.check_route(route)
    rows, _ = routes.as_rows(F)
    rtol = routes.default_rtol(rows.dtype) if rtol is None else rtol
    return routes.basis(rows, jnp.asarray(rtol, rows.dtype), route=route)


def leverage_scores(
    F: Array,
    *,
    rtol: float | None = None,
    ridge: float = 0.0,
    route: str | None = None,
    return_info: bool = False,
) -> Array | Leverage:
    r"""Leverage-score sampling probabilities :math:`\tau_i = h_i / \mathrm{rank}(F)`.

    Args:
      F: the dual matrix ``(n, p+1)``, or a block dual matrix ``(n, k, p+1)`` (block leverage: the sum
        of each example's ``k`` row leverages).
      rtol: rank tolerance relative to the largest singular value of the column-equilibrated ``F``
        (default ``10·eps`` of the dtype).
      ridge: ``λ ≥ 0``; with ``λ > 0`` ridge leverage ``h_i = [F (FᵀF + λI)^{-1} Fᵀ]_ii`` normalised by
        the effective dimension ``Σ h_i`` (computed from the eigenvalues of ``FᵀF``: route ``"gram"``).
      route: force ``"gram"``, ``"gram2"``, ``"stable"`` or ``"shifted"`` (default: chosen from the
        conditioning).
      return_info: return a :class:`Leverage` (probabilities, raw leverage, rank, route) instead.

    Returns:
      ``(n,)`` probabilities (non-negative, summing to 1), dtype of ``F``; or a :class:`Leverage`.
    """
    routes.check_route(route)
    rows, lead = routes.as_rows(F, check_values=ridge > 0)  # NaN/Inf: checked on the result below
    if ridge < 0:
        raise ValueError(f"ridge must be non-negative, got {ridge}.")
    if ridge > 0:
        h, eff_dim = routes.ridge_row_leverage(rows, jnp.asarray(ridge, rows.dtype), lead)
        return as_leverage(h, eff_dim, jnp.asarray(0, jnp.int32), return_info)
    rtol = routes.default_rtol(rows.dtype) if rtol is None else rtol
    h, rank, taken = routes.row_leverage(rows, jnp.asarray(rtol, rows.dtype), lead, route=route)
    routes.raise_if_nonfinite("F", F, h)
    return as_leverage(h, rank, taken, return_info)


def norm_scores(F: Array) -> Array:
    r"""Row-norm probabilities :math:`\|F_i\|^2 / \|F\|_F^2`; block Frobenius norms for ``(n, k, m)``."""
    rows, lead = routes.as_rows(F)
    sq = routes.sum_per_example(jnp.sum(jnp.square(rows), axis=1), lead)
    total = jnp.sum(sq)
    if is_concrete(total) and not float(total) > 0:
        raise ValueError("norm_scores: F is all zeros, so row norms give no distribution.")
    return sq / total


def linear_design(xs: Array, ys: Array | None = None, *, bias: bool = False) -> Array:
    """The linear baseline's data matrix ``[X, 1?, −y?]`` of shape ``(n, d + bias + (ys given))``."""
    xs = jnp.asarray(xs)
    if xs.ndim < 2:
        raise ValueError(f"xs must have shape (n, d, ...), got {xs.shape}.")
    X = xs.reshape(xs.shape[0], -1)
    cols = [X]
    if bias:
        cols.append(jnp.ones((X.shape[0], 1), X.dtype))
    if ys is not None:
        ys = jnp.asarray(ys)
        if ys.shape != (X.shape[0],):
            raise ValueError(f"ys must have shape ({X.shape[0]},) to match xs, got {ys.shape}.")
        cols.append(-ys.astype(X.dtype)[:, None])
    return jnp.concatenate(cols, axis=1)


def linear_leverage_scores(xs, ys=None, *, bias: bool = False, rtol: float | None = None) -> Array:
    """Leverage scores of the data matrix itself, ``[X, 1?, −y?]``: the linear baseline."""
    return leverage_scores(linear_design(xs, ys, bias=bias), rtol=rtol)


def linear_norm_scores(xs, ys=None, *, bias: bool = False) -> Array:
    """Row-norm scores of the data matrix ``[X, 1?, −y?]``: the linear baseline."""
    return norm_scores(linear_design(xs, ys, bias=bias))


def uniform_scores(n: int, dtype=None) -> Array:
    """``(n,)`` vector of ``1/n``."""
    check_positive_int("n", n)
    dtype = dtype or jnp.result_type(float)
    return jnp.full((n,), 1.0 / n, dtype)


def mix_with_uniform(probs: Array, alpha: float) -> Array:
    r"""``(1 − α)·p + α/n``: keeps every point reachable (``p_i ≥ α/n``).

    Args:
      probs: ``(n,)`` probabilities.
      alpha: mixing weight in ``[0, 1]``.
    """
    check_probs(probs)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    probs = jnp.asarray(probs)
    return (1 - alpha) * probs + alpha / probs.shape[0]
