"""A save after an epoch's job.loader() loop: at which epoch its resume starts, and the warning for state
changed after it (docs/design.md, "an epoch-end save").
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jobwrap._loop.distributed import NO_STOP

log = logging.getLogger("jobwrap")


@dataclasses.dataclass
class EpochEndState:
    """Where the epoch's job.loader() loop ran out, and what a save after it did."""
    # The loop ran out (its end-of-epoch code runs now): a save here resumes at the next epoch, since a
    # resume into this one would run that code a second time.
    loop_done: bool = False
    loop_end_state: Any = None  # the fingerprint when it ran out: a save before anything moved re-enters
    saved: bool = False  # the last save was one of those, made by this process
    warned: bool = False  # code after an epoch-end save changed the state: warned once

    def next_epoch(self) -> None:
        self.loop_done = self.saved = False


class EpochEnd:
    """Session's handling of a save made after the epoch's loader loop ran out (end-of-epoch code)."""

    def _warn_moved_after_epoch_end_save(self) -> None:
        """At the end of an epoch's body: a save after its job.loader() loop resumes at the next epoch, so code
        after that save which changes the state is skipped by a resume from it. Signals stop at the next
        boundary, after that code, so only a kill in between (SIGKILL, a lost node) can land there: warned
        once, in the first epoch it happens, not refused (save-then-validate is exact under every signal)."""
        if self._epoch_end.warned or not (self._epoch_end.saved and self._holds_step()
                                               and self._moved_since_save()):
            return
        self._epoch_end.warned = True
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
        if not self._epoch_end.loop_done or self._loop.in_batch:
            return False
        changed = state != self._epoch_end.loop_end_state
        if self.group.world_size > 1:  # every rank decides alike (the check at the epoch's end is collective)
            changed = self.group.agree(NO_STOP, changed)[1]
        return changed

    def _loader_exhausted(self) -> None:
        """The epoch's job.loader() loop ran out of batches: what follows is end-of-epoch code."""
        self._epoch_end.loop_done = bool(self._epochs_used)
        self._epoch_end.loop_end_state = self._fingerprint() if self._epoch_end.loop_done else None
