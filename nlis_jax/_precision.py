"""Full-precision matrix products for the library's own numerics.

On GPUs and TPUs, JAX's default precision for float32 matrix products is reduced (TF32 or bf16 passes),
which silently moves leverage scores of an ill-conditioned float32 dual matrix and adjoints (the
measurements are in benchmarks/README.md). Every kernel of nlis_jax (adjoints, dual products, scores,
distortion) therefore traces under ``jax.default_matmul_precision("highest")``; on CPUs this changes
nothing. The user's own training code keeps whatever precision the user chose.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def highest_precision(fn):
    """Trace ``fn`` with ``jax.default_matmul_precision("highest")`` (put it under ``jax.jit``)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


def at_least_float32(dtype) -> jnp.dtype:
    """``jnp.promote_types(dtype, float32)`` under jax's standard promotion rules: half precision widened to
    float32, float32 and float64 kept. (Under ``jax_numpy_dtype_promotion="strict"``, which some users
    set, ``promote_types(float64, float32)`` is an error: here it asks only for the wider of the two.)"""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(dtype, jnp.float32)


def promoted(*dtypes) -> jnp.dtype:
    """``jnp.result_type(*dtypes)`` under jax's standard promotion rules (see :func:`at_least_float32`)."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)
