"""Agreement between ranks: every rank stops at the same step, one commit, one requeue.

A signal may reach one rank only (torchrun, srun, a node's own preemption). At
each step boundary the ranks all-reduce a three-number tensor -- the strongest
stop request, "a periodic save is due", and the state of rank 0's background
save -- on a *separate gloo group*, so the agreement never queues behind NCCL
traffic or a background save. All ranks see the same answer at the same step,
so they stop, save, hear of rank 0's background outcome and exit together.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
from typing import Any, Callable

from jobwrap.errors import CheckpointError, StorageError

log = logging.getLogger("jobwrap")

# Stop requests, ordered: the maximum over ranks wins. An exit signal (TERM: a user's
# scancel or Slurm's own preemption) beats a requeue signal, so a cancel is never turned
# into a requeue because another rank saw USR1 first.
NO_STOP, STOP_REQUEUE, STOP_EXIT = 0, 1, 2

# Rank 0's background save, as the agreement carries it (the other ranks send WRITER_IDLE, the maximum is
# rank 0's): nothing in flight, a save being written (one due now is skipped), or an outcome to share.
WRITER_IDLE, WRITER_BUSY, WRITER_DONE = 0, 1, 2


class Solo:
    """The single-process case: agreement is the local answer."""

    rank = 0
    world_size = 1

    def agree(self, stop: int, save_due: bool, writer: int = WRITER_IDLE) -> tuple[int, bool, int]:
        return stop, save_due, writer

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def close(self, *, clean: bool) -> None:
        pass


class RankGroup:
    """All ranks of an initialised ``torch.distributed`` job, talking over their own gloo group."""

    def __init__(self, timeout_seconds: float = 600.0) -> None:
        import torch
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Collective: every rank creates it at Session start, in the same order.
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
        self._flags = torch.zeros(3, dtype=torch.int32)
        # A script that never closes its Session: the threads are still joined before the interpreter ends.
        atexit.register(self._abandon)

    def agree(self, stop: int, save_due: bool, writer: int = WRITER_IDLE) -> tuple[int, bool, int]:
        """The maximum over ranks of each: (stop request, a periodic save due, rank 0's ``writer`` state)."""
        self._flags[0] = stop
        self._flags[1] = int(save_due)
        self._flags[2] = writer
        self._dist.all_reduce(self._flags, op=self._dist.ReduceOp.MAX, group=self.group)
        return int(self._flags[0]), bool(self._flags[1]), int(self._flags[2])

    def gather(self, obj: Any) -> list[Any] | None:
        """Rank 0 receives every rank's ``obj`` (ranks' own RNG states); others get None."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=self._dist.get_global_rank(self.group, 0), group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a decision: which checkpoint, which exit code)."""
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def close(self, *, clean: bool) -> None:
        """Tear down our group before the user destroys theirs; wait for every rank first if all are here."""
        atexit.unregister(self._abandon)
        if self.group is None:
            return
        try:
            if clean:
                self.barrier()
            self._dist.destroy_process_group(self.group)
        except Exception as exc:  # the job is ending: report, do not mask the real outcome
            log.warning("could not close jobwrap's process group cleanly: %s", exc)
        finally:
            self._release()

    def _abandon(self) -> None:
        """At interpreter exit, for a Session never closed: no barrier (the other ranks may be gone)."""
        with contextlib.suppress(Exception):  # the user may have destroyed every group already
            self._dist.destroy_process_group(self.group)
        self._release()

    def _release(self) -> None:
        """Drop the last reference to our group, so that its gloo threads are joined now.

        destroy_process_group() only unregisters a group: its worker threads live
        as long as the object. A worker that frees a finished collective's tensors
        takes the GIL for them; if that happens while the interpreter finalizes,
        Python ends the thread inside C++ and the process aborts ("terminate called
        without an active exception"). Freeing the object here (torch releases the
        GIL while it joins) lets every worker finish while the interpreter is whole.
        """
        self.group = None
        self._flags = None


def save_on_rank0(group: Solo | RankGroup, write: Callable[[], Any]) -> Any:
    """Rank 0 runs ``write``; every rank returns its result (the checkpoint) or raises its error."""
    outcome: Any = None
    if group.rank == 0:
        try:
            outcome = write()
        except BaseException as exc:  # any failure: the other ranks wait in the broadcast below
            group.broadcast(_shareable(exc))
            raise
    outcome = group.broadcast(outcome)
    if isinstance(outcome, StorageError):
        raise StorageError(outcome.errno, f"rank 0 could not save: {outcome}")
    if isinstance(outcome, CheckpointError):
        raise CheckpointError(f"rank 0 could not save: {outcome}")
    return outcome


def _shareable(exc: BaseException) -> CheckpointError:
    """Rank 0's save error as the other ranks raise it: a CheckpointError (any exception may not pickle)."""
    return exc if isinstance(exc, CheckpointError) else CheckpointError(f"{type(exc).__name__}: {exc}")


def join(timeout_seconds: float = 600.0) -> Solo | RankGroup:
    """The ranks of this job: a :class:`RankGroup` when torch.distributed runs with >1 rank."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return Solo()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return RankGroup(timeout_seconds)
    return Solo()
