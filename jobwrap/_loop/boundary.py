"""The step boundary of a Session, and the loader's side of it (jobwrap._loop.data.StepBoundary).

At a boundary: the loaded checkpoint is freed (the RNG streams put back), a Ctrl-C caught by the
script is told, the lifeline to `jobwrap run` is checked, a signal stops the run (stop.py), a
periodic save is started (periodic.py). The ranks agree every ``sync_every_steps``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

from jobwrap._loop import hold, steps, trace, trackable
from jobwrap._loop.data import ResumableLoader
from jobwrap._loop.distributed import NO_STOP, WRITER_BUSY, WRITER_DONE, WRITER_IDLE
from jobwrap._loop.phases import Phase, move
from jobwrap._storage import savable
from jobwrap.errors import ConfigError

log = logging.getLogger("jobwrap")


@dataclasses.dataclass
class LoopState:
    """Which loop owns the boundaries, and the batch in hand."""
    in_batch: bool = False  # between the loader yielding a batch and the end of the loop's body
    # Inside job.steps(), the steps own the boundaries: batches pulled with next() from job.loader()
    # count in the position when handed out, and are no steps of their own (fed: one was pulled).
    steps_loop: bool = False
    steps_fed: bool = False
    running: ResumableLoader | None = None  # the loader whose iterator is mid-epoch (handing out batches)


class Boundary:
    """Session's step boundary and the loader's calls into it (package-internal, hence the underscores)."""

    def _boundary(self) -> None:
        if self._phase is Phase.RESUMING:
            self._finish_resume()
        if len(self._interrupts.received) > self._interrupts_told:
            self._went_on_after_interrupt()
        self._orphaned = self._orphaned or self._lifeline.cut()  # then it stops as on a cancel
        if self.config.test_trace:  # jobwrap simulate: the state's digest, before a hold's signal stops here
            trace.record(self)
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
        self._phase = move(self._phase, Phase.TRAINING)
        resumed.warn_untracked([*self._objects, *self.extras])

    def _went_on_after_interrupt(self) -> None:
        """The script caught a Ctrl-C and trains on: say so once per Ctrl-C, and record it in the events log."""
        self._interrupts_told = len(self._interrupts.received)
        log.warning("SIGINT (Ctrl-C) interrupted training and the script caught it and went on, now at %s: the step "
                    "it broke may be half done, so from here this run is not the uninterrupted one (checkpoints "
                    "saved from now on hold that)", self._where())
        self.events.append("interrupt", step=self.step, epoch=self.epoch)

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

    # The loader's side of the boundary (jobwrap._loop.data.StepBoundary).
    def _step_done(self) -> None:
        self.step += 1
        if not (self._loop.steps_loop and self._loop.steps_fed):  # else the loader counted them as it handed them out
            self.position += 1
        if self._timeline.first_step_pending:  # a resumed process's first new step: the end of its relaunch
            self._timeline.first_step_pending = False
            self.events.append("first-step", step=self.step, first_batch=self._timeline.first_batch_at)

    def _batch_started(self) -> None:
        """The loader handed out a batch: the loop's body trains on it now (in a steps() loop: the step does)."""
        if self._loop.steps_loop:
            self._loop.steps_fed = True
            self.position += 1
        else:
            self._loop.in_batch = True
        if self._timeline.first_step_pending and self._timeline.first_batch_at is None:
            self._timeline.first_batch_at = round(time.time(), 3)

    def _batch_left(self) -> None:
        """The loop broke off with its batch: nothing counts it (a save() in the body already did)."""
        self._loop.in_batch = False

    def _batch_finished(self) -> None:
        """The body is done with its batch: count it, unless a save() inside the body counted it already."""
        if self._loop.in_batch:
            self._loop.in_batch = False
            self._step_done()

    def _loader_batches_begin(self, loader: ResumableLoader) -> None:
        """A wrapped loader's iterator asks for its first batch: refused while another one is mid-epoch."""
        if self._loop.running is not None:
            raise ConfigError(
                "job.loader(): a second job.loader() iterator asked for its first batch while another one is "
                "mid-epoch (zip(job.loader(a), job.loader(b)), or nested loops): each would count the steps and "
                "save its position over the other's. Wrap only the training loader, and take the other batches "
                "from it: one DataLoader over both datasets (torch.utils.data.StackDataset(a, b)) in job.loader(), "
                "or `for i, batch in job.loader(a).enumerate():` with the other batch picked from b's dataset by "
                "the index i, which resumes with it; a second DataLoader iterated directly is exact only within "
                "one step (a validation pass)")
        self._loop.running = loader

    def _loader_batches_end(self, loader: ResumableLoader) -> None:
        """That iterator ended: exhausted, left by ``break``, or dropped."""
        if self._loop.running is loader:
            self._loop.running = None

    def _loader_boundary(self) -> None:
        """The loader's boundary before each batch; inside a steps() loop the step's own is the one."""
        if not self._loop.steps_loop:
            self._boundary()

    def _owning_boundaries(self, numbers: Iterator[int]) -> Iterator[int]:
        """While a steps() loop runs, it alone makes boundaries: one per step, even with a loader's next() inside."""
        self._loop.steps_loop = True
        try:
            yield from numbers
        finally:
            self._loop.steps_loop = False
