"""Resuming: the newest verified checkpoint, loaded on every rank, put back as the script tracks its objects.

Rank 0 claims the directory and picks the checkpoint (the .pt verified against
its manifest, a sharded folder against the checksums the .pt records); the other
ranks wait for its decision and load the same one. The loaded payload then waits
in a :class:`Resumed` until the first step boundary: each object is restored
when ``track()`` registers it, the RNG streams at ``track()`` and again at the
first boundary (setup code in between may draw), and then it is freed.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Iterable

import torch

from jobwrap._loop import payload
from jobwrap._storage import progress
from jobwrap._storage.state import load_into, restore_rng
from jobwrap._storage.store import Checkpoint, CheckpointStore
from jobwrap.errors import JobwrapError, StateMismatchError

log = logging.getLogger("jobwrap")


def open_directory(store: CheckpointStore, group: Any, device: torch.device, *,
                   claim: Callable[[], tuple[str, list[str], list[Checkpoint]]],
                   opened: Callable[[str], None]) -> tuple[Checkpoint, dict[str, Any]] | None:
    """Rank 0 claims the directory and picks the newest verified checkpoint; every rank loads it.

    ``claim()``: rank 0's hold on the directory, returning the run, its lineage and the committed
    checkpoints (listed once, as the directory was cleaned up);
    ``opened(run_id)``: every rank, once the run is known. A collective.
    """
    decision: dict[str, Any] = {}
    if group.rank == 0:
        try:
            run_id, lineage, committed = claim()
            opened(run_id)
            verified = functools.partial(payload.load_verified, store, device=device)
            with progress.loading(store, committed):
                found = store.newest_loadable(verified, lineage=lineage, verify=False, committed=committed)
            decision = {"run_id": run_id, "step": found[0].step if found else None,
                        "serial": found[0].serial if found else 0}
        except BaseException as exc:  # any failure: the other ranks wait for the decision
            group.broadcast({"error": f"{type(exc).__name__}: {exc}"})
            raise
        group.broadcast(decision)
        return found
    decision = group.broadcast(None)
    if "error" in decision:
        raise JobwrapError(f"rank 0 could not open the checkpoint directory: {decision['error']}")
    opened(decision["run_id"])
    if decision["step"] is None:
        return None
    checkpoint = next(c for c in store.committed() if c.key == (decision["step"], decision["serial"]))
    return checkpoint, payload.load(store, checkpoint, device)  # rank 0 verified it


class Resumed:
    """A loaded checkpoint on its way back into the tracked objects, until the first step boundary."""

    def __init__(self, checkpoint: Checkpoint, loaded: dict[str, Any], *, rank: int, world_size: int,
                 allow_world_size_change: bool, device: torch.device) -> None:
        self.checkpoint = checkpoint
        self.payload = loaded
        self.epoch, self.step = int(loaded["epoch"]), int(loaded["step"])
        self.position = int(loaded["jobwrap"].get("position", 0))
        if loaded["jobwrap"].get("epoch_done"):  # saved after the epoch's loader loop and end-of-epoch code
            self.epoch, self.position = self.epoch + 1, 0
        self.read_seconds = float(loaded["jobwrap"].pop("read_seconds", 0.0))  # set by payload.load
        mine = rank_entry(loaded, checkpoint, rank=rank, world_size=world_size,
                          allow_world_size_change=allow_world_size_change)
        self.data = mine.get("data") or None  # the loader's state, until a loader takes it
        self.grads = mine.get("grads") or {}  # gradients saved between optimizer steps
        self._rng = loaded["jobwrap"]["ranks"][rank % len(loaded["jobwrap"]["ranks"])]["rng"]
        self._device = device
        self._rng_warned = False

    @property
    def sharded_record(self) -> dict[str, Any]:
        """The record of the checkpoint's sharded folder ({} without one)."""
        return self.payload["jobwrap"].get("dcp") or {}

    def restore(self, name: str, obj: Any) -> bool:
        """``obj`` restored from the .pt; True when its state is in the sharded folder instead (loaded later,
        with the other sharded objects of the same ``track()`` call)."""
        if name in self.payload:
            load_into(name, obj, self.payload[name])
        elif name in self.sharded_record.get("objects", []):
            return True
        else:
            log.warning("checkpoint has no %r; it starts from its initial state", name)
        return False

    def extra(self, name: str, value: Any) -> Any:
        """The saved value of the extra ``name``, else ``value`` (its initial one)."""
        return self.payload[name] if name in self.payload else value

    def restore_rng(self) -> None:
        warning = restore_rng(self._rng, self._device)
        if warning and not self._rng_warned:
            self._rng_warned = True  # restored twice per resume (track, first boundary): say it once
            log.warning("%s", warning)

    def warn_untracked(self, tracked: Iterable[str]) -> None:
        """Say which saved entries no ``track()`` asked for: they are ignored."""
        meta, known = self.payload["jobwrap"], set(tracked)
        untracked = [n for n in meta.get("objects", []) + meta.get("extras", []) if n not in known]
        if untracked:
            log.warning("checkpoint entries %s were not tracked in this run and are ignored", untracked)


def rank_entry(loaded: dict[str, Any], checkpoint: Checkpoint, *, rank: int, world_size: int,
               allow_world_size_change: bool) -> dict[str, Any]:
    """This rank's entry of a loaded payload; another number of ranks is refused unless that is exact or allowed."""
    ranks = loaded["jobwrap"]["ranks"]
    if len(ranks) != world_size and loaded["jobwrap"].get("dcp"):
        # Sharded state reshards exactly, and a job requeued onto fewer (or more) nodes is expected to
        # go on; only the per-rank streams are approximate, so say so instead of refusing.
        if rank == 0:
            log.warning("resuming %d-rank checkpoint with %d ranks: the sharded model and optimizer state are "
                        "resharded exactly; per-rank RNG streams and data order are not bit-exact "
                        "(rank r continues the streams of saved rank r mod %d)", len(ranks), world_size, len(ranks))
    elif len(ranks) != world_size:
        if not allow_world_size_change:
            raise StateMismatchError(
                f"{os.path.basename(checkpoint.path)} was saved by {len(ranks)} rank(s), this job has {world_size}: "
                f"each rank's RNG streams and data order cannot be mapped exactly. Resume with {len(ranks)} "
                f"rank(s), or set JOBWRAP_ALLOW_WORLD_SIZE_CHANGE=1 to accept a resume that is not bit-exact.")
        log.warning("resuming %d-rank checkpoint with %d ranks: not bit-exact (allow_world_size_change)",
                    len(ranks), world_size)
    return ranks[rank % len(ranks)]
