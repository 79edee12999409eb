"""The test hold: a training process waits at a chosen step boundary until the test's signal is there.

The files in the control directory (``JOBWRAP_TEST_CONTROL``) are the contract
between the training process (:func:`hold`) and :mod:`jobwrap.testing`; both
build their names here:

- ``held-STEP-rRANK``: the process holds at STEP (it holds its pid);
- ``got-STEP-rRANK``: the names of the signals it has seen so far;
- ``done-STEP``: the test lets every rank go on (and relaunches pass STEP).
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobwrap._scheduler.signals import SignalTrap

log = logging.getLogger("jobwrap")

HOLD_SECONDS = 60  # a test that never lets go does not stop the run


def held_name(step: int, rank: int) -> str:
    return f"held-{step}-r{rank}"


def held_pattern(step: int) -> str:
    """A glob for the held files of every rank at ``step``."""
    return f"held-{step}-r*"


def held_rank(name: str) -> int:
    """The rank of a ``held-STEP-rRANK`` file name."""
    return int(name.rsplit("-r", 1)[1])


def got_name(step: int, rank: int) -> str:
    return f"got-{step}-r{rank}"


def done_name(step: int) -> str:
    return f"done-{step}"


def hold(control: str | None, step: int, rank: int, trap: "SignalTrap") -> None:
    """Wait (bounded) at ``step`` until the test's signal is here or the test releases this process."""
    done = os.path.join(control or "", done_name(step))
    if not control or os.path.exists(done):
        return
    with open(os.path.join(control, held_name(step, rank)), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + HOLD_SECONDS  # a real wait: real time, whatever clock the session decides by
    seen = 0
    while time.monotonic() < deadline:
        # Held until the test lets go, so that each signal it sends (USR1, then TERM) lands here.
        if trap.wait(0.01) and len(trap.received) > seen:  # not event.wait(): see SignalTrap.wait
            seen = len(trap.received)
            names = " ".join(dict.fromkeys(sig.name for sig, _ in trap.received[:seen]))
            got = os.path.join(control, got_name(step, rank))
            with open(got + ".tmp", "w") as f:
                f.write(names)
            os.replace(got + ".tmp", got)
        if os.path.exists(done):
            return
    log.warning("test hold at step %d: not released within %d s, continuing", step, HOLD_SECONDS)
