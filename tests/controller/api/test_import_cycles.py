"""No module of ``controller.api`` imports, however indirectly, itself.

Every import statement counts: at module level, inside a function, under ``TYPE_CHECKING``.
``from pkg import name`` is an import of ``pkg.name`` when that is a module, else of ``pkg``.
"""
from __future__ import annotations

import ast
import graphlib
import pathlib

import controller.api

PACKAGE = pathlib.Path(controller.api.__file__).parent


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports."""
    files = {"controller.api" + ("" if p.stem == "__init__" else f".{p.stem}"): p
             for p in PACKAGE.glob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files
                            else node.module for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycles():
    graph = imports()
    assert {"controller.api.decode_fast", "controller.api.rules"} <= graph["controller.api.decode"]
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
