"""A process named the way jobwrap records it: its pid and its start time, so a reused pid is not it."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

log = logging.getLogger("jobwrap")

_LINUX = sys.platform.startswith("linux")


def start_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), or None when no such process is visible.

    A process's identity, not a measurement: the same value whoever reads it, and psutil's
    (its ``create_time()``, which ``jobwrap run`` and older lock records used). On Linux it is
    read from /proc without psutil, whose import costs a trainer's start ~10 ms.
    """
    if _LINUX:
        try:
            return _boot_time() + _start_ticks(pid) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def created_at() -> float | None:
    """When this process was created on the wall clock, to 10 ms (Linux; elsewhere :func:`start_time`).

    For measurements: :func:`start_time` adds a boot time that /proc/stat gives in whole seconds,
    so it may be up to a second off; here the process's age comes from ``CLOCK_BOOTTIME`` instead.
    """
    if not _LINUX:
        return start_time(os.getpid())
    try:
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - _start_ticks(os.getpid()) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - age


def _start_ticks(pid: int) -> int:
    """The process's start in clock ticks since boot (/proc/PID/stat, field 22; the name may hold ')')."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def _boot_time() -> float:
    """The boot time /proc/stat gives (whole seconds), read each time as psutil does."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise ValueError("no btime line in /proc/stat")


def alive(pid: int, started: float) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs on this host (not a reused pid)."""
    now = start_time(pid)
    return now is not None and abs(now - started) < 0.5


class Lifeline:
    """The ``jobwrap run`` a trainer must not outlive (PDEATHSIG reaches only its direct child: torchrun's
    workers and a shell's children watch it at step boundaries instead), looked at once a second at most."""

    def __init__(self, process: tuple[int, float] | None, clock: Callable[[], float]) -> None:
        # Watched only when seen alive now: in another PID namespace (a container) it would look gone.
        self.process = process if process is not None and alive(*process) else None
        self._clock = clock
        self._next_look = 0.0

    def cut(self) -> bool:
        """Whether the watched process is gone since the last look (once: then nothing is watched)."""
        now = self._clock()
        if self.process is None or now < self._next_look:
            return False
        self._next_look = now + 1.0
        if alive(*self.process):
            return False
        log.warning("jobwrap run (pid %d) is gone: checkpointing and exiting", self.process[0])
        self.process = None
        return True
