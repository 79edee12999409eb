"""The stop decision (pure, over a table of cases) and the requeue seam it hands over to.

The decision is the one of training (``Session``) and of ``jobwrap run``; the seam runs
real commands: a fake ``scontrol`` on PATH, or none at all.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from jobwrap._config import REQUEUE_EXIT_CODE
from jobwrap._scheduler.env import read_env
from jobwrap._scheduler.schedulers import LocalScheduler, SlurmScheduler, scheduler_for
from jobwrap._scheduler.stopping import EXIT, REQUEUE, SUPERVISOR, Decision, Limits, Stop, decide_stop
from jobwrap._scheduler.supervisor import RelaunchHere, supervise

CANCELLED = ("SIGTERM: checkpoint committed, exiting without requeueing (Slurm requeues a preempted job itself; "
             "a user's scancel must end the job)")
CAP = "the requeue cap is reached (3 restarts, max_requeues=3); raise JOBWRAP_MAX_REQUEUES to allow more"
STUCK = ("the last 3 runs committed no newer step; the job is stuck in a requeue loop (is the signal lead time "
         "too short to reach a step boundary?). Raise JOBWRAP_MAX_NO_PROGRESS or fix the cause")
REQUEUED = "checkpoint committed, requeue requested"

CASES = [
    # (what, stop, limits, decision)
    ("cancel: TERM exits 143, no requeue",
     Stop(EXIT, signal.SIGTERM), Limits(3),
     Decision(143, False, CANCELLED, cause=CANCELLED)),
    ("cancel without a signal (jobwrap run gone) counts as TERM",
     Stop(EXIT, None), Limits(3),
     Decision(143, False, CANCELLED, cause=CANCELLED)),
    ("cancel: INT exits 130",
     Stop(EXIT, signal.SIGINT), Limits(3),
     Decision(130, False, CANCELLED.replace("SIGTERM", "SIGINT"), cause=CANCELLED.replace("SIGTERM", "SIGINT"))),
    ("a cancel wins over the caps",
     Stop(EXIT, signal.SIGTERM, restart_count=9, progressed=False, history=(False, False)), Limits(3),
     Decision(143, False, CANCELLED, cause=CANCELLED)),
    ("requeue within the cap",
     Stop(REQUEUE, signal.SIGUSR1, restart_count=2), Limits(3, 3),
     Decision(REQUEUE_EXIT_CODE, True, REQUEUED)),
    ("cap reached: exit 1 and the reason naming JOBWRAP_MAX_REQUEUES",
     Stop(REQUEUE, signal.SIGUSR1, restart_count=3), Limits(3, 3),
     Decision(1, False, f"not requeued: {CAP}", cause=CAP)),
    ("max_requeues=0: never requeued",
     Stop(REQUEUE, signal.SIGUSR1), Limits(0, 3),
     Decision(1, False, "not requeued: " + CAP.replace("3", "0"), cause=CAP.replace("3", "0"))),
    ("no-progress loop: the third run in a row without a newer step",
     Stop(REQUEUE, signal.SIGUSR1, restart_count=3, progressed=False, history=(True, False, False)), Limits(9, 3),
     Decision(1, False, f"not requeued: {STUCK}", cause=STUCK)),
    ("progress in this run ends the streak",
     Stop(REQUEUE, signal.SIGUSR1, restart_count=2, progressed=True, history=(False, False)), Limits(9, 3),
     Decision(REQUEUE_EXIT_CODE, True, REQUEUED)),
    ("two runs without progress are below max_no_progress=3",
     Stop(REQUEUE, signal.SIGUSR1, restart_count=2, progressed=False, history=(True, False)), Limits(9, 3),
     Decision(REQUEUE_EXIT_CODE, True, REQUEUED)),
    ("jobwrap run, cancel: 143 and no relaunch",
     Stop(EXIT, signal.SIGTERM, by=SUPERVISOR), Limits(3),
     Decision(143, False, "SIGTERM received: not relaunching although training asked to be requeued "
                          "(a cancel wins over a requeue)")),
    ("jobwrap run within the cap: the scheduler first, else a relaunch here",
     Stop(REQUEUE, restart_count=1, by=SUPERVISOR), Limits(2),
     Decision(REQUEUE_EXIT_CODE, True, "training asked to be requeued: relaunching (restart 2 of at most 2)",
              relaunch=True)),
    ("jobwrap run at the cap: the scheduler may still take it, no relaunch, the command's status",
     Stop(REQUEUE, restart_count=2, status=REQUEUE_EXIT_CODE, by=SUPERVISOR), Limits(2),
     Decision(REQUEUE_EXIT_CODE, True, "not relaunched: the requeue cap is reached (2 restarts, --max-requeues 2)")),
    ("jobwrap run at the cap after a requeue file (status 0): exits with the requeue code",
     Stop(REQUEUE, restart_count=2, status=0, by=SUPERVISOR), Limits(2),
     Decision(REQUEUE_EXIT_CODE, True, "not relaunched: the requeue cap is reached (2 restarts, --max-requeues 2)")),
    ("jobwrap run does not know the progress: only the cap stops its relaunches",
     Stop(REQUEUE, restart_count=0, progressed=False, history=(False, False, False), by=SUPERVISOR), Limits(2, 3),
     Decision(REQUEUE_EXIT_CODE, True, "training asked to be requeued: relaunching (restart 1 of at most 2)",
              relaunch=True)),
]


@pytest.mark.parametrize("stop,limits,expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_stop_decision(stop: Stop, limits: Limits, expected: Decision) -> None:
    """Each stop ends as the table says: exit code, requeue or not, relaunch, and the reason word for word."""
    assert decide_stop(stop, limits) == expected


# ---------------------------------------------------------------- the seam

def _fake_scontrol(folder: Path, code: int, message: str = "") -> Path:
    """An scontrol that logs its arguments to ``calls``, prints ``message`` on stderr and exits ``code``."""
    path = folder / "scontrol"
    path.write_text(f"#!/bin/sh\necho \"$@\" >> '{folder}/calls'\n"
                    + (f"echo '{message}' >&2\n" if message else "") + f"exit {code}\n")
    path.chmod(0o700)
    return path


def test_slurm_requeue_through_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scontrol requeue succeeds: exit 0, the fallback is not asked (no requeue file)."""
    _fake_scontrol(tmp_path, 0)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    request = tmp_path / "request"
    scheduler = scheduler_for(read_env({"SLURM_JOB_ID": "4242", "JOBWRAP_REQUEUE_FILE": str(request)}))
    assert isinstance(scheduler, SlurmScheduler)
    assert scheduler.requeue() == 0
    assert (tmp_path / "calls").read_text() == "requeue 4242\n" and not request.exists()


@pytest.mark.parametrize("requeue_file,code", [(True, 0), (False, REQUEUE_EXIT_CODE)],
                         ids=["requeue file", "exit code"])
def test_missing_scontrol_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture, requeue_file: bool, code: int) -> None:
    """No scontrol on PATH: a warning naming it, then the fallback: the requeue file, else exit 75."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    request = tmp_path / "request"
    environ = {"SLURM_JOB_ID": "4242", **({"JOBWRAP_REQUEUE_FILE": str(request)} if requeue_file else {})}
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        assert scheduler_for(read_env(environ)).requeue() == code
    assert request.exists() == requeue_file
    assert ("scontrol requeue 4242 failed (scontrol not found on PATH); asking the batch script's jobwrap run "
            f"(or exit code {REQUEUE_EXIT_CODE}) to requeue the job") in caplog.messages


def test_scontrol_refusal_is_quoted_and_the_fallback_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """scontrol exits 1: the last line it printed is quoted, and jobwrap run's fallback (relaunch here) is used."""
    _fake_scontrol(tmp_path, 1, "scontrol: error: Requested operation is presently disabled")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        assert SlurmScheduler("4242", fallback=RelaunchHere()).requeue() == REQUEUE_EXIT_CODE
    assert caplog.messages == ["scontrol requeue 4242 failed (scontrol: error: Requested operation is presently "
                               "disabled); relaunching inside this allocation"]


def test_local_job_uses_the_fallback_itself() -> None:
    """Outside Slurm the backend is the fallback: a request to jobwrap run, or jobwrap run's own relaunch."""
    job = read_env({"JOBWRAP_REQUEUE_FILE": "/nonexistent/request"})
    assert isinstance(scheduler_for(job), LocalScheduler)
    relaunch = RelaunchHere()
    assert scheduler_for(job, fallback=relaunch) is relaunch


def _launches(tmp_path: Path, environ: dict[str, str], caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """Supervise a command that always asks to be requeued (exit 75); (exit status, launches)."""
    count = tmp_path / "launches"
    with caplog.at_level(logging.INFO, logger="jobwrap"):
        status = supervise(["sh", "-c", f"echo x >> '{count}'; exit {REQUEUE_EXIT_CODE}"], forward=(),
                           max_requeues=2, environ={"PATH": os.environ["PATH"], **environ})
    return status, len(count.read_text().split())


def test_jobwrap_run_requeues_through_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """jobwrap run under Slurm: scontrol requeue works, so it exits 0 after one launch, no relaunch."""
    _fake_scontrol(tmp_path, 0)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    status, launches = _launches(tmp_path, {"SLURM_JOB_ID": "4242"}, caplog)
    assert (status, launches) == (0, 1)
    assert (tmp_path / "calls").read_text() == "requeue 4242\n"
    assert "requeued Slurm job 4242" in caplog.messages


def test_jobwrap_run_relaunches_when_scontrol_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """scontrol refusing under jobwrap run: relaunched in the allocation up to --max-requeues, then exit 75."""
    _fake_scontrol(tmp_path, 1, "scontrol: error: oops")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    status, launches = _launches(tmp_path, {"SLURM_JOB_ID": "4242"}, caplog)
    assert (status, launches) == (REQUEUE_EXIT_CODE, 3)
    assert (tmp_path / "calls").read_text() == "requeue 4242\n" * 3  # asked each time, the cap only relaunches
    assert caplog.messages.count("scontrol requeue 4242 failed (scontrol: error: oops); "
                                 "relaunching inside this allocation") == 3
    assert "training asked to be requeued: relaunching (restart 2 of at most 2)" in caplog.messages
    assert caplog.messages[-1] == "not relaunched: the requeue cap is reached (2 restarts, --max-requeues 2)"


def test_stopping_imports_no_torch() -> None:
    """The decision and the seam load without torch, as jobwrap run does."""
    import subprocess

    code = "import sys, jobwrap._scheduler.stopping, jobwrap._scheduler.schedulers, jobwrap._scheduler.proc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
