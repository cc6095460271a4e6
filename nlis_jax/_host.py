r"""Data that stays on the host: numpy arrays, ``numpy.memmap``, streams of chunks (out of core).

The data never travels to the device as a whole: chunks of ``chunk_size`` examples are read, copied to the
device and consumed one at a time, the next read (and its transfer) overlapping the device's work on the
current one (JAX dispatches asynchronously), and at most two chunks are in flight. Anonymous memory is
``O(chunk·k·p + p²)`` plus the ``(n,)`` scores (or none of them, with ``out=`` a memmap). The passes of
the leverage and norm scores are those of device arrays, written once in :mod:`nlis_jax._passes`; here
they run as a Python loop over chunks of jitted steps, and only the passes the route needs are run
(:func:`nlis_jax.routes.transform_stepwise`). With the adaptive rule a step is two programs: the dual
rows of the chunk (compiled once per model and chunk shape and shared by every pass) and the pass's small
kernel (:func:`_step`).

Input forms (``xs`` of the streaming scores and of the losses):

- a numpy array or memmap (or a pytree of them, with ``ys`` and ``weights`` numpy arrays or ``None``):
  read by slices;
- a callable returning a fresh iterable of ``(x_chunk, y_chunk)`` pairs (``y_chunk`` may be ``None``) of
  any sizes, e.g. one per file of shards: it is called once per pass, so it must yield the same data
  each time (not an iterator, which one pass would use up). Each chunk is checked as it arrives
  (:class:`CheckedSource`: same leading length in ``x_chunk`` and ``y_chunk``, the first chunk's
  per-example shapes and dtypes, ``y_chunk`` in all chunks or none), every pass must yield as many
  examples as the first, and the leverage of a chunk source must sum to its rank
  (:func:`check_leverage_sum`, on the routes where that is exact to working precision).

Non-finite values are found during the first pass, which then raises before any score is computed.
Under ``jax.distributed`` each process passes its own block of rows: the Gram matrices (and counts) are
summed across processes and the scores come back as one global array.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from nlis_jax import _traced as traced
from nlis_jax import routes
from nlis_jax._adjoint import (
    check_has_outputs,
    check_output_shape,
    check_ys_fits,
    count_bad_examples,
    eval_example,
    flatten_model,
    nonfinite_dual_rows,
)
from nlis_jax._checks import (
    check_finite,
    check_fits_in_memory,
    check_floating,
    check_native,
    check_not_complex,
    check_numeric,
    check_positive,
    check_weights_not_all_subnormal,
    count_negative,
    fetch,
    is_concrete,
    narrowing_counts,
    narrowing_error,
    narrows,
    type_name,
    under_trace,
)
from nlis_jax._passes import (
    ANY,
    GRAM,
    TSQR,
    Chunks,
    balanced_chunk,
    chunk_rows,
    fold_blocks,
    leverage_passes,
    norm_rows,
)
from nlis_jax._precision import at_least_float32, highest_precision, promoted
from nlis_jax._scores import LINEAR_ALGEBRA_FAILED, STREAMED_ZERO_NORMS, check_rank

Source = Callable[[], Iterator]
PIECE_NAMES = ("xs", "ys", "weights")  # the parts of a piece, in order (:func:`array_source`'s trees)


def is_host_data(xs, traced=None) -> bool:
    """True for a callable chunk source, or a pytree of numpy arrays (memmaps included), when nothing in
    ``traced`` (the call's other array arguments: params, labels, weights) is a tracer.

    ``TypeError`` for an iterator (a generator object): a chunk source is read once per pass. Under a
    trace of any of them (a user's ``jit``/``grad``/``vmap``) numpy inputs take the device path instead:
    the host loop fetches values between chunks.
    """
    if isinstance(xs, Iterator):
        raise TypeError(
            f"xs is an iterator ({type(xs).__name__}), which is used up after one pass: pass a function "
            "that returns a fresh iterator of (x_chunk, y_chunk) pairs instead (each pass calls it again), "
            "e.g. the generator function itself rather than its call, or lambda: iter(chunks)."
        )
    if callable(xs):
        if under_trace():
            raise TypeError(
                "a chunk source is read on the host, pass by pass, and cannot be used inside jax.jit, vmap "
                "or grad: call the function outside the transformation, or pass device arrays."
            )
        return True
    if under_trace() or any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(traced)):
        return False  # numpy arrays closed over inside a user's jit: the device path
    leaves = jax.tree.leaves(xs)
    return bool(leaves) and all(isinstance(a, np.ndarray) for a in leaves)


def check_host_arrays(apply_fn, params, xs, ys=None, weights=None, *, out_check: bool = True) -> int:
    """Shape checks of host arrays (no values read, no collective: see :func:`on_every_process`); returns
    ``n``."""
    check_native("xs", xs)
    check_native("ys", ys)
    check_native("weights", weights)
    for name, tree in (("xs", xs), ("ys", ys), ("weights", weights)):
        check_numeric(name, tree)
    first = jax.tree.leaves(xs)[0]
    n = first.shape[0] if first.ndim else 0
    if n == 0 and jax.process_count() == 1:  # several: the passes' exchange of rows names the empty block
        raise ValueError(f"xs has no examples (leading axis of size 0), shape {first.shape}.")
    for leaf in jax.tree.leaves(xs):
        if leaf.ndim == 0 or leaf.shape[0] != n:
            hint = ""
            if isinstance(xs, list | tuple) and all(isinstance(item, tuple) for item in xs):
                hint = (
                    " (xs is a list of pairs: a chunk source is a callable returning them, e.g. "
                    "lambda: iter(chunks), with ys=None)"
                )
            raise ValueError(f"every array of xs must have {n} examples first, got shape {leaf.shape}{hint}.")
    if ys is not None and (np.ndim(ys) == 0 or np.shape(ys)[0] != n):
        raise ValueError(f"ys has shape {np.shape(ys)} but xs has {n} examples; they must agree.")
    if weights is not None and np.shape(weights) != (n,):
        raise ValueError(f"weights must have shape ({n},) (one per example), got {np.shape(weights)}.")
    out = eval_example(apply_fn, params, example_spec(xs))  # shapes only: a memmap is not read
    if not out_check:
        check_has_outputs(out)
    else:  # the scores: a scalar or a vector per example, as on the device
        check_output_shape(out)
        if ys is not None and np.shape(ys) != (n,) + out.shape:
            raise ValueError(
                f"ys has shape {np.shape(ys)} but the model gives outputs of shape {(n,) + out.shape} "
                "(n examples × outputs); they must agree."
            )
    check_not_complex("ys", ys)  # before the floating check: the more specific message
    if out_check and ys is not None:  # as the device path (dual_matrix), whose result the scores equal
        check_floating("ys", ys)
    _check_in_memory("xs", xs)
    _check_in_memory("ys", ys)
    _check_in_memory("weights", weights)
    return n


def on_every_process(own, doing: str = "while checking their arguments", when: str = "before any work"):
    """``own()``: the checks of this process's own arguments and data before any collective. Under
    ``jax.distributed`` an error it raises is told to the other processes (:func:`raise_if_any_failed`),
    so that every process raises: params that differ (NaN on one), a block of another width or of no
    rows, an ``out`` of another length raised on one process alone, and the others waited in the next
    collective. Every process must call it at the same point (whatever its arguments)."""
    if jax.process_count() == 1:
        return own()
    failed, result = [], None
    try:
        result = own()
    except Exception as exc:
        failed.append(exc)
    raise_if_any_failed(failed, doing, when)
    return result


def summed_over_processes():
    """The ``combine`` of the host checks under ``jax.distributed``: integer counts summed over all
    processes, so that every process raises the same error (one raising alone left the others waiting in
    a collective, and a block's subnormal values are not all the data's); ``None`` in one process."""
    if jax.process_count() == 1:
        return None
    return lambda counts: np.asarray(across_processes(jnp.asarray(counts), lambda a: a.sum(0)))


def _check_in_memory(name: str, tree) -> None:
    """NaN/Inf of arrays already in memory, before any work (values a cast without jax_enable_x64 makes
    Inf or 0 included); memmaps are checked chunk by chunk instead (:class:`NarrowingCheck`).
    Under ``jax.distributed`` every block is checked chunk by chunk too (the first pass's counts are
    summed over processes, so all raise the same error): a process raising here alone left the others
    waiting in the pass's collectives."""
    if jax.process_count() > 1:
        return
    leaves = jax.tree.leaves(tree)
    in_memory = [a for a in leaves if isinstance(a, np.ndarray) and not isinstance(a, np.memmap)]
    if in_memory:
        check_finite(name, in_memory)


class ArraySource:
    """A chunk source reading slices of ``chunk`` rows of every array of ``tree`` (``None`` leaves stay).

    ``narrowing_checked``: whether its values need no more check for jax's cast without jax_enable_x64
    (:class:`NarrowingCheck`): in one process its arrays in memory were checked before any work
    (:func:`check_host_arrays`), so only its float64 memmaps are left, checked on the first pass.
    """

    def __init__(self, tree, n: int, chunk: int):
        self.tree, self.n, self.chunk = tree, n, chunk
        self.narrowing_checked = jax.process_count() == 1 and not any(
            isinstance(a, np.memmap) and narrows(a) for a in jax.tree.leaves(tree)
        )

    def __call__(self) -> Iterator:
        for start in range(0, self.n, self.chunk):
            rows = slice(start, min(start + self.chunk, self.n))
            yield jax.tree.map(lambda a, rows=rows: a[rows], self.tree)


def array_source(tree, n: int, chunk: int) -> ArraySource:
    """A chunk source reading slices of ``chunk`` rows of every array of ``tree`` (:class:`ArraySource`)."""
    return ArraySource(tree, n, chunk)


def not_one_array(name: str, value) -> TypeError:
    """The error of ``ys`` or ``weights`` given as a dict or another container of arrays."""
    return TypeError(
        f"{name} must be one array of shape (n, ...), got a {type(value).__name__}; stack its arrays "
        "into one."
    )


def host_vector(name: str, value):
    """``ys`` or ``weights`` of host arrays as a numpy array (a list or a jax array is converted; a numpy
    array or memmap is kept as is, so a memmap is never read whole)."""
    if value is None or isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        raise not_one_array(name, value)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:  # jax: "Fetching value ... spans"
        raise ValueError(
            f"{name} is a global jax array spread over the {jax.process_count()} processes, while xs holds "
            f"this process's block of host rows: pass this process's rows of {name} as a numpy array (e.g. "
            f"distributed.gather({name})[distributed.process_rows(n)]), or pass xs as global arrays "
            "(distributed.shard_rows)."
        )
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a numpy array (examples first), got {type(value).__name__}."
        ) from err


class CheckedSource:
    """A user's chunk source, each ``(x_chunk, y_chunk)`` pair checked as it arrives (:meth:`_check`).

    Checked: the item is a pair; every array of ``x_chunk`` and ``y_chunk`` has the same leading length;
    ``y_chunk`` is present in every chunk or in none (present in all when ``need_y``); the per-example
    shapes and dtypes (and the pytree structure of ``x_chunk``) are those of the first chunk; with
    ``out_shape`` (a function of one example of ``x_chunk``, as ``jax.ShapeDtypeStruct`` leaves), ``y_chunk``
    has shape ``(c,) + out_shape(x)``. Every pass (call) must yield as many examples as the first:
    ``ValueError`` naming both counts otherwise (as soon as a later pass yields more, or at its end).
    ``on_chunk(index, x_chunk, y_chunk)``, if given, checks the values of a chunk (e.g. labels).
    ``triples=True`` yields ``(x_chunk, y_chunk, None)`` (the losses' items: no weights); it stays a
    :class:`CheckedSource`, so :func:`rechunk` still copies its pieces (the user may refill the buffers).
    """

    def __init__(
        self, source: Source, *, out_shape=None, need_y: bool = False, on_chunk=None, triples: bool = False
    ):
        self.source, self.out_shape, self.need_y, self.on_chunk = source, out_shape, need_y, on_chunk
        self.triples = triples
        self.spec = None  # (structure of x, per-example (shape, dtype) of x's leaves and of y) of chunk 0
        self.count = None  # examples of the first complete pass
        self.limit = None  # (rows, message): a ValueError as soon as a pass yields more rows
        self.passes = 0
        self.digests = []  # per piece of the first pass (:func:`rechunk`): a digest of sampled rows

    def __call__(self) -> Iterator:
        items = self.source()
        try:
            iterator = iter(items)
        except TypeError:
            raise TypeError(
                "a chunk source must be a function returning an iterable of (x_chunk, y_chunk) pairs, "
                f"but calling it returned {type(items).__name__}."
            ) from None
        self.passes += 1
        count = 0
        try:
            for index, item in enumerate(iterator):
                count += self._check(index, item)
                if self.limit is not None and count > self.limit[0]:
                    raise ValueError(self.limit[1])
                if self.count is not None and count > self.count:
                    raise ValueError(self._different(f"more than {self.count} examples (at least {count})"))
                yield (*item, None) if self.triples else item
        except BaseException:  # a check here or the consumer stopped the pass: the user's generator closed
            # now (its finally: files, cursors), not when the traceback that still holds this frame goes;
            # an iterator the pass exhausted is left as it is
            if inspect.isgenerator(iterator):  # not a reusable iterator object (a reader, a cursor)
                iterator.close()
            raise
        if self.count is None:
            self.count = count
        elif count != self.count:
            raise ValueError(self._different(f"{count} examples"))

    def check_piece(self, index: int, piece, valid: int) -> None:
        """Piece ``index`` of :func:`rechunk` against the first pass's: a digest of the bytes of 17 evenly
        spaced valid rows (first and last included) of every array, O(17·row) per piece. A source that
        yields its rows in another order on a later pass (shard files listed unsorted, a query without
        ORDER BY) would put every score on another row without changing the Gram matrix."""
        rows = np.unique(np.linspace(0, valid - 1, 17).astype(np.int64))
        digest = hashlib.blake2b(digest_size=16)
        for leaf in jax.tree.leaves(piece):
            digest.update(np.ascontiguousarray(leaf[rows]).tobytes())
        digest = digest.digest()
        if self.passes == 1:
            self.digests.append(digest)
        elif index < len(self.digests) and digest != self.digests[index]:
            start = index * jax.tree.leaves(piece)[0].shape[0]
            raise ValueError(
                f"the chunk source yielded other rows on pass {self.passes} than on the first pass (among "
                f"examples {start}–{start + valid - 1}): it "
                "must yield the same examples in the same order each time it is called (each pass calls it "
                "again; sort a list of shard files, give a database query an ORDER BY)."
            )

    def _different(self, what: str) -> str:
        return (
            f"the chunk source yielded {what} on pass {self.passes} but {self.count} on the first pass: "
            "it must yield the same chunks each time it is called (each pass calls it again)."
        )

    def _check(self, index: int, item) -> int:
        """The checks of one item (see the class docstring); returns its number of examples."""
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(
                f"a chunk source must yield (x_chunk, y_chunk) pairs (y_chunk may be None); item {index} "
                f"is a {type(item).__name__}."
            )
        x, y = item
        leaves = jax.tree.leaves(x) + ([] if y is None else [y])
        if not jax.tree.leaves(x):
            raise TypeError(f"x_chunk of chunk {index} of the chunk source holds no arrays.")
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, np.ndarray | jax.Array) or leaf.ndim == 0:
                if isinstance(leaf, np.ndarray | jax.Array):
                    got = f"shape {leaf.shape}"
                elif isinstance(x, list | tuple) and i < len(leaves) - (y is not None):  # a leaf of x
                    got = f"a Python {type(x).__name__} (read as a pytree of {type_name(leaf)} leaves)"
                else:
                    got = f"a {type_name(leaf)}"  # pandas.DataFrame
                raise TypeError(
                    f"chunk {index} of the chunk source: x_chunk and y_chunk must be numpy arrays (x_chunk "
                    f"may be a pytree of them) with examples first, got {got}."
                )
        check_native(f"chunk {index} of the chunk source", leaves)
        check_numeric(f"chunk {index} of the chunk source", leaves)
        shapes = [leaf.shape for leaf in leaves]
        if any(shape[0] != shapes[0][0] for shape in shapes):
            raise ValueError(
                f"chunk {index} of the chunk source: every array of x_chunk and y_chunk must have the same "
                f"number of examples (leading axis), got shapes {shapes}."
            )
        self._check_spec(index, x, y)
        if self.on_chunk is not None:
            self.on_chunk(index, x, y)
        return shapes[0][0]

    def _check_spec(self, index: int, x, y) -> None:
        """The structure, per-example shapes and dtypes of chunk ``index`` against those of chunk 0."""
        x_spec = [(leaf.shape[1:], np.dtype(leaf.dtype)) for leaf in jax.tree.leaves(x)]
        y_spec = None if y is None else (y.shape[1:], np.dtype(y.dtype))
        spec = (jax.tree.structure(x), x_spec, y_spec)
        if self.spec is None:
            self._check_first(index, x, y)
            self.spec = spec
            return
        structure, x_first, y_first = self.spec
        later = self.passes > 1  # the first pass's chunk 0 is the reference
        where = f"chunk {index} of the chunk source" + (f" on pass {self.passes}" if later else "")
        first = "chunk 0" + (" of the first pass" if later else "")
        if (y_spec is None) != (y_first is None):
            given, has = ("None", "has responses") if y is None else ("given", "has None")
            raise ValueError(
                f"{where} has y_chunk {given} but {first} {has}: give y_chunk in every chunk or in none."
            )
        if spec[0] != structure:
            raise ValueError(
                f"x_chunk of {where} has pytree structure {spec[0]} but {first} has {structure}: every "
                "chunk must have the same structure."
            )
        if x_spec != x_first:
            raise ValueError(
                f"x_chunk of {where} has examples of shape and dtype {_specs(x_spec)} but {first} has "
                f"{_specs(x_first)}: every chunk must have the same per-example shape and dtype."
            )
        if y_spec != y_first:
            raise ValueError(
                f"y_chunk of {where} has examples of shape and dtype {_specs([y_spec])} but {first} has "
                f"{_specs([y_first])}: every chunk must have the same per-example shape and dtype."
            )

    def _check_first(self, index: int, x, y) -> None:
        """``y_chunk`` of the first chunk: present when needed, real, and of the model's output shape."""
        check_not_complex(f"y_chunk of chunk {index} of the chunk source", y)
        # the model's output shape is checked with or without responses (a matrix output is refused)
        out = None if self.out_shape is None else self.out_shape(example_spec(x))
        if y is None:
            if self.need_y:
                raise ValueError(
                    f"chunk {index} of the chunk source has y_chunk None, but the losses need the targets."
                )
            return
        if out is None:
            return
        check_floating(f"y_chunk of chunk {index} of the chunk source", y)  # the scores' offset f(0) − y
        c = y.shape[0]
        if y.shape[1:] != tuple(out):
            raise ValueError(
                f"y_chunk of chunk {index} of the chunk source has shape {y.shape} but the model gives "
                f"outputs of shape {(c,) + tuple(out)} for its {c} examples; they must agree (1-D for a "
                "scalar model)."
            )


def _specs(spec) -> str:
    return ", ".join(f"{tuple(shape)} {dtype}" for shape, dtype in spec)


def rechunk(source: Source, chunk: int) -> Iterator:
    """Pieces of ``chunk`` examples (the last padded with copies of its row 0) and their valid count; a
    source of fewer than ``chunk`` examples in all is one piece of that many, unpadded.

    Whole pieces inside an item are slices of it (copied only where not contiguous); rows carried over
    to the next item, fewer than ``chunk``, are copied. So an item is never copied whole (a shard of any
    size costs at most one chunk of memory). A user's chunk source (:class:`CheckedSource`) may refill its
    buffers once the next item is asked for, and the pieces are put on the device one piece ahead
    (:func:`staged`), where a CPU ``device_put`` may alias the numpy memory instead of copying it: so
    its whole pieces are copies too (one chunk each). Arrays and memmaps, which nobody refills, are sliced.
    A user's chunk source must repeat its rows in order on every pass: each piece is checked against the
    first pass's (:meth:`CheckedSource.check_piece`).
    """
    for index, (piece, valid) in enumerate(_pieces(source, chunk)):
        if isinstance(source, CheckedSource):
            source.check_piece(index, piece, valid)
        yield piece, valid


def _pieces(source: Source, chunk: int) -> Iterator:
    take = np.array if isinstance(source, CheckedSource) else np.ascontiguousarray
    carried, count, whole = None, 0, 0  # rows of the piece being completed, copies; whole pieces so far
    for item in source():
        size, start = jax.tree.leaves(item)[0].shape[0], 0
        if count:
            start = min(chunk - count, size)
            carried = jax.tree.map(lambda a, b, k=start: np.concatenate([a, b[:k]]), carried, item)
            count += start
            if count < chunk:
                continue
            yield carried, chunk
            carried, count, whole = None, 0, whole + 1
        while size - start >= chunk:
            yield jax.tree.map(lambda a, k=start: take(a[k : k + chunk]), item), chunk
            start, whole = start + chunk, whole + 1
        if start < size:
            carried, count = jax.tree.map(lambda a, k=start: np.array(a[k:]), item), size - start
    if count:  # a source of fewer than ``chunk`` rows is one piece of its own length (as an array's)
        yield jax.tree.map(lambda a: _pad(a, chunk if whole else count), carried), count


def _pad(a, size: int):
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.broadcast_to(a[:1], (size - a.shape[0],) + a.shape[1:])])


def staged(source: Source, chunk: int) -> Iterator:
    """Device copies of the pieces, the next transfer started before the current piece is handed out;
    float64 pieces without jax_enable_x64 are checked before their transfer (:class:`NarrowingCheck`)."""
    chain = rechunk(source, chunk)
    pieces = enumerate(chain)
    check = NarrowingCheck(source, chunk)
    failed = []  # under jax.distributed: this process's error while reading, told to the others first

    def put(item):
        if item is None:
            return None
        index, (piece, valid) = item
        check.piece(index, piece, valid)  # memmaps and chunks are read here, not before
        return jax.device_put(piece), valid

    def advance():
        if failed:
            return None
        try:
            return put(next(pieces, None))
        except Exception as exc:
            if jax.process_count() == 1:
                raise
            failed.append(exc)
            return None

    try:
        nxt = advance()
        while nxt is not None:
            cur, nxt = nxt, advance()
            yield cur
    finally:  # the source's generators closed when a check here or the consumer stops the pass
        chain.close()
    raise_if_any_failed(failed)  # in one process a reading error was raised where it happened
    check.done()


def raise_if_any_failed(
    failed: list, doing: str = "while reading their data", when: str = "at the end of this pass"
) -> None:
    """Under ``jax.distributed``, at the end of a pass (or of the checks before any): this process's error
    (``failed``, empty or one exception) raised on it, and a ``ValueError`` naming it on every other
    process (one exchange of a flag). A chunk source's chunk of another shape, or its labels out of range,
    raised on its own process while the others waited in the pass's next collective. In one process the
    error is raised, with no exchange."""
    if jax.process_count() == 1:
        if failed:
            raise failed[0]
        return
    table = process_table([int(bool(failed))])[:, 0]
    if failed:
        raise failed[0]
    if table.any():
        which = np.flatnonzero(table).tolist()
        raise ValueError(
            f"under jax.distributed, process(es) {which} failed {doing} (the error is raised there); every "
            f"process stops {when}."
        )


class NarrowingCheck:
    """Values of float64 host pieces that jax's cast without jax_enable_x64 makes Inf or flushes to 0 on
    the device, and 64-bit integers it wraps around (:func:`nlis_jax._checks.narrowing_counts`), checked
    piece by piece in :func:`staged`.

    In one process the first such piece raises, naming its examples. Under ``jax.distributed`` the counts
    of each part (``xs``, ``ys``, ``weights``) are summed over the pass and exchanged at its end
    (:func:`process_table`), so every process raises the same error: one raising alone left the others
    waiting in the pass's collectives (and values flushed to 0 went unnamed). An :class:`ArraySource` is
    checked on its first complete pass only (see its ``narrowing_checked``); a user's chunk source, whose
    rows are only sampled from pass to pass (:meth:`CheckedSource.check_piece`), on every pass.
    """

    def __init__(self, source: Source, chunk: int):
        self.source, self.chunk = source, chunk
        self.active = not jax.config.jax_enable_x64 and not getattr(source, "narrowing_checked", False)
        self.multi = jax.process_count() > 1
        self.counts = np.zeros((len(PIECE_NAMES), 3), np.int64)  # (over, under, wrapped) per part, here

    def piece(self, index: int, piece, valid: int) -> None:
        if not self.active:
            return
        for k, part in enumerate(piece):
            counts = narrowing_counts(jax.tree.map(lambda a, v=valid: a[:v], part))
            if self.multi:
                self.counts[k] += counts
                continue
            start = index * self.chunk
            message = narrowing_error(f"{PIECE_NAMES[k]}, in examples {start}–{start + valid - 1},", *counts)
            if message:
                raise ValueError(message)

    def done(self) -> None:
        """The end of a complete pass: the exchange of the counts (several processes), then the mark."""
        if not self.active:
            return
        if self.multi:
            table = process_table(np.minimum(self.counts, np.iinfo(np.int32).max).ravel())
            table = table.reshape(-1, len(PIECE_NAMES), 3)
            for k, name in enumerate(PIECE_NAMES):
                over, under, wrapped = table[:, k].sum(0)
                if over or under or wrapped:
                    which = np.flatnonzero(table[:, k].sum(1)).tolist()
                    where = f"{name}, in the block(s) of process(es) {which} under jax.distributed,"
                    raise ValueError(narrowing_error(where, int(over), int(under), int(wrapped)))
        if isinstance(self.source, ArraySource):
            self.source.narrowing_checked = True


def fold(step, carry, source: Source, chunk: int):
    """``carry = step(carry, piece, valid)`` over the pieces, at most two device steps in flight."""
    prev = None
    for piece, valid in staged(source, chunk):
        carry = step(carry, piece, valid)
        if prev is not None:
            jax.block_until_ready(prev)
        prev = carry
    return carry


def collect(step, source: Source, chunk: int, out, too_many: str | None = None) -> tuple[int, float]:
    """``out[rows] = step(piece, valid)[:valid]`` chunk by chunk (fetched one chunk behind the device);
    ``out`` a host vector, or ``dtype -> vector``, called once with the dtype of the first values.
    ``too_many``: the ``ValueError`` raised (as :class:`OutRefused`) when the data hold more rows than
    ``out`` (default: a later pass that yielded more than the first).

    Returns the number of rows written and the sum of their values (in float64, chunk by chunk as they
    are fetched: a memmap ``out`` is not read back)."""
    start, total, prev = 0, 0.0, None
    for piece, valid in staged(source, chunk):
        values = step(piece, valid)
        if prev is not None:
            start, total = _store(out, start, total, *prev, too_many)
        elif callable(out):
            out = out(values.dtype)
        prev = (values, valid)
    return (start, total) if prev is None else _store(out, start, total, *prev, too_many)


class OutRefused(ValueError):
    """:func:`collect`'s ``out`` cannot take a chunk's values: more rows than it holds, or values beyond
    its dtype's range (raised mid-pass, on one process: see :func:`collect_shared`)."""


def _store(out: np.ndarray, start: int, total: float, values, valid: int, too_many=None) -> tuple[int, float]:
    if start + valid > out.shape[0]:  # a chunk source is checked as it is read (CheckedSource)
        raise OutRefused(
            too_many
            or f"the data yielded more than {out.shape[0]} examples on a later pass: it must repeat its data."
        )
    part = np.asarray(values)[:valid]
    if part.size and out.dtype.itemsize < part.dtype.itemsize:  # a float32 out of float64 scores
        peak = float(np.max(np.abs(part)))
        if peak > float(np.finfo(out.dtype).max):
            raise OutRefused(
                f"the scores reach {peak:.4g}, beyond the range of out's dtype {out.dtype}; pass an out of "
                f"dtype {part.dtype}."
            )
    out[start : start + valid] = part
    return start + valid, total + float(np.sum(part, dtype=np.float64))


def across_processes(x, combine):
    """``combine`` of the per-process values stacked in process order (the same on every process)."""
    if jax.process_count() == 1:
        return x
    return combine(jax.tree.map(jnp.asarray, multihost_utils.process_allgather(x)))


def global_vector(h: np.ndarray, n: int):
    """An ``(n,)`` vector: this process's block, or with several processes a global array of all blocks.

    One process: ``jax.device_put`` (one copy; ``jnp.asarray`` ran a compiled copy, two vectors more)."""
    if jax.process_count() == 1:
        return jax.device_put(h)
    from nlis_jax.distributed import DATA_AXIS, data_mesh

    sharding = NamedSharding(data_mesh(), PartitionSpec(DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, h, (n,))


#: How :func:`on_every_process` names a process whose ``out`` was refused to the others.
_OUT_CHECK = ("while checking their out", "before writing the scores")


def output_vector(out, n: int | None, dtype) -> np.ndarray:
    """``out`` checked, or a new host vector of ``dtype`` (the scores' dtype, float32 or wider).

    ``out`` must be a numpy array or memmap of shape ``(n,)`` (``ValueError``), writable (``ValueError``)
    and of a floating dtype of at least 32 bits (``TypeError``): an integer ``out`` would truncate every
    score to 0, and in half precision probabilities below ``6e-8`` round to 0 and squared norms above
    ``65504`` overflow. A float32 ``out`` for float64 scores is allowed (rounded once on the way in).
    ``n=None`` (a chunk source, whose length is known after its first pass) checks all but the length.
    """
    if out is None:
        return None if n is None else np.empty((n,), dtype)
    if not isinstance(out, np.ndarray) or (n is not None and out.shape != (n,)) or out.ndim != 1:
        n = "n" if n is None else n
        got = f"shape {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a writable numpy array (or memmap) of shape ({n},), got {got}.")
    if not out.flags.writeable:
        raise ValueError(
            "out must be a writable numpy array (or memmap), got a read-only one (open a memmap with "
            "mode='w+' or 'r+')."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating) or jnp.finfo(out.dtype).bits < 32:
        raise TypeError(
            f"out must have dtype float32 or float64 (the scores are {np.dtype(dtype).name}), got "
            f"{out.dtype}: an integer out truncates the scores to 0, and half precision loses small "
            "probabilities."
        )
    return out


# ------------------------------------------------------------------------------------------ jitted steps
STATIC = ("apply_fn", "num_nodes", "mode")


def _masked(piece, valid):
    """Leaves of the piece with padding rows zeroed (for the non-finite count)."""
    chunk = jax.tree.leaves(piece)[0].shape[0]
    keep = jnp.arange(chunk) < valid
    return [jnp.where(keep.reshape((chunk,) + (1,) * (a.ndim - 1)), a, 0) for a in jax.tree.leaves(piece)]


def _nonfinite(piece, valid):
    """The number of NaN/Inf values in the valid rows of a piece."""
    return sum(jnp.size(a) - jnp.count_nonzero(jnp.isfinite(a)) for a in _masked(piece, valid))


def _rows(apply_fn, params, piece, valid, num_nodes, mode):
    """The dual rows ``(chunk, k, p+1)`` of an ``(x, y)`` piece (:func:`nlis_jax._passes.chunk_rows`) and
    ``bad``: ``(2,)`` int32, the number of non-finite inputs in its valid rows and the number of its
    examples whose dual rows are NaN or Inf (padding rows are zero)."""
    xc, yc = piece
    model = flatten_model(apply_fn, params, xc)
    rows = chunk_rows(model, xc, yc, valid, num_nodes=num_nodes, mode=mode)
    rows_bad = count_bad_examples(rows)
    return rows, jnp.stack([_nonfinite(piece, valid).astype(jnp.int32), rows_bad.astype(jnp.int32)])


def _reduce(carry, rows, bad, args, kernel):
    """One step of a pass: ``kernel(carry, rows, *args)`` (:class:`nlis_jax._passes.Pass`)."""
    return kernel(carry, rows, *args)


def _checked(carry, rows, bad, args, kernel):
    """A step of the first pass: ``kernel(carry, rows)`` and the counts ``bad`` of :func:`_rows`."""
    inner, count = carry
    return kernel(inner, rows), count + bad.astype(count.dtype)


def _values(carry, rows, bad, args, kernel):
    """Per-example values ``kernel(rows, *args)`` of a piece; the carry sums them and the counts ``bad``
    of :func:`_rows`."""
    values = kernel(rows, *args)
    total, count = carry
    return values, (total + jnp.sum(values), count + bad.astype(count.dtype))


@functools.partial(traced.jit, static_argnames=("combine", "kernel", "blocked", *STATIC))
@highest_precision
def _fused_step(apply_fn, params, carry, piece, valid, args, *, combine, kernel, blocked, num_nodes, mode):
    """A step with a fixed rule: the dual rows and ``combine`` (:func:`_reduce`, :func:`_checked`,
    :func:`_values`) in one program per pass; ``blocked``: a block of rows at a time, each used while in
    cache (:func:`nlis_jax._passes.fold_blocks`), for a kernel that is a sum or a map over rows."""
    if not blocked:
        return combine(carry, *_rows(apply_fn, params, piece, valid, num_nodes, mode), args, kernel)
    xc, yc = piece
    inputs = _nonfinite(piece, valid)

    def body(c, rows, j):  # the inputs are counted with the first block
        first = jnp.where(j == 0, inputs, 0).astype(jnp.int32)
        bad = jnp.stack([first, count_bad_examples(rows).astype(jnp.int32)])
        out = combine(c, rows, bad, args, kernel)
        return (out[1], out[0]) if combine is _values else (out, None)

    model = flatten_model(apply_fn, params, xc)
    carry, values = fold_blocks(model, xc, yc, valid, body, carry, num_nodes=num_nodes, mode=mode)
    return (values, carry) if combine is _values else carry


@functools.partial(traced.jit, static_argnames=STATIC)
@highest_precision
def _rows_step(apply_fn, params, piece, valid, *, num_nodes, mode):
    """:func:`_rows` as a program of its own, shared by every pass (the adaptive rule)."""
    return _rows(apply_fn, params, piece, valid, num_nodes, mode)


@functools.partial(traced.jit, static_argnames=("combine", "kernel"))
@highest_precision
def _kernel_step(carry, rows, bad, args, *, combine, kernel):
    """``combine`` of the rows of :func:`_rows_step`: a small program per pass."""
    return combine(carry, rows, bad, args, kernel)


def _step(combine, apply_fn, params, carry, piece, valid, args=(), *, kernel, blocked=True, num_nodes, mode):
    """One step of a pass over the pieces: ``combine`` of the piece's dual rows.

    With the adaptive rule (``num_nodes=None``) the dual rows are a program of their own, compiled once
    per model and chunk shape and shared by every pass, and each pass adds only its small kernel: the
    adaptive rule's program compiles for seconds (benchmarks/README.md (e)), and a leverage pass takes up
    to four passes. A fixed rule compiles in a fraction of a second, so its rows and kernel stay one
    program per pass, which saves writing the rows out and reading them back (a fifth of the time of a
    cheap model's step); on a CPU the program takes them a cache-sized block at a time (``blocked``:
    :func:`nlis_jax._passes.fold_blocks`)."""
    if num_nodes is not None:
        kw = dict(combine=combine, kernel=kernel, blocked=blocked, num_nodes=num_nodes, mode=mode)
        return _fused_step(apply_fn, params, carry, piece, valid, args, **kw)
    rows, bad = _rows_step(apply_fn, params, piece, valid, num_nodes=num_nodes, mode=mode)
    return _kernel_step(carry, rows, bad, args, combine=combine, kernel=kernel)


_reduce_step = functools.partial(_step, _reduce)
_checked_step = functools.partial(_step, _checked)
_values_step = functools.partial(_step, _values)


# ------------------------------------------------------------------------------------------- leverage
def leverage_source(apply_fn, params, xs, ys, chunk_size: int) -> tuple[Source, int]:
    """The ``(x, y)`` chunk source of host data (shape checks first) and its chunk length; a user's chunk
    source is checked as it is read (:class:`CheckedSource`)."""

    def own():
        check_floating("params", params)
        check_finite("params", params)
        if callable(xs):
            if ys is not None:
                raise ValueError("with a chunk source, the responses travel in its chunks: pass ys=None.")
            out_shape = lambda x: check_output_shape(eval_example(apply_fn, params, x)).shape  # noqa: E731
            return CheckedSource(xs, out_shape=out_shape), None, 0
        host_ys = host_vector("ys", ys)
        return None, host_ys, check_host_arrays(apply_fn, params, xs, host_ys)

    checked, ys_, n = on_every_process(own)
    if checked is not None:
        return checked, chunk_size
    if ys_ is not None:  # the offset column f(0) − y: read slice by slice (a memmap too), only when wider
        # than the params' dtype; its counts exchanged under jax.distributed
        check_ys_fits(ys_, jnp.result_type(*jax.tree.leaves(params)), summed_over_processes())
    chunk = balanced_chunk(n, chunk_size)
    return array_source((xs, ys_), n, chunk), chunk


def first_pass(step, source, chunk, init, *, equal_blocks: bool = True):
    """The first fold with the non-finite check: ``(carry, n, n_local)``, summed over processes; with
    ``equal_blocks`` (the result a global array) the per-process counts checked (:func:`check_blocks`)."""
    counted = fold(lambda c, piece, valid: (step(c[0], piece, valid), c[1] + valid), (init, 0), source, chunk)
    carry, n_local = counted
    per_process = process_table([n_local, *map(int, carry[1])])
    stats = per_process.sum(0)
    if int(stats[0]) == 0:
        raise ValueError("the chunk source yielded no examples.")
    if equal_blocks:
        check_blocks(per_process[:, 0])
    raise_if_bad(stats, source)
    return carry, int(stats[0]), n_local


def process_table(row) -> np.ndarray:
    """``(processes, len(row))``: this process's integer ``row`` beside every other's, in process order."""
    local = jnp.asarray([row])
    return np.asarray(across_processes(local, lambda a: a.reshape(-1, local.shape[1])))


def check_blocks(counts) -> None:
    """``ValueError`` unless the per-process example ``counts`` (process order) can form one global
    array sharded in equal blocks (:func:`global_vector`): the same count everywhere, a multiple of each
    process's number of devices. Raised on every process, after the first pass, before any score."""
    counts = [int(c) for c in counts]
    devices = jax.local_device_count()
    if len(counts) > 1 and (len(set(counts)) > 1 or counts[0] % devices):
        raise ValueError(
            f"under jax.distributed every process must hold the same number of examples, a multiple of "
            f"its {devices} device(s) (the results are one global array sharded in equal blocks); got "
            f"{counts} examples per process. Split the rows with nlis_jax.distributed.process_rows."
        )


def raise_if_bad(stats, source: Source) -> None:
    """``ValueError`` for the counts ``(n, non-finite input values, examples with non-finite dual rows)``
    of a pass over ``source``: the inputs first (their NaN makes the rows NaN too), then the rows of finite
    inputs."""
    n, inputs, rows = map(int, stats)
    if inputs:  # counted on the device: float64 data without x64 are float32 there
        raise ValueError(nonfinite_inputs("xs or ys contains", inputs, _may_narrow(source)))
    if rows:
        raise ValueError(nonfinite_dual_rows(f"{rows} of {n}"))


def _may_narrow(source: Source) -> bool:
    """Whether the values of ``source`` may have been float64 cast to float32 on their way to the device:
    without jax_enable_x64, a user's chunk source (dtypes unknown here) or arrays with a float64 leaf
    (float32 data with a NaN was told about a cast and x64, which have nothing to do with it)."""
    if jax.config.jax_enable_x64:
        return False
    if not isinstance(source, ArraySource):
        return True
    return any(np.issubdtype(a.dtype, np.floating) and narrows(a) for a in jax.tree.leaves(source.tree))


def nonfinite_inputs(names: str, bad: int, narrowed: bool) -> str:
    """The message for ``bad`` NaN or Inf input values counted in the pass; ``narrowed``: counted in
    float32 where the data may be float64 (no jax_enable_x64), so finite values past 3.4e38 count too."""
    if narrowed:
        return (
            f"{names} {bad} value(s) that are NaN or Inf once cast to float32 (float64 data without "
            "jax_enable_x64: finite values beyond 3.4e38 become Inf); clean or rescale the input, or enable "
            "jax_enable_x64."
        )
    return f"{names} {bad} NaN or Inf value(s); clean the input first."


def host_chunks(apply_fn, params, source, chunk, *, num_nodes, mode, out=None) -> tuple[Chunks, dict]:
    """The chunks of host data (:mod:`nlis_jax._passes`): Python loops over the pieces of ``source``,
    one jitted step a piece. The dict gets the global and local example counts of the first pass."""
    kw = dict(num_nodes=num_nodes, mode=mode)
    dtype = routes.compute_dtype(jnp.result_type(*jax.tree.leaves(params)))
    counts = {}

    def first(pass_, init):
        step = functools.partial(
            _checked_step, apply_fn, params, kernel=pass_.step, blocked=pass_.blocked, **kw
        )
        zero = jnp.zeros((2,), jnp.int32)
        (carry, _), counts["n"], counts["n_local"] = first_pass(
            step, source, chunk, (init, zero), equal_blocks=out is None
        )
        return across_processes(carry, pass_.combine)

    def reduce(pass_, init, *args):
        if pass_ is ANY:  # the kind is concrete here: its own pass, combined across processes
            kind, M, colmax = args
            pass_, args = (TSQR, (colmax,)) if kind == routes.PASS_TSQR else (GRAM, (M, colmax))
        kernel = dict(kernel=pass_.step, blocked=pass_.blocked)
        step = functools.partial(_reduce_step, apply_fn, params, args=args, **kernel, **kw)
        return across_processes(fold(step, init, source, chunk), pass_.combine)

    def scores(kernel, *args):
        h = on_every_process(lambda: output_vector(out, counts["n_local"], dtype), *_OUT_CHECK)
        carry = (jnp.zeros((), dtype), jnp.zeros((2,), jnp.int32))
        step = functools.partial(_values_step, apply_fn, params, args=args, kernel=kernel, **kw)
        _, counts["sum"] = collect(lambda piece, valid: step(carry, piece, valid)[0], source, chunk, h)
        return h

    return Chunks(first, reduce, scores, routes.transform_stepwise), counts


def host_streaming_leverage(
    apply_fn, params, xs, ys, *, chunk_size, num_nodes, mode, rtol, route, out=None, check_gram=None
):
    """Streaming leverage of host data (see the module docstring): ``(h, rank, route, Σh)``, the sum over
    every process.

    ``h`` is the raw block leverage (in the compute dtype, :func:`nlis_jax.routes.compute_dtype`): a global
    jax array under ``jax.distributed``, ``out`` filled with this process's block when given, else a numpy
    vector (one process: the caller divides it in place and moves it to the device once).

    A chunk source must yield the same data in the same order on every pass. Each pass is checked to
    yield as many examples as the first, and each piece of ``chunk`` rows to carry the first pass's
    digest of 17 evenly spaced rows (:meth:`CheckedSource.check_piece`: chunks or rows in another
    order, changed values in those rows, on every route). Other values elsewhere are caught by
    :func:`check_leverage_sum` (``Σh`` against the rank) where the basis is orthonormal to working
    precision: route chosen automatically (``route=None``) and taken ``"gram"``, ``"gram2"`` or
    ``"shifted"``, or ``"stable"`` below float64 (refined by a CholeskyQR step); not on the float64
    ``"stable"`` route (ill-conditioned or rank-deficient input, whose basis is orthonormal only to
    ``eps·κ``, up to ``0.1`` per column at the rank tolerance) nor for a forced route. Route
    ``"shifted"`` that missed a dependent direction (``Σh`` one short of the rank) redoes the passes on
    route ``"stable"`` first, as on device arrays.

    Arrays with fewer dual rows than columns, in one process, are scored from their dual matrix
    (:func:`_wide_leverage`); otherwise ``check_gram()`` (when given) runs before the passes: the
    memory check of the Gram matrix.
    """
    source, chunk = leverage_source(apply_fn, params, xs, ys, chunk_size)
    dtype = routes.compute_dtype(jnp.result_type(*jax.tree.leaves(params)))
    # out checked before the passes (a chunk source's length is known after the first), on every process
    n = None if callable(xs) else jax.tree.leaves(xs)[0].shape[0]
    on_every_process(lambda: out is None or output_vector(out, n, dtype), *_OUT_CHECK)
    if isinstance(source, CheckedSource) and out is not None and jax.process_count() == 1:
        # the first pass stops at out's length (an endless source was read without end); under
        # jax.distributed the out of another length is named on every process after the pass, as before
        source.limit = (out.shape[0], more_rows_than_out(out))
    dim = sum(np.size(a) for a in jax.tree.leaves(params)) + 1
    rows = n * _outputs(apply_fn, params, xs) if n is not None and jax.process_count() == 1 else None
    if rows is not None and rows < dim:  # fewer dual rows than columns
        check_wide_fits((rows, dim), dtype, "host")
        kw = dict(num_nodes=num_nodes, mode=mode, rtol=rtol, route=route, out=out)
        return _wide_leverage(apply_fn, params, source, chunk, n, dtype, **kw)
    if check_gram is not None:
        check_gram()
    chunks, counts = host_chunks(apply_fn, params, source, chunk, num_nodes=num_nodes, mode=mode, out=out)

    def passes(taken):  # (h, transform, Σh over every process); rows checked in pass 1
        h, t, _ = leverage_passes(chunks, dim, dtype, jnp.asarray(rtol, dtype), taken)
        if not bool(jnp.all(jnp.isfinite(t.first)) & jnp.all(jnp.isfinite(t.second))):  # same everywhere
            raise ValueError(LINEAR_ALGEBRA_FAILED.format(count=f"all {counts['n']}"))
        check_rank(t.rank, route)  # before an out is divided by the sum
        return h, t, float(across_processes(jnp.asarray(counts["sum"]), lambda a: a.sum(0)))

    h, t, total = passes(route)
    if int(t.route) == routes.SHIFTED and not abs(total - int(t.rank)) <= routes.LOST_DIRECTION:
        # route "shifted" missed a dependent direction (float32: Σh one short of the rank), as on device
        # arrays: the passes again on the rank-revealing route
        h, t, total = passes("stable")
    if callable(xs) and route is None and (int(t.route) != routes.STABLE or bool(t.refine)):
        check_leverage_sum(total, t.rank)
    if out is not None or jax.process_count() == 1:  # a host vector, divided in place by the caller
        return h, t.rank, t.route, total
    return global_vector(h, counts["n"]), t.rank, t.route, total


#: ``(n·k, p+1)`` arrays the wide route of the streamed scores holds: XLA's buffer plan of
#: ``routes.row_leverage`` on a wide matrix holds 2.0–2.25 of them besides its argument (500 × 20,000,
#: 200 × 50,000, 1,000 × 4,000 in float64); host arrays are gathered on the host first.
WIDE_COPIES = {"device": 3, "host": 4}


def check_wide_fits(shape: tuple, dtype, where: str) -> None:
    """``MemoryError`` before any work when the dual matrix of ``shape`` that the streamed scores form for
    fewer rows than columns (:data:`WIDE_COPIES`, ``where`` ``"device"`` or ``"host"``) cannot be held."""
    hint = (
        "score a random projection instead: nj.projected_leverage_scores(key, apply_fn, params, xs, ys, "
        "dim=...) (ys=None for label-free scores), or use nj.streaming_norm_scores (no matrix)."
    )
    what = "the dual matrix F̃ (fewer rows than columns: formed instead of the larger Gram matrix)"
    check_fits_in_memory(what, shape, dtype, hint, WIDE_COPIES[where], "the wide route's workspace")


def _outputs(apply_fn, params, xs) -> int:
    """``k``, the model's outputs per example (its dual rows per example), from shapes alone."""
    return math.prod(check_output_shape(eval_example(apply_fn, params, example_spec(xs))).shape)


def _wide_leverage(apply_fn, params, source, chunk, n, dtype, *, num_nodes, mode, rtol, route, out):
    """:func:`host_streaming_leverage` of arrays with fewer dual rows than columns (``n·k < p + 1``), in
    one process: their dual matrix is smaller than its Gram matrix, so it is gathered in one pass (its
    non-finite inputs and rows counted, named as the first pass names them) and scored by the dense wide
    route (:func:`nlis_jax.routes.wide_basis`, ``O(n²p)``) instead of factorising the ``(p+1)²`` Gram
    matrix (``O(np² + p³)``: n = 500, p = 8,321 took 187–252 s on device arrays against 0.35 s now,
    ``benchmarks/README.md`` (a), "Wide matrices")."""
    rows, bad = None, np.zeros(2, np.int64)
    start = 0
    for piece, valid in staged(source, chunk):
        block, count = _rows_step(apply_fn, params, piece, valid, num_nodes=num_nodes, mode=mode)
        if rows is None:
            rows = np.empty((n, *block.shape[1:]), block.dtype)
        rows[start : start + valid] = np.asarray(block)[:valid]
        bad += np.asarray(count)
        start += valid
    raise_if_bad((n, *bad), source)
    lead = rows.shape[:-1]
    h, rank, taken = routes.row_leverage(jnp.asarray(rows.reshape(-1, rows.shape[-1])), rtol, lead, route)
    del rows
    if not bool(jnp.all(jnp.isfinite(h))):  # the rows were finite: the linear algebra failed
        raise ValueError(LINEAR_ALGEBRA_FAILED.format(count=f"all {n}"))
    check_rank(rank, route)
    h = np.array(h, dtype)  # a writable copy: the caller divides it in place
    total = float(np.sum(h, dtype=np.float64))
    if out is None:
        return h, rank, taken, total
    out[:] = h
    return out, rank, taken, total


def check_leverage_sum(total: float, rank) -> None:
    """``ValueError`` unless the raw leverage of a chunk source sums to its rank, to 1 %.

    ``Σh = ‖U‖_F² = tr(UᵀU) = rank`` for an orthonormal basis ``U = A M``; on the routes checked (see
    :func:`host_streaming_leverage`) ``UᵀU = I`` to ``eps·κ(G_eq)`` (``"gram"``: at most ``2e-12`` in
    float64, ``1e-4`` in float32, :func:`nlis_jax._precondition.one_step_ratio_min`) or to ``O(eps)``
    after a CholeskyQR step, and ``h`` is summed in float64,
    so consistent data stays orders of magnitude inside 1 %. The transform ``M`` comes from the Gram
    matrix of the first passes; rows that changed since make ``Σh`` differ by ``O(1)`` (``xs`` scaled on
    every pass gave ``Σh = 2.33·rank``), far outside it.
    """
    r = int(rank)
    if r > 0 and not abs(total - r) <= 0.01 * r:
        raise ValueError(
            f"the chunk source returned different data on different passes: the raw leverage scores sum to "
            f"{total:.6g} instead of the rank {r}. A chunk source must yield the same chunks each time it "
            "is called (each pass calls it again)."
        )


def host_norm_scores(apply_fn, params, xs, ys, *, chunk_size, num_nodes, mode, out=None):
    """Row-norm probabilities of the dual matrix of host data: one pass storing the norms ``‖F̃_i‖``
    (:func:`nlis_jax._passes.norm_rows`), then ``(‖F̃_i‖/t)² / Σ_j (‖F̃_j‖/t)²`` in place, ``t`` the largest
    (three passes over the ``(n,)`` vector: its largest, the sum, the update): squares of the norms
    themselves over- or underflowed."""
    source, chunk = leverage_source(apply_fn, params, xs, ys, chunk_size)
    dtype = routes.compute_dtype(jnp.result_type(*jax.tree.leaves(params)))
    kw = dict(args=(), kernel=norm_rows, num_nodes=num_nodes, mode=mode)
    step = functools.partial(_values_step, apply_fn, params, **kw)
    state = {"carry": (jnp.zeros((), dtype), jnp.zeros((2,), jnp.int32)), "n": 0, "scale": None}
    # an out narrower than the scores (float32 out, float64 model) stores the norms scaled by a power of
    # two from the first chunk (largest near 1): stored raw, norms of 1e-45 were zeros. Under
    # jax.distributed each process has its own scale, undone in float64 below
    on_every_process(lambda: output_vector(out, None, dtype), *_OUT_CHECK)  # all but its length, before
    # its dtype is read
    narrow = out is not None and np.dtype(out.dtype).itemsize < np.dtype(dtype).itemsize

    def one(piece, valid):
        norms, state["carry"] = step(state["carry"], piece, valid)
        state["n"] += valid
        if narrow:
            if state["scale"] is None and valid:
                peak = float(np.max(np.asarray(norms)[:valid]))
                # 2^-e a normal number (2^-1024 for norms from 2^1023 on was flushed: "all zeros")
                info = np.finfo(norms.dtype)
                e = int(np.clip(np.frexp(peak)[1], 1 - info.maxexp, -info.minexp))
                state["scale"] = 2.0**-e if np.isfinite(peak) and peak > 0 else None
            if state["scale"] is not None:
                norms = norms * jnp.asarray(state["scale"], norms.dtype)
        return norms

    vec = per_example_values(one, source, chunk, xs, out, dtype)
    _, bad = state["carry"]
    per_process = process_table([state["n"], *map(int, bad)])
    stats = per_process.sum(0)
    raise_if_bad(stats, source)
    if out is None:
        check_blocks(per_process[:, 0])
    spans = vector_spans(vec.shape[0], chunk)
    unit = np.float64(state["scale"] or 1.0)  # this process's own scale (of its first chunk) undone
    local_top = max((float(np.max(vec[a:b]) / unit) for a, b in spans), default=0.0)
    top = float(across_processes(jnp.asarray(local_top), lambda a: a.max(0)))
    if not np.isfinite(top):
        fix = "pass an out of dtype float64" if narrow else "rescale the data"
        raise ValueError(
            f"norm scores: row norms of the dual matrix beyond the range of {vec.dtype} (the dtype of "
            f"{'out' if out is not None else 'the scores'}); {fix}."
        )
    check_positive(top, STREAMED_ZERO_NORMS)
    top = unit * np.float64(top)  # in this process's scale
    local_total = sum(float(np.sum(np.square(vec[a:b] / top))) for a, b in spans)
    total = float(across_processes(jnp.asarray(local_total), lambda a: a.sum(0)))
    for a, b in spans:
        vec[a:b] = (np.square(vec[a:b] / top) / total).astype(vec.dtype)
    return vec if out is not None else global_vector(vec, int(stats[0]))


def per_example_values(step, source: Source, chunk: int, xs, out, dtype) -> np.ndarray:
    """The ``(n,)`` values of ``step`` over the pieces, in ``out`` (checked) or a new host vector (of
    ``dtype``; ``None``: of the values' own dtype, allocated when the first chunk's values arrive)."""
    n = None if callable(xs) else jax.tree.leaves(xs)[0].shape[0]  # a chunk source's: after the pass
    wanted = out is not None or (dtype is not None and n is not None)
    # checked on every process (an out of another length on one raised there alone), all but a chunk
    # source's length before the pass
    target = on_every_process(lambda: output_vector(out, n, dtype) if wanted else None, *_OUT_CHECK)
    if callable(xs):
        if target is None:
            return _collect_growing(step, source, chunk)
        return _collect_counted(step, source, chunk, target)
    if target is not None:
        collect_shared(step, source, chunk, target)
        return target
    made = []
    collect(step, source, chunk, lambda values_dtype: made.append(np.empty((n,), values_dtype)) or made[0])
    return made[0] if made else _no_values()


def collect_shared(step, source, chunk: int, out: np.ndarray, too_many: str | None = None, rows=None) -> None:
    """:func:`collect` into ``out``, its refusals (:class:`OutRefused`: more rows than ``out`` holds, values
    beyond its dtype) and, with ``rows``, a count other than ``len(out)`` (``rows(count)`` the error)
    raised on every process under ``jax.distributed`` (:func:`raise_if_any_failed`): one process raising
    mid-pass alone left the others waiting in the exchange at the end of ``staged``'s pass, which this
    exchange meets."""
    failed = []
    try:
        count, _ = collect(step, source, chunk, out, too_many)
        if rows is not None and count != out.shape[0]:
            failed.append(rows(count))
    except OutRefused as exc:
        failed.append(exc)
    raise_if_any_failed(failed, "writing their out")


def _collect_counted(step, source, chunk: int, out: np.ndarray) -> np.ndarray:
    """:func:`collect` of a chunk source (length unknown) straight into ``out``, whose length must be the
    number of rows: more rows stop the pass at once (an endless source too), fewer are named after it."""
    more = more_rows_than_out(out)
    shape = "out must be a writable numpy array (or memmap) of shape"

    def fewer(count):
        return ValueError(f"{shape} ({count},), got shape {out.shape}.")

    collect_shared(step, source, chunk, out, more, fewer)
    return out


def more_rows_than_out(out: np.ndarray) -> str:
    """The refusal of a chunk source that yields more rows than ``out`` holds (an endless one too)."""
    return (
        "out must be a writable numpy array (or memmap) of shape (n,), n the chunk source's examples: it "
        f"yielded more than {out.shape[0]}."
    )


def _collect_growing(step, source, chunk) -> np.ndarray:
    """:func:`collect` for a chunk source of unknown length: each piece's values fetched to the host one
    chunk behind the device (at most two steps in flight: the source is read as the device goes, not
    ahead of it), then concatenated."""
    parts, prev = [], None
    for piece, valid in staged(source, chunk):
        values = step(piece, valid)
        if prev is not None:
            parts.append(np.asarray(prev[0])[: prev[1]])
        prev = (values, valid)
    if prev is not None:
        parts.append(np.asarray(prev[0])[: prev[1]])
    if not parts:
        if jax.process_count() == 1:  # several: the exchange of rows after the pass names the empty source
            raise ValueError("the chunk source yielded no examples.")
        return _no_values()
    return np.concatenate(parts)


def _no_values() -> np.ndarray:
    """The values of a process whose block or chunk source held no rows (under ``jax.distributed`` only:
    the exchange of rows after the pass names it on every process)."""
    return np.empty(0, jax.dtypes.canonicalize_dtype(jnp.float64))


def vector_spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """``(start, stop)`` slices of an ``(n,)`` host vector of scores, at least ``2^16`` long: it is read and
    written slice by slice, so a memmap is never read whole into anonymous memory."""
    step = max(chunk, 1 << 16)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def divide_in_place(vec: np.ndarray, total, chunk: int) -> None:
    """``vec /= total`` slice by slice (:func:`vector_spans`)."""
    for a, b in vector_spans(vec.shape[0], chunk):
        vec[a:b] = vec[a:b] / np.asarray(total, vec.dtype)


# --------------------------------------------------------------------------------------------- losses
@functools.partial(traced.jit, static_argnums=(0, 1, 2))
def _loss_step(losses_fn, apply_fn, loss_fn, params, carry, piece, valid):
    """Per-example losses of a piece ``(x, y, w)`` (padding rows 0), the weighted sum and bad count."""
    xc, yc, wc = piece
    losses = losses_fn(apply_fn, loss_fn, params, xc, yc)
    losses = jnp.where(jnp.arange(losses.shape[0]) < valid, losses, 0)
    total, count, negative, nonfinite = carry
    acc = at_least_float32(losses.dtype)  # w·ℓ of a half-precision model in float32, as on the device
    weighted = losses.astype(acc) if wc is None else wc.astype(acc) * losses.astype(acc)
    bad = sum(jnp.size(a) - jnp.count_nonzero(jnp.isfinite(a)) for a in _masked(piece, valid))
    neg = 0 if wc is None else count_negative(jnp.where(jnp.arange(wc.shape[0]) < valid, wc, 0))
    lost = losses.size - jnp.count_nonzero(jnp.isfinite(losses))
    return losses, (  # the counts in the carry's int32 (int64 counts under x64, strict promotion)
        total + jnp.sum(weighted).astype(total.dtype),
        count + jnp.asarray(bad).astype(count.dtype),
        negative + jnp.asarray(neg).astype(negative.dtype),
        nonfinite + jnp.asarray(lost).astype(nonfinite.dtype),
    )


def overflowed_sum(dtype) -> str:
    """The message for a weighted loss ``Σ w_i ℓ_i`` past the range of its ``dtype`` (a float16 model)
    although every loss is finite: formed in float32, it is Inf once rounded to the model's dtype."""
    top = float(jnp.finfo(dtype).max)
    return (
        f"the weighted loss Σ w_i ℓ_i exceeds the range of the losses' dtype {jnp.dtype(dtype).name} "
        f"(largest {top:.5g}) although every loss is finite: compute it with float32 params (or rescale the "
        "weights; fit normalises by Σ w and keeps its sums in float32)."
    )


def nonfinite_losses(bad: int, n: int, losses=None) -> str:
    """The message for ``bad`` of ``n`` per-example losses that are NaN or Inf although the inputs are
    finite (device and host paths of :func:`nlis_jax.weighted_loss` and :func:`nlis_jax.per_example_loss`);
    with the ``(n,)`` ``losses`` on the host it names the first examples."""
    if losses is None:
        which = "; per_example_loss names them"
    else:
        first = np.flatnonzero(~np.isfinite(np.asarray(losses)))[:5].tolist()
        which = f"; the first: {first}"
    return (
        f"{bad} of {n} examples give a NaN or Inf loss although xs, ys and params are finite: apply_fn or "
        "the loss is undefined or overflows there (e.g. the log of a negative number, exp of a large one)"
        + which
        + "."
    )


#: The error of a loss without responses (``ys=None`` is for a chunk source of ``(x, y)`` pairs only).
LOSSES_NEED_YS = "the losses need ys (or a chunk source of (x, y) pairs)."


def loss_source(apply_fn, params, xs, ys, weights, chunk_size: int, check_labels=None) -> tuple[Source, int]:
    """The ``(x, y, w)`` chunk source of host data for the losses (shape checks first).

    ``check_labels(x_example, y_dtype, read_range, where)``, if given, checks the range of the labels,
    which ``read_range()`` returns where their loss and dtype need it (:func:`label_range`): of all of
    ``ys`` before any work, or of each chunk of a chunk source as it arrives (``where`` names the chunk).
    ``x_example`` is one example as ``jax.ShapeDtypeStruct``.
    """

    def own():
        check_floating("params", params)
        check_finite("params", params)
        if callable(xs):
            if ys is not None or weights is not None:
                raise ValueError(
                    "with a chunk source, ys travel in its chunks: pass ys=None and weights=None."
                )
            source = CheckedSource(xs, need_y=True, on_chunk=_chunk_labels(check_labels), triples=True)
            return source, None, None, 0
        host_ys, host_w = host_vector("ys", ys), host_vector("weights", weights)
        if host_ys is None:
            raise ValueError(LOSSES_NEED_YS)
        if host_w is not None and not (
            np.issubdtype(host_w.dtype, np.floating) or host_w.dtype.kind in "iub"
        ):
            raise TypeError(f"weights must be real numbers, got dtype {host_w.dtype}.")
        return (
            None,
            host_ys,
            host_w,
            check_host_arrays(apply_fn, params, xs, host_ys, host_w, out_check=False),
        )

    checked, ys, weights, n = on_every_process(own)
    if checked is not None:
        return checked, chunk_size
    check_weights_not_all_subnormal("weights", weights, summed_over_processes())
    if check_labels is not None:
        read = lambda: label_range(ys, chunk_size)  # noqa: E731
        if jax.process_count() > 1:  # the exchange on every process, whatever its ys' dtype asks for
            found = _global_range(read())
            read = lambda: found  # noqa: E731
        check_labels(example_spec(xs), ys.dtype, read, "")
    chunk = balanced_chunk(n, chunk_size)
    return array_source((xs, ys, weights), n, chunk), chunk


#: The losses' dtypes a process may report, as codes exchanged under ``jax.distributed``.
LOSS_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _result_dtype(mine) -> np.dtype:
    """The weighted loss's dtype: its losses' (``mine``); under ``jax.distributed`` every process's
    promoted, so that a process whose chunk source yielded nothing (``None``) returns the same dtype."""
    if jax.process_count() == 1:
        return np.dtype(mine)
    code = -1 if mine is None else LOSS_DTYPES.index(np.dtype(mine).name)
    found = [LOSS_DTYPES[c] for c in process_table([code])[:, 0] if c >= 0]
    return np.dtype(jnp.result_type(*found))


def example_spec(x):
    """One example of a pytree of arrays (examples first), as ``jax.ShapeDtypeStruct`` leaves."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)


def label_range(ys, chunk: int) -> tuple[float | int, float | int] | None:
    """``(min, max)`` of a host vector, read slice by slice (a memmap is never read whole), as Python
    numbers (ints for integer ``ys``: ``2^53 + 1`` is not rounded); ``(inf, -inf)`` when it is empty,
    ``None`` when it holds a NaN or Inf (which the pass over the data reports)."""
    step = max(chunk, 1 << 16)
    low, high = np.inf, -np.inf
    for start in range(0, ys.shape[0], step):
        part = np.asarray(ys[start : start + step])
        if part.size == 0:
            continue
        if not np.all(np.isfinite(part)):
            return None
        low, high = min(low, part.min().item()), max(high, part.max().item())
    return low, high


def _global_range(found: tuple[float | int, float | int] | None) -> tuple[float, float] | None:
    """This process's :func:`label_range` as all processes' (``jax.distributed``): ``None`` where any block
    holds a NaN or Inf (which the pass reports on every process); an empty block's ``(inf, -inf)`` adds
    nothing (it turned the check off on every process)."""
    if jax.process_count() == 1:
        return found
    if found is None:
        mine = np.array([np.nan, np.nan])
    else:  # rounded outward: an integer 2^53 + 1 became 2^53, within the squared loss's exact range
        low, high = found  # Python floats and ints compare exactly (numpy's float64 would not)
        down, up = float(low), float(high)
        down = down if down <= low else float(np.nextafter(down, -np.inf))
        up = up if up >= high else float(np.nextafter(up, np.inf))
        mine = np.array([down, up])
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)  # host values: no flush
    return None if np.isnan(every).any() else (float(every[:, 0].min()), float(every[:, 1].max()))


def _chunk_labels(check_labels):
    """``on_chunk`` of a :class:`CheckedSource`: the label range of each chunk, or ``None`` (no check)."""
    if check_labels is None:
        return None

    def on_chunk(index, x, y):
        read = lambda: label_range(np.asarray(y), y.shape[0])  # noqa: E731
        check_labels(example_spec(x), y.dtype, read, f" (in chunk {index} of the chunk source)")

    return on_chunk


def host_losses(
    losses_fn,
    apply_fn,
    loss_fn,
    params,
    xs,
    ys,
    weights,
    *,
    chunk_size,
    per_example,
    check_labels=None,
):
    """Full-data loss of host data, chunk by chunk: the weighted sum, or the ``(n,)`` per-example losses.

    ``losses_fn(apply_fn, loss_fn, params, x, y)`` gives the per-example losses of one chunk (traced);
    ``apply_fn`` and ``loss_fn`` are hashable (static). ``check_labels``: see :func:`loss_source`.
    """
    source, chunk = loss_source(apply_fn, params, xs, ys, weights, chunk_size, check_labels)
    step = functools.partial(_loss_step, losses_fn, apply_fn, loss_fn, params)
    data_dtypes = (
        [] if callable(xs) else [a.dtype for a in jax.tree.leaves((xs, ys, weights)) if hasattr(a, "dtype")]
    )
    param_dtypes = [jnp.result_type(leaf) for leaf in jax.tree.leaves(params)]

    def start(dtypes):  # the carry in the sum's dtype (no retrace after the first chunk); data dtypes
        # canonical first (float64 data without x64 counts as float32, without jax's truncation warning)
        low = at_least_float32(promoted(*param_dtypes, *(jax.dtypes.canonicalize_dtype(d) for d in dtypes)))
        zero = jnp.zeros((), jnp.int32)
        return jnp.zeros((), low), zero, zero, zero

    # a chunk source's data dtypes are its first chunk's (float64 data and float32 params sum in float64)
    state = {"carry": None if callable(xs) else start(data_dtypes), "rows": 0}

    def one(piece, valid):  # the running total in at least float32 (a float16 sum drifts over chunks)
        if state["carry"] is None:
            state["carry"] = start([a.dtype for a in jax.tree.leaves(piece)])
        losses, state["carry"] = step(state["carry"], piece, valid)
        state["dtype"] = losses.dtype
        state["rows"] += valid
        return losses

    if per_example:  # in the losses' own dtype, as on the device (the model output's, not the params')
        values = per_example_values(one, source, chunk, xs, None, None)
    else:  # at most two steps in flight, as fold paces them: the source is read as the device goes

        def add(_, piece, valid):
            one(piece, valid)
            return state["carry"]

        fold(add, None, source, chunk)
    n = int(across_processes(jnp.asarray(state["rows"]), lambda a: a.sum(0)))  # all processes' examples
    if not n:
        raise ValueError("the chunk source yielded no examples.")  # as per_example_values says
    carry = state["carry"] or start([])  # a process whose source yielded nothing: the params' dtype
    # exchanged in one dtype on every process (a chunk source's first chunk sets each process's own)
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)
    total, bad, negative, nonfinite = (
        across_processes(c, lambda a: a.sum(0)) for c in (carry[0].astype(wide), *carry[1:])
    )
    dtype = _result_dtype(state.get("dtype"))  # all processes' losses in one dtype
    total = total.astype(dtype)
    bad, negative, nonfinite = (int(c) for c in fetch(bad, negative, nonfinite))  # one read back
    if bad:  # counted after the cast: float64 data without x64 as float32
        narrowed = (callable(xs) or np.float64 in data_dtypes) and not jax.config.jax_enable_x64
        raise ValueError(nonfinite_inputs("xs, ys or weights contain", bad, narrowed))
    if negative:
        raise ValueError(f"weights must be non-negative; {negative} are negative.")
    if nonfinite:
        raise ValueError(nonfinite_losses(nonfinite, n, values if per_example else None))
    if not per_example and not bool(jnp.isfinite(total)):  # finite losses, a sum past float16's range
        raise ValueError(overflowed_sum(total.dtype))
    if not per_example:
        return total
    counts = process_table([values.shape[0]])[:, 0]
    check_blocks(counts)
    return global_vector(values.astype(dtype, copy=False), int(counts.sum()))


# ------------------------------------------------------------------------------------------- sampling
@traced.entry
def gather_rows(store, indices):
    """Rows ``indices`` of host data (numpy arrays or memmaps, or a pytree of them), as numpy arrays.

    The rows are read in increasing order (a memmap reads only the pages they lie on) and returned in
    the order of ``indices`` (repeats included): the sampled rows of :func:`nlis_jax.sample`, e.g.
    ``xs_s, ys_s = nj.gather_rows((xs, ys), indices)``.

    Args:
      store: a numpy array, ``numpy.memmap`` or pytree of them, examples first.
      indices: ``(s,)`` integer row indices (numpy or jax).

    Returns:
      The same pytree of ``(s, ...)`` numpy arrays.
    """
    if not is_concrete(indices):  # is_fully_addressable raised jax's ConcretizationTypeError
        raise TypeError(
            "gather_rows reads rows of host data (numpy arrays, memmaps) and cannot run under jax.jit, "
            "vmap or grad: call it outside the transformation with concrete indices, or index a jax array "
            "of the data there (xs[indices])."
        )
    if isinstance(indices, jax.Array) and not indices.is_fully_addressable:
        raise ValueError(
            "indices is a global array of jax.distributed (the rows of every process's block), but store "
            "holds this process's rows only: keep this process's indices, rows = "
            "nlis_jax.distributed.process_rows(n), local = idx[(idx >= rows.start) & (idx < rows.stop)] - "
            "rows.start, with idx = nlis_jax.distributed.gather(indices); or index a global array of the "
            "data and gather that."
        )
    idx = np.asarray(indices)
    if idx.size == 0 and not hasattr(indices, "dtype"):  # [] is float64 for numpy
        idx = idx.astype(np.intp)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer vector, got shape {idx.shape}, dtype {idx.dtype}.")
    leaves = jax.tree.leaves(store)
    if not leaves or not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in leaves):
        raise TypeError("store must hold numpy arrays or memmaps (examples first).")
    n = leaves[0].shape[0]
    if any(a.shape[0] != n for a in leaves):
        shapes = [a.shape for a in leaves]
        raise ValueError(
            f"every array of store must have the same number of rows (examples first): {shapes}."
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(
            f"indices out of range [0, {n}) (the rows of store): got values in [{idx.min()}, {idx.max()}]."
        )
    order = np.argsort(idx, kind="stable")
    ordered = idx[order]

    def one(a):
        rows = a[ordered]
        result = np.empty_like(rows)
        result[order] = rows
        return result

    return jax.tree.map(one, store)
