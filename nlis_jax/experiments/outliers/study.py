"""The outlier study's runner: plant outliers (flipped labels or corrupted inputs), fit, score, measure,
and write the results."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nlis_jax as nj
from nlis_jax.experiments import nets
from nlis_jax.experiments.features import label_targets, prepare_features
from nlis_jax.experiments.memory import measured
from nlis_jax.experiments.outliers.config import BASELINE_SCORES, NONLINEAR_SCORES, OutlierConfig
from nlis_jax.experiments.outliers.data import load_data, plant_outliers
from nlis_jax.experiments.outliers.grid import save_score_grid
from nlis_jax.experiments.outliers.metrics import auroc, precision_at_k
from nlis_jax.experiments.outliers.scores import dual_scores, outlier_scores, projected_dual
from nlis_jax.experiments.report import environment

__all__ = ["OutlierStudyInterrupted", "run_outlier_study"]

#: The model: ``nets.mlp`` with ReLU, built ONCE so that the compiled kernels (``nj.fit``,
#: ``nj.dual_matrix``, the baselines), which take ``apply_fn`` as a static argument, are reused.
APPLY_FN = nets.mlp(jax.nn.relu)


@functools.lru_cache(maxsize=16)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    """One Adam object per learning rate, so :func:`nlis_jax.fit` reuses its compiled loop."""
    return optax.adam(learning_rate)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[outliers] {msg}", file=sys.stderr, flush=True)


class _Data(NamedTuple):
    images: np.ndarray  # as the model sees them: corrupted inputs included
    labels: np.ndarray  # clean
    noisy: np.ndarray  # given (flipped labels included)
    flipped: np.ndarray  # the outlier mask: flipped labels or corrupted inputs
    num_classes: int
    class_names: tuple[str, ...] | None
    xs: jax.Array
    ts: jax.Array


def _prepare(key, config: OutlierConfig, data, foreign) -> _Data:
    """Load, plant ``round(flip_fraction · n)`` outliers (:func:`plant_outliers`), build features and
    ``±1`` / one-hot targets."""
    dtype = np.dtype(config.dtype)
    images, labels, num_classes, class_names = load_data(config, data)
    images, noisy, flipped = plant_outliers(key, config, images, labels, num_classes, foreign)
    xs = jnp.asarray(prepare_features(images, pool=config.pool, pca=config.pca, dtype=dtype))
    ts = jnp.asarray(label_targets(noisy, num_classes, dtype))
    return _Data(images, labels, noisy, flipped, num_classes, class_names, xs, ts)


def _fit(k_init, k_fit, config: OutlierConfig, d: _Data, progress: bool):
    """Adam on the squared loss of the NOISY targets, from an initialisation drawn with ``k_init``
    (``k_fit``: the minibatches) -> :class:`nlis_jax.FitResult`."""
    out_dim = 1 if d.num_classes == 2 else d.num_classes
    sizes = (d.xs.shape[1], *config.hidden, out_dim)
    params = nets.mlp_init(k_init, sizes, dtype=np.dtype(config.dtype))
    minibatch = config.batch_size is not None
    return nj.fit(
        APPLY_FN,
        params,
        d.xs,
        d.ts,
        optimizer=_adam(config.learning_rate),
        num_steps=config.steps,
        loss="squared",
        batch_size=config.batch_size,
        key=k_fit if minibatch else None,
        progress=progress,
    )


def _accuracy(params, d: _Data) -> dict[str, float]:
    preds = np.asarray(jax.vmap(APPLY_FN, in_axes=(None, 0))(params, d.xs))
    predicted = (preds > 0).astype(np.int32) if d.num_classes == 2 else preds.argmax(axis=1)
    return {
        "noisy_labels": float(np.mean(predicted == d.noisy)),
        "clean_labels": float(np.mean(predicted == d.labels)),
        "outliers_fitted": float(np.mean(predicted[d.flipped] == d.noisy[d.flipped])),
    }


def _metrics(scores: dict, flipped: np.ndarray, names=NONLINEAR_SCORES + BASELINE_SCORES) -> dict[str, dict]:
    """AUROC and precision at ``k`` and ``2k`` (``k`` = number of outliers) of every score in ``names``."""
    k, n = int(flipped.sum()), flipped.size
    return {
        name: {
            "kind": "nonlinear" if name in NONLINEAR_SCORES else "baseline",
            "auroc": auroc(scores[name], flipped),
            "precision_at_k": precision_at_k(scores[name], flipped, k),
            "precision_at_2k": precision_at_k(scores[name], flipped, min(2 * k, n)),
        }
        for name in names
    }


def _sweep(key, config: OutlierConfig, d: _Data, params) -> list[dict]:
    """The nonlinear scores' metrics at each dimension of ``config.sweep_dims`` (projected, same θ and key;
    else ``projection_dim``, else dense) and each ridge of ``config.sweep_ridges`` (else ``config.ridge``):
    one entry ``{"dim", "ridge", "metrics", "diagnostics", "costs"}`` per pair."""
    dims = config.sweep_dims or (config.projection_dim,)
    out = []
    for dim in dims:
        cost: dict[str, dict] = {}
        if dim is None:
            dual = measured(
                cost, "dual_matrix", nj.dual_matrix, APPLY_FN, params, d.xs, d.ts, num_nodes=config.num_nodes
            )
        else:
            dual = measured(
                cost,
                "dual_matrix",
                projected_dual,
                key,
                APPLY_FN,
                params,
                d.xs,
                d.ts,
                dim=dim,
                num_nodes=config.num_nodes,
            )
        for ridge in config.sweep_ridges or (config.ridge,):
            costs = dict(cost)
            scores, info = dual_scores(dual, ridge=ridge, costs=costs)
            metrics = _metrics(scores, d.flipped, NONLINEAR_SCORES)
            out.append({"dim": dim, "ridge": ridge, "metrics": metrics, "diagnostics": info, "costs": costs})
    return out


def _write(out_dir, config: OutlierConfig, result: dict, d: _Data, scores: dict) -> dict[str, str]:
    """The image grids and ``scores.npz`` in ``out_dir``; returns the files (``results.json`` included)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    metrics, k = result["metrics"], result["num_outliers"]
    flip = config.corruption == "flip"
    what = "flipped label" if flip else f"{config.corruption} input, label kept"
    for name in config.grid_scores or tuple(dict.fromkeys((result["best_nonlinear"], "loss"))):
        m = metrics[name]
        title = (
            f"{name}: AUROC {m['auroc']:.3f}, P@k {m['precision_at_k']:.2f} (k = {k}); "
            f"red = {what} (row = given label)"
        )
        path = save_score_grid(
            out / f"grid_{name}.png",
            d.images,
            d.noisy,
            d.flipped,
            scores[name],
            per_class=config.grid_per_class,
            class_names=d.class_names,
            true_labels=d.labels if flip else None,
            title=title,
            mark_title=None if flip else config.corruption,
        )
        files[f"grid_{name}"] = str(path)
    np.savez_compressed(
        out / "scores.npz", flipped=d.flipped, labels=d.labels, noisy_labels=d.noisy, **scores
    )  # "flipped": the outlier mask, whatever the corruption
    files["scores"] = str(out / "scores.npz")
    files["results"] = str(out / "results.json")
    return files


def _result(
    config: OutlierConfig, d: _Data, fitted, info: dict, metrics: dict, timings: dict, from_disk: bool
):
    """The JSON-ready result (``timings`` is kept by reference: later stages add to it)."""
    n = int(d.labels.shape[0])
    return {
        "task": "binary" if d.num_classes == 2 else f"{d.num_classes}-class",
        "classes": list(config.classes) if (from_disk and config.classes is not None) else None,
        "class_names": list(d.class_names) if d.class_names is not None else None,
        "n": n,
        "p": info["p"],
        "k": 1 if d.num_classes == 2 else int(d.num_classes),
        "num_features": int(d.xs.shape[1]),
        "corruption": config.corruption,
        "num_outliers": int(d.flipped.sum()),
        "num_flipped": int(d.flipped.sum()) if config.corruption == "flip" else 0,
        "metrics": metrics,
        "best_nonlinear": max(NONLINEAR_SCORES, key=lambda s: metrics[s]["auroc"]),
        "best_overall": max(metrics, key=lambda s: metrics[s]["auroc"]),
        "accuracy": _accuracy(fitted.params, d),
        "final_mean_loss": float(fitted.final_loss) / n,
        "diagnostics": info,
        "timings": timings,
        "config": dataclasses.asdict(config),
        "environment": environment(),
    }


def _score(k_proj, config: OutlierConfig, d: _Data, fitted, timings: dict) -> tuple[dict, dict, dict]:
    """Scores at the fitted θ, their metrics, and the sweep over ``config.sweep_dims``:
    ``(scores, info, metrics)``; ``info["costs"]`` gains the fit and the sweep."""
    scores, info = outlier_scores(
        APPLY_FN,
        fitted.params,
        d.xs,
        d.ts,
        num_nodes=config.num_nodes,
        projection_dim=config.projection_dim,
        key=k_proj,
        ridge=config.ridge,
    )
    timings.update(info.pop("timings"))
    metrics = _metrics(scores, d.flipped)
    if config.sweep_dims or config.sweep_ridges:
        t0 = time.perf_counter()
        info["sweep"] = _sweep(k_proj, config, d, fitted.params)
        timings["sweep_s"] = time.perf_counter() - t0
    return scores, info, metrics


def run_outlier_study(
    config: OutlierConfig | None = None,
    *,
    data=None,
    foreign=None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Plant outliers, fit, score, and measure how well each score finds them.

    Steps: load the data (or take ``data``); plant ``round(flip_fraction · n)`` outliers
    (:func:`~nlis_jax.experiments.outliers.data.plant_outliers`: flipped labels for
    ``config.corruption == "flip"``, else inverted, noised or foreign inputs with their labels kept);
    features by :func:`~nlis_jax.experiments.features.prepare_features`; fit a ReLU MLP
    ``d → hidden… → (1 or K)`` with :func:`nlis_jax.fit` (Adam, squared loss on ``±1`` / one-hot targets of
    the GIVEN labels); compute :func:`outlier_scores` at the fitted θ (dense, or projected with
    ``config.projection_dim``; ridge leverage with ``config.ridge``); AUROC, precision at ``k`` and ``2k``
    (``k`` = number of outliers) of each score against the outlier mask; the nonlinear scores again at
    each of ``config.sweep_dims`` and ``config.sweep_ridges``.

    Randomness: ``jax.random.key(config.seed)`` is split into independent keys for the outliers, the
    initialisation, the minibatches and the embedding.

    Args:
        config: the study's options (``None``: the defaults of :class:`OutlierConfig`).
        data: ``None`` to load the Fashion-MNIST train split (``config.classes``, first ``config.n``), or a
            :class:`nlis_jax.experiments.datasets.Dataset` / a pair ``(x, labels)``: ``x`` of shape
            ``(n, h, w)`` (images, pooled by ``config.pool``) or ``(n, d)``, ``labels`` integers
            ``0..K-1`` (``K`` = ``max + 1``); the first ``config.n`` are used.
        foreign: replacement inputs for ``corruption="foreign"`` (``(m, ...)`` like one example of
            ``data``); ``None`` loads Fashion-MNIST images of the classes outside ``config.classes``.
        out_dir: if given, write ``results.json``, ``scores.npz`` (every score, the outlier mask as
            ``flipped``, and the labels) and one ``grid_<score>.png`` per grid score there.
        progress: log the stages to stderr and show the fit's progress bar.

    Returns:
        A JSON-ready dict: ``metrics`` (per score: ``auroc``, ``precision_at_k``, ``precision_at_2k``,
        ``kind`` = ``"nonlinear"`` or ``"baseline"``), ``best_nonlinear``, ``best_overall``, ``n``, ``p``,
        ``k`` (outputs), ``corruption``, ``num_outliers`` (``num_flipped``: the same for flips, else 0),
        ``accuracy`` (training accuracy on the given and on the clean labels), ``diagnostics`` (with
        ``costs``: wall time and peak ``RssAnon`` of every stage, and ``sweep``), ``timings`` (seconds) and
        ``config``; plus ``files`` when ``out_dir`` is given.

    Raises:
        nlis_jax.experiments.datasets.DatasetNotFoundError: when ``data`` is ``None`` and Fashion-MNIST is
            not found.
        ValueError: inconsistent options, or an ``out_dir`` that exists and is not a folder (before any
            work).
    """
    t_start = time.perf_counter()
    config = OutlierConfig() if config is None else config
    if config.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError('dtype="float64" needs jax.config.update("jax_enable_x64", True).')
    if config.corruption == "foreign" and data is not None and foreign is None:
        raise ValueError('corruption="foreign" with your own data needs foreign= (replacement inputs).')
    if config.corruption == "foreign" and config.classes is None and foreign is None:
        # every class is in the task, so none is left to load foreign images from: say so before loading
        raise ValueError('corruption="foreign" needs a class outside classes; all 10 are in the task.')
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        # checked before the work: it raised FileExistsError after the whole study had run
        raise ValueError(f"out_dir {out_dir} exists and is not a folder.")
    partial = {"stages_done": [], "config": dataclasses.asdict(config), "timings": {}}
    try:
        result = _stages(config, data, foreign, out_dir, progress, partial)
    except KeyboardInterrupt:
        partial["partial"] = True
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            partial["files"] = {"results": str(Path(out_dir) / "results.json")}
            Path(partial["files"]["results"]).write_text(json.dumps(partial, indent=2) + "\n")
        raise OutlierStudyInterrupted(partial) from None
    result["timings"]["total_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        (Path(out_dir) / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


class OutlierStudyInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_outlier_study`; ``result`` holds what the finished stages measured
    (``stages_done``, ``"partial": true``), and ``results.json`` is written with it when there is a folder."""

    def __init__(self, result: dict):
        super().__init__("outlier study interrupted")
        self.result = result


def _stages(config: OutlierConfig, data, foreign, out_dir, progress: bool, partial: dict) -> dict[str, Any]:
    """The stages (data, fit, scores with metrics, files); each finished one is recorded in ``partial``."""
    # split(key, 4)[:3] equals split(key, 3): the first three keys are those of the flip-only study.
    k_flip, k_init, k_fit, k_proj = jax.random.split(jax.random.key(config.seed), 4)
    timings, done = partial["timings"], partial["stages_done"]
    t0 = time.perf_counter()
    d = _prepare(k_flip, config, data, foreign)
    timings["data_s"] = time.perf_counter() - t0
    num = int(d.flipped.sum())
    partial.update(n=int(d.labels.size), num_outliers=num, num_features=int(d.xs.shape[1]))
    done.append("data")
    _log(
        progress,
        f"n = {d.labels.size}, K = {d.num_classes}, {num} {config.corruption}, features {d.xs.shape[1]}",
    )
    fit_cost: dict[str, dict] = {}
    fitted = measured(fit_cost, "fit", _fit, k_init, k_fit, config, d, progress)
    timings["fit_s"] = fit_cost["fit"]["wall_s"]
    partial["final_mean_loss"] = float(fitted.final_loss) / int(d.labels.shape[0])
    done.append("fit")
    scores, info, metrics = _score(k_proj, config, d, fitted, timings)
    info["costs"] = {**fit_cost, **info["costs"]}
    partial["metrics"] = metrics
    done += ["scores", "metrics"]
    _log(progress, f"fit {timings['fit_s']:.1f}s, scores done, p = {info['p']}")
    result = _result(config, d, fitted, info, metrics, timings, from_disk=data is None)
    if out_dir is not None:
        t0 = time.perf_counter()
        result["files"] = _write(out_dir, config, result, d, scores)
        timings["write_s"] = time.perf_counter() - t0
    return result
