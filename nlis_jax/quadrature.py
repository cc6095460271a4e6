"""Gauss-Legendre quadrature on ``[0, 1]``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nlis_jax._checks import check_positive_int


@functools.lru_cache(maxsize=64)
def _nodes_and_weights_f64(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(num_nodes)
    return (x + 1.0) / 2.0, w / 2.0


#: The most nodes of a fixed rule. numpy builds the rule from a ``q × q`` eigenproblem: 3 s at 4,096
#: nodes on 2 cores, 7 TiB of memory at 10⁶; a fixed rule that long is better served by the adaptive
#: rule (``num_nodes=None``), which subdivides only where the integrand needs it.
MAX_NODES = 4096


def check_num_nodes(num_nodes) -> int:
    """``num_nodes`` as an int in ``[1, MAX_NODES]`` (``TypeError`` unless an int, ``ValueError`` else)."""
    num_nodes = check_positive_int("num_nodes", num_nodes)
    if num_nodes > MAX_NODES:
        raise ValueError(
            f"num_nodes must be at most {MAX_NODES}, got {num_nodes}: a fixed Gauss-Legendre rule that "
            "long is slow to build (a q × q eigenproblem) and rarely needed; the adaptive rule "
            "(num_nodes=None) subdivides only where the integrand needs it."
        )
    return num_nodes


def gauss_legendre(num_nodes: int, dtype=jnp.float64) -> tuple[jnp.ndarray, jnp.ndarray]:
    r"""Gauss-Legendre nodes ``t_k`` and weights ``w_k`` mapped to ``[0, 1]``.

    .. math:: \int_0^1 g(t)\,dt \approx \sum_{k=1}^{q} w_k\, g(t_k),

    exact for polynomials of degree ``2q - 1``.

    Args:
      num_nodes: ``q``, the number of nodes (a static Python int).
      dtype: floating dtype of the returned arrays (float64 is float32 without ``jax_enable_x64``).

    Returns:
      ``(nodes, weights)``, each of shape ``(q,)``; the weights sum to one.
    """
    check_num_nodes(num_nodes)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"gauss_legendre: dtype must be a floating dtype, got {jnp.dtype(dtype)}.")
    t, w = _nodes_and_weights_f64(int(num_nodes))
    dtype = jax.dtypes.canonicalize_dtype(dtype)  # float64 without x64 is float32, without a warning
    return jnp.asarray(t, dtype=dtype), jnp.asarray(w, dtype=dtype)


__all__ = [
    "MAX_NODES",
    "gauss_legendre",
]
