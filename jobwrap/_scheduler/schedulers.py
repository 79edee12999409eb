"""How a job asks to run again: ``scontrol requeue`` on Slurm, an exit code for a local supervisor.

Each backend's side effect sits in one small method so that the policy around
it (``jobwrap/_scheduler/stopping.py``: caps, progress, which signal means what) is tested
without a cluster.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Protocol, Sequence

from jobwrap._config import REQUEUE_EXIT_CODE
from jobwrap._scheduler.env import JobEnv
from jobwrap._scheduler.proc import Runner, run_command

log = logging.getLogger("jobwrap")


class Scheduler(Protocol):
    name: str

    def requeue(self) -> int:
        """Ask for this job to run again; return the exit code the process should end with."""


class Fallback(Scheduler, Protocol):
    """What asks for the requeue where the scheduler itself cannot."""

    instead: str  # what it does, for the warning that the scheduler failed


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
    instead = f"asking the batch script's jobwrap run (or exit code {REQUEUE_EXIT_CODE}) to requeue the job"

    def __init__(self, requeue_file: str | None = None, *, despite_exit_signals: bool = False) -> None:
        self.requeue_file = requeue_file
        self.despite_exit_signals = despite_exit_signals

    def requeue(self) -> int:
        return ask_supervisor(self.requeue_file, despite_exit_signals=self.despite_exit_signals)


class SlurmScheduler:
    """``scontrol requeue <job>``; where that is missing or fails, the ``fallback`` asks instead.

    Training's fallback is :class:`LocalScheduler`: the batch template (``exec
    jobwrap run``) acts on its request from outside the container, where
    ``scontrol`` usually exists. ``jobwrap run``'s own is to relaunch the command.
    """

    name = "slurm"

    def __init__(self, job_id: str, *, fallback: Fallback, run: Runner = subprocess.run,
                 timeout: float = 30.0) -> None:
        self.job_id = job_id
        self.fallback = fallback
        self._run = run
        self._timeout = timeout

    def requeue(self) -> int:
        error = scontrol_requeue(self.job_id, run=self._run, timeout=self._timeout)
        if error is None:
            log.info("requeued Slurm job %s", self.job_id)
            return 0
        log.warning("scontrol requeue %s failed (%s); %s", self.job_id, error, self.fallback.instead)
        return self.fallback.requeue()


def scontrol_requeue(job_id: str, *, run: Runner = subprocess.run, timeout: float = 30.0,
                     scontrol: Sequence[str] | None = None) -> str | None:
    """Run ``scontrol requeue``; return None on success or a one-line reason."""
    done = run_command(list(scontrol or [shutil.which("scontrol") or "scontrol"]) + ["requeue", job_id],
                       run=run, timeout=timeout)
    return None if done.ok else done.reason


def scheduler_for(job: JobEnv, *, despite_exit_signals: bool = False, fallback: Fallback | None = None) -> Scheduler:
    """The backend of this job; ``despite_exit_signals``: it requeues on exit signals too (the file says so).

    ``fallback`` asks where the scheduler cannot, and is the backend outside Slurm
    (default: :class:`LocalScheduler`, a request to ``jobwrap run``).
    """
    if fallback is None:
        fallback = LocalScheduler(job.requeue_file, despite_exit_signals=despite_exit_signals)
    if job.scheduler == "slurm" and job.job_id:
        return SlurmScheduler(job.job_id, fallback=fallback)
    return fallback
