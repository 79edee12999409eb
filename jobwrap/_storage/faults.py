"""Test and benchmark knobs: crash points, and a throttle on every byte the store writes.

``JOBWRAP_TEST_KILL_AT=<point>`` SIGKILLs the process there: used by jobwrap's
own tests and by users who want to prove their setup survives a kill in the
middle of a save. Costs one set lookup per point when unset.

``JOBWRAP_TEST_WRITE_BPS=<bytes per second>`` limits this process's writes
through the store (checkpoint files and striped parts) to that bandwidth, as a
parallel filesystem limits each client: the benchmark's stand-in for a
per-node limit on a one-disk machine. Unset, it costs one comparison per 8 MiB.
"""
from __future__ import annotations

import os
import signal
import threading
import time

POINTS = (
    "dcp-data-written",  # sharded state: this rank's files written and fsynced, the folder's .metadata not yet
    "dcp-written",       # sharded state: torch.distributed.checkpoint.save returned on this rank, nothing committed
    "part-written",      # striped state: this rank's part fsynced in the step's folder, nothing committed
    "data-written",      # payload written, not yet fsynced
    "data-synced",       # payload fsynced, still under its temporary name
    "data-renamed",      # payload under its final name, manifest not written
    "manifest-written",  # manifest fsynced under its temporary name
    "committed",         # manifest renamed: the checkpoint is committed
    "retention",         # an old checkpoint half deleted
)

_ARMED = frozenset(p for p in os.environ.get("JOBWRAP_TEST_KILL_AT", "").split(",") if p)


def crash_point(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)


WRITE_BPS = float(os.environ.get("JOBWRAP_TEST_WRITE_BPS") or 0)
_throttle_lock = threading.Lock()
_next_free = 0.0  # when this process's simulated link is free again


def throttle(nbytes: int) -> None:
    """Sleep as a link of :data:`WRITE_BPS` bytes per second shared by the whole process would make a write of
    ``nbytes`` wait (nothing when the knob is unset)."""
    global _next_free
    with _throttle_lock:
        now = time.monotonic()
        _next_free = max(_next_free, now) + nbytes / WRITE_BPS
        wait = _next_free - now
    time.sleep(wait)
