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
