"""The layout a newcomer relies on, checked on the source: thin stages reached only from the CLI, no import
cycles, modules and functions small enough to read, every module listed in docs/architecture.md; test helpers
imported from tests/helpers.py, never from conftest.py."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ldae_cli"
CONFTEST_IMPORT = re.compile(r"^\s*(from\s+conftest\s+import|import\s+conftest\b)", re.MULTILINE)
# Sizes in logical lines (a statement, however the formatter breaks it, is one; so is a docstring): the 500- and
# 80-line limits of the code before `ruff format`, restated so that formatting does not count
MAX_MODULE_LOGICAL_LINES = 350
MAX_FUNCTION_LOGICAL_LINES = 70


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
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("ldae_cli"):
                continue
            for alias in node.names:  # `from ldae_cli.model import pca` imports the module ldae_cli.model.pca
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found - {name}


BASE = ("errors", "config", "seeds")  # top-level modules every folder may use
LAYERS = ("runs", "settings", "data", "model", "train", "studies", "stages")  # the part folders, lowest first
FACE = ("cli", "api", "__main__")  # top-level modules users call


def layer(name: str) -> int:
    """0 for the base modules, 1.. for the folders in LAYERS' order, above them the face (the package's own
    __init__ included: it serves the library API)."""
    part = name.split(".")[1] if "." in name else "__init__"
    if part in BASE:
        return 0
    return 1 + LAYERS.index(part) if part in LAYERS else 1 + len(LAYERS)


def test_the_top_level_holds_the_face_and_a_few_base_modules_and_the_part_folders():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == set(BASE) | set(FACE) and len(top) + 1 <= 8
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders == set(LAYERS) and all((PACKAGE / folder / "__init__.py").is_file() for folder in folders)


def test_a_folder_imports_only_its_own_layer_and_lower_ones():
    """runs < settings < data < model < train < studies < stages < face: a module reaches down, never up (the
    package root is imported for its version only)."""
    upward = sorted(
        f"{name} -> {i}"
        for name, path in modules().items()
        for i in imports_of(path, name)
        if i != "ldae_cli" and layer(i) > layer(name)
    )
    assert not upward


def test_only_the_cli_imports_stages():
    offenders = {
        name: sorted(i for i in imports_of(path, name) if i.startswith("ldae_cli.stages"))
        for name, path in modules().items()
        if not name.startswith("ldae_cli.stages") and name != "ldae_cli.cli"
    }
    assert not {k: v for k, v in offenders.items() if v}
    between_stages = {
        name: sorted(i for i in imports_of(path, name) if i.startswith("ldae_cli.stages."))
        for name, path in modules().items()
        if name.startswith("ldae_cli.stages.")
    }
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
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def logical_line_starts(source: str) -> list[int]:
    """The line each logical line of `source` ends on (Python's NEWLINE tokens)."""
    return [
        tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.NEWLINE
    ]


def test_modules_and_functions_are_small_enough_to_read():
    long_modules, long_functions = {}, []
    for name, path in modules().items():
        source = path.read_text()
        ends = logical_line_starts(source)
        if len(ends) > MAX_MODULE_LOGICAL_LINES:
            long_modules[name] = len(ends)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = sum(node.lineno <= end <= node.end_lineno for end in ends)
                if length > MAX_FUNCTION_LOGICAL_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} logical lines")
    assert not long_modules
    assert not long_functions


def test_the_layout_page_lists_every_module():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    layout = page[page.index("## Layout") :]
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for name, path in modules().items()
        if path.name != "__init__.py" and str(path.relative_to(PACKAGE.parent)) not in layout
    ]
    assert not missing


def test_comments_do_not_point_outside_the_repository():
    """A comment or docstring must stand on its own: no 'see SPEC.md' or '../shared/...'."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{i}"
        for path in modules().values()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bSPEC\b|\.\./shared|DETECTRON2\.md", line)
    ]
    assert not offenders


def stems() -> dict[str, list[str]]:
    """Module file stem -> the modules with it (ignoring __init__ and __main__)."""
    out: dict[str, list[str]] = {}
    for name, path in modules().items():
        if path.stem not in ("__init__", "__main__"):
            out.setdefault(path.stem, []).append(name)
    return out


def test_one_meaning_per_name():
    """No two modules share a stem (launch.py beside stages/launch.py), and no module's stem is another's followed by
    `_` (engine.py beside engine_pretrain.py): a newcomer never wonders which one is meant."""
    assert not {stem: names for stem, names in stems().items() if len(names) > 1}
    all_stems = set(stems())
    assert not sorted(f"{a} / {b}" for a in all_stems for b in all_stems if b.startswith(a + "_"))


def test_engines_read_no_config_defined_in_a_stage():
    """A config class lives with the code that reads it: an engine_<stage> module imports no stage, and each
    engine's Session[...] names a config class defined in the engine itself or a library module."""
    stage_classes = {
        node.name
        for name, path in modules().items()
        if name.startswith("ldae_cli.stages.")
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ClassDef)
    }
    for name, path in modules().items():
        if not name.startswith("ldae_cli.train.engine_"):
            continue
        tree = ast.parse(path.read_text())
        sessions = [
            node.slice.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Subscript)
            and getattr(node.value, "id", None) == "Session"
            and isinstance(node.slice, ast.Name)
        ]
        assert sessions, f"{name}: its train() takes no typed Session[...]"
        defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
        library = {
            alias.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("ldae_cli")
            and not node.module.startswith("ldae_cli.stages")
            for alias in node.names
        }
        assert set(sessions) <= defined | library, (name, sessions)
        read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            alias.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for alias in n.names
        }
        assert not (read & stage_classes) - defined, (name, sorted((read & stage_classes) - defined))


SEEDING = ("manual_seed", "seed", "Random", "default_rng")  # the calls a seed goes into
MIXING = (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x5BD1E995, 1_000_003, 100_003, 7919)


def test_one_module_derives_seeds():
    """Outside seeds.py no seed is computed: what goes into manual_seed / np.random.seed / random.Random is a plain
    value (the run seed, or a key from seeds.py), and no seed-mixing constant appears."""
    offenders = []
    for name, path in modules().items():
        if name == "ldae_cli.seeds":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            called = getattr(func, "attr", None) or getattr(func, "id", None)
            if called in SEEDING and any(isinstance(arg, ast.BinOp) for arg in node.args):
                offenders.append(f"{name}:{node.lineno} {called}(...)")
            if isinstance(node, ast.Constant) and node.value in MIXING and not isinstance(node.value, bool):
                offenders.append(f"{name}:{node.lineno} constant {node.value}")
    assert not offenders


def test_nothing_imports_the_cli():
    """Library code never calls back into the command line (`ldae launch` is handed the function it runs)."""
    importers = [
        name
        for name, path in modules().items()
        if name not in ("ldae_cli.cli", "ldae_cli.__main__") and "ldae_cli.cli" in imports_of(path, name)
    ]
    assert not importers


def test_nothing_imports_conftest():
    """conftest.py holds fixtures and hooks, which pytest hands out by name; a plain helper a test module or
    script imports lives in tests/helpers.py (benchmarks' shell scripts embed Python too, so they are read)."""
    root = PACKAGE.parent
    importers = [
        str(path.relative_to(root))
        for folder in ("tests", "benchmarks")
        for path in sorted((root / folder).rglob("*"))
        if path.suffix in (".py", ".sh") and CONFTEST_IMPORT.search(path.read_text())
    ]
    assert not importers
