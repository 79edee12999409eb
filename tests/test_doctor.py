"""`jobwrap doctor`: its decisions as pure functions, then real runs of `python -m jobwrap doctor`.

The run inside a real Slurm batch job is in tests/test_slurm_e2e.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from jobwrap._report.preflight import (
    FAIL,
    PASS,
    WARN,
    Proc,
    Row,
    check_requeue,
    classify_filesystem,
    find_mount,
    is_jobwrap_run,
    parse_size,
    plan_delivery,
    save_fits,
)
from jobwrap._scheduler.env import SlurmStep, read_slurm_step

USR1 = signal.SIGUSR1

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
nfs.example:/home /home nfs4 rw,vers=4.2 0 0
10.0.0.1@tcp:/scratch /scratch lustre rw 0 0
/dev/sdb1 /scratch/local xfs rw 0 0
/dev/sdc1 /data\\040sets ext4 rw 0 0
"""


# ---------------------------------------------------------------- pure decisions

@pytest.mark.parametrize("text, expected", [
    ("3GB", 3_000_000_000), ("3GiB", 3 << 30), ("500M", 500_000_000), ("1.5g", 1_500_000_000),
    ("1024", 1024), ("64 KiB", 64 << 10), (7, 7),
])
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    """Sizes take decimal (GB) and binary (GiB) units, a bare number is bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "3 parsecs", "GB", "-1"])
def test_parse_size_refuses_nonsense_with_an_example(text):
    """A size that is not one says what a size looks like."""
    with pytest.raises(ValueError, match="e.g. 3GB"):
        parse_size(text)


@pytest.mark.parametrize("path, point, fstype", [
    ("/home/me/run", "/home", "nfs4"),
    ("/scratch/run", "/scratch", "lustre"),
    ("/scratch/local/run", "/scratch/local", "xfs"),
    ("/dev/shm/x", "/dev/shm", "tmpfs"),
    ("/work/x", "/", "ext4"),
    ("/data sets/a", "/data sets", "ext4"),
])
def test_find_mount_picks_the_longest_mount_point(path, point, fstype):
    """The filesystem holding a path is the deepest mount point above it (octal escapes decoded)."""
    assert find_mount(path, MOUNTS) == (point, fstype)


@pytest.mark.parametrize("path, status, words", [
    ("/home/me/run", PASS, "shared filesystem"),
    ("/scratch/run", PASS, "lustre"),
    ("/dev/shm/run", WARN, "node-local memory"),
    ("/tmp/run", WARN, "node-local memory"),
    ("/scratch/local/run", WARN, "node-local (/scratch/local)"),
    ("/work/run", WARN, "a local disk of this node"),
])
def test_shared_filesystems_pass_node_local_ones_warn(path, status, words):
    """NFS and Lustre pass; tmpfs, /tmp, /dev/shm and local disks warn, naming the fix."""
    row = classify_filesystem(path, find_mount(path, MOUNTS))
    assert row.status == status and words in row.detail, row
    if status == WARN:
        assert "every node mounts" in row.detail


def test_unknown_filesystem_type_warns():
    """An fstype jobwrap does not know is a warning to check, not a pass."""
    row = classify_filesystem("/x/y", ("/x", "fuse.mystery"))
    assert row.status == WARN and "unknown filesystem type" in row.detail


def test_save_fits_with_margin_passes_and_without_fails():
    """A save passes when it fits twice in the budget, fails otherwise, and warns with no budget."""
    assert save_fits(10, 3 * 10**9, 120, check="c", budget_name="lead").status == PASS
    failed = save_fits(70, 3 * 10**9, 120, check="c", budget_name="lead")
    assert failed.status == FAIL and "Raise the lead time" in failed.detail
    assert save_fits(1, 10, None, check="c", budget_name="lead").status == WARN


@pytest.mark.parametrize("cmdline, expected", [
    (["/venv/bin/python", "/venv/bin/jobwrap", "run", "--", "python", "train.py"], True),
    (["python", "-m", "jobwrap", "-v", "run", "--dir", "d", "--", "x"], True),
    (["jobwrap", "doctor"], False),
    (["python", "train.py", "--name", "jobwrap"], False),
])
def test_is_jobwrap_run_recognises_the_supervisor(cmdline, expected):
    """`jobwrap run`, as a script or with -m, is recognised; other commands are not."""
    assert is_jobwrap_run(cmdline) is expected


ME = Proc(100, "python", ("python", "-m", "jobwrap", "doctor"), True)
STEPD = Proc(10, "slurmstepd", ("slurmstepd: [5.batch]",), True)
SUPERVISOR = Proc(50, "python", ("python", "/v/bin/jobwrap", "run", "--", "jobwrap", "doctor"), True)
BASH = Proc(40, "bash", ("/bin/bash", "/spool/job5/slurm_script"), False)
BATCH_ENV = {"SLURM_JOB_ID": "5"}
STEP_ENV = {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}


def test_batch_shell_exec_gets_scancel_batch():
    """Exec'd in the batch script, the doctor is the batch shell: scancel --batch, like --signal=B:."""
    plan = plan_delivery([ME, STEPD], sig=USR1, environ=BATCH_ENV)
    assert plan.command == ("scancel", "--signal=USR1", "--batch", "5") and plan.status == PASS


def test_batch_shell_jobwrap_run_forwards():
    """Under `exec jobwrap run`, the batch shell is the supervisor, which forwards: scancel --batch."""
    plan = plan_delivery([ME, SUPERVISOR, STEPD], sig=USR1, environ=BATCH_ENV)
    assert plan.command[-2:] == ("--batch", "5") and "jobwrap run (pid 50)" in plan.how


def test_batch_shell_that_does_not_trap_fails_without_sending():
    """A plain bash batch shell would die of B:USR1: fail, send nothing, name exec jobwrap run."""
    row = plan_delivery([ME, BASH, STEPD], sig=USR1, environ=BATCH_ENV)
    assert isinstance(row, Row) and row.status == FAIL and "exec jobwrap run" in row.detail


def test_srun_step_with_a_non_trapping_wrapper_fails():
    """In an srun step every process gets the signal: a bash wrapper that does not trap it fails."""
    row = plan_delivery([ME, Proc(41, "bash", ("bash", "-c", "x"), False), STEPD], sig=USR1, environ=STEP_ENV)
    assert isinstance(row, Row) and row.status == FAIL and "exec" in row.detail


def test_srun_step_signals_the_step_once_every_rank_is_ready():
    """An exec'd srun task: scancel JOB.STEP, after the step's 2 tasks are ready."""
    plan = plan_delivery([ME, STEPD], sig=USR1, environ=STEP_ENV)
    assert plan.command == ("scancel", "--signal=USR1", "5.0") and plan.ranks == 2


def test_slurm_step_is_read_from_slurms_variables():
    """The step's id, task, task count, restart and partition come from env.py; the batch shell is no srun step."""
    step = read_slurm_step({**STEP_ENV, "SLURM_RESTART_COUNT": "3", "SLURM_JOB_PARTITION": "gpu,cpu"})
    assert (step.job_id, step.step_id, step.task, step.tasks) == ("5", "0", 0, 2) and step.in_srun_step
    assert step.restart_count == 3 and step.partition == "gpu,cpu"
    batch = read_slurm_step({"SLURM_JOBID": "5", "SLURM_STEP_ID": "batch", "SLURM_NTASKS": "4"})
    assert batch.job_id == "5" and not batch.in_srun_step and batch.tasks == 4
    assert read_slurm_step({}) == SlurmStep(job_id=None, step_id=None, task=0, step_tasks=None, job_tasks=None,
                                            restart_count=0, partition=None)


def test_without_scancel_the_same_processes_get_kill_and_it_warns():
    """No scancel (a container): kill() to what slurmstepd would signal, and a warning."""
    plan = plan_delivery([ME, SUPERVISOR, STEPD], sig=USR1, environ=BATCH_ENV, scancel=False)
    assert plan.pids == (50,) and plan.status == WARN and "scancel is not on PATH" in plan.how


def test_outside_slurm_under_jobwrap_run_the_supervisor_is_signalled():
    """Locally under `jobwrap run`, the signal goes to the supervisor, which must forward it."""
    plan = plan_delivery([ME, SUPERVISOR, Proc(1, "init", (), False)], sig=USR1, environ={})
    assert plan.pids == (50,) and plan.status == PASS


def test_slurm_job_without_slurmstepd_above_warns():
    """SLURM_JOB_ID but no slurmstepd above (salloc shell, container): only this process, a warning."""
    plan = plan_delivery([ME, Proc(1, "init", (), False)], sig=USR1, environ=BATCH_ENV)
    assert plan.pids == (100,) and plan.status == WARN


def _runner(stdout: str = "", returncode: int = 0):
    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, returncode, stdout=stdout, stderr="boom\n")
    return run


def test_requeue_check_passes_when_scontrol_answers():
    """scontrol show job works and the job is requeueable: pass, naming the id it will requeue."""
    row = check_requeue({"SLURM_JOB_ID": "7"}, run=_runner("JobId=7 JobName=x Requeue=1 Restarts=2\n"),
                        which=lambda name: "/usr/bin/" + name)
    assert row.status == PASS and "scontrol requeue 7" in row.detail and "Restarts=2" in row.detail


def test_requeue_check_fails_for_a_job_submitted_no_requeue():
    """Requeue=0 (--no-requeue): fail with the #SBATCH line that fixes it."""
    row = check_requeue({"SLURM_JOB_ID": "7"}, run=_runner("JobId=7 Requeue=0 Restarts=0\n"),
                        which=lambda name: "/usr/bin/" + name)
    assert row.status == FAIL and "#SBATCH --requeue" in row.detail


@pytest.mark.parametrize("extra, status, words", [
    ({"JOBWRAP_REQUEUE_FILE": "/tmp/f"}, WARN, "JOBWRAP_REQUEUE_FILE"),
    ({"SLURM_STEP_ID": "0"}, WARN, "exits 75"),
    ({}, FAIL, "nothing would requeue"),
])
def test_requeue_check_without_scontrol_names_the_fallback(extra, status, words):
    """Without scontrol: the requeue file or exit 75 fallback warns; with neither, fail."""
    row = check_requeue({"SLURM_JOB_ID": "7", **extra}, which=lambda name: None)
    assert row.status == status and words in row.detail, row


# ---------------------------------------------------------------- real runs

def doctor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m jobwrap doctor ARGS` outside Slurm, with no JOBWRAP_* or SLURM_* settings inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWRAP_", "SLURM_"))}
    return subprocess.run([sys.executable, "-m", "jobwrap", "doctor", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def row_of(out: str, check: str) -> str:
    """The result word of one check in the printed table."""
    line = next(line for line in out.splitlines() if line.startswith(check + " "))
    return line[len(check):].split()[0]


def test_doctor_passes_a_writable_directory(tmp_path: Path):
    """A writable directory and a small state with a long lead time: exit 0, the save fits."""
    result = doctor("--dir", str(tmp_path / "ckpt"), "--lead", "60", "--state-bytes", "4MB")
    assert result.returncode == 0, result.stdout + result.stderr
    assert row_of(result.stdout, "directory writable") == "PASS"
    assert row_of(result.stdout, "save vs lead time") == "PASS"
    assert row_of(result.stdout, "signal delivery") == "PASS"
    assert row_of(result.stdout, "signal handler") == "PASS"
    assert os.listdir(tmp_path / "ckpt") == [], "the doctor left files behind"


def test_doctor_fails_an_unwritable_directory(tmp_path: Path):
    """A directory that cannot be created (a file in the path): exit 1, the row says what to change."""
    (tmp_path / "file").write_text("")
    result = doctor("--dir", str(tmp_path / "file" / "ckpt"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert row_of(result.stdout, "directory writable") == "FAIL"
    assert "choose another --dir" in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_doctor_fails_a_read_only_directory(tmp_path: Path):
    """A directory without write permission: exit 1, permission denied."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = doctor("--dir", str(locked))
    assert result.returncode == 1 and "permission denied" in result.stdout


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_doctor_warns_for_dev_shm():
    """/dev/shm is node-local memory: a warning (not a failure) that names shared storage."""
    path = Path("/dev/shm") / f"jobwrap-doctor-test-{uuid.uuid4().hex[:8]}"
    try:
        result = doctor("--dir", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert row_of(result.stdout, "directory shared") == "WARN"
        assert "node-local memory" in result.stdout
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_doctor_fails_a_large_state_with_a_tiny_lead(tmp_path: Path):
    """A 50 MB save cannot be committed twice over in 10 ms of lead time: fail, exit 1."""
    result = doctor("--dir", str(tmp_path), "--lead", "0.01", "--state-bytes", "50MB")
    assert result.returncode == 1, result.stdout + result.stderr
    assert row_of(result.stdout, "save vs lead time") == "FAIL"
    assert "Raise the lead time" in result.stdout


def test_doctor_under_jobwrap_run_checks_the_forwarding(tmp_path: Path):
    """Under `jobwrap run` locally, the signal goes to the supervisor and must come back forwarded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWRAP_", "SLURM_"))}
    result = subprocess.run([sys.executable, "-m", "jobwrap", "run", "--", sys.executable, "-m", "jobwrap",
                             "doctor", "--dir", str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "which forwarded it here" in result.stdout
    assert row_of(result.stdout, "requeue") == "PASS"


def test_doctor_refuses_a_bad_size():
    """--state-bytes that is no size: exit 2 with the format."""
    result = doctor("--dir", "x", "--state-bytes", "lots")
    assert result.returncode == 2 and "e.g. 3GB" in result.stderr
