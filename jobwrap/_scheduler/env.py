"""What the scheduler and launcher tell this process, read from an environment mapping (pure)."""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobEnv:
    """This process's place in the job: scheduler, job id, restart count and rank."""

    scheduler: str  # "slurm" or "local"
    job_id: str | None
    restart_count: int
    rank: int
    local_rank: int
    world_size: int
    end_time: float | None = None  # epoch seconds when the allocation ends, if known
    requeue_file: str | None = None  # set by `jobwrap run`: touching it asks for a relaunch
    supervisor: tuple[int, float] | None = None  # (pid, create time) of the `jobwrap run` that started it
    trainers_dir: str | None = None  # set by `jobwrap run`: training processes register there for its signals
    previous_exit: float | None = None  # set by `jobwrap run` on a relaunch: when the previous process ended


#: Set by ``jobwrap run`` for everything it starts: ``PID:CREATE_TIME`` of itself, so that a
#: training process (also one under torchrun or a shell) can tell when its supervisor is gone.
SUPERVISOR_VARIABLE = "JOBWRAP_SUPERVISOR"


#: Set by ``jobwrap run`` when it relaunches the command: the wall time it saw the previous process end
#: (reaped it), so that the relaunch's cost splits into the old process's exit and the new one's start.
PREVIOUS_EXIT_VARIABLE = "JOBWRAP_PREVIOUS_EXIT"


def supervisor_token(pid: int, create_time: float) -> str:
    return f"{pid}:{create_time!r}"


def parse_supervisor(value: str | None) -> tuple[int, float] | None:
    """``PID:CREATE_TIME`` to a tuple; None when absent or malformed (then nothing is watched)."""
    try:
        pid, started = (value or "").split(":")
        return int(pid), float(started)
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _int(environ: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return default


def slurm_job_id(environ: Mapping[str, str]) -> str | None:
    """The id ``scontrol requeue`` needs: ``ARRAYJOB_TASK`` for an array task, else the job id."""
    array_job = environ.get("SLURM_ARRAY_JOB_ID")
    array_task = environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")


def read_env(environ: Mapping[str, str] | None = None) -> JobEnv:
    """Read scheduler and launcher variables (Slurm, torchrun, ``jobwrap run``)."""
    environ = os.environ if environ is None else environ
    slurm_id = slurm_job_id(environ)
    # torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; srun sets SLURM_PROCID/... for each task.
    rank = _int(environ, "RANK", "SLURM_PROCID", default=0)
    local_rank = _int(environ, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    world_size = _int(environ, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    if slurm_id:
        end = environ.get("SLURM_JOB_END_TIME")
        return JobEnv(
            scheduler="slurm",
            job_id=slurm_id,
            # jobwrap run sets JOBWRAP_RESTART_COUNT when it relaunches in place (no scontrol).
            restart_count=_int(environ, "JOBWRAP_RESTART_COUNT", "SLURM_RESTART_COUNT", default=0),
            rank=rank, local_rank=local_rank, world_size=world_size,
            end_time=float(end) if end and end.isdigit() else None,
            requeue_file=environ.get("JOBWRAP_REQUEUE_FILE") or None,
            supervisor=parse_supervisor(environ.get(SUPERVISOR_VARIABLE)),
            trainers_dir=environ.get("JOBWRAP_TRAINERS") or None,
            previous_exit=_float(environ.get(PREVIOUS_EXIT_VARIABLE)),
        )
    return JobEnv(
        scheduler="local",
        job_id=environ.get("JOBWRAP_JOB_ID"),
        restart_count=_int(environ, "JOBWRAP_RESTART_COUNT", default=0),
        rank=rank, local_rank=local_rank, world_size=world_size,
        requeue_file=environ.get("JOBWRAP_REQUEUE_FILE") or None,
        supervisor=parse_supervisor(environ.get(SUPERVISOR_VARIABLE)),
        trainers_dir=environ.get("JOBWRAP_TRAINERS") or None,
        previous_exit=_float(environ.get(PREVIOUS_EXIT_VARIABLE)),
    )


def default_run_id(job: JobEnv) -> str | None:
    """A run id that survives requeues: the Slurm job id, or the one ``jobwrap run`` hands down."""
    if job.scheduler == "slurm" and job.job_id:
        return f"slurm-{job.job_id}"
    return job.job_id


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SlurmStep:
    """Where this process sits in Slurm's own terms: what ``jobwrap doctor`` needs to signal it as Slurm would."""

    job_id: str | None  # SLURM_JOB_ID as scancel takes it with a step (JOB.STEP), not the array form
    step_id: str | None  # a number in an srun step; unset (or "batch") in the batch shell
    task: int  # SLURM_PROCID: this task's number in the step
    step_tasks: int | None  # SLURM_STEP_NUM_TASKS
    job_tasks: int | None  # SLURM_NTASKS
    restart_count: int  # Slurm's own count, not jobwrap run's relaunches in place
    partition: str | None  # SLURM_JOB_PARTITION: one, or several separated by commas

    @property
    def in_srun_step(self) -> bool:
        """Whether this is a task of an ``srun`` step (a numbered step), not the batch shell."""
        return (self.step_id or "").isdigit()

    @property
    def tasks(self) -> int:
        """The tasks of this step that a signal to the step reaches."""
        return self.step_tasks or self.job_tasks or 1


def read_slurm_step(environ: Mapping[str, str] | None = None) -> SlurmStep:
    """Slurm's variables about the job, the step and this task (nothing set outside Slurm)."""
    environ = os.environ if environ is None else environ
    return SlurmStep(
        job_id=environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or None,
        step_id=environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID") or None,
        task=_int(environ, "SLURM_PROCID", default=0),
        step_tasks=_int(environ, "SLURM_STEP_NUM_TASKS", default=0) or None,
        job_tasks=_int(environ, "SLURM_NTASKS", default=0) or None,
        restart_count=_int(environ, "SLURM_RESTART_COUNT", default=0),
        partition=environ.get("SLURM_JOB_PARTITION") or None,
    )
