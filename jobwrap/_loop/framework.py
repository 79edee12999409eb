"""The seam through which a framework's own training loop drives a Session (jobwrap.lightning,
jobwrap.transformers): public methods, the only ones those modules use (tests/test_layout.py).

The framework iterates its loaders, counts its optimizer steps and resumes its own data; jobwrap
follows its counters, runs the boundary after each complete step and commits the checkpoint there.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from jobwrap._loop import steps


class FrameworkSeam:
    """Session's methods for a framework's own loop (Lightning's fit, the Hugging Face Trainer)."""

    def hand_data_to_framework(self) -> None:
        """The framework's loop iterates and resumes its own loaders (Lightning's fit, the Trainer): its
        DataLoader iterators outside :meth:`loader` are not refused (:mod:`jobwrap._loop.iterators`)."""
        self._data_resumed_elsewhere = True

    def framework_step(self, *, step: int, epoch: int) -> None:
        """The framework's optimizer step ``step`` (its global step count after it) of ``epoch`` is complete,
        with everything it triggers: jobwrap's step boundary. A signal commits the checkpoint here and
        raises :class:`Preempted`."""
        self.epoch, self.step = epoch, step - 1
        self.step_done()

    def framework_counts(self, *, epoch: int, step: int | None = None) -> None:
        """Follow the framework's counters without a boundary: at a point no resume could start from
        exactly (Lightning's epoch's last batch), or the epoch before the final save."""
        self.epoch = epoch
        if step is not None:
            self.step = step

    def framework_ready(self) -> None:
        """The framework's loop is set up (resumed: its loaders rebuilt) and about to fetch its first batch:
        the boundary before the first step, where the RNG streams are put back and a signal that came
        while resuming is honoured. No step is counted."""
        self._boundary()

    @contextlib.contextmanager
    def framework_draws(self) -> Iterator[None]:
        """Draws from the random streams inside are the framework's rebuild of resumed state (its loaders'
        iterators, which the loaded state overrides): not warned of at the first boundary, provided nothing
        else drew between :meth:`track` and them."""
        restored = self._rng_restored
        before = steps.rng_mark(self.device) if restored is not None else None
        try:
            yield
        finally:
            if before is not None and before == self._rng_restored:
                self._rng_restored = steps.rng_mark(self.device)
