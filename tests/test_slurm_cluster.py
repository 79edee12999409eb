"""Smoke tests of the local Slurm cluster itself: the behaviours jobwrap relies on.

Skipped, with the reason, when the cluster is not up (scripts/slurm-local up).
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import accounted_runs, cancel, cluster_available, output_tail, restart_count, sbatch, wait_for

pytestmark = pytest.mark.slurm


def processes_in(workdir: Path) -> list[int]:
    """PIDs of live processes whose working directory is workdir: a job's, as jobs run there."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd") == str(workdir):
                pids.append(int(entry.name))
        except OSError:  # gone, a zombie, or not ours to read
            pass
    return pids


def leftover_processes(workdir: Path, timeout: float = 10.0) -> list[int]:
    """Processes still in workdir after waiting up to timeout s for them to go."""
    deadline = time.monotonic() + timeout
    while (pids := processes_in(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[list[str]]:
    """Skips without a cluster; cancels every job id the test appends, pass or fail."""
    up, reason = cluster_available()
    if not up:
        pytest.skip(reason)
    submitted: list[str] = []
    yield submitted
    # A leftover `sleep` job would hold CPUs and stall the next test.
    cancel(*submitted)
    # Processes that escaped Slurm's cleanup: this test's, as they run in its tmp_path.
    for pid in leftover_processes(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    """A bash batch script in tmp_path."""
    path = tmp_path / name
    path.write_text("#!/bin/bash\n" + body)
    return path


def run_lines(tmp_path: Path, job_id: str) -> list[str]:
    """The `run ...` lines a job appended to its output, one per run (none before it starts)."""
    path = tmp_path / f"{job_id}.out"
    text = path.read_text() if path.exists() else ""
    return [line for line in text.splitlines() if line.startswith("run ")]


def test_batch_job_runs_and_completes(jobs: list[str], tmp_path: Path) -> None:
    """A batch job with a 2-task srun step runs on the node and ends COMPLETED, exit 0."""
    script = write_script(tmp_path, "hello.sh", 'echo "hello $SLURM_JOB_ID"\nsrun --ntasks=2 echo task\n')
    job = sbatch(script, "--ntasks=2", "--output=%j.out", cwd=tmp_path)
    jobs.append(job)
    info = wait_for(job, {"COMPLETED"}, timeout=30)
    assert info["ExitCode"] == "0:0"
    out = output_tail(info)
    assert f"hello {job}" in out and out.count("task") == 2, out


REQUEUE_ONCE = """\
echo "run restart=${SLURM_RESTART_COUNT:-unset} t=$(date +%s.%N)"
if [ -z "${SLURM_RESTART_COUNT:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
    # Slurm kills this run right after the requeue; never reach the exit.
    sleep 60 & wait $!
    exit 3
fi
"""


def test_requeue_from_inside_job_runs_it_again(jobs: list[str], tmp_path: Path) -> None:
    """`scontrol requeue` from a job reruns the same job id with SLURM_RESTART_COUNT=1."""
    script = write_script(tmp_path, "requeue.sh", REQUEUE_ONCE)
    job = sbatch(script, "--requeue", "--open-mode=append", "--output=%j.out", cwd=tmp_path)
    jobs.append(job)
    info = wait_for(job, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=60)
    assert info["ExitCode"] == "0:0"
    runs = run_lines(tmp_path, job)
    assert [r.split()[1] for r in runs] == ["restart=unset", "restart=1"], runs
    # Accounting (slurmdbd) keeps one record per run; `sacct` without it has nothing to say.
    assert [r["State"] for r in accounted_runs(job, last_state="COMPLETED")] == ["REQUEUED", "COMPLETED"]
    first, second = (float(r.rsplit("t=", 1)[1]) for r in runs)
    print(f"requeue round trip: {second - first:.1f}s")


PREEMPTABLE = """\
echo "run restart=${SLURM_RESTART_COUNT:-unset} t=$(date +%s.%N)"
[ -n "${SLURM_RESTART_COUNT:-}" ] && exit 0
sleep 300 & wait $!
"""


def test_low_job_is_preempted_by_high_job_and_requeued(jobs: list[str], tmp_path: Path) -> None:
    """A `high` job needing the whole node requeues the running `low` job, which reruns after."""
    low = sbatch(write_script(tmp_path, "low.sh", PREEMPTABLE),
                 "--partition=low", "--open-mode=append", "--output=%j.out", cwd=tmp_path)
    jobs.append(low)
    # Let the first run print its line before it is preempted.
    wait_for(low, {"RUNNING"}, predicate=lambda i: bool(run_lines(tmp_path, low)), timeout=30)
    high = sbatch(write_script(tmp_path, "high.sh", 'echo "run high"\n'),
                  "--partition=high", "--exclusive", "--output=%j.out", cwd=tmp_path)
    jobs.append(high)
    start = time.monotonic()
    # The low job gets no signal until GraceTime + ~5 s, then SIGTERM, then is requeued.
    wait_for(high, {"COMPLETED"}, timeout=60)
    high_done = time.monotonic() - start
    info = wait_for(low, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=30)
    runs = run_lines(tmp_path, low)
    assert [r.split()[1] for r in runs] == ["restart=unset", "restart=1"], runs
    assert info["Partition"] == "low"
    assert not leftover_processes(tmp_path), "processes of the preempted run outlived it"
    print(f"preemption: high job done {high_done:.1f}s after submit")


PREEMPT_SIGNAL = """\
echo "run restart=${SLURM_RESTART_COUNT:-unset}"
[ -n "${SLURM_RESTART_COUNT:-}" ] && exit 0
# What jobwrap does: on the warning signal, checkpoint, then requeue itself.
trap 'echo "got USR1"; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
sleep 300 & wait $!
"""


def test_preemption_sends_the_jobs_signal(jobs: list[str], tmp_path: Path) -> None:
    """With --signal=B:USR1, a preempted low job gets USR1 at once and can requeue itself."""
    low = sbatch(write_script(tmp_path, "low.sh", PREEMPT_SIGNAL), "--partition=low",
                 "--signal=B:USR1@30", "--open-mode=append", "--output=%j.out", cwd=tmp_path)
    jobs.append(low)
    wait_for(low, {"RUNNING"}, predicate=lambda i: bool(run_lines(tmp_path, low)), timeout=30)
    high = sbatch(write_script(tmp_path, "high.sh", "true\n"),
                  "--partition=high", "--exclusive", "--output=%j.out", cwd=tmp_path)
    jobs.append(high)
    start = time.monotonic()
    wait_for(high, {"COMPLETED"}, timeout=60)
    high_done = time.monotonic() - start
    wait_for(low, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=30)
    text = (tmp_path / f"{low}.out").read_text()
    assert "got USR1" in text, text
    # The trap exits while `sleep` runs: Slurm must still kill the orphaned child.
    assert not leftover_processes(tmp_path), "the batch shell's orphaned child outlived the job"
    # Well before GraceTime (10 s) + 5 s: the job handed back the node itself.
    assert high_done < 10, f"high job took {high_done:.1f}s; USR1 not delivered at preemption?"
    print(f"preemption with USR1: high job done {high_done:.1f}s after submit")
