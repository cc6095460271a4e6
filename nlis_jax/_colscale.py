r"""Power-of-two column scales of a row matrix seen only chunk by chunk (the streaming scores).

The dense scores multiply every column of ``A`` by the power of two ``2^{-e_j}`` that brings its
max-abs into ``[0.5, 1)`` before the Gram product (:func:`nlis_jax.routes.prescale_columns`), so that a
column ``×1e154`` (float64) or ``×1e18`` (float32) neither overflows ``AᵀA`` nor, ``×1e-160``, underflows
it: leverage is then invariant under column scaling. Streaming never holds ``A``; the same exponents
``e_j = max_c e_{cj}`` (``e_{cj}`` of the column max-abs of chunk ``c``) are found during the first
Gram pass, keeping the Gram matrix of the rows scaled by the running exponents and rescaling it exactly
(powers of two) when a later chunk raises one: ``G ← D_old G D_old`` with ``D_old = 2^{e_old − e_new}``.
At the end ``G = (A 2^{-e})ᵀ(A 2^{-e})``, the Gram matrix of the dense route's prescaled matrix up to
rounding, and the later passes scale each chunk's rows by the same ``2^{-e}``.
"""

from __future__ import annotations

import jax.numpy as jnp

from nlis_jax import routes
from nlis_jax._types import Array


def _sentinel(dtype) -> int:
    """An exponent below that of every non-zero value of ``dtype`` (the exponent of an all-zero column)."""
    info = jnp.finfo(dtype)
    return int(info.minexp) - int(info.nmant) - 2


def scaled_gram_start(m: int, dtype) -> tuple[Array, Array]:
    """The empty accumulator ``(G (m, m) zeros, e (m,) int32)``."""
    return jnp.zeros((m, m), dtype), jnp.full((m,), _sentinel(dtype), jnp.int32)


def chunk_exponents(rows: Array) -> Array:
    """``e_j`` with the column max-abs of ``rows`` in ``[2^{e_j - 1}, 2^{e_j})`` (a sentinel if zero)."""
    top = jnp.max(jnp.abs(rows), axis=0)
    _, e = jnp.frexp(top)
    return jnp.where(top > 0, e.astype(jnp.int32), _sentinel(rows.dtype))


def rescale_gram(G: Array, e_from: Array, e_to: Array) -> Array:
    """``G`` of rows scaled by ``2^{-e_from}`` as that of rows scaled by ``2^{-e_to}`` (``e_to ≥ e_from``)."""
    d = e_from - e_to
    return jnp.ldexp(G, d[:, None] + d[None, :])


def add_scaled_gram(G: Array, e: Array, rows: Array) -> tuple[Array, Array]:
    """One chunk into the running ``(G, e)``: the exponents raised where ``rows`` need it, ``G`` rescaled."""
    e_new = jnp.maximum(e, chunk_exponents(rows))
    scaled = scale_columns(rows, e_new)
    return rescale_gram(G, e, e_new) + routes.gram(scaled), e_new


def scale_columns(rows: Array, e: Array) -> Array:
    """``rows · 2^{-e}`` column by column (exact; zero columns stay zero)."""
    return jnp.ldexp(rows, -e[None, :])
