"""submitit's Slurm executor against the local Slurm cluster: jobwrap saves, submitit requeues.

submitit submits with its own sbatch script (``srun ... python -m submitit.core._submit``,
``--signal=USR2@N`` to the step) and reads job states with ``sacct``, so these tests need
the cluster's accounting (slurmdbd, scripts/slurm-local starts it). Skipped, with the
reason, when the cluster is not up.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from conftest import REPO  # noqa: E402
from slurm_cluster import FINAL_STATES, accounted_runs, cancel, cluster_available, job_info  # noqa: E402

from jobwrap._storage.events import read_events  # noqa: E402
from jobwrap.submitit import Preemptible  # noqa: E402
from jobwrap.testing import signal_when_held  # noqa: E402

pytestmark = pytest.mark.slurm

EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
from submitit_jobs import assert_resumed_like_plain, wait_done  # noqa: E402
from submitit_train import train  # noqa: E402

WAIT = 300  # seconds for one submitit job: several launches through the queue, each importing torch


@pytest.fixture
def slurm_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """executor(name) -> a submitit Slurm executor; sbatch passes this environment to the job."""
    up, reason = cluster_available()
    if not up:
        pytest.skip(reason)
    # The job unpickles the call: the example module must be importable there.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in [v for v in os.environ if v.startswith("JOBWRAP_") and not v.startswith("JOBWRAP_SLURM")]:
        monkeypatch.delenv(var)
    submitted: list[str] = []

    def make(name: str) -> "submitit.AutoExecutor":
        executor = submitit.AutoExecutor(folder=tmp_path / f"logs-{name}", cluster="slurm")
        # 60 minutes: submitit counts a USR2 before 48 min as a preemption, not a time-out.
        executor.update_parameters(timeout_min=60, slurm_signal_delay_s=60, cpus_per_task=1,
                                   name=f"submitit-{name}")
        original = executor.submit

        def submit(*args, **kwargs):
            job = original(*args, **kwargs)
            submitted.append(job.job_id)
            return job
        executor.submit = submit  # type: ignore[method-assign]
        return executor

    yield make
    cancel(*submitted)


def _scancel_usr2(job_id: str):
    """The signal through Slurm, as ``--signal=USR2@N`` delivers it: to the job's srun step."""
    def send(_held: dict[int, int]) -> None:
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, capture_output=True, timeout=30)
    return send


def test_slurm_executor_preempted_twice_resumes_bit_exact(tmp_path, slurm_executor, monkeypatch):
    """USR2 through Slurm at steps 3 and 11: jobwrap commits, submitit requeues; result and state as uninterrupted."""
    deadline = time.monotonic() + WAIT
    plain = slurm_executor("plain").submit(Preemptible(train, tmp_path / "plain"), epochs=2)
    control = tmp_path / "control"
    control.mkdir()
    monkeypatch.setenv("JOBWRAP_TEST_CONTROL", str(control))
    monkeypatch.setenv("JOBWRAP_TEST_HOLD_AT", "3,11")
    cut = slurm_executor("cut").submit(Preemptible(train, tmp_path / "cut"), epochs=2)
    for step in (3, 11):
        signal_when_held(control, step, _scancel_usr2(cut.job_id), timeout=deadline - time.monotonic())
    wait_done(plain, deadline)
    wait_done(cut, deadline)

    assert cut.result()["step"] == 16
    events = assert_resumed_like_plain(plain, cut, tmp_path, [3, 11])
    assert [e["restart"] for e in events if e["event"] == "start"] == [0, 1, 2]   # SLURM_RESTART_COUNT
    log = cut.stderr() or ""
    assert log.count("this job is preempted") == 2, log[-3000:]   # submitit's handler, not a time-out
    # Slurm's accounting holds every run of the requeued job: what submitit reads.
    states = [r["State"] for r in accounted_runs(cut.job_id, last_state="COMPLETED")]
    assert states == ["REQUEUED", "REQUEUED", "COMPLETED"]


def test_slurm_executor_job_preempted_by_a_high_priority_job(tmp_path, slurm_executor):
    """Real partition preemption: Slurm sends USR2 to the step, jobwrap commits, the job resumes after the high job."""
    deadline = time.monotonic() + WAIT
    low = slurm_executor("low").submit(Preemptible(train, tmp_path / "ckpt"), epochs=2, step_seconds=0.5)
    while not any(e["event"] == "start" for e in read_events(str(tmp_path / "ckpt"))):
        if time.monotonic() > deadline or job_info(low.job_id).get("JobState") in FINAL_STATES:
            raise AssertionError(f"the low job did not start training: {job_info(low.job_id)}")
        time.sleep(0.2)
    high = subprocess.run(["sbatch", "--parsable", "--partition=high", "--exclusive", f"--chdir={tmp_path}",
                           "--output=high-%j.out", "--wrap", "sleep 2"],
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    try:
        wait_done(low, deadline)
    finally:
        cancel(high)

    assert low.result()["step"] == 16
    events = read_events(str(tmp_path / "ckpt"))
    (save,) = [e for e in events if e["event"] == "save" and e["reason"] == "signal SIGUSR2"]
    resumed = [e for e in events if e["event"] == "start"][1]
    assert resumed["step"] == save["step"] < 16, "did not resume from the preemption's checkpoint"
    runs = accounted_runs(low.job_id, last_state="COMPLETED")
    assert len(runs) == 2 and runs[0]["State"] in {"REQUEUED", "PREEMPTED"}, runs
