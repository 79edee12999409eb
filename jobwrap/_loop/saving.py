"""The synchronous save of a Session: what is saved (fingerprint, payload), the write and its report.

A save is skipped only when the last checkpoint holds the current state (its fingerprint);
rank 0 writes; the commit protocol is :mod:`jobwrap._storage.store`'s.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

from jobwrap._format import human_size
from jobwrap._loop import payload
from jobwrap._loop.distributed import NO_STOP, save_on_rank0
from jobwrap._loop.stop import clean_exit
from jobwrap._storage import progress, sharded, striped
from jobwrap._storage.state import fingerprint
from jobwrap._storage.store import Checkpoint
from jobwrap.errors import JobwrapError

log = logging.getLogger("jobwrap")


class Saving:
    """Session's save: the fingerprint of the state, the payload, rank 0's write and its report."""

    def _commit(self, reason: str) -> Checkpoint:
        """:meth:`Session.save` once started: the batch in hand counted, a save in flight settled, then the write."""
        if self._loop.in_batch:  # a batch in hand counts if the loop's body is running, not once the loop is left
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
        self._epoch_end.saved = self._after_end_of_epoch_code(state)
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

    def _before_checkpoint(self) -> None:
        """The on_checkpoint() hooks; one that fails (a tracker's disk or server) is logged, the save goes on."""
        for hook in self._checkpoint_hooks:
            try:
                hook()
            except Exception as exc:
                log.warning("a hook before the checkpoint at step %d failed, the checkpoint goes ahead: %r",
                            self.step, exc)

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
                             stripes=stripes, object_states=states, epoch_done=self._epoch_end.saved)

    def _meta(self, reason: str) -> dict[str, Any]:
        return payload.meta(reason, run_id=self.run_id, job=self.job)

    def _close_saver(self, exc: BaseException | None) -> BaseException | None:
        """Let a background save in flight commit; its failure is returned, after a clean exit on every rank.

        With several ranks, a failure raised on rank 0 alone would make it skip the barrier of
        ``group.close`` and leave the other ranks waiting there: rank 0's outcome is shared first.
        """
        failure = self._saver.close(exc)
        if self.group.world_size == 1 or not self._async_periodic() or not clean_exit(exc):
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


def apart_from_rng(fingerprint: Any) -> Any:
    """A :meth:`Saving._fingerprint` without the rank's RNG and data state (its sixth part)."""
    return fingerprint[:5] + fingerprint[6:] if isinstance(fingerprint, tuple) else fingerprint
