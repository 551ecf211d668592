"""The examples in the docstrings of these modules run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["bayeslik.convergence", "bayeslik.inits", "bayeslik.models.cmapss",
           "bayeslik.models.tpp", "bayeslik.filtering.particle", "bayeslik.models.posteriordb"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    failures, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0
