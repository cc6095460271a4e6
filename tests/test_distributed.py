"""Two processes joined by jax.distributed (gloo on CPU) give the one-process values and samples.

The launcher (``python -m nlis_jax.distributed``) starts tests/distributed_worker.py as 2 processes of 2 CPU
devices each on 127.0.0.1; every public function runs on global arrays sharded by example over the 4
devices and on a local copy, and each process reports the differences (after gathering the global
results) as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nlis_jax as nj
from nlis_jax import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
CASES = (
    "adjoint_reverse",
    "adjoint_forward_k2",
    "dual_matrix",
    "dual_matrix_k2",
    "leverage_scores",
    "leverage_scores_stable",
    "norm_scores",
    "streaming_leverage_scores",
    "streaming_host_blocks",
    "streaming_host_blocks_stable",
    "streaming_host_norms_and_loss",
    "sample_distortion",
    "sample_without_replacement",
    "weighted_loss",
    "weighted_loss_weights",
    "fit_weighted_minibatch",
    "streaming_host_tiny_block",
    "query",
    "loss_source_on_one_process",
    "streaming_host_norms_narrow_out",
    "weights_on_one_process",
    "loss_of_an_empty_block",
)
# float64 throughout: the sharded programs reduce in another order (per-shard partial sums, then an
# all-reduce over processes), so results agree to rounding, ~1e-14 relative; 1e-10 is the bound.
RTOL = 1e-10
N = 32  # rows of tests/distributed_worker.py


def _env() -> dict:
    # XLA's optimisation passes cost the workers more CPU time (compiling ~60 small programs) than
    # they save on arrays of 32 rows.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env.pop("JAX_ENABLE_X64", None)
    return env


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    cmd = [sys.executable, "-m", "nlis_jax.distributed", "--num-processes", "2", "--cpu-devices", "2"]
    # About 130 s of CPU in all (2026-12-01); the other pytest worker shares the 2 cores, hence the wide
    # limit (a hang still ends the test, with the workers' stderr).
    cmd += ["--timeout", "600", str(WORKER), str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=630)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"exit {proc.returncode} after {seconds:.0f} s:\n{proc.stderr[-4000:]}"
    return [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]


def test_two_processes_hold_global_arrays(reports):
    assert [r["process"] for r in reports] == [0, 1]
    for r in reports:
        assert r["devices"] == 4
        assert r["global_input"], "the inputs must span both processes (not fully addressable)"
        assert sorted(r["cases"]) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_global_arrays_give_one_process_values(reports, case):
    for r in reports:
        result = r["cases"][case]
        assert "error" not in result, f"process {r['process']}: {result['error']}"
        assert result["diff"] <= RTOL * max(1.0, result["scale"]), result
        # sample indices (and fit's int step counters) must be identical, not close
        assert result["integers_equal"], result


def test_input_checks_fire_on_global_arrays(reports):
    for r in reports:
        checks = r["checks"]
        assert checks["nan_xs"].startswith("ValueError: xs contains 1 NaN"), checks
        assert checks["negative_weights"].endswith("non-negative; 1 are negative."), checks
        assert checks["probs_sum"].startswith("ValueError: probs must sum to 1, got sum 2 "), checks
        for name in ("uneven_norms", "uneven_leverage", "uneven_shard_rows"):  # N/2 - 2 and N/2 rows
            expected = f"got [{N // 2 - 2}, {N // 2}] examples per process"
            assert checks[name].startswith("ValueError: under jax.distributed") and expected in checks[name]
        # a NaN in the last process's host block: every process raises (the others waited in the pass)
        assert checks["nan_host_block"].startswith("ValueError: xs or ys contains 1 NaN"), checks
        assert checks["gather_rows_global"].startswith("ValueError: indices is a global array"), checks
        for name in ("shape_mismatch", "dtype_mismatch"):
            assert checks[name].startswith("ValueError: shard_rows: the blocks of the processes differ"), (
                checks
            )
            assert "process(es) [1] against process 0" in checks[name], checks
        assert checks["projected_host_blocks"].startswith("ValueError: under jax.distributed, the projected")
        assert checks["global_weights_host_xs"].startswith(
            "ValueError: weights is a global jax array spread over the 2 processes, while xs holds this "
        ), checks
        assert checks["reversed_mesh"].startswith(
            "ValueError: shard_rows: the mesh's devices along 'data' are not in process order (processes "
            "[1, 1, 0, 0])"
        ), checks
        assert checks["mesh_without_data_axis"].startswith("ValueError: shard_rows: the mesh has no axis"), (
            checks
        )
        assert checks["initialize_twice"].startswith(
            "RuntimeError: nlis_jax.distributed.initialize: this process has already joined"
        ), checks
        assert checks["fit_zero_global_weights"] == "ValueError: weights must not all be zero.", checks
        assert checks["subnormal_global_weights"].startswith("ValueError: weights sum to 0 in float64"), (
            checks
        )
        assert checks["labels_host_block"].startswith(
            'ValueError: loss="logistic": labels must lie in [0, 1] (the two classes 0 and 1), got values '
            "in [0, 3]"
        ), checks
        assert checks["query_nan_global"].startswith("ValueError: scores must be finite"), checks
        assert checks["mixed_loss_dtypes"] == f"float64 float64 ({N},)", checks
        assert checks["labels_beside_empty_block"].startswith(
            'ValueError: loss="logistic": labels must lie in [0, 1] (the two classes 0 and 1), got values '
            "in [0, 2]"
        ), checks
        others = "ValueError: under jax.distributed, process(es) [1] failed while reading their data"
        before = "ValueError: under jax.distributed, process(es) [1] failed while checking their arguments"
        if r["process"] == 1:
            nan = "ValueError: params[0]['b'] contains 1 NaN"  # the leaf, by its path
            assert checks["params_nan_on_one_process"].startswith(nan), checks
            assert checks["wider_block_on_one_process"].startswith(
                "ValueError: apply_fn(params, x) failed"
            ), checks
        else:
            assert checks["params_nan_on_one_process"].startswith(before), checks
            assert checks["wider_block_on_one_process"].startswith(before), checks
        if r["process"] == 1:
            assert checks["bad_chunk_on_one_process"].startswith("ValueError: x_chunk of chunk 1"), checks
            assert checks["labels_in_one_source"].startswith(
                'ValueError: loss="logistic": labels must lie in [0, 1]'
            ) and checks["labels_in_one_source"].endswith("(in chunk 1 of the chunk source)."), checks
        else:
            assert checks["bad_chunk_on_one_process"].startswith(others), checks
            assert checks["labels_in_one_source"].startswith(others), checks
        # (the range exchanged as float64 rounded outward: 2^53 + 1 shows as 2^53 + 2)
        assert checks["integer_ys_past_2_53"].startswith(
            'ValueError: loss="squared": integer ys with values in [9,007,199,254,740,992, '
            "9,007,199,254,740,994]: f − y computes them in float64"
        ), checks
        for name in ("empty_host_block", "empty_loss_source", "empty_block_per_example"):
            assert checks[name].startswith("ValueError: under jax.distributed every process must hold"), (
                checks
            )
            assert f"got [{N // 2}, 0] examples per process" in checks[name], checks
        # float64 without x64: values flushed to 0 or made Inf by the cast are named on every process
        tiny = "holds 16 non-zero value(s) below float32's smallest normal number that become 0 once cast"
        for name in ("narrow_host_block", "narrow_host_loss"):
            where = "ValueError: xs, in the block(s) of process(es) [1] under jax.distributed,"
            assert checks[name].startswith(where) and tiny in checks[name], checks
        assert checks["narrow_shard_rows"].startswith(
            "ValueError: shard_rows: the block(s) of process(es) [1]"
        )
        assert tiny in checks["narrow_shard_rows"], checks
        assert "1 finite value(s) beyond float32's range" in checks["huge_shard_rows"], checks
        # an out= that refuses a chunk's values on process 1 only (one row short, or beyond float32):
        # raised there mid-pass, while process 0 waited in the pass's exchange without end
        told = "ValueError: under jax.distributed, process(es) [1] failed writing their out"
        own = {
            "out_short_on_one_process": "OutRefused: out must be a writable numpy array",
            "out_range_on_one_process": "OutRefused: the scores reach",
            "out_range_block_on_one_process": "OutRefused: the scores reach",
        }
        for name, message in own.items():
            assert checks[name].startswith(message if r["process"] == 1 else told), checks
        told = "ValueError: under jax.distributed, process(es) [1] failed while checking their out"
        for name in (
            "out_length_block_on_one_process",
            "out_length_leverage_on_one_process",
            "out_length_leverage_source_on_one_process",
        ):
            own = f"ValueError: out must be a writable numpy array (or memmap) of shape ({N // 2},), got"
            assert checks[name].startswith(own if r["process"] == 1 else told), checks


def test_launcher_stops_all_when_one_fails(tmp_path):
    """Process 1 exits with 3 at once; process 0 would wait 60 s: the launcher returns 3 and stops it."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\n"
        "assert os.environ['NLIS_NUM_PROCESSES'] == '2'\n"
        "assert os.environ['NLIS_COORDINATOR_ADDRESS'].startswith('127.0.0.1:')\n"
        "sys.exit(3) if os.environ['NLIS_PROCESS_ID'] == '1' else time.sleep(60)\n"
    )
    start = time.perf_counter()
    assert distributed.main(["--num-processes", "2", str(script)]) == 3
    assert time.perf_counter() - start < 30


def test_a_process_that_fails_after_a_collective_ends_the_job(tmp_path):
    """Process 1 raises after a collective: it waited in jax.distributed's shutdown for process 0, which
    waited in the next collective for it, and the launcher saw neither exit (a hang until --timeout).
    initialize() now ends a failing process at once, so the launcher stops the other."""
    script = tmp_path / "fail_late.py"
    script.write_text(
        "import numpy as np\n"
        "from nlis_jax import distributed\n"
        "distributed.initialize()\n"
        "import jax\n"
        "x = distributed.shard_rows(np.ones((4, 2)))\n"
        "distributed.gather(x)\n"
        "if jax.process_index() == 1:\n"
        "    raise RuntimeError('process 1 fails')\n"
        "distributed.gather(x)\n"
    )
    cmd = [sys.executable, "-m", "nlis_jax.distributed", "--num-processes", "2", "--cpu-devices", "2"]
    cmd += ["--timeout", "300", str(script)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=330)
    seconds = time.perf_counter() - start
    assert proc.returncode == 1, f"exit {proc.returncode} after {seconds:.0f} s:\n{proc.stderr[-3000:]}"
    assert "RuntimeError: process 1 fails" in proc.stderr
    assert seconds < 200  # jax startup of two processes on a loaded machine; the hang ran to the timeout


def test_initialize_without_a_coordinator_names_the_ways_to_give_one():
    """Outside a launcher or cluster, initialize() surfaced jax's bare "coordinator_address should be
    defined" and left the CPU collectives switched; a fresh process (no JAX work yet) gets the names now."""
    code = (
        "import jax\n"
        "from nlis_jax import distributed\n"
        "jax.config.update('jax_cpu_collectives_implementation', 'mpi')\n"
        "try:\n"
        "    distributed.initialize()\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "print(jax.config.jax_cpu_collectives_implementation)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NLIS_", "SLURM_", "OMPI_", "PMI_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    message, setting = proc.stdout.strip().splitlines()[-2:]
    assert message.startswith("nlis_jax.distributed.initialize found no coordinator: pass coordinator_")
    assert "$NLIS_COORDINATOR_ADDRESS" in message and "python -m nlis_jax.distributed" in message
    assert setting == "mpi"  # put back


def test_initialize_names_a_missing_process_count_or_id():
    """With a coordinator but no $NLIS_NUM_PROCESSES (or $NLIS_PROCESS_ID), jax's bare "Number of processes
    must be defined." named neither variable."""
    code = (
        "from nlis_jax import distributed\n"
        "try:\n"
        "    distributed.initialize()\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NLIS_", "SLURM_", "OMPI_", "PMI_"))}
    for unset in ("NLIS_NUM_PROCESSES", "NLIS_PROCESS_ID"):
        env = dict(base, NLIS_COORDINATOR_ADDRESS="127.0.0.1:1", NLIS_NUM_PROCESSES="2", NLIS_PROCESS_ID="0")
        del env[unset]
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        message = proc.stdout.strip().splitlines()[-1]
        assert message.startswith(
            f"nlis_jax.distributed.initialize has a coordinator (127.0.0.1:1) but no ${unset}: set ${unset}"
        ), message


def test_launcher_timeout(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(60)\n")
    assert distributed.launch([sys.executable, str(script)], 2, timeout=1.0) == 124


def test_one_process_helpers():
    """With one process the helpers are plain: rows 0..n, sharding over the local devices, gather = value."""
    devices = jax.device_count()
    n = 2 * devices
    assert distributed.process_rows(n) == slice(0, n)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        distributed.process_rows(n + 1)
    # -n gave slice(0, -n) (every row but the last n), a float a slice of floats, True one row
    with pytest.raises(ValueError, match=f"n must be a positive integer, got {-n}"):
        distributed.process_rows(-n)
    for bad in (float(n), True):
        with pytest.raises(TypeError, match="n must be a Python int"):
            distributed.process_rows(bad)
    x = np.arange(2.0 * n).reshape(n, 2)
    xs = distributed.shard_rows({"x": x})["x"]
    assert len(xs.sharding.device_set) == devices
    np.testing.assert_array_equal(distributed.gather(xs), x)
    expected = np.sum(x**2, 1) / np.sum(x**2)
    np.testing.assert_allclose(distributed.gather(nj.norm_scores(xs)), expected, rtol=1e-14)
    if devices > 1:
        with pytest.raises(ValueError, match="split evenly over its"):
            distributed.shard_rows(x[:-1])


def test_explicit_mesh_axes_are_named_in_an_error():
    """jax.make_mesh makes Explicit axes by default: a clear error first, not one from deep in XLA."""
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.device_put(np.eye(2 * len(devices), 3), NamedSharding(mesh, P("data")))
    with pytest.raises(ValueError, match=r"F is sharded over a mesh with Explicit axes \('data',\)"):
        nj.leverage_scores(x)
    with pytest.raises(ValueError, match="xs is sharded over a mesh with Explicit axes"):
        nj.weighted_loss(lambda p, x: p @ x, np.ones(3), x, np.ones(x.shape[0]))
    for fn in (nj.adjoint, nj.dual_matrix, nj.streaming_leverage_scores, nj.streaming_norm_scores):
        # these failed in jax at their xs[0] probe (ShardingTypeError "Use .at[...].get(out_sharding=)")
        with pytest.raises(ValueError, match="xs is sharded over a mesh with Explicit axes"):
            fn(lambda p, x: jnp.tanh(p @ x), np.ones(3), x)
    auto = jax.device_put(np.eye(2 * len(devices), 3), NamedSharding(distributed.data_mesh(), P("data")))
    assert nj.leverage_scores(auto).shape == (x.shape[0],)
