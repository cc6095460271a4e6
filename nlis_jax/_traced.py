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
import threading

import jax
from jax.experimental import checkify

_STATE = threading.local()


@contextlib.contextmanager
def traced_checks():
    """Within this block, nlis_jax's value checks on traced arrays emit ``checkify.check``.

    The state is per thread, and read while nlis_jax's own ``jax.jit`` functions trace (a user's model
    with a traced ``bounded_swish`` parameter, say). Each of those functions keeps one program cache per
    state (:func:`jit`), so a program traced with checks is never reused without them (``checkify``
    refuses it) nor one traced without them inside the block (the checks would be skipped silently), on
    this thread or another; turning the checks on costs one more trace of the library's programs, once.
    """
    with _checks_on(True):
        yield


@contextlib.contextmanager
def _checks_on(on: bool):
    """The checks' state set to ``on`` on this thread for the block (:func:`traced_checks`,
    :func:`suspended`), the previous state restored on leaving it."""
    previous = enabled()
    _STATE.on = on
    try:
        yield
    finally:
        _STATE.on = previous


class jit:  # noqa: N801 - used as jax.jit is
    """``jax.jit(fn, **kwargs)`` with one compiled-program cache per state of the checks.

    The library's module-level jitted functions use it instead of ``jax.jit``: the state of the checks
    (per thread) is read while they trace and is not part of ``jax.jit``'s cache key, so one shared
    cache let a call outside :func:`traced_checks` (on any thread) reuse a program traced with checks
    ("Cannot abstractly evaluate a checkify.check which was not functionalized") or a ``checkify`` trace
    reuse one traced without them (the checks skipped silently). The attributes of ``jax.jit``'s
    function (``lower``, ``trace``, ``eval_shape``) are those of the current state's copy;
    ``clear_cache`` clears both.
    """

    def __init__(self, fn, **kwargs):
        self._fn, self._kwargs = fn, kwargs
        self._jitted = {}
        self._lock = threading.Lock()
        functools.update_wrapper(self, fn)

    def _current(self):
        on = enabled()
        jitted = self._jitted.get(on)
        if jitted is None:
            with self._lock:
                jitted = self._jitted.get(on)
                if jitted is None:  # a function object of its own: jax caches traces by function
                    jitted = self._jitted[on] = jax.jit(_copy_of(self._fn), **self._kwargs)
        return jitted

    def __call__(self, *args, **kwargs):
        return self._current()(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_fn", "_kwargs", "_jitted", "_lock"):
            raise AttributeError(name)
        return getattr(self._current(), name)

    def clear_cache(self) -> None:
        for jitted in list(self._jitted.values()):
            jitted.clear_cache()

    def __copy__(self):  # a compiled function is shared, as jax.jit's is (its lock cannot be copied)
        return self

    def __deepcopy__(self, memo):
        return self


def _copy_of(fn):
    """A new function object calling ``fn`` (with its name, docstring and signature)."""

    @functools.wraps(fn)
    def copy(*args, **kwargs):
        return fn(*args, **kwargs)

    return copy


@contextlib.contextmanager
def suspended():
    """The checks off on this thread while a library function called eagerly compiles and runs its own
    programs: no user's ``checkify`` wraps those, so a traced check there could only fail ("Cannot
    abstractly evaluate a checkify.check which was not functionalized"); their values are checked on
    the host instead, by the programs of the state without checks (:func:`jit`)."""
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
