"""Shared fixtures. Seeds are fixed; BAYESLIK_TEST_SEED overrides them (never date-based)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

SEED = int(os.environ.get("BAYESLIK_TEST_SEED", "0"))


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
def no_jit(monkeypatch):
    """Fail the test if anything is jit-compiled (checks that errors come before compiling)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("jax.jit was called: the error must be raised before any compile")

    monkeypatch.setattr(jax, "jit", forbidden)
    yield
