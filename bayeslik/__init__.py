"""bayeslik: NumPyro models, interchangeable inference engines, ArviZ results.

>>> import bayeslik as bl
>>> post = bl.Posterior(model, **data)          # doctest: +SKIP
>>> fit = bl.fit(post, "nuts", seed=0)          # doctest: +SKIP
"""

from bayeslik import engines
from bayeslik.api import fit, register_engine
from bayeslik.engines.kit import pointwise_loglikelihood
from bayeslik.compare import Comparison, Reference, compare
from bayeslik.devices import use_cpu_cores
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
from bayeslik.statespace import StateSpacePosterior
from bayeslik.fit import Cost, Fit, load_fit
from bayeslik.posterior import Posterior
from bayeslik.relabel import relabel
from bayeslik.sbc import sbc

__version__ = "0.1.0"

__all__ = [
    "Posterior", "Fit", "Cost", "fit", "load_fit", "engines", "register_engine", "summary", "sbc",
    "OptionError", "compare", "Comparison", "Reference", "StateSpacePosterior", "relabel", "use_cpu_cores",
    "BayeslikError", "DataError", "EngineError", "ImproperPriorError", "InitializationError",
    "ModelError", "PriorTransformError", "pointwise_loglikelihood",
]


def summary(fit: Fit, **kwargs):
    """ArviZ's summary table of a Fit's posterior (engine facts are in ``repr(fit)``)."""
    return fit.summary(**kwargs)
