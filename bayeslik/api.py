"""``bayeslik.fit`` and the engine registry.

An engine is a frozen config class plus ``run(posterior, rng_key, config) -> Fit``. It is named
by its registry name (``"nuts"``) or by an instance of its config class. The registry records
which posterior kinds (``Posterior``, ``StateSpacePosterior``, ...) each engine accepts, and
:func:`fit` checks the kind before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import numpy as np

from bayeslik.convergence import warn_flags
from bayeslik.errors import EngineError
from bayeslik.fit import Fit
from bayeslik.posterior import Posterior

__all__ = ["fit", "register_engine", "engines", "resolve_engine", "engine_spec",
           "posterior_kinds", "unregister_engine", "gradient_free_engines"]


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine. ``run_many(posteriors, rng_keys, config) -> list[Fit]``, where
    given, fits several Posteriors that share a cache_key at once (vectorised). ``accepts``:
    the posterior kinds (classes) the engine runs on. ``gradients``: whether it differentiates
    the log density, a bool or ``gradients(config) -> bool`` where its settings decide (SMC's
    move kernel); ``gradients_note`` says, for the refusal's message, which settings need
    none."""

    name: str
    config_cls: type
    run: Callable
    description: str = ""
    run_many: Callable | None = None
    accepts: tuple[type, ...] = (Posterior,)
    gradients: bool | Callable[[Any], bool] = False
    gradients_note: str = ""

    def needs_gradients(self, config: Any = None) -> bool:
        """Whether the engine with ``config`` (None: its defaults) differentiates the log
        density."""
        if not callable(self.gradients):
            return bool(self.gradients)
        return bool(self.gradients(self.config_cls() if config is None else config))

    def check_accepts(self, posterior: Any, config: Any = None) -> None:
        """Raise an EngineError unless the engine runs on ``posterior``: naming the kinds it
        runs on, or, for a posterior with external log-likelihood sites (host callbacks, no
        gradients) and an engine that differentiates the log density with ``config`` (None:
        its defaults), naming the sites and the engines that run on it."""
        if not isinstance(posterior, self.accepts):
            kinds = " or ".join(c.__name__ for c in self.accepts)
            others = sorted(n for n, s in _registry().items() if isinstance(posterior, s.accepts))
            raise EngineError(
                f"engine {self.name!r} runs on a {kinds}, not a {type(posterior).__name__}"
                + (f"; the engines for a {type(posterior).__name__} are {others}."
                   if others else "."))
        external = tuple(getattr(posterior, "external_sites", ()) or ())
        if external and self.needs_gradients(config):
            sites = ", ".join(f"'{n}'" for n in external)
            ok = gradient_free_engines(posterior)
            raise EngineError(
                f"engine {self.name!r}"
                + (" with these settings" if callable(self.gradients) else "")
                + " differentiates the log density, but this Posterior's likelihood site(s) "
                f"{sites} are external (bl.external_loglikelihood: a host callback, opaque to "
                "JAX, with no gradient)."
                + (f" {self.gradients_note}" if self.gradients_note else "")
                + (f" The engines that run on it: {ok}." if ok else "")
                + " Or write the likelihood in JAX to use gradient-based engines.")


def gradient_free_engines(posterior: Any) -> list[str]:
    """The registered engines that run on ``posterior`` with their default settings without
    differentiating its log density (those that run on a Posterior with external sites)."""
    return sorted(n for n, s in _registry().items()
                  if isinstance(posterior, s.accepts) and not s.needs_gradients())


_REGISTRY: dict[str, EngineSpec] = {}


def _registry() -> dict[str, EngineSpec]:
    """The registry, with the built-in engines in it (``bayeslik.engines`` registers them on
    import; ``import bayeslik`` itself imports nothing heavy)."""
    import bayeslik.engines  # noqa: F401

    return _REGISTRY


def register_engine(name: str, config_cls: type, run: Callable, description: str = "",
                    run_many: Callable | None = None,
                    accepts: type | tuple[type, ...] = Posterior, *,
                    gradients: bool | Callable[[Any], bool] = False,
                    gradients_note: str = "") -> None:
    """Make an engine available to ``bayeslik.fit`` under ``name``; ``accepts`` is the
    posterior kind (or a tuple of kinds) it runs on; ``gradients`` whether it differentiates
    the log density (True/False, or ``gradients(config) -> bool`` where its settings decide),
    so that ``bl.fit`` refuses it, before compiling anything, on a Posterior with external
    log-likelihood sites (``bl.external_loglikelihood``); ``gradients_note`` adds to that
    refusal which settings need no gradients."""
    if not dataclasses.is_dataclass(config_cls):
        raise EngineError(f"engine {name!r}: config_cls must be a dataclass.")
    accepts = accepts if isinstance(accepts, tuple) else (accepts,)
    if not accepts or not all(isinstance(c, type) for c in accepts):
        raise EngineError(f"engine {name!r}: accepts must be a class or a tuple of classes.")
    if not (isinstance(gradients, bool) or callable(gradients)):
        raise EngineError(f"engine {name!r}: gradients must be True, False or a function of "
                          f"the config returning one, got {gradients!r}.")
    _REGISTRY[name] = EngineSpec(name, config_cls, run, description, run_many, accepts,
                                 gradients, str(gradients_note))


def unregister_engine(name: str) -> None:
    """Remove the engine ``name`` from the registry (a plug-in's or a test's own engine)."""
    if name not in _registry():
        raise EngineError(f"unknown engine {name!r}; the engines are {sorted(_registry())}.")
    del _REGISTRY[name]


def engine_spec(name: str) -> EngineSpec:
    """The registered engine ``name`` (its config class, run function, accepted kinds)."""
    if name not in _registry():
        raise EngineError(f"unknown engine {name!r}; the engines are {sorted(_registry())}.")
    return _registry()[name]


def posterior_kinds() -> tuple[type, ...]:
    """Every posterior kind some registered engine accepts."""
    kinds: list[type] = []
    for s in _registry().values():
        kinds.extend(c for c in s.accepts if c not in kinds)
    return tuple(kinds)


def engines() -> dict[str, str]:
    """{engine name: one-line description} of the registered engines."""
    return {n: s.description for n, s in sorted(_registry().items())}


def resolve_engine(engine: Any, options: dict[str, Any]) -> tuple[EngineSpec, Any]:
    """(spec, config) from an engine name and options, or from a config object (and overrides)."""
    if isinstance(engine, str):
        spec = _registry().get(engine)
        if spec is None:
            raise EngineError(
                f"unknown engine {engine!r}; the engines are {sorted(_registry())}. "
                "Pass one of these names or an engine config such as bl.engines.NUTS(...)."
            )
        base = None
    else:
        spec = next((s for s in _registry().values() if isinstance(engine, s.config_cls)), None)
        cls = next((s for s in _registry().values() if engine is s.config_cls), None)
        if cls is not None:
            import bayeslik.engines as _engines

            name = getattr(engine, "__name__", "Config")
            short = name.removesuffix("Config")
            name = short if getattr(_engines, short, None) is engine else name
            raise EngineError(
                f"engine {name} is an engine config class, not a config: call it, "
                f"{name}() (with options, e.g. {name}(num_samples=...)), or pass the name "
                f"{cls.name!r}."
            )
        if spec is None:
            raise EngineError(
                f"engine {engine!r} is neither a registered engine name nor an engine config; "
                f"the engines are {sorted(_registry())}."
            )
        base = engine
    valid = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise EngineError(
            f"engine {spec.name!r} has no option(s) {unknown}; its options are {sorted(valid)}."
        )
    config = spec.config_cls(**options) if base is None else dataclasses.replace(base, **options)
    return spec, config


def fit(posterior: Posterior, engine: Any = "nuts", *, seed: int | None = 0,
        log_likelihood: Any = "auto", **options: Any) -> Fit:
    """Run an engine on a Posterior and return its Fit.

    ``engine`` is a registered name (see ``bayeslik.engines.available()``) or a config object;
    ``options`` are that engine's settings (they override a config object's). ``seed`` makes the
    run reproducible; ``None`` takes it from the environment variable ``BAYESLIK_SEED`` or 0.
    ``log_likelihood`` (every engine): ``"auto"`` keeps the pointwise ``log_likelihood`` group
    when it takes at most 1 GiB (``BAYESLIK_LOG_LIKELIHOOD_MAX_BYTES``), else leaves it out with
    a flag; ``True`` always keeps it, ``False`` never computes it (``bl.pointwise_loglikelihood``
    adds it later).

    Example
    -------
    >>> post = bl.Posterior(model, y=y)                               # doctest: +SKIP
    >>> fit = bl.fit(post, "nuts", seed=0, num_chains=4)              # doctest: +SKIP
    >>> fit = bl.fit(post, bl.engines.NUTS(num_samples=2000), seed=1) # doctest: +SKIP
    """
    result = fit_quietly(posterior, engine, seed=seed, log_likelihood=log_likelihood, **options)
    warn_flags(result)  # every flag is also a FitWarning, so trouble is seen outside the Fit too
    return result


def fit_quietly(posterior: Posterior, engine: Any = "nuts", *, seed: int | None = 0,
                log_likelihood: Any = "auto", **options: Any) -> Fit:
    """:func:`fit` without turning the Fit's flags into FitWarnings: for callers that report
    the flags themselves (``bl.compare`` warns once per flagged run, from the user's call)."""
    if not isinstance(posterior, posterior_kinds()):
        raise EngineError(
            f"fit() needs a bayeslik.Posterior, got {type(posterior).__name__}; build one with "
            "bl.Posterior(model, **data)."
        )
    spec, config = resolve_engine(engine, options)
    spec.check_accepts(posterior, config)  # the kind, and gradients on external sites
    seed, key = _seed_key(seed)
    _check_init_option(posterior, config)
    from bayeslik.engines import kit  # the option reaches every engine's kit.Run

    with kit.loglikelihood_option(log_likelihood, posterior):
        return dataclasses.replace(spec.run(posterior, key, config), seed=seed)


#: the seeds jax.random.key takes: signed 64-bit integers
SEED_RANGE = (-(2**63), 2**63 - 1)


def _seed_key(seed: Any) -> tuple[int, jax.Array]:
    """(seed as an int, its key) from fit's ``seed`` (None: ``BAYESLIK_SEED`` or 0); an
    EngineError naming the seed unless it is an integer in :data:`SEED_RANGE`."""
    if seed is None:
        raw = os.environ.get("BAYESLIK_SEED", "0")
        try:
            seed = int(raw)
        except ValueError:
            raise EngineError(f"seed=None takes the seed from the environment variable "
                              f"BAYESLIK_SEED, but it is {raw!r}, not an integer.") from None
    seed = check_seed(seed)
    return seed, jax.random.key(seed)


def check_seed(seed: Any, error: type = EngineError, where: str = "") -> int:
    """``seed`` as an int, or ``error`` (its message prefixed by ``where``) unless it is an
    integer (NumPy's too, not a bool) in :data:`SEED_RANGE`."""
    prefix = f"{where}: " if where else ""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise error(f"{prefix}seed must be an int, got {seed!r}.")
    seed = int(seed)
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise error(f"{prefix}seed={seed}: must lie in [-2**63, 2**63 - 1] (a signed 64-bit "
                    "integer), which jax.random.key takes; pass a smaller seed (e.g. "
                    "seed % 2**32).")
    return seed


def _check_init_option(posterior: Any, config: Any) -> None:
    """An engine's ``init`` given as a dict {site: value}: checked against the posterior's latent
    sites and their supports before the engine runs (EngineError naming the site)."""
    init = getattr(config, "init", None)
    if isinstance(init, Mapping):
        from bayeslik.inits import check_init

        label = type(config).__name__.removesuffix("Config")
        check_init(posterior, init, label)
