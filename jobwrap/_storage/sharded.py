"""Sharded (FSDP) model and optimizer state through ``torch.distributed.checkpoint`` (DCP).

A model whose parameters are DTensors (FSDP2's ``fully_shard``; FSDP1 too) has
no full copy on any rank, so rank 0 cannot ``torch.save`` it. Such a model and
the optimizers over its parameters are written by every rank into the step's
``.dcp`` folder, FQN-keyed through ``get_state_dict``; everything else
(scheduler, extras, every rank's RNG, the loader's position) stays in rank 0's
small ``.pt``, which also records the folder's files with their sizes and
checksums. :func:`commit` writes the manifest only after every rank's part is
durable, so the manifest remains the one commit marker.

Loading goes through ``dcp.load`` into state dicts taken from the objects as
they are now (the current sharding, the current device), then
``set_state_dict``: a checkpoint saved by 2 ranks loads onto 1, or 4, exactly.

``torch.distributed.checkpoint`` is imported only here (its internals through
jobwrap/_compat/torch_dcp.py), and only when sharded state is present.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import torch

from jobwrap._compat import torch_dcp as dcp_internals
from jobwrap._storage.faults import crash_point
from jobwrap._storage.state import few
from jobwrap._storage.store import Checkpoint, CheckpointStore, checksum_of, folder_name, parse_name
from jobwrap.errors import CheckpointError, ConfigError, CorruptCheckpointError, StateMismatchError, StorageError

log = logging.getLogger("jobwrap")

METADATA = ".metadata"  # DCP's own commit marker inside the folder, written by the coordinator (rank 0)


# ---------------------------------------------------------------- detection

def is_sharded(obj: object) -> bool:
    """True for a module whose parameters are DTensors, or that holds an FSDP1 wrapper.

    Nothing is imported: a DTensor can exist only once ``torch.distributed.tensor`` is loaded.
    """
    if not isinstance(obj, torch.nn.Module):
        return False
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in obj.parameters()):
        return True
    fsdp = sys.modules.get("torch.distributed.fsdp")
    legacy = getattr(fsdp, "FullyShardedDataParallel", None)
    return legacy is not None and any(isinstance(m, legacy) for m in obj.modules())


def owner(objects: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> torch.nn.Module | None:
    """The tracked module whose parameters ``optimizer`` updates (get/set_state_dict need the pair)."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for obj in objects.values():
        if isinstance(obj, torch.nn.Module) and params & {id(p) for p in obj.parameters()}:
            return obj
    return None


def sharded_names(objects: Mapping[str, Any]) -> list[str]:
    """Tracked names whose state goes through DCP: sharded modules and the optimizers over them.

    Where there are any, a torch whose DCP internals jobwrap does not recognise is refused here, at
    ``track()``: its checkpoints would be written, but a resume could not read them back safely.
    """
    modules = [name for name, obj in objects.items() if is_sharded(obj)]
    if not modules:
        return []
    difference = dcp_internals.unrecognised()
    if difference is not None:
        raise ConfigError(
            f"{difference}. jobwrap reads a sharded checkpoint ({', '.join(modules)}) through those internals, "
            f"so a resume could not load what this run saves: install torch {dcp_internals.CHECKED} (or "
            f"another tested release, see the guide's supported versions), or track an unsharded model")
    sharded = {id(objects[name]) for name in modules}
    optimizers = [name for name, obj in objects.items() if isinstance(obj, torch.optim.Optimizer)
                  and id(owner(objects, obj)) in sharded]
    return [name for name in objects if name in modules or name in optimizers]


# ---------------------------------------------------------------- state dicts

def state_dicts(objects: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``{name: state}`` as DCP saves and loads it: sharded tensors, FQN keys, optimizer state initialised."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {}
    for name in names:
        obj = objects[name]
        if isinstance(obj, torch.optim.Optimizer):
            state[name] = get_optimizer_state_dict(_owner_of(objects, name, obj), obj)
        else:
            state[name] = get_model_state_dict(obj)
    return state


def _owner_of(objects: Mapping[str, Any], name: str, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    module = owner(objects, optimizer)
    if module is None:
        raise StateMismatchError(
            f"optimizer {name!r} is in the checkpoint's sharded state, but no tracked model holds its "
            f"parameters: track the model in the same session (session.track(model=model, {name}={name})).")
    return module


def apply(objects: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Load ``state`` (as :func:`state_dicts` made it, now filled) into the objects."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    for name, value in state.items():
        obj = objects[name]
        if isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner_of(objects, name, obj), obj, value)
        else:
            set_model_state_dict(obj, value)


# ---------------------------------------------------------------- write

def write(state: dict[str, Any], folder: str, process_group: Any) -> list[str]:
    """This rank's part of ``state`` into ``folder`` (DCP, every file fsynced); returns the files it wrote.

    A collective: every rank calls it with the same folder. DCP's own planning
    collectives run on ``process_group`` (jobwrap's gloo side group), never
    behind the training's NCCL traffic.
    """
    import torch.distributed.checkpoint as dcp

    writer = _writer_class()(folder, sync_files=True)
    dcp.save(state, storage_writer=writer, process_group=process_group, no_dist=_no_dist())
    crash_point("dcp-written")
    return sorted(writer.written)


_WRITER: type | None = None


def _writer_class() -> type:
    """A FileSystemWriter that remembers which files this rank wrote (each rank checksums its own)."""
    global _WRITER
    if _WRITER is None:
        from torch.distributed.checkpoint import FileSystemWriter

        class RecordingWriter(FileSystemWriter):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.written: set[str] = set()

            def write_data(self, plan: Any, planner: Any) -> Any:
                future = super().write_data(plan, planner)
                self.written |= {result.storage_data.relative_path for result in future.value()}
                crash_point("dcp-data-written")
                return future

        _WRITER = RecordingWriter
    return _WRITER


def describe(folder: str, files: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{file: {size, checksum}}``: what verification at resume compares against."""
    found = {}
    for name in files:
        digest, size = checksum_of(os.path.join(folder, name))
        found[name] = {"size": size, "checksum": digest}
    return found


def errors() -> tuple[type[BaseException], ...]:
    """What DCP raises: its CheckpointException (every rank's failures, gathered) is a BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


def failure(exc: BaseException) -> tuple[int | None, str]:
    """A rank's save error as (errno, one line), to gather at rank 0 (exceptions may not pickle)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    code = cause.errno if isinstance(cause, OSError) else None
    return code, reason(exc)


def reason(exc: BaseException, prefer: str = "") -> str:
    """One line for a report. DCP's CheckpointException holds every failed rank's traceback: take the line
    with ``prefer`` in it, else the last ``SomeError: ...`` line, which is the error itself."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if line.split(": ", 1)[0].endswith(("Error", "Exception"))]
    preferred = [line for line in lines if prefer and prefer in line.lower()]
    if preferred or named:
        return (preferred or named[::-1])[0]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------- the commit: every rank writes, rank 0 seals

def commit(store: CheckpointStore, group: Any, *, step: int, objects: Mapping[str, Any], names: list[str],
           on_rank0: Callable[[Callable[[], Any]], Any], write_file: Callable[[dict[str, Any], int], Any]) -> Any:
    """Every rank writes its shards; only once all are durable does rank 0 write the .pt and commit.

    ``on_rank0(work)``: rank 0 runs ``work``, every rank returns its result or
    raises its error (a collective). ``write_file(shards, serial)``: rank 0's
    .pt and manifest, given the sealed folder's record.
    """
    def write_shards(folder: str) -> dict[str, dict[str, Any]]:
        files = write(state_dicts(objects, names), folder, getattr(group, "group", None))
        # DCP's coordinator, rank 0, wrote the folder's .metadata after every rank's data.
        return describe(folder, files + ([METADATA] if group.rank == 0 else []))

    return commit_folder(store, group, step=step, write_part=write_shards, catch=errors(), what="sharded state",
                         on_rank0=on_rank0, write_file=lambda record, serial: write_file(
                             {**record, "objects": list(names)}, serial))


def commit_folder(store: CheckpointStore, group: Any, *, step: int,
                  write_part: Callable[[str], dict[str, dict[str, Any]]], catch: tuple[type[BaseException], ...],
                  what: str, on_rank0: Callable[[Callable[[], Any]], Any],
                  write_file: Callable[[dict[str, Any], int], Any]) -> Any:
    """The step's folder protocol, for any state every rank writes a part of (DCP shards, striped parts).

    Rank 0 claims a fresh folder; every rank runs ``write_part(folder)`` (its
    files' ``{name: {size, checksum}}``); rank 0 seals the folder once every part
    is durable and ``write_file(record, serial)`` writes the .pt and the manifest,
    which stays the one commit marker: a kill before it leaves a folder that
    resume ignores and the next start removes. A rank's failure (one of
    ``catch``) reaches every rank as a StorageError naming it and ``what``.
    """
    folder = on_rank0(lambda: _claim_folder(store, step))
    serial = parse_name(os.path.basename(folder))[1]
    try:
        written: Any = write_part(folder)
    except catch as exc:  # gathered below, so that every rank raises instead of some hanging
        written = failure(exc)
    parts = group.gather(written)
    return on_rank0(lambda: _write_sealed(store, step, what, parts, serial, write_file))


def _claim_folder(store: CheckpointStore, step: int) -> str:
    """Rank 0: a fresh folder; a step saved before gets the next serial, a committed one is never overwritten."""
    return store.open_folder(step, store.next_serial(step))


def _write_sealed(store: CheckpointStore, step: int, what: str, parts: list[Any], serial: int,
                  write_file: Callable[[dict[str, Any], int], Any]) -> Any:
    """Rank 0: seal every rank's part, then the .pt and the manifest; an uncommitted folder is not left behind."""
    record = _seal(store, step, what, parts, serial)
    try:
        return write_file(record, serial)
    except CheckpointError:
        if not any(c.key == (step, serial) for c in store.committed()):  # committed: its own folder
            store.discard_folder(step, serial)
        raise


def _seal(store: CheckpointStore, step: int, what: str, parts: list[Any], serial: int) -> dict[str, Any]:
    """Rank 0: the record of a folder every rank finished, made durable; or the first rank's failure."""
    failed = [(rank, part) for rank, part in enumerate(parts) if isinstance(part, tuple)]
    if failed:
        store.discard_folder(step, serial)
        rank, (code, message) = failed[0]
        raise StorageError(code or errno.EIO, f"rank {rank} could not write its part of the {what} "
                                              f"of step {step}: {message}; nothing was committed")
    files = {name: meta for part in parts for name, meta in part.items()}
    store.seal_folder(step, files, serial)
    return {"folder": folder_name(step, serial), "world_size": len(parts),
            "files": files, "bytes": sum(f["size"] for f in files.values())}


def restore(objects: Mapping[str, Any], names: list[str], *, sharded_names: list[str], checkpoint: Checkpoint,
            record: dict[str, Any], store: CheckpointStore, group: Any,
            clock: Callable[[], float] = time.monotonic) -> None:
    """Every rank: the tracked sharded objects from the resumed checkpoint's folder, resharded as needed."""
    unsharded = [name for name in names if name not in sharded_names]
    if unsharded:
        raise StateMismatchError(
            f"{os.path.basename(checkpoint.path)} holds {', '.join(unsharded)} as sharded state (FSDP, saved "
            f"through torch.distributed.checkpoint), but here {'they are' if len(unsharded) > 1 else 'it is'} not "
            f"sharded: wrap the model as the run that saved it did (fully_shard) before track(), tracking its "
            f"optimizer in the same call, or start a new run in a new directory.")
    started = clock()
    folder = store.folder_path(checkpoint.step, checkpoint.serial)  # the verified one, never a path from the file
    load(objects, names, folder, getattr(group, "group", None), files=record["files"])
    if group.rank == 0:
        log.info("loaded %s from %s (saved by %d rank(s), loaded by %d) in %.2f s", ", ".join(names),
                 record["folder"], record["world_size"], group.world_size, clock() - started)


# ---------------------------------------------------------------- load

def check_record(record: Any, folder: str, source: str) -> None:
    """``source``'s record of its sharded folder, checked before anything in the folder is read.

    The folder is the step's own (``folder``), never a path the file names; every
    file is a plain name in it, and DCP's ``.metadata`` is among the checksummed
    files. A record that says otherwise was not written by jobwrap.
    """
    files = record.get("files") if isinstance(record, dict) else None
    named = record.get("folder") if isinstance(record, dict) else record
    if not isinstance(files, dict) or named != folder:
        raise CorruptCheckpointError(f"{source}: its sharded state is said to be in {_short(named)}, not in its "
                                     f"own folder {folder}: not written by jobwrap, nothing there is read")
    odd = [name for name in files if not _plain_name(name)]
    if odd or METADATA not in files:
        raise CorruptCheckpointError(f"{source}: its sharded-state record lists {few(odd) if odd else 'no ' + METADATA}"
                                     f": not written by jobwrap, nothing in the folder is read")


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load(objects: Mapping[str, Any], names: list[str], folder: str, process_group: Any,
         files: Iterable[str]) -> None:
    """Load the named objects from ``folder`` onto their current sharding and device (a collective).

    ``files``: the folder's files whose checksums were verified; DCP reads no other.
    """
    import torch.distributed.checkpoint as dcp

    reader = _safe_reader(folder, set(files))
    state = state_dicts(objects, names)
    _check_keys(objects, state, set(reader.read_metadata().state_dict_metadata))
    try:
        dcp.load(state, storage_reader=reader, planner=dcp_internals.weights_only_planner(), process_group=process_group,
                 no_dist=_no_dist())
    except errors() as exc:  # a shape mismatch: a ValueError, gathered into a CheckpointException
        raise StateMismatchError(
            f"the sharded state in {folder} does not fit {', '.join(names)}: {reason(exc, 'mismatch')}. "
            f"Build the model exactly as the run that saved it (any world size), or start a new run "
            f"in a new directory.") from exc
    apply(objects, state)


# ---------------------------------------------------------------- safe reading

# DCP's .metadata is a plain pickle, and DCP loads non-tensor values (an optimizer's
# param_groups) with torch.load(weights_only=False): a crafted folder would run code.
# Only the classes a DCP metadata file is made of are let through (their list, and the
# planner that loads values under weights_only, are in jobwrap/_compat/torch_dcp.py), and values load
# under weights_only. Checksums alone cannot help: whoever crafts a whole directory
# crafts consistent checksums too.


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global (os.system, eval, ...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in dcp_internals.METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(folder: str, files: set[str]) -> Any:
    """The folder's DCP metadata, unpickled safely; every file it points to is one of ``files``."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = os.path.join(folder, METADATA)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError:
        raise  # the storage, not the file: not a reason to set the checkpoint aside
    except Exception as exc:  # a crafted or damaged pickle: every failure of it is the file's fault
        raise CorruptCheckpointError(f"{path}: not a checkpoint's metadata ({type(exc).__name__}: {exc}); "
                                     f"refused without running any of it") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CorruptCheckpointError(f"{path}: not a checkpoint's metadata ({type(metadata).__name__}); refused")
    stray = sorted({str(getattr(info, "relative_path", None)) for info in metadata.storage_data.values()} - files)
    if stray:
        raise CorruptCheckpointError(f"{path}: points to {few(stray)}, not among the verified files of the "
                                     f"folder; refused")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _safe_reader(folder: str, files: set[str]) -> Any:
    """A FileSystemReader whose metadata comes from :func:`read_metadata` (read once)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        _metadata: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise CorruptCheckpointError(f"{folder}: no per-rank metadata is read")
            if self._metadata is None:
                self._metadata = read_metadata(folder, files)
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata

    return SafeReader(folder)


def read_full(folder: str, files: Iterable[str]) -> dict[str, Any]:
    """A whole DCP folder as one unsharded state dict, in this process, read as safely as :func:`load`."""
    state: dict[str, Any] = {}
    dcp_internals.load_in_place(state, reader=_safe_reader(folder, set(files)),
                                planner=dcp_internals.weights_only_planner(empty=True))
    return state


def _check_keys(objects: Mapping[str, Any], state: Mapping[str, Any], saved: set[str]) -> None:
    """A model's parameter names against the checkpoint's (DCP ignores a saved key nobody asks for)."""
    for name, value in state.items():
        if isinstance(objects[name], torch.optim.Optimizer):
            continue
        prefix = f"{name}."
        have = {key[len(prefix):] for key in saved if key.startswith(prefix)}
        missing, unexpected = sorted(set(value) - have), sorted(have - set(value))
        if missing or unexpected:
            parts = ([f"missing keys {few(missing)}"] if missing else []) + \
                    ([f"unexpected keys {few(unexpected)}"] if unexpected else [])
            raise StateMismatchError(
                f"checkpoint entry {name!r} (sharded) does not match the model: {'; '.join(parts)}. "
                f"Build the model exactly as the run that saved it (any world size), or start a new run "
                f"in a new directory.")


def _no_dist() -> bool:
    """One process without torch.distributed: DCP reads and writes without collectives."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())
