"""How a job asks to run again: ``scontrol requeue`` on Slurm, an exit code for a local supervisor.

Each backend's side effect sits in one small method so that the policy around
it (caps, progress, which signal means what) is tested without a cluster.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Callable, Protocol, Sequence

from jobwrap.config import REQUEUE_EXIT_CODE
from jobwrap.env import JobEnv

log = logging.getLogger("jobwrap")

Runner = Callable[..., subprocess.CompletedProcess]


class Scheduler(Protocol):
    name: str

    def requeue(self) -> int:
        """Ask for this job to run again; return the exit code the process should end with."""


#: What the requeue file says when training requeues on exit signals too (``requeue_on_exit_signals``):
#: then an exit signal that reached ``jobwrap run`` is no cancel, and the relaunch goes ahead.
DESPITE_EXIT_SIGNALS = "despite-exit-signals"


def ask_supervisor(requeue_file: str | None, *, despite_exit_signals: bool = False) -> int:
    """Ask ``jobwrap run`` for a relaunch: touch its requeue file (exit 0), else exit with the requeue code.

    The file works through any launcher (torchrun turns a worker's non-zero exit
    into a failure of its own); the exit code works where no file was handed down.
    """
    if requeue_file:
        try:
            # 0600 whatever the umask, and never through a symlink planted at that name.
            fd = os.open(requeue_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, f"requeue {DESPITE_EXIT_SIGNALS}\n".encode() if despite_exit_signals else b"requeue\n")
            finally:
                os.close(fd)
            return 0
        except OSError as exc:
            log.warning("could not write the requeue file %s (%s); using exit code %d",
                        requeue_file, exc.strerror, REQUEUE_EXIT_CODE)
    return REQUEUE_EXIT_CODE


class LocalScheduler:
    """No scheduler: ``jobwrap run`` relaunches the command when asked."""

    name = "local"

    def __init__(self, requeue_file: str | None = None, *, despite_exit_signals: bool = False) -> None:
        self.requeue_file = requeue_file
        self.despite_exit_signals = despite_exit_signals

    def requeue(self) -> int:
        return ask_supervisor(self.requeue_file, despite_exit_signals=self.despite_exit_signals)


class SlurmScheduler:
    """``scontrol requeue <job>``; where that is missing or fails, fall back to the requeue exit code.

    The batch template (``exec jobwrap run``) acts on that exit code from outside
    the container, where ``scontrol`` usually exists.
    """

    name = "slurm"

    def __init__(self, job_id: str, *, requeue_file: str | None = None, run: Runner = subprocess.run,
                 timeout: float = 30.0, despite_exit_signals: bool = False) -> None:
        self.job_id = job_id
        self.requeue_file = requeue_file
        self.despite_exit_signals = despite_exit_signals
        self._run = run
        self._timeout = timeout

    def requeue(self) -> int:
        error = scontrol_requeue(self.job_id, run=self._run, timeout=self._timeout)
        if error is None:
            log.info("requeued Slurm job %s", self.job_id)
            return 0
        log.warning("scontrol requeue %s failed (%s); asking the batch script's jobwrap run "
                    "(or exit code %d) to requeue the job", self.job_id, error, REQUEUE_EXIT_CODE)
        return ask_supervisor(self.requeue_file, despite_exit_signals=self.despite_exit_signals)


def scontrol_requeue(job_id: str, *, run: Runner = subprocess.run, timeout: float = 30.0,
                     scontrol: Sequence[str] | None = None) -> str | None:
    """Run ``scontrol requeue``; return None on success or a one-line reason."""
    command = list(scontrol or [shutil.which("scontrol") or "scontrol"]) + ["requeue", job_id]
    try:
        result = run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return "scontrol not found on PATH"
    except subprocess.TimeoutExpired:
        return f"scontrol did not answer within {timeout:.0f} s"
    if result.returncode != 0:
        return (result.stderr or result.stdout or f"exit code {result.returncode}").strip().splitlines()[-1]
    return None


def scheduler_for(job: JobEnv, *, despite_exit_signals: bool = False) -> Scheduler:
    """The backend of this job; ``despite_exit_signals``: it requeues on exit signals too (the file says so)."""
    if job.scheduler == "slurm" and job.job_id:
        return SlurmScheduler(job.job_id, requeue_file=job.requeue_file, despite_exit_signals=despite_exit_signals)
    return LocalScheduler(job.requeue_file, despite_exit_signals=despite_exit_signals)


def requeue_refusal(*, restart_count: int, max_requeues: int,
                    progress_history: Sequence[bool], max_no_progress: int) -> str | None:
    """Why this job must not be requeued again, or None. Pure: the caps of the requeue loop.

    ``progress_history`` says, for each earlier stop and then this one, whether
    the run committed a newer step than it resumed from.
    """
    if restart_count >= max_requeues:
        return (f"the requeue cap is reached ({restart_count} restarts, max_requeues={max_requeues}); "
                f"raise JOBWRAP_MAX_REQUEUES to allow more")
    streak = 0
    for progressed in reversed(progress_history):
        if progressed:
            break
        streak += 1
    if streak >= max_no_progress:
        return (f"the last {streak} runs committed no newer step; the job is stuck in a requeue loop "
                f"(is the signal lead time too short to reach a step boundary?). Raise "
                f"JOBWRAP_MAX_NO_PROGRESS or fix the cause")
    return None
