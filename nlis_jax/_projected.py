r"""Projected leverage for models with many parameters: one streaming pass, exact when wide enough.

The dual rows ``F̃_c = [F*_c | f(0) − y_c]`` of each chunk of examples are formed (per-example adjoints at
the Gauss-Legendre nodes, as in :func:`nlis_jax.dual_matrix`) and at once multiplied by a random
embedding ``Ω`` of shape ``(p+1) × dim``; only ``Y = F̃ Ω`` (``n × dim``) is kept, and its exact leverage
is taken with the dense score routes. Memory ``O(chunk·p + n·dim + dim²)``: neither ``n·p`` nor
``(p+1)²`` is ever held.

Exactness: ``range(F̃ Ω) ⊆ range(F̃)`` always, with equality iff ``rank(F̃ Ω) = rank(F̃)``; then the
leverage of ``Y`` equals that of ``F̃``. For a Gaussian ``Ω`` this holds almost surely once
``dim ≥ rank(F̃)``, and equally for the Khatri–Rao embedding (its entries are polynomials in independent
Gaussians; see :mod:`nlis_jax._factored`). The sparse sign embedding is a discrete random matrix, so for
``rank(F̃) ≤ dim < p + 1`` rank preservation holds with high probability, not almost surely (compare the
returned ``rank`` with the rank you expect; with ``sparsity = s > 1`` the rank is lost far more often
until ``dim`` reaches ``(p + 1)·s``: at ``p + 1 = 27``, ``s = 2``, 19 of 40 keys at ``dim = 28``, 5 of 40 at
36); for ``dim ≥ (p + 1)·sparsity`` its hashing is injective, so ``Y`` is ``F̃`` with signed, permuted
columns and the scores are exact for every key. Below the rank the scores are those of a randomly
embedded ``F̃``: an approximation whose quality grows with ``dim`` but which is biased, not only noisy
(leverage is not linear in ``ΩΩᵀ``): averaged over keys the scores approach a ridge leverage of ``F̃``
(``λ`` of the order of the discarded ``Σ_{j>dim} σ_j²/dim``), so rows whose leverage lies in the small
singular directions are under-weighted (0.13× their exact probability in a coherent linear example at
``dim = 56``, rank 61, where total variation was only 0.014) and no ``β`` of :func:`nlis_jax.sample_size`
is guaranteed. With ``ridge > 0`` exactness needs ``ΩΩᵀ = I`` too, not only the rank: the sparse
embedding at ``dim ≥ (p + 1)·sparsity`` stays exact, the mixing ones (``"gaussian"``, ``"khatri_rao"``,
and ``"auto"`` when it picks the latter) do not (31–41% off at ``dim = p + 1``, decreasing roughly as
``1/√dim``). Measured in the thirty-sixth session's audit.

In floating point, "almost surely" needs columns of comparable scale: ``Ω`` mixes the columns of ``F̃``
before any equilibration (the dense routes equilibrate, so their leverage does not change when a column
is rescaled), and a column far smaller than those it is mixed with is lost to their rounding. Measured:
a linear model whose columns' squared norms differ by 1e6 lost a direction in float32 (1e16 in float64),
and a float32 tanh MLP with one input feature scaled by 1e-5 had rank 18 of 21 with ``"khatri_rao"`` or
``"gaussian"`` at ``dim = 24`` (scores 18% off). The sparse embedding with ``dim ≥ (p + 1)·sparsity``
mixes no columns and keeps them. Standardise the inputs (and so the parameters' scales), or compare the
returned rank with :func:`nlis_jax.leverage_scores` on a subset.

Embeddings (``embedding=``):

- ``"auto"`` (default): ``"khatri_rao"`` when the model has tapped weight matrices and that route's
  estimated multiply-adds per example are at most ``KHATRI_RAO_COST_RATIO`` (in
  :mod:`nlis_jax._factored`) times ``q·k·(p+1)`` (the per-node gradients the generic route forms), with
  a fixed ``num_nodes`` and ``mode`` other than ``"forward"``; otherwise ``"sparse"``. A model without a
  tappable weight matrix gets exactly the sparse sign route.
- ``"khatri_rao"``: the weight matrices ``W`` (``r₀ × r₁``) that the model uses only in matrix products
  (``dot_general`` with a 2-D parameter leaf, possibly transposed or cast; found by tracing ``apply_fn``
  to a jaxpr, so pure-JAX models and flax ``nn.Dense`` alike) get Khatri–Rao rows
  ``Ω_W[(a, b), c] = U[a, c] V[b, c] / √dim`` (``U``, ``V`` Gaussian). Since ``∂f/∂W = Σ_s δ_s ⊗ h_s``
  (``δ`` the product's output cotangent, ``h`` its other operand, at each node ``t_q θ``), the ``W``-part
  of a projected row is ``Σ_q w_q Σ_s (δ_qsᵀ U) ⊙ (h_qsᵀ V) / √dim``: ``(r₀ + r₁)·dim`` work per node and
  example in matrix products, the ``p``-sized gradient never formed (``h`` free of θ, e.g. the input,
  is shared by the nodes: ``δ`` is summed over them first). Biases, parameters used in any other way and
  the offset column go through per-example vjps and a dense Gaussian block (``N(0, 1/dim)``). Exact
  almost surely when ``dim ≥ rank(F̃)``, like ``"gaussian"``; falls back to ``"gaussian"`` when nothing
  is tapped. Needs a fixed ``num_nodes`` and reverse mode.
- ``"sparse"``: a sparse sign embedding (CountSketch for ``sparsity = 1``; OSNAP-style blocks
  for ``sparsity = s > 1``). The ``dim`` buckets are split into ``s`` blocks of ``dim / s``; in each block
  every coordinate lands in exactly one bucket with a random sign ``±1/√s``. Buckets are balanced: a
  random permutation ``π`` of the coordinates gives bucket ``π(i) mod (dim / s)``. Applied as one
  ``segment_sum`` per block: ``O(chunk·p·s)`` work per chunk, nothing of size ``p·dim``.
- ``"gaussian"``: dense ``Ω`` with ``N(0, 1/dim)`` entries, ``O(chunk·p·dim)`` work and ``p·dim`` memory:
  the reference embedding (almost-sure exactness for ``dim ≥ rank``), not the fast one.

All satisfy ``E[Ω Ωᵀ] = I``, so ``YᵀY``-based quantities are unbiased for ``F̃ᵀF̃``-based ones; the ridge
leverage of ``Y``, a nonlinear function of ``Y``, estimates that of ``F̃`` with a bias (see above).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nlis_jax import _traced as traced
from nlis_jax._adjoint import (
    check_model,
    check_path_args,
    count_bad_examples,
    default_chunk_size,
    fixed_rule_chunk_size,
    flatten_model,
    in_float32,
    model_mode,
    nonfinite_dual_rows,
    resolve_mode,
)
from nlis_jax._checks import (
    check_bool,
    check_choice,
    check_key,
    check_positive_int,
    check_real,
    is_concrete,
    report_nonfinite,
)
from nlis_jax._dual import dual_block
from nlis_jax._factored import (
    KHATRI_RAO_COST_RATIO,
    analyse,
    default_chunk,
    khatri_rao_cost,
    khatri_rao_embedding,
    project_chunk,
    zero_outputs,
)
from nlis_jax._passes import device_chunk, strided_chunks
from nlis_jax._precision import highest_precision
from nlis_jax._scores import Leverage, leverage_scores
from nlis_jax._types import ApplyFn, Array, PRNGKey, PyTree
from nlis_jax.quadrature import gauss_legendre

EMBEDDINGS = ("auto", "sparse", "gaussian", "khatri_rao")


def sparse_embedding(key: PRNGKey, m: int, dim: int, sparsity: int, dtype) -> tuple[Array, Array]:
    """Buckets and signs of a balanced sparse sign embedding of ``m`` coordinates into ``dim``.

    Returns ``(buckets, signs)``, both of shape ``(sparsity, m)``: in block ``j`` coordinate ``i`` goes
    to bucket ``buckets[j, i]`` (in ``[j·b, (j+1)·b)``, ``b = dim / sparsity``) with weight
    ``signs[j, i] = ±1/√sparsity``. Bucket ``π_j(i) mod b`` for a random permutation ``π_j``: every bucket
    holds ``⌊m/b⌋`` or ``⌈m/b⌉`` coordinates, and for ``b ≥ m`` no two coordinates share one.
    """
    b = dim // sparsity
    kp, ks = jax.random.split(key)
    perms = jax.vmap(lambda k: jax.random.permutation(k, m))(jax.random.split(kp, sparsity))
    buckets = perms % b + b * jnp.arange(sparsity, dtype=perms.dtype)[:, None]
    signs = jax.random.rademacher(ks, (sparsity, m), dtype) / jnp.sqrt(jnp.asarray(sparsity, dtype))
    return buckets, signs


def apply_sparse(F: Array, buckets: Array, signs: Array, dim: int) -> Array:
    """``F Ω`` for the embedding of :func:`sparse_embedding`: ``(rows, m) -> (rows, dim)``.

    One ``segment_sum`` of the signed columns per block: about ``rows·m·sparsity`` operations.
    """
    Ft = F.T
    out = jnp.zeros((dim, F.shape[0]), F.dtype)
    for j in range(buckets.shape[0]):  # sparsity ≤ a handful of static blocks, not a loop over data
        out = out + jax.ops.segment_sum(Ft * signs[j][:, None], buckets[j], num_segments=dim)
    return out.T


def gaussian_embedding(key: PRNGKey, m: int, dim: int, dtype) -> Array:
    """Dense ``Ω`` of shape ``(m, dim)`` with ``N(0, 1/dim)`` entries."""
    return jax.random.normal(key, (m, dim), dtype) / jnp.sqrt(jnp.asarray(dim, dtype))


@functools.partial(
    traced.jit,
    static_argnames=("apply_fn", "dim", "chunk_size", "num_nodes", "mode", "embedding", "sparsity"),
)
@highest_precision
def _projected_jit(key, apply_fn, params, xs, ys, *, dim, chunk_size, num_nodes, mode, embedding, sparsity):
    # half precision (float16, bfloat16) in float32, as the adjoints: rounding Y to half precision put
    # noise at 1e-3 of its largest entry, which the float32 rank tolerance counted as rank (88 for 22)
    params, xs = in_float32(params), in_float32(xs)
    model = flatten_model(apply_fn, params, xs)
    n, m = model.n, model.theta.shape[0] + 1
    k = math.prod(model.out_shape)
    if embedding in ("auto", "khatri_rao") and num_nodes is not None and mode != "forward":
        fac = analyse(apply_fn, params, xs)
        cheaper = khatri_rao_cost(fac, k, dim, num_nodes) <= KHATRI_RAO_COST_RATIO * num_nodes * k * m
        if fac.leaves and (embedding == "khatri_rao" or cheaper):
            return _khatri_rao_rows(key, fac, model, params, xs, ys, dim, chunk_size, num_nodes)
    embedding = {"auto": "sparse", "khatri_rao": "gaussian"}.get(embedding, embedding)
    dtype = model.theta.dtype
    chunk = device_chunk(n, chunk_size or default_chunk_size(n, m, k))
    if embedding == "sparse":
        buckets, signs = sparse_embedding(key, m, dim, sparsity, dtype)

        def project(rows):
            return apply_sparse(rows, buckets, signs, dim)
    else:
        omega = gaussian_embedding(key, m, dim, dtype)

        def project(rows):
            return rows @ omega

    inner = chunk  # examples per vectorised adjoint call: the chunk, or for convolutions the adjoint's own
    if model.convolves and num_nodes is not None:  # (on a CPU at most the memory chunk: cache_chunk_size)
        inner = fixed_rule_chunk_size(chunk, m - 1, k, resolve_mode(mode, m - 1, k), convolves=True)

    def one_chunk(chunk_data):
        xc, yc = chunk_data
        block = dual_block(model, xc, yc, num_nodes=num_nodes, mode=mode, chunk_size=inner)
        return project(block.reshape(chunk * k, m)).reshape((chunk,) + model.out_shape + (dim,))

    return _map_strided(one_chunk, xs, ys, n, chunk, dtype)


def _map_strided(one_chunk, xs, ys, n: int, chunk: int, dtype) -> Array:
    """``one_chunk((x, y))`` over strided chunks (:func:`~nlis_jax._passes.strided_chunks`: a row-sharded
    ``xs`` stays sharded, no row gathered onto every device), the rows of ``Y`` back in order."""
    ys_c = None if ys is None else strided_chunks(jnp.asarray(ys).astype(dtype), n, chunk)[0]
    Y = lax.map(one_chunk, (strided_chunks(xs, n, chunk)[0], ys_c))  # (m, chunk, ...): row c·m + i
    return jnp.moveaxis(Y, 0, 1).reshape((-1,) + Y.shape[2:])[:n]


def _khatri_rao_rows(key, fac, model, params, xs, ys, dim, chunk, nodes):
    """``F̃ Ω`` with the Khatri–Rao embedding of :mod:`nlis_jax._factored`, streamed in chunks."""
    n, k, dtype = model.n, math.prod(model.out_shape), model.theta.dtype
    leaves = jax.tree.leaves(params)
    emb = khatri_rao_embedding(key, fac, dim, dtype)
    t, w = gauss_legendre(nodes, dtype)
    chunk = device_chunk(n, chunk or default_chunk(fac, n, k, dim))

    def one_chunk(chunk_data):
        xc, yc = chunk_data
        offset = zero_outputs(fac, leaves, xc).astype(dtype).reshape(chunk, k)
        if yc is not None:
            offset = offset - yc.reshape(chunk, k)
        Yc = project_chunk(fac, emb, leaves, xc, offset, t, w, k)
        return Yc.reshape((chunk,) + model.out_shape + (dim,))

    return _map_strided(one_chunk, xs, ys, n, chunk, dtype)


def _check_embedding(dim, chunk_size, embedding, sparsity, num_nodes, mode) -> tuple[int, int | None, int]:
    """The embedding's options checked; ``(dim, chunk_size, sparsity)`` as Python ints (static
    arguments: a numpy integer would compile a second program)."""
    dim = check_positive_int("dim", dim)
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    check_choice("embedding", embedding, EMBEDDINGS)
    sparsity = check_positive_int("sparsity", sparsity)
    if embedding == "khatri_rao" and (num_nodes is None or mode == "forward"):
        raise ValueError(
            "embedding='khatri_rao' needs a fixed num_nodes and reverse mode (per-example vjps), got "
            f"num_nodes={num_nodes}, mode={mode!r}."
        )
    if embedding in ("gaussian", "khatri_rao") and sparsity != 1:  # it would be ignored (and compiled)
        raise ValueError(
            f"sparsity={sparsity} is an option of the sparse embedding; embedding={embedding!r} has none "
            "(leave sparsity=1, or use embedding='sparse')."
        )
    if embedding in ("sparse", "auto") and dim % sparsity:
        raise ValueError(f"dim={dim} must be a multiple of sparsity={sparsity} (equal-size hash blocks).")
    return dim, chunk_size, sparsity


def _check_ridge(ridge) -> float:
    ridge = check_real("ridge", ridge)
    if math.isnan(ridge) or math.isinf(ridge):
        raise ValueError(f"ridge must be a finite number, got {ridge}.")
    if ridge < 0:
        raise ValueError(f"ridge must be non-negative, got {ridge}.")
    return ridge


@traced.entry
def projected_dual_matrix(
    key: PRNGKey,
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    ys: Array | None = None,
    *,
    dim: int,
    chunk_size: int | None = None,
    num_nodes: int | None = 16,
    mode: str = "auto",
    embedding: str = "auto",
    sparsity: int = 1,
) -> Array:
    r"""``Y = F̃(θ) Ω``: the dual matrix times a random ``(p+1) × dim`` embedding, streamed in chunks.

    Args:
      key: PRNG key of the embedding (used once).
      apply_fn, params, xs, ys, mode: as in :func:`nlis_jax.dual_matrix`.
      num_nodes: Gauss–Legendre nodes of the adjoint, **16 by default** (a fixed rule: exact for
        integrands polynomial of degree ≤ 31 along the path, not certified; a kink on the path, e.g. a
        ReLU with a bias, left a ReLU model's scores 7% off), where :func:`nlis_jax.dual_matrix` defaults
        to the certified adaptive rule: pass ``num_nodes=None`` for that rule (embeddings ``"sparse"``
        and ``"gaussian"``; ``"khatri_rao"`` needs a fixed rule).
      dim: columns of the embedding (``dim ≥ p + 1`` is allowed; ``"sparse"`` is exact for every key from
        ``dim ≥ (p + 1)·sparsity``, see :func:`projected_leverage_scores`).
      chunk_size: examples whose dual rows are held at once (static; memory ``chunk_size·k·(p+1)``,
        for ``"khatri_rao"`` about ``chunk_size`` times the model's activations plus the tapped
        products' ``δ`` and ``h``); default keeps a chunk under ``2**23`` elements.
      embedding: ``"auto"`` (default), ``"khatri_rao"`` (outer-product form of dense-layer gradients),
        ``"sparse"`` (sparse sign / CountSketch, ``O(p·sparsity)`` per row) or ``"gaussian"`` (see the
        module docstring).
      sparsity: nonzeros per coordinate of the sparse embedding (``dim`` must be a multiple of it);
        ``ValueError`` other than 1 with ``"gaussian"`` or ``"khatri_rao"``.

    Returns:
      ``(n, dim)``, or ``(n, k, dim)`` for ``k`` outputs, in the dtype of ``params``.
    """
    Y = _projected_wide(key, apply_fn, params, xs, ys, dim, chunk_size, num_nodes, mode, embedding, sparsity)
    out = Y.astype(_params_dtype(params))
    if out.dtype != Y.dtype and is_concrete(out) and not bool(_all_finite_jit(out)):
        raise ValueError(
            f"Y = F̃Ω (computed in {Y.dtype}) overflows the params' dtype {out.dtype}: use "
            "projected_leverage_scores (which scores Y in float32) or float32 params."
        )
    return out


def _params_dtype(params) -> jnp.dtype:
    """The floating dtype of the flattened ``params`` (results of half-precision models are cast to it)."""
    return jnp.result_type(*jax.tree.leaves(params))


def _projected_wide(key, apply_fn, params, xs, ys, dim, chunk_size, num_nodes, mode, embedding, sparsity):
    """:func:`projected_dual_matrix` checked and computed, in float32 for half-precision models."""
    check_key("key", key)
    _check_not_blocks(xs, ys)
    num_nodes, *_ = check_path_args(num_nodes, mode, None, inputs=(params, xs, ys))
    dim, chunk_size, sparsity = _check_embedding(dim, chunk_size, embedding, sparsity, num_nodes, mode)
    shape = check_model(apply_fn, params, xs, ys)
    kw = dict(dim=dim, chunk_size=chunk_size, num_nodes=num_nodes, mode=model_mode(mode, shape))
    Y = _projected_jit(key, apply_fn, params, xs, ys, **kw, embedding=embedding, sparsity=sparsity)
    # a NaN or Inf dual row gives a NaN row of Y (its example only): one small reduction
    report_nonfinite(_count_bad_jit(Y), Y.shape[0], nonfinite_dual_rows)
    return Y


def _check_not_blocks(xs, ys) -> None:
    """``ValueError`` for numpy blocks under ``jax.distributed``: each process would score its own rows as
    if they were the whole data (probabilities summing to 1 per process), where the streaming scores
    and :func:`nlis_jax.weighted_loss` join the blocks of all processes."""
    if jax.process_count() > 1 and any(isinstance(a, np.ndarray) for a in jax.tree.leaves((xs, ys))):
        raise ValueError(
            "under jax.distributed, the projected scores take global arrays: numpy blocks would be "
            "scored per process as separate data sets. Join the blocks of all processes first, "
            "xs, ys = nlis_jax.distributed.shard_rows((xs_block, ys_block)), or use "
            "streaming_leverage_scores, which joins numpy blocks itself."
        )


_count_bad_jit = traced.jit(count_bad_examples)
_all_finite_jit = traced.jit(lambda a: jnp.all(jnp.isfinite(a)))


@traced.entry
def projected_leverage_scores(
    key: PRNGKey,
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    ys: Array | None = None,
    *,
    dim: int,
    chunk_size: int | None = None,
    num_nodes: int | None = 16,
    mode: str = "auto",
    ridge: float = 0.0,
    rtol: float | None = None,
    embedding: str = "auto",
    sparsity: int = 1,
    return_info: bool = False,
) -> Array | Leverage:
    r"""Leverage-score probabilities of the dual matrix from its random projection ``Y = F̃ Ω``.

    One streaming pass forms ``Y`` (:func:`projected_dual_matrix`), then the exact leverage of ``Y``
    (block leverage, summed over the ``k`` rows of an example, for ``k`` outputs). Exact, i.e. equal to
    ``leverage_scores(dual_matrix(..., num_nodes=num_nodes))``, whenever ``rank(Y) = rank(F̃)``: almost
    surely for ``embedding="gaussian"`` or ``"khatri_rao"`` and ``dim ≥ rank(F̃)``, for every key with
    ``"sparse"`` and ``dim ≥ (p + 1)·sparsity``; for ``"sparse"`` with ``rank ≤ dim < p + 1`` only with a
    margin (a ReLU MLP of rank 27, p + 1 = 32: 13 of 20 keys kept the rank at ``dim = 27``, 19 of 20 at
    29): check the returned rank. With ``ridge > 0`` only the sparse embedding at
    ``dim ≥ (p + 1)·sparsity`` is exact; below the rank the scores are biased towards the large singular
    directions (module docstring); ``"auto"`` is one of ``"khatri_rao"`` and ``"sparse"`` (module
    docstring). Columns of ``F̃`` of very different scales (an input feature 1e5 times smaller than the
    others) lose directions to rounding in the mixing embeddings (module docstring). Memory
    ``O(chunk·p + n·dim + dim²)``.

    Args:
      key, apply_fn, params, xs, ys, dim, chunk_size, num_nodes, mode, embedding, sparsity: as in
        :func:`projected_dual_matrix`.
      ridge: ``λ ≥ 0``; with ``λ > 0`` the leverage of ``[Y; √λ I]`` restricted to the data rows,
        ``diag(Y (YᵀY + λI)^{-1} Yᵀ)``, normalised by the effective dimension (useful when ``p ≥ n`` or
        the dual matrix is rank-deficient).
      rtol: rank tolerance of the score routes (default ``10·eps``), on the singular values of ``Y``
        (not a quadrature tolerance, as ``rtol`` is in :func:`nlis_jax.dual_matrix`).
      return_info: return a :class:`Leverage` ``(probs, leverage, rank, route)`` instead of ``probs``
        (``route`` indexes :data:`nlis_jax.routes.ROUTES`; ``"gram"`` with ``ridge > 0``).

    Returns:
      ``(n,)`` probabilities (non-negative, summing to 1), or a :class:`Leverage`.
    """
    ridge = _check_ridge(ridge)
    check_bool("return_info", return_info)
    Y = _projected_wide(key, apply_fn, params, xs, ys, dim, chunk_size, num_nodes, mode, embedding, sparsity)
    # the exact (block) leverage of Y; a wide Y (n·k < dim, e.g. p ≥ n) by routes.wide_basis
    out = leverage_scores(Y, rtol=rtol, ridge=ridge, return_info=return_info)
    dtype = _params_dtype(params)
    if not return_info:
        return out.astype(dtype)
    return out._replace(probs=out.probs.astype(dtype), leverage=out.leverage.astype(dtype))
