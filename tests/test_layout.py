"""The package's layout as docs/design.md draws it: private subpackages, imports one way, no circles."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jobwrap"
# Lower layers first: a module may import its own layer or one below it, never one above.
LAYERS = ["_compat", "_storage", "_scheduler", "_report", "_loop"]
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
    """_compat <- _storage <- _scheduler <- _report <- _loop: no private module imports a layer above its own,
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


# Names a Session goes by in the modules that drive one (integrations, testing, commands).
_SESSION_NAMES = {"session", "sess", "job", "_session", "_job"}
# Set through a Session's methods only (framework_step/framework_counts, requeue_through), never assigned.
_COUNTERS = {"step", "epoch", "position", "scheduler"}


def _is_session(node: ast.expr) -> bool:
    """``session``, ``job``, ``self.session``, ``self._job``...: an expression that names a Session."""
    if isinstance(node, ast.Name):
        return node.id in _SESSION_NAMES
    return isinstance(node, ast.Attribute) and node.attr in _SESSION_NAMES


def seam_breaches(path: Path) -> list[str]:
    """Each place in ``path`` that reads or sets a Session's private member, or assigns its step, epoch, position or
    scheduler."""
    tree = ast.parse(path.read_text())
    found = []
    stored = {id(target) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
              for target in (node.targets if isinstance(node, ast.Assign) else [node.target])}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_session(node.value)):
            continue
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        if private or (id(node) in stored and node.attr in _COUNTERS):
            found.append((node.lineno, f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: .{node.attr}"))
    return [text for _, text in sorted(found)]


def test_only_the_loop_touches_a_sessions_private_members():
    """Outside jobwrap/_loop, integrations drive a Session through its documented methods only."""
    breaches = [b for path in sorted(PACKAGE.rglob("*.py")) if "_loop" not in path.relative_to(PACKAGE).parts
                for b in seam_breaches(path)]
    assert not breaches, ("Session's private members (or its counters, assigned) used outside jobwrap/_loop; use "
                          "the integration seam (Session.framework_step, ...) instead:\n" + "\n".join(breaches))


def test_the_seam_check_finds_a_private_access_and_an_assigned_counter(tmp_path):
    """The check above names a private read, a private write and an assigned step, and passes public calls."""
    module = tmp_path / "jobwrap" / "fake.py"
    module.parent.mkdir()
    module.write_text("def f(session, self):\n    session._boundary()\n    self.session._resume = 1\n"
                      "    self.job.step = 3\n    session.save()\n    os._exit(1)\n    n = session.step\n")
    global PACKAGE
    real, PACKAGE = PACKAGE, module.parent
    try:
        assert seam_breaches(module) == ["jobwrap/fake.py:2: ._boundary", "jobwrap/fake.py:3: ._resume",
                                         "jobwrap/fake.py:4: .step"]
    finally:
        PACKAGE = real


# The projects jobwrap reaches into; their private names are imported in jobwrap/_compat only.
_OTHER_PROJECTS = {"torch", "pytorch_lightning", "lightning_fabric", "lightning", "transformers", "torchdata",
                   "wandb", "mlflow", "tensorboard", "submitit", "accelerate"}


def foreign_private_imports(path: Path) -> list[str]:
    """Each import in ``path`` of another project's private module or name (``torch.utils.data._utils``,
    ``from torch.utils.data.dataloader import _DatasetKind``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _OTHER_PROJECTS:
            names = [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
            if any(part.startswith("_") for part in node.module.split(".")):
                names = names or [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] in _OTHER_PROJECTS
                     and any(part.startswith("_") for part in alias.name.split("."))]
        else:
            continue
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name}" for name in names]
    return found


def test_only_compat_imports_another_projects_internals():
    """Another project's private modules and names are imported in jobwrap/_compat alone, where each has an adapter
    with the version it was checked on and a canary (tests/test_compat.py)."""
    breaches = [b for path in sorted(PACKAGE.rglob("*.py")) if "_compat" not in path.relative_to(PACKAGE).parts
                for b in foreign_private_imports(path)]
    assert not breaches, "private internals of other projects imported outside jobwrap/_compat:\n" + "\n".join(
        breaches)


def test_the_internals_check_finds_private_imports(tmp_path):
    """The check above names a private name, a private module and a private import, and passes public ones."""
    module = tmp_path / "jobwrap" / "fake.py"
    module.parent.mkdir()
    module.write_text("from torch.utils.data.dataloader import _DatasetKind, DataLoader\n"
                      "from torch.distributed.checkpoint._traverse import set_element\n"
                      "import torch._dynamo\nimport torch.distributed\nfrom jobwrap._loop import steps\n")
    global PACKAGE
    real, PACKAGE = PACKAGE, module.parent
    try:
        assert foreign_private_imports(module) == [
            "jobwrap/fake.py:1: torch.utils.data.dataloader._DatasetKind",
            "jobwrap/fake.py:2: torch.distributed.checkpoint._traverse", "jobwrap/fake.py:3: torch._dynamo"]
    finally:
        PACKAGE = real


BENCHMARKS = PACKAGE.parent / "scripts" / "benchmarks"


def _benchmark_graph() -> dict[str, set[str]]:
    modules = {"benchmarks" if path.stem == "__init__" else f"benchmarks.{path.stem}": path
               for path in BENCHMARKS.glob("*.py")}
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_benchmark_modules_import_in_no_circle():
    """scripts/benchmarks: a measurement imports only common.py, which imports none of them; report.py imports
    measurements, __main__.py imports report.py, and nothing imports them back: no import circle can form."""
    graph = _benchmark_graph()
    assert {"benchmarks.common", "benchmarks.report", "benchmarks.__main__", "benchmarks.save"} <= set(graph)
    assert not graph["benchmarks.common"], f"common.py imports {graph['benchmarks.common']}"
    allowed = {"benchmarks.__main__": set(graph), "benchmarks.report": set(graph) - {"benchmarks.__main__"}}
    wrong = [f"{name} -> {target}" for name, targets in graph.items() for target in targets - {"benchmarks", name}
             if target not in allowed.get(name, {"benchmarks.common"}) or target == "benchmarks.report" and
             name != "benchmarks.__main__"]
    assert not wrong, "imports against scripts/benchmarks' layout: " + "; ".join(sorted(wrong))
