"""Bad host inputs get clear errors: ``out=`` vectors, chunk sources (checked chunk by chunk and pass by
pass), host ``ys`` lists, ``gather_rows``, labels of host losses, and the optimizer and key of training.

Every test also checks the valid neighbouring input against an independent reference. Tiny models and
the fixed 4-node rule throughout (the subject is the input handling, not the quadrature).
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nlis_jax as nj

N, D = 12, 3
KW = dict(num_nodes=4, chunk_size=4)


def apply_fn(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


def logits_fn(params, x):
    return jnp.stack([x @ params["w"], params["b"] + 0 * x[0]])


def _setup():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(D), "b": np.asarray(0.3)}
    return params, rng.standard_normal((N, D)), rng.standard_normal(N)


def _dense(params, xs, ys):
    """Dense references: leverage and norm probabilities of the dual matrix."""
    F = nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=4)
    return np.asarray(nj.leverage_scores(F)), np.asarray(nj.norm_scores(F))


def _source(chunks, calls=None):
    def source():
        if calls is not None:
            calls.append(1)
        return iter(chunks)

    return source


# ---------------------------------------------------------------------------------------------- out= vectors
@pytest.mark.parametrize("scores", ["leverage", "norm"])
def test_out_vector_checked(scores):
    params, xs, ys = _setup()
    fn = nj.streaming_leverage_scores if scores == "leverage" else nj.streaming_norm_scores
    ref = _dense(params, xs, ys)[scores == "norm"]
    with pytest.raises(TypeError, match="out must have dtype float32 or float64 .* got int64"):
        fn(apply_fn, params, xs, ys, out=np.zeros(N, np.int64), **KW)
    with pytest.raises(TypeError, match="got float16"):
        fn(apply_fn, params, xs, ys, out=np.zeros(N, np.float16), **KW)
    with pytest.raises(ValueError, match=r"of shape \(12,\), got shape \(13,\)"):
        fn(apply_fn, params, xs, ys, out=np.zeros(N + 1), **KW)
    read_only = np.zeros(N)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="got a read-only one"):
        fn(apply_fn, params, xs, ys, out=read_only, **KW)
    calls = []  # a chunk source: out is checked before its first pass
    with pytest.raises(TypeError, match="got int64"):
        fn(apply_fn, params, _source([(xs, ys)], calls), out=np.zeros(N, np.int64), **KW)
    assert not calls
    for dtype, rtol in ((np.float64, 1e-10), (np.float32, 1e-6)):
        out = np.zeros(N, dtype)
        assert fn(apply_fn, params, xs, ys, out=out, **KW) is out
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=1e-12)


def test_weighted_loss_of_an_empty_chunk_source_is_an_error():
    """A source that yields nothing, or only empty chunks, returned a weighted loss of 0.0; like the
    per-example losses and the scores it is an error, and the same source with its rows gives the sum."""
    params, xs, ys = _setup()
    for chunks in ([], [(xs[:0], ys[:0])]):
        with pytest.raises(ValueError, match="the chunk source yielded no examples"):
            nj.weighted_loss(apply_fn, params, _source(chunks), None)
    ref = float(np.sum(np.square(np.tanh(xs @ params["w"] + params["b"]) - ys)))
    np.testing.assert_allclose(
        float(nj.weighted_loss(apply_fn, params, _source([(xs, ys)]), None)), ref, rtol=1e-12
    )


def _log_model(params, x):  # NaN where x @ w < 0
    return jnp.log(x @ params["w"])


@pytest.mark.parametrize("where", ["device", "host", "source"])
def test_losses_that_are_not_finite_are_errors(where):
    """Finite inputs, a model that is NaN on some examples (the log of a negative number): weighted_loss
    returned NaN and per_example_loss a vector with NaN, without a word (fit raised NonFiniteLossError).
    Now a ValueError counting the examples (per_example_loss names the first); under a trace the value
    is returned (nothing to check), and the finite examples alone give the reference sum."""
    xs = np.array([[1.0], [-1.0], [2.0], [-3.0], [4.0]])
    ys = np.zeros(5)
    params = {"w": np.array([1.0])}
    data = {
        "device": (jnp.asarray(xs), jnp.asarray(ys)),
        "host": (xs, ys),
        "source": (_source([(xs[:2], ys[:2]), (xs[2:], ys[2:])]), None),
    }[where]
    with pytest.raises(
        ValueError, match="2 of 5 examples give a NaN or Inf loss.*per_example_loss names them"
    ):
        nj.weighted_loss(_log_model, params, *data)
    with pytest.raises(ValueError, match=r"2 of 5 examples give a NaN or Inf loss.*the first: \[1, 3\]"):
        nj.per_example_loss(_log_model, params, *data)
    keep = xs[:, 0] > 0
    got = nj.weighted_loss(_log_model, params, xs[keep], ys[keep])
    np.testing.assert_allclose(float(got), np.sum(np.log(xs[keep, 0]) ** 2), rtol=1e-12)
    traced = jax.jit(lambda p: nj.weighted_loss(_log_model, p, jnp.asarray(xs), jnp.asarray(ys)))(params)
    assert np.isnan(float(traced))


@pytest.mark.parametrize("where", ["device", "host", "source"])
def test_complex_ys_are_refused(where):
    """Complex ys on the host path were cast to the params' real dtype (imaginary part dropped, scores
    bit-identical to those of the real part; a DeprecationWarning at most); the device losses returned a
    complex "loss". Now a TypeError on every path, before any work."""
    params, xs, ys = _setup()
    yc = ys + 1j
    calls = []
    data = {
        "device": (jnp.asarray(xs), jnp.asarray(yc)),
        "host": (xs, yc),
        "source": (_source([(xs, yc)], calls), None),
    }[where]
    name = "y_chunk of chunk 0 of the chunk source" if where == "source" else "ys"
    fns = [nj.weighted_loss, nj.per_example_loss]
    if where != "device":  # the device scores already refused complex ys (check_floating)
        fns += [nj.streaming_leverage_scores, nj.streaming_norm_scores]
    for fn in fns:
        with pytest.raises(TypeError, match=f"{name} must hold real numbers, got dtype complex128"):
            fn(apply_fn, params, *data)


def test_byte_swapped_host_arrays_are_named():
    """Big-endian arrays (a .npy written on a big-endian machine) failed inside apply_fn's shape check
    ("Check that xs has the examples on its leading axis"), or with jax's TypeError printing the whole
    array for ys; now a TypeError naming the array and the byte order. Native order gives the reference."""
    params, xs, ys = _setup()
    swapped = ">f8" if np.little_endian else "<f8"
    cases = [
        ("xs", nj.streaming_leverage_scores, (xs.astype(swapped), ys)),
        ("ys", nj.streaming_norm_scores, (xs, ys.astype(swapped))),
        ("weights", nj.weighted_loss, (xs, ys, np.ones(N, swapped))),
        ("chunk 0 of the chunk source", nj.streaming_leverage_scores, (_source([(xs.astype(swapped), ys)]),)),
    ]
    for name, fn, args in cases:
        with pytest.raises(TypeError, match=f"{name} is stored in non-native byte order .{swapped}"):
            fn(apply_fn, params, *args, **({} if fn is nj.weighted_loss else KW))
    np.testing.assert_allclose(
        nj.streaming_leverage_scores(apply_fn, params, xs, ys, **KW), _dense(params, xs, ys)[0]
    )


def test_byte_swapped_arrays_are_named_on_the_device_paths_too():
    """Beyond the host paths, big-endian input failed with jax's TypeError: printing the whole array
    (fit), "Error interpreting argument to stage" (leverage_scores), or naming no argument (params of
    the streaming path)."""
    params, xs, ys = _setup()
    swapped = ">f8" if np.little_endian else "<f8"
    F = np.asarray(nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=4))
    big_params = jax.tree.map(lambda a: np.asarray(a, swapped), params)
    cases = [
        (
            "xs",
            lambda: nj.fit(apply_fn, params, xs.astype(swapped), ys, optimizer=optax.sgd(0.1), num_steps=1),
        ),
        ("xs", lambda: nj.dual_matrix(apply_fn, params, xs.astype(swapped), ys, num_nodes=4)),
        ("params['b']", lambda: nj.adjoint(apply_fn, big_params, xs)),  # the first leaf, by its path
        ("params['b']", lambda: nj.streaming_leverage_scores(apply_fn, big_params, xs, ys, **KW)),
        ("F", lambda: nj.leverage_scores(F.astype(swapped))),
        ("F", lambda: nj.norm_scores(F.astype(swapped))),
        ("probs", lambda: nj.sample(jax.random.key(0), np.full(N, 1 / N, swapped), 3)),
    ]
    for name, call in cases:
        message = f"^{re.escape(name)} is stored in non-native byte order .{swapped}"
        with pytest.raises(TypeError, match=message):
            call()


def test_pandas_objects_are_named_where_jax_cannot_take_them():
    """A pandas DataFrame as xs (or a Series as the device paths' ys, a str leaf in params) failed in
    jax: "Argument '     0    1 ...' of type <class 'pandas.DataFrame'> is not a valid JAX type", the
    whole frame printed and no argument named; as a chunk it was "must be numpy arrays ..., got shape (8,
    3)", a shape that was right. Where the library converts the input itself (F, probs, the host paths'
    ys) pandas objects still work."""
    import pandas as pd

    params, xs, ys = _setup()
    frame, series = pd.DataFrame(xs), pd.Series(ys)
    named = "is a pandas.{}, which JAX does not take as an array: pass a numpy array, e.g. {}.to_numpy()"
    cases = [
        ("xs", "DataFrame", lambda: nj.dual_matrix(apply_fn, params, frame, ys, num_nodes=4)),
        ("xs", "DataFrame", lambda: nj.streaming_leverage_scores(apply_fn, params, frame, ys, **KW)),
        ("xs", "DataFrame", lambda: nj.weighted_loss(apply_fn, params, frame, ys)),
        (
            "xs",
            "DataFrame",
            lambda: nj.fit(apply_fn, params, frame, ys, optimizer=optax.sgd(0.1), num_steps=1),
        ),
        ("ys", "Series", lambda: nj.dual_matrix(apply_fn, params, xs, series, num_nodes=4)),
        # fit and the device loss (they printed the whole Series; the host loss converts it, below)
        ("ys", "Series", lambda: nj.fit(apply_fn, params, xs, series, optimizer=optax.sgd(0.1), num_steps=1)),
        ("ys", "Series", lambda: nj.weighted_loss(apply_fn, params, jnp.asarray(xs), series)),
        ("weights", "Series", lambda: nj.weighted_loss(apply_fn, params, jnp.asarray(xs), ys, series**2)),
    ]
    for name, kind, call in cases:
        with pytest.raises(TypeError, match="^" + re.escape(f"{name} " + named.format(kind, name))):
            call()
    with pytest.raises(TypeError, match=r"^params\['name'\] is a str, which JAX does not take as an array"):
        nj.adjoint(apply_fn, {**params, "name": "tanh"}, xs)
    chunks = [
        ((frame, ys), "a pandas.DataFrame"),
        ((xs.tolist(), ys), "a Python list"),
        (((xs, xs), series), r"a pandas.Series\.$"),  # y's type, not "a Python tuple" of x
    ]
    for chunk, got in chunks:
        with pytest.raises(TypeError, match=f"must be numpy arrays .* got {got}"):
            nj.streaming_leverage_scores(apply_fn, params, lambda c=chunk: iter([c]), **KW)
    # converted by the library: same values as from numpy
    F = np.asarray(nj.dual_matrix(apply_fn, params, xs, ys, num_nodes=4))
    np.testing.assert_array_equal(nj.leverage_scores(pd.DataFrame(F)), nj.leverage_scores(F))
    host = nj.streaming_leverage_scores(apply_fn, params, xs, series, **KW)
    np.testing.assert_array_equal(host, nj.streaming_leverage_scores(apply_fn, params, xs, ys, **KW))
    host = nj.weighted_loss(apply_fn, params, xs, series, series**2)
    np.testing.assert_array_equal(host, nj.weighted_loss(apply_fn, params, xs, ys, ys**2))


def test_a_list_of_chunks_is_told_to_be_a_callable():
    """A list of (x, y) pairs passed as xs was read as a pytree of arrays: "every array of xs must have
    5 examples first"; the message now says what a chunk source is."""
    params, xs, ys = _setup()
    with pytest.raises(ValueError, match=r"xs is a list of pairs: a chunk source is a callable"):
        nj.streaming_leverage_scores(apply_fn, params, [(xs[:5], ys[:5]), (xs[5:], ys[5:])], **KW)


def test_norm_scores_of_any_scale_into_a_float32_out():
    """float64 data into a float32 out: the norms are stored scaled by a power of two from the first
    chunk, so their scale does not matter (before: ×1e20 was refused, ×1e-24 gave 50 NaN silently, and
    squares near 1e-43 became denormals 3% off). Norms (no longer their squares) that span more than
    float32's range across chunks are still refused."""
    params, xs, ys = _setup()
    for scale in (1e20, 1e19, 1e-22, 1e-24):  # squares ~1e40, ~1e38 (their sum past float32), ~1e-44, ~1e-48
        f32 = np.zeros(N, np.float32)
        lin = nj.streaming_norm_scores(_linear, params["w"], xs * scale, ys * scale, out=f32, **KW)
        assert lin is f32 and not np.any(np.isnan(f32))
        np.testing.assert_allclose(f32, _linear_norms(xs, ys), rtol=1e-6)
    # the first chunk's norms near 1e-30, later ones near 1 (squares 1e60 apart: refused when the
    # squares were stored); the norms themselves fit float32 after the first chunk's scaling: exact
    first = (np.arange(N) < 4)[:, None]
    spread_x, spread_y = np.where(first, xs * 1e-30, xs), np.where(first[:, 0], ys * 1e-30, ys)
    f32 = np.zeros(N, np.float32)
    nj.streaming_norm_scores(_linear, params["w"], spread_x, spread_y, out=f32, **KW)
    np.testing.assert_allclose(f32, _linear_norms(spread_x, spread_y), rtol=1e-6, atol=1e-44)
    # norms 1e60 apart still span more than float32 holds
    spread_x, spread_y = np.where(first, xs * 1e-60, xs), np.where(first[:, 0], ys * 1e-60, ys)
    with pytest.raises(ValueError, match="the scores reach .*, beyond the range of out.s dtype float32"):
        nj.streaming_norm_scores(_linear, params["w"], spread_x, spread_y, out=np.zeros(N, np.float32), **KW)
    out = np.zeros(N)
    nj.streaming_norm_scores(apply_fn, params, xs, ys * 1e20, out=out, **KW)
    np.testing.assert_allclose(out, _dense(params, xs, ys * 1e20)[1], rtol=1e-10)
    # norms from 2^1023 on: the scale 2^-1024 was subnormal, flushed to 0 ("all zeros"); now 2^-1022
    big_x, big_y = np.array([[1.5e308], [1e308], [0.5e308], [1e307]]), np.zeros(4)
    f32 = np.zeros(4, np.float32)
    nj.streaming_norm_scores(_linear, np.ones(1), big_x, big_y, out=f32, chunk_size=4, num_nodes=2)
    np.testing.assert_allclose(
        f32, (big_x[:, 0] / 1e307) ** 2 / np.sum((big_x[:, 0] / 1e307) ** 2), rtol=1e-6
    )


def _linear(theta, x):
    return jnp.dot(x, theta)


def _linear_norms(xs, ys):
    """Norm probabilities of the linear model's dual rows ``[x | −y]`` (its adjoint is ``x``)."""
    sq = np.sum(xs**2, axis=1) + ys**2
    return sq / sq.sum()


# ----------------------------------------------------------------------- chunk sources: passes that disagree
def test_chunk_source_passes_must_agree():
    params, xs, ys = _setup()
    passes = []

    def shrinking():  # one example fewer on each pass
        passes.append(1)
        k = N - len(passes) + 1
        return iter([(xs[:k], ys[:k])])

    with pytest.raises(ValueError, match="yielded 11 examples on pass 2 but 12 on the first pass"):
        nj.streaming_leverage_scores(apply_fn, params, shrinking, **KW)
    passes.clear()

    def growing():
        passes.append(1)
        k = 6 + len(passes)
        return iter([(xs[:k], ys[:k])])

    with pytest.raises(ValueError, match=r"more than 7 examples \(at least 8\) on pass 2 but 7 on the first"):
        nj.streaming_leverage_scores(apply_fn, params, growing, **KW)
    passes.clear()

    def rescaled():  # the same length, other values on each pass
        passes.append(1)
        return iter([(xs * len(passes), ys)])

    with pytest.raises(ValueError, match="other rows on pass 2 than on the first pass"):
        nj.streaming_leverage_scores(apply_fn, params, rescaled, **KW)
    same = [(xs[:5], ys[:5]), (xs[5:6], ys[5:6]), (xs[6:], ys[6:])]  # consistent: no false alarm
    info = nj.streaming_leverage_scores(apply_fn, params, _source(same), return_info=True, **KW)
    np.testing.assert_allclose(info.probs, _dense(params, xs, ys)[0], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(float(jnp.sum(info.leverage)), int(info.rank), rtol=1e-10)


@pytest.mark.parametrize("route", [None, "gram", "gram2", "stable"])
def test_chunk_source_rows_in_another_order_on_a_later_pass(route):
    """The same rows in another order keep the Gram matrix, the counts and ``Σh = rank``: only a digest of
    each piece's sampled rows (first and last valid included) against the first pass's catches them.
    Before, the scores came back on the wrong rows with no error (0.96 off on a 5,003-row source)."""
    params, xs, ys = _setup()
    calls = []

    def reordered(order):
        def source():
            calls.append(1)
            rows = np.arange(N) if len(calls) == 1 else order
            return iter([(xs[rows[:5]], ys[rows[:5]]), (xs[rows[5:]], ys[rows[5:]])])

        return source

    kw = dict(KW, route=route)
    swapped = np.arange(N)
    swapped[[4, 7]] = swapped[[7, 4]]  # the first and last rows of the second piece (rows 4–7)
    for order, rows in ((np.arange(N)[::-1], "0–3"), (swapped, "4–7")):
        calls.clear()
        with pytest.raises(
            ValueError, match=f"other rows on pass 2 than on the first pass .among examples {rows}"
        ):
            nj.streaming_leverage_scores(apply_fn, params, reordered(order), **kw)
        calls.clear()  # one pass: the norm scores of the rows as they come are right
        probs = nj.streaming_norm_scores(apply_fn, params, reordered(order), **KW)
        np.testing.assert_allclose(probs, _dense(params, xs, ys)[1], rtol=1e-12)


@pytest.mark.parametrize("chunk_size, lengths", [(64, {N}), (8, {8})])
def test_a_chunk_source_shorter_than_a_chunk_is_not_padded(chunk_size, lengths, monkeypatch):
    """A source of fewer than ``chunk_size`` rows in all is one piece of its own length, as an array is
    (it was padded to ``chunk_size``: 5,003 rows at chunk_size 200,000 formed 40× the dual rows, 2.9 s
    against 0.1 s); longer sources keep pieces of ``chunk_size``. Same scores as the array's."""
    from nlis_jax import _host

    params, xs, ys = _setup()
    seen, rechunk = set(), _host.rechunk

    def recording(source, chunk):
        for piece, valid in rechunk(source, chunk):
            seen.add(jax.tree.leaves(piece)[0].shape[0])
            yield piece, valid

    monkeypatch.setattr(_host, "rechunk", recording)
    source, kw = _source([(xs[:5], ys[:5]), (xs[5:], ys[5:])]), dict(KW, chunk_size=chunk_size)
    got = [
        scores(apply_fn, params, source, **kw)
        for scores in (nj.streaming_leverage_scores, nj.streaming_norm_scores)
    ]
    got.append(nj.weighted_loss(apply_fn, params, source, None, chunk_size=chunk_size))
    assert seen == lengths  # the arrays' pieces below are another rule's (balanced_chunk)
    np.testing.assert_allclose(
        got[0], nj.streaming_leverage_scores(apply_fn, params, xs, ys, **kw), rtol=1e-12
    )
    np.testing.assert_allclose(got[1], nj.streaming_norm_scores(apply_fn, params, xs, ys, **kw), rtol=1e-12)
    np.testing.assert_allclose(
        got[2], nj.weighted_loss(apply_fn, params, xs, ys, chunk_size=chunk_size), rtol=1e-12
    )


def test_a_later_pass_or_another_structure_is_named():
    """Chunk 0 of pass 2 against chunk 0 of the first pass (was "chunk 0 ... but chunk 0 ..."); another
    pytree structure of x_chunk by its structure (was two identical lists of shapes)."""
    params, xs, ys = _setup()
    for later, what in [((xs.astype(np.float32), ys), "float32"), ((xs, None), "y_chunk None")]:
        passes = iter([[(xs, ys)], [later]])
        with pytest.raises(
            ValueError, match=f"chunk 0 of the chunk source on pass 2 .*{what}.* chunk 0 of the first pass"
        ):
            nj.streaming_leverage_scores(apply_fn, params, lambda p=passes: iter(next(p)), **KW)

    def pair_fn(p, x):  # x a pair of arrays, as a tuple or a list
        return apply_fn(p, x[0]) + 0 * x[1]

    chunks = [((xs[:5], ys[:5]), ys[:5]), ([xs[5:], ys[5:]], ys[5:])]  # same shapes, another structure
    with pytest.raises(
        ValueError, match=r"x_chunk of chunk 1 .* pytree structure .*\[\*, \*\].* has .*\(\*, \*\)"
    ):
        nj.streaming_norm_scores(pair_fn, params, lambda: iter(chunks), **KW)  # was: two identical lists


def test_consistent_float32_source_passes_the_sum_check():
    """float32 (larger orthogonality error than float64): consistent data stays far inside 1 %."""
    params, xs, ys = _setup()
    p32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    x32, y32 = xs.astype(np.float32), ys.astype(np.float32)
    got = nj.streaming_leverage_scores(apply_fn, p32, _source([(x32[:7], y32[:7]), (x32[7:], y32[7:])]), **KW)
    want = nj.streaming_leverage_scores(apply_fn, p32, x32, y32, **KW)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- chunk sources: each chunk checked
@pytest.mark.parametrize("scores", ["leverage", "norm"])
def test_chunks_checked_as_they_arrive(scores):
    params, xs, ys = _setup()
    fn = nj.streaming_leverage_scores if scores == "leverage" else nj.streaming_norm_scores

    def run(chunks):
        return fn(apply_fn, params, _source(chunks), **KW)

    head, tail = (xs[:5], ys[:5]), (xs[5:], ys[5:])
    with pytest.raises(ValueError, match=r"x_chunk of chunk 1 .* \(2,\) float64 but chunk 0 has \(3,\)"):
        run([head, (xs[5:, :2], ys[5:])])
    with pytest.raises(ValueError, match=r"x_chunk of chunk 1 .* float32 but chunk 0 has \(3,\) float64"):
        run([head, (xs[5:].astype(np.float32), ys[5:])])
    with pytest.raises(ValueError, match="chunk 1 of the chunk source has y_chunk None but chunk 0 has"):
        run([head, (xs[5:], None)])
    with pytest.raises(ValueError, match=r"y_chunk of chunk 0 .* \(12, 1\) .* \(1-D for a scalar model\)"):
        run([(xs, ys[:, None])])
    with pytest.raises(ValueError, match=r"chunk 0 of the chunk source: .* shapes \[\(5, 3\), \(4,\)\]"):
        run([(xs[:5], ys[:4]), tail])
    with pytest.raises(ValueError, match="yielded no examples"):
        run([])
    with pytest.raises(TypeError, match="item 0 is a list"):
        run([[xs, ys]])
    with pytest.raises(TypeError, match="calling it returned int"):
        fn(apply_fn, params, lambda: 3, **KW)
    with pytest.raises(TypeError, match="pass a function that returns a fresh iterator"):
        fn(apply_fn, params, (pair for pair in [(xs, ys)]), **KW)
    ref = _dense(params, xs, ys)[scores == "norm"]
    np.testing.assert_allclose(run([head, (xs[5:5], ys[5:5]), tail]), ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("scores", ["leverage", "norm"])
def test_nan_in_a_memmapped_ys_is_named_as_such(tmp_path, bad, scores):
    """A NaN or Inf in a memmapped ys (``nlis-jax score --y``) was "ys has 1 value(s) beyond the range of
    the params' dtype float64 ... Rescale ys": the range check counted it before the pass over the data,
    which names non-finite values (an in-memory ys is checked for them first). Now the pass names it."""
    params, xs, ys = _setup()
    ys = ys.copy()
    ys[5] = bad
    np.save(tmp_path / "ys.npy", ys)
    mapped = np.load(tmp_path / "ys.npy", mmap_mode="r")
    fn = nj.streaming_leverage_scores if scores == "leverage" else nj.streaming_norm_scores
    with pytest.raises(ValueError, match=r"^xs or ys contains 1 NaN or Inf value\(s\); clean the input"):
        fn(apply_fn, params, xs, mapped, **KW)
    with pytest.raises(ValueError, match=r"^ys contains 1 NaN or Inf value\(s\)"):  # in memory, as before
        fn(apply_fn, params, xs, ys, **KW)
    ys[5] = 0.5  # the neighbouring valid input: the device path's scores
    np.save(tmp_path / "ys.npy", ys)
    mapped = np.load(tmp_path / "ys.npy", mmap_mode="r")
    ref = _dense(params, xs, ys)[scores == "norm"]
    np.testing.assert_allclose(fn(apply_fn, params, xs, mapped, **KW), ref, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------- host ys given as a list
def test_host_ys_list_converted():
    params, xs, ys = _setup()
    ref = _dense(params, xs, ys)
    got = nj.streaming_leverage_scores(apply_fn, params, xs, ys.tolist(), **KW)
    np.testing.assert_allclose(got, ref[0], rtol=1e-10, atol=1e-13)
    got = nj.streaming_norm_scores(apply_fn, params, xs, ys.tolist(), **KW)
    np.testing.assert_allclose(got, ref[1], rtol=1e-10, atol=1e-13)
    pred = np.tanh(xs @ params["w"] + params["b"])
    loss = nj.weighted_loss(apply_fn, params, xs, ys.tolist(), np.ones(N).tolist(), chunk_size=4)
    np.testing.assert_allclose(loss, np.sum((pred - ys) ** 2), rtol=1e-12)


# ----------------------------------------------------------------------------------------------- gather_rows
def test_gather_rows_checked():
    _, xs, ys = _setup()
    with pytest.raises(ValueError, match=r"same number of rows .* \[\(12, 3\), \(5,\)\]"):
        nj.gather_rows((xs, ys[:5]), np.array([1, 2]))
    with pytest.raises(ValueError, match=r"out of range \[0, 12\) .* got values in \[-1, 3\]"):
        nj.gather_rows(xs, np.array([-1, 3]))
    with pytest.raises(ValueError, match="1-D integer vector"):
        nj.gather_rows(xs, np.array([1.0]))
    assert nj.gather_rows(xs, []).shape == (0, D)
    idx = np.array([3, 1, 3])
    got_x, got_y = nj.gather_rows((xs, ys), jnp.asarray(idx))
    np.testing.assert_array_equal(got_x, xs[idx])
    np.testing.assert_array_equal(got_y, ys[idx])
    # under jax.jit: jax's ConcretizationTypeError from is_fully_addressable, not a word on the cause
    with pytest.raises(TypeError, match="gather_rows reads rows of host data .* cannot run under jax.jit"):
        jax.jit(lambda i: nj.gather_rows(xs, i))(jnp.asarray(idx))


# ------------------------------------------------------------------------------------- labels of host losses
def test_labels_of_host_losses_checked(tmp_path):
    params, xs, _ = _setup()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\] .* got values in \[0, 2\]\.$"):
        nj.per_example_loss(apply_fn, params, xs, np.r_[np.zeros(N - 1), 2.0], loss="logistic")
    np.save(tmp_path / "labels.npy", np.full(N, -1.0))
    labels = np.load(tmp_path / "labels.npy", mmap_mode="r")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\] .* got values in \[-1, -1\]"):
        nj.weighted_loss(apply_fn, params, xs, labels, loss="logistic", chunk_size=4)
    with pytest.raises(
        ValueError, match=r"integers in \[0, 2\) for the 2 logits .* got values in \[-1, 1\]\.$"
    ):
        nj.weighted_loss(logits_fn, params, xs, np.r_[np.ones(N - 1, int), -1], loss="cross_entropy")
    bad = _source([(xs[:6], np.zeros(6, int)), (xs[6:], np.full(N - 6, 3))])
    with pytest.raises(ValueError, match=r"got values in \[3, 3\] \(in chunk 1 of the chunk source\)"):
        nj.weighted_loss(logits_fn, params, bad, None, loss="cross_entropy")
    with pytest.raises(ValueError, match="y_chunk None, but the losses need the targets"):
        nj.weighted_loss(apply_fn, params, _source([(xs, None)]), None)
    y01 = (np.arange(N) % 2).astype(np.float64)
    z = np.tanh(xs @ params["w"] + params["b"])
    ref = np.logaddexp(0.0, z) - y01 * z
    got = nj.per_example_loss(apply_fn, params, xs, y01, loss="logistic", chunk_size=4)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    labels = np.arange(N) % 2
    zz = np.stack([xs @ params["w"], np.full(N, 0.3)], axis=1)
    ref_ce = np.sum(np.logaddexp(zz[:, 0], zz[:, 1]) - zz[np.arange(N), labels])
    got_ce = nj.weighted_loss(logits_fn, params, _source([(xs, labels)]), None, loss="cross_entropy")
    np.testing.assert_allclose(got_ce, ref_ce, rtol=1e-12)


# ----------------------------------------------------------------------------- optimizer and key of training
def test_make_train_step_optimizer_checked():
    def loss(p, batch):
        return jnp.sum(p["w"] ** 2)

    with pytest.raises(TypeError, match="optimizer must be an optax.GradientTransformation, got 'sgd'"):
        nj.make_train_step(loss, "sgd")
    opt = optax.sgd(0.1)
    w = np.array([1.0, -2.0])
    step = nj.make_train_step(loss, opt)
    state, value = step(nj.TrainState({"w": jnp.asarray(w)}, opt.init({"w": jnp.asarray(w)})), None)
    np.testing.assert_allclose(value, np.sum(w**2))
    np.testing.assert_allclose(state.params["w"], w - 0.1 * 2 * w)


def test_fit_minibatch_key_checked():
    params, xs, ys = _setup()
    kw = dict(optimizer=optax.sgd(0.05), num_steps=3, batch_size=4)
    with pytest.raises(TypeError, match="key must be a PRNG key, e.g. jax.random.key"):
        nj.fit(apply_fn, params, xs, ys, key=0, **kw)
    result = nj.fit(apply_fn, params, xs, ys, key=jax.random.key(0), **kw)
    pred = np.tanh(xs @ np.asarray(result.params["w"]) + np.asarray(result.params["b"]))
    np.testing.assert_allclose(result.final_loss, np.sum((pred - ys) ** 2), rtol=1e-12)


def test_host_leverage_names_integer_params():
    """Integer params on the host path got numpy's "data type ... not inexact" (the default tolerance was
    taken from their dtype before the params were checked); now the library's message, as elsewhere."""
    _, xs, ys = _setup()
    params = {"w": np.ones(D, np.int32), "b": np.asarray(0, np.int32)}
    for data in ((xs, ys), (lambda: iter([(xs, ys)]), None)):
        message = r"params\['b'\] must hold floating-point arrays, got dtype int32"  # the first leaf
        with pytest.raises(TypeError, match=message):
            nj.streaming_leverage_scores(apply_fn, params, *data, **KW)


@pytest.mark.parametrize(
    "bad", [np.array(["1.5"] * N), np.array([b"ab"] * N), np.array(["2020-01-01"] * N, dtype="datetime64[D]")]
)
def test_host_arrays_of_non_numbers_are_named(bad):
    """Strings, bytes or dates as ys (host data, a chunk source too) got JAX's error, which printed the
    array and named neither the argument nor the cause."""
    params, xs, ys = _setup()
    with pytest.raises(TypeError, match=f"ys must hold numbers, got dtype {re.escape(str(bad.dtype))}"):
        nj.streaming_leverage_scores(apply_fn, params, xs, bad, **KW)
    with pytest.raises(TypeError, match="ys must hold numbers"):
        nj.weighted_loss(apply_fn, params, xs, bad)
    with pytest.raises(TypeError, match=r"chunk 0 of the chunk source must hold numbers"):
        nj.streaming_norm_scores(apply_fn, params, lambda: iter([(xs, bad)]), **KW)
    ref = _dense(params, jnp.asarray(xs), jnp.asarray(ys))[1]  # the numbers themselves are scored
    np.testing.assert_allclose(nj.streaming_norm_scores(apply_fn, params, xs, ys, **KW), ref, rtol=1e-12)


def test_losses_without_ys():
    """``ys`` may be left out with a chunk source (it was a required argument: passing ``None`` by hand
    was the only way); without one, every path names the missing responses (device arrays reported
    "ys must have at least 1 axis ... got shape ()")."""
    params, xs, ys = _setup()
    want = np.sum((np.tanh(xs @ params["w"] + params["b"]) - ys) ** 2)
    source = lambda: iter([(xs[:5], ys[:5]), (xs[5:], ys[5:])])  # noqa: E731
    np.testing.assert_allclose(nj.weighted_loss(apply_fn, params, source), want, rtol=1e-12)
    per = nj.per_example_loss(apply_fn, params, source)
    np.testing.assert_allclose(per, (np.tanh(xs @ params["w"] + params["b"]) - ys) ** 2, rtol=1e-12)
    for data in (xs, jnp.asarray(xs)):
        for fn in (nj.weighted_loss, nj.per_example_loss):
            with pytest.raises(ValueError, match=r"the losses need ys \(or a chunk source"):
                fn(apply_fn, params, data)
    with pytest.raises(ValueError, match=r"the losses need ys"):
        nj.fit(apply_fn, params, jnp.asarray(xs), None, optimizer=optax.sgd(0.1), num_steps=1)


def test_numpy_bfloat16_host_data_is_scored():
    """``np.asarray`` of a jax bfloat16 array is a numpy array of ``ml_dtypes.bfloat16`` (dtype kind
    ``"V"``): the host paths refused it ("xs must hold numbers, got dtype bfloat16") while the device ones
    scored it. Now both give the same values."""

    def model(theta, x):
        return jnp.tanh(x @ theta)

    theta = jnp.full(3, 0.2, jnp.bfloat16)
    xs = jax.random.normal(jax.random.key(0), (64, 3), jnp.bfloat16)
    ys = jax.random.normal(jax.random.key(1), (64,), jnp.bfloat16)
    host_x, host_y = np.asarray(xs), np.asarray(ys)
    assert host_x.dtype.kind == "V"
    for fn in (nj.streaming_norm_scores, nj.streaming_leverage_scores, nj.per_example_loss, nj.weighted_loss):
        host, device = fn(model, theta, host_x, host_y), fn(model, theta, xs, ys)
        assert host.dtype == device.dtype
        np.testing.assert_array_equal(np.asarray(host, np.float32), np.asarray(device, np.float32))
    with pytest.raises(TypeError, match="xs must hold numbers, got dtype"):
        nj.streaming_norm_scores(model, theta, np.zeros((4, 3), [("a", "f4")]))


def test_complex_inputs_giving_complex_outputs_are_named_on_every_path():
    """Complex numpy xs on the host paths failed inside jax.jacrev ("jacrev requires real-valued outputs
    ... holomorphic=True"), while the device paths named the model's output dtype: named everywhere now."""
    xs = np.random.default_rng(0).standard_normal((20, 3)).astype(np.complex64)
    theta = jnp.ones(3, jnp.float32)
    message = "apply_fn must return floating values, got dtype complex64"
    for call in (
        lambda: nj.streaming_leverage_scores(_linear, theta, xs, **KW),
        lambda: nj.streaming_norm_scores(_linear, theta, xs, **KW),
        lambda: nj.streaming_leverage_scores(_linear, theta, lambda: iter([(xs, None)]), **KW),
        lambda: nj.streaming_leverage_scores(_linear, theta, jnp.asarray(xs), **KW),
        lambda: nj.dual_matrix(_linear, theta, xs),
    ):
        with pytest.raises(TypeError, match=message):
            call()


# ------------------------------------------------------------------- chunk sources read as the device goes
@pytest.mark.parametrize("fn", [nj.weighted_loss, nj.per_example_loss])
def test_chunk_source_is_read_as_the_device_goes(fn):
    """The losses' sum and the per-example values (the path of ``streaming_norm_scores`` too) dispatched
    every chunk without waiting, so a chunk source was read to its end while the device still worked on
    the first chunks (all of them held at once: 98–134 MiB for a 65 MiB source). Now at most two steps
    are in flight: chunk ``k`` is read once step ``k - 3`` is done, so with 12 chunks of equal work the
    last is read after about 3/4 of the pass (before: within its first tenth, measured 8–9%)."""
    rng = np.random.default_rng(1)
    xs, ys = rng.standard_normal((4096, 8)), rng.standard_normal(4096)

    def slow(theta, x):  # ~25 ms a chunk of 4,096 rows
        z = x @ theta
        for _ in range(150):
            z = jnp.tanh(z) + 0.5 * z
        return z

    read = []

    def source():
        for _ in range(12):
            read.append(time.perf_counter())
            yield xs, ys

    theta = np.full(8, 0.1)
    jax.block_until_ready(fn(slow, theta, source, chunk_size=4096))  # compiles
    read.clear()
    jax.block_until_ready(fn(slow, theta, source, chunk_size=4096))
    end = time.perf_counter()
    assert len(read) == 12
    share = (np.asarray(read) - read[0]) / (end - read[0])
    assert share[-1] >= 0.5, np.round(share, 2)


@pytest.mark.parametrize("scores", ["leverage", "norm"])
def test_out_bounds_the_rows_of_a_chunk_source(scores):
    """A chunk source's scores go straight into ``out`` (the norm scores kept all ``n`` of them in memory,
    then copied them), and an ``out`` shorter than the source stops the pass at once: an endless source
    was read without end (the leverage's first pass, the Gram matrix, read it all before ``out`` was
    used, before the fortieth session). One too long is named after the pass, as for arrays."""
    params, xs, ys = _setup()
    fn = nj.streaming_leverage_scores if scores == "leverage" else nj.streaming_norm_scores
    ref = _dense(params, xs, ys)[scores == "norm"]
    out = np.zeros(N)
    assert fn(apply_fn, params, _source([(xs[:5], ys[:5]), (xs[5:], ys[5:])]), out=out, **KW) is out
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"of shape \(12,\), got shape \(13,\)"):
        fn(apply_fn, params, _source([(xs, ys)]), out=np.zeros(N + 1), **KW)
    read = []

    def endless():
        while True:
            read.append(1)
            yield xs[:4], ys[:4]

    with pytest.raises(ValueError, match=r"shape \(n,\), n the chunk source's examples: .* more than 12"):
        fn(apply_fn, params, endless, out=np.zeros(N), **KW)
    assert len(read) <= 6


@pytest.mark.parametrize("x64", [True, False], ids=["shape", "narrowing"])
def test_chunk_source_closed_when_a_check_stops_the_pass(x64):
    """A check that refuses a chunk mid-pass (here another shape; without x64 a float64 value past
    float32's range) left the user's generator open for as long as the caller held the exception (its
    traceback held the frames): its ``finally`` (a file, a cursor) ran only when the error was dropped."""
    params, xs, ys = _setup()
    state = {"open": 0}

    def source():
        state["open"] += 1
        try:
            for k in range(3):
                x = xs[4 * k : 4 * k + 4].copy()
                if k == 2:
                    x = x[:, :2] if x64 else np.full_like(x, 1e300)
                yield x, ys[4 * k : 4 * k + 4]
        finally:
            state["open"] -= 1

    with jax.enable_x64(x64), pytest.raises(ValueError, match="chunk 2|beyond float32's range") as caught:
        nj.streaming_leverage_scores(apply_fn, {k: np.float32(v) for k, v in params.items()}, source, **KW)
    assert caught.value is not None and state["open"] == 0


def test_a_reusable_iterator_source_is_not_closed():
    """Only a generator is closed when a check stops the pass: an iterator object the source returns each
    time (a reader rewound per pass, with a ``close`` of its own) stays usable for the next call."""
    params, xs, ys = _setup()

    class Reader:
        closed, wide = False, True  # its first read has a chunk of another width (a file being written)

        def rewind(self):
            self.at = 0
            return self

        def __iter__(self):
            return self

        def __next__(self):
            if self.at >= N:
                raise StopIteration
            self.at += 4
            x = xs[self.at - 4 : self.at]
            return (np.hstack([x, x]) if self.wide and self.at == 8 else x), ys[self.at - 4 : self.at]

        def close(self):
            self.closed = True

    reader = Reader()
    with pytest.raises(ValueError, match="x_chunk of chunk 1"):
        nj.streaming_norm_scores(apply_fn, params, reader.rewind, out=np.zeros(N), **KW)
    assert not reader.closed
    reader.wide = False
    out = nj.streaming_norm_scores(apply_fn, params, reader.rewind, out=np.zeros(N), **KW)
    np.testing.assert_allclose(out, _dense(params, xs, ys)[1], rtol=1e-10, atol=1e-12)
