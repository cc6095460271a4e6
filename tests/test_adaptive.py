"""Adaptive quadrature (nlis_jax._adaptive): closed-form integrals, kinks, budgets, tracing, compiles.

Tolerances: the default rtol is 1e-12 (float64) / 1e-6 (float32) on the estimated error relative to
``‖I_i‖``; tests allow 1e-11 (float64) / 1e-5 (float32) on the true error, a factor 10 for estimates
that are extrapolations, never bounds.
"""

from __future__ import annotations

import collections
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlis_jax import _adaptive as adaptive

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def cos_ramp(params, t, x):
    """``[cos(a x t), 2 cos(a x t)]``: integral ``sin(a x) / (a x) · [1, 2]``."""
    value = jnp.cos(params * x * t)
    return jnp.stack([value, 2 * value])


def step(params, t, x):
    """``[1{t > x}, params · t]``: a jump at ``t = x``; integral ``[1 − x, params / 2]``."""
    return jnp.stack([jnp.where(t > x, 1.0, 0.0).astype(t.dtype), params * t])


def sinc(z):
    z = np.asarray(z, np.float64)
    return np.where(z == 0, 1.0, np.sin(z) / np.where(z == 0, 1.0, z))


def test_oscillating_integrand_matches_closed_form():
    xs = jnp.linspace(-60.0, 60.0, 41)  # up to ~10 periods on [0, 1]
    value, info = adaptive.integrate(cos_ramp, jnp.asarray(1.0), xs)
    ref = sinc(xs)
    np.testing.assert_allclose(np.asarray(value), np.stack([ref, 2 * ref], axis=1), rtol=0, atol=1e-13)
    assert bool(np.all(info.converged)) and float(np.max(info.error)) <= 1e-12
    assert int(np.max(info.panels)) > 1 and int(np.min(info.panels)) == 1  # refined only where needed


def test_jump_is_localised_by_bisection():
    xs = jnp.linspace(0.013, 0.987, 23)  # jumps at irrational-looking positions, incl. near the ends
    value, info = adaptive.integrate(step, jnp.asarray(1.0), xs)
    np.testing.assert_allclose(np.asarray(value[:, 0]), 1 - np.asarray(xs), rtol=0, atol=1e-11)
    np.testing.assert_allclose(np.asarray(value[:, 1]), 0.5, rtol=0, atol=1e-15)
    assert bool(np.all(info.converged))


def test_float32():
    xs = jnp.linspace(-30.0, 30.0, 17, dtype=jnp.float32)
    value, info = adaptive.integrate(cos_ramp, jnp.asarray(1.0, jnp.float32), xs)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(value[:, 0], np.float64), sinc(xs), rtol=0, atol=1e-5)
    assert bool(np.all(info.converged))


def test_traced_under_jit_matches_eager():
    xs = jnp.linspace(0.05, 0.95, 9)
    eager, info = adaptive.integrate(step, jnp.asarray(1.0), xs)
    traced, tinfo = jax.jit(lambda p, x: adaptive.integrate(step, p, x))(jnp.asarray(1.0), xs)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(tinfo.panels), np.asarray(info.panels))


def test_budget_warning_counts_the_examples():
    xs = jnp.asarray([0.3, 0.6, 1.5, 2.0])  # two jumps inside [0, 1], two outside (smooth)
    with pytest.warns(adaptive.QuadratureWarning, match=r"for 2 of 4 examples") as record:
        _, info = adaptive.integrate(step, jnp.asarray(1.0), xs, max_panels=10)
    np.testing.assert_array_equal(np.asarray(info.converged), [False, False, True, True])
    worst = float(np.max(info.error))
    assert worst > 1e-12 and f"{worst:.2e}" in str(record[0].message)


def test_check_residual_forces_refinement():
    def check(params, value, x):  # an independent residual: the first component must equal (1 - x)+
        return jnp.abs(value[0] - jnp.maximum(1 - x, 0))

    # A jump beyond the last Gauss node (0.9947): the first pass sees a constant and estimates no error.
    xs = jnp.asarray([0.999, 2.0])
    _, blind = adaptive.integrate(step, jnp.asarray(1.0), xs)
    assert int(np.max(blind.panels)) == 1 and float(np.max(blind.error)) < 1e-14
    value, info = adaptive.integrate(step, jnp.asarray(1.0), xs, check=check, check_tol=1e-11)
    np.testing.assert_allclose(np.asarray(value[:, 0]), [0.001, 0.0], rtol=0, atol=1e-11)
    assert bool(np.all(info.converged)) and float(np.max(info.residual)) <= 1e-11
    np.testing.assert_array_equal(np.asarray(info.panels) > 1, [True, False])


def test_no_recompile_on_new_values():
    xs = jnp.linspace(-2.0, 2.0, 32)
    adaptive.integrate(cos_ramp, jnp.asarray(1.0), xs)
    xs_new, a_new = jnp.asarray(np.linspace(-2.1, 1.9, 32)), jnp.asarray(0.9)
    counts = collections.Counter()

    def listener(event, duration, **kwargs):
        counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            adaptive.integrate(cos_ramp, a_new, xs_new)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert counts[COMPILE_EVENT] == 0


def test_panel_estimate_is_exact_for_polynomials():
    def cubic(params, t, x):
        return jnp.stack([t**3 * x, params * t**2])

    value, info = adaptive.integrate(cubic, jnp.asarray(3.0), jnp.asarray([1.0, 4.0]))
    np.testing.assert_allclose(np.asarray(value), [[0.25, 1.0], [1.0, 1.0]], rtol=1e-15)
    assert float(np.max(info.error)) <= 1e-14 and int(np.max(info.panels)) == 1
