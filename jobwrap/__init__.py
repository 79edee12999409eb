"""jobwrap: PyTorch training on Slurm that survives preemption and time limits.

Trap the scheduler's signal, commit a checkpoint at the next step boundary,
requeue, and resume bit for bit. The public surface is the names below.
"""
from __future__ import annotations

__version__ = "0.1.0"

from jobwrap._config import REQUEUE_EXIT_CODE, Config
from jobwrap.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    ForeignRunError,
    JobwrapError,
    SchedulerError,
    StateMismatchError,
    StorageError,
)

# Session and friends import torch; load them on first use so that the CLI starts fast.
_LAZY = {"Preempted": "jobwrap._loop.session", "Session": "jobwrap._loop.session", "preemptible": "jobwrap._loop.session"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        from jobwrap._compat.versions import warn_untested

        # Where torch comes in, not at `import jobwrap`: the CLI starts without reading any package's metadata.
        warn_untested("torch", "torchdata")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jobwrap' has no attribute {name!r}")


__all__ = [
    "REQUEUE_EXIT_CODE",
    "CheckpointError",
    "Config",
    "ConfigError",
    "CorruptCheckpointError",
    "ForeignRunError",
    "JobwrapError",
    "Preempted",
    "SchedulerError",
    "Session",
    "StateMismatchError",
    "StorageError",
    "preemptible",
]
