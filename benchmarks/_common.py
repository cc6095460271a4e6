"""Helpers shared by the benchmark scripts: timing, the numpy BLAS floor, the environment record, JSON output.

Not a package: the scripts run as ``python benchmarks/<name>.py`` (their folder is then first on
``sys.path``) and the smoke test puts this folder on ``sys.path`` before importing them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------- timing
class Timing(NamedTuple):
    """Compile time (``None`` for eager code) and the steady state over ``reps`` runs, in seconds.

    ``median_s`` is the figure to report; ``min_s`` is the least disturbed run (useful on a shared machine).
    ``from_warmup``: the one run was the warm-up itself (a case slower than its whole time budget).
    """

    compile_s: float | None
    median_s: float
    min_s: float
    reps: int
    from_warmup: bool = False

    def as_dict(self) -> dict:
        return self._asdict()


def median_time(call: Callable[[], Any], *, reps: int, warmup: int = 1, budget_s: float | None = None):
    """Median wall time of ``call()`` (which must block until its result is ready).

    Runs ``warmup`` untimed calls, then up to ``reps`` timed ones, stopping early (after at least one)
    once the timed calls have used ``budget_s`` seconds. Returns ``(median_s, min_s, reps_done)``.
    """
    for _ in range(warmup):
        call()
    times: list[float] = []
    while len(times) < max(1, reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return statistics.median(times), min(times), len(times)


class Compiled:
    """``jax.jit(fn)`` lowered and compiled for fixed ``args`` (compile time measured on its own).

    Pass every array as an argument: arrays closed over by ``fn`` become XLA constants, which the compiler
    may constant-fold for minutes. Calling the object runs it once and blocks; the first call is the
    warm-up, whose output the scripts check before :meth:`time` measures the steady state.
    """

    def __init__(self, fn: Callable, *args):
        self.args = args
        t0 = time.perf_counter()
        self.compiled = jax.jit(fn).lower(*args).compile()
        self.compile_s = time.perf_counter() - t0
        self.warm, self.first_call_s = False, None

    def __call__(self):
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.compiled(*self.args))
        if not self.warm:
            self.warm, self.first_call_s = True, time.perf_counter() - t0
        return out

    def time(self, *, reps: int, budget_s: float | None = None) -> Timing:
        """Median of up to ``reps`` runs after the warm-up (see :func:`median_time`).

        A case whose warm-up alone took longer than ``budget_s`` is not run again: its warm-up time is
        reported (``from_warmup=True``; the executable was compiled before, so no compilation is in it).
        """
        if self.warm and budget_s is not None and self.first_call_s >= budget_s:
            return Timing(self.compile_s, self.first_call_s, self.first_call_s, 1, from_warmup=True)
        stats = median_time(self, reps=reps, warmup=0 if self.warm else 1, budget_s=budget_s)
        return Timing(self.compile_s, *stats)


def xla_gram(F) -> Callable[[], Any]:
    """``FᵀF`` by XLA, compiled for ``F``: a second floor, for when numpy's threaded BLAS is disturbed.

    On a loaded machine OpenBLAS threads that spin-wait can slow numpy's product by an order of
    magnitude while XLA's runs near its quiet speed; the ratio to both floors is recorded.
    """
    compiled = Compiled(lambda A: A.T @ A, jax.numpy.asarray(F))
    return compiled


def balanced_orders(k: int) -> list[list[int]]:
    """Orders of ``k`` calls in which every call comes right after every other call equally often: a
    Williams design (Williams 1949), ``k`` rows for even ``k`` and those rows and their mirror images
    (``2k``) for odd ``k``; each call also takes each position equally often. Row ``r`` is
    ``(first + r) mod k`` with ``first = 0, 1, k−1, 2, k−2, …``."""
    first, low, high = [0], 1, k - 1
    for j in range(1, k):
        if j % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    rows = [[(x + r) % k for x in first] for r in range(k)]
    return rows + [row[::-1] for row in rows] if k % 2 else rows


def interleaved(calls: dict[str, Callable[[], Any]], *, reps: int) -> dict[str, dict]:
    """Median and minimum of each call, timed in turn (round robin) after one warm-up round.

    On a shared machine the load drifts over seconds; interleaving puts every call under the same load,
    so ratios between them (to the floor, before/after) mean something even when absolute times do not.
    A call's time also depends on the call before it: right after numpy's threaded BLAS it runs beside
    its still-spinning threads (measured: an XLA pass of 14 ms took 20 ms right after numpy's ``FᵀF``,
    and a 65 ms leverage call 1.4–1.8× its time). Round ``r`` therefore takes row ``r`` of
    :func:`balanced_orders`: over every ``k`` rounds (``2k`` for an odd number ``k`` of calls) each call
    follows each other call equally often. (Until 2026-12-01 the order rotated by one call a round,
    which keeps every call's cyclic predecessor fixed: the jitted leverage call of ``bench_scores.py``
    always came right after XLA's ``FᵀF``, which always came right after numpy's.) Every result passes
    through ``jax.block_until_ready``. Returns ``{name: {median_s, min_s, reps, times_s}}``.
    """
    for call in calls.values():
        jax.block_until_ready(call())
    names = list(calls)
    orders = balanced_orders(len(names))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(max(1, reps)):
        for i in orders[r % len(orders)]:
            name = names[i]
            t0 = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "reps": len(ts), "times_s": ts}
        for name, ts in times.items()
    }


def timed(fn: Callable, *args, reps: int, budget_s: float | None = None) -> Timing:
    """Compile ``jax.jit(fn)`` for ``args``, warm up, and time the steady state (see :class:`Compiled`)."""
    return Compiled(fn, *args).time(reps=reps, budget_s=budget_s)


def time_eager(call: Callable[[], Any], *, reps: int, budget_s: float | None = None) -> Timing:
    """Time code that is not compiled ahead (numpy, torch, an eager jax call): warm-up, then median.

    The result of ``call()`` is passed through ``jax.block_until_ready`` (a no-op for numpy and torch).
    """
    return Timing(None, *median_time(lambda: jax.block_until_ready(call()), reps=reps, budget_s=budget_s))


# ------------------------------------------------------------------------------------------ BLAS floor
def blas_info() -> dict:
    """numpy's BLAS as threadpoolctl sees it, ``OPENBLAS_CORETYPE`` (which overrides its kernels) and
    ``OPENBLAS_THREAD_TIMEOUT`` (how long its threads spin after a call, slowing the jax calls that follow
    in an interleaved round: benchmarks/README.md (g), "Sixteenth session")."""
    info: dict[str, Any] = {
        name: os.environ.get(name) for name in ("OPENBLAS_CORETYPE", "OPENBLAS_THREAD_TIMEOUT")
    }
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # optional: scikit-learn brings it
        return info
    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    # numpy's own BLAS (scipy, torch, ... may load others into the process).
    numpy_blas = [lib for lib in blas if "numpy" in lib.get("filepath", "")] or blas
    if numpy_blas:
        keys = ("internal_api", "version", "architecture", "num_threads", "threading_layer", "filepath")
        info.update({k: numpy_blas[0].get(k) for k in keys})
        if info.get("filepath"):  # the library's file name, not where this machine installed it
            info["filepath"] = os.path.basename(info["filepath"])
    return info


def gram_floor(F: np.ndarray, *, reps: int, budget_s: float | None = None) -> dict:
    """The floor of an exact leverage computation: two BLAS passes over ``F``, i.e. 2 × median ``FᵀF``.

    Measured with numpy's own BLAS in this process. ``OPENBLAS_CORETYPE`` forces OpenBLAS kernels other
    than those it would pick for this CPU, which moves the floor; it must be unset for the reference run
    (a warning is printed and the value recorded).
    """
    F = np.ascontiguousarray(F)
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    if coretype is not None:
        print(
            f"warning: OPENBLAS_CORETYPE={coretype} is set; numpy's BLAS floor is not the native one "
            f"(run with `env -u OPENBLAS_CORETYPE`).",
            file=sys.stderr,
        )
    gram_s, gram_min_s, done = median_time(lambda: F.T @ F, reps=reps, budget_s=budget_s)
    floor = {"gram_numpy_s": gram_s, "floor_s": 2.0 * gram_s, "gram_numpy_min_s": gram_min_s}
    return floor | {"floor_min_s": 2.0 * gram_min_s, "reps": done, "blas": blas_info()}


# ------------------------------------------------------------------------------------ the JSON record
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(**extra_versions: str) -> dict:
    """Device, versions, machine and load: what a timing means nothing without."""
    import jaxlib

    import nlis_jax

    device = jax.devices()[0]
    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "nlis_jax": nlis_jax.__version__,
        **extra_versions,
    }
    uname = platform.uname()
    machine = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "processor": platform.processor(),
        "uname": f"{uname.system} {uname.release} {uname.machine}",
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"kind": device.device_kind, "platform": device.platform, "count": jax.device_count()},
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "versions": versions,
        "machine": machine,
        "blas": blas_info(),
    }


def _jsonable(obj):
    if isinstance(obj, (np.generic, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_record(record: dict, out: str | Path | None, name: str, *, quiet: bool = False) -> Path:
    """Write ``record`` as JSON to ``out`` (default ``benchmarks/results/<name>.json``) and print it."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=_jsonable)
    path.write_text(text + "\n")
    if not quiet:
        print(text)
    print(f"wrote {path}", file=sys.stderr)
    return path


def run_and_write(name: str, args, run: Callable[[Any], dict], *, x64: bool) -> dict:
    """The record ``{"bench", "params", "environment"} | run(args)``, made under ``jax.enable_x64(x64)``
    (scoped: the caller's setting is left as it was), then written (:func:`write_record`)."""
    with jax.enable_x64(x64):
        record = {"bench": name, "params": vars(args), "environment": environment()}
        record |= run(args)
    write_record(record, args.out, name, quiet=args.quiet)
    return record


# -------------------------------------------------------------------------------------- small helpers
def positive_int(text: str) -> int:
    """An argparse type: an integer ``>= 1`` (``--reps 0`` is refused, not run as one repeat)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer ``>= 0`` (0 where the option's help says it skips something)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number ``>= 0`` (seconds of a budget)."""
    value = _float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number ``> 0`` (a learning rate)."""
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    """An argparse type: ``"1,2,3"`` -> ``[1, 2, 3]``, at least one item, each ``>= 1`` (a width of 0
    ran a model without that layer and passed every check)."""
    values = [positive_int(v) for v in text.split(",") if v]
    if not values:
        raise argparse.ArgumentTypeError(f"must list at least one integer >= 1, got {text!r}")
    return values


def counts_text(text: str) -> str:
    """An argparse type for a comma list of counts read later (``"1e6,1e7"``): each item a whole number
    ``>= 1``; the text is returned unchanged."""
    items = [v for v in text.split(",") if v]
    for item in items:
        value = _float(item)
        if not (math.isfinite(value) and value >= 1 and value == int(value)):
            raise argparse.ArgumentTypeError(f"must list whole numbers >= 1, got {item!r}")
    if not items:
        raise argparse.ArgumentTypeError(f"must list at least one number, got {text!r}")
    return text


def names_text(allowed) -> Callable[[str], str]:
    """An argparse type for a comma list of names from ``allowed``, read later; the text unchanged."""

    def check(text: str) -> str:
        bad = [v for v in text.split(",") if v not in allowed]
        if bad or not text:
            raise argparse.ArgumentTypeError(f"unknown {bad or [text]}; choose from {','.join(allowed)}")
        return text

    return check


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def out_file(text: str) -> str:
    """``--out``, checked before the benchmark runs (a folder, ``''`` or a path under a file failed only
    when the record was written, after the whole run): a file name whose nearest existing parent is a
    folder (missing folders are made when the record is written)."""
    path = Path(text)
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"name the JSON file to write, got the folder {text!r}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent} is a file, not a folder: cannot write {text!r}")
    return text


def base_parser(
    description: str, *, reps: int = 7, reps_help: str = "timed repeats"
) -> argparse.ArgumentParser:
    """An argparse parser with the options every benchmark shares (``--reps``: default ``reps``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--reps", type=positive_int, default=reps, help=f"{reps_help} (median reported; >= 1; default {reps})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of jax.random.key for the data")
    parser.add_argument(
        "--out", type=out_file, default=None, help="JSON record (default benchmarks/results/<name>.json)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no JSON echo")
    return parser


def progress(items: Iterable, *, desc: str, quiet: bool):
    """A tqdm progress bar on stderr (disabled with ``--quiet``)."""
    return tqdm(items, desc=desc, disable=quiet, leave=False, file=sys.stderr)


def max_rel_error(value, ref) -> float:
    """``max |value − ref| / max |ref|``: the normwise (max-norm) relative error, in float64."""
    value, ref = np.asarray(value, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(value - ref)) / np.max(np.abs(ref)))


def check(value: float, limit: float, *, at_least: bool = False) -> dict:
    """A correctness check entry: ``{"value", "limit", "ok"}`` (``value <= limit`` unless ``at_least``)."""
    value = float(value)
    ok = value >= limit if at_least else value <= limit
    return {"value": value, "limit": limit, "ok": bool(ok)}


def all_ok(checks: dict) -> bool:
    return all(entry["ok"] for entry in checks.values())


def report_failures(checks: dict) -> None:
    for name, entry in checks.items():
        if not entry["ok"]:
            print(f"CHECK FAILED {name}: {entry['value']:.3e} (limit {entry['limit']:.1e})", file=sys.stderr)
