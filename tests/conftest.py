"""Shared fixtures. Seeds are fixed; BAYESLIK_TEST_SEED overrides them (never date-based)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

SEED = int(os.environ.get("BAYESLIK_TEST_SEED", "0"))

# Checkpoint keys (bayeslik.checkpoints) of this test session, in a directory of its own, never
# the user's ~/.config/bayeslik; set in the environment so child processes use it too.
if "BAYESLIK_CONFIG_DIR" not in os.environ:
    import tempfile

    os.environ["BAYESLIK_CONFIG_DIR"] = tempfile.mkdtemp(prefix="bayeslik-test-config-")

# the engines are imported (and their import-time jax.jit calls made) before any test, so the
# no_jit fixture below sees only what the test itself compiles, whichever file runs first
import bayeslik.engines  # noqa: E402,F401


@pytest.fixture
def seed() -> int:
    return SEED


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def x64():
    """Run a test in float64, restoring the previous setting afterwards."""
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


@pytest.fixture
def x64_toggle():
    """``set(flag)`` switches ``jax_enable_x64`` inside a test; the old setting comes back after."""
    old = jax.config.read("jax_enable_x64")
    yield lambda flag: jax.config.update("jax_enable_x64", flag)
    jax.config.update("jax_enable_x64", old)


@pytest.fixture
def no_jit(monkeypatch):
    """Fail the test if anything is jit-compiled (checks that errors come before compiling)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("jax.jit was called: the error must be raised before any compile")

    monkeypatch.setattr(jax, "jit", forbidden)
    yield


# The longest files first. xdist (--dist loadfile) hands whole files to the workers in
# collection order; the notebooks (about a third of the suite's time, run in kernels of their
# own) came near the end of it, so one worker ran them alone at the end. Longest first keeps
# both workers busy to the finish. Order within a file is unchanged.
_LONGEST_FIRST = ("tests/test_notebooks.py", "tests/test_notebooks_more.py", "tests/test_cli.py",
                  "tests/engines/test_nuts.py", "tests/test_float64.py",
                  "tests/engines/test_snl.py", "tests/engines/test_contract.py",
                  "tests/test_sbc.py", "tests/models/test_arhmm.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return _LONGEST_FIRST.index(path) if path in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
