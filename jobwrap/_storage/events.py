"""The run's append-only history: one JSON line per event (start, resume, signal, save, requeue, exit)."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from jobwrap._storage import records

log = logging.getLogger("jobwrap")

EVENTS_FILE = "events.jsonl"


class EventLog:
    """Appends events to ``events.jsonl``; a failure to log never stops training."""

    def __init__(self, directory: str, *, file_mode: int = 0o600, enabled: bool = True, **context: Any) -> None:
        self.path = os.path.join(directory, EVENTS_FILE)
        self.file_mode = file_mode
        self.enabled = enabled  # only rank 0 writes shared files
        self.context = context

    def append(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "event": event, **self.context, **fields}
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        try:
            # O_NOFOLLOW: a symlink planted as events.jsonl must not make the job append outside the directory.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, self.file_mode)
            try:
                os.write(fd, line)  # one write with O_APPEND: lines never interleave
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("could not append to %s: %s", self.path, exc.strerror)

    def read(self) -> list[dict[str, Any]]:
        return read_events(os.path.dirname(self.path))

    def read_tail(self, nbytes: int = 1 << 16) -> list[dict[str, Any]]:
        """The trusted events of the file's last ``nbytes`` (whole lines only): what a start needs of the
        previous launch, without reading a long history."""
        return read_events(os.path.dirname(self.path), tail=nbytes)


def read_events(directory: str, *, tail: int | None = None) -> list[dict[str, Any]]:
    """All trusted events of a run directory (:func:`jobwrap._storage.records.event`): a torn last line (a kill
    mid-write) and any record of the wrong shape are skipped, the latter with one warning per read."""
    path = os.path.join(directory, EVENTS_FILE)
    try:
        with open(path, "rb") as f:
            if tail is not None and f.seek(0, os.SEEK_END) > tail:
                f.seek(-tail, os.SEEK_END)
                f.readline()  # the first line is cut: drop it
            else:
                f.seek(0)
            lines = [line.decode(errors="replace") for line in f.readlines()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read %s (%s): its history is left out", path, exc.strerror)
        return []
    return records.valid_events(lines, path, log)
