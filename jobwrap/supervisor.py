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
import tempfile
from typing import Mapping, Sequence

import psutil

from jobwrap.config import REQUEUE_EXIT_CODE
from jobwrap.env import read_env
from jobwrap.schedulers import scontrol_requeue

log = logging.getLogger("jobwrap")


def catches(pid: int, signum: int) -> bool | None:
    """Whether ``pid`` has a handler for ``signum`` (Linux ``/proc``); None when unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        return None
    return None


def signal_tree(pid: int, signum: int) -> list[int]:
    """Send ``signum`` to the processes under ``pid`` that handle it; return who got it.

    A signal such as USR1 kills a process that does not handle it: a shell in
    between, or torchrun, which passes only INT/TERM/HUP/QUIT to its workers.
    So it goes straight to every process in the tree that traps it (the
    training ranks, whatever launched them) and to the root only when nobody does.
    """
    try:
        root = psutil.Process(pid)
        members = root.children(recursive=True)[::-1] + [root]
    except psutil.NoSuchProcess:
        return []
    targets = [p for p in members if catches(p.pid, signum) is not False] or [root]
    reached = []
    for proc in targets:
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

    fd, requeue_file = tempfile.mkstemp(prefix="jobwrap-requeue-")
    os.close(fd)
    os.unlink(requeue_file)
    env["JOBWRAP_REQUEUE_FILE"] = requeue_file
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
            asked = _take(requeue_file)
            if not asked and status != REQUEUE_EXIT_CODE:
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
                return status or REQUEUE_EXIT_CODE
            restart += 1
            received.clear()
            log.info("training asked to be requeued: relaunching (restart %d of at most %d)", restart, max_requeues)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _take(requeue_file)


def _take(path: str) -> bool:
    """Whether the training process asked for a requeue through ``path``; consumes the request."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
