"""Which processes ``jobwrap run`` signals: the training processes that registered with it.

Guessing them from who traps a signal hits launchers and helpers too: torchrun traps
TERM (and SIGKILLs its workers 30 s after passing it on), DataLoader workers trap TERM
in C (and die of it). So the supervisor hands a directory down (``JOBWRAP_TRAINERS``),
each process that installs jobwrap's trap writes a file there named by its pid and
holding its start time, and removes it when it puts the previous handlers back. The
start time tells a live trainer from a reused pid.
"""
from __future__ import annotations

import contextlib
import os

from jobwrap._storage.pids import alive, start_time

#: The variable through which ``jobwrap run`` hands the registry directory to its command.
REGISTRY_VARIABLE = "JOBWRAP_TRAINERS"


def register(directory: str | None) -> str | None:
    """Record this process as a training process in ``directory``; the file to pass to :func:`unregister`."""
    started = start_time(os.getpid())
    if not directory or started is None:
        return None
    path = os.path.join(directory, str(os.getpid()))
    try:
        with open(path + ".tmp", "w") as f:
            f.write(repr(started))
        os.replace(path + ".tmp", path)  # the supervisor never reads half a start time
    except OSError:
        return None  # no registry (a supervisor that is gone): the supervisor's fallback still signals the command
    return path


def unregister(path: str | None) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def registered(directory: str) -> list[int]:
    """The pids of the live processes registered in ``directory``; stale entries are removed."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    live = []
    for name in names:
        if not name.isdigit():
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                recorded = float(f.read())
        except (OSError, ValueError):
            continue
        if alive(int(name), recorded):
            live.append(int(name))
        else:  # gone (killed before it could unregister), or its pid was reused since
            unregister(path)
    return sorted(live)
