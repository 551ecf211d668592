"""Inference engines. Each module: a frozen config, pure building blocks, ``run(...) -> Fit``."""

from bayeslik.api import engines as available
from bayeslik.api import register_engine
from bayeslik.engines import nuts
from bayeslik.engines.nuts import NUTS, NUTSConfig

register_engine("nuts", NUTSConfig, nuts.run, "No-U-Turn HMC with Stan's windowed warmup (blackjax)",
                run_many=nuts.run_many)

__all__ = ["NUTS", "NUTSConfig", "available", "nuts"]
