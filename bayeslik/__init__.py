"""bayeslik: NumPyro models, interchangeable inference engines, ArviZ results.

>>> import bayeslik as bl
>>> post = bl.Posterior(model, **data)          # doctest: +SKIP
>>> fit = bl.fit(post, "nuts", seed=0)          # doctest: +SKIP

The public names load on first use (PEP 562), so ``import bayeslik`` (and the command line's
``--help``) imports no JAX; the built-in engines are registered when an engine is first looked
up.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from bayeslik import progress  # noqa: F401 -- first: it imports tqdm.auto before numpyro does
from bayeslik.errors import (
    BayeslikError,
    DataError,
    EngineError,
    ImproperPriorError,
    InitializationError,
    ModelError,
    OptionError,
    PriorTransformError,
)

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "fit": "bayeslik.api", "register_engine": "bayeslik.api",
    "external_loglikelihood": "bayeslik.external",
    "pointwise_loglikelihood": "bayeslik.engines.kit",
    "compare": "bayeslik.compare", "Comparison": "bayeslik.compare", "Reference": "bayeslik.compare",
    "use_cpu_cores": "bayeslik.devices", "FitWarning": "bayeslik.convergence",
    "StateSpacePosterior": "bayeslik.statespace", "SimulatorPosterior": "bayeslik.simulator",
    "Cost": "bayeslik.fit", "Fit": "bayeslik.fit", "load_fit": "bayeslik.fit",
    "Posterior": "bayeslik.posterior",
    "posterior_predictive": "bayeslik.predictive", "prior_predictive": "bayeslik.predictive",
    "relabel": "bayeslik.relabel",
    "sbc": "bayeslik.sbc",
}
_SUBMODULES = ("engines", "external", "weights", "inits", "convergence", "diagnostics", "filtering",
               "surrogate", "checkpoints", "plots", "models")

__all__ = [
    "Posterior", "Fit", "Cost", "fit", "load_fit", "engines", "register_engine", "summary", "sbc",
    "OptionError", "compare", "Comparison", "Reference", "StateSpacePosterior", "SimulatorPosterior", "relabel", "use_cpu_cores",
    "BayeslikError", "DataError", "EngineError", "ImproperPriorError", "InitializationError",
    "ModelError", "PriorTransformError", "pointwise_loglikelihood",
    "posterior_predictive", "prior_predictive", "FitWarning", "external_loglikelihood",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"bayeslik.{name}")
    else:
        raise AttributeError(f"module 'bayeslik' has no attribute {name!r}")
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``bayeslik`` itself: importing the submodule ``bayeslik.fit`` (``.compare``, ``.sbc``,
    ``.relabel``) must not replace the function of that name in the package's namespace (the
    submodule stays importable by its full name)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


def summary(fit, **kwargs):
    """ArviZ's summary table of a Fit's posterior (engine facts are in ``repr(fit)``)."""
    return fit.summary(**kwargs)
