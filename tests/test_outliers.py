"""Tests for nlis_jax.experiments.outliers: metrics, label flips, score decomposition, small studies."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import nlis_jax as nj
from nlis_jax.experiments import datasets, nets
from nlis_jax.experiments import outliers as O

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION_DIR = SHARED_DATA / "fashion-mnist"
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not found in {FASHION_DIR}",
)


# ----------------------------------------------------------------------------------------------
# AUROC and precision at k


def brute_force_auroc(scores, labels) -> float:
    """Pairwise count: P(s_pos > s_neg) + P(s_pos = s_neg) / 2."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_brute_force_and_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 57
    scores = rng.integers(0, 6, size=n).astype(float)  # many ties
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    got = O.auroc(scores, labels)
    assert got == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # continuous scores, 0/1 int labels
    cont = rng.normal(size=n)
    assert O.auroc(cont, labels.astype(int)) == pytest.approx(roc_auc_score(labels, cont), abs=1e-12)


def test_auroc_extremes_and_errors():
    labels = np.array([0, 0, 1, 1, 0, 1])
    assert O.auroc(labels * 2.0, labels) == 1.0
    assert O.auroc(-labels * 2.0, labels) == 0.0
    assert O.auroc(np.ones(6), labels) == 0.5
    with pytest.raises(ValueError, match="both positives and negatives"):
        O.auroc(np.arange(3.0), np.ones(3, bool))
    with pytest.raises(ValueError, match="same length"):
        O.auroc(np.arange(3.0), np.array([0, 1]))
    with pytest.raises(ValueError, match="0/1"):
        O.auroc(np.arange(3.0), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        O.auroc(np.array([0.0, np.nan]), np.array([0, 1]))


def brute_force_precision(scores, labels, k) -> float:
    """Average over every tie-breaking order: precision of the first k of a stable descending sort."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    vals = []
    for perm in itertools.permutations(range(s.size)):
        order = sorted(range(s.size), key=lambda i: (-s[i], perm[i]))
        vals.append(y[order[:k]].mean())
    return float(np.mean(vals))


def test_precision_at_k():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2])
    labels = np.array([1, 0, 0, 1, 1, 0])
    assert O.precision_at_k(scores, labels, 1) == 1.0
    assert O.precision_at_k(scores, labels, 2) == 0.5
    assert O.precision_at_k(scores, labels, 3) == pytest.approx(2 / 3)
    assert O.precision_at_k(scores, labels, 6) == 0.5
    for bad in (0, 7, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            O.precision_at_k(scores, labels, bad)


@pytest.mark.parametrize("seed", range(3))
def test_precision_at_k_ties_are_expected_value(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=7).astype(float)
    labels = rng.random(7) < 0.5
    for k in range(1, 8):
        want = brute_force_precision(scores, labels, k)
        assert O.precision_at_k(scores, labels, k) == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Label flips and features


@pytest.mark.parametrize("num_classes", [2, 10])
def test_flip_labels_flips_exactly_the_requested_count(num_classes):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_classes, size=1000)
    key = jax.random.key(3)
    noisy, flipped = O.flip_labels(key, labels, num_classes, fraction=0.02)
    assert flipped.sum() == 20 and flipped.dtype == bool
    np.testing.assert_array_equal(noisy != labels, flipped)  # changed exactly on the flipped ones
    assert noisy.min() >= 0 and noisy.max() < num_classes
    if num_classes == 2:
        np.testing.assert_array_equal(noisy[flipped], 1 - labels[flipped])
    again, flipped_again = O.flip_labels(key, labels, num_classes, fraction=0.02)
    np.testing.assert_array_equal(again, noisy)
    np.testing.assert_array_equal(flipped_again, flipped)
    _, other = O.flip_labels(jax.random.key(4), labels, num_classes, count=20)
    assert other.sum() == 20 and not np.array_equal(other, flipped)


def test_flip_labels_multiclass_targets_cover_other_classes():
    labels = np.zeros(3000, dtype=np.int32)
    noisy, flipped = O.flip_labels(jax.random.key(0), labels, 4, count=1500)
    counts = np.bincount(noisy[flipped], minlength=4)
    assert counts[0] == 0 and counts[1:].min() > 400  # uniform over the 3 other classes


def test_flip_labels_errors():
    with pytest.raises(ValueError, match="exactly one"):
        O.flip_labels(jax.random.key(0), np.zeros(5, int), 2)
    with pytest.raises(ValueError, match="lie in"):
        O.flip_labels(jax.random.key(0), np.array([0, 3]), 2, count=1)
    with pytest.raises(ValueError, match="count"):
        O.flip_labels(jax.random.key(0), np.zeros(5, int), 2, count=6)


def test_prepare_features_pool_pca_standardise():
    rng = np.random.default_rng(0)
    images = rng.random((30, 28, 28))
    x = O.prepare_features(images, pool=4)
    assert x.shape == (30, 49) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
    pooled = images.reshape(30, 7, 4, 7, 4).mean((2, 4)).reshape(30, -1)
    np.testing.assert_allclose(x, (pooled - pooled.mean(0)) / pooled.std(0), rtol=1e-4, atol=1e-4)
    assert O.prepare_features(images, pool=4, pca=5, dtype=np.float64).shape == (30, 5)
    assert O.prepare_features(rng.random((30, 6)), pool=4).shape == (30, 6)  # vectors are not pooled


# ----------------------------------------------------------------------------------------------
# Scores


def block_problem(n: int = 60, d: int = 3, k: int = 3):
    """A float64 ReLU MLP ``d–4–k`` (its biases shifted by 0.1), ``(n, d)`` inputs, ``(n, k)`` targets."""
    key_x, key_p, key_t = jax.random.split(jax.random.key(0), 3)
    xs = jax.random.normal(key_x, (n, d), jnp.float64)
    params = nets.mlp_init(key_p, (d, 4, k), dtype=jnp.float64)
    params = [{"w": layer["w"], "b": layer["b"] + 0.1} for layer in params]
    return nets.mlp(jax.nn.relu), params, xs, jax.random.normal(key_t, (n, k), jnp.float64)


def test_scores_decompose_and_match_definitions():
    """float64, k = 3 outputs (block scores): h(F̃) = h(F*) + e²/‖e‖², baselines equal their definitions,
    scores are probabilities. (The scalar-output path runs in the studies below.)"""
    apply_fn, params, xs, ts = block_problem()
    n, k = ts.shape
    scores, info = O.outlier_scores(apply_fn, params, xs, ts, num_nodes=4)
    assert info["rank_dual"] == info["rank_adjoint"] + 1
    assert info["decomposition_gap"] < 1e-9
    for name in ("leverage", "adjoint_leverage", "response_leverage", "norm"):
        assert scores[name].shape == (n,)
        assert np.all(scores[name] >= -1e-12)
        assert scores[name].sum() == pytest.approx(1.0, abs=1e-9)
    preds = jax.vmap(apply_fn, in_axes=(None, 0))(params, xs)
    resid = np.asarray(preds - ts).reshape(n, -1)
    np.testing.assert_allclose(scores["loss"], np.sum(resid**2, axis=1), rtol=1e-12)
    # response leverage = (I − P_{F*}) r, with F* from the library: the projected residual
    adj = np.asarray(nj.adjoint(apply_fn, params, xs, num_nodes=4)).reshape(n * k, -1)
    u, sv, _ = np.linalg.svd(adj, full_matrices=False)
    q = u[:, sv > 1e-10 * sv[0]]  # range(F*): ReLU networks are rank-deficient (rescaling symmetries)
    assert q.shape[1] == info["rank_adjoint"]
    e = resid.reshape(-1) - q @ (q.T @ resid.reshape(-1))
    e_sq = np.sum(e.reshape(n, -1) ** 2, axis=1)
    np.testing.assert_allclose(scores["response_leverage"], e_sq / e_sq.sum(), rtol=1e-8, atol=1e-12)
    grad = jax.vmap(jax.grad(lambda p, x, t: jnp.sum((apply_fn(p, x) - t) ** 2)), (None, 0, 0))
    g = jax.tree.leaves(grad(params, xs, ts))
    want = np.sqrt(sum(np.sum(np.asarray(a).reshape(n, -1) ** 2, axis=1) for a in g))
    np.testing.assert_allclose(scores["grad_norm"], want, rtol=1e-10)


def test_projected_scores_equal_dense_when_dim_covers_p():
    """dim ≥ p + 1: the sparse embedding only signs and permutes the columns of F*, so every score, the
    decomposition and the baselines equal the dense ones. The shapes of the test above (its compiled score
    routes are reused), k = 3 outputs, and f(0) = 0.5 ≠ 0 (the offset-free adjoint path)."""
    mlp, params, xs, ts = block_problem()
    (n, d), k = xs.shape, ts.shape[1]
    key_proj = jax.random.key(1)

    def apply_fn(p, x):
        return mlp(p, x) + 0.5

    p = d * 4 + 4 + 4 * k + k
    dense, info_d = O.outlier_scores(apply_fn, params, xs, ts, num_nodes=4)
    proj, info_p = O.outlier_scores(apply_fn, params, xs, ts, num_nodes=4, projection_dim=p + 3, key=key_proj)
    assert info_p["p"] == info_d["p"] == p
    assert info_p["dual_shape"] == [n, k, p + 4] and info_p["rank_adjoint"] == info_d["rank_adjoint"]
    for name in O.NONLINEAR_SCORES + O.BASELINE_SCORES:
        np.testing.assert_allclose(proj[name], dense[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert info_p["decomposition_gap"] < 1e-9
    with pytest.raises(ValueError, match="needs key"):
        O.outlier_scores(apply_fn, params, xs, ts, projection_dim=8)


# ----------------------------------------------------------------------------------------------
# Studies


# The synthetic and the Fashion-MNIST study share every shape (n = 400, 16 features, hidden 4, float32,
# 100-step fit segments), so the second reuses the first's compiled kernels.
STUDY_N, STUDY_D = 400, 16


def blobs(n: int = STUDY_N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian classes in 16 dimensions (the class shows in the first two)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    shift = np.zeros(STUDY_D)
    shift[:2] = [2.5, 1.25]
    x = rng.normal(size=(n, STUDY_D)) + (2 * labels[:, None] - 1) * shift
    return x, labels.astype(np.int32)


def test_synthetic_study_finds_planted_flips(tmp_path):
    config = O.OutlierConfig(n=None, flip_fraction=0.05, hidden=4, steps=300, seed=1, grid_per_class=3)
    result = O.run_outlier_study(config, data=blobs(), out_dir=tmp_path, progress=False)
    assert result["n"] == STUDY_N and result["num_flipped"] == 20
    assert result["p"] == STUDY_D * 4 + 4 + 4 + 1
    assert result["diagnostics"]["decomposition_gap"] < 1e-4  # float32
    for name in O.NONLINEAR_SCORES + O.BASELINE_SCORES:
        m = result["metrics"][name]
        for metric in ("auroc", "precision_at_k", "precision_at_2k"):
            assert 0.0 <= m[metric] <= 1.0
    # n ≫ p: the residual outside range(F*) finds the planted flips, like the loss
    assert result["metrics"]["response_leverage"]["auroc"] > 0.9
    assert result["metrics"][result["best_nonlinear"]]["auroc"] > 0.9
    assert result["metrics"]["loss"]["auroc"] > 0.9
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == result["metrics"] and saved["best_nonlinear"] == result["best_nonlinear"]
    assert saved["environment"]["x64"] == jax.config.jax_enable_x64  # it changes the float32 fit's arithmetic
    assert saved["environment"]["devices"] == jax.device_count()
    for key in ("grid_response_leverage", "grid_loss"):
        png = Path(result["files"][key])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(tmp_path / "scores.npz") as z:
        assert z["flipped"].sum() == 20 and z["leverage"].shape == (STUDY_N,)
    # deterministic from the seed
    again = O.run_outlier_study(config, data=blobs(), progress=False)
    assert again["metrics"] == result["metrics"]


def test_projected_study_with_corrupted_inputs_and_sweep(tmp_path):
    """The synthetic study's shapes (its fit kernels are reused), inputs noised instead of labels flipped,
    scores from the projected [F*Ω | c] and a sweep: results, costs, table and files."""
    x, labels = blobs()
    config = O.OutlierConfig(
        n=None,
        flip_fraction=0.05,
        hidden=4,
        steps=300,
        seed=1,
        grid_per_class=3,
        corruption="noise",
        noise_scale=3.0,
        projection_dim=16,
        sweep_dims=(16,),
        sweep_ridges=(0.0,),
    )
    result = O.run_outlier_study(config, data=(x, labels), out_dir=tmp_path, progress=False)
    assert result["corruption"] == "noise" and result["num_outliers"] == 20 and result["num_flipped"] == 0
    diagnostics = result["diagnostics"]
    assert diagnostics["dual_shape"] == [STUDY_N, 17] and diagnostics["projection_dim"] == 16
    # the sweep at the main dimension (same key: the same embedding, reusing its compiled kernels)
    assert [(e["dim"], e["ridge"]) for e in diagnostics["sweep"]] == [(16, 0.0)]
    assert diagnostics["sweep"][0]["metrics"] == {k: result["metrics"][k] for k in O.NONLINEAR_SCORES}
    for stage in ("fit", "loss", "grad_norm", "dual_matrix", "leverage", "adjoint_leverage", "norm"):
        cost = diagnostics["costs"][stage]
        assert cost["wall_s"] >= 0 and cost["rss_peak_mib"] >= cost["rss_before_mib"]
    assert result["accuracy"]["noisy_labels"] == result["accuracy"]["clean_labels"]  # labels kept
    # heavy noise on 16 features: the label-free adjoint leverage sees it
    assert result["metrics"]["adjoint_leverage"]["auroc"] > 0.9
    table = O.format_table(result)
    assert "projected (dim 16)" in table and "projection dim 16" in table and "noise inputs" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"] == result["metrics"] and saved["corruption"] == "noise"
    with pytest.raises(ValueError, match="needs foreign"):
        O.run_outlier_study(O.OutlierConfig(corruption="foreign"), data=(x, labels), progress=False)
    a_file = tmp_path / "a_file"  # raised FileExistsError after the whole study (twenty-ninth session)
    a_file.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        O.run_outlier_study(config, data=(x, labels), out_dir=a_file, progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="flip_fraction"):
        O.OutlierConfig(flip_fraction=0.7)
    with pytest.raises(ValueError, match="two classes"):
        O.OutlierConfig(classes=(3,))
    with pytest.raises(ValueError, match="grid_scores"):
        O.OutlierConfig(grid_scores=("nope",))
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*32\), got 4294967301"):
        O.OutlierConfig(seed=2**32 + 5)  # ran the study of seed 5 under a record of 4294967301
    assert O.OutlierConfig(hidden=8).hidden == (8,)
    hash(O.OutlierConfig())


def test_missing_fashion_mnist_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("NLIS_FASHION_MNIST", raising=False)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "skl"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(datasets.DatasetNotFoundError):
        O.run_outlier_study(O.OutlierConfig(n=100), progress=False)


def test_add_arguments_keeps_existing_options():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=7)
    O.add_arguments(parser)
    args = parser.parse_args(["--classes", "all", "--hidden", "8,4", "--pca", "none"])
    assert args.seed == 7 and args.n is None and args.progress is None
    config = O.config_from_args(args)
    assert config.classes is None and config.hidden == (8, 4) and config.pca is None and config.seed == 7
    assert O.config_from_args(argparse.Namespace()) == O.OutlierConfig()


@needs_fashion
def test_cli_tiny_fashion_mnist_study(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NLIS_FASHION_MNIST", str(FASHION_DIR))
    parser = O.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "out"
    argv = ["--n", str(STUDY_N), "--hidden", "4", "--steps", "100", "--pool", "7", "--no-progress"]
    argv += ["--out", str(out)]
    assert O.run(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "response_leverage" in printed and "grad_norm" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["n"] == STUDY_N and result["num_flipped"] == 8 and result["classes"] == [7, 9]
    assert result["num_features"] == STUDY_D
    assert all(0.0 <= m["auroc"] <= 1.0 for m in result["metrics"].values())
    assert (out / f"grid_{result['best_nonlinear']}.png").is_file() and (out / "grid_loss.png").is_file()


def test_foreign_corruption_with_every_class_is_refused_before_loading(monkeypatch):
    """``--classes all --corruption foreign`` loaded all 60,000 images, then failed in the foreign load."""
    from nlis_jax.experiments.outliers import config as cfg
    from nlis_jax.experiments.outliers import study

    def no_load(*args, **kwargs):
        raise AssertionError("the images were loaded before the options were checked")

    monkeypatch.setattr(study, "_stages", no_load)
    with pytest.raises(ValueError, match="needs a class outside classes"):
        study.run_outlier_study(cfg.OutlierConfig(classes=None, corruption="foreign"), progress=False)


@pytest.mark.parametrize("fraction", [-0.5, 0.0, 3.0, float("nan"), float("inf")])
def test_flip_and_corrupt_name_a_fraction_out_of_range(fraction):
    """``fraction`` outside (0, 1] flipped one label (-0.5) or failed naming ``count`` (3) or a float
    conversion (NaN); each is a ValueError naming ``fraction`` now, and nothing is modified."""
    labels = np.arange(20) % 3
    before = labels.copy()
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
        O.flip_labels(jax.random.key(0), labels, 3, fraction=fraction)
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
        O.corrupt_inputs(jax.random.key(0), np.ones((20, 4), np.float32), "invert", fraction=fraction)
    np.testing.assert_array_equal(labels, before)


def test_planted_counts_refuse_what_is_not_a_count():
    """flip_labels / corrupt_inputs took count=2.5 as 2 and count=3.9 as 3 (int() truncated), count=True as
    one outlier and fraction=True as every example (10 of 10); the study's config guarded only its own
    path. Each is now a TypeError naming the argument; valid counts and fractions are unchanged."""
    key, labels = jax.random.key(0), np.arange(10) % 2
    inputs = np.random.default_rng(0).random((10, 4))
    for kwargs in ({"count": 2.5}, {"count": 3.9}, {"count": True}, {"fraction": True}):
        name = next(iter(kwargs))
        with pytest.raises(TypeError, match=name):
            O.flip_labels(key, labels, 2, **kwargs)
        with pytest.raises(TypeError, match=name):
            O.corrupt_inputs(key, inputs, "invert", **kwargs)
    assert O.flip_labels(key, labels, 2, count=np.int64(3))[1].sum() == 3
    assert O.flip_labels(key, labels, 2, fraction=0.25)[1].sum() == 2  # round(2.5): half to even
    assert O.corrupt_inputs(key, inputs, "invert", fraction=0.3)[1].sum() == 3


def test_flip_labels_and_empty_data_are_named():
    """num_classes=2.5 drew labels 2 in a binary task, with no error; num_classes="2" gave Python's "'<' not
    supported"; no examples at all gave jax.random.choice's "a must be greater than 0". Each is named."""
    key, labels = jax.random.key(0), np.arange(20) % 2
    with pytest.raises(TypeError, match="num_classes must be a Python int, got 2.5"):
        O.flip_labels(key, labels, 2.5, count=5)
    with pytest.raises(TypeError, match="num_classes must be a Python int"):
        O.flip_labels(key, labels, "2", count=5)
    assert O.flip_labels(key, labels, np.int64(2), count=5)[1].sum() == 5
    with pytest.raises(ValueError, match=r"no examples .*\(n = 0\)"):
        O.flip_labels(key, np.zeros(0, np.int32), 2, fraction=0.1)
    with pytest.raises(ValueError, match=r"no examples .*\(n = 0\)"):
        O.corrupt_inputs(key, np.zeros((0, 4), np.float32), "invert", count=1)


@pytest.mark.parametrize("ridge", [float("nan"), -1.0, float("inf")])
def test_outlier_scores_refuse_a_ridge_that_is_not_a_non_negative_number(ridge):
    """ridge=NaN or -1 returned the exact (unridged) scores with info["ridge"] recorded as given."""
    apply_fn, params, xs, ts = block_problem()
    with pytest.raises(ValueError, match="ridge must be non-negative and finite"):
        O.outlier_scores(apply_fn, params, xs, ts, num_nodes=4, ridge=ridge)
    dual = jnp.asarray(np.random.default_rng(0).normal(size=(12, 5)))
    with pytest.raises(ValueError, match="ridge must be non-negative and finite"):
        O.dual_scores(dual, ridge=ridge)
