"""The bayeslik model zoo, installed as ``bayeslik.models``.

One module per family; each has ``model(...)`` (a NumPyro program), ``simulate(rng_key, ...)`` and,
where there is one, a loader for its real data.
"""
