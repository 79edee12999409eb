"""submitit integration with submitit's LocalExecutor: real subprocesses, real signals, submitit's requeue.

The signal goes straight to the training task, as Slurm's ``--signal=USR2@N``
does. (``LocalJob._interrupt()`` sends it to submitit's local controller
instead, which has no handler for it and dies, orphaning the task.)
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from jobwrap._storage.events import read_events  # noqa: E402
from jobwrap.submitit import Preemptible, preemption_signal  # noqa: E402
from jobwrap.testing import assert_same_run, signal_when_held  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from submitit_jobs import assert_resumed_like_plain, wait_done  # noqa: E402
from submitit_train import train  # noqa: E402

WAIT = 240  # seconds, for one submitit job (several launches, each importing torch)


def _executor(folder: Path) -> "submitit.LocalExecutor":
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=30)  # far away: no time-out signal of submitit's own
    return executor


def _signal_at(control: Path, step: int, sig: int, deadline: float) -> None:
    """Wait until the task holds at ``step`` (JOBWRAP_TEST_HOLD_AT), signal it, then release the hold."""
    signal_when_held(control, step, lambda held: os.kill(held[0], sig), timeout=deadline - time.monotonic())


@pytest.fixture
def job_env(monkeypatch):
    """The submitit controller and its tasks inherit this environment: the example module is importable."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]))
    for var in ("JOBWRAP_DIR", "JOBWRAP_TEST_HOLD_AT", "JOBWRAP_TEST_CONTROL", "JOBWRAP_REQUEUE_SIGNALS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_preemption_signal_is_submitits():
    """jobwrap traps the signal submitit sends: USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise."""
    assert preemption_signal() == getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def test_preemptible_without_submitit_is_a_plain_session(tmp_path):
    """Called directly (no submitit handler installed) it trains like @jobwrap.preemptible."""
    result = Preemptible(train, tmp_path / "ck")(epochs=1)
    assert result["step"] == 8
    assert [e["event"] for e in read_events(str(tmp_path / "ck"))] == ["start", "save", "exit"]


def test_localexecutor_preempted_twice_resumes_bit_exact(tmp_path, job_env):
    """USR2 at steps 3 and 11: jobwrap commits at the boundary, submitit requeues; same result as uninterrupted."""
    deadline = time.monotonic() + 2 * WAIT
    plain = _executor(tmp_path / "logs-plain").submit(Preemptible(train, tmp_path / "plain"), epochs=2)
    control = tmp_path / "control"
    control.mkdir()
    job_env.setenv("JOBWRAP_TEST_CONTROL", str(control))
    job_env.setenv("JOBWRAP_TEST_HOLD_AT", "3,11")
    cut = _executor(tmp_path / "logs-cut").submit(Preemptible(train, tmp_path / "cut"), epochs=2)
    for step in (3, 11):
        _signal_at(control, step, signal.SIGUSR2, deadline)
    wait_done(plain, deadline)
    wait_done(cut, deadline)
    assert cut.result()["step"] == 16
    events = assert_resumed_like_plain(plain, cut, tmp_path, [3, 11])
    assert [e.get("resumed_from") is not None for e in events if e["event"] == "start"] == [False, True, True]
    log = cut.stderr() or ""
    assert log.count("Caught signal SIGUSR2") == 2, log[-3000:]   # submitit's own handler, twice
    assert log.count("submitit requeues the job") == 2
    assert "already had a handler" not in log


def test_requeue_refused_by_jobwrap_is_a_failed_submitit_job(tmp_path, job_env):
    """When jobwrap's cap refuses the requeue, submitit reports the job failed with jobwrap's reason."""
    deadline = time.monotonic() + WAIT
    control = tmp_path / "control"
    control.mkdir()
    job_env.setenv("JOBWRAP_TEST_CONTROL", str(control))
    job_env.setenv("JOBWRAP_TEST_HOLD_AT", "2")
    job = _executor(tmp_path / "logs").submit(Preemptible(train, tmp_path / "ck", max_requeues=0), epochs=1)
    _signal_at(control, 2, signal.SIGUSR2, deadline)
    wait_done(job, deadline)
    with pytest.raises(Exception, match="requeue cap is reached"):
        job.result()
    assert [e["event"] for e in read_events(str(tmp_path / "ck"))][-2:] == ["stop", "exit"]


def _term_to_task_and_workers(held: dict[int, int]) -> None:
    """TERM to the training task and every process under it (its DataLoader workers), as Slurm's job-wide TERM."""
    pids = [held[0]]
    for pid in pids:  # grows as children are found
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    assert len(pids) >= 3, f"the task's loader workers are not running: {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGTERM)


@pytest.mark.timeout(900)
def test_term_to_task_and_loader_workers_commits_and_resubmission_resumes_bit_exact(tmp_path, job_env):
    """TERM to the task and its 2 DataLoader workers (a plain scancel) at step 5: not bypassed, the workers live,
    jobwrap commits step 5 and the job ends without requeue; the same call resubmitted ends as an uninterrupted job."""
    deadline = time.monotonic() + 3 * WAIT
    plain = _executor(tmp_path / "logs-plain").submit(Preemptible(train, tmp_path / "plain"), epochs=2, workers=2)
    control = tmp_path / "control"
    control.mkdir()
    job_env.setenv("JOBWRAP_TEST_CONTROL", str(control))
    job_env.setenv("JOBWRAP_TEST_HOLD_AT", "5")
    cut = _executor(tmp_path / "logs-cut").submit(Preemptible(train, tmp_path / "cut"), epochs=2, workers=2)
    signal_when_held(control, 5, _term_to_task_and_workers, timeout=deadline - time.monotonic())
    wait_done(cut, deadline)
    log = cut.stderr() or ""
    assert "Bypassing signal SIGTERM" not in log and "is killed by signal" not in log, log[-3000:]
    assert "checkpoint committed, exiting without requeueing" in log, log[-3000:]
    with pytest.raises(Exception):
        cut.result()  # a cancelled job has no result
    saves = [e for e in read_events(str(tmp_path / "cut")) if e["event"] == "save"]
    assert [(e["step"], e["reason"]) for e in saves] == [(5, "signal SIGTERM")]
    job_env.delenv("JOBWRAP_TEST_HOLD_AT")
    again = _executor(tmp_path / "logs-again").submit(Preemptible(train, tmp_path / "cut"), epochs=2, workers=2)
    wait_done(plain, deadline)
    wait_done(again, deadline)
    assert again.result() == plain.result()
    assert plain.result()["step"] == 16
    assert_same_run(tmp_path / "plain", tmp_path / "cut")
