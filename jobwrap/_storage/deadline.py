"""When is a save due, and will it fit before the kill? Pure arithmetic over the clock, the grace window
and the measured save speed: each function is given the time (``now``), by the session from its clock,
by a test as any number.

The grace window is what is left between a signal and the kill: the signal's
lead time (``grace_seconds`` / ``JOBWRAP_GRACE_SECONDS``, e.g. the ``120`` of
``--signal=B:USR1@120``) and the allocation's end (``SLURM_JOB_END_TIME``),
whichever comes first. The save time is estimated from the checkpoints already
written: their manifests record size and seconds.
"""
from __future__ import annotations

from typing import Any, Iterable, Literal

Plan = Literal["wait", "supersede", "wait-then-save"]


def periodic_save_due(*, step: int, saved_step: int | None, every_steps: int | None, every_seconds: float | None,
                      now: float, last_save: float) -> bool:
    """Whether a periodic save is due at ``step``: every ``every_steps`` steps, or once ``every_seconds`` have
    passed since ``last_save`` (the last save, or the start); never for a step ``saved_step`` already holds."""
    if saved_step == step:
        return False
    if every_steps and step % every_steps == 0 and step > 0:
        return True
    return bool(every_seconds and now - last_save >= every_seconds)


def measured_speed(manifests: Iterable[dict[str, Any]], *, recent: int = 5) -> float | None:
    """Bytes per second of the most recent saves (median), or None when nothing was measured.

    Saves written on the main thread (a signal's, a manual one) are what a signal's save will be
    like; background saves share the CPU with training and are slower, so they count only when
    there is nothing else (a cautious estimate).
    """
    speeds: dict[bool, list[float]] = {False: [], True: []}
    for manifest in manifests:
        size, seconds = checkpoint_bytes(manifest), manifest.get("save_seconds")
        if isinstance(seconds, (int, float)) and seconds > 0 and size > 0:
            seconds += _shards(manifest).get("seconds", 0.0)
            speeds[bool(manifest.get("background"))].append(size / seconds)
    chosen = speeds[False] or speeds[True]
    return _median(chosen[:recent]) if chosen else None


def _median(values: list[float]) -> float:
    # statistics.median would import decimal and fractions: ~5 ms of every resume, for five numbers.
    ordered, middle = sorted(values), len(values) // 2
    return ordered[middle] if len(values) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def checkpoint_bytes(manifest: dict[str, Any]) -> int:
    """The bytes of a checkpoint: its file and, for sharded state, every rank's files in its folder."""
    size = manifest.get("size")
    return (size if isinstance(size, int) else 0) + int(_shards(manifest).get("bytes", 0))


def _shards(manifest: dict[str, Any]) -> dict[str, Any]:
    """The sharded folder's record (bytes, and the seconds every rank took to write it), or {}."""
    record = manifest.get("dcp") or manifest.get("stripes")  # sharded state, or striped parts
    return record if isinstance(record, dict) else {}


def estimate_seconds(nbytes: int | None, bytes_per_second: float | None) -> float | None:
    """How long writing ``nbytes`` takes at the measured speed (None when either is unknown)."""
    if not nbytes or not bytes_per_second:
        return None
    return nbytes / bytes_per_second


def grace_left(*, signal_at: float | None, now: float, grace_seconds: float | None,
               end_time: float | None, wall_now: float) -> float | None:
    """Seconds until the kill: the signal's lead time from ``signal_at`` (monotonic clock), or
    the allocation's end ``end_time`` (wall clock), whichever is sooner; None when neither is known."""
    candidates = []
    if grace_seconds is not None:
        candidates.append(grace_seconds - (now - signal_at) if signal_at is not None else grace_seconds)
    if end_time is not None:
        candidates.append(end_time - wall_now)
    return min(candidates) if candidates else None


def emergency_plan(*, in_flight_step: int, step: int, remaining: float | None, fresh: float | None,
                   left: float | None) -> Plan:
    """What a signal's save does about a background save still in flight.

    - ``wait``: the save in flight is of this very step; it is the newest state.
    - ``wait-then-save``: the save in flight commits sooner than a fresh one
      would, and there is not time for both: let it commit (an older but
      committed state), then try the fresh one.
    - ``supersede``: cancel it at its next chunk and write the current state now,
      the fastest way to commit the newest state.
    """
    if in_flight_step == step:
        return "wait"
    if remaining is not None and fresh is not None and left is not None:
        if remaining < fresh and remaining + fresh > left:
            return "wait-then-save"
    return "supersede"


def fit_warning(*, nbytes: int | None, bytes_per_second: float | None, grace_seconds: float | None,
                margin: float = 0.8) -> str | None:
    """A warning when a save of ``nbytes`` would take more than ``margin`` of the grace window."""
    need = estimate_seconds(nbytes, bytes_per_second)
    if need is None or grace_seconds is None or need <= margin * grace_seconds:
        return None
    return (f"a checkpoint ({nbytes / 1e9:.2f} GB at the measured {bytes_per_second / 1e6:.0f} MB/s) takes "
            f"about {need:.1f} s, but the grace window after a signal is {grace_seconds:g} s: the save may be "
            f"killed before it commits. Ask Slurm for an earlier signal (--signal=B:USR1@"
            f"{int(need / margin) + 30}) and set JOBWRAP_GRACE_SECONDS to match, or use faster storage")
