"""Layering and encapsulation, read off the source with ``ast`` (nothing is imported).

1. **Models above, engines below.** No module under ``bayeslik/`` imports the model zoo:
   ``models`` (installed as ``bayeslik.models``), as ``import ...``, ``from ... import ...``
   (absolute or relative, ``from bayeslik import models`` included) or
   ``importlib.import_module("bayeslik.models...")``, at module level or lazily inside a
   function, at any depth. Model-specific pieces reach generic code through hooks instead
   (``bayeslik.inits.set_default_init``, ``bayeslik.relabel.register_components``).

   *Exemption:* ``bayeslik/cli.py``, the command-line application that runs the bundled models
   by name, may import the zoo, but lazily only (inside a function), never at module level, so
   that importing it (and the library) never imports a model.

2. **No private names across modules.** No module of ``bayeslik/`` or ``models/`` uses another
   first-party module's private names (a leading underscore, dunder names excepted): neither
   ``from a.b import _x`` (relative imports resolved; ``from __future__`` excepted) nor
   ``import a._b`` nor ``mod._x`` where ``mod`` is a first-party module the file imported (other
   than the file's own module). A package's ``__init__`` re-exporting is fine only for public
   names. A private *module* (``bayeslik/engines/_programs.py``) is private to its package: the
   modules inside that package may import its public names, no module outside may. Private attributes of *objects* (``self._x``, ``posterior._args``) are not modules'
   names and are not checked here.

The scanners are checked on small in-memory sources first, so a failure of the repository tests
means an offender, not a blind scanner.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = "bayeslik.models"
#: the one module under bayeslik/ that may import the zoo, and only inside functions
ZOO_EXEMPT = "bayeslik.cli"


# --------------------------------------------------------------------------------------- scanner
def _canonical(name: str) -> str:
    """The installed name of a first-party module: ``models.x`` is ``bayeslik.models.x``."""
    return ZOO + name[len("models"):] if name == "models" or name.startswith("models.") else name


def _module_name(path: pathlib.Path) -> tuple[str, bool]:
    """(canonical module name, is a package) of a source file under ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return _canonical(".".join(parts)), is_pkg


def _sources(*dirs: str) -> list[pathlib.Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def _first_party() -> set[str]:
    """Canonical names of every module and package of bayeslik/ and models/."""
    return {_module_name(p)[0] for p in _sources("bayeslik", "models")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    """The absolute (canonical) module a ``from ... import`` reads from."""
    if not node.level:
        return _canonical(node.module or "")
    package = module if is_pkg else module.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"], or None if the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def _dynamic_import_target(node: ast.Call) -> str | None:
    """The (leading constant part of the) module name of ``importlib.import_module(...)`` or
    ``__import__(...)``."""
    chain = _dotted(node.func)
    if not chain or chain[-1] not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value)
    return None


class _Walker(ast.NodeVisitor):
    """Collects imports (with whether they sit inside a function) and private-name uses."""

    def __init__(self, module: str, is_pkg: bool, first_party: set[str]):
        self.module, self.is_pkg, self.first_party = module, is_pkg, first_party
        self.depth = 0  # function nesting
        self.zoo: list[tuple[int, str, bool]] = []  # (line, what, lazy)
        self.private: list[tuple[int, str]] = []
        self.bound: dict[str, str] = {}  # local name -> the module an import bound it to

    def _zoo(self, node, name: str, what: str) -> None:
        if _under(_canonical(name), ZOO):
            self.zoo.append((node.lineno, what, self.depth > 0))

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            name = _canonical(alias.name)
            self._zoo(node, name, f"import {alias.name}")
            if self._ours(name) and not self._may_read(name):
                self.private.append((node.lineno, f"import {alias.name} (a private module)"))
            if alias.asname:
                self.bound[alias.asname] = name
            else:
                head = alias.name.split(".")[0]
                self.bound[head] = _canonical(head)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "__future__":
            return
        src = _resolve(node, self.module, self.is_pkg)
        dots = "." * node.level + (node.module or "")
        for alias in node.names:
            full = f"{src}.{alias.name}" if src else alias.name
            self._zoo(node, src if _under(src, ZOO) else full, f"from {dots} import {alias.name}")
            if self._ours(src) and not (self._may_read(full) if full in self.first_party
                                        else self._may_read(src) and not _is_private(alias.name)):
                self.private.append((node.lineno, f"from {dots} import {alias.name}"))
            if full in self.first_party:
                self.bound[alias.asname or alias.name] = full

    def visit_Call(self, node: ast.Call) -> None:
        target = _dynamic_import_target(node)
        if target is not None:
            self._zoo(node, target, f"import_module({target!r}...)")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _dotted(node)
        if chain and _is_private(chain[-1]) and chain[0] in self.bound:
            owner = ".".join([self.bound[chain[0]]] + chain[1:-1])
            if f"{owner}.{chain[-1]}" in self.first_party:  # a private module: its package's
                if not self._may_read(f"{owner}.{chain[-1]}"):
                    self.private.append((node.lineno, f"{'.'.join(chain)} (a private module)"))
            elif owner in self.first_party and owner != self.module:
                self.private.append((node.lineno, f"{'.'.join(chain)} ({owner}'s private name)"))
        self.generic_visit(node)

    def _ours(self, name: str) -> bool:
        return name.split(".")[0] in ("bayeslik", "models")

    def _may_read(self, module: str) -> bool:
        """Whether this file may import ``module``: every private part of its dotted name
        (``bayeslik.engines._programs``) is private to the package above it, which this file
        must be inside."""
        parts = module.split(".")
        return all(_under(self.module, ".".join(parts[:i]))
                   for i, p in enumerate(parts) if _is_private(p))


def scan(source: str, module: str, is_pkg: bool = False,
         first_party: set[str] | None = None) -> _Walker:
    """Walk one module's source; ``module`` is its canonical dotted name."""
    walker = _Walker(module, is_pkg, _first_party() if first_party is None else first_party)
    walker.visit(ast.parse(source))
    return walker


def zoo_offences(walker: _Walker) -> list[tuple[int, str]]:
    """The zoo imports a module may not have: all of them, but for cli.py's lazy ones."""
    return [(line, what + (" (at module level)" if walker.module == ZOO_EXEMPT else ""))
            for line, what, lazy in walker.zoo if not (walker.module == ZOO_EXEMPT and lazy)]


def _report(found: dict[str, list[tuple[int, str]]]) -> str:
    return "\n".join(f"{path}:{line}: {what}" for path, hits in sorted(found.items())
                     for line, what in hits)


# ---------------------------------------------------------------- the scanners catch offenders
FIRST_PARTY = {"bayeslik", "bayeslik.relabel", "bayeslik.engines", "bayeslik.engines.kit",
               "bayeslik.engines._private_module", "bayeslik.cli", ZOO, f"{ZOO}.arhmm",
               f"{ZOO}.mixture"}


@pytest.mark.parametrize("source", [
    "import bayeslik.models.arhmm",
    "import models.mixture as m",
    "from bayeslik.models import arhmm",
    "from bayeslik import models",
    "from models.arhmm import hmm_inputs",
    "from ..models import arhmm",                    # relative, from bayeslik/engines/kit.py
    "def f():\n    if True:\n        from bayeslik.models.arhmm import hmm_inputs",  # lazy, deep
    "import importlib\nmod = importlib.import_module('bayeslik.models.arhmm')",
    "import importlib\ndef f(n):\n    return importlib.import_module(f'bayeslik.models.{n}')",
])
def test_zoo_scanner_catches_an_import(source):
    hits = zoo_offences(scan(source, "bayeslik.engines.kit", first_party=FIRST_PARTY))
    assert len(hits) == 1, hits


def test_zoo_scanner_passes_generic_code_and_lazy_cli_imports():
    clean = ("from __future__ import annotations\nimport numpy as np\nimport bayeslik.engines.kit"
             "\nfrom bayeslik.relabel import relabel\nfrom . import kit\nmodels = 3\n")
    assert zoo_offences(scan(clean, "bayeslik.engines.kit", first_party=FIRST_PARTY)) == []
    cli = "import importlib\ndef run(name):\n    return importlib.import_module(f'bayeslik.models.{name}')\n"
    assert zoo_offences(scan(cli, ZOO_EXEMPT, first_party=FIRST_PARTY)) == []
    eager = "from bayeslik.models import arhmm\n"
    assert len(zoo_offences(scan(eager, ZOO_EXEMPT, first_party=FIRST_PARTY))) == 1


@pytest.mark.parametrize("module, source", [
    (f"{ZOO}.mixture", "from bayeslik.models.arhmm import _OrderedNormal"),
    (f"{ZOO}.mixture", "from .arhmm import _OrderedNormal"),             # relative
    ("bayeslik.relabel", "def f():\n    from bayeslik.models.mixture import _observed_y"),
    ("bayeslik.relabel", "from bayeslik.models import mixture\nmixture._observed_y(1)"),
    ("bayeslik.relabel", "import bayeslik.models.mixture as m\ny = m._observed_y"),
    ("bayeslik.relabel", "import bayeslik.engines.kit\nbayeslik.engines.kit._step()"),
    ("bayeslik.relabel", "from bayeslik.engines import kit as k\nk._step"),
    ("bayeslik.relabel", "from bayeslik.engines import _private_module"),
    ("bayeslik.relabel", "from bayeslik.engines._programs import Programs"),  # outside its package
    ("bayeslik.engines.kit", "from bayeslik.engines._programs import _helper"),
    ("bayeslik.relabel", "import bayeslik.engines._programs"),
    ("bayeslik.relabel", "import bayeslik.engines\nx = bayeslik.engines._private_module"),
])
def test_private_scanner_catches_a_use(module, source):
    hits = scan(source, module, first_party=FIRST_PARTY).private
    assert len(hits) == 1, hits


def test_private_scanner_passes_public_dunder_and_own_names():
    clean = ("from __future__ import annotations\nimport numpy as np\n"
             "from bayeslik.models import arhmm\nx = arhmm.__name__\ny = arhmm.hmm_inputs\n"
             "z = np._NoValue\nclass A:\n    def f(self):\n        return self._x\n"
             "import bayeslik.models.mixture as me\nw = me._own\n")
    assert scan(clean, f"{ZOO}.mixture", first_party=FIRST_PARTY).private == []
    sibling = ("from bayeslik.engines._programs import Programs\nfrom . import _programs\n"
               "import bayeslik.engines._programs\nx = bayeslik.engines._programs.Programs\n")
    first_party = FIRST_PARTY | {"bayeslik.engines._programs"}
    assert scan(sibling, "bayeslik.engines.kit", first_party=first_party).private == []


# ------------------------------------------------------------------------ the repository itself
def test_nothing_under_bayeslik_imports_the_model_zoo():
    found = {}
    for path in _sources("bayeslik"):
        module, is_pkg = _module_name(path)
        hits = zoo_offences(scan(path.read_text(), module, is_pkg))
        if hits:
            found[path.relative_to(ROOT).as_posix()] = hits
    assert not found, ("these modules import the model zoo; hand the model-specific piece to "
                       "generic code through a hook instead:\n" + _report(found))


def test_no_module_uses_another_modules_private_names():
    found = {}
    first_party = _first_party()
    for path in _sources("bayeslik", "models"):
        module, is_pkg = _module_name(path)
        hits = scan(path.read_text(), module, is_pkg, first_party).private
        if hits:
            found[path.relative_to(ROOT).as_posix()] = hits
    assert not found, ("these modules use another module's private names; make the name public "
                       "(documented, tested) or keep the code with its module:\n" + _report(found))
