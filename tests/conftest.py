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

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # closed forms to 1e-10
jax.config.update("jax_numpy_rank_promotion", "raise")  # catches (n,) vs (n, 1) bugs

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop compiled programs between test modules: one long process otherwise accumulates thousands of
    executables (hypothesis and shape sweeps), and we saw XLA crash compiling late in such a run."""
    yield
    jax.clear_caches()


# Scheduling: pytest-xdist sends whole files (``--dist loadfile``) to the 2 workers in collection order
# (``--no-loadscope-reorder`` in pyproject; its default orders files by their number of tests). The files
# that take longest go first, so that the last file to finish is a short one. Worker seconds of each file
# in a `--durations` run of the whole suite on the 2-core machine (2026-12-01, sixth session); for the files
# that session then sped up (benchmarks_smoke, distributed, precondition, streaming, host, active) the
# figure is that run's minus the saving measured on the edited tests. Files not listed follow in
# alphabetical order. A stale figure only makes the run end less evenly.
FILE_SECONDS = {
    "test_adaptive.py": 215,
    "test_benchmarks_smoke.py": 185,
    "test_notebooks.py": 122,
    "test_distributed.py": 118,
    "test_projected.py": 115,
    "test_precondition.py": 102,
    "test_streaming.py": 100,
    "test_robust.py": 94,
    "test_outliers.py": 92,
    "test_host.py": 90,
    "test_projected_factored.py": 85,
    "test_flights.py": 82,
    "test_properties.py": 69,
    "test_projected_bench_smoke.py": 68,
    "test_scores.py": 62,
    "test_sketched.py": 52,
    "test_active.py": 52,
    "test_experiments.py": 48,
    "test_sharding.py": 47,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: file order kept otherwise
