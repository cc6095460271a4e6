"""Strict numerics for the whole suite (in the style of lineax/equinox)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("NLIS_SMALL", "1")  # notebooks and CLI run at a small size under test

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # closed forms to 1e-10
jax.config.update("jax_numpy_rank_promotion", "raise")  # catches (n,) vs (n, 1) bugs
