"""The orchestrator a training loop talks to: resume, step boundaries, saves, requeue, exit.

The flow, top to bottom, with the phase it moves to (:mod:`jobwrap._loop.phases`; docs/design.md)::

    start()      trap signals, claim the directory, load the newest verified checkpoint    -> RESUMING (or TRAINING)
    track()      register models/optimizers/... and extras; each is restored at once
    epochs()     yields epoch numbers from where the run stopped
    loader()     yields batches from where the run stopped; each batch ends at a step boundary
    boundary     first one: the RNG put back, the checkpoint freed                          -> TRAINING
                 a signal? -> save, requeue (or not), raise Preempted                        -> STOPPING -> PREEMPTED
    close()      restore the handlers, record the exit, release the directory               -> CLOSED

This module holds the public methods and the lifecycle; each job has its own module, mixed into
:class:`Session`: :mod:`~jobwrap._loop.starting` (resumed or fresh), :mod:`~jobwrap._loop.boundary` (the
step boundary and the loader's side of it), :mod:`~jobwrap._loop.stop` (commit, decide, Preempted),
:mod:`~jobwrap._loop.saving` (the synchronous save), :mod:`~jobwrap._loop.periodic` (periodic and
background saves), :mod:`~jobwrap._loop.epoch_end` (a save after an epoch's loader loop) and
:mod:`~jobwrap._loop.framework` (the seam for Lightning's and the Trainer's loops). The parts they tie
together: :mod:`jobwrap._loop.directory`, :mod:`jobwrap._loop.resume`, :mod:`jobwrap._loop.payload`,
:mod:`jobwrap._loop.async_save`, :mod:`jobwrap._storage.sharded`, :mod:`jobwrap._loop.grads`. Time comes
from one ``clock``.
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
from jobwrap._loop import adopt, at_exit, steps, trackable
from jobwrap._loop.async_save import AsyncSaver
from jobwrap._loop.boundary import Boundary, LoopState
from jobwrap._loop.data import ResumableLoader
from jobwrap._loop.directory import ClaimedDirectory
from jobwrap._loop.distributed import Solo, join
from jobwrap._loop.epoch_end import EpochEnd, EpochEndState
from jobwrap._loop.framework import FrameworkSeam
from jobwrap._loop.grads import PendingGrads
from jobwrap._loop.interval import AutoInterval
from jobwrap._loop.iterators import watch_iterators
from jobwrap._loop.periodic import Periodic
from jobwrap._loop.phases import STARTED, Phase, move
from jobwrap._loop.resume import Resumed
from jobwrap._loop.saving import Saving, apart_from_rng
from jobwrap._loop.starting import Starting, Timeline, default_device, ensure_log_handler
from jobwrap._loop.stop import Stopping, clean_exit
from jobwrap._loop.workers import guard_dataloader_workers
from jobwrap._scheduler.env import JobEnv, read_env
from jobwrap._scheduler.schedulers import Scheduler, scheduler_for
from jobwrap._scheduler.signals import InterruptWatch, SignalTrap
from jobwrap._scheduler.stopping import Preempted, after_interrupt
from jobwrap._storage import sharded
from jobwrap._storage.events import EventLog
from jobwrap._storage.pids import Lifeline
from jobwrap._storage.state import RESERVED_KEYS, is_stateful, plain
from jobwrap._storage.store import Checkpoint, CheckpointStore
from jobwrap.errors import ConfigError

log = logging.getLogger("jobwrap")

T = TypeVar("T")


class Session(Starting, Boundary, Stopping, Saving, Periodic, EpochEnd, FrameworkSeam):
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
        self.extras: dict[str, Any] = {}
        self.resumed_from: Checkpoint | None = None
        self.last_checkpoint: Checkpoint | None = None
        self.run_id = ""
        self.group: Solo = Solo()
        self.events: EventLog  # the run's history, once start() has opened the directory
        self._phase = Phase.CREATED  # the lifecycle; each move is checked against phases.MOVES
        self._objects: dict[str, Any] = {}
        self._sharded: list[str] = []  # tracked names saved through torch.distributed.checkpoint (FSDP)
        self._loader: ResumableLoader | None = None
        self._loop = LoopState()  # the batch in hand, the loop that owns the boundaries (boundary.py)
        self._epoch_end = EpochEndState()  # a save after the epoch's loader loop (epoch_end.py)
        self._trap = SignalTrap(self.config.requeue_signals + self.config.exit_signals,
                                registry=self.job.trainers_dir, clock=clock)
        self._interrupts = InterruptWatch(clock)  # a Ctrl-C the script catches must not end as "finished"
        self._interrupts_told = 0  # the Ctrl-Cs already warned of at a boundary
        self._lifeline = Lifeline(None, clock)  # the `jobwrap run` not to outlive
        self._orphaned = False  # that `jobwrap run` is gone: stop as on a cancel
        self._resume: Resumed | None = None  # the loaded checkpoint (phase RESUMING), until the first boundary
        self._resume_data: dict[str, Any] | None = None  # the loader's position state, until a loader takes it
        self._resumed_step = -1
        self._rng_restored: Any = None  # the streams as track() put them back, until the first boundary
        self._resumed_fingerprint: Any = None  # the state as track() put it back from the checkpoint
        self._checkpoint_hooks: list[Callable[[], None]] = []  # on_checkpoint(): trackers' flushes
        self._adopted_path: str | None = None  # the init_from file this run started from
        self._preempted: Preempted | None = None  # raised at the stop (phase PREEMPTED), for at_exit
        self._saved_fingerprint: Any = None  # the state last_checkpoint holds (None: unknown, save again)
        self._handed_off: tuple[int, Any] = (-1, None)  # (step, fingerprint) last given to rank 0's background save
        self._last_save_time = clock()
        self._auto: AutoInterval | None = None  # save_every="auto": the interval from this run's measurements
        self._grads = PendingGrads(self._objects)
        self._saver = AsyncSaver(self.store, self.config, self._objects, clock=clock,
                                 payload=lambda ranks: self._payload(ranks or [self._saved_rank_state()]),
                                 layout=lambda: self._payload([self._rank_state()
                                                               for _ in range(self.group.world_size)]),
                                 fingerprint=self._fingerprint, meta=self._meta, last=lambda: self.last_checkpoint,
                                 committed=self._record_commit, event=lambda *a, **kw: self.events.append(*a, **kw))
        self._directory = ClaimedDirectory(self.store, self.config, self.job)
        self._unguard_workers: Callable[[], None] = lambda: None
        self._unwatch_iterators: Callable[[], None] = lambda: None
        self._data_resumed_elsewhere = False  # a framework's loop resumes its own loader (jobwrap._loop.iterators)
        self._scoped = False  # inside `with`: the block closes it; else the process's exit does (at_exit)
        self._epochs_used = False  # log lines name the epoch only in loops that have them
        self._proven = False  # every tracked state proven loadable after a step (the first boundary after one)
        self._timeline = Timeline(init_seconds=clock() - began)  # the relaunch's start-up, first batch, step

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Session":
        """Trap signals, claim the directory and load the newest verified checkpoint."""
        if self._phase in STARTED:
            return self
        self._phase = move(self._phase, Phase.STARTING)
        session_started = time.time()
        ensure_log_handler()
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
            self._phase = move(self._phase, Phase.CREATED)
            raise
        if not self._scoped:
            at_exit.close_at_exit(self)
        if found is not None:
            self._start_resumed(*found, load_seconds=load_seconds, session_started=session_started)
        self._phase = move(self._phase, Phase.RESUMING if self._resume is not None else Phase.TRAINING)
        interrupted = after_interrupt(self.events.read_tail(), self.step) if self.group.rank == 0 else None
        if interrupted:
            log.warning("%s", interrupted)
        self._auto = self._auto_interval()
        return self

    def close(self, exc: BaseException | None = None) -> None:
        """Restore the previous signal handlers and record how the process ended."""
        if self._phase not in STARTED:
            return
        self._grads.close()
        failure = self._close_saver(exc)
        exc = exc or failure
        self._trap.restore()
        self._interrupts.restore()
        self._unguard_workers()
        self._unwatch_iterators()
        # Every rank leaves together after a finished run or a Preempted; after an error some may not come.
        self.group.close(clean=clean_exit(exc))
        self._phase = move(self._phase, Phase.CLOSED)
        at_exit.forget(self)
        self._record_exit(exc)
        self._directory.release()
        self._preempted = None  # its traceback holds the loop's frames (a loader's workers, batches)
        if failure is not None:
            raise failure

    def requeue_through(self, scheduler: Scheduler) -> None:
        """Let ``scheduler.requeue()`` requeue the job in place of ``scontrol requeue`` (submitit's handler, after
        the commit): jobwrap still commits the checkpoint and decides whether a requeue is due (the caps)."""
        self.scheduler = scheduler

    def __enter__(self) -> "Session":
        self._scoped = True
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.close(exc)

    def _where(self) -> str:
        return f"step {self.step}, epoch {self.epoch}" if self._epochs_used or self.epoch else f"step {self.step}"

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
                self._resumed_fingerprint = self._fingerprint()
        if self._trap.received and self.resumed_from is not None and self.group.world_size == 1:
            # A signal that came while resuming: stop now, the state is the checkpoint's. With several
            # ranks the stop is a collective that only this rank would enter here (the others may be in
            # one of their own, building DDP): the first boundary, which every rank reaches, stops them all.
            self._boundary()
        return self

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

    # ------------------------------------------------------------ the loops
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
        resumed = self._phase is Phase.RESUMING or self.resumed_from is not None
        return self._owning_boundaries(steps.steps(self, total, resumed=resumed, at_end=self._save_at_end))

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
            self._epoch_end.next_epoch()
        self._boundary()
        self._save_at_end()

    def _save_at_end(self) -> None:
        if self.config.save_at_end:
            self.save(reason="end of training")

    # ------------------------------------------------------------ step boundary, save
    def step_done(self) -> None:
        """Explicit step boundary for loops that do not use :meth:`loader`: call after each step."""
        if self._phase is Phase.RESUMING:
            self._finish_resume(after_step=True)
        self._step_done()
        self._boundary()

    @property
    def should_stop(self) -> bool:
        """True once a trapped signal arrived (the next boundary will checkpoint and stop)."""
        return bool(self._trap.received) or self._orphaned

    def on_checkpoint(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before each checkpoint is taken (periodic, signal, end, ``save()``).

        For what must be on disk by the time the state it describes is committed: an experiment
        tracker's writer flushed here keeps every step logged before a commit through a kill
        (``jobwrap.trackers``). A hook that fails is logged and never costs the checkpoint.
        """
        self._checkpoint_hooks.append(hook)

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
        if self._phase is Phase.RESUMING and self.resumed_from is not None and apart_from_rng(
                self._fingerprint()) == apart_from_rng(self._resumed_fingerprint):
            # No step since the resume (a finished run launched again), nothing tracked changed: the state is the
            # checkpoint's, RNG streams aside (a random draw since, evaluation's): put them back as a boundary
            # would, and save nothing rather than a copy of the checkpoint with other streams.
            self._finish_resume()
        return self._commit(reason)


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
