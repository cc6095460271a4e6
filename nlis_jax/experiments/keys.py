r"""The studies' PRNG keys derived on the host: ``jax.random.split`` and ``fold_in`` without compiling.

A study derives a few hundred keys (per scheme, size and repeat), a few dozen integers in all. As XLA
programs every derivation costs a compilation of threefry's 20 rounds: 0.1–0.25 s each on 2 cores, about
0.85 s of a cold ``nlis-jax run`` (benchmarks/README.md, (h)). For keys of jax's default implementation,
``threefry2x32`` with partitionable threefry (``jax_threefry_partitionable``, jax's default), this module
computes the same keys with numpy:

* ``split(key, num)[i]`` is ``threefry(key, (0, i))`` (the counter is ``i`` as a 64-bit integer in two
  32-bit words, high word first), and
* ``fold_in(key, d)`` is ``threefry(key, (0, d))`` for a 32-bit ``d``,

where ``threefry`` is Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror & Shaw, "Parallel random numbers:
as easy as 1, 2, 3", SC 2011): the words ``(x₀, x₁)`` start as the counter plus the key, and every four
rounds of ``x₀ += x₁; x₁ = rotl(x₁, r) ^ x₀`` a key word of ``(k₀, k₁, k₀ ^ k₁ ^ 0x1BD11BDA)`` and the
injection count are added. ``tests/test_keys.py`` checks the keys against ``jax.random`` and the hash
against published test vectors. Other key implementations, or ``jax_threefry_partitionable`` off, take
``jax.random`` itself (compiled).
"""

from __future__ import annotations

import jax
import numpy as np

from nlis_jax.experiments.kernels import LIGHT_COMPILER_OPTIONS, program

__all__ = ["fold_in", "host_derivable", "key", "split", "split_tuple", "threefry2x32"]

#: Rotation constants of Threefry-2x32, rounds 1–4 and 5–8 (then repeated).
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
#: The parity constant of the Threefish key schedule.
KEY_PARITY = 0x1BD11BDA


def threefry2x32(key: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32, 20 rounds, of the counter words ``(x0, x1)`` (uint32 arrays of one shape) under
    ``key`` (two uint32 words): ``(y0, y1)``, arrays of that shape. Wrap-around uint32 arithmetic."""
    k = np.asarray(key, np.uint32)
    schedule = (k[0], k[1], k[0] ^ k[1] ^ np.uint32(KEY_PARITY))
    x0 = np.array(x0, np.uint32, ndmin=1) + schedule[0]
    x1 = np.array(x1, np.uint32, ndmin=1) + schedule[1]
    for block in range(5):  # 5 blocks of 4 rounds, a key injection after each
        for r in ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def key(seed: int) -> jax.Array:
    """``jax.random.key(seed)``: for jax's default implementation ``threefry2x32`` and ``0 ≤ seed < 2³¹``
    the key words ``(0, seed)`` placed from the host (``jax.random.key`` compiles two small programs)."""
    seed = int(seed)
    if str(jax.config.jax_default_prng_impl) != "threefry2x32" or not 0 <= seed < 2**31:
        return jax.random.key(seed)
    return jax.random.wrap_key_data(np.array([0, seed], np.uint32), impl="threefry2x32")


def host_derivable(key) -> bool:
    """Whether :func:`split` and :func:`fold_in` derive ``key``'s children on the host: a single concrete
    typed key of the ``threefry2x32`` implementation, with ``jax_threefry_partitionable`` on."""
    return (
        isinstance(key, jax.Array)
        and not isinstance(key, jax.core.Tracer)  # values now, not inside jit or vmap
        and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        and key.shape == ()
        and str(jax.random.key_impl(key)) == "threefry2x32"
        and bool(jax.config.jax_threefry_partitionable)
    )


def _children(data: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """``(len(counters), 2)`` key data: ``threefry(data, (0, c))`` for each counter ``c``."""
    y0, y1 = threefry2x32(data, np.zeros_like(counters), counters)
    return np.stack([y0, y1], axis=-1)


def _data(key) -> np.ndarray:
    return np.asarray(jax.random.key_data(key), np.uint32)


def _host_split(key, num: int) -> np.ndarray | None:
    """``(num, 2)`` key data of ``split(key, num)`` computed on the host, or ``None`` when ``key`` is not
    :func:`host_derivable` (or ``num`` is not a positive 32-bit count)."""
    if not host_derivable(key) or not 0 < num < 2**32:
        return None
    return _children(_data(key), np.arange(num, dtype=np.uint32))


def split(key, num: int) -> jax.Array:
    """``jax.random.split(key, num)``: a ``(num,)`` key array (on the host for :func:`host_derivable`
    keys, see the module docstring)."""
    children = _host_split(key, num)
    if children is None:
        return jax.random.split(key, num)
    return jax.random.wrap_key_data(children, impl="threefry2x32")


def split_tuple(key, num: int, *, batched: bool = False) -> tuple[jax.Array, ...]:
    """:func:`split` as a tuple of ``num`` keys, each a single key, or with ``batched`` a ``(1,)`` key
    array (a batch of one repeat). Indexing a key array eagerly would compile a program per index."""
    children = _host_split(key, num)
    if children is None:
        return _split_program(key, num=num, batched=batched)
    if batched:
        children = children[:, None]
    return tuple(jax.random.wrap_key_data(c, impl="threefry2x32") for c in children)  # num keys, not examples


# The fallback programs run once on a few integers: LLVM's optimisation passes would cost more than they
# save (a 50-key split compiled in 0.09 s instead of 0.21 s); integer arithmetic, the same keys.
@program(LIGHT_COMPILER_OPTIONS, static_argnames=("num", "batched"))
def _split_program(key, *, num: int, batched: bool):
    """:func:`split_tuple` by ``jax.random`` (keys that are not :func:`host_derivable`)."""
    children = jax.random.split(key, num)
    return tuple(children[i : i + 1] if batched else children[i] for i in range(num))


def fold_in(key, data: int) -> jax.Array:
    """``jax.random.fold_in(key, data)`` for an integer ``0 ≤ data < 2³²`` (on the host for
    :func:`host_derivable` keys)."""
    data = int(data)
    if not host_derivable(key) or not 0 <= data < 2**32:
        return jax.random.fold_in(key, data)
    child = _children(_data(key), np.array([data], np.uint32))[0]
    return jax.random.wrap_key_data(child, impl="threefry2x32")
