"""torchdata's StatefulDataLoader internals that jobwrap relies on, one adapter each (checked on torchdata 0.11.0).

torchdata restores a worker's place in the sampler and its dataset's ``state_dict``, not the
random streams inside the worker process: jobwrap seeds each batch there from the iterator's
base seed and the batch's index in the epoch (:func:`jobwrap._loop.workers.seed_stateful_batches`).
That needs the loader's worker entry point (its own copy of torch's worker loop), the
iterator's snapshot step (where a resumed iterator's first batch stands in the epoch) and
the place where the loader makes its iterator. No exact fallback exists: where torchdata is
not what these adapters expect, a StatefulDataLoader with workers is refused at ``iter()``,
naming the version. Each adapter has its canary in tests/test_compat.py.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable

from jobwrap._compat.notice import changed, installed
from jobwrap._compat.torch_loader import entry_point

CHECKED = "0.11.0"
ADAPTER = "torchdata.py"
LOADER_MODULE = "torchdata.stateful_dataloader.stateful_dataloader"
# StatefulDataLoader starts its workers with `target=_worker_loop`, a name of its loader module's (imported from
# its .worker module), read each time it starts workers.
WORKER_LOOP = entry_point(LOADER_MODULE, "_worker_loop")


def version() -> str:
    return installed("torchdata")


def loader_module() -> ModuleType | None:
    """torchdata's loader module, or None where it cannot be imported (its loaders cannot be used either)."""
    try:
        return importlib.import_module(LOADER_MODULE)
    except ImportError:
        return None


def has_loader() -> bool:
    """Whether torchdata's loader module imports and defines ``StatefulDataLoader``."""
    module = loader_module()
    return module is not None and isinstance(getattr(module, "StatefulDataLoader", None), type)


def unrecognised() -> str | None:
    """None where torchdata's loader has what per-batch worker seeding relies on as 0.11.0 has it; else what
    changed: ``StatefulDataLoader._get_iterator`` (defined by the class), the multiprocess iterator's snapshot
    keys, and a worker loop that takes ``index_queue``, ``collate_fn`` and ``base_seed``."""
    module = loader_module()
    if module is None or getattr(module, "StatefulDataLoader", None) is None:
        return changed("torchdata", "StatefulDataLoader", ADAPTER, "it is gone", CHECKED)
    if not callable(module.StatefulDataLoader.__dict__.get("_get_iterator")):
        return changed("torchdata", "StatefulDataLoader._get_iterator", ADAPTER, "the class does not define it",
                       CHECKED)
    it = getattr(module, "_StatefulMultiProcessingDataLoaderIter", None)
    if getattr(it, "_SNAPSHOT", None) != "_snapshot" or getattr(it, "_SNAPSHOT_STEP", None) != "_snapshot_step":
        return changed("torchdata", "_StatefulMultiProcessingDataLoaderIter._SNAPSHOT_STEP", ADAPTER,
                       "a state keeps its snapshot step elsewhere", CHECKED)
    difference = WORKER_LOOP.unrecognised()
    if difference is not None:
        return changed("torchdata", f"{LOADER_MODULE}._worker_loop", ADAPTER, difference, CHECKED)
    return None


def resumed_offset(loader: Any) -> int:
    """The index in its epoch of the first batch a resumed iterator of ``loader`` asks its workers for:
    ``next_iter_state["_snapshot"]["_snapshot_step"]`` (the batches since that snapshot are loaded again);
    0 for a fresh epoch."""
    state = loader.next_iter_state
    if state is None or state.get("_iterator_finished", False):
        return 0
    return int(state["_snapshot"]["_snapshot_step"])


def around_get_iterator(around: Callable[[Any, Callable[[], Any]], Any]) -> Callable[[], None]:
    """Make ``StatefulDataLoader._get_iterator(loader)`` call ``around(loader, make)``, where ``make()`` is
    torchdata's own; returns the undo."""
    cls = loader_module().StatefulDataLoader  # type: ignore[union-attr]
    original = cls.__dict__["_get_iterator"]

    def _get_iterator(loader: Any) -> Any:
        return around(loader, lambda: original(loader))

    cls._get_iterator = _get_iterator

    def undo() -> None:
        if cls.__dict__.get("_get_iterator") is _get_iterator:
            cls._get_iterator = original
    return undo


def before_iter(check: Callable[[Any], None]) -> Callable[[], None]:
    """Make ``iter(StatefulDataLoader)`` call ``check(loader)`` first (which may raise); returns the undo."""
    cls = loader_module().StatefulDataLoader  # type: ignore[union-attr]
    original = cls.__dict__["__iter__"]

    def __iter__(loader: Any) -> Any:
        check(loader)
        return original(loader)

    cls.__iter__ = __iter__

    def undo() -> None:
        if cls.__dict__.get("__iter__") is __iter__:
            cls.__iter__ = original
    return undo


def plain_shuffle(sampler: Any) -> bool:
    """Whether ``sampler`` is torchdata's ``RandomSampler`` over the whole dataset once (no replacement, no
    ``num_samples``: its private ``_num_samples`` is None), which a StatefulDistributedSampler can stand for."""
    from torchdata.stateful_dataloader.sampler import RandomSampler

    return (isinstance(sampler, RandomSampler) and not sampler.replacement
            and getattr(sampler, "_num_samples", 0) is None)


def sampler_unrecognised() -> str | None:
    """Whether ``RandomSampler`` still keeps the ``num_samples`` it was given in ``_num_samples`` (canary)."""
    from torchdata.stateful_dataloader.sampler import RandomSampler

    if "_num_samples" not in vars(RandomSampler(range(3))) or RandomSampler(range(3), num_samples=2)._num_samples != 2:
        return changed("torchdata", "RandomSampler._num_samples", ADAPTER, "num_samples is kept elsewhere", CHECKED)
    return None

