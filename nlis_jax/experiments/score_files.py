"""``nlis-jax score``: sampling scores of a user's own ``.npy`` files, out of core.

The inputs are opened as memmaps (``np.load(path, mmap_mode="r")``) and the ``(n,)`` scores are written to
a ``.npy`` memmap, so neither the data nor the scores need to fit in memory; chunks travel to the device
one at a time (:func:`nlis_jax.streaming_leverage_scores` on host data). The model is a single-index model
``tanh(<θ, x>)`` or a tanh MLP, at parameters read from an ``.npz`` file (``--params``: ``theta`` for the
single-index model; ``w0, b0, w1, b1, ...`` for the MLP, ``w`` of shape ``(out, in)``) or, without it,
drawn from ``--seed`` (a label-free pilot: the scores then describe the data and the model family).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import secrets
import stat
import sys
import time
import tokenize
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from nlis_jax.experiments.checks import positive_int_arg, seed_arg

EXIT_USAGE = 2
MODELS = ("single-index", "mlp")
METHODS = ("leverage", "norm")
#: ``--hidden`` and ``--seed`` without the option (``None`` there means "not given").
HIDDEN = 32
SEED = 0
#: How reading a damaged ``.npy`` or ``.npz`` fails inside ``np.load`` and ``NpzFile``: numpy's header
#: checks (``ValueError``; ``tokenize.TokenError`` and ``SyntaxError`` from its Python-2 header fallback;
#: ``EOFError``), the memmap (``ValueError``, ``OSError``), ``zipfile`` (``BadZipFile``, a bad CRC-32 among
#: them; ``NotImplementedError`` for a flipped version, compression or flag field; ``RuntimeError`` for a
#: flipped "encrypted" flag), ``zlib.error`` in a compressed member, ``UnicodeError`` in a header.
READ_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    tokenize.TokenError,
    SyntaxError,
    UnicodeError,
    NotImplementedError,
    RuntimeError,
)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--x", required=True, help="inputs, an (n, d) .npy file (opened as a memmap)")
    parser.add_argument(
        "--y",
        default=None,
        help="responses, an (n,) .npy file (optional; integer responses are scored as floats)",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="single-index",
        help="single-index tanh(<θ, x>) or a tanh MLP with one hidden layer (default single-index)",
    )
    parser.add_argument(
        "--hidden",
        type=_positive_int,
        default=None,
        help=f"MLP hidden width (default {HIDDEN}; not with --params)",
    )
    parser.add_argument("--params", default=None, help=".npz of the model's parameters (default: --seed)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="leverage",
        help="leverage or row-norm scores of the dual matrix (default leverage)",
    )
    parser.add_argument(
        "--chunk-size",
        type=positive_int_arg,
        default=None,
        help="rows per chunk (default 4096 on a CPU, up to 65536 on a GPU or TPU)",
    )
    parser.add_argument(
        "--seed",
        type=seed_arg,
        default=None,
        help=f"seed of the drawn parameters (default {SEED}; not with --params)",
    )
    parser.add_argument("--out", required=True, help="the (n,) scores, written as a .npy memmap")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _stored_params(path: str | None, model: str, d: int) -> dict | None:
    """The arrays of ``--params`` (``None`` without it); ``ValueError`` naming the file and the keys it
    must hold when it cannot be read, lacks them, holds others, holds non-real arrays, or (single-index)
    a ``theta`` other than a vector of ``d`` numbers."""
    if path is None:
        return None
    need = "theta" if model == "single-index" else "w0, b0, w1, b1, ..."
    try:
        # np.load(path) leaves its file open when the zip cannot be read (a truncated .npz): our own
        # handle is closed whatever happens
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
            f.seek(0)
            stored = np.load(f) if _numpy_header(head) else None
            if isinstance(stored, np.lib.npyio.NpzFile):
                with stored:
                    arrays = dict(stored)  # reads each member: a bad CRC-32, a damaged member's header
    except READ_ERRORS as exc:
        raise ValueError(f"cannot read --params {path} as an .npz of arrays ({need}): {_why(exc)}") from None
    if stored is None:
        what = "is empty" if not head else "is not an .npz archive (no zip header)"
        raise ValueError(
            f"--params {path} {what}: save the parameters with np.savez(path, ...) under the keys {need}."
        )
    if not isinstance(stored, np.lib.npyio.NpzFile):
        raise ValueError(
            f"--params {path} is one array, not an .npz archive: save the parameters with "
            f"np.savez(path, ...) under the keys {need}."
        )
    keys = ["theta"] if model == "single-index" else [f"{k}{i}" for i in range(_layers(arrays)) for k in "wb"]
    missing = [k for k in keys if k not in arrays] if keys else ["w0", "b0"]
    unexpected = sorted(set(arrays) - set(keys))
    if missing or unexpected:
        problems = [f"missing {missing}"] if missing else []
        problems += [f"unexpected {unexpected}"] if unexpected else []
        raise ValueError(
            f"--params {path} holds {sorted(arrays)} but the {model} model needs {need}; "
            f"{', '.join(problems)}."
        )
    for key in keys:
        kind = arrays[key].dtype
        if not (np.issubdtype(kind, np.floating) or np.issubdtype(kind, np.integer)):
            raise ValueError(f"--params {path}: {key} has dtype {kind}; the parameters must be real numbers.")
    if model == "single-index" and arrays["theta"].shape != (d,):
        raise ValueError(
            f"--params {path}: theta has shape {arrays['theta'].shape}, but --x has d = {d} columns: "
            f"theta must have shape ({d},)."
        )
    return arrays


def _why(exc: BaseException) -> str:
    """Why ``np.load`` could not read a file, for a message: a missing file or a folder, Python objects
    (numpy's refusal names ``allow_pickle=``, an option of the library call), or else a damaged file."""
    text = str(exc) or "no details"
    if isinstance(exc, OSError):
        return exc.strerror or text
    if "allow_pickle" in text:
        return "it holds Python objects (dtype object), not numbers: save numeric arrays."
    return f"the file is corrupt or truncated ({type(exc).__name__}: {text})"


def _cast(path: str, key: str, array: np.ndarray, dtype) -> np.ndarray:
    """``array`` of ``--params path`` in the scoring ``dtype``; ``ValueError`` naming the file, the key
    and the dtype when finite values overflow it (a float64 ``1e39`` became ``inf`` in float32, then the
    library reported NaN or Inf values the file does not hold)."""
    array = np.asarray(array)
    with np.errstate(over="ignore"):
        cast = array.astype(dtype)
    over = np.isinf(cast) & np.isfinite(array)
    if np.any(over):
        name, largest = np.dtype(dtype).name, np.max(np.abs(array[over]))
        raise ValueError(
            f"--params {path}: {key} holds {int(over.sum())} value(s) beyond the range of {name}, the dtype "
            f"--x is scored in (largest magnitude {largest:.4g}; {name} holds up to "
            f"{np.finfo(dtype).max:.4g}): rescale the parameters, or save --x in float64."
        )
    return cast


def _layers(arrays: dict) -> int:
    """The number of layers of an MLP's arrays: the keys ``w0``, ``w1``, ... (``w`` and digits)."""
    return len([k for k in arrays if k[:1] == "w" and k[1:].isdigit()])


@functools.cache
def _model(name: str):
    """The model ``name`` (``"single-index"`` or ``"mlp"``), built once per process: it is a static argument
    of the library's programs, so a new function every run (``cli.main`` called in a loop) compiled them
    all again and jax's caches kept every copy."""
    import jax.numpy as jnp

    from nlis_jax.experiments import nets

    return nets.single_index(jnp.tanh) if name == "single-index" else nets.mlp(jnp.tanh)


def model_and_params(args, d: int, dtype):
    """``(apply_fn, params)`` of the chosen model, from ``--params`` or drawn from ``--seed``."""
    import jax
    import jax.numpy as jnp

    from nlis_jax.experiments import nets

    seed = SEED if args.seed is None else args.seed
    stored = _stored_params(args.params, args.model, d)
    if args.model == "single-index":
        apply_fn = _model(args.model)
        if stored is not None:
            return apply_fn, jnp.asarray(_cast(args.params, "theta", stored["theta"], dtype))
        # drawn in float32 whatever the file's dtype: the same --seed, the same model
        theta = jax.random.normal(jax.random.key(seed), (d,), jnp.float32) / np.sqrt(d)
        return apply_fn, theta.astype(dtype)
    apply_fn = _model(args.model)
    if stored is not None:
        params = [
            {k: jnp.asarray(_cast(args.params, f"{k}{i}", stored[f"{k}{i}"], dtype)) for k in "wb"}
            for i in range(_layers(stored))
        ]
        return apply_fn, params
    hidden = HIDDEN if args.hidden is None else args.hidden
    params = nets.mlp_init(jax.random.key(seed), (d, hidden, 1), dtype=jnp.float32)
    params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)  # non-zero biases
    return apply_fn, jax.tree.map(lambda a: a.astype(dtype), params)  # float32 draws: --seed's model


def run_score(args: argparse.Namespace) -> int:
    """Score the files; prints a one-line JSON summary. Exit 2 on a bad file."""
    import jax

    import nlis_jax as nj

    problem = _unused_option(args) or _bad_out(args.out)
    if problem:
        print(f"nlis-jax score: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        xs = _load_array("--x", args.x)
        ys = None if args.y is None else _load_array("--y", args.y)
    except (OSError, ValueError) as exc:
        print(f"nlis-jax score: error: cannot read the data: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if xs.ndim != 2 or not np.issubdtype(xs.dtype, np.floating) or xs.shape[1] == 0:
        print(
            f"nlis-jax score: error: --x must be an (n, d) float array with d >= 1, got {xs.shape} "
            f"{xs.dtype}.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    given = (("--x", args.x), ("--y", args.y), ("--params", args.params))
    inputs = [name for name, path in given if _same_file(path, args.out)]
    if inputs:
        print(f"nlis-jax score: error: --out {args.out} is the file of {inputs[0]}.", file=sys.stderr)
        return EXIT_USAGE
    if xs.dtype == np.float64:  # the file's precision: scores in float64 too
        jax.config.update("jax_enable_x64", True)
    dtype = np.promote_types(xs.dtype, np.float32)  # half-precision files are scored in float32
    if ys is not None and np.issubdtype(ys.dtype, np.integer):  # counts, classes: the library takes floats
        ys = ys.astype(dtype)  # an (n,) vector in memory, as the scores
    start = time.perf_counter()
    try:
        apply_fn, params = model_and_params(args, xs.shape[1], dtype)
        with _written_on_success(args.out, dtype, xs.shape[0]) as out:
            kwargs = dict(chunk_size=args.chunk_size, out=out)
            if args.method == "norm":  # the adaptive rule, as the leverage scores
                nj.streaming_norm_scores(apply_fn, params, xs, ys, **kwargs)
                rank = None
            else:
                info = nj.streaming_leverage_scores(apply_fn, params, xs, ys, return_info=True, **kwargs)
                rank = int(info.rank)
    except (OSError, ValueError, TypeError) as exc:
        print(f"nlis-jax score: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as exc:  # the library's message names library calls; the CLI's options instead
        print(f"nlis-jax score: error: {_memory_message(args, exc)}", file=sys.stderr)
        return EXIT_USAGE
    except jax.errors.JaxRuntimeError as exc:  # an allocation XLA refused (a traceback before)
        if "RESOURCE_EXHAUSTED" not in str(exc):
            raise
        print(f"nlis-jax score: error: {_memory_message(args, MemoryError())}", file=sys.stderr)
        return EXIT_USAGE
    seconds = time.perf_counter() - start
    summary = {"n": int(xs.shape[0]), "d": int(xs.shape[1]), "model": args.model, "method": args.method}
    summary.update(
        rank=rank, seconds=round(seconds, 3), rows_per_s=round(xs.shape[0] / seconds), out=args.out
    )
    print(json.dumps(summary))
    return 0


def _unused_option(args: argparse.Namespace) -> str | None:
    """Why an option the user gave does not apply (``None`` when all do): ``--hidden`` of a single-index
    model, ``--hidden`` and ``--seed`` beside ``--params`` (the file gives the widths and the values)."""
    if args.hidden is not None and args.model != "mlp":
        return f"--hidden does not apply to --model {args.model}."
    for name in ("hidden", "seed"):
        if getattr(args, name) is not None and args.params is not None:
            return f"--{name} does not apply with --params (the file holds the parameters)."
    return None


def _bad_out(out: str) -> str | None:
    """Why ``--out`` cannot name the scores' file, checked before any work (``None`` when it can): an
    empty name (the temporary file went to the parent of the working folder), a name ending in a path
    separator or naming a folder, a folder that does not exist. These failed after the whole scoring,
    naming the hidden temporary file. A device, pipe or socket is refused (the finished file replaced
    it: ``--out /dev/null`` as root replaced the system's ``/dev/null``); a symbolic link names the file
    it points to, which is written (the link was replaced by a file)."""
    if not out:
        return "--out is empty: name the .npy file of the scores."
    if out.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        return f"--out {out} ends with a path separator; name the .npy file (such as {out}scores.npy)."
    if os.path.isdir(out):
        return f"--out {out} is a folder; name the .npy file."
    target = os.path.realpath(out)  # a symbolic link's file is written, the link kept
    if os.path.exists(target) and not stat.S_ISREG(os.stat(target).st_mode):
        return (
            f"--out {out} is not a regular file (a device, pipe or socket), which the scores' file would "
            "replace; name a .npy file."
        )
    folder = os.path.dirname(target)
    try:
        mode = os.stat(folder).st_mode
    except OSError as exc:  # a missing folder, one under a file or behind a permission
        return f"cannot write --out {out} in {folder}: {exc.strerror or exc}."
    if not stat.S_ISDIR(mode):
        return f"cannot write --out {out} in {folder}: {os.strerror(errno.ENOTDIR)}."
    return None


def _memory_message(args: argparse.Namespace, exc: MemoryError) -> str:
    """A ``MemoryError`` of the scoring, told in the CLI's options (the library's names library calls)."""
    what = str(exc).split(";")[0].strip() or "the scores do not fit in memory"
    if args.method == "norm":
        return f"{what}: score fewer rows per chunk (--chunk-size)."
    if args.model == "mlp" and args.params is None:
        return f"{what}: use a smaller --hidden, or --method norm (it forms no Gram matrix)."
    return f"{what}: use --method norm (it forms no Gram matrix), or a model of fewer parameters."


#: The first bytes of an ``.npy`` file (``numpy.lib.format``) and of a zip archive (an ``.npz``).
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK"


def _numpy_header(head: bytes) -> bool:
    """Whether a file's first bytes are an ``.npy`` or ``.npz`` header: ``np.load`` takes any other file
    for a pickle (and refuses it naming ``allow_pickle``, an option of the library call)."""
    return head == NPY_MAGIC or head.startswith(ZIP_MAGIC)


def _load_array(option: str, path: str) -> np.ndarray:
    """The ``.npy`` array at ``path`` as a read-only memmap, in native byte order (``ValueError`` for an
    empty file, an ``.npz`` archive or a big-endian file, which the memmap would hand to the device
    byte-swapped)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as exc:  # its message names the file, not the option
        raise ValueError(f"{option} {path}: {exc.strerror or exc}.") from None
    if head and not _numpy_header(head):
        raise ValueError(f"{option} {path} is not a .npy file (no .npy header): save the array with np.save.")
    if head.startswith(ZIP_MAGIC):  # not np.load: it leaves the file open when the zip cannot be read
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{option} {path}: the file is corrupt or truncated (it starts as a zip archive, an .npz, "
                f"but is not one); {option} takes one .npy array (save it with np.save)."
            )
        raise ValueError(f"{option} {path} is an .npz archive, not one .npy array (save it with np.save).")
    try:
        data = np.load(path, mmap_mode="r")
    except EOFError:
        raise ValueError(f"{option} {path} is empty: no .npy array in it.") from None
    except READ_ERRORS as exc:
        raise ValueError(f"{option} {path}: {_unreadable(path, exc)}") from None
    if not data.dtype.isnative:
        raise ValueError(
            f"{option} {path} is stored in non-native byte order ({data.dtype.str}): convert it with "
            f"np.save(path, a.astype(a.dtype.newbyteorder('=')))."
        )
    if data.dtype.kind in "fc" and data.dtype.itemsize > 8 * (1 + (data.dtype.kind == "c")):
        raise ValueError(  # jax's own error named neither the option nor a fix, or printed the values
            f"{option} {path} holds {data.dtype} (extended precision), which JAX does not compute in: save "
            "it as float64 (np.save(path, a.astype(np.float64)))."
        )
    return data


def _unreadable(path: str, exc: BaseException) -> str:
    """Why ``np.load`` could not map the ``.npy`` file at ``path``, from its header when that can be read:
    Python objects, or fewer bytes than the header's shape and dtype need (a truncated copy)."""
    header = _npy_header(path)
    if header is None:  # the header itself is damaged
        return f"{_why(exc)}."
    shape, dtype, offset = header
    if dtype.hasobject:
        return f"holds Python objects (dtype {dtype}), not numbers: save a numeric array with np.save."
    need = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < need:
        return (
            f"the file is truncated: its header says shape {shape} of {dtype} ({need - offset:,} bytes of "
            f"data), but it holds {max(size - offset, 0):,} bytes after the header."
        )
    return f"{_why(exc)}."


def _npy_header(path: str) -> tuple[tuple, np.dtype, int] | None:
    """``(shape, dtype, data offset)`` of the ``.npy`` file at ``path``; ``None`` when unreadable."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's note on Python-2 headers: np.load gave it already
            reader = readers.get(np.lib.format.read_magic(f))
            if reader is None:
                return None
            shape, _, dtype = reader(f)
            return shape, dtype, f.tell()
    except READ_ERRORS:
        return None


def _same_file(path: str | None, out: str) -> bool:
    """Whether ``out`` names the existing file ``path`` (through links and relative paths too)."""
    if path is None or not os.path.exists(out):
        return False
    try:
        return os.path.samefile(path, out)
    except OSError:
        return Path(path).resolve() == Path(out).resolve()


def _new_file(folder: str, prefix: str, suffix: str) -> str:
    """Create a new empty file of a random name in ``folder`` and return its path.

    Unlike :func:`tempfile.mkstemp` (mode ``0600``) the file gets the mode of any new file, ``0o666``
    less the process's umask, applied by the system (``open(..., "x")``): no need to read the umask,
    which ``os.umask`` can only do by changing it for every thread of the process for a moment.
    """
    for _ in range(100):  # a clash of 64 random bits is unlikely already
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            open(path, "xb").close()  # O_CREAT | O_EXCL, mode 0o666 & ~umask
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary file name found", folder)


class _written_on_success:
    """A ``.npy`` memmap of ``n`` scores in a temporary file beside ``path``, moved onto ``path`` only when
    the block ends without an error (removed otherwise): a failed run leaves an existing ``path`` as it
    was, and no file of zeros that looks like scores."""

    def __init__(self, path: str, dtype, n: int):
        self.path, self.dtype, self.n = path, dtype, n
        self.target = os.path.realpath(path)  # a symbolic link's file replaced, not the link

    def __enter__(self) -> np.memmap:
        folder = os.path.dirname(self.target)
        try:
            self.tmp = _new_file(folder, prefix=".nlis-score-", suffix=".npy")
        except OSError as exc:  # its message names the temporary file, not the folder
            raise OSError(f"cannot write --out {self.path} in {folder}: {exc.strerror or exc}.") from None
        try:
            self.out = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=self.dtype, shape=(self.n,))
        except BaseException as exc:
            os.unlink(self.tmp)
            if isinstance(exc, OSError):  # a full disk: named as --out, not the temporary file
                raise OSError(f"cannot write --out {self.path} in {folder}: {exc.strerror or exc}.") from None
            raise
        return self.out

    def __exit__(self, kind, exc, tb) -> bool:
        self.out.flush()
        del self.out  # the mapping closed before the file moves
        if kind is not None:
            os.unlink(self.tmp)
            return False
        try:
            os.replace(self.tmp, self.target)
        except BaseException as exc:
            os.unlink(self.tmp)
            if isinstance(exc, OSError):  # its message named the hidden temporary file
                raise OSError(f"cannot write --out {self.path}: {exc.strerror or exc}.") from None
            raise
        return False
