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
``jax.jit`` of it refuses to trace the checks). A public function called eagerly inside the block
(decorated with :func:`entry`) checks its values on the host, as outside it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading

from jax.experimental import checkify

_STATE = threading.local()


@contextlib.contextmanager
def traced_checks():
    """Within this block, nlis_jax's value checks on traced arrays emit ``checkify.check``.

    The state is read while nlis_jax's own ``jax.jit`` functions trace (a user's model with a traced
    ``bounded_swish`` parameter, say), and is not part of their cache keys: entering and leaving the
    block therefore clears those functions' caches (:func:`_clear_library_caches`), so that a program
    traced with checks is never reused without them (``checkify`` refuses it) nor one traced without
    them inside the block (the checks would be skipped silently). Turning the checks on or off costs a
    retrace of the library's programs, not of the user's.
    """
    with _checks_on(True):
        yield


@contextlib.contextmanager
def _checks_on(on: bool):
    """The checks' state set to ``on`` on this thread for the block, the library's program caches cleared
    on entering and on leaving when that changes the state (:func:`traced_checks`, :func:`suspended`)."""
    previous = enabled()
    if previous != on:
        _clear_library_caches()
    _STATE.on = on
    try:
        yield
    finally:
        _STATE.on = previous
        if previous != on:
            _clear_library_caches()


def _clear_library_caches() -> None:
    """Clear the caches of every module-level ``jax.jit`` function of nlis_jax's loaded modules."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "nlis_jax" or name.startswith("nlis_jax.")):
            continue
        for obj in list(vars(module).values()):
            clear = getattr(obj, "clear_cache", None)
            if callable(clear) and callable(getattr(obj, "lower", None)):  # a jax.jit function
                clear()


@contextlib.contextmanager
def suspended():
    """The checks off on this thread while a library function called eagerly compiles and runs its own
    programs: no user's ``checkify`` wraps those, so a traced check there could only fail ("Cannot
    abstractly evaluate a checkify.check which was not functionalized"); their values are checked on
    the host instead. Inside :func:`traced_checks` the library's program caches are cleared on entering
    (a program traced with checks under a ``checkify`` cannot run eagerly) and on leaving (one traced
    without them must not be reused by a ``checkify`` trace): eager calls inside the block recompile."""
    with _checks_on(False):
        yield


def entry(fn):
    """Decorate a public function: called eagerly (no transformation tracing) inside
    :func:`traced_checks`, it runs with the checks :func:`suspended`; under a trace, as it is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nlis_jax._checks import under_trace  # _checks imports this module

        if not enabled() or under_trace():
            return fn(*args, **kwargs)
        with suspended():
            return fn(*args, **kwargs)

    return wrapper


def enabled() -> bool:
    """True inside :func:`traced_checks` (on this thread)."""
    return getattr(_STATE, "on", False)


def check(pred, message: str) -> None:
    """``checkify.check(pred, message)`` inside :func:`traced_checks`; nothing otherwise."""
    if enabled():
        checkify.check(pred, message.replace("{", "{{").replace("}", "}}"))
