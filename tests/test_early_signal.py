"""A signal that reaches `jobwrap run` before training traps it (still importing torch) is held, not fatal.

Slurm's time-limit warning and a preemption can come in the first seconds of a run (slurmctld
checks every 30 s; a requeued job may be preempted again at once). Sent on at once, USR1 would
kill the starting training process, and a preempted job that dies is not requeued.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TRAIN

from jobwrap._scheduler.supervisor import catches
from jobwrap._storage.events import read_events
from jobwrap.testing import assert_same_run

LATE_TRAP = """\
import signal, sys, time
time.sleep(1.5)  # "importing torch": USR1 would kill us now
from jobwrap._scheduler.env import read_env
from jobwrap._scheduler.signals import SignalTrap
trap = SignalTrap([signal.SIGUSR1], registry=read_env().trainers_dir).install()  # as a Session does
got = trap.wait(20)
print("got USR1" if got else "no USR1", flush=True)
sys.exit(0 if got else 3)
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("JOBWRAP_", "SLURM_"))}


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`jobwrap run -- command`, returned once the supervisor traps USR1 (bounded)."""
    proc = subprocess.Popen([sys.executable, "-m", "jobwrap", "run", "--", *command], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None and time.monotonic() < deadline, "jobwrap run never trapped USR1"
        time.sleep(0.01)
    return proc


def test_signal_before_the_trap_is_delivered_once_trapped(tmp_path: Path):
    """USR1 while the child has no handler yet: held, and delivered when the child installs jobwrap's trap."""
    script = tmp_path / "late.py"
    script.write_text(LATE_TRAP)
    proc = _start([sys.executable, str(script)], _env())
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "got USR1" in out


def test_training_signalled_while_starting_checkpoints_requeues_and_finishes_exact(tmp_path: Path):
    """USR1 while train.py imports torch: its first boundary commits, it is relaunched, ends bit-exact."""
    args = [sys.executable, str(TRAIN), "--epochs", "2", "--samples", "128"]
    reference = subprocess.run(args, env={**_env(), "JOBWRAP_DIR": str(tmp_path / "ref")},
                               capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr
    proc = _start(args, {**_env(), "JOBWRAP_DIR": str(tmp_path / "cut")})
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.count("training asked to be requeued") == 1, err
    requeues = [e for e in read_events(str(tmp_path / "cut")) if e["event"] == "requeue"]
    assert len(requeues) == 1
    assert_same_run(tmp_path / "ref", tmp_path / "cut")


EARLY_UNDER_SRUN = """\
import os, signal, sys, time
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()))  # started: the test signals now
time.sleep(1.5)  # "importing torch": USR1's default action would kill us now
from jobwrap._scheduler.signals import SignalTrap
trap = SignalTrap([signal.SIGUSR1]).install()
print("got USR1" if trap.wait(5) else "no USR1", "rank", os.environ.get("RANK"), flush=True)
"""


def _signal_once_started(command: list[str], started: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Runs command, sends USR1 as soon as it has written its pid into ``started``; its outcome (bounded)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (started.exists() and started.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the script never started"
        time.sleep(0.01)
    os.kill(int(started.read_text()), signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_srun_task_holds_a_signal_sent_before_training_traps_it(tmp_path: Path):
    """`jobwrap task` (each srun task of the multi-process layouts): an early USR1 waits for jobwrap's trap."""
    script = tmp_path / "early.py"
    script.write_text(EARLY_UNDER_SRUN)
    env = {**_env(), "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2"}
    bare = _signal_once_started([sys.executable, str(script), str(tmp_path / "bare")], tmp_path / "bare", env)
    assert bare.returncode == -signal.SIGUSR1, "without jobwrap task the early USR1 should kill the task"
    task = _signal_once_started([sys.executable, "-m", "jobwrap", "task", "--", sys.executable, str(script),
                                 str(tmp_path / "task")], tmp_path / "task", env)
    assert task.returncode == 0, task.stderr
    assert task.stdout.split() == ["got", "USR1", "rank", "1"]
