"""A Session's periodic saves: when one is due, and the background save (jobwrap._loop.async_save) handed the
state, collected at the next agreement of the ranks.
"""
from __future__ import annotations

import logging

from jobwrap._loop.distributed import save_on_rank0
from jobwrap._storage import deadline
from jobwrap._storage.store import Checkpoint
from jobwrap.errors import StorageError

log = logging.getLogger("jobwrap")


class Periodic:
    """Session's periodic saves, in the background or synchronous, and every rank's view of their commits."""

    def _periodic_save_due(self) -> bool:
        cfg = self.config
        saved_step = self.last_checkpoint.step if self.last_checkpoint is not None else None
        if cfg.save_every == "auto":
            return (self._auto is not None and saved_step != self.step
                    and self._auto.due(self.clock() - self._last_save_time, self.last_checkpoint))
        return deadline.periodic_save_due(
            step=self.step, saved_step=saved_step, every_steps=cfg.save_every_steps,
            every_seconds=cfg.save_every_seconds, now=self.clock(), last_save=self._last_save_time)

    def _periodic_save(self) -> None:
        try:
            if self._async_periodic():
                self._before_checkpoint()  # save() runs the hooks itself
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
