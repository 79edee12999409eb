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
import hashlib
import importlib
import importlib.util
import inspect
import os
import random
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator

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

    digest = hashlib.blake2b(f"{base_seed}:{batch}".encode(), digest_size=16).digest()
    seed = int.from_bytes(digest[:8], "little")
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")  # torch's worker module imports it when installed
    if numpy is not None:
        numpy.random.seed([int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)])


class _SeedEachTask:
    """A worker's index queue that seeds the worker before each batch it hands out."""

    def __init__(self, queue: Any, base_seed: int, offset: int) -> None:
        self._queue, self._base_seed, self._offset = queue, base_seed, offset

    def get(self, *args: Any, **kwargs: Any) -> Any:
        task = self._queue.get(*args, **kwargs)
        if isinstance(task, tuple):  # (task index, batch indices); else a control message
            seed_batch(self._base_seed, self._offset + task[0])
        return task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


class _SeededLoop:
    """A worker entry point that seeds each batch from (base seed, its index in the epoch); picklable."""

    def __init__(self, inner: Callable[..., Any], offset: int) -> None:
        self.inner: Callable[..., Any] | None = inner
        self.offset = offset

    def __getstate__(self) -> dict[str, Any]:
        # torch's own function cannot be pickled by name while it is replaced; a spawned worker imports it afresh.
        inner = self.inner if isinstance(self.inner, _GuardedLoop) else None
        return {"inner": inner, "offset": self.offset}

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        from torch.utils.data._utils import worker

        original = _torch_loop or worker._worker_loop  # a spawned worker imported torch afresh: never replaced there
        bound = inspect.signature(original).bind(*args, **kwargs)
        bound.arguments["index_queue"] = _SeedEachTask(bound.arguments["index_queue"],
                                                       bound.arguments["base_seed"], self.offset)
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
