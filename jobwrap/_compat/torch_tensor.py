"""Attributes of torch tensors that jobwrap's copies rely on (checked on torch 2.13.0 and 2.14.1).

A background save stages each distinct storage once (views of one storage share its copy),
and an optimizer's CPU state may be copied lazily, after training went on, as long as nothing
changed it in place meanwhile; a save is skipped when nothing changed since the last one. The
first needs a storage's identity, the others a tensor's version counter, which every in-place
operation bumps (a DTensor's, on its local shard). None of them is public API. Where they are
gone: storages are told apart by device, address and size (what the identity stands for), and
the counter's users take their safe paths (the copy made at once, gradients always saved),
with one warning. The canaries are in tests/test_compat.py.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from jobwrap._compat.notice import changed, fall_back

CHECKED = "2.13.0"
ADAPTER = "torch_tensor.py"


def storage_key(storage: Any) -> Any:
    """One value per live storage, the same for every tensor that views it (``UntypedStorage._cdata``)."""
    key = getattr(storage, "_cdata", None)
    if key is None:
        fall_back(changed("torch", "UntypedStorage._cdata", ADAPTER, "it is gone", CHECKED),
                  "tells storages apart by device, address and size")
        return (storage.device.type, storage.device.index, storage.data_ptr(), storage.nbytes())
    return key


@functools.cache
def has_versions() -> bool:
    """Whether tensors carry the in-place version counter (``Tensor._version``); warned once where not.
    Asked at every background save, answered once a process."""
    if isinstance(getattr(torch.empty(0), "_version", None), int):
        return True
    fall_back(changed("torch", "Tensor._version", ADAPTER, "it is gone", CHECKED),
              "copies optimizer state at once and saves every gradient")
    return False


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard on this rank (``DTensor._local_tensor``: ``to_local()`` would add an autograd
    node at every call), or ``tensor`` itself."""
    return getattr(tensor, "_local_tensor", tensor)


def version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (``Tensor._version``); RuntimeError where it has none."""
    found = getattr(tensor, "_version", None)
    if not isinstance(found, int):
        raise RuntimeError(f"{type(tensor).__name__} has no version counter")
    return found
