"""jobwrap's exceptions: a shallow hierarchy, each message names what to change."""
from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobwrap.store import Checkpoint


class JobwrapError(Exception):
    """Base class of every error jobwrap raises on purpose."""


class ConfigError(JobwrapError, ValueError):
    """A setting has a bad value or combination."""


class CheckpointError(JobwrapError):
    """A checkpoint could not be written or read."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file does not match its manifest (truncated, bit flips, foreign file)."""


class LoadFailedHereError(CheckpointError):
    """An intact checkpoint cannot be loaded on this node (no usable CUDA, out of memory, I/O): nothing is set aside."""


class ForeignRunError(CheckpointError):
    """The checkpoint directory belongs to another run."""


class DirectoryHeldError(CheckpointError):
    """Another live trainer holds the checkpoint directory."""


class StateMismatchError(CheckpointError):
    """A checkpoint does not fit the objects it is loaded into (model keys, shapes, world size)."""


class StorageError(CheckpointError, OSError):
    """The checkpoint directory cannot be used (unwritable, full, removed)."""


class SchedulerError(JobwrapError):
    """Talking to the scheduler failed (``scontrol`` missing or refusing)."""


class Preempted(SystemExit):
    """Raised at a step boundary after a signal's checkpoint committed; exits with ``code``.

    It is a ``SystemExit`` so an unchanged script ends with the right exit code;
    catch it to run something after the checkpoint.
    """

    def __init__(self, code: int, *, signal: signal.Signals, checkpoint: Checkpoint | None,
                 requeued: bool, reason: str) -> None:
        super().__init__(code)
        self.signal = signal
        self.checkpoint = checkpoint
        self.requeued = requeued
        self.reason = reason
