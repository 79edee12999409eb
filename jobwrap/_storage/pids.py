"""A process named the way jobwrap records it: its pid and its start time, so a reused pid is not it."""
from __future__ import annotations

import logging
from typing import Callable

import psutil

log = logging.getLogger("jobwrap")


def start_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), or None when no such process is visible."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


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
