r"""Power-of-two column scales of a row matrix seen only chunk by chunk (the streaming scores).

The dense scores multiply every column of ``A`` by the power of two :func:`nlis_jax.routes.column_scales`
of its max-abs (bringing it into ``[0.5, 1)``) when the unscaled Gram matrix would over- or underflow, so
that a column ``×1e154`` (float64) or ``×1e18`` (float32) neither overflows ``AᵀA`` nor, ``×1e-160``,
underflows it: leverage is then invariant under column scaling. Streaming never holds ``A``; it keeps the
running column max-abs ``a_j = max_c max_i |A_{ij}|`` over the chunks ``c`` seen so far, and the Gram
matrix of the rows scaled by ``s = column_scales(a)``, rescaled exactly (the ratio of two powers of two)
when a later chunk raises a maximum: ``G ← diag(r) G diag(r)`` with ``r = s_new / s_old``. At the end
``G = (A s)ᵀ(A s)``, the Gram matrix of the dense route's prescaled matrix up to rounding, and the later
passes scale each chunk's rows by the same ``s``.
"""

from __future__ import annotations

import jax.numpy as jnp

from nlis_jax import routes
from nlis_jax._types import Array


def scaled_gram_start(m: int, dtype) -> tuple[Array, Array]:
    """The empty accumulator ``(G (m, m) zeros, column max-abs (m,) zeros)``."""
    return jnp.zeros((m, m), dtype), jnp.zeros((m,), dtype)


def rescale_gram(G: Array, colmax_from: Array, colmax_to: Array) -> Array:
    """``G`` of rows scaled for ``colmax_from`` as that of rows scaled for ``colmax_to ≥ colmax_from``."""
    r = routes.column_scales(colmax_to) / routes.column_scales(colmax_from)  # exact: powers of two
    return G * r[:, None] * r[None, :]


def add_scaled_gram(G: Array, colmax: Array, rows: Array) -> tuple[Array, Array]:
    """One chunk into the running ``(G, colmax)``: maxima raised where ``rows`` need it, ``G`` rescaled."""
    new = jnp.maximum(colmax, jnp.max(jnp.abs(rows), axis=0))
    return rescale_gram(G, colmax, new) + routes.gram(scale_columns(rows, new)), new


def scale_columns(rows: Array, colmax: Array) -> Array:
    """``rows · column_scales(colmax)`` column by column (exact; zero columns stay zero)."""
    return rows * routes.column_scales(colmax)[None, :]
