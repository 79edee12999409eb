"""A checkpoint's contents: what a save writes, and the verified read of it at resume.

The payload is one dict that ``torch.load(weights_only=True)`` opens without
jobwrap: each tracked object's state dict under its name (sharded objects live in
the step's folder instead), the extras as plain values, ``epoch`` and ``step``,
and ``jobwrap``: the format, the loader's position, one entry per rank (its RNG
streams, its loader's state, gradients pending between optimizer steps), the
names tracked, the run, and the record of a sharded folder or of striped parts
(:mod:`jobwrap._storage.striped`: those tensors are None in the .pt, and put back at the load).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping

import torch

from jobwrap import __version__
from jobwrap._scheduler.env import JobEnv
from jobwrap._storage import records, sharded, striped
from jobwrap._storage.state import capture_rng, plain
from jobwrap._storage.store import STRIPED_FORMAT, Checkpoint, CheckpointStore, folder_name
from jobwrap.errors import CorruptCheckpointError


def states(objects: Mapping[str, Any], sharded_names: list[str]) -> dict[str, Any]:
    """The state dicts a .pt holds: every tracked object's but the sharded ones (those are in the folder)."""
    return {name: obj.state_dict() for name, obj in objects.items() if name not in sharded_names}


def build(objects: Mapping[str, Any], extras: Mapping[str, Any], *, sharded_names: list[str], epoch: int,
          step: int, position: int, ranks: list[dict[str, Any]], run_id: str,
          shards: dict[str, Any] | None = None, stripes: dict[str, Any] | None = None,
          object_states: dict[str, Any] | None = None, epoch_done: bool = False) -> dict[str, Any]:
    """The payload of a save; ``epoch_done``: saved after the epoch's loader loop ran out (a resume starts at the
    next epoch); ``shards``: the record of its sealed sharded folder; ``stripes``: of its striped
    parts, with ``object_states`` the states without the striped tensors."""
    payload: dict[str, Any] = dict(object_states if object_states is not None else states(objects, sharded_names))
    payload.update({name: plain(value, name) for name, value in extras.items()})
    payload["epoch"] = epoch
    payload["step"] = step
    payload["jobwrap"] = {
        "format": STRIPED_FORMAT if stripes is not None else 1,  # as the manifest says (store.STRIPED_FORMAT)
        "position": position,
        "world_size": len(ranks),
        "ranks": ranks,
        "objects": list(objects),
        "extras": list(extras),
        "run_id": run_id,
    }
    if epoch_done:
        payload["jobwrap"]["epoch_done"] = True
    if shards is not None:
        payload["jobwrap"]["dcp"] = shards
    if stripes is not None:
        payload["jobwrap"]["stripes"] = stripes
    return payload


def meta(reason: str, *, run_id: str, job: JobEnv) -> dict[str, Any]:
    """The manifest's description of a save: who wrote it, why, and with what."""
    return {
        "run_id": run_id,
        "job_id": job.job_id,
        "restart_count": job.restart_count,
        "world_size": job.world_size,
        "reason": reason,
        "wall_time": time.time(),
        "host": socket.gethostname(),
        "jobwrap_version": __version__,
        "torch_version": torch.__version__,
    }


def rank_state(device: torch.device, loader: Any) -> dict[str, Any]:
    """What differs between ranks: RNG streams and the loader's epoch-start state."""
    return {"rng": capture_rng(device), "data": loader.state_dict() if loader is not None else {}}


def load(store: CheckpointStore, checkpoint: Checkpoint, device: torch.device) -> dict[str, Any]:
    """The .pt of ``checkpoint``, read once: torch.load fills its tensors while the checksum is computed.

    The seconds of that read go in ``payload["jobwrap"]["read_seconds"]`` (in memory only), for the
    start event: the part of the load time that is the disk and the checksum.
    """
    began = time.monotonic()
    payload = store.read_verified(checkpoint, lambda f: torch.load(f, map_location=device, weights_only=True))
    wrong = records.payload_meta(payload)
    if wrong is not None:
        raise CorruptCheckpointError(f"{checkpoint.path} {wrong}")
    striped.fill(store, checkpoint, payload, device)
    payload["jobwrap"]["read_seconds"] = round(time.monotonic() - began, 4)
    return payload


def load_verified(store: CheckpointStore, checkpoint: Checkpoint, device: torch.device) -> dict[str, Any]:
    """Rank 0 at resume: the .pt, and its sharded folder's files against the checksums it records."""
    payload = load(store, checkpoint, device)
    record = payload["jobwrap"].get("dcp")
    if record:
        sharded.check_record(record, folder_name(checkpoint.step, checkpoint.serial), os.path.basename(checkpoint.path))
        store.verify_folder(checkpoint, record["files"])
    return payload


def whole(store: CheckpointStore, checkpoint: Checkpoint) -> dict[str, Any]:
    """Everything ``checkpoint`` holds as one payload on the CPU, verified: striped tensors put back, sharded
    state gathered into full tensors (as if rank 0 alone had saved it). For export and tests."""
    loaded = load_verified(store, checkpoint, torch.device("cpu"))
    loaded["jobwrap"].pop("read_seconds", None)
    record = loaded["jobwrap"].get("dcp")
    if record:
        loaded.update(sharded.read_full(store.folder_path(checkpoint.step, checkpoint.serial), record["files"]))
    return loaded
