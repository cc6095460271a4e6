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


def highest_precision(fn):
    """Trace ``fn`` with ``jax.default_matmul_precision("highest")`` (put it under ``jax.jit``)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped
