"""torch.distributed.checkpoint (DCP) internals that jobwrap._storage.sharded relies on (checked on torch 2.13.0).

jobwrap reads a sharded checkpoint more safely than DCP does by default: its metadata pickle
through an unpickler that lets only DCP's own classes through, and its non-tensor values under
``torch.load(weights_only=True)`` (a planner whose ``load_bytes`` does that). A whole folder is
read into one process (``jobwrap export``) through DCP's loader without a process group. Each
of these rests on a name DCP does not export; a torch that changed one is refused when a
sharded model is first tracked (:func:`unrecognised`), not when a resume needs it hours later.
The canary in tests/test_compat.py writes a small DCP folder and reads it back through them.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from jobwrap._compat.notice import changed

CHECKED = "2.13.0"
ADAPTER = "torch_dcp.py"

#: The classes a DCP metadata file is made of (the pickle's globals), by module: the safe unpickler lets
#: these through and no other. A torch that pickles another class there makes every folder unreadable.
METADATA_CLASSES: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def weights_only_planner(*, empty: bool = False) -> Any:
    """DCP's load planner (``empty``: ``_EmptyStateDictLoadPlanner``, which loads a whole folder into an empty
    dict), whose non-tensor values load under ``weights_only`` (``_traverse.set_element`` puts a flattened
    value back where it belongs)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    class WeightsOnlyPlanner(_EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner):  # type: ignore[misc]
        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyPlanner()


def load_in_place(state: dict[str, Any], *, reader: Any, planner: Any) -> None:
    """Fill ``state`` in place from ``reader``, in this process alone (``state_dict_loader._load_state_dict``
    with ``no_dist``: ``dcp.load`` would fill a copy of an empty dict)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)


#: Where each name the adapters above import lives.
_IMPORTED = {
    "torch.distributed.checkpoint": "DefaultLoadPlanner",
    "torch.distributed.checkpoint._traverse": "set_element",
    "torch.distributed.checkpoint.default_planner": "_EmptyStateDictLoadPlanner",
    "torch.distributed.checkpoint.state_dict_loader": "_load_state_dict",
}


def unrecognised() -> str | None:
    """None where this torch has every DCP internal above; else the first that differs."""
    for module, name in _IMPORTED.items():
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
        if found is None:
            return changed("torch", f"{module}.{name}", ADAPTER, "it is gone", CHECKED)
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if "no_dist" not in inspect.signature(_load_state_dict).parameters:
        return changed("torch", "state_dict_loader._load_state_dict", ADAPTER, "it takes no no_dist", CHECKED)
    if not hasattr(DefaultLoadPlanner, "load_bytes"):
        return changed("torch", "DefaultLoadPlanner.load_bytes", ADAPTER, "it is gone", CHECKED)
    return None
