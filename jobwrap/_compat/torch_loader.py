"""torch's DataLoader internals that jobwrap relies on, one adapter each (checked on torch 2.13.0).

Two features need them. The mid-epoch skip (:mod:`jobwrap._loop.skipping`) builds a
DataLoader's iterator over another index sampler and seeds each batch in the workers;
the worker shield (:mod:`jobwrap._loop.workers`) replaces the function torch starts a
worker with. Nothing else of jobwrap touches a private name of torch's DataLoader.

Where torch is not what these adapters expect, :func:`skip_unrecognised` says so before
the first epoch and the loader is replayed instead of skipped (exact, slower), with one
warning naming the internal and the version; persistent workers, which only the skip
can make exact, are then refused by the caller. Each adapter has its canary in
tests/test_compat.py.
"""
from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, IterableDataset

from jobwrap._compat.notice import changed

CHECKED = "2.13.0"
ADAPTER = "torch_loader.py"
# The arguments of the worker loop that per-batch seeding reads or rewraps, by name.
WORKER_ARGUMENTS = ("index_queue", "collate_fn", "base_seed")


def _changed(internal: str, difference: str) -> str:
    return changed("torch", internal, ADAPTER, difference, CHECKED)


# ---------------------------------------------------------------- the worker entry point

class EntryPoint:
    """A module attribute that a loader kind reads each time it starts a worker process: jobwrap's hook.

    torch's ``_MultiProcessingDataLoaderIter`` starts each worker with
    ``target=_utils.worker._worker_loop``, read at that moment; replacing the attribute
    reaches every DataLoader of the process. :meth:`original` is torch's function even
    while it is replaced (in a forked worker too; a spawned worker imports the module
    afresh, where it was never replaced). Picklable by its place, for spawned workers.
    """

    def __init__(self, module: str, name: str) -> None:
        self.module_name, self.name = module, name
        self._original: Callable[..., Any] | None = None

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return entry_point, (self.module_name, self.name)

    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    def original(self) -> Callable[..., Any] | None:
        """The project's own entry point (None where the module has no such attribute)."""
        if self._original is not None:
            return self._original
        found = getattr(self.module(), self.name, None)
        return found if callable(found) else None

    def replace(self, hook: Callable[..., Any]) -> None:
        original = self.original()
        if original is None:
            raise AttributeError(f"{self.module_name}.{self.name}")
        self._original = original
        setattr(self.module(), self.name, hook)

    def restore(self, hook: Callable[..., Any]) -> None:
        """Put the original back, where ``hook`` is still what the module holds (nobody replaced it since)."""
        module = self.module()
        if getattr(module, self.name, None) is hook and self._original is not None:
            setattr(module, self.name, self._original)
            self._original = None

    def unrecognised(self) -> str | None:
        """What differs from the checked version in the entry point's arguments per-batch seeding rewires."""
        loop = self.original()
        if loop is None:
            return "it is gone"
        try:
            params = inspect.signature(loop).parameters
        except (TypeError, ValueError):
            return "its signature cannot be read"
        missing = [name for name in WORKER_ARGUMENTS if name not in params]
        return f"it takes no argument {', '.join(missing)}" if missing else None


_ENTRY_POINTS: dict[tuple[str, str], EntryPoint] = {}


def entry_point(module: str, name: str) -> EntryPoint:
    """The one :class:`EntryPoint` of the process at ``module.name`` (so a spawned worker finds its original)."""
    return _ENTRY_POINTS.setdefault((module, name), EntryPoint(module, name))


WORKER_LOOP = entry_point("torch.utils.data._utils.worker", "_worker_loop")


def after_worker_signal_handlers(after: Callable[[], None]) -> bool:
    """In a worker, before torch's loop runs: call ``after()`` right after the loop installs its C signal
    handlers (``signal_handling._set_worker_signal_handlers``, its first call). False where torch has no such
    function (the caller then calls ``after()`` itself, before the loop)."""
    from torch.utils.data._utils import signal_handling

    install = getattr(signal_handling, "_set_worker_signal_handlers", None)
    if not callable(install):
        return False

    def install_then_after(*args: Any, **kwargs: Any) -> None:
        install(*args, **kwargs)
        after()
    signal_handling._set_worker_signal_handlers = install_then_after
    return True


def batch_task_index(task: Any) -> int | None:
    """A worker's task ``(send index, indices)`` (torch) or ``(send index, (indices, snapshot))`` (torchdata):
    its index in the iterator's order; None for a control message."""
    if isinstance(task, tuple) and task and isinstance(task[0], int):
        return task[0]
    return None


def resume_seed(task: Any) -> int | None:
    """The epoch's seed a persistent worker gets with ``_utils.worker._ResumeIteration`` (None for another task)."""
    if type(task).__name__ == "_ResumeIteration" and isinstance(getattr(task, "seed", None), int):
        return task.seed
    return None


# ---------------------------------------------------------------- the iterator the skip builds

def is_map_style(loader: Any) -> bool:
    """Whether ``loader`` is a DataLoader that fetches by indices from its sampler: torch's own test
    (``DataLoader.__init__`` sets ``_dataset_kind`` from it), without reading the private field."""
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)


def builds_own_iterator(loader: DataLoader) -> bool:
    """Whether ``loader``'s class overrides how DataLoader makes its iterator (``__iter__``/``_get_iterator``)."""
    cls = type(loader)
    return cls.__iter__ is not DataLoader.__iter__ or getattr(cls, "_get_iterator", None) is not getattr(
        DataLoader, "_get_iterator", None)


def index_sampler(loader: DataLoader) -> Any:
    """``DataLoader._index_sampler``: the batch sampler with automatic batching, else the sampler."""
    return loader._index_sampler


class LoaderView:
    """``loader`` as a DataLoader iterator reads it, with another index sampler (DataLoader forbids setting it)."""

    def __init__(self, loader: DataLoader, index_sampler: Any) -> None:
        self._loader = loader
        self._index_sampler = index_sampler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def iterator_over(loader: DataLoader, sampler: Any) -> Any:
    """``DataLoader._get_iterator`` on a view of ``loader`` whose ``_index_sampler`` is ``sampler``: the iterator
    ``iter(loader)`` would make (its draws: the workers' base seed, the sampler's), drawing its indices from
    ``sampler``. :func:`skip_unrecognised` checks first that the iterator reads them from there."""
    return DataLoader._get_iterator(LoaderView(loader, sampler))  # type: ignore[arg-type]


def sampler_iterator(iterator: Any) -> Any:
    """``_BaseDataLoaderIter._sampler_iter``: the iterator over the index sampler the batches' indices come from."""
    return iterator._sampler_iter


def base_seed(iterator: Any) -> int:
    """``_BaseDataLoaderIter._base_seed``: the seed drawn for the iterator's workers (drawn without workers too)."""
    return int(iterator._base_seed)


def wrap_fetcher(iterator: Any, wrap: Callable[[Any], Any]) -> None:
    """Replace a single-process iterator's ``_dataset_fetcher`` (what fetches each batch) with ``wrap(it)``."""
    iterator._dataset_fetcher = wrap(iterator._dataset_fetcher)


def fetcher_ended(iterator: Any) -> bool:
    """Whether a single-process iterator over an IterableDataset has hit its end (its fetcher's ``ended``, set when
    the dataset ran out inside a batch); False for any other iterator."""
    return bool(getattr(getattr(iterator, "_dataset_fetcher", None), "ended", False))


def draw_base_seed(loader: DataLoader) -> int:
    """The draw ``_BaseDataLoaderIter.__init__`` makes for its workers' base seed (the same generator, the same
    operation), so that persistent workers get the seed a new iterator would have drawn."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator).item())


def kept_iterator(loader: DataLoader) -> Any:
    """``DataLoader._iterator``: the iterator a loader with persistent workers keeps between epochs."""
    return loader._iterator


def keep(loader: DataLoader, iterator: Any) -> None:
    """Make ``iterator`` the one ``loader`` keeps for its next epochs, drawing from the loader's index sampler."""
    iterator._index_sampler = loader._index_sampler
    loader._iterator = iterator


def drop_kept(loader: DataLoader) -> None:
    """Shut the kept iterator's workers down and forget it (a mid-epoch resume starts new ones)."""
    loader._iterator._shutdown_workers()
    loader._iterator = None


def restart_kept(loader: DataLoader, seed: int) -> Any:
    """Start the kept iterator's next epoch (``_reset``), its workers told ``seed`` with ``_ResumeIteration``."""
    kept = loader._iterator
    kept._shared_seed = seed  # torch reads it only for an IterDataPipe; a worker sees it in its resume message
    kept._reset(loader)
    return kept


# ---------------------------------------------------------------- is this torch the one the skip was checked on

class _Marked:
    """An index sampler whose first batch is ``[1]``: a probe iterator that reads it hands out item 1 first."""

    def __iter__(self) -> Any:
        return iter([[1]])

    def __len__(self) -> int:
        return 1


def skip_unrecognised(loader: DataLoader) -> str | None:
    """None where this torch builds and feeds ``loader``'s iterator as the skip expects; else what changed.

    A probe, not a version check: a throwaway iterator over a two-item list is built through
    :func:`iterator_over` (no workers, its own generator: no global draw) and must hand out
    the marked sampler's batch, keep that sampler's iterator and a dataset fetcher, and draw
    its base seed as :func:`draw_base_seed` does. A release that read the sampler from elsewhere (the
    ``batch_sampler`` attribute, say) would otherwise skip nothing, silently. With workers,
    the worker loop must take the arguments per-batch seeding rewires; with persistent
    workers, the kept iterator's restart must be torch 2.13's.
    """
    for internal, attribute in (("DataLoader._index_sampler", "_index_sampler"),
                                ("DataLoader._get_iterator", "_get_iterator")):
        if inspect.getattr_static(DataLoader, attribute, None) is None:
            return _changed(internal, "it is gone")
    try:
        probe = DataLoader([10, 11], batch_size=1, generator=torch.Generator().manual_seed(3))
        iterator = iterator_over(probe, _Marked())
        marked = sampler_iterator(iterator)
        fetch = iterator._dataset_fetcher.fetch
        first = next(iterator)
        seed = base_seed(iterator)
    except (AttributeError, TypeError) as exc:
        return _changed("_BaseDataLoaderIter", f"a probe iterator failed: {exc}")
    if first.tolist() != [11] or not isinstance(marked, type(iter([[1]]))) or not callable(fetch):
        return _changed("DataLoader._index_sampler", "an iterator no longer takes its indices from it")
    if seed != draw_base_seed(DataLoader([0], generator=torch.Generator().manual_seed(3))):
        return _changed("_BaseDataLoaderIter._base_seed", "it is drawn otherwise")
    if loader.num_workers > 0:
        difference = WORKER_LOOP.unrecognised()
        if difference is not None:
            return _changed("torch.utils.data._utils.worker._worker_loop", difference)
    if loader.persistent_workers and loader.num_workers > 0:
        return kept_unrecognised(loader)
    return None


def kept_unrecognised(loader: DataLoader) -> str | None:
    """What persistent workers' restart (:func:`restart_kept`, :func:`drop_kept`) finds changed, or None."""
    from torch.utils.data import dataloader
    from torch.utils.data._utils import worker

    if "_iterator" not in vars(loader):
        return _changed("DataLoader._iterator", "a loader keeps no iterator there")
    it = getattr(dataloader, "_MultiProcessingDataLoaderIter", None)
    for name, params in (("_reset", ["self", "loader", "first_iter"]), ("_shutdown_workers", ["self"])):
        try:
            found = list(inspect.signature(getattr(it, name)).parameters)
        except (AttributeError, TypeError, ValueError):
            return _changed(f"_MultiProcessingDataLoaderIter.{name}", "it is gone")
        if found != params:
            return _changed(f"_MultiProcessingDataLoaderIter.{name}", f"its parameters are {found}")
    resume = getattr(worker, "_ResumeIteration", None)
    try:
        if resume is None or resume_seed(resume(7)) != 7:
            return _changed("torch.utils.data._utils.worker._ResumeIteration", "it carries no seed")
    except TypeError:
        return _changed("torch.utils.data._utils.worker._ResumeIteration", "it takes no seed")
    return None


# ---------------------------------------------------------------- the iterators watched outside job.loader()

def iterator_class() -> type | None:
    """``_BaseDataLoaderIter``: every DataLoader iterator's class, whose ``__next__`` the watch wraps (None where
    torch has no such class with its own ``__next__``)."""
    from torch.utils.data import dataloader

    found = getattr(dataloader, "_BaseDataLoaderIter", None)
    return found if isinstance(found, type) and "__next__" in vars(found) else None


def iterator_class_missing() -> str:
    return _changed("torch.utils.data.dataloader._BaseDataLoaderIter", "it is gone, or has no __next__ of its own")


def yielded(iterator: Any) -> int | None:
    """``_BaseDataLoaderIter._num_yielded``: batches handed out in this epoch (1 right after a reset)."""
    return getattr(iterator, "_num_yielded", None)


def iterator_dataset(iterator: Any) -> Any:
    """``_BaseDataLoaderIter._dataset``: the dataset an iterator reads (for the refusal's text)."""
    return getattr(iterator, "_dataset", None)
