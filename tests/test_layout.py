"""The layout the README describes: flat modules that do not import each other in a circle."""

import ast

from conftest import ROOT


def imports_of(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | ({f"{node.module}.{a.name}" for a in node.names} if node.module == "tools" else set())
    return names


def test_no_two_modules_import_each_other():
    modules = {p.stem: p for p in ROOT.glob("*.py")} | {f"tools.{p.stem}": p for p in (ROOT / "tools").glob("*.py")}
    graph = {name: imports_of(path) & set(modules) for name, path in modules.items()}
    assert graph["tools.check"] >= {"tools.benchmark"}  # the graph sees tools, too

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    circles = sorted(name for name in graph if reaches(name, name))
    assert not circles, f"modules that import themselves through others: {circles}"
