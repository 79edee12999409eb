"""A Session's start, after the trap and the directory: resumed from a checkpoint, or fresh (init_from).

The start event records how the process got there (jobwrap._report.relaunch reads it); the
relaunch's timeline (its first batch and first step) is kept here too.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from jobwrap._loop import adopt
from jobwrap._loop.interval import AutoInterval
from jobwrap._loop.resume import Resumed
from jobwrap._scheduler.env import JobEnv
from jobwrap._storage.devices import resume_device
from jobwrap._storage.pids import created_at
from jobwrap._storage.store import Checkpoint
from jobwrap.errors import ConfigError

log = logging.getLogger("jobwrap")


@dataclasses.dataclass
class Timeline:
    """The relaunch's timeline (jobwrap status): jobwrap's own start-up, and the first batch and step."""
    init_seconds: float
    first_step_pending: bool = False  # resumed, no new step yet: its first one ends the relaunch
    first_batch_at: float | None = None


def ensure_log_handler() -> None:
    """One line per event in the job's log even when the script never configured logging."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("jobwrap: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def default_device(job: JobEnv, configured: str | None = None) -> torch.device:
    """The configured device, else ``cuda:LOCAL_RANK`` when this process has CUDA, else the CPU
    (the rule: :func:`jobwrap._storage.devices.resume_device`)."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = resume_device(local_rank=job.local_rank, cuda_devices=cuda_devices, configured=configured)
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} (JOBWRAP_DEVICE or device=) is not a torch device ({exc}): "
                          f"set it to e.g. cpu or cuda:0, or unset it") from exc


def _restarts(saved: Any, now: int) -> str:
    """The restart counts, where they say something (a relaunch by hand has the same as its checkpoint)."""
    return f" (saved by restart {saved}, this is restart {now})" if saved is not None and saved != now else ""


class Starting:
    """Session's start: resumed from a checkpoint or fresh, and the start event."""

    def _start_resumed(self, checkpoint: Checkpoint, loaded: dict[str, Any], *, load_seconds: float,
                       session_started: float) -> None:
        """Resume from ``checkpoint``: its step, epoch and position now; each object's state as track() asks."""
        self.resumed_from = self.last_checkpoint = checkpoint
        resumed = self._resume = Resumed(checkpoint, loaded, rank=self.group.rank, world_size=self.group.world_size,
                                         allow_world_size_change=self.config.allow_world_size_change,
                                         device=self.device)
        self._resume_data = resumed.data
        self._grads.resume(resumed.grads)
        self.epoch, self.step, self.position = resumed.epoch, resumed.step, resumed.position
        self._resumed_step = self.step
        self._saver.check_fit(checkpoint, self._directory.committed_after_resume(checkpoint), warn=self.group.rank == 0)
        if self.group.rank == 0:
            log.info("resumed from %s: %s, run %s%s", os.path.basename(checkpoint.path), self._where(),
                     checkpoint.run_id, _restarts(checkpoint.manifest.get("restart_count"), self.job.restart_count))
        self.events.append("start", step=self.step, epoch=self.epoch, resumed_from=checkpoint.path,
                           world_size=self.group.world_size, load_seconds=load_seconds,
                           read_seconds=self._resume.read_seconds, scheduler=self.job.scheduler,
                           **self._startup_fields(session_started))
        self._timeline.first_step_pending = True

    def _start_fresh(self, session_started: float) -> None:
        """No checkpoint yet: start at step 0, or from the user's own checkpoint (``init_from``)."""
        adopted = adopt.load(self.config.init_from, self.device, self.config.init_epoch) \
            if self.config.init_from else None
        if adopted is not None:
            self._resume = adopted
            self._adopted_path = adopted.path
            self.epoch, self.step = adopted.epoch, adopted.step
            self._resumed_step = self.step
            self._epochs_used = "epoch" in adopted.payload
            self.events.append("init_from", path=os.path.abspath(adopted.path), step=self.step, epoch=self.epoch,
                               epoch_is=adopted.epoch_is, keys=sorted(map(str, adopted.payload)))
        if self.group.rank == 0:
            log.info("no checkpoint in %s: starting run %s %s", self.config.directory, self.run_id,
                     f"from {adopted.path} at {self._where()}"
                     + (f" ({adopted.convention})" if adopted.convention else "") if adopted else "fresh")
        self.events.append("start", step=self.step, resumed_from=None, world_size=self.group.world_size,
                           scheduler=self.job.scheduler, **self._startup_fields(session_started))

    def _auto_interval(self) -> AutoInterval | None:
        """``save_every="auto"``: the interval, chosen once from the run's whole history (read here, not in
        the loop) by rank 0, which alone decides when a save is due (its vote reaches every rank)."""
        if self.config.save_every != "auto" or self.group.rank != 0:
            return None
        try:
            return AutoInterval(self.events.read(), log)
        except Exception as exc:  # the records are validated; a history that still fails must not stop the start
            log.warning("save_every=auto: the run's history in %s cannot be used (%s: %s); choosing from the "
                        "prior alone", self.events.path, type(exc).__name__, exc)
            return AutoInterval([], log)

    def _startup_fields(self, session_started: float) -> dict[str, Any]:
        """The start event's record of how this process got there (jobwrap._report.relaunch reads it)."""
        created = created_at()
        fields = {"process_started": None if created is None else round(created, 3),
                  "session_started": round(session_started, 3),
                  "init_seconds": round(self._timeline.init_seconds, 4)}
        if self.job.previous_exit is not None:
            fields["previous_exit"] = round(self.job.previous_exit, 3)
        return fields
