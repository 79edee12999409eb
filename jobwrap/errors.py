"""jobwrap's exceptions, a shallow hierarchy, and the hints for OSErrors: each message names what to change."""
from __future__ import annotations

import errno
import os


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


class UnreadableStateError(CheckpointError):
    """An intact checkpoint holds a value ``torch.load(weights_only=True)`` refuses: the start stops, nothing is
    set aside (the file is what was saved; the fix is in the state that was saved)."""


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


# What an errno means for a checkpoint directory, and what to change; ``{option}`` names the setting.
_OSERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space or point {option} at a larger filesystem",
    errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota",
    errno.EACCES: "permission denied: make the directory writable or choose another {option}",
    errno.EPERM: "operation not permitted: choose another {option}",
    errno.EROFS: "the filesystem is read-only: choose a writable checkpoint directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another {option}",
    errno.ENOENT: "the checkpoint directory or a part of its path disappeared: recreate it or choose another {option}",
    errno.EIO: "an I/O error from the storage: check the filesystem",
}


def describe_oserror(exc: OSError, option: str = "JOBWRAP_DIR") -> str:
    """What a failure of the checkpoint directory means and the fix, naming ``option`` (the flag or variable
    that chooses the directory where it failed); the system's own words for an errno without a hint."""
    hint = _OSERROR_HINTS.get(exc.errno or -1)
    if hint is not None:
        return hint.format(option=option)
    return os.strerror(exc.errno) if exc.errno else str(exc)


def storage_error(exc: OSError, failed: str, *, note: str = "") -> StorageError:
    """The error for an OSError of the checkpoint directory: what ``failed``, then the cause and its fix."""
    return StorageError(exc.errno, f"{failed}: {describe_oserror(exc)}" + (f"; {note}" if note else ""))
