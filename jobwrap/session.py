"""The orchestrator a training loop talks to: resume, step boundaries, saves, requeue, exit.

The flow, top to bottom::

    start()      trap signals, claim the directory, load the newest verified checkpoint
    track()      register models/optimizers/... and extras; each is restored at once
    epochs()     yields epoch numbers from where the run stopped
    loader()     yields batches from where the run stopped; each batch ends at a step boundary
    _boundary()  a signal arrived? -> save, requeue (or not), raise Preempted
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from jobwrap import __version__, deadline, progress, sharded
from jobwrap.config import Config, load_config
from jobwrap.data import ResumableLoader
from jobwrap.devices import resume_device
from jobwrap.distributed import NO_STOP, STOP_EXIT, STOP_REQUEUE, Solo, join
from jobwrap.env import JobEnv, default_run_id, read_env
from jobwrap.errors import (CheckpointError, ConfigError, CorruptCheckpointError, JobwrapError, StateMismatchError,
                            StorageError)
from jobwrap.events import EventLog
from jobwrap.format import human_size
from jobwrap.interval import AutoInterval
from jobwrap.lock import DirectoryLock
from jobwrap.pids import alive, start_time
from jobwrap.schedulers import Scheduler, scheduler_for
from jobwrap.stopping import EXIT, REQUEUE, Limits, Stop, decide_stop
from jobwrap.signals import SignalTrap
from jobwrap.state import (RESERVED_KEYS, GradRecord, capture_rng, fingerprint, grad_owners, is_stateful, load_into,
                           pending_grads, plain, record_step, restore_grads, restore_rng)
from jobwrap.snapshot import BackgroundSave, ChangedWhileCopied, StagingArea, check_unchanged, lower_priority
from jobwrap.store import FORMAT_VERSION, Checkpoint, CheckpointStore, SaveCancelled, folder_name, parse_name
from jobwrap.workers import guard_dataloader_workers

log = logging.getLogger("jobwrap")

T = TypeVar("T")


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


def _ensure_log_handler() -> None:
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
    (the rule: :func:`jobwrap.devices.resume_device`)."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = resume_device(local_rank=job.local_rank, cuda_devices=cuda_devices, configured=configured)
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} (JOBWRAP_DEVICE or device=) is not a torch device ({exc}): "
                          f"set it to e.g. cpu or cuda:0, or unset it") from exc


class Session:
    """One process's view of a preemptible run. Use as a context manager (or :func:`preemptible`)."""

    def __init__(self, directory: str | os.PathLike | None = None, *,
                 environ: dict[str, str] | None = None, **settings: Any) -> None:
        self.config: Config = load_config(environ, directory=directory, **settings)
        self.job: JobEnv = read_env(environ)
        self.store = CheckpointStore(self.config.directory, file_mode=self.config.file_mode)
        self.scheduler: Scheduler = scheduler_for(self.job,
                                                  despite_exit_signals=self.config.requeue_on_exit_signals)
        self.device = default_device(self.job, self.config.device)
        self.epoch = 0
        self.step = 0
        self.position = 0
        self.extras: dict[str, Any] = {}
        self.resumed_from: Checkpoint | None = None
        self.last_checkpoint: Checkpoint | None = None
        self._saved_fingerprint: Any = None  # the state last_checkpoint holds (None: unknown, save again)
        self._background_fingerprint: Any = None  # the state of the background save in flight
        self._in_batch = False  # between the loader yielding a batch and the end of the loop's body
        self.run_id = ""
        self._objects: dict[str, Any] = {}
        self._sharded: list[str] = []  # tracked names saved through torch.distributed.checkpoint (FSDP)
        self._loader: ResumableLoader | None = None
        self._trap = SignalTrap(self.config.requeue_signals + self.config.exit_signals,
                                registry=self.job.trainers_dir)
        self._pending: dict[str, Any] | None = None
        self._resume_data: dict[str, Any] | None = None  # the loader's position state, until a loader takes it
        self._resumed_step = -1
        self._rng_warned = False
        self._last_save_time = time.monotonic()
        self._auto: AutoInterval | None = None  # save_every="auto": the interval from this run's measurements
        self._started = False
        self.group: Solo = Solo()
        self._background = BackgroundSave()  # the periodic save in flight (async_save)
        self._staging: StagingArea | None = None
        self._save_speed: float | None = None  # bytes/s of the recent saves, for the grace-window estimate
        self._fit_checked = False
        self._skipped_saves = 0
        # Something for _tend_background at the next boundary: reserve the staging buffers, collect a save.
        self._tend = bool(self.config.async_save and (self.config.save_every_steps or self.config.save_every_seconds))
        self._copied: Any = None  # threading.Event: set once the writer has copied the deferred tensors
        self._copy_wait = 0.0     # seconds optimizer.step() waited for that copy
        self._step_hooks: dict[int, Any] = {}
        self._grad_hooks: list[Any] = []  # optimizers' step post-hooks: which gradients a step consumed
        self._stepped: GradRecord = {}
        # Boundaries after a step left at which sharded models are checked for accumulated gradients: accumulation
        # shows at the first boundary (a micro-batch without a step), and walking every parameter at
        # every step would tax the loop; saves still check.
        self._sharded_grad_checks = 2
        self._resume_grads: dict[str, Any] = {}  # gradients saved between optimizer steps, until tracked
        self._lock: DirectoryLock | None = None  # rank 0's hold on the directory
        self._supervisor: tuple[int, float] | None = None  # (pid, start time) of the `jobwrap run` not to outlive
        self._orphaned = False
        self._next_watch = 0.0
        self._unguard_workers: Callable[[], None] = lambda: None
        self._read_seconds = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Session":
        """Trap signals, claim the directory and load the newest verified checkpoint."""
        if self._started:
            return self
        self._started = True
        _ensure_log_handler()
        # Trap first, so a signal that arrives while resuming is honoured right after.
        self._trap.install()
        # Watched only when seen alive now: in another PID namespace (a container) it would look gone.
        if self.job.supervisor is not None and alive(*self.job.supervisor):
            self._supervisor = self.job.supervisor
        self._unguard_workers = guard_dataloader_workers(self._trap.signals)
        try:
            self.group = join()
            opened = time.monotonic()
            found = self._open_directory()
            load_seconds = round(time.monotonic() - opened, 4)
        except BaseException:
            self._trap.restore()
            self._release_directory()
            self._unguard_workers()
            self._started = False
            raise
        if found is None:
            if self.group.rank == 0:
                log.info("no checkpoint in %s: starting run %s fresh", self.config.directory, self.run_id)
            self.events.append("start", step=0, resumed_from=None, world_size=self.group.world_size,
                               scheduler=self.job.scheduler, process_started=start_time(os.getpid()))
            return self
        checkpoint, payload = found
        self.resumed_from = self.last_checkpoint = checkpoint
        self._pending = payload
        mine = self._my_rank_state(payload, checkpoint)
        self._resume_data = mine.get("data") or None
        self._resume_grads = mine.get("grads") or {}
        self.epoch, self.step = int(payload["epoch"]), int(payload["step"])
        self.position = int(payload["jobwrap"].get("position", 0))
        self._resumed_step = self.step
        self._check_fit(checkpoint, self.store.committed())
        if self.group.rank == 0:
            log.info("resumed from %s: step %d, epoch %d, run %s (saved by restart %s, this is restart %d)",
                     os.path.basename(checkpoint.path), self.step, self.epoch, checkpoint.run_id,
                     checkpoint.manifest.get("restart_count"), self.job.restart_count)
        self.events.append("start", step=self.step, epoch=self.epoch, resumed_from=checkpoint.path,
                           world_size=self.group.world_size, load_seconds=load_seconds,
                           read_seconds=self._read_seconds, scheduler=self.job.scheduler,
                           process_started=start_time(os.getpid()))
        return self

    def _open_directory(self) -> tuple[Checkpoint, dict[str, Any]] | None:
        """Rank 0 claims the directory and picks the newest verified checkpoint; every rank loads it."""
        decision: dict[str, Any] = {}
        if self.group.rank == 0:
            try:
                self.store.ensure_directory()
                self._hold_directory()  # before prepare(): its cleanup would delete a live trainer's temporaries
                self.store.prepare()
                run_id, lineage = self.store.claim(self.config.run_id or default_run_id(self.job),
                                                   adopt=self.config.adopt)
                self._open_events(run_id)
                with progress.loading(self.store):
                    found = self.store.newest_loadable(self._load_verified, lineage=lineage, verify=False)
                decision = {"run_id": run_id, "step": found[0].step if found else None,
                            "serial": found[0].serial if found else 0}
            except BaseException as exc:  # any failure: the other ranks wait for the decision
                self.group.broadcast({"error": f"{type(exc).__name__}: {exc}"})
                raise
            self.group.broadcast(decision)
            return found
        decision = self.group.broadcast(None)
        if "error" in decision:
            raise JobwrapError(f"rank 0 could not open the checkpoint directory: {decision['error']}")
        self._open_events(decision["run_id"])
        if decision["step"] is None:
            return None
        checkpoint = next(c for c in self.store.committed() if c.key == (decision["step"], decision["serial"]))
        return checkpoint, self._load(checkpoint)  # rank 0 verified it

    def _hold_directory(self) -> None:
        self._lock = DirectoryLock(self.store.directory, job_id=self.job.job_id, restart=self.job.restart_count,
                                   timeout=self.config.lock_timeout, break_lock=self.config.break_lock,
                                   file_mode=self.config.file_mode)
        self._lock.acquire()

    def _release_directory(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _open_events(self, run_id: str) -> None:
        self.run_id = run_id
        self.events = EventLog(self.config.directory, file_mode=self.config.file_mode,
                               enabled=self.group.rank == 0,
                               run_id=run_id, restart=self.job.restart_count, job_id=self.job.job_id)

    def _my_rank_state(self, payload: dict[str, Any], checkpoint: Checkpoint) -> dict[str, Any]:
        ranks = payload["jobwrap"]["ranks"]
        here = self.group.world_size
        if len(ranks) != here and payload["jobwrap"].get("dcp"):
            # Sharded state reshards exactly, and a job requeued onto fewer (or more) nodes is expected to
            # go on; only the per-rank streams are approximate, so say so instead of refusing.
            if self.group.rank == 0:
                log.warning("resuming %d-rank checkpoint with %d ranks: the sharded model and optimizer state are "
                            "resharded exactly; per-rank RNG streams and data order are not bit-exact "
                            "(rank r continues the streams of saved rank r mod %d)", len(ranks), here, len(ranks))
        elif len(ranks) != here:
            if not self.config.allow_world_size_change:
                raise StateMismatchError(
                    f"{os.path.basename(checkpoint.path)} was saved by {len(ranks)} rank(s), this job has {here}: "
                    f"each rank's RNG streams and data order cannot be mapped exactly. Resume with {len(ranks)} "
                    f"rank(s), or set JOBWRAP_ALLOW_WORLD_SIZE_CHANGE=1 to accept a resume that is not bit-exact.")
            log.warning("resuming %d-rank checkpoint with %d ranks: not bit-exact (allow_world_size_change)",
                        len(ranks), here)
        return ranks[self.group.rank % len(ranks)]

    def close(self, exc: BaseException | None = None) -> None:
        """Restore the previous signal handlers and record how the process ended."""
        if not self._started:
            return
        failure = self._finish_background(exc)
        exc = exc or failure
        self._trap.restore()
        self._unguard_workers()
        # Every rank leaves together after a finished run or a Preempted; after an error some may not come.
        self.group.close(clean=exc is None or isinstance(exc, Preempted))
        self._started = False
        if isinstance(exc, Preempted):
            self.events.append("exit", code=exc.code, reason=exc.reason, step=self.step)
        elif exc is not None:
            self.events.append("exit", code=1, reason=f"{type(exc).__name__}: {exc}", step=self.step)
        else:
            if self._trap.received:
                log.info("%s arrived after training ended; nothing left to checkpoint or requeue",
                         self._trap.first.name)
            self.events.append("exit", code=0, reason="finished", step=self.step)
        self._release_directory()
        if failure is not None:
            raise failure

    def __enter__(self) -> "Session":
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.close(exc)

    # ------------------------------------------------------------ registration
    def track(self, **things: Any) -> "Session":
        """Register what a checkpoint holds and restore it from the loaded checkpoint, if any.

        Objects with ``state_dict``/``load_state_dict`` (models, optimizers, LR
        schedulers, GradScaler, ...) are saved by their state dict; anything
        else is an extra (``best_loss=float("inf")``), read and written as
        ``session["best_loss"]``.
        """
        self.start()
        in_folder = (self._pending or {}).get("jobwrap", {}).get("dcp", {}).get("objects", [])
        from_folder = []
        for name, obj in things.items():
            if name in RESERVED_KEYS or name in self._objects or name in self.extras:
                raise ConfigError(f"cannot track {name!r}: the name is reserved or already tracked; pick another")
            if is_stateful(obj):
                self._objects[name] = obj
                if isinstance(obj, torch.optim.Optimizer):
                    self._grad_hooks.append(obj.register_step_post_hook(self._after_optimizer_step))
                if self._pending is not None:
                    if name in self._pending:
                        load_into(name, obj, self._pending[name])
                    elif name in in_folder:
                        from_folder.append(name)
                    else:
                        log.warning("checkpoint has no %r; it starts from its initial state", name)
            else:
                value = plain(obj, name)
                if self._pending is not None and name in self._pending:
                    value = self._pending[name]
                self.extras[name] = value
        self._sharded = sharded.sharded_names(self._objects)
        if from_folder:
            self._load_shards(from_folder)
        self._restore_grads(things)
        if self._pending is not None:
            self._restore_rng()  # loops with only step_done() have no boundary before their first step
        if self._trap.received and self.resumed_from is not None and self.group.world_size == 1:
            # A signal that came while resuming: stop now, the state is the checkpoint's. With several
            # ranks the stop is a collective that only this rank would enter here (the others may be in
            # one of their own, building DDP): the first boundary, which every rank reaches, stops them all.
            self._boundary()
        return self

    def _restore_grads(self, things: dict[str, Any]) -> None:
        """Gradients the checkpoint holds (saved between optimizer steps) back into ``.grad``."""
        owners = grad_owners(self._objects)
        for name in things:
            grads = self._resume_grads.pop(name, None)
            if grads:
                restore_grads(name, owners.get(name, {}), grads)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        record_step(optimizer, self._stepped)

    def _pending_grads(self) -> dict[str, Any]:
        """Gradients produced since the last optimizer step: at a boundary between micro-batches of
        gradient accumulation they are part of the state."""
        return pending_grads(grad_owners(self._objects), self._stepped)

    def _grads_to_save(self) -> dict[str, Any]:
        """``{"grads": ...}`` for this rank's checkpoint entry, or nothing in the common case (no
        gradient since the last ``optimizer.step()``)."""
        grads = self._pending_grads()
        if not grads:
            return {}
        self._refuse_sharded_grads(grads)
        if self.group.world_size > 1:  # gathered to rank 0 as objects: off the GPU, each rank its own
            grads = {name: {k: g.detach().cpu() for k, g in part.items()} for name, part in grads.items()}
        return {"grads": grads}

    def _refuse_sharded_grads(self, grads: dict[str, Any]) -> None:
        """Sharded gradients between optimizer steps cannot be checkpointed: refused at the first boundary
        that has them, early in the run, rather than at the signal's save, which would lose the work."""
        unsaveable = [name for name in grads if name in self._sharded]
        if unsaveable:
            raise ConfigError(
                f"step boundary {self.step}: gradients accumulated since the last optimizer.step() are pending in "
                f"{', '.join(unsaveable)} (sharded), and jobwrap cannot checkpoint sharded (FSDP) gradients. "
                f"Stop at optimizer steps: call job.step_done() only after optimizer.step(), in a loop over the "
                f"loader itself (job.loader() makes every batch, every micro-batch, a step boundary)")

    def __getitem__(self, name: str) -> Any:
        return self.extras[name]

    def __setitem__(self, name: str, value: Any) -> None:
        """Set a tracked extra; checked now, so that a value no checkpoint can hold fails here, not at the signal.

        Only names passed to :meth:`track` are accepted: there the initial value
        and the restored one are told apart; a name first set here would be
        saved but could not be restored before the script reads it.
        """
        if name not in self.extras:
            raise ConfigError(
                f"extra {name!r} is not tracked: declare it with job.track({name}=<initial value>) before setting "
                f"job[{name!r}], so that a resumed run restores it (an extra set only by job[...] is not restored)")
        self.extras[name] = plain(value, name)

    def loader(self, iterable: Iterable[T]) -> ResumableLoader[T]:
        """Wrap the training loader: each batch ends at a step boundary; resumes mid-epoch exactly."""
        self.start()
        if self._loader is None or self._loader.iterable is not iterable:
            if self._loader is not None and self._loader.ran_in_epoch == self.epoch:
                raise ConfigError(
                    "job.loader() got another loader in the epoch in which the training loader ran: it wraps the "
                    "training loader only, whose batches are the steps. Iterate a validation loader directly "
                    "(for batch in val_loader) instead; its draws from the RNG are checkpointed with the rest.")
            self._loader = ResumableLoader(self, iterable)
            if self._resume_data is not None:
                self._loader.load_state_dict(self._resume_data)
                self._resume_data = None
        return self._loader

    def epochs(self, total: int) -> Iterator[int]:
        """Epoch numbers from the resumed one to ``total - 1``; commits a final checkpoint at the end."""
        self.start()
        while self.epoch < total:
            self._boundary()
            yield self.epoch
            self.epoch += 1
            self.position = 0
        self._boundary()
        if self.config.save_at_end:
            self.save(reason="end of training")

    # ------------------------------------------------------------ step boundary
    def step_done(self) -> None:
        """Explicit step boundary for loops that do not use :meth:`loader`: call after each step."""
        if self._pending is not None:
            self._finish_resume(after_step=True)
        self._step_done()
        self._boundary()

    @property
    def should_stop(self) -> bool:
        """True once a trapped signal arrived (the next boundary will checkpoint and stop)."""
        return bool(self._trap.received) or self._orphaned

    def _step_done(self) -> None:
        self.step += 1
        self.position += 1

    def _batch_started(self) -> None:
        """The loader handed out a batch: the loop's body trains on it now."""
        self._in_batch = True

    def _batch_left(self) -> None:
        """The loop broke off with its batch: nothing counts it (a save() in the body already did)."""
        self._in_batch = False

    def _batch_finished(self) -> None:
        """The body is done with its batch: count it, unless a save() inside the body counted it already."""
        if self._in_batch:
            self._in_batch = False
            self._step_done()

    def _boundary(self) -> None:
        if self._pending is not None:
            self._finish_resume()
        if self._supervisor is not None:
            self._watch_supervisor()
        if self.config.test_hold_at and self.step in self.config.test_hold_at:
            self._hold_for_test()
        if self._sharded and self._sharded_grad_checks and self.step > max(self._resumed_step, 0):
            self._sharded_grad_checks -= 1
            self._refuse_sharded_grads(self._pending_grads())
        if self.group.world_size == 1:
            if self._trap.received or self._orphaned:
                self._stop(self._local_stop_request())
            if self._tend:
                self._tend_background()
            if self._periodic_save_due():
                self._periodic_save()
            return
        if self.step % self.config.sync_every_steps:
            return
        stop, save_due = self.group.agree(self._local_stop_request(), self._periodic_save_due())
        if stop != NO_STOP:
            self._stop(stop)
        if save_due:
            self._periodic_save()

    def _local_stop_request(self) -> int:
        """The strongest stop this process was asked for: a cancel (an exit signal) beats a requeue,
        whichever came first (USR1 warns of the time limit, then a user's scancel sends TERM)."""
        if self._exit_signal() is not None or self._orphaned:
            return STOP_EXIT
        return STOP_REQUEUE if self._trap.received else NO_STOP

    def _watch_supervisor(self) -> None:
        """At most once a second: a `jobwrap run` that is gone (SIGKILLed) leaves nobody to relaunch or stop
        this process (torchrun's workers, a shell's child), so it stops as on a cancel."""
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + 1.0
        if not alive(*self._supervisor):
            log.warning("jobwrap run (pid %d) is gone: checkpointing and exiting", self._supervisor[0])
            self._supervisor = None
            self._orphaned = True

    def _exit_signal(self) -> signal.Signals | None:
        """The first exit signal received, unless exit signals requeue too (``requeue_on_exit_signals``)."""
        if self.config.requeue_on_exit_signals:
            return None
        return next((sig for sig, _ in list(self._trap.received) if sig in self.config.exit_signals), None)

    def _restore_rng(self) -> None:
        meta = self._pending["jobwrap"]
        warning = restore_rng(meta["ranks"][self.group.rank % len(meta["ranks"])]["rng"], self.device)
        if warning and not self._rng_warned:
            self._rng_warned = True  # restored twice per resume (track, first boundary): say it once
            log.warning("%s", warning)

    def _finish_resume(self, *, after_step: bool = False) -> None:
        """Restore the RNG streams (again: setup code after track() may have drawn) and free the payload.

        ``after_step``: the first boundary came from step_done(), after a step
        that already drew from the streams track() restored; leave them.
        """
        if not after_step:
            self._restore_rng()
            self._saved_fingerprint = self._fingerprint()  # the state is the checkpoint's, until the next step
        payload, self._pending = self._pending, None
        meta = payload["jobwrap"]
        untracked = [n for n in meta.get("objects", []) + meta.get("extras", [])
                     if n not in self._objects and n not in self.extras]
        if untracked:
            log.warning("checkpoint entries %s were not tracked in this run and are ignored", untracked)

    def _periodic_save_due(self) -> bool:
        cfg = self.config
        if self.last_checkpoint is not None and self.last_checkpoint.step == self.step:
            return False
        if cfg.save_every == "auto":
            self._auto = self._auto or AutoInterval(self.events.read(), log if self.group.rank == 0 else None)
            return self._auto.due(time.monotonic() - self._last_save_time, self.last_checkpoint)
        if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 and self.step > 0:
            return True
        return bool(cfg.save_every_seconds and
                    time.monotonic() - self._last_save_time >= cfg.save_every_seconds)

    def _periodic_save(self) -> None:
        try:
            if self.config.async_save and self.group.world_size == 1 and not self._sharded:
                self._save_in_background(reason="periodic")
            else:
                self.save(reason="periodic")
        except StorageError as exc:
            if self.config.on_save_error == "raise":
                raise
            log.error("periodic save failed, training continues (on_save_error=continue): %s", exc)
            self._last_save_time = time.monotonic()

    def _stop(self, request: int) -> None:
        """Every rank arrives here at the same step: commit, then rank 0 decides the exit and requeue."""
        sig = self._trap.first
        name = sig.name if sig is not None else ("jobwrap run gone" if self._orphaned else "another rank's signal")
        delay = None
        if sig is not None:
            delay = time.monotonic() - (self._trap.first_time or time.monotonic())
            log.info("%s received %.2f s ago: checkpointing at step %d (epoch %d)", name, delay,
                     self.step, self.epoch)
        self.events.append("signal", signal=name, step=self.step, epoch=self.epoch,
                           delay=None if delay is None else round(delay, 4))
        checkpoint = self._save_before_exit(f"signal {name}")
        # Decided after the save, from every signal received by now on any rank: a TERM (scancel)
        # that came during the save still makes the stop a cancel instead of a requeue.
        settled, _ = self.group.agree(max(request, self._local_stop_request()), False)
        if settled == STOP_EXIT:
            sig = self._exit_signal() or signal.SIGTERM
            if settled != request:
                log.info("%s arrived during the save: the job is cancelled, not requeued", sig.name)
        decision = self.group.broadcast(self._exit_decision(settled, sig, checkpoint)
                                        if self.group.rank == 0 else None)
        code, requeued, reason = decision
        raise Preempted(code, signal=sig or signal.SIGTERM, checkpoint=checkpoint, requeued=requeued,
                        reason=reason)

    def _exit_decision(self, request: int, sig: signal.Signals | None,
                       checkpoint: Checkpoint) -> tuple[int, bool, str]:
        """(exit code, requeued, reason), decided by rank 0 alone; it runs the one requeue."""
        progressed = checkpoint.key > (self.resumed_from.key if self.resumed_from else (-1, 0))
        history = tuple(bool(e.get("progress")) for e in self.events.read() if e["event"] in ("requeue", "stop"))
        stop = Stop(EXIT if request == STOP_EXIT else REQUEUE, sig, restart_count=self.job.restart_count,
                    progressed=progressed, history=history)
        decision = decide_stop(stop, Limits(self.config.max_requeues, self.config.max_no_progress))
        if not decision.requeue:
            (log.info if stop.request == EXIT else log.error)("%s", decision.reason)
            self.events.append("stop", step=self.step, progress=progressed, requeue=False, reason=decision.cause)
            return decision.exit_code, False, decision.reason
        code = self.scheduler.requeue()
        self.events.append("requeue", step=self.step, progress=progressed, exit_code=code,
                           scheduler=self.scheduler.name)
        return code, True, f"{decision.reason} ({self.scheduler.name})"

    def _hold_for_test(self) -> None:
        """jobwrap.testing: wait (bounded) at this step until the test's signal is here or the test releases us."""
        control = self.config.test_control
        done = os.path.join(control or "", f"done-{self.step}")
        if not control or os.path.exists(done):
            return
        rank = self.group.rank
        with open(os.path.join(control, f"held-{self.step}-r{rank}"), "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 60
        seen = 0
        while time.monotonic() < deadline:
            # Held until the test lets go, so that each signal it sends (USR1, then TERM) lands here.
            if self._trap.wait(0.01) and len(self._trap.received) > seen:  # not event.wait(): see SignalTrap.wait
                seen = len(self._trap.received)
                names = " ".join(dict.fromkeys(sig.name for sig, _ in self._trap.received[:seen]))
                got = os.path.join(control, f"got-{self.step}-r{rank}")
                with open(got + ".tmp", "w") as f:
                    f.write(names)
                os.replace(got + ".tmp", got)
            if os.path.exists(done):
                return
        log.warning("test hold at step %d: not released within 60 s, continuing", self.step)

    # ------------------------------------------------------------ save / load
    def save(self, *, reason: str = "manual") -> Checkpoint:
        """Commit a checkpoint of the current state now (skipped only if the last checkpoint holds this state).

        Inside the body of ``for batch in job.loader(...)``, call it after
        ``optimizer.step()``: the batch counts as trained. A save at a step
        that is committed already writes a new checkpoint (the next serial)
        when anything changed since: the epoch, the position, an extra, a
        tracked object (end-of-epoch code such as ``scheduler.step()``), the RNG.
        With several ranks every rank must call it (the step boundary does):
        rank 0 writes, with every rank's RNG and data state, and all ranks
        return only once the checkpoint is committed.
        """
        self.start()
        if self._in_batch:
            self._batch_finished()
        if self._background.busy:
            self._collect_background()  # a save in flight commits first (or its failure is raised)
        if (self.last_checkpoint is not None and self.last_checkpoint.step == self.step
                and not self._moved_since_save()):
            return self.last_checkpoint
        state = self._fingerprint()
        ranks = self.group.gather(self._saved_rank_state())
        if self._sharded:
            outcome = self._commit_sharded(ranks, reason)
        else:
            outcome = self._commit(lambda: self._write(ranks, reason))
        self.last_checkpoint = outcome
        self._saved_fingerprint = state
        self._last_save_time = time.monotonic()
        self._note_saved(outcome)
        return outcome

    def _fingerprint(self) -> Any:
        """What makes the state, cheaply (no tensor is read): compared to tell whether a save is needed.

        A tracked object whose ``state_dict()`` fails makes it a value equal to
        nothing: the save goes ahead, and the failure surfaces in the write,
        where every rank hears of it (raised here, one rank would leave the
        others waiting in the save's collectives).
        """
        try:
            return (self.epoch, self.step, self.position, fingerprint(self._objects),
                    fingerprint(self.extras, by_content=True),
                    fingerprint(self._rank_state(), by_content=True), fingerprint(self._pending_grads()))
        except Exception:
            return object()

    def _moved_since_save(self) -> bool:
        """Whether the state moved on since the last checkpoint without a step (every rank agrees)."""
        moved = self._saved_fingerprint is None or self._fingerprint() != self._saved_fingerprint
        if self.group.world_size > 1:
            moved = self.group.agree(NO_STOP, moved)[1]
        return moved

    def _commit(self, write: Callable[[], Any]) -> Any:
        """Rank 0 runs ``write``; every rank returns its checkpoint or raises its error."""
        outcome: Any = None
        if self.group.rank == 0:
            try:
                outcome = write()
            except BaseException as exc:  # any failure: the other ranks wait in the broadcast below
                self.group.broadcast(_shareable(exc))
                raise
        outcome = self.group.broadcast(outcome)
        if isinstance(outcome, StorageError):
            raise StorageError(outcome.errno, f"rank 0 could not save: {outcome}")
        if isinstance(outcome, CheckpointError):
            raise CheckpointError(f"rank 0 could not save: {outcome}")
        return outcome

    def _commit_sharded(self, ranks: list[dict[str, Any]], reason: str) -> Checkpoint:
        """Every rank writes its shards; only once all are durable does rank 0 write the .pt and commit.

        The manifest stays the commit marker: a kill before it leaves a folder
        that resume ignores and the next start removes.
        """
        started = time.monotonic()
        folder = self._commit(self._claim_folder)
        serial = parse_name(os.path.basename(folder))[1]
        try:
            files = sharded.write(sharded.state_dicts(self._objects, self._sharded), folder,
                                  getattr(self.group, "group", None))
            # DCP's coordinator, rank 0, wrote the folder's .metadata after every rank's data.
            written: Any = sharded.describe(folder, files + ([sharded.METADATA] if self.group.rank == 0 else []))
        except sharded.errors() as exc:  # gathered below, so that every rank raises instead of some hanging
            written = sharded.failure(exc)
        parts = self.group.gather(written)
        return self._commit(lambda: self._write_sealed(ranks, reason, parts, started, serial))

    def _claim_folder(self) -> str:
        """Rank 0: a fresh folder; a step saved before gets the next serial, a committed one is never overwritten."""
        return self.store.open_folder(self.step, self.store.next_serial(self.step))

    def _write_sealed(self, ranks: list[dict[str, Any]], reason: str, parts: list[Any], started: float,
                      serial: int) -> Checkpoint:
        """Rank 0: seal every rank's part, then the .pt and the manifest; an uncommitted folder is not left behind."""
        shards = self._seal_shards(parts, serial)
        try:
            return self._write(ranks, reason, shards=shards, started=started, serial=serial)
        except CheckpointError:
            if not any(c.key == (self.step, serial) for c in self.store.committed()):  # committed: its own folder
                self.store.discard_folder(self.step, serial)
            raise

    def _seal_shards(self, parts: list[Any], serial: int) -> dict[str, Any]:
        """Rank 0: the record of a folder every rank finished, made durable; or the first rank's failure."""
        failed = [(rank, part) for rank, part in enumerate(parts) if isinstance(part, tuple)]
        if failed:
            self.store.discard_folder(self.step, serial)
            rank, (code, message) = failed[0]
            raise StorageError(code or errno.EIO, f"rank {rank} could not write its part of the sharded state "
                                                  f"of step {self.step}: {message}; nothing was committed")
        files = {name: meta for part in parts for name, meta in part.items()}
        self.store.seal_folder(self.step, files, serial)
        return {"folder": folder_name(self.step, serial), "objects": list(self._sharded), "world_size": len(parts),
                "files": files, "bytes": sum(f["size"] for f in files.values())}

    def _load_shards(self, names: list[str]) -> None:
        """Every rank: the tracked sharded objects from the resumed checkpoint's folder, resharded as needed."""
        plain = [name for name in names if name not in self._sharded]
        if plain:
            raise StateMismatchError(
                f"{os.path.basename(self.resumed_from.path)} holds {', '.join(plain)} as sharded state (FSDP, saved "
                f"through torch.distributed.checkpoint), but here {'they are' if len(plain) > 1 else 'it is'} not "
                f"sharded: wrap the model as the run that saved it did (fully_shard) before track(), tracking its "
                f"optimizer in the same call, or start a new run in a new directory.")
        started = time.monotonic()
        record = self._pending["jobwrap"]["dcp"]
        folder = self.store.folder_path(self.resumed_from.step, self.resumed_from.serial)  # the verified one, never a path from the file
        sharded.load(self._objects, names, folder, getattr(self.group, "group", None), files=record["files"])
        if self.group.rank == 0:
            log.info("loaded %s from %s (saved by %d rank(s), loaded by %d) in %.2f s", ", ".join(names),
                     record["folder"], record["world_size"], self.group.world_size, time.monotonic() - started)

    def _write(self, ranks: list[dict[str, Any]], reason: str, shards: dict[str, Any] | None = None,
               started: float | None = None, serial: int | None = None) -> Checkpoint:
        """Rank 0: the .pt and its manifest (the commit); ``shards``: the record of a sealed sharded folder."""
        started = started or time.monotonic()
        meta = self._meta(reason)
        if shards is not None:
            # The folder's time (every rank's writes, the seal) counts in the measured save speed.
            meta["dcp"] = {k: shards[k] for k in ("folder", "world_size", "bytes")}
            meta["dcp"]["seconds"] = round(time.monotonic() - started, 6)
        with progress.saving(self.store.directory, self.step, self.last_checkpoint):
            checkpoint = self.store.save(self._payload(ranks, shards), step=self.step, epoch=self.epoch, meta=meta,
                                         serial=serial)
        seconds = time.monotonic() - started
        size = checkpoint.size + (shards["bytes"] if shards else 0)
        where = os.path.basename(checkpoint.path) + (f" + {shards['folder']}/" if shards else "")
        log.info("saved step %d (epoch %d, %s) to %s: %s in %.2f s", self.step, self.epoch, reason,
                 where, human_size(size), seconds)
        self.events.append("save", step=self.step, epoch=self.epoch, bytes=size,
                           seconds=round(seconds, 4), path=checkpoint.path, reason=reason)
        deleted = self.store.retain(self.config.keep_last)
        if deleted:
            log.debug("retention removed steps %s", deleted)
        return checkpoint

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG streams and the loader's epoch-start state."""
        return {"rng": capture_rng(self.device), "data": self._loader.state_dict() if self._loader is not None else {}}

    def _saved_rank_state(self) -> dict[str, Any]:
        """This rank's entry in a checkpoint: its RNG and loader state, and any gradients accumulated
        since the last optimizer step (kept out of :meth:`_rank_state`, which the fingerprint reads by content)."""
        return {**self._rank_state(), **self._grads_to_save()}

    def _payload(self, ranks: list[dict[str, Any]], shards: dict[str, Any] | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {name: obj.state_dict() for name, obj in self._objects.items()
                                   if name not in self._sharded}
        payload.update({name: plain(value, name) for name, value in self.extras.items()})
        payload["epoch"] = self.epoch
        payload["step"] = self.step
        payload["jobwrap"] = {
            "format": FORMAT_VERSION,
            "position": self.position,
            "world_size": len(ranks),
            "ranks": ranks,
            "objects": list(self._objects),
            "extras": list(self.extras),
            "run_id": self.run_id,
        }
        if shards is not None:
            payload["jobwrap"]["dcp"] = shards
        return payload

    def _meta(self, reason: str) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job_id": self.job.job_id,
            "restart_count": self.job.restart_count,
            "world_size": self.job.world_size,
            "reason": reason,
            "wall_time": time.time(),
            "host": socket.gethostname(),
            "jobwrap_version": __version__,
            "torch_version": torch.__version__,
        }

    def _load_verified(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """Rank 0 at resume: the .pt, and its sharded folder's files against the checksums it records."""
        began = time.monotonic()
        payload = self._load(checkpoint)
        self._read_seconds = round(time.monotonic() - began, 4)  # the read and checksum within load_seconds
        record = payload["jobwrap"].get("dcp")
        if record:
            sharded.check_record(record, folder_name(checkpoint.step, checkpoint.serial), os.path.basename(checkpoint.path))
            self.store.verify_folder(checkpoint, record["files"])
        return payload

    def _load(self, checkpoint: Checkpoint) -> dict[str, Any]:
        # One read: torch.load pulls the bytes straight into its tensors while the checksum is computed.
        payload = self.store.read_verified(
            checkpoint, lambda f: torch.load(f, map_location=self.device, weights_only=True))
        if not isinstance(payload, dict) or not isinstance(payload.get("jobwrap"), dict):
            raise CorruptCheckpointError(f"{checkpoint.path} is a torch file but not a jobwrap checkpoint")
        return payload

    # ------------------------------------------------------------ background saves, grace window
    def _save_in_background(self, reason: str) -> None:
        """Copy the state into the staging buffers (the only pause) and write it on another thread."""
        background = self._background
        if background.busy:
            if background.finished or background.step is None:
                self._collect_background()  # a reservation still running: staging needs its buffers
            elif background.step == self.step:
                return  # this step is being written already
            else:
                self._skipped_saves += 1
                if self._skipped_saves == 1:
                    log.info("periodic save at step %d skipped: the save of step %d is still being written "
                             "(one save in flight at a time; save less often to save at every interval)",
                             self.step, background.step)
                return
        if self.last_checkpoint is not None and self.last_checkpoint.step == self.step:
            return
        started = time.monotonic()
        staging = self._staging = self._staging or StagingArea()
        defer, watched = self._deferrable() if self.config.lazy_copy else (set(), [])
        payload = staging.stage(self._payload([self._saved_rank_state()]), defer=defer)
        self._background_fingerprint = self._fingerprint()
        pause = time.monotonic() - started
        step, epoch = self.step, self.epoch
        meta = {**self._meta(reason), "stage_seconds": round(pause, 6), "background": True}
        expected = deadline.estimate_seconds(staging.nbytes, self._save_speed)
        copied = self._copied = threading.Event()
        self._copy_wait = 0.0

        def work(cancel: Any) -> Checkpoint:
            try:
                staging.copy_deferred(cancel)  # at full priority: the next optimizer.step() may be waiting
                check_unchanged(watched)
            finally:
                copied.set()  # optimizer.step() may go on, also when the copy failed or was cancelled
            lower_priority()
            checkpoint = self.store.save(payload, step=step, epoch=epoch, meta=meta, cancel=cancel)
            self.store.retain(self.config.keep_last)
            return checkpoint

        background.submit(step, work, expected_seconds=expected)
        self._last_save_time = time.monotonic()
        self._tend = True
        log.debug("step %d staged in %.3f s; writing in the background", step, pause)

    def _deferrable(self) -> tuple[set[int], list[tuple[torch.Tensor, int]]]:
        """Storages only a tracked optimizer's step() changes (its CPU parameters and state), and
        those tensors with their version counters, to prove afterwards that nothing else changed them.

        Their copy runs on the writer thread while the next step computes;
        a hook holds the optimizer's next step() until it is done.
        """
        found: set[int] = set()
        watched: list[tuple[torch.Tensor, int]] = []
        for obj in self._objects.values():
            if not isinstance(obj, torch.optim.Optimizer):
                continue
            tensors = [p for group in obj.param_groups for p in group["params"]]
            tensors += [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
            cpu = [t for t in tensors if t.device.type == "cpu"]
            if cpu and id(obj) not in self._step_hooks:
                self._step_hooks[id(obj)] = obj.register_step_pre_hook(self._before_optimizer_step)
            found |= {t.untyped_storage()._cdata for t in cpu}
            watched += [(t, t._version) for t in cpu]
        return found, watched

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        copied = self._copied
        if copied is not None and not copied.is_set():
            started = time.monotonic()
            copied.wait()
            self._copy_wait += time.monotonic() - started

    def _tend_background(self) -> None:
        """At a boundary: collect a finished background save; after the first step, reserve the staging buffers."""
        if self._background.busy:
            if self._background.finished:
                self._collect_background()
            return
        if (self._staging is None and self.config.async_save and not self._sharded
                and self.step > max(self._resumed_step, 0)):
            self._reserve_staging()
            return
        self._tend = False

    def _reserve_staging(self) -> None:
        """Allocate the staging buffers on the writer thread, so that no periodic save pays for new memory.

        After a step, the optimizer's state exists: the payload's layout is known.
        """
        staging = self._staging = StagingArea()
        sizes = staging.plan(self._payload([self._rank_state()]))
        self._background.submit(None, lambda cancel: lower_priority() or staging.reserve(sizes, cancel))

    def _collect_background(self, *, raise_errors: bool = True) -> Checkpoint | None:
        """Take the outcome of the background save: record a commit, raise (or log) a failure."""
        step = self._background.step
        checkpoint, error = self._background.collect()
        if step is None:  # the staging reservation: on failure, the first save allocates instead
            if error is not None and not isinstance(error, SaveCancelled):
                log.warning("could not reserve the staging buffers (%s); the first save allocates them", error)
            return None
        if isinstance(error, SaveCancelled):
            log.info("background save of step %s cancelled: a newer save supersedes it", step)
            return None
        if isinstance(error, ChangedWhileCopied):
            self.config.lazy_copy = False
            log.warning("background save of step %s dropped: %s. From now on periodic saves copy everything "
                        "during the pause (lazy_copy=False); set JOBWRAP_LAZY_COPY=0 to start that way", step, error)
            self.events.append("save-dropped", step=step, reason=str(error))
            return None
        if error is not None:
            self.events.append("save-failed", step=step, reason="periodic", error=f"{type(error).__name__}: {error}")
            if isinstance(error, StorageError):
                failure: JobwrapError = StorageError(error.errno, f"background save of step {step} failed: {error}")
            else:
                failure = CheckpointError(f"background save of step {step} failed: {type(error).__name__}: {error}")
            if raise_errors and not (isinstance(error, StorageError) and self.config.on_save_error == "continue"):
                raise failure from error
            log.error("%s", failure)
            return None
        seconds = float(checkpoint.manifest.get("save_seconds") or 0.0)
        pause = float(checkpoint.manifest.get("stage_seconds") or 0.0) + self._copy_wait
        log.info("saved step %d (epoch %d, %s, in the background) to %s: %s in %.2f s; training paused %.3f s",
                 checkpoint.step, checkpoint.epoch, checkpoint.manifest.get("reason"),
                 os.path.basename(checkpoint.path), human_size(checkpoint.size), seconds, pause)
        self.events.append("save", step=checkpoint.step, epoch=checkpoint.epoch, bytes=checkpoint.size,
                           seconds=round(seconds, 4), path=checkpoint.path, reason=checkpoint.manifest.get("reason"),
                           background=True, pause=round(pause, 6))
        if self.last_checkpoint is None or checkpoint.key > self.last_checkpoint.key:
            self.last_checkpoint = checkpoint
            self._saved_fingerprint = self._background_fingerprint
        self._note_saved(checkpoint)
        return checkpoint

    def _finish_background(self, exc: BaseException | None) -> BaseException | None:
        """At close: let a save in flight commit; its failure is returned when nothing else failed."""
        for hook in [*self._step_hooks.values(), *self._grad_hooks]:
            hook.remove()
        self._step_hooks.clear()
        self._grad_hooks.clear()
        if not self._background.busy:
            return None
        if self._background.step is None:
            self._background.cancel()  # only reserving buffers
        elif not self._background.finished:
            log.info("waiting for the background save of step %s to commit", self._background.step)
        try:
            self._collect_background(raise_errors=exc is None)
        except JobwrapError as failure:
            return failure
        return None

    def _save_before_exit(self, reason: str) -> Checkpoint:
        """The signal's save: settle the save in flight the fastest way that commits the newest state."""
        left = deadline.grace_left(signal_at=self._trap.first_time, now=time.monotonic(),
                                   grace_seconds=self.config.grace_seconds, end_time=self.job.end_time,
                                   wall_now=time.time())
        size = deadline.checkpoint_bytes(self.last_checkpoint.manifest) if self.last_checkpoint else None
        fresh = deadline.estimate_seconds(size or (self._staging.nbytes if self._staging else None), self._save_speed)
        if self._background.busy and (self._background.finished or self._background.step is None):
            self._background.cancel()  # done already, or only reserving buffers
            self._collect_background(raise_errors=False)
        elif self._background.busy:
            plan = deadline.emergency_plan(in_flight_step=self._background.step or -1, step=self.step,
                                           remaining=self._background.remaining_seconds(), fresh=fresh, left=left)
            log.info("%s: the background save of step %s is in flight: %s", reason, self._background.step,
                     {"wait": "it is this step, waiting for it", "supersede": "cancelling it, saving this step now",
                      "wait-then-save": "it commits sooner, waiting for it, then saving this step"}[plan])
            if plan == "supersede":
                self._background.cancel()
            self._collect_background(raise_errors=False)  # its failure is logged; this save is what counts
        if left is not None and fresh is not None and fresh > left:
            log.warning("%s: the save needs about %.1f s and %.1f s are left before the kill; trying anyway "
                        "(the previous checkpoint stays intact if it is cut off)", reason, fresh, left)
        return self.save(reason=reason)

    def _note_saved(self, checkpoint: Checkpoint) -> None:
        """Record the measured save speed; after the first save, warn if a save would not fit the grace window."""
        speed = deadline.measured_speed([checkpoint.manifest])
        if speed is not None:
            self._save_speed = speed
        if not self._fit_checked:
            self._check_fit(checkpoint, [checkpoint])

    def _check_fit(self, checkpoint: Checkpoint, measured: list[Checkpoint]) -> None:
        """Warn once when a checkpoint of this size, at the measured speed, would outlast the grace window."""
        speed = deadline.measured_speed(c.manifest for c in measured)
        if speed is None or self.group.rank != 0:
            return
        self._save_speed = speed
        self._fit_checked = True
        warning = deadline.fit_warning(nbytes=deadline.checkpoint_bytes(checkpoint.manifest),
                                       bytes_per_second=speed, grace_seconds=self.config.grace_seconds)
        if warning:
            log.warning("%s", warning)


def _shareable(exc: BaseException) -> CheckpointError:
    """Rank 0's save error as the other ranks raise it: a CheckpointError (any exception may not pickle)."""
    return exc if isinstance(exc, CheckpointError) else CheckpointError(f"{type(exc).__name__}: {exc}")


def preemptible(directory: str | os.PathLike | None = None, **settings: Any
                ) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: run a train function inside a :class:`Session`, passed as its first argument."""
    def decorate(train: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(train)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            with Session(directory, **settings) as session:
                return train(session, *args, **kwargs)
        return wrapper
    return decorate
