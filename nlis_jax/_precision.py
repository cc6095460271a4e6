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


def times_power_of_two(x: jax.Array, k) -> jax.Array:
    """``x · 2^k`` (``jnp.ldexp(x, k)``; ``k`` an int32 array broadcasting against ``x``, within twice the
    exponent range of ``x``'s dtype: e.g. minus the ``jnp.frexp`` exponent of one of its values) as two
    multiplications by the powers of two ``2^⌊k/2⌋`` and ``2^(k − ⌊k/2⌋)``, each a normal number of that
    dtype. The same values as ``ldexp`` wherever ``x`` and the result are normal numbers (every scaling
    by a power of two is exact there), at the cost of a multiply: XLA:CPU's ``ldexp`` of a 200,000 × 65
    matrix took 35 ms in float32 and 62 ms in float64, the two multiplies 2.1 and 3.8 ms (2 cores,
    2026-12-05)."""
    k = jnp.asarray(k, jnp.int32)
    half = k // 2
    one = jnp.ones((), x.dtype)
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, k - half)
