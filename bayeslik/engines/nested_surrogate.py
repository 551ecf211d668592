"""The "nested+surrogate" engine: dynesty with a neural likelihood surrogate and an evidence guard.

It is the ``"nested"`` engine (:mod:`bayeslik.engines.nested`) run with a
:class:`~bayeslik.surrogate.likelihood.SurrogateLikelihood` as its ``loglikelihood_wrapper``: an
ensemble of small MLPs learns the log-likelihood from the points dynesty evaluates, stands in for
it once its held-out error near the current contour is small, is re-checked against the true
likelihood on fresh points, and falls back to the true likelihood when its error grows. After the
run a guard re-weights a subsample of the posterior with the true likelihood and reports the
corrected evidence (see :mod:`bayeslik.surrogate.guard`).

:class:`NestedSurrogateConfig` has every option of :class:`~bayeslik.engines.nested.NestedConfig`
(same names and defaults) and every option of
:class:`~bayeslik.surrogate.likelihood.SurrogateOptions`; both halves are validated on
construction (:func:`split_config` makes them), and a test checks that its fields are exactly
those of the two.

What the Fit holds beyond the ``"nested"`` engine's: ``Fit.log_evidence`` and its error are the
guard's corrected values (the uncorrected ones are in the ``nested_samples`` group's attributes,
``surrogate_log_evidence_uncorrected``); ``Fit.cost.num_loglik_evals`` counts the true likelihood
evaluations (sampling and guard); ``Fit.cost.extra`` holds ``num_surrogate_calls``,
``num_true_calls`` (sampling only), ``num_guard_calls``, ``num_rechecks``, ``num_above_range``,
``num_high_spread``, ``num_trainings``, ``num_retrains``, ``num_fallbacks``, ``train_s``,
``search_s``, ``first_switch_in_at``, ``architecture``, and the guard's ``guard_correction``,
``guard_ess_fraction``; the cost rule's (:mod:`bayeslik.surrogate.cost`): ``switch``,
``background``, ``call_s`` (seconds per true call, measured or declared), ``predict_s`` (per
network answer), ``true_call_s`` (seconds of the sampling's true calls), ``serve_s``,
``guard_s``, ``train_blocking_s`` (the training seconds that blocked the sampler),
``first_train_at``, ``num_cost_refusals``, ``num_stopped_trainings``, ``projected_saving_s``,
``time_saved_s`` (``call_s`` x served points - ``train_s`` - ``serve_s`` - ``guard_s``) and
``surrogate_decision`` (why it switched in or not, in words); the same in one line in the
``nested_samples`` group's attribute ``surrogate_cost``, beside ``surrogate_history``. The
posterior draws use the values the sampler saw (surrogate ones included).

By default (``switch="cost"``) a network is trained, and switched in, only where that saves
wall time: a cheap likelihood (compiled JAX, well under a millisecond a call) runs as plain
dynesty, unflagged; ``switch="accuracy"`` switches in whenever the network is accurate.

Every true likelihood evaluation (the initial live points, training, re-checks, fallbacks and
the guard: all go through the engine's ``true_batch_fn``) is checked for NaN and +inf as the
"nested" engine checks its own: counted in ``Fit.cost.extra`` (``num_nonfinite``,
``num_nonfinite_loglikelihood``, ``num_loglikelihood_checked``) and flagged with the site that
made them (the zero density they were taken for truncates the model).

A resumed run (``resume=True``) starts the surrogate afresh: its training state is not in the
checkpoint.

Example
-------
>>> import bayeslik as bl
>>> from bayeslik.models import reference
>>> post = reference.get("normal_mean").posterior()
>>> fit = bl.fit(post, "nested+surrogate", num_live=300, progress_bar=False)   # doctest: +SKIP
>>> fit.cost.num_loglik_evals, fit.cost.extra["num_surrogate_calls"]           # doctest: +SKIP
(942, 11353)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax

from bayeslik.engines import nested as _nested
from bayeslik.engines.nested import NestedConfig
from bayeslik.errors import EngineError
from bayeslik.fit import Fit
from bayeslik.surrogate.likelihood import SurrogateLikelihood, SurrogateOptions

__all__ = ["NestedSurrogateConfig", "NestedSurrogate", "run", "split_config"]


@dataclass(frozen=True)
class NestedSurrogateConfig:
    """Settings of the nested+surrogate engine: every option of
    :class:`~bayeslik.engines.nested.NestedConfig` and every option of
    :class:`~bayeslik.surrogate.likelihood.SurrogateOptions`, with the same names and defaults
    (their docstrings say what each means). Frozen and hashable; each half is validated on
    construction.

    dynesty (NestedConfig): num_live, dynamic, bound, sample, walks, slices, dlogz,
        max_iterations, max_calls, batch, checkpoint_file, checkpoint_every, resume,
        progress_bar, pfrac, maxbatch, nlive_batch, num_equal_weight_draws,
        num_error_simulations.
    the surrogate (SurrogateOptions): num_initial, inputs, train_size, top_fraction,
        val_fraction, contour_quantile, clip_quantile, rmse_max, spread_max, rel_tol,
        full_accuracy_nats, recheck_every, recheck_window, fallback_rmse, retrain_every,
        num_members, train_steps, search, kinds, widths, depths, learning_rates,
        search_min_steps; the guard: guard_num_points, guard_max_correction,
        guard_min_ess_fraction; the cost rule: switch ("cost", the default, or "accuracy"),
        background, expected_train_s, call_cost_s, horizon.

    >>> cfg = NestedSurrogateConfig(num_live=400, rmse_max=0.05, guard_num_points=300)
    >>> nested, options = split_config(cfg)
    >>> nested.num_live, options.rmse_max
    (400, 0.05)
    """

    # NestedConfig's options
    num_live: int = 500
    dynamic: bool = False
    bound: str = "multi"
    sample: str = "auto"
    walks: int | None = None
    slices: int | None = None
    dlogz: float | None = None
    max_iterations: int | None = None
    max_calls: int | None = None
    batch: bool | int = True
    checkpoint_file: str | None = None
    checkpoint_every: float = 60.0
    resume: bool = False
    progress_bar: bool = True
    pfrac: float = 0.8
    maxbatch: int | None = None
    nlive_batch: int | None = None
    num_equal_weight_draws: int | None = None
    num_error_simulations: int = 30
    # SurrogateOptions' options
    num_initial: int | None = None
    inputs: str = "physical"
    train_size: int = 1000
    top_fraction: float = 0.5
    val_fraction: float = 0.2
    contour_quantile: float = 0.5
    clip_quantile: float = 0.1
    rmse_max: float = 0.1
    spread_max: float = 0.2
    rel_tol: float = 0.05
    full_accuracy_nats: float | None = None
    recheck_every: int = 100
    recheck_window: int = 30
    fallback_rmse: float = 0.3
    retrain_every: int = 300
    num_members: int = 4
    train_steps: int = 2000
    search: bool = True
    kinds: tuple[str, ...] = ("mlp", "additive")
    widths: tuple[int, ...] = (64, 32)
    depths: tuple[int, ...] = (3, 2)
    learning_rates: tuple[float, ...] = (1e-2, 3e-3)
    search_min_steps: int = 300
    guard_num_points: int = 200
    guard_max_correction: float = 0.1
    guard_min_ess_fraction: float = 0.5
    switch: str = "cost"
    background: bool = True
    expected_train_s: float = 10.0
    call_cost_s: float | None = None
    horizon: float = 1.0

    def __post_init__(self) -> None:
        # construct both halves: their own __post_init__ validates every option
        split_config(self)


NestedSurrogate = NestedSurrogateConfig

_NESTED_FIELDS = tuple(f.name for f in dataclasses.fields(NestedConfig))
_SURROGATE_FIELDS = tuple(f.name for f in dataclasses.fields(SurrogateOptions))


def split_config(config: NestedSurrogateConfig) -> tuple[NestedConfig, SurrogateOptions]:
    """The (NestedConfig, SurrogateOptions) halves of a NestedSurrogateConfig."""
    nested = NestedConfig(**{k: getattr(config, k) for k in _NESTED_FIELDS})
    surrogate = SurrogateOptions(**{k: getattr(config, k) for k in _SURROGATE_FIELDS})
    return nested, surrogate


def run(posterior, rng_key: jax.Array, config) -> Fit:
    """Nested sampling (dynesty) with a neural likelihood surrogate; returns the Fit.

    >>> fit = run(post, jax.random.key(0), NestedSurrogateConfig(num_live=300))  # doctest: +SKIP
    """
    if not isinstance(config, NestedSurrogateConfig):
        raise EngineError(f"run needs a NestedSurrogateConfig, got {type(config).__name__}.")
    nested_config, options = split_config(config)
    wrapper = SurrogateLikelihood(options, num_live=nested_config.num_live)
    try:
        fit = _nested.run(posterior, rng_key, nested_config, loglikelihood_wrapper=wrapper)
    except BaseException:
        wrapper.close(quiet=True)  # a background training stops at its next chunk
        raise
    fit.idata.attrs["engine"] = "nested+surrogate"
    history = "; ".join(f"{n}:{e}:{r:.3g}" for n, e, r in wrapper.history)
    fit.idata["nested_samples"].attrs["surrogate_history"] = history
    c = wrapper.counters
    call = "unmeasured" if c["call_s"] is None else f"{1e3 * c['call_s']:.3g} ms"
    fit.idata["nested_samples"].attrs["surrogate_cost"] = (
        f"true call {call}; true calls {c['num_true_calls']} (+{c['num_guard_calls']} guard); "
        f"surrogate calls {c['num_surrogate_calls']}; training {c['train_s']:.1f} s "
        f"({c['train_blocking_s']:.1f} s blocking); time saved {c['time_saved_s']:.1f} s; "
        f"{c['surrogate_decision']}")
    return dataclasses.replace(fit, engine="nested+surrogate", config=dataclasses.asdict(config))
