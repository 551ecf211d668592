"""Neural likelihood surrogates for nested sampling.

* :mod:`~bayeslik.surrogate.network`: ensembles of small networks (equinox + optax), MLPs or
  additive networks (one MLP per input, summed), training with early stopping,
  successive-halving search over kinds and architectures;
* :mod:`~bayeslik.surrogate.likelihood`: :class:`SurrogateLikelihood`, the ``loglikelihood_wrapper``
  that decides point by point between the network and the true likelihood;
* :mod:`~bayeslik.surrogate.guard`: the importance correction of the evidence after the run;
* :mod:`~bayeslik.surrogate.cost`: the cost model that decides whether a training, and a
  switch-in, would save wall time.

Use it through the engine: ``bl.fit(post, "nested+surrogate", ...)`` (see docs/surrogates.md).
"""

from bayeslik.surrogate.guard import GuardResult, importance_correction
from bayeslik.surrogate.likelihood import SurrogateLikelihood, SurrogateOptions
from bayeslik.surrogate.network import (AdditiveMLP, Architecture, Ensemble, predict,
                                        search_architecture, train_ensemble)

__all__ = [
    "AdditiveMLP", "Architecture", "Ensemble", "GuardResult", "SurrogateLikelihood",
    "SurrogateOptions", "importance_correction", "predict", "search_architecture", "train_ensemble",
]
