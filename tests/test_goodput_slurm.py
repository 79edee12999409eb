"""Goodput of a run that went through the local Slurm cluster: `jobwrap status` reads the queue wait from sacct.

Skipped, with the reason, when the cluster is not up (scripts/slurm-local up; scripts/test does it).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from slurm_cluster import accounted_runs, restart_count, wait_for
from slurm_jobs import (
    VENV_BIN,
    checked,
    job_env,
    lines,
    report,
    scancel,
    slurm_time,
    submit,
    train_command,
    wait_until,
    write_script,
)

pytestmark = pytest.mark.slurm

PARTS = ("training", "saving", "loading", "startup", "lost", "exit")


def status(directory: Path, *args: str) -> str:
    """`jobwrap status DIR`'s output, run as a user would, with sacct on PATH."""
    done = subprocess.run([str(VENV_BIN / "python"), "-m", "jobwrap", "status", str(directory), *args],
                          env=job_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_status_of_a_preempted_slurm_run_has_goodput_and_queue_wait_from_sacct(jobs, tmp_path):
    """USR1 mid-run, requeued, finished: status splits each run's allocation from sacct and measures the queue wait."""
    script = write_script(tmp_path, "goodput", command=train_command(tmp_path, step_seconds=0.2))
    job = submit(script, cwd=tmp_path)
    jobs.append(job)
    wait_until(job, lambda: len(lines(tmp_path / "loss.tsv")) >= 5, "5 trained steps", 120)
    scancel("--signal=USR1", "--batch", job)
    wait_for(job, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=180)
    runs = accounted_runs(job, last_state="COMPLETED")
    record = json.loads(status(tmp_path / "ckpt", "--json"))
    text = status(tmp_path / "ckpt")
    time = record["time"]

    def check() -> None:
        assert [r["State"] for r in runs] == ["REQUEUED", "COMPLETED"]
        assert time["accounting"] == "Slurm accounting (sacct)", time["accounting"]
        assert len(time["launches"]) == 2
        # Each launch spans its run's allocation as sacct recorded it (whole seconds).
        for launch, run in zip(time["launches"], runs):
            assert abs(launch["begin"] - slurm_time(run["Start"])) < 1e-6, (launch, run)
            assert launch["end"] - slurm_time(run["End"]) < 1.0, (launch, run)
            assert abs(sum(launch[p] for p in PARTS) - launch["allocated"]) < 1e-3, launch
            assert all(launch[p] >= 0 for p in PARTS), launch
        assert abs(sum(l["allocated"] for l in time["launches"]) - time["allocated"]) < 1e-3
        assert abs(sum(time[p] for p in PARTS) - time["allocated"]) < 1e-3, time
        # The queue wait is the gap sacct shows between the requeued run's end and the rerun's start.
        gap = slurm_time(runs[1]["Start"]) - slurm_time(runs[0]["End"])
        assert time["queue_wait"] is not None and time["queue_wait"] >= 0
        assert abs(time["queue_wait"] - max(0.0, gap)) < 1e-3, (time["queue_wait"], gap)
        assert 0 < record["goodput"] <= 1 and record["goodput"] == time["goodput"]
        assert time["launches"][1]["loading"] > 0, "the rerun resumed from the signal's checkpoint"
        assert f"{record['goodput']:.1%} of" in text and "queue wait between runs" in text, text
    checked(job, check)
    report("goodput on slurm", goodput=float(record["goodput"]), allocated=float(time["allocated"]),
           queue_wait=float(time["queue_wait"]), startup=float(time["startup"]), loading=float(time["loading"]))
