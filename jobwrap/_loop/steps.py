"""Hand-written loops: the step iterator that owns the end condition, and the RNG check at the loop's start.

A loop written ``while True: ...; step += 1; job.step_done(); if step > max_iters: break``
tests its end after the boundary, so a signal in its last step resumes into one
step too many; :func:`steps` tests the end before each step, from the saved step.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Protocol

from jobwrap._storage.state import capture_rng, fingerprint

log = logging.getLogger("jobwrap")


class Loop(Protocol):
    """What :func:`steps` needs of the session (package-internal, hence the underscores)."""

    step: int

    def _boundary(self) -> None: ...
    def _step_done(self) -> None: ...


def steps(loop: Loop, total: int, *, resumed: bool, at_end: Callable[[], Any]) -> Iterator[int]:
    """Step numbers from the resumed one to ``total - 1``, a boundary after each; ``at_end()`` once done."""
    if resumed and loop.step >= total:
        say_finished(loop.step, f"{total} steps")
    loop._boundary()  # before the first step: the resume's RNG streams are put back here
    while loop.step < total:
        yield loop.step
        loop._step_done()
        loop._boundary()
    at_end()


def say_finished(step: int, total: str) -> None:
    """A finished run launched again trains nothing: say so instead of ending silently."""
    log.warning("already finished at step %d (%s): nothing left to train. To train again from the start, "
                "use a new checkpoint directory (JOBWRAP_DIR); to train longer, raise the total", step, total)


def rng_mark(device: Any) -> Any:
    """The RNG streams as they are now, by content: compared at the first boundary."""
    return fingerprint(capture_rng(device), by_content=True)


def warn_if_drawn(restored: Any, device: Any) -> None:
    """Warn when a random draw happened between ``track()`` (which restored the streams) and the loop."""
    if restored is not None and rng_mark(device) != restored:
        log.warning(
            "something drew from a random stream between job.track() and the loop's first step (e.g. a first "
            "batch fetched before the loop): resumed, it draws from the restored streams, which the loop then "
            "puts back, so the run is not bit-exact. Draw it before track() and track it: "
            "job.track(batch=get_batch()), then job['batch'] = get_batch() at the end of each step")
