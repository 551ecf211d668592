"""Stub: filled in by its author. Exposes MODELS = {posteriordb name: (numpyro program, stan_lp_offset)}."""

MODELS: dict = {}
