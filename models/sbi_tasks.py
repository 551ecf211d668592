r"""Five tasks of the simulation-based-inference benchmark sbibm, as bayeslik simulators.

sbibm (Lueckmann, Boelts, Greenberg, Goncalves and Macke, *Benchmarking Simulation-Based
Inference*, AISTATS 2021; the ``sbibm`` package, MIT licence) defines each task by a prior, a
simulator, ten observations and 10,000 reference posterior draws per observation. Here the priors
are NumPyro programs with one vector site ``theta`` (sbibm's ``parameters``, in its order) and the
simulators are JAX functions ``simulator(rng_key, {"theta": theta}) -> x`` (vmapped and compiled
by :class:`bayeslik.SimulatorPosterior`). The observations and reference draws of observations
1-3 are the sbibm files, bundled under ``benchmarks/data/sbibm/<task>/num_observation_<i>/``
(see its README for the source and licence).

Tasks (``task(name)``):

* ``two_moons`` (2 parameters, 2 data): :math:`\theta \sim U(-1, 1)^2`;
  :math:`a \sim U(-\pi/2, \pi/2)`, :math:`r \sim N(0.1, 0.01^2)`,
  :math:`x = (r\cos a + 0.25 - |\theta_1 + \theta_2|/\sqrt2,\; r\sin a + (\theta_2 -
  \theta_1)/\sqrt2)`. A crescent-shaped, bimodal posterior.
* ``slcp`` (5 parameters, 8 data): :math:`\theta \sim U(-3, 3)^5`; four independent 2-D normal
  draws with mean :math:`(\theta_1, \theta_2)`, sds :math:`s_1 = \theta_3^2, s_2 = \theta_4^2`,
  correlation :math:`\tanh\theta_5` (plus :math:`10^{-6}` on the covariance's diagonal), flattened
  draw by draw (:math:`x = (u_1, v_1, u_2, v_2, \dots)`). The likelihood is simple, the posterior
  has four modes (the signs of :math:`\theta_3, \theta_4`).
* ``gaussian_linear`` (10 parameters, 10 data): :math:`\theta \sim N(0, 0.1 I)`,
  :math:`x \sim N(\theta, 0.1 I)` (variances 0.1). The posterior is
  :math:`N(x/2, 0.05 I)` (:meth:`Task.analytic_posterior`).
* ``lotka_volterra`` (4 parameters, 20 data): :math:`\theta = (\alpha, \beta, \gamma, \delta)`,
  independent log-normal priors, :math:`\log\alpha, \log\gamma \sim N(-0.125, 0.5^2)`,
  :math:`\log\beta, \log\delta \sim N(-3, 0.5^2)`; the predator-prey ODE
  :math:`\dot u = \alpha u - \beta u v`, :math:`\dot v = -\gamma v + \delta u v` from
  :math:`(u, v) = (30, 1)` at :math:`t = 0`; sbibm saves the solution every 0.1 days for 20 days
  and keeps every 21st point, :math:`t = 0, 2.1, \dots, 18.9` (10 times); the data are
  log-normal around them, :math:`\log x = \log \mathrm{clip}(u(t), 10^{-10}, 10^4) + 0.1\,
  \varepsilon`, prey's ten values then the predators'.
* ``sir`` (2 parameters, 10 data): contact rate :math:`\beta`, recovery rate :math:`\gamma`,
  :math:`\log\beta \sim N(\log 0.4, 0.5^2)`, :math:`\log\gamma \sim N(\log 0.125, 0.2^2)`;
  the SIR ODE with :math:`N = 10^6`, :math:`(S, I, R)(0) = (N - 1, 1, 0)`, saved daily for 160
  days, every 17th day kept (:math:`t = 0, 17, \dots, 153`); the data are binomial counts,
  :math:`x_j \sim \mathrm{Binomial}(1000, \mathrm{clip}(I(t_j)/N, 0, 1))`.

**ODE solves.** sbibm solved them with Julia's DifferentialEquations.jl (``diffeqtorch``) at its
default tolerances (relative 1e-3, absolute 1e-6) and saved on a dense grid. Here
:func:`bayeslik.models.posteriordb_ode.solve_ode` (Dormand-Prince 5(4), adaptive steps, rtol =
atol = 1e-6 in float32) is asked for the 10 kept times only (the same values: the grid only
subsamples the solution). A failed solve gives NaN data, as in sbibm; ``SimulatorPosterior``
counts such simulations and SNL leaves them out of training.

Example
-------
>>> import jax
>>> from bayeslik.models import sbi_tasks
>>> t = sbi_tasks.task("gaussian_linear")
>>> t.dim_parameters, t.dim_data, t.observation(1).shape
(10, 10, (10,))
>>> post = t.posterior(1)
>>> x, bad = post.simulate(jax.random.key(0), post.sample_prior(jax.random.key(1), 4))
>>> x.shape, int(bad.sum())
((4, 10), 0)
"""

from __future__ import annotations

import bz2
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from bayeslik.errors import DataError, ModelError

__all__ = ["TASKS", "Task", "task", "data_dir", "two_moons_simulator", "slcp_simulator",
           "gaussian_linear_simulator", "lotka_volterra_simulator", "sir_simulator"]

#: the sbibm version whose observation and reference files are bundled
SBIBM_VERSION = "1.1.0"
#: observations bundled per task
OBSERVATIONS = (1, 2, 3)


def data_dir() -> Path:
    """Where the sbibm files are: ``$BAYESLIK_SBIBM_DATA`` if set, else
    ``benchmarks/data/sbibm`` of the source checkout (they are not installed with the package)."""
    env = os.environ.get("BAYESLIK_SBIBM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "benchmarks" / "data" / \
        "sbibm"


# ---------------------------------------------------------------------------- two moons
def _two_moons_prior():
    numpyro.sample("theta", dist.Uniform(-jnp.ones(2), jnp.ones(2)).to_event(1))


def two_moons_simulator(rng_key, params):
    """One two-moons dataset (2,) at ``params["theta"]`` (2,)."""
    theta = params["theta"]
    k_a, k_r = jax.random.split(rng_key)
    a = jax.random.uniform(k_a, (), minval=-math.pi / 2, maxval=math.pi / 2)
    r = 0.1 + 0.01 * jax.random.normal(k_r, ())
    # the parameters rotated by -45 degrees; the first coordinate folded (the bimodality)
    z0 = (theta[0] + theta[1]) / math.sqrt(2.0)
    z1 = (theta[1] - theta[0]) / math.sqrt(2.0)
    return jnp.stack([r * jnp.cos(a) + 0.25 - jnp.abs(z0), r * jnp.sin(a) + z1])


# ---------------------------------------------------------------------------- SLCP
def _slcp_prior():
    numpyro.sample("theta", dist.Uniform(-3.0 * jnp.ones(5), 3.0 * jnp.ones(5)).to_event(1))


def slcp_simulator(rng_key, params):
    """Four 2-D normal draws (flattened to (8,)) at ``params["theta"]`` (5,)."""
    theta = params["theta"]
    s1, s2 = theta[2] ** 2, theta[3] ** 2
    rho = jnp.tanh(theta[4])
    cov = jnp.array([[s1 ** 2 + 1e-6, rho * s1 * s2], [rho * s1 * s2, s2 ** 2 + 1e-6]])
    # a 2x2 Cholesky factor in closed form (jnp.linalg.cholesky would do; this is exact and cheap)
    l11 = jnp.sqrt(cov[0, 0])
    l21 = cov[1, 0] / l11
    l22 = jnp.sqrt(jnp.maximum(cov[1, 1] - l21 ** 2, 0.0))
    eps = jax.random.normal(rng_key, (4, 2))
    u = theta[0] + l11 * eps[:, 0]
    v = theta[1] + l21 * eps[:, 0] + l22 * eps[:, 1]
    return jnp.stack([u, v], axis=1).reshape(8)


# ---------------------------------------------------------------------------- gaussian linear
GL_DIM, GL_PRIOR_VAR, GL_NOISE_VAR = 10, 0.1, 0.1


def _gaussian_linear_prior():
    numpyro.sample("theta", dist.Normal(jnp.zeros(GL_DIM), math.sqrt(GL_PRIOR_VAR)).to_event(1))


def gaussian_linear_simulator(rng_key, params):
    """``x ~ N(theta, 0.1 I)`` (10,)."""
    theta = params["theta"]
    return theta + math.sqrt(GL_NOISE_VAR) * jax.random.normal(rng_key, theta.shape)


# ---------------------------------------------------------------------------- Lotka-Volterra
LV_LOC = (-0.125, -3.0, -0.125, -3.0)
LV_SCALE = 0.5
LV_U0 = (30.0, 1.0)
#: sbibm: saved every 0.1 days for 20 days (201 points), every 21st kept
LV_TIMES = tuple(round(0.1 * i, 10) for i in range(0, 201, 21))
LV_NOISE = 0.1


def _lotka_volterra_prior():
    numpyro.sample("theta", dist.LogNormal(jnp.asarray(LV_LOC), LV_SCALE).to_event(1))


def _lv_field(t, u, theta):
    alpha, beta, gamma, delta = theta[0], theta[1], theta[2], theta[3]
    prey, pred = u[0], u[1]
    return jnp.stack([alpha * prey - beta * prey * pred, -gamma * pred + delta * prey * pred])


def lotka_volterra_simulator(rng_key, params):
    """Log-normal observations (20,) of the Lotka-Volterra solution at 10 times: prey, then
    predators; NaN where the solve failed."""
    from bayeslik.models.posteriordb_ode import solve_ode

    theta = params["theta"]
    dtype = jnp.result_type(theta.dtype, jnp.float32)
    ts = jnp.asarray(LV_TIMES, dtype)
    u = solve_ode(_lv_field, jnp.asarray(LV_U0, dtype), 0.0, ts, theta.astype(dtype))  # (10, 2)
    mean = jnp.log(jnp.clip(u.T.reshape(-1), 1e-10, 1e4))
    return jnp.exp(mean + LV_NOISE * jax.random.normal(rng_key, mean.shape, dtype))


# ---------------------------------------------------------------------------- SIR
SIR_N = 1_000_000.0
SIR_TIMES = tuple(float(d) for d in range(0, 161, 17))
SIR_COUNT = 1000


def _sir_prior():
    numpyro.sample("theta", dist.LogNormal(jnp.array([math.log(0.4), math.log(0.125)]),
                                           jnp.array([0.5, 0.2])).to_event(1))


def _sir_field(t, u, theta):
    beta, gamma = theta[0], theta[1]
    s, i = u[0], u[1]
    infection = beta * s * i / SIR_N
    return jnp.stack([-infection, infection - gamma * i, gamma * i])


def sir_simulator(rng_key, params):
    """Binomial counts (10,) of infected among 1000, at days 0, 17, ..., 153; NaN where the solve
    failed."""
    from bayeslik.models.posteriordb_ode import solve_ode

    theta = params["theta"]
    dtype = jnp.result_type(theta.dtype, jnp.float32)
    ts = jnp.asarray(SIR_TIMES, dtype)
    u = solve_ode(_sir_field, jnp.asarray([SIR_N - 1.0, 1.0, 0.0], dtype), 0.0, ts,
                  theta.astype(dtype))
    p = jnp.clip(u[:, 1] / SIR_N, 0.0, 1.0)
    ok = jnp.all(jnp.isfinite(u))
    counts = jax.random.binomial(rng_key, SIR_COUNT, jnp.where(ok, p, 0.5)).astype(dtype)
    return jnp.where(ok, counts, jnp.nan)


# ---------------------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class Task:
    """One sbibm task: ``prior`` (a NumPyro program, site ``theta``), ``simulator`` (JAX,
    ``simulator(rng_key, {"theta": theta}) -> x``), the sizes, and the bundled observations and
    reference posterior draws."""

    name: str
    prior: Callable
    simulator: Callable
    dim_parameters: int
    dim_data: int
    display_name: str

    def _file(self, observation_index: int, filename: str) -> Path:
        if observation_index not in OBSERVATIONS:
            raise DataError(f"observation_index={observation_index!r}: the bundled sbibm files "
                            f"hold observations {list(OBSERVATIONS)} of task {self.name!r}.")
        path = data_dir() / self.name / f"num_observation_{observation_index}" / filename
        if not path.exists():
            raise DataError(f"{path} is missing: the sbibm files live in benchmarks/data/sbibm of "
                            "the source checkout; set BAYESLIK_SBIBM_DATA to their directory.")
        return path

    def _csv(self, observation_index: int, filename: str, width: int) -> np.ndarray:
        path = self._file(observation_index, filename)
        opener = bz2.open if filename.endswith(".bz2") else open
        with opener(path, "rt") as f:
            a = np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2)
        if a.shape[1] != width:
            raise DataError(f"{path} has {a.shape[1]} columns, task {self.name!r} has {width}")
        return a

    def observation(self, observation_index: int = 1) -> np.ndarray:
        """sbibm's observation ``observation_index`` (dim_data,), float32."""
        return self._csv(observation_index, "observation.csv", self.dim_data)[0].astype(
            np.float32)

    def true_parameters(self, observation_index: int = 1) -> np.ndarray:
        """The parameters sbibm simulated that observation at (dim_parameters,)."""
        return self._csv(observation_index, "true_parameters.csv", self.dim_parameters)[0]

    def reference_samples(self, observation_index: int = 1) -> np.ndarray:
        """sbibm's 10,000 reference posterior draws (10000, dim_parameters) of the observation."""
        return self._csv(observation_index, "reference_posterior_samples.csv.bz2",
                         self.dim_parameters)

    def posterior(self, observation_index: int = 1):
        """A :class:`bayeslik.SimulatorPosterior` of the prior, the simulator and sbibm's
        observation ``observation_index``."""
        from bayeslik.simulator import SimulatorPosterior

        return SimulatorPosterior(self.prior, self.simulator, self.observation(observation_index),
                                  simulator_kind="jax")

    def analytic_posterior(self, observation) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, variances)`` of the exact posterior; gaussian_linear only."""
        if self.name != "gaussian_linear":
            raise ModelError(f"task {self.name!r} has no closed-form posterior; only "
                             "'gaussian_linear' has.")
        x = np.asarray(observation, np.float64)
        shrink = GL_PRIOR_VAR / (GL_PRIOR_VAR + GL_NOISE_VAR)
        var = GL_PRIOR_VAR * GL_NOISE_VAR / (GL_PRIOR_VAR + GL_NOISE_VAR)
        return shrink * x, np.full(x.shape, var)


TASKS: dict[str, Task] = {
    "two_moons": Task("two_moons", _two_moons_prior, two_moons_simulator, 2, 2, "Two Moons"),
    "slcp": Task("slcp", _slcp_prior, slcp_simulator, 5, 8, "SLCP"),
    "gaussian_linear": Task("gaussian_linear", _gaussian_linear_prior,
                            gaussian_linear_simulator, GL_DIM, GL_DIM, "Gaussian Linear"),
    "lotka_volterra": Task("lotka_volterra", _lotka_volterra_prior, lotka_volterra_simulator,
                           4, 20, "Lotka-Volterra"),
    "sir": Task("sir", _sir_prior, sir_simulator, 2, 10, "SIR"),
}


def task(name: str) -> Task:
    """The sbibm task ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ModelError(f"task({name!r}): unknown sbibm task; choose one of {sorted(TASKS)}.")
    return TASKS[name]
