"""Strict numerics for the whole suite (in the style of lineax/equinox)."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("MPLBACKEND", "Agg")
# The real data sets live in ../shared/data beside the checkout; point scikit-learn's
# cache there unless the caller already chose a data home.
_SHARED_SKLEARN = Path(__file__).resolve().parents[2] / "shared" / "data" / "scikit_learn_data"
if "SCIKIT_LEARN_DATA" not in os.environ and _SHARED_SKLEARN.is_dir():
    os.environ["SCIKIT_LEARN_DATA"] = str(_SHARED_SKLEARN)
os.environ.setdefault("NLIS_SMALL", "1")  # notebooks and CLI run at a small size under test
# `nlis-jax run` keeps compiled programs in ~/.cache by default; in-process CLI tests would turn that on
# for the whole test process (tests of the cache pass their own folder)
os.environ.setdefault("NLIS_JAX_COMPILATION_CACHE", "off")
# XLA's machine-code generation at LLVM -O0 (JAX_DISABLE_MOST_OPTIMIZATIONS=1). XLA's HLO passes (fusion,
# simplification, layout) still run, so the tests run the programs users run, compiled with less effort.
# The suite compiles hundreds of programs on tiny arrays, where compilation dominates: all 736 tests pass
# either way, in 714 s instead of 1,067 s on 2 cores (2026-12-02). JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs
# the suite fully optimised; tests/test_full_optimization.py reruns the tests whose outcome rests on
# float32 rounding that way in every run. Subprocesses (CLI, notebooks, launcher) inherit the setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_TRUE = {"1", "y", "yes", "t", "true", "on"}  # as jax reads a boolean variable
_LOW_EFFORT = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].strip().lower() in _TRUE
#: With low effort, also XLA's older CPU code generator for fusions (LLVM IR emitted directly) in place of
#: its MLIR fusion emitters, whose pipeline took most of the compile time of the suite's small programs:
#: test_adaptive, test_robust, test_edge_inputs and test_projected spent 152 s instead of 488 s in XLA's
#: backend compiler and ran in 174 s instead of 405 s; the whole suite in 720 s instead of 1,311 s on 2
#: cores (2026-12-06). A few HLO passes follow the choice (scatters become loops), and the machine code may
#: round float32 otherwise: the float32 sums of one program differed by 1.5e-6 (test_adaptive's
#: test_tiny_normal_adjoints_are_refined_at_unit_scale). tests/test_full_optimization.py reruns the tests
#: whose outcome rests on such rounding with XLA's defaults. Subprocesses inherit it through XLA_FLAGS.
#: XLA aborts the process on a flag it does not know, so a jaxlib without this one (a later release may
#: drop it) must not get it: a fresh process tries it once (about 2 s), in pytest's main process, whose
#: environment the worker processes inherit.
LOW_EFFORT_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)
_PROBED = "NLIS_TEST_LOW_EFFORT_XLA_FLAGS"  # "1": the flags were tried (taken or not); set for the workers


def _xla_takes(flags) -> bool:
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


if _LOW_EFFORT and _PROBED not in os.environ:
    _flags = os.environ["XLA_FLAGS"].split()
    _new = [f for f in LOW_EFFORT_XLA_FLAGS if f.split("=")[0] not in {g.split("=")[0] for g in _flags}]
    if _new and _xla_takes(_new):
        os.environ["XLA_FLAGS"] = " ".join([*_flags, *_new])
    os.environ[_PROBED] = "1"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # closed forms to 1e-10
jax.config.update("jax_numpy_rank_promotion", "raise")  # catches (n,) vs (n, 1) bugs
jax.config.update("jax_disable_most_optimizations", _LOW_EFFORT)  # also if a plugin imported jax first

import pytest  # noqa: E402

from nlis_jax.cli import _global_setting  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop compiled programs between test modules: one long process otherwise accumulates thousands of
    executables (hypothesis and shape sweeps), and we saw XLA crash compiling late in such a run."""
    yield
    jax.clear_caches()


#: Process-wide jax settings that a test must leave as it found them: each worker runs many files in one
#: process, in an order that depends on timing, so a leaked setting fails some later file on some runs only
#: (a test that turned the persistent compilation cache off failed test_cli.py's cache tests in one CI run).
GUARDED_SETTINGS = (
    "jax_enable_x64",
    "jax_numpy_rank_promotion",
    "jax_disable_most_optimizations",
    "jax_disable_jit",
    "jax_debug_nans",
    "jax_debug_infs",
    "jax_default_matmul_precision",
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
    "jax_compilation_cache_max_size",
)


#: Environment variables (prefixes) that the library, jax or the tests read. Not all: libraries set some of
#: their own when first imported (scikit-learn's OpenMP runtime sets ``KMP_*``), in whichever test that is.
GUARDED_ENVIRONMENT = (
    "NLIS_",
    "JAX_",
    "XLA_",
    "SCIKIT_LEARN_DATA",
    "MPLBACKEND",
    "XDG_",
    "HOME",
    "PATH",
    "PYTHON",
)


@pytest.fixture(autouse=True)
def _process_state_unchanged(request):
    """Fail the test that changes one of :data:`GUARDED_SETTINGS`, a :data:`GUARDED_ENVIRONMENT` variable
    or the working directory without putting it back (at its teardown, naming what changed), rather than
    a later test on the same worker."""
    before = {name: _global_setting(jax, name) for name in GUARDED_SETTINGS}
    environ, cwd = dict(os.environ), os.getcwd()
    yield
    after = {name: _global_setting(jax, name) for name in GUARDED_SETTINGS}
    leaked = {name: (before[name], after[name]) for name in GUARDED_SETTINGS if after[name] != before[name]}
    for name, (value, _) in leaked.items():  # the rest of the worker's tests run as intended
        jax.config.update(name, value)
    changed = {
        name: (environ.get(name), os.environ.get(name))
        for name in set(environ) | set(os.environ)
        if environ.get(name) != os.environ.get(name) and name.startswith(GUARDED_ENVIRONMENT)
    }
    for name, (value, _) in changed.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value
    leaked |= changed
    if os.getcwd() != cwd:
        leaked["working directory"] = (cwd, os.getcwd())
        os.chdir(cwd)
    assert not leaked, f"{request.node.nodeid} left process state changed (before, after): {leaked}"


# Scheduling: pytest-xdist sends whole files (``--dist loadfile``) to the 2 workers in collection order
# (``--no-loadscope-reorder`` in pyproject; its default orders files by their number of tests). The files
# that take longest go first, so that the last file to finish is a short one. Worker seconds of each file
# in a `--durations=0` run of the whole suite on the 2-core machine at JAX_DISABLE_MOST_OPTIMIZATIONS=1
# (2026-12-03, nineteenth session, under some load: 2,041 worker seconds, 1,034 s wall). Files not listed
# follow in alphabetical order. A stale figure only makes the run end less evenly.
FILE_SECONDS = {
    "test_benchmarks_smoke.py": 195,
    "test_distributed.py": 150,
    "test_adaptive.py": 148,
    "test_flights.py": 138,
    "test_robust.py": 113,
    "test_host.py": 105,
    "test_projected.py": 100,
    "test_projected_bench_smoke.py": 98,
    "test_scores.py": 89,
    "test_notebooks.py": 72,
    "test_precondition.py": 68,
    "test_active.py": 68,
    "test_outliers.py": 67,
    "test_streaming.py": 65,
    "test_projected_factored.py": 54,
    "test_properties.py": 46,
    "test_edge_inputs.py": 42,
    "test_score_cli.py": 41,
    "test_experiments.py": 40,
    "test_model_inputs.py": 37,
    "test_sharding.py": 36,
    "test_full_optimization.py": 34,
    "test_sketched.py": 28,
    "test_compilation.py": 27,
    "test_train.py": 26,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: file order kept otherwise
