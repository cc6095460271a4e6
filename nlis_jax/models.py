"""Adapters from Flax modules to the pure ``apply_fn(params, x)`` convention of nlis_jax.

This module imports flax; ``import nlis_jax`` does not.

Both adapters return ``(apply_fn, params)`` where ``apply_fn(params, x)`` evaluates the module on ONE
example ``x``. Flax layers usually accept any leading batch shape, so a single example works as is; with
``batched=True`` the adapter adds a batch axis of size 1 before the call and removes it after (for
modules that require a batch axis, e.g. ones using ``nn.BatchNorm`` over axis 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
from flax import linen, nnx

from nlis_jax._adjoint import ModelModeError
from nlis_jax._checks import check_bool
from nlis_jax._types import ApplyFn, PyTree


def _drop_batch_axis(o):
    """``o[0]`` for an output whose leading axis is the batch axis of size 1 the adapter added; anything else
    (an output that reduced the batch, or moved it) would lose outputs or fail with an index error."""
    shape = jnp.shape(o)
    if not shape or shape[0] != 1:
        raise ValueError(
            f"batched=True: the module returned an output of shape {shape}, whose leading axis is not the "
            "batch axis of size 1 the adapter added (a module that reduces or moves the batch axis cannot be "
            "adapted this way; use batched=False, or return the batch axis first)"
        )
    return o[0]


def _one_output(out, batched: bool, squeeze: bool):
    """The module's output for one example: the batch axis of size 1 removed from every output (a tuple of
    outputs stays a tuple, which the library refuses with a message naming it, as for any ``apply_fn``),
    and a trailing axis of size 1 dropped from a single array with ``squeeze``."""
    if batched:
        out = jax.tree.map(_drop_batch_axis, out)
    if not hasattr(out, "shape"):
        return out
    out = jnp.asarray(out)
    if squeeze and out.ndim >= 1 and out.shape[-1] == 1:
        out = out[..., 0]
    return out


def from_nnx(model: nnx.Module, *, batched: bool = False, squeeze: bool = True) -> tuple[ApplyFn, Any]:
    """Split an ``nnx.Module`` into a pure ``apply_fn`` and its ``nnx.Param`` state.

    Args:
      model: the module; it is split once here and never mutated.
      batched: add and remove a batch axis of size 1 around each call (every output must keep it as its
        leading axis; an output that reduces or moves it is refused with its shape).
      squeeze: drop a trailing output axis of size 1, so a ``Linear(..., 1)`` head gives a scalar.

    Returns:
      ``(apply_fn, params)``: ``params`` is an ``nnx.State`` of the ``nnx.Param`` leaves (a pytree that
      ``ravel_pytree`` and optax accept), a snapshot of the module's current weights that later changes
      of the module do not reach; other state (e.g. batch statistics) is frozen in ``apply_fn``: a module
      that writes to its state (a counter, a draw from its ``nnx.Rngs``) starts every call from the state
      of this call, so ``apply_fn`` is a function of ``(params, x)``. A module returning a tuple of
      outputs gives the tuple, which the library refuses: return one array (``jnp.concatenate``).

    Raises:
      ValueError: a submodule in training mode (``Dropout`` with ``deterministic=False``, attention with
        ``dropout_rate > 0`` and ``deterministic=None``, ``BatchNorm`` with ``use_running_average=False``:
        a new module's default): it would draw random masks or
        update its statistics on every call, so the model is not a function of ``params``; call
        ``model.eval()`` first. At the first call of ``apply_fn``: a ``Dropout`` that draws a mask or a
        ``BatchNorm`` that writes its statistics during the call (the mode passed at call time, e.g.
        ``__call__(x, train=True)``); adapt a module that calls it in evaluation mode. Detected by the
        ``Dropout``'s own RNG stream and the ``BatchNorm``'s statistics: a ``Dropout`` given ``rngs=`` (a
        stream or a key) at call time is not seen; call such a module in evaluation mode yourself.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"from_nnx expects an nnx.Module, got {type(model).__name__}.")
    batched, squeeze = check_bool("batched", batched), check_bool("squeeze", squeeze)
    training = [
        ".".join(map(str, path)) or type(module).__name__
        for path, module in nnx.iter_modules(model)
        if getattr(module, "deterministic", None) is False
        or (getattr(module, "deterministic", False) is None and getattr(module, "dropout_rate", 0) > 0)
        or getattr(module, "use_running_average", None) is False
    ]
    if training:
        raise ModelModeError(
            f"from_nnx: {', '.join(training)} in training mode (a Dropout draws random masks, a BatchNorm "
            "updates its statistics on every call), so the model is not a function of its parameters; "
            "call model.eval() first."
        )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # nnx.split hands back the module's own Variable objects: a later change of the module's statistics
    # would reach apply_fn at its next trace and not at cached programs (results stale, no error), and
    # a later change of its weights (a training step, nnx.update) would silently change the returned
    # params; new Variables holding the current (immutable) arrays make both a snapshot
    params, rest = jax.tree.map(jnp.asarray, (params, rest))

    def apply_fn(params, x):
        # new Variables on every call: a module that writes to its state (a counter, the count of its own
        # nnx.Rngs) changes only this call's copy, so apply_fn stays a function of (params, x) and the
        # write is allowed inside jit and vmap (Flax refuses to mutate a Variable made outside a trace)
        module = nnx.merge(graphdef, *jax.tree.map(lambda a: a, (params, rest)))
        watched = _training_state(module)
        out = module(x[None] if batched else x)
        trained = [name for name, variables, values in watched if _written(variables, values)]
        if trained:  # the mode passed at call time (train=True): attributes said eval
            raise ModelModeError(
                f"from_nnx: {', '.join(trained)} trained during the call (a Dropout drew a random mask, a "
                "BatchNorm updated its statistics), though the modules' attributes say evaluation mode: "
                "the mode is passed at call time (e.g. __call__(x, train=True) passing deterministic= or "
                "use_running_average=). Adapt a module that calls it in evaluation mode, e.g. one whose "
                "__call__(x) returns model(x, train=False)."
            )
        return _one_output(out, batched, squeeze)

    return apply_fn, params


def _training_state(module: nnx.Module) -> list[tuple[str, list, list]]:
    """``(name, variables, values)`` of what trains in a call: the statistics of every ``BatchNorm`` (its
    ``nnx.BatchStat``) and the RNG counts of every ``Dropout`` of positive rate, with their values now."""
    watched = []
    for path, sub in nnx.iter_modules(module):
        kind = nnx.BatchStat if isinstance(sub, nnx.BatchNorm) else None
        if isinstance(sub, nnx.Dropout) and sub.rate > 0:
            kind = nnx.RngCount
        if kind is not None:
            variables = [v for _, v in nnx.to_flat_state(nnx.state(sub, kind))]
            name = ".".join(map(str, path)) or type(sub).__name__
            watched.append((name, variables, [v.get_value() for v in variables]))
    return watched


def _written(variables: list, values: list) -> bool:
    """Whether any of ``variables`` holds another value object than ``values`` (written during a call)."""
    return any(v.get_value() is not old for v, old in zip(variables, values, strict=True))


def from_linen(
    module: linen.Module,
    variables: Mapping[str, PyTree],
    *,
    batched: bool = False,
    squeeze: bool = True,
) -> tuple[ApplyFn, PyTree]:
    """Turn a Linen module and its ``variables`` into ``(apply_fn, params)``.

    Args:
      module: a ``flax.linen`` module.
      variables: the dict from ``module.init``; its ``"params"`` collection becomes ``params``, the other
        collections stay fixed inside ``apply_fn`` (copied here: later in-place changes of them do not
        reach it).
      batched, squeeze: as in :func:`from_nnx`.

    Raises (at the first call of ``apply_fn``, when the module runs):
      ValueError: a submodule in training mode (``Dropout`` with ``deterministic=False`` asks for a
        ``"dropout"`` PRNG stream, ``BatchNorm`` with ``use_running_average=False`` updates its
        statistics): the model is not a function of ``params``; build the module with
        ``deterministic=True`` / ``use_running_average=True``. A Linen module's submodules exist only
        while it runs, so this cannot be checked here as :func:`from_nnx` does.
    """
    if not isinstance(module, linen.Module):
        raise TypeError(f"from_linen expects a flax.linen.Module, got {type(module).__name__}.")
    batched, squeeze = check_bool("batched", batched), check_bool("squeeze", squeeze)
    if not isinstance(variables, Mapping):
        raise TypeError(
            "from_linen expects variables, the dict from module.init(key, x), got "
            f"{type(variables).__name__}."
        )
    if "params" not in variables:
        raise ValueError(f"variables has no 'params' collection (found {sorted(variables)}).")
    # a snapshot of the other collections: an in-place change of the caller's nested arrays would reach
    # apply_fn at its next trace and not at cached programs (results stale, no error)
    rest = jax.tree.map(jnp.asarray, {k: v for k, v in variables.items() if k != "params"})

    def apply_fn(params, x):
        try:
            out = module.apply({**rest, "params": params}, x[None] if batched else x)
        except (flax.errors.InvalidRngError, flax.errors.ModifyScopeVariableError) as err:
            raise ModelModeError(
                f"from_linen: the module is in training mode ({err}): a Dropout draws random masks, a "
                "BatchNorm updates its statistics on every call, so the model is not a function of its "
                "parameters; build it with deterministic=True / use_running_average=True."
            ) from err
        return _one_output(out, batched, squeeze)

    return apply_fn, variables["params"]


__all__ = [
    "from_linen",
    "from_nnx",
]
