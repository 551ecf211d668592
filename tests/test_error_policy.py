"""The error policy, read off the source with ``ast`` (nothing is imported).

Every input check in ``bayeslik/`` and the model zoo (``models/``) raises a
:class:`bayeslik.errors.BayeslikError` subclass: ``DataError`` (unusable data, wrong shape or
type), ``ModelError`` (an unusable program, model, site or parameter set), ``EngineError`` (an
engine's or a filter's options), ``OptionError`` (an option of another tool),
``InitializationError``. The ``ValueError`` ones subclass ``ValueError``, so ``except ValueError``
keeps working; a plain ``ValueError``/``TypeError`` would not be a ``BayeslikError``.

So no module there builds a bare ``ValueError(...)`` or ``TypeError(...)`` (raised, returned or
stored) nor raises the bare class (``raise ValueError``), outside :data:`ALLOWED`. Catching them
(``except ValueError``) is fine. The scanner is checked on small in-memory sources first, so a
failure of the repository test means an offender, not a blind scanner.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("bayeslik", "models")
BANNED = ("ValueError", "TypeError")

#: ``(file, function)`` -> why that function may still build a plain ValueError/TypeError.
#: ``file`` is relative to the repository root, ``function`` the qualified name of the innermost
#: enclosing function (``Class.method``, ``outer.inner``; ``<module>`` at module level). Only for
#: a ValueError raised as part of a documented protocol that is not input checking (a numerical
#: failure inside an algorithm a caller catches, ...). An entry that no longer matches anything
#: fails the test, so the list only shrinks. A port in progress may add
#: ``("bayeslik/engines/<engine>.py", "<function>"): "pending: engine kit port"`` until it lands.
ALLOWED: dict[tuple[str, str], str] = {}


# --------------------------------------------------------------------------------------- scanner
def offenders(source: str) -> list[tuple[str, int, str]]:
    """``(function, line, what)`` for every plain ValueError/TypeError built or raised."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + (node.name,)
        where = ".".join(scope) or "<module>"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in BANNED:
            found.append((where, node.lineno, f"{node.func.id}(...)"))
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Name) \
                and node.exc.id in BANNED:
            found.append((where, node.lineno, f"raise {node.exc.id}"))
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(ast.parse(source), ())
    return found


def test_scanner_finds_what_it_should():
    src = '''
import numpy as np
from bayeslik.errors import DataError

def check(x):
    if x is None:
        raise ValueError("x is None")
    if not isinstance(x, int):
        raise TypeError(f"x must be an int, got {type(x).__name__}")
    raise DataError("fine")

class Thing:
    def method(self):
        def inner():
            raise ValueError
        err = TypeError("built, raised later")
        raise err from None

def handler():
    try:
        int("a")
    except (ValueError, TypeError) as e:   # catching is fine
        raise DataError(str(e)) from None

ERR = ValueError("at module level")
'''
    assert offenders(src) == [
        ("check", 7, "ValueError(...)"),
        ("check", 9, "TypeError(...)"),
        ("Thing.method.inner", 15, "raise ValueError"),
        ("Thing.method", 16, "TypeError(...)"),
        ("<module>", 25, "ValueError(...)"),
    ]


def test_scanner_ignores_subclasses_and_handlers():
    src = '''
from bayeslik.errors import ModelError, OptionError

def f(kind):
    try:
        g()
    except ValueError:
        pass
    if kind not in ("a", "b"):
        raise OptionError(f"kind must be 'a' or 'b', got {kind!r}")
    raise ModelError("no")

class MyError(ValueError):   # subclassing (naming the class) is not building one
    pass
'''
    assert offenders(src) == []


# --------------------------------------------------------------------------------------- the repository
def _repository_offenders() -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for function, line, what in offenders(path.read_text()):
                out.setdefault((rel, function), []).append(f"{rel}:{line} {what}")
    return out


def test_input_checks_raise_bayeslik_errors():
    found = _repository_offenders()
    bad = [hit for key, hits in found.items() if key not in ALLOWED for hit in hits]
    assert not bad, (
        "plain ValueError/TypeError in bayeslik/ or models/; raise the matching "
        "bayeslik.errors class (DataError, ModelError, EngineError, OptionError) instead, or "
        "add the function to ALLOWED with its reason:\n  " + "\n  ".join(bad))


def test_allow_list_is_current():
    found = _repository_offenders()
    stale = [f"{f}:{fn} ({why})" for (f, fn), why in ALLOWED.items() if (f, fn) not in found]
    assert not stale, "ALLOWED entries that match nothing any more; remove them:\n  " + \
        "\n  ".join(stale)
    assert all(why.strip() for why in ALLOWED.values()), "every ALLOWED entry needs its reason"
