r"""Several processes and hosts: nlis_jax on JAX's multi-controller runtime (``jax.distributed``).

Every process runs the same script. Each holds its own block of rows, the blocks form global arrays
sharded by example over a mesh of all devices (``NamedSharding(mesh, P("data"))``), and the public
functions of :mod:`nlis_jax` take those global arrays as they take local ones: same values, same
sample for the same key. The Gram matrix of the scores becomes an all-reduce over processes.

Launch ``N`` processes on one machine (a test, a workstation, a CPU cluster node)::

    python -m nlis_jax.distributed --num-processes 2 --cpu-devices 2 my_script.py --my-arg 1

Each process runs ``my_script.py`` with ``NLIS_COORDINATOR_ADDRESS``, ``NLIS_NUM_PROCESSES`` and
``NLIS_PROCESS_ID`` set; the script calls :func:`initialize` first::

    import numpy as np
    import nlis_jax as nj
    from nlis_jax import distributed

    distributed.initialize()  # reads the NLIS_* variables; on a GPU/TPU pod: auto-detected
    rows = distributed.process_rows(n)  # this process's block of an n-row data set
    xs, ys = distributed.shard_rows((np.load("xs.npy", mmap_mode="r")[rows], ...))
    probs = nj.streaming_leverage_scores(apply_fn, params, xs, ys)  # a global (n,) array
    idx, w = nj.sample(key, probs, 1000)  # the same on every process
    probs_np = distributed.gather(probs)  # numpy, the whole vector, on every process

On a GPU or TPU pod use the cluster's own launcher (SLURM, Kubernetes, one command per host) and call
:func:`initialize` with no arguments and no ``NLIS_*`` variables: ``jax.distributed.initialize()``
detects the cluster. On CPU the cross-process collectives are gloo.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nlis_jax._checks import check_positive_int
from nlis_jax._types import PyTree

ENV_COORDINATOR = "NLIS_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "NLIS_NUM_PROCESSES"
ENV_PROCESS_ID = "NLIS_PROCESS_ID"
#: Name of the mesh axis the examples are sharded over.
DATA_AXIS = "data"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
) -> None:
    """Join the multi-process runtime (``jax.distributed.initialize``); call before any other JAX work.

    Args:
      coordinator_address: ``"host:port"`` of process 0; default ``$NLIS_COORDINATOR_ADDRESS`` (set by the
        launcher), else auto-detection by JAX (SLURM, cloud TPU, ...).
      num_processes, process_id: default ``$NLIS_NUM_PROCESSES`` and ``$NLIS_PROCESS_ID``.
      cpu_collectives: ``jax_cpu_collectives_implementation`` for CPU devices (``"gloo"`` or ``"mpi"``).

    With more than one process, an uncaught exception ends its process at once (``os._exit(1)`` after
    the traceback): otherwise the process waited in ``jax.distributed``'s shutdown for the others while
    they waited in a collective for it, a hang the launcher could not see. ``sys.exit(status)`` is not
    an exception Python reports, so it still takes that shutdown (until gloo's timeout, about 30 s):
    raise, or call ``os._exit(status)``, to end one process of several at once.
    """
    if jax.distributed.is_initialized():  # jax's own error blamed "JAX calls" the user never made
        raise RuntimeError(
            "nlis_jax.distributed.initialize: this process has already joined the multi-process runtime "
            "(jax.distributed is initialized); call initialize() once, at the start."
        )
    env = os.environ
    if coordinator_address is None:
        coordinator_address = env.get(ENV_COORDINATOR)
    if num_processes is None and ENV_NUM_PROCESSES in env:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None and ENV_PROCESS_ID in env:
        process_id = _env_int(ENV_PROCESS_ID)
    previous = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except Exception as err:  # the setting put back: a failed call leaves the process as it was
        jax.config.update("jax_cpu_collectives_implementation", previous)
        if coordinator_address is None and "coordinator" in str(err):  # not "after JAX work" and the like
            raise ValueError(
                "nlis_jax.distributed.initialize found no coordinator: pass coordinator_address "
                f'("host:port" of process 0), set ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES} and '
                f"${ENV_PROCESS_ID} (the launcher, `python -m nlis_jax.distributed --num-processes N "
                f"script.py`, sets them), or run under a cluster JAX detects (SLURM, Cloud TPU). jax: {err}"
            ) from err
        unset = [
            f"${var}" for var, value in ((ENV_NUM_PROCESSES, num_processes), (ENV_PROCESS_ID, process_id))
            if value is None
        ]  # fmt: skip
        if coordinator_address is not None and unset and "must be defined" in str(err):
            raise ValueError(
                f"nlis_jax.distributed.initialize has a coordinator ({coordinator_address}) but no "
                f"{' or '.join(unset)}: set {' and '.join(unset)} (or pass num_processes and process_id) in "
                f"every process; the launcher sets them all. jax: {err}"
            ) from err
        raise
    if jax.process_count() > 1:
        sys.excepthook = _exit_on_error(sys.excepthook)


def _env_int(name: str) -> int:
    """The integer in the environment variable ``name`` (``ValueError`` naming it otherwise)."""
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {os.environ[name]!r}.") from None


def _exit_on_error(hook):
    """``sys.excepthook`` that prints the traceback with ``hook``, then ends the process (``os._exit(1)``)
    without the shutdown of ``jax.distributed``, which waits for every process: the launcher (or the
    peers' collectives) then sees this process gone."""

    def excepthook(kind, value, tb):
        hook(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    return excepthook


def data_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, axis ``"data"``, in process order.

    Process order makes each process's devices hold one contiguous block of rows, the block
    :func:`process_rows` names.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,))


def process_rows(n: int) -> slice:
    """This process's block of rows of an ``n``-row data set (``n`` divisible by the number of devices).

    Args:
      n: the number of rows of the whole (global) data set, a positive int divisible by
        ``jax.device_count()``.

    Returns:
      ``slice(start, start + n // jax.process_count())``, ``start = jax.process_index() · n //
      jax.process_count()``: the rows this process passes to :func:`shard_rows`.

    Raises:
      TypeError: ``n`` not an int (a float gave a slice of floats; ``True`` one row).
      ValueError: ``n`` not positive (``-4`` gave ``slice(0, -4)``, every row but the last four), or not
        divisible by the number of devices.
    """
    n = check_positive_int("n", n)
    devices = jax.device_count()
    if n % devices:
        raise ValueError(
            f"n = {n} rows cannot be split evenly over {devices} devices; drop or pad "
            f"{n % devices} rows (global arrays are sharded in equal blocks)."
        )
    per_process = n // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def shard_rows(local: PyTree, mesh: Mesh | None = None) -> PyTree:
    """Global arrays from each process's block of rows, sharded by example (``P("data")``).

    Args:
      local: a pytree of host arrays (numpy, memmap slices, jax arrays), this process's rows; every
        process passes the same number of rows, a multiple of its number of devices.
      mesh: default :func:`data_mesh`; another mesh needs the axis ``"data"`` with its devices in process
        order along it (``ValueError`` otherwise: the rows would not be the blocks in process order).

    Returns:
      The same pytree of global ``jax.Array``s whose leading axis is the concatenation, in process
      order, of every process's rows.
    """
    mesh = data_mesh() if mesh is None else _check_mesh(mesh)
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    local_devices = len(sharding.addressable_devices)
    _check_blocks(local)

    def one(a):
        a = np.asarray(a)
        if a.ndim == 0:  # a Python list of numbers is a pytree of scalars
            raise ValueError(
                "each leaf of local must be an array with rows first, got a scalar (a Python list is a "
                "pytree of its items: pass np.asarray(the_list))."
            )
        if a.shape[0] % local_devices:
            raise ValueError(
                f"each process's rows must split evenly over its {local_devices} devices, got shape "
                f"{a.shape}."
            )
        global_shape = (a.shape[0] * jax.process_count(),) + a.shape[1:]
        return jax.make_array_from_process_local_data(sharding, a, global_shape)

    return jax.tree.map(one, local)


def _check_mesh(mesh: Mesh) -> Mesh:
    """``ValueError`` unless ``mesh`` has the axis ``"data"`` and its devices along that axis are in
    process order: the rows of the global array follow the devices along the axis, so a mesh in another
    order put process 1's block before process 0's (against :func:`process_rows` and the streaming
    scores, whose rows are in process order), with no error."""
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            f"shard_rows: the mesh has no axis {DATA_AXIS!r} (axes {mesh.axis_names}); build it with "
            "distributed.data_mesh() or name the axis the examples are sharded over 'data'."
        )
    along = np.moveaxis(
        np.vectorize(lambda d: d.process_index)(mesh.devices), mesh.axis_names.index(DATA_AXIS), 0
    )
    along = along.reshape(along.shape[0], -1)
    if np.any(np.diff(along, axis=0) < 0):
        raise ValueError(
            f"shard_rows: the mesh's devices along {DATA_AXIS!r} are not in process order (processes "
            f"{along[:, 0].tolist()}): the global rows would not be the processes' blocks in order; use "
            "distributed.data_mesh(), or order the devices by process_index."
        )
    return mesh


def _check_blocks(local: PyTree) -> None:
    """The checks of :func:`shard_rows` before any global array is made, alike on every process (the
    numbers are exchanged: a process raising alone left the others waiting in the next collective):
    the same rows in every array, and with several processes the same count in every process
    (:func:`nlis_jax._host.check_blocks`) and the same pytree structure, per-example shapes and dtypes
    (mismatched blocks aborted inside the collectives or gathered garbage); float64 values that the
    cast without jax_enable_x64 makes Inf or flushes to 0, and 64-bit integers it wraps around
    (:func:`nlis_jax._checks.narrowing_counts`)."""
    from nlis_jax._checks import narrowing_counts, narrowing_error
    from nlis_jax._host import check_blocks, process_table

    leaves = jax.tree.leaves(local)
    lengths = [np.shape(a)[0] if np.ndim(a) else 0 for a in leaves]
    spec = f"{jax.tree.structure(local)}; " + ", ".join(
        f"{tuple(np.shape(a)[1:])} {np.result_type(a)}" for a in leaves
    )
    spec_id = int.from_bytes(hashlib.blake2b(spec.encode(), digest_size=4).digest(), "little") >> 1
    counts = narrowing_counts([np.asarray(a) if isinstance(a, np.ndarray) else a for a in leaves])
    row = [min(lengths, default=0), max(lengths, default=0), spec_id, *np.minimum(counts, 2**31 - 1)]
    table = process_table(row) if jax.process_count() > 1 else np.asarray([row])
    if np.any(table[:, 0] != table[:, 1]):
        raise ValueError(
            f"shard_rows: the arrays of a process hold different numbers of rows (least and most per "
            f"process: {table[:, :2].tolist()}); every array needs the same rows."
        )
    if len(set(table[:, 2].tolist())) > 1:
        which = np.flatnonzero(table[:, 2] != table[0, 2]).tolist()
        raise ValueError(
            f"shard_rows: the blocks of the processes differ in pytree structure, per-example shapes or "
            f"dtypes (process(es) {which} against process 0); every process must pass the same kind of "
            f"arrays. This process ({jax.process_index()}) passed: {spec}."
        )
    if len(table) > 1:
        check_blocks(table[:, 0])
    over, under, wrapped = table[:, 3:].sum(0)
    if over or under or wrapped:
        which = np.flatnonzero(table[:, 3:].sum(1)).tolist()
        where = f"the block(s) of process(es) {which}" if len(table) > 1 else "the block"
        where = f"shard_rows: {where}"
        raise ValueError(narrowing_error(where, int(over), int(under), int(wrapped)))


def gather(tree: PyTree) -> PyTree:
    """Every leaf as a numpy array holding its whole global value, on every process (a collective).

    Args:
      tree: a pytree of arrays; global arrays sharded over processes, or local ones.

    Returns:
      The pytree with numpy leaves of the global shapes: a leaf spanning processes all-gathered (every
      process must call this, as for any collective); one whose values are all on this process (a local
      array, a numpy array) converted as it is.
    """

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return multihost_utils.process_allgather(a, tiled=True)
        return np.asarray(a)

    return jax.tree.map(one, tree)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_env(base: dict, address: str, num_processes: int, rank: int, cpu_devices: int | None) -> dict:
    env = dict(base, **{ENV_COORDINATOR: address, ENV_NUM_PROCESSES: str(num_processes)})
    env[ENV_PROCESS_ID] = str(rank)
    if cpu_devices is not None:
        count = "--xla_force_host_platform_device_count"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(count)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{count}={cpu_devices}"])
        env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)
    return env


#: Seconds the processes have to end after SIGTERM before the launcher sends SIGKILL.
_GRACE_S = 3.0

# On Linux each process starts as this wrapper, which asks the kernel to SIGKILL it when the launcher dies
# (prctl(PR_SET_PDEATHSIG = 1, SIGKILL): also on SIGKILL of the launcher, which no handler sees), checks that
# the launcher did not die before that, then execs the command: same pid, so Popen's pid, signals and exit
# status are the command's. Not a ``preexec_fn`` calling prctl: that runs Python between fork and exec in the
# child of a process that may have threads (JAX's, a caller's), which the Python docs warn can deadlock. The
# cost is one interpreter start (-I -S: no site, no PYTHON* variables; the command gets the environment
# unchanged) per process. The signal comes when the *thread* that started the process ends; launch()
# returns only after its processes ended, so that thread outlives them.
_DIE_WITH_LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    print(f"nlis_jax.distributed: cannot run {sys.argv[2]!r}: {e}", file=sys.stderr)
    sys.exit(127)
"""


def _worker_command(command: Sequence[str]) -> list[str]:
    if sys.platform.startswith("linux") and sys.executable:
        return [sys.executable, "-I", "-S", "-c", _DIE_WITH_LAUNCHER, str(os.getpid()), *command]
    return list(command)


def _say(message: str) -> None:
    print(f"nlis_jax.distributed: {message}", file=sys.stderr, flush=True)


def _catch_stop_signals(received: list[int]) -> dict:
    """Make SIGTERM and SIGHUP append their number to ``received`` instead of ending this process; return
    the handlers replaced, ``{signum: handler}``. Only in the main thread (``signal.signal`` raises in
    others), and not for a signal that is ignored (``nohup``) or whose handler was not set from Python
    (``getsignal`` gives None: it could not be put back)."""
    previous = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        handler = None if signum is None else signal.getsignal(signum)
        if handler is None or handler == signal.SIG_IGN:
            continue
        try:
            signal.signal(signum, lambda s, frame: received.append(s))
        except (ValueError, OSError):  # e.g. not the main interpreter
            continue
        previous[signum] = handler
    return previous


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to the processes still running, up to ``_GRACE_S`` seconds for them to end, then SIGKILL."""
    try:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + _GRACE_S
        for p in procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                pass
    finally:  # also when a KeyboardInterrupt cuts the grace short
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()


def _how(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by signal {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    cpu_devices: int | None = None,
    port: int | None = None,
    timeout: float | None = None,
    env: dict | None = None,
) -> int:
    """Run ``command`` as ``num_processes`` processes on this machine joined through 127.0.0.1.

    Returns 0 when all succeed, else the status of the first process to fail: its exit status, or
    ``128 + N`` when signal ``N`` killed it (the shell's convention: 137 for SIGKILL); the other processes
    are then stopped, as they would wait for the failed one. 124 when ``timeout`` seconds pass first. The
    reason (``process 1 of 2 exited with status 3``, ``... was killed by signal SIGKILL``, ``timed out
    after 60 s``) goes to stderr as one line. Stopping is SIGTERM, then SIGKILL after 3 s.

    The processes do not outlive the launcher: on SIGTERM or SIGHUP it stops them, puts back the handler
    it found (its handlers are set only while ``launch`` runs, and only when called from the main thread;
    an ignored signal stays ignored), then raises the signal again, so that the default action ends this
    process by it (the shell sees ``128 + N``, 143 for SIGTERM) and a Python handler gets it; if that
    handler returns, ``launch`` returns ``128 + N``. A KeyboardInterrupt stops them and propagates. On
    Linux the kernel also kills them when the launcher dies by SIGKILL (``PR_SET_PDEATHSIG``, set by a
    small wrapper that then execs ``command``); processes that ``command`` starts in turn are its own.

    Args:
      command: the program and its arguments, e.g. ``["python", "my_script.py"]``.
      num_processes: how many processes to start (``NLIS_PROCESS_ID`` 0 to ``num_processes − 1``).
      cpu_devices: CPU devices per process (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``
        and ``JAX_NUM_CPU_DEVICES``); ``None`` leaves the environment's setting.
      port: the coordinator's port on 127.0.0.1 (default: a free one).
      timeout: seconds before every process is stopped and 124 returned (default: none).
      env: the processes' environment (default: this process's ``os.environ``), to which the launcher adds
        ``NLIS_COORDINATOR_ADDRESS``, ``NLIS_NUM_PROCESSES`` and ``NLIS_PROCESS_ID``.
    """
    if isinstance(command, str):  # read letter by letter it ran the command 't' for "true"
        raise TypeError(
            f"command must be a list of the program and its arguments, e.g. [{command!r}], got a str."
        )
    check_positive_int("num_processes", num_processes)
    if cpu_devices is not None:
        check_positive_int("cpu_devices", cpu_devices)
    # the ranges of the command line's checks (_port_arg, _timeout_arg), on Python values
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or _port_arg(port)):
        raise ValueError(f"port must be an integer in [1, 65535], got {port!r}.")
    if timeout is not None and (not isinstance(timeout, int | float) or _timeout_arg(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    if len(command) == 0:
        raise ValueError("command is empty: give the program and its arguments, e.g. ['python', 'a.py'].")
    address = f"127.0.0.1:{port or _free_port()}"
    base = dict(os.environ if env is None else env)
    if shutil.which(command[0], path=base.get("PATH", os.defpath)) is None:  # before the wrapper hides it
        raise FileNotFoundError(f"command {command[0]!r} is not found or not executable (PATH of env).")
    worker = _worker_command(command)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    received: list[int] = []
    previous = _catch_stop_signals(received)
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(num_processes):
            if received:
                break
            rank_env = _process_env(base, address, num_processes, rank, cpu_devices)
            procs.append(subprocess.Popen(worker, env=rank_env))
        while not received:
            codes = [p.poll() for p in procs]  # poll every process, not only up to the first running one
            failed = next((rank for rank, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                status = 128 - codes[failed] if codes[failed] < 0 else codes[failed]
                _say(f"process {failed} of {num_processes} {_how(codes[failed])}")
                break
            if None not in codes:
                break
            if deadline is not None and time.monotonic() > deadline:
                status = 124
                _say(f"timed out after {timeout:g} s")
                break
            time.sleep(0.05)
        if received:
            _say(f"received {signal.Signals(received[0]).name}; stopping the {num_processes} processes")
    finally:
        try:
            _stop(procs)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if received:  # also one that came while stopping after a failure
        signal.raise_signal(received[0])
        return 128 + received[0]
    return status


def _arg(check, convert=int):
    """An argparse type: ``convert`` the text, then ``check(value)``; either failure is a usage error."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    return parse


def _count_arg(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def _port_arg(value: int) -> str | None:
    return None if 0 < value < 65536 else "a port must lie in [1, 65535]"


def _timeout_arg(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be a positive number of seconds"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nlis_jax.distributed [options] script.py [args]``: :func:`launch` from the command line;
    returns its status."""
    parser = argparse.ArgumentParser(
        prog="python -m nlis_jax.distributed",
        description="Run a script as several jax.distributed processes on this machine (127.0.0.1).",
    )
    parser.add_argument("--num-processes", type=_arg(_count_arg), default=2, help="processes (default 2)")
    parser.add_argument("--cpu-devices", type=_arg(_count_arg), default=None, help="CPU devices per process")
    parser.add_argument(
        "--port", type=_arg(_port_arg), default=None, help="coordinator port (default: a free one)"
    )
    parser.add_argument(
        "--timeout", type=_arg(_timeout_arg, float), default=None, help="seconds before all are stopped"
    )
    parser.add_argument("script", nargs="?", help="Python script each process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")
    ns = parser.parse_args(argv)
    if ns.script is None:  # a required positional before REMAINDER made argparse call args required too
        parser.error("the following argument is required: script")
    command = [sys.executable, ns.script, *ns.args]
    return launch(command, ns.num_processes, cpu_devices=ns.cpu_devices, port=ns.port, timeout=ns.timeout)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DATA_AXIS",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "data_mesh",
    "gather",
    "initialize",
    "launch",
    "main",
    "process_rows",
    "shard_rows",
]
