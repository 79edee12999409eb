"""Crash points for fault-injection tests: ``JOBWRAP_TEST_KILL_AT=<point>`` SIGKILLs the process there.

Used by jobwrap's own tests and by users who want to prove their setup survives
a kill in the middle of a save. Costs one set lookup per point when unset.
"""
from __future__ import annotations

import os
import signal

POINTS = (
    "dcp-data-written",  # sharded state: this rank's files written and fsynced, the folder's .metadata not yet
    "dcp-written",       # sharded state: torch.distributed.checkpoint.save returned on this rank, nothing committed
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
