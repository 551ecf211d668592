"""float64 end to end (issue 18): one switch, JAX's own ``jax_enable_x64`` (or the environment
variable ``JAX_ENABLE_X64=1``), set before anything runs. Each check runs in a fresh process
with the switch on, so this session's float32 programs are not reused.

Default suite: every zoo family's bundled problem (and the C-MAPSS partially-hidden AR-HMM)
binds, starts (the model's own init, in float64) and gives a finite float64 log density and
gradient; SMC and nss run in float64. Slow: every engine on a small model and a short NUTS run
on every family."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ZOO = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    assert jax.config.read("jax_enable_x64")
    import bayeslik as bl
    from bayeslik.cli import FAMILIES, _family_loader
    from bayeslik.engines import nuts
    from bayeslik.inits import default_init
    from bayeslik.models import arhmm, cmapss

    def problems():
        for name, (module, _) in FAMILIES.items():
            if name in {families!r}:
                model, data, _ = _family_loader(module, name)
                yield name, bl.Posterior(model, **data)
        d = cmapss.load()
        hi = cmapss.HealthIndicator.fit(d["train"])
        tr = cmapss.degradation_data(d["train"][d["train"]["unit"] <= 2], hi, 3,
                                     run_to_failure=True)
        yield "cmapss", bl.Posterior(arhmm.model, y=tr["y"], num_states=3, left_to_right=True,
                                     labels=tr["labels"], mask=tr["mask"])

    import time
    out = {{}}
    t = time.time()
    for name, post in problems():
        init = default_init(post) or "uniform"
        z = jnp.asarray(nuts._candidates(post, jax.random.key(0), 1, init, 2.0, 1)[0, 0])
        val, grad = jax.jit(jax.value_and_grad(post.logdensity))(z)
        out[name] = [str(z.dtype), str(val.dtype), bool(jnp.isfinite(val)),
                     bool(jnp.all(jnp.isfinite(grad))), isinstance(init, dict), round(time.time() - t, 1)]
        t = time.time()
    print("RESULT" + json.dumps(out))
""")

ENGINES = textwrap.dedent("""
    import json, sys, jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
    assert jax.config.read("jax_enable_x64")
    import bayeslik as bl
    sys.path.insert(0, {root!r})
    from tests.harness import small

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = np.array([0.3, -1.2, 0.8, 2.0])
    post = bl.Posterior(model, y=jnp.asarray(y))
    # exact: mu | y ~ N(m, s^2) with 1/s^2 = 1/4 + n
    prec = 0.25 + len(y); m, s = y.sum() / prec, prec ** -0.5
    out = {{}}
    for eng in {engines!r}:
        fit = bl.fit(post, eng, seed=0, progress_bar=False, **small(eng))
        mu = fit.posterior["mu"]
        out[eng] = [str(mu.dtype), abs(float(mu.mean()) - m) / s, fit.log_evidence]
    print("RESULT" + json.dumps(out))
""")

NUTS_ZOO = textwrap.dedent("""
    import json, jax, numpy as np
    import bayeslik as bl
    from bayeslik.cli import FAMILIES, _family_loader
    out = {}
    for name, (module, _) in FAMILIES.items():
        model, data, _ = _family_loader(module, name)
        fit = bl.fit(bl.Posterior(model, **data), "nuts", seed=0, progress_bar=False,
                     num_warmup=30, num_samples=10, num_chains=1)
        out[name] = sorted({str(v.dtype) for v in fit.posterior.data_vars.values()})
    print("RESULT" + json.dumps(out))
""")


def _run_x64(code: str, timeout: int = 900) -> dict:
    env = dict(os.environ, JAX_ENABLE_X64="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


#: the families whose model provides its own start (k-means, EM): the default-suite check
WITH_INIT = ("arhmm", "mixture")


def _zoo_check(families) -> dict:
    out = _run_x64(ZOO.format(families=list(families)))
    assert set(out) == set(families) | {"cmapss"}
    for name, (z_dtype, val_dtype, finite, grad_finite, *_) in out.items():
        assert (z_dtype, val_dtype) == ("float64", "float64"), name
        assert finite and grad_finite, name
    return out


def test_families_with_their_own_start_bind_start_and_differentiate_in_float64():
    out = _zoo_check(WITH_INIT)
    # the model's own start (a float32 EM estimate made the mixture fail before)
    assert out["mixture"][4] and out["arhmm"][4] and out["cmapss"][4]


@pytest.mark.slow
def test_every_zoo_family_binds_starts_and_differentiates_in_float64():
    from bayeslik.cli import FAMILIES

    _zoo_check(FAMILIES)


def _engines_check(engines):
    out = _run_x64(ENGINES.format(root=str(ROOT), engines=list(engines)))
    for eng, (dtype, z, log_z) in out.items():
        assert dtype == "float64", eng
        assert z < 5.0, f"{eng}: posterior mean {z:.1f} posterior sds from the exact one"
    return out


def test_smc_and_nss_run_in_float64():
    _engines_check(["smc", "nss"])


@pytest.mark.slow
def test_every_engine_runs_in_float64():
    _engines_check(["nuts", "smc", "nested", "nss", "nested+surrogate"])


@pytest.mark.slow
def test_nuts_runs_on_every_family_in_float64():
    for name, dtypes in _run_x64(NUTS_ZOO, timeout=1800).items():
        assert dtypes == ["float64"], name


def _dataless():
    import numpyro
    import numpyro.distributions as dist

    numpyro.sample("theta", dist.Normal(0.0, 1.0))


def test_precision_switch_in_one_process_recompiles(x64_toggle):
    """A Posterior without data has the same cache key in both precisions; the compiled programs
    are keyed by the precision too, so a float64 fit after a float32 one is float64 throughout
    (it once reused the float32 programs and returned float32 draws)."""
    import jax

    import bayeslik as bl

    from tests.harness import small

    dtypes = {}
    for x64 in (False, True):
        x64_toggle(x64)
        post = bl.Posterior(_dataless)
        fit = bl.fit(post, "nuts", seed=0, progress_bar=False, **small("nuts"))
        dtypes[x64] = str(fit.posterior["theta"].dtype)
        assert jax.config.read("jax_enable_x64") is x64
    assert dtypes == {False: "float32", True: "float64"}
