"""The package's layout as docs/design.md draws it: private subpackages, imports one way, no circles."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jobwrap"
# Lower layers first: a module may import its own layer or one below it, never one above.
LAYERS = ["_storage", "_scheduler", "_report", "_loop"]
BASE = {"jobwrap.errors", "jobwrap._config", "jobwrap._format"}
PUBLIC = {"jobwrap", "jobwrap.errors", "jobwrap.testing", "jobwrap.submitit", "jobwrap.lightning",
          "jobwrap.transformers", "jobwrap.trackers", "jobwrap.cli", "jobwrap.__main__", "jobwrap.commands"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every jobwrap module ``name`` imports, at the top or inside a function (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_module_imports_in_a_circle():
    """Following imports from any module never leads back to it."""
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_private_layers_import_downwards_only():
    """_storage <- _scheduler <- _report <- _loop: no private module imports a layer above its own,
    and none imports the public modules but the base ones (errors, config, format) and the version."""
    upward = []
    for module, targets in _graph().items():
        mine = _layer(module)
        if mine is None:
            continue
        for target in targets:
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
            if theirs is None and target not in BASE | {"jobwrap"}:
                upward.append(f"{module} -> {target} (a public module)")
    assert not upward, "imports against the layering of docs/design.md: " + "; ".join(sorted(upward))


def test_every_module_is_private_or_one_of_the_public_few():
    """A module a user may import is one of the few public ones; the rest are named with an underscore."""
    public = {name for name in _modules() if not any(part.startswith("_") and part not in ("__init__", "__main__")
                                                     for part in name.split("."))}
    public -= {name for name in public if name.startswith("jobwrap.commands.")}
    assert public == PUBLIC


def test_design_map_names_every_private_module():
    """docs/design.md's module map lists each private module, so the map stays true to the code."""
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    missing = [name for name in _modules() if _layer(name) is not None and name.count(".") == 2
               and f"  {name.rsplit('.', 1)[1]}.py" not in text]
    assert not missing, f"modules missing from the map in docs/design.md: {missing}"
