r"""The nonlinear dual matrix ``F̃(θ) = [F*(θ) | f(0) − y]`` and its matrix-free operator.

With ``θ̃ = [θ; 1]`` the residual is ``r = F̃(θ) θ̃`` and the loss ``L(θ) = ‖F̃(θ) θ̃‖²``: the nonlinear
analogue of ``‖[X, −y][θ; 1]‖²``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nlis_jax import _traced as traced
from nlis_jax import routes
from nlis_jax._adaptive import MAX_PANELS, QuadratureInfo
from nlis_jax._adjoint import (
    DENSE_HINT,
    adaptive_adjoint,
    check_model,
    check_path_args,
    count_bad_examples,
    flat_adjoint,
    flat_origin,
    flatten_model,
    in_float32,
    model_mode,
    model_outputs,
    nonfinite_adjoint,
)
from nlis_jax._checks import (
    check_finite,
    check_fits_in_memory,
    fetch,
    is_concrete,
    report_nonfinite,
)
from nlis_jax._precision import highest_precision
from nlis_jax._types import ApplyFn, Array, PyTree
from nlis_jax.quadrature import check_num_nodes, gauss_legendre


def _offset_column(model, xs, ys) -> Array:
    """``f(0; x_i) − y_i`` (or ``f(0; x_i)`` without a response): shape ``(n,) + out_shape``."""
    f0 = model_outputs(model, xs, flat_origin(model))
    if ys is None:
        return f0
    return f0 - jnp.asarray(ys).astype(f0.dtype)


def nonfinite_offset(count: str) -> str:
    """The error for an offset column ``f(0) − y`` that came out NaN or Inf in ``count`` examples."""
    return (
        f"the offset column f(0) − y of the dual matrix is NaN or Inf for {count} examples: apply_fn is not "
        f"finite at θ = 0 (e.g. log or a division singular there), or f(0) − y overflows the params' dtype."
    )


@traced.entry
def dual_matrix(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    ys: Array | None = None,
    *,
    num_nodes: int | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    rtol: float | None = None,
    max_panels: int = MAX_PANELS,
    return_info: bool = False,
) -> Array | tuple[Array, QuadratureInfo]:
    r"""The nonlinear dual matrix :math:`\tilde F(\theta) = [F^*(\theta) \mid f(0) - y]`.

    Args:
      apply_fn: ``apply_fn(params, x)`` for ONE example, scalar or ``(k,)`` output.
      params: pytree with ``p`` entries in total.
      xs: inputs ``(n, ...)``.
      ys: responses ``(n,)`` (or ``(n, k)``); ``None`` makes the last column ``f(0)``.
      num_nodes, mode, chunk_size, rtol, max_panels, return_info: as in :func:`nlis_jax.adjoint`
        (adaptive quadrature unless ``num_nodes`` is given).

    Returns:
      ``(n, p + 1)`` (or ``(n, k, p + 1)`` for ``k`` outputs), and the adjoints'
      :class:`nlis_jax.QuadratureInfo` with ``return_info=True``. With ``θ̃ = [θ; 1]``,
      ``F̃ θ̃ = f(θ; x) − y``, the residual.

    Raises:
      ValueError: as :func:`nlis_jax.adjoint`; also when ``ys`` holds values beyond the range of the params'
        dtype, or non-zero values below its smallest normal number while none reaches ``tiny/eps`` (they
        would be lost from the offset column, whatever ``f(0)``), or the offset column ``f(0) − y`` comes
        out NaN or Inf.

    Subnormal inputs (below ``finfo(dtype).smallest_normal``) count as 0 inside the compiled program on a
    CPU (XLA flushes them): a feature of ``xs`` whose values are all subnormal gives a zero column of
    ``F*`` (one rank fewer). ``ys`` is checked for this; rescale such features before scoring.
    """
    num_nodes, chunk_size, max_panels = check_path_args(
        num_nodes, mode, chunk_size, rtol, max_panels, return_info
    )
    shape = check_model(apply_fn, params, xs, ys)
    F_shape = (shape.n, *shape.out_shape, shape.p + 1)
    check_fits_in_memory("the dual matrix F̃", F_shape, shape.dtype, DENSE_HINT)
    if num_nodes is None:
        args = (apply_fn, params, xs, shape, mode, chunk_size, rtol, max_panels)
        adj, info = adaptive_adjoint(*args, report=True)
        dual, bad_offset = _append_offset_jit(apply_fn, params, xs, ys, adj)
        report_nonfinite(bad_offset, shape.n, nonfinite_offset)
        return (dual, info) if return_info else dual
    kw = dict(num_nodes=num_nodes, mode=model_mode(mode, shape), chunk_size=chunk_size)
    dual, *bad = _dual_matrix_jit(apply_fn, params, xs, ys, **kw)
    bad_adjoint, bad_offset = fetch(*bad) if is_concrete(dual) else bad
    report_nonfinite(bad_adjoint, shape.n, nonfinite_adjoint)
    report_nonfinite(bad_offset, shape.n, nonfinite_offset)
    return dual


@functools.partial(traced.jit, static_argnames=("apply_fn", "num_nodes", "mode", "chunk_size"))
@highest_precision
def _dual_matrix_jit(apply_fn, params, xs, ys, *, num_nodes, mode, chunk_size):
    """The dual matrix by a fixed rule, and the numbers of examples with a NaN or Inf adjoint and offset."""
    model = flatten_model(apply_fn, params, xs)
    dual = dual_block(model, xs, ys, num_nodes=num_nodes, mode=mode, chunk_size=chunk_size)
    return dual, count_bad_examples(dual[..., :-1]), count_bad_examples(dual[..., -1])


@functools.partial(traced.jit, static_argnames=("apply_fn",))
def _append_offset_jit(apply_fn, params, xs, ys, adj):
    """``[adj | f(0) − y]``, and the number of examples whose offset is NaN or Inf."""
    offset = _offset_column(flatten_model(apply_fn, params, xs), xs, ys).astype(adj.dtype)
    return jnp.concatenate([adj, offset[..., None]], axis=-1), count_bad_examples(offset)


def dual_block(model, xs, ys, *, num_nodes, mode, chunk_size) -> Array:
    """``[F* | f(0) − y]`` of a validated model on ``xs`` (traced): ``(n,) + out_shape + (p + 1,)``;
    ``num_nodes=None``: adaptive adjoints (the traced scheme of ``nlis_jax._adaptive``)."""
    offset = _offset_column(model, xs, ys)
    adj = flat_adjoint(model, xs, num_nodes=num_nodes, mode=mode, chunk_size=chunk_size)
    return jnp.concatenate([adj, offset[..., None].astype(adj.dtype)], axis=-1)


class DualOperator(NamedTuple):
    r"""Matrix-free :math:`\tilde F(\theta)`: never forms the ``n × (p+1)`` matrix.

    Attributes:
      mv: ``v (p+1,) -> F̃ v``, shape ``(n,)`` (or ``(n, k)``): one ``jax.jvp`` of the vmapped model per
        quadrature node, vmapped over the nodes.
      rmv: ``u (n,) or (n, k) -> F̃ᵀ u``, shape ``(p+1,)``: one ``jax.vjp`` per node.
      shape: ``(n, p + 1)`` (or ``(n, k, p + 1)``).
      dtype: dtype of the products.
      theta_tilde: ``[θ; 1]``, shape ``(p+1,)``; ``mv(theta_tilde)`` is the residual.
    """

    mv: Callable[[Array], Array]
    rmv: Callable[[Array], Array]
    shape: tuple[int, ...]
    dtype: jnp.dtype
    theta_tilde: Array


# Module-level jitted products keyed on ``apply_fn`` (static): a second operator for the same model and
# shapes reuses the compilation. Arrays enter as arguments, never as closed-over constants (XLA would
# constant-fold products of large captured arrays at compile time).
def _path_outputs(apply_fn, params, xs):
    model = flatten_model(apply_fn, params, xs)

    def outputs(u):  # F(u) = [f(u; x_1), ..., f(u; x_n)]
        return jax.vmap(model.fn, in_axes=(None, 0))(u, xs)

    return model.theta, outputs


def _rounded(product, like):
    """``product`` in ``like``'s dtype (the operator's: products of a half-precision model are computed
    in float32 and rounded once), and whether all of it is finite there."""
    out = product.astype(like.dtype)
    return out, jnp.all(jnp.isfinite(out))


@functools.partial(traced.jit, static_argnames=("apply_fn",))
@highest_precision
def _dual_mv(apply_fn, params, xs, offset, nodes, weights, v):
    theta, outputs = _path_outputs(apply_fn, params, xs)
    p, w = theta.shape[0], v.astype(weights.dtype)
    tangents = jax.vmap(lambda t: jax.jvp(outputs, (t * theta,), (w[:p],))[1])(nodes)
    return _rounded(jnp.tensordot(weights, tangents, axes=1) + offset * w[p], v)


@functools.partial(traced.jit, static_argnames=("apply_fn",))
@highest_precision
def _dual_rmv(apply_fn, params, xs, offset, nodes, weights, u):
    theta, outputs = _path_outputs(apply_fn, params, xs)
    # the cotangent in the dtype of the model's outputs, which may differ from the params' (float64 xs
    # with float32 params, or a model casting its output): jax.vjp refuses any other
    w = u.astype(jax.eval_shape(outputs, theta).dtype)
    cotangents = jax.vmap(lambda t: jax.vjp(outputs, t * theta)[1](w)[0])(nodes)
    return _rounded(jnp.concatenate([weights @ cotangents, jnp.sum(offset * w)[None]]), u)


@traced.entry
def dual_operator(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: PyTree,
    ys: Array | None = None,
    *,
    num_nodes: int = 16,
) -> DualOperator:
    r"""Matrix-free dual operator with :math:`F^*(\theta) v = \sum_k w_k\,\mathrm{jvp}(F, t_k\theta, v)`
    and :math:`F^*(\theta)^\top u = \sum_k w_k\,\mathrm{vjp}(F, t_k\theta)(u)`.

    Args:
      apply_fn, params, xs, ys: as in :func:`dual_matrix`.
      num_nodes: Gauss-Legendre nodes of the fixed rule (a Python int; the operator has no adaptive
        rule: ``dual_matrix``'s default ``None`` is refused).

    Returns:
      A :class:`DualOperator` of ``F̃`` at this call (numpy ``params`` and ``xs`` are copied: later
      in-place changes of them do not reach it); ``mv``/``rmv`` are jitted once per ``apply_fn`` and
      shapes (also across operators), and can be ``jax.vmap``-ed over a batch of vectors.
    """
    check_num_nodes(num_nodes)
    shape = check_model(apply_fn, params, xs, ys)
    # a snapshot: mv and rmv pass params and xs to their programs at every call, while [θ; 1] and the
    # offset are fixed here; numpy arrays changed in place later (an optimiser step, a reused buffer)
    # gave products of neither state. Numpy arrays are copied (jax arrays are immutable; Python numbers
    # keep their weak type)
    params, xs = jax.tree.map(lambda a: np.array(a) if isinstance(a, np.ndarray) else a, (params, xs))
    p, dtype = shape.p, shape.dtype
    theta_tilde, offset, bad_offset = _operator_data(apply_fn, params, xs, ys)
    report_nonfinite(bad_offset, shape.n, nonfinite_offset)
    out_shape = (shape.n,) + shape.out_shape
    wide = routes.compute_dtype(dtype)
    if wide != dtype:  # half precision: products evaluated and summed in float32, rounded back once
        params, xs, offset = in_float32(params), in_float32(xs), offset.astype(wide)
    nodes, weights = gauss_legendre(num_nodes, wide)
    args = (apply_fn, params, xs, offset, nodes, weights)

    def mv(v):
        return _finite("mv", *_dual_mv(*args, _operand("mv", "a vector", "v", v, (p + 1,), dtype)))

    def rmv(u):
        return _finite("rmv", *_dual_rmv(*args, _operand("rmv", "an array", "u", u, out_shape, dtype)))

    return DualOperator(mv, rmv, out_shape + (p + 1,), dtype, theta_tilde)


def _finite(method: str, out: Array, finite: Array) -> Array:
    """``out``, after a ``ValueError`` (a ``checkify`` check under tracing, inside
    ``nlis_jax.traced_checks()``) unless ``finite``: NaN or Inf from an overflow in the dtype, or a
    gradient not finite on the path ``tθ``, as :func:`dual_matrix` reports it."""
    message = (
        f"dual_operator.{method}: the product is NaN or Inf (a gradient of apply_fn not finite on the path "
        "tθ, or overflow in the params' dtype: rescale the inputs or the vector)."
    )
    if not is_concrete(finite):
        traced.check(finite, message)
    elif not bool(finite):
        raise ValueError(message)
    return out


def _operand(method: str, kind: str, name: str, a, shape: tuple[int, ...], dtype) -> Array:
    """``a`` as an array of ``dtype`` after checking its shape (``ValueError``), that it is real
    (``TypeError``) and, when concrete, finite (``ValueError``: a NaN would spread to every product)."""
    a = a if hasattr(a, "dtype") else np.asarray(a)
    expects = f"{method} expects {kind}"
    if jnp.shape(a) != shape:
        raise ValueError(f"{expects} of shape {shape}, got {name} of shape {jnp.shape(a)}.")
    real = jnp.issubdtype(a.dtype, jnp.integer) or jnp.issubdtype(a.dtype, jnp.floating) or a.dtype == bool
    if not real:
        raise TypeError(f"{expects} of real numbers, got {name} of dtype {a.dtype}.")
    if isinstance(a, np.ndarray | np.generic) and not jnp.issubdtype(a.dtype, jnp.floating):
        a = np.asarray(a, dtype)  # host integers cast on the host: int64 past int32 does not wrap around
    check_finite(f"{method}: {name}", a)
    return jnp.asarray(a, dtype)


@functools.partial(traced.jit, static_argnames=("apply_fn",))
@highest_precision
def _operator_data(apply_fn, params, xs, ys):
    """``([θ; 1], f(0) − y)`` of the operator, flattened under the trace, and the number of examples whose
    offset is NaN or Inf."""
    model = flatten_model(apply_fn, params, xs)
    theta = model.theta
    offset = _offset_column(model, xs, ys).astype(theta.dtype)
    return jnp.concatenate([theta, jnp.ones((1,), theta.dtype)]), offset, count_bad_examples(offset)
