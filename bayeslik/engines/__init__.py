"""Inference engines. Each module: a frozen config, pure building blocks, ``run(...) -> Fit``."""

from bayeslik.api import engines as available
from bayeslik.api import register_engine
from bayeslik.engines import nuts
from bayeslik.engines.nuts import NUTS, NUTSConfig

register_engine("nuts", NUTSConfig, nuts.run, "No-U-Turn HMC with Stan's windowed warmup (blackjax)",
                run_many=nuts.run_many)

from bayeslik.engines import smc  # noqa: E402
from bayeslik.engines.smc import SMC, SMCConfig  # noqa: E402

register_engine("smc", SMCConfig, smc.run,
                "Adaptive tempered SMC (tuned HMC/random-walk moves), logZ with its error")

from bayeslik.engines import pmmh  # noqa: E402
from bayeslik.engines.pmmh import PMMH, PMMHConfig, StateSpacePosterior  # noqa: E402

register_engine("pmmh", PMMHConfig, pmmh.run,
                "Particle marginal Metropolis-Hastings for state-space models (correlated, adaptive)")

__all__ = ["NUTS", "NUTSConfig", "SMC", "SMCConfig", "PMMH", "PMMHConfig", "StateSpacePosterior",
           "available", "nuts", "smc", "pmmh"]
