"""The tested releases (jobwrap/_compat/versions.py): pyproject.toml declares them, scripts/setup-env installs
both ends, and importing jobwrap beside another release warns once, naming it, the tested range and the way out."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jobwrap._compat import versions
from jobwrap._compat.versions import ENDS, SILENCE_VAR, TESTED, pins, untested

REPO = Path(__file__).resolve().parent.parent
WARNING = "is installed, but jobwrap is tested with"


def _declared() -> dict[str, list[str]]:
    """Every requirement pyproject.toml declares (dependencies and extras), by distribution."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found: dict[str, list[str]] = {}
    for requirement in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        found.setdefault(name.lower(), []).append(spec.strip())
    return found


def _release(text: str) -> tuple[int, ...]:
    return versions._release(text)


def test_pyproject_declares_ranges_that_start_at_the_oldest_tested_release():
    """Each tested project's lower bound in pyproject.toml is its oldest tested release, and no cap excludes the newest."""
    declared = _declared()
    assert "torch" in declared and all(row.distribution in declared for row in TESTED)
    for row in TESTED:
        for spec in declared[row.distribution]:
            bounds = dict(re.findall(r"(>=|<)\s*([0-9.]+)", spec))
            assert ">=" in bounds, f"{row.distribution}{spec}: no lower bound (the oldest tested is {row.oldest})"
            assert _release(bounds[">="]) == _release(row.oldest), (
                f"pyproject.toml declares {row.distribution}{spec}, but the oldest tested release is {row.oldest}")
            if "<" in bounds:
                assert _release(row.newest) < _release(bounds["<"]), f"{row.distribution}{spec} excludes {row.newest}"


def test_the_two_venvs_take_opposite_ends_of_every_range():
    """Between .venv and .venv-edge, each tested project is installed at its oldest and at its newest release."""
    assert set(ENDS) == {"default", "edge"}
    for row in TESTED:
        taken = {getattr(row, ENDS[end][row.distribution]) for end in ENDS}
        assert taken == {row.oldest, row.newest}, f"{row.distribution}: the venvs install only {taken}"
    run = subprocess.run([sys.executable, str(REPO / "jobwrap" / "_compat" / "versions.py"), "pins", "edge"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == pins("edge") and "torch==2.14.1" in run.stdout.split()


@pytest.mark.parametrize("name, version, tested", [
    ("torch", "2.13.0+cpu", True), ("torch", "2.14.1", True), ("torch", "2.14.3", True),
    ("torch", "2.12.1", False), ("torch", "2.15.0", False), ("torch", "2.15.0.dev20261201", False),
    ("pytorch-lightning", "2.6.0", True), ("pytorch-lightning", "2.7.0", False),
    ("transformers", "4.57.6", False), ("transformers", "5.0.0", True), ("transformers", "5.99.0", False),
    ("torchdata", "0.11.0", True), ("torchdata", "0.10.1", False), ("numpy", "1.0.0", True),
])
def test_a_release_outside_the_tested_range_is_named(name, version, tested):
    """Releases between the two tested ends (and later patches of the newest minor) pass; others are named."""
    messages = untested({name: version})
    assert (messages == []) == tested, messages
    if not tested:
        (message,) = messages
        assert f"{name} {version} is installed" in message and "jobwrap simulate" in message and SILENCE_VAR in message


def _fake_release(tmp_path: Path, name: str, version: str) -> Path:
    """A dist-info directory that makes importlib.metadata report ``name`` at ``version`` from ``tmp_path``."""
    info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return tmp_path


def _import_jobwrap(extra_path: Path | None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JOBWRAP_")}
    if extra_path is not None:
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), environ.get("PYTHONPATH")]))
    code = ("import jobwrap\nfrom jobwrap import Session, preemptible\n"
            "from jobwrap._compat.versions import warn_untested\nwarn_untested('torch')\nprint(Session.__name__)")
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_importing_the_session_beside_an_untested_torch_warns_once(tmp_path):
    """`from jobwrap import Session` beside torch 2.99.0 logs one warning naming that release, the tested range
    and how to check it with jobwrap simulate; importing more of jobwrap does not repeat it."""
    run = _import_jobwrap(_fake_release(tmp_path, "torch", "2.99.0"))
    assert run.returncode == 0, run.stderr
    assert run.stderr.count(WARNING) == 1, run.stderr
    assert "torch 2.99.0 is installed" in run.stderr and "2.13.0 to 2.14.x" in run.stderr
    assert "jobwrap simulate" in run.stderr and "pip install 'torch>=2.13.0,<2.15'" in run.stderr


def test_the_untested_warning_is_silenced_by_its_variable(tmp_path):
    """JOBWRAP_UNTESTED_VERSIONS_OK=1 imports the Session beside an untested torch without the warning."""
    run = _import_jobwrap(_fake_release(tmp_path, "torch", "2.99.0"), **{SILENCE_VAR: "1"})
    assert run.returncode == 0 and WARNING not in run.stderr, run.stderr


def test_this_venv_holds_the_releases_the_table_names():
    """The venv the tests run in (.venv or .venv-edge, from scripts/setup-env) holds each project at one end of
    its tested range, so the table names what CI ran; importing the integrations there warns about nothing."""
    for row in TESTED:
        installed = versions.installed_version(row.distribution)
        assert installed is not None, f"{row.distribution} is not installed: run scripts/setup-env"
        assert installed.split("+")[0] in (row.oldest, row.newest), (
            f"{row.distribution} {installed} is installed; the table of tested releases names {row.oldest} and "
            f"{row.newest} (scripts/setup-env installs them)")
    code = "import jobwrap, jobwrap.lightning, jobwrap.transformers\nfrom jobwrap import Session"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != SILENCE_VAR})
    assert run.returncode == 0, run.stderr
    assert WARNING not in run.stderr, run.stderr


def test_the_cli_reads_no_package_metadata():
    """`jobwrap --help` starts without the version check (importlib.metadata is not imported), as it starts
    without torch."""
    code = "import sys, jobwrap.cli; jobwrap.cli.build_parser(); print('importlib.metadata' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stdout + run.stderr
