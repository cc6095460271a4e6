r"""Adaptive quadrature of a vector-valued integrand over ``t ∈ [0, 1]``, per example, with error estimates.

For each example ``x_i`` the integral ``I_i = ∫_0^1 g(params, t, x_i) dt`` (``g`` returns an array of any
fixed shape, e.g. ``(p,)`` or ``(k, p)``) is computed to a relative tolerance
``‖error_i‖ ≤ rtol · ‖I_i‖`` (Frobenius norms).

**Panel rule.** 16-node Gauss-Legendre on a panel ``[a, a + h]`` (exact to degree 31). Its error is
estimated from the decay of the discrete Legendre coefficients ``c_8 … c_15`` of the integrand on the
panel (null rules on the same 16 nodes, as in Berntsen & Espelid's estimators): with the pair norms
``e_1 = ‖(c_14, c_15)‖ … e_4 = ‖(c_8, c_9)‖`` and the decay rate per two degrees ``r = (e_1/e_4)^{1/3}``,
the error is ``h · e_1 · r^{8.5}`` (the geometric extrapolation of the coefficients to degree 32, the
first one the rule does not integrate) when ``r < 0.7``, and ``h · (e_1 + e_2 + e_3)`` otherwise (no
convergence visible). A Gauss-Kronrod pair estimates the error of its *lower* rule: ``|K15 − G7|`` exceeds
the true error of ``K15`` by orders of magnitude on smooth integrands, while the coefficient decay
estimates the error of the rule actually used. The coefficient norms are measured on a fixed
pseudo-random projection of the integrand onto ``PROBES`` directions, so the estimate costs
``PROBES`` dot products per node instead of one extra accumulator of the full integrand per coefficient.

**Refinement.** One pass evaluates the rule on ``[0, 1]`` for every example (chunked); an example is
accepted when its estimate is within tolerance and its ``check`` residual (for adjoints: the identity
``⟨f*, θ⟩ + f(0) = f(θ)``, an independent a-posteriori test) is within ``check_tol``. The others are
refined by bisection, depth first, per example (a ``lax.while_loop`` vmapped over a bucket of examples):
each step halves one panel and accepts a half whose estimate is at most ``tol · max(h, 1/64) / 2``
(``tol = rtol · ‖I_i‖``), so smooth pieces are accepted by the width share of their error and the panels
around a kink (a jump of the gradient, as in ReLU networks) are bisected until their error is a small
share of the tolerance. Called eagerly, the failing examples are gathered on the host into buckets
padded to powers of two (one compiled program per octave of sizes, whatever the values), so the common
case costs the single pass; traced under a user's ``jax.jit`` they are compacted on the device
(``jnp.nonzero`` with a static size) and refined group by group in a ``lax.while_loop``.
A budget of ``max_panels`` panels per example bounds the work; examples left above the tolerance raise a
:class:`QuadratureWarning`.

**Roundoff.** Where the integrand's own values carry rounding noise above the tolerance (float32 gradients
of saturated activations: ``1 − tanh²`` has an absolute error of about one ulp), no estimate falls below
the tolerance and plain bisection would spend the whole budget on noise. As in QUADPACK, a branch whose
estimate stops falling under bisection (:data:`STALLS` times) while it is within
:data:`NOISE_ULPS` ulps of the integrand's size (on the panel, or its mean over the path where that is
larger: on a saturated panel the noise is ulps of 1, not of the tiny integrand) is accepted at the
rounding level; the example's
``roundoff`` flag is set, and its error counts what the last bisection changed in the integral (the
noise's effect on the result, not its amplitude). An unresolved oscillation larger than that noise level is
never taken for noise: its estimate is of the integrand's own size. One smaller than it (below about
1e-4 of the mean size in float32, on a stretch of the path where the integrand itself is tiny) may be:
the example is then flagged ``roundoff`` and its error counts what bisecting it changed, so it is
reported (measured: an oscillation of amplitude 2.5e-5·‖I‖ was left at 1.4e-6 against an estimate of
2.1e-6, not converged, where bisecting on reached 6e-8 in 109 panels).

**Reliability.** Estimates are extrapolations, not bounds. With the former 4 probes, the extrapolation
was measured optimistic by up to ~60× on a few examples of saturating models (tanh, softplus, GELU with
inputs scaled by 5 to 25); with :data:`PROBES` = 16 no accepted example of the saturating models of
``bench_quadrature.py`` ended above ``rtol``, while ``sin(<θ, x>)`` with arguments up to 60 still left a few
at up to 2.8 ``rtol``
(benchmarks/README.md (e)). Pass a smaller ``rtol`` where that matters. The a-posteriori check
(``f(θ) − f(0) = <f*(θ), θ>``) cannot see an error in a component whose parameter is 0 (a zero-initialised
bias), and no estimate sees a feature narrower than the nodes' spacing: a float32 bump of width 0.01 at
``t = 0.75`` in such a component's gradient came back converged at 4.4e-4 (435 ``rtol``; thirty-third
session's review, the same before and after its changes). For such models pass a fixed rule with enough
nodes (``num_nodes``) or compare two rules.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nlis_jax import _traced as traced_checks_state
from nlis_jax._checks import fetch, flushes_subnormals, is_concrete, report_nonfinite, under_trace
from nlis_jax._precision import highest_precision
from nlis_jax._types import Array, PyTree

#: Nodes of the Gauss-Legendre panel rule.
PANEL_NODES = 16
#: Random directions on which the Legendre coefficients of the integrand are measured.
PROBES = 16
#: Decay rate (per two degrees) above which the coefficients are taken as not converging.
RATE_CRITICAL = 0.7
#: Share of the tolerance a kink panel may keep: panels are accepted below ``tol · max(h, KINK_SHARE) / 2``.
KINK_SHARE = 1.0 / 64
#: Default panels per example (each ``PANEL_NODES`` integrand evaluations).
MAX_PANELS = 2048
#: Refinement while the check fails but the estimate passes: each round caps the panels' width at
#: ``1/CHECK_WIDTH_STEP`` of the last round's cap (1, then 1/16, then 1/256), down to ``CHECK_WIDTH_MIN``.
CHECK_WIDTH_STEP = 16.0
CHECK_WIDTH_MIN = 1.0 / 256
#: Roundoff detection: a bisection "stalls" when the halves' summed estimate is above this share of their
#: parent's estimate (smooth pieces fall by orders of magnitude, a kink's by about half) ...
STALL_RATIO = 0.5
#: ... while the panel's estimate per unit width is at most this many ulps of the integrand's size on the
#: panel, or of its mean size over the path if larger (rounding noise, not an unresolved feature: an
#: oscillation the rule cannot resolve has an estimate of the integrand's own size, and the error counts
#: what bisecting it changed) ...
NOISE_ULPS = 1024
#: ... and a branch that has stalled this many times is accepted as at the rounding level.
STALLS = 2
_PROBE_SEED = 0x5EED
#: On CPUs, the first pass vectorises over batches of at most this many integrand elements (examples
#: times the integrand's size): a batch's gradients then stay in cache while the rule accumulates them and
#: the error estimate projects them, instead of being read back from memory once more per node (the
#: measurements are in benchmarks/README.md). Other platforms take whole memory chunks.
CACHE_ELEMENTS = 1 << 17
#: A refinement bucket of at least this many integrand elements (examples times the integrand's size) takes
#: its first bisection outside the bisection loop: there, on CPUs, XLA runs it on all cores, inside the loop
#: it does not (measured on 2 cores, 1,024 examples of 321 elements: 40 ms peeled against 55 ms in the
#: loop, the same on one core). Smaller buckets keep one copy of the bisection step, which halves the
#: refinement's program and cuts its compilation by 0.4–0.7 s (benchmarks/README.md (e)).
PEEL_ELEMENTS = 1 << 17


class QuadratureWarning(RuntimeWarning):
    """Adaptive quadrature missed its tolerance for some examples; the message counts each cause.

    The causes: the panel budget (``max_panels``) or the bisection depth ran out; the rounding noise of
    the integrand's own values was reached (the dtype's limit there); the error estimates met ``rtol``
    but the identity check ``⟨f*, θ⟩ + f(0) = f(θ)`` did not (a kink or step narrower than the panels,
    or cancellation); or the integral or the check residual is NaN or Inf (also under a user's ``jit``).
    :class:`QuadratureInfo` gives the per-example figures."""


class QuadratureInfo(NamedTuple):
    """What the adaptive quadrature achieved, per example.

    Attributes:
      error: ``(n,)`` estimated error relative to ``‖I_i‖`` (Frobenius norm over the integrand's shape).
      residual: ``(n,)`` the ``check`` residual (for adjoints: the relative residual of the identity
        ``⟨f*, θ⟩ + f(0) = f(θ)``), or zeros without a check.
      panels: ``(n,)`` int32 panels evaluated (the first pass: ``PANEL_NODES`` integrand evaluations;
        each refined panel: ``PANEL_NODES + 2``, its ends included).
      converged: ``(n,)`` bool, ``error <= rtol`` and ``residual <= check_tol``.
      roundoff: ``(n,)`` bool, refinement stopped where the estimate no longer fell under bisection and
        was at the rounding level of the integrand's values (the integrand's own float noise, typically
        float32 gradients of saturated activations): ``error`` is then the accuracy the dtype allows.
        False when a limit (``max_panels``, the bisection depth) also stopped a panel short of its
        tolerance: the limit is then what the example missed by.
    """

    error: Array
    residual: Array
    panels: Array
    converged: Array
    roundoff: Array


def default_rtol(dtype) -> float:
    """``1e-12`` in float64, ``1e-6`` in float32 (``1e-3`` below)."""
    eps = float(jnp.finfo(dtype).eps)
    return 1e-12 if eps < 1e-10 else (1e-6 if eps < 1e-5 else 1e-3)


def max_depth(dtype) -> int:
    """Deepest bisection level: panels no narrower than ``2^-depth`` (about 16 ulps of ``t = 1``)."""
    return int(-math.log2(float(jnp.finfo(dtype).eps))) - 4


@functools.lru_cache(maxsize=4)
def _rule_f64(endpoints: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Nodes and weights on ``[0, 1]``, the functionals of the 8 highest Legendre coefficients of the
    integrand's interpolant on the nodes, and the exponent of the extrapolation to degree 32."""
    x, w = np.polynomial.legendre.leggauss(PANEL_NODES)
    if endpoints:  # the panel's ends too (weight 0): no jump can hide between a node and an end
        x, w = np.concatenate([[-1.0], x, [1.0]]), np.concatenate([[0.0], w, [0.0]])
    m = x.size
    vandermonde = np.polynomial.legendre.legvander(x, m - 1)  # (nodes, degrees)
    coef = np.linalg.solve(vandermonde, np.eye(m))[m - 8 :]  # rows: degrees m-8 .. m-1
    return (x + 1) / 2, w / 2, coef, (2 * PANEL_NODES - (m - 1)) / 2


def _rule(dtype, endpoints: bool):
    t, w, coef, exponent = _rule_f64(endpoints)
    return jnp.asarray(t, dtype), jnp.asarray(w, dtype), jnp.asarray(coef, dtype), exponent


def probes(size: int, dtype) -> Array:
    """The fixed pseudo-random directions ``(size, PROBES)`` of the error estimate."""
    return jax.random.normal(jax.random.key(_PROBE_SEED), (size, PROBES), dtype)


def panel_error(coefs: Array, h: Array, exponent: float = 8.5) -> Array:
    """Error estimate of a panel of width ``h`` from the 8 highest projected Legendre coefficients
    (shape ``(8, PROBES)``, lowest degree first), extrapolated ``2 · exponent`` degrees."""
    c = _rms(coefs, axis=-1)  # ‖c_j‖ estimated from the probes
    pairs = jnp.sqrt(jnp.square(c[0::2]) + jnp.square(c[1::2]))[::-1]  # e_1 (degrees 14, 15) first
    e1, e2, e3, e4 = pairs[0], pairs[1], pairs[2], pairs[3]
    tiny = jnp.finfo(coefs.dtype).tiny
    rate = jnp.cbrt(e1 / jnp.maximum(e4, tiny))
    asymptotic = e1 * jnp.minimum(rate, 1.0) ** exponent
    return h * jnp.where(rate < RATE_CRITICAL, asymptotic, e1 + e2 + e3)


def panel(g: Callable, params: PyTree, x: PyTree, a, h, directions: Array, *, endpoints: bool = False):
    """``(∫_a^{a+h} g dt, error estimate, size)`` by 16-node Gauss-Legendre, the nodes in a ``lax.scan``;
    ``size`` estimates ``max_t ‖g(t)‖`` over the nodes (from the probes); ``endpoints``: also sample ``g``
    at ``a`` and ``a + h`` for the estimate."""
    nodes, weights, coef, exponent = _rule(directions.dtype, endpoints)
    shape = jax.eval_shape(g, params, a, x)

    def body(acc, tw):
        t, w = tw
        value = g(params, a + h * t, x)
        # an end sample (weight 0) that is NaN, ∇f undefined at that point only (∇‖θ‖ at θ = 0), stays out
        # of the integral (0·NaN would not); an infinite one still makes it NaN: a singular gradient
        undefined = jnp.isnan(value)
        return acc + jnp.where((w != 0) | ~undefined, w * value, 0), (
            value.reshape(-1) @ directions,
            jnp.any(undefined),
        )

    acc, (projected, undefined) = lax.scan(body, jnp.zeros(shape.shape, shape.dtype), (nodes, weights))
    if endpoints:  # an undefined end sample: the estimate takes its neighbouring node's value instead
        for end, near in ((0, 1), (-1, -2)):
            projected = projected.at[end].set(jnp.where(undefined[end], projected[near], projected[end]))
    # the Legendre coefficients of values near the dtype's largest (|∇f| ~ 1e37 in float32) overflow: taken
    # of the values scaled by a power of two near their largest magnitude (exact), the estimate scaled back
    # (capped at 2^(maxexp−2): XLA may divide by multiplying with 1/scale, which must stay a normal number)
    _, e = jnp.frexp(_square_scale(projected))
    scale = jnp.ldexp(jnp.ones((), projected.dtype), jnp.minimum(e, jnp.finfo(projected.dtype).maxexp - 2))
    error = panel_error(coef @ (projected / scale), h, exponent) * scale
    return h * acc, error, jnp.max(_rms(projected, axis=-1))


class _Dfs(NamedTuple):
    starts: Array  # (capacity,) left ends of the panels still to bisect
    widths: Array  # (capacity,)
    errors: Array  # (capacity,) their error estimates
    integrals: Array  # (capacity, PROBES) their integrals, projected on the probes
    stalls: Array  # (capacity,) int32 bisections on their branch whose estimate did not fall
    top: Array  # number of panels on the stack
    acc: Array  # accepted integral
    err: Array  # accepted error estimate
    count: Array  # panels evaluated
    roundoff: Array  # bool: a panel was accepted above its share of tol, at the integrand's rounding level
    forced: Array  # bool: a panel was accepted above its share of tol by the budget, depth or stack limit


def _refine_one(
    g, params, x, tol, first, directions, width_max, *, max_panels: int, depth: int, peel: bool
) -> _Dfs:
    """Depth-first bisection of ``[0, 1]`` for one example (``first``: the first pass's error estimate and
    integral): each step halves the panel on top of the stack, accepts the halves within their share of
    ``tol`` and no wider than ``width_max`` (1: any width) and pushes the others; ``peel``: the first step
    is taken outside the loop (:data:`PEEL_ELEMENTS`).

    Roundoff: a half is also accepted when its branch has stalled :data:`STALLS` times (the
    halves' summed estimate above :data:`STALL_RATIO` times their parent's) while its estimate per unit
    width is within :data:`NOISE_ULPS` ulps of the integrand's size: bisecting further only measures the
    rounding noise of the integrand again (as QUADPACK's roundoff detection), and ``roundoff`` is set.
    Such a half adds to the error what the bisection changed (half the projected ``|I_L + I_R − I_P|``, at
    most its own estimate): the estimate itself measures the noise's amplitude, not its integral."""
    dtype = directions.dtype
    capacity = depth + 2
    shape = jax.eval_shape(g, params, jnp.zeros((), dtype), x)
    zeros = jnp.zeros((capacity,), dtype)
    err0, value0 = first
    state = _Dfs(
        zeros,
        zeros.at[0].set(1.0),
        zeros.at[0].set(err0),
        jnp.zeros((capacity, PROBES), dtype).at[0].set(value0.reshape(-1) @ directions),
        jnp.zeros((capacity,), jnp.int32),
        jnp.ones((), jnp.int32),
        jnp.zeros(shape.shape, shape.dtype),
        jnp.zeros((), dtype),
        jnp.ones((), jnp.int32),  # the first pass's panel
        jnp.zeros((), bool),
        jnp.zeros((), bool),
    )
    h_min = jnp.asarray(2.0**-depth, dtype)
    noise = NOISE_ULPS * jnp.finfo(dtype).eps
    # the integrand's mean size over [0, 1] (|I|, projected as sizes are): rounding noise is at least at
    # that level on every panel, also where the integrand itself is far smaller (1 − tanh² rounds in
    # absolute terms: its noise on a saturated panel is ulps of 1, not of the tiny value)
    level = _rms(value0.reshape(-1) @ directions)

    def body(s: _Dfs) -> _Dfs:
        top = s.top - 1
        a, half = s.starts[top], s.widths[top] / 2
        halves = jnp.stack([a, a + half])
        one_half = functools.partial(panel, g, params, x, h=half, directions=directions, endpoints=True)
        values, errors, sizes = jax.vmap(one_half)(halves)
        count = s.count + 2
        # final once pushing the halves could overrun the budget: every panel left on the stack (``top``
        # below, up to 2 pushed) costs at least one more bisection (2 panels), so the total stays
        # within ``max_panels``
        final = (half <= h_min) | (count + 2 * (top + 2) > max_panels) | (top + 2 > capacity)
        within = (errors <= 0.5 * tol * jnp.maximum(half, KINK_SHARE)) & (half <= width_max)
        stalls = s.stalls[top] + (jnp.sum(errors) > STALL_RATIO * s.errors[top]).astype(jnp.int32)
        rounding = (stalls >= STALLS) & (errors <= half * noise * jnp.maximum(sizes, level)) & ~within
        ok = within | rounding | final
        acc = s.acc + jnp.tensordot(ok.astype(values.dtype), values, axes=1)
        integrals = values.reshape(2, -1) @ directions
        change = _rms(integrals[0] + integrals[1] - s.integrals[top])
        err = s.err + jnp.sum(jnp.where(ok, jnp.where(rounding, jnp.minimum(errors, change / 2), errors), 0))
        stack = (s.starts, s.widths, s.errors, s.integrals, s.stalls)
        for j in (1, 0):  # push the right half first: the left one is bisected next
            entry = (halves[j], half, errors[j], integrals[j], stalls)
            pairs = zip(stack, entry, strict=True)
            stack = tuple(a.at[top].set(jnp.where(ok[j], a[top], e)) for a, e in pairs)
            top = top + (~ok[j]).astype(top.dtype)
        forced = s.forced | jnp.any(final & ~within & ~rounding)
        return _Dfs(*stack, top, acc, err, count, s.roundoff | jnp.any(rounding), forced)

    # Peeled, the first bisection runs outside the loop (most refined examples are done after it).
    return lax.while_loop(lambda s: s.top > 0, body, body(state) if peel else state)


def _map_examples(fn: Callable, data: PyTree, n: int, chunk: int):
    """``vmap(fn)(data)`` over the leading axis, ``chunk`` examples at a time."""
    if chunk >= n:
        return jax.vmap(fn)(data)
    return lax.map(fn, data, batch_size=chunk)


def _norms(value: Array) -> Array:
    """Frobenius norm of each example's integral, scaled by its largest entry (no overflow when squared)."""
    flat = value.reshape(value.shape[0], -1)
    top = _square_scale(flat, axis=1)
    return top[:, 0] * jnp.sqrt(jnp.sum(jnp.square(flat / top), axis=1))


def _rms(x: Array, axis: int | None = None) -> Array:
    """Root mean square over ``axis`` (all axes for ``None``), without overflow or underflow when squared:
    from ``PROBES`` projections on standard normal directions, an estimate of the projected vector's norm."""
    top = _square_scale(x)
    return top * jnp.sqrt(jnp.mean(jnp.square(x / top), axis=axis))


def _square_scale(x: Array, axis: int | None = None) -> Array:
    """``max |x|`` over ``axis`` (kept as a size-1 axis; a scalar for ``None``), 1 where that is zero or not
    finite: divide by it before squaring so that sums of squares neither overflow nor underflow."""
    top = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None)
    return jnp.where((top > 0) & jnp.isfinite(top), top, 1)


def _relative(err: Array, norm: Array) -> Array:
    """``err_i / ‖I_i‖`` (0 where the error is 0)."""
    return jnp.where(err == 0, 0, err / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))


class _State(NamedTuple):
    value: Array  # (n, ...) integrals
    error: Array  # (n,) estimated error relative to ‖value_i‖
    residual: Array  # (n,) check residual
    panels: Array  # (n,) int32
    norm: Array  # (n,) ‖value_i‖
    roundoff: Array  # (n,) bool, refinement stopped at the integrand's rounding level


def _tiny(norm: Array) -> Array:
    """``0 < ‖I_i‖ < tiny/eps²``: an integral so small that its absolute error estimates and tolerance
    (``rtol·‖I_i‖``) are subnormal, which the device flushes to 0 (an error read as 0: converged); never
    for float16 (its subnormal numbers are normal in float32, where it is computed). The
    first pass leaves such examples unconverged, and the refinement runs on the integrand scaled by
    :func:`_unit_exponent` (exact: a power of two)."""
    finfo = jnp.finfo(norm.dtype)
    if not flushes_subnormals(norm.dtype):  # float16, computed in float32: nothing of it flushes
        return jnp.zeros(norm.shape, bool)
    return (norm > 0) & (norm < finfo.tiny / finfo.eps**2)


def _unit_exponent(norm: Array) -> Array:
    """``e`` with ``2^-e·‖I_i‖`` in ``[0.5, 1)`` for a :func:`_tiny` integral, else 0 (int32)."""
    return jnp.where(_tiny(norm), jnp.frexp(norm)[1], 0).astype(jnp.int32)


def _first_pass(g, check, params, data, directions, *, n: int, chunk: int) -> _State:
    dtype = directions.dtype

    def one(x):
        value, err, _ = panel(g, params, x, jnp.zeros((), dtype), jnp.ones((), dtype), directions)
        residual = jnp.zeros((), dtype) if check is None else check(params, value, x).astype(dtype)
        return value, err, residual

    value, err, residual = _map_examples(one, data, n, chunk)
    norm = _norms(value)
    ones = jnp.ones((n,), jnp.int32)
    error = jnp.where(_tiny(norm), jnp.inf, _relative(err, norm))  # its estimate may have flushed to 0
    return _State(value, error, residual, ones, norm, jnp.zeros((n,), bool))


def _converged(state: _State, rtol, check_tol) -> Array:
    """Within both tolerances, with a finite integral: a NaN compares false, so it never converges."""
    return (state.error <= rtol) & (state.residual <= check_tol) & _finite(state)


def _finite(state: _State) -> Array:
    """Per example: the integral (its norm) and the check residual are finite (numpy or jax arrays)."""
    return (state.norm < math.inf) & (abs(state.residual) < math.inf)


def _nonfinite_message(count: str) -> str:
    """Default message of :func:`integrate` for examples whose integral or check residual is NaN or Inf."""
    return (
        f"the integral is NaN or Inf for {count} examples: the integrand is not finite on [0, 1] (or its "
        f"integral overflows)."
    )


def _raise_nonfinite(state: _State, nonfinite: Callable[[str], str] | None, xp=np) -> None:
    """``ValueError`` counting the examples whose integral or residual is not finite, from a host state
    (``xp=np``) or a replicated device count (``xp=jnp``: global arrays of several processes)."""
    bad = xp.count_nonzero(~_finite(state))
    report_nonfinite(bad, state.norm.shape[0], nonfinite or _nonfinite_message)


def _refine_bucket(
    g, check, params, data, first, idx, rtol, check_tol, directions, *, max_panels, depth
) -> _State:
    """Refine the examples ``idx`` (``n`` marks padding) of the first pass's ``(norm, error, value)`` to
    ``rtol · norm[idx]``; the bucket's results."""
    norm, error, value = first
    safe = jnp.minimum(idx, norm.shape[0] - 1)
    xs = jax.tree.map(lambda a: a[safe], data)

    peel = idx.shape[0] * directions.shape[0] >= PEEL_ELEMENTS

    def one(x, norm_i, first_i):
        kw = dict(max_panels=max_panels, depth=depth, peel=peel)
        dtype = directions.dtype
        shape = jax.eval_shape(g, params, jnp.zeros((), dtype), x)
        # a tiny integral is refined at unit scale (exact powers of two), where nothing flushes to 0
        # (2^-e and 2^e are normal numbers: ‖I_i‖ is, so e ≥ minexp)
        e = _unit_exponent(norm_i)
        up, down = (jnp.ldexp(jnp.ones((), dtype), k) for k in (-e, e))
        scaled = lambda p, t, xx: g(p, t, xx) * up.astype(shape.dtype)
        err0, value0 = first_i
        first_i = (err0 * up, value0 * up.astype(value0.dtype))
        tol_i = rtol * (norm_i * up)

        def run(width):
            s = _refine_one(scaled, params, x, tol_i, first_i, directions, width, **kw)
            s = s._replace(acc=s.acc * down.astype(s.acc.dtype))  # the error stays scaled, relative to
            # the scaled norm
            residual = jnp.zeros_like(s.err) if check is None else check(params, s.acc, x).astype(dtype)
            return s, residual

        # Refinement, then again with every panel at most 1/16 as wide while the estimate meets tol_i but
        # the check does not (a feature between the nodes, which no estimate sees): one loop, so the
        # refinement is traced once; under vmap its rounds run only while an example needs them.
        def again(carry):  # carry: the last round's (state, residual) and the next round's width cap
            width = carry[2]
            return (*run(width), width / CHECK_WIDTH_STEP)

        def needs(carry):  # the first round (cap 1), then while the check alone fails
            s, residual, width = carry
            missed = (s.err <= tol_i) & ~(residual <= check_tol) & jnp.isfinite(residual)
            return (width == 1) | (missed & (width >= CHECK_WIDTH_MIN))

        blank = jax.tree.map(jnp.zeros_like, jax.eval_shape(run, jnp.ones((), dtype)))
        s, residual, _ = lax.while_loop(needs, again, (*blank, jnp.ones((), dtype)))
        relative = _relative(s.err, _norms((s.acc * up.astype(s.acc.dtype))[None])[0])  # at its scale
        # stopped at the rounding noise only when no limit stopped it too (the limit is then the cause)
        return s.acc, relative, residual, s.count, s.roundoff & ~s.forced

    err0 = error[safe] * norm[safe]  # the first pass's absolute estimate (Inf for a tiny integral)
    value, relative, residual, count, roundoff = jax.vmap(one)(xs, norm[safe], (err0, value[safe]))
    return _State(value, relative, residual, count, _norms(value), roundoff)


def _scatter(state: _State, idx, bucket: _State) -> _State:
    return jax.tree.map(lambda a, b: a.at[idx].set(b, mode="drop"), state, bucket)


_scatter_jit = traced_checks_state.jit(_scatter, donate_argnums=0)


@functools.partial(traced_checks_state.jit, static_argnames=("g", "check", "chunk"))
@highest_precision
def _first_pass_jit(g, check, params, data, *, chunk):
    directions = _directions(g, params, data)
    return _first_pass(g, check, params, data, directions, n=_num_examples(data), chunk=chunk)


@functools.partial(traced_checks_state.jit, static_argnames=("g", "check", "max_panels", "depth"))
@highest_precision
def _refine_jit(g, check, params, data, first, idx, rtol, check_tol, *, max_panels, depth):
    directions = _directions(g, params, data)
    kw = dict(max_panels=max_panels, depth=depth)
    return _refine_bucket(g, check, params, data, first, idx, rtol, check_tol, directions, **kw)


def _traced(g, check, params, data, rtol, check_tol, *, chunk, max_panels, depth, bucket):
    """The whole scheme under tracing: first pass, then device-compacted groups of ``bucket`` examples."""
    directions = _directions(g, params, data)
    n = _num_examples(data)
    state = _first_pass(g, check, params, data, directions, n=n, chunk=chunk)
    remaining = ~_converged(state, rtol, check_tol) & _finite(state)  # refining a NaN stays NaN

    def body(carry):
        state, remaining = carry
        idx = jnp.nonzero(remaining, size=bucket, fill_value=n)[0]
        kw = dict(max_panels=max_panels, depth=depth)
        first = (state.norm, state.error, state.value)
        found = _refine_bucket(g, check, params, data, first, idx, rtol, check_tol, directions, **kw)
        return _scatter(state, idx, found), remaining.at[idx].set(False, mode="drop")

    return lax.while_loop(lambda c: jnp.any(c[1]), body, (state, remaining))[0]


#: :func:`_traced` compiled on its own, for global arrays that span several processes.
_traced_jit = traced_checks_state.jit(
    _traced, static_argnames=("g", "check", "chunk", "max_panels", "depth", "bucket")
)


def _num_examples(data: PyTree) -> int:
    return jax.tree.leaves(data)[0].shape[0]


def _time_dtype(params, data):
    """The floating dtype of ``params`` (else of ``data``): the dtype of ``t``."""
    for tree in (params, data):
        leaves = [a for a in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
        if leaves:
            return jnp.result_type(*leaves)
    return jnp.result_type(float)


def _output(g, params, data) -> jax.ShapeDtypeStruct:
    """``g``'s output for one example, from shapes alone (nothing is dispatched, not even ``data[0]``)."""
    t = jax.ShapeDtypeStruct((), _time_dtype(params, data))
    return jax.eval_shape(g, params, t, example_shapes(data))


def first_example(data: PyTree) -> PyTree:
    """``data[0]``: the first example of every leaf."""
    return jax.tree.map(lambda a: a[0], data)


def example_shapes(data: PyTree) -> PyTree:
    """``jax.eval_shape(first_example, data)``: ``data[0]`` as ``ShapeDtypeStruct`` leaves, from each
    leaf's type (``jax.typeof``: no slice dispatched, and no trace, which cost ~0.1 ms a call)."""

    def one(leaf):
        aval = jax.typeof(leaf)
        return jax.ShapeDtypeStruct(aval.shape[1:], aval.dtype, weak_type=aval.weak_type)

    return jax.tree.map(one, data)


def _directions(g, params, data) -> Array:
    out = _output(g, params, data)
    return probes(math.prod(out.shape), out.dtype)


def _next_pow2(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def _pass_batch(chunk: int, size: int) -> int:
    """Examples per vectorised batch of the first pass: ``chunk``, on CPUs at most :data:`CACHE_ELEMENTS`."""
    if jax.default_backend() != "cpu":
        return chunk
    return max(1, min(chunk, CACHE_ELEMENTS // max(1, size)))


def _bucket_size(m: int, limit: int) -> int:
    """Padded size of a bucket of ``m`` examples: the power of two from 8 up that holds them, at most
    ``max(m, limit)``. One program per octave: calls whose counts of refined examples differ (new
    params, new data) reuse it. Only the last bucket of a call is padded (the others hold ``limit``),
    and its padding at most doubles that bucket's work; finer sizes (eighths of an octave) compiled a
    new program (1–2 s) for most new counts (``benchmarks/README.md``, (e))."""
    return min(max(8, _next_pow2(m)), max(m, limit))


def _linearizing(leaf) -> bool:
    """Whether ``leaf`` is (or wraps, through vmap or jvp tracers) a tracer of reverse-mode
    differentiation: ``jax.grad``, ``jax.vjp``, ``jax.jacrev`` and ``jax.linearize`` trace with
    ``LinearizeTracer`` (jax 0.10), forward mode (``jax.jvp``, ``jax.jacfwd``) with ``JVPTracer``."""
    from jax._src.interpreters import ad  # private: where a jax release moves it, the check is skipped

    kind = getattr(ad, "LinearizeTracer", None)
    for _ in range(16):
        if kind is not None and isinstance(leaf, kind):
            return True
        inner = getattr(leaf, "val", None) if not isinstance(leaf, ad.JVPTracer) else leaf.primal
        if not isinstance(inner, jax.core.Tracer):
            return False
        leaf = inner
    return False


#: The error for the adaptive rule under ``checkify`` (inside ``nlis_jax.traced_checks()``).
CHECKIFY_ADAPTIVE = (
    "checkify cannot transform the adaptive rule (num_nodes=None, the default of adjoint, dual_matrix, the "
    "streaming and label-free scores): its refinement is a lax.while_loop vmapped over the examples, which "
    "checkify refuses. Pass num_nodes=q (a fixed Gauss-Legendre rule, e.g. 16 after checking it against "
    "the adaptive default) inside nlis_jax.traced_checks()."
)


def check_not_reverse_mode(leaves) -> None:
    """``ValueError`` under reverse-mode differentiation, which cannot go through the refinement's
    ``lax.while_loop``: jax's own error ("Reverse-mode differentiation does not work for lax.while_loop")
    came after the trace and did not say that a fixed rule is differentiable both ways."""
    if any(_linearizing(leaf) for leaf in leaves):
        raise ValueError(
            "reverse-mode differentiation (jax.grad, jax.vjp, jax.jacrev) cannot go through the adaptive "
            "rule, whose refinement is a lax.while_loop: pass num_nodes=q (a fixed Gauss-Legendre rule, "
            "differentiable both ways, e.g. 16 after checking it against the adaptive default), or "
            "differentiate in forward mode (jax.jvp, jax.jacfwd), which the adaptive rule supports."
        )


def integrate(
    g: Callable,
    params: PyTree,
    data: PyTree,
    *,
    rtol: float | None = None,
    max_panels: int = MAX_PANELS,
    chunk_size: int | None = None,
    check: Callable | None = None,
    check_tol: float | None = None,
    nonfinite: Callable[[str], str] | None = None,
) -> tuple[Array, QuadratureInfo]:
    r"""``I_i = ∫_0^1 g(params, t, x_i) dt`` for every example, adaptively, with per-example error estimates.

    Args:
      g: ``g(params, t, x) -> array`` (any fixed shape) for ONE example ``x`` and a scalar ``t``; a
        hashable, stable object (a module-level function), as it keys the compilation cache.
      params: pytree passed to ``g`` unchanged (may be traced).
      data: pytree of arrays with a shared leading example axis ``n``.
      rtol: relative tolerance on ``‖error_i‖ / ‖I_i‖`` (default :func:`default_rtol` of ``g``'s dtype).
      max_panels: budget of panels per example (each ``PANEL_NODES`` evaluations of ``g``).
      chunk_size: examples per vectorised batch (memory); also the largest refinement bucket.
      check: optional ``check(params, I, x) -> scalar`` a-posteriori residual, e.g. a relative identity
        residual; an example converges only when it is at most ``check_tol`` (default ``rtol``).
      nonfinite: ``nonfinite(count) -> message`` (``count`` e.g. ``"3 of 12"``) of the ``ValueError`` raised,
        eagerly, for examples whose integral or check residual is NaN or Inf: after the first pass (before
        any refinement, which would bisect a NaN to the budget) and after the refinement. Traced they are
        not refined and are reported by the :class:`QuadratureWarning` (``checkify`` cannot wrap this
        scheme: it refuses a vmapped ``lax.while_loop``).

    Returns:
      ``(I, info)``: ``I`` of shape ``(n,) + shape(g)`` and a :class:`QuadratureInfo`. Examples that miss
      the tolerance (non-finite ones included, under tracing) raise a :class:`QuadratureWarning` (at run
      time when traced).

    Raises:
      ValueError: called eagerly, when an example's integral or check residual is NaN or Inf.
    """
    n = _num_examples(data)
    out = _output(g, params, data)
    dtype = out.dtype
    rtol = default_rtol(dtype) if rtol is None else float(rtol)
    check_tol = rtol if check_tol is None else check_tol
    chunk = n if chunk_size is None else min(int(chunk_size), n)
    bucket_limit = 1 << (chunk.bit_length() - 1)  # largest power of two <= chunk
    pass_chunk = _pass_batch(chunk, math.prod(out.shape))
    depth = max_depth(dtype)
    narrow = jnp.dtype(dtype) != jnp.float64  # for the warning: kinks stop at the depth limit
    # numpy scalars: arguments of the programs below, not operations dispatched on their own
    rtol_arr, check_tol_arr = np.asarray(rtol, dtype), np.asarray(check_tol, dtype)
    leaves = jax.tree.leaves((params, data))
    check_not_reverse_mode(leaves)
    # concrete inputs closed over inside a user's jit still give traced results: the traced scheme
    concrete = not under_trace() and all(is_concrete(leaf) for leaf in leaves)
    spans_processes = concrete and not all(getattr(leaf, "is_fully_addressable", True) for leaf in leaves)
    if spans_processes or not concrete:
        # On the device: under a user's jit, or for global arrays of several processes, whose values
        # this process cannot fetch (the host-driven compaction below needs them).
        bucket = min(bucket_limit, max(8, _next_pow2(n) // 16))
        kw = dict(chunk=pass_chunk, max_panels=max_panels, depth=depth, bucket=bucket)
        if traced_checks_state.enabled():  # checkify's own error suggested moving a vmap the user never wrote
            raise ValueError(CHECKIFY_ADAPTIVE)
        traced = _traced_jit if spans_processes else _traced
        if not spans_processes:  # numpy leaves closed over in a user's jit: indexed by traced indices
            params, data = jax.tree.map(jnp.asarray, (params, data))
        state = traced(g, check, params, data, rtol_arr, check_tol_arr, **kw)
        if spans_processes:  # concrete: a replicated count, which every process can read
            _raise_nonfinite(state, nonfinite, jnp)
        conv = _converged(state, rtol_arr, check_tol_arr)
        warn = functools.partial(_warn, rtol=rtol, check_tol=check_tol, max_panels=max_panels, narrow=narrow)
        if spans_processes:  # replicated scalar summaries, which every process can read
            _warn_global(state, conv, warn)
        else:
            # the library's own traced callers (no ``nonfinite``: the streaming passes) report non-finite
            # rows themselves, from their inputs' checks; a user's jit gets them in the warning
            # reduced on the devices first: the per-example vectors of a row-sharded input went to
            # device 0 for the callback (an all-gather per chunk of the streaming passes)
            summary = _missed_summary(
                state.error, state.residual, conv, state.roundoff, _finite(state), jnp, nonfinite is not None
            )
            # the callback gets jax arrays: numpy copies, not a read back per scalar
            jax.debug.callback(lambda s: warn(_as_numbers(jax.tree.map(np.asarray, s)), n), summary)
        return state.value, _info(state, conv)
    state = _first_pass_jit(g, check, params, data, chunk=pass_chunk)
    host = _host(state)
    _raise_nonfinite(host, nonfinite)  # before refining: bisecting a NaN would spend the whole budget
    failing = np.flatnonzero(~_converged(host, rtol, check_tol))
    for start in range(0, failing.size, bucket_limit):  # groups of examples, each one vectorised call
        group = failing[start : start + bucket_limit]
        idx = np.full(_bucket_size(group.size, bucket_limit), n, np.int32)
        idx[: group.size] = group
        idx = jnp.asarray(idx)
        first = (state.norm, state.error, state.value)
        args = (first, idx, rtol_arr, check_tol_arr)
        found = _refine_jit(g, check, params, data, *args, max_panels=max_panels, depth=depth)
        state = _scatter_jit(state, idx, found)
    if failing.size:  # else the first pass's values stand, already read and checked
        host = _host(state)
        _raise_nonfinite(host, nonfinite)  # a refined panel's end can be a singular point (t = 0)
    conv = _converged(host, rtol, check_tol)
    missed = _missed(host.error, host.residual, conv, host.roundoff, _finite(host), np)
    _warn(missed, n, rtol=rtol, check_tol=check_tol, max_panels=max_panels, narrow=narrow)
    return state.value, _info(state, jnp.asarray(conv))


def _warn_global(state: _State, conv: Array, warn: Callable) -> None:
    """:func:`_warn` from replicated reductions of arrays that span several processes."""
    warn(_missed(state.error, state.residual, conv, state.roundoff, _finite(state), jnp), conv.shape[0])


def _host(state: _State) -> _State:
    """The per-example scalars of ``state`` as numpy arrays (``value`` and ``panels`` stay on the device)."""
    error, residual, norm, roundoff = fetch(state.error, state.residual, state.norm, state.roundoff)
    return state._replace(error=error, residual=residual, norm=norm, roundoff=roundoff)


def _info(state: _State, conv: Array) -> QuadratureInfo:
    return QuadratureInfo(state.error, state.residual, state.panels, conv, state.roundoff)


def _missed(
    error, residual, conv, roundoff, finite, xp, count_nonfinite: bool = True
) -> tuple[tuple[int, float, float], ...]:
    """``(count, worst error, worst residual)`` of the examples that missed the tolerance: those stopped at
    the rounding level, those out of budget, and with ``count_nonfinite`` those with a NaN or Inf integral
    or residual (``finite`` false: eagerly these raise before; under a user's jit they are reported here;
    the library's streaming passes report non-finite rows from their own input checks) (``xp``: numpy, or
    jax.numpy for arrays that span processes). A finite example that missed never hides behind a NaN."""
    summary = _missed_summary(error, residual, conv, roundoff, finite, xp, count_nonfinite)
    return _as_numbers(summary)


def _missed_summary(error, residual, conv, roundoff, finite, xp, count_nonfinite: bool = True) -> tuple:
    """:func:`_missed` as ``xp`` scalars (nine reductions; traced, nothing per example leaves the devices)."""
    missed = ~conv & finite
    groups = (missed & roundoff, missed & ~roundoff, ~conv & ~finite & count_nonfinite)
    worst = lambda a, g: xp.max(xp.where(g, a, 0))  # noqa: E731
    return tuple((xp.sum(g), worst(error, g), worst(residual, g)) for g in groups)


def _as_numbers(summary) -> tuple[tuple[int, float, float], ...]:
    return tuple((int(count), float(err), float(res)) for count, err, res in summary)


def _warn(missed, n: int, *, rtol, check_tol, max_panels, narrow: bool = False) -> None:
    (noisy, noise_err, noise_res), (short, short_err, short_res), (nonfinite, _, _) = missed
    if not noisy + short + nonfinite:
        return
    parts = []
    if noisy:
        parts.append(
            f"{noisy} stopped at the rounding noise of their integrand's own values (estimated relative "
            f"error up to {noise_err:.2e}, check residual up to {noise_res:.2e}): this is the accuracy the "
            f"dtype allows here; compute in a wider dtype (float64, if the model is not already; float64 "
            f"params with float32 state or constants inside apply_fn, e.g. Flax batch statistics, still "
            f"compute in float32 there) for more, or pass rtol >= {noise_err:.1e}"
        )
    if short and short_err <= rtol:  # every estimate met rtol: the a-posteriori check failed them
        parts.append(
            f"{short} whose error estimates met rtol but whose check residual did not (up to "
            f"{short_res:.2e}): a feature of the integrand narrower than the panels (a kink or a step the "
            f"rule's nodes straddle) or cancellation (an integral much smaller than its integrand); more "
            f"panels do not help the estimate see it: check the model, or pass a fixed rule"
        )
    elif short:
        parts.append(
            f"{short} stopped by the panel budget (max_panels={max_panels}) or the bisection depth: worst "
            f"estimated relative error {short_err:.2e}, worst check residual {short_res:.2e}; raise "
            f"max_panels, loosen rtol, or check the model for non-finite gradients"
            + (
                " (below float64, a kink or step inside the path, e.g. ReLU with biases, stops at the "
                "bisection depth whatever max_panels is, its estimate far above the true error: 1.6e-6 "
                "against 6e-8 for relu(x·θ − 1); compute in float64 or loosen rtol)"
                if narrow
                else ""
            )
        )
    if nonfinite:
        parts.append(
            f"{nonfinite} with a NaN or Inf integral or check residual: the integrand is not finite on the "
            f"path (check the model for non-finite gradients, e.g. sqrt or log singular at t = 0)"
        )
    warnings.warn(
        QuadratureWarning(
            f"adaptive quadrature missed its tolerance (rtol={rtol:.1e}, check_tol={check_tol:.1e}) for "
            f"{noisy + short + nonfinite} of {n} examples: " + "; ".join(parts) + "."
        ),
        stacklevel=3,
    )
