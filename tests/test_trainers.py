"""The registry of training processes that `jobwrap run` signals, and its last resort for commands without jobwrap."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from jobwrap._scheduler import trainers
from jobwrap._scheduler.signals import SignalTrap
from jobwrap._scheduler.supervisor import deliver_when_registered

# Traps USR1 without jobwrap, says so on stdout, and reports whether the signal came.
PLAIN_TRAP = """\
import signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
print("trapping", flush=True)
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
sys.exit(0 if got else 3)
"""


def test_trap_registers_while_installed(tmp_path: Path):
    """A process is registered while jobwrap's trap is installed, and only then."""
    trap = SignalTrap([signal.SIGUSR2], registry=str(tmp_path))
    assert trainers.registered(str(tmp_path)) == []
    with trap:
        assert trainers.registered(str(tmp_path)) == [os.getpid()]
    assert trainers.registered(str(tmp_path)) == []
    assert os.listdir(tmp_path) == []


def test_dead_or_reused_pid_is_not_a_trainer(tmp_path: Path):
    """An entry whose process is gone, or whose pid now belongs to a process started at another time, is dropped."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / done.stdout.strip()).write_text("1.0")  # exited
    (tmp_path / str(os.getppid())).write_text("1.0")  # alive, but not the process that registered
    assert trainers.registered(str(tmp_path)) == []
    assert os.listdir(tmp_path) == []


def test_command_that_never_registers_gets_the_signal_after_the_hold(tmp_path: Path):
    """A command without jobwrap never registers: after the hold the signal goes to the command itself."""
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TRAP)
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "trapping"
        assert deliver_when_registered(child, str(tmp_path), signal.SIGUSR1, hold=0.5) == [child.pid]
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
