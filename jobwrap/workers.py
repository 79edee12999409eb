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
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Iterable

_torch_loop: Callable[..., Any] | None = None  # torch's worker entry point, while the guard replaces it


def shield(signals: Iterable[int]) -> None:
    """In a helper process: drop ``signals`` unless its parent sends them, which ends it (status 0)."""
    signals = set(signals)
    if not signals:
        return
    # Blocked before the thread starts, so every thread of this process inherits the mask and the
    # signal waits for sigwaitinfo instead of running a handler (torch's kills the worker).
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    parent = os.getppid()
    threading.Thread(target=_absorb, args=(signals, parent), name="jobwrap-shield", daemon=True).start()


def _absorb(signals: set[int], parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_pid == parent:
            os._exit(0)


class _GuardedLoop:
    """torch's DataLoader worker entry point, shielded first; picklable for spawn and forkserver workers."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(int(s) for s in signals)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        shield(self.signals)
        from torch.utils.data._utils import worker

        loop = _torch_loop or worker._worker_loop  # a spawned worker imported torch afresh: never replaced there
        loop(*args, **kwargs)


def guard_dataloader_workers(signals: Iterable[int]) -> Callable[[], None]:
    """Make each DataLoader worker started from now on shielded from ``signals``; returns the undo.

    It replaces the entry point torch's loader iterator starts its workers with, so
    it covers every loader of the process (validation loaders too), whatever its
    multiprocessing context.
    """
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
