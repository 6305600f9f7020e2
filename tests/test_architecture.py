"""The package keeps the shape docs/architecture.md describes: no import cycles, no import from a higher layer,
no private name imported across modules, no function over 60 lines and no module over 400."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_kit"
LAYERS = {  # top-level module or sub-package -> layer (docs/architecture.md, "Layers")
    "dtypes": 0, "optimizers": 0, "config": 0, "config_yaml": 0, "config_aliases": 0, "config_fields": 0, "atomic": 0, "paths": 0, "progress": 0,
    "hardware": 0, "model": 1, "planning": 1, "offload": 1, "data": 2, "training": 3, "inference": 3,
    "merging": 4, "demo": 5, "cli": 6, "api": 6, "__init__": 6, "__main__": 6, "testing": 7,
}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text()))
    return found


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> list[tuple[str, str]]:
    """(imported qlora_kit module, imported name) pairs, function-level imports included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_kit"):
            assert node.level == 0, f"{name}: relative import (use absolute imports)"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append((full, "") if full in MODULES else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.startswith("qlora_kit.")]
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__" if len(parts) == 1 else parts[1]]


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if m != "qlora_kit" and m.split(".")[1] not in LAYERS]


def test_no_import_from_a_higher_layer_and_no_private_names():
    wrong = []
    for name, (_, tree) in MODULES.items():
        for target, imported in _imports(name, tree):
            if _layer(target) > _layer(name):
                wrong.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
            if imported.startswith("_") and not imported.startswith("__"):
                wrong.append(f"{name} imports the private {target}.{imported}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: {t for t, _ in _imports(name, tree) if t in MODULES and t != name}
             for name, (_, tree) in MODULES.items()}
    for package in [m for m in MODULES if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()]:
        graph[package] = {t for t in graph[package] if not t.startswith(package + ".")}  # re-exports of children
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_functions_fit_a_screen_and_modules_stay_small():
    long_functions = [f"{path.name}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
                      for path, tree in MODULES.values() for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 60]
    long_modules = [f"{path.relative_to(PACKAGE)} ({n} lines)" for path, _ in MODULES.values()
                    if (n := len(path.read_text().splitlines())) > 400]
    assert not long_functions and not long_modules, (long_functions, long_modules)
