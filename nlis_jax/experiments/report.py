"""Reporting of the sampling studies: quantiles over repeats, convergence step counts, the text table."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["environment", "format_table", "number", "quantiles", "steps_to_converge", "steps_to_loss"]


def environment() -> dict:
    """What a results.json needs to tell runs apart that the same seed and options do not: jax's version,
    backend and device, the device count (XLA_FLAGS may force several CPU devices: rounding-level
    differences) and whether x64 was on (it changes the sampler's draws and the float32 studies'
    arithmetic: ``JAX_ENABLE_X64=1`` gives other samples for the same key)."""
    import jax

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "x64": bool(jax.config.jax_enable_x64),
    }


def number(x) -> float | None:
    """A finite float, or ``None`` (JSON has no infinity) for a diverged fit."""
    x = float(x)
    return x if math.isfinite(x) else None


def quantiles(values, worst: float = np.inf) -> dict:
    """``{"median", "q25", "q75", "min", "max", "diverged"}`` of a sample.

    A non-finite value (a diverged fit) counts as ``worst`` (+inf for a loss ratio, −inf for an
    accuracy): quantiles then take sample values (no interpolation), and an infinite quantile is
    reported as ``None``; ``diverged`` counts them.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    v = np.where(finite, v, worst)
    method = "linear" if finite.all() else "inverted_cdf"
    q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75], method=method)
    return {
        "median": number(med),
        "q25": number(q25),
        "q75": number(q75),
        "min": number(v.min()),
        "max": number(v.max()),
        "diverged": int(np.sum(~finite)),
    }


def steps_to_loss(losses: np.ndarray, target: float) -> int | None:
    """First step ``t`` with ``losses[t] <= target`` (``losses[t]`` is after ``t`` updates), else ``None``."""
    hit = np.nonzero(np.asarray(losses) <= target)[0]
    return int(hit[0]) if hit.size else None


def steps_to_converge(trace, rtol: float = 1e-6) -> int:
    """Steps after which a fit's objective stays within ``rtol`` (relative) of its final value; all
    ``len(trace)`` steps when that final value is not finite (a diverged fit never settles)."""
    trace = np.asarray(trace, dtype=np.float64)
    final = trace[-1]
    if not np.isfinite(final):
        return int(trace.shape[-1])
    bad = np.nonzero(np.abs(trace - final) > rtol * abs(final))[0]
    return int(bad[-1]) + 1 if bad.size else 0


def _cell(q: dict, width: int, diverged: str = "inf") -> str:
    """``median [q25, q75]``; a quantile taken by diverged fits (``None``) reads ``diverged``: their
    worst value, "inf" for a loss ratio, "-inf" for an accuracy."""
    f = lambda v, spec: diverged if v is None else format(v, spec)
    return f"{f(q['median'], '>10.4f')} [{f(q['q25'], '.3f')}, {f(q['q75'], '.3f')}]".rjust(width)


def _timing_lines(timing: dict | None) -> list[str]:
    """Lines of the wall-time comparison (none without one)."""
    if not timing:
        return []
    lines = []
    runs = len(next(iter(timing["methods"].values()))["runs"])
    lines.append(
        f"wall time at s = {timing['size']} (one sample, compiled; medians of {runs} runs) vs full-data "
        f"training to the same loss ({timing['full']['step_s'] * 1e3:.3f} ms/step):"
    )
    for m, t in timing["methods"].items():
        full_t = "not reached" if t["full_time_to_loss_s"] is None else f"{t['full_time_to_loss_s']:.4f} s"
        speed = ""
        if t["speedup"] is not None:
            speed = f", speed-up {t['speedup']:.2f}x ({t['speedup_converged']:.2f}x)"
        ratio = "inf (diverged)" if t["ratio"] is None else f"{t['ratio']:.4f}"
        diverged = f" ({t['diverged']} of {runs} runs diverged)" if t.get("diverged") else ""
        lines.append(
            f"  {m:<20} total {t['total_s']:.4f} s ({t['total_converged_s']:.4f} s to convergence), "
            f"ratio {ratio}{diverged}; full data to that loss: {full_t}{speed}"
        )
    return lines


def format_table(summary: dict) -> str:
    """The study summary as a plain-text table (one row per size, one column block per scheme)."""
    methods = list(summary["methods"])
    classification = any("test_accuracy" in r for m in methods for r in summary["methods"][m]["results"])
    lines = []
    info = summary["info"]
    full = summary["full"]
    lines.append(
        f"{summary['dataset']}: n = {summary['n']}, p = {summary['p']}, {info.get('model', '')}, "
        f"radius = {info.get('radius')}"
    )
    extra = f", test accuracy {full['test_accuracy']:.4f}" if "test_accuracy" in full else ""
    lines.append(
        f"full-data fit: L(θ*) = {full['loss']:.6g} in {full['num_steps']} steps, {full['time_s']:.3f} s "
        f"(compile {full['compile_s']:.2f} s), ‖θ*‖ = {full['theta_norm']:.4f}{extra}"
    )
    lines.append("L(θ_S)/L(θ*) on the full data: median [q25, q75] over repeats; s = sample rows")
    width = 26
    header = f"{'s':>7} {'s/n':>7}  " + "".join(f"{m:>{width}}" for m in methods)

    def table(key, diverged):  # one row per sample size, one column per method
        lines.append(header)
        for i, s in enumerate(summary["sizes"]):
            cells = "".join(_cell(summary["methods"][m]["results"][i][key], width, diverged) for m in methods)
            lines.append(f"{s:>7d} {s / summary['n']:>7.4f}  " + cells)

    table("ratio", "inf")
    if classification:
        lines.append("test accuracy: median [q25, q75]")
        table("test_accuracy", "-inf")
    lines.append("seconds per repeat at the largest size: scoring (incl. pilot) + training")
    for m in methods:
        r = summary["methods"][m]["results"][-1]
        lines.append(
            f"  {m:<20} score {r['score_s']:.4f} s, sample {r['sample_s']:.4f} s, train {r['train_s']:.4f} s"
        )
    lines += _timing_lines(summary.get("timing"))
    comp = summary["compile"]
    lines.append(f"compilations: {comp['count']} ({comp['seconds']:.1f} s, not in the times above)")
    return "\n".join(lines)
