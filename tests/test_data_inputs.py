"""pandas, xarray and list data, and the labels (ArviZ dims and coords) that come with them.

A Posterior converts a pandas Series / DataFrame / Index, an xarray DataArray and lists or tuples
of numbers to NumPy arrays before any check (so NaN, complex, empty checks apply), refuses
non-numeric data with a DataError that names the argument and the fix, and keeps the labels: a
Series' index, a DataFrame's index and columns and a DataArray's dims and coords become the dims
and coords of the observed site they feed and of the plated sites on those axes. Users label
dims and coords with ``Posterior.with_coords(coords=..., dims=...)``. Labels never change a
compiled program: the cache_key is that of the same data as NumPy arrays.
"""

from __future__ import annotations

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
import xarray as xr

import bayeslik as bl
from bayeslik.errors import DataError
from bayeslik.fit import build_datatree

NAMES = ["Choate", "Deerfield", "Phillips Andover", "Phillips Exeter", "Hotchkiss",
         "Lawrenceville", "St. Paul's", "Mt. Hermon"]
Y8 = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA8 = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
Y5 = [0.3, -1.2, 0.8, 0.1, 2.0]
NUTS = dict(num_warmup=200, num_samples=300, num_chains=1, seed=3, progress_bar=False)


def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("obs_plate", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def schools(sigma, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, 5.0))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def unplated(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def draws(post, n=2, seed=0):
    """Fake (chain=1, draw=n) draws of every latent site of ``post``."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(1, n) + tuple(s.shape)) for k, s in post.sites.items()
            if s.kind == "latent"}


# ------------------------------------------------------------------------------ containers
CONTAINERS = {
    "series": lambda: pd.Series(Y8),
    "frame column": lambda: pd.DataFrame({"y": Y8, "x": range(8)})["y"],
    "index": lambda: pd.Index(Y8),
    "dataarray": lambda: xr.DataArray(np.asarray(Y8)),
    "list": lambda: list(Y8),
    "tuple": lambda: tuple(Y8),
}


@pytest.fixture(scope="module")
def ref_fit():
    """NUTS on eight schools with NumPy data: the one compile of this file (every other fit
    here has the same cache_key and reuses it)."""
    ref = bl.Posterior(schools, np.asarray(SIGMA8), y=np.asarray(Y8))
    fit = bl.fit(ref, "nuts", **NUTS)
    theta = fit.idata["posterior"]["theta"].values
    assert theta.shape == (1, 300, 8) and np.isfinite(theta).all() and theta.std() > 0
    return ref, fit


def test_each_container_fits_as_its_numpy_array(ref_fit):
    """Every container becomes the same JAX array as np.asarray of it: the same cache_key (no
    new compile) and the same NUTS draws, number for number."""
    ref, fit0 = ref_fit
    for kind, make in CONTAINERS.items():
        post = bl.Posterior(schools, np.asarray(SIGMA8), y=make())
        y = post.data_arrays["y"]
        assert isinstance(y, jax.Array), kind
        np.testing.assert_array_equal(np.asarray(y), np.asarray(Y8, np.float32), err_msg=kind)
        assert post.cache_key == ref.cache_key, kind
        assert post.coords == {}, kind  # default index, unnamed dims: nothing to label
        fit = bl.fit(post, "nuts", **NUTS)
        assert fit.cost.compile_s == 0.0, kind  # the program compiled for ref
        for site in ("mu", "theta"):
            np.testing.assert_array_equal(fit.idata["posterior"][site].values,
                                          fit0.idata["posterior"][site].values, err_msg=kind)


def test_positional_and_nested_list_data():
    def two_d(x):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    post = bl.Posterior(two_d, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert post.data_arrays["args[0]"].shape == (3, 2)
    np.testing.assert_allclose(post.observed_data["x"], [[1, 2], [3, 4], [5, 6]])


def test_tuples_of_configuration_and_lists_of_arrays_still_reach_the_model():
    seen = {}

    def model(y, hidden=("a", "b"), parts=None, sizes=None):
        seen["hidden"], seen["parts"], seen["sizes"] = hidden, parts, sizes
        unplated(y)

    parts = [np.zeros(2), np.ones(3)]  # arrays of different shapes: the model's business
    bl.Posterior(model, y=np.asarray(Y5), hidden=("a", "b"), parts=parts, sizes=(32, 32))
    assert seen["hidden"] == ("a", "b") and seen["parts"] is parts
    assert seen["sizes"] == (32, 32)  # a tuple of ints stays static configuration


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float32_and_float64_series(dtype, request):
    """The Series' dtype is the data's dtype (float64 where JAX has x64 on), and the density is
    that of the NumPy array."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    y = pd.Series(np.asarray(Y5, dtype), index=pd.Index(list("abcde"), name="unit"))
    post = bl.Posterior(normal_model, y=y)
    ref = bl.Posterior(normal_model, y=np.asarray(Y5, dtype))
    assert post.data_arrays["y"].dtype == ref.data_arrays["y"].dtype == np.dtype(dtype)
    assert post.cache_key == ref.cache_key
    z = jnp.asarray([0.7], dtype)
    # what a gradient engine's step evaluates, compiled
    lp, g = jax.jit(jax.value_and_grad(post.logdensity))(z)
    lp_ref, g_ref = jax.jit(jax.value_and_grad(ref.logdensity))(z)
    assert lp.dtype == g.dtype == np.dtype(dtype)
    assert float(lp) == float(lp_ref) and np.isfinite(float(lp))
    np.testing.assert_array_equal(g, g_ref)
    assert post.coords == {"obs_plate": list("abcde")}


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("make", [
    lambda: pd.Series([0.3, np.nan, 0.8]),
    lambda: pd.DataFrame({"y": [0.3, np.nan, 0.8]})["y"],
    lambda: pd.Series([1, None, 3], dtype="Int64"),
    lambda: xr.DataArray([0.3, np.nan, 0.8], dims=["obs_plate"]),
    lambda: [0.3, float("nan"), 0.8],
], ids=["series", "frame column", "nullable Int64", "dataarray", "list"])
def test_missing_values_get_the_nan_message(make):
    with pytest.raises(DataError, match=r"argument 'y' contains 1 NaN and 0 infinite value\(s\) "
                                        r"\(first at index \(1,\) of shape \(3,\)\)"):
        bl.Posterior(normal_model, y=make())


def test_nan_in_a_pandas_covariate_is_refused():
    def regression(x, y):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)

    with pytest.raises(DataError, match="argument 'x' contains 1 NaN"):
        bl.Posterior(regression, x=pd.Series([1.0, np.nan, 2.0]), y=np.zeros(3))
    with pytest.raises(DataError, match=r"positional argument 'args\[0\]' contains 1 NaN"):
        bl.Posterior(regression, pd.Series([1.0, np.nan, 2.0]), y=np.zeros(3))


@pytest.mark.parametrize("make, match", [
    (lambda: pd.Series(["1.5", "2.0"]), r"'y' holds non-numeric values .*y\.astype\(float\)"),
    (lambda: pd.Series([1.0, "a"], dtype=object), r"'y' holds non-numeric values \(dtype object\)"),
    (lambda: pd.Series(["a", "b"], dtype="category"), r"'y' is categorical .*y\.cat\.codes"),
    (lambda: pd.DataFrame({"a": [1.0, 2.0], "name": ["x", "y"]}),
     r"DataFrame with non-numeric column\(s\) 'name' .*df\[\[\"a\", \"b\"\]\]"),
    (lambda: pd.Series(pd.to_datetime(["2020-01-01", "2020-01-02"])), r"non-numeric values"),
    (lambda: ["a", "b"], r"'y' is a list holding strings"),
    (lambda: np.array([1.0, "a"], dtype=object), r"NumPy array of dtype object"),
    (lambda: np.array(["a", "b"]), r"NumPy array of dtype <U1"),
    (lambda: xr.DataArray(np.array(["a", "b"])), r"DataArray of dtype <U1"),
    (lambda: [[1.0, 2.0], [3.0]], r"'y' is a ragged list \(its entries have lengths \[2, 1\]\)"),
    (lambda: xr.Dataset({"y": ("i", [1.0, 2.0])}), r"'y' is an xarray Dataset.*y\[\"y\"\]"),
], ids=["numeric strings", "object", "categorical", "frame with text", "datetimes",
        "list of str", "object array", "str array", "str dataarray", "ragged", "dataset"])
def test_non_numeric_data_is_refused_naming_the_argument(make, match):
    with pytest.raises(DataError, match=match):
        bl.Posterior(unplated, y=make())


def test_complex_and_empty_pandas_data_get_the_existing_messages():
    with pytest.raises(DataError, match="argument 'y' is complex-valued"):
        bl.Posterior(unplated, y=pd.Series([1 + 2j, 3.0]))
    with pytest.raises(DataError, match="observed site 'y' has no values"):
        bl.Posterior(unplated, y=pd.Series([], dtype=float))


# ------------------------------------------------------------------------------- labels
def test_index_labels_become_coords_of_observed_and_plated_sites_and_survive_save_load(
        ref_fit, tmp_path):
    """Eight schools with pandas data: the index labels the plate 'school' (the plate's name is
    the dim, the index only labels it), in every group, in az.summary and after save/load; the
    labels change no compiled program and no number."""
    index = pd.Index(NAMES, name="name")
    post = bl.Posterior(schools, pd.Series(SIGMA8, index=index), y=pd.Series(Y8, index=index))
    assert post.coords == {"school": NAMES}
    assert post.sites["theta"].dims == post.sites["obs"].dims == ("school",)
    assert post.sites["mu"].dims == ()
    ref, fit0 = ref_fit
    assert post.cache_key == ref.cache_key and ref.coords == {}

    fit = bl.fit(post, "nuts", **NUTS)
    assert fit.cost.compile_s == 0.0
    np.testing.assert_array_equal(fit.idata["posterior"]["theta"].values,
                                  fit0.idata["posterior"]["theta"].values)
    assert fit0.idata["posterior"]["school"].values.tolist() == list(range(8))  # unlabelled
    for group in ("posterior", "log_likelihood", "observed_data"):
        assert fit.idata[group]["school"].values.tolist() == NAMES, group
    summary = az.summary(fit.idata, var_names=["theta"], kind="stats")
    assert list(summary.index) == [f"theta[{n}]" for n in NAMES]
    theta = fit.idata["posterior"]["theta"]
    np.testing.assert_array_equal(theta.sel(school="Hotchkiss").values, theta.values[..., 4])

    path = tmp_path / "schools.nc"
    fit.save(path)
    back = bl.load_fit(path)
    for group in ("posterior", "log_likelihood", "observed_data"):
        assert back.idata[group]["school"].values.tolist() == NAMES, group
    np.testing.assert_array_equal(back.idata["posterior"]["theta"].values, theta.values)
    assert list(az.summary(back.idata, var_names=["theta"], kind="stats").index) == list(
        summary.index)


def test_frame_index_and_columns_label_both_axes():
    """A whole DataFrame is a 2-D array; its index labels the row plate, its columns (named)
    the column plate, on the observed site and the latent site in that plate."""
    K, N = 3, 4
    frame = pd.DataFrame(np.arange(N * K, dtype=float).reshape(N, K),
                         index=pd.Index([f"u{i}" for i in range(N)], name="unit"),
                         columns=pd.Index(["a", "b", "c"], name="feature"))

    def model(Y):
        with numpyro.plate("feature", Y.shape[1], dim=-1):
            mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
            with numpyro.plate("row", Y.shape[0], dim=-2):
                numpyro.sample("Y", dist.Normal(mu, 1.0), obs=Y)

    post = bl.Posterior(model, Y=frame)
    assert post.sites["Y"].dims == ("row", "feature") and post.sites["mu"].dims == ("feature",)
    assert post.coords == {"row": ["u0", "u1", "u2", "u3"], "feature": ["a", "b", "c"]}
    tree = build_datatree(post, draws(post))
    assert tree["posterior"]["feature"].values.tolist() == ["a", "b", "c"]
    assert tree["observed_data"]["row"].values.tolist() == ["u0", "u1", "u2", "u3"]
    np.testing.assert_array_equal(tree["observed_data"]["Y"].values, frame.to_numpy())


def test_named_axes_name_an_unplated_observed_site():
    """Without a plate the container's axis names become the observed site's dims."""
    frame = pd.DataFrame([[1.0, 2.0], [3.0, 4.0]], index=pd.Index(["r1", "r2"], name="unit"),
                         columns=pd.Index(["x", "z"], name="channel"))
    post = bl.Posterior(unplated, y=frame)
    assert post.sites["y"].dims == ("unit", "channel")
    assert post.coords == {"unit": ["r1", "r2"], "channel": ["x", "z"]}
    da = xr.DataArray(np.asarray(Y5), dims=["time"], coords={"time": [10, 20, 30, 40, 50]})
    post = bl.Posterior(unplated, y=da)
    assert post.sites["y"].dims == ("time",) and post.coords == {"time": [10, 20, 30, 40, 50]}
    # an unnamed default index says nothing
    post = bl.Posterior(unplated, y=pd.Series(Y5))
    assert post.sites["y"].dims == ("y_dim_0",) and post.coords == {}


def test_a_named_covariate_labels_the_plate_of_its_name():
    def regression(x, y):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("school", x.shape[0]):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)

    x = xr.DataArray(np.asarray(SIGMA8), dims=["school"], coords={"school": NAMES})
    post = bl.Posterior(regression, x=x, y=np.asarray(Y8))
    assert post.coords == {"school": NAMES} and post.sites["a"].dims == ("school",)


def test_conflicting_labels_are_refused():
    with pytest.raises(DataError, match=r"arguments 'y' and 'args\[0\]' label dim 'school' "
                                        r"differently.*with_coords"):
        bl.Posterior(schools, pd.Series(SIGMA8, index=pd.Index(NAMES, name="school")),
                     y=pd.Series(Y8, index=[n.upper() for n in NAMES]))
    # an unnamed index of an argument no observed site is fed by labels nothing
    post = bl.Posterior(schools, pd.Series(SIGMA8, index=NAMES), y=np.asarray(Y8))
    assert post.coords == {}


def test_with_coords_labels_and_overrides_dims():
    post = bl.Posterior(schools, np.asarray(SIGMA8), y=np.asarray(Y8))
    labelled = post.with_coords(coords={"county": np.asarray(NAMES)},
                                dims={"theta": ["county"], "obs": ["county"]})
    assert labelled.sites["theta"].dims == labelled.sites["obs"].dims == ("county",)
    assert labelled.coords == {"county": NAMES}
    assert post.coords == {} and post.sites["theta"].dims == ("school",)  # unchanged
    assert labelled.cache_key == post.cache_key
    assert labelled.logdensity is post.logdensity
    ll = {"obs": np.zeros((1, 2, 8))}
    tree = build_datatree(labelled, draws(labelled), log_likelihood=ll)
    for group in ("posterior", "log_likelihood", "observed_data"):
        assert tree[group]["county"].values.tolist() == NAMES, group
        assert "school" not in tree[group].dims, group
    # a plate's name labelled directly, merged with earlier labels; user coords beat the data's
    named = bl.Posterior(schools, np.asarray(SIGMA8), y=pd.Series(Y8, index=NAMES))
    upper = named.with_coords({"school": [n.upper() for n in NAMES]})
    assert upper.coords == {"school": [n.upper() for n in NAMES]}
    both = upper.with_coords(dims={"mu": []})
    assert both.coords == upper.coords


def test_with_coords_refusals_name_the_dim_and_lengths():
    post = bl.Posterior(schools, np.asarray(SIGMA8), y=np.asarray(Y8))
    with pytest.raises(DataError, match=r"coords for dim 'school' have 7 labels, but dim "
                                        r"'school' has length 8 \(site '(theta|obs)'\)"):
        post.with_coords(coords={"school": NAMES[:7]})
    with pytest.raises(DataError, match=r"coords given for dim 'schools', which no site has; "
                                        r"the sites' dims are \['school'\]"):
        post.with_coords(coords={"schools": NAMES})
    with pytest.raises(DataError, match=r"dims given for 'thetas', which is not a site"):
        post.with_coords(dims={"thetas": ["school"]})
    with pytest.raises(DataError, match=r"dims for site 'theta' name 2 axes .* shape \(8,\)"):
        post.with_coords(dims={"theta": ["a", "b"]})
    with pytest.raises(DataError, match=r"coords\['school'\] must be a one-dimensional"):
        post.with_coords(coords={"school": "Choate"})


def test_one_dim_name_one_length():
    def two_plates():
        with numpyro.plate("p", 3):
            numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("q", 4):
            numpyro.sample("b", dist.Normal(0.0, 1.0))

    post = bl.Posterior(two_plates)
    with pytest.raises(DataError, match=r"dim 'p' has different lengths: 3 in site 'a', 4 in "
                                        r"site 'b'"):
        post.with_coords(dims={"b": ["p"]})


def test_coords_keyword_is_not_taken_from_a_model_that_has_none():
    with pytest.raises(DataError, match=r"coords= given, but model 'schools' has no such "
                                        r"parameter.*with_coords\(coords="):
        bl.Posterior(schools, np.asarray(SIGMA8), y=np.asarray(Y8), coords={"school": NAMES})
    seen = {}

    def spatial(y, coords):  # a model's own `coords` argument is its data, as always
        seen["coords"] = coords
        unplated(y)

    bl.Posterior(spatial, y=np.asarray(Y5), coords=np.zeros((5, 2)))
    assert np.shape(seen["coords"]) == (5, 2)


def test_replace_data_keeps_the_labels():
    index = pd.Index(NAMES, name="school")
    post = bl.Posterior(schools, pd.Series(SIGMA8, index=index), y=np.asarray(Y8))
    assert post.coords == {"school": NAMES}
    other = post.replace_data(y=np.asarray(Y8) + 1.0)
    assert other.coords == {"school": NAMES} and other.cache_key == post.cache_key
    # the replaced argument's own labels go with it
    post = bl.Posterior(schools, np.asarray(SIGMA8), y=pd.Series(Y8, index=NAMES))
    assert post.coords == {"school": NAMES} and post.replace_data(y=np.zeros(8)).coords == {}
    user = bl.Posterior(schools, np.asarray(SIGMA8), y=np.asarray(Y8)).with_coords(
        coords={"school": NAMES})
    assert user.replace_data(y=np.zeros(8)).coords == {"school": NAMES}
