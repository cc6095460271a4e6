r"""Projected-gradient training on a weighted sample, built on Optax.

The problem is

.. math::

    \min_{\theta \in C} \; L_w(\theta) = \sum_{i=1}^n w_i \, \ell\big(f(\theta; x_i), y_i\big),

with importance weights :math:`w_i \ge 0` (all ones for the full data) and a closed convex set
:math:`C` given by its projection :math:`\Pi_C` (:mod:`nlis_jax.projections`). Each step is

.. math::

    \theta \leftarrow \Pi_C\big(\texttt{optax.apply\_updates}(\theta, u)\big), \qquad
    u = \texttt{optimizer.update}(\nabla J(\theta), \ldots),

where the optimised objective is the weighted MEAN :math:`J(\theta) = L_w(\theta) / \sum_i w_i`:
dividing by the positive constant :math:`\sum_i w_i` leaves the minimiser unchanged, and keeps
learning rates meaningful across sample sizes and weight scales.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nlis_jax import _traced as traced
from nlis_jax._adjoint import eval_example, num_examples
from nlis_jax._checks import (
    check_array_types,
    check_bool,
    check_choice,
    check_finite,
    check_finite_each,
    check_floating,
    check_key,
    check_leading_axis,
    check_nonnegative,
    check_not_complex,
    check_positive_int,
    check_same_length,
    check_weights_not_all_subnormal,
    is_concrete,
    under_trace,
    value_range,
)
from nlis_jax._host import (
    LOSSES_NEED_YS,
    host_losses,
    is_host_data,
    nonfinite_losses,
    not_one_array,
    overflowed_sum,
)
from nlis_jax._precision import at_least_float32, promoted
from nlis_jax._types import ApplyFn, Array, PRNGKey, PyTree
from nlis_jax.projections import Box, Projection, check_projection, identity, inward_bounds

#: A per-example loss ``loss(pred, y) -> scalar`` for ONE example.
LossFn = Callable[[Array, Array], Array]

#: Default ``progress``: a bar is shown only for runs of at least this many steps.
PROGRESS_MIN_STEPS = 2000
#: Examples per chunk of the losses of host data (numpy, memmap) when ``chunk_size`` is not given.
HOST_CHUNK = 4096


class TrainState(NamedTuple):
    """State of the projected-gradient loop: parameters and the optimizer state."""

    params: PyTree  #: the current iterate (a pytree of the structure of the initial params)
    opt_state: optax.OptState  #: the optimizer's state (``optimizer.init(params)``, updated each step)


class NonFiniteLossError(FloatingPointError):
    """:func:`fit` stopped because the loss or the updated parameters became NaN or Inf.

    Attributes:
        state: the :class:`TrainState` of the last iterate with finite parameters (the failing update is
            discarded); where the loss failed, its loss is the non-finite one reported.
        step: the step at which the loss (evaluated before that step's update) or the update failed.
    """

    def __init__(self, message: str, *, state: TrainState, step: int):
        super().__init__(message)
        self.state = state
        self.step = step

    def __reduce__(self):  # pickle and copy: the default rebuilt it from args alone (no state, step)
        return _rebuild_nonfinite_loss_error, (self.args[0], self.state, self.step)


def _rebuild_nonfinite_loss_error(message: str, state: TrainState, step: int) -> NonFiniteLossError:
    return NonFiniteLossError(message, state=state, step=step)


class FitResult(NamedTuple):
    r"""What :func:`fit` returns.

    Attributes:
        params: final parameters :math:`\theta_T` (same pytree structure and dtypes as the input).
        losses: shape ``(num_steps,)``; ``losses[t]`` is
            :math:`L_w(\theta_t) = \sum_i w_i \ell_i(\theta_t)` (the SUM form, not divided by
            :math:`\sum w`) at the parameters BEFORE update ``t``, where :math:`\theta_0` is the
            projected initial point. In minibatch mode it is the unbiased estimate
            :math:`\frac{n}{b}\sum_{i \in B_t} w_i \ell_i(\theta_t)` from that step's batch.
        opt_state: final optimizer state (pass it back to :func:`fit` to continue training).
        final_loss: :math:`L_w(\theta_T)` on ALL the given data, exact also in minibatch mode.
        normalizer: :math:`\sum_i w_i`; the optimised objective is ``loss / normalizer``.

    ``losses``, ``final_loss`` and ``normalizer`` are in the params' dtype, at least float32: with
    float16 or bfloat16 params (kept in their dtype) the weights, the products :math:`w_i \ell_i`, their
    sum and :math:`1/\sum w` are float32, where importance weights (``1/(s p_i)``, beyond 65,504 for a
    rare row) and their sums do not overflow.
    """

    params: PyTree
    losses: Array
    opt_state: optax.OptState
    final_loss: Array
    normalizer: Array


# --------------------------------------------------------------------------------------------------
# Per-example losses


def _squared(pred: Array, y: Array) -> Array:
    pred, y = jnp.asarray(pred), jnp.asarray(y)
    if pred.shape != y.shape:
        raise ValueError(
            f'loss="squared": apply_fn returns shape {pred.shape} per example but each ys[i] has '
            f"shape {y.shape}; they must match."
        )
    return jnp.sum(jnp.square(pred - y))


def _cross_entropy(logits: Array, label: Array) -> Array:
    logits, label = jnp.asarray(logits), jnp.asarray(label)
    if logits.ndim != 1 or logits.shape[0] < 2:
        raise ValueError(_logits_shape_message(logits.shape))
    if label.shape != () or not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(
            f'loss="cross_entropy": each ys[i] must be an integer class label (shape ()), '
            f"got shape {label.shape} and dtype {label.dtype}."
        )
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def _logistic(logit: Array, label: Array) -> Array:
    logit, label = jnp.asarray(logit), jnp.asarray(label)
    if logit.shape != () or label.shape != ():
        raise ValueError(
            f'loss="logistic": apply_fn must return one logit per example and ys[i] be a scalar in '
            f"[0, 1]; got shapes {logit.shape} and {label.shape}."
        )
    return optax.sigmoid_binary_cross_entropy(logit, label.astype(logit.dtype))


#: Built-in per-example losses, selectable by name.
LOSSES: dict[str, LossFn] = {
    "squared": _squared,
    "cross_entropy": _cross_entropy,
    "logistic": _logistic,
}


def _resolve_loss(loss: str | LossFn) -> LossFn:
    if isinstance(loss, str):
        check_choice("loss", loss, LOSSES)
        return LOSSES[loss]
    if callable(loss):
        return loss
    names = sorted(LOSSES)
    raise TypeError(f"loss must be one of {names} or a callable loss(pred, y), got {loss!r}.")


class _Static:
    """Hash-by-identity wrapper for a static argument that is not hashable (cached per object)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and other.obj is self.obj


def _static(obj: Any) -> Any:
    """``obj`` itself when hashable (equal objects share a compilation), else :class:`_Static`."""
    try:
        hash(obj)
    except TypeError:
        return _Static(obj)
    return obj


def _unwrap(obj: Any) -> Any:
    return obj.obj if isinstance(obj, _Static) else obj


def per_example_losses(
    apply_fn: ApplyFn, loss_fn: LossFn, params: PyTree, xs: Array, ys: Array, chunk_size=None
) -> Array:
    """``(n,)`` losses :math:`\\ell(f(\\theta; x_i), y_i)` (traceable), vmapped or chunked with lax.map."""
    apply_fn, loss_fn = _unwrap(apply_fn), _unwrap(loss_fn)

    def one(x, y):
        value = loss_fn(apply_fn(params, x), y)
        if jnp.shape(value) != ():
            shape = jnp.shape(value)
            raise ValueError(f"loss must return a scalar per example, got shape {shape}.")
        return value

    if chunk_size is None:
        return jax.vmap(one)(xs, ys)
    return jax.lax.map(lambda xy: one(*xy), (xs, ys), batch_size=chunk_size)


def weighted_sum(apply_fn, loss_fn, params, xs, ys, weights, chunk_size=None, *, wide=False) -> Array:
    """``Σ_i w_i ℓ_i`` (plain sum with ``weights=None``), traceable.

    The products ``w_i ℓ_i`` and their sum are formed in at least float32 (``promote_types(dtype of ℓ,
    float32)``): the per-example losses of a half-precision model stay in its dtype, but weights such as
    ``1/(s p_i) > 65,504`` and sums of many losses overflow float16. The result is rounded once to the
    losses' dtype, or kept in that wider dtype with ``wide=True`` (:func:`fit`). For float32 and float64
    losses nothing changes.
    """
    losses = per_example_losses(apply_fn, loss_fn, params, xs, ys, chunk_size)
    acc = at_least_float32(losses.dtype)
    if weights is None:
        total = jnp.sum(losses.astype(acc))
    else:
        total = jnp.sum(weights.astype(acc) * losses.astype(acc))
    return total if wide else total.astype(losses.dtype)


_weighted_sum_jit = traced.jit(weighted_sum, static_argnums=(0, 1), static_argnames=("chunk_size", "wide"))
_per_example_jit = traced.jit(per_example_losses, static_argnums=(0, 1), static_argnames=("chunk_size",))


def _one_array(ys):
    """``ys`` of the device path as one array: a list or tuple of numbers as numpy makes it, as the host
    path and the weights take them (``jnp.result_type`` cannot read a list); ``TypeError`` for a dict or
    another container of arrays."""
    if isinstance(ys, list | tuple):
        return np.asarray(ys)
    if ys is None or hasattr(ys, "shape") or isinstance(ys, int | float | complex):
        return ys
    raise not_one_array("ys", ys)


def _check_data(params: PyTree, xs, ys, weights) -> int:
    """Shape and value checks shared by :func:`weighted_loss` and :func:`fit`; returns ``n``."""
    check_array_types("params", params)  # a pandas DataFrame as xs: jax's error printed it whole
    check_array_types("xs", xs)
    check_array_types("ys", ys)  # a pandas Series: named, as check_model names it for the scores
    if not jax.tree.leaves(params):
        raise ValueError("params has no array leaves.")
    check_floating("params", params)
    if ys is None:
        raise ValueError(LOSSES_NEED_YS)
    n = num_examples(xs, "xs")  # a pytree of arrays sharing the example axis, as the scores take it
    n_y = check_leading_axis("ys", ys)
    check_same_length("xs", n, "ys", n_y)
    check_not_complex("ys", ys)
    check_finite_each(("params", params), ("xs", xs), ("ys", ys))  # one read back for the three
    if weights is not None:
        if isinstance(weights, list | tuple):  # as the host path takes them (jnp.result_type cannot)
            weights = np.asarray(weights)
        check_array_types("weights", weights)
        if jnp.shape(weights) != (n,):
            shape = jnp.shape(weights)
            raise ValueError(f"weights must have shape ({n},) (one per example), got {shape}.")
        if jnp.issubdtype(jnp.result_type(weights), jnp.complexfloating):
            raise TypeError(f"weights must be real numbers, got dtype {jnp.result_type(weights)}.")
        check_finite("weights", weights)
        check_nonnegative("weights", weights)
        check_weights_not_all_subnormal("weights", weights)
    return n


def _check_model(apply_fn, params, xs) -> None:
    """``apply_fn`` on one example's shapes (:func:`nlis_jax._adjoint.eval_example`): a wrong width of
    ``xs`` or a missing leaf of ``params`` is a ``ValueError`` showing the shapes, as in the host path and
    :func:`nlis_jax.adjoint` (it was jax's ``TypeError`` from deep inside the loss, or a ``KeyError``)."""
    eval_example(
        apply_fn,
        params,
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), xs),
    )


def _check_labels(apply_fn, params, xs, ys, loss) -> None:
    """Labels in range for the built-in classification losses, before any work.

    ``"cross_entropy"``: integers in ``[0, k)``, ``k`` the number of logits; ``"logistic"``: labels in
    ``[0, 1]``. Out of range they give NaN or a wrong loss, which ``fit`` would blame on the step size.
    A concrete ``ys`` is checked here (``ValueError``); a traced one (under a user's ``jax.jit``) by a
    ``checkify`` check inside ``nlis_jax.traced_checks()``, as NaN in ``xs`` is.
    """
    if not _checks_values(loss, jnp.result_type(ys)) or jnp.size(ys) == 0:
        return
    example = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), xs)
    if not is_concrete(ys):
        if traced.enabled():
            _trace_label_range(apply_fn, params, loss, example, ys)
        return
    _check_label_range(apply_fn, params, loss, example, jnp.result_type(ys), lambda: value_range(ys))


def _trace_label_range(apply_fn, params, loss, example, ys) -> None:
    """The conditions of :func:`_check_label_range` on a traced ``ys``, as ``checkify`` checks."""
    low, high = jnp.min(ys), jnp.max(ys)
    if loss == "squared":
        exact = _exact_limit(apply_fn, params, example, ys.dtype)
        if exact is not None and exact[0] < jnp.iinfo(ys.dtype).max:
            bound = jnp.asarray(exact[0], ys.dtype)
            message = _inexact_message(*exact, f"values beyond {exact[0]:,} in magnitude", "")
            unsigned = jnp.issubdtype(ys.dtype, jnp.unsignedinteger)  # -bound would wrap around
            traced.check((high <= bound) if unsigned else (low >= -bound) & (high <= bound), message)
        return
    if loss == "logistic":
        traced.check(
            (low >= 0) & (high <= 1), 'loss="logistic": labels must lie in [0, 1] (the two classes 0 and 1).'
        )
        return
    k = _num_logits(apply_fn, params, example)
    traced.check(
        (low >= 0) & (high < k),
        f'loss="cross_entropy": labels must be integers in [0, {k}) for the {k} logits of apply_fn.',
    )


def _num_logits(apply_fn, params, example) -> int:
    """``k``, the length of ``apply_fn(params, x)`` for one example (shapes only); ``ValueError`` unless
    it is a vector of at least two (a scalar output gave a message that depended on the labels' values;
    one logit made the loss 0 whatever the parameters)."""
    out = jax.eval_shape(apply_fn, params, example)
    if len(out.shape) != 1 or out.shape[0] < 2:
        raise ValueError(_logits_shape_message(out.shape))
    return out.shape[0]


def _logits_shape_message(shape) -> str:
    return (
        f'loss="cross_entropy" needs apply_fn to return a vector of k logits per example (one per class, '
        f"k >= 2: with one logit the loss is 0 whatever the parameters), got output shape {tuple(shape)}."
    )


def _checks_values(loss, y_dtype) -> bool:
    """Whether the values of ``ys`` of dtype ``y_dtype`` are read before any work: the labels of the
    classification losses (integers for ``"cross_entropy"``: other dtypes the loss itself names), and
    integer responses of ``"squared"``, which ``f − y`` rounds to the model output's dtype."""
    integer = jnp.issubdtype(y_dtype, jnp.integer)
    return loss == "logistic" or (loss in ("cross_entropy", "squared") and integer)


def _exact_limit(apply_fn, params, example, y_dtype) -> tuple[int, np.dtype] | None:
    """``(2^(m+1), dtype)``: the floating dtype ``f − y`` is computed in (``f`` the output for one
    ``example``, shapes only) and the magnitude up to which it holds every integer exactly (``m`` its
    mantissa bits); ``None`` when that dtype is not floating."""
    computed = jnp.result_type(jax.eval_shape(apply_fn, params, example).dtype, y_dtype)
    if not jnp.issubdtype(computed, jnp.floating):
        return None
    return 2 ** (jnp.finfo(computed).nmant + 1), np.dtype(computed)


def _inexact_message(limit: int, computed, found: str, where: str) -> str:
    return (
        f'loss="squared": integer ys with {found}{where}: f − y computes them in {computed.name} (the '
        f"model output's dtype), which holds integers exactly only up to {limit:,} in magnitude (a "
        f"residual of 1 could become 0). Pass ys as floats of a dtype that holds them (float64 with "
        f"jax_enable_x64), or rescale them."
    )


def _check_label_range(apply_fn, params, loss, example, dtype, read_range, where="") -> None:
    """``ValueError`` when labels of dtype ``dtype`` with values in ``read_range()`` (``(low, high)``, or
    ``None`` for values holding NaN or Inf, which the pass over the data reports) are out of range for
    ``loss`` (see :func:`_check_labels`); ``example`` is one example of ``xs`` (its shape gives ``k``),
    ``where`` is appended to the message. Shared by the device path and host data (all of ``ys``, or one
    chunk); ``read_range`` is called only for a loss and dtype whose values are checked
    (:func:`_checks_values`). ``"squared"``: integer responses within the integers that the dtype of
    ``f − y`` holds exactly."""
    if not _checks_values(loss, dtype):
        return
    found = read_range()
    if found is None:
        return
    low, high = (v.item() if hasattr(v, "item") else v for v in found)  # ints stay exact
    if low > high:  # no values (an empty block or chunk)
        return
    if loss == "squared":
        exact = _exact_limit(apply_fn, params, example, dtype)
        if exact is not None and max(-low, high) > exact[0]:
            raise ValueError(_inexact_message(*exact, f"values in [{int(low):,}, {int(high):,}]", where))
        return
    if loss == "logistic":
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f'loss="logistic": labels must lie in [0, 1] (the two classes 0 and 1), '
                f"got values in [{low:g}, {high:g}]{where}."
            )
        return
    k = _num_logits(apply_fn, params, example)
    if low < 0 or high >= k:
        raise ValueError(
            f'loss="cross_entropy": labels must be integers in [0, {k}) for the {k} logits of apply_fn, '
            f"got values in [{low:g}, {high:g}]{where}."
        )


def _needs_extra_args(optimizer, params, state) -> bool:
    """Whether ``optimizer.update`` works on ``params`` (shapes only) once given the extra keyword arguments
    of an ``optax.GradientTransformationExtraArgs`` that ``fit`` does not pass: ``value``, ``grad`` and
    ``value_fn`` (``optax.contrib.reduce_on_plateau`` needs ``value``; ``optax.lbfgs`` all three)."""
    if not isinstance(optimizer, optax.GradientTransformationExtraArgs):
        return False
    zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))

    def update(grads, opt_state):
        value_fn = lambda *_, **__: zero
        return optimizer.update(grads, opt_state, grads, value=zero, grad=grads, value_fn=value_fn)

    try:
        jax.eval_shape(update, params, state)[1]
    except Exception:
        return False
    return True


def _is_weak(leaf, want) -> bool:
    """A weakly typed leaf (a Python number or a weak ``jax.Array``, ``jnp.asarray(3e-3)``) of the kind of
    ``want`` (floating or integer: a float where ``optimizer.init`` has a count is refused, not truncated)."""
    if isinstance(leaf, jax.Array):
        weak = leaf.weak_type
    else:
        weak = isinstance(leaf, (int, float)) and not isinstance(leaf, bool)
    kinds = [jnp.issubdtype(d, jnp.floating) for d in (jnp.result_type(leaf), want.dtype)]
    return weak and kinds[0] == kinds[1]


def _strongly_typed(leaf, want):
    """``leaf`` in the dtype of ``want`` (the leaf of ``optimizer.init(params)``) if it is weakly typed:
    an optimizer state edited with ``jnp.asarray(3e-3)`` or a Python float (``optax.inject_hyperparams``'
    learning rate) is another input type to fit's programs than the state ``optimizer.init`` makes, so
    each would compile them again; jax's default float for it was float64 with float32 params."""
    if not _is_weak(leaf, want):
        return leaf
    return leaf.astype(want.dtype) if isinstance(leaf, jax.Array) else np.asarray(leaf, want.dtype)


def _check_optimizer_state(optimizer, params, opt_state):
    """``optimizer.init``/``update`` work on ``params`` (traced by shape only), and ``opt_state``
    (if given) has the structure, shapes and dtypes of ``optimizer.init(params)``; returns ``opt_state``
    with its weakly typed leaves in those dtypes (:func:`_strongly_typed`)."""
    expected = None
    try:
        expected = jax.eval_shape(optimizer.init, params)
        jax.eval_shape(optimizer.update, params, expected, params)[1]
    except Exception as err:
        failed = f"calling its init/update on params failed: {type(err).__name__}: {err}"
        if expected is not None and _needs_extra_args(optimizer, params, expected):
            raise TypeError(
                "optimizer.update needs extra arguments that fit does not pass: fit (and the step of "
                "nlis_jax.make_train_step) call optimizer.update(grads, opt_state, params) without keyword "
                "arguments such as value= or value_fn=, which e.g. optax.contrib.reduce_on_plateau and "
                "optax.lbfgs require. Use an optimizer that needs none, or write the loop yourself: "
                "optimizer.update(grads, opt_state, params, value=loss, ...), then optax.apply_updates and "
                f"the projection; {failed}"
            ) from err
        raise TypeError(
            "optimizer is not an optax.GradientTransformation that fit can drive: its init/update do not "
            "run on params as fit calls them: optimizer.update(grads, "
            "opt_state, params), grads of the structure of params, no other arguments. Optimizers that need "
            "more (keyword arguments such as value=, obj_fn= or grad_fn=, also inside optax.MultiSteps; "
            "gradients of another structure, e.g. optax.lookahead's fast/slow params) do not work with fit: "
            f"write the loop yourself from nlis_jax.make_train_step's pattern; {failed}"
        ) from err
    if opt_state is None:
        return None
    got, want = jax.tree.leaves(opt_state), jax.tree.leaves(expected)
    if jax.tree.structure(opt_state) != jax.tree.structure(expected) or any(
        jnp.shape(a) != b.shape for a, b in zip(got, want, strict=True)
    ):
        raise ValueError(
            "opt_state does not match optimizer.init(params) (structure or shapes differ): it comes "
            "from another optimizer or other params; pass the opt_state of a FitResult of this optimizer."
        )
    for a, b in zip(got, want, strict=True):
        if jnp.result_type(a) != b.dtype and not _is_weak(a, b):
            raise ValueError(
                f"opt_state does not match optimizer.init(params): a leaf of dtype {jnp.result_type(a)} "
                f"where optimizer.init(params) has {b.dtype} (params of another dtype than the state's "
                "fit); cast params back, or start without opt_state."
            )
    return jax.tree.unflatten(jax.tree.structure(opt_state), map(_strongly_typed, got, want))


@traced.entry
def weighted_loss(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: Array,
    ys: Array | None = None,
    weights: Array | None = None,
    *,
    loss: str | LossFn = "squared",
    chunk_size: int | None = None,
) -> Array:
    r"""Weighted sum of per-example losses, :math:`L_w(\theta) = \sum_i w_i\,\ell_i(\theta)`.

    With ``weights=None`` this is the full-data loss :math:`L(\theta) = \sum_i \ell_i(\theta)`
    (for ``loss="squared"``, :math:`\sum_i r_i(\theta)^2`, the squared residuals), where
    :math:`\ell_i(\theta) = \ell(f(\theta; x_i), y_i)`. It is jit-, grad- and vmap-friendly;
    called on concrete arrays it runs a cached compiled kernel (keyed on ``apply_fn``, ``loss`` and
    ``chunk_size``).

    Args:
        apply_fn: ``apply_fn(params, x)`` for ONE example: a scalar, or ``(k,)`` logits.
        params: pytree of floating-point arrays.
        xs: inputs, shape ``(n, ...)``: device arrays, or host data read ``chunk_size`` examples at a
            time (numpy arrays, memmaps, or a chunk source: a callable returning an iterable of
            ``(x_chunk, y_chunk)`` pairs, with ``ys=None`` and ``weights=None``).
        ys: real targets, shape ``(n, ...)``: same per-example shape as the output for ``"squared"``,
            integer labels ``(n,)`` for ``"cross_entropy"``, labels in ``[0, 1]`` ``(n,)`` for
            ``"logistic"``. ``None`` only with a chunk source (the responses travel in its chunks).
        weights: non-negative ``(n,)`` weights, e.g. ``1/(s p_i)`` from ``sample``; ``None`` means
            ones.
        loss: ``"squared"`` :math:`(f - y)^2` (summed over output entries),
            ``"cross_entropy"`` :math:`\operatorname{logsumexp}(z) - z_y` (``k`` logits ``z``),
            ``"logistic"`` :math:`\log(1 + e^{z}) - y z`, or a callable ``loss(pred, y) -> scalar``.
        chunk_size: if given, evaluate the examples ``chunk_size`` at a time (``lax.map``) to bound
            memory; the result is the same up to summation order.

    Returns:
        Scalar array: :math:`\sum_i w_i \ell_i(\theta)`.

    Raises:
        ValueError: NaN or Inf in the inputs, or (concrete inputs) losses that are NaN or Inf although
            the inputs are finite, with the number of such examples; under a trace the value is returned.
            A sum past the range of the losses' dtype although every loss is finite (a float16 model;
            the sum is formed in float32, then rounded to that dtype).
            Labels out of range for ``"cross_entropy"`` or ``"logistic"``, and integer ``ys`` of
            ``"squared"`` beyond the integers the model output's dtype holds exactly (``2^24`` in float32,
            ``2,048`` in float16: ``f − y`` is computed in that dtype); under a user's ``jax.jit``
            (traced ``ys``) a ``checkify`` check inside ``nlis_jax.traced_checks()``, as for NaN inputs.
        TypeError: complex ``ys`` or weights; ``ys`` a dict or another container of arrays.
    """
    loss_fn = _resolve_loss(loss)
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    if is_host_data(xs, (params, ys, weights)):  # numpy, memmap, chunk source: one chunk at a time
        return _host_loss(apply_fn, loss, params, xs, ys, weights, chunk_size, per_example=False)
    ys = _one_array(ys)
    _check_data(params, xs, ys, weights)
    _check_model(apply_fn, params, xs)
    _check_labels(apply_fn, params, xs, ys, loss)
    xs, ys = jax.tree.map(jnp.asarray, xs), jnp.asarray(ys)
    weights = None if weights is None else jnp.asarray(weights)
    total = _weighted_sum_jit(
        _static(apply_fn), _static(loss_fn), params, xs, ys, weights, chunk_size=chunk_size
    )
    if is_concrete(total) and not bool(jnp.isfinite(total)):  # finite inputs (checked): count the examples
        losses = _per_example_jit(_static(apply_fn), _static(loss_fn), params, xs, ys, chunk_size=chunk_size)
        _check_finite_losses(losses, f"the weighted loss is {float(total)}", name=False)
        raise ValueError(overflowed_sum(total.dtype))
    return total


@traced.entry
def per_example_loss(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: Array,
    ys: Array | None = None,
    *,
    loss: str | LossFn = "squared",
    chunk_size: int | None = None,
) -> Array:
    r"""Per-example losses :math:`\ell_i(\theta) = \ell(f(\theta; x_i), y_i)`, shape ``(n,)``.

    Jit-, grad- and vmap-friendly; on concrete arrays a cached compiled kernel runs (keyed on
    ``apply_fn``, ``loss`` and ``chunk_size``). ``weighted_loss(..., weights=w)`` equals
    ``sum(w * per_example_loss(...))`` up to summation order.

    Args:
        apply_fn, params, xs, ys, loss: as in :func:`weighted_loss`.
        chunk_size: if given, evaluate ``chunk_size`` examples at a time (``lax.map``) to bound memory.

    Returns:
        ``(n,)`` array of losses in the dtype of ``loss(pred, y)``: the model output's, or for
        ``"squared"`` float ``ys`` of a wider dtype (``f − y`` promotes).

    Raises:
        ValueError: as :func:`weighted_loss` (non-finite losses of concrete inputs name the first
            examples).
    """
    loss_fn = _resolve_loss(loss)
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    if is_host_data(xs, (params, ys)):
        return _host_loss(apply_fn, loss, params, xs, ys, None, chunk_size, per_example=True)
    ys = _one_array(ys)
    _check_data(params, xs, ys, None)
    _check_model(apply_fn, params, xs)
    _check_labels(apply_fn, params, xs, ys, loss)
    xs, ys = jax.tree.map(jnp.asarray, xs), jnp.asarray(ys)
    losses = _per_example_jit(_static(apply_fn), _static(loss_fn), params, xs, ys, chunk_size=chunk_size)
    if is_concrete(losses):
        _check_finite_losses(losses, "per_example_loss")
    return losses


def _check_finite_losses(losses, what: str, *, name: bool = True) -> None:
    """``ValueError`` when concrete ``(n,)`` losses of finite inputs (checked before) hold NaN or Inf;
    ``name``: the message names the first such examples."""
    bad = int(jnp.size(losses) - jnp.count_nonzero(jnp.isfinite(losses)))
    if bad:
        raise ValueError(f"{what}: " + nonfinite_losses(bad, int(jnp.size(losses)), losses if name else None))


def _host_loss(apply_fn, loss, params, xs, ys, weights, chunk_size, *, per_example: bool):
    """The losses of host data (numpy, memmap, chunk source), ``HOST_CHUNK`` examples at a time by default.

    The labels of the classification losses are checked as on the device path (:func:`_check_labels`):
    all of ``ys`` before any work (a memmap slice by slice), or each chunk of a chunk source as it comes.
    """
    chunk = HOST_CHUNK if chunk_size is None else chunk_size
    labels = functools.partial(_check_label_range, apply_fn, params, loss) if isinstance(loss, str) else None
    return host_losses(
        per_example_losses,
        _static(apply_fn),
        _static(_resolve_loss(loss)),
        params,
        xs,
        ys,
        weights,
        chunk_size=chunk,
        per_example=per_example,
        check_labels=labels,
    )


# --------------------------------------------------------------------------------------------------
# The projected step


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    projection: Callable[[PyTree], PyTree] | None = None,
    *,
    has_aux: bool = False,
    value_and_grad: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, Any]]:
    r"""One projected-gradient step, :math:`\theta \leftarrow \Pi_C(\theta + u)`.

    .. code-block:: python

        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = projection(optax.apply_updates(params, updates))

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``); with
            ``value_and_grad=True``, ``loss_fn(params, batch) -> (loss, grads)`` instead.
        optimizer: an ``optax.GradientTransformation``.
        projection: ``tree -> tree`` onto the constraint set; ``None`` means unconstrained.
        has_aux: whether ``loss_fn`` also returns auxiliary data.
        value_and_grad: ``loss_fn`` returns the loss AND its gradient, in the form of
            ``jax.value_and_grad(f, has_aux=has_aux)(params, batch)``, and is used as is: for a gradient
            that ``jax.value_and_grad`` of one loss does not give, e.g. one summed chunk by chunk.

    Returns:
        A pure function ``step(state, batch) -> (state, loss)`` (``loss`` is ``(loss, aux)`` with
        ``has_aux``), where ``loss`` is evaluated at the parameters BEFORE the update.

    Raises:
        TypeError: ``loss_fn`` or ``projection`` not callable (or ``projection`` the builder
            :func:`~nlis_jax.l2_ball` / :func:`~nlis_jax.box` itself), ``optimizer`` without ``init`` and
            ``update`` (e.g. the string ``"sgd"``), or a flag not a bool, at construction.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable loss_fn(params, batch), got {loss_fn!r}.")
    _check_optimizer_and_projection(optimizer, projection)
    has_aux, value_and_grad = check_bool("has_aux", has_aux), check_bool("value_and_grad", value_and_grad)
    proj = identity if projection is None else projection

    grad_fn = loss_fn if value_and_grad else jax.value_and_grad(loss_fn, has_aux=has_aux)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        value, grads = grad_fn(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = proj(optax.apply_updates(state.params, updates))
        return TrainState(params, opt_state), value

    return step


# --------------------------------------------------------------------------------------------------
# fit: a module-level jitted lax.scan segment, with the static objects as static arguments


class _Plan(NamedTuple):
    """The validated, static side of a :func:`fit` call."""

    loss_fn: Any
    n: int
    batch_size: int | None
    num_steps: int
    segment_len: int
    num_segments: int
    progress: bool


def _tree_all_finite(tree: PyTree) -> Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _guarded_step(step, projection, data, batch_size, dtype):
    """``run(state, key) -> (state, estimate, ok)``: one step of the unprojected ``step``, then
    ``projection``, that freezes the state on a failure. The update is checked before the projection: a
    box clips an Inf (a diverging step) to its bound, which would hide the failure."""
    n = jax.tree.leaves(data[0])[0].shape[0]

    def run(state, key):
        if batch_size is None:
            batch = data
        else:
            idx = jax.random.choice(key, n, (batch_size,), replace=False)
            batch = jax.tree.map(lambda a: a[idx], data)
        new_state, (_, estimate) = step(state, batch)
        updated = _tree_all_finite(new_state.params)
        new_state = new_state._replace(params=projection(new_state.params))
        ok = jnp.isfinite(estimate) & updated & _tree_all_finite(new_state.params)
        # Freeze on failure: nothing non-finite leaves the loop.
        new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
        return new_state, estimate.astype(dtype), ok

    return run


@functools.partial(
    traced.jit,
    static_argnames=("apply_fn", "optimizer", "static_projection", "loss_fn", "batch_size", "segment_len"),
)
def _segment(
    carry,
    data,
    inv_total,
    dyn_projection,
    step0,
    num_steps,
    keys,
    *,
    apply_fn,
    optimizer,
    static_projection,
    loss_fn,
    batch_size,
    segment_len,
):
    """``segment_len`` scan steps from ``step0`` (steps ``>= num_steps`` are skipped): ``(carry, losses)``.

    ``carry = (state, bad_step, bad_value)``: the first failing step (``-1`` if none) and its loss.
    """
    apply_fn, optimizer, loss_fn = _unwrap(apply_fn), _unwrap(optimizer), _unwrap(loss_fn)
    projection = dyn_projection if static_projection is None else _unwrap(static_projection)
    ratio = 1.0 if batch_size is None else jax.tree.leaves(data[0])[0].shape[0] / batch_size
    dtype = carry[2].dtype  # the params' dtype, at least float32 (_loss_dtype)

    def objective(params, batch):
        estimate = (weighted_sum(apply_fn, loss_fn, params, *batch, wide=True) * ratio).astype(dtype)
        return estimate * inv_total, estimate

    step = make_train_step(objective, optimizer, None, has_aux=True)
    run = _guarded_step(step, projection, data, batch_size, dtype)

    def skip(state, key):
        return state, jnp.full((), jnp.nan, dtype), jnp.array(True)

    def body(carry, inp):
        state, bad_step, bad_value = carry
        t, key = inp
        active = (t < num_steps) & (bad_step < 0)
        state, estimate, ok = jax.lax.cond(active, run, skip, state, key)
        failed = active & ~ok
        bad_step = jnp.where(failed, t, bad_step)
        bad_value = jnp.where(failed, estimate, bad_value)
        return (state, bad_step, bad_value), estimate

    steps = step0 + jnp.arange(segment_len, dtype=jnp.int32)
    return jax.lax.scan(body, carry, (steps, keys))


@traced.entry
def fit(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: Array,
    ys: Array,
    weights: Array | None = None,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    projection: Callable[[PyTree], PyTree] | None = None,
    loss: str | LossFn = "squared",
    batch_size: int | None = None,
    key: PRNGKey | None = None,
    progress: bool | None = None,
    num_segments: int | None = None,
    opt_state: optax.OptState | None = None,
) -> FitResult:
    r"""Projected-gradient minimisation of :math:`\sum_i w_i \ell_i(\theta)` over :math:`C`.

    Runs ``num_steps`` steps of
    :math:`\theta_{t+1} = \Pi_C(\texttt{optax.apply\_updates}(\theta_t, u_t))`, with :math:`u_t` the
    ``optimizer``'s update for the gradient of the normalised objective

    .. math::

        J(\theta) = \frac{1}{\sum_i w_i} \sum_{i=1}^n w_i\, \ell_i(\theta)

    (same minimiser as the sum; learning rates do not depend on ``n`` or the weight scale). In
    minibatch mode the sum is replaced at each step by the unbiased estimate
    :math:`\frac{n}{b}\sum_{i\in B_t} w_i \ell_i(\theta)` over ``b = batch_size`` examples drawn
    uniformly WITHOUT replacement with that step's key (``jax.random.split(key, num_steps)``).
    The initial point is projected first (:math:`\theta_0 = \Pi_C(\text{params})`), so every
    iterate lies in :math:`C`.

    The loop is a ``lax.scan`` under ``jax.jit``, split into ``num_segments`` segments of equal
    length (one compiled function for all segments). The compiled function is cached on
    ``(apply_fn, optimizer, projection, loss, batch_size, segment length)``: calling ``fit`` again
    with the same objects and shapes but new array values does not retrace. Build those objects
    once (a fresh ``lambda`` or ``optax.adam(1e-2)`` per call recompiles). Projections from
    :mod:`nlis_jax.projections` are passed as data, so a new radius or box also reuses the cache.

    ``fit`` itself drives the segments from Python: under a jax transformation (``jit``, ``vmap``,
    ``grad``) it raises ``TypeError``; :func:`make_train_step` is the step to put in a loop of your own.

    Args:
        apply_fn: ``apply_fn(params, x)`` for ONE example: a scalar, or ``(k,)`` logits.
        params: initial pytree of floating-point arrays (float32 and float64 both work, float16 and
            bfloat16 too, with the weighted sums in float32; the output keeps their dtypes).
        xs: inputs, shape ``(n, ...)``.
        ys: targets, shape ``(n, ...)`` (see :func:`weighted_loss`).
        weights: non-negative ``(n,)`` importance weights, not all zero; ``None`` means ones.
        optimizer: an ``optax.GradientTransformation`` (e.g. ``optax.sgd(0.1)``), called as
            ``optimizer.update(grads, opt_state, params)``: one whose update needs extra arguments
            (``value=``, ``value_fn=``: ``optax.contrib.reduce_on_plateau``, ``optax.lbfgs``) is refused.
        num_steps: number of steps (positive).
        projection: ``tree -> tree`` onto the constraint set (:func:`nlis_jax.projections.l2_ball`,
            ``box``, ...); ``None`` means unconstrained. It must return the structure, shapes and dtypes
            of ``params`` (checked once, by shape, before any work).
        loss: ``"squared"``, ``"cross_entropy"``, ``"logistic"`` or ``loss(pred, y) -> scalar``.
        batch_size: ``None`` for full-batch steps, else the minibatch size in ``[1, n]`` (then
            ``key`` is required).
        key: PRNG key for the minibatches (required with ``batch_size``, ignored without).
        progress: ``True`` shows a tqdm bar over segments, ``False`` never; the default ``None``
            shows one only when stderr is a terminal and ``num_steps >= 2000`` (library calls
            from scripts, logs and notebooks stay quiet).
        num_segments: scan segments (NaN checks and the progress bar update between segments);
            default ``max(1, min(20, num_steps // 100))``.
        opt_state: optimizer state to resume from; default ``optimizer.init(params)``.

    Returns:
        :class:`FitResult` with ``params``, ``losses`` of shape ``(num_steps,)`` (the SUM form
        :math:`L_w(\theta_t)` before each update, see :class:`FitResult`), ``opt_state``,
        ``final_loss`` and ``normalizer`` :math:`= \sum_i w_i`.

    Raises:
        ValueError, TypeError: on bad inputs, before any work.
        NonFiniteLossError: (a ``FloatingPointError``) when the loss (or the updated parameters)
            becomes NaN or Inf; the message names the step, ``.step`` holds it and ``.state`` is the
            :class:`TrainState` of the last iterate with finite parameters (nothing non-finite is kept;
            where the loss failed, it is the one at those parameters). Checked
            after each segment; later steps do not run.
    """
    if under_trace():  # its checks, segments and NaN stops read values on the host
        raise TypeError(
            "fit cannot run under a jax transformation (jit, vmap, grad): it drives its compiled training "
            "segments from Python and reads the loss between them. Call it outside, or build your own "
            "loop from nlis_jax.make_train_step."
        )
    loss_fn = _resolve_loss(loss)
    _check_optimizer_and_projection(optimizer, projection)
    ys = _one_array(ys)
    n = _check_data(params, xs, ys, weights)
    opt_state = _check_optimizer_state(optimizer, params, opt_state)  # weak leaves strongly typed
    plan = _plan(loss_fn, n, num_steps, batch_size, key, progress, num_segments)
    params = jax.tree.map(jnp.asarray, params)
    # the losses, the normaliser and the objective J in at least float32: with float16 params, weights
    # such as 200 or 1e5 made the sum of w_i l_i overflow and 1/sum(w) flush to 0 in float16
    dtype = _loss_dtype(params)
    w, total = _weights_and_total(weights, plan.n, dtype)
    _check_projection_output(projection, params)
    _check_model(apply_fn, params, xs)  # the first call of apply_fn: after the checks of the arguments
    _check_labels(apply_fn, params, xs, ys, loss)  # calls apply_fn too (shapes only): after _check_model
    static_projection, dyn_projection = _split_projection(_on_host(projection, params))
    state = _start(params, dyn_projection, opt_state, static=static_projection, optimizer=_static(optimizer))
    data = (jax.tree.map(jnp.asarray, xs), jnp.asarray(ys), w)
    segment = functools.partial(
        _segment,
        data=data,
        inv_total=np.asarray(1.0 / total, dtype),
        dyn_projection=dyn_projection,
        num_steps=plan.num_steps,
        apply_fn=_static(apply_fn),
        optimizer=_static(optimizer),
        static_projection=static_projection,
        loss_fn=_static(plan.loss_fn),
        batch_size=plan.batch_size,
        segment_len=plan.segment_len,
    )
    keys = None if plan.batch_size is None else jax.random.split(key, plan.num_steps)
    state, losses = _run_segments(segment, plan, state, keys, dtype)
    final = _weighted_sum_jit(
        _static(apply_fn), _static(plan.loss_fn), state.params, data[0], data[1], w, wide=True
    )
    if final.dtype != losses.dtype:  # the model's output dtype (float64 data, float32 params): as losses
        final = final.astype(losses.dtype)
    if not bool(jnp.isfinite(final)):  # finite parameters whose loss overflows
        raise NonFiniteLossError(
            f"fit stopped: the loss at the final parameters is {float(final)} (they are finite; the last "
            f"step's loss was {float(losses[-1]):.6g}). The exception's .state holds them; lower the "
            "learning rate, rescale the data, or check apply_fn for overflow.",
            state=state,
            step=plan.num_steps,
        )
    normalizer = jax.device_put(np.asarray(total, dtype))  # jnp.asarray would compile a conversion
    return FitResult(state.params, losses, state.opt_state, final, normalizer)


def _check_optimizer_and_projection(optimizer, projection) -> None:
    """``TypeError`` unless ``optimizer`` has ``init`` and ``update`` (an Optax GradientTransformation)
    and ``projection`` is ``None`` or callable."""
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}.")
    check_projection(projection)


def _plan(loss_fn, n: int, num_steps, batch_size, key, progress, num_segments) -> _Plan:
    """Check the run's sizes (before any work) and fix its static plan."""
    num_steps = check_positive_int("num_steps", num_steps)
    if batch_size is not None:
        batch_size = check_positive_int("batch_size", batch_size)
        if batch_size > n:
            raise ValueError(f"batch_size must be at most n = {n}, got {batch_size}.")
        if key is None:
            raise ValueError("batch_size requires an explicit PRNG key (key=jax.random.key(seed)).")
        check_key("key", key)
    if num_segments is None:
        num_segments = max(1, min(20, num_steps // 100))
    segment_len = math.ceil(num_steps / check_positive_int("num_segments", num_segments))
    if progress is None:  # a bar only when a person watches and the run is long
        progress = sys.stderr.isatty() and num_steps >= PROGRESS_MIN_STEPS
    else:
        progress = check_bool("progress", progress)
    return _Plan(
        loss_fn, n, batch_size, num_steps, segment_len, math.ceil(num_steps / segment_len), bool(progress)
    )


@functools.partial(traced.jit, static_argnames=("static", "optimizer"))
def _start(params, dyn_projection, opt_state, *, static, optimizer) -> TrainState:
    """The projected start point and the optimizer state (``optimizer.init`` unless given), in one
    compiled program (eagerly, a projection and an ``init`` are a dozen small programs)."""
    params = (dyn_projection if static is None else _unwrap(static))(params)
    return TrainState(params, _unwrap(optimizer).init(params) if opt_state is None else opt_state)


def _loss_dtype(params: PyTree):
    """The dtype of the objective, the recorded losses and the normaliser: the params' dtype, at least
    float32 (half-precision params keep their dtype; only the sums are wider)."""
    return at_least_float32(promoted(*jax.tree.leaves(params)))


def _check_projection_output(projection, params: PyTree) -> None:
    """``ValueError`` unless ``projection(params)`` (traced by shape only, once) has the pytree structure,
    shapes and dtypes of ``params``: another structure failed deep inside the step ("JAX does not support
    string indexing"), another dtype changed the dtypes of the fitted params silently."""
    if projection is None:
        return
    out = jax.eval_shape(lambda tree: projection(tree), params)  # a lambda: jit would hash Box's dicts
    want, got = jax.tree.structure(params), jax.tree.structure(out)
    if isinstance(out, Projection):  # a builder (nj.l2_ball) called on the params, not a projection
        raise TypeError(
            f"projection(params) is itself a projection ({type(out).__name__}): pass a built one, e.g. "
            f"projection=nj.l2_ball(1.0), not the builder {getattr(projection, '__name__', projection)}."
        )
    if want != got:
        raise ValueError(
            f"projection must return a pytree of the structure of params: params is {want}, "
            f"projection(params) is {got}."
        )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(out), strict=True):
        if jnp.shape(a) != b.shape or jnp.result_type(a) != b.dtype:
            where = "params" + jax.tree_util.keystr(path)
            raise ValueError(
                f"projection must keep the shapes and dtypes of params: {where} has shape {jnp.shape(a)} "
                f"and dtype {jnp.result_type(a)}, projection(params) returns shape {b.shape} and dtype "
                f"{b.dtype} there (cast the result back, e.g. with .astype(leaf.dtype))."
            )


def _weights_and_total(weights, n: int, dtype) -> tuple[Array, float]:
    """The weights as an array (ones for ``None``) and their sum, which must be positive."""
    if weights is None:
        return jax.device_put(np.ones((n,), dtype)), float(n)
    w = jnp.asarray(weights)
    # summed in at least float32: float16 weights of a large sample (1/(s p_i) each) overflow their own sum
    total = float(jnp.sum(w.astype(at_least_float32(w.dtype))))
    if not total > 0:
        check_weights_not_all_subnormal("weights", w)  # non-zero but subnormal: flushed on a CPU
        raise ValueError("weights must not all be zero.")
    if not math.isfinite(total):
        raise ValueError(f"weights sum to {total} (overflow): scale them down (fit normalises by their sum).")
    return w, total


def _split_projection(projection) -> tuple[Any, Any]:
    """``(static, dynamic)``: projections of this module travel as traced data (no recompile per radius)."""
    if _is_data_projection(projection):
        return None, projection
    return _static(identity if projection is None else projection), None


def _run_segments(segment, plan: _Plan, state: TrainState, keys, dtype) -> tuple[TrainState, Array]:
    """Run the segments, checking for a failure after each; returns the final state and the losses."""
    carry = (state, np.asarray(-1, np.int32), np.zeros((), dtype))
    chunks = []
    bar = _progress_bar(plan.num_steps) if plan.progress else None
    try:
        for s in range(plan.num_segments):
            start = s * plan.segment_len
            seg_keys = None
            if keys is not None:
                seg_keys = keys[np.minimum(np.arange(start, start + plan.segment_len), plan.num_steps - 1)]
            carry, seg_losses = segment(carry, step0=start, keys=seg_keys)
            chunks.append(seg_losses)
            bad_step = int(carry[1])
            if bad_step >= 0:
                raise _non_finite_error(bad_step, float(carry[2]), chunks, carry[0])
            if bar is not None:
                done = min(plan.segment_len, plan.num_steps - start)
                bar.update(done)
                bar.set_postfix(loss=f"{float(seg_losses[done - 1]):.4g}")
    finally:
        if bar is not None:
            bar.close()
    if len(chunks) == 1 and chunks[0].shape[0] == plan.num_steps:
        return carry[0], chunks[0]
    return carry[0], jax.device_put(np.concatenate([np.asarray(c) for c in chunks])[: plan.num_steps])


def _progress_bar(total: int):
    from tqdm import tqdm  # imported only when a bar is shown: `import nlis_jax` stays free of tqdm

    return tqdm(total=total, desc="fit", unit="step", leave=False)


def _is_data_projection(projection) -> bool:
    """A projection of this module whose leaves are all numbers/arrays (so it can be a jit arg)."""
    if not isinstance(projection, Projection):
        return False
    leaves = jax.tree.leaves(projection)
    data = (int, float, np.ndarray, np.generic, jax.Array)  # np.float32(0.5) is an np.generic
    return bool(leaves) and all(isinstance(leaf, data) for leaf in leaves)


def _on_host(projection, params: PyTree):
    """A :class:`Box` with concrete bounds as one with the bounds rounded inwards to each leaf's dtype
    here, on the host (numpy arrays of the bounds' shapes): passed into fit's programs as Python floats,
    ``0.1`` became float32 ``0.10000000149`` at the boundary without x64, and the rounding inside saw
    nothing to round (float32 params ended outside the box). Other projections are returned as they are."""
    if not isinstance(projection, Box) or not all(
        is_concrete(b) for b in jax.tree.leaves((projection.lower, projection.upper))
    ):
        return projection
    lower, upper = projection.lower, projection.upper
    return Box(inward_bounds(lower, params, "lower"), inward_bounds(upper, params, "upper"))


def _non_finite_error(step: int, value: float, chunks, state: TrainState) -> NonFiniteLossError:
    last = None
    if step > 0:
        flat = np.concatenate([np.asarray(c) for c in chunks])
        last = float(flat[step - 1])
    before = f" (the previous step's loss was {last:.6g})" if last is not None else ""
    if step == 0 and not np.isfinite(value):  # no update has run: the learning rate is not the cause
        return NonFiniteLossError(
            f"fit stopped: the loss is {value} at the initial parameters (step 0, before any update; after "
            "the projection, if any): the model or the loss is undefined or overflows there, on this data "
            "(e.g. the log of a negative number, exp overflowing the dtype). The learning rate is not the "
            "cause; check apply_fn, the loss and the data at "
            "these parameters (per_example_loss names the examples). The exception's .state holds them.",
            state=state,
            step=step,
        )
    if not np.isfinite(value):
        what = f"the loss is {value} at step {step} (evaluated before that step's update)"
        held = (
            f"the parameters of step {step}: finite, but their loss is {value}, so a fit resumed from them "
            "stops at once; start again from earlier parameters"
        )
    else:
        what = f"the update at step {step} made the parameters non-finite (loss there {value:.6g})"
        held = f"the parameters of step {step}, before that update"
    return NonFiniteLossError(
        f"fit stopped: {what}{before}. The exception's .state holds {held}; lower the learning rate (and "
        "check that it is a finite number), rescale the data, or check apply_fn for overflow.",
        state=state,
        step=step,
    )
