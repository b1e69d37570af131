"""The code's shape: no import cycles (lazy imports included), config groups that list only real choices, one
source of defaults (the YAML), docstrings that cite nothing a reader of this repo does not have."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
from conftest import compose

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "align_bench"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its body (function-level imports too). Importing
    a.b.c also imports the packages a.b and a: those edges count, except a module's own parent packages."""
    files = {_module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                stem = ".".join(base + (node.module.split(".") if node.module else []))
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            for t in targets:
                if not t.startswith(PACKAGE):
                    continue
                parts = t.split(".")
                for k in range(2, len(parts) + 1):  # the module and the packages on its way
                    name = ".".join(parts[:k])
                    if name in files and name != mod and not mod.startswith(name + "."):
                        graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_lazy_import_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles_lazy_imports_included():
    graph = import_graph()
    assert "align_bench.rewards.tiny" in graph and graph["align_bench.algorithms.d3po"]  # the walk saw the code
    assert "align_bench.tiny.train" not in graph["align_bench.rewards.tiny"]  # rewards need no training code
    assert cycles(graph) == []


def test_algo_group_lists_only_real_algorithms():
    from hydra.errors import MissingConfigException

    from align_bench.algorithms import ALGORITHMS

    with pytest.raises(MissingConfigException) as e:
        compose(["algo=nope"])
    listed = re.findall(r"^\s+(\S+)$", str(e.value).split("Available options in 'algo':")[1], flags=re.M)
    assert sorted(listed) == sorted(ALGORITHMS)


def _schema_classes():
    """config.py's schemas, every algorithm's Config, and every dataclass nested in them."""
    import typing

    from align_bench import config
    from align_bench.algorithms import ALGORITHMS

    todo = [c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    todo += [m.Config for m in ALGORITHMS.values()]
    seen = set()
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            hints = typing.get_type_hints(cls).values()
            todo += [t for t in hints if isinstance(t, type) and dataclasses.is_dataclass(t)]
    return seen


def test_schemas_hold_no_defaults_the_yaml_holds_them():
    """Every default lives in conf/ with its comment: a schema field with a default would be a second copy."""
    with_defaults = [f"{cls.__module__}.{cls.__name__}.{f.name}" for cls in _schema_classes()
                     for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert len(_schema_classes()) > 20 and with_defaults == []


def test_docstrings_cite_nothing_outside_the_repo():
    offenders = [str(p.relative_to(SRC)) for p in (SRC / PACKAGE).rglob("*.py") if "algorithms.md" in p.read_text()]
    assert offenders == []
