"""One live trainer per directory, and no trainer outliving its `jobwrap run`: real processes, real SIGKILLs."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import TRAIN

from jobwrap._loop.hold import done_name, held_name
from jobwrap._storage.lock import DirectoryLock, Holder, lock_proves_absence, mount_of, refusal
from jobwrap.testing import final_state

LONG = [sys.executable, str(TRAIN), "--epochs", "100000", "--samples", "64", "--step-seconds", "0.01"]


def _env(directory: Path, control: Path, hold: int | None = None) -> dict[str, str]:
    control.mkdir(exist_ok=True)
    env = {**os.environ, "JOBWRAP_DIR": str(directory), "JOBWRAP_TEST_CONTROL": str(control)}
    if hold is not None:
        env["JOBWRAP_TEST_HOLD_AT"] = str(hold)
    return env


def _held_pid(control: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """The pid of the trainer holding at ``step`` (it writes held-STEP-r0), waiting at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    held = control / held_name(step, 0)
    while not (held.exists() and held.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no trainer held at step {step} (launcher exit {proc.poll()})")
        time.sleep(0.05)
    return int(held.read_text())


def _held_trainer(directory: Path, control: Path, step: int) -> subprocess.Popen:
    """A long trainer started straight (no `jobwrap run`), once it holds at ``step``; killed if it never does."""
    proc = subprocess.Popen(LONG, env=_env(directory, control, hold=step),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _held_pid(control, step, proc)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc


def _gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("launch", ["direct", "under-a-shell"])
def test_sigkilled_jobwrap_run_takes_its_trainer_along(tmp_path, launch):
    """SIGKILL to `jobwrap run` (its direct child, or a trainer under a shell): the trainer commits and exits."""
    control = tmp_path / "control"
    command = LONG if launch == "direct" else ["sh", "-c", " ".join(LONG) + "; exit $?"]
    supervisor = subprocess.Popen([sys.executable, "-m", "jobwrap", "run", "--", *command],
                                  env=_env(tmp_path / "ck", control, hold=3), start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = None
    try:
        trainer = _held_pid(control, 3, supervisor)
        supervisor.kill()
        supervisor.wait(timeout=30)
        (control / done_name(3)).touch()  # let the held trainer go on to its next step boundaries
        assert _gone_within(trainer, 60), f"trainer {trainer} still runs 60 s after its jobwrap run was killed"
    finally:
        if trainer is not None:
            _kill(trainer)
        if supervisor.poll() is None:
            supervisor.kill()
    assert final_state(tmp_path / "ck")["step"] >= 3  # it committed on the way out


def test_second_trainer_is_refused_and_leaves_the_first_ones_files(tmp_path):
    """A second trainer on a held directory fails naming the holder and the fix; the first one's temporaries stay."""
    control = tmp_path / "control"
    first = _held_trainer(tmp_path / "ck", control, 2)
    try:
        in_progress = tmp_path / "ck" / ".tmp-step-000000000002.pt.1a2b3c4d"  # as a save of the first leaves it
        in_progress.write_bytes(b"partial")
        second = subprocess.run(LONG, env=_env(tmp_path / "ck", tmp_path / "control2"),
                                capture_output=True, text=True, timeout=180)
        assert second.returncode != 0
        assert "DirectoryHeldError" in second.stderr, second.stderr[-3000:]
        assert f"host {socket.gethostname()}, pid {first.pid}" in second.stderr
        assert "since" in second.stderr and "JOBWRAP_BREAK_LOCK=1" in second.stderr
        assert in_progress.exists()
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        (control / done_name(2)).touch()
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM


def test_lock_of_a_killed_trainer_is_taken_over_at_once(tmp_path):
    """A trainer SIGKILLed while holding the directory leaves its record; the next one takes over and finishes."""
    first = _held_trainer(tmp_path / "ck", tmp_path / "control", 2)
    try:
        assert (tmp_path / "ck" / "lock.json").exists()
    finally:
        first.kill()
        first.wait(timeout=30)
    short = [sys.executable, str(TRAIN), "--epochs", "1", "--samples", "64"]
    second = subprocess.run(short, env=_env(tmp_path / "ck", tmp_path / "control2"),
                            capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"taking over {tmp_path / 'ck'} from a holder that is gone" in second.stderr
    assert not (tmp_path / "ck" / "lock.json").exists()  # released at the end


_FORKS_THEN_DIES = """
import os, signal, sys, time
import jobwrap
job = jobwrap.Session(sys.argv[1], environ={}).start()
if os.fork() == 0:  # as a DataLoader worker: the lock's descriptor inherited, alive a while after its parent
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # not the test's pipes: it waits for the parent alone
    time.sleep(float(sys.argv[2]))
    os._exit(0)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_start_right_after_a_sigkill_waits_for_the_dead_holders_forked_workers(tmp_path):
    """A trainer SIGKILLed while a process it forked still holds the lock (its DataLoader workers, for a few seconds):
    a start right after waits for them instead of refusing the directory, then takes it over."""
    script = tmp_path / "forks.py"
    script.write_text(_FORKS_THEN_DIES)
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), "3"], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-c", "import sys, jobwrap\n"
                             "with jobwrap.Session(sys.argv[1], environ={}) as job: print('started', flush=True)",
                             str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "started" in second.stdout, second.stderr[-3000:]
    assert "a process it forked still holds the lock; waiting" in second.stderr
    assert time.monotonic() - started < 60


def _held_breaker(directory: Path, control: Path, step: int) -> subprocess.Popen:
    """A long trainer with JOBWRAP_BREAK_LOCK=1, once it holds at ``step``; killed if it never does."""
    proc = subprocess.Popen(LONG, env={**_env(directory, control, hold=step), "JOBWRAP_BREAK_LOCK": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _held_pid(control, step, proc)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=30)
        raise
    return proc


def test_a_trainer_that_broke_the_lock_holds_it_after_the_old_holder_exits(tmp_path):
    """Holder, breaker (JOBWRAP_BREAK_LOCK=1), holder exits: a third trainer is refused, naming the live breaker."""
    first = _held_trainer(tmp_path / "ck", tmp_path / "control1", 2)
    breaker = None
    try:
        breaker = _held_breaker(tmp_path / "ck", tmp_path / "control2", 2)
        first.send_signal(signal.SIGTERM)  # the old holder ends cleanly while the breaker trains on
        (tmp_path / "control1" / done_name(2)).touch()
        first.wait(timeout=120)
        short = [sys.executable, str(TRAIN), "--epochs", "1", "--samples", "64"]  # ends, if it takes the directory
        third = subprocess.run(short, env=_env(tmp_path / "ck", tmp_path / "control3"),
                               capture_output=True, text=True, timeout=180)
        assert third.returncode != 0, third.stderr[-3000:]
        assert "DirectoryHeldError" in third.stderr and "another process holds its lock" in third.stderr, \
            third.stderr[-3000:]
        assert f"pid {breaker.pid}" in third.stderr
        assert "taking over" not in third.stderr
        assert breaker.poll() is None
    finally:
        if breaker is not None:
            breaker.send_signal(signal.SIGTERM)
            (tmp_path / "control2" / done_name(2)).touch()
            _, err = breaker.communicate(timeout=120)
            assert "JOBWRAP_BREAK_LOCK: taking" in err, err[-3000:]
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    assert breaker.returncode == 128 + signal.SIGTERM
    assert not (tmp_path / "ck" / "lock.json").exists()  # the breaker's record, removed at its clean end


def test_a_heartbeat_stops_once_the_record_names_a_breaker(tmp_path):
    """Where the record decides, a holder whose record a breaker took stops beating instead of writing it back."""
    lock = DirectoryLock(str(tmp_path), job_id=None, restart=0, timeout=1.0)
    breaker = dataclasses.replace(lock.me, pid=lock.me.pid + 1, since=lock.me.since + 1)
    (tmp_path / "lock.json").write_text(json.dumps(dataclasses.asdict(breaker)))
    beating = threading.Thread(target=lock._beat, daemon=True)
    beating.start()
    beating.join(timeout=10)
    assert not beating.is_alive()
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == breaker.pid


# ---------------------------------------------------------------- the policy, pure

def _holder(**changes) -> Holder:
    base = dict(host="node1", pid=100, started=1.0, boot_id="b1", job_id="42", restart=0, since=0.0, heartbeat=1000.0)
    return Holder(**{**base, **changes})


@pytest.mark.parametrize("holder,me,now,taken", [
    (_holder(host="node2"), _holder(pid=7), 1010.0, False),                         # another host, fresh heartbeat
    (_holder(host="node2"), _holder(pid=7), 1000.0 + 120, True),                    # ... silent for the timeout
    (_holder(host="node2", restart=0), _holder(pid=7, restart=1), 1010.0, True),    # an earlier restart of this job
    (_holder(host="node2", job_id=None), _holder(pid=7, job_id=None, restart=1), 1010.0, False),  # no job to tell
    (_holder(boot_id="b0"), _holder(pid=7), 1010.0, True),                          # this host rebooted since
])
def test_who_may_take_a_directory_whose_lock_proves_nothing(holder, me, now, taken):
    """Where the OS lock covers one node only: stale, earlier-restart and pre-reboot holders are taken over."""
    reason = refusal(holder, me, os_lock="local", now=now, timeout=120, alive=lambda pid, started: True)
    assert (reason is None) == taken, reason
    if not taken and holder.host != me.host:
        assert "JOBWRAP_LOCK_TIMEOUT" in reason


def test_a_held_os_lock_is_never_taken_and_an_acquired_one_on_a_proving_filesystem_always_is():
    """flock held by another process: refused whatever the record says; acquired where it proves: taken."""
    assert refusal(None, _holder(), os_lock="busy", now=0, timeout=1, alive=lambda *_: False) is not None
    assert refusal(_holder(host="node2"), _holder(pid=7), os_lock="proof", now=1000.0, timeout=120,
                   alive=lambda *_: True) is None
    assert refusal(_holder(), _holder(pid=7), os_lock="local", now=1000.0, timeout=120,
                   alive=lambda *_: True) == "that process is still running"


def test_which_filesystems_locks_prove_that_nobody_else_holds_it():
    """Local filesystems, NFS with server locks and Lustre with flock prove it; localflock, nolock, unknown do not."""
    assert lock_proves_absence("ext4", {"rw"})
    assert lock_proves_absence("nfs4", {"rw", "vers=4.2", "local_lock=none"})
    assert not lock_proves_absence("nfs", {"rw", "nolock"})
    assert not lock_proves_absence("nfs", {"rw", "local_lock=flock"})
    assert lock_proves_absence("lustre", {"rw", "flock"})
    assert not lock_proves_absence("lustre", {"rw", "localflock"})
    assert not lock_proves_absence("beegfs", {"rw"})
    info = ("22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
            "40 22 0:50 / /scratch rw,relatime - lustre 10.0.0.1@o2ib:/fs rw,localflock\n"
            "41 22 0:51 / /home\\040dir rw - nfs4 srv:/home rw,vers=4.2,local_lock=none\n")
    assert mount_of("/scratch/run/ck", info) == ("lustre", {"rw", "relatime", "localflock"})
    assert mount_of("/home dir/ck", info)[0] == "nfs4"
    assert mount_of("/scratchy/ck", info)[0] == "ext4"
