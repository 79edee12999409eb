"""Progress for slow saves and loads: one log line when a phase starts, a ticking line in a terminal.

A batch log gets one line when a save or load that is expected to be slow
begins (the previous save's duration is the estimate) and the usual line when
it ends. An interactive terminal also gets a line rewritten in place every
half second once the phase has run for :data:`SLOW_SECONDS`, with the bytes
written so far when they can be seen (the save's temporary file).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterator, TextIO

from jobwrap._format import human_duration, human_size
from jobwrap._storage.store import Checkpoint, CheckpointStore, temporary_data_glob

log = logging.getLogger("jobwrap")

#: A save or load expected to take longer than this gets a start line in the log.
SLOW_SECONDS = 2.0
_TICK = 0.5

Probe = Callable[[], "int | None"]


@contextlib.contextmanager
def phase(what: str, *, expected_seconds: float | None, note: str = "", total_bytes: int | None = None,
          probe: Probe | None = None, stream: TextIO | None = None) -> Iterator[None]:
    """Announce ``what`` (with ``note``) if it is expected to be slow; tick in a terminal while it runs.

    ``probe`` returns the bytes done so far (or None); it runs in a helper
    thread that only reads file sizes and writes to the terminal.
    """
    stream = sys.stderr if stream is None else stream
    if expected_seconds is not None and expected_seconds >= SLOW_SECONDS:
        log.info("%s (%s)...", what, note or f"expected to take {human_duration(expected_seconds)}")
    ticker = _Ticker(what, stream, probe, total_bytes) if _interactive(stream) else None
    if ticker is not None:
        ticker.start()
    try:
        yield
    finally:
        if ticker is not None:
            ticker.stop()


def _interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Ticker(threading.Thread):
    """Rewrites one terminal line while a phase runs; clears it at the end."""

    def __init__(self, what: str, stream: TextIO, probe: Probe | None, total: int | None) -> None:
        super().__init__(name="jobwrap-progress", daemon=True)
        self.what, self.stream, self.probe, self.total = what, stream, probe, total
        self.started = time.monotonic()
        self.done = threading.Event()
        self.shown = False

    def run(self) -> None:
        if self.done.wait(SLOW_SECONDS):
            return
        while not self.done.is_set():
            self._show()
            self.done.wait(_TICK)

    def _show(self) -> None:
        text = f"jobwrap: {self.what}: {human_duration(time.monotonic() - self.started)}"
        written = self.probe() if self.probe is not None else None
        if written:
            text += f", {human_size(written)}" + (f" of ~{human_size(self.total)}" if self.total else "")
        try:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self.shown = True
        except (OSError, ValueError):
            self.done.set()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=2)
        if self.shown:
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("\r\033[K")
                self.stream.flush()


def temporary_bytes(directory: str, step: int) -> Callable[[], int | None]:
    """A probe: the size of the save's temporary data file for ``step`` (None when there is none)."""
    pattern = os.path.join(glob.escape(directory), temporary_data_glob(step))

    def probe() -> int | None:
        for path in glob.glob(pattern):
            try:
                return os.path.getsize(path)
            except OSError:
                continue
        return None
    return probe


def saving(directory: str, step: int, previous: Checkpoint | None) -> contextlib.AbstractContextManager[None]:
    """The phase around a save: the previous checkpoint's save time and size are the estimate."""
    if previous is None:
        return phase(f"saving step {step}", expected_seconds=None, probe=temporary_bytes(directory, step))
    seconds = previous.manifest.get("save_seconds")
    return phase(f"saving step {step}", expected_seconds=seconds, total_bytes=previous.size,
                 note=f"the last save took {human_duration(seconds)} for {human_size(previous.size)}",
                 probe=temporary_bytes(directory, step))


def loading(store: CheckpointStore, committed: list[Checkpoint] | None = None
            ) -> contextlib.AbstractContextManager[None]:
    """The phase around verifying and loading the newest checkpoint; its save time is the estimate.
    ``committed``: the directory's committed checkpoints, when just listed (else they are read here)."""
    newest = (store.committed() if committed is None else committed)[:1]
    if not newest:
        return contextlib.nullcontext()
    checkpoint = newest[0]
    seconds = checkpoint.manifest.get("save_seconds")
    return phase(f"verifying and loading {os.path.basename(checkpoint.path)}", expected_seconds=seconds,
                 note=f"{human_size(checkpoint.size)}; saving it took {human_duration(seconds)}")
