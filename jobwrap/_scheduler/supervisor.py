"""``jobwrap run``: run a training command, forward signals to its training processes, requeue it when it asks.

Locally it stands in for the scheduler (relaunching on the requeue exit code);
inside a Slurm batch script (``exec jobwrap run -- ...``) it is the process the
batch signal reaches, and the requeue of last resort when the training process
could not run ``scontrol`` itself.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Mapping, Sequence

from jobwrap._config import REQUEUE_EXIT_CODE
from jobwrap._scheduler import trainers
from jobwrap._scheduler.env import PREVIOUS_EXIT_VARIABLE, SUPERVISOR_VARIABLE, read_env, supervisor_token
from jobwrap._scheduler.schedulers import DESPITE_EXIT_SIGNALS, scheduler_for
from jobwrap._scheduler.stopping import EXIT, REQUEUE, SUPERVISOR, Limits, Stop, decide_stop
from jobwrap._storage.pids import start_time

log = logging.getLogger("jobwrap")

#: How long a signal that comes before any training process registered (see
#: :func:`deliver_when_registered`) is held for one before it goes to the command anyway.
HOLD_SECONDS = 60.0


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


def signal_trainers(registry: str, signum: int) -> list[int]:
    """Send ``signum`` to the training processes registered in ``registry``; return who got it.

    Only to them: not to a launcher in between (torchrun traps TERM, passes it on and
    SIGKILLs the ranks 30 s later, before a slow step reaches its boundary), not to
    their helpers (a DataLoader worker dies of TERM, and its loader then raises in the
    middle of the step). Each rank decides, and the ranks agree at a step boundary.
    """
    reached = []
    for pid in trainers.registered(registry):
        try:
            os.kill(pid, signum)
            reached.append(pid)
        except ProcessLookupError:
            continue
    return reached


def deliver_when_registered(child: subprocess.Popen, registry: str, signum: int, *,
                            hold: float = HOLD_SECONDS, poll: float = 0.05) -> list[int]:
    """Send ``signum`` once a training process registered; after ``hold`` s, to the command itself.

    Slurm's signal can come while training is still starting (importing torch, before
    jobwrap installs its handler): USR1 sent then would kill it, and a preempted job
    that dies is not requeued. Held, it reaches the training process as soon as it can
    take it, and the session stops at its first step boundary. A command that never
    registers (it does not use jobwrap) gets it after ``hold``, as the last resort.
    """
    deadline = time.monotonic() + hold
    while child.poll() is None:
        reached = signal_trainers(registry, signum)
        if reached:
            return reached
        if time.monotonic() > deadline:
            log.warning("%s: no training process registered within %.0f s; sending it to the command (pid %d)",
                        signal.Signals(signum).name, hold, child.pid)
            child.send_signal(signum)
            return [child.pid]
        time.sleep(poll)
    return []


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell would report it (128 + signal for a killed child)."""
    return 128 - returncode if returncode < 0 else returncode


def cancelled_by(received: Sequence[int], cancel: Sequence[int], request: str | None) -> signal.Signals | None:
    """The signal received by ``jobwrap run`` that cancels the requeue training asked for, or None. Pure.

    A user's ``scancel`` (TERM) or Ctrl-C (INT) ends the job even when it reaches
    ``jobwrap run`` after training decided to requeue (a USR1 came first). Training
    that requeues on exit signals too says so in its ``request``; then only INT cancels.
    """
    cancelling = set(cancel)
    if request is not None and DESPITE_EXIT_SIGNALS in request.split():
        cancelling &= {signal.SIGINT}
    return next((signal.Signals(sig) for sig in received if sig in cancelling), None)


def _die_with_me() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the command TERM when this process dies (Linux).

    So a SIGKILLed ``jobwrap run`` does not leave training running, re-parented to init:
    it commits a checkpoint and exits as on a cancel. Deeper processes (torchrun's
    workers, a shell's child) watch this process themselves (``JOBWRAP_SUPERVISOR``).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # died before the prctl: nobody would send it
            os._exit(128 + signal.SIGTERM)
    return preexec


def supervise(command: Sequence[str], *, forward: Sequence[signal.Signals], max_requeues: int,
              environ: Mapping[str, str] | None = None, cancel: Sequence[signal.Signals] = ()) -> int:
    """Run ``command`` until it ends with anything but the requeue code; return its exit status.

    A ``cancel`` signal received while it runs means no relaunch, whatever the command asked.
    """
    env = dict(os.environ if environ is None else environ)
    job = read_env(env)
    scheduler = scheduler_for(job, fallback=RelaunchHere())
    restart = job.restart_count
    child: subprocess.Popen | None = None
    received: list[int] = []
    unsent: list[int] = []  # arrived while no command ran (starting, between relaunches): for the next

    registry = tempfile.mkdtemp(prefix="jobwrap-trainers-")
    env[trainers.REGISTRY_VARIABLE] = registry

    def hold(signum: int) -> None:
        # A thread waits for a trainer: the signal handler must return for the main thread's wait().
        threading.Thread(target=deliver_when_registered, args=(child, registry, signum), daemon=True).start()

    def relay(signum: int, frame: object) -> None:
        received.append(signum)
        if child is None or child.poll() is not None:
            unsent.append(signum)
        elif not signal_trainers(registry, signum):
            hold(signum)

    fd, requeue_file = tempfile.mkstemp(prefix="jobwrap-requeue-")
    os.close(fd)
    os.unlink(requeue_file)
    env["JOBWRAP_REQUEUE_FILE"] = requeue_file
    env[SUPERVISOR_VARIABLE] = supervisor_token(os.getpid(), start_time(os.getpid()) or 0.0)
    preexec = _die_with_me()
    previous = {sig: signal.signal(sig, relay) for sig in forward}
    try:
        while True:
            env["JOBWRAP_RESTART_COUNT"] = str(restart)
            log.debug("launching %s (restart %d)", list(command), restart)
            try:
                child = subprocess.Popen(list(command), env=env, preexec_fn=preexec)
            except OSError as exc:
                log.error("cannot start %s: %s", command[0], exc.strerror)
                return 127
            while unsent:
                hold(unsent.pop(0))
            status = exit_status(child.wait())
            ended = time.time()
            request = _take(requeue_file)
            if request is None and status != REQUEUE_EXIT_CODE:
                return status
            decision = decide_stop(_stop(cancelled_by(received, cancel, request), restart, status),
                                   Limits(max_requeues))
            if not decision.requeue:
                log.info("%s", decision.reason)
                return decision.exit_code
            if scheduler.requeue() == 0:
                return 0
            if not decision.relaunch:
                log.error("%s", decision.reason)
                return decision.exit_code
            restart += 1
            env[PREVIOUS_EXIT_VARIABLE] = repr(ended)  # the relaunched process records it (jobwrap status)
            received.clear()
            log.info("%s", decision.reason)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _take(requeue_file)
        shutil.rmtree(registry, ignore_errors=True)


class RelaunchHere:
    """``jobwrap run``'s fallback where Slurm does not take the requeue: relaunch the command here."""

    name = "local"
    instead = "relaunching inside this allocation"

    def requeue(self) -> int:
        return REQUEUE_EXIT_CODE  # nobody requeued the job: supervise() relaunches it (up to the cap)


def _stop(cancelled: signal.Signals | None, restart: int, status: int) -> Stop:
    """The stop the command asked for, as ``jobwrap run`` sees it: a cancel it received wins."""
    return Stop(EXIT if cancelled is not None else REQUEUE, cancelled, restart_count=restart, status=status,
                by=SUPERVISOR)


def _take(path: str) -> str | None:
    """The requeue request the training process wrote into ``path`` (None: none); consumes it."""
    try:
        # Never through a symlink, never blocking on a FIFO planted at that name.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            request = os.read(fd, 256).decode(errors="replace")
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None
    except OSError:
        request = "requeue"  # there, but unreadable: still a request
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return request
