"""The orchestrator a training loop talks to: resume, step boundaries, saves, requeue, exit.

The flow, top to bottom::

    start()      trap signals, claim the directory, load the newest verified checkpoint
    track()      register models/optimizers/... and extras; each is restored at once
    epochs()     yields epoch numbers from where the run stopped
    loader()     yields batches from where the run stopped; each batch ends at a step boundary
    _boundary()  a signal arrived? -> save, requeue (or not), raise Preempted

The parts it ties together: :mod:`jobwrap._loop.directory` (the directory claimed, the run's
events opened), :mod:`jobwrap._loop.resume` (the checkpoint found, loaded and put back), :mod:`jobwrap._loop.payload` (what a checkpoint holds), :mod:`jobwrap._loop.async_save`
(periodic saves in the background), :mod:`jobwrap._storage.sharded` (FSDP state, every rank's
part), :mod:`jobwrap._loop.grads` (gradients between optimizer steps), :mod:`jobwrap._loop.hold`
(the test hold). Time comes from one ``clock``.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from jobwrap._config import Config, load_config
from jobwrap._format import human_size
from jobwrap._loop import adopt, at_exit, hold, payload, steps, trackable
from jobwrap._loop.async_save import AsyncSaver
from jobwrap._loop.data import ResumableLoader
from jobwrap._loop.directory import ClaimedDirectory
from jobwrap._loop.distributed import (
    NO_STOP,
    STOP_EXIT,
    STOP_REQUEUE,
    WRITER_BUSY,
    WRITER_DONE,
    WRITER_IDLE,
    Solo,
    join,
    save_on_rank0,
)
from jobwrap._loop.grads import PendingGrads
from jobwrap._loop.interval import AutoInterval
from jobwrap._loop.resume import Resumed
from jobwrap._loop.iterators import watch_iterators
from jobwrap._loop.workers import guard_dataloader_workers
from jobwrap._scheduler.env import JobEnv, read_env
from jobwrap._scheduler.schedulers import Scheduler, scheduler_for
from jobwrap._scheduler.signals import InterruptWatch, SignalTrap
from jobwrap._scheduler.stopping import (
    EXIT,
    REQUEUE,
    Limits,
    Preempted,
    Stop,
    after_interrupt,
    carry_out,
    decide_stop,
    interrupted_exit,
)
from jobwrap._storage import deadline, progress, savable, sharded, striped
from jobwrap._storage.devices import resume_device
from jobwrap._storage.events import EventLog
from jobwrap._storage.pids import Lifeline, created_at
from jobwrap._storage.state import RESERVED_KEYS, fingerprint, is_stateful, plain
from jobwrap._storage.store import Checkpoint, CheckpointStore
from jobwrap.errors import ConfigError, JobwrapError, StorageError

log = logging.getLogger("jobwrap")

T = TypeVar("T")


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
    (the rule: :func:`jobwrap._storage.devices.resume_device`)."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = resume_device(local_rank=job.local_rank, cuda_devices=cuda_devices, configured=configured)
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} (JOBWRAP_DEVICE or device=) is not a torch device ({exc}): "
                          f"set it to e.g. cpu or cuda:0, or unset it") from exc


class Session:
    """One process's view of a preemptible run. Use as a context manager (or :func:`preemptible`).

    ``clock``: where every decision and measurement that depends on time reads it
    (a monotonic clock; a test passes its own to decide without sleeping).
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, environ: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, **settings: Any) -> None:
        began = clock()
        self.config: Config = load_config(environ, directory=directory, **settings)
        self.job: JobEnv = read_env(environ)
        self.clock = clock
        self.store = CheckpointStore(self.config.directory, file_mode=self.config.file_mode)
        self.scheduler: Scheduler = scheduler_for(self.job,
                                                  despite_exit_signals=self.config.requeue_on_exit_signals)
        self.device = default_device(self.job, self.config.device)
        self.epoch = 0
        self.step = 0
        self.position = 0
        # The epoch's job.loader() loop ran out (its end-of-epoch code runs now): a save here resumes at the
        # next epoch, since a resume into this one would run that code a second time (design.md).
        self._epoch_loop_done = False
        self._loop_end_state: Any = None  # the fingerprint when it ran out: a save before anything moved re-enters
        self._epoch_end_saved = False  # the last save was one of those, made by this process
        self.extras: dict[str, Any] = {}
        self.resumed_from: Checkpoint | None = None
        self.last_checkpoint: Checkpoint | None = None
        self._saved_fingerprint: Any = None  # the state last_checkpoint holds (None: unknown, save again)
        self._handed_off: tuple[int, Any] = (-1, None)  # (step, fingerprint) last given to rank 0's background save
        self._in_batch = False  # between the loader yielding a batch and the end of the loop's body
        # Inside job.steps(), the steps own the boundaries: batches pulled with next() from job.loader()
        # count in the position when handed out, and are no steps of their own (fed: one was pulled).
        self._steps_loop = self._steps_fed = False
        self.run_id = ""
        self._objects: dict[str, Any] = {}
        self._sharded: list[str] = []  # tracked names saved through torch.distributed.checkpoint (FSDP)
        self._loader: ResumableLoader | None = None
        self._loader_running: ResumableLoader | None = None  # whose iterator is mid-epoch (handing out batches)
        self._trap = SignalTrap(self.config.requeue_signals + self.config.exit_signals,
                                registry=self.job.trainers_dir, clock=clock)
        self._interrupts = InterruptWatch(clock)  # a Ctrl-C the script catches must not end as "finished"
        self._resume: Resumed | None = None  # the loaded checkpoint, until the first boundary frees it
        self._resume_data: dict[str, Any] | None = None  # the loader's position state, until a loader takes it
        self._resumed_step = -1
        self._last_save_time = clock()
        self._auto: AutoInterval | None = None  # save_every="auto": the interval from this run's measurements
        self._started = False
        self.group: Solo = Solo()
        self._grads = PendingGrads(self._objects)
        self._saver = AsyncSaver(self.store, self.config, self._objects, clock=clock,
                                 payload=lambda ranks: self._payload(ranks or [self._saved_rank_state()]),
                                 layout=lambda: self._payload([self._rank_state()
                                                               for _ in range(self.group.world_size)]),
                                 fingerprint=self._fingerprint, meta=self._meta, last=lambda: self.last_checkpoint,
                                 committed=self._record_commit, event=lambda *a, **kw: self.events.append(*a, **kw))
        self._directory = ClaimedDirectory(self.store, self.config, self.job)
        self.events: EventLog  # the run's history, once start() has opened the directory
        self._lifeline = Lifeline(None, clock)  # the `jobwrap run` not to outlive
        self._orphaned = False
        self._unguard_workers: Callable[[], None] = lambda: None
        self._unwatch_iterators: Callable[[], None] = lambda: None
        self._data_resumed_elsewhere = False  # a framework's loop resumes its own loader (jobwrap._loop.iterators)
        self._scoped = False  # inside `with`: the block closes it; else the process's exit does (at_exit)
        self._rng_restored: Any = None  # the streams as track() put them back, until the first boundary
        self._epochs_used = False  # log lines name the epoch only in loops that have them
        self._preempted: Preempted | None = None
        self._epoch_end_save_warned = False  # code after an epoch-end save changed the state: warned once
        self._adopted_path: str | None = None  # the init_from file this run started from
        self._interrupts_told = 0  # the Ctrl-Cs already warned of at a boundary
        # The relaunch's timeline (jobwrap status): jobwrap's own start-up, and the first batch and step.
        self._init_seconds = clock() - began
        self._first_step_pending = False
        self._first_batch_at: float | None = None
        self._proven = False  # every tracked state proven loadable after a step (the first boundary after one)
        self._checkpoint_hooks: list[Callable[[], None]] = []  # on_checkpoint(): trackers' flushes

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Session":
        """Trap signals, claim the directory and load the newest verified checkpoint."""
        if self._started:
            return self
        self._started = True
        session_started = time.time()
        _ensure_log_handler()
        # Trap first, so a signal that arrives while resuming is honoured right after.
        self._trap.install()
        if signal.SIGINT not in self._trap.signals:
            self._interrupts.install()
        self._lifeline = Lifeline(self.job.supervisor, self.clock)
        self._unguard_workers = guard_dataloader_workers(self._trap.signals)
        self._unwatch_iterators = watch_iterators(self)
        try:
            self.group = join()
            opened = self.clock()
            found = self._directory.open(self.group, self.device)
            self.run_id, self.events = self._directory.run_id, self._directory.events
            load_seconds = round(self.clock() - opened, 4)
            if found is None:  # an init_from refused lets go of the directory like a failed open
                self._start_fresh(session_started)
        except BaseException:
            self._trap.restore()
            self._interrupts.restore()
            self._directory.release()
            self._unguard_workers()
            self._unwatch_iterators()
            self._started = False
            raise
        if not self._scoped:
            at_exit.close_at_exit(self)
        if found is not None:
            self._start_resumed(*found, load_seconds=load_seconds, session_started=session_started)
        interrupted = after_interrupt(self.events.read_tail(), self.step) if self.group.rank == 0 else None
        if interrupted:
            log.warning("%s", interrupted)
        self._auto = self._auto_interval()
        return self

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
        self._first_step_pending = True

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
                  "init_seconds": round(self._init_seconds, 4)}
        if self.job.previous_exit is not None:
            fields["previous_exit"] = round(self.job.previous_exit, 3)
        return fields

    def _where(self) -> str:
        return f"step {self.step}, epoch {self.epoch}" if self._epochs_used or self.epoch else f"step {self.step}"

    def close(self, exc: BaseException | None = None) -> None:
        """Restore the previous signal handlers and record how the process ended."""
        if not self._started:
            return
        self._grads.close()
        failure = self._close_saver(exc)
        exc = exc or failure
        self._trap.restore()
        self._interrupts.restore()
        self._unguard_workers()
        self._unwatch_iterators()
        # Every rank leaves together after a finished run or a Preempted; after an error some may not come.
        self.group.close(clean=_clean(exc))
        self._started = False
        at_exit.forget(self)
        if isinstance(exc, Preempted):
            self.events.append("exit", code=exc.code, reason=exc.reason, step=self.step)
        elif isinstance(exc, KeyboardInterrupt) or (exc is None and self._interrupts.received):
            newest = self.last_checkpoint.step if self.last_checkpoint is not None else None
            code, reason = interrupted_exit(step=self.step, newest=newest, caught=exc is None)
            log.warning("%s", reason)
            self.events.append("exit", code=code, reason=reason, step=self.step)
        elif exc is not None:
            self.events.append("exit", code=1, reason=f"{type(exc).__name__}: {exc}", step=self.step)
        else:
            if self._trap.received:
                log.info("%s arrived after training ended; nothing left to checkpoint or requeue",
                         self._trap.first.name)
            self.events.append("exit", code=0, reason="finished", step=self.step)
        self._directory.release()
        self._preempted = None  # its traceback holds the loop's frames (a loader's workers, batches)
        if failure is not None:
            raise failure

    def _close_saver(self, exc: BaseException | None) -> BaseException | None:
        """Let a background save in flight commit; its failure is returned, after a clean exit on every rank.

        With several ranks, a failure raised on rank 0 alone would make it skip the barrier of
        ``group.close`` and leave the other ranks waiting there: rank 0's outcome is shared first.
        """
        failure = self._saver.close(exc)
        if self.group.world_size == 1 or not self._async_periodic() or not _clean(exc):
            return failure

        def rank0_outcome() -> Checkpoint | None:
            if failure is not None:
                raise failure
            return self.last_checkpoint

        try:
            self._adopt_newest(save_on_rank0(self.group, rank0_outcome))
        except JobwrapError as shared:
            return shared
        return None

    def __enter__(self) -> "Session":
        self._scoped = True
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
        resumed, from_folder = self._resume, []
        for name, obj in things.items():
            if name in RESERVED_KEYS or name in self._objects or name in self.extras:
                raise ConfigError(f"cannot track {name!r}: the name is reserved or already tracked; pick another")
            trackable.check(name, obj)
            if is_stateful(obj):
                self._objects[name] = obj
                if isinstance(obj, torch.optim.Optimizer):
                    self._grads.watch(obj)
                if resumed is not None and resumed.restore(name, obj):
                    from_folder.append(name)
            else:
                value = plain(obj, name)
                self.extras[name] = resumed.extra(name, value) if resumed is not None else value
        self._sharded = sharded.sharded_names(self._objects)
        self._prove_savable(list(things))
        if from_folder:
            sharded.restore(self._objects, from_folder, sharded_names=self._sharded, checkpoint=resumed.checkpoint,
                            record=resumed.sharded_record, store=self.store, group=self.group, clock=self.clock)
        self._grads.restore(things)
        if resumed is not None:
            resumed.restore_rng()  # loops with only step_done() have no boundary before their first step
            if resumed.checkpoint is not None:
                self._rng_restored = steps.rng_mark(self.device)
        if self._trap.received and self.resumed_from is not None and self.group.world_size == 1:
            # A signal that came while resuming: stop now, the state is the checkpoint's. With several
            # ranks the stop is a collective that only this rank would enter here (the others may be in
            # one of their own, building DDP): the first boundary, which every rank reaches, stops them all.
            self._boundary()
        return self

    def _prove_savable(self, names: list[str] | None = None) -> None:
        """Every tracked state (``names``: only those) loads back with weights_only, proven in memory on its
        skeleton (:mod:`jobwrap._storage.savable`): a ConfigError now, not a checkpoint no resume can read."""
        for name in self._objects if names is None else names:
            if name in self._objects and name not in self._sharded and trackable.needs_proof(self._objects[name]):
                try:
                    state = trackable.state_of(name, self._objects[name])
                except ConfigError:
                    if self.group.world_size > 1:  # raised on one rank, it would leave the others in a collective:
                        continue                   # the save reports a failing state_dict() to every rank instead
                    raise
                savable.prove(name, state)
            elif name in self.extras:
                savable.prove(name, self.extras[name], what="value")

    def _prove_after_first_step(self) -> None:
        """Once, at the first boundary or save after a step: every tracked state proven loadable again (an
        optimizer's state exists only after its first step), before any checkpoint of it is written."""
        if not self._proven and self.step > max(self._resumed_step, 0):
            self._proven = True
            self._prove_savable()

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

    def loader(self, iterable: Iterable[T], *, restart_epoch: bool = False) -> ResumableLoader[T]:
        """Wrap the training loader: each batch ends at a step boundary; resumes mid-epoch exactly.

        A loader built otherwise than in the run that saved the checkpoint (batch size, dataset length,
        sampler, drop_last) is refused mid-epoch, where its saved place would stand for other samples;
        ``restart_epoch=True`` trains that epoch again from its first batch with the new loader instead.
        """
        self.start()
        if self._loader is None or self._loader.iterable is not iterable:
            if self._loader is not None and self._loader.ran_in_epoch == self.epoch:
                raise ConfigError(
                    "job.loader() got another loader in the epoch in which the training loader ran: it wraps the "
                    "training loader only, whose batches are the steps. Iterate a validation loader directly "
                    "(for batch in val_loader) instead; its draws from the RNG are checkpointed with the rest.")
            self._loader = ResumableLoader(self, iterable, restart_epoch=restart_epoch)
            if self._resume_data is not None:
                self._loader.load_state_dict(self._resume_data)
                self._resume_data = None
        return self._loader

    def steps(self, total: int) -> Iterator[int]:
        """Step numbers from the resumed one to ``total - 1``, for hand-written loops (no :meth:`loader`):
        each step ends at a boundary, the end is tested before a step, a final checkpoint is committed."""
        self.start()
        return self._owning_boundaries(steps.steps(
            self, total, resumed=self._resume is not None or self.resumed_from is not None, at_end=self._save_at_end))

    def _owning_boundaries(self, numbers: Iterator[int]) -> Iterator[int]:
        """While a steps() loop runs, it alone makes boundaries: one per step, even with a loader's next() inside."""
        self._steps_loop = True
        try:
            yield from numbers
        finally:
            self._steps_loop = False

    def _save_at_end(self) -> None:
        if self.config.save_at_end:
            self.save(reason="end of training")

    def epochs(self, total: int, start: int | None = None) -> Iterator[int]:
        """Epoch numbers from the resumed one to ``total - 1``; commits a final checkpoint at the end.

        ``start``: the epoch the script's own resume reached (``args.start_epoch``), where the
        directory holds no jobwrap checkpoint yet; jobwrap's checkpoint (or init_from) wins once there is one.
        """
        self.start()
        self._epochs_used = True
        source = os.path.basename(self.resumed_from.path) if self.resumed_from is not None else self._adopted_path
        self.epoch = adopt.start_epoch(start, epoch=self.epoch, source=source, argv=sys.argv)
        if self.resumed_from is not None and self.epoch >= total:
            steps.say_finished(self.step, f"{total} epochs")
        while self.epoch < total:
            self._boundary()
            yield self.epoch
            self._warn_moved_after_epoch_end_save()
            self.epoch += 1
            self.position = 0
            self._epoch_loop_done = self._epoch_end_saved = False
        self._boundary()
        self._save_at_end()

    def _warn_moved_after_epoch_end_save(self) -> None:
        """At the end of an epoch's body: a save after its job.loader() loop resumes at the next epoch, so code
        after that save which changes the state is skipped by a resume from it. Signals stop at the next
        boundary, after that code, so only a kill in between (SIGKILL, a lost node) can land there: warned
        once, in the first epoch it happens, not refused (save-then-validate is exact under every signal)."""
        if self._epoch_end_save_warned or not (self._epoch_end_saved and self._holds_step()
                                               and self._moved_since_save()):
            return
        self._epoch_end_save_warned = True
        if self.group.rank == 0:
            log.warning(
                "epoch %d: job.save() after the epoch's job.loader() loop was followed by code that changed the "
                "state (a tracked object, an extra or the RNG) before the epoch ended. Signals are honoured after "
                "that code, but a process killed between the save and the epoch's end (SIGKILL, a lost node) "
                "resumes from that save at epoch %d without it, and diverges. Make job.save() the last statement "
                "of the epoch's body (after scheduler.step() and validation), or drop it: the epoch boundary is a "
                "step boundary, where signals and periodic saves checkpoint", self.epoch, self.epoch + 1)

    def _after_end_of_epoch_code(self, state: Any) -> bool:
        """A save after the epoch's job.loader() loop, once end-of-epoch code changed the state: it resumes at
        the next epoch. Before anything changed (job.save() first after the loop), a resume re-enters the
        ended epoch and runs all its end-of-epoch code, once, as the uninterrupted run did."""
        if not self._epoch_loop_done or self._in_batch:
            return False
        changed = state != self._loop_end_state
        if self.group.world_size > 1:  # every rank decides alike (the check at the epoch's end is collective)
            changed = self.group.agree(NO_STOP, changed)[1]
        return changed

    def _loader_exhausted(self) -> None:
        """The epoch's job.loader() loop ran out of batches: what follows is end-of-epoch code."""
        self._epoch_loop_done = bool(self._epochs_used)
        self._loop_end_state = self._fingerprint() if self._epoch_loop_done else None

    # ------------------------------------------------------------ step boundary
    def step_done(self) -> None:
        """Explicit step boundary for loops that do not use :meth:`loader`: call after each step."""
        if self._resume is not None:
            self._finish_resume(after_step=True)
        self._step_done()
        self._boundary()

    @property
    def should_stop(self) -> bool:
        """True once a trapped signal arrived (the next boundary will checkpoint and stop)."""
        return bool(self._trap.received) or self._orphaned

    # The loader's side of the boundary (jobwrap._loop.data.StepBoundary): package-internal, hence the underscores.
    def _step_done(self) -> None:
        self.step += 1
        if not (self._steps_loop and self._steps_fed):  # else the loader counted its batches as it handed them out
            self.position += 1
        if self._first_step_pending:  # a resumed process's first new step: the end of its relaunch
            self._first_step_pending = False
            self.events.append("first-step", step=self.step, first_batch=self._first_batch_at)

    def _batch_started(self) -> None:
        """The loader handed out a batch: the loop's body trains on it now (in a steps() loop: the step does)."""
        if self._steps_loop:
            self._steps_fed = True
            self.position += 1
        else:
            self._in_batch = True
        if self._first_step_pending and self._first_batch_at is None:
            self._first_batch_at = round(time.time(), 3)

    def _batch_left(self) -> None:
        """The loop broke off with its batch: nothing counts it (a save() in the body already did)."""
        self._in_batch = False

    def _batch_finished(self) -> None:
        """The body is done with its batch: count it, unless a save() inside the body counted it already."""
        if self._in_batch:
            self._in_batch = False
            self._step_done()

    def _loader_batches_begin(self, loader: ResumableLoader) -> None:
        """A wrapped loader's iterator asks for its first batch: refused while another one is mid-epoch."""
        if self._loader_running is not None:
            raise ConfigError(
                "job.loader(): a second job.loader() iterator asked for its first batch while another one is "
                "mid-epoch (zip(job.loader(a), job.loader(b)), or nested loops): each would count the steps and "
                "save its position over the other's. Wrap only the training loader, and take the other batches "
                "from it: one DataLoader over both datasets (torch.utils.data.StackDataset(a, b)) in job.loader(), "
                "or `for i, batch in job.loader(a).enumerate():` with the other batch picked from b's dataset by "
                "the index i, which resumes with it; a second DataLoader iterated directly is exact only within "
                "one step (a validation pass)")
        self._loader_running = loader

    def _loader_batches_end(self, loader: ResumableLoader) -> None:
        """That iterator ended: exhausted, left by ``break``, or dropped."""
        if self._loader_running is loader:
            self._loader_running = None

    def _loader_boundary(self) -> None:
        """The loader's boundary before each batch; inside a steps() loop the step's own is the one."""
        if not self._steps_loop:
            self._boundary()

    def _boundary(self) -> None:
        if self._resume is not None:
            self._finish_resume()
        if len(self._interrupts.received) > self._interrupts_told:
            self._went_on_after_interrupt()
        self._orphaned = self._orphaned or self._lifeline.cut()  # then it stops as on a cancel
        if self.config.test_hold_at and self.step in self.config.test_hold_at:
            hold.hold(self.config.test_control, self.step, self.group.rank, self._trap)
        after_first_step = self.step > max(self._resumed_step, 0)
        self._prove_after_first_step()
        if self._sharded and after_first_step:
            self._grads.check_sharded(self._sharded, self.step)
        if self.group.world_size == 1:
            if self._trap.received or self._orphaned:
                self._stop(self._local_stop_request())
            self._saver.tend(step=self.step, may_reserve=after_first_step and not self._sharded)
            if self._periodic_save_due():
                self._periodic_save()
            return
        if self.group.rank == 0:  # a background save's outcome waits for the agreement, which shares it
            self._saver.tend(step=self.step, may_reserve=after_first_step and not self._sharded, collect=False)
        if self.step % self.config.sync_every_steps:
            return
        writer = self._saver.writer_state() if self.group.rank == 0 else WRITER_IDLE
        stop, save_due, writer = self.group.agree(self._local_stop_request(), self._periodic_save_due(), writer)
        if stop != NO_STOP:
            self._stop(stop)
        if writer == WRITER_DONE:
            self._collect_background()  # every rank at this step: rank 0's commit, or its failure raised by all
            save_due = save_due and not self._holds_step()
        if save_due and writer == WRITER_BUSY:
            if self.group.rank == 0:
                self._saver.skip(self.step)
        elif save_due:
            self._periodic_save()

    def _went_on_after_interrupt(self) -> None:
        """The script caught a Ctrl-C and trains on: say so once per Ctrl-C, and record it in the events log."""
        self._interrupts_told = len(self._interrupts.received)
        log.warning("SIGINT (Ctrl-C) interrupted training and the script caught it and went on, now at %s: the step "
                    "it broke may be half done, so from here this run is not the uninterrupted one (checkpoints "
                    "saved from now on hold that)", self._where())
        self.events.append("interrupt", step=self.step, epoch=self.epoch)

    def _local_stop_request(self) -> int:
        """The strongest stop this process was asked for: a cancel (an exit signal) beats a requeue,
        whichever came first (USR1 warns of the time limit, then a user's scancel sends TERM)."""
        if self._exit_signal() is not None or self._orphaned:
            return STOP_EXIT
        return STOP_REQUEUE if self._trap.received else NO_STOP

    def _exit_signal(self) -> signal.Signals | None:
        """The first exit signal received, unless exit signals requeue too (``requeue_on_exit_signals``)."""
        if self.config.requeue_on_exit_signals:
            return None
        return next((sig for sig, _ in list(self._trap.received) if sig in self.config.exit_signals), None)

    def _finish_resume(self, *, after_step: bool = False) -> None:
        """Restore the RNG streams (again: setup code after track() may have drawn) and free the payload.

        ``after_step``: the first boundary came from step_done(), after a step
        that already drew from the streams track() restored; leave them.
        """
        if not after_step:
            steps.warn_if_drawn(self._rng_restored, self.device)
            self._resume.restore_rng()
            self._saved_fingerprint = self._fingerprint()  # the state is the checkpoint's, until the next step
        resumed, self._resume = self._resume, None
        resumed.warn_untracked([*self._objects, *self.extras])

    def _periodic_save_due(self) -> bool:
        cfg = self.config
        saved_step = self.last_checkpoint.step if self.last_checkpoint is not None else None
        if cfg.save_every == "auto":
            return (self._auto is not None and saved_step != self.step
                    and self._auto.due(self.clock() - self._last_save_time, self.last_checkpoint))
        return deadline.periodic_save_due(
            step=self.step, saved_step=saved_step, every_steps=cfg.save_every_steps,
            every_seconds=cfg.save_every_seconds, now=self.clock(), last_save=self._last_save_time)

    def on_checkpoint(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before each checkpoint is taken (periodic, signal, end, ``save()``).

        For what must be on disk by the time the state it describes is committed: an experiment
        tracker's writer flushed here keeps every step logged before a commit through a kill
        (``jobwrap.trackers``).
        """
        self._checkpoint_hooks.append(hook)

    def _before_checkpoint(self) -> None:
        """A hook that fails (a tracker's disk or server) is logged: it never costs the checkpoint."""
        for hook in self._checkpoint_hooks:
            try:
                hook()
            except Exception as exc:
                log.warning("a hook before the checkpoint at step %d failed, the checkpoint goes ahead: %r",
                            self.step, exc)

    def _periodic_save(self) -> None:
        self._before_checkpoint()
        try:
            if self._async_periodic():
                if self._start_background():
                    self._last_save_time = self.clock()
            else:
                self.save(reason="periodic")
        except StorageError as exc:
            if self.config.on_save_error == "raise":
                raise
            log.error("periodic save failed, training continues (on_save_error=continue): %s", exc)
            self._last_save_time = self.clock()

    def _async_periodic(self) -> bool:
        """Periodic saves go to a writer thread (sharded state is written by every rank, synchronously)."""
        return self.config.async_save and not self._sharded

    def _start_background(self) -> bool:
        """Hand the state to the writer thread; True when every rank counts the save as started.

        With several ranks every rank gives rank 0 its entry (a small collective) and goes on;
        rank 0 alone pauses, to stage the state. A failure of its staging is collected like a
        failed write, at the next agreement, so that every rank raises it at the same step.
        """
        if self.group.world_size == 1:
            return self._saver.start("periodic", step=self.step, epoch=self.epoch)
        state = self._fingerprint()
        ranks = self.group.gather(self._saved_rank_state())
        self._handed_off = (self.step, state)
        if self.group.rank == 0:
            try:
                self._saver.start("periodic", step=self.step, epoch=self.epoch, ranks=ranks)
            except Exception as exc:  # raised here, it would leave the other ranks in the next collective
                self._saver.fail_later(self.step, exc)
        return True

    def _holds_step(self) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.step == self.step

    def _collect_background(self) -> None:
        """The background save in flight commits first, or its failure is raised (with several ranks, on
        every rank); then every rank knows rank 0's newest checkpoint, so all decide alike what to save."""
        if self.group.world_size == 1 or not self._async_periodic():
            self._collect_on_rank0()
            return
        self._adopt_newest(save_on_rank0(self.group, self._collect_on_rank0))

    def _collect_on_rank0(self) -> Checkpoint | None:
        if self._saver.background.busy:
            self._saver.collect()
        return self.last_checkpoint

    def _adopt_newest(self, newest: Checkpoint | None) -> None:
        """A rank other than 0 takes rank 0's newest checkpoint: newer than its own, it is the background
        save it handed off its entry for (a synchronous save is known to every rank at once)."""
        if self.group.rank != 0 and newest is not None:
            step, state = self._handed_off
            self._record_commit(newest, state if newest.step == step else None)

    # ------------------------------------------------------------ save
    def save(self, *, reason: str = "manual") -> Checkpoint:
        """Commit a checkpoint of the current state now (skipped only if the last checkpoint holds this state).

        Inside the body of ``for batch in job.loader(...)``, call it after
        ``optimizer.step()``: the batch counts as trained. A save at a step
        that is committed already writes a new checkpoint (the next serial)
        when anything changed since: the epoch, the position, an extra, a
        tracked object (end-of-epoch code such as ``scheduler.step()``), the RNG.
        With several ranks every rank must call it (the step boundary does):
        rank 0 writes, with every rank's RNG and data state (from
        ``stripe_min_bytes`` of replicated state on, every rank writes its
        share), and all ranks return only once the checkpoint is committed.
        """
        self.start()
        self._before_checkpoint()
        if self._in_batch:  # a batch in hand counts if the loop's body is running, not once the loop is left
            if self._loader is None or self._loader.body_running():
                self._batch_finished()
            else:
                self._batch_left()
        self._prove_after_first_step()
        self._collect_background()  # a save in flight commits first (or its failure is raised)
        if self._holds_step() and not self._moved_since_save():
            return self.last_checkpoint
        state = self._fingerprint()
        ranks = self.group.gather(self._saved_rank_state())
        started = self.clock()
        self._epoch_end_saved = self._after_end_of_epoch_code(state)
        on_rank0 = functools.partial(save_on_rank0, self.group)
        outcome = None
        if self._sharded:
            outcome = sharded.commit(
                self.store, self.group, step=self.step, objects=self._objects, names=self._sharded,
                on_rank0=on_rank0, write_file=lambda shards, serial: self._write(
                    ranks, reason, shards=shards, started=started, serial=serial))
        elif self.group.world_size > 1 and reason != "periodic":  # periodic saves keep the one-file layout
            outcome = striped.commit(
                self.store, self.group, step=self.step, states=lambda: payload.states(self._objects, self._sharded),
                min_bytes=self.config.stripe_min_bytes, on_rank0=on_rank0,
                write_file=lambda states, stripes, serial: self._write(
                    ranks, reason, shards=stripes, started=started, serial=serial, states=states))
        if outcome is None:
            outcome = save_on_rank0(self.group, lambda: self._write(ranks, reason))
        self.last_checkpoint = outcome
        self._saved_fingerprint = state
        self._last_save_time = self.clock()
        self._saver.note_saved(outcome, warn=self.group.rank == 0)
        return outcome

    def _save_before_exit(self, reason: str) -> Checkpoint:
        """The signal's save: settle the save in flight the fastest way that commits the newest state."""
        self._saver.settle(reason, step=self.step, signal_at=self._trap.first_time, end_time=self.job.end_time)
        return self.save(reason=reason)

    def _record_commit(self, checkpoint: Checkpoint, state: Any) -> None:
        """A background save committed ``checkpoint`` of ``state``: the newest, unless a later save came first."""
        if self.last_checkpoint is None or checkpoint.key > self.last_checkpoint.key:
            self.last_checkpoint = checkpoint
            self._saved_fingerprint = state

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
                    fingerprint(self._rank_state(), by_content=True), fingerprint(self._grads.pending()))
        except Exception:
            return object()

    def _moved_since_save(self) -> bool:
        """Whether the state moved on since the last checkpoint without a step (every rank agrees)."""
        moved = self._saved_fingerprint is None or self._fingerprint() != self._saved_fingerprint
        if self.group.world_size > 1:
            moved = self.group.agree(NO_STOP, moved)[1]
        return moved

    def _write(self, ranks: list[dict[str, Any]], reason: str, shards: dict[str, Any] | None = None,
               started: float | None = None, serial: int | None = None,
               states: dict[str, Any] | None = None) -> Checkpoint:
        """Rank 0: the .pt and its manifest (the commit); ``shards``: the record of a sealed folder, sharded state
        or (with ``states``, the tracked states without their striped tensors) striped parts."""
        started = started or self.clock()
        meta = self._meta(reason)
        kind = "stripes" if states is not None else "dcp"
        if shards is not None:
            # The folder's time (every rank's writes, the seal) counts in the measured save speed.
            meta[kind] = {k: shards[k] for k in ("folder", "world_size", "bytes")}
            meta[kind]["seconds"] = round(self.clock() - started, 6)
        with progress.saving(self.store.directory, self.step, self.last_checkpoint):
            built = self._payload(ranks, stripes=shards, states=states) if states is not None else \
                self._payload(ranks, shards)
            checkpoint = self.store.save(built, step=self.step, epoch=self.epoch, meta=meta, serial=serial)
        try:  # committed: what follows only reports and tidies up, and must not fail the save (or its requeue)
            self._report_save(checkpoint, reason, shards, self.clock() - started)
        except Exception as exc:
            log.warning("step %d is committed, but reporting the save failed (%s: %s)", self.step,
                        type(exc).__name__, exc)
        return checkpoint

    def _report_save(self, checkpoint: Checkpoint, reason: str, shards: dict[str, Any] | None,
                     seconds: float) -> None:
        """After a commit: the log line, the event, and retention (which removes only older checkpoints)."""
        size = checkpoint.size + (shards["bytes"] if shards else 0)
        where = os.path.basename(checkpoint.path) + (f" + {shards['folder']}/" if shards else "")
        log.info("saved %s (%s) to %s: %s in %.2f s", self._where(), reason, where, human_size(size), seconds)
        self.events.append("save", step=self.step, epoch=self.epoch, bytes=size,
                           seconds=round(seconds, 4), path=checkpoint.path, reason=reason)
        deleted = self.store.retain(self.config.keep_last)
        if deleted:
            log.debug("retention removed steps %s", deleted)

    def _rank_state(self) -> dict[str, Any]:
        return payload.rank_state(self.device, self._loader)

    def _saved_rank_state(self) -> dict[str, Any]:
        """This rank's entry in a checkpoint: its RNG and loader state, and any gradients accumulated
        since the last optimizer step (kept out of :meth:`_rank_state`, which the fingerprint reads by content)."""
        return {**self._rank_state(),
                **self._grads.to_save(sharded=self._sharded, step=self.step, world_size=self.group.world_size)}

    def _payload(self, ranks: list[dict[str, Any]], shards: dict[str, Any] | None = None,
                 stripes: dict[str, Any] | None = None, states: dict[str, Any] | None = None) -> dict[str, Any]:
        return payload.build(self._objects, self.extras, sharded_names=self._sharded, epoch=self.epoch,
                             step=self.step, position=self.position, ranks=ranks, run_id=self.run_id, shards=shards,
                             stripes=stripes, object_states=states, epoch_done=self._epoch_end_saved)

    def _meta(self, reason: str) -> dict[str, Any]:
        return payload.meta(reason, run_id=self.run_id, job=self.job)

    # ------------------------------------------------------------ stop: commit, then exit (and requeue)
    def _stop(self, request: int) -> None:
        """Every rank arrives here at the same step: commit, then rank 0 decides the exit and requeue."""
        sig = self._trap.first
        name = sig.name if sig is not None else ("jobwrap run gone" if self._orphaned else "another rank's signal")
        delay = None
        if sig is not None:
            delay = self.clock() - (self._trap.first_time or self.clock())
            log.info("%s received %.2f s ago: checkpointing at %s", name, delay, self._where())
        self.events.append("signal", signal=name, step=self.step, epoch=self.epoch,
                           delay=None if delay is None else round(delay, 4))
        checkpoint = self._save_before_exit(f"signal {name}")
        # Decided after the save, from every signal received by now on any rank: a TERM (scancel)
        # that came during the save still makes the stop a cancel instead of a requeue.
        settled = self.group.agree(max(request, self._local_stop_request()), False)[0]
        if settled == STOP_EXIT:
            sig = self._exit_signal() or signal.SIGTERM
            if settled != request:
                log.info("%s arrived during the save: the job is cancelled, not requeued", sig.name)
        decision = self.group.broadcast(self._exit_decision(settled, sig, checkpoint)
                                        if self.group.rank == 0 else None)
        code, requeued, reason = decision
        self._preempted = Preempted(code, signal=sig or signal.SIGTERM, checkpoint=checkpoint, requeued=requeued,
                                    reason=reason)
        raise self._preempted

    def _exit_decision(self, request: int, sig: signal.Signals | None,
                       checkpoint: Checkpoint) -> tuple[int, bool, str]:
        """(exit code, requeued, reason), decided by rank 0 alone; it runs the one requeue."""
        progressed = checkpoint.key > (self.resumed_from.key if self.resumed_from else (-1, 0))
        history = self._progress_history()
        stop = Stop(EXIT if request == STOP_EXIT else REQUEUE, sig, restart_count=self.job.restart_count,
                    progressed=progressed, history=history)
        return carry_out(decide_stop(stop, Limits(self.config.max_requeues, self.config.max_no_progress)), stop,
                         scheduler=self.scheduler, events=self.events, step=self.step)

    def _progress_history(self) -> tuple[bool, ...]:
        """Whether each earlier stop of the run made progress, from its events. Read between the commit and
        the requeue, where nothing may raise: a log that cannot be read counts as no history (logged)."""
        try:
            return tuple(bool(e.get("progress")) for e in self.events.read() if e["event"] in ("requeue", "stop"))
        except Exception as exc:  # the records are validated; this guards the requeue against the unforeseen
            log.warning("cannot read the run's stops from %s (%s: %s): deciding without them", self.events.path,
                        type(exc).__name__, exc)
            return ()


def _clean(exc: BaseException | None) -> bool:
    """A finished run or a Preempted: every rank ends together (after an error some may not come)."""
    return exc is None or isinstance(exc, Preempted)


def _restarts(saved: Any, now: int) -> str:
    """The restart counts, where they say something (a relaunch by hand has the same as its checkpoint)."""
    return f" (saved by restart {saved}, this is restart {now})" if saved is not None and saved != now else ""


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
