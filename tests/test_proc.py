"""The one runner of short Slurm commands: each way a command fails becomes one line, with real processes."""
from __future__ import annotations

import sys
from pathlib import Path

from jobwrap._scheduler.proc import FAILED, MISSING, OK, TIMEOUT, run_command


def test_success_gives_stdout() -> None:
    """A command that exits 0: ok, its stdout, no reason."""
    done = run_command(["sh", "-c", "echo 4242; echo noise >&2"], timeout=60)
    assert (done.ok, done.status, done.returncode, done.stdout, done.reason) == (True, OK, 0, "4242\n", "")


def test_missing_command_is_named(tmp_path: Path) -> None:
    """A command that is not there: 127 and '<name> not found on PATH'."""
    done = run_command([str(tmp_path / "scontrol"), "requeue", "1"], timeout=60)
    assert (done.ok, done.status, done.returncode) == (False, MISSING, 127)
    assert done.reason == done.said == "scontrol not found on PATH"


def test_hanging_command_is_abandoned_at_the_timeout() -> None:
    """A command that never answers is killed at the timeout: 124 and 'did not answer within'."""
    done = run_command([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert (done.ok, done.status, done.returncode) == (False, TIMEOUT, 124)
    assert done.reason.endswith("did not answer within 1 s")


def test_failure_gives_the_last_line_and_keeps_the_rest() -> None:
    """A refusal: the exit code, the last line of stderr as the reason, all of stderr in ``said``."""
    done = run_command(["sh", "-c", "echo out; echo 'error: first' >&2; echo 'error: last' >&2; exit 3"], timeout=60)
    assert (done.ok, done.status, done.returncode, done.stdout) == (False, FAILED, 3, "out\n")
    assert done.reason == "error: last" and done.said == "error: first\nerror: last"


def test_silent_failure_names_the_exit_code() -> None:
    """A command that fails printing nothing (or only blanks): the reason is its exit code."""
    assert run_command(["sh", "-c", "exit 4"], timeout=60).reason == "exit code 4"
    assert run_command(["sh", "-c", "echo '  ' >&2; exit 5"], timeout=60).reason == "exit code 5"
    assert run_command(["sh", "-c", "echo 'on stdout'; exit 6"], timeout=60).reason == "on stdout"
