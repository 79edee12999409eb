"""The jobwrap internals the campaign reaches into, all in this module.

The campaign checks the store's files and aims kills at its phases and crash
points, so it needs more than the public ``jobwrap`` surface (which the other
modules use). When jobwrap's internal modules move, this is the module to change.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import signal
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jobwrap  # noqa: E402
import jobwrap._loop.session  # noqa: E402
from jobwrap._config import Config  # noqa: E402
from jobwrap._scheduler.schedulers import scontrol_requeue  # noqa: E402
from jobwrap._scheduler.supervisor import supervise  # noqa: E402
from jobwrap._storage import events, faults, store  # noqa: E402
from jobwrap._storage.events import read_events  # noqa: E402
from jobwrap._storage.store import FORMAT_VERSION, CheckpointStore, checksum_of  # noqa: E402

__all__ = ["CRASH_POINTS", "FORMAT_VERSION", "PHASES", "REPO", "CheckpointStore", "checksum_of", "data_path", "known",
           "manifest_path", "read_events", "replace_crash_point", "report_exit_decisions", "scontrol_requeue",
           "supervise", "wait_for_trapped_signal", "wrap_phases"]

# Imported once here, shared by every forked trial, not once per child.
for _preloaded in ("torch", "torch.distributed"):
    importlib.import_module(_preloaded)

# Every crash point of a save, commit and retention (faults.POINTS names them, "" aside).
CRASH_POINTS = [p for p in faults.POINTS if p]

# (owner, method, phase): the store phases a forked child reports entering and leaving.
PHASES = [
    (store.CheckpointStore, "prepare", "prepare"),
    (store.CheckpointStore, "claim", "claim"),
    (store.CheckpointStore, "newest_loadable", "resume"),
    (store.CheckpointStore, "save", "save"),
    (store.CheckpointStore, "retain", "retention"),
    (store.CheckpointStore, "quarantine", "quarantine"),
    (events.EventLog, "append", "events"),
]


def known(settings: dict[str, Any]) -> dict[str, Any]:
    """Drop settings this jobwrap does not have (the campaign runs against older checkouts too)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in settings.items() if k in fields}


def data_path(directory: str, step: int) -> str:
    """The data file of ``step`` (the store's naming, first serial)."""
    return os.path.join(directory, f"step-{step:012d}.pt")


def manifest_path(directory: str, step: int) -> str:
    """The manifest of ``step`` (the store's naming, first serial)."""
    return os.path.join(directory, f"step-{step:012d}.json")


def wrap_phases(around: Callable[[str, Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace each method of :data:`PHASES` by ``around(phase, original)`` (in a forked child only)."""
    for owner, name, phase in PHASES:
        original = owner.__dict__.get(name)
        if original is not None:
            setattr(owner, name, functools.wraps(original)(around(phase, original)))


def replace_crash_point(point: Callable[[str], None]) -> None:
    """Make every module that calls ``faults.crash_point`` call ``point`` instead (in a forked child only)."""
    original = faults.crash_point
    for module in list(sys.modules.values()):
        if getattr(module, "crash_point", None) is original:
            module.crash_point = point  # type: ignore[attr-defined]


def report_exit_decisions(report: Callable[..., None]) -> None:
    """Report each stop decision: the step and the signal that decides it (in a forked child only)."""
    decide = jobwrap._loop.session.Session._exit_decision

    def reported(self: Any, request: int, sig: Any, *args: Any, **kwargs: Any) -> Any:
        report("decided", self.step, sig.name if sig is not None else "none")
        return decide(self, request, sig, *args, **kwargs)
    jobwrap._loop.session.Session._exit_decision = reported  # type: ignore[method-assign]


def wait_for_trapped_signal(limit: float = 10.0) -> None:
    """Block (bounded) until the session's trap has recorded a signal: the one the parent sends now."""
    trap = getattr(signal.getsignal(signal.SIGUSR1), "__self__", None)
    deadline = time.monotonic() + limit
    while trap is not None and not getattr(trap, "received", True) and time.monotonic() < deadline:
        time.sleep(0.001)
