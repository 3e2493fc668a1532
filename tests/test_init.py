"""The package: public names load on first use, light modules stay light, and no modules import each other."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys

import pytest

import pegasus_x
from conftest import SRC, assert_imports_without_torch


def test_errors_import_without_torch():
    assert_imports_without_torch("pegasus_x.errors")


def test_public_names_resolve_and_are_listed():
    for name in pegasus_x.__all__:
        assert getattr(pegasus_x, name) is not None
    assert set(pegasus_x.__all__) <= set(dir(pegasus_x))
    from pegasus_x import PegasusXForConditionalGeneration
    from pegasus_x.model import PegasusXForConditionalGeneration as defined

    assert PegasusXForConditionalGeneration is defined
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pegasus_x.nothing_here


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_summarize_stays_the_function_after_its_module_is_imported():
    """Importing the submodule pegasus_x.summarize (the CLI does) must not hide the summarize function."""
    module = importlib.import_module("pegasus_x.summarize")
    assert pegasus_x.summarize is module.summarize
    from pegasus_x import summarize

    assert summarize is module.summarize


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("config", "checkpoint"), ("checkpoint", "config"),
                                           ("tokenizer", "checkpoint"), ("training.trainer", "cli")])
def test_modules_import_in_either_order(first, second):
    done = _python(f"import pegasus_x.{first}, pegasus_x.{second}")
    assert done.returncode == 0, done.stderr[-2000:]


# ----------------------------------------------------------------------------------------- the import graph
def _modules() -> dict[str, bool]:
    """Dotted name -> whether it is a package, for every module of the package."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = package
    return out


def _import_time_statements(body: list[ast.stmt]):
    """The import statements run when the module is imported: not those in functions or under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            yield from _import_time_statements(node.body + node.orelse)
        elif isinstance(node, (ast.Try, ast.With, ast.ClassDef)):
            extra = [s for h in getattr(node, "handlers", []) for s in h.body]
            yield from _import_time_statements(node.body + extra + getattr(node, "orelse", [])
                                               + getattr(node, "finalbody", []))


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its import runs (a submodule's own ancestors are already running)."""
    modules = _modules()
    graph = {}
    for name, is_package in modules.items():
        path = SRC.parent.joinpath(*name.split(".")).with_suffix("") / "__init__.py" if is_package else \
            SRC.parent.joinpath(*name.split(".")).with_suffix(".py")
        here = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in _import_time_statements(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1]) if node.level else ""
            base = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):   # importing a.b.c runs a, a.b and a.b.c
                dep = ".".join(parts[:i])
                if dep in modules and dep != name and not (name.startswith(dep + ".") and dep != target):
                    edges.add(dep)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    graph = _import_graph()
    # The graph is read right: known edges are there, and lazy (in-function) imports are not.
    assert "pegasus_x.config" in graph["pegasus_x.checkpoint"] and "pegasus_x.native" in graph["pegasus_x.checkpoint"]
    assert "pegasus_x.training.data" in graph["pegasus_x.training.trainer"]
    assert "pegasus_x.summarize" not in graph["pegasus_x.cli"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# Figures that only a measurement gives: times, bandwidths, speed ratios, percent gains.
MEASURED = re.compile(r"\d\s?(ms|GB/s|MB/s|tokens/s)\b|\d\s?[×x] (faster|slower)|\d\s?% (faster|slower)"
                      r"|\+\d+([.–-]\d+)*\s?%|~\d+(\.\d+)?×")


def test_no_measured_figures_in_the_code():
    """Comments and docstrings name the benchmark that measures something, not its numbers of the day."""
    assert MEASURED.search("streams at ~26 GB/s") and MEASURED.search("ran 4-19% faster")
    assert MEASURED.search("(+6-12% at 4 rows)") and MEASURED.search("~1.5× the model")
    assert not MEASURED.search("15–45% by default") and not MEASURED.search("a duplicate happens ~8% of the time")
    found = [f"{path.relative_to(SRC)}:{n}: {line.strip()}" for path in sorted(SRC.rglob("*.[pc]*"))
             if path.suffix in (".py", ".c")
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if MEASURED.search(line)]
    assert found == []


def test_readme_layout_matches_the_tree():
    """Every module of the package has its row in the README's layout table, and every row names a real file."""
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Layout", 1)[1].split("\nbenchmarks/", 1)[0]
    named = set(re.findall(r"\b(\w+\.(?:py|c))\b", table))
    present = {p.name for p in SRC.rglob("*") if p.suffix in (".py", ".c") and "__pycache__" not in p.parts}
    assert present - named - {"__init__.py"} == set(), "modules without a row in README's layout"
    assert named - present == set(), "rows in README's layout naming files that do not exist"
