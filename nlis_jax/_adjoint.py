r"""Adjoints of a nonlinear model by quadrature along the ray ``tθ``: adaptive by default, with a
per-example error estimate and the identity ``f(θ) = f(0) + <f*(θ), θ>`` checked (:mod:`nlis_jax._adaptive`),
or a fixed Gauss-Legendre rule (``num_nodes=q``).

.. math:: f^*(\theta; x) = \int_0^1 \nabla_u f(u; x)\big|_{u = t\theta}\, dt
          \approx \sum_k w_k\, \nabla f(t_k \theta; x)

The gradient is evaluated AT ``t_k θ`` (differentiating with respect to the point on the ray); the
derivative of ``θ ↦ f(tθ)`` would carry an extra factor ``t`` and break the identity
``f(θ) = f(0) + <f*(θ), θ>``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.flatten_util import ravel_pytree

from nlis_jax import _traced as traced
from nlis_jax import routes
from nlis_jax._adaptive import (
    MAX_PANELS,
    QuadratureInfo,
    check_not_reverse_mode,
    default_rtol,
    example_shapes,
    first_example,
    integrate,
)
from nlis_jax._checks import (
    check_array_types,
    check_choice,
    check_finite_each,
    check_fits_in_memory,
    check_floating,
    check_leading_axis,
    check_native,
    check_positive_int,
    check_real,
    check_same_length,
    count_failing,
    float_bits,
    host_values,
    is_concrete,
    join_exchange,
    narrows,
    report_nonfinite,
)
from nlis_jax._fetch import check_auto_axes
from nlis_jax._precision import highest_precision
from nlis_jax._traced import check as traced_check
from nlis_jax._types import ApplyFn, Array, PyTree
from nlis_jax.quadrature import check_num_nodes, gauss_legendre

MODES = ("auto", "forward", "reverse")
#: ``mode="auto"`` takes forward mode when ``p <= FORWARD_MAX_PARAMS * k`` (forward costs about ``p``
#: tangent passes per node, reverse about ``3 k``; the measurements behind the value are in
#: benchmarks/README.md).
FORWARD_MAX_PARAMS = 0.25
#: Default memory budget (array elements) of one chunk of examples: ``chunk_size * k * p <= budget``.
CHUNK_ELEMENTS = 1 << 23
#: A fixed rule in reverse mode (:func:`_summed_gradient`) chunks examples by this many elements of the
#: result (at least 64 examples), for cache: 256 examples of the (c) MLP took 0.21 s, 4,096 0.40 s.
REVERSE_CHUNK_ELEMENTS = 1 << 18


class FlatModel(NamedTuple):
    """A model over a flat parameter vector: ``fn(theta (p,), x) -> () or (k,)``."""

    fn: Callable[[Array, PyTree], Array]
    theta: Array  # (p,)
    unravel: Callable[[Array], PyTree]
    n: int
    out_shape: tuple[int, ...]  # () or (k,)
    convolves: bool = False  # fn runs a convolution (:func:`cache_chunk_size`)
    out_dtype: jnp.dtype | None = None  # of fn's output (:func:`narrowest_rtol`)


class ModelShape(NamedTuple):
    """What validation learns from shapes alone (:func:`check_model`): no flattening, no model call."""

    n: int
    p: int
    out_shape: tuple[int, ...]  # () or (k,)
    dtype: jnp.dtype  # of the flattened parameters
    out_dtype: jnp.dtype | None = None  # of the model's output (a narrower compute dtype: its noise)


def params_shape(params: PyTree) -> jax.ShapeDtypeStruct:
    """``jax.eval_shape`` of ``ravel_pytree(params)[0]``: ``(p,)`` and the promoted dtype of the leaves'
    types, as ``ravel_pytree`` promotes them, without its trace (~0.15 ms a call)."""
    avals = [jax.typeof(leaf) for leaf in jax.tree.leaves(params)]
    dtype = jnp.result_type(*(aval.dtype for aval in avals)) if avals else jnp.dtype(jnp.float32)
    return jax.ShapeDtypeStruct((sum(math.prod(aval.shape) for aval in avals),), dtype)


def num_examples(xs: PyTree, name: str = "xs") -> int:
    """Length of the shared leading (example) axis of every leaf of ``xs``."""
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError(f"{name} is empty (no arrays).")
    if isinstance(xs, (list, tuple)) and not any(hasattr(leaf, "shape") for leaf in leaves):
        raise TypeError(
            f"{name} is a Python {type(xs).__name__} of numbers, which JAX reads as a pytree of separate "
            f"scalars; pass an array with examples first, e.g. jnp.asarray({name})."
        )
    n = check_leading_axis(name, leaves[0])
    for leaf in leaves[1:]:
        check_same_length(name, n, f"another leaf of {name}", check_leading_axis(name, leaf))
    return n


def check_model(apply_fn: ApplyFn, params: PyTree, xs: PyTree, ys: Array | None = None) -> ModelShape:
    """Validate ``(apply_fn, params, xs[, ys])`` from shapes (``jax.eval_shape``) and concrete values.

    Nothing is flattened or computed here; the values of concrete inputs are checked for NaN/Inf (numpy
    for host values; the others of ``params`` and ``xs`` in one program with one read back, where they
    live). ``ys``, if given, must have shape ``(n,) + out_shape``.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
    for name, tree in (("xs", xs), ("ys", ys), ("params", params)):  # a pandas DataFrame, printed whole
        check_array_types(name, tree)
    check_native("xs", xs)  # params: by check_floating below, before any use
    n = num_examples(xs)
    for leaf in jax.tree.leaves(xs):  # before xs[0]: jax's own error there named no cause
        check_auto_axes("xs", leaf)
    check_floating("params", params)
    theta = params_shape(params)
    if theta.size == 0:
        raise ValueError("params has no entries (p = 0).")
    out = check_output_shape(eval_example(apply_fn, params, example_shapes(xs)))
    shape = ModelShape(n, int(theta.size), tuple(out.shape), theta.dtype, jnp.dtype(out.dtype))
    expected = (n,) + shape.out_shape
    # a well-formed ys is counted with the others; any other raises its own error just below
    ys_ready = ys is not None and _valid_ys(ys, expected)
    check_finite_each(("params", params), ("xs", xs), *([("ys", ys)] if ys_ready else []))
    if ys is not None:
        if np.shape(ys) != expected:
            raise ValueError(
                f"ys has shape {np.shape(ys)} but the model gives outputs of shape {expected} "
                f"(n examples × outputs); they must agree."
            )
        check_floating("ys", ys)
        check_ys_fits(ys, shape.dtype)
    return shape


def _valid_ys(ys, expected: tuple) -> bool:
    """Whether ``ys`` passes :func:`check_model`'s shape and dtype checks (which then raise in their order,
    after the NaN/Inf checks of ``params`` and ``xs``)."""
    try:
        check_floating("ys", ys)
    except (TypeError, ValueError):
        return False
    return np.shape(ys) == expected  # a Python list too (jnp.shape of one is deprecated)


def check_output_shape(out: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """``out`` (one example's output) if it is a scalar or a vector of ``k ≥ 1`` real floating outputs, as
    the dual matrix needs; ``ValueError`` (shape) or ``TypeError`` (dtype) otherwise (the host scoring paths
    took a matrix output as its flattened vector where the device paths refused it, and a complex output
    failed inside jax.jacrev)."""
    if len(out.shape) > 1:
        raise ValueError(
            f"apply_fn(params, x) must return a scalar or a vector of k outputs for ONE example, "
            f"got shape {out.shape}. (Pass one example x, not a batch: nlis_jax vmaps inside.)"
        )
    check_has_outputs(out)
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"apply_fn must return floating values, got dtype {out.dtype}.")
    return out


def check_has_outputs(out: jax.ShapeDtypeStruct) -> None:
    """``ValueError`` for a model with no outputs (``apply_fn`` returning shape ``(0,)``): its dual matrix
    has no rows, and the quadrature failed on an empty reduction inside."""
    if 0 in out.shape:
        raise ValueError(
            f"apply_fn(params, x) returns no outputs (shape {out.shape} for one example): the model must "
            "give a scalar or a vector of k ≥ 1 outputs."
        )


class ModelModeError(ValueError):
    """A model that is not a function of its parameters (a Flax module in training mode): raised by an
    adapter's ``apply_fn`` (:mod:`nlis_jax.models`) and passed through :func:`eval_example` unchanged."""


def eval_example(apply_fn: ApplyFn, params: PyTree, x0: PyTree) -> jax.ShapeDtypeStruct:
    """``jax.eval_shape(apply_fn, params, x0)`` for one example ``x0`` (arrays or ``ShapeDtypeStruct``); a
    failure inside ``apply_fn`` (a wrong width of ``xs``, a missing or misshapen leaf of ``params``) becomes
    a ``ValueError`` showing the shapes, chained to it, and so does an output that is not one array (a
    tuple or dict of outputs)."""
    try:
        out = jax.eval_shape(apply_fn, params, x0)
    except ModelModeError:
        raise
    except Exception as err:
        cause = (str(err).strip().splitlines() or [""])[0][:300].rstrip(".")
        raise ValueError(
            f"apply_fn(params, x) failed on one example x = xs[0] ({_leaf_shapes('x', x0)}) with params "
            f"({_leaf_shapes('params', params)}): {type(err).__name__}: {cause}. Check that xs has the "
            f"examples on its leading axis in the layout apply_fn expects, and that params has every leaf "
            f"apply_fn reads, with the shape it expects."
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct):  # a tuple or dict of outputs
        raise ValueError(
            f"apply_fn(params, x) must return one array (a scalar or a vector of k outputs) for one example, "
            f"got a {type(out).__name__} ({_leaf_shapes('output', out)}); stack the outputs into one "
            f"vector (jnp.stack or jnp.concatenate)."
        )
    return out


def _leaf_shapes(name: str, tree: PyTree, limit: int = 12) -> str:
    """``"name['w'] shape (3,), ..."`` for the first ``limit`` leaves of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    parts = [f"{name}{jax.tree_util.keystr(path)} shape {jnp.shape(leaf)}" for path, leaf in leaves[:limit]]
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > limit else ""
    return ", ".join(parts) + more


@traced.jit
def _count_unfit(ys, like, tiny, big):
    """``(past the range, flushed to 0, at least big)``: entries of ``ys`` that become Inf cast to
    ``like``'s dtype, non-zero entries below its smallest normal number ``tiny``, and entries of magnitude
    ``big`` or more, in one program. Magnitudes are compared on the values' bits: a CPU flushes a
    subnormal ``ys`` (of the params' own dtype) to 0 in ``jnp.abs`` and in comparisons."""
    past = jnp.size(ys) - jnp.count_nonzero(jnp.isfinite(ys.astype(like.dtype)))
    m, low, high = (float_bits(a)[1] for a in (ys, tiny, big))
    return past, jnp.count_nonzero((m > 0) & (m < low)), jnp.count_nonzero(m >= high)


def check_ys_fits(ys, dtype, combine=None) -> None:
    """``ValueError`` if a concrete ``ys`` (finite, floating) has values beyond the range of ``dtype`` (the
    params' dtype, to which the offset column ``f(0) − y`` is cast): they would become Inf; or non-zero
    values below its smallest normal number ``tiny`` that would become 0 where that matters: unless some
    ``|y_j| ≥ tiny/eps``, whose own rounding in the cast (``eps·|y_j|``) is larger than any value lost
    (float32 ``ys`` of size 1 with a ``3e-5`` among them, cast to float16, are kept). The same holds for
    subnormal ``ys`` of the params' own dtype: a CPU flushes them to 0 inside the compiled program (a
    float32 ``ys`` of ``1e-39`` gave rank 4 of 5, probabilities 43% off); those are read where the values
    are on the host (a numpy array, an array on one CPU device; not an array held elsewhere, whose checks
    take one read back per call, nor numpy float64 without x64, which the narrowing check reads, nor the
    chunks of a chunk source). The rule ignores ``f(0)``: where ``|f(0)|`` is far above such ``ys`` they
    would be lost to its rounding anyway, and they are refused all the same. Only a
    ``ys`` that can hold such values is read (on the host without compiling, as ``check_finite``, one pass
    unless it fails); traced, a ``checkify`` check of the range inside ``nlis_jax.traced_checks()``.
    ``combine(counts)``, if given, sums this process's three counts over all processes (host blocks
    under ``jax.distributed``: all three counted, and every process raises the same error)."""
    ys = ys if hasattr(ys, "dtype") else np.asarray(ys)
    y_dtype = jnp.result_type(ys)
    if not jnp.issubdtype(y_dtype, jnp.floating):
        join_exchange(combine, [0, 0, 0])
        return
    wider = jnp.finfo(y_dtype).max > jnp.finfo(dtype).max
    if not wider and (
        jnp.finfo(y_dtype).smallest_subnormal >= jnp.finfo(dtype).smallest_normal  # float16 ys, float32 θ
        or narrows(ys)
        or host_values(ys) is None
    ):
        join_exchange(combine, [0, 0, 0])
        return
    limit = float(jnp.finfo(dtype).max)
    message = (
        f"ys has {{}} value(s) beyond the range of the params' dtype {jnp.dtype(dtype).name} (largest finite "
        f"value {limit:.4g}): cast to it they become Inf in the offset column f(0) − y. Rescale ys (and the "
        f"model's outputs), or pass params in a wider dtype."
    )
    if not is_concrete(ys):
        if wider:
            traced_check(jnp.all(jnp.isfinite(ys.astype(dtype))), message.format("some"))
        return
    tiny = float(jnp.finfo(dtype).smallest_normal)  # and below it: flushed to 0 on the device
    big = tiny / float(jnp.finfo(dtype).eps)  # a value this large rounds by more than any value lost
    host = host_values(ys)
    if host is not None:
        # NaN and Inf pass these counts: the pass over the data names them (a memmap's, or under
        # jax.distributed any block's, are not read before it); they were "beyond the range" here
        def in_range(a):
            with np.errstate(over="ignore"):
                return np.isfinite(a.astype(dtype)) | ~np.isfinite(a)

        every = combine is not None  # all three counts, as every process combines them
        kept = lambda a: in_range(a) & ((np.abs(a) >= tiny) | (a == 0) | ~np.isfinite(a))  # noqa: E731
        failing = count_failing(host, kept)
        bad = count_failing(host, in_range) if failing or every else 0  # more passes on the error path only
        lost = failing - bad
        small = lambda a: (np.abs(a) < big) | ~np.isfinite(a)  # noqa: E731
        large = count_failing(host, small) if (lost and not bad) or every else 0
        if every:
            bad, lost, large = (int(c) for c in combine(np.array([bad, lost, large], np.int32)))
    else:
        with jax.ensure_compile_time_eval():
            counts = _count_unfit(ys, jnp.zeros((), dtype), *(jnp.asarray(v, ys.dtype) for v in (tiny, big)))
            bad, lost, large = (int(c) for c in counts)
    if bad:
        raise ValueError(message.format(bad))
    if lost and not large:
        raise ValueError(
            f"ys has {lost} non-zero value(s) below the smallest normal number of the params' dtype "
            f"{jnp.dtype(dtype).name} ({tiny:.3g}): {'cast to it they' if wider else 'subnormal, they'} "
            "become 0 in the offset column f(0) − y (the device flushes subnormal numbers). Rescale ys (and "
            "the model's outputs), or pass params in a wider dtype."
        )


def flatten_model(apply_fn: ApplyFn, params: PyTree, xs: PyTree) -> FlatModel:
    """A :class:`FlatModel` over ``ravel_pytree(params)``, built under a trace (validate first)."""
    theta, unravel = ravel_pytree(params)
    jaxpr, out = jax.make_jaxpr(apply_fn, return_shape=True)(params, first_example(xs))

    def fn(flat, x):
        return apply_fn(unravel(flat), x)

    convolves = runs_primitive(jaxpr, "conv_general_dilated")
    return FlatModel(fn, theta, unravel, num_examples(xs), tuple(out.shape), convolves, jnp.dtype(out.dtype))


def runs_primitive(jaxpr, name: str) -> bool:
    """Whether ``jaxpr`` (closed or open) runs the primitive ``name``, in nested jaxprs (calls, control
    flow, custom derivatives) too."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == name:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)) and runs_primitive(sub, name):
                    return True
    return False


def model_mode(mode: str, shape: ModelShape) -> str:
    """``mode`` resolved for a checked model (:func:`resolve_mode` of its ``p`` and output count), so that
    ``"auto"`` and the mode it stands for share one compiled program: the jitted programs take the mode
    as a static argument, and ``"auto"`` was compiled apart from ``"forward"`` (or ``"reverse"``)."""
    return resolve_mode(mode, shape.p, math.prod(shape.out_shape))


def resolve_mode(mode: str, p: int, k: int) -> str:
    """``"auto"`` -> ``"forward"`` when ``p <= FORWARD_MAX_PARAMS * k``, else ``"reverse"``."""
    check_choice("mode", mode, MODES)
    if mode != "auto":
        return mode
    return "forward" if p <= FORWARD_MAX_PARAMS * k else "reverse"


def default_chunk_size(n: int, p: int, k: int) -> int:
    """Examples per chunk keeping one chunk's ``chunk · k · p`` under :data:`CHUNK_ELEMENTS`."""
    return max(1, min(n, CHUNK_ELEMENTS // max(1, p * k)))


def cache_chunk_size(p: int, k: int, mode: str, convolves: bool = False) -> int | None:
    """Examples per cache-sized chunk of a fixed rule's adjoints (``mode`` resolved), or ``None``.

    In reverse mode on a CPU, ``REVERSE_CHUNK_ELEMENTS / (k·p)`` (at least 64), so that a chunk's
    gradients stay in cache (:data:`REVERSE_CHUNK_ELEMENTS`). ``None`` in forward mode, on a GPU or TPU,
    where one vectorised call over the memory chunk keeps the device busy and ``n / 64`` sequential steps
    of a ``lax.map`` would each launch a few small kernels (as :func:`nlis_jax._adaptive._pass_batch`),
    and for a model that ``convolves`` on a CPU, whose adjoints run node by node over the whole memory
    chunk (:func:`flat_adjoint`: ``lax.map`` steps cost it more than the cache saves)."""
    if mode != "reverse" or jax.default_backend() != "cpu" or convolves:
        return None
    return max(64, REVERSE_CHUNK_ELEMENTS // max(1, p * k))


#: Nodes unrolled at most in :func:`flat_adjoint`'s scan when :func:`nodes_outside` (each unrolled node is
#: a copy of the model's gradient in the compiled program).
MAX_UNROLL = 16


def nodes_outside(model: FlatModel, mode: str) -> bool:
    """Whether a fixed rule's adjoints in reverse mode run the nodes in a ``lax.scan`` around a vmapped
    per-example gradient at the shared point ``t_q θ`` (True: a model that convolves, on a CPU) instead
    of one reverse pass over all nodes per example (:func:`_summed_gradient`).

    In :func:`_summed_gradient` each node's kernel ``t_q θ + φ`` is a batched operand, and vmapped over
    examples a kernel's gradient becomes a grouped convolution that XLA:CPU runs at a cost per example
    growing with the batch (a 28×28 CNN of two convolutions, p = 26,401, 8 nodes, 256 examples: 44 s in
    one batch, 1.07–1.16 s one example at a time, the default until 2026-12-04). With the kernel shared
    by the batch the per-example gradients are cheap: 0.35 s for the 256 examples in one vectorised
    call per node (the scan unrolled, up to :data:`MAX_UNROLL` nodes; 0.85 s rolled), 0.57 s in
    ``lax.map`` chunks of 16–64 (Intel Xeon, 2 cores, float32; benchmarks/README.md (b))."""
    return mode == "reverse" and model.convolves and jax.default_backend() == "cpu"


def fixed_rule_chunk_size(n: int, p: int, k: int, mode: str, convolves: bool = False) -> int:
    """Examples per chunk of a fixed rule's adjoints by default (``mode`` resolved): the memory chunk
    :func:`default_chunk_size`, or the cache chunk :func:`cache_chunk_size` where it is smaller."""
    default = default_chunk_size(n, p, k)
    cache = cache_chunk_size(p, k, mode, convolves)
    return default if cache is None else min(default, cache)


def chunked_map(fn: Callable, xs: PyTree, n: int, chunk_size: int) -> Array:
    """``vmap(fn)(xs)`` over the leading axis, ``chunk_size`` examples at a time (``lax.map``)."""
    if chunk_size >= n:
        return jax.vmap(fn)(xs)
    return lax.map(fn, xs, batch_size=chunk_size)


def _point_jacobian(fn, mode: str, p: int, dtype) -> Callable[[Array, PyTree], Array]:
    """``jac(u, x) = ∇_u fn(u, x)`` of shape ``out_shape + (p,)`` evaluated at the point ``u``."""
    if mode == "reverse":
        return jax.jacrev(fn)  # per-example vjp (one per output)
    basis = jnp.eye(p, dtype=dtype)

    def jac(u, x):  # one jvp per tangent direction e_j, vmapped
        tangent_out = jax.vmap(lambda v: jax.jvp(lambda w: fn(w, x), (u,), (v,))[1])(basis)
        # in the params' dtype, as reverse mode's gradients are: a model whose output is wider (float64
        # inputs with float32 params) must not widen the sum over the nodes
        return jnp.moveaxis(tangent_out, 0, -1).astype(dtype)

    return jac


@traced.entry
def adjoint(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    *,
    num_nodes: int | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    rtol: float | None = None,
    max_panels: int = MAX_PANELS,
    return_info: bool = False,
) -> Array | tuple[Array, QuadratureInfo]:
    r"""Per-example adjoints :math:`f_i^*(\theta) = \int_0^1 \nabla f(t\theta; x_i)\,dt`.

    By default adaptive quadrature to a relative tolerance ``rtol`` per example: 16-node Gauss-Legendre
    panels with a coefficient-decay error estimate, bisected where the estimate (or the identity
    ``<f*, θ> + f(0) = f(θ)``, checked a posteriori) misses the tolerance; the common case costs one
    16-node pass plus the estimate. With ``num_nodes=q``, a fixed ``q``-node Gauss-Legendre rule. The
    gradient at each node is taken at the point ``t θ``; in forward mode accumulated over nodes in a
    ``lax.scan`` carry, in reverse mode with a fixed rule taken for all nodes in one reverse pass (the
    gradient of ``Σ_q w_q f(t_q θ + φ)`` at ``φ = 0``); vmapped over examples and chunked
    ``chunk_size`` examples at a time.

    Args:
      apply_fn: ``apply_fn(params, x)`` for ONE example ``x``, returning a scalar or a ``(k,)`` vector.
      params: any pytree of floating arrays; flattened by ``jax.flatten_util.ravel_pytree`` to ``p``
        entries (the column order of the result).
      xs: inputs with a leading example axis, shape ``(n, ...)`` (or a pytree of such arrays).
      num_nodes: ``None`` (adaptive) or the number ``q ≤ 4096`` of nodes of a fixed Gauss-Legendre rule
        (exact for integrands of degree ``2q - 1`` in t; no error estimate). The adaptive rule is
        differentiable in forward mode (``jax.jvp``, ``jax.jacfwd``); reverse mode (``jax.grad``) cannot go
        through its ``while_loop`` (a ``ValueError`` says so): differentiate a fixed rule.
      mode: ``"forward"`` (one ``jax.jvp`` per tangent direction, vmapped: ~``p`` passes per node),
        ``"reverse"`` (per-example ``jax.vjp``: ~3 passes per output per node) or ``"auto"`` (forward
        when ``p <= k/4``).
      chunk_size: examples per memory chunk (bounds memory at ``chunk_size * k * p`` per node);
        default keeps a chunk under ``2**23`` elements (``2**18``, at least 64 examples, for a fixed
        rule in reverse mode on a CPU, whose nodes share one reverse pass; for a model that convolves
        the nodes run one after the other over the ``2**23`` chunk instead).
      rtol: adaptive tolerance on the estimated error relative to ``‖f_i^*‖`` (default ``1e-12`` in
        float64, ``1e-6`` in float32, that of the narrowest floating leaf of ``params``; float16 and
        bfloat16 models are integrated in float32, to its tolerance, and the adjoints rounded back; a
        model computing in a narrower dtype than its ``params``, e.g. Flax's ``dtype=bfloat16`` with
        ``param_dtype=float32``, at least 4 units of its output's rounding).
      max_panels: adaptive budget of panels (16 gradients each) per example, at least 3 (a panel and its
        first bisection); examples still above ``rtol`` then raise a :class:`nlis_jax.QuadratureWarning`
        naming how many and the error reached.
      return_info: also return a :class:`nlis_jax.QuadratureInfo` (adaptive only): per-example estimated
        relative error, relative identity residual, panels used and a convergence flag.

    Returns:
      Array of shape ``(n, p)`` for scalar models or ``(n, k, p)`` for ``k`` outputs, in the dtype of
      the flattened parameters (and the info with ``return_info=True``). Row ``i`` satisfies
      ``<f_i^*(θ), θ> + f_i(0) = f_i(θ)``.

    Raises:
      ValueError: on NaN/Inf in ``params`` or ``xs`` (when concrete), inconsistent leading axes,
        a model output of rank > 1, an unknown ``mode``, ``num_nodes`` outside ``[1, 4096]``, a
        non-positive ``chunk_size``, ``rtol`` outside ``(0, 1)``, ``rtol``, ``max_panels`` or
        ``return_info=True`` together with ``num_nodes`` (options of the adaptive rule);
        when ``apply_fn`` fails on one example (the message shows the shapes); when the adjoint comes out
        NaN or Inf (a gradient of ``apply_fn`` not finite on the path ``tθ``, e.g. ``sqrt`` or ``log``
        singular at ``θ = 0``, or overflow), eagerly, or as a ``checkify`` check under a user's ``jit``
        inside ``nlis_jax.traced_checks()`` (fixed rule only: ``checkify`` cannot transform the adaptive
        rule's batched ``while_loop``; pass ``num_nodes`` there).
    """
    num_nodes, chunk_size, max_panels = check_path_args(
        num_nodes, mode, chunk_size, rtol, max_panels, return_info
    )
    shape = check_model(apply_fn, params, xs)
    check_fits_in_memory("the adjoints F*", (shape.n, *shape.out_shape, shape.p), shape.dtype, DENSE_HINT)
    if num_nodes is None:
        args = (apply_fn, params, xs, shape, mode, chunk_size, rtol, max_panels)
        out = adaptive_adjoint(*args, report=True)
        return out if return_info else out[0]
    mode = model_mode(mode, shape)
    adj, bad = _adjoint_jit(apply_fn, params, xs, num_nodes=num_nodes, mode=mode, chunk_size=chunk_size)
    report_nonfinite(bad, shape.n, nonfinite_adjoint)
    return adj


#: What to use when the ``n × (p+1)`` dual matrix does not fit (:func:`check_fits_in_memory`).
DENSE_HINT = (
    "score without forming it: nj.projected_leverage_scores(key, apply_fn, params, xs, ys, dim=...) holds "
    "an n × dim projection (ys=None for label-free scores), nj.streaming_leverage_scores a (p+1) × (p+1) "
    "Gram matrix, nj.streaming_norm_scores neither."
)


def nonfinite_adjoint(count: str) -> str:
    """The error for adjoints that came out NaN or Inf in ``count`` (e.g. ``"3 of 12"``) examples."""
    return f"the adjoint is NaN or Inf for {count} examples: " + ADJOINT_CAUSES


def nonfinite_dual_rows(count: str) -> str:
    """The error for dual rows ``[F*_i | f(0) − y_i]`` that came out NaN or Inf in ``count`` examples, where
    the pass does not tell the adjoint from the offset (streamed and projected rows)."""
    return (
        f"the dual matrix [F* | f(0) − y] is NaN or Inf for {count} examples, in the adjoint or in the "
        f"offset column. The offset f(0) − y: apply_fn is not finite at θ = 0, or f(0) − y is past the range "
        f"of the params' dtype (rescale ys and the model's outputs, or use a wider dtype). The adjoint: "
        + ADJOINT_CAUSES
    )


#: Why an adjoint is not finite (:func:`nonfinite_adjoint`, :func:`nonfinite_dual_rows`).
ADJOINT_CAUSES = (
    "the gradient of apply_fn is not finite on the path "
    "tθ, t in [0, 1] (or apply_fn itself is not finite at 0 or at θ). Likely causes: a function "
    "singular at θ = 0, such as sqrt or log of an argument that vanishes there (sqrt(x @ w), "
    "log(x @ w)), an argument outside its domain (sqrt or log of a negative number), or overflow in the "
    "params' dtype. "
    "The model must be finite and differentiable along the whole ray from 0 to θ (e.g. sqrt(z + eps), "
    "softplus)."
)


def count_bad_examples(a: Array) -> Array:
    """Number of examples (leading axis) of ``a`` with a NaN or Inf entry, as a scalar (traced)."""
    finite = jnp.isfinite(a.reshape(a.shape[0], -1))
    return jnp.sum(~jnp.all(finite, axis=1), dtype=jnp.int32)


def check_path_args(
    num_nodes, mode, chunk_size, rtol=None, max_panels=MAX_PANELS, return_info=False, inputs=None
) -> tuple[int | None, int | None, int]:
    """Validate the quadrature/mode/chunk arguments shared by the path-based functions; with ``inputs``
    (the arrays a function runs its own jitted programs on) and the adaptive rule, refuse reverse-mode
    differentiation here, where its tracers can still be seen (inside those programs they cannot, and
    jax's error about ``lax.while_loop`` came instead).

    Returns ``(num_nodes, chunk_size, max_panels)`` as Python ints (or ``None``): they are static
    arguments of jitted programs, where ``8`` and ``np.int64(8)`` are different keys (a second compile)."""
    check_choice("mode", mode, MODES)
    if num_nodes is not None:
        num_nodes = check_num_nodes(num_nodes)
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    max_panels = check_positive_int("max_panels", max_panels)
    if max_panels < 3:  # the first bisection always runs: 1 + 2 panels
        raise ValueError(
            f"max_panels must be at least 3 (one panel and its first bisection), got {max_panels}."
        )
    if rtol is not None and not 0 < check_real("rtol", rtol) < 1:  # NaN fails the comparison too
        raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}.")
    if not isinstance(return_info, bool):
        raise TypeError(f"return_info must be True or False, got {return_info!r}.")
    if return_info and num_nodes is not None:
        raise ValueError(
            "return_info=True needs the adaptive rule (num_nodes=None); a fixed rule has no estimate."
        )
    if num_nodes is not None and (rtol is not None or max_panels != MAX_PANELS):
        raise ValueError(
            "rtol and max_panels set the adaptive rule (num_nodes=None); with num_nodes given they would "
            "be ignored."
        )
    if num_nodes is None and inputs is not None:
        check_not_reverse_mode(jax.tree.leaves(inputs))
    return num_nodes, chunk_size, max_panels


@dataclasses.dataclass(frozen=True)
class PathGradient:
    """The adjoint's integrand ``g(params, t, x) = ∇_u f(u; x)`` at ``u = t·θ``: ``out_shape + (p,)``.

    Hashable by ``(apply_fn, mode)``, so the adaptive integrator's compilations are reused across calls.
    """

    apply_fn: ApplyFn
    mode: str  # "forward" or "reverse"

    def __call__(self, params: PyTree, t: Array, x: PyTree) -> Array:
        theta, unravel = ravel_pytree(params)

        def fn(flat, x):
            return self.apply_fn(unravel(flat), x)

        scaled = scaled_theta(params, t, theta.dtype)
        return _point_jacobian(fn, self.mode, theta.shape[0], theta.dtype)(scaled, x)


@dataclasses.dataclass(frozen=True)
class IdentityResidual:
    """``max_k |<f*_k, θ> + f_k(0) − f_k(θ)| / (|f*_k|·|θ| + |f_k(0)| + |f_k(θ)|)`` for one example."""

    apply_fn: ApplyFn

    def __call__(self, params: PyTree, adj: Array, x: PyTree) -> Array:
        theta, unravel = ravel_pytree(params)
        f_theta = self.apply_fn(params, x)
        f_zero = self.apply_fn(origin(params), x)  # leaf by leaf (flat_origin)
        gap = jnp.abs(adj @ theta + f_zero - f_theta)
        scale = jnp.abs(adj) @ jnp.abs(theta) + jnp.abs(f_zero) + jnp.abs(f_theta)
        return jnp.max(jnp.where(gap == 0, 0, gap / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)))


def identity_tol(rtol: float, p: int, dtype) -> float:
    """Tolerance of the identity check: ``rtol``, or the rounding of a length-``p`` dot product if larger."""
    return max(rtol, 32 * math.sqrt(p) * float(jnp.finfo(dtype).eps))


def in_float32(tree: PyTree) -> PyTree:
    """``tree`` with its half-precision (float16, bfloat16) leaves cast to float32 (exact)."""

    def one(a):
        dtype = jnp.result_type(a)
        return jnp.asarray(a, routes.compute_dtype(dtype)) if jnp.issubdtype(dtype, jnp.floating) else a

    return jax.tree.map(one, tree)


def adaptive_adjoint(apply_fn, params, xs, shape, mode, chunk_size, rtol, max_panels, *, report=False):
    """Adaptive adjoints ``(adj, info)`` of a validated model, eager or traced (``nlis_jax._adaptive``).

    Half-precision models (float16, bfloat16) are integrated in float32, to float32's tolerance (the
    quadrature then adds nothing to the rounding of the result), and the adjoints cast back; the info
    stays in float32.

    Adjoints that come out NaN or Inf raise ``ValueError`` when computed eagerly; with ``report`` (a public
    entry point, in the user's trace) also as a ``checkify`` check under tracing, and an overflow of the
    cast back to half precision is counted too.
    """
    if routes.compute_dtype(shape.dtype) != shape.dtype:
        params, xs = in_float32(params), in_float32(xs)
        # float32's rtol, unless the model still computes in half precision (Flax's dtype=bfloat16)
        out = eval_example(apply_fn, params, example_shapes(xs))
        wide = shape._replace(dtype=routes.compute_dtype(shape.dtype), out_dtype=jnp.dtype(out.dtype))
        args = (apply_fn, params, xs, wide, mode, chunk_size, rtol, max_panels)
        adj, info = adaptive_adjoint(*args, report=report)
        adj, bad = _narrow(adj, jnp.zeros((), shape.dtype))
        if report:
            report_nonfinite(bad, shape.n, nonfinite_adjoint)
        return adj, info
    k = math.prod(shape.out_shape)
    rtol = float(narrowest_rtol(shape.dtype, params, shape.out_dtype) if rtol is None else rtol)
    g = PathGradient(apply_fn, resolve_mode(mode, shape.p, k))
    chunk = default_chunk_size(shape.n, shape.p, k) if chunk_size is None else chunk_size
    check, check_tol = IdentityResidual(apply_fn), identity_tol(rtol, shape.p, shape.dtype)
    with jax.default_matmul_precision("highest"):
        kw = dict(rtol=rtol, max_panels=max_panels, chunk_size=chunk, check=check, check_tol=check_tol)
        return integrate(g, params, xs, nonfinite=nonfinite_adjoint if report else None, **kw)


def narrowest_rtol(dtype, params: PyTree, out_dtype=None) -> float:
    """The default quadrature tolerance of :func:`adjoint`: that of the narrowest floating leaf of
    ``params`` (or of ``dtype``, the flattened parameters'), or of the model's output dtype ``out_dtype``
    when narrower (Flax's ``dtype=bfloat16`` with ``param_dtype=float32``: a bfloat16 integrand chased to
    float32's tolerance took every example to the panel limit, 13 s for 32 images), whose rounding is the
    integrand's noise. ``params`` may hold arrays or shape structs (a flat model's
    ``jax.eval_shape(unravel, θ)``)."""
    dtypes = [jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(params) if hasattr(leaf, "dtype")]
    rtol = max(default_rtol(d) for d in [jnp.dtype(dtype), *dtypes] if jnp.issubdtype(d, jnp.floating))
    if out_dtype is not None and jnp.issubdtype(out_dtype, jnp.floating):  # at least 4 units of its
        rtol = max(rtol, default_rtol(out_dtype), 4 * float(jnp.finfo(out_dtype).eps))  # rounding
    return rtol


@traced.jit
def _narrow(adj, like):
    """``adj`` cast to ``like``'s dtype, and the number of examples that overflow there."""
    narrow = adj.astype(like.dtype)
    return narrow, count_bad_examples(narrow)


@functools.partial(traced.jit, static_argnames=("apply_fn", "num_nodes", "mode", "chunk_size"))
@highest_precision
def _adjoint_jit(apply_fn, params, xs, *, num_nodes, mode, chunk_size):
    """Adjoints by a fixed rule, and the number of examples whose adjoint, ``f(0)`` or ``f(θ)`` is NaN or
    Inf (the rule's interior nodes never see a singularity at ``t = 0``, as of ``log(x·θ)``: the
    adjoint there diverges while the rule returns finite numbers)."""
    model = flatten_model(apply_fn, params, xs)
    adj = flat_adjoint(model, xs, num_nodes=num_nodes, mode=mode, chunk_size=chunk_size)
    parts = (adj, model_outputs(model, xs, flat_origin(model)), model_outputs(model, xs))
    wide = jnp.result_type(*parts)  # each finite in its own dtype is finite in the widest (exact casts)
    rows = jnp.concatenate([a.reshape(model.n, -1).astype(wide) for a in parts], axis=1)
    return adj, count_bad_examples(rows)


def flat_adjoint(model: FlatModel, xs, *, num_nodes, mode, chunk_size) -> Array:
    """Adjoints of a :class:`FlatModel` on ``xs`` (traced): ``(n,) + out_shape + (p,)``."""
    theta, p = model.theta, model.theta.shape[0]
    k = math.prod(model.out_shape)
    if num_nodes is None:  # adaptive, traced: the flat model with θ as its parameters
        chunk_size = default_chunk_size(model.n, p, k) if chunk_size is None else chunk_size
        shape = ModelShape(model.n, p, model.out_shape, theta.dtype, model.out_dtype)
        rtol = narrowest_rtol(theta.dtype, jax.eval_shape(model.unravel, theta), model.out_dtype)  # as for
        # the pytree
        return adaptive_adjoint(model.fn, theta, xs, shape, mode, chunk_size, rtol, MAX_PANELS)[0]
    mode = resolve_mode(mode, p, k)
    wide = routes.compute_dtype(theta.dtype)
    if wide != theta.dtype:  # half precision: evaluate and sum the nodes in float32, round back once
        model = model._replace(theta=theta.astype(wide))  # a one-dtype unravel keeps float32 leaves
        adj = flat_adjoint(model, in_float32(xs), num_nodes=num_nodes, mode=mode, chunk_size=chunk_size)
        return adj.astype(theta.dtype)
    nodes, weights = gauss_legendre(num_nodes, theta.dtype)
    if chunk_size is None:
        chunk_size = fixed_rule_chunk_size(model.n, p, k, mode, model.convolves)
    outside = nodes_outside(model, mode)
    if mode == "reverse" and not outside:
        return chunked_map(_summed_gradient(model, nodes, weights), xs, model.n, chunk_size)
    jac = _point_jacobian(model.fn, mode, p, theta.dtype)

    tree = model.unravel(theta)

    def one_example(x):  # vmapped by chunked_map: the batch moves inside the scan, around jac
        def body(acc, tw):
            t, w = tw
            return acc + w * jac(scaled_theta(tree, t, theta.dtype), x), None

        acc0 = jnp.zeros(model.out_shape + (p,), theta.dtype)
        return lax.scan(body, acc0, (nodes, weights), unroll=min(num_nodes, MAX_UNROLL) if outside else 1)[0]

    return chunked_map(one_example, xs, model.n, chunk_size)


def _summed_gradient(model: FlatModel, nodes: Array, weights: Array) -> Callable[[PyTree], Array]:
    r"""``x -> Σ_q w_q ∇f(t_q θ; x)`` (``(p,)``, or ``(k, p)``) as ONE reverse pass over all nodes.

    It is the gradient at ``φ = 0`` of ``h(φ) = Σ_q w_q f(t_q θ + φ; x)``, with ``φ`` a perturbation of
    every parameter array shared by the nodes: the forward pass runs the ``q`` nodes vmapped, and the
    transpose of sharing ``φ`` sums the nodes inside each layer's gradient product (a weight matrix's
    gradient ``Σ_q δ_q h_qᵀ`` is one product over the nodes), so no per-node gradient of ``p`` entries is
    formed and added up (on the 8-32-32-1 MLP of benchmarks/README.md (c): 0.23 s against 0.43–0.50 s for
    the ``lax.scan`` over nodes). The parameters are perturbed as their pytree (``model.unravel(θ)``)
    and flattened for ``model.fn``; XLA folds that flattening away.
    """
    tree = model.unravel(model.theta)

    def ravel(t: PyTree) -> Array:
        return ravel_pytree(t)[0]

    def one_example(x):
        def h(phi):
            def at(t):
                return model.fn(ravel(jax.tree.map(lambda a, b: t * a + b, tree, phi)), x)

            return jnp.tensordot(weights, jax.vmap(at)(nodes), axes=1)

        zeros = jax.tree.map(jnp.zeros_like, tree)
        if not model.out_shape:
            return ravel(jax.grad(h)(zeros))
        return jax.vmap(ravel)(jax.jacrev(h)(zeros))

    return one_example


def origin(params: PyTree) -> PyTree:
    """Zeros shaped like ``params`` (the start ``θ = 0`` of the ray), computed from them at run time.

    Every ``f(0; x)`` of the library is evaluated at these zeros, not at ``jnp.zeros_like(θ)``: a model
    whose weights XLA sees as a broadcast constant can come out wrong on a CPU. With jaxlib 0.10.2,
    ``jit(vmap(f))`` of ``f(w, x) = avg_pool(relu(x)) · w`` or ``max_pool(relu(x)) · w`` at ``w = 0``
    returned NaN or garbage instead of 0 (XLA:CPU fuses the pool and the constant matrix product into one
    YNNPACK kernel); flax CNNs hit it in ``adjoint``'s check of ``f(0)`` and in the offsets ``f(0) − y``
    of the dual rows and of the projected scores, reported as "the adjoint is NaN or Inf for 128 of 128".
    ``lax.optimization_barrier`` around ``zeros_like`` did not stop it (the barrier is gone after XLA's
    optimisation: wrong in 6–10 of 10 compilations). ``|θ|·0`` (``0`` where ``θ`` is not finite) is
    exactly ``+0`` and a value XLA cannot fold (``x·0`` is not ``0`` for floats: NaN and Inf)."""
    return jax.tree.map(lambda a: jnp.where(jnp.isfinite(a), jnp.abs(a), 0) * 0, params)


def scaled_theta(params: PyTree, t, dtype) -> Array:
    """``t·θ`` as the flat vector of ``dtype`` (``θ`` = ``ravel_pytree(params)``), computed leaf by leaf
    and raveled again (as :func:`flat_origin`: an operation on the flat vector followed by ``unravel``'s
    slices is not folded by XLA:CPU)."""
    return ravel_pytree(jax.tree.map(lambda a: (t * jnp.asarray(a, dtype)).astype(dtype), params))[0]


def flat_origin(model: FlatModel) -> Array:
    """:func:`origin` of ``model.theta`` as a flat vector, built leaf by leaf and raveled again. Built on
    the flat vector itself, the zeros were then cut into one slice per leaf by ``unravel``, which XLA:CPU
    does not fold: compiling grew faster than the number of leaves (a 64-layer MLP, 128 leaves: about
    10 s of ``adjoint``'s 14 s first call, against 0.4 s leaf by leaf)."""
    return ravel_pytree(origin(model.unravel(model.theta)))[0]


def model_outputs(model: FlatModel, xs, theta: Array | None = None) -> Array:
    """``f(θ; x_i)`` for every example: shape ``(n,) + out_shape``."""
    theta = model.theta if theta is None else theta
    return jax.vmap(model.fn, in_axes=(None, 0))(theta, xs)
