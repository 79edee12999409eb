"""The scheduler side: a missing, failing, refusing or hanging ``scontrol``, and the requeue caps.

A fake ``scontrol`` first on ``PATH`` stands in for Slurm's answers; the session
must fall back (exit 75, or the requeue file under ``jobwrap run``) with a warning
that quotes Slurm, and the caps must end the requeue loop with the reason.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from typing import Any, Iterator

import jobwrap

from .internals import scontrol_requeue, supervise
from .results import Campaign, Fault, Outcome, first_with
from .training import Weights, capture_logs, environment, new_directory, open_session, train_to, warnings_of

SLURM = {"SLURM_JOB_ID": "4242"}
INVALID_JOB = "scontrol: error: slurm_requeue: Invalid job id specified"
DISABLED = "scontrol: error: Requeue of JobId=4242 Requested operation is presently disabled"


def fake_scontrol(folder: str, *, code: int, message: str = "", sleep: float = 0) -> str:
    """An ``scontrol`` on PATH that logs its arguments, optionally sleeps, prints ``message`` and exits ``code``."""
    path = os.path.join(folder, "scontrol")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f"echo \"$@\" >> '{folder}/calls'\n"
                + (f"sleep {sleep}\n" if sleep else "")
                + (f"echo '{message}' >&2\n" if message else "")
                + f"exit {code}\n")
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def path_env(folder: str | None) -> Iterator[None]:
    """PATH with ``folder`` first (None: a PATH with no scontrol anywhere)."""
    saved = os.environ.get("PATH", "")
    if folder is None:
        path = os.pathsep.join(p for p in saved.split(os.pathsep)
                               if p and not os.path.exists(os.path.join(p, "scontrol")))
    else:
        path = folder + os.pathsep + saved
    with environment(PATH=path):
        yield


def signalled_session(directory: str, environ: dict[str, str], **settings: Any
                      ) -> tuple[int | None, str, list[str]]:
    """A Session that gets USR1 at step 2: (exit code, reason, warning lines)."""
    with capture_logs() as records:
        try:
            with open_session(directory, environ=environ, **settings) as job:
                job.track(model=Weights(64), tag=0)
                job.step_done()
                os.kill(os.getpid(), signal.SIGUSR1)
                job.step_done()
            return None, "no stop", warnings_of(records)
        except jobwrap.Preempted as stop:
            return stop.code, stop.reason, warnings_of(records)


def _requeue_under(workdir: str, name: str, *, answer: str | None, environ: dict[str, str] | None = None
                   ) -> tuple[int | None, list[str]]:
    """A Slurm job signalled at step 2 with an scontrol that fails with ``answer`` (None: no scontrol)."""
    folder = None
    if answer is not None:
        folder = tempfile.mkdtemp(prefix="bin-", dir=workdir)
        fake_scontrol(folder, code=1, message=answer)
    with path_env(folder):
        code, _, warnings = signalled_session(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir),
                                              {**SLURM, **(environ or {})})
    return code, warnings


def check_fallback(workdir: str, answer: str | None, quoted: str, said: str = "warning",
                   about: str = "scontrol") -> Outcome:
    """scontrol answers ``answer`` (None: there is none): exit 75 and a warning that quotes ``quoted``."""
    code, warnings = _requeue_under(workdir, "sctl", answer=answer)
    return (code == jobwrap.REQUEUE_EXIT_CODE and any(quoted in w for w in warnings),
            f"exit {code}; {said}: {first_with(warnings, about)}")


def check_scontrol_failing_under_run(workdir: str) -> Outcome:
    """A failing scontrol under ``jobwrap run``: the requeue file asks it to requeue, the process exits 0."""
    requeue_file = os.path.join(tempfile.mkdtemp(prefix="rqf-", dir=workdir), "requeue")
    code, _ = _requeue_under(workdir, "failsctl2", answer=INVALID_JOB, environ={"JOBWRAP_REQUEUE_FILE": requeue_file})
    return code == 0 and os.path.exists(requeue_file), (f"exit {code}; requeue file written: "
                                                        f"{os.path.exists(requeue_file)}")


def check_hanging_scontrol(workdir: str) -> Outcome:
    """An scontrol that never answers is abandoned after the timeout, with a reason."""
    hanging = fake_scontrol(tempfile.mkdtemp(prefix="bin-", dir=workdir), code=0, sleep=30)
    started = time.monotonic()
    error = scontrol_requeue("4242", timeout=1.0, scontrol=[hanging])
    took = time.monotonic() - started
    return error is not None and "did not answer" in error and took < 10, f"gave up after {took:.1f} s: {error}"


def check_requeue_cap(workdir: str) -> Outcome:
    """At the requeue cap the session does not requeue: exit 1 and the reason."""
    code, reason, _ = signalled_session(tempfile.mkdtemp(prefix="cap-", dir=workdir), {"JOBWRAP_RESTART_COUNT": "3"},
                                        max_requeues=3)
    return code == 1 and "cap" in reason, f"exit {code}: {reason[:100]}"


def check_supervisor_cap(workdir: str) -> Outcome:
    """``jobwrap run`` relaunches a command that always asks for a requeue only max_requeues times."""
    folder = tempfile.mkdtemp(prefix="cap-", dir=workdir)
    count = os.path.join(folder, "launches")
    with capture_logs() as records:
        status = supervise(["sh", "-c", f"echo x >> '{count}'; exit 75"], forward=(), max_requeues=2,
                           environ={"PATH": os.environ.get("PATH", "")})
    with open(count) as f:
        launches = len(f.read().split())
    said = any("cap" in r.getMessage() for r in records)
    ok = status == jobwrap.REQUEUE_EXIT_CODE and launches == 3 and said
    return ok, f"{launches} launches (1 + 2 relaunches), then exit {status} with 'the requeue cap is reached'"


def check_no_progress_cap(workdir: str) -> Outcome:
    """Runs that commit no newer step stop the requeue loop."""
    directory = new_directory(workdir, "noprog")
    train_to(directory, [1])
    codes = []
    for restart in range(1, 5):
        with capture_logs():
            try:
                with open_session(directory, environ={"JOBWRAP_RESTART_COUNT": str(restart)},
                                  max_no_progress=2) as job:
                    os.kill(os.getpid(), signal.SIGUSR1)  # before any step: no progress
                    job.track(model=Weights(4096), tag=0)
                codes.append(None)
            except jobwrap.Preempted as stop:
                codes.append(stop.code)
    ok = codes[:2] == [75, 1] or codes[:3] == [75, 75, 1]
    return ok, f"exit codes of successive stalled runs: {codes}"


_EXPECTED = "fallback exit 75 / requeue file with a warning; caps end the loop with exit 1 and the reason"
FAULTS = [Fault("scheduler", fault, _EXPECTED, check, args) for fault, check, args in (
    ("scontrol missing from PATH", check_fallback, (None, "scontrol not found")),
    ("scontrol exits 1 (fake on PATH)", check_fallback, (INVALID_JOB, "Invalid job id")),
    ("scontrol exits 1 under `jobwrap run` (requeue file handed down)", check_scontrol_failing_under_run, ()),
    ("job submitted with --no-requeue (scontrol refuses: 'presently disabled', exit 1)", check_fallback,
     (DISABLED, "presently disabled", "warning quotes Slurm", "disabled")),
    ("scontrol hangs", check_hanging_scontrol, ()),
    ("requeue cap reached (restart 3, max_requeues=3)", check_requeue_cap, ()),
    ("`jobwrap run` relaunch cap (a command that always asks to be requeued, --max-requeues 2)",
     check_supervisor_cap, ()),
    ("no-progress cap: runs that commit no newer step", check_no_progress_cap, ()),
)]


def section(c: Campaign) -> None:
    print("scheduler", flush=True)
    for fault in FAULTS:
        c.run(fault)
