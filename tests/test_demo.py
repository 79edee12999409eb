"""``./scripts/demo`` installs only what the demo needs: jobwrap's core and its ``demo`` extra."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

REPO = Path(__file__).resolve().parent.parent
# Distributions whose import name is not their name with - as _.
IMPORT_NAMES = {"pytorch-lightning": ["pytorch_lightning", "lightning"], "pytest-xdist": ["xdist"]}

# Loaded at each Python start of the test (PYTHONPATH): the packages the demo's install leaves out become
# absent as in a fresh .venv. None in sys.modules fails their import and makes importlib.util.find_spec (which
# torch and jobwrap use to probe for optional packages) answer None.
HIDE = """\
import sys
for name in {left_out!r}:
    sys.modules[name] = None
"""


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {extra: [re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0] for dep in deps]
            for extra, deps in project["optional-dependencies"].items()}


def _left_out() -> set[str]:
    """Import names of every package an extra other than ``demo`` adds."""
    extras = _extras()
    kept = set(extras["demo"])
    names = {dist for extra, dists in extras.items() if extra != "demo" for dist in dists} - kept
    return {module for dist in names for module in IMPORT_NAMES.get(dist, [dist.replace("-", "_")])}


def test_demo_script_asks_setup_env_for_the_demo_extra_only() -> None:
    """scripts/demo installs jobwrap[demo], and that extra holds nothing of the test extra's heavy packages."""
    calls = re.findall(r"^scripts/setup-env(.*)$", (REPO / "scripts" / "demo").read_text(), re.M)
    assert [call.strip() for call in calls] == ["demo"]
    assert not {"pytorch-lightning", "transformers", "accelerate", "matplotlib", "pytest"} & set(_extras()["demo"])


def test_demo_runs_without_the_packages_its_install_leaves_out(tmp_path: Path) -> None:
    """With every package that only another extra installs (pytest, Lightning, transformers, matplotlib...)
    absent, the demo's parts run: its own imports, examples/train.py under `jobwrap run`, `jobwrap ls`."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE.format(left_out=sorted(_left_out())))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, env=env,
                              cwd=tmp_path)

    probe = run("-c", "import importlib.util; assert importlib.util.find_spec('matplotlib') is None; import pytest")
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, probe.stderr  # the hiding works
    demo = run(str(REPO / "examples" / "demo.py"), "--help")
    assert demo.returncode == 0 and "--epochs" in demo.stdout, demo.stderr
    ck = tmp_path / "ck"
    trained = run("-m", "jobwrap", "run", "--dir", str(ck), "--", sys.executable, str(REPO / "examples" / "train.py"),
                  "--epochs", "1", "--samples", "64", "--workers", "2")
    assert trained.returncode == 0, trained.stderr
    listed = run("-m", "jobwrap", "ls", str(ck))
    assert listed.returncode == 0 and "verified" in listed.stdout, listed.stderr
