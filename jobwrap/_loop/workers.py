"""DataLoader workers outlive the scheduler's stop signals; the commit needs them.

A plain ``scancel``, a node drain, a preemption without a user signal: Slurm sends
TERM to every process of the job. A DataLoader worker installs a C handler for TERM
that kills it unless its parent sent it; its loader then raises ``RuntimeError:
DataLoader worker ... is killed by signal`` in the middle of the step, and nothing is
committed. The same happens with USR1 in the ``srun`` layouts, where Slurm signals
every process of the step.

So while a Session runs, every DataLoader worker starts shielded: the session's
signals are blocked in it and taken by a thread with ``sigwaitinfo``, which knows
the sender. From anyone else they are dropped; from the worker's parent (the
loader shutting a stuck worker down, or multiprocessing's exit handler ending its
daemon children) they end the worker at once with status 0, as torch's own
handler does. Ignoring them instead (SIG_IGN) would hang the training process at
exit: multiprocessing terminates daemon children there and joins them.
SIGKILL still ends a worker, and a worker ends with its parent (torch's watchdog).
Spawn and forkserver workers are covered less well: see :func:`_ignore_if_unshielded`.

Each loader kind starts its workers with its own entry point (:data:`WORKER_LOOPS`): torch's
``DataLoader`` with torch's ``_worker_loop``, torchdata's ``StatefulDataLoader`` with its own copy.
The guard replaces every one of them that is installed.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import random
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator

from jobwrap._loop.rngs import derived_seed, own_rngs, reseed
from jobwrap.errors import ConfigError

_torch_loop: Callable[..., Any] | None = None  # torch's worker entry point, while the guard replaces it

# Where each loader kind looks up the function it starts a worker with (module, name), read each time it
# starts workers. torch's DataLoader: torch.utils.data._utils.worker._worker_loop (checked with torch 2.13).
# torchdata's StatefulDataLoader runs its own loop, imported by name into its loader's module and passed as
# the worker process's target from there (checked with torchdata 0.11); it installs torch's worker handlers.
TORCH_LOOP = ("torch.utils.data._utils.worker", "_worker_loop")
STATEFUL_LOOP = ("torchdata.stateful_dataloader.stateful_dataloader", "_worker_loop")
WORKER_LOOPS = (TORCH_LOOP, STATEFUL_LOOP)
_other_loops: dict[tuple[str, str], Callable[..., Any]] = {}  # the other originals, while the guard replaces them


def shield(signals: Iterable[int]) -> threading.Thread | None:
    """In a helper process: drop ``signals`` unless its parent sends them, which ends it (status 0)."""
    signals = set(signals)
    if not signals:
        return None
    # Blocked before the thread starts, so every thread started from now on inherits the mask and
    # the signal waits for sigwaitinfo instead of running a handler (torch's kills the worker).
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    parent = os.getppid()
    waiter = threading.Thread(target=_absorb, args=(signals, parent), name="jobwrap-shield", daemon=True)
    waiter.start()
    return waiter


def _absorb(signals: set[int], parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_pid == parent:
            os._exit(0)


def unblocked_elsewhere(signals: Iterable[int], skip: Iterable[int]) -> bool:
    """Whether a thread of this process (other than ``skip``, native ids) has one of ``signals`` unblocked."""
    mask = sum(1 << (s - 1) for s in signals)
    skip = set(skip)
    for tid in os.listdir("/proc/self/task"):
        if int(tid) in skip:
            continue
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                blocked = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
        except (OSError, StopIteration, ValueError):
            continue
        if blocked & mask != mask:
            return True
    return False


def _ignore_if_unshielded(signals: tuple[int, ...], waiter: threading.Thread | None) -> None:
    """After torch's worker handlers: a thread that does not block the signals would run them and die.

    A forked worker has none (fork copies one thread). A spawn or forkserver worker has the
    threads its imports started (OpenBLAS's pool) before the shield: there the signals are
    ignored instead. A TERM from the parent that lands on such a thread is then ignored too,
    and the worker ends with its parent (torch's watchdog) rather than when the loader
    terminates it.
    """
    skip = [threading.get_native_id()] + ([waiter.native_id] if waiter is not None and waiter.native_id else [])
    if unblocked_elsewhere(signals, skip):
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)


class _GuardedLoop:
    """A loader's worker entry point (``where``), shielded first; picklable for spawn and forkserver workers."""

    def __init__(self, signals: Iterable[int], where: tuple[str, str] = TORCH_LOOP) -> None:
        self.signals = tuple(int(s) for s in signals)
        self.where = where

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        waiter = shield(self.signals)
        from torch.utils.data._utils import signal_handling, worker

        install = signal_handling._set_worker_signal_handlers

        def install_then_check() -> None:  # torch's loop installs its handlers first thing
            install()
            _ignore_if_unshielded(self.signals, waiter)
        signal_handling._set_worker_signal_handlers = install_then_check
        # A spawned worker imported the loader's module afresh: its entry point was never replaced there.
        if self.where == TORCH_LOOP:
            loop = _torch_loop or worker._worker_loop
        else:
            loop = _other_loops.get(self.where) or getattr(importlib.import_module(self.where[0]), self.where[1])
        loop(*args, **kwargs)


def guard_dataloader_workers(signals: Iterable[int]) -> Callable[[], None]:
    """Make each loader worker started from now on shielded from ``signals``; returns the undo.

    It replaces the entry point each installed loader kind (:data:`WORKER_LOOPS`) starts
    its workers with, so it covers every loader of the process (validation loaders too),
    whatever its multiprocessing context.
    """
    undos = [_guard_torch_loop(signals)]
    undos += [_guard_other_loop(where, signals) for where in WORKER_LOOPS[1:] if _installed(where[0])]
    if _installed(STATEFUL_LOOP[0]):
        undos.append(seed_stateful_batches())

    def undo() -> None:
        for one in reversed(undos):
            one()
    return undo


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (its package is installed), without importing the package."""
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _guard_torch_loop(signals: Iterable[int]) -> Callable[[], None]:
    global _torch_loop
    from torch.utils.data._utils import worker

    if _torch_loop is None:
        _torch_loop = worker._worker_loop
    guarded = worker._worker_loop = _GuardedLoop(signals)

    def undo() -> None:
        global _torch_loop
        if worker._worker_loop is guarded and _torch_loop is not None:
            worker._worker_loop, _torch_loop = _torch_loop, None
    return undo


def _guard_other_loop(where: tuple[str, str], signals: Iterable[int]) -> Callable[[], None]:
    """Replace the entry point at ``where`` (imported now: a few ms once torch is loaded) with a guarded one."""
    try:
        module = importlib.import_module(where[0])
    except ImportError:  # an installed package whose import fails: its loaders cannot be used either
        return lambda: None
    if not callable(getattr(module, where[1], None)):
        return lambda: None
    _other_loops.setdefault(where, getattr(module, where[1]))
    guarded = _GuardedLoop(signals, where)
    setattr(module, where[1], guarded)

    def undo() -> None:
        if getattr(module, where[1]) is guarded and where in _other_loops:
            setattr(module, where[1], _other_loops.pop(where))
    return undo


# ---------------------------------------------------------------- per-batch random numbers in workers

def seed_batch(base_seed: int, batch: int) -> None:
    """Seed torch, ``random`` and NumPy (if loaded) for the epoch's ``batch``-th batch, from the iterator's seed."""
    import torch

    digest = derived_seed(base_seed, batch)
    seed = int.from_bytes(digest[:8], "little")
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")  # torch's worker module imports it when installed
    if numpy is not None:
        numpy.random.seed([int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)])


class BatchSeeding:
    """Per-batch seeding of a loader's batch fetches from (base seed, batch): in a worker, the global streams and
    the dataset's own generators; in the main process (``num_workers=0``), the dataset's own generators only
    (the global streams there are checkpointed and flow on as in the uninterrupted run). And the check, after
    the first fetch, that the fetch made no generator of its own (lazily): that one would start over on a
    resume in another batch.

    ``dataset()`` gives the dataset the fetches read. In a worker it is scanned before every batch (a worker_init_fn
    may keep replacing generators); in the main process once per iterator, and once more after its first fetch.
    """

    def __init__(self, base_seed: int, offset: int, dataset: Callable[[], Any], *, in_worker: bool = True) -> None:
        self.base_seed, self.offset = base_seed, offset
        self._dataset, self._in_worker = dataset, in_worker
        self.before_first: set[str] | None = None  # the dataset's generators when the first batch was asked for
        self._rngs: dict[str, Any] | None = None  # those generators, kept in the main process (scanned once)
        self.checked = False

    def new_epoch(self, seed: int) -> None:
        """A kept (persistent) worker starts another epoch: its batches count from 0 under that epoch's seed."""
        self.base_seed, self.offset = seed, 0

    def before_batch(self, batch: int) -> None:
        if self._in_worker:
            seed_batch(self.base_seed, self.offset + batch)
            rngs = own_rngs(self._dataset())
        else:
            if self._rngs is None:
                self._rngs = own_rngs(self._dataset())
            rngs = self._rngs
        if self.before_first is None:
            self.before_first = set(rngs)
        for path, rng in rngs.items():
            reseed(rng, derived_seed(self.base_seed, self.offset + batch, path))

    def after_first_fetch(self) -> None:
        if self.checked or self.before_first is None:
            return
        self.checked = True
        refuse_made_in_fetch(self.before_first, self._dataset(), in_worker=self._in_worker)


def refuse_made_in_fetch(before: set[str], dataset: Any, *, in_worker: bool) -> None:
    """Raise if ``dataset`` holds generators beyond ``before`` (their paths), i.e. its first fetch made one."""
    made = sorted(set(own_rngs(dataset)) - before)
    if not made:
        return
    where = "in a worker" if in_worker else "in the main process (num_workers=0)"
    make_it = ("in the DataLoader's worker_init_fn (from get_worker_info().seed: jobwrap then seeds it before "
               "each batch) or in the dataset's __init__ (it is then checkpointed and the epoch replayed)"
               ) if in_worker else "in the dataset's __init__ (jobwrap then restores it on a resume)"
    raise ConfigError(
        f"the DataLoader's dataset made the random generator {', '.join(made)} {where} while fetching "
        f"its first batch: a resumed run that skips the batches already trained on starts it over in "
        f"another batch, so its draws would differ from the uninterrupted run's. Make it {make_it}")


def _worker_dataset() -> Any:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return None if info is None else info.dataset


class SeededFetcher:
    """A single-process iterator's dataset fetcher (``num_workers=0``) that seeds the dataset's own generators
    before each batch it fetches, and checks what the first fetch made (:class:`BatchSeeding`)."""

    def __init__(self, fetcher: Any, seeding: BatchSeeding) -> None:
        self._fetcher, self._seeding = fetcher, seeding
        self._batch = 0

    def fetch(self, *args: Any, **kwargs: Any) -> Any:
        self._seeding.before_batch(self._batch)
        self._batch += 1
        data = self._fetcher.fetch(*args, **kwargs)
        self._seeding.after_first_fetch()
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fetcher, name)


class _SeedEachTask:
    """A worker's index queue that seeds the worker before each batch it hands out."""

    def __init__(self, queue: Any, seeding: BatchSeeding) -> None:
        self._queue, self._seeding = queue, seeding

    def get(self, *args: Any, **kwargs: Any) -> Any:
        task = self._queue.get(*args, **kwargs)
        if isinstance(task, tuple):  # (task index, batch indices); else a control message
            self._seeding.before_batch(task[0])
        elif type(task).__name__ == "_ResumeIteration" and isinstance(getattr(task, "seed", None), int):
            self._seeding.new_epoch(task.seed)  # a persistent worker's next epoch (jobwrap._loop.skipping)
        return task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


class _CheckedCollate:
    """The worker's collate_fn, then the check of what the first fetch made (raised, it reaches the loader)."""

    def __init__(self, collate: Callable[..., Any], seeding: BatchSeeding) -> None:
        self._collate, self._seeding = collate, seeding

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = self._collate(*args, **kwargs)
        self._seeding.after_first_fetch()
        return batch


class _SeededLoop:
    """A worker entry point that seeds each batch from (base seed, its index in the epoch), the dataset's own
    generators too; picklable."""

    def __init__(self, inner: Callable[..., Any], offset: int, where: tuple[str, str] = TORCH_LOOP) -> None:
        self.inner: Callable[..., Any] | None = inner
        self.offset = offset
        self.where = where

    def __getstate__(self) -> dict[str, Any]:
        # torch's own function cannot be pickled by name while it is replaced; a spawned worker imports it afresh.
        inner = self.inner if isinstance(self.inner, _GuardedLoop) else None
        return {"inner": inner, "offset": self.offset, "where": self.where}

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        from torch.utils.data._utils import worker

        # A spawned worker imported the loader's module afresh: its entry point was never replaced there.
        if self.where == TORCH_LOOP:
            original = _torch_loop or worker._worker_loop
        else:
            original = _other_loops.get(self.where) or getattr(importlib.import_module(self.where[0]), self.where[1])
        bound = inspect.signature(original).bind(*args, **kwargs)
        seeding = BatchSeeding(bound.arguments["base_seed"], self.offset, _worker_dataset)
        bound.arguments["index_queue"] = _SeedEachTask(bound.arguments["index_queue"], seeding)
        bound.arguments["collate_fn"] = _CheckedCollate(bound.arguments["collate_fn"], seeding)
        (self.inner or original)(*bound.args, **bound.kwargs)


@contextlib.contextmanager
def seeded_workers(offset: int) -> Iterator[None]:
    """Workers started inside seed each batch ``k`` (counted from ``offset``) from the loader's base seed and k.

    The random numbers a worker draws for a batch then depend on nothing that came
    before it in the epoch, so a resumed loader that skips batches without loading
    them draws the numbers of the run that was never stopped.
    """
    global _torch_loop
    from torch.utils.data._utils import worker

    current = worker._worker_loop
    saved = _torch_loop
    if _torch_loop is None:
        _torch_loop = current
    worker._worker_loop = _SeededLoop(current, offset)
    try:
        yield
    finally:
        worker._worker_loop = current
        _torch_loop = saved


# ---------------------------------------------------------------- the same for torchdata's StatefulDataLoader

def seed_stateful_batches() -> Callable[[], None]:
    """Make each StatefulDataLoader with workers seed every batch from its base seed and the batch's index
    in the epoch; returns the undo. Where torchdata is not the version this was checked with, refuse instead.

    torchdata restores a worker's place in the sampler and its dataset's ``state_dict``, not the random
    streams inside the worker process: the draws of a dataset's ``__getitem__`` (random augmentation from
    torch, ``random``, NumPy) would differ after a resume. Checked with torchdata 0.11 (and torch 2.13):
    an iterator's workers get its ``_base_seed`` (restored from the state's main snapshot on a resume) and
    tasks ``(send index, (indices, snapshot))``, whose send index starts at 0 in every iterator, a resumed
    one too, whose first batch is the epoch's ``state["_snapshot"]["_snapshot_step"]``-th (it then loads
    the batches since that snapshot again). Seeding batch ``offset + send index`` from the base seed gives
    the uninterrupted run's draws. Persistent workers are refused for it (data.check_kept_workers).
    """
    import torchdata
    from torchdata.stateful_dataloader import stateful_dataloader as module

    loader_cls = getattr(module, "StatefulDataLoader", None)
    if loader_cls is None:
        return lambda: None
    version = getattr(torchdata, "__version__", "unknown")
    original_get = loader_cls.__dict__.get("_get_iterator")
    if original_get is None or not _stateful_internals_known(module):
        return _refuse_stateful_workers(loader_cls, version)

    def _get_iterator(loader: Any) -> Any:
        if loader.num_workers == 0:
            return original_get(loader)
        state = loader.next_iter_state
        offset = 0
        if state is not None and not state.get("_iterator_finished", False):
            offset = int(state["_snapshot"]["_snapshot_step"])
        current = getattr(module, STATEFUL_LOOP[1])
        setattr(module, STATEFUL_LOOP[1], _SeededLoop(current, offset, STATEFUL_LOOP))
        try:
            return original_get(loader)
        finally:
            setattr(module, STATEFUL_LOOP[1], current)

    loader_cls._get_iterator = _get_iterator

    def undo() -> None:
        if loader_cls.__dict__.get("_get_iterator") is _get_iterator:
            loader_cls._get_iterator = original_get
    return undo


def _stateful_internals_known(module: Any) -> bool:
    """Whether torchdata's loader module has what :func:`seed_stateful_batches` relies on (torchdata 0.11)."""
    it = getattr(module, "_StatefulMultiProcessingDataLoaderIter", None)
    loop = _other_loops.get(STATEFUL_LOOP) or getattr(module, STATEFUL_LOOP[1], None)
    if it is None or loop is None or isinstance(loop, (_GuardedLoop, _SeededLoop)):
        return False
    if getattr(it, "_SNAPSHOT", None) != "_snapshot" or getattr(it, "_SNAPSHOT_STEP", None) != "_snapshot_step":
        return False
    try:
        params = inspect.signature(loop).parameters
    except (TypeError, ValueError):
        return False
    return {"index_queue", "collate_fn", "base_seed"} <= set(params)


def _refuse_stateful_workers(loader_cls: type, version: str) -> Callable[[], None]:
    """Make iterating a StatefulDataLoader with workers raise: its workers' draws cannot be made exact."""
    original_iter = loader_cls.__dict__["__iter__"]

    def __iter__(loader: Any) -> Any:
        if loader.num_workers > 0:
            raise ConfigError(
                f"StatefulDataLoader(num_workers={loader.num_workers}) with torchdata {version}: jobwrap seeds "
                f"each batch's random numbers in the workers of torchdata 0.11 only (it relies on its internals), "
                f"and torchdata restores the loader's place but not the random streams inside its workers, so a "
                f"dataset that draws random numbers in __getitem__ would draw others after a resume. Install "
                f"torchdata 0.11, or use num_workers=0, or torch's DataLoader over a map-style dataset")
        return original_iter(loader)

    loader_cls.__iter__ = __iter__

    def undo() -> None:
        if loader_cls.__dict__.get("__iter__") is __iter__:
            loader_cls.__iter__ = original_iter
    return undo
