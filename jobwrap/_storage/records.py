"""One schema per file jobwrap reads back: pure validators, no I/O.

Every file in a checkpoint directory can be edited, truncated, or written by an
older or newer jobwrap. A reader that trusts a field's type crashes on it
(``math domain error`` from a negative duration, ``KeyError`` from ``{}``), and
the reader may run between a commit and the requeue. So each reader passes its
records through the validator here and skips what fails, with one warning per
read (:class:`Skipped`), never one per line and never an exception.

Each validator returns the record (unchanged) when it can be trusted, else the
reason in words.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

#: events.jsonl: fields that, where present and not None, are counts, steps, sizes, seconds or times (>= 0).
EVENT_AMOUNTS = ("time", "step", "epoch", "bytes", "seconds", "pause", "delay", "load_seconds", "read_seconds",
                 "init_seconds", "process_started", "session_started", "previous_exit", "first_batch",
                 "world_size", "restart", "rank")
#: ...fields that are numbers of either sign (exit codes).
EVENT_NUMBERS = ("code", "exit_code")
#: ...fields that are text.
EVENT_TEXTS = ("reason", "signal", "path", "run_id", "scheduler", "resumed_from", "error", "job_id")

#: lock.json: each field of :class:`jobwrap._storage.lock.Holder` and the types it may have.
LOCK_FIELDS: dict[str, tuple[type, ...]] = {
    "host": (str,), "pid": (int,), "started": (int, float), "boot_id": (str,), "job_id": (str, type(None)),
    "restart": (int,), "since": (int, float), "heartbeat": (int, float)}

#: A manifest's fields that are whole numbers >= 0.
MANIFEST_COUNTS = ("step", "epoch", "size")
#: ...and the fields that only describe the save (reports, the auto interval): of the wrong type, they are
#: dropped from the record (the checkpoint stays trusted: its checksum, not its description, proves it).
MANIFEST_AMOUNTS = ("wall_time", "save_seconds", "stage_seconds", "restart_count", "world_size")
MANIFEST_TEXTS = ("reason", "run_id", "host", "job_id", "jobwrap_version", "torch_version")


def is_number(value: Any) -> bool:
    """A finite int or float (a bool is not a number here: ``True`` as a step is a damaged record)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any) -> bool:
    """A whole number >= 0 (int, not bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def event(record: Any) -> dict[str, Any] | str:
    """One line of events.jsonl: an object with a text ``event`` and well-typed known fields."""
    if not isinstance(record, dict):
        return f"not an object ({type(record).__name__})"
    if not isinstance(record.get("event"), str) or not record["event"]:
        return "no 'event' name"
    for key in EVENT_AMOUNTS:
        value = record.get(key)
        if value is not None and not (is_number(value) and value >= 0):
            return f"{key}={value!r} is not a number >= 0"
    for key in EVENT_NUMBERS:
        value = record.get(key)
        if value is not None and not is_number(value):
            return f"{key}={value!r} is not a number"
    for key in EVENT_TEXTS:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key}={value!r} is not text"
    return record


def lock_holder(record: Any) -> dict[str, Any] | str:
    """lock.json: every field of the holder, each of its type (pid and restart >= 0, times finite)."""
    if not isinstance(record, dict):
        return f"not an object ({type(record).__name__})"
    for key, types in LOCK_FIELDS.items():
        if key not in record:
            return f"no {key!r}"
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{key}={value!r} is not {' or '.join(t.__name__ for t in types)}"
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            return f"{key}={value!r} is not a number >= 0"
    return record


def manifest(record: Any) -> dict[str, Any] | str:
    """A checkpoint's manifest: step, epoch and size whole numbers >= 0, serial too where present, a text checksum."""
    if not isinstance(record, dict):
        return f"not a manifest (JSON, but not an object: {type(record).__name__})"
    for key in MANIFEST_COUNTS:
        if key not in record:
            return f"the field {key!r} is missing"
        if not is_count(record[key]):
            return f"{key}={record[key]!r} is not a whole number >= 0"
    if "serial" in record and not is_count(record["serial"]):
        return f"serial={record['serial']!r} is not a whole number >= 0"
    if not isinstance(record.get("checksum"), str) or not record["checksum"]:
        return f"checksum={record.get('checksum')!r} is not text"
    return record


def manifest_description(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A trusted manifest without its descriptive fields of the wrong type: (the record, the fields dropped)."""
    bad = [key for key in MANIFEST_AMOUNTS if record.get(key) is not None
           and not (is_number(record[key]) and record[key] >= 0)]
    bad += [key for key in MANIFEST_TEXTS if record.get(key) is not None and not isinstance(record[key], str)]
    return ({k: v for k, v in record.items() if k not in bad} if bad else record), bad


def payload_meta(loaded: Any) -> str | None:
    """Why a loaded payload is no jobwrap checkpoint (its ``jobwrap`` entry, ``step``, ``epoch``), or None;
    the reason reads after the file's name."""
    if not isinstance(loaded, dict) or not isinstance(loaded.get("jobwrap"), dict):
        return "is a torch file but not a jobwrap checkpoint"
    for key in ("step", "epoch"):
        if not is_count(loaded.get(key)):
            return f"has {key}={loaded.get(key)!r}, not a whole number >= 0"
    meta = loaded["jobwrap"]
    if "position" in meta and not is_count(meta["position"]):
        return f"has position={meta['position']!r}, not a whole number >= 0"
    ranks = meta.get("ranks")
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) and "rng" in r for r in ranks):
        return "has no per-rank entries (RNG streams), or malformed ones"
    return None


class Skipped:
    """The records a reader dropped: one warning for the whole read, naming the file, the count and the first."""

    def __init__(self, what: str, log: logging.Logger) -> None:
        self.what = what
        self.log = log
        self.count = 0
        self.first = ""

    def note(self, where: str, reason: str) -> None:
        self.count += 1
        if self.count == 1:
            self.first = f"{where}: {reason}"

    def report(self) -> None:
        if self.count:
            self.log.warning("%s: skipped %d record(s) that cannot be trusted (first: %s)", self.what, self.count,
                             self.first)


def valid_events(lines: Iterable[str], what: str, log: logging.Logger) -> list[dict[str, Any]]:
    """The trusted records among the lines of an events log; a torn or odd line is skipped (one warning)."""
    import json

    skipped = Skipped(what, log)
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            checked = event(json.loads(line))
        except ValueError:
            if line.endswith("\n"):  # a torn last line (a kill mid-write) is expected: no warning for it
                skipped.note(f"line {number}", "not JSON")
            continue
        if isinstance(checked, str):
            skipped.note(f"line {number}", checked)
        else:
            events.append(checked)
    skipped.report()
    return events
