"""The checkpoint directory claimed for this process: held against a second live trainer, cleaned up,
its run named, and the run's history opened.

Rank 0 makes the directory, locks it (before the cleanup, which would delete a live
trainer's temporaries), cleans it up and claims its run; every rank then opens the
events log (only rank 0's writes) and loads the checkpoint rank 0 picked
(:func:`jobwrap._loop.resume.open_directory`). The lock is held until :meth:`release`.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from jobwrap._config import Config
from jobwrap._loop import resume
from jobwrap._scheduler.env import JobEnv, default_run_id
from jobwrap._storage.events import EventLog
from jobwrap._storage.lock import DirectoryLock
from jobwrap._storage.store import Checkpoint, CheckpointStore


class ClaimedDirectory:
    """A Session's hold on its directory: :meth:`open` claims it and loads the newest verified checkpoint;
    ``run_id`` and ``events`` are known from then on."""

    def __init__(self, store: CheckpointStore, config: Config, job: JobEnv) -> None:
        self.store = store
        self.config = config
        self.job = job
        self.run_id = ""
        self.events: EventLog
        self._lock: DirectoryLock | None = None  # rank 0's hold on the directory
        self._listed: list[Checkpoint] | None = None  # rank 0's committed checkpoints, listed once at start

    def open(self, group: Any, device: torch.device) -> tuple[Checkpoint, dict[str, Any]] | None:
        """Rank 0 claims the directory; every rank opens the events and loads the checkpoint picked. A collective."""
        def opened(run_id: str) -> None:
            self.run_id = run_id
            self.events = EventLog(self.config.directory, file_mode=self.config.file_mode, enabled=group.rank == 0,
                                   run_id=run_id, restart=self.job.restart_count, job_id=self.job.job_id)
        return resume.open_directory(self.store, group, device, claim=self._claim, opened=opened)

    def release(self) -> None:
        """Let the directory go (a no-op where it was not held: other ranks, a failed start)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def committed_after_resume(self, resumed: Checkpoint) -> list[Checkpoint]:
        """The committed checkpoints now: rank 0's start listing, less those the resume set aside (only ones
        newer than the checkpoint it took can have been); other ranks list the directory."""
        if self._listed is None:
            return self.store.committed()
        return [c for c in self._listed if c.key <= resumed.key or os.path.exists(c.path)]

    def _claim(self) -> tuple[str, list[str], list[Checkpoint]]:
        """Rank 0: the directory made, held against a second live trainer, cleaned up, and its run claimed;
        with its committed checkpoints, listed once for the whole start."""
        self.store.ensure_directory()
        self._hold()  # before prepare(): its cleanup would delete a live trainer's temporaries
        self._listed = self.store.prepare(proven=True)
        return (*self.store.claim(self.config.run_id or default_run_id(self.job), adopt=self.config.adopt),
                self._listed)

    def _hold(self) -> None:
        self._lock = DirectoryLock(self.store.directory, job_id=self.job.job_id, restart=self.job.restart_count,
                                   timeout=self.config.lock_timeout, break_lock=self.config.break_lock,
                                   file_mode=self.config.file_mode)
        self._lock.acquire()
