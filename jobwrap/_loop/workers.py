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

Each loader kind starts its workers with its own entry point (a :class:`jobwrap._compat.torch_loader.EntryPoint`):
torch's ``DataLoader`` with torch's ``_worker_loop``, torchdata's ``StatefulDataLoader`` with its own copy.
Each is replaced once, by one hook (:func:`add_step`), that runs a chain of per-worker steps before the
original loop: the shield for the session's life, the per-batch seeding for the iterators built while it
is registered. The hook is put back when its last step is undone, in whatever order.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import random
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, Protocol

from jobwrap._compat import torch_loader, torchdata
from jobwrap._compat.notice import changed, fall_back
from jobwrap._compat.torch_loader import (
    WORKER_LOOP,
    EntryPoint,
    after_worker_signal_handlers,
    batch_task_index,
    resume_seed,
)
from jobwrap._loop.rngs import derived_seed, own_rngs, reseed
from jobwrap.errors import ConfigError

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


class _Shield:
    """A worker step: the session's signals shielded first thing, checked again once torch's handlers are in."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(int(s) for s in signals)

    def __call__(self, arguments: dict[str, Any]) -> None:
        waiter = shield(self.signals)

        def check() -> None:
            _ignore_if_unshielded(self.signals, waiter)
        if not after_worker_signal_handlers(check):
            fall_back(changed("torch", "torch.utils.data._utils.signal_handling._set_worker_signal_handlers",
                              "torch_loader.py", "it is gone", torch_loader.CHECKED),
                      "checks the worker's threads before torch's loop starts (spawn workers less shielded)")
            check()


class _WorkerHook:
    """The one replacement of a loader kind's worker entry point (``entry``): it runs the steps registered for
    that entry (:func:`add_step`), then the original loop with the arguments they rewired. Picklable for spawn
    and forkserver workers, whose steps are those registered when the worker was started."""

    def __init__(self, entry: EntryPoint) -> None:
        self.entry = entry
        self.steps: tuple[WorkerStep, ...] | None = None  # set in a spawned worker; a forked one reads the registry

    def __getstate__(self) -> dict[str, Any]:
        return {"entry": self.entry, "steps": _current_steps(self.entry)}

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        steps = self.steps if self.steps is not None else _current_steps(self.entry)
        original = self.entry.original()
        bound = inspect.signature(original).bind(*args, **kwargs)
        for step in steps:
            step(bound.arguments)
        original(*bound.args, **bound.kwargs)


class WorkerStep(Protocol):
    """Set-up run in each worker before its loop, in registration order; it may rewire the loop's ``arguments``
    (bound by name: ``index_queue``, ``collate_fn``, ``base_seed``...)."""

    def __call__(self, arguments: dict[str, Any]) -> None: ...


_hooks: dict[EntryPoint, _WorkerHook] = {}  # the installed hook of each entry point, while a step is registered
_steps: dict[EntryPoint, list[tuple[object, str, WorkerStep]]] = {}  # (token, kind, step), oldest first


def _current_steps(entry: EntryPoint) -> tuple[WorkerStep, ...]:
    """The newest step of each kind (a nested session's shield replaces the outer one's), kinds oldest first."""
    newest: dict[str, WorkerStep] = {}
    for _, kind, step in _steps.get(entry, []):
        newest[kind] = step
    return tuple(newest.values())


def add_step(entry: EntryPoint, kind: str, step: WorkerStep) -> Callable[[], None]:
    """Run ``step`` in every worker started through ``entry`` from now on; returns the undo.

    The entry point is replaced once, by one hook, while any step is registered, and put
    back when the last one is undone, whatever the order of the undos.
    """
    if entry not in _hooks:
        hook = _WorkerHook(entry)
        entry.replace(hook)
        _hooks[entry] = hook
    token = object()
    _steps.setdefault(entry, []).append((token, kind, step))

    def undo() -> None:
        left = [item for item in _steps.get(entry, []) if item[0] is not token]
        _steps[entry] = left
        if not left and entry in _hooks:
            entry.restore(_hooks.pop(entry))
    return undo


def guard_dataloader_workers(signals: Iterable[int]) -> Callable[[], None]:
    """Make each loader worker started from now on shielded from ``signals``; returns the undo.

    It hooks the entry point each installed loader kind starts its workers with (torch's
    and torchdata's), so it covers every loader of the process (validation loaders too),
    whatever its multiprocessing context.
    """
    entries = [WORKER_LOOP]
    if _installed(torchdata.LOADER_MODULE) and torchdata.has_loader():
        entries.append(torchdata.WORKER_LOOP)
    undos = [add_step(entry, "shield", _Shield(signals)) for entry in entries if entry.original() is not None]
    if len(entries) > 1:
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
        index = batch_task_index(task)  # None: a control message
        if index is not None:
            self._seeding.before_batch(index)
        else:
            seed = resume_seed(task)
            if seed is not None:
                self._seeding.new_epoch(seed)  # a persistent worker's next epoch (jobwrap._loop.skipping)
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


class _SeedBatches:
    """A worker step: each batch seeded from (the loader's base seed, ``offset`` + its index among the batches
    the iterator asks for), the dataset's own generators too; picklable."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, arguments: dict[str, Any]) -> None:
        seeding = BatchSeeding(arguments["base_seed"], self.offset, _worker_dataset)
        arguments["index_queue"] = _SeedEachTask(arguments["index_queue"], seeding)
        arguments["collate_fn"] = _CheckedCollate(arguments["collate_fn"], seeding)


@contextlib.contextmanager
def seeded_workers(offset: int, entry: EntryPoint = WORKER_LOOP) -> Iterator[None]:
    """Workers started inside seed each batch ``k`` (counted from ``offset``) from the loader's base seed and k.

    The random numbers a worker draws for a batch then depend on nothing that came
    before it in the epoch, so a resumed loader that skips batches without loading
    them draws the numbers of the run that was never stopped. The caller has checked
    that the entry point takes the arguments this rewires (``EntryPoint.unrecognised``).
    """
    undo = add_step(entry, "seed", _SeedBatches(offset))
    try:
        yield
    finally:
        undo()


# ---------------------------------------------------------------- the same for torchdata's StatefulDataLoader

def seed_stateful_batches() -> Callable[[], None]:
    """Make each StatefulDataLoader with workers seed every batch from its base seed and the batch's index
    in the epoch; returns the undo. Where torchdata is not the version this was checked with, refuse instead.

    torchdata restores a worker's place in the sampler and its dataset's ``state_dict``, not the random
    streams inside the worker process: the draws of a dataset's ``__getitem__`` (random augmentation from
    torch, ``random``, NumPy) would differ after a resume. Checked with torchdata 0.11 (and torch 2.13):
    an iterator's workers get its base seed (restored from the state's main snapshot on a resume) and
    tasks ``(send index, (indices, snapshot))``, whose send index starts at 0 in every iterator, a resumed
    one too, whose first batch is the epoch's snapshot step (:func:`jobwrap._compat.torchdata.resumed_offset`;
    it then loads the batches since that snapshot again). Seeding batch ``offset + send index`` from the base
    seed gives the uninterrupted run's draws. Persistent workers are refused for it (data.check_kept_workers).
    """
    if not torchdata.has_loader():
        return lambda: None
    difference = torchdata.unrecognised()
    if difference is not None:
        return torchdata.before_iter(lambda loader: _refuse_stateful_workers(loader, difference))

    def seeded(loader: Any, make: Callable[[], Any]) -> Any:
        if loader.num_workers == 0:
            return make()
        with seeded_workers(torchdata.resumed_offset(loader), torchdata.WORKER_LOOP):
            return make()
    return torchdata.around_get_iterator(seeded)


def _refuse_stateful_workers(loader: Any, difference: str) -> None:
    """Iterating a StatefulDataLoader with workers: refused where its workers' draws cannot be made exact."""
    if loader.num_workers > 0:
        raise ConfigError(
            f"StatefulDataLoader(num_workers={loader.num_workers}) with torchdata {torchdata.version()}: {difference}. "
            f"jobwrap seeds each batch's random numbers in the workers of torchdata {torchdata.CHECKED} only (it "
            f"relies on its internals), and torchdata restores the loader's place but not the random streams inside "
            f"its workers, so a dataset that draws random numbers in __getitem__ would draw others after a resume. "
            f"Install torchdata {torchdata.CHECKED}, or use num_workers=0, or torch's DataLoader over a map-style "
            f"dataset")
