"""The ``nlis-jax`` command line.

``nlis-jax run`` compares uniform, linear leverage, nonlinear leverage and norm sampling (oracle scores at
θ*) and the practical pilot and refinement schemes over a grid of sample sizes with repeats, prints the
table of ``L(θ_S)/L(θ*)`` on the full data, and writes ``results.json`` and plots. With no options it runs
the California Housing study at a size that takes about ten seconds on two CPU cores.

``nlis-jax outliers`` runs the outlier study of :mod:`nlis_jax.experiments.outliers` (when installed).

This module only parses options; the studies live in :mod:`nlis_jax.experiments`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from nlis_jax.experiments.checks import positive_int_arg, replace_naming_option, seed_arg, size_arg, sizes_arg
from nlis_jax.experiments.configs import CONFIGS, METHODS, OPTIMIZERS, TAILS_MIN, shrink

#: Exit code for a usage error or a missing data set (argparse's convention).
EXIT_USAGE = 2
#: Exit code after Ctrl-C (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED = 130
#: Exit code after SIGTERM (128 + SIGTERM: ``kill``, ``timeout``, a job scheduler).
EXIT_TERMINATED = 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM taken as an interrupt by the console script: the commands' cleanup runs (``score --out``'s
    temporary file removed, a study's finished cells written) as after Ctrl-C; the exit code is 143."""

    received = False  # set by the handler: a study turns the interrupt into its own, results attached


def _on_sigterm(signum, frame):
    _Terminated.received = True
    raise _Terminated()


_EPILOG = """\
examples:
  nlis-jax run                                   # California Housing, default grid
  nlis-jax run --sizes 0.005,0.01,0.02 --repeats 50 --out results/cal
  nlis-jax run --dataset synthetic --n 1000000 --sizes 0.001,0.01 --repeats 5
  nlis-jax run --dataset synthetic --n 1000000 --correlation 0.95 --tails 3
  nlis-jax run --dataset fashion-mnist --classes all --n 4000
  nlis-jax run --dataset digits
  nlis-jax score --x X.npy --y Y.npy --model mlp --out scores.npy   # your own files, out of core
  nlis-jax run --dataset flights --repeats 10   # single-index model; --model mlp for the network

data: California Housing is read from scikit-learn's cache (cal_housing_py3.pkz) in --data-home or
$SCIKIT_LEARN_DATA; Fashion-MNIST from the four IDX files in --data-home/fashion-mnist,
$NLIS_FASHION_MNIST, $SCIKIT_LEARN_DATA/fashion-mnist, $SCIKIT_LEARN_DATA/../fashion-mnist,
~/scikit_learn_data/fashion-mnist or /usr/share/datasets/fashion-mnist. A missing
data set is downloaded once into that cache, as scikit-learn does (--no-download: never; offline, point
SCIKIT_LEARN_DATA at an existing cache).

environment: NLIS_SMALL=1 shrinks the defaults of `nlis-jax run` to a smoke-test size (2 repeats,
2 sizes, 50 steps, at most 2,000 rows of generated or subsampled data (California keeps its 20,640), no
wall-time comparison) and those of `nlis-jax active` to its own (see its --help); explicit options still
apply. `outliers` and `score` do not read it.
"""


#: What an option given as 'none' parses to (``None`` itself means "not given").
NONE = "none"


def _size_or_none(text: str):
    if text.lower() in ("none", "off"):
        return NONE
    return size_arg(text)


def _float_or_none(text: str):
    if text.lower() in ("none", "off"):
        return NONE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _tails(text: str):
    value = _float_or_none(text)
    if value != NONE and not (math.isfinite(value) and value >= TAILS_MIN):
        raise argparse.ArgumentTypeError(
            f"degrees of freedom must be a finite number >= {TAILS_MIN:g}, got {text!r}"
        )
    return value


def _methods(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    from nlis_jax.experiments.flights import FLIGHTS_METHODS

    known = METHODS + tuple(m for m in FLIGHTS_METHODS if m not in METHODS)
    unknown = [v for v in values if v not in known]
    if not values:
        raise argparse.ArgumentTypeError(
            f"name at least one method, got {text!r}; choose from {','.join(known)}"
        )
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {','.join(known)}")
    return values


def _classes(text: str):
    if text.lower() in ("all", "none"):
        return NONE
    try:
        labels = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"classes must be 'all' or a comma list of labels: {text!r}"
        ) from None
    if len(labels) < 2:
        raise argparse.ArgumentTypeError(f"name at least two classes (or 'all'), got {text!r}")
    return labels


def _int_or_none(text: str):
    return NONE if text.lower() in ("none", "off") else positive_int_arg(text)


# option dest -> (config field, data sets it applies to; None = all)
_FIELDS = {
    "sizes": ("sizes", None),
    "repeats": ("repeats", None),
    "methods": ("methods", None),
    "steps": ("num_steps", None),
    "full_steps": ("full_steps", None),
    "optimizer": ("optimizer", None),
    "lr": ("learning_rate", None),
    "radius": ("radius", None),
    "mix": ("mix", None),
    "pilot_size": ("pilot_size", None),
    "timing_size": ("timing_size", None),
    "num_nodes": ("num_nodes", ("fashion-mnist", "digits")),  # the network problems' adjoints
    "n": ("n", ("synthetic", "fashion-mnist")),
    "d": ("d", ("synthetic",)),
    "noise": ("noise", ("synthetic",)),
    "tails": ("tails", ("synthetic",)),
    "correlation": ("correlation", ("synthetic",)),
    "data_seed": ("data_seed", ("synthetic", "fashion-mnist", "digits")),
    "classes": ("classes", ("fashion-mnist", "digits")),
    "hidden": ("hidden", ("fashion-mnist", "digits")),
    "pool": ("pool", ("fashion-mnist",)),
    "components": ("components", ("fashion-mnist", "digits")),
    "data_home": ("data_home", ("california", "fashion-mnist")),
    "download": ("download", ("california", "fashion-mnist")),
}


def _add_study_options(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("study")
    g.add_argument(
        "--dataset",
        choices=sorted([*CONFIGS, "flights"]),
        default="california",
        help="data set (default: california; flights: nlis_jax.experiments.flights, needs the flights extra)",
    )
    g.add_argument(
        "--sizes",
        type=sizes_arg,
        help="comma list of sample sizes: values < 1 are fractions of n (0.005,0.01), values >= 1 row counts",
    )
    g.add_argument("--repeats", type=positive_int_arg, help="independent samples per scheme and size")
    g.add_argument("--seed", type=seed_arg, default=0, help="PRNG seed: jax.random.key(seed) (default 0)")
    g.add_argument(
        "--out",
        default="nlis_results",
        help="output folder for results.json and plots (default nlis_results)",
    )
    g.add_argument(
        "--methods",
        type=_methods,
        help=f"comma list of schemes among {','.join(METHODS)} (default: all); flights: "
        "uniform,linear_leverage,pilot_leverage,refined_leverage,nonlinear_leverage (default) and the opt-in "
        "residual_leverage",
    )
    _add_overwrite(g)
    g.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.add_argument(
        "--compilation-cache",
        metavar="DIR",
        help="keep jax's compiled programs in DIR (persistent compilation cache): a repeated run with the "
        f"same shapes skips compilation (default: ${CACHE_ENV}, else $XDG_CACHE_HOME/nlis_jax/jax or "
        "~/.cache/nlis_jax/jax)",
    )
    g.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help=f"compile every program afresh and keep none on disk (also {CACHE_ENV}=off)",
    )


def _add_overwrite(parser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --out even if it holds an earlier run (default: a fresh sub-folder run-N)",
    )


def _add_training_options(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("training")
    g.add_argument(
        "--steps",
        type=positive_int_arg,
        help="steps of every sample fit (projected gradient; flights mlp: Adam)",
    )
    g.add_argument(
        "--full-steps", type=positive_int_arg, help="steps of the full-data fit (default: --steps)"
    )
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="gd: projected Nesterov GD with step lr/L̂ (L̂ a curvature bound; single-index models); "
        "adam: Adam with cosine decay (networks)",
    )
    g.add_argument("--lr", type=float, help="step multiplier (gd) or initial learning rate (adam)")
    g.add_argument("--radius", type=_float_or_none, help="l2-ball radius of the constraint, or 'none'")
    g.add_argument("--mix", type=float, help="mix non-uniform scores with uniform: (1-α)p + α/n")
    g.add_argument("--pilot-size", type=size_arg, help="uniform pilot sample (fraction or rows)")
    g.add_argument(
        "--timing-size",
        type=_size_or_none,
        help="sample size of the wall-time comparison with full-data training, or 'none' to skip it",
    )
    g.add_argument(
        "--num-nodes", type=positive_int_arg, help="Gauss-Legendre nodes of the quadrature adjoint (networks)"
    )


def _add_synthetic_options(g) -> None:
    g.add_argument(
        "--n", type=positive_int_arg, help="rows: generated (synthetic) or subsampled (fashion-mnist)"
    )
    g.add_argument("--d", type=positive_int_arg, help="features of the synthetic data")
    g.add_argument("--noise", type=float, help="noise standard deviation of the synthetic data")
    g.add_argument(
        "--tails",
        type=_tails,
        help="synthetic: multivariate-t rows with this many degrees of freedom",
    )
    g.add_argument("--correlation", type=float, help="synthetic: AR(1) feature correlation ρ in (-1, 1)")
    g.add_argument(
        "--data-seed", type=seed_arg, help="seed of data generation / subsampling / train-test split"
    )


def _add_data_options(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("data")
    _add_synthetic_options(g)
    g.add_argument(
        "--classes", type=_classes, help="fashion-mnist/digits: 'all' or a comma list of labels, e.g. 0,6"
    )
    g.add_argument(
        "--hidden", type=positive_int_arg, help="hidden width of the network (ReLU; flights mlp: tanh)"
    )
    g.add_argument(
        "--components",
        type=_int_or_none,
        help="fashion-mnist/digits: project the inputs on this many principal axes, or 'none'",
    )
    g.add_argument(
        "--pool", type=positive_int_arg, help="fashion-mnist: average-pooling block (4: 7x7 = 49 features)"
    )
    g.add_argument(
        "--data-home", help="folder with the data (scikit-learn's data home; fashion-mnist/ inside it)"
    )
    g.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="download a missing data set once into the cache (default) or, with --no-download, never",
    )


def _add_run_parser(sub) -> None:
    run = sub.add_parser(
        "run",
        help="compare sampling schemes over sample sizes (default: California Housing)",
        description=(
            "Compare sampling schemes over a grid of sample sizes with repeats: L(θ_S)/L(θ*) on the full "
            "data (median and quartiles), scoring and training wall times, and a wall-time comparison of "
            "practical schemes against full-data training to the same loss. Prints the table, writes "
            "OUT/results.json and OUT/*.png. Options left out take the data set's defaults "
            "(nlis_jax.experiments.*Config)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    _add_study_options(run)
    _add_training_options(run)
    _add_data_options(run)
    from nlis_jax.experiments.flights import add_flights_arguments

    add_flights_arguments(run)


def _add_outliers_parser(sub, outliers_module) -> None:
    out = sub.add_parser(
        "outliers",
        help="plant outliers (flipped labels or corrupted inputs), rank the data by score, measure",
        description=(
            "Outlier study of nlis_jax.experiments.outliers: flip a share of Fashion-MNIST labels "
            "(or corrupt inputs: --corruption), fit a ReLU network, rank the examples by nonlinear "
            "leverage (dense or projected: --projection-dim) and baselines, report AUROC, precision, "
            "time and memory."
        ),
    )
    out.add_argument("--seed", type=seed_arg, default=None, help="PRNG seed (default 0)")
    out.add_argument("--out", default="nlis_outliers", help="output folder (default nlis_outliers)")
    _add_overwrite(out)
    if outliers_module is not None and hasattr(outliers_module, "add_arguments"):
        outliers_module.add_arguments(out)  # the study's own options (skips --seed/--out, defined above)


def _add_active_parser(sub) -> None:
    from nlis_jax.experiments.active import add_active_arguments

    active = sub.add_parser(
        "active",
        help="active learning: label-free leverage chooses which points to label",
        description="Active-learning study (nlis_jax.experiments.active): L(θ)/L(θ*) against labels.",
    )
    add_active_arguments(active)
    _add_overwrite(active)


def _add_score_parser(sub) -> None:
    from nlis_jax.experiments.score_files import add_score_arguments

    score = sub.add_parser(
        "score",
        help="sampling scores of your own .npy files (out of core, written to a .npy memmap)",
        description="Leverage or norm scores of X.npy (and Y.npy) under a single-index model or an MLP; "
        "the files are read as memmaps chunk by chunk and the scores written to --out.",
    )
    add_score_arguments(score)


def build_parser(outliers_module=None) -> argparse.ArgumentParser:
    """The ``nlis-jax`` parser; ``outliers_module`` (:mod:`nlis_jax.experiments.outliers`) adds the
    outlier options."""
    parser = argparse.ArgumentParser(
        prog="nlis-jax",
        description="Importance sampling of training data for nonlinear models: sampling studies.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,outliers,active,score}")
    sub.required = True
    _add_run_parser(sub)
    _add_outliers_parser(sub, outliers_module)
    _add_active_parser(sub)
    _add_score_parser(sub)
    return parser


def _data_errors() -> tuple[type, ...]:
    """Errors that the data or the options decide (a message and exit 2, no traceback): a corrupt data
    file, and a fit that diverged (its message names the step and asks for a lower learning rate)."""
    from nlis_jax._train import NonFiniteLossError
    from nlis_jax.experiments.datasets import DatasetCorruptError

    return (DatasetCorruptError, NonFiniteLossError)


#: The module of the outlier study, imported on demand.
OUTLIERS_MODULE = "nlis_jax.experiments.outliers"


def _load_outliers():
    """The outlier study's module, imported on demand; ``None`` when this install does not have it."""
    import importlib

    try:
        return importlib.import_module(OUTLIERS_MODULE)
    except ImportError as exc:
        if getattr(exc, "name", None) not in (OUTLIERS_MODULE, None):
            raise  # the module exists but one of its imports failed: show that
        return None


def make_config(args: argparse.Namespace):
    """The study config of the parsed ``run`` options (defaults of the data set's config class)."""
    cls = CONFIGS[args.dataset]
    base = shrink(cls()) if os.environ.get("NLIS_SMALL", "") not in ("", "0") else cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    overrides = {}
    for dest, (field, datasets) in _FIELDS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if datasets is not None and args.dataset not in datasets:
            raise ValueError(f"--{dest.replace('_', '-')} does not apply to --dataset {args.dataset}.")
        if field in fields:
            overrides[field] = None if value == NONE else value
    # the config names its field ("learning_rate must be ..."): the error names the option
    return replace_naming_option(base, overrides, {f: d for d, (f, _) in _FIELDS.items()})


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _problem(args: argparse.Namespace, config):
    """The study's problem, or ``None`` after printing why not (missing data set, bad option)."""
    from nlis_jax import experiments
    from nlis_jax.experiments import datasets

    try:
        return experiments.make_problem(config)
    except datasets.DatasetNotFoundError as exc:
        print(
            f"nlis-jax run: data set {args.dataset!r} not found.\n{exc}\n"
            "On the command line: --data-home FOLDER points at the data (scikit-learn's data home; "
            "Fashion-MNIST in FOLDER/fashion-mnist); without --no-download nlis-jax fetches a missing set "
            "once (needs internet).",
            file=sys.stderr,
        )
    except ValueError as exc:
        print(f"nlis-jax run: error: {exc}", file=sys.stderr)
    except MemoryError:  # numpy's traceback before
        print(
            f"nlis-jax run: error: the {args.dataset} data set does not fit in memory; use a smaller --n "
            "or --d.",
            file=sys.stderr,
        )
    return None


def _preload_plotting() -> None:
    """Import matplotlib's figure machinery in a background thread while the study runs (the study's
    compiled programs release the GIL), so that the plots at the end do not wait for it (the import
    there waits for this one to finish). A failed import is left to the import at plotting time, which
    reports it."""
    import threading

    def load():
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401
            import matplotlib.ticker  # noqa: F401
        except Exception:  # noqa: BLE001 - reported by the import in plot_study
            pass

    threading.Thread(target=load, name="nlis-jax-preload-matplotlib").start()


def _start_plots(out: Path, plots: list, grid_summary: dict) -> concurrent.futures.Future:
    """``run_study``'s ``on_grid``: the study's plots (they show the grid alone) written in a thread
    while the wall-time comparison compiles its programs (its timed runs wait for them); the future is
    appended to ``plots``."""
    from nlis_jax.experiments.plots import plot_study

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlis-jax-plots")
    plots.append(pool.submit(plot_study, grid_summary, out))
    pool.shutdown(wait=False)
    return plots[-1]


def _write(
    args: argparse.Namespace, summary: dict, plots: concurrent.futures.Future | None = None
) -> list[Path]:
    """``OUT/results.json`` and, unless ``--no-plots``, the study's plots (those of ``plots``, written
    already, when given)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    written = [out / "results.json"]
    if plots is not None:
        written += plots.result()
    elif not args.no_plots:
        from nlis_jax.experiments.plots import plot_study

        written += plot_study(summary, out)
    return written


#: Environment variable naming the compilation cache folder of ``nlis-jax run`` (``off``: none).
CACHE_ENV = "NLIS_JAX_COMPILATION_CACHE"
#: Size limit of that cache (jax evicts the least recently used programs beyond it).
CACHE_MAX_BYTES = 1 << 30


def default_compilation_cache() -> Path | None:
    """The compilation cache folder of ``nlis-jax run`` without ``--compilation-cache``:
    :data:`CACHE_ENV` (``None`` when it says ``off``), else ``$XDG_CACHE_HOME/nlis_jax/jax``, else
    ``~/.cache/nlis_jax/jax``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "none", "0"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path("~", ".cache").expanduser()
    return Path(base, "nlis_jax", "jax")


def enable_compilation_cache(directory: str | os.PathLike) -> bool:
    """jax's persistent compilation cache in ``directory``, for every program however fast it compiled
    (the study compiles a few dozen, most in well under a second). Returns ``False``, leaving the cache
    off, when the folder cannot be created or written."""
    import jax

    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    moved = jax.config.jax_compilation_cache_dir != str(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if importlib.util.find_spec("filelock") is not None:  # jax needs it for the size limit, else no cache
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    if moved:  # a cache jax already opened elsewhere (the caller's own) would keep getting the programs
        _reopen_persistent_cache()
    return True


def _reopen_persistent_cache() -> None:
    """Make jax open its persistent compilation cache afresh, from the settings of the moment, at its next
    compilation. jax opens the cache once per process (at the first compilation after a folder is set) and
    keeps reading and writing that folder, also after ``jax_compilation_cache_dir`` changes or is unset,
    until ``jax._src.compilation_cache.reset_cache()`` (private: what jax's own tests call between cache
    folders; skipped when a jax version lacks it)."""
    try:
        from jax._src import compilation_cache
    except ImportError:  # pragma: no cover - jax moved its private module
        return
    reset = getattr(compilation_cache, "reset_cache", None)
    if reset is not None:
        reset()


#: The jax settings that commands change (float64 studies turn on x64; ``run`` the compilation cache):
#: :func:`main` puts them back when it returns or raises, so that a call in a notebook or a test leaves
#: the process's later work (its dtypes, what it writes to disk) as it was.
JAX_SETTINGS = (
    "jax_enable_x64",
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
    "jax_compilation_cache_max_size",
)


def _global_setting(jax, name: str):
    """The process-wide value of a jax setting (not that of a ``with jax.enable_x64(...)`` block): a
    state's global value, a flag's value (some flags, e.g. ``jax_disable_most_optimizations``, are not
    attributes of ``jax.config``)."""
    holder = getattr(jax.config, "_value_holders", {}).get(name)
    if holder is None:
        return getattr(jax.config, name)
    return holder.get_global() if hasattr(holder, "get_global") else holder.value


@contextlib.contextmanager
def _restoring_jax_settings():
    """Put back the :data:`JAX_SETTINGS` that the block changed, however it ends; when a cache setting
    changed, jax also drops the persistent cache it opened (the next compilation opens the restored one,
    if any). Arrays made under x64 stay valid after x64 goes off."""
    import jax

    before = {name: _global_setting(jax, name) for name in JAX_SETTINGS}
    try:
        yield
    finally:
        changed = [name for name in JAX_SETTINGS if _global_setting(jax, name) != before[name]]
        for name in changed:
            jax.config.update(name, before[name])
        if any(name != "jax_enable_x64" for name in changed):
            _reopen_persistent_cache()


def setup_compilation_cache(args: argparse.Namespace) -> None:
    """The persistent compilation cache of ``run`` (on by default; ``--no-compilation-cache`` or
    ``$NLIS_JAX_COMPILATION_CACHE=off``: off, also a cache the caller configured before an in-process
    ``main``)."""
    if args.no_compilation_cache and args.compilation_cache:
        raise ValueError("--compilation-cache and --no-compilation-cache contradict each other: pass one.")
    where = None if args.no_compilation_cache else args.compilation_cache or default_compilation_cache()
    if where is None:
        disable_compilation_cache()
    elif not enable_compilation_cache(where) and (
        args.compilation_cache or os.environ.get(CACHE_ENV, "").strip()
    ):
        # a folder the user named (the option or the variable) that cannot be written: said, not silent
        named = f"--compilation-cache {where}" if args.compilation_cache else f"{CACHE_ENV}={where}"
        print(f"nlis-jax run: cannot write {named}; compiling afresh.", file=sys.stderr)


def disable_compilation_cache() -> None:
    """Compile afresh and write nothing to disk, whatever cache the process had configured (``main``
    puts the setting back when it returns)."""
    import jax

    if jax.config.jax_enable_compilation_cache:
        jax.config.update("jax_enable_compilation_cache", False)
        _reopen_persistent_cache()


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    import jax

    from nlis_jax.experiments import flights

    try:
        setup_compilation_cache(args)
    except ValueError as exc:
        print(f"nlis-jax run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dataset == "flights":
        return flights.run_flights(args, argv)
    given = [name for name in flights.FLIGHTS_ONLY_OPTIONS if getattr(args, name) is not None]
    if given:
        option = given[0].replace("_", "-")
        print(f"nlis-jax run: error: --{option} needs --dataset flights.", file=sys.stderr)
        return EXIT_USAGE
    if args.dataset in ("california", "synthetic"):
        jax.config.update("jax_enable_x64", True)  # float64 studies; set before any array exists
    from nlis_jax import experiments

    try:
        config = make_config(args)
    except (ValueError, TypeError) as exc:
        print(f"nlis-jax run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    t0 = time.perf_counter()
    problem = _problem(args, config)
    if problem is None:
        return EXIT_USAGE
    load_s = time.perf_counter() - t0
    try:
        _check_sizes(config, problem.n)
    except ValueError as exc:
        print(f"nlis-jax run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    key = experiments.keys.key(args.seed)  # jax.random.key(seed), placed from the host
    plots: list = []  # the future of the plots, once the grid is done
    on_grid = None
    if not args.no_plots:
        _preload_plotting()
        on_grid = functools.partial(_start_plots, Path(args.out), plots)
    try:
        result = experiments.run_study(
            key, config, problem=problem, progress=not args.no_progress, on_grid=on_grid
        )
    except experiments.StudyInterrupted as stop:
        summary = dict(stop.summary, seed=args.seed, argv=list(argv), load_s=load_s)
        args.no_plots = True  # a grid cut short is not plotted; a finished grid's plots are waited for
        written = _write(args, summary, plots[0] if plots else None)
        print(
            f"nlis-jax run: interrupted; finished cells written to {', '.join(map(str, written))}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    summary = dict(result.summary, seed=args.seed, argv=list(argv), load_s=load_s)
    summary["wall_s"] = time.perf_counter() - t0
    written = _write(args, summary, plots[0] if plots else None)
    _warn_unconverged(summary["full"])
    _warn_unconverged_samples(summary)
    print(experiments.format_table(summary))
    print(f"total wall time {summary['wall_s']:.1f} s; wrote " + ", ".join(str(p) for p in written))
    _note_earlier_plots(Path(args.out), written)
    return 0


def _note_earlier_plots(out: Path, written) -> None:
    """A note on stderr naming the figures in ``out`` that this run did not write (``--overwrite`` into an
    earlier run's folder kept them, e.g. another data set's ``accuracy.png`` beside these results)."""
    mine = {Path(p).resolve() for p in written}
    earlier = sorted(p.name for p in out.glob("*.png") if p.resolve() not in mine)
    if earlier:
        print(
            f"nlis-jax run: note: {out} also holds {', '.join(earlier)} from an earlier run.", file=sys.stderr
        )


#: The full-data fit counts as converged when its loss moved by at most this fraction over its last tenth
#: of steps (``rel_change``): ratios L(θ_S)/L(θ*) at the largest sample sizes lie within about 1% of 1, so
#: an L(θ*) still moving by more than 0.1% is not the optimum they are meant to compare against.
FULL_FIT_RTOL = 1e-3


def _warn_unconverged(full: dict) -> None:
    """A warning on stderr when the full-data fit (``summary["full"]``) has not converged."""
    change = full.get("rel_change")
    if change is None or not change > FULL_FIT_RTOL:
        return
    steps = full["num_steps"]
    over = f"the last tenth of its {steps} steps" if steps >= 10 else f"its {steps} steps"
    print(
        f"nlis-jax run: warning: the full-data fit has not converged (its loss moved by up to {change:.2g} "
        f"relative over {over}, more than {FULL_FIT_RTOL:g}): "
        "L(θ*) is not the full-data optimum, so the ratios L(θ_S)/L(θ*) are off (below 1 where a sample "
        "fit beats it); raise --full-steps or lower --lr.",
        file=sys.stderr,
    )


def _warn_unconverged_samples(summary: dict) -> None:
    """A warning on stderr naming the cells (scheme, size) whose sample fits have not converged: their
    ratios then carry optimisation error beside the sampling error they are meant to measure."""
    cells = [
        (record["max_rel_change"], method, record["size"])
        for method, entry in summary["methods"].items()
        for record in entry["results"]
        if record.get("max_rel_change") is not None and record["max_rel_change"] > FULL_FIT_RTOL
    ]
    if not cells:
        return
    worst, method, size = max(cells)
    total = sum(len(entry["results"]) for entry in summary["methods"].values())
    print(
        f"nlis-jax run: warning: the sample fits of {len(cells)} of {total} cells (scheme, size) have not "
        f"converged (the worst, {method} at s = {size}, moved by {worst:.2g} relative over the last tenth "
        f"of its steps, more than {FULL_FIT_RTOL:g}): their ratios mix optimisation error into the sampling "
        "error; raise --steps or lower --lr.",
        file=sys.stderr,
    )


def _check_sizes(config, n: int) -> None:
    """``ValueError`` (a usage error) when a sample size of ``config`` asks for more than ``n`` rows."""
    from nlis_jax.experiments.configs import resolve_size, resolve_sizes

    named = [("--sizes", resolve_sizes, config.sizes)]
    named += [
        (f"--{f.replace('_', '-')}", resolve_size, getattr(config, f, None))
        for f in ("pilot_size", "timing_size")
    ]
    for option, resolve, value in named:
        try:
            if value is not None:
                resolve(value, n)
        except ValueError as exc:  # the same message for every option: name the one at fault
            raise ValueError(f"{option}: {exc}") from None


def prepare_out(out: str, overwrite: bool) -> Path:
    """The output folder, checked before any work (created only when results are written).

    An existing file (or a file where a parent folder should be), or a place this user cannot write,
    raises ``ValueError``. A folder that already holds files gets a fresh sub-folder ``run-N`` (the
    first free ``N``) unless ``overwrite``, so an earlier run's results are never overwritten silently.
    """
    if not out.strip():  # Path("") is the working folder: the results went to ./run-N
        raise ValueError("--out is empty: name the output folder.")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        n = 1
        while (path / f"run-{n}").exists():
            n += 1
        path = path / f"run-{n}"
        note = f"nlis-jax: {out} holds an earlier run; writing to {path} (--overwrite: into {out})"
        print(note, file=sys.stderr)
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder.")
    try:  # a real write (os.access says yes to root everywhere, and to read-only file systems)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write in {existing} ({exc.strerror or exc}).") from None
    return path


def _outliers(args: argparse.Namespace, outliers) -> int:
    run = None if outliers is None else getattr(outliers, "run", None)
    if run is None:
        print(
            f"nlis-jax outliers: not available: the outlier study ({OUTLIERS_MODULE} with run(args)) is not "
            "part of this installation of nlis_jax.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from nlis_jax.experiments import datasets

    try:
        code = run(args)
    except datasets.DatasetNotFoundError as exc:
        print(f"nlis-jax outliers: data set not found.\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if code is None else int(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nlis-jax`` console script; returns the exit code. Called in-process (a notebook,
    a test), it leaves jax's :data:`JAX_SETTINGS` as it found them, whichever way the command ends; while
    it runs they are process-wide (jax's global config: ``run`` turns on ``jax_enable_x64``), so other
    threads of the process see them too: run it alone, or in a subprocess."""
    try:
        with _sigterm_as_interrupt(argv is None):
            return _main(argv)
    except _Terminated:  # outside a command (parsing, or as the handler is set or restored): no cleanup
        return EXIT_TERMINATED
    except BrokenPipeError:  # stdout's reader left (``nlis-jax ... | head``): what was written stays
        if argv is None:  # the console: later writes and the final flush go nowhere, not to a traceback
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


@contextlib.contextmanager
def _sigterm_as_interrupt(console: bool):
    """While a console run (``argv=None``) lasts, on the main thread, where the default would end the
    process without any cleanup: SIGTERM raises :class:`_Terminated`. The previous handler comes back
    afterwards (a script or notebook that calls ``main()`` keeps its own)."""
    install = (
        console
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    )
    _Terminated.received = False
    if not install:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


#: Exit code when stdout's reader closed the pipe (as Python's own handling of ``EPIPE`` documents).
EXIT_BROKEN_PIPE = 1


def _main(argv: list[str] | None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    outliers = _load_outliers() if command == "outliers" else None
    parser = build_parser(outliers)
    args, unknown = parser.parse_known_args(argv)
    command_parser = _command_parser(parser, args.command)  # its usage and 'nlis-jax CMD: error:'
    if unknown:  # unknown options are usage errors on every subcommand
        before = argv[: argv.index(args.command)] if args.command in argv else []  # nlis-jax's own
        owner = parser if any(u in before for u in unknown) else command_parser
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra = []
    if args.command != "score":  # score's --out is one .npy file, not a results folder
        try:
            args.out = str(prepare_out(args.out, args.overwrite))
        except ValueError as exc:
            command_parser.error(str(exc))
    try:
        with _restoring_jax_settings():  # every command imports jax; parsing and usage errors do not
            code = _dispatch(parser, args, argv, outliers)
    except KeyboardInterrupt:
        said = "terminated" if _Terminated.received else "interrupted"
        print(f"nlis-jax {args.command}: {said}.", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except _data_errors() as exc:
        print(f"nlis-jax {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if code == EXIT_INTERRUPTED and _Terminated.received:
        code = EXIT_TERMINATED
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED) and from_console:
        # results are written: skip the interpreter teardown, which can race XLA's compiler threads
        # still running after a Ctrl-C during compilation
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command`` (``parser`` itself when it has none of that name)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command, parser)
    return parser  # pragma: no cover - build_parser always adds the commands


def _dispatch(parser, args: argparse.Namespace, argv: list[str], outliers) -> int:
    if args.command == "run":
        return _run(args, argv)
    if args.command == "outliers":
        return _outliers(args, outliers)
    if args.command == "active":
        from nlis_jax.experiments.active import run_active

        return run_active(args, argv)
    if args.command == "score":
        from nlis_jax.experiments.score_files import run_score

        return run_score(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
