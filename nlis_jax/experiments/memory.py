"""Measured memory and wall time of a stage: the peak ``RssAnon`` of this process, sampled in a thread.

``RssAnon`` (``/proc/self/status``, Linux) is the anonymous resident memory of the process: the heap, where
the CPU backend of XLA keeps its buffers, without the mapped files (shared libraries) that ``VmRSS`` adds.
A peak is only as fine as the sampling interval (5 ms by default): a buffer that lives for less than that
may be missed. Where ``/proc/self/status`` is not readable (not Linux), the figures are ``None``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jax

__all__ = ["PeakRss", "measured", "rss_anon_bytes"]


def rss_anon_bytes() -> int | None:
    """``RssAnon`` of this process in bytes, or ``None`` where ``/proc/self/status`` has none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRss:
    """Context manager: the peak ``RssAnon`` (bytes) while the ``with`` block runs.

    A daemon thread reads :func:`rss_anon_bytes` every ``interval_s`` seconds; the reading before the block
    (``before``) and after it count too. ``peak`` and ``before`` are ``None`` where the figure is not
    available.
    """

    def __init__(self, interval_s: float = 0.005):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}.")
        self.interval_s = interval_s
        self.before: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = rss_anon_bytes()
        if value is not None:
            self.peak = value if self.peak is None else max(self.peak, value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRss:
        self.before = rss_anon_bytes()
        self.peak = self.before
        if self.before is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def measured(records: dict[str, dict[str, Any]], name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, waited for (:func:`jax.block_until_ready`), with its cost in ``records``.

    ``records[name]`` becomes ``{"wall_s", "rss_before_mib", "rss_peak_mib", "rss_growth_mib"}``: the wall
    time (compilation included on a first call) and the ``RssAnon`` before and at its peak during the call,
    in MiB (``None`` where not measurable). Returns what ``fn`` returns.
    """
    t0 = time.perf_counter()
    with PeakRss() as rss:
        out = jax.block_until_ready(fn(*args, **kwargs))
    wall = time.perf_counter() - t0
    growth = None if rss.peak is None else rss.peak - rss.before
    records[name] = {
        "wall_s": wall,
        "rss_before_mib": _mib(rss.before),
        "rss_peak_mib": _mib(rss.peak),
        "rss_growth_mib": _mib(growth),
    }
    return out
