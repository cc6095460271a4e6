"""Plots of a study summary (``nlis_jax.experiments.run_study(...).summary``), rendered with Agg.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly, so no pyplot state or
interactive backend is involved (safe in tests, on servers and inside notebooks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_STYLES = {
    "uniform": ("tab:gray", "o", "-"),
    "linear_leverage": ("tab:blue", "s", "-"),
    "nonlinear_leverage": ("tab:red", "D", "-"),
    "nonlinear_norm": ("tab:orange", "^", "-"),
    "pilot_leverage": ("tab:green", "v", "--"),
    "refined_leverage": ("tab:purple", "P", "--"),
    "residual_leverage": ("tab:cyan", "X", "--"),
}


def _figure(figsize=(6.4, 4.4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(summary: dict, method: str, field: str, transform=lambda v: v):
    rows = summary["methods"][method]["results"]
    sizes = np.array([r["size"] for r in rows], dtype=float)

    def get(key):  # None marks a diverged (infinite) quantile: not drawn
        return np.array([np.nan if r[field][key] is None else transform(r[field][key]) for r in rows])

    return sizes, get("median"), get("q25"), get("q75")


def _draw(ax, summary: dict, field: str, transform=lambda v: v, positive: bool = False) -> None:
    for method in summary["methods"]:
        color, marker, line = _STYLES.get(method, (None, "o", "-"))
        sizes, med, lo, hi = _series(summary, method, field, transform)
        if positive:  # keep only points that a log axis can show
            keep = np.nan_to_num(med) > 0
            sizes, med, lo, hi = sizes[keep], med[keep], np.maximum(lo[keep], med[keep] * 1e-3), hi[keep]
            if not sizes.size:
                continue
        ax.plot(sizes, med, line, color=color, marker=marker, label=method.replace("_", " "))
        ax.fill_between(sizes, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    _plain_x(ax, [r["size"] for m in summary["methods"].values() for r in m["results"]])
    ax.set_xlabel(f"sample size s (rows of n = {summary['n']:,})")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing drawn (every point left out): no empty legend
        _quartile_key(ax)
        ax.legend(fontsize="small")


def _quartile_key(ax) -> None:
    """A legend entry saying what the shaded bands are."""
    ax.fill_between([], [], [], color="grey", alpha=0.15, linewidth=0, label="shaded: quartiles over repeats")


def _log_y_or_note(ax, note: str) -> bool:
    """A log y axis when the axes hold a finite positive value (a log scale of nothing fails at
    ``savefig``); else a linear one with ``note`` written on it. Returns whether the scale is log."""
    values = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
    if any(np.any(np.isfinite(v) & (v > 0)) for v in values):
        ax.set_yscale("log")
        return True
    ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center")
    return False


def _plain_ticks(ax) -> None:
    """Plain numbers (1.2, not 1.2×10⁰) on a log y axis whose range is narrow."""
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.yaxis,):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())


def _plain_x(ax, sizes) -> None:
    """Sample sizes as plain numbers on the log x axis, a labelled tick at each size (on a span of 8× or
    less the decade ticks missed them: 60, 70, ..., 100 for sizes 67 and 135) and none between."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(sizes) > 0:  # also the sizes' range when no point was drawn (matplotlib's default is 1–10)
        ax.set_xticks(sorted(set(sizes)))
        ax.set_xlim(min(sizes) / 1.2, max(sizes) * 1.2)


def _title(summary: dict) -> str:
    info = summary.get("info", {})
    radius = info.get("radius")
    constraint = "" if radius is None else f", ‖θ‖ ≤ {radius}"
    return f"{summary['dataset']}: n = {summary['n']:,}, p = {summary['p']}{constraint}"


def plot_study(summary: dict, out_dir: str | Path) -> list[Path]:
    """Write the study's figures into ``out_dir`` and return their paths.

    * ``ratio.png``: ``L(θ_S)/L(θ*)`` against ``s`` (log-log), median and interquartile band per scheme;
    * ``excess.png``: the excess ``L(θ_S)/L(θ*) − 1`` (log-log; where positive), whose slope reads the
      rate in ``s``;
    * ``accuracy.png`` (classification): test accuracy against ``s``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig = _figure()
    ax = fig.add_subplot()
    _draw(ax, summary, "ratio")
    if _log_y_or_note(ax, "every fit diverged: no finite median to draw"):
        _plain_ticks(ax)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("L(θ_S) / L(θ*) on the full data")
    ax.set_title(_title(summary), fontsize="medium")
    paths.append(out / "ratio.png")
    fig.savefig(paths[-1], dpi=120)

    fig = _figure()
    ax = fig.add_subplot()
    _draw(ax, summary, "ratio", transform=lambda v: v - 1.0, positive=True)
    _log_y_or_note(ax, "no finite median above L(θ*) to draw")
    ax.set_ylabel("L(θ_S) / L(θ*) − 1")
    ax.set_title(_title(summary), fontsize="medium")
    paths.append(out / "excess.png")
    fig.savefig(paths[-1], dpi=120)

    first = next(iter(summary["methods"].values()))["results"]
    if first and "test_accuracy" in first[0]:
        fig = _figure()
        ax = fig.add_subplot()
        _draw(ax, summary, "test_accuracy")
        full = summary.get("full", {}).get("test_accuracy")
        if full is not None:
            ax.axhline(full, color="black", linewidth=0.8, linestyle=":", label="full data")
            ax.legend(fontsize="small")
        ax.set_ylabel("test accuracy")
        ax.set_title(_title(summary), fontsize="medium")
        paths.append(out / "accuracy.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


def plot_flights(summary: dict, path) -> Path:
    """The flights study (:func:`nlis_jax.experiments.flights.run_flights_study`): ``L(θ_S)/L(θ*)`` on the
    training data against the sample size, one panel per protocol (median and quartiles), the refit noise
    floor shaded grey and the 5% line dotted. Writes ``path`` (PNG) and returns it."""
    grids = summary["grids"]
    fig = _figure(figsize=(5.2 * len(grids), 4.2))
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    floor = summary.get("noise_floor")

    def excess(value):  # None: a quantile among diverged fits (+inf), not drawn
        return np.nan if value is None else value - 1

    for ax, (protocol, grid) in zip(axes, grids.items(), strict=True):
        hidden = 0
        for method, recs in grid.items():
            color, marker, line = _STYLES.get(method, (None, "o", "-"))
            sizes = [r["size"] for r in recs]
            med = np.array([excess(r["ratio"]["median"]) for r in recs])
            hidden += int(np.sum(~(med > 0)))
            ax.plot(sizes, med, line, color=color, marker=marker, label=method.replace("_", " "))
            lo, hi = ([excess(r["ratio"][q]) for r in recs] for q in ("q25", "q75"))
            ax.fill_between(sizes, lo, hi, color=color, alpha=0.15, linewidth=0)
        notes = [f"{hidden} median(s) diverged or at or below L(θ*): not drawn"] if hidden else []
        if floor:
            gap = max([abs(r - 1) for r in floor["ratio"] if r is not None] + [1e-4])
            ax.axhspan(1e-4, gap, color="grey", alpha=0.25, label="refit noise floor |L/L* − 1|")
        same = (summary.get("same_steps_full_data") or {}).get(protocol)
        if same and excess(same["ratio"]["median"]) > 0:  # (NaN > 0 is False: diverged, not drawn)
            ax.axhline(same["ratio"]["median"] - 1, color="k", lw=1.2, label="full data, same recipe")
        elif same:
            level = same["ratio"]["median"]
            where = "diverged" if level is None else f"at {level:.4f} L(θ*), not above L(θ*)"
            notes.append(f"full data, same recipe: {where}: not drawn")
        if notes:  # a log axis drops them silently
            ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize="small")
        ax.axhline(0.05, color="k", lw=0.7, ls=":")
        ax.set_xscale("log")
        _plain_x(ax, [r["size"] for recs in grid.values() for r in recs])
        ax.set_yscale("log")
        ax.set_xlabel(f"sample size s (rows of n = {summary['n']:,})")
        ax.set_ylabel("L(θ_S)/L(θ*) − 1 (training data)")
        ax.set_title(f"flights, {summary['model']} (p = {summary['p']}): {protocol}", fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
        _quartile_key(ax)
        ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
