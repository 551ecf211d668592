"""A hierarchical degradation-path model of the C-MAPSS health indicator, with RUL as a parameter.

Every engine i follows an exponential approach to failure in its health indicator (HI, the
linear one of :class:`bayeslik.models.cmapss.HealthIndicator`), anchored at its failure cycle
``life_i`` (the cycle at which its RUL is 0):

.. math::

    \\mathrm{HI}_i(t) = a_i - (a_i - e_i)\\, \\exp\\{-(\\mathrm{life}_i - t) / \\tau_i\\}
                       + \\varepsilon_{it}, \\qquad \\varepsilon_{it} \\sim \\mathrm{N}(0, \\sigma^2),

with engine random effects: the healthy level ``a_i``, the level at failure ``e_i`` and the time
scale of the final fall ``tau_i``, and a log-normal life ``log life_i ~ N(mu_life, sd_life)``.
With ``life_link=True`` (the default, chosen on a validation split of the training engines) the
effects are one Gaussian over (log life, a, e, log tau), written as a chain of regressions on
``s_i = log life_i - mu_life``:

    a_i ~ N(mu_a + b_a s_i, sd_a),   e_i ~ N(mu_e + beta_e (a_i - mu_a) + b_e s_i, sd_e),
    log tau_i ~ N(mu_tau + b_tau s_i + b_tau_a (a_i - mu_a) + b_tau_e (e_i - mu_e), sd_tau);

with ``life_link=False`` the ``b_*`` are 0. All are centred: each engine's path of hundreds of
cycles pins its own effects. Run-to-failure (training) engines have ``life_i`` observed;
a censored (test) engine observed for ``n_i`` cycles has ``life_i = n_i + rul_i`` with ``rul_i >
0`` unknown: its prior is the life distribution restricted to ``life > n_i`` (the engine is
known to have survived its observed cycles), and its posterior is the RUL distribution of that
engine. Fitting the training and the test engines in one program (the test engines' sensors,
never their RUL) lets the population learn from both and carries its uncertainty into each RUL.

>>> from bayeslik.models import cmapss, cmapss_degradation as cd
>>> d = cmapss.load()
>>> hi = cmapss.HealthIndicator.fit(d["train"])
>>> data = cd.joint_data(cd.paths(d["train"], hi, run_to_failure=True),
...                      cd.paths(d["test"], hi, run_to_failure=False))
>>> sorted(data)
['censored_rows', 'length', 'mask', 'y']
>>> import bayeslik as bl
>>> post = bl.Posterior(cd.model, **data)              # fit with bl.fit(post, "nuts", init=cd.init_values(data))
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

from bayeslik.errors import DataError, OptionError

__all__ = ["paths", "joint_data", "model", "init_values", "predict_rul", "truncate", "validation_cuts"]


def paths(df: pd.DataFrame, hi, *, run_to_failure: bool | None = None) -> dict:
    """HI paths of every unit of ``df``: {"y": (B, T) float32 padded with the last value,
    "mask": (B, T), "length": (B,) observed cycles, "units": (B,), "censored": (B,) bool}.
    ``run_to_failure`` marks every unit as failed at its last cycle (True) or censored
    (False)."""
    if run_to_failure is None or not isinstance(run_to_failure, (bool, np.bool_)):
        raise OptionError("paths: say run_to_failure=True (training units, failed at their last "
                          f"cycle) or False (test units, RUL unknown); got {run_to_failure!r}")
    seqs = hi.sequences(df)
    if not seqs:
        raise DataError("paths: df has no rows")
    units = np.array(sorted(seqs))
    length = np.array([len(seqs[u]) for u in units])
    T = int(length.max())
    y = np.zeros((len(units), T), np.float32)
    mask = np.zeros((len(units), T), bool)
    for i, u in enumerate(units):
        y[i, :length[i]] = seqs[u]
        y[i, length[i]:] = seqs[u][-1]
        mask[i, :length[i]] = True
    return {"y": y, "mask": mask, "length": length, "units": units,
            "censored": np.full(len(units), not run_to_failure)}


def truncate(p: dict, cut: dict) -> dict:
    """A copy of ``paths`` output in which unit ``u`` of ``cut`` = {unit: cycles kept} is
    observed for its first ``cut[u]`` cycles only and is censored (a validation engine)."""
    out = {k: np.array(v, copy=True) for k, v in p.items()}
    pos = {int(u): i for i, u in enumerate(out["units"])}
    for u, n in cut.items():
        i = pos[int(u)]
        if not 1 <= n < out["length"][i]:
            raise OptionError(f"truncate: unit {u} has {out['length'][i]} cycles; keep between 1 and "
                              f"{out['length'][i] - 1} of them, got {n}")
        out["y"][i, n:] = out["y"][i, n - 1]
        out["mask"][i, n:] = False
        out["length"][i] = n
        out["censored"][i] = True
    return out


def joint_data(*parts: dict) -> dict:
    """The model's data from several :func:`paths` outputs (e.g. training then test units):
    {"y", "mask", "length", "censored_rows"} (a tuple of the censored rows), padded to the longest unit. Rows keep the order of the
    parts; keep the parts to map rows back to units."""
    if not parts:
        raise DataError("joint_data: give at least one paths(...) output")
    T = max(p["y"].shape[1] for p in parts)

    def pad(a, fill_last):
        extra = T - a.shape[1]
        if extra == 0:
            return a
        tail = np.repeat(a[:, -1:], extra, 1) if fill_last else np.zeros((a.shape[0], extra), a.dtype)
        return np.concatenate([a, tail], 1)

    censored = np.concatenate([p["censored"] for p in parts]).astype(bool)
    return {"y": np.concatenate([pad(p["y"], True) for p in parts]),
            "mask": np.concatenate([pad(p["mask"], False) for p in parts]),
            "length": np.concatenate([p["length"] for p in parts]).astype(np.int32),
            "censored_rows": tuple(int(i) for i in np.flatnonzero(censored))}


def _concrete(x) -> bool:
    import jax

    return not isinstance(x, jax.core.Tracer)


def _check(y, mask, length, censored_rows) -> None:
    """Shapes always; values where the data are concrete (Posterior checks them once, eagerly)."""
    B = np.shape(y)[0] if np.ndim(y) == 2 else None
    if B is None or np.shape(mask) != np.shape(y):
        raise DataError(f"cmapss_degradation.model: y and mask must be (units, cycles) of one shape, "
                        f"got {np.shape(y)} and {np.shape(mask)}; build them with joint_data(...)")
    if np.shape(length) != (B,):
        raise DataError(f"cmapss_degradation.model: length must be ({B},), got {np.shape(length)}")
    if not isinstance(censored_rows, tuple) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) and 0 <= i < B
            for i in censored_rows) or len(set(censored_rows)) != len(censored_rows):
        raise DataError("cmapss_degradation.model: censored_rows must be a tuple of distinct row "
                        f"indices in [0, {B}) (the units whose RUL is unknown), got {censored_rows!r}")
    if len(censored_rows) == B:
        raise DataError("cmapss_degradation.model: every unit is censored; the failure level and the "
                        "life distribution need run-to-failure units (leave them out of censored_rows)")
    if all(_concrete(x) for x in (y, mask, length)):
        y, mask, length = np.asarray(y), np.asarray(mask), np.asarray(length)
        if not np.all(np.isfinite(y[mask])):
            raise DataError("cmapss_degradation.model: y has NaN or infinite values in observed cycles")
        if np.any(length < 1) or np.any(mask.sum(1) != length):
            raise DataError("cmapss_degradation.model: length must count the True entries of each row "
                            "of mask (observed cycles first) and be >= 1")


def model(y, mask, length, censored_rows: tuple = (), life_link: bool = True):
    """The hierarchical degradation-path model (module docstring). ``y`` (B, T) HI, ``mask``
    (B, T) observed cycles, ``length`` (B,) observed cycles per unit, ``censored_rows``: a tuple
    of the rows whose unit has not failed yet (their ``rul``, in that order, is a parameter).
    ``life_link``: the engine effects regress on the engine's log life (module docstring);
    False makes them independent of it (the first version)."""
    _check(y, mask, length, censored_rows)
    cidx = np.asarray(censored_rows, int)
    B, T = np.shape(y)
    dtype = jnp.result_type(float)  # float64 under jax_enable_x64, else float32
    y = jnp.asarray(y, dtype)
    length_f = jnp.asarray(length, dtype)
    mu_a = numpyro.sample("mu_a", dist.Normal(jnp.asarray(0.8, dtype), 0.5))
    sd_a = numpyro.sample("sd_a", dist.HalfNormal(jnp.asarray(0.3, dtype)))
    mu_e = numpyro.sample("mu_e", dist.Normal(jnp.asarray(0.0, dtype), 0.5))
    beta_e = numpyro.sample("beta_e", dist.Normal(jnp.asarray(0.0, dtype), 1.0))
    sd_e = numpyro.sample("sd_e", dist.HalfNormal(jnp.asarray(0.3, dtype)))
    mu_tau = numpyro.sample("mu_tau", dist.Normal(jnp.asarray(np.log(50.0), dtype), 1.0))
    sd_tau = numpyro.sample("sd_tau", dist.HalfNormal(jnp.asarray(0.5, dtype)))
    mu_life = numpyro.sample("mu_life", dist.Normal(jnp.asarray(np.log(200.0), dtype), 1.0))
    sd_life = numpyro.sample("sd_life", dist.HalfNormal(jnp.asarray(0.5, dtype)))
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.asarray(0.2, dtype)))
    life = length_f
    log_rul = None
    if len(cidx):
        # flat on log RUL; the life prior (below) with its Jacobian makes it proper
        log_rul = numpyro.sample("log_rul", dist.ImproperUniform(
            dist.constraints.real, (), event_shape=(len(cidx),)))
        rul = jnp.exp(log_rul)
        numpyro.deterministic("rul", rul)
        life = life.at[cidx].add(rul)
    life_lp = dist.LogNormal(mu_life, sd_life).log_prob(life).sum()
    if log_rul is not None:
        life_lp = life_lp + log_rul.sum()  # d life / d log_rul = rul
    numpyro.factor("life", life_lp)
    if life_link:
        # the engine effects depend on the engine's (log) life: one Gaussian over
        # (log life, a, e, log tau), written as a chain of regressions
        c = jnp.asarray(2.0, dtype)
        b_a = numpyro.sample("b_a", dist.Normal(jnp.asarray(0.0, dtype), c))
        b_e = numpyro.sample("b_e", dist.Normal(jnp.asarray(0.0, dtype), c))
        b_tau = numpyro.sample("b_tau", dist.Normal(jnp.asarray(0.0, dtype), c))
        b_tau_a = numpyro.sample("b_tau_a", dist.Normal(jnp.asarray(0.0, dtype), c))
        b_tau_e = numpyro.sample("b_tau_e", dist.Normal(jnp.asarray(0.0, dtype), c))
        s = jnp.log(life) - mu_life
    else:
        b_a = b_e = b_tau = b_tau_a = b_tau_e = 0.0
        s = jnp.zeros_like(life)
    with numpyro.plate("unit", B):
        # centred: every engine's path pins its own effects (hundreds of cycles each)
        a = numpyro.sample("a", dist.Normal(mu_a + b_a * s, sd_a))
        e = numpyro.sample("e", dist.Normal(mu_e + beta_e * (a - mu_a) + b_e * s, sd_e))
        log_tau = numpyro.sample("log_tau", dist.Normal(
            mu_tau + b_tau * s + b_tau_a * (a - mu_a) + b_tau_e * (e - mu_e), sd_tau))
    tau = jnp.exp(log_tau)
    t = jnp.minimum(jnp.arange(1, T + 1, dtype=dtype)[None, :], length_f[:, None])  # padding: last cycle
    mean = a[:, None] - (a - e)[:, None] * jnp.exp(-(life[:, None] - t) / tau[:, None])
    with numpyro.handlers.mask(mask=jnp.asarray(mask)):
        numpyro.sample("y", dist.Normal(mean, sigma), obs=y)


def init_values(data: dict, life_link: bool = True) -> dict:
    """A starting point for NUTS: population values near FD001's, engines at the mean, each
    censored unit's RUL at the mean remaining life of a training unit of its age (at least 5)."""
    length = np.asarray(data["length"])
    B = len(length)
    censored = np.zeros(B, bool)
    censored[list(data["censored_rows"])] = True
    life = length[~censored]
    out = {"b_a": 0.0, "b_e": 0.0, "b_tau": 0.0, "b_tau_a": 0.0, "b_tau_e": 0.0, "mu_a": 0.8, "sd_a": 0.1, "mu_e": -0.1, "beta_e": 0.0, "sd_e": 0.15,
           "mu_tau": float(np.log(50.0)), "sd_tau": 0.2, "mu_life": float(np.log(life).mean()),
           "sd_life": float(max(np.log(life).std(), 0.05)), "sigma": 0.05,
           "a": np.full(B, 0.8), "e": np.full(B, -0.1), "log_tau": np.full(B, np.log(50.0))}
    if not life_link:
        out = {k: v for k, v in out.items() if not k.startswith("b_")}
    if censored.any():
        guess = [max(5.0, float(np.mean(life[life > n] - n)) if np.any(life > n) else 5.0)
                 for n in length[censored]]
        out["log_rul"] = np.log(np.array(guess))
    return out


def predict_rul(fit, data: dict, *, cap: int = 125) -> pd.DataFrame:
    """Posterior RUL quantiles of the censored rows of ``data`` (``data["censored_rows"]``, in
    that order) from a Fit of :func:`model`: columns of
    :data:`bayeslik.models.cmapss.QUANTILE_COLUMNS` and the mean, all capped at ``cap``, indexed
    by row."""
    from bayeslik.models.cmapss import QUANTILE_COLUMNS, QUANTILES

    rul = fit.draws("rul")
    rul = rul.reshape((-1,) + rul.shape[2:])          # (draws, censored units)
    q = np.quantile(rul, QUANTILES, axis=0).T
    out = pd.DataFrame(np.minimum(q, cap), columns=list(QUANTILE_COLUMNS),
                       index=list(data["censored_rows"]))
    out["mean"] = np.minimum(rul, cap).mean(0)
    return out


def validation_cuts(p: dict, *, seed: int = 22, min_rul: int = 7, max_rul: int = 145,
                    min_cycles: int = 31) -> tuple[dict, dict]:
    """Random cut points for validating on run-to-failure units, shaped like the FD001 test set
    (true RUL 7..145, at least 31 cycles observed): for every unit of ``p`` (:func:`paths`) a RUL
    r uniform on ``min_rul .. min(max_rul, length - min_cycles)``. Returns ({unit: cycles kept},
    {unit: true RUL}); use with :func:`truncate`."""
    rng = np.random.default_rng(seed)
    cut, truth = {}, {}
    for u, n in zip(p["units"], p["length"]):
        top = min(max_rul, int(n) - min_cycles)
        if top < min_rul:
            raise DataError(f"validation_cuts: unit {u} has {n} cycles, too few to keep {min_cycles} "
                            f"and leave {min_rul}; drop it or lower min_cycles")
        r = int(rng.integers(min_rul, top + 1))
        cut[int(u)], truth[int(u)] = int(n) - r, r
    return cut, truth
