"""Input validation shared by the public functions.

Shape checks always run (shapes are static, also under ``jax.jit``). Value checks (NaN/Inf, probabilities
summing to one, ...) run where the inputs are concrete arrays and are skipped under tracing, so every public
function also works inside a user's own ``jax.jit``; wrap a call in ``jax.experimental.checkify`` to keep
value checks there (inside ``nlis_jax.traced_checks()``, see :mod:`nlis_jax._traced`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nlis_jax import _traced as traced
from nlis_jax._fetch import check_auto_axes
from nlis_jax._types import PyTree


def is_concrete(x) -> bool:
    """True when ``x`` holds values now (not a tracer inside ``jit``/``vmap``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def under_trace() -> bool:
    """Whether a transformation (a user's ``jax.jit``, ``vmap``, ``grad``) is tracing now: concrete arrays
    closed over there still give tracers once computed with, so the host-driven paths (the adaptive
    rule's compaction, the host chunk loop) cannot fetch them. ``jax._src.core.trace_state_clean``
    (private; 0.4 µs), else a probe array (where a jax release moves it)."""
    from jax._src import core

    clean = getattr(core, "trace_state_clean", None)
    if clean is not None:
        return not clean()
    return not is_concrete(jnp.zeros((), jnp.int8))


def fetch(*values):
    """Device values as numpy, read back together (``jax.device_get``: the copies start at once and one
    wait covers them, instead of one synchronisation per value); arrays that span processes (replicated
    results of global arrays) are returned as they are, for the caller's ``int``/``float``."""
    if all(getattr(v, "is_fully_addressable", True) for v in values):
        return jax.device_get(values)
    return values


def report_nonfinite(bad, n: int, describe: Callable[[str], str]) -> None:
    """``ValueError(describe("bad of n"))`` when the count ``bad`` is concrete and positive; under tracing a
    ``checkify`` check (inside ``nlis_jax.traced_checks()``)."""
    if not is_concrete(bad):
        traced.check(bad == 0, describe("some"))
        return
    bad = int(bad)
    if bad:
        raise ValueError(describe(f"{bad} of {n}"))


class LeafName:
    """The name of leaf ``index`` of ``tree`` in messages: ``name`` and the leaf's path, e.g.
    ``params['layers'][0]['w']``, found and written out only when a message is (``str``, f-strings): a
    check of a tree of many leaves that passes builds no path."""

    __slots__ = ("name", "tree", "index")

    def __init__(self, name: str, tree: PyTree, index: int):
        self.name, self.tree, self.index = name, tree, index

    def __str__(self) -> str:
        path = jax.tree_util.tree_leaves_with_path(self.tree)[self.index][0]
        return f"{self.name}{jax.tree_util.keystr(path)}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def named_leaves(name: str, tree: PyTree):
    """``(label, leaf)`` for each leaf of ``tree``: ``label`` is ``name`` with the leaf's path
    (:class:`LeafName`) when ``name`` is an argument's (an identifier) and the tree has several leaves, so
    an error names the leaf; ``name`` alone for one array, or a description ("chunk 0 of the chunk
    source", whose tree the library built)."""
    leaves = jax.tree.leaves(tree)
    if len(leaves) < 2 or not name.isidentifier():
        yield from ((name, leaf) for leaf in leaves)
        return
    for index, leaf in enumerate(leaves):
        yield LeafName(name, tree, index), leaf


#: What JAX takes as an array: its own arrays (and tracers), numpy arrays and scalars, Python numbers.
_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, int, float, complex)


def check_array_types(name: str, tree) -> None:
    """``TypeError`` for a leaf that JAX does not take as an array (a pandas ``DataFrame`` or ``Series``, a
    string) in an argument that reaches a jitted program as it is (a model's ``params``, ``xs``, ``ys``):
    jax's own error printed the whole object and named no argument. (``F``, ``probs`` and the host paths'
    ``ys`` are converted with ``np.asarray`` and take such objects.)"""
    for label, leaf in named_leaves(name, tree):
        if isinstance(leaf, _ARRAY_TYPES) or hasattr(leaf, "__jax_array__"):
            continue
        hint = f"{label}.to_numpy()" if hasattr(leaf, "to_numpy") else "np.asarray(...)"
        raise TypeError(
            f"{label} is a {type_name(leaf)}, which JAX does not take as an array: pass a numpy array, "
            f"e.g. {hint}."
        )


def type_name(obj) -> str:
    """``obj``'s type with its package unless built in: ``pandas.DataFrame``, ``str``."""
    package = type(obj).__module__.split(".")[0]
    return type(obj).__qualname__ if package == "builtins" else f"{package}.{type(obj).__qualname__}"


def check_native(name: str, tree) -> None:
    """``TypeError`` for an array in non-native byte order (a ``.npy`` file written on a machine of the
    other endianness): JAX takes no such dtype, and its own error named neither the array nor the cause
    (or printed the whole array). Checked with the floating, finite and probability checks."""
    for label, leaf in named_leaves(name, tree):
        dtype = getattr(leaf, "dtype", None)
        if isinstance(dtype, np.dtype) and not dtype.isnative:
            raise TypeError(
                f"{label} is stored in non-native byte order ({dtype.str}), which JAX cannot take: convert "
                "the file once, e.g. np.save(path, a.astype(a.dtype.newbyteorder('='))), or yield chunks "
                "converted with .astype(a.dtype.newbyteorder('='))."
            )


def check_floating(name: str, tree: PyTree) -> None:
    """Raise ``TypeError`` unless every leaf of ``tree`` is a floating-point array."""
    check_native(name, tree)
    for label, leaf in named_leaves(name, tree):
        check_auto_axes(name, leaf)
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"{label} must hold floating-point arrays, got dtype {jnp.result_type(leaf)}.")


def check_not_complex(name: str, tree: PyTree) -> None:
    """``TypeError`` for a complex leaf (by dtype, no value read): the casts to the params' real dtype
    would drop its imaginary part without a word."""
    for label, leaf in named_leaves(name, tree):
        if np.iscomplexobj(leaf):
            raise TypeError(f"{label} must hold real numbers, got dtype {leaf.dtype}.")


def check_numeric(name: str, tree: PyTree) -> None:
    """``TypeError`` for a leaf of strings, bytes, dates, objects or records (by dtype, no value read):
    JAX's own error printed the array and named neither the argument nor the cause. jax's own extra
    dtypes (``ml_dtypes``: numpy arrays of bfloat16, float8, int4, kind ``"V"``) are numbers."""
    for label, leaf in named_leaves(name, tree):
        dtype = getattr(leaf, "dtype", None)
        if isinstance(dtype, np.dtype) and dtype.kind not in "biufc" and not _is_jax_number(dtype):
            raise TypeError(f"{label} must hold numbers, got dtype {dtype}.")


def _is_jax_number(dtype: np.dtype) -> bool:
    """A numeric dtype of jax's own beyond numpy's (``jnp.bfloat16`` and the other ``ml_dtypes``)."""
    try:
        return bool(jnp.issubdtype(dtype, jnp.number))
    except TypeError:  # a structured or other dtype jnp cannot classify
        return False


def _count_nonfinite(x):
    return jnp.size(x) - jnp.count_nonzero(jnp.isfinite(x))


@traced.jit
def _count_nonfinite_each(leaves: list) -> list:
    """:func:`_count_nonfinite` of each array, in one program."""
    return [_count_nonfinite(x) for x in leaves]


#: Elements per chunk of a value check on the host (bounds its boolean temporary: 4 MiB).
HOST_CHECK_ELEMENTS = 1 << 22


def held_on_cpu(x) -> bool:
    """Whether ``x`` is a concrete ``jax.Array`` whose values all sit on this process's CPU devices."""
    return (
        isinstance(x, jax.Array)
        and is_concrete(x)
        and x.is_fully_addressable
        and all(d.platform == "cpu" for d in x.sharding.device_set)
    )


def host_values(x) -> np.ndarray | None:
    """``x`` as a numpy array, without a copy, when its values sit in this process's memory: a numpy
    array or memmap, a numpy or Python scalar, or a ``jax.Array`` on one CPU device; else ``None`` (an
    accelerator's array, or one sharded over devices or processes, is checked where it lives)."""
    if isinstance(x, np.ndarray | np.generic | float | int | complex):
        return np.asarray(x)
    if (
        held_on_cpu(x)
        and len(x.sharding.device_set) == 1
        and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    ):
        return np.asarray(x)
    return None


def count_failing(a: np.ndarray, test) -> int:
    """Entries of the host array ``a`` where the elementwise ``test`` is false, over chunks of rows of
    :data:`HOST_CHECK_ELEMENTS` (a memmap is read chunk by chunk; nothing is copied whole): no
    compilation, where a jitted reduction compiles one program per shape."""
    if a.ndim == 0 or a.size == 0:
        return int(np.count_nonzero(~test(a)))
    rows = max(1, HOST_CHECK_ELEMENTS // max(1, a.size // a.shape[0]))
    return sum(int(np.count_nonzero(~test(a[i : i + rows]))) for i in range(0, a.shape[0], rows))


def check_finite(name: str, tree: PyTree) -> None:
    """Raise ``ValueError`` naming ``name`` if a concrete leaf holds NaN or Inf (skipped under tracing).

    Values in this process's memory are checked there (numpy, nothing compiled); the other leaves (an
    accelerator's, or sharded over devices or processes) by one jitted reduction where they live, all
    of them in one program and one read back (a read back per leaf waited on the device once each).
    ``ensure_compile_time_eval``: a concrete array closed over inside a user's jit is checked eagerly.
    The first leaf holding NaN or Inf, in the tree's order, is the one reported.
    """
    check_finite_each((name, tree))


def check_finite_each(*named: tuple[str, PyTree]) -> None:
    """:func:`check_finite` of several ``(name, tree)`` pairs, the leaves held elsewhere of all of them in
    one program and one read back (``params`` and ``xs`` of a model call: one wait on a GPU, not two); the
    first bad leaf in the pairs' order, then the tree's, is the one reported, with its pair's name and its
    path in the tree (:func:`named_leaves`)."""
    leaves, elsewhere = [], []
    for name, tree in named:
        check_native(name, tree)
        for label, leaf in named_leaves(name, tree):
            check_auto_axes(name, leaf)
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                wrapped = wrapped_integers(leaf)  # host int64 data past int32 (no jax_enable_x64)
                if wrapped:
                    raise ValueError(narrowing_error(label, 0, 0, wrapped))
                continue
            if not is_concrete(leaf):
                traced.check(jnp.all(jnp.isfinite(leaf)), f"{label} contains NaN or Inf value(s).")
                continue
            host = host_values(leaf)
            leaves.append((label, host))
            if host is None:
                elsewhere.append(leaf)
    if elsewhere:
        with jax.ensure_compile_time_eval():
            counts = iter(fetch(*_count_nonfinite_each(elsewhere)))
    for name, host in leaves:
        bad = int(next(counts)) if host is None else _count_host_nonfinite(name, host)
        if bad:
            raise ValueError(f"{name} contains {bad} NaN or Inf value(s); clean the input first.")


def narrows(leaf) -> bool:
    """Whether jax's cast narrows the numpy ``leaf``'s floats or integers (float64, int64 or uint64 data
    without jax_enable_x64)."""
    if not isinstance(leaf, np.ndarray) or not (
        np.issubdtype(leaf.dtype, np.floating) or np.issubdtype(leaf.dtype, np.integer)
    ):
        return False
    return jax.dtypes.canonicalize_dtype(leaf.dtype) != leaf.dtype


def wrapped_integers(leaf) -> int:
    """Entries of a numpy integer ``leaf`` outside the range of the narrower integer type jax's cast
    without jax_enable_x64 gives it (int64 to int32, uint64 to uint32), which the cast wraps around
    (``3_000_000_000`` becomes ``-1_294_967_296``); 0 for other leaves (no pass over them)."""
    if not (isinstance(leaf, np.ndarray | np.generic) and np.issubdtype(leaf.dtype, np.integer)):
        return 0
    narrow = jax.dtypes.canonicalize_dtype(leaf.dtype)
    if narrow == leaf.dtype:
        return 0
    low, high = np.iinfo(narrow).min, np.iinfo(narrow).max
    return count_failing(np.asarray(leaf), lambda a: (a >= low) & (a <= high))


def narrowing_counts(tree) -> tuple[int, int, int]:
    """``(over, under, wrapped)``: finite values of the numpy leaves of ``tree`` that jax's cast without
    jax_enable_x64 makes Inf (``|v|`` past float32's largest) or 0 (``0 < |v|`` below float32's smallest
    normal number, flushed on the device), and integers it wraps around (:func:`wrapped_integers`). One
    pass over each such leaf (more only where one is found); none over other leaves."""
    over = under = wrapped = 0
    for leaf in jax.tree.leaves(tree):
        if not narrows(leaf):
            continue
        if np.issubdtype(leaf.dtype, np.integer):
            wrapped += wrapped_integers(leaf)
        else:
            _, leaf_over, leaf_under = _host_counts(leaf)
            over, under = over + leaf_over, under + leaf_under
    return over, under, wrapped


def narrowing_error(
    name: str, over: int, under: int, wrapped: int = 0, *, narrow=np.float32, wide=np.float64
) -> str | None:
    """The message for ``over``/``under``/``wrapped`` values of :func:`narrowing_counts` in ``name``, or
    ``None``."""
    if wrapped:
        return (
            f"{name} holds {wrapped} integer value(s) outside the range of 32-bit integers (int32, or uint32 "
            "for unsigned data), which wrap around once cast to 32 bits (64-bit integer data without "
            "jax_enable_x64: 3_000_000_000 becomes -1_294_967_296); convert the data to floating point "
            "first (e.g. a.astype(np.float32)), or enable jax_enable_x64."
        )
    info = jnp.finfo(narrow)
    cast = f"once cast to {info.dtype.name} ({np.dtype(wide).name} data without jax_enable_x64"
    if over:
        return (
            f"{name} holds {over} finite value(s) beyond {info.dtype.name}'s range that become Inf {cast}: "
            f"|v| > {float(info.max):.3g}); rescale the input, or enable jax_enable_x64."
        )
    if under:  # a column of them would drop out of every score silently
        return (
            f"{name} holds {under} non-zero value(s) below {info.dtype.name}'s smallest normal number "
            f"that become 0 {cast}: 0 < |v| < {float(info.smallest_normal):.3g}); rescale the input, or "
            "enable jax_enable_x64."
        )
    return None


def _host_counts(host: np.ndarray) -> tuple[int, int, int]:
    """``(non-finite, over, under)`` entries of a host array under jax's cast of its dtype: NaN/Inf, then
    (only where the cast narrows it) finite values made Inf, and non-zero values flushed to 0 on the
    device. One pass when all fit; further passes on the error path only."""
    narrow = jax.dtypes.canonicalize_dtype(host.dtype)
    if narrow == host.dtype or not jnp.issubdtype(narrow, jnp.floating):
        return count_failing(host, np.isfinite), 0, 0
    top, tiny = float(jnp.finfo(narrow).max), float(jnp.finfo(narrow).smallest_normal)

    def fits(a):  # not NaN or Inf, not made Inf by the cast, not flushed to 0 on the device
        magnitude = np.abs(a)
        return (magnitude <= top) & ((magnitude >= tiny) | (a == 0))

    bad = count_failing(host, fits)
    if not bad:
        return 0, 0, 0
    nonfinite = count_failing(host, np.isfinite)
    over = count_failing(host, lambda a: ~np.isfinite(a) | (np.abs(a) <= top)) if bad > nonfinite else 0
    return nonfinite, over, bad - nonfinite - over


def _count_host_nonfinite(name: str, host: np.ndarray) -> int:
    """NaN/Inf entries of a host array, in one pass. Where jax's cast narrows it (float64 without
    jax_enable_x64) the same pass counts the finite values past the narrower range too, which become
    Inf in the cast (later read as NaN input or a non-finite gradient), and the non-zero values flushed
    to 0: those are named here (:func:`narrowing_error`)."""
    nonfinite, over, under = _host_counts(host)
    message = narrowing_error(
        name, over, under, narrow=jax.dtypes.canonicalize_dtype(host.dtype), wide=host.dtype
    )
    if message:
        raise ValueError(message)
    return nonfinite


@traced.jit
def _min_max(x):
    return jnp.min(x), jnp.max(x)


def value_range(x) -> tuple:
    """``(min, max)`` of a concrete non-empty array: with numpy where its values sit in this process's
    memory (nothing compiled, as :func:`check_finite`), else one jitted reduction where it lives."""
    host = host_values(x)
    if host is not None:
        return host.min(), host.max()
    with jax.ensure_compile_time_eval():
        return tuple(_min_max(jnp.asarray(x)))


def float_bits(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(negative, magnitude)`` of a float array from its bits (bool, and unsigned integers ordered as
    the magnitudes): a CPU flushes a subnormal number to 0 in comparisons and ``jnp.abs`` inside a compiled
    program (``-1e-39 < 0`` is False there), its bits keep it. ``-0.0`` has magnitude 0."""
    bits = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
    raw = jax.lax.bitcast_convert_type(a, bits)
    sign = jnp.asarray(1 << (8 * a.dtype.itemsize - 1), bits)
    return (raw & sign) != 0, raw & ~sign


def count_negative(x: jax.Array) -> jax.Array:
    """Entries of ``x`` below 0, subnormal ones included (on the bits: :func:`float_bits`), traceable."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.count_nonzero(x < 0)
    negative, magnitude = float_bits(x)
    return jnp.count_nonzero(negative & (magnitude > 0))


_count_negative = traced.jit(count_negative)


def flushes_subnormals(dtype) -> bool:
    """Whether a CPU flushes the subnormal numbers of ``dtype`` to 0 in compiled code: float32, bfloat16
    and float64; not float16, computed in float32, where its subnormal numbers are normal."""
    return jnp.finfo(dtype).smallest_normal <= jnp.finfo(jnp.float32).smallest_normal


def subnormal_weights_error(name: str, dtype) -> ValueError:
    """The error for non-zero ``name`` (weights) all below ``dtype``'s smallest normal number."""
    return ValueError(
        f"{name} sum to 0 in {jnp.dtype(dtype).name}: their non-zero values are below its smallest normal "
        f"number ({float(jnp.finfo(dtype).smallest_normal):.3g}), which the device treats as zero; rescale "
        f"the {name} (a fit does not depend on their overall scale, a weighted loss scales with it)."
    )


def join_exchange(combine, counts) -> None:
    """A host check's ``combine`` (an exchange of counts between processes) with ``counts`` of a process
    whose own check has nothing to count: every process takes part in each exchange (one that skipped it
    paired its next collective with the others' exchange, and gloo aborted)."""
    if combine is not None:
        combine(np.asarray(counts, np.int32))


def check_weights_not_all_subnormal(name: str, w, combine=None) -> None:
    """``ValueError`` if the concrete weights ``w`` are non-zero but all below their dtype's smallest
    normal number: a CPU flushes them to 0 (float32 weights of ``1e-39`` gave a weighted loss of 0). Host
    values are read without compiling (a memmap without a copy); an array held elsewhere (sharded over
    devices or processes, on an accelerator) by one reduction on its bits, whose scalar every process
    reads. ``combine(counts)``, if given, sums this process's ``(any non-zero, any normal)`` over all
    processes (the host blocks of ``jax.distributed``: every process raises the same error). Not for float16
    (:func:`flushes_subnormals`); traced weights by a ``checkify`` check inside ``traced_checks()``."""
    if w is None:
        join_exchange(combine, [1, 1])  # ones: non-zero and normal
        return
    if not is_concrete(w):  # inside traced_checks(): a checkify check (a loss of 0, a step that never moves)
        dtype = jnp.result_type(w)
        if traced.enabled() and jnp.issubdtype(dtype, jnp.floating) and flushes_subnormals(dtype):
            traced.check(~_all_subnormal(w), str(subnormal_weights_error(name, dtype)))
        return
    host = host_values(w)
    dtype = jnp.result_type(w) if host is None else host.dtype
    if not jnp.issubdtype(dtype, jnp.floating) or not flushes_subnormals(dtype):
        join_exchange(combine, [0, 0])
        return
    if host is None:
        with jax.ensure_compile_time_eval():  # a concrete array closed over inside a user's jit too
            subnormal = bool(_all_subnormal(w))
    else:  # numpy's reductions copy nothing (a memmap)
        top = max(abs(float(host.min())), abs(float(host.max()))) if host.size else 0.0
        found = np.array([top > 0, top >= jnp.finfo(dtype).smallest_normal], np.int32)  # non-zero, normal
        found = found if combine is None else combine(found)
        subnormal = found[0] > 0 and found[1] == 0
    if subnormal:
        raise subnormal_weights_error(name, dtype)


def subnormal_only(a: jax.Array, axis: int | None = None) -> jax.Array:
    """Whether ``a`` (along ``axis``, or all of it) has a non-zero entry and every entry below the dtype's
    smallest normal number; on the values' bits (integer comparisons, which no device flushes: ``jnp.abs``
    of a subnormal is 0 on a CPU), traceable."""
    magnitude = float_bits(a)[1]
    tiny = float_bits(jnp.asarray(jnp.finfo(a.dtype).smallest_normal, a.dtype))[1]
    return jnp.any(magnitude > 0, axis=axis) & ~jnp.any(magnitude >= tiny, axis=axis)


_all_subnormal = traced.jit(subnormal_only)


def check_nonnegative(name: str, x) -> None:
    """Raise ``ValueError`` if a concrete ``x`` has negative entries (skipped under tracing)."""
    if not is_concrete(x):
        traced.check(jnp.all(jnp.asarray(x) >= 0), f"{name} must be non-negative.")
        return
    host = host_values(x)
    if host is not None:
        bad = count_failing(host, lambda a: ~(a < 0))
    else:
        with jax.ensure_compile_time_eval():
            bad = int(_count_negative(jnp.asarray(x)))
    if bad:
        raise ValueError(f"{name} must be non-negative; {bad} are negative.")


def check_leading_axis(name: str, x, *, min_ndim: int = 1) -> int:
    """Return ``x.shape[0]``; raise if ``x`` has fewer than ``min_ndim`` axes or an empty leading axis."""
    shape = np.shape(x)  # a Python list too (jnp.shape of one is deprecated)
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} axis (examples first), got shape {shape}.")
    if shape[0] == 0:
        raise ValueError(f"{name} has no examples (leading axis of size 0), shape {shape}.")
    return shape[0]


def check_one_array(name: str, value, shape: str, hint: str = "") -> None:
    """``TypeError`` naming ``name`` when ``value`` is a pytree rather than one array: a mapping (a dict of
    parameters or inputs), or a list / tuple numpy cannot stack into one numeric array (ragged, or of
    pytrees); a list of rows or of per-example arrays of one shape is one array. ``shape`` describes the
    array expected, ``hint`` (after a semicolon) where a pytree belongs."""
    if isinstance(value, Mapping):
        kind = type(value).__name__
    elif isinstance(value, list | tuple):
        leaves = jax.tree.leaves(value)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # rows traced by a user's jit
            one = len(leaves) == len(value) and len({jnp.shape(leaf) for leaf in leaves}) == 1
        else:
            try:
                one = np.asarray(value).dtype != object
            except (ValueError, TypeError):  # ragged rows, a tuple of pytrees
                one = False
        if one:
            return
        kind = f"{type(value).__name__} that is not one array (ragged, or of pytrees)"
    else:
        return
    raise TypeError(f"{name} must be one array {shape}, got a {kind}" + (f"; {hint}." if hint else "."))


def check_same_length(name_a: str, n_a: int, name_b: str, n_b: int) -> None:
    if n_a != n_b:
        raise ValueError(f"{name_a} has {n_a} examples but {name_b} has {n_b}; they must agree.")


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    """Return ``int(value)``; ``TypeError`` unless an int, ``ValueError`` unless ``> 0`` (``>= 0``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value}.")
    return int(value)


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a Python bool; ``TypeError`` unless it is a bool (a Python or numpy one): a string
    such as ``"no"`` or ``None`` would otherwise decide by its truthiness."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def check_real(name: str, value) -> float:
    """Return a concrete real scalar as a Python float: a Python, numpy or 0-d array number (``bool`` and
    strings are refused with ``TypeError``); NaN is returned as is, for the caller's range check."""
    dtype = getattr(value, "dtype", None)
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete real number, not a traced value; under jax.jit close over it or "
            "make it a static argument."
        )
    ok = isinstance(value, int | float | np.integer | np.floating) or (
        dtype is not None and jnp.shape(value) == () and is_concrete(value)
    )
    if isinstance(value, bool | np.bool_) or not ok or (dtype is not None and not _is_real_dtype(dtype)):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    try:
        return float(value)
    except OverflowError:  # an int beyond float64 (10**400): infinite, for the caller's range check
        return math.inf if value > 0 else -math.inf


def _is_real_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)


def check_key(name: str, key) -> None:
    """``TypeError`` unless ``key`` is a PRNG key: a typed key (``jax.random.key``) or a raw ``uint32``
    key array (``jax.random.PRNGKey``); a plain int is not one (the message says how to make one)."""
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if typed and jnp.ndim(key) == 0:
        return
    if typed:  # a batch of keys, e.g. jax.random.split(key, 2): the functions draw with one key
        raise TypeError(f"{name} must be a single PRNG key, got a batch of keys of shape {jnp.shape(key)}.")
    if dtype == jnp.uint32 and jnp.ndim(key) >= 1:
        # a raw key's data: 2 words for threefry (the default), 4 for rbg
        words = 2 if jax.config.jax_default_prng_impl == "threefry2x32" else 4
        if jnp.shape(key) != (words,):
            raise TypeError(
                f"{name} must be a single PRNG key, e.g. jax.random.key(0): a raw uint32 key has shape "
                f"({words},), got {jnp.shape(key)}."
            )
        return
    raise TypeError(f"{name} must be a PRNG key, e.g. jax.random.key(0), got {key!r}.")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {sorted(allowed)}.")


@traced.jit
def _probs_summary(p):
    """``(#non-finite, #negative, min, sum in float64 where enabled, #positive)`` in one reduction pass."""
    finite = jnp.isfinite(p)
    return (
        jnp.size(p) - jnp.count_nonzero(finite),
        jnp.count_nonzero(p < 0),
        jnp.min(p),
        jnp.sum(p.astype(jnp.result_type(float))),
        jnp.count_nonzero(p > 0),
    )


def probs_summary(probs) -> tuple[int, int, float, float, int] | None:
    """Scalars of :func:`_probs_summary` fetched to the host, or ``None`` under tracing."""
    if not is_concrete(probs):
        return None
    # a float64 numpy vector past float32's range becomes Inf in jax's cast without jax_enable_x64 (numpy
    # would warn): counted as non-finite here, then named by check_probs
    with jax.ensure_compile_time_eval(), np.errstate(over="ignore"):
        bad, neg, low, total, pos = fetch(*_probs_summary(jnp.asarray(probs)))
    return int(bad), int(neg), float(low), float(total), int(pos)


def as_probs_vector(probs, name: str = "probs"):
    """``probs`` as given, a list or tuple of floats as an array; a :class:`~nlis_jax.Leverage` (any
    NamedTuple) is refused with ``TypeError`` naming its ``.probs`` (it is a tuple of arrays)."""
    if isinstance(probs, tuple) and hasattr(probs, "_fields"):
        raise TypeError(
            f"{name} must be a vector of one value per point, got a {type(probs).__name__}: pass its .probs "
            "(e.g. leverage_scores(F, return_info=True).probs)."
        )
    return jnp.asarray(probs) if isinstance(probs, list | tuple) else probs


def probs_tolerance(dtype) -> float:
    """How far from 1 the sum of a probability vector of ``dtype`` may be: 1e-8 in float64; 1e-3 in
    float32 (a float32 vector summed in float32, the roundoff of n terms); in half precision 4 units of its
    rounding (float16 3.9e-3, bfloat16 3.1e-2: each entry is rounded once to 8 or 11 bits, and the
    library's own half-precision scores are such vectors)."""
    if dtype == jnp.float64:
        return 1e-8
    return max(1e-3, 4 * float(jnp.finfo(dtype).eps))


def check_probs(probs, *, name: str = "probs", atol: float | None = None) -> int:
    """Require a 1-D probability vector: non-negative, finite, summing to one. Returns its length.

    The value checks are one device reduction (a few scalars come back, never the vector).
    """
    check_native(name, probs)
    shape = jnp.shape(probs)
    if len(shape) != 1:
        raise ValueError(f"{name} must be a 1-D probability vector, got shape {shape}.")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    check_floating(name, probs)
    summary = probs_summary(probs)
    if summary is None:
        check_traced_probs(probs, name)
        return shape[0]
    bad, neg, low, total, _ = summary
    if bad:  # float64 numpy values past float32's range read as Inf without jax_enable_x64: say so
        over = narrowing_counts(probs)[0]
        raise ValueError(narrowing_error(name, over, 0) if over else f"{name} contains NaN or Inf.")
    if neg:
        raise ValueError(f"{name} has {neg} negative entries (min {low:.3g}).")
    tol = atol if atol is not None else probs_tolerance(jnp.result_type(probs))
    if abs(total - 1.0) > tol:
        hint = ""
        if abs(total - 1.0) <= 1e-3 and jnp.result_type(probs) == jnp.float64:  # e.g. float32 scores cast
            hint = f" (a float32 vector cast to float64 keeps float32's rounding: renormalise, {name} / sum)"
        raise ValueError(f"{name} must sum to 1, got sum {total:.10g} (tolerance {tol:g}){hint}.")
    return shape[0]


def check_traced_probs(probs, name: str) -> None:
    """The checks of :func:`check_probs` as ``checkify`` checks (inside ``nlis_jax.traced_checks``)."""
    if not traced.enabled():
        return
    bad, neg, _, total, _ = _probs_summary(probs)
    tol = probs_tolerance(jnp.result_type(probs))
    traced.check(bad == 0, f"{name} contains NaN or Inf.")
    traced.check(neg == 0, f"{name} has negative entries.")
    traced.check(jnp.abs(total - 1.0) <= tol, f"{name} must sum to 1 (tolerance {tol:g}).")


def check_positive(value, message: str) -> None:
    """``ValueError(message)`` unless a concrete scalar ``value`` is ``> 0`` (NaN fails); traced, a
    ``checkify`` check (inside ``nlis_jax.traced_checks()``, else nothing): a total or rank that a
    distribution is divided by."""
    if not is_concrete(value):
        traced.check(value > 0, message)
    elif not float(value) > 0:
        raise ValueError(message)


def check_tolerances(rtol, ridge) -> None:
    """``rtol`` in ``(0, 1)`` (or ``None``) and ``ridge`` finite and ``≥ 0``: ``ValueError`` otherwise."""
    if rtol is not None and not is_concrete(rtol):  # a checkify check inside nlis_jax.traced_checks()
        traced.check(
            (rtol > 0) & (rtol < 1), "rtol must lie in (0, 1) (relative to the largest singular value)."
        )
    elif rtol is not None and not 0.0 < check_real("rtol", rtol) < 1.0:
        raise ValueError(f"rtol must lie in (0, 1) (relative to the largest singular value), got {rtol}.")
    if is_concrete(ridge) and not 0.0 <= check_real("ridge", ridge) < float("inf"):
        raise ValueError(f"ridge must be non-negative and finite, got {ridge}.")


def _read_int(path: str, field: str | None = None) -> int | None:
    """An integer from a file of ``/proc`` or ``/sys`` (``field``: a ``"Name: value kB"`` line of it)."""
    try:
        with open(path) as f:
            if field is None:
                return int(f.read().strip())
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):  # absent, unreadable, or "max" (no limit)
        return None
    return None


def available_memory(each_device: bool = False) -> tuple[int, str] | None:
    """``(bytes, where)`` this process may still allocate for a new array on its default devices, or
    ``None`` when unknown. On a CPU the host's ``MemAvailable`` plus free swap (Linux ``/proc/meminfo``),
    capped by a cgroup v2 limit (a container's ``memory.max`` less ``memory.current``); on a GPU or TPU the
    devices' ``bytes_limit`` less ``bytes_in_use`` (``memory_stats``), summed over this process's devices,
    or with ``each_device`` the smallest (for an array every device holds whole)."""
    devices = jax.local_devices()
    if devices[0].platform == "cpu":
        free = _read_int("/proc/meminfo", "MemAvailable")
        if free is None:
            return None
        free += _read_int("/proc/meminfo", "SwapFree") or 0
        limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
        if limit is not None and used is not None:
            free = min(free, max(limit - used, 0))
        return free, "in this process's memory"
    frees = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        frees.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    kind = devices[0].platform.upper()
    if each_device:
        return min(frees), f"on each of this process's {len(devices)} {kind} device(s)"
    return sum(frees), f"on this process's {len(devices)} {kind} device(s)"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def check_fits_in_memory(
    what: str, shape: tuple, dtype, hint: str, copies: int = 1, why: str = "", whole: bool = False
) -> None:
    """``MemoryError`` naming ``what`` when an array of ``shape`` and ``dtype`` (its share in this
    process under ``jax.distributed``, or all of it with ``whole``: a matrix every process, and every
    accelerator, holds whole: checked against the device with the least free memory), or
    ``copies`` such arrays (``why`` says what they are), exceeds
    :func:`available_memory`: jax's own failure to allocate it was a raw ``RESOURCE_EXHAUSTED`` error, an
    out-of-memory kill, or a hang (a jitted program whose output cannot be allocated, then a scalar read
    of its result, never returned). Skipped under a trace (XLA may never form the array there) and when
    the memory is unknown."""
    if under_trace():
        return
    nbytes = copies * math.prod(shape) * np.dtype(dtype).itemsize / (1 if whole else jax.process_count())
    found = available_memory(True) if whole else available_memory()
    if found is None or nbytes <= found[0]:
        return
    many = f" with {why} ({copies} arrays of that shape in all)" if copies > 1 else ""
    raise MemoryError(
        f"{what} of shape {tuple(shape)} ({np.dtype(dtype).name}){many} would take {_gib(nbytes)}, more than "
        f"the {_gib(found[0])} available {found[1]}; {hint}"
    )
