"""Packaging: what the library imports is declared, the declared lowest versions work, py.typed ships."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11 or later (tomllib)")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "pegasus_x"
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"rouge_score": "rouge-score"}
# The CPU wheel the README installs; the library itself needs torch>=2.3.
TORCH = "torch==2.13.0"


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports() -> set[str]:
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "pegasus_x"}


def test_every_imported_package_is_declared():
    project = _project()
    declared = {_name(r) for r in project["dependencies"]}
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "test":
            declared |= {_name(r) for r in requirements}
    imported = {DISTRIBUTION.get(m, m).lower().replace("_", "-") for m in _third_party_imports()}
    assert imported - declared == set()
    assert {"datasets", "pyarrow", "huggingface-hub"} <= imported


def test_hub_is_a_dependency_not_a_redundant_extra():
    project = _project()
    assert "hub" not in project["optional-dependencies"]
    assert "huggingface-hub" in {_name(r) for r in project["dependencies"]}


def test_py_typed_ships():
    assert (SRC / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["pegasus_x"]


def _lowest_versions() -> list[str]:
    """``name==X`` for every ``name>=X`` run-time dependency but torch (installed as :data:`TORCH`)."""
    pins = []
    for requirement in _project()["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        assert match, f"dependency {requirement!r} should be NAME>=LOWEST"
        if match[1] != "torch":
            pins.append(f"{match[1]}=={match[2]}")
    return pins


def test_lower_bounds_are_real_versions_above_the_broken_ones():
    pins = dict(p.split("==") for p in _lowest_versions())
    # tokenizers 0.15.2 and 0.19.1 fail (no encode_batch_fast): the bound must exclude them.
    assert tuple(int(x) for x in pins["tokenizers"].split(".")) >= (0, 20)


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/tokenizers/", timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_declared_lowest_versions_work(tmp_path):
    """A fresh venv with the lowest declared versions (no site packages) runs tests/_lowest_deps_smoke.py."""
    if not _pypi_reachable():
        pytest.skip("PyPI (https://pypi.org) is unreachable: the lowest declared versions cannot be installed; run with network access")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch with its own dependencies; the light ones without theirs, so exactly the pinned versions are tested.
    for args in ([TORCH], ["--no-deps", *_lowest_versions()]):
        done = subprocess.run(pip + args, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PEGASUS_X_NATIVE": "0"}
    done = subprocess.run([str(python), str(ROOT / "tests" / "_lowest_deps_smoke.py")], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
