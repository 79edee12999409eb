"""A loader wrapper that makes every batch a step boundary and resumes mid-epoch exactly.

On resume in the middle of an epoch it rebuilds the epoch's batch order from the
RNG state the epoch started with: every global stream (the sampler's shuffle seed
and the workers' base seed are drawn when the iterator is created; forked
workers inherit NumPy's and Python's state) and the loader's own RNG sources
(``generator=``, a sampler's generator, a custom sampler's ``random.Random`` or
NumPy generator, a stateful sampler's ``state_dict``). It fast-forwards past the
batches already trained on, then puts back the state of the moment the checkpoint
was taken. The remaining batches are then exactly those, in exactly the order, of
the run that was never stopped. A DataLoader over a map-style dataset passes the
done batches by their indices alone, loading nothing (:mod:`jobwrap._loop.skipping`);
other loaders are iterated through them. A loader that knows its place (an
IterableDataset with ``state_dict``/``load_state_dict`` read in this process,
or any iterable with them) is resumed through that state instead of a replay.
Setups whose order cannot be rebuilt are refused when the loader is wrapped.
"""
from __future__ import annotations

import dis
import functools
import gc
import logging
import sys
import types
import weakref
from collections.abc import Iterator as IteratorABC
from typing import Any, Generic, Iterable, Iterator, Protocol, TypeVar

import torch

from jobwrap._compat.torch_loader import fetcher_ended, is_map_style
from jobwrap._loop import trace
from jobwrap._loop.iterators import wrapped_pull
from jobwrap._loop.rngs import own_rngs
from jobwrap._loop.rngs import rng_kind as _rng_kind
from jobwrap._loop.skipping import can_skip, open_at
from jobwrap._loop.workers import refuse_made_in_fetch
from jobwrap._storage.state import capture_rng, is_stateful, plain, restore_rng
from jobwrap.errors import ConfigError, StateMismatchError

log = logging.getLogger("jobwrap")
T = TypeVar("T")
_END = object()
_WALK_DEPTH = 4
_WALK_ITEMS = 32  # containers longer than this hold data, not a sampler's RNG
_OPAQUE = (torch.Tensor, torch.nn.Module, str, bytes, int, float, type, types.FunctionType, types.MethodType,
           types.ModuleType)
_OPEN_FIX = ("Pass something that starts over each time it is iterated (a DataLoader, a list, a class whose "
             "__iter__ returns a new iterator), or give it state_dict()/load_state_dict() so that jobwrap resumes "
             "it through its own state instead.")


class StepBoundary(Protocol):
    """What the loader needs of the session (:class:`jobwrap.Session` is one), so that this module needs
    nothing else of it. The methods are the package's own, hence the underscores: a script never calls them."""

    epoch: int
    position: int  # batches of this epoch done; the loader sets it to 0 when a fresh epoch starts

    def _loader_boundary(self) -> None:
        """A step boundary: the previous step is done and the next batch not yet fetched (unless a
        ``job.steps()`` loop owns the boundaries: then the batches do not count as steps)."""

    def _batch_started(self) -> None:
        """A batch was handed to the loop's body (inside a ``job.steps()`` loop: it counts in the position)."""

    def _batch_left(self) -> None:
        """The loop broke off with its batch (it does not count)."""

    def _batch_finished(self) -> None:
        """The body is done with its batch: it counts, unless a save() in the body counted it."""

    def _loader_batches_begin(self, loader: Any) -> None:
        """A wrapped loader's iterator asks for its first batch (another one mid-epoch is refused)."""

    def _loader_batches_end(self, loader: Any) -> None:
        """That iterator ended: exhausted, left by ``break``, or dropped."""

    def _loader_exhausted(self) -> None:
        """The epoch's batches ran out: the code that follows is the epoch's end."""


class ResumableLoader(Generic[T]):
    """Wraps a DataLoader (or any re-iterable); get one from :meth:`Session.loader`."""

    def __init__(self, session: StepBoundary, iterable: Iterable[T], *, restart_epoch: bool = False) -> None:
        check_resumable(iterable)
        self._restart_epoch = restart_epoch
        self._session = session
        self.iterable = iterable
        self._sources = rng_sources(iterable)
        self._stateful = stateful_part(iterable)
        self._skips = self._stateful is None and can_skip(iterable, self._sources, _rng_kind)
        if not self._skips:
            check_kept_workers(iterable)
        get_sources(self._sources)  # a state_dict that a checkpoint cannot hold fails here, not at the signal
        if self._stateful is not None and not _is_loader(self._stateful):
            _own_state(self._stateful)  # a StatefulDataLoader's state_dict() would start its workers here
        self._epoch: dict[str, Any] | None = None  # the global streams and sources when this epoch's iterator began
        self._iterator: Iterator[T] | None = None  # the epoch's iterator, for a loader resumed through its state
        self._resume: dict[str, Any] | None = None
        self.ran_in_epoch: int | None = None  # another loader wrapped in that epoch would take over its steps
        self._index = 0  # the batch in hand's index in its epoch
        self._handed: Any = lambda: None  # a weak reference to the batches iter() handed out last
        self._pulled_at: tuple[Any, int] | None = None  # (code, offset) of the `for` that pulled it
        self._checked = False  # whether this launch looked for an enumerate() around the batches

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        """The wrapped loader's attributes (``dataset``, ``sampler``, ``batch_size``...), as scripts read them."""
        if name.startswith("__") or name == "iterable":  # copy/pickle probes; before __init__ set it
            raise AttributeError(name)
        return getattr(self.iterable, name)

    def enumerate(self, start: int = 0) -> Iterator[tuple[int, T]]:
        """``(index of the batch in the epoch, batch)``: after a mid-epoch resume the index goes on where the
        stopped run was, where ``enumerate(job.loader(dl))`` would start again at 0 and shift every window keyed
        on it (``if (i + 1) % k == 0: optimizer.step()``)."""
        for batch in self:
            yield start + self._index, batch

    def __iter__(self) -> Iterator[T]:
        batches = self._batches()
        self._handed = weakref.ref(batches)
        return batches

    def _batches(self) -> Iterator[T]:
        session = self._session
        if not self._checked:  # once per launch, fresh ones too: the script learns it at once, not at a resume
            self._checked = True
            refuse_if_enumerated(self._handed())
        session._loader_batches_begin(self)
        try:
            yield from self._epoch_batches(session)
        finally:
            session._loader_batches_end(self)

    def _epoch_batches(self, session: StepBoundary) -> Iterator[T]:
        session._loader_boundary()
        iterator = self._start_epoch()
        length = _length(self.iterable)
        self.ran_in_epoch = session.epoch
        watched = self._watch_first_fetch()
        while True:
            try:
                with wrapped_pull():
                    batch = next(iterator)
            except StopIteration:
                session._loader_exhausted()
                return
            if watched is not None:
                refuse_made_in_fetch(watched, self.iterable.dataset, in_worker=False)
                watched = None
            self._index = session.position
            self._pulled_at = _pulling_loop()
            session._batch_started()
            if trace.active:  # jobwrap simulate's step trace: the batch's digest
                trace.note_batch(session, batch)
            try:
                yield batch
            except GeneratorExit:  # the loop was left (break): that batch is not counted, as before
                session._batch_left()
                raise
            session._batch_finished()  # a save() inside the body may have counted the batch already
            # After the epoch's last batch the boundary is the next epoch's start (Session.epochs),
            # once the user's end-of-epoch code (scheduler.step(), validation) has run.
            if length is None or session.position < length:
                session._loader_boundary()

    def _watch_first_fetch(self) -> set[str] | None:
        """The dataset's generators before the epoch's first fetch, where a StatefulDataLoader without workers
        reads it here: one that fetch makes (lazily) is state the loader's ``state_dict`` leaves out, so a
        resumed run would make it anew. (A skipping loader checks its own fetches; a replay is exact.)"""
        loader = self.iterable
        if (self._stateful is None or not _is_loader(self._stateful) or not _is_loader(loader)
                or loader.num_workers > 0 or not is_map_style(loader)):
            return None
        return set(own_rngs(loader.dataset))

    def body_running(self) -> bool:
        """Whether the loop that pulled the batch in hand is still in its body (a save there counts the batch),
        or was left by ``break`` with its iterator kept in a variable (the batch was not trained: as when
        the iterator is the loop's own, which ``break`` closes). A pull that is no ``for`` loop's: in the body."""
        return self._pulled_at is None or in_loop_body(*self._pulled_at, sys._getframe(1))

    def resume_kind(self) -> str:
        """How a mid-epoch resume finds its place: ``state`` (the loader's own state_dict), ``skip`` (indices
        alone, nothing loaded) or ``replay`` (the done batches fetched again and dropped)."""
        return "state" if self._stateful is not None else "skip" if self._skips else "replay"

    def _start_epoch(self) -> Iterator[T]:
        resume, self._resume = self._resume, None
        position = self._session.position if resume is not None else 0
        self._session.position = position
        if resume is not None:
            self._check_sources(resume)
        if position == 0 or (self._stateful is None and "epoch" not in resume):
            if resume is not None:  # the sources as the previous epoch left them
                put_sources(self._sources, resume["now"], stateful=True)
                # A StatefulDataLoader's state after its last batch draws other numbers at iter() than a new
                # epoch does: at an epoch's start it is rebuilt, like a DataLoader, from its RNG sources.
                if self._stateful is not None and "own" in resume and not _is_loader(self._stateful):
                    self._stateful.load_state_dict(resume["own"])
            self._epoch = {"rng": capture_rng(), "sources": get_sources(self._sources)}
            iterator = open_at(self.iterable, 0) if self._skips else iter(self.iterable)
        elif self._stateful is not None:
            iterator = self._continue(resume)
        else:
            iterator = self._replay(resume, position)
        # Kept only where a save asks it whether the dataset ended: it holds the workers of an abandoned epoch.
        self._iterator = iterator if self._stateful is not None else None
        return iterator

    def _replay(self, resume: dict[str, Any], position: int) -> Iterator[T]:
        """The epoch from its starting state, less the batches done; then the checkpoint's state back.

        A map-style DataLoader skips the done batches' indices without loading them (jobwrap._loop.skipping);
        anything else is iterated through them.
        """
        now = capture_rng()
        self._epoch = resume["epoch"]
        restore_rng(self._epoch["rng"])
        put_sources(self._sources, self._epoch["sources"], stateful=True)
        if self._skips:
            iterator = open_at(self.iterable, position)
        else:
            iterator = iter(self.iterable)
            for _ in range(position):
                if next(iterator, _END) is _END:
                    break
        restore_rng(now)
        # A stateful source was advanced by the replay as by the run; only RNGs may have been drawn by others.
        put_sources(self._sources, resume["now"], stateful=False)
        return iterator

    def _continue(self, resume: dict[str, Any]) -> Iterator[T]:
        """Resume through the loader's own state; the draws of creating its iterator were made before the save."""
        self._epoch = resume.get("epoch")
        self._stateful.load_state_dict(resume["own"])  # type: ignore[union-attr]
        if resume.get("ended"):  # its state already describes the next pass
            return iter(())
        now = capture_rng()
        iterator = iter(self.iterable)
        restore_rng(now)
        put_sources(self._sources, resume["now"], stateful=False)
        return iterator

    def _check_sources(self, resume: dict[str, Any]) -> None:
        saved = sorted(resume["now"])
        if saved != sorted(self._sources):
            raise StateMismatchError(
                f"the loader's RNG sources {sorted(self._sources)} are not those of the run that saved the "
                f"checkpoint {saved}: build the DataLoader, its sampler and generators as that run did, "
                f"or start a new run in a new directory")

    def state_dict(self) -> dict[str, Any]:
        if self._resume is not None:  # resumed, not yet iterated (a save at its first boundary): still that state
            return dict(self._resume)
        state: dict[str, Any] = {"now": get_sources(self._sources), "shape": loader_shape(self.iterable)}
        if self._epoch is not None:
            state["epoch"] = self._epoch
        if self._stateful is not None:
            state["own"] = _own_state(self._stateful)
            state["ended"] = fetcher_ended(self._iterator)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "epoch_rng" in state:
            state = _from_legacy(state)
        self._resume = dict(state) if "now" in state else None
        changed = shape_changes(state.get("shape"), loader_shape(self.iterable))
        position = self._session.position
        if not changed or position == 0:  # at an epoch's start no saved place is read with the new loader
            return
        if not self._restart_epoch:
            raise StateMismatchError(
                f"the loader is not built as in the run that saved the checkpoint ({'; '.join(changed)}): its saved "
                f"place, {position} batches into epoch {self._session.epoch}, would stand for other samples (some "
                f"never trained, some twice). Build the loader as that run did; or pass "
                f"job.loader(loader, restart_epoch=True) to train this epoch again from its first batch with the "
                f"new loader; or start a new run in a new directory")
        log.warning("the loader changed since the checkpoint (%s): restart_epoch=True, so epoch %d starts over "
                    "from its first batch (its %d batches trained before are trained again)",
                    "; ".join(changed), self._session.epoch, position)
        self._session.position = 0
        self._resume = None


def refuse_if_enumerated(batches: Any) -> None:
    """Refuse an ``enumerate()`` around the batches: after a mid-epoch resume it counts from 0, not from the
    stopped run's place, and a window keyed on that index (gradient accumulation, a schedule) shifts.

    Looked for at the first batch of every launch, a fresh one too, so the script fails at its start rather
    than at the first resume hours later; once per launch because ``gc.get_referrers`` walks the heap.
    """
    if batches is not None and any(isinstance(ref, enumerate) for ref in gc.get_referrers(batches)):
        raise ConfigError(
            "enumerate(job.loader(...)) restarts at 0 after a mid-epoch resume, shifting anything keyed on the "
            "batch index (accumulation, schedules): write `for i, batch in job.loader(dl).enumerate():` instead, "
            "whose index goes on where the stopped run was")


def _pulling_loop() -> tuple[Any, int] | None:
    """(code, offset) of the ``for`` statement, outside this module, that asked for the next batch; else None."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:  # through enumerate()
        frame = frame.f_back
    if frame is None or _loop_lines(frame.f_code, frame.f_lasti) is None:
        return None
    return frame.f_code, frame.f_lasti


@functools.lru_cache(maxsize=64)
def _loop_lines(code: types.CodeType, offset: int) -> tuple[int, int] | None:
    """The source lines of the body of the ``for`` loop whose FOR_ITER is at ``offset``, or None."""
    at = next((i for i in dis.get_instructions(code) if i.offset == offset), None)
    if at is None or not at.opname.startswith("FOR_ITER"):
        return None
    # By lines, not offsets: exception handlers inside the body are compiled out of line, after it.
    lines = [line for start, end, line in code.co_lines() if line is not None and offset < end and start < at.argval]
    return (min(lines), max(lines)) if lines else None


def in_loop_body(code: types.CodeType, offset: int, frame: Any) -> bool:
    """Whether the innermost running frame of ``code`` (from ``frame`` outwards) is inside that loop's body.

    No such frame (the function that looped has returned): the loop was left.
    """
    first, last = _loop_lines(code, offset) or (0, sys.maxsize)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None and first <= frame.f_lineno <= last


def loader_shape(iterable: Any) -> dict[str, Any]:
    """What decides which samples a saved position covers: batch size, lengths, sampler kind, drop_last."""
    shape: dict[str, Any] = {"type": type(iterable).__name__, "batches": _length(iterable)}
    if isinstance(iterable, torch.utils.data.DataLoader):
        shape.update(batch_size=iterable.batch_size, drop_last=iterable.drop_last,
                     samples=_length(iterable.dataset), sampler=type(iterable.sampler).__name__,
                     batch_sampler=type(iterable.batch_sampler).__name__)
        if not is_map_style(iterable):  # workers split an iterable dataset between them
            shape["num_workers"] = iterable.num_workers
    return shape


def shape_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``"batch_size 6 -> 8"`` for each setting that differs (none for a checkpoint that kept no shape)."""
    if saved is None:
        return []
    return [f"{key} {saved.get(key)} -> {now.get(key)}" for key in sorted(set(saved) | set(now))
            if saved.get(key) != now.get(key)]


def _from_legacy(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of a jobwrap that kept only torch's epoch-start state and the loader's generator."""
    sources = {"generator": state["generator"]} if "generator" in state else {}
    return {"now": sources, "epoch": {"rng": {**capture_rng(), "torch": state["epoch_rng"]}, "sources": sources}}


# ---------------------------------------------------------------- what a loader is made of

def check_resumable(iterable: Any) -> None:
    """Refuse, with the way out, a loader whose order a resumed run cannot rebuild."""
    if isinstance(iterable, IteratorABC) and not is_stateful(iterable):
        raise ConfigError(f"job.loader() got a {type(iterable).__name__}, which can be iterated only once: a resumed "
                          f"run cannot replay it to find its place, and a second epoch would be empty. {_OPEN_FIX}")
    if not isinstance(iterable, torch.utils.data.DataLoader):
        return
    if not getattr(iterable, "in_order", True) and iterable.num_workers > 0:
        raise ConfigError(
            "DataLoader(in_order=False) hands out batches in the order the workers finish them, which no run "
            "can repeat. Build the DataLoader with in_order=True (the default) instead.")
    for name in ("sampler", "batch_sampler"):
        part = getattr(iterable, name, None)
        if isinstance(part, IteratorABC) and not is_stateful(part):
            raise ConfigError(
                f"the DataLoader's {name} is a {type(part).__name__}, which can be iterated only once: a resumed "
                f"run cannot replay its order, and a second epoch would be empty. Pass a {name} class whose "
                f"__iter__ starts over (torch.utils.data.Sampler) instead.")


def check_kept_workers(iterable: Any) -> None:
    """Refuse persistent workers where the loader is replayed: only a skipping loader seeds them per batch."""
    if isinstance(iterable, torch.utils.data.DataLoader) and iterable.persistent_workers and iterable.num_workers > 0:
        raise ConfigError(
            "DataLoader(persistent_workers=True) keeps its worker processes, and the RNG state inside them, from "
            "one epoch to the next, and draws the workers' seed only in its first epoch: this loader (an "
            "IterableDataset, a dataset with its own RNG or state, a DataLoader subclass with its own iterator, "
            "a StatefulDataLoader) is resumed by replaying its epoch in new workers, which can rebuild neither. "
            "Build the DataLoader with persistent_workers=False (the default) instead; a DataLoader over a "
            "map-style dataset supports persistent workers.")


def stateful_part(iterable: Any) -> Any:
    """What knows the loader's place in this process: the iterable itself (torchdata's StatefulDataLoader,
    whose state holds its sampler's and every worker's place), or a DataLoader's IterableDataset."""
    if is_stateful(iterable) or not isinstance(iterable, torch.utils.data.DataLoader):
        return iterable if is_stateful(iterable) else None
    dataset = iterable.dataset
    # With workers the dataset's copies in the worker processes advance, never the one here.
    if isinstance(dataset, torch.utils.data.IterableDataset) and is_stateful(dataset) and iterable.num_workers == 0:
        return dataset
    return None


def rng_sources(iterable: Any) -> dict[str, Any]:
    """{path: object} of the RNGs and stateful samplers a loader draws its order from, besides the global streams."""
    if isinstance(iterable, torch.utils.data.DataLoader):
        roots = {"generator": iterable.generator, "sampler": iterable.sampler,
                 "batch_sampler": iterable.batch_sampler, "dataset": iterable.dataset}
    elif isinstance(iterable, (list, tuple, dict, str, bytes)) or is_stateful(iterable):
        return {}
    else:
        roots = {"iterable": iterable}
    found: dict[str, Any] = {}
    seen: set[int] = {id(stateful_part(iterable))}
    for name, root in roots.items():
        _walk(root, name, found, seen, _WALK_DEPTH)
    return found


def _walk(obj: Any, path: str, found: dict[str, Any], seen: set[int], depth: int) -> None:
    if obj is None or id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if _rng_kind(obj) is not None or (is_stateful(obj) and not isinstance(obj, torch.nn.Module)):
        found[path] = obj
        return
    if isinstance(obj, _OPAQUE):
        return
    if isinstance(obj, (list, tuple)):
        items = enumerate(obj) if len(obj) <= _WALK_ITEMS else ()
    elif isinstance(obj, dict):
        items = obj.items() if len(obj) <= _WALK_ITEMS else ()
    else:
        items = getattr(obj, "__dict__", {}).items()
    for key, value in list(items):
        _walk(value, f"{path}.{key}", found, seen, depth - 1)


def get_sources(sources: dict[str, Any]) -> dict[str, Any]:
    """Each source's state as tensors and plain values (``weights_only`` loads them)."""
    return {path: _get_state(obj) for path, obj in sources.items()}


def put_sources(sources: dict[str, Any], states: dict[str, Any], *, stateful: bool) -> None:
    """Set each RNG source (and each stateful one, with ``stateful``) to the state in ``states``."""
    for path, obj in sources.items():
        if _rng_kind(obj) is not None or stateful:
            _set_state(obj, states[path])


def _get_state(obj: Any) -> Any:
    kind = _rng_kind(obj)
    if kind == "torch":
        return obj.get_state()
    if kind == "python":
        version, internal, gauss = obj.getstate()
        return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    if kind == "numpy-legacy":
        name, keys, pos, has_gauss, cached = obj.get_state()
        return {"kind": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if kind == "numpy":
        return _to_plain(obj.bit_generator.state)
    return _own_state(obj)


def _own_state(obj: Any) -> Any:
    """``obj.state_dict()`` as ``weights_only`` loads it, or a ConfigError naming the object."""
    try:
        return plain(obj.state_dict(), f"{type(obj).__name__}.state_dict()")
    except ConfigError as exc:
        raise ConfigError(f"job.loader(): the loader's {type(obj).__name__} has a state_dict() that a checkpoint "
                          f"cannot hold ({exc}). Return only numbers, strings, lists, dicts and tensors from it.") from exc


def _set_state(obj: Any, state: Any) -> None:
    kind = _rng_kind(obj)
    if kind == "torch":
        obj.set_state(state.cpu())
    elif kind == "python":
        obj.setstate((state["version"], tuple(int(v) for v in state["state"].tolist()), state["gauss"]))
    elif kind == "numpy-legacy":
        obj.set_state((state["kind"], state["keys"].numpy().astype("uint32"), state["pos"], state["has_gauss"],
                       state["cached_gaussian"]))
    elif kind == "numpy":
        obj.bit_generator.state = _from_plain(state)
    else:
        obj.load_state_dict(state)


def _to_plain(value: Any) -> Any:
    """A NumPy bit generator's state: arrays become int64 tensors tagged with their dtype."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if hasattr(value, "dtype") and hasattr(value, "astype"):
        return {"ndarray": torch.from_numpy(value.astype("int64")), "dtype": str(value.dtype)}
    return value


def _from_plain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"ndarray", "dtype"}:
        return value["ndarray"].numpy().astype(value["dtype"])
    if isinstance(value, dict):
        return {k: _from_plain(v) for k, v in value.items()}
    return value


def _is_loader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader)


def _length(iterable: Any) -> int | None:
    """len(iterable), or None: a DataLoader over an IterableDataset has __len__ but may raise."""
    try:
        return len(iterable)
    except (TypeError, NotImplementedError):
        return None


