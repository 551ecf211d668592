r"""posteriordb ODE posteriors as NumPyro programs, with the ODEs solved by `diffrax`.

Two posteriors from `posteriordb <https://github.com/stan-dev/posteriordb>`_ (BSD-3-Clause, commit
``28f8d3d6``) whose Stan models integrate an ordinary differential equation. Their Stan code, data,
reference draws and info files are bundled under ``data/posteriordb/``; load them with
:func:`bayeslik.models.posteriordb.load`. Posteriors, their models and the models' sites:

* ``hudson_lynx_hare-lotka_volterra``: :func:`lotka_volterra`: sample sites ``theta[4]``,
  ``z_init[2]``, ``sigma[2]``; deterministic ``z[N, 2]`` (the ODE solution, Stan's transformed
  parameter); observed ``y_init[2]`` and ``y[N, 2]``;
* ``one_comp_mm_elim_abs-one_comp_mm_elim_abs``: :func:`one_comp_mm_elim_abs`: sample sites ``k_a``,
  ``K_m``, ``V_m``, ``sigma``; deterministic ``C[N_t, 1]`` (the ODE solution); observed
  ``C_hat[N_t]``.

**The ODE solver.** Stan's ``integrate_ode_rk45`` is the Dormand-Prince 5(4) pair with dense output
(Boost.odeint), and ``integrate_ode_bdf`` is CVODES' BDF method. Both models here are solved with
``diffrax.Dopri5`` (the same Dormand-Prince pair; neither ODE is stiff on the posterior), an adaptive
``PIDController`` step, and ``SaveAt(ts=...)`` (dense interpolation, as Boost's ``integrate_times``).
The tolerances depend on the floating-point type of the state, not on the model:

* float64: ``rtol = atol = 1e-10``. That equals the defaults of ``integrate_ode_bdf`` (Stan Math:
  relative and absolute tolerance 1e-10), which the one-compartment model uses, and is tighter than the
  ``1e-5`` / ``1e-3`` that the Lotka-Volterra program passes to ``integrate_ode_rk45`` (at Stan's
  tolerances the solution is off by about 5e-4 relative, which moves the log density by about 1e-2; at
  1e-10 the ODE error in the log density is below 1e-7);
* float32: ``rtol = atol = 1e-6``, the tightest that float32 supports reliably (its resolution is
  1.2e-7). That is tighter than the Lotka-Volterra program asks for, and looser than the bdf defaults,
  which float32 cannot reach.

At most ``max_steps = 10_000`` steps per solve (the Lotka-Volterra program allows 500 steps between
each of its 20 output times, 10,000 in all). On the reference draws a solve takes 300-340 steps
(Lotka-Volterra) and about 55 (one-compartment) in float64, 60-70 and about 12 in float32. Gradients
are reverse-mode through the solver (diffrax's default ``RecursiveCheckpointAdjoint``), the solve is
jit-able and vmap-able, and a failed solve (for example the step limit reached) does not raise:
``throw=False``, and the solution is then replaced by NaN, so the log density is NaN and a sampler
treats the proposal as a divergence (Stan rejects it).

**How the log density compares with Stan's** (``load(name)["info"]["stan_lp_offset"]``, the NumPyro
log joint minus Stan's full log density with all constants and no Jacobian):

* Lotka-Volterra: ``theta`` has ``normal`` priors on ``real<lower=0>``, which Stan does not
  renormalise. The NumPyro program uses the normalised ``TruncatedNormal(low=0)``, whose log density is
  higher by minus the log of the mass above 0: :math:`-\log\Phi(1/0.5) = -\log\Phi(2)` for ``theta[1]``
  and ``theta[3]`` (``normal(1, 0.5)``), :math:`-\log\Phi(0.05/0.05) = -\log\Phi(1)` for ``theta[2]``
  and ``theta[4]`` (``normal(0.05, 0.05)``); the offset is
  :math:`-2\log\Phi(2) - 2\log\Phi(1) \approx 0.3915`. The lognormal priors and likelihood are
  normalised on the half line in Stan too and add nothing;
* one-compartment: four ``cauchy(0, 1)`` priors on ``real<lower=0>`` become ``HalfCauchy(1)``:
  offset ``4 log 2``.

Example
-------
>>> from bayeslik.models import posteriordb
>>> post = posteriordb.load("hudson_lynx_hare-lotka_volterra")
>>> post["reference"]["theta"].shape
(10, 1000, 4)
"""

from __future__ import annotations

import math

import diffrax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from bayeslik.errors import DataError
from bayeslik.inits import set_default_init

__all__ = ["MODELS", "lotka_volterra", "one_comp_mm_elim_abs", "solve_ode"]

# Defined here rather than imported from bayeslik.models.posteriordb (which imports this module at its
# end to register MODELS): importing this module first must not run into a half-initialised module.
_LOG2 = math.log(2.0)


def _check_length(value, length, what):
    if value is not None and np.shape(value)[0] != length:
        raise DataError(f"{what} has length {np.shape(value)[0]}, expected {length}")


#: Largest number of solver steps in one solve (Stan's Lotka-Volterra code: 500 per output interval).
MAX_STEPS = 10_000


def _log_normal_cdf(x: float) -> float:
    """log Phi(x) for the standard normal, in float64."""
    return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))


def _tolerances(dtype) -> tuple[float, float]:
    """(rtol, atol) for a state of this floating-point type: 1e-10 in float64, 1e-6 in float32."""
    return (1e-10, 1e-10) if jnp.finfo(dtype).bits >= 64 else (1e-6, 1e-6)


def solve_ode(vector_field, y0, t0, ts, args, *, max_steps: int = MAX_STEPS,
              rtol: float | None = None, atol: float | None = None):
    r"""Solve :math:`\dot y = f(t, y, \text{args})`, :math:`y(t_0) = y_0`, at the times ``ts``.

    Dormand-Prince 5(4) (``diffrax.Dopri5``) with an adaptive ``PIDController`` step; the tolerances
    follow the dtype of ``y0`` (see the module docs). Reverse-mode differentiable, jit-able and
    vmap-able.

    Args:
        vector_field: ``f(t, y, args) -> dy/dt``, same shape as ``y``.
        y0: initial state (array).
        t0: initial time, before ``ts[0]``.
        ts: output times (1-D, increasing, all after ``t0``).
        args: passed to ``vector_field``.
        max_steps: largest number of solver steps.
        rtol, atol: the step controller's tolerances; ``None``: by dtype (see the module docs).

    Returns:
        The solution at ``ts``, shape ``(len(ts),) + y0.shape``; all NaN if the solve failed (for
        example, the step limit was reached), so that a log density built on it is NaN.

    Example:
        >>> ys = solve_ode(lambda t, y, k: -k * y, jnp.ones(1), 0.0, jnp.array([1.0, 2.0]), 0.5)
        >>> ys.shape
        (2, 1)
    """
    y0 = jnp.asarray(y0)
    ts = jnp.asarray(ts, dtype=y0.dtype)
    rtol_d, atol_d = _tolerances(y0.dtype)
    rtol = rtol_d if rtol is None else max(rtol, rtol_d)  # never tighter than the dtype resolves
    atol = atol_d if atol is None else max(atol, atol_d)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Dopri5(),
        t0=jnp.asarray(t0, dtype=y0.dtype),
        t1=ts[-1],
        dt0=None,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,
    )
    ok = sol.result == diffrax.RESULTS.successful
    return jnp.where(ok, sol.ys, jnp.nan)


# --------------------------------------------------------------------------------------------------
# Lotka-Volterra predator-prey model
# --------------------------------------------------------------------------------------------------
def _lotka_volterra_field(t, z, theta):
    u, v = z[0], z[1]  # prey (hares), predators (lynxes)
    alpha, beta, gamma, delta = theta[0], theta[1], theta[2], theta[3]
    return jnp.stack([(alpha - beta * v) * u, (-gamma + delta * u) * v])


_LV_PRIOR_LOC = (1.0, 0.05, 1.0, 0.05)
_LV_PRIOR_SCALE = (0.5, 0.05, 0.5, 0.05)
# minus the log mass above 0 of each theta prior: TruncatedNormal minus Stan's unnormalised normal
_LV_OFFSET = -sum(_log_normal_cdf(m / s) for m, s in zip(_LV_PRIOR_LOC, _LV_PRIOR_SCALE))


#: the tolerances lotka_volterra.stan passes to integrate_ode_rk45 (relative, absolute)
LV_STAN_TOLERANCES = (1e-5, 1e-3)


def lotka_volterra(N, ts, y_init=None, y=None, *, rtol: float = LV_STAN_TOLERANCES[0],
                   atol: float = LV_STAN_TOLERANCES[1]):
    r"""Lotka-Volterra predator-prey model of the Hudson's Bay lynx and hare pelts.

    Translation of ``lotka_volterra.stan``.

    Prey :math:`u` (hares) and predators :math:`v` (lynxes), in thousands of pelts, solve

    .. math::
        \frac{du}{dt} = (\alpha - \beta v)\,u, \qquad \frac{dv}{dt} = (-\gamma + \delta u)\,v,
        \qquad (u, v)(0) = z_\text{init},

    with :math:`\theta = (\alpha, \beta, \gamma, \delta)`; :math:`z_{n} = (u, v)(t_n)` at the
    measurement times. Priors and measurement model (:math:`k = 1, 2` for prey, predators):

    .. math::
        \alpha, \gamma \sim N^+(1, 0.5), \quad \beta, \delta \sim N^+(0.05, 0.05), \quad
        \sigma_k \sim \mathrm{LogNormal}(-1, 1), \quad z_{\text{init},k} \sim
        \mathrm{LogNormal}(\log 10, 1), \\
        y_{\text{init},k} \sim \mathrm{LogNormal}(\log z_{\text{init},k}, \sigma_k), \quad
        y_{n,k} \sim \mathrm{LogNormal}(\log z_{n,k}, \sigma_k), \qquad n = 1, \dots, N.

    :math:`N^+` is the normal truncated to :math:`(0, \infty)` and normalised (``TruncatedNormal``);
    Stan's ``normal`` on ``real<lower=0>`` is not renormalised, so the log density here is higher than
    Stan's by :math:`-2\log\Phi(2) - 2\log\Phi(1)`. The ODE is solved by :func:`solve_ode` from
    :math:`t = 0`.

    Sample sites ``theta`` (4,), ``z_init`` (2,), ``sigma`` (2,), all > 0; deterministic ``z`` (N, 2);
    observed ``y_init`` (2,) and ``y`` (N, 2).

    Args:
        N: number of measurement times.
        ts: measurement times (N,), increasing, all > 0.
        y_init: measured populations at time 0 (2,), or ``None`` to sample them.
        y: measured populations at ``ts`` (N, 2), or ``None`` to sample them.
        rtol, atol: the ODE solver's tolerances; by default the ``1e-5`` / ``1e-3`` that the Stan
            program passes to ``integrate_ode_rk45`` (the reference draws were made with them).
            The tests pass ``1e-10`` to compare with a SciPy solution at that accuracy.

    Example:
        >>> from bayeslik.models import posteriordb
        >>> post = posteriordb.load("hudson_lynx_hare-lotka_volterra")
        >>> post["data"]["y"].shape
        (20, 2)
        >>> lp, trace = numpyro.infer.util.log_density(lotka_volterra, (), post["data"],
        ...     {k: v[0, 0] for k, v in post["reference"].items()})     # doctest: +SKIP
        >>> trace["z"]["value"].shape                                     # doctest: +SKIP
        (20, 2)
    """
    _check_length(ts, N, "ts")
    _check_length(y, N, "y")
    if y is not None and np.shape(y)[1:] != (2,):
        raise DataError(f"y has shape {np.shape(y)}, expected ({N}, 2)")
    _check_length(y_init, 2, "y_init")
    with numpyro.plate("parameter", 4):
        theta = numpyro.sample(
            "theta", dist.TruncatedNormal(jnp.array(_LV_PRIOR_LOC), jnp.array(_LV_PRIOR_SCALE), low=0.0)
        )
    with numpyro.plate("species", 2):
        z_init = numpyro.sample("z_init", dist.LogNormal(math.log(10.0), 1.0))
        sigma = numpyro.sample("sigma", dist.LogNormal(-1.0, 1.0))
    z = numpyro.deterministic("z", solve_ode(_lotka_volterra_field, z_init, 0.0, ts, theta,
                                             rtol=rtol, atol=atol))
    with numpyro.plate("species", 2, dim=-1):
        numpyro.sample("y_init", dist.LogNormal(jnp.log(z_init), sigma), obs=y_init)
        with numpyro.plate("time", N, dim=-2):
            numpyro.sample("y", dist.LogNormal(jnp.log(z), sigma), obs=y)



def _lotka_volterra_init(N, ts, y_init=None, y=None, **_tolerances) -> dict:
    """The default starting point (``init="auto"``): theta at its prior locations (1, 0.05, 1,
    0.05), z_init at the measured first populations, sigma at 0.25. Uniform starts in [-2, 2]
    put rates up to 7.4 into the ODE, where each solve takes thousands of steps; the chains then
    crawl (about 3 iterations a second for 4 chains on 2 cores) until they find the data."""
    z0 = np.full(2, 10.0) if y_init is None else np.maximum(np.asarray(y_init, float), 1e-3)
    return {"theta": np.array(_LV_PRIOR_LOC), "z_init": z0, "sigma": np.full(2, 0.25)}


set_default_init(lotka_volterra, _lotka_volterra_init)

# --------------------------------------------------------------------------------------------------
# one-compartment pharmacokinetics, first-order absorption, Michaelis-Menten elimination
# --------------------------------------------------------------------------------------------------
def _one_comp_field(t, c, args):
    k_a, K_m, V_m, D, V = args
    # Stan: `if (t > 0) dose = ...`. Here t >= 0: the right-hand side changes only at the single
    # point t = 0, which leaves the solution unchanged; with t0 = 0 Stan's guard would make the first
    # Runge-Kutta stage see a jump of D k_a / V that the embedded error estimate barely notices
    # (float32 solution error 1.8e-5 instead of 3.7e-6, and 27 steps instead of 12)
    dose = jnp.where(t >= 0, jnp.exp(-k_a * t) * D * k_a / V, 0.0)
    elim = (V_m / V) * c / (K_m + c)
    return dose - elim


def one_comp_mm_elim_abs(t0, D, V, N_t, times, C_hat=None):
    r"""One-compartment pharmacokinetics with first-order absorption and Michaelis-Menten elimination.

    Translation of ``one_comp_mm_elim_abs.stan``. The concentration :math:`C(t)` (mg/L) after a dose
    :math:`D` (mg) into a compartment of volume :math:`V` (L) solves

    .. math::
        \frac{dC}{dt} = \mathbb 1[t \ge 0]\, \frac{D\, k_a}{V} e^{-k_a t}
                        - \frac{V_m}{V} \frac{C}{K_m + C}, \qquad C(t_0) = 0,

    and the measurements are lognormal around it:

    .. math::
        k_a, K_m, V_m, \sigma \sim \mathrm{Cauchy}^+(0, 1), \qquad
        \hat C_n \sim \mathrm{LogNormal}(\log C(t_n), \sigma), \qquad n = 1, \dots, N_t.

    The initial concentration is 0, hard-coded in the Stan program's transformed data. Stan solves the
    ODE with ``integrate_ode_bdf`` at its default tolerances (1e-10); here :func:`solve_ode`
    (Dormand-Prince, 1e-10 in float64, 1e-6 in float32) does, as the ODE is not stiff. The Stan code
    adds the dose for :math:`t > 0`; here for :math:`t \ge 0`, which changes the right-hand side at the
    single point :math:`t = 0` only and so leaves the solution unchanged, but keeps the first
    Runge-Kutta stage (at :math:`t_0 = 0`) from seeing a jump that the step-size control
    underestimates (the float32 solution is 5 times more accurate).

    Sample sites ``k_a``, ``K_m``, ``V_m``, ``sigma`` (all > 0, ``HalfCauchy(1)`` priors: Stan's
    ``cauchy(0, 1)`` on ``real<lower=0>``, normalised, so the log density is higher by ``4 log 2``);
    deterministic ``C`` (N_t, 1), Stan's transformed parameter; observed ``C_hat`` (N_t,).

    Args:
        t0: initial time (days), before ``times[0]``.
        D: total dose (mg).
        V: compartment volume (L).
        N_t: number of measurements.
        times: measurement times (N_t,), increasing, all > ``t0``.
        C_hat: measured concentrations (N_t,), or ``None`` to sample them.

    Example:
        >>> from bayeslik.models import posteriordb
        >>> post = posteriordb.load("one_comp_mm_elim_abs")
        >>> post["data"]["D"], post["data"]["V"], post["data"]["times"].shape
        (30, 2, (20,))
    """
    _check_length(times, N_t, "times")
    _check_length(C_hat, N_t, "C_hat")
    k_a = numpyro.sample("k_a", dist.HalfCauchy(1.0))
    K_m = numpyro.sample("K_m", dist.HalfCauchy(1.0))
    V_m = numpyro.sample("V_m", dist.HalfCauchy(1.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(1.0))
    dtype = jnp.result_type(k_a, K_m, V_m, float)
    C = solve_ode(_one_comp_field, jnp.zeros(1, dtype), t0, times, (k_a, K_m, V_m, D, V))
    C = numpyro.deterministic("C", C)
    with numpyro.plate("time", N_t):
        numpyro.sample("C_hat", dist.LogNormal(jnp.log(C[:, 0]), sigma), obs=C_hat)


MODELS = {
    "hudson_lynx_hare-lotka_volterra": (lotka_volterra, _LV_OFFSET),
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": (one_comp_mm_elim_abs, 4.0 * _LOG2),
}
