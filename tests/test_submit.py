"""``jobwrap submit`` as users start it: from a venv they did not activate, and into a directory that
already holds a run. The rendered scripts are run for real with bash (not through Slurm)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobwrap._scheduler.sbatch import SubmitOptions, render
from jobwrap.commands.submit import running_jobwrap

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# A PATH without the venv: what a shell has before `source .venv/bin/activate`.
BARE_PATH = "/usr/bin:/bin"
TRAIN = REPO / "examples" / "train.py"


def _bare_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")
           and not k.startswith(("JOBWRAP_", "SLURM_"))}
    return {**env, "PATH": BARE_PATH, **extra}


def _submit(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """The venv's own console script, called by its path, as `.venv/bin/jobwrap submit ...`."""
    return subprocess.run([str(VENV_BIN / "jobwrap"), "submit", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)


def _bash(script: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


@pytest.fixture(autouse=True)
def _venv_not_on_bare_path() -> None:
    if not (VENV_BIN / "jobwrap").exists():
        pytest.skip("the tests run from an environment without the jobwrap console script")
    assert shutil.which("jobwrap", path=BARE_PATH) is None, "a jobwrap on /usr/bin would hide the case"


def test_unactivated_venv_script_runs_the_jobwrap_it_was_rendered_by(tmp_path: Path) -> None:
    """`.venv/bin/jobwrap submit` with the venv off PATH renders that jobwrap's path, and the script runs
    under bash with that PATH; the script of a bare `jobwrap` fails there with 127."""
    train = [str(VENV_BIN / "python"), "-c", "import sys, jobwrap; print('trained in', sys.prefix)"]
    result = _submit("--time", "10", "--gpus", "0", "--dir", str(tmp_path / "ckpt"), "--dry-run", "--", *train,
                     env=_bare_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"exec {VENV_BIN / 'jobwrap'} run -- " in result.stdout
    ran = _bash(result.stdout, tmp_path, _bare_env())
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == f"trained in {Path(sys.prefix)}"
    bare = _bash(render(SubmitOptions(time=10, gpus_per_node=0, command=tuple(train))), tmp_path, _bare_env())
    assert bare.returncode == 127 and "jobwrap: not found" in bare.stderr


def test_unactivated_venv_srun_layout_names_the_same_jobwrap_for_each_task(tmp_path: Path) -> None:
    """In the srun layouts each task's `jobwrap task` is that same path, not a bare name."""
    result = _submit("--time", "10", "--gpus", "2", "--dry-run", "--", str(VENV_BIN / "python"), "t.py",
                     env=_bare_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"srun --ntasks-per-node=2 {VENV_BIN / 'jobwrap'} task -- {VENV_BIN / 'python'} t.py" in result.stdout


def test_activated_venv_keeps_the_plain_jobwrap(tmp_path: Path) -> None:
    """With the venv's bin first on PATH, the script says plain `jobwrap` (the templates' form)."""
    env = _bare_env(PATH=f"{VENV_BIN}:{BARE_PATH}")
    result = _submit("--time", "10", "--gpus", "0", "--dry-run", "--", "python", "t.py", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\nexec jobwrap run -- python t.py\n")


def test_unactivated_venv_bare_python_is_refused_with_its_path(tmp_path: Path) -> None:
    """`-- python train.py` from an un-activated venv is refused at submit: the job's PATH would find another
    Python (or none); the message gives the venv's python path and the activate line."""
    result = _submit("--time", "10", "--dry-run", "--", "python", "train.py", env=_bare_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert f"-- {VENV_BIN / 'python'} train.py" in result.stderr
    assert f"source {VENV_BIN / 'activate'}" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_without_a_jobwrap_script_the_interpreter_runs_the_module(tmp_path: Path) -> None:
    """Where no jobwrap script sits beside the interpreter (an install without console scripts), the
    script runs `PYTHON -m jobwrap` by the interpreter's path."""
    python = tmp_path / "bin" / "python3"
    python.parent.mkdir()
    python.symlink_to(sys.executable)
    assert running_jobwrap(executable=str(python), which=lambda name: None) == (str(python), "-m", "jobwrap")
    (python.parent / "jobwrap").write_text("#!/bin/sh\n")
    (python.parent / "jobwrap").chmod(0o755)
    assert running_jobwrap(executable=str(python), which=lambda name: None) == (str(python.parent / "jobwrap"),)
    found = str(python.parent / "jobwrap")
    assert running_jobwrap(executable=str(python), which=lambda name: found) == ("jobwrap",)


# --- a directory that already holds a run ------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with a finished one-epoch run of examples/train.py (committed checkpoints, run.json)."""
    directory = tmp_path_factory.mktemp("earlier") / "ckpt"
    subprocess.run([sys.executable, str(TRAIN), "--epochs", "1", "--samples", "64", "--dir", str(directory)],
                   check=True, capture_output=True, timeout=120, env=_bare_env())
    yield directory


def test_submit_into_another_runs_directory_is_refused_naming_adopt(tmp_path: Path, finished_run: Path) -> None:
    """A --dir holding another run's checkpoints is refused at submit (exit 2, --adopt named), where the
    job would only have failed at its start, after its queue wait."""
    result = _submit("--time", "10", "--gpus", "0", "--dir", str(finished_run), "--dry-run", "--",
                     sys.executable, str(TRAIN), env=_bare_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "add --adopt" in result.stderr and "choose another --dir" in result.stderr
    assert "step 2" in result.stderr and result.stdout == ""


def test_adopt_renders_the_adoption_and_the_job_continues_the_run(tmp_path: Path, finished_run: Path) -> None:
    """--adopt puts JOBWRAP_ADOPT=1 in the script; run as a Slurm job would (a new job id) it continues the
    directory's run, where the same script without it stops at start with ForeignRunError."""
    directory = tmp_path / "ckpt"
    shutil.copytree(finished_run, directory)
    command = ("--time", "10", "--gpus", "0", "--dir", str(directory), "--dry-run", "--", sys.executable,
               str(TRAIN), "--epochs", "1", "--samples", "64")
    adopted = _submit(*command[:6], "--adopt", *command[6:], env=_bare_env(), cwd=tmp_path)
    assert adopted.returncode == 0, adopted.stderr
    assert "\nexport JOBWRAP_ADOPT=1\n" in adopted.stdout
    job = _bare_env(SLURM_JOB_ID="4242")
    foreign = _bash(adopted.stdout.replace("export JOBWRAP_ADOPT=1\n", ""), tmp_path, job)
    assert foreign.returncode != 0 and "ForeignRunError" in foreign.stderr
    ran = _bash(adopted.stdout, tmp_path, job)
    assert ran.returncode == 0, ran.stderr
    assert "slurm-4242" in (directory / "run.json").read_text()
