"""A loader wrapper that makes every batch a step boundary and resumes mid-epoch exactly.

On resume in the middle of an epoch it rebuilds the epoch's batch order from the
RNG state the epoch started with (the sampler's shuffle seed and the workers'
base seed are drawn when the iterator is created), fast-forwards past the
batches already trained on, and then puts back the RNG state of the moment the
checkpoint was taken. The remaining batches are then exactly those, in exactly
the order, of the run that was never stopped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Iterable, Iterator, TypeVar

import torch

from jobwrap.state import capture_rng, restore_rng

if TYPE_CHECKING:
    from jobwrap.session import Session

T = TypeVar("T")
_END = object()


class ResumableLoader(Generic[T]):
    """Wraps a DataLoader (or any re-iterable); get one from :meth:`Session.loader`."""

    def __init__(self, session: "Session", iterable: Iterable[T]) -> None:
        self._session = session
        self.iterable = iterable
        self._epoch_rng: torch.Tensor | None = None
        self._epoch_generator: torch.Tensor | None = None
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        session = self._session
        session._boundary()
        iterator = self._start_epoch()
        length = len(self.iterable) if hasattr(self.iterable, "__len__") else None
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            session._batch_started()
            try:
                yield batch
            except GeneratorExit:  # the loop was left (break): that batch is not counted, as before
                session._batch_left()
                raise
            session._batch_finished()  # a save() inside the body may have counted the batch already
            # After the epoch's last batch the boundary is the next epoch's start (Session.epochs),
            # once the user's end-of-epoch code (scheduler.step(), validation) has run.
            if length is None or session.position < length:
                session._boundary()

    def _start_epoch(self) -> Iterator[T]:
        generator = getattr(self.iterable, "generator", None)
        resume, self._resume = self._resume, None
        position = self._session.position if resume is not None else 0
        self._session.position = position
        if position == 0:
            self._epoch_rng = torch.get_rng_state()
            self._epoch_generator = generator.get_state() if generator is not None else None
            return iter(self.iterable)
        # Replay the epoch from its starting RNG state, then return to the checkpoint's RNG state.
        now = capture_rng()
        self._epoch_rng = resume["epoch_rng"].cpu()
        self._epoch_generator = resume.get("generator")
        torch.set_rng_state(self._epoch_rng)
        if generator is not None and self._epoch_generator is not None:
            generator.set_state(self._epoch_generator.cpu())
        iterator = iter(self.iterable)
        for _ in range(position):
            if next(iterator, _END) is _END:
                break
        restore_rng(now)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._epoch_rng is not None:
            state["epoch_rng"] = self._epoch_rng
        if self._epoch_generator is not None:
            state["generator"] = self._epoch_generator
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state) if state.get("epoch_rng") is not None else None
