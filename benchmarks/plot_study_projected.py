"""Plot ``L(θ_S)/L(θ*) − 1`` against the sample size ``s``, one line per score, from study records.

One panel per record written by ``study_projected.py``: the median over the repeats with the
interquartile range as a band, log–log axes, and ``p / s`` dotted. Where the record has a noise floor
(warm protocol) the ratios are taken against the full-data refit from θ*, ``L(θ_S)/L(refit) − 1``.

    python benchmarks/plot_study_projected.py benchmarks/records/study_projected_warm_california_cpu.json \
        benchmarks/records/study_projected_warm_fmnist_cpu.json --out docs/study_projected.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", help="JSON records of study_projected.py")
    parser.add_argument("--out", required=True, help="PNG file to write")
    return parser.parse_args(argv)


def panel(ax, record) -> None:
    floor = record.get("noise_floor")
    scale = 1.0 if floor is None else floor["ratio"]
    for name, cells in record["quality"].items():
        sizes = sorted(cells, key=int)
        excess = [np.asarray(cells[k]["ratios"]) / scale - 1 for k in sizes]
        s = [int(k) for k in sizes]
        lo, med, hi = (np.maximum([np.quantile(e, q) for e in excess], 1e-6) for q in (0.25, 0.5, 0.75))
        (line,) = ax.plot(s, med, marker="o", label=name)
        ax.fill_between(s, lo, hi, color=line.get_color(), alpha=0.15)
    s_all = np.asarray(sorted({int(k) for c in record["quality"].values() for k in c}), dtype=float)
    p = record["problem"]["p"]
    ax.plot(s_all, p / s_all, color="k", ls=":", lw=1, label="p / s")
    problem = record["problem"]
    ylabel = "L(θ_S)/L(θ*) − 1" if floor is None else "L(θ_S)/L(full refit from θ*) − 1"
    ax.set(xscale="log", yscale="log", xlabel="sample size s", ylabel=ylabel)
    args = record["args"]
    ax.set_title(f"{args['data']}: n = {problem['n']}, p = {problem['p']}, {args['protocol']} protocol")
    ax.legend(fontsize=7)


def main(argv=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = parse_args(argv)
    records = [json.loads(Path(r).read_text()) for r in args.records]
    fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 4.2), squeeze=False)
    for ax, record in zip(axes[0], records, strict=True):
        panel(ax, record)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
