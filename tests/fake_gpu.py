"""Checkpoints as a GPU node writes them, made on a machine without a GPU.

``torch.save`` records each storage's location through the taggers of
``torch.serialization``'s package registry; :func:`saved_on` registers one
ahead of torch's own that names a CUDA device, so a real ``torch.save`` (and
jobwrap's store through it) writes ``cuda:3`` where the bytes came from the CPU.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import Any, Iterator

import torch
import torch.serialization

from jobwrap._storage.store import CheckpointStore, manifest_name


@contextlib.contextmanager
def saved_on(location: str) -> Iterator[None]:
    """Within the block, ``torch.save`` records every CPU storage as stored on ``location``."""
    def tag(storage: Any) -> str | None:
        return location if storage.device.type == "cpu" else None

    def restore(storage: Any, where: str) -> None:
        return None  # loading is torch's own business

    torch.serialization.register_package(-1000, tag, restore)
    entry = next(e for e in torch.serialization._package_registry if e[1] is tag)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


def locations(path: str | os.PathLike) -> set[str]:
    """The storage locations a torch.save file records (read, not trusted: each storage stays on the CPU)."""
    seen: set[str] = set()
    torch.load(path, map_location=lambda storage, location: seen.add(location) or storage, weights_only=True)
    return seen


def cuda_rng_state(seed: int) -> torch.Tensor:
    """A CUDA (Philox) generator state as ``torch.cuda.get_rng_state`` returns it: seed and offset, 16 bytes."""
    return torch.tensor(list(struct.pack("<QQ", seed, 0)), dtype=torch.uint8)


def as_gpu_node(directory: str | os.PathLike, *, location: str, cuda_devices: int = 0,
                saved_device: int | None = None) -> str:
    """Rewrite the newest checkpoint of ``directory`` as a node with ``cuda_devices`` GPUs saves it
    from ``location``: storages tagged there and (with ``cuda_devices``) each rank's CUDA RNG states
    for every device and the device it computed on. Committed through the store again (checksums
    valid); returns its path."""
    store = CheckpointStore(os.fspath(directory))
    newest = store.committed()[0]
    payload = torch.load(newest.path, weights_only=True)
    for rank, state in enumerate(payload["jobwrap"]["ranks"] if cuda_devices else []):
        state["rng"]["cuda"] = [cuda_rng_state(1000 * rank + i) for i in range(cuda_devices)]
        state["rng"]["cuda_device"] = saved_device
    meta = {k: v for k, v in newest.manifest.items()
            if k not in ("format", "file", "size", "checksum", "step", "epoch", "save_seconds")}
    os.remove(os.path.join(store.directory, manifest_name(newest.step)))  # uncommit, then replace
    os.remove(newest.path)
    with saved_on(location):
        return store.save(payload, step=newest.step, epoch=newest.epoch, meta=meta).path
