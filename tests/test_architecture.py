"""The layers of core/ (docs/ARCHITECTURE.md): imports point one way, the engine never imports the dashboard, and no
file edits sys.path (the project is a package)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lowest first; a module may import its own package and the layers below, never one above or a sibling.
LAYERS = [
    {"core.errors", "core.control"},
    {"core.registry"},
    {"core.options"},
    {"core.io"},
    {"core.metrics"},
    {"core.model"},
    {"core.method", "core.tuning"},
    {"core.analysis"},
    {"core.evaluation"},
    {"core.cli"},
    {"core.__main__", "core"},
]


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its sub-package (core.method.ensemble -> core.method) or itself."""
    parts = module.split(".")
    if len(parts) >= 2 and os.path.isdir(os.path.join(ROOT, *parts[:2])):
        return ".".join(parts[:2])
    if len(parts) >= 2 and parts[1] in ("errors", "control", "registry", "options", "cli", "__main__"):
        return ".".join(parts[:2])
    return "core"


def _layer(unit: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def _modules():
    for folder, _, files in os.walk(os.path.join(ROOT, "core")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(module: str, path: str):
    """Every core module ``module`` imports, at any depth of the file (lazy imports in functions included)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "core")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "core":
                # "from . import optimizers" names a module too
                yield from ([f"{target}.{a.name}" for a in node.names] if not node.module else [target])


@pytest.mark.parametrize("module,path", sorted(_modules()))
def test_imports_point_one_way(module, path):
    mine = _unit(module)
    for target in _imports(module, path):
        theirs = _unit(target)
        if theirs == mine or mine == "core":
            continue
        assert _layer(theirs) < _layer(mine), f"{module} imports {target}: layer {theirs} is not below {mine}"


def test_the_engine_never_imports_streamlit_or_the_dashboard():
    for module, path in _modules():
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("streamlit", "dashboard") for n in names), module


def test_no_file_edits_sys_path():
    offenders = []
    for top in ("core", "dashboard", "bench", "scripts", "tests"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py") and f != "test_architecture.py":
                    text = open(os.path.join(folder, f)).read()
                    if "sys.path.insert" in text or "sys.path.append" in text or "sys.path[" in text:
                        offenders.append(os.path.join(folder, f))
    assert not offenders


def test_every_layer_is_a_folder_a_newcomer_can_find():
    for units in LAYERS[3:-2]:
        for unit in units:
            assert os.path.isfile(os.path.join(ROOT, *unit.split("."), "__init__.py")), unit
