"""Type aliases shared across nlis_jax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
Array = jax.Array
PRNGKey = jax.Array
#: ``apply_fn(params, x) -> scalar or (k,)`` for ONE example ``x``.
ApplyFn = Callable[[PyTree, Array], Array]
