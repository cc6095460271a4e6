"""One process of the 2-process test (tests/test_distributed.py); run through the launcher:

    python -m nlis_jax.distributed --num-processes 2 --cpu-devices 2 tests/distributed_worker.py OUT_DIR

Every public function runs twice: on global arrays sharded by example over all devices of all processes,
and on this process's own full copy of the data (the one-process reference). The process writes
``OUT_DIR/process_<i>.json``: for each case the largest absolute difference and the scale of the
reference, equality of the samples drawn with the same key, and the messages of the input checks that
must fire on global arrays.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from nlis_jax import distributed

distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import nlis_jax as nj  # noqa: E402
from nlis_jax.experiments import nets  # noqa: E402

jax.config.update("jax_enable_x64", True)

N, D = 32, 3  # divisible by the 4 devices (2 processes x 2 CPU devices)
MLP = nets.mlp(jnp.tanh)


def _params(seed, sizes):
    rng = np.random.default_rng(seed)
    return [
        {"w": rng.standard_normal((o, i)) / np.sqrt(i), "b": 0.5 * rng.standard_normal(o)}
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def _data():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((N, D))
    ys = rng.standard_normal(N)
    ys2 = rng.standard_normal((N, 2))
    deficient = rng.standard_normal((N, 2)) @ rng.standard_normal((2, 5))  # rank 2: the QR route
    return {"xs": xs, "ys": ys, "ys2": ys2, "deficient": deficient}


def _cases(params, params2):
    """Name -> function of the data dict (local or global) returning a pytree of arrays."""
    sgd = optax.sgd(0.02)

    def probs(d):
        return nj.leverage_scores(nj.dual_matrix(MLP, params, d["xs"], d["ys"]))

    def fit_weighted_minibatch(d):
        fitted = nj.fit(
            MLP,
            params,
            d["xs"],
            d["ys"],
            N * probs(d),
            optimizer=sgd,
            num_steps=6,
            batch_size=8,
            key=jax.random.key(3),
            num_segments=2,
        )
        return fitted.params, fitted.losses, fitted.final_loss, fitted.normalizer

    def sampled(d, replace):
        idx, w = nj.sample(jax.random.key(7), probs(d), 12, replace=replace)
        if not replace:
            return idx, w
        F = nj.dual_matrix(MLP, params, d["xs"], d["ys"])
        return idx, w, nj.distortion(F, idx, w), d["xs"][idx]  # the sampled rows, gathered

    def host_blocks(d, route):
        """Global input: each process streams its own numpy block; local: the device path on all rows.
        The fixed 16-node rule, as every streaming case: a streaming program holding the adaptive rule
        compiles for 3-15 s (the adaptive rule on global arrays is the cases ``adjoint_*`` and
        ``dual_matrix*``)."""
        kw = dict(chunk_size=8, route=route, num_nodes=16)
        if d["xs"].is_fully_addressable:
            return nj.streaming_leverage_scores(MLP, params, d["xs"], d["ys"], **kw)
        rows = distributed.process_rows(N)
        xs, ys = _data()["xs"][rows], _data()["ys"][rows]
        return nj.streaming_leverage_scores(MLP, params, xs, ys, **kw)

    def host_norms_and_loss(d):
        """Norm scores and the full-data loss, each process streaming its numpy block on the global side."""
        if d["xs"].is_fully_addressable:
            xs, ys = d["xs"], d["ys"]
        else:
            rows = distributed.process_rows(N)
            xs, ys = _data()["xs"][rows], _data()["ys"][rows]
        norms = nj.streaming_norm_scores(MLP, params, xs, ys, chunk_size=8)
        losses = nj.per_example_loss(MLP, params, xs, ys, chunk_size=8)  # a global (N,) vector too
        return norms, nj.weighted_loss(MLP, params, xs, ys, chunk_size=8), losses

    def host_norms_narrow_out(d):
        """float64 params, a float32 out: each process stores its norms scaled by a power of two from its
        own first chunk (process 1's responses 10 times larger: another binade), and the blocks were
        normalised as if they shared one scale (block sums 0.67 / 0.33 for 0.03 / 0.97). Global side:
        the float64 out's scores and the float32 out's ratio to them, rounded far above float32's
        rounding; local side (out= is for host data only): the device path's scores and ones."""
        if d["xs"].is_fully_addressable:
            ys = d["ys"].at[N // 2 :].multiply(10)
            return np.ones(N), nj.norm_scores(nj.dual_matrix(MLP, params, d["xs"], ys, num_nodes=16))
        rows = distributed.process_rows(N)
        xs, ys = _data()["xs"][rows], _data()["ys"][rows] * np.where(rows.start >= N // 2, 10, 1)
        kw = dict(chunk_size=8, num_nodes=16)
        narrow = nj.streaming_norm_scores(MLP, params, xs, ys, out=np.empty(len(ys), np.float32), **kw)
        wide = nj.streaming_norm_scores(MLP, params, xs, ys, out=np.empty(len(ys)), **kw)
        return distributed.shard_rows(np.round(narrow / wide, 5)), distributed.shard_rows(wide)

    def weights_on_one_process(d):
        """Weights of ones on process 1's block, none on process 0's (ones too): the subnormal-weights
        check's exchange ran on process 1 only, and gloo aborted."""
        if d["xs"].is_fully_addressable:
            return nj.weighted_loss(MLP, params, d["xs"], d["ys"])
        rows = distributed.process_rows(N)
        w = None if jax.process_index() == 0 else np.ones(N // 2)
        return nj.weighted_loss(MLP, params, _data()["xs"][rows], _data()["ys"][rows], w, chunk_size=8)

    def loss_of_an_empty_block(d):
        """Process 1's numpy block empty: the full-data loss is process 0's rows' (process 1 raised "xs
        has no examples" alone, and process 0 waited in the pass)."""
        if d["xs"].is_fully_addressable:
            return nj.weighted_loss(MLP, params, d["xs"][: N // 2], d["ys"][: N // 2])
        rows = distributed.process_rows(N) if jax.process_index() == 0 else slice(0, 0)
        return nj.weighted_loss(MLP, params, _data()["xs"][rows], _data()["ys"][rows], chunk_size=8)

    def host_tiny_block(d):
        """Process 1's block of weights all subnormal (1e-310) and of ys all subnormal beside normal ones
        in process 0's: the one-process call (the device path on all rows) accepts both (the data has
        normal values); each process refused its own block alone before."""
        xs, ys, w = _data()["xs"], _data()["ys"].copy(), np.ones(N)
        ys[N // 2 :], w[N // 2 :] = 1e-310, 1e-310
        if d["xs"].is_fully_addressable:
            xs, ys, w = jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(w)
        else:
            rows = distributed.process_rows(N)
            xs, ys, w = xs[rows], ys[rows], w[rows]
        loss = nj.weighted_loss(MLP, params, xs, ys, w, chunk_size=8)
        return loss, nj.streaming_leverage_scores(MLP, params, xs, ys, chunk_size=8, num_nodes=16)

    def queried(d):
        """Pool choice from global scores: gathered whole on every process (jax's non-addressable fetch
        error before)."""
        labelled = np.arange(N) % 4 == 0
        chosen = nj.query(jax.random.key(5), probs(d), labelled, 3, alpha=0.1)
        return chosen, nj.active.pool_probabilities(probs(d), labelled, alpha=0.1)

    def source_on_one_process(d):
        """float32 params, float64 chunks, all on process 0 (process 1's source yields nothing): the
        sum is exchanged in one dtype (float64 against float32 aborted gloo's all-gather)."""
        params32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
        if d["xs"].is_fully_addressable:
            return nj.weighted_loss(MLP, params32, d["xs"], d["ys"])
        chunks = [(_data()["xs"], _data()["ys"])] if jax.process_index() == 0 else []
        return nj.weighted_loss(MLP, params32, lambda: iter(chunks), None, chunk_size=8)

    return {
        "loss_source_on_one_process": source_on_one_process,
        "streaming_host_tiny_block": host_tiny_block,
        "streaming_host_norms_narrow_out": host_norms_narrow_out,
        "weights_on_one_process": weights_on_one_process,
        "loss_of_an_empty_block": loss_of_an_empty_block,
        "query": queried,
        "streaming_host_norms_and_loss": host_norms_and_loss,
        "streaming_host_blocks": lambda d: host_blocks(d, None),
        "streaming_host_blocks_stable": lambda d: host_blocks(d, "stable"),
        "adjoint_reverse": lambda d: nj.adjoint(MLP, params, d["xs"], mode="reverse"),
        "adjoint_forward_k2": lambda d: nj.adjoint(MLP, params2, d["xs"], mode="forward"),
        "dual_matrix": lambda d: nj.dual_matrix(MLP, params, d["xs"], d["ys"]),
        "dual_matrix_k2": lambda d: nj.dual_matrix(MLP, params2, d["xs"], d["ys2"]),
        "leverage_scores": probs,
        "leverage_scores_stable": lambda d: nj.leverage_scores(d["deficient"]),
        "norm_scores": lambda d: nj.norm_scores(nj.dual_matrix(MLP, params, d["xs"], d["ys"])),
        "streaming_leverage_scores": lambda d: nj.streaming_leverage_scores(
            MLP, params, d["xs"], d["ys"], chunk_size=8, num_nodes=16
        ),
        "sample_distortion": lambda d: sampled(d, True),
        "sample_without_replacement": lambda d: sampled(d, False),
        "weighted_loss": lambda d: nj.weighted_loss(MLP, params, d["xs"], d["ys"]),
        "weighted_loss_weights": lambda d: nj.weighted_loss(MLP, params, d["xs"], d["ys"], N * probs(d)),
        "fit_weighted_minibatch": fit_weighted_minibatch,
    }


def _compare(ref, got) -> dict:
    ref_leaves, got_leaves = jax.tree.leaves(ref), jax.tree.leaves(distributed.gather(got))
    diff, scale, exact = 0.0, 0.0, True
    for r, g in zip(ref_leaves, got_leaves, strict=True):
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            return {"error": f"shape {g.shape} != {r.shape}"}
        if np.issubdtype(r.dtype, np.integer):
            exact = exact and bool(np.array_equal(r, g))
            continue
        diff = max(diff, float(np.max(np.abs(r - g))))
        scale = max(scale, float(np.max(np.abs(r))))
    return {"diff": diff, "scale": scale, "integers_equal": exact}


def _expect_error(fn, *others) -> str:
    try:
        fn()
    except (ValueError, TypeError, *others) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _checks(glob, params) -> dict:
    bad_xs = np.array(_data()["xs"])
    bad_xs[-1, 0] = np.nan  # on the last process's block
    rows = distributed.process_rows(N)
    xs_nan = distributed.shard_rows(bad_xs[rows])
    w_neg = distributed.shard_rows(np.where(np.arange(N) == N - 1, -1.0, 1.0)[rows])
    p_bad = distributed.shard_rows(np.full(N, 2.0 / N)[rows])
    p_uniform = distributed.shard_rows(np.full(N, 1.0 / N)[rows])
    w_tiny = distributed.shard_rows(np.full(N, 1e-310)[rows])  # made on the host: a device flushes them
    p_nan = distributed.shard_rows(np.where(np.arange(N) == N - 1, np.nan, 1.0 / N)[rows])
    labels = (_data()["ys"] > 0).astype(np.float64)
    labels[-1] = 3.0
    # uneven host blocks (process 0 drops 2 rows): named after the first pass, not a raw sharding error
    uneven = slice(rows.start, rows.stop - 2) if jax.process_index() == 0 else rows
    xs_u, ys_u = _data()["xs"][uneven], _data()["ys"][uneven]
    return {
        "uneven_norms": _expect_error(
            lambda: nj.streaming_norm_scores(MLP, params, xs_u, ys_u, chunk_size=8)
        ),
        "uneven_leverage": _expect_error(
            lambda: nj.streaming_leverage_scores(MLP, params, xs_u, ys_u, chunk_size=8, num_nodes=16)
        ),
        "uneven_shard_rows": _expect_error(lambda: distributed.shard_rows(xs_u)),
        "nan_host_block": _expect_error(
            lambda: nj.streaming_leverage_scores(MLP, params, bad_xs[rows], _data()["ys"][rows], chunk_size=8)
        ),
        "gather_rows_global": _expect_error(
            lambda: nj.gather_rows(_data()["xs"][rows], nj.sample(jax.random.key(1), p_uniform, 3)[0])
        ),
        "nan_xs": _expect_error(lambda: nj.dual_matrix(MLP, params, xs_nan, glob["ys"])),
        "negative_weights": _expect_error(
            lambda: nj.weighted_loss(MLP, params, glob["xs"], glob["ys"], w_neg)
        ),
        "probs_sum": _expect_error(lambda: nj.sample(jax.random.key(0), p_bad, 3)),
        # blocks of another per-example shape or dtype in process 1: named, not a gloo abort
        "shape_mismatch": _expect_error(
            lambda: distributed.shard_rows(np.ones((8, 3 - jax.process_index())))
        ),
        "dtype_mismatch": _expect_error(
            lambda: distributed.shard_rows(np.ones((8, 3), (np.float64, np.float32)[jax.process_index()]))
        ),
        "projected_host_blocks": _expect_error(
            lambda: nj.projected_leverage_scores(
                jax.random.key(2), MLP, params, _data()["xs"][rows], _data()["ys"][rows], dim=8
            )
        ),
        # a global weights vector beside this process's numpy block of xs: jax's "Fetching value for
        # jax.Array that spans non-addressable devices" before, which named neither argument
        "global_weights_host_xs": _expect_error(
            lambda: nj.weighted_loss(MLP, params, _data()["xs"][rows], _data()["ys"][rows], p_uniform)
        ),
        # a mesh in reverse process order put process 1's block first, silently
        "reversed_mesh": _expect_error(
            lambda: distributed.shard_rows(
                _data()["xs"][rows], Mesh(np.asarray(distributed.data_mesh().devices)[::-1], ("data",))
            )
        ),
        "mesh_without_data_axis": _expect_error(
            lambda: distributed.shard_rows(_data()["xs"][rows], Mesh(np.asarray(jax.devices()), ("rows",)))
        ),
        "initialize_twice": _expect_error(distributed.initialize, RuntimeError),
        # weights summing to 0 on global arrays: named (jax's non-addressable fetch error before), and
        # subnormal ones refused as on one process (a weighted loss of 0 before)
        "fit_zero_global_weights": _expect_error(
            lambda: nj.fit(
                MLP, params, glob["xs"], glob["ys"], 0 * p_uniform, optimizer=optax.sgd(0.1), num_steps=2
            ),
            RuntimeError,
        ),
        "subnormal_global_weights": _expect_error(
            lambda: nj.weighted_loss(MLP, params, glob["xs"], glob["ys"], w_tiny)
        ),
        # a logistic label 3 in process 1's block: every process raises (process 0 waited before)
        "labels_host_block": _expect_error(
            lambda: nj.weighted_loss(MLP, params, _data()["xs"][rows], labels[rows], loss="logistic")
        ),
        "query_nan_global": _expect_error(
            lambda: nj.query(None, p_nan, np.zeros(N, bool), 2, strategy="topk"), RuntimeError
        ),
        "mixed_loss_dtypes": _mixed_loss_dtypes(params, rows),
        # process 1's numpy block empty, its chunk source yielding nothing: named on every process (it
        # raised alone, and process 0 waited in the pass)
        "empty_host_block": _expect_error(
            lambda: nj.streaming_leverage_scores(MLP, params, *_block_or_empty(rows), chunk_size=8)
        ),
        # process 0's logistic label 2 beside process 1's empty block: refused on both (the empty block
        # turned the label check off on every process); per_example_loss of an empty numpy block named
        "labels_beside_empty_block": _expect_error(
            lambda: nj.weighted_loss(
                MLP, params, *_block_or_empty(rows, np.r_[2.0, labels[1:]]), loss="logistic"
            )
        ),
        # int64 ys of 2^53 + 1 in process 0's block, a float64 model: the ranges exchanged as float64
        # rounded it to 2^53, within the squared loss's exact range (a loss of 0 on both)
        "integer_ys_past_2_53": _expect_error(
            lambda: nj.weighted_loss(
                lambda p, x: x @ p["w"] + p["b"],
                {"w": np.zeros(D), "b": np.asarray(2.0**53)},
                _data()["xs"][rows],
                np.full(N // 2, 2**53, np.int64) + (jax.process_index() == 0),
            )
        ),
        # process 1's chunk source yields a chunk of another width, or a logistic label 3: it raises its
        # own error, process 0 one naming it (process 0 waited in the pass's next collective)
        "bad_chunk_on_one_process": _expect_error(
            lambda: nj.streaming_leverage_scores(
                MLP,
                params,
                lambda: iter(_chunks_of(rows, wider=jax.process_index() == 1)),
                chunk_size=8,
                num_nodes=16,
            )
        ),
        "labels_in_one_source": _expect_error(
            lambda: nj.weighted_loss(
                MLP, params, lambda: iter(_chunks_of(rows, labels=labels)), chunk_size=8, loss="logistic"
            )
        ),
        # before any pass: NaN params or a block of another width on process 1 only (it raised alone)
        "params_nan_on_one_process": _expect_error(
            lambda: nj.weighted_loss(
                MLP, _nan_on_process_1(params), _data()["xs"][rows], _data()["ys"][rows], chunk_size=8
            )
        ),
        "wider_block_on_one_process": _expect_error(
            lambda: nj.streaming_norm_scores(
                MLP, params, _wider_on_process_1(_data()["xs"][rows]), _data()["ys"][rows], chunk_size=8
            )
        ),
        "empty_block_per_example": _expect_error(
            lambda: nj.per_example_loss(MLP, params, *_block_or_empty(rows), chunk_size=8)
        ),
        "empty_loss_source": _expect_error(
            lambda: nj.per_example_loss(
                MLP, params, lambda: iter([_block_or_empty(rows)][: 1 - jax.process_index()])
            )
        ),
        **_narrowing_checks(rows),
        **_out_checks(rows),
    }


def _out_checks(rows) -> dict:
    """Norm scores of a chunk source written into ``out`` (float32, a linear model in float64): on process 1
    only, an ``out`` one row short, or a chunk whose norms pass float32's range once scaled by the first
    chunk's (it raised there mid-pass, and process 0 waited in the pass's exchange); the same with its
    block given as an array."""
    xs, ys = _data()["xs"][rows].copy(), _data()["ys"][rows]
    one = jax.process_index() == 1
    huge = xs.copy()
    huge[8:] *= 1e45 if one else 1.0
    linear = lambda theta, x: x @ theta  # noqa: E731
    theta = np.linspace(-0.5, 0.5, D)

    def scores(x, n, source=True):
        data = (lambda: iter([(x[:8], ys[:8]), (x[8:], ys[8:])])) if source else x
        out = np.zeros(n, np.float32)
        return nj.streaming_norm_scores(linear, theta, data, None if source else ys, out=out, chunk_size=8)

    return {
        "out_short_on_one_process": _expect_error(lambda: scores(xs, len(ys) - one)),
        # before the pass: a block's out of another length on process 1, for norms and leverage
        "out_length_block_on_one_process": _expect_error(lambda: scores(xs, len(ys) - one, source=False)),
        "out_length_leverage_on_one_process": _expect_error(
            lambda: nj.streaming_leverage_scores(
                linear, theta, xs, ys, out=np.zeros(len(ys) - one), chunk_size=8, num_nodes=2
            )
        ),
        "out_length_leverage_source_on_one_process": _expect_error(
            lambda: nj.streaming_leverage_scores(
                linear, theta, lambda: iter([(xs, ys)]), out=np.zeros(len(ys) - one), chunk_size=8
            )
        ),
        "out_range_on_one_process": _expect_error(lambda: scores(huge, len(ys))),
        "out_range_block_on_one_process": _expect_error(lambda: scores(huge, len(ys), source=False)),
    }


def _nan_on_process_1(params):
    """``params`` with a NaN bias on process 1 (params that differ between processes)."""
    if jax.process_index() != 1:
        return params
    broken = jax.tree.map(np.array, params)
    broken[0]["b"][0] = np.nan
    return broken


def _wider_on_process_1(xs):
    """``xs`` with one more feature on process 1."""
    return np.hstack([xs, xs[:, :1]]) if jax.process_index() == 1 else xs


def _chunks_of(rows, wider=False, labels=None):
    """This process's rows as two ``(x, y)`` chunks; ``wider``: the second with one more feature;
    ``labels``: the responses taken from it."""
    xs, ys = _data()["xs"][rows], (_data()["ys"] if labels is None else labels)[rows]
    second = np.hstack([xs[8:], xs[8:, :1]]) if wider else xs[8:]
    return [(xs[:8], ys[:8]), (second, ys[8:])]


def _block_or_empty(rows, ys=None):
    """This process's ``(xs, ys)`` rows on process 0, none on the others (``ys`` the data's by default)."""
    rows = rows if jax.process_index() == 0 else slice(0, 0)
    return _data()["xs"][rows], (_data()["ys"] if ys is None else ys)[rows]


def _mixed_loss_dtypes(params, rows) -> str:
    """float32 params, a float32 block on process 0 and a float64 one on process 1: per_example_loss
    returned a global array of two dtypes, and gloo aborted on its first use. Now all processes' promoted
    dtype: "float64 float64 (32,)" from the local block, the gathered vector and its shape."""
    params32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    xs, ys = _data()["xs"][rows], _data()["ys"][rows]
    if jax.process_index() == 0:
        xs, ys = xs.astype(np.float32), ys.astype(np.float32)
    losses = nj.per_example_loss(MLP, params32, xs, ys, chunk_size=8)
    whole = distributed.gather(losses)
    return f"{losses.dtype} {whole.dtype} {whole.shape}"


def _narrowing_checks(rows) -> dict:
    """float64 values below float32's smallest normal number (a column in 1e-60 units) or past its range
    in the last process's block, without x64: every process raises, naming the block (they were 0 or
    Inf on the device, unnamed)."""
    tiny, huge = np.array(_data()["xs"]), np.array(_data()["xs"])
    tiny[N // 2 :, 1] *= 1e-60  # the second process's rows only
    huge[-1, 0] = 1e300
    params32 = jax.tree.map(lambda a: np.asarray(a, np.float32), _params(1, (D, 4, 1)))
    ys = _data()["ys"][rows]
    jax.config.update("jax_enable_x64", False)
    try:
        return {
            "narrow_host_block": _expect_error(
                lambda: nj.streaming_leverage_scores(MLP, params32, tiny[rows], ys, chunk_size=8, num_nodes=4)
            ),
            "narrow_host_loss": _expect_error(lambda: nj.weighted_loss(MLP, params32, tiny[rows], ys)),
            "narrow_shard_rows": _expect_error(lambda: distributed.shard_rows((tiny[rows], ys))),
            "huge_shard_rows": _expect_error(lambda: distributed.shard_rows(huge[rows])),
        }
    finally:
        jax.config.update("jax_enable_x64", True)


def main(out_dir: str) -> None:
    data = _data()
    rows = distributed.process_rows(N)
    glob = distributed.shard_rows({k: v[rows] for k, v in data.items()})
    local = {k: jnp.asarray(v) for k, v in data.items()}
    params, params2 = _params(1, (D, 4, 1)), _params(2, (D, 4, 2))
    report = {"process": jax.process_index(), "devices": jax.device_count(), "cases": {}}
    report["global_input"] = not glob["xs"].is_fully_addressable
    for name, fn in _cases(params, params2).items():
        start = time.perf_counter()
        try:
            report["cases"][name] = _compare(fn(local), fn(glob))
            report["cases"][name]["seconds"] = time.perf_counter() - start
        except Exception:  # noqa: BLE001 - reported to the test, which names the case
            report["cases"][name] = {"error": traceback.format_exc(limit=4)}
    report["checks"] = _checks(glob, params)
    path = Path(out_dir) / f"process_{jax.process_index()}.json"
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
