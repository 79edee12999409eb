"""DataLoader iterators that jobwrap does not resume, caught when their use spans a step boundary.

``it = iter(train_loader)`` drawn with ``next(it)`` step after step (nanoGPT's
``while True`` loop), or a second loader's iterator drawn from inside the epoch
(``aux = iter(b)``): jobwrap checkpoints neither's place, so a resumed run starts it
again from its first batch and trains other batches than the run that was never
stopped. Nothing in the script says so; the iterator does, when it hands out
batches at two different steps. So while a Session runs, torch's DataLoader
iterators note the step of each batch they hand out (an attribute write), and one
that hands out a batch at another step than its previous one is refused there, in
the first epoch. A validation pass (a loader iterated within one step, or left
early and dropped) is never refused; neither is the iterator inside
``job.loader()``, which resumes, nor one a new epoch reset (persistent workers).
torchdata's StatefulDataLoader has its own iterator, left alone: its state can be
tracked. Under a torch whose iterator class is not 2.13's
(:func:`jobwrap._compat.torch_loader.iterator_class`), nothing is watched and one warning says so.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from jobwrap._compat import torch_loader
from jobwrap._compat.notice import fall_back
from jobwrap.errors import ConfigError

_original_next: Callable[[Any], Any] | None = None  # torch's __next__, while the watch replaces it
_watching: list["Steps"] = []  # the running sessions, innermost last
_UNSEEN = object()
_wrapped = 0  # >0 while job.loader() asks its own iterator for a batch: that iterator resumes


class Steps(Protocol):
    """What the watch needs of the session: its step, and whether a framework resumes its data itself."""

    step: int
    _data_resumed_elsewhere: bool


def watch_iterators(session: Steps) -> Callable[[], None]:
    """Watch DataLoader iterators while ``session`` runs; returns the undo."""
    global _original_next
    iterators = torch_loader.iterator_class()
    if iterators is None:  # a torch whose iterators jobwrap does not know: unwatched, and said so once
        fall_back(torch_loader.iterator_class_missing(),
                  "does not check DataLoader iterators used outside job.loader() across steps")
        return lambda: None
    if _original_next is None:
        _original_next = iterators.__next__
        iterators.__next__ = _watched_next  # type: ignore[method-assign]
    _watching.append(session)

    def undo() -> None:
        global _original_next
        if session in _watching:
            _watching.remove(session)
        if not _watching and _original_next is not None:
            iterators.__next__ = _original_next  # type: ignore[method-assign]
            _original_next = None

    return undo


class wrapped_pull:
    """Around job.loader()'s ``next()`` on its own iterator: the iterators asked inside are the resumed ones."""

    def __enter__(self) -> None:
        global _wrapped
        _wrapped += 1

    def __exit__(self, *exc: Any) -> None:
        global _wrapped
        _wrapped -= 1


def _watched_next(self: Any) -> Any:
    batch = _original_next(self)  # type: ignore[misc]
    if _watching:  # per batch, an attribute read and a comparison: the loop's hot path
        if _wrapped:
            self._jobwrap_step = None  # job.loader()'s: never refused
            return batch
        step = _watching[-1].step
        last = getattr(self, "_jobwrap_step", _UNSEEN)
        if last != step and last is not None:
            if last is _UNSEEN or torch_loader.yielded(self) == 1:  # new, or reset by a new epoch (persistent workers)
                self._jobwrap_step = step
            else:
                _refuse(self, last, step)
    return batch


def _refuse(iterator: Any, last: int, step: int) -> None:
    if _watching[-1]._data_resumed_elsewhere:  # a Trainer drives the loop and resumes its own loader
        iterator._jobwrap_step = None
        return
    dataset = type(torch_loader.iterator_dataset(iterator)).__name__
    raise ConfigError(
        f"a DataLoader over {dataset} handed out batches at step {last} and again at step {step} through the same "
        f"iterator, which jobwrap does not resume: a resumed run would start it again from its first batch and "
        f"train other batches than the uninterrupted run. Draw the training batches from a wrapped iterator, "
        f"`it = iter(job.loader(dl))` with `for step in job.steps(max_iters): x, y = next(it)` (it resumes "
        f"where the stopped run was), or create the iterator anew within each step (`for batch in val_loader:` "
        f"for a validation pass); for a second loader beside the training one, see job.loader() (one DataLoader "
        f"over torch.utils.data.StackDataset(a, b))")
