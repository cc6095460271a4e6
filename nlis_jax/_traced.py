"""Value checks under a user's ``jax.jit``, through ``jax.experimental.checkify``.

Value checks (NaN/Inf, probabilities summing to one, an all-zero matrix) need values, so outside
:func:`traced_checks` they are skipped under tracing. Inside it they become ``checkify.check`` calls,
which the user's ``checkify.checkify`` turns into an error value::

    from jax.experimental import checkify

    def draw(key, F):
        with nj.traced_checks():
            return nj.sample(key, nj.leverage_scores(F), 64)

    err, (idx, w) = jax.jit(checkify.checkify(draw, errors=checkify.user_checks))(key, F)
    err.throw()  # ValueError-like JaxRuntimeError naming the problem, if any

A function traced inside :func:`traced_checks` must be wrapped in ``checkify.checkify`` (a bare
``jax.jit`` of it refuses to trace the checks).
"""

from __future__ import annotations

import contextlib
import threading

from jax.experimental import checkify

_STATE = threading.local()


@contextlib.contextmanager
def traced_checks():
    """Within this block, nlis_jax's value checks on traced arrays emit ``checkify.check``."""
    previous = getattr(_STATE, "on", False)
    _STATE.on = True
    try:
        yield
    finally:
        _STATE.on = previous


def enabled() -> bool:
    """True inside :func:`traced_checks` (on this thread)."""
    return getattr(_STATE, "on", False)


def check(pred, message: str) -> None:
    """``checkify.check(pred, message)`` inside :func:`traced_checks`; nothing otherwise."""
    if enabled():
        checkify.check(pred, message.replace("{", "{{").replace("}", "}}"))
