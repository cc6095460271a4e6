r"""The Khatri–Rao projection of dual rows: dense-layer weight blocks never formed.

For a weight matrix ``W`` (shape ``r₀ × r₁``) used by the model only in matrix products (a tap of
:mod:`nlis_jax._taps`), the ``W``-block of the adjoint of example ``x`` is

.. math:: f^*_W(\theta; x) = \sum_q w_q \sum_{\text{taps}} \sum_s \delta_{qs} \otimes h_{qs}

(``δ`` the product's output cotangent and ``h`` its other operand, both at ``t_q θ``). The embedding
rows of ``W`` are Khatri–Rao products: column ``c`` of the block is ``u_c ⊗ v_c`` with ``U (r₀ × dim)``
and ``V (r₁ × dim)`` Gaussian, ``Ω_W[(a, b), c] = U[a, c] V[b, c] / √dim``. Its projection is then

.. math:: (f^*_W Ω_W)_c = \frac{1}{\sqrt{dim}} \sum_q w_q \sum_s (\delta_{qs}^\top U)_c\,(h_{qs}^\top V)_c

(axes swapped when ``δ`` runs along ``W``'s second axis): ``(|δ| + |h|)·dim`` multiply-adds per node, tap
and example, in matrix products over a chunk, instead of ``r₀ r₁`` per node. When ``h`` does not depend
on the parameters (a first layer's input) it is the same at every node and ``δ`` is summed over the nodes
first. The other coordinates (biases, parameters used otherwise, the offset ``f(0) − y``) go through the
per-example vjp and a dense Gaussian ``(p_rest + 1) × dim`` block.

Exactness: every entry of ``Ω`` is a polynomial in independent Gaussians, so an ``r × r`` minor of
``F̃ Ω`` is either zero almost surely or identically zero; choosing the factors as standard basis vectors
(other blocks zero) realises any column of ``I``, so for ``r = min(rank F̃, dim)`` some choice makes the
minor non-zero, hence ``rank(F̃ Ω) = min(rank F̃, dim)`` almost surely, and ``dim ≥ rank(F̃)`` gives the
exact leverage. ``E[Ω Ωᵀ] = I`` as for the dense Gaussian embedding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nlis_jax._adjoint import CHUNK_ELEMENTS, origin
from nlis_jax._taps import (
    Program,
    Tap,
    evaluate,
    example_activation_size,
    find_taps,
    tap_operands,
    trace_program,
)
from nlis_jax._types import Array, PRNGKey, PyTree

#: ``embedding="auto"`` takes the Khatri–Rao route when some weight matrix is tapped and its estimated
#: multiply-adds per example (:func:`khatri_rao_cost`) are at most this many times ``q·k·(p+1)``, the
#: size of the per-node gradients the generic route forms (the measurements behind the value are in
#: benchmarks/README.md, section (d)).
KHATRI_RAO_COST_RATIO = 12


class Factored(NamedTuple):
    """A model's taps, split into factored (tapped) and remaining parameter leaves."""

    program: Program
    taps: tuple[Tap, ...]  # the taps of the factored leaves, in equation order
    leaves: tuple[int, ...]  # factored leaf indices (2-D, used only in tapped products)
    rest: tuple[int, ...]  # all other leaf indices
    shapes: tuple[tuple[int, ...], ...]  # shapes of all leaves


def analyse(apply_fn, params: PyTree, xs: PyTree) -> Factored:
    """Trace ``apply_fn`` on the first example of ``xs`` and split the leaves (shapes only)."""
    program = trace_program(apply_fn, params, jax.tree.map(lambda a: a[0], xs))
    taps = find_taps(program)
    leaves = tuple(sorted({tap.leaf for tap in taps}))
    shapes = tuple(tuple(jnp.shape(a)) for a in jax.tree.leaves(params))
    rest = tuple(i for i in range(len(shapes)) if i not in leaves)
    return Factored(program, taps, leaves, rest, shapes)


def _tap_sizes(fac: Factored, tap: Tap) -> tuple[int, int, int]:
    """``(S, |δ|, |h|)`` of a tap: terms of its outer-product sum and the sizes of each factor."""
    out = fac.shapes[tap.leaf][tap.delta_axis]
    inner = fac.shapes[tap.leaf][1 - tap.delta_axis]
    size = math.prod(fac.program.avals[fac.program.eqns[tap.eqn].outs[0]].shape)
    return size // out, out, inner


def khatri_rao_cost(fac: Factored, k: int, dim: int, num_nodes: int) -> int:
    """Estimated multiply-adds per example of the projection (model evaluations not counted)."""
    cost = k * (_num_rest(fac) + 1) * dim
    for tap in fac.taps:
        s, out, inner = _tap_sizes(fac, tap)
        cost += (1 if tap.node_free else num_nodes) * s * (k * out + inner + k) * dim
    return cost


def _num_rest(fac: Factored) -> int:
    return sum(math.prod(fac.shapes[i]) for i in fac.rest)


def default_chunk(fac: Factored, n: int, k: int, dim: int) -> int:
    """Examples per chunk: the chunk's carried and temporary arrays near ``CHUNK_ELEMENTS / 8``.

    Smaller than the generic route's budget: the products here run faster on cache-sized chunks (a few
    hundred examples of a 784–256–1 MLP; benchmarks/README.md, section (d)).
    """
    per_example = k * (_num_rest(fac) + 1 + dim) + example_activation_size(fac.program)
    for tap in fac.taps:
        s, out, inner = _tap_sizes(fac, tap)
        per_example += s * (k * out + inner + (k + 1) * dim)
    return max(1, min(n, CHUNK_ELEMENTS // (8 * per_example)))


class Embedding(NamedTuple):
    """Khatri–Rao factors ``(U, V)`` of each factored leaf and the dense block of the other coordinates."""

    factors: tuple[tuple[Array, Array], ...]  # aligned with Factored.leaves
    rest: Array  # (p_rest + 1, dim), N(0, 1/dim)


def khatri_rao_embedding(key: PRNGKey, fac: Factored, dim: int, dtype) -> Embedding:
    """Draw the embedding (``key`` used once; ``U ~ N(0, 1/dim)``, ``V ~ N(0, 1)``, rest ``N(0, 1/dim)``)."""
    k_rest, k_factors = jax.random.split(key)
    scale = 1 / jnp.sqrt(jnp.asarray(dim, dtype))
    rest = jax.random.normal(k_rest, (_num_rest(fac) + 1, dim), dtype) * scale
    factors = []
    for leaf, k_leaf in zip(fac.leaves, jax.random.split(k_factors, max(1, len(fac.leaves))), strict=False):
        k_u, k_v = jax.random.split(k_leaf)
        r0, r1 = fac.shapes[leaf]
        u = jax.random.normal(k_u, (r0, dim), dtype) * scale
        factors.append((u, jax.random.normal(k_v, (r1, dim), dtype)))
    return Embedding(tuple(factors), rest)


def embedding_matrix(emb: Embedding, fac: Factored) -> Array:
    """The explicit ``(p + 1) × dim`` matrix ``Ω`` (rows in ``ravel_pytree`` order, offset last)."""
    blocks, rest_rows = [], 0
    for i, shape in enumerate(fac.shapes):
        if i in fac.leaves:
            u, v = emb.factors[fac.leaves.index(i)]
            blocks.append((u[:, None, :] * v[None, :, :]).reshape(-1, u.shape[1]))
        else:
            size = math.prod(shape)
            blocks.append(emb.rest[rest_rows : rest_rows + size])
            rest_rows += size
    return jnp.concatenate([*blocks, emb.rest[-1:]])


def _point(fac: Factored, leaves_t, x_leaves, k: int, dtype):
    """Gradients at one point ``tθ`` for one example: rest ``(k, p_rest)`` and each tap's ``(δ, h)``."""
    avals = [fac.program.avals[fac.program.eqns[tap.eqn].outs[0]] for tap in fac.taps]

    def f(rest, perturbations):
        full = list(leaves_t)
        for i, value in zip(fac.rest, rest, strict=True):
            full[i] = value
        return evaluate(fac.program, full, x_leaves, fac.taps, perturbations)

    rest0 = [leaves_t[i] for i in fac.rest]
    zeros = [jnp.zeros(a.shape, a.dtype) for a in avals]
    out, vjp_fn, operands = jax.vjp(f, rest0, zeros, has_aux=True)
    if jnp.ndim(out) == 0:
        grads = jax.tree.map(lambda a: a[None], vjp_fn(jnp.ones_like(out)))
    else:
        grads = jax.vmap(vjp_fn)(jnp.eye(k, dtype=out.dtype))
    rest_flat = [g.reshape(k, -1).astype(dtype) for g in grads[0]]
    rest_flat = jnp.concatenate(rest_flat, axis=1) if rest_flat else jnp.zeros((k, 0), dtype)
    ops = tuple(
        tuple(a.astype(dtype) for a in tap_operands(tap, d, h, k))
        for tap, d, h in zip(fac.taps, grads[1], operands, strict=True)
    )
    return rest_flat, ops


def _tap_projection(emb: Embedding, fac: Factored, tap: Tap, delta: Array, h: Array) -> Array:
    """``Σ_s (δ_s U_δ) ⊙ (h_s U_h)`` of a chunk: ``δ (c, k, S, out)``, ``h (c, S, in)`` -> ``(c, k, dim)``."""
    factors = emb.factors[fac.leaves.index(tap.leaf)]
    a = delta @ factors[tap.delta_axis]
    b = h @ factors[1 - tap.delta_axis]
    return jnp.einsum("cksd,csd->ckd", a, b)


def project_chunk(
    fac: Factored, emb: Embedding, leaves, xc: PyTree, offset: Array, nodes: Array, weights: Array, k: int
) -> Array:
    """``F̃_c Ω`` for a chunk of examples ``xc`` (offset ``(c, k)``): ``(c, k, dim)``, by a scan over nodes."""
    dtype = emb.rest.dtype
    x_leaves = jax.tree.leaves(xc)

    def at_node(t):
        leaves_t = [t.astype(a.dtype) * a for a in leaves]
        return jax.vmap(lambda *xl: _point(fac, leaves_t, xl, k, dtype))(*x_leaves)

    free = [i for i, tap in enumerate(fac.taps) if tap.node_free]
    shapes = jax.eval_shape(at_node, nodes[0])
    proj0 = jnp.zeros(offset.shape + (emb.rest.shape[1],), dtype)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], tuple(shapes[1][i] for i in free)))

    def body(carry, tw):
        t, w = tw
        (rest_acc, free_acc), proj = carry
        rest_g, ops = at_node(t)
        for i, tap in enumerate(fac.taps):
            if not tap.node_free:
                proj = proj + w * _tap_projection(emb, fac, tap, *ops[i])
        free_acc = tuple((acc[0] + w * ops[i][0], ops[i][1]) for acc, i in zip(free_acc, free, strict=True))
        return ((rest_acc + w * rest_g, free_acc), proj), None

    (rest_acc, free_acc), proj = lax.scan(body, (init, proj0), (nodes, weights))[0]
    for (delta, h), i in zip(free_acc, free, strict=True):
        proj = proj + _tap_projection(emb, fac, fac.taps[i], delta, h)
    rows = jnp.concatenate([rest_acc, offset[..., None].astype(dtype)], axis=-1)
    return proj + rows @ emb.rest


def zero_outputs(fac: Factored, leaves, xc: PyTree) -> Array:
    """``f(0; x)`` for a chunk of examples: ``(c,) + out_shape``."""
    zeros = origin(list(leaves))
    return jax.vmap(lambda *xl: evaluate(fac.program, zeros, xl, (), ())[0])(*jax.tree.leaves(xc))
