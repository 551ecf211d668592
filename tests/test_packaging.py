"""The wheel ships models/ as bayeslik.models, with its data, and imports from a plain install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_models_and_imports(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), "--quiet", "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("bayeslik-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("bayeslik/__init__.py", "bayeslik/engines/nuts.py", "bayeslik/models/__init__.py",
                     "bayeslik/models/reference.py", "bayeslik/models/posteriordb.py",
                     "bayeslik/models/data/posteriordb/README.md"):
        assert required in names, required
    assert any(n.startswith("bayeslik/models/data/posteriordb/arK-arK/") for n in names)
    assert not any(n.startswith("models/") or n.startswith("tests/") for n in names)
    # install the wheel alone into a folder and import the zoo from there
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    code = (
        "import bayeslik, bayeslik.models.posteriordb as p, bayeslik.models.reference as r;"
        "assert bayeslik.__file__.startswith(%r), bayeslik.__file__;"
        "print(sorted(p.load('arK-arK')['reference'])[0], r.get('normal_mean').name)" % str(target)
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "normal_mean" in res.stdout


def test_installed_versions_are_the_tested_constraints():
    """The README's set-up installs the versions in constraints.txt (reproducible tomorrow);
    .ci/newest is the check against the newest versions pyproject.toml allows."""
    from importlib import metadata

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = version
    for core in ("jax", "jaxlib", "numpyro", "arviz", "blackjax", "dynesty", "numpy"):
        assert core in pins, f"{core} is not pinned in constraints.txt"
    if os.environ.get("BAYESLIK_NEWEST") == "1":
        return  # the newest-versions environment is unpinned on purpose
    wrong = {}
    for name, version in pins.items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, "not installed")
            continue
        if got != version:
            wrong[name] = (version, got)
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}"
