"""The examples in the docstrings of every bayeslik module (models included, as
bayeslik.models) run and give what they show. Modules are discovered, so a new module's
examples are covered automatically; those whose examples take more than a few seconds are in
SLOW and run under the slow mark."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys

import pytest

import bayeslik
import bayeslik.models  # installed from models/, outside bayeslik/: walked on its own path

# measured over 5 s each on 2 shared cores
SLOW: set[str] = {"bayeslik.models.posteriordb", "bayeslik.models.meta", "bayeslik.filtering.particle",
                  "bayeslik.models.arhmm", "bayeslik.surrogate.network", "bayeslik.models.tpp",
                  "bayeslik.models.cosmology"}

# modules that cannot be imported here (optional dependencies) are skipped, not failed
_OPTIONAL_IMPORT_ERRORS = (ImportError,)


def _doctests(mod, name: str) -> list[doctest.DocTest]:
    """The docstring examples of the objects defined in module ``mod``."""
    return [t for t in doctest.DocTestFinder(exclude_empty=True).find(mod, name, module=mod)
            if any(not e.options.get(doctest.SKIP) for e in t.examples)]  # not all +SKIP


def _modules_with_examples() -> list[str]:
    infos = [*pkgutil.walk_packages(bayeslik.__path__, prefix="bayeslik."),
             *pkgutil.walk_packages(bayeslik.models.__path__, prefix="bayeslik.models.")]
    names = set()
    for info in infos:
        try:
            importlib.import_module(info.name)
            mod = sys.modules[info.name]
        except _OPTIONAL_IMPORT_ERRORS:
            continue
        if _doctests(mod, info.name):
            names.add(info.name)
    return sorted(names)


MODULES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
           for n in _modules_with_examples()]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    importlib.import_module(name)
    mod = sys.modules[name]  # not the package attribute: bayeslik.fit is also the function bl.fit
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _doctests(mod, name):
        runner.run(test)
    failures, tried = runner.summarize(verbose=False)
    assert tried > 0 and failures == 0, f"{name}: {failures} of {tried} examples failed"
