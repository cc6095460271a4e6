"""Command-line options of the outlier study (``nlis-jax outliers``), its table, and :func:`run`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax

from nlis_jax.experiments.checks import positive_int_arg, replace_naming_option, seed_arg
from nlis_jax.experiments.outliers.config import CORRUPTIONS, OutlierConfig
from nlis_jax.experiments.outliers.study import OutlierStudyInterrupted, run_outlier_study

__all__ = ["add_arguments", "config_from_args", "format_table", "run"]


def _int_tuple(text) -> tuple[int, ...]:
    if isinstance(text, str):
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    if isinstance(text, int):
        return (text,)
    return tuple(int(t) for t in text)


def _parse_classes(value) -> tuple[int, ...] | None:
    """``"all"`` → ``None`` (all 10 classes); ``"7,9"`` / ``[7, 9]`` → ``(7, 9)``."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    if isinstance(value, (list, tuple)) and len(value) == 1 and str(value[0]).lower() == "all":
        return None
    return _int_tuple(value)


def _optional_int(text: str) -> int | None:
    """``'none'``, ``'full'`` or ``'0'`` -> ``None``; else a positive integer."""
    return None if text.lower() in ("none", "full", "0") else positive_int_arg(text)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _dims_arg(text: str) -> tuple[int, ...]:
    """``"64,256,1024"`` -> ``(64, 256, 1024)``, each a positive integer."""
    parts = [t for t in text.replace(" ", "").split(",") if t]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers, got nothing")
    return tuple(positive_int_arg(t) for t in parts)


def _ridges_arg(text: str) -> tuple[float, ...]:
    """``"0.01,0.1"`` -> ``(0.01, 0.1)``, each a finite number ``>= 0``."""
    parts = [t for t in text.replace(" ", "").split(",") if t]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated numbers >= 0, got nothing")
    return tuple(_non_negative_float(t) for t in parts)


#: The study's options: ``(flags, add_argument keywords)``; every default is ``None``.
_OPTIONS = [
    (("--n",), dict(type=int, help="training examples (default 12000; the binary task has 12000)")),
    (
        ("--classes",),
        dict(help="comma-separated Fashion-MNIST classes, or 'all' (default 7,9: sneaker vs ankle boot)"),
    ),
    (
        ("--flip-fraction", "--outlier-fraction"),
        dict(
            type=float,
            dest="flip_fraction",
            help="share of examples made outliers: labels flipped or inputs corrupted (default 0.02)",
        ),
    ),
    (
        ("--corruption",),
        dict(
            choices=CORRUPTIONS,
            help="planted outliers: flip (labels, the default), or with labels kept: invert (1 - x), "
            "noise (x + noise_scale·z), foreign (an image of a class outside --classes)",
        ),
    ),
    (("--noise-scale",), dict(type=float, help="std of --corruption noise, pixel units (default 0.5)")),
    (
        ("--projection-dim",),
        dict(
            type=_optional_int,
            help="score from the projected [F*Ω | c] with this many columns (for large p; "
            "default none: the dense dual matrix; 0, none or full mean dense too)",
        ),
    ),
    (
        ("--sweep-dims",),
        dict(type=_dims_arg, help="extra projection dimensions to score at the same θ, e.g. 64,256,1024"),
    ),
    (
        ("--sweep-ridges",),
        dict(type=_ridges_arg, help="ridges to score at each sweep dimension, e.g. 0.01,0.1,1"),
    ),
    (
        ("--ridge",),
        dict(
            type=_non_negative_float,
            help="ridge leverage, λ = ridge × mean diagonal of F* F*ᵀ (default 0: exact leverage)",
        ),
    ),
    (("--hidden",), dict(help="hidden widths, comma-separated (default 8)")),
    (("--steps",), dict(type=positive_int_arg, help="Adam steps (default 1000)")),
    (("--lr",), dict(type=float, dest="learning_rate", help="Adam learning rate (default 0.01)")),
    (("--batch-size",), dict(type=_optional_int, help="minibatch size (default: full batch)")),
    (
        ("--pool",),
        dict(type=positive_int_arg, help="average-pooling factor of the 28×28 images (default 4)"),
    ),
    (("--pca",), dict(type=_optional_int, help="PCA components after pooling (default: none)")),
    (
        ("--num-nodes",),
        dict(type=positive_int_arg, help="Gauss-Legendre nodes of the adjoint (default 4)"),
    ),
    (("--dtype",), dict(choices=("float32", "float64"), help="default float32")),
    (("--seed",), dict(type=seed_arg, help="PRNG seed (default 0)")),
    (("--out",), dict(help="output folder for results.json, scores.npz and the PNG grids")),
    (("--no-progress",), dict(action="store_false", dest="progress", default=None, help="no progress bars")),
]


#: Checks that need the data, by the first word of their message, and the option that set the value.
DATA_OPTIONS = {"components": "--pca", "batch_size": "--batch-size"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the outlier study's options on ``parser`` (e.g. the ``outliers`` subparser).

    Options already present on ``parser`` (say a shared ``--seed`` or ``--out``) are left as they are.
    Every option defaults to ``None``; :func:`run` then takes :class:`OutlierConfig`'s default.

    Returns:
        ``parser``.
    """
    for flags, options in _OPTIONS:
        kwargs = {"default": None, **options}
        try:
            parser.add_argument(*flags, **kwargs)
        except argparse.ArgumentError:  # already registered by the caller
            pass
    return parser


def config_from_args(args: argparse.Namespace) -> OutlierConfig:
    """The :class:`OutlierConfig` of parsed options; a missing attribute or ``None`` keeps the default."""
    fields = {}
    mapping = {
        "n": None,
        "classes": _parse_classes,
        "flip_fraction": float,
        "hidden": _int_tuple,
        "steps": int,
        "learning_rate": float,
        "batch_size": None,
        "pool": int,
        "pca": None,
        "num_nodes": int,
        "dtype": str,
        "seed": int,
        "corruption": str,
        "noise_scale": float,
        "projection_dim": None,
        "sweep_dims": tuple,
        "ridge": float,
        "sweep_ridges": tuple,
    }
    options = {name: "lr" if name == "learning_rate" else name for name in mapping}  # the flags' names
    for name, convert in mapping.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        try:
            fields[name] = convert(value) if convert is not None else value
        except ValueError:  # int("a"): the option named, not Python's "invalid literal for int()"
            raise ValueError(
                f"--{options[name].replace('_', '-')}: not a list of integers: {value!r}."
            ) from None
    # a field's error names its option ("--flip-fraction: flip_fraction must ...")
    return replace_naming_option(OutlierConfig(), fields, options)


def format_table(result: dict[str, Any]) -> str:
    """The metrics of a :func:`run_outlier_study` result as a plain-text table."""
    k, corruption = result.get("num_outliers", result["num_flipped"]), result.get("corruption", "flip")
    what = "flipped labels" if corruption == "flip" else f"{corruption} inputs"
    dim = result["diagnostics"].get("projection_dim")
    lines = [
        f"outliers: {result['task']}, n = {result['n']}, p = {result['p']}, {k} {what}, "
        f"{'dense' if dim is None else f'projected (dim {dim})'}, {result['timings']['total_s']:.1f} s",
        f"{'score':<20}{'kind':<11}{'AUROC':>8}{'P@k':>8}{'P@2k':>8}{'wall s':>9}{'peak MiB':>10}",
    ]
    costs = result["diagnostics"].get("costs", {})
    shared = [
        f"{stage} {_cost_cells(costs[stage]).strip()}" for stage in ("fit", "dual_matrix") if stage in costs
    ]
    if shared:
        lines.insert(1, "wall s, peak RssAnon MiB: " + "; ".join(shared))
    for name, m in result["metrics"].items():
        lines.append(f"{name:<20}{m['kind']:<11}" + _metric_cells(m) + _cost_cells(costs.get(name)))
    lines.append(f"best nonlinear: {result['best_nonlinear']}; best overall: {result['best_overall']}")
    for sweep in result["diagnostics"].get("sweep", []):
        dim = "dense" if sweep["dim"] is None else f"projection dim {sweep['dim']}"
        ridge = f", ridge {sweep['ridge']:g}" if sweep["ridge"] else ""
        lines.append(f"{dim}{ridge} (dual: {_cost_cells(sweep['costs']['dual_matrix']).strip()}):")
        for name, m in sweep["metrics"].items():
            lines.append(f"  {name:<18}{'':<11}" + _metric_cells(m))
    return "\n".join(lines)


def _metric_cells(m: dict) -> str:
    return f"{m['auroc']:>8.4f}{m['precision_at_k']:>8.3f}{m['precision_at_2k']:>8.3f}"


def _cost_cells(cost: dict | None) -> str:
    if not cost:
        return ""
    peak = cost.get("rss_peak_mib")
    return f"{cost['wall_s']:>9.2f}" + (f"{peak:>10.0f}" if peak is not None else f"{'n/a':>10}")


def run(args: argparse.Namespace) -> int:
    """``nlis-jax outliers``: run the study from parsed CLI options, print the metrics table, return 0.

    Reads ``args.out`` (folder, or ``None`` to write nothing), ``args.seed``, ``args.n``, ``args.classes``
    (``None`` for the default pair, ``"all"``, ``"7,9"`` or a list), ``args.progress`` and any option of
    :func:`add_arguments`; a missing attribute or ``None`` means :class:`OutlierConfig`'s default.

    Raises:
        nlis_jax.experiments.datasets.DatasetNotFoundError: when Fashion-MNIST is not found.
    """
    try:
        config = config_from_args(args)
    except (TypeError, ValueError) as exc:  # a bad option value: a usage error naming it, no traceback
        print(f"nlis-jax outliers: error: {exc}", file=sys.stderr)
        return 2
    progress = getattr(args, "progress", None)
    out = getattr(args, "out", None)
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)  # set before any array exists
    try:
        result = run_outlier_study(config, out_dir=out, progress=True if progress is None else bool(progress))
    except ValueError as exc:  # options the data decide (classes, --n, --pca, --pool, --batch-size)
        text = str(exc)
        option = next((f"{o}: " for word, o in DATA_OPTIONS.items() if text.startswith(word + " ")), "")
        print(f"nlis-jax outliers: error: {option}{text}", file=sys.stderr)
        return 2
    except OutlierStudyInterrupted as stop:
        where = stop.result.get("files", {}).get("results", "nowhere (no --out)")
        print(f"nlis-jax outliers: interrupted; finished stages written to {where}", file=sys.stderr)
        return 130
    print(format_table(result))
    if out is not None:
        print(f"wrote {', '.join(result['files'].values())}")
    return 0
