"""Run one short Slurm command (``scontrol``, ``sbatch``, ``scancel``) and say in one line how it went.

Every caller meets the same three failures: the command is not on PATH (a
container, a compute node without the client tools), it does not answer (the
controller is down), or it refuses with a message on stderr. They become one
result here, so each caller only words its own advice.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Sequence

Runner = Callable[..., subprocess.CompletedProcess]

OK = "ok"
MISSING = "missing"    # not on PATH
TIMEOUT = "timeout"    # no answer within the timeout
FAILED = "failed"      # ran, exited non-zero


@dataclass(frozen=True)
class Ran:
    """How a command went.

    ``returncode`` is 127 when the command is missing and 124 when it timed out,
    as a shell and ``timeout(1)`` say; ``reason`` is one line (empty when ``ok``);
    ``said`` is everything the command printed about its failure, for a caller
    that quotes it whole.
    """

    status: str
    returncode: int
    stdout: str = ""
    reason: str = ""
    said: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def run_command(command: Sequence[str], *, timeout: float, run: Runner = subprocess.run, **options: Any) -> Ran:
    """Run ``command`` capturing its output; ``run`` is :func:`subprocess.run` or a stand-in for tests."""
    name = os.path.basename(command[0])
    try:
        done = run(list(command), capture_output=True, text=True, timeout=timeout, **options)
    except FileNotFoundError:
        reason = f"{name} not found on PATH"
        return Ran(MISSING, 127, reason=reason, said=reason)
    except subprocess.TimeoutExpired:
        reason = f"{name} did not answer within {timeout:.0f} s"
        return Ran(TIMEOUT, 124, reason=reason, said=reason)
    if done.returncode != 0:
        said = (done.stderr or done.stdout or "").strip() or f"exit code {done.returncode}"
        return Ran(FAILED, done.returncode, done.stdout or "", said.splitlines()[-1], said)
    return Ran(OK, 0, done.stdout or "")
