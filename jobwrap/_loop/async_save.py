"""Periodic saves in the background, and what a signal's save does about the one in flight.

The mechanics are in :mod:`jobwrap._storage.snapshot`: the training thread pauses only to
stage the state into reusable buffers, a thread writes and commits it. The
:class:`AsyncSaver` decides around them, at step boundaries: one save in flight
at a time (a save that comes due meanwhile is skipped), the staging buffers
reserved after the first step, the outcome collected at the next boundary (a
failure is raised there, never lost), and at a signal the save in flight settled
the fastest way that commits the newest state. It also keeps the measured save
speed, from which every save's fit in the grace window is estimated.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Mapping

import torch

from jobwrap._compat import torch_tensor as tensor_internals
from jobwrap._config import Config
from jobwrap._format import human_size
from jobwrap._loop.distributed import WRITER_BUSY, WRITER_DONE, WRITER_IDLE
from jobwrap._storage import deadline
from jobwrap._storage.snapshot import BackgroundSave, ChangedWhileCopied, StagingArea, check_unchanged, lower_priority
from jobwrap._storage.store import Checkpoint, CheckpointStore, SaveCancelled
from jobwrap.errors import CheckpointError, JobwrapError, StorageError

log = logging.getLogger("jobwrap")


class AsyncSaver:
    """One process's background saves, and the save speed measured on every save.

    What it reads of the session comes through the callables it is given:
    ``payload(ranks)`` (the state to save; ``ranks``: every rank's entry, gathered
    by rank 0, or None for this process's own), ``layout()`` (the same state's shape, to
    plan the buffers), ``fingerprint()``, ``meta(reason)``, ``last()`` (the
    newest committed checkpoint); ``committed(checkpoint, fingerprint)`` records a
    background save's commit, ``event(name, **fields)`` writes the run's history.
    """

    def __init__(self, store: CheckpointStore, config: Config, objects: Mapping[str, Any], *,
                 payload: Callable[[list[dict[str, Any]] | None], dict[str, Any]],
                 layout: Callable[[], dict[str, Any]],
                 fingerprint: Callable[[], Any], meta: Callable[[str], dict[str, Any]],
                 last: Callable[[], Checkpoint | None], committed: Callable[[Checkpoint, Any], None],
                 event: Callable[..., None], clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._objects = objects  # the session's tracked objects: the optimizers' CPU state may be copied lazily
        self._config = config  # read, never changed
        self.lazy_copy = config.lazy_copy  # turned off here for good once a lazy copy saw a change
        self._payload, self._layout, self._fingerprint, self._meta = payload, layout, fingerprint, meta
        self._last, self._committed, self._event = last, committed, event
        self._clock = clock
        self.background = BackgroundSave(clock)  # the periodic save in flight
        self.staging: StagingArea | None = None
        self.speed: float | None = None  # bytes/s of the recent saves, for the grace-window estimate
        self._fit_checked = False
        self._skipped = 0
        # Something for tend() at the next boundary: reserve the staging buffers, collect a save.
        self._tend = bool(config.async_save and (config.save_every_steps or config.save_every_seconds))
        self._in_flight_state: Any = None  # the fingerprint of the state being written
        self._copied: threading.Event | None = None  # set once the writer has copied the deferred tensors
        self.copy_wait = 0.0  # seconds optimizer.step() waited for that copy
        self._step_hooks: dict[int, Any] = {}

    # ------------------------------------------------------------ at a step boundary
    def start(self, reason: str, *, step: int, epoch: int, ranks: list[dict[str, Any]] | None = None) -> bool:
        """Copy the state into the staging buffers (the only pause) and write it on another thread.

        ``ranks``: every rank's entry, gathered by rank 0 (several ranks), else this process's own.
        False when no save started: the step is saved already or being written, or an older save
        is still in flight (this one is skipped).
        """
        background = self.background
        if background.busy:
            if background.finished or background.step is None:
                self.collect()  # a reservation still running: staging needs its buffers
            else:
                self.skip(step)
                return False
        last = self._last()
        if last is not None and last.step == step:
            return False
        started = self._clock()
        staging = self.staging = self.staging or StagingArea()
        defer, watched = self._deferrable() if self.lazy_copy and tensor_internals.has_versions() else (set(), [])
        payload = staging.stage(self._payload(ranks), defer=defer)
        self._in_flight_state = self._fingerprint()
        pause = self._clock() - started
        meta = {**self._meta(reason), "stage_seconds": round(pause, 6), "background": True}
        expected = deadline.estimate_seconds(staging.nbytes, self.speed)
        copied = self._copied = threading.Event()
        self.copy_wait = 0.0

        def work(cancel: Any) -> Checkpoint:
            try:
                staging.copy_deferred(cancel)  # at full priority: the next optimizer.step() may be waiting
                check_unchanged(watched)
            finally:
                copied.set()  # optimizer.step() may go on, also when the copy failed or was cancelled
            lower_priority()
            checkpoint = self.store.save(payload, step=step, epoch=epoch, meta=meta, cancel=cancel)
            self.store.retain(self._config.keep_last)
            return checkpoint

        background.submit(step, work, expected_seconds=expected)
        self._tend = True
        log.debug("step %d staged in %.3f s; writing in the background", step, pause)
        return True

    def skip(self, step: int) -> None:
        """A periodic save came due at ``step`` while one is in flight: it is skipped (said once)."""
        if self.background.step == step:
            return  # this step is being written already
        self._skipped += 1
        if self._skipped == 1:
            log.info("periodic save at step %d skipped: the save of step %d is still being written "
                     "(one save in flight at a time; save less often to save at every interval)",
                     step, self.background.step)

    def fail_later(self, step: int, error: Exception) -> None:
        """A save that failed before its write (staging): its failure is collected as a background one's.

        With several ranks only rank 0 stages; raised there at once, it would leave the other
        ranks waiting in the next collective. Collected at the next agreement, every rank hears it.
        """
        def failed(cancel: Any) -> None:
            raise error

        self.background.submit(step, failed)
        self._tend = True

    def writer_state(self) -> int:
        """What the ranks' agreement carries for rank 0: ``WRITER_DONE`` when an outcome waits to be
        collected (and shared), ``WRITER_BUSY`` while a save is written, else ``WRITER_IDLE``
        (a staging reservation in flight counts as idle: :meth:`start` waits for it)."""
        background = self.background
        if not background.busy or background.step is None:
            return WRITER_IDLE
        return WRITER_DONE if background.finished else WRITER_BUSY

    def tend(self, *, step: int, may_reserve: bool, collect: bool = True) -> None:
        """Collect a finished background save; after the first step (``may_reserve``), reserve the buffers.

        ``collect=False`` (several ranks): a save's outcome is left for the ranks' agreement, which
        shares it; only a finished reservation is collected here.
        """
        if not self._tend:
            return
        if self.background.busy:
            if self.background.finished and (collect or self.background.step is None):
                self.collect()
            return
        if self.staging is None and may_reserve:
            self._reserve_staging()
            return
        self._tend = False

    def _deferrable(self) -> tuple[set[Any], list[tuple[torch.Tensor, int]]]:
        """Storages only a tracked optimizer's step() changes (its CPU parameters and state), and
        those tensors with their version counters, to prove afterwards that nothing else changed them.

        Their copy runs on the writer thread while the next step computes;
        a hook holds the optimizer's next step() until it is done.
        """
        found: set[Any] = set()
        watched: list[tuple[torch.Tensor, int]] = []
        for obj in self._objects.values():
            if not isinstance(obj, torch.optim.Optimizer):
                continue
            tensors = [p for group in obj.param_groups for p in group["params"]]
            tensors += [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
            cpu = [t for t in tensors if t.device.type == "cpu"]
            if cpu and id(obj) not in self._step_hooks:
                self._step_hooks[id(obj)] = obj.register_step_pre_hook(self._before_optimizer_step)
            found |= {tensor_internals.storage_key(t.untyped_storage()) for t in cpu}
            watched += [(t, tensor_internals.version(t)) for t in cpu]
        return found, watched

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        copied = self._copied
        if copied is not None and not copied.is_set():
            started = self._clock()
            copied.wait()
            self.copy_wait += self._clock() - started

    def _reserve_staging(self) -> None:
        """Allocate the staging buffers on the writer thread, so that no periodic save pays for new memory.

        After a step, the optimizer's state exists: the payload's layout is known.
        """
        staging = self.staging = StagingArea()
        try:
            sizes = staging.plan(self._layout())
        except Exception as exc:  # with several ranks, raised here on rank 0 alone it would strand the others
            log.debug("staging buffers not reserved (%s); the first save allocates them and reports any failure", exc)
            return
        self.background.submit(None, lambda cancel: lower_priority() or staging.reserve(sizes, cancel))

    # ------------------------------------------------------------ the outcome
    def collect(self, *, raise_errors: bool = True) -> Checkpoint | None:
        """Take the outcome of the background save (waiting for it): record a commit, raise (or log) a failure."""
        step = self.background.step
        checkpoint, error = self.background.collect()
        if step is None:  # the staging reservation: on failure, the first save allocates instead
            if error is not None and not isinstance(error, SaveCancelled):
                log.warning("could not reserve the staging buffers (%s); the first save allocates them", error)
            return None
        if isinstance(error, SaveCancelled):
            log.info("background save of step %s cancelled: a newer save supersedes it", step)
            return None
        if isinstance(error, ChangedWhileCopied):
            self.lazy_copy = False
            log.warning("background save of step %s dropped: %s. From now on periodic saves copy everything "
                        "during the pause (lazy_copy=False); set JOBWRAP_LAZY_COPY=0 to start that way", step, error)
            self._event("save-dropped", step=step, reason=str(error))
            return None
        if error is not None:
            self._event("save-failed", step=step, reason="periodic", error=f"{type(error).__name__}: {error}")
            if isinstance(error, StorageError):
                failure: JobwrapError = StorageError(error.errno, f"background save of step {step} failed: {error}")
            else:
                failure = CheckpointError(f"background save of step {step} failed: {type(error).__name__}: {error}")
            if raise_errors and not (isinstance(error, StorageError) and self._config.on_save_error == "continue"):
                raise failure from error
            log.error("%s", failure)
            return None
        seconds = float(checkpoint.manifest.get("save_seconds") or 0.0)
        pause = float(checkpoint.manifest.get("stage_seconds") or 0.0) + self.copy_wait
        log.info("saved step %d (epoch %d, %s, in the background) to %s: %s in %.2f s; training paused %.3f s",
                 checkpoint.step, checkpoint.epoch, checkpoint.manifest.get("reason"),
                 os.path.basename(checkpoint.path), human_size(checkpoint.size), seconds, pause)
        self._event("save", step=checkpoint.step, epoch=checkpoint.epoch, bytes=checkpoint.size,
                    seconds=round(seconds, 4), path=checkpoint.path, reason=checkpoint.manifest.get("reason"),
                    background=True, pause=round(pause, 6))
        self._committed(checkpoint, self._in_flight_state)
        self.note_saved(checkpoint, warn=True)
        return checkpoint

    def settle(self, reason: str, *, step: int, signal_at: float | None, end_time: float | None) -> None:
        """Before a signal's save: settle the save in flight the fastest way that commits the newest state."""
        left = deadline.grace_left(signal_at=signal_at, now=self._clock(), grace_seconds=self._config.grace_seconds,
                                   end_time=end_time, wall_now=time.time())
        last = self._last()
        size = deadline.checkpoint_bytes(last.manifest) if last else None
        fresh = deadline.estimate_seconds(size or (self.staging.nbytes if self.staging else None), self.speed)
        background = self.background
        if background.busy and (background.finished or background.step is None):
            background.cancel()  # done already, or only reserving buffers
            self.collect(raise_errors=False)
        elif background.busy:
            plan = deadline.emergency_plan(in_flight_step=background.step or -1, step=step,
                                           remaining=background.remaining_seconds(), fresh=fresh, left=left)
            log.info("%s: the background save of step %s is in flight: %s", reason, background.step,
                     {"wait": "it is this step, waiting for it", "supersede": "cancelling it, saving this step now",
                      "wait-then-save": "it commits sooner, waiting for it, then saving this step"}[plan])
            if plan == "supersede":
                background.cancel()
            self.collect(raise_errors=False)  # its failure is logged; this save is what counts
        if left is not None and fresh is not None and fresh > left:
            log.warning("%s: the save needs about %.1f s and %.1f s are left before the kill; trying anyway "
                        "(the previous checkpoint stays intact if it is cut off)", reason, fresh, left)

    def close(self, exc: BaseException | None) -> BaseException | None:
        """At the session's close: let a save in flight commit; its failure is returned when nothing else failed."""
        for hook in self._step_hooks.values():
            hook.remove()
        self._step_hooks.clear()
        if not self.background.busy:
            return None
        if self.background.step is None:
            self.background.cancel()  # only reserving buffers
        elif not self.background.finished:
            log.info("waiting for the background save of step %s to commit", self.background.step)
        try:
            self.collect(raise_errors=exc is None)
        except JobwrapError as failure:
            return failure
        return None

    # ------------------------------------------------------------ save speed and the grace window
    def note_saved(self, checkpoint: Checkpoint, *, warn: bool) -> None:
        """Record the measured save speed; after the first save, warn (``warn``: rank 0) if a save would
        not fit the grace window."""
        speed = deadline.measured_speed([checkpoint.manifest])
        if speed is not None:
            self.speed = speed
        if not self._fit_checked:
            self.check_fit(checkpoint, [checkpoint], warn=warn)

    def check_fit(self, checkpoint: Checkpoint, measured: list[Checkpoint], *, warn: bool) -> None:
        """Warn once when a checkpoint of this size, at the measured speed, would outlast the grace window."""
        speed = deadline.measured_speed(c.manifest for c in measured)
        if speed is None or not warn:
            return
        self.speed = speed
        self._fit_checked = True
        warning = deadline.fit_warning(nbytes=deadline.checkpoint_bytes(checkpoint.manifest),
                                       bytes_per_second=speed, grace_seconds=self._config.grace_seconds)
        if warning:
            log.warning("%s", warning)
