"""``jobwrap run``: run a training command, forward signals to it, requeue it when it asks.

Locally it stands in for the scheduler (relaunching on the requeue exit code);
inside a Slurm batch script (``exec jobwrap run -- ...``) it is the process the
batch signal reaches, and the requeue of last resort when the training process
could not run ``scontrol`` itself.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Mapping, Sequence

import psutil

from jobwrap.config import REQUEUE_EXIT_CODE
from jobwrap.env import read_env
from jobwrap.schedulers import scontrol_requeue

log = logging.getLogger("jobwrap")


def signal_tree(pid: int, signum: int) -> list[int]:
    """Send ``signum`` to ``pid`` and all its descendants, deepest first; return who got it."""
    try:
        root = psutil.Process(pid)
        members = root.children(recursive=True)[::-1] + [root]
    except psutil.NoSuchProcess:
        return []
    reached = []
    for proc in members:
        try:
            proc.send_signal(signum)
            reached.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return reached


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell would report it (128 + signal for a killed child)."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(command: Sequence[str], *, forward: Sequence[signal.Signals], max_requeues: int,
              environ: Mapping[str, str] | None = None) -> int:
    """Run ``command`` until it ends with anything but the requeue code; return its exit status."""
    env = dict(os.environ if environ is None else environ)
    job = read_env(env)
    restart = job.restart_count
    child: subprocess.Popen | None = None
    received: list[int] = []

    def relay(signum: int, frame: object) -> None:
        received.append(signum)
        if child is not None and child.poll() is None:
            signal_tree(child.pid, signum)

    previous = {sig: signal.signal(sig, relay) for sig in forward}
    try:
        while True:
            env["JOBWRAP_RESTART_COUNT"] = str(restart)
            log.debug("launching %s (restart %d)", list(command), restart)
            try:
                child = subprocess.Popen(list(command), env=env)
            except OSError as exc:
                log.error("cannot start %s: %s", command[0], exc.strerror)
                return 127
            status = exit_status(child.wait())
            if status != REQUEUE_EXIT_CODE:
                return status
            if job.scheduler == "slurm" and job.job_id:
                error = scontrol_requeue(job.job_id)
                if error is None:
                    log.info("requeued Slurm job %s", job.job_id)
                    return 0
                log.warning("scontrol requeue %s failed (%s); relaunching inside this allocation",
                            job.job_id, error)
            if restart >= max_requeues:
                log.error("not relaunched: the requeue cap is reached (%d restarts, --max-requeues %d)",
                          restart, max_requeues)
                return status
            restart += 1
            received.clear()
            log.info("training asked to be requeued: relaunching (restart %d of at most %d)", restart, max_requeues)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
