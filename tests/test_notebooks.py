"""Execute every ``notebooks/*.ipynb`` top to bottom, so that no notebook rots unseen.

Each notebook runs in a fresh IPython kernel with ``NLIS_SMALL=1`` (tiny sizes) and ``MPLBACKEND=Agg``
(headless); a cell that raises fails the test with that cell's traceback. The kernel is this interpreter
(``sys.executable``): a temporary kernel spec named ``python3`` is put first on ``JUPYTER_PATH``, so a stale
user-level ``python3`` spec pointing at another Python cannot hijack the run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason='needs the test extra: pip install -e ".[test]"')
nbclient = pytest.importorskip("nbclient", reason='needs the test extra: pip install -e ".[test]"')
pytest.importorskip("ipykernel", reason='needs the test extra: pip install -e ".[test]"')

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the importorskips)
from nbclient.exceptions import CellExecutionError  # noqa: E402

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL_NAME = "python3"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks

# pyproject turns every warning into an error. Driving a kernel from the test process can raise warnings that
# are not ours, depending on the versions of the jupyter stack: deprecations inside jupyter_client,
# jupyter_core and nbclient, and ResourceWarnings from pyzmq sockets/contexts and asyncio event loops that
# nbclient leaves to the garbage collector after the kernel shut down (raised in ``__del__``, where an error
# would surface as PytestUnraisableExceptionWarning instead). They are ignored here, matched by module or by
# message and for this module only, so the rest of the suite keeps warnings as errors. (With jupyter_client
# 8.10, nbclient 0.11, pyzmq 27.3 and ipykernel 7.4 none of them fires, even under ``-W error``.) Warnings
# raised INSIDE a notebook go to the kernel's stderr and never reach pytest.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_client.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_core.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:nbclient.*"),
    pytest.mark.filterwarnings("ignore:Unclosed (socket|context) <zmq:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Destroying context with unclosed socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:unclosed event loop:ResourceWarning"),
]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A folder holding ``kernels/python3/kernel.json`` that launches ipykernel with ``sys.executable``."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def kernel_env(kernel_dir, monkeypatch) -> None:
    """Environment the kernel inherits: small sizes, headless plots, our kernel spec first."""
    monkeypatch.setenv("NLIS_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))  # searched before user and system folders
    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable, f"kernel {KERNEL_NAME!r} resolves to {spec.argv}"


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"


def _execute(path: Path):
    """The notebook at ``path`` run top to bottom in a fresh kernel (a test failure naming the cell that
    raised); returns it with its outputs."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,  # per cell
        startup_timeout=120,  # a loaded 2-core CI box can be slow to start a kernel
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},  # cwd of the kernel
    )
    error = None
    try:
        client.execute()
    except CellExecutionError as err:  # its message holds the cell's source and traceback
        error = ANSI_ESCAPE.sub("", str(err))
    if error is not None:
        pytest.fail(f"{path.name}: a cell raised\n{error}", pytrace=False)
    return nb


def _printed(nb) -> str:
    return "".join(output.get("text", "") for cell in nb.cells for output in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_env) -> None:
    nb = _execute(path)
    # Notebooks on real data say so and skip their remaining cells when the data set is missing: report
    # that as a skip (naming the data), not as a pass of cells that never ran.
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "")
            if "was not found, so the rest of this notebook is skipped" in text:
                pytest.skip(f"{path.name}: {text.strip().splitlines()[0]}")


#: 01 falls back to synthetic data; the others skip their remaining cells.
REAL_DATA_NOTEBOOKS = [p for p in NOTEBOOKS if not p.name.startswith("01_")]


@pytest.mark.parametrize("path", REAL_DATA_NOTEBOOKS, ids=[p.name for p in REAL_DATA_NOTEBOOKS])
def test_notebook_without_its_data_says_so(path: Path, kernel_env, tmp_path, monkeypatch) -> None:
    """In small mode a notebook whose data set is missing says so and skips the rest, without the
    network: 04 asked scikit-learn to download California Housing, then failed in three cells
    (thirty-fifth session)."""
    empty = tmp_path / "data" / "scikit_learn_data"
    empty.mkdir(parents=True)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/scikit_learn_data either
    monkeypatch.delenv("NLIS_FASHION_MNIST", raising=False)
    if Path("/usr/share/datasets/fashion-mnist").is_dir() and "03_" in path.name:
        pytest.skip("Fashion-MNIST is installed system-wide here: 03 finds it")
    printed = _printed(_execute(path))
    assert "was not found, so the rest of this notebook is skipped" in printed, printed
    assert "Retry downloading" not in printed and "Downloading" not in printed
