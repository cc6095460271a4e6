"""The launcher of :mod:`nlis_jax.distributed` (``python -m nlis_jax.distributed``) and signals: its processes
end with it (SIGTERM, SIGHUP, and on Linux SIGKILL), and a failed process is named with its status, 128 + N
for one killed by signal N. The processes are tiny scripts that sleep or exit (no JAX), so each test takes
about a second (the launcher itself imports JAX)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nlis_jax import distributed

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
# Each process writes its pid to DIR/pid<rank> (atomically: a rename), then sleeps 60 s unless stopped.
SLEEPER = (
    "import os, sys, time\n"
    "from pathlib import Path\n"
    "out = Path(sys.argv[1]) / f\"pid{os.environ['NLIS_PROCESS_ID']}\"\n"
    "out.with_suffix('.tmp').write_text(str(os.getpid()))\n"
    "out.with_suffix('.tmp').rename(out)\n"
    "time.sleep(60)\n"
)


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie (ended, not yet reaped by its new parent) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _pids(directory: Path, n: int, seconds: float = 60) -> list[int]:
    """The pids the ``n`` sleepers wrote to ``directory`` (waits for them: a loaded machine)."""
    files = [directory / f"pid{rank}" for rank in range(n)]
    assert _wait_until(lambda: all(f.exists() for f in files), seconds), "the processes did not start"
    return [int(f.read_text()) for f in files]


def _kill_all(pids) -> None:
    """Clean up what a failing test leaves running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def sleeper(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    (tmp_path / "pids").mkdir()
    return script, tmp_path / "pids"


# Runs the launcher with SIGTERM and SIGHUP at their default action (an exec keeps that). An ignored signal
# is inherited through exec, and the launcher leaves an ignored signal ignored (by design): under ``nohup
# pytest`` SIGHUP reached a launcher that ignored it, and the SIGHUP test waited out its 30 s. (Not a
# ``preexec_fn``: that forks the test process, which JAX warns against once it runs threads.)
DEFAULT_STOP_SIGNALS = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
    "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _start_launcher(script: Path, pid_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nlis_jax.distributed", "--num-processes", "2", "--timeout", "120"]
    return subprocess.Popen(
        [sys.executable, "-c", DEFAULT_STOP_SIGNALS, *cmd, str(script), str(pid_dir)],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signalled_launcher_stops_its_processes_and_ends_by_the_signal(sleeper, signum):
    """SIGTERM (a scheduler, ``timeout``, ``kill``) to the launcher alone left its processes running,
    re-parented to init (and its --timeout no longer enforced). Now it stops them, then ends by the same
    signal: the shell sees 128 + signum (143 for SIGTERM)."""
    script, pid_dir = sleeper
    launcher = _start_launcher(script, pid_dir)
    pids = []
    try:
        pids = _pids(pid_dir, 2)
        launcher.send_signal(signum)
        try:
            _, err = launcher.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the launcher did not end on the signal")
        assert _wait_until(lambda: not any(map(_alive, pids)), 10), "processes outlived the launcher"
        assert launcher.returncode == -signum, err
        assert f"received {signal.Signals(signum).name}; stopping the 2 processes" in err, err
    finally:
        launcher.kill()
        launcher.wait()
        launcher.stderr.close()
        _kill_all(pids)


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux only")
def test_the_processes_of_a_killed_launcher_die_with_it(sleeper):
    """SIGKILL (no handler sees it; ``subprocess.run(timeout=)`` sends it) to the launcher: the kernel ends
    its processes (PR_SET_PDEATHSIG), where they ran on for their 60 s."""
    script, pid_dir = sleeper
    launcher = _start_launcher(script, pid_dir)
    pids = []
    try:
        pids = _pids(pid_dir, 2)
        launcher.kill()
        launcher.wait(timeout=30)
        assert _wait_until(lambda: not any(map(_alive, pids)), 10), "processes outlived the launcher"
    finally:
        launcher.kill()
        launcher.wait()
        launcher.stderr.close()
        _kill_all(pids)


def _script(tmp_path, rank1: str) -> str:
    """Process 1 runs ``rank1``; process 0 sleeps 60 s (it must be stopped)."""
    script = tmp_path / "job.py"
    head = "import os, signal, sys, time\nif os.environ['NLIS_PROCESS_ID'] == '1':\n"
    script.write_text(f"{head}    {rank1}\ntime.sleep(60)\n")
    return str(script)


def test_a_process_killed_by_a_signal_gives_128_plus_the_signal_and_is_named(tmp_path, capfd):
    """Popen gives -9 for a process killed by SIGKILL; the launcher passed it to sys.exit (the shell saw
    247) and named nothing."""
    script = _script(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    start = time.monotonic()
    assert distributed.launch([sys.executable, script], 2, timeout=60) == 128 + signal.SIGKILL
    assert time.monotonic() - start < 30
    err = capfd.readouterr().err
    assert "nlis_jax.distributed: process 1 of 2 was killed by signal SIGKILL\n" in err, err


@pytest.mark.parametrize(
    ("args", "status", "line"),
    [
        (["--num-processes", "2"], 3, "process 1 of 2 exited with status 3"),
        (["--num-processes", "3"], 3, "process 1 of 3 exited with status 3"),
        (["--num-processes", "2", "--timeout", "0.5"], 124, "timed out after 0.5 s"),
    ],
)
def test_the_launcher_says_why_the_job_ended(tmp_path, capfd, args, status, line):
    script = _script(tmp_path, "sys.exit(3)" if status == 3 else "pass")
    assert distributed.main([*args, script]) == status
    err = capfd.readouterr().err
    assert err.count("nlis_jax.distributed: ") == 1, err
    assert f"nlis_jax.distributed: {line}\n" in err, err


def test_success_says_nothing(tmp_path, capfd):
    script = tmp_path / "ok.py"
    script.write_text("import os\nassert os.environ['NLIS_PROCESS_ID'] in ('0', '1')\n")
    assert distributed.launch([sys.executable, str(script)], 2, timeout=60) == 0
    assert "nlis_jax.distributed" not in capfd.readouterr().err


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_launch_hands_the_signal_on_to_the_previous_handler(tmp_path, capfd):
    """launch() from Python: a SIGTERM to the caller stops the processes; the caller's own handler, put back
    after launch, then gets the signal (rather than launch swallowing it), and launch returns 143."""
    script = _script(tmp_path, "os.kill(os.getppid(), signal.SIGTERM)")
    got = []

    def handler(signum, frame):
        got.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        start = time.monotonic()
        assert distributed.launch([sys.executable, script], 2, timeout=30) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 20
        assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "nlis_jax.distributed: received SIGTERM; stopping the 2 processes" in capfd.readouterr().err


def test_launch_from_another_thread(tmp_path):
    """signal.signal raises outside the main thread: launch then leaves the signals alone, and works."""
    script = tmp_path / "ok.py"
    script.write_text("pass\n")
    result = []
    thread = threading.Thread(
        target=lambda: result.append(distributed.launch([sys.executable, str(script)], 2))
    )
    thread.start()
    thread.join(60)
    assert result == [0]


def test_a_command_that_cannot_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="command is empty"):
        distributed.launch([], 2)
    with pytest.raises(FileNotFoundError, match="'no-such-program-xyz' is not found"):
        distributed.launch(["no-such-program-xyz", "a.py"], 2)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--num-processes", "0", "must be at least 1, got '0'"),  # was a traceback (exit 1)
        ("--cpu-devices", "0", "must be at least 1, got '0'"),  # each process died of SIGSEGV
        ("--port", "70000", "a port must lie in [1, 65535], got '70000'"),  # ran on another port
        ("--timeout", "-1", "must be a positive number of seconds, got '-1'"),  # timed out at once
        ("--timeout", "nan", "must be a positive number of seconds, got 'nan'"),  # no timeout at all
    ],
)
def test_launcher_options_are_checked_before_any_process(option, value, message, capsys):
    with pytest.raises(SystemExit) as info:
        distributed.main([option, value, "never_started.py"])
    assert info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


def test_launch_arguments_are_checked(monkeypatch):
    with pytest.raises(TypeError, match=r"command must be a list .* e\.g\. \['true'\], got a str"):
        distributed.launch("true", 1)  # read letter by letter, it looked for a command 't'
    with pytest.raises(TypeError, match="num_processes must be a Python int, got 2.5"):
        distributed.launch(["true"], 2.5)
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got -1"):
        distributed.launch(["true"], 1, timeout=-1)
    with pytest.raises(ValueError, match=r"port must be an integer in \[1, 65535\], got 0"):
        distributed.launch(["true"], 1, port=0)
    assert distributed.launch(["true"], 2, timeout=60) == 0
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "abc")  # was int()'s "invalid literal"
    with pytest.raises(ValueError, match=r"\$NLIS_NUM_PROCESSES must be an integer, got 'abc'"):
        distributed.initialize("127.0.0.1:1")


def test_the_launcher_asks_for_the_script_alone(capsys, monkeypatch):
    """Without a script the usage error said "required: script, args", though the script's arguments are
    optional; a script followed by options of its own still reaches it whole."""
    with pytest.raises(SystemExit) as info:
        distributed.main(["--num-processes", "2"])
    assert info.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith("error: the following argument is required: script")
    seen = {}
    monkeypatch.setattr(
        distributed, "launch", lambda command, n, **kw: seen.update(command=command, n=n) or 0
    )
    assert distributed.main(["--num-processes", "3", "job.py", "--num-processes", "7", "-x"]) == 0
    assert seen == {"command": [sys.executable, "job.py", "--num-processes", "7", "-x"], "n": 3}
