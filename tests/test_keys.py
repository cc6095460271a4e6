"""The studies' keys derived on the host (nlis_jax.experiments.keys) against jax.random and Threefry's
published test vectors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nlis_jax.experiments import kernels
from nlis_jax.experiments import keys as prng

#: Known-answer vectors of Threefry-2x32 with 20 rounds, (key, counter, output), from the kat_vectors
#: file of the Random123 library (Salmon et al., SC 2011), the reference implementation of the paper.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


def data(keys) -> np.ndarray:
    return np.asarray(jax.random.key_data(keys))


@pytest.mark.parametrize(("key", "counter", "expected"), KNOWN_ANSWERS)
def test_threefry_known_answers(key, counter, expected):
    y0, y1 = prng.threefry2x32(np.array(key, np.uint32), *(np.array([c], np.uint32) for c in counter))
    assert (int(y0[0]), int(y1[0])) == expected


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    num=st.sampled_from([1, 2, 3, 50]),  # few distinct nums: jax.random.split compiles one program each
    value=st.integers(0, 2**32 - 1),
)
def test_split_and_fold_in_match_jax(seed, num, value):
    key = jax.random.key(seed)
    assert prng.host_derivable(key)
    np.testing.assert_array_equal(data(prng.split(key, num)), data(jax.random.split(key, num)))
    np.testing.assert_array_equal(data(prng.fold_in(key, value)), data(jax.random.fold_in(key, value)))
    children = prng.split_tuple(key, num)
    assert len(children) == num and all(c.shape == () for c in children)
    np.testing.assert_array_equal(np.stack([data(c) for c in children]), data(jax.random.split(key, num)))


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1])
def test_seeded_key_matches_jax(seed):
    before = kernels.compile_stats()["count"]
    key = prng.key(seed)
    assert kernels.compile_stats()["count"] == before
    assert key.dtype == jax.random.key(seed).dtype and key.shape == ()
    np.testing.assert_array_equal(data(key), data(jax.random.key(seed)))
    np.testing.assert_array_equal(data(prng.key(-1)), data(jax.random.key(-1)))  # outside: jax's own


def test_batched_children_and_the_study_derivations():
    key = jax.random.key(7)
    pilot, sample = prng.split_tuple(key, 2, batched=True)
    assert pilot.shape == sample.shape == (1,)
    np.testing.assert_array_equal(data(pilot)[0], data(jax.random.split(key, 2))[0])
    np.testing.assert_array_equal(data(sample)[0], data(jax.random.split(key, 2))[1])
    # a study cell's keys: split(fold_in(key, size), R), derived on the host end to end
    cell = prng.split(prng.fold_in(key, 1032), 5)
    np.testing.assert_array_equal(data(cell), data(jax.random.split(jax.random.fold_in(key, 1032), 5)))


def test_host_derivations_compile_nothing():
    key = jax.random.key(11)
    before = kernels.compile_stats()["count"]
    prng.split(key, 37)  # a number no other test splits into
    prng.split_tuple(key, 37, batched=True)
    prng.fold_in(key, 123_456)
    assert kernels.compile_stats()["count"] == before


def test_other_implementations_take_jax_random():
    rbg = jax.random.key(3, impl="rbg")
    assert not prng.host_derivable(rbg)
    np.testing.assert_array_equal(data(prng.split(rbg, 4)), data(jax.random.split(rbg, 4)))
    np.testing.assert_array_equal(data(prng.fold_in(rbg, 9)), data(jax.random.fold_in(rbg, 9)))
    children = prng.split_tuple(rbg, 3, batched=True)
    np.testing.assert_array_equal(np.concatenate([data(c) for c in children]), data(jax.random.split(rbg, 3)))
    with jax.threefry_partitionable(False):  # the other threefry layout: jax's own keys
        key = jax.random.key(5)
        assert not prng.host_derivable(key)
        np.testing.assert_array_equal(data(prng.split(key, 4)), data(jax.random.split(key, 4)))
        singles = prng.split_tuple(key, 4)
        np.testing.assert_array_equal(np.stack([data(c) for c in singles]), data(jax.random.split(key, 4)))
    assert not prng.host_derivable(jax.random.split(jax.random.key(0), 2))  # a key array, not one key
    # inside jit the key is traced: jax.random itself
    traced = jax.jit(lambda k: (prng.split(k, 3), prng.fold_in(k, 4)))(jax.random.key(8))
    np.testing.assert_array_equal(data(traced[0]), data(jax.random.split(jax.random.key(8), 3)))
    np.testing.assert_array_equal(data(traced[1]), data(jax.random.fold_in(jax.random.key(8), 4)))
