"""The layout a newcomer relies on, checked on the source: thin stages reached only from the CLI, no import
cycles, modules and functions small enough to read, every module listed in the README."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ldae_cli"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path, name: str) -> set[str]:
    """ldae_cli modules imported anywhere in the file (inside functions too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    known = modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ldae_cli"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("ldae_cli"):
                continue
            for alias in node.names:  # `from ldae_cli import pca` imports the module ldae_cli.pca
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found - {name}


def test_only_the_cli_imports_stages():
    offenders = {name: sorted(i for i in imports_of(path, name) if i.startswith("ldae_cli.stages"))
                 for name, path in modules().items() if not name.startswith("ldae_cli.stages") and name != "ldae_cli.cli"}
    assert not {k: v for k, v in offenders.items() if v}
    between_stages = {name: sorted(i for i in imports_of(path, name) if i.startswith("ldae_cli.stages."))
                      for name, path in modules().items() if name.startswith("ldae_cli.stages.")}
    assert not {k: v for k, v in between_stages.items() if v}, "a stage imports another stage"


def test_no_import_cycles():
    graph = {name: imports_of(path, name) for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == "ldae_cli" or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_modules_and_functions_are_small_enough_to_read():
    long_modules = {name: n for name, path in modules().items()
                    if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long_modules
    long_functions = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_functions


def test_readme_layout_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = [str(path.relative_to(PACKAGE.parent)) for name, path in modules().items()
               if path.name != "__init__.py" and str(path.relative_to(PACKAGE.parent)) not in layout]
    assert not missing


def test_comments_do_not_point_outside_the_repository():
    """A comment or docstring must stand on its own: no 'see SPEC.md' or '../shared/...'."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{i}" for path in modules().values()
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\bSPEC\b|\.\./shared|DETECTRON2\.md", line)]
    assert not offenders
