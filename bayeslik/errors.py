"""Errors raised by bayeslik for bad input, before anything is compiled.

Every message names the argument or model site at fault and says how to fix it.
"""

from __future__ import annotations


class BayeslikError(Exception):
    """Base class of the errors bayeslik raises on purpose."""


class ModelError(BayeslikError, ValueError):
    """The NumPyro program cannot be used as given (a site, a distribution, a support)."""


class DataError(BayeslikError, ValueError):
    """The data bound to a model is unusable (NaN/inf, wrong shape, wrong type)."""


class PriorTransformError(ModelError):
    """A unit-cube prior transform was asked for, but a site's prior has no inverse CDF here."""


class ImproperPriorError(ModelError):
    """An engine that needs a proper prior (nested sampling, SMC) met an improper one."""


class InitializationError(BayeslikError, RuntimeError):
    """No finite starting point was found for the engine."""


class EngineError(BayeslikError, ValueError):
    """An unknown engine name or an invalid engine option."""


class OptionError(BayeslikError, ValueError):
    """An invalid option of a bayeslik tool other than an engine (an unknown method name, a
    count out of range, an index outside the Fit); an engine's options raise EngineError."""
