"""Tests of bayeslik.relabel on an AR-HMM Fit built by hand (no sampler run).

The Fit's draws scatter tightly around the simulated parameters; every draw's states are then
permuted by a random permutation (on both axes of the transition matrix) and relabelling must
give back the original draws up to one global permutation, with both methods. The mixture
side (a NUTS fit, multi-chain) is tested in tests/models/test_mixture.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import types

import jax
import numpy as np
import pytest
import xarray as xr

import bayeslik as bl
from bayeslik.fit import Cost, Fit, build_datatree
from bayeslik.models import arhmm
from bayeslik.relabel import (
    ComponentSpec,
    permute_draws,
    permute_fit,
    register_components,
    registered_components,
    relabel,
    unregister_components,
)

K, T, C, D = 3, 120, 2, 40


@pytest.fixture(scope="module")
def arhmm_fit():
    from tests.conftest import SEED

    rng = np.random.default_rng(SEED)
    data = arhmm.simulate(jax.random.key(SEED), num_steps=T, num_states=K)
    # what build_datatree and arhmm.classification_fn read from a Posterior (building the real
    # one traces the model eagerly, seconds that this test does not need)
    post = types.SimpleNamespace(sites={}, observed_data={"y": data["y"]},
                                 data={"y": data["y"], "num_states": K}, name="arhmm")
    p = data["params"]

    def jitter(x, scale, positive=False):
        out = x + scale * rng.normal(size=(C, D) + np.shape(x))
        return np.abs(out) if positive else out

    def dirichlet(rows, conc=200.0):
        rows = np.asarray(rows)
        flat = rows.reshape(-1, rows.shape[-1])
        draws = np.stack([rng.dirichlet(conc * r + 1e-3, size=(C, D)) for r in flat], axis=2)
        return draws.reshape((C, D) + rows.shape)

    b0 = np.sort(jitter(p["b"][:, 0], 0.05), axis=-1)
    draws = {"pi": dirichlet(p["pi"]), "trans": dirichlet(p["trans"]), "b0": b0,
             "A": jitter(p["A"], 0.03), "sigma": jitter(p["sigma"], 0.02, positive=True)}
    draws["b"] = b0[..., None]
    idata = build_datatree(post, draws, sample_stats={"lp": rng.normal(size=(C, D))})
    fit = Fit(idata=idata, engine="hand", config={}, seed=None, cost=Cost(wall_s=0.0),
              model=post.name)
    return post, fit


def _global_permutation(a, b, spec):
    """The g with a == b permuted by g on every component axis, or None."""
    for g in itertools.permutations(range(K)):
        g = np.asarray(g)
        if all(np.allclose(a.draws(s), _apply(b.draws(s), g, spec[s])) for s in spec
               if s in a.idata["posterior"]):
            return g
    return None


def _apply(x, g, axes):
    for ax in (axes,) if isinstance(axes, int) else axes:
        x = np.take(x, g, axis=ax + 2)
    return x


def test_permute_draws_on_two_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, K, K))
    perms = np.array([rng.permutation(K) for _ in range(5)])
    out = permute_draws(x, perms, (0, 1))
    for s in range(5):
        np.testing.assert_array_equal(out[s], x[s][np.ix_(perms[s], perms[s])])


@pytest.mark.parametrize("method", ["pivot", "stephens"])
def test_relabel_arhmm_undoes_random_permutations(arhmm_fit, method, seed):
    post, fit = arhmm_fit
    spec = arhmm.RELABEL_SPEC
    rng = np.random.default_rng(seed + 1)
    perms = np.array([rng.permutation(K) for _ in range(C * D)])
    scrambled = permute_fit(fit, perms, spec)
    assert _global_permutation(scrambled, fit, spec) is None
    kw = {"prob_fn": arhmm.classification_fn(post)} if method == "stephens" else {}
    fixed = relabel(scrambled, "arhmm", method=method, **kw)
    g = _global_permutation(fixed, fit, spec)
    assert g is not None
    # the transition matrix was permuted on both axes: its rows still sum to one and the
    # sticky diagonal is back on the diagonal
    trans = fixed.draws("trans")
    np.testing.assert_allclose(trans.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.diagonal(trans, axis1=-2, axis2=-1) > 0.8)


def test_relabel_arhmm_leaves_an_identified_fit_alone(arhmm_fit):
    _, fit = arhmm_fit
    fixed = relabel(fit, "arhmm")
    g = _global_permutation(fixed, fit, arhmm.RELABEL_SPEC)
    assert g is not None
    assert np.all(fixed.idata["relabel"]["permutation"].values == g)  # one label for all draws


def test_relabel_stephens_needs_prob_fn_for_hmm(arhmm_fit, no_jit):
    _, fit = arhmm_fit
    with pytest.raises(ValueError, match="prob_fn"):
        relabel(fit, "arhmm", method="stephens")
    with pytest.raises(ValueError, match="components"):
        relabel(fit, 3)
    with pytest.raises(ValueError, match="pivot"):
        relabel(fit, "arhmm", pivot=(5, 0))


def test_relabelled_fit_round_trips(arhmm_fit, tmp_path):
    _, fit = arhmm_fit
    out = relabel(fit, "arhmm")
    out.save(str(tmp_path / "fit.nc"))
    back = bl.load_fit(str(tmp_path / "fit.nc"))
    np.testing.assert_array_equal(back.idata["relabel"]["permutation"].values,
                                  out.idata["relabel"]["permutation"].values)
    assert back.idata.attrs["relabel_method"] == "pivot"
    np.testing.assert_allclose(back.draws("trans"), out.draws("trans"))


# ---------------------------------------------------------------------------- the spec registry
def test_the_zoo_registers_its_specs_on_import():
    specs = registered_components()
    assert specs["arhmm"].module == "bayeslik.models.arhmm"
    assert specs["arhmm"].components == {k: (v,) if isinstance(v, int) else v
                                         for k, v in arhmm.RELABEL_SPEC.items()}
    assert specs["arhmm"].cost_sites == arhmm.RELABEL_COST_SITES
    assert specs["arhmm"].classification_fn is None  # an AR-HMM's needs its Posterior


def test_unknown_spec_names_the_registered_ones_and_their_modules(arhmm_fit, no_jit):
    _, fit = arhmm_fit
    with pytest.raises(bl.ModelError, match="'gmm' is not a registered") as err:
        relabel(fit, "gmm")
    assert err.match("'arhmm' \\(by bayeslik.models.arhmm\\)")
    assert err.match("bayeslik.models.mixture")  # where the ready-made "mixture" comes from
    assert err.match("register_components")


def test_a_registered_spec_relabels_like_its_dict(arhmm_fit, seed):
    _, fit = arhmm_fit
    name = "test_relabel_arhmm_copy"
    spec = register_components(name, arhmm.RELABEL_SPEC, cost_sites=("b0",))
    try:
        assert isinstance(spec, ComponentSpec) and registered_components()[name] is spec
        rng = np.random.default_rng(seed + 2)
        perms = np.array([rng.permutation(K) for _ in range(C * D)])
        scrambled = permute_fit(fit, perms, name)
        by_name = relabel(scrambled, name)
        by_spec = relabel(scrambled, spec)
        by_dict = relabel(scrambled, {k: v for k, v in arhmm.RELABEL_SPEC.items()
                                      if k in fit.idata["posterior"]}, cost_sites=("b0",))
        for other in (by_spec, by_dict):
            np.testing.assert_array_equal(other.idata["relabel"]["permutation"].values,
                                          by_name.idata["relabel"]["permutation"].values)
        assert _global_permutation(by_name, fit, arhmm.RELABEL_SPEC) is not None
    finally:
        unregister_components(name)
    assert name not in registered_components()
    with pytest.raises(bl.ModelError, match="not a registered"):
        unregister_components(name)


def test_check_fn_and_classification_fn_hooks(arhmm_fit):
    _, fit = arhmm_fit
    calls = []

    def check(f):
        calls.append("check")
        if "b0" not in f.idata["posterior"]:
            raise bl.ModelError("no intercepts")

    def classification(f):
        calls.append("classification")
        return lambda draws: np.full((len(draws["pi"]), 5, K), 1.0 / K)

    name = "test_relabel_hooks"
    register_components(name, {"pi": 0, "b0": 0}, check_fn=check,
                        classification_fn=classification)
    try:
        out = relabel(fit, name, method="stephens")
        assert calls == ["check", "classification"]
        assert out.idata.attrs["relabel_method"] == "stephens"
        no_b0 = dataclasses.replace(fit, idata=fit.idata.copy())
        no_b0.idata["posterior"] = xr.DataTree(no_b0.idata["posterior"].to_dataset().drop_vars("b0"))
        with pytest.raises(bl.ModelError, match="no intercepts"):
            relabel(no_b0, name)
    finally:
        unregister_components(name)


@pytest.mark.parametrize("args,kwargs,match", [
    (("", {"pi": 0}), {}, "name"),
    (("x", {}), {}, "non-empty"),
    (("x", {"pi": "0"}), {}, "'pi'"),
    (("x", {"pi": (0, 1.5)}), {}, "'pi'"),
    (("x", {"pi": 0}), {"cost_sites": ("mu",)}, "cost_sites"),
    (("x", {"pi": 0}), {"check_fn": 3}, "check_fn"),
])
def test_register_components_rejects_bad_specs(args, kwargs, match):
    with pytest.raises(bl.ModelError, match=match):
        register_components(*args, **kwargs)
    assert "x" not in registered_components()


def test_left_to_right_arhmm_is_refused(arhmm_fit, no_jit):
    """The "arhmm" spec's check_fn: a left-to-right model's states are identified."""
    _, fit = arhmm_fit
    ltr = dataclasses.replace(fit, idata=fit.idata.copy())
    ds = ltr.idata["posterior"].to_dataset()
    ds["trans_0"] = ds["pi"]
    ltr.idata["posterior"] = xr.DataTree(ds)
    with pytest.raises(bl.ModelError, match="left-to-right"):
        relabel(ltr, "arhmm")
