"""A process named the way jobwrap records it: its pid and its start time, so a reused pid is not it."""
from __future__ import annotations

import psutil


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
