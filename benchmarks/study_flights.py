"""The flights sampling study (:mod:`nlis_jax.experiments.flights_study`) as a script.

Writes ``OUT/flights_<model>.json`` (the summary plus the environment), ``OUT/flights_<model>.md`` (the
tables) and ``OUT/flights_<model>.png`` (ratio against sample size per protocol). Needs the extra
``pip install 'nlis_jax[flights]'``. Example (the settings of the README table)::

    python benchmarks/study_flights.py --model single_index --repeats 10
    python benchmarks/study_flights.py --model mlp --repeats 3 --sizes 0.005,0.01,0.02,0.05,0.1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax

from nlis_jax.experiments.flights_study import (
    FlightsStudyConfig,
    format_flights_tables,
    format_wall_time,
    run_flights_study,
)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _strs(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("single_index", "mlp"), default="single_index")
    ap.add_argument("--sizes", type=_floats)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--methods", type=_strs)
    ap.add_argument("--protocols", type=_strs)
    ap.add_argument("--mix", type=float)
    ap.add_argument("--hidden", type=lambda t: tuple(int(v) for v in t.split(",")))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--sample-steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--refits", type=int)
    ap.add_argument("--pilot-size", type=float)
    ap.add_argument("--refine-size", type=float)
    ap.add_argument("--limit", type=int, help="keep only the first rows (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="flights_results")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--report", metavar="JSON", help="only re-render the tables and plot of a record")
    return ap.parse_args(argv)


def config_from(args: argparse.Namespace) -> FlightsStudyConfig:
    names = ("model", "sizes", "repeats", "methods", "protocols", "mix", "hidden", "epochs", "sample_steps")
    names += ("batch_size", "refits", "pilot_size", "refine_size", "limit")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return FlightsStudyConfig(**given)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = summary["grids"]
    fig, axes = plt.subplots(1, len(grids), figsize=(5.5 * len(grids), 4), squeeze=False)
    for ax, (protocol, grid) in zip(axes[0], grids.items(), strict=True):
        for method, recs in grid.items():
            x = [r["size"] for r in recs]
            med = [r["ratio"]["median"] for r in recs]
            lo = [r["ratio"]["q25"] for r in recs]
            hi = [r["ratio"]["q75"] for r in recs]
            ax.plot(x, med, marker="o", label=method)
            ax.fill_between(x, lo, hi, alpha=0.15)
        floor = summary.get("noise_floor")
        if floor:
            ax.axhspan(min(1.0, *floor["ratio"]), max(1.0, *floor["ratio"]), color="grey", alpha=0.3)
        ax.axhline(1.05, color="k", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size s (rows)")
        ax.set_ylabel("L(θ_S) / L(θ*) (training data)")
        ax.set_title(f"flights, {summary['model']}, p = {summary['p']}: {protocol}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(args: argparse.Namespace) -> dict:
    config = config_from(args)
    t0 = time.perf_counter()

    def log(text):
        print(f"[{time.perf_counter() - t0:7.1f} s] {text}", file=sys.stderr, flush=True)

    with jax.enable_x64(config.model == "single_index"):
        summary = run_flights_study(config, jax.random.key(args.seed), log=log)
    summary["wall_s"] = time.perf_counter() - t0
    summary["environment"] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:  # re-render the tables and plot of an existing record
        summary = json.loads(Path(args.report).read_text())
    else:
        summary = _run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"flights_{summary['config']['model']}"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    tables = format_flights_tables(summary) + "\n\nWall time (protocol "
    tables += ("pilot" if "pilot" in summary["grids"] else next(iter(summary["grids"]))) + "):\n\n"
    tables += format_wall_time(summary)
    (out / f"{stem}.md").write_text(tables + "\n")
    if not args.no_plot:
        plot(summary, out / f"{stem}.png")
    print(tables)
    return summary


if __name__ == "__main__":
    main()
