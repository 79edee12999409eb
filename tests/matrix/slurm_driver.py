"""The matrix's Slurm cells: the batch layout (one task), srun with 2 tasks, and a submitit job submitted with
submitit's Slurm executor (``submitit_slurm``), on the local cluster.

The job script comes from jobwrap._scheduler.sbatch (as ``jobwrap submit`` writes it). Signals go
the way Slurm and users send them: ``scancel --signal=USR1 --batch`` (the batch
layout's ``--signal=B:USR1``), ``scancel --signal=USR1`` (srun's tasks), plain
``scancel`` (TERM to every process), ``scancel --signal=KILL --full``. After a
cancel or a kill the test resubmits the same script (the same submitit call), as a user would. A
submitit job's USR1 (its preemption signal here) makes submitit requeue the job itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from cells import CANCELS, Cell
from drive import TIMEOUT, TRAIN, Outcome, Run, command, environment, judge, preemption_points, refusal
from slurm_cluster import FINAL_STATES, SlurmError, cancel, cluster_available, job_info, output_tail, wait_for

from jobwrap._loop.hold import done_name, got_name, held_pattern, held_rank
from jobwrap._scheduler.sbatch import SubmitOptions, render

STATE_CODES = {"COMPLETED": 0, "CANCELLED": 143}  # anything else: 1


def run_slurm_cell(matrix, cell: Cell) -> Outcome:
    """Reference locally (shared), then the cell as Slurm jobs, judged like every other cell."""
    up, why = cluster_available()
    if not up:
        return Outcome("skipped", why)
    reference = matrix.reference(cell)
    refused = refusal(reference)
    if refused is not None:
        return Outcome("refused", refused)
    work = Path(tempfile.mkdtemp(prefix="slurm-", dir=matrix.base))
    directory, control = work / "ck", work / "control"
    control.mkdir()
    points = preemption_points(reference)
    env = _job_environment(cell, directory, control, points)
    if cell.launch == "submitit_slurm":
        def submit() -> str:
            return _submit_submitit(cell, directory, env)
    else:
        script = _script(cell, work, directory)

        def submit() -> str:
            return _submit(script, env)
    jobs: list[str] = []
    try:
        codes, signalled, problems = _drive(cell, submit, control, points, jobs)
    finally:
        cancel(*jobs)
    output = "\n".join(output_tail(job, 200) for job in jobs)
    return judge(cell, reference, Run(directory, codes, signalled, output, problems))


def _script(cell: Cell, work: Path, directory: Path) -> Path:
    train = ("python", str(TRAIN), json.dumps(cell.training()), f"{directory}.loss")
    layout = {"layout": "multi-gpu", "ntasks_per_node": 2} if cell.launch == "srun" else {}
    text = render(SubmitOptions(command=train, time=10, lead_seconds=60, gpus_per_node=0,
                                job_name=f"matrix-{cell.signal}", checkpoint_dir=str(directory), **layout))
    path = work / "job.sbatch"
    path.write_text(text)
    return path


def _job_environment(cell: Cell, directory: Path, control: Path, points: list[int]) -> dict[str, str]:
    """The test's hold protocol and the cell's settings, and the caller's Slurm client settings."""
    env = environment(cell, directory, control, points)
    env.update({k: v for k, v in os.environ.items() if k in ("SLURM_CONF", "PATH")})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _submit(script: Path, env: dict[str, str]) -> str:
    done = subprocess.run(["sbatch", "--parsable", f"--chdir={script.parent}", str(script)], env=env,
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SlurmError(f"sbatch exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def _submit_submitit(cell: Cell, directory: Path, env: dict[str, str]) -> str:
    """The cell's call submitted with submitit's Slurm executor (submitit_launch.py --slurm); the job id."""
    done = subprocess.run(command(cell, Path(f"{directory}.loss")), env=env, capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise SlurmError(f"submitit's submission exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout.split()[-1]


def _scancel(*args: str) -> None:
    subprocess.run(["scancel", *args], capture_output=True, timeout=30, check=False)


def _drive(cell: Cell, submit: Callable[[], str], control: Path, points: list[int],
           jobs: list[str]) -> tuple[list[int], list[int], list[str]]:
    """Submit, signal at each point, resubmit after a cancel; the exit codes as a plain launch would give them."""
    codes: list[int] = []
    signalled: list[int] = []
    problems: list[str] = []
    deadline = time.monotonic() + 2 * TIMEOUT
    jobs.append(submit())
    for step in points:
        if not _until(lambda: len(list(control.glob(held_pattern(step)))) >= cell.ranks, jobs[-1], deadline):
            problems.append(f"never held at step {step}")
            break
        signalled.append(step)
        _deliver(cell, jobs[-1], control, step, deadline)
        (control / done_name(step)).touch()
        if cell.signal in CANCELS:
            info = wait_for(jobs[-1], FINAL_STATES, timeout=120)
            codes.append(STATE_CODES.get(info["JobState"], 1))
            jobs.append(submit())
    info = wait_for(jobs[-1], FINAL_STATES, timeout=max(30.0, deadline - time.monotonic()))
    codes.append(STATE_CODES.get(info["JobState"], 1))
    return codes, signalled, problems


def _deliver(cell: Cell, job: str, control: Path, step: int, deadline: float) -> None:
    usr1 = ["--signal=USR1", "--batch"] if cell.launch == "slurm_batch" else ["--signal=USR1"]
    if cell.signal == "sigkill":
        _scancel("--signal=KILL", "--full", job)
        return
    if cell.signal in ("usr1", "usr1_term", "double"):
        _scancel(*usr1, job)
    if cell.signal in ("term", "usr1_term"):
        _scancel(job)
    held = [held_rank(p.name) for p in control.glob(held_pattern(step))]
    _until(lambda: all((control / got_name(step, r)).exists() for r in held), job, deadline)
    if cell.signal == "double":
        (control / done_name(step)).touch()
        if _until(lambda: (control / f"saving-{step}").exists(), job, deadline):
            _scancel(*usr1, job)
            time.sleep(0.2)
        (control / f"second-{step}").touch()


def _until(condition, job: str, deadline: float) -> bool:
    """Polls ``condition`` while the job lives (bounded); whether it came true."""
    while not condition():
        if time.monotonic() > deadline or job_info(job).get("JobState") in FINAL_STATES:
            return condition()
        time.sleep(0.05)
    return True
