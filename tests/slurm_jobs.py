"""Helpers shared by the tests that run jobs on the local Slurm cluster (tests/test_*_slurm.py,
tests/test_slurm_e2e.py): the job's environment, sbatch and scancel, bounded waits that fail with
the job's record and output, and the run's events. The fixtures (``slurm_up``, ``jobs``) are in conftest.py.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from conftest import REPO
from slurm_cluster import (
    FINAL_STATES,
    JobInfo,
    SlurmError,
    daemon_log_tail,
    job_info,
    output_tail,
    restart_count,
    wait_for,
)

from jobwrap._scheduler.sbatch import SubmitOptions, render
from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore

VENV_BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin" / "python").exists() else Path(sys.executable).parent
TRAIN = str(REPO / "examples" / "train.py")
# 16 steps per epoch, 48 in all: a few seconds of compute, stretched by --step-seconds in the jobs.
TRAIN_ARGS = ("--epochs", "3", "--samples", "256", "--batch-size", "16")


def job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch passes to the job: .venv/bin first, no JOBWRAP_* of the caller, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWRAP_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    # One intra-op thread in the jobs and in the reference runs alike (and less contention on 2 cores).
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.update(extra)
    return env


def local_env(**extra: str) -> dict[str, str]:
    """job_env without Slurm's variables: for the uninterrupted local reference runs."""
    return {k: v for k, v in job_env(**extra).items() if not k.startswith("SLURM_")}


def run_reference(args: Sequence[str], ckpt: Path, *, timeout: float = 600, **extra: str) -> None:
    """An uninterrupted local run of ``python args`` (the jobs' Python and environment, no Slurm variables)
    checkpointing into ``ckpt``: what a signalled job must finish like."""
    done = subprocess.run([str(VENV_BIN / "python"), *args], env=local_env(JOBWRAP_DIR=str(ckpt), **extra),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def submit(script: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """sbatch --parsable with extra options and the job's environment; the job id."""
    done = subprocess.run(["sbatch", "--parsable", f"--chdir={cwd}", *args, str(script)],
                          env=env or job_env(), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SlurmError(f"sbatch {script.name} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def scancel(*args: str) -> float:
    """Runs scancel; the wall-clock time it was called (to time the way back)."""
    sent = time.time()
    subprocess.run(["scancel", *args], check=True, capture_output=True, timeout=30)
    return sent


def write_script(tmp_path: Path, name: str, **options: object) -> Path:
    """A batch script rendered by jobwrap._scheduler.sbatch (CPU only, 10 minutes, 60 s lead unless given)."""
    defaults: dict[str, object] = {"time": 10, "lead_seconds": 60, "gpus_per_node": 0, "job_name": name,
                                   "checkpoint_dir": str(tmp_path / "ckpt")}
    text = render(SubmitOptions(**{**defaults, **options}))
    path = tmp_path / f"{name}.sbatch"
    path.write_text(text)
    return path


def failure(job: str, why: str) -> AssertionError:
    """An AssertionError with the job's record, output tail and the daemon log tails."""
    try:
        info: JobInfo | None = job_info(job)
    except SlurmError:
        info = None
    record = " ".join(f"{k}={v}" for k, v in info.items()) if info else "(no record)"
    output = output_tail(info, 60) if info else "(unknown)"
    return AssertionError(f"job {job}: {why}\n----- job record\n{record}\n----- job output\n{output}\n"
                          f"{daemon_log_tail()}")


def wait_until(job: str, condition: Callable[[], bool], what: str, timeout: float) -> float:
    """Polls condition (bounded) while the job lives; the seconds it took."""
    start = time.monotonic()
    while not condition():
        state = job_info(job).get("JobState", "")
        if state in FINAL_STATES:
            raise failure(job, f"ended {state} while waiting for {what}")
        if time.monotonic() - start > timeout:
            raise failure(job, f"no {what} after {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - start


def checked(job: str, check: Callable[[], None]) -> None:
    """Runs an assertion block; on failure, adds the job's output and the daemon logs."""
    try:
        check()
    except AssertionError as exc:
        raise failure(job, f"check failed: {exc}") from None


def usr1_requeued_and_completed(jobs: list[str], script: Path, cwd: Path, env: dict[str, str],
                                ready: Callable[[], bool], what: str) -> dict[str, str]:
    """Submits the script, sends USR1 to its batch shell once ``ready``, and waits until the job, requeued
    once, completes; the job's final ``scontrol show job`` fields."""
    job = submit(script, cwd=cwd, env=env)
    jobs.append(job)
    wait_until(job, ready, what, 300)
    scancel("--signal=USR1", "--batch", job)
    info = wait_for(job, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=400)
    return {**info, "JobId": job}


def assert_resumed_once(ckpt: Path, first: int, last: int) -> None:
    """One requeue at a step in [first, last), and the second start resumed at that step."""
    (requeue,) = events(ckpt, "requeue")
    assert first <= requeue["step"] < last
    assert [s["restart"] for s in events(ckpt, "start")] == [0, 1]
    assert events(ckpt, "start")[1]["step"] == requeue["step"]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def committed_steps(directory: Path) -> list[int]:
    return [c.step for c in CheckpointStore(str(directory)).committed()] if directory.exists() else []


def events(directory: Path, kind: str) -> list[dict]:
    return [e for e in read_events(str(directory)) if e["event"] == kind]


def slurm_time(text: str) -> float:
    """A Slurm timestamp (local time, whole seconds) as epoch seconds."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def report(name: str, **numbers: float | int) -> None:
    """Prints the measured timings (pytest -s shows them) and appends them to $JOBWRAP_E2E_TIMINGS."""
    print(f"{name}: " + ", ".join(f"{k}={v:.2f}s" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in numbers.items()))
    if path := os.environ.get("JOBWRAP_E2E_TIMINGS"):
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **{k: round(v, 3) for k, v in numbers.items()}}) + "\n")


def train_command(tmp_path: Path, *extra: str, step_seconds: float = 0.1) -> tuple[str, ...]:
    return ("python", TRAIN, *TRAIN_ARGS, "--step-seconds", str(step_seconds),
            "--loss-log", str(tmp_path / "loss.tsv"), *extra)
