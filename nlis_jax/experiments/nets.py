"""Small pure-JAX models in the ``apply_fn(params, x)`` convention, used by experiments and benchmarks.

Each ``*_init`` takes a PRNG key first and returns a params pytree; each model is a plain function of one
example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nlis_jax import bounded_swish
from nlis_jax._checks import check_key

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any


def single_index(phi: Callable[[Array], Array] = bounded_swish) -> Callable[[Array, Array], Array]:
    """``f(θ; x) = ϕ(<θ, x>)`` with ``θ`` of shape ``(d,)`` (a bias is a ones column of ``x``)."""

    def apply_fn(theta, x):
        return phi(jnp.dot(x, theta))

    return apply_fn


def mlp_init(key: PRNGKey, sizes: Sequence[int], *, bias: bool = True, dtype=jnp.float32) -> PyTree:
    """Params of an MLP with layer widths ``sizes = (d_in, h_1, ..., d_out)``, LeCun-normal weights.

    Returns a list of ``{"w": (d_out, d_in), "b": (d_out,)}`` dicts (no ``"b"`` when ``bias=False``).
    """
    check_key("key", key)
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for k, d_in, d_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
        layer = {"w": jax.random.normal(k, (d_out, d_in), dtype) / jnp.sqrt(jnp.asarray(d_in, dtype))}
        if bias:
            layer["b"] = jnp.zeros((d_out,), dtype)
        layers.append(layer)
    return layers


def mlp(activation: Callable[[Array], Array] = jnp.tanh, *, squeeze: bool = True):
    """``apply_fn(params, x)`` of an MLP built by :func:`mlp_init`; scalar output when ``d_out == 1``."""

    def apply_fn(params, x):
        h = jnp.ravel(x)
        for i, layer in enumerate(params):
            h = layer["w"] @ h + layer["b"] if "b" in layer else layer["w"] @ h
            if i < len(params) - 1:
                h = activation(h)
        return h[0] if squeeze and h.shape == (1,) else h

    return apply_fn
