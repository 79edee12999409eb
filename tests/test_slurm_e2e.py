"""End to end on the local Slurm cluster: real sbatch jobs, real signals, real requeues.

Each test submits a training job from the layouts jobwrap._scheduler.sbatch renders (CPU only), signals
it the way Slurm or a user would, waits (bounded) for it to come back through the queue, and
compares the finished run with an uninterrupted local run of the same command, bit for bit.
A failing wait prints the job's record, its output and the daemon log tails.

Skipped, with the reason, when the cluster is not up (scripts/slurm-local up; scripts/test
does it). Jobs run the repo's .venv python (first on PATH) and write under tmp_path.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO
from slurm_cluster import JobInfo, accounted_runs, job_info, output_tail, restart_count, wait_for
from slurm_jobs import (
    TRAIN,
    TRAIN_ARGS,
    VENV_BIN,
    checked,
    committed_steps,
    events,
    job_env,
    lines,
    report,
    run_reference,
    scancel,
    slurm_time,
    submit,
    train_command,
    wait_until,
    write_script,
)

from jobwrap._storage.store import CheckpointStore
from jobwrap.testing import assert_same_run, final_state

pytestmark = pytest.mark.slurm

TRAIN_DDP = str(REPO / "examples" / "train_ddp.py")
TOTAL_STEPS = 48  # TRAIN_ARGS: 3 epochs of 16 steps
DDP_ARGS = ("--epochs", "2")  # 8 steps per epoch on each of the two ranks

_REFERENCES: dict[tuple[str, ...], Path] = {}


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """reference(args) -> the directory of an uninterrupted local run of examples/train.py args (cached)."""
    def run(args: tuple[str, ...] = TRAIN_ARGS) -> Path:
        if args not in _REFERENCES:
            work = tmp_path_factory.mktemp("reference")
            run_reference([TRAIN, *args, "--loss-log", str(work / "loss.tsv")], work / "ckpt", timeout=300)
            _REFERENCES[args] = work
        return _REFERENCES[args]
    return run


@pytest.fixture(scope="session")
def ddp_reference(slurm_up: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-rank run of examples/train_ddp.py (gloo on the CPU), launched locally."""
    work = tmp_path_factory.mktemp("ddp-reference")
    run_reference(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", TRAIN_DDP, *DDP_ARGS],
                  work / "ckpt", timeout=300)
    return work / "ckpt"


def assert_finished_like_reference(job: str, tmp_path: Path, ref: Path) -> None:
    """Final checkpoint bit for bit the uninterrupted run's; every step trained once, with its loss."""
    def check() -> None:
        assert_same_run(ref / "ckpt", tmp_path / "ckpt")
        assert lines(tmp_path / "loss.tsv") == lines(ref / "loss.tsv"), "loss history differs"
    checked(job, check)


# ---------------------------------------------------------------- 1. manual signal

def test_manual_signal_commits_requeues_and_resumes_bit_exact(jobs, tmp_path, reference):
    """scancel --signal=USR1 --batch mid-epoch: commit, requeue, rerun with restart 1, same final state."""
    ref = reference()
    script = write_script(tmp_path, "manual", command=train_command(tmp_path))
    job = submit(script, cwd=tmp_path)
    jobs.append(job)
    wait_until(job, lambda: len(lines(tmp_path / "loss.tsv")) >= 5, "5 trained steps", 120)
    sent = scancel("--signal=USR1", "--batch", job)
    info = wait_for(job, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=180)
    ckpt = tmp_path / "ckpt"

    def check() -> None:
        assert info["ExitCode"] == "0:0"
        (requeue,) = events(ckpt, "requeue")
        assert 5 <= requeue["step"] < 16, "not mid-epoch 0"
        starts = events(ckpt, "start")
        assert [s["restart"] for s in starts] == [0, 1]
        assert starts[1]["step"] == requeue["step"], "did not resume from the signal's checkpoint"
        assert final_state(ckpt)["step"] == TOTAL_STEPS
        assert CheckpointStore(str(ckpt)).committed()[0].manifest["restart_count"] == 1
        # Slurm's own record agrees: one requeued run, then the completed one.
        assert [r["State"] for r in accounted_runs(job, last_state="COMPLETED")] == ["REQUEUED", "COMPLETED"]
    checked(job, check)
    assert_finished_like_reference(job, tmp_path, ref)
    save = next(e for e in events(ckpt, "save") if e["reason"] == "signal SIGUSR1")
    report("manual signal", signal_to_commit=save["time"] - sent,
           requeue_to_resumed_start=events(ckpt, "start")[1]["time"] - events(ckpt, "requeue")[0]["time"],
           signal_to_resumed_start=events(ckpt, "start")[1]["time"] - sent)


# ---------------------------------------------------------------- 2. time limit

def test_time_limit_warning_requeues_before_the_limit(jobs, tmp_path, reference):
    """--time=1 with --signal=B:USR1@15 and 65 s of training: warned, commits, requeues, finishes later."""
    ref = reference()
    # slurmctld checks limits every 30 s and sends the warning when at most lead + 30 s remain
    # (measured here: 5 s early for a 45 s lead, 30 s early for a 20 s one). With a 15 s lead it
    # comes 15 to 45 s into each run, after Python started and before the limit, never after it.
    script = write_script(tmp_path, "limit", time=1, lead_seconds=15,
                          command=train_command(tmp_path, step_seconds=1.35))
    job = submit(script, cwd=tmp_path)
    jobs.append(job)
    info = wait_for(job, {"COMPLETED"}, timeout=480)
    ckpt = tmp_path / "ckpt"

    def check() -> None:
        runs = restart_count(info) + 1
        assert runs >= 2, "training needing more than a minute finished in one run"
        stops = events(ckpt, "requeue")
        assert len(stops) == runs - 1, stops
        assert all(e["progress"] for e in stops)
        exits = [e["reason"] for e in events(ckpt, "exit")]
        assert len(exits) == runs and exits[-1] == "finished", exits
        assert all(r.startswith("checkpoint committed, requeue requested") for r in exits[:-1]), exits
        assert "TIME LIMIT" not in output_tail(info, 400), "a run reached its time limit"
    checked(job, check)
    assert_finished_like_reference(job, tmp_path, ref)
    starts = [e["time"] for e in events(ckpt, "start")]
    signals = [e["time"] for e in events(ckpt, "signal")]
    report("time limit", runs=len(starts), first_signal_after_start=signals[0] - starts[0],
           total=starts[-1] - starts[0])


# ---------------------------------------------------------------- 3. preemption

HIGH = "#!/bin/bash\necho \"high job ran\"\nsleep 2\n"


def _preempt_low_job(script, jobs, tmp_path):
    """Submit ``script`` on partition low, let it train 5 steps, preempt it with an exclusive high job;
    return (low job, high job's info, low job's info once it completed after one restart, preemption time)."""
    low = submit(script, cwd=tmp_path)
    jobs.append(low)
    wait_until(low, lambda: len(lines(tmp_path / "loss.tsv")) >= 5, "5 trained steps", 120)
    (tmp_path / "high.sh").write_text(HIGH)
    preempted_at = time.time()
    high = submit(tmp_path / "high.sh", "--partition=high", "--exclusive", "--output=high-%j.out", cwd=tmp_path)
    jobs.append(high)
    high_info = wait_for(high, {"COMPLETED"}, timeout=120)
    info = wait_for(low, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=180)
    return low, high_info, info, preempted_at


def test_preempted_low_job_commits_within_grace_and_resumes_after_high(jobs, tmp_path, reference):
    """A low job preempted by an exclusive high job: commits within GraceTime, requeued, resumes after it."""
    ref = reference()
    script = write_script(tmp_path, "low", partition="low", command=train_command(tmp_path))
    low, high_info, info, preempted_at = _preempt_low_job(script, jobs, tmp_path)
    ckpt = tmp_path / "ckpt"
    grace = 10  # GraceTime of partition low in slurm/slurm.conf.in

    def check() -> None:
        assert info["Partition"] == "low" and info["ExitCode"] == "0:0"
        save = next(e for e in events(ckpt, "save") if e["reason"] == "signal SIGUSR1")
        resumed = events(ckpt, "start")[1]
        assert save["time"] - preempted_at < grace, "checkpoint not committed within GraceTime"
        assert resumed["time"] >= slurm_time(high_info["StartTime"]), "low job resumed before the high job ran"
        assert resumed["step"] == save["step"]
        runs = accounted_runs(low, last_state="COMPLETED")
        assert len(runs) == 2 and runs[0]["State"] in {"REQUEUED", "PREEMPTED"}, runs
    checked(low, check)
    assert_finished_like_reference(low, tmp_path, ref)
    save = next(e for e in events(ckpt, "save") if e["reason"] == "signal SIGUSR1")
    resumed = events(ckpt, "start")[1]
    report("preemption", preempt_to_commit=save["time"] - preempted_at,
           preempt_to_high_start=slurm_time(high_info["StartTime"]) - preempted_at,
           high_end_to_low_resume=resumed["time"] - slurm_time(high_info["EndTime"]))


def test_preemption_with_term_only_resumes_bit_exact(jobs, tmp_path, reference):
    """Preempted with no user signal (TERM only, after GraceTime), 2 DataLoader workers: commits, Slurm requeues, exact."""
    ref = reference()
    script = write_script(tmp_path, "low-term", partition="low",
                          command=train_command(tmp_path, "--workers", "2", step_seconds=0.6))
    # No --signal: the partition's TERM at the end of GraceTime is the only warning (most clusters).
    script.write_text("".join(line for line in script.read_text().splitlines(keepends=True)
                              if not line.startswith("#SBATCH --signal")))
    low, _, info, preempted_at = _preempt_low_job(script, jobs, tmp_path)
    ckpt = tmp_path / "ckpt"

    def check() -> None:
        assert info["ExitCode"] == "0:0"
        save = next(e for e in events(ckpt, "save") if e["reason"] == "signal SIGTERM")
        (stop,) = events(ckpt, "stop")
        assert stop["requeue"] is False and stop["step"] == save["step"] < TOTAL_STEPS
        assert not events(ckpt, "requeue"), "Slurm requeues a preempted job itself"
        starts = events(ckpt, "start")
        assert [s["restart"] for s in starts] == [0, 1] and starts[1]["step"] == save["step"]
        assert "killed by signal" not in output_tail(info, 200)
    checked(low, check)
    assert_finished_like_reference(low, tmp_path, ref)
    save = next(e for e in events(ckpt, "save") if e["reason"] == "signal SIGTERM")
    report("preemption, TERM only", preempt_to_commit=save["time"] - preempted_at)


# ---------------------------------------------------------------- 4. user cancel

def test_user_cancel_commits_and_is_not_requeued(jobs, tmp_path):
    """Plain scancel, 2 DataLoader workers: TERM to every process, a checkpoint commits, no requeue; CANCELLED."""
    script = write_script(tmp_path, "cancel", command=train_command(tmp_path, "--workers", "2"))
    job = submit(script, cwd=tmp_path)
    jobs.append(job)
    wait_until(job, lambda: len(lines(tmp_path / "loss.tsv")) >= 5, "5 trained steps", 120)
    sent = scancel(job)
    info = wait_for(job, {"CANCELLED"}, timeout=60)
    ckpt = tmp_path / "ckpt"

    def check() -> None:
        assert restart_count(info) == 0
        assert not events(ckpt, "requeue")
        (stop,) = events(ckpt, "stop")
        assert stop["requeue"] is False and "SIGTERM" in stop["reason"]
        save = next(e for e in events(ckpt, "save") if e["reason"] == "signal SIGTERM")
        assert 5 <= save["step"] < TOTAL_STEPS
        assert committed_steps(ckpt)[0] == save["step"]
        assert "killed by signal" not in output_tail(info, 200)
    checked(job, check)
    # Cancelled means gone: it does not come back through the queue.
    assert job_info(job)["JobState"] == "CANCELLED" and restart_count(job) == 0
    save = next(e for e in events(ckpt, "save") if e["reason"] == "signal SIGTERM")
    report("user cancel", signal_to_commit=save["time"] - sent)


# ---------------------------------------------------------------- 5. requeue cap

def test_requeue_cap_ends_with_a_clear_message(jobs, tmp_path):
    """JOBWRAP_MAX_REQUEUES=1, signalled twice: requeued once, then committed, refused, FAILED."""
    script = write_script(tmp_path, "cap", max_requeues=1, command=train_command(tmp_path))
    job = submit(script, cwd=tmp_path)
    jobs.append(job)
    loss = tmp_path / "loss.tsv"
    ckpt = tmp_path / "ckpt"
    wait_until(job, lambda: len(lines(loss)) >= 5, "5 trained steps", 120)
    scancel("--signal=USR1", "--batch", job)
    wait_until(job, lambda: len(events(ckpt, "start")) == 2 and len(lines(loss)) >= 12,
               "the second run training", 180)
    scancel("--signal=USR1", "--batch", job)
    info = wait_for(job, {"FAILED"}, timeout=120)

    def check() -> None:
        assert restart_count(info) == 1
        assert "the requeue cap is reached (1 restarts, max_requeues=1)" in output_tail(info, 200)
        assert "raise JOBWRAP_MAX_REQUEUES" in output_tail(info, 200)
        assert len(events(ckpt, "requeue")) == 1
        (stop,) = events(ckpt, "stop")
        assert stop["requeue"] is False and committed_steps(ckpt)[0] == stop["step"] > 5
    checked(job, check)


# ---------------------------------------------------------------- 6. job array

def test_array_task_requeues_only_itself(jobs, tmp_path, reference):
    """USR1 to task 1 of a 2-task array: task 1 requeues as ARRAY_TASK, task 0 runs through untouched."""
    ref = reference()
    # The command cannot name a per-task loss log; a periodic checkpoint shows that training runs.
    script = write_script(tmp_path, "array", extra_sbatch=("--array=0-1",),
                          command=("python", TRAIN, *TRAIN_ARGS, "--step-seconds", "0.1"))
    array = submit(script, cwd=tmp_path, env=job_env(JOBWRAP_SAVE_EVERY_STEPS="4"))
    tasks = [f"{array}_0", f"{array}_1"]
    jobs.extend(tasks)
    wait_until(tasks[1], lambda: bool(committed_steps(tmp_path / "ckpt" / "1")), "a committed step in task 1", 120)
    scancel("--signal=USR1", "--batch", tasks[1])
    done = [wait_for(task, {"COMPLETED"}, timeout=180) for task in tasks]
    wait_for(tasks[1], {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=120)

    def check() -> None:
        assert restart_count(done[0]) == 0 and restart_count(tasks[1]) == 1
        assert not events(tmp_path / "ckpt" / "0", "requeue")
        (requeue,) = events(tmp_path / "ckpt" / "1", "requeue")
        assert requeue["job_id"] == tasks[1]
        for task in ("0", "1"):
            assert_same_run(ref / "ckpt", tmp_path / "ckpt" / task)
    checked(tasks[1], check)


# ---------------------------------------------------------------- 7. two ranks under srun

def preempt_ddp_job(jobs: list[str], tmp_path: Path, reference: Path, name: str,
                    extra_check: Callable[[JobInfo], None] = lambda info: None, **layout: object) -> None:
    """examples/train_ddp.py in an srun layout: USR1 to the step once a step is committed; the job
    must stop all ranks at one step, commit once, requeue once and finish equal to ``reference``."""
    script = write_script(tmp_path, name, command=("python", TRAIN_DDP, *DDP_ARGS, "--step-seconds", "0.3"),
                          **layout)
    job = submit(script, cwd=tmp_path, env=job_env(JOBWRAP_SAVE_EVERY_STEPS="3"))
    jobs.append(job)
    ckpt = tmp_path / "ckpt"
    wait_until(job, lambda: bool(committed_steps(ckpt)), "a committed step", 180)
    sent = scancel("--signal=USR1", job)  # no --batch: to the srun step's tasks, as --signal=USR1@N
    info = wait_for(job, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=240)

    def check() -> None:
        assert info["ExitCode"] == "0:0"
        assert len(events(ckpt, "requeue")) == 1 and len(events(ckpt, "signal")) == 1
        assert [s["world_size"] for s in events(ckpt, "start")] == [2, 2]
        assert_same_run(reference, ckpt)
        assert len(final_state(ckpt)["jobwrap"]["ranks"]) == 2
        extra_check(info)
    checked(job, check)
    save = next(e for e in events(ckpt, "save") if e["reason"] == "signal SIGUSR1")
    report(name.replace("-", " "), signal_to_commit=save["time"] - sent,
           signal_to_resumed_start=events(ckpt, "start")[1]["time"] - sent)


def test_two_srun_ranks_stop_together_and_resume_bit_exact(jobs, tmp_path, ddp_reference):
    """multi-gpu layout on the CPU: USR1 to the step, one commit, one requeue, equal to a two-rank run."""
    preempt_ddp_job(jobs, tmp_path, ddp_reference, "two-ranks", layout="multi-gpu", ntasks_per_node=2)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second local cluster of two nodes, each slurmd in its own network namespace; its SLURM_CONF."""
    if reason := os.environ.get("JOBWRAP_SLURM_UNAVAILABLE"):
        pytest.skip(reason)
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("two nodes in network namespaces need root, iproute2 and nsenter")
    probe = f"jwprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:  # a sandbox without CAP_SYS_ADMIN/CAP_NET_ADMIN
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    work = tmp_path_factory.mktemp("two-nodes")
    # Ports apart from the main cluster's (6817..6820); no accounting: not needed here.
    env = {**os.environ, "JOBWRAP_SLURM_DIR": str(work), "JOBWRAP_SLURM_PORT": "7417",
           "JOBWRAP_SLURM_NODES": "2", "JOBWRAP_SLURM_ACCOUNTING": "0"}
    up = subprocess.run([str(REPO / "scripts" / "slurm-local"), "up"], env=env, capture_output=True, text=True,
                        timeout=120)
    try:
        assert up.returncode == 0, f"two-node cluster did not start:\n{up.stderr[-4000:]}"
        yield str(work / "slurm.conf")
    finally:
        subprocess.run([str(REPO / "scripts" / "slurm-local"), "down"], env=env, capture_output=True, timeout=120)


def test_two_nodes_over_a_network_stop_together_and_resume_bit_exact(monkeypatch, two_nodes, jobs, tmp_path,
                                                                       ddp_reference):
    """multi-node layout on two slurmd in network namespaces: rendezvous across the bridge, one commit, bit-exact."""
    monkeypatch.setenv("SLURM_CONF", two_nodes)  # before `jobs`, so its cleanup cancels on this cluster

    def on_two_nodes(info: JobInfo) -> None:
        assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
        # Rank 0 ran on node1 (its own hostname), MASTER_ADDR of the template.
        assert CheckpointStore(str(tmp_path / "ckpt")).committed()[0].manifest["host"] == "node1"
    preempt_ddp_job(jobs, tmp_path, ddp_reference, "two-nodes", on_two_nodes, layout="multi-node", nodes=2,
                    ntasks_per_node=1)


# ---------------------------------------------------------------- requeue without scontrol

def test_training_without_scontrol_is_requeued_by_jobwrap_run(jobs, tmp_path, reference):
    """Training sees no scontrol (PATH of the child only): it touches the requeue file; jobwrap run requeues."""
    ref = reference()
    command = ("env", f"PATH={VENV_BIN}") + train_command(tmp_path)
    script = write_script(tmp_path, "noscontrol", command=command)
    job = submit(script, cwd=tmp_path)
    jobs.append(job)
    wait_until(job, lambda: len(lines(tmp_path / "loss.tsv")) >= 5, "5 trained steps", 120)
    scancel("--signal=USR1", "--batch", job)
    info = wait_for(job, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=180)

    def check() -> None:
        out = output_tail(info, 200)
        assert "scontrol not found on PATH" in out
        assert f"requeued Slurm job {job}" in out
    checked(job, check)
    assert_finished_like_reference(job, tmp_path, ref)


def test_srun_task_without_scontrol_exits_75_and_the_batch_script_requeues(jobs, tmp_path, reference):
    """srun layout, no scontrol for the task: it exits 75 and the template's batch shell requeues."""
    ref = reference()
    command = ("env", f"PATH={VENV_BIN}") + train_command(tmp_path)
    script = write_script(tmp_path, "noscontrol-srun", layout="multi-gpu", ntasks_per_node=1, command=command)
    job = submit(script, cwd=tmp_path)
    jobs.append(job)
    wait_until(job, lambda: len(lines(tmp_path / "loss.tsv")) >= 5, "5 trained steps", 120)
    scancel("--signal=USR1", job)
    info = wait_for(job, {"COMPLETED"}, predicate=lambda i: restart_count(i) == 1, timeout=180)
    checked(job, lambda: None if "scontrol not found on PATH" in output_tail(info, 200)
            else pytest.fail("the task found scontrol"))
    (requeue,) = events(tmp_path / "ckpt", "requeue")
    assert requeue["exit_code"] == 75
    assert_finished_like_reference(job, tmp_path, ref)


# ---------------------------------------------------------------- jobwrap doctor in a job

def doctor_rows(text: str) -> dict[str, list[str]]:
    """check name -> the results it got in the printed tables (one per rank)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        for status in ("PASS", "WARN", "FAIL"):
            head, sep, _ = line.partition(f"  {status}  ")
            if sep and head.strip() and not head.startswith(" "):
                rows.setdefault(head.strip(), []).append(status)
    return rows


def run_doctor(jobs: list[str], tmp_path: Path, name: str, state_bytes: str,
               **layout: object) -> tuple[str, str, dict[str, list[str]]]:
    """`jobwrap doctor` as the command of a rendered script; the job id, its output and its table's rows."""
    script = write_script(tmp_path, name, command=("jobwrap", "doctor", "--state-bytes", state_bytes), **layout)
    job = submit(script, cwd=tmp_path)
    jobs.append(job)
    out = output_tail(wait_for(job, {"COMPLETED"}, timeout=120), 60)
    return job, out, doctor_rows(out)


def test_doctor_in_a_batch_job_passes_the_batch_layout(jobs, tmp_path):
    """exec jobwrap run -- jobwrap doctor in a rendered batch script: signal via Slurm, scontrol, saves fit."""
    job, out, rows = run_doctor(jobs, tmp_path, "doctor", "5MB")

    def check() -> None:
        assert rows["signal delivery"] == ["PASS"] and "scancel --signal=USR1 --batch" in out
        assert "jobwrap run" in out and "forwarded it here" in out
        assert rows["requeue"] == ["PASS"] and rows["directory writable"] == ["PASS"]
        assert rows["save vs lead time"] == ["PASS"] and "lead time of 60 s" in out
        assert rows["save vs GraceTime"] == ["PASS"] and "GraceTime" in out
        assert not list(tmp_path.joinpath("ckpt").iterdir()), "the doctor left files behind"
    checked(job, check)


def test_doctor_under_srun_checks_every_rank(jobs, tmp_path):
    """jobwrap doctor as two srun tasks: the step's signal reaches both; only rank 0 times a save."""
    job, out, rows = run_doctor(jobs, tmp_path, "doctor-srun", "1MB", layout="multi-gpu", ntasks_per_node=2)

    def check() -> None:
        assert rows["signal delivery"] == ["PASS", "PASS"], out
        assert "to every task of step" in out
        assert rows["save vs lead time"] == ["PASS"] and "skipped on rank 1" in out
    checked(job, check)
