r"""Dense-layer taps: where a model multiplies by a parameter matrix, found in its jaxpr.

If a 2-D parameter leaf ``W`` enters the model only through matrix products ``z = dot(W, h)`` (either
operand side, possibly through a transpose or a dtype cast of ``W``), its gradient is a sum of outer
products, ``∂f/∂W = Σ_uses Σ_s δ_s ⊗ h_s`` with ``δ = ∂f/∂z`` (the dot's output cotangent) and ``h`` the
dot's other operand (``s`` runs over the other operand's free axes, e.g. a sequence axis; one term for
a matrix-vector product). Nothing of the size of ``W`` needs to be formed to use it.

:func:`trace_program` traces ``apply_fn`` for ONE example with :func:`jax.make_jaxpr` and inlines the
nested ``jit`` calls into a flat :class:`Program` (custom-derivative calls, loops and conditionals stay
opaque: a parameter used inside one is simply not tapped). :func:`find_taps` finds the tappable
products: a ``dot_general`` without batch axes and with one contracting axis, exactly one of whose
operands is a view of a 2-D parameter leaf, where the leaf has no other kind of use anywhere.
:func:`evaluate` runs the program on values (traceable: ``vmap``, ``vjp`` and ``jit`` apply), adding a
perturbation to the output of each tapped product and returning the other operands; the cotangents of
the perturbations are the ``δ``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Literal

from nlis_jax._types import Array, PyTree

#: Call primitives whose body is inlined into the flat program (plain function calls, no custom rule).
INLINED_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}


class Eqn(NamedTuple):
    """One primitive application of a flat :class:`Program`; ``ins`` are ids or ``Literal``s."""

    primitive: Any
    params: dict
    ins: tuple
    outs: tuple[int, ...]
    ctx: Any


class Program(NamedTuple):
    """A model for one example as flat equations over integer variable ids."""

    eqns: tuple[Eqn, ...]
    invars: tuple[int, ...]  # the params leaves (``jax.tree.leaves`` order), then the leaves of x
    outvars: tuple
    consts: dict  # id -> value of the closed-over constants
    avals: dict  # id -> abstract value (shape, dtype)
    num_leaves: int
    out_tree: Any


class Tap(NamedTuple):
    """A tapped product ``z = dot(view(W), h)`` of a parameter leaf ``W`` with another operand ``h``.

    ``delta_axis`` is the axis of ``W`` that runs with the output ``z`` (and ``δ``), the other runs with
    ``h``'s contracting axis ``h_axis``; ``w_first``: ``W`` is the lhs, so its free axis comes first in
    ``z``; ``node_free``: ``h`` does not depend on the parameters (the same at every point ``tθ``).
    """

    eqn: int
    leaf: int
    delta_axis: int
    w_first: bool
    h_axis: int
    node_free: bool


def trace_program(apply_fn, params: PyTree, x: PyTree) -> Program:
    """The flat :class:`Program` of ``apply_fn(params, x)`` for one example ``x`` (shapes only)."""
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), (params, x))
    closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(*structs)
    counter, eqns, consts, avals = itertools.count(), [], {}, {}
    invars = tuple(next(counter) for _ in closed.jaxpr.invars)
    avals.update(zip(invars, (v.aval for v in closed.jaxpr.invars), strict=True))
    outvars = _inline(closed, invars, counter, eqns, consts, avals)
    num_leaves = len(jax.tree.leaves(params))
    out_tree = jax.tree.structure(out_shape)
    return Program(tuple(eqns), invars, tuple(outvars), consts, avals, num_leaves, out_tree)


def _inline(closed: ClosedJaxpr, in_atoms, counter, eqns, consts, avals) -> list:
    """Append the equations of ``closed`` (nested plain calls inlined) and return its output atoms."""
    jaxpr, env = closed.jaxpr, {}
    for var, value in zip(jaxpr.constvars, closed.consts, strict=True):
        env[var] = next(counter)
        consts[env[var]], avals[env[var]] = value, var.aval
    env.update(zip(jaxpr.invars, in_atoms, strict=True))

    def read(atom):
        return atom if isinstance(atom, Literal) else env[atom]

    for eqn in jaxpr.eqns:
        ins = tuple(read(a) for a in eqn.invars)
        body = eqn.params.get(INLINED_CALLS.get(eqn.primitive.name, ""))
        if isinstance(body, ClosedJaxpr):
            env.update(zip(eqn.outvars, _inline(body, ins, counter, eqns, consts, avals), strict=True))
            continue
        outs = tuple(next(counter) for _ in eqn.outvars)
        avals.update(zip(outs, (v.aval for v in eqn.outvars), strict=True))
        eqns.append(Eqn(eqn.primitive, _bind_params(eqn), ins, outs, getattr(eqn, "ctx", None)))
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(a) for a in jaxpr.outvars]


def _bind_params(eqn) -> dict:
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params); no call primitive reaches here with subfuns
        subfuns, params = params
        if subfuns:
            raise NotImplementedError(f"primitive {eqn.primitive.name} binds sub-functions")
    return params


def find_taps(program: Program) -> tuple[Tap, ...]:
    """The tappable products of ``program`` (see the module docstring), in equation order."""
    views = {}  # id -> (leaf, transposed) for 2-D params leaves and their transposes / casts
    for leaf in range(program.num_leaves):
        if len(program.avals[program.invars[leaf]].shape) == 2:
            views[program.invars[leaf]] = (leaf, False)
    depends = set(program.invars[: program.num_leaves])
    spoiled, candidates = set(), []
    for j, eqn in enumerate(program.eqns):
        used = [views[a] for a in eqn.ins if _is_var(a) and a in views]
        view = _view_of(eqn, views)
        if view is not None:
            views[eqn.outs[0]] = view
        elif used:
            tap = _dot_tap(j, eqn, views, depends)
            if tap is None:
                spoiled.update(leaf for leaf, _ in used)
            else:
                candidates.append(tap)
        if any(_is_var(a) and a in depends for a in eqn.ins):
            depends.update(eqn.outs)
    spoiled.update(views[a][0] for a in program.outvars if _is_var(a) and a in views)
    return tuple(tap for tap in candidates if tap.leaf not in spoiled)


def example_activation_size(program: Program) -> int:
    """Elements of the intermediate values that depend on the example ``x`` (one example's activations)."""
    depends, size = set(program.invars[program.num_leaves :]), 0
    for eqn in program.eqns:
        if any(_is_var(a) and a in depends for a in eqn.ins):
            depends.update(eqn.outs)
            size += sum(math.prod(program.avals[o].shape) for o in eqn.outs)
    return size


def _is_var(atom) -> bool:
    return not isinstance(atom, Literal)


def _view_of(eqn: Eqn, views: dict):
    """``(leaf, transposed)`` when ``eqn`` transposes or casts a view of a 2-D leaf, else ``None``."""
    if len(eqn.ins) != 1 or not _is_var(eqn.ins[0]) or eqn.ins[0] not in views:
        return None
    leaf, transposed = views[eqn.ins[0]]
    if eqn.primitive.name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0):
        return leaf, not transposed
    if eqn.primitive.name == "convert_element_type" and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        return leaf, transposed
    return None


def _dot_tap(j: int, eqn: Eqn, views: dict, depends: set) -> Tap | None:
    if eqn.primitive.name != "dot_general":
        return None
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    if batch_l or batch_r or len(contract_l) != 1:
        return None
    is_view = [_is_var(a) and a in views for a in eqn.ins]
    if is_view[0] == is_view[1]:  # a product of two parameter matrices is not tapped
        return None
    w_pos = 0 if is_view[0] else 1
    leaf, transposed = views[eqn.ins[w_pos]]
    w_contract = (contract_l, contract_r)[w_pos][0]
    h_atom = eqn.ins[1 - w_pos]
    # The free axis of the operand W' = view(W) is 1 − w_contract; a transpose swaps the leaf's axes.
    delta_axis = w_contract if transposed else 1 - w_contract
    node_free = not (_is_var(h_atom) and h_atom in depends)
    return Tap(j, leaf, delta_axis, w_pos == 0, (contract_l, contract_r)[1 - w_pos][0], node_free)


def evaluate(program: Program, leaves, x_leaves, taps: tuple[Tap, ...], perturbations) -> tuple[Any, tuple]:
    """Outputs of ``program`` and the other operands ``h`` of the tapped products.

    ``perturbations[i]`` (the shape of tap ``i``'s output) is added to that output; the result is
    ``(outputs as apply_fn returns them, (h of each tap))``.
    """
    env = dict(program.consts)
    env.update(zip(program.invars, [*leaves, *x_leaves], strict=True))
    tapped = {tap.eqn: i for i, tap in enumerate(taps)}
    operands = [None] * len(taps)

    def read(atom):
        return atom.val if isinstance(atom, Literal) else env[atom]

    for j, eqn in enumerate(program.eqns):
        values = [read(a) for a in eqn.ins]
        manager = eqn.ctx.manager if eqn.ctx is not None else contextlib.nullcontext()
        with manager:
            out = eqn.primitive.bind(*values, **eqn.params)
        out = out if eqn.primitive.multiple_results else [out]
        if j in tapped:
            i = tapped[j]
            out = [out[0] + perturbations[i]]
            operands[i] = values[1 if taps[i].w_first else 0]
        env.update(zip(eqn.outs, out, strict=True))
    return jax.tree.unflatten(program.out_tree, [read(a) for a in program.outvars]), tuple(operands)


def tap_operands(tap: Tap, delta: Array, h: Array, k: int) -> tuple[Array, Array]:
    """``δ`` as ``(k, S, out)`` and ``h`` as ``(S, in)`` for a tapped product (``delta``: ``(k,) + z``)."""
    if tap.w_first:  # z = (W free axis, h free axes...)
        delta = jnp.moveaxis(delta, 1, -1)
    h = jnp.moveaxis(h, tap.h_axis, -1)
    return delta.reshape(k, -1, delta.shape[-1]), h.reshape(-1, h.shape[-1])
