"""``nlis-jax score``: scores of a user's own .npy files, read as memmaps, written to a .npy file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import COMPILE_EVENT, count_events

import nlis_jax as nj
from nlis_jax import cli
from nlis_jax.experiments import nets


def _files(tmp_path, n=200, d=4):
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((n, d)), rng.standard_normal(n)
    np.save(tmp_path / "x.npy", xs)
    np.save(tmp_path / "y.npy", ys)
    return xs, ys


def test_score_single_index_matches_library(tmp_path, capsys):
    xs, ys = _files(tmp_path)
    theta = np.linspace(-0.5, 0.5, 4)
    np.savez(tmp_path / "p.npz", theta=theta)
    args = ["score", "--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npy"), "--params"]
    args += [str(tmp_path / "p.npz"), "--chunk-size", "64", "--out", str(tmp_path / "s.npy")]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 200 and summary["rank"] == 5  # d + 1 columns of the dual matrix, full rank
    F = nj.dual_matrix(nets.single_index(jnp.tanh), jnp.asarray(theta), xs, ys)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), nj.leverage_scores(F), rtol=1e-9, atol=1e-14)


def test_score_integer_responses_are_scored_as_floats(tmp_path, capsys):
    """The library refuses integer ys on every scoring path (the dual matrix's offset f(0) − y is
    floating); the CLI reads count-valued --y files as floats of the scoring dtype and gives the scores of
    the same responses stored as floats."""
    xs, _ = _files(tmp_path)
    np.save(tmp_path / "yi.npy", np.arange(200) % 5)
    np.save(tmp_path / "yf.npy", (np.arange(200) % 5).astype(np.float64))
    for name in ("yi", "yf"):
        args = ["score", "--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / f"{name}.npy")]
        assert cli.main(args + ["--out", str(tmp_path / f"s_{name}.npy")]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(np.load(tmp_path / "s_yi.npy"), np.load(tmp_path / "s_yf.npy"))


def test_score_mlp_norm_from_seed(tmp_path, capsys):
    xs, _ = _files(tmp_path)
    args = ["score", "--x", str(tmp_path / "x.npy"), "--model", "mlp", "--hidden", "3", "--method", "norm"]
    args += ["--out", str(tmp_path / "s.npy")]
    assert cli.main(args) == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (200,) and abs(s.sum() - 1) < 1e-10 and np.all(s > 0)
    # the same draw of parameters, scored in memory
    ns = cli.build_parser().parse_args(args)
    from nlis_jax.experiments.score_files import model_and_params

    apply_fn, params = model_and_params(ns, 4, jnp.float64)
    ref = nj.norm_scores(nj.dual_matrix(apply_fn, params, jnp.asarray(xs)))
    np.testing.assert_allclose(s, ref, rtol=1e-10)
    assert jax.tree.leaves(params)[0].dtype == jnp.float64


def test_score_bad_file_exits_2(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.arange(10))
    assert cli.main(["score", "--x", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s.npy")]) == 2
    assert "(n, d) float array" in capsys.readouterr().err
    assert cli.main(["score", "--x", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "s.npy")]) == 2
    # a text file named .npy was reported as "This file contains pickled (object) data" (numpy's guess)
    np.savetxt(tmp_path / "csv.npy", np.ones((3, 2)), delimiter=",")
    assert cli.main(["score", "--x", str(tmp_path / "csv.npy"), "--out", str(tmp_path / "s.npy")]) == 2
    err = capsys.readouterr().err
    assert "--x " + str(tmp_path / "csv.npy") + " is not a .npy file (no .npy header)" in err
    assert "pickled" not in err


def test_score_bad_params_hidden_and_out_exit_2(tmp_path, capsys):
    """Each mistake is a usage error (exit 2) whose message names it, not a traceback."""
    _files(tmp_path)
    x = str(tmp_path / "x.npy")
    out = str(tmp_path / "s.npy")
    np.savez(tmp_path / "w.npz", w=np.ones(4))
    np.savez(tmp_path / "theta5.npz", theta=np.ones(5))
    np.savez(tmp_path / "mlp.npz", w0=np.ones((3, 4)), w1=np.ones((1, 3)), b1=np.ones(1))
    np.savez(tmp_path / "mlp5.npz", w0=np.ones((3, 5)), b0=np.ones(3), w1=np.ones((1, 3)), b1=np.ones(1))
    cases = [
        (["--params", str(tmp_path / "w.npz")], "needs theta; missing ['theta']"),
        (["--params", str(tmp_path / "theta5.npz")], "theta has shape (5,), but --x has d = 4 columns"),
        (["--model", "mlp", "--params", str(tmp_path / "mlp5.npz")], "apply_fn(params, x) failed on one"),
        (["--model", "mlp", "--params", str(tmp_path / "mlp.npz")], "missing ['b0']"),
        (["--params", x], "is one array, not an .npz archive"),
        (["--out", str(tmp_path / "no" / "such" / "s.npy")], "No such file or directory"),
    ]
    for extra, message in cases:
        args = ["score", "--x", x, "--out", out] + extra
        assert cli.main(args) == 2, extra
        assert message in capsys.readouterr().err, extra
    try:
        cli.main(["score", "--x", x, "--model", "mlp", "--hidden", "0", "--out", out])
    except SystemExit as exit_:  # argparse's own usage error
        assert exit_.code == 2
    assert "--hidden: must be a positive integer, got 0" in capsys.readouterr().err


def test_score_norm_takes_the_adaptive_rule(tmp_path, capsys):
    """``--method norm`` scored with the library's fixed 16-node default: 1.4% off on a row at <θ, x> = 49
    (tanh's gradient has its mass near t = 0 there); now the adaptive rule, as ``--method leverage``:
    the closed-form dual ``(tanh z / z)·x`` of the single-index model to rounding."""
    xs, _ = _files(tmp_path)
    theta = np.linspace(-0.5, 0.5, 4)
    xs[0] *= 49 / (xs[0] @ theta)
    np.save(tmp_path / "x.npy", xs)
    np.savez(tmp_path / "p.npz", theta=theta)
    args = ["score", "--x", str(tmp_path / "x.npy"), "--params", str(tmp_path / "p.npz"), "--method", "norm"]
    assert cli.main([*args, "--out", str(tmp_path / "s.npy")]) == 0
    z = xs @ theta
    F = (np.tanh(z) / z)[:, None] * xs  # f*(θ) = ∫ tanh'(t z) dt · x, and f(0) − y = 0 without --y
    ref = np.sum(F**2, axis=1) / np.sum(F**2)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), ref, rtol=1e-10)


def test_score_float64_file_scores_in_float64(tmp_path):
    """A float64 file is scored in float64 in a fresh process (where jax starts in float32): the scores
    match the float64 library far below float32's rounding, and jax warns of no truncation."""
    xs, ys = _files(tmp_path)
    theta = np.linspace(-0.5, 0.5, 4)
    np.savez(tmp_path / "p.npz", theta=theta)
    args = ["score", "--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npy")]
    args += ["--params", str(tmp_path / "p.npz"), "--out", str(tmp_path / "s.npy")]
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["PYTHONPATH"] = str(Path(nj.__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-m", "nlis_jax.cli", *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "truncated to dtype float32" not in done.stderr
    s = np.load(tmp_path / "s.npy")
    F = nj.dual_matrix(nets.single_index(jnp.tanh), jnp.asarray(theta), xs, ys)
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, nj.leverage_scores(F), rtol=1e-9)


def test_score_never_overwrites_its_input_and_writes_only_on_success(tmp_path, capsys):
    """``--out`` naming ``--x`` truncated the data to zeros and crashed (bus error); a failed run left an
    existing ``--out`` of earlier scores as zeros. Now a usage error first, and the scores are moved into
    place only when scoring succeeds."""
    xs, _ = _files(tmp_path)
    x, out = str(tmp_path / "x.npy"), str(tmp_path / "s.npy")
    assert cli.main(["score", "--x", x, "--out", x]) == 2
    assert "is the file of --x" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(x), xs)
    assert cli.main(["score", "--x", x, "--out", out]) == 0
    good = np.load(out)
    bad = xs.copy()
    bad[3, 1] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    assert cli.main(["score", "--x", str(tmp_path / "bad.npy"), "--out", out]) == 2
    assert "NaN" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out), good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy", "s.npy", "x.npy", "y.npy"]


def test_score_half_precision_file_in_float32(tmp_path, capsys):
    """A float16 file: the CLI made a float16 ``--out`` and then refused it. Now float32 scores, those of
    the same data in float32."""
    xs, _ = _files(tmp_path)
    np.save(tmp_path / "x16.npy", xs.astype(np.float16))
    np.save(tmp_path / "x32.npy", xs.astype(np.float16).astype(np.float32))
    for name in ("x16", "x32"):
        assert (
            cli.main(
                ["score", "--x", str(tmp_path / f"{name}.npy"), "--out", str(tmp_path / f"{name}_s.npy")]
            )
            == 0
        )
    s16, s32 = np.load(tmp_path / "x16_s.npy"), np.load(tmp_path / "x32_s.npy")
    assert s16.dtype == np.float32
    np.testing.assert_allclose(s16, s32, rtol=1e-5)


def test_score_review_fixes(tmp_path, capsys):
    """An .npz as --x was an AttributeError traceback; a big-endian .npy a misleading model error; an
    (n, 0) --x a numpy reduction error; --out naming a folder left a hidden temporary file behind; the
    scores were written with mode 0600; the same --seed drew another model for a float64 file."""
    xs, _ = _files(tmp_path)
    out = str(tmp_path / "s.npy")
    np.savez(tmp_path / "x.npz", x=xs)
    assert cli.main(["score", "--x", str(tmp_path / "x.npz"), "--out", out]) == 2
    assert ".npz archive, not one .npy array" in capsys.readouterr().err
    np.save(tmp_path / "big.npy", xs.astype(">f8"))
    assert cli.main(["score", "--x", str(tmp_path / "big.npy"), "--out", out]) == 2
    assert "non-native byte order" in capsys.readouterr().err
    np.save(tmp_path / "empty.npy", np.zeros((5, 0)))
    assert cli.main(["score", "--x", str(tmp_path / "empty.npy"), "--out", out]) == 2
    assert "d >= 1" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert cli.main(["score", "--x", str(tmp_path / "x.npy"), "--out", str(tmp_path / "folder")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".nlis-score-")]
    umask = os.umask(0o022)
    try:
        assert cli.main(["score", "--x", str(tmp_path / "x.npy"), "--out", out]) == 0
    finally:
        os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o644
    np.save(tmp_path / "x32.npy", xs.astype(np.float32))
    out32 = str(tmp_path / "s32.npy")
    assert cli.main(["score", "--x", str(tmp_path / "x32.npy"), "--out", out32]) == 0
    # the same --seed, the same model: the float64 file's scores match the float32 file's to float32 rounding
    np.testing.assert_allclose(np.load(out32), np.load(out), rtol=1e-4)


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
def test_score_file_mode_follows_the_umask_without_reading_it(tmp_path, monkeypatch):
    """The scores get the mode of a new file (``0o666 & ~umask``) without ``os.umask``: reading the umask
    that way sets it to another value for a moment, for every thread of the process."""
    _files(tmp_path)
    out = tmp_path / "s.npy"
    set_umask = os.umask
    previous = set_umask(0o027)
    try:
        with monkeypatch.context() as patch:

            def no_umask(mask):
                raise AssertionError(f"os.umask({mask:#o}) changed the umask of every thread")

            patch.setattr(os, "umask", no_umask)
            assert cli.main(["score", "--x", str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    finally:
        set_umask(previous)
    assert out.stat().st_mode & 0o777 == 0o666 & ~0o027 == 0o640
    assert np.load(out).shape == (200,)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".nlis-score-")]


def test_score_user_journey_fixes(tmp_path, capsys):
    """Each was a traceback, a silent wrong answer or a misleading message: an empty --x/--y file (EOFError
    traceback); --out naming --params (overwrote the parameters, exit 0); a scalar theta (broadcast, exit
    0), a complex theta (its real part), an extra key 'w...' ('missing w2, b2'); --hidden of a single-index
    model and --seed/--hidden beside --params (ignored); --out in a missing folder (named a temporary
    file); a .npy as --params (a context-manager error)."""
    _files(tmp_path, n=6, d=3)
    x, out = str(tmp_path / "x.npy"), str(tmp_path / "s.npy")
    (tmp_path / "empty.npy").touch()
    np.savez(tmp_path / "p.npz", theta=np.ones(3))
    np.savez(tmp_path / "scalar.npz", theta=np.array(1.0))
    np.savez(tmp_path / "complex.npz", theta=np.ones(3) + 1j)
    mlp = dict(w0=np.ones((2, 3)), b0=np.ones(2), w1=np.ones((1, 2)), b1=np.ones(1))
    np.savez(tmp_path / "extra.npz", weights_note=np.array(1.0), **mlp)
    np.savez(tmp_path / "mlp.npz", **mlp)
    np.save(tmp_path / "p.npy", np.ones(3))
    p = str(tmp_path / "p.npz")
    nodir = tmp_path / "nodir"
    cases = [
        (
            ["--x", str(tmp_path / "empty.npy")],
            f"cannot read the data: --x {tmp_path / 'empty.npy'} is empty",
        ),
        (["--x", x, "--y", str(tmp_path / "empty.npy")], "cannot read the data: --y"),
        (["--x", x, "--params", p, "--out", p], f"--out {p} is the file of --params"),
        (["--x", x, "--params", str(tmp_path / "scalar.npz")], "theta has shape (), but --x has d = 3"),
        (["--x", x, "--params", str(tmp_path / "complex.npz")], "theta has dtype complex128"),
        (
            ["--x", x, "--model", "mlp", "--params", str(tmp_path / "extra.npz")],
            "; unexpected ['weights_note'].",
        ),
        (["--x", x, "--hidden", "4"], "--hidden does not apply to --model single-index"),
        (["--x", x, "--seed", "3", "--params", p], "--seed does not apply with --params"),
        (
            ["--x", x, "--model", "mlp", "--hidden", "4", "--params", str(tmp_path / "mlp.npz")],
            "--hidden does not apply with --params",
        ),
        (["--x", x, "--out", str(nodir / "s.npy")], f"cannot write --out {nodir / 's.npy'} in {nodir}:"),
        (["--x", x, "--params", str(tmp_path / "p.npy")], "not an .npz archive: save the parameters with"),
    ]
    for args, message in cases:
        args = ["score", "--out", out, *args]
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("nlis-jax score: error: ") and message in err, (args, err)
        assert ".nlis-score-" not in err and "missing" not in err, err
    np.testing.assert_array_equal(np.load(p)["theta"], np.ones(3))  # not overwritten by scores
    assert not (tmp_path / "s.npy").exists()


def test_score_usage_errors_name_the_subcommand(tmp_path, capsys):
    """``--hidden abc`` said 'invalid _positive_int value'; an unknown option printed the top-level usage
    with 'nlis-jax: error:'."""
    _files(tmp_path, n=6, d=3)
    base = ["score", "--x", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s.npy")]
    for extra, message in [
        (["--model", "mlp", "--hidden", "abc"], "argument --hidden: must be a positive integer, got 'abc'"),
        (["--bogus"], "nlis-jax score: error: unrecognized arguments: --bogus"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli.main(base + extra)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("usage: nlis-jax score ") and "_positive_int" not in err, err


def _error(args, capsys) -> str:
    """The usage error (exit 2, no traceback) of ``nlis-jax score ARGS``."""
    assert cli.main(["score", *args]) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("nlis-jax score: error: ") and "Traceback" not in err, err
    return err


def test_score_damaged_files_are_usage_errors(tmp_path, capsys):
    """A damaged .npy header (tokenize.TokenError), a truncated .npz as --x or --params and a flipped byte
    in --params' data (zipfile.BadZipFile, bad CRC-32) were tracebacks with exit 1; now usage errors that
    name the option and the file."""
    _files(tmp_path, n=6, d=3)
    x, out = str(tmp_path / "x.npy"), str(tmp_path / "s.npy")
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "header.npy").write_bytes(raw[:10] + b"{'descr': garbage}" + raw[28:])
    np.savez(tmp_path / "p.npz", theta=np.ones(3))
    z = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(z[: len(z) // 2])
    flipped = bytearray(z)
    flipped[z.find(b"\x93NUMPY") + 140] ^= 0xFF  # in theta's data, after its 128-byte .npy header
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    (tmp_path / "p.json").write_text('{"theta": [1, 2, 3]}')
    (tmp_path / "empty.npz").write_bytes(b"")
    header, half, crc = (str(tmp_path / name) for name in ("header.npy", "half.npz", "crc.npz"))
    text, empty = str(tmp_path / "p.json"), str(tmp_path / "empty.npz")
    corrupt = "the file is corrupt or truncated"
    cases = [
        (["--x", header], f"--x {header}: {corrupt}"),
        (["--x", x, "--y", header], f"--y {header}: {corrupt}"),
        (["--x", half], f"--x {half}: {corrupt} (it starts as a zip archive"),
        (["--x", x, "--params", half], f"--params {half} as an .npz of arrays (theta): {corrupt}"),
        (
            ["--x", x, "--params", crc],
            f"--params {crc} as an .npz of arrays (theta): {corrupt} (BadZipFile: Bad CRC",
        ),
        # numpy takes a file without a .npy/.npz header for a pickle: it was said to hold Python objects
        (["--x", x, "--params", text], f"--params {text} is not an .npz archive (no zip header): save"),
        (["--x", x, "--params", empty], f"--params {empty} is empty: save the parameters with np.savez"),
    ]
    for args, message in cases:
        err = _error(["--out", out, *args], capsys)
        assert message in err, (args, err)
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.skipif(
    not os.path.exists("/proc/meminfo"), reason="the host's free memory is read from /proc/meminfo"
)
def test_score_gram_matrix_too_big_names_the_options(tmp_path, capsys):
    """``--hidden 30000`` (p = 150,001: 12 Gram matrices take 2.2 TB): the library's MemoryError was a
    traceback recommending library calls (nj.projected_leverage_scores); now a usage error naming the
    CLI's options. With as many rows as dual columns: fewer are scored from their dual matrix, which is
    then smaller than the Gram matrix."""
    _files(tmp_path, n=150_002, d=3)
    args = ["--x", str(tmp_path / "x.npy"), "--model", "mlp", "--hidden", "30000"]
    err = _error([*args, "--out", str(tmp_path / "s.npy")], capsys)
    assert "the Gram matrix" in err and "a smaller --hidden, or --method norm" in err, err
    assert "nj." not in err and "projected_leverage_scores" not in err, err
    assert not (tmp_path / "s.npy").exists()


def test_score_allocation_refused_by_xla_names_the_options(tmp_path, capsys, monkeypatch):
    """--method norm with --hidden 1000000 ended in XLA's RESOURCE_EXHAUSTED traceback (exit 1), where
    the leverage route named the options; the refusal is simulated (a real one needs the memory's
    size). Other runtime errors still propagate."""
    _files(tmp_path, n=6, d=3)
    args = ["--x", str(tmp_path / "x.npy"), "--method", "norm", "--out", str(tmp_path / "s.npy")]

    def refused(*a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 28000000000 bytes.")

    monkeypatch.setattr(nj, "streaming_norm_scores", refused)
    err = _error(args, capsys)
    assert "the scores do not fit in memory: score fewer rows per chunk (--chunk-size)." in err, err
    assert not (tmp_path / "s.npy").exists()

    def failed(*a, **k):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(nj, "streaming_norm_scores", failed)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        cli.main(["score", *args])


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="np.longdouble is float64 on this platform")
def test_score_extended_precision_files_are_named(tmp_path, capsys):
    """float128 (np.longdouble) files gave jax's 'dtype float128 is not a valid JAX array type' for --x,
    and printed the values for --y."""
    xs, ys = _files(tmp_path, n=6, d=3)
    np.save(tmp_path / "xl.npy", xs.astype(np.longdouble))
    np.save(tmp_path / "yl.npy", ys.astype(np.longdouble))
    x, out = str(tmp_path / "x.npy"), str(tmp_path / "s.npy")
    for args, option, path in [
        (["--x", str(tmp_path / "xl.npy")], "--x", tmp_path / "xl.npy"),
        (["--x", x, "--y", str(tmp_path / "yl.npy")], "--y", tmp_path / "yl.npy"),
    ]:
        err = _error([*args, "--out", out], capsys)
        expected = f"{option} {path} holds {np.dtype(np.longdouble)} (extended precision)"
        assert expected in err and "save it as float64" in err, err


def test_score_unreadable_arrays_name_the_option_and_the_file(tmp_path, capsys):
    """A truncated --y said 'cannot read the data: mmap length is greater than file size', an object-dtype
    one 'Array can't be memory-mapped: Python objects in dtype.', a missing one numpy's errno text: none
    named the option, the first two not the file either."""
    _files(tmp_path, n=300, d=3)
    x, out = str(tmp_path / "x.npy"), str(tmp_path / "s.npy")
    raw = (tmp_path / "y.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) // 2])
    np.save(tmp_path / "obj.npy", np.ones(300, dtype=object))
    cut, obj, missing = (str(tmp_path / name) for name in ("cut.npy", "obj.npy", "missing.npy"))
    cases = [
        (cut, f"--y {cut}: the file is truncated: its header says shape (300,) of float64 (2,400 bytes"),
        (obj, f"--y {obj}: holds Python objects (dtype object), not numbers"),
        (missing, f"--y {missing}: No such file or directory"),
    ]
    for y, message in cases:
        err = _error(["--x", x, "--y", y, "--out", out], capsys)
        assert message in err and "mmap" not in err and "memory-mapped" not in err, err


def test_score_bad_out_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    """``--out ''`` and ``--out newdir/`` failed after the whole scoring, naming the hidden temporary file
    (for '' made in the parent of the working folder); now refused first. A failed move onto --out named
    the temporary file too."""
    _files(tmp_path, n=6, d=3)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def not_scored(*args, **kwargs):
        raise AssertionError("scored before --out was checked")

    x = str(tmp_path / "x.npy")
    (work / "file").touch()
    under_file = str(work / "file" / "s.npy")
    with monkeypatch.context() as patch:
        patch.setattr(nj, "streaming_leverage_scores", not_scored)
        for out, message in [
            ("", "--out is empty: name the .npy file"),
            (f"newdir{os.sep}", f"--out newdir{os.sep} ends with a path separator"),
            (under_file, f"cannot write --out {under_file} in {work / 'file'}: Not a directory"),
        ]:
            err = _error(["--x", x, "--out", out], capsys)
            assert message in err and ".nlis-score-" not in err, (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work", "x.npy", "y.npy"]
    assert sorted(p.name for p in work.iterdir()) == ["file"]

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refused)
        err = _error(["--x", x, "--out", "s.npy"], capsys)
    assert "cannot write --out s.npy: Permission denied" in err and ".nlis-score-" not in err, err
    assert sorted(p.name for p in work.iterdir()) == ["file"]


def test_score_out_a_pipe_is_refused_and_a_link_keeps_pointing(tmp_path, capsys, monkeypatch):
    """--out of a FIFO (or a device: --out /dev/null as root replaced the system's /dev/null) was replaced
    by a regular file, and a symbolic link by the scores' file (its target never written). Now a device,
    pipe or socket is refused before any work, and a link's target receives the scores."""
    xs, _ = _files(tmp_path, n=6, d=3)
    x = str(tmp_path / "x.npy")
    pipe = tmp_path / "pipe.npy"
    os.mkfifo(pipe)
    monkeypatch.setattr(nj, "streaming_leverage_scores", lambda *a, **k: pytest.fail("scored first"))
    err = _error(["--x", x, "--out", str(pipe)], capsys)
    assert f"--out {pipe} is not a regular file (a device, pipe or socket)" in err, err
    assert pipe.is_fifo()
    monkeypatch.undo()
    (tmp_path / "target").mkdir()
    target, link = tmp_path / "target" / "real.npy", tmp_path / "link.npy"
    target.write_bytes(b"old")
    link.symlink_to(target)
    assert cli.main(["score", "--x", x, "--out", str(link)]) == 0
    capsys.readouterr()
    assert link.is_symlink() and os.readlink(link) == str(target)
    scores = np.load(target)
    assert scores.shape == (len(xs),) and abs(scores.sum() - 1) < 1e-12
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["real.npy"]  # no temporary file left


def test_score_params_beyond_the_data_dtype(tmp_path, capsys):
    """theta = 1e39 (float64 --params) with a float32 --x: numpy warned 'overflow encountered in cast',
    then 'params contains 1 NaN or Inf value(s)' though the file holds none. Now the range is checked
    before the cast, naming --params, the key and the dtype; the MLP's parameters too."""
    xs, _ = _files(tmp_path, n=6, d=3)
    np.save(tmp_path / "x32.npy", xs.astype(np.float32))
    x32, out = str(tmp_path / "x32.npy"), str(tmp_path / "s.npy")
    np.savez(tmp_path / "theta.npz", theta=np.array([1e39, 1.0, 0.0]))
    mlp = dict(w0=np.ones((2, 3)), b0=np.ones(2), w1=np.array([[1.0, -3e40]]), b1=np.ones(1))
    np.savez(tmp_path / "mlp.npz", **mlp)
    theta, net = str(tmp_path / "theta.npz"), str(tmp_path / "mlp.npz")
    for args, message in [
        (["--params", theta], f"--params {theta}: theta holds 1 value(s) beyond the range of float32"),
        (
            ["--model", "mlp", "--params", net],
            f"--params {net}: w1 holds 1 value(s) beyond the range of float32",
        ),
    ]:
        err = _error(["--x", x32, "--out", out, *args], capsys)
        assert message in err and "NaN" not in err, err
    assert "(largest magnitude 3e+40; float32 holds up to 3.403e+38)" in err
    # a theta within float32's range scores
    np.savez(tmp_path / "ok.npz", theta=np.array([0.5, -0.25, 0.125]))
    assert cli.main(["score", "--x", x32, "--params", str(tmp_path / "ok.npz"), "--out", out]) == 0
    capsys.readouterr()


def test_score_terminated_by_sigterm_leaves_no_temporary_file(tmp_path):
    """SIGTERM (``kill``, ``timeout``, a scheduler) killed ``nlis-jax score`` without cleanup: the hidden
    temporary ``.npy`` of n zeros stayed beside ``--out`` at every kill. The console script now takes it
    as Ctrl-C: the file removed, "terminated." said, exit code 143 (128 + SIGTERM). The signal is sent
    from inside the scoring call, after the temporary file exists."""
    _files(tmp_path)
    script = (
        "import os, signal, sys\n"
        "import nlis_jax as nj\n"
        "from nlis_jax import cli\n"
        "def scores(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    for _ in range(10 ** 8):\n"
        "        pass\n"
        "nj.streaming_leverage_scores = scores\n"
        f"sys.argv = ['nlis-jax', 'score', '--x', {str(tmp_path / 'x.npy')!r}, '--out', "
        f"{str(tmp_path / 's.npy')!r}]\n"
        "sys.exit(cli.main())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(nj.__file__).resolve().parents[1]))
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr
    assert "nlis-jax score: terminated." in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "y.npy"]


@pytest.mark.parametrize("model", ["single-index", "mlp"])
def test_score_run_again_in_process_compiles_nothing(tmp_path, capsys, model):
    """``cli.main`` called in a loop (a notebook, a sweep) built a new model function every run: the model
    is a static argument of the library's programs, so every run compiled them all again and jax's caches
    kept each copy (+15 MiB and ~5 s a run). The models are built once (``nets`` caches them)."""
    _files(tmp_path)
    args = ["score", "--x", str(tmp_path / "x.npy"), "--model", model, "--out", str(tmp_path / "s.npy")]
    assert cli.main(args) == 0
    first = np.load(tmp_path / "s.npy")
    with count_events() as again:
        assert cli.main(args) == 0
    assert again[COMPILE_EVENT] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), first)
    capsys.readouterr()


def test_console_sigterm_handler_lasts_the_run_only(tmp_path, monkeypatch, capsys):
    """``main()`` with ``argv=None`` (a script or notebook that sets ``sys.argv``) installed its SIGTERM
    handler for good: a later SIGTERM raised inside the caller's code, and every later run reported a
    Ctrl-C as "terminated". From a thread, ``signal.signal`` refused (``ValueError``) and the run failed.
    Now the default handler is back after the run, and a thread runs without one."""
    _files(tmp_path)
    argv = ["nlis-jax", "score", "--x", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s.npy")]
    monkeypatch.setattr(sys, "argv", argv)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert cli.main() == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        codes = []
        thread = threading.Thread(target=lambda: codes.append(cli.main()))
        thread.start()
        thread.join()
        assert codes == [0]
    finally:
        signal.signal(signal.SIGTERM, previous)
    capsys.readouterr()
