"""Argument checks shared by the experiments: positive integers and sample sizes, for configs and the CLI.

Each check raises a clear error naming the argument; the ``*_arg`` variants are ``argparse`` types that
turn the same checks into ``argparse.ArgumentTypeError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "check_size",
    "check_sizes",
    "parse_sizes",
    "positive_int",
    "positive_int_arg",
    "replace_naming_option",
    "seed_arg",
    "sizes_arg",
]


def positive_int(name: str, value, *, optional: bool = False) -> int | None:
    """``value`` as an ``int >= 1`` (``None`` passes when ``optional``).

    Raises:
        TypeError: ``value`` is not an integer (``bool`` is not one).
        ValueError: ``value < 1``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        extra = " or None" if optional else ""
        raise TypeError(f"{name} must be a positive int{extra}, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    return int(value)


def check_size(name: str, size) -> float | int:
    """One sample size: a number ``0 < size < 1`` (a fraction of ``n``) or a whole number ``>= 1`` (rows).

    Returns:
        The size, rows as an ``int``.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float, np.number)) or not math.isfinite(size):
        raise ValueError(f"{name}: every size must be a positive number, got {size!r}.")
    if size <= 0:
        raise ValueError(f"{name}: every size must be a positive number, got {size!r}.")
    if size >= 1:
        if float(size) != round(size):
            raise ValueError(f"{name}: a size >= 1 counts rows and must be a whole number, got {size!r}.")
        return int(round(size))
    return float(size)


def check_sizes(name: str, sizes: Sequence[float]) -> tuple[float | int, ...]:
    """A non-empty sequence of sample sizes (:func:`check_size` each)."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise ValueError(f"{name} must be a non-empty tuple of numbers, got {sizes!r}.")
    return tuple(check_size(name, s) for s in sizes)


def parse_sizes(text: str) -> tuple[float | int, ...]:
    """``"0.005,0.01,200"`` -> ``(0.005, 0.01, 200)``, checked by :func:`check_sizes`."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"sizes must be a comma list of numbers, got {text!r}") from None
    return check_sizes("sizes", values)


def _as_arg_error(fn, text: str):
    try:
        return fn(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def sizes_arg(text: str) -> tuple[float | int, ...]:
    """``argparse`` type of a comma list of sample sizes (:func:`parse_sizes`)."""
    return _as_arg_error(parse_sizes, text)


def size_arg(text: str) -> float | int:
    """``argparse`` type of ONE sample size (a fraction or a row count): a list is an error, not its head."""
    sizes = sizes_arg(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"expected one sample size, got {len(sizes)}: {text!r}")
    return sizes[0]


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected {what}, got {text!r}") from None


def positive_int_arg(text: str) -> int:
    """``argparse`` type of a positive integer (:func:`positive_int`)."""
    return _as_arg_error(lambda t: positive_int("value", _integer(t, "a positive integer")), text)


#: Seeds are 32-bit: ``jax.random.key(seed)`` of a larger seed overflows (``OverflowError``), or without
#: x64 wraps around (``2**32 + 5`` would give the key of ``5``).
SEED_LIMIT = 2**32


def check_seed(name: str, value) -> int:
    """``value`` as a seed in ``[0, 2**32)`` (a config's field; :func:`seed_arg` on the command line):
    ``TypeError`` for a non-integer, ``ValueError`` outside the range, where a seed of ``2**32 + 5``
    silently gave the run of seed 5 while its record said otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer seed, got {value!r}.")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must lie in [0, 2**32), got {value}.")
    return int(value)


def check_float_dtype(name: str, value) -> str:
    """``value`` one of ``"float32"``, ``"float64"`` (a study's data dtype): an integer dtype rounded the
    data (68% of the synthetic inputs became 0) and failed later without naming the field."""
    if value not in ("float32", "float64"):
        raise ValueError(f"{name} must be 'float32' or 'float64', got {value!r}.")
    return value


def seed_arg(text: str) -> int:
    """``argparse`` type of a seed: an integer in ``[0, 2**32)``."""

    return _as_arg_error(lambda t: check_seed("a seed", _integer(t, "an integer seed")), text)


def replace_naming_option(config, changes: Mapping, options: Mapping[str, str]):
    """``dataclasses.replace(config, **changes)``; a ``ValueError`` of the config naming a changed field
    (``"learning_rate must be positive"``) is re-raised naming its command-line option instead
    (``"--lr: learning_rate must be positive"``). ``options`` maps fields to option names (``dest``s);
    the field must be the message's first whole word (``"noise must ..."`` is not field ``n``'s)."""
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as exc:
        named = [options[f] for f in changes if f in options and re.match(rf"{f}\b", str(exc))]
        if not named:
            raise
        raise ValueError(f"--{named[0].replace('_', '-')}: {exc}") from None
