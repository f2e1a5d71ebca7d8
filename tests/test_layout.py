"""The tree as the architecture: the product at the top level imports nothing from the folders beside it, no module
imports another that imports it back, and no module edits sys.path."""

import ast

from conftest import ROOT

ROOMS = ("benchmarks", "experiments", "tools", "tests")


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources():
    paths = [p for p in ROOT.glob("*.py")] + [p for room in ("kernels", *ROOMS) for p in (ROOT / room).rglob("*.py")]
    return {module_name(p): p for p in paths if ".venv" not in p.parts}


def imports(path, known):
    """The repository's modules that `path` imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def test_the_product_imports_nothing_from_the_rooms_beside_it():
    modules = sources()
    for name, path in modules.items():
        if name.split(".")[0] not in ROOMS:
            upward = {imported for imported in imports(path, modules) if imported.split(".")[0] in ROOMS}
            assert not upward, f"{name} imports {sorted(upward)}"


def test_no_import_cycles():
    modules = sources()
    graph = {name: imports(path, modules) - {name} for name, path in modules.items()}

    def reaches(start, target, seen):
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and not seen.add(nxt) and reaches(nxt, target, seen)):
                return True
        return False

    cycles = [name for name in graph if reaches(name, name, set())]
    assert not cycles, f"modules in an import cycle: {sorted(cycles)}"


def test_no_module_edits_sys_path():
    edits = [
        name for name, path in sources().items() if "sys.path." in path.read_text() and name != "tests.test_layout"
    ]
    assert not edits, f"{edits} edit sys.path; run them with python -m from the repository root"
