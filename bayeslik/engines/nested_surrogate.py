"""The "nested+surrogate" engine: dynesty with a neural likelihood surrogate and an evidence guard.

It is the ``"nested"`` engine (:mod:`bayeslik.engines.nested`) run with a
:class:`~bayeslik.surrogate.likelihood.SurrogateLikelihood` as its ``loglik_wrapper``: an
ensemble of small MLPs learns the log-likelihood from the points dynesty evaluates, stands in for
it once its held-out error near the current contour is small, is re-checked against the true
likelihood on fresh points, and falls back to the true likelihood when its error grows. After the
run a guard re-weights a subsample of the posterior with the true likelihood and reports the
corrected evidence (see :mod:`bayeslik.surrogate.guard`).

:class:`NestedSurrogateConfig` has every option of :class:`~bayeslik.engines.nested.NestedConfig`
(same names and defaults) and every option of
:class:`~bayeslik.surrogate.likelihood.SurrogateOptions`; both halves are validated on
construction.

What the Fit holds beyond the ``"nested"`` engine's: ``Fit.log_evidence`` and its error are the
guard's corrected values (the uncorrected ones are in the ``nested_samples`` group's attributes,
``surrogate_log_evidence_uncorrected``); ``Fit.cost.num_loglik_evals`` counts the true likelihood
evaluations (sampling and guard); ``Fit.cost.extra`` holds ``num_surrogate_calls``,
``num_true_calls`` (sampling only), ``num_guard_calls``, ``num_rechecks``, ``num_above_range``,
``num_high_spread``, ``num_trainings``, ``num_retrains``, ``num_fallbacks``, ``train_s``,
``search_s``, ``first_switch_in_at``, ``architecture``, and the guard's ``guard_correction``,
``guard_ess_fraction``. The posterior draws use the values the sampler saw (surrogate ones
included).

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
from typing import Any

import jax

from bayeslik.engines import nested as _nested
from bayeslik.engines.nested import NestedConfig
from bayeslik.fit import Fit
from bayeslik.surrogate.likelihood import SurrogateLikelihood, SurrogateOptions

__all__ = ["NestedSurrogateConfig", "NestedSurrogate", "run", "split_config"]

_NESTED_FIELDS = tuple(f.name for f in dataclasses.fields(NestedConfig))
_SURROGATE_FIELDS = tuple(f.name for f in dataclasses.fields(SurrogateOptions))


def _field_spec(cls) -> list[tuple[str, Any, dataclasses.Field]]:
    out = []
    for f in dataclasses.fields(cls):
        default = dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING \
            else dataclasses.field(default_factory=f.default_factory)
        out.append((f.name, f.type, default))
    return out


def _post_init(self) -> None:
    # construct both halves: their own __post_init__ validates every option
    split_config(self)


def split_config(config) -> tuple[NestedConfig, SurrogateOptions]:
    """The (NestedConfig, SurrogateOptions) halves of a NestedSurrogateConfig."""
    nested = NestedConfig(**{k: getattr(config, k) for k in _NESTED_FIELDS})
    surrogate = SurrogateOptions(**{k: getattr(config, k) for k in _SURROGATE_FIELDS})
    return nested, surrogate


_clash = set(_NESTED_FIELDS) & set(_SURROGATE_FIELDS)
assert not _clash, f"option names shared by NestedConfig and SurrogateOptions: {_clash}"

NestedSurrogateConfig = dataclasses.make_dataclass(
    "NestedSurrogateConfig",
    _field_spec(NestedConfig) + _field_spec(SurrogateOptions),
    namespace={"__post_init__": _post_init},
    frozen=True,
    module=__name__,
)
NestedSurrogateConfig.__doc__ = (
    "Settings of the nested+surrogate engine: every option of NestedConfig (num_live, dynamic, "
    "bound, sample, dlogz, batch, checkpoint_file, progress_bar, ...) and every option of "
    "SurrogateOptions (num_initial, train_size, rmse_max, spread_max, recheck_every, "
    "fallback_rmse, retrain_every, num_members, search, kinds, widths, depths, learning_rates, "
    "guard_num_points, guard_max_correction, ...), with the same names and defaults. "
    "Frozen and hashable; each half is validated on construction.\n\n"
    "Example: NestedSurrogateConfig(num_live=400, rmse_max=0.05, guard_num_points=300)"
)
NestedSurrogate = NestedSurrogateConfig


def run(posterior, rng_key: jax.Array, config) -> Fit:
    """Nested sampling (dynesty) with a neural likelihood surrogate; returns the Fit.

    >>> fit = run(post, jax.random.key(0), NestedSurrogateConfig(num_live=300))  # doctest: +SKIP
    """
    if not isinstance(config, NestedSurrogateConfig):
        from bayeslik.errors import EngineError

        raise EngineError(f"run needs a NestedSurrogateConfig, got {type(config).__name__}.")
    nested_config, options = split_config(config)
    wrapper = SurrogateLikelihood(options, num_live=nested_config.num_live)
    fit = _nested.run(posterior, rng_key, nested_config, loglik_wrapper=wrapper)
    fit.idata.attrs["engine"] = "nested+surrogate"
    history = "; ".join(f"{n}:{e}:{r:.3g}" for n, e, r in wrapper.history)
    fit.idata["nested_samples"].attrs["surrogate_history"] = history
    return dataclasses.replace(fit, engine="nested+surrogate", config=dataclasses.asdict(config))
