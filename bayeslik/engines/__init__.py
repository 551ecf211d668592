"""Inference engines. Each module: a frozen config, pure building blocks, ``run(...) -> Fit``."""

from bayeslik.api import engines as available
from bayeslik.api import register_engine
from bayeslik.engines import nuts
from bayeslik.engines.nuts import NUTS, NUTSConfig

# gradients: which engines differentiate the log density (bl.fit refuses them on a Posterior
# with external log-likelihood sites). NUTS always, SMC with HMC moves; the others are
# registered with the default, False: nested sampling, nss and the surrogate never differentiate
# the likelihood, PMMH differentiates nothing, and SNL runs on a SimulatorPosterior (no
# likelihood sites) and fits its inner sampler through bl.fit, which checks that one.
register_engine("nuts", NUTSConfig, nuts.run, "No-U-Turn HMC with Stan's windowed warmup (blackjax)",
                run_many=nuts.run_many, gradients=True)

from bayeslik.engines import nested  # noqa: E402
from bayeslik.engines.nested import Nested, NestedConfig  # noqa: E402

register_engine("nested", NestedConfig, nested.run,
                "Nested sampling with dynesty (static or dynamic), logZ and weighted draws")

from bayeslik.engines import nss  # noqa: E402
from bayeslik.engines.nss import NSS, NSSConfig  # noqa: E402

register_engine("nss", NSSConfig, nss.run,
                "JAX-native nested slice sampling (blackjax), logZ and weighted draws; GPU-ready")

from bayeslik.engines import nested_surrogate  # noqa: E402
from bayeslik.engines.nested_surrogate import NestedSurrogate, NestedSurrogateConfig  # noqa: E402

register_engine("nested+surrogate", NestedSurrogateConfig, nested_surrogate.run,
                "dynesty with a neural likelihood surrogate (MLP ensemble) and an evidence guard")

from bayeslik.engines import smc  # noqa: E402
from bayeslik.engines.smc import SMC, SMCConfig  # noqa: E402

register_engine("smc", SMCConfig, smc.run,
                "Adaptive tempered SMC (tuned HMC/random-walk moves), logZ with its error",
                gradients=smc.needs_gradients,
                gradients_note="SMC's random-walk moves need none: pass kernel='rwm' or leave "
                               "kernel unset (the random walk is then its default).")

from bayeslik.engines import pmmh  # noqa: E402
from bayeslik.engines.pmmh import PMMH, PMMHConfig  # noqa: E402
from bayeslik.statespace import StateSpacePosterior  # noqa: E402

register_engine("pmmh", PMMHConfig, pmmh.run,
                "Particle marginal Metropolis-Hastings for state-space models (correlated, adaptive)",
                accepts=StateSpacePosterior)

from bayeslik.engines import snl  # noqa: E402
from bayeslik.engines.snl import SNL, SNLConfig  # noqa: E402
from bayeslik.simulator import SimulatorPosterior  # noqa: E402

register_engine("snl", SNLConfig, snl.run,
                "Sequential neural likelihood for simulators (a flow learns p(x | theta), rounds)",
                accepts=SimulatorPosterior)

__all__ = [
    "NUTS", "NUTSConfig", "Nested", "NestedConfig", "NSS", "NSSConfig", "NestedSurrogate",
    "NestedSurrogateConfig", "SMC", "SMCConfig", "PMMH", "PMMHConfig", "StateSpacePosterior",
    "SNL", "SNLConfig", "SimulatorPosterior",
    "available", "nuts", "nested", "nss", "nested_surrogate", "smc", "pmmh", "snl",
]
