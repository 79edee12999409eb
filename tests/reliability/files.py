"""Checkpoint files on disk: write them through the store, damage them, and check what is left.

The checks read the directory without changing it: what a resume would find.
"""
from __future__ import annotations

import json
import os
import random
from typing import Any

import torch

from jobwrap import CorruptCheckpointError

from .internals import CheckpointStore, checksum_of, data_path, manifest_path
from .training import payload, payload_matches


def commit(store: Any, step: int, numel: int = 4096, run_id: str | None = "mine") -> Any:
    """Save the payload of ``step`` through ``store`` (a run id of None: no run id in the manifest)."""
    return store.save(payload(step, numel), step=step, epoch=0, meta={"run_id": run_id} if run_id else {})


def store_with(directory: str, steps: tuple[int, ...] = (), numel: int = 4096) -> Any:
    """A prepared store on ``directory`` holding a committed checkpoint at each of ``steps``."""
    store = CheckpointStore(directory)
    store.prepare()
    for step in steps:
        commit(store, step, numel)
    return store


def intact(directory: str, step: int, numel: int = 4096) -> bool:
    """The checkpoint of ``step`` verifies and loads with the content saved at that step."""
    store = CheckpointStore(directory)
    for checkpoint in store.committed():
        if checkpoint.step == step:
            try:
                store.verify(checkpoint)
                return payload_matches(torch.load(checkpoint.path, weights_only=True), step, numel)
            except Exception:  # noqa: BLE001
                return False
    return False


def newest_committed(directory: str) -> int | None:
    """The step of the newest committed checkpoint, verified or not."""
    return max((c.step for c in CheckpointStore(directory).committed()), default=None)


def temporaries(directory: str) -> list[str]:
    """The temporary files a save left behind."""
    try:
        return [n for n in os.listdir(directory) if n.startswith(".tmp-")]
    except OSError:
        return []


def files_of(directory: str, step: int) -> list[str]:
    """The names of ``step``'s files in ``directory`` (data, manifest, folder)."""
    stem = os.path.basename(data_path(directory, step))[:-len(".pt")]
    return [n for n in os.listdir(directory) if n.startswith(stem)]


def edit_manifest(directory: str, which: int, **changes: Any) -> None:
    """Change fields of step ``which``'s manifest (a lie the store must catch)."""
    path = manifest_path(directory, which)
    with open(path) as f:
        record = json.load(f)
    record.update(changes)
    with open(path, "w") as f:
        json.dump(record, f)


def rehash(directory: str, step: int) -> None:
    """Make the manifest agree with whatever the data file now holds (so only the loader stands in the way)."""
    digest, size = checksum_of(data_path(directory, step))
    edit_manifest(directory, step, checksum=digest, size=size)


def flip_bit(path: str, rng: random.Random, offset: int | None = None) -> int:
    """Flip one random bit of the byte at ``offset`` (random where None); the offset."""
    size = os.path.getsize(path)
    offset = rng.randrange(size) if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return offset


def audit(directory: str, *, numel: int, keep_last: int, must_survive: set[int],
          damaged: set[int]) -> tuple[int | None, list[str], list[int]]:
    """What a resume would pick, checked without changing the directory; the problems found.

    A checkpoint that committed must verify; the newest verifying one must load
    with exactly the content saved at its step; every reported commit must
    still be there unless at least ``keep_last`` newer good ones replaced it.
    """
    problems: list[str] = []
    store = CheckpointStore(directory)
    good: list[int] = []
    for checkpoint in store.committed():
        try:
            store.verify(checkpoint)
            good.append(checkpoint.step)
        except CorruptCheckpointError as exc:
            if checkpoint.step not in damaged:
                problems.append(f"corrupt-committed: {exc}")
    pick = max(good) if good else None
    if pick is not None:
        try:
            if not payload_matches(torch.load(data_path(directory, pick), weights_only=True), pick, numel):
                problems.append(f"corrupt-load: step {pick} verified but holds other content")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"corrupt-load: step {pick} verified but does not load: {exc}")
    for step in sorted(must_survive):
        if step not in good and sum(1 for g in good if g > step) < keep_last:
            problems.append(f"lost: step {step} was committed and is gone (good now: {sorted(good)})")
    return pick, problems, good
