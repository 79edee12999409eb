"""Striped replicated state: with N ranks, each writes about 1/N of a checkpoint's tensor bytes.

With DDP every rank holds the same model and optimizer, so a save written by
rank 0 alone is bounded by one writer's bandwidth (a parallel filesystem limits
each client). When striping applies -- several ranks, nothing sharded, not a
periodic save, at least ``stripe_min_bytes`` of tensors -- every rank computes the
same :func:`plan` from the state's layout (largest tensor first onto the least
loaded rank; no communication beyond rank 0's decision), writes its tensors as
``part-R.pt`` (a plain ``torch.save`` of ``{index: tensor}``) into the step's folder through the
store's hashing writer, and rank 0 writes the .pt -- everything else, each
striped tensor replaced by None and its place recorded under ``jobwrap.stripes``
-- and the manifest once every part is durable: the folder protocol FSDP state
uses (:func:`jobwrap._storage.sharded.commit_folder`).

Equal values on every rank are checked, not assumed: DDP keeps parameters and
optimizer state equal, but not buffers (each rank moves its BatchNorm
statistics with its own batches between DDP's broadcasts of rank 0's) nor
anything a script changes on one rank. Before a striped save every rank hashes
each tensor (:func:`digest`: xxh3 of its bytes, or a checksum on its
accelerator) and rank 0 gathers the digests; a tensor whose digest is not the
same on every rank is left out of the plan and stays in rank 0's .pt with rank
0's value, the one a one-file save writes. Only what is proven equal is striped.

At resume every part is read verified (size and checksum, like the .pt) and its
tensors are put back where they were before any ``load_state_dict``: the payload
is the one a one-file save would have given, on any number of ranks.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
import struct
from typing import Any, Callable, Mapping, Sequence

import torch
import xxhash

from jobwrap._storage import sharded
from jobwrap._storage.faults import crash_point
from jobwrap._storage.store import Checkpoint, CheckpointStore, folder_name
from jobwrap.errors import CorruptCheckpointError, StateMismatchError

log = logging.getLogger("jobwrap")

Place = list  # keys from a state dict's top (the tracked name) down to a tensor: str or int each


def part_name(rank: int) -> str:
    return f"part-{rank}.pt"


# ---------------------------------------------------------------- pure: what goes where

def plan(sizes: Sequence[int], ranks: int) -> list[int]:
    """The rank that writes each tensor: largest first onto the rank with the fewest bytes so far (ties: lowest)."""
    loads = [0] * ranks
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


def stripable(states: Mapping[str, Any]) -> list[tuple[Place, torch.Tensor]]:
    """(path, tensor) of each tensor reachable through dicts and lists that alone owns its storage, in order.

    Tensors that share a storage (tied weights, views of one buffer) stay in the
    .pt, where ``torch.save`` keeps them shared; so does anything in a tuple.
    """
    found: list[tuple[Place, torch.Tensor]] = []

    def walk(value: Any, path: Place) -> None:
        if isinstance(value, torch.Tensor):
            found.append((path, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, (str, int)) and not isinstance(key, bool):
                    walk(item, path + [key])
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, path + [index])

    for name, state in states.items():
        walk(state, [name])
    plain = [(p, t) for p, t in found if type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided]
    shared = collections.Counter(_storage(t) for _, t in plain)
    return [(p, t) for p, t in plain if shared[_storage(t)] == 1 and t.untyped_storage().nbytes() == t.nbytes]


def _storage(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def unproven(digests: Sequence[Sequence[int | None]]) -> list[int]:
    """Indices of the tensors whose digest is not one known value on every rank (rank 0's list first). Pure.

    Every list must cover the same tensors (the ranks' layouts are equal); a
    None digest (a tensor that could not be hashed) is never proven equal.
    """
    first = digests[0]
    return [i for i, value in enumerate(first) if value is None or any(d[i] != value for d in digests[1:])]


_WORDS = 1 << 23  # int32 words per piece of an accelerator's checksum (64 MiB of int64 temporaries, twice)
_ODD = 0x9E3779B97F4A7C15 - (1 << 64)  # as a signed int64: an odd multiplier spreads positions over 64 bits


def digest(tensor: torch.Tensor) -> int | None:
    """A 64-bit digest of a tensor's bytes, equal on two ranks whose values are equal bit for bit (None: no bytes).

    A CPU tensor: xxh3 where it lies (no copy when contiguous). One on an
    accelerator is checksummed there (:func:`checksum`): copying every rank's
    whole state to the host only to hash it would cost more than the striped
    write saves.
    """
    try:
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        if flat.device.type != "cpu":
            return checksum(flat)
        return xxhash.xxh3_64_intdigest(flat.numpy())
    except Exception:  # no plain bytes (a meta tensor), or no memory to read them: rank 0 keeps it
        return None  # (raised here, one rank would leave the others waiting in the gather)


def checksum(flat: torch.Tensor) -> int:
    """Two sums mod 2^64 over ``flat``'s bytes (uint8) read as int32 words, computed on its own device: plain, and
    weighted by an odd number per position, so any one changed word, or two words swapped, changes the result.

    Integer sums are exact in any order, so every rank of one device type gets the same value.
    """
    whole = flat.numel() - flat.numel() % 4
    words = flat[:whole].view(torch.int32)
    sums = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, words.numel(), _WORDS):
        piece = words[start:start + _WORDS].to(torch.int64)
        weights = torch.arange(start, start + piece.numel(), dtype=torch.int64, device=flat.device)
        sums[0] += piece.sum()
        sums[1] += piece.mul_(weights.mul_(_ODD).bitwise_or_(1)).sum()
    tail = flat[whole:].to(torch.int64)  # the last 1-3 bytes of an odd-sized tensor
    sums[0] += tail.mul_(torch.tensor([3, 5, 7], device=flat.device)[:tail.numel()]).sum()
    plain, weighted = sums.tolist()
    return xxhash.xxh3_64_intdigest(struct.pack("<qqq", plain, weighted, flat.numel()))


def _name(path: Place) -> str:
    return ".".join(str(key) for key in path)


def layout(tensors: Sequence[tuple[Place, torch.Tensor]]) -> str:
    """What the plan depends on (every path, dtype, shape): equal on ranks whose replicated state has one layout."""
    text = repr([(path, str(t.dtype), tuple(t.shape)) for path, t in tensors])
    return xxhash.xxh3_64_hexdigest(text.encode())


def skeleton(states: Mapping[str, Any], striped: set[int]) -> dict[str, Any]:
    """``states`` with each tensor whose id is in ``striped`` replaced by None; the containers on the way are
    copies (an optimizer's state_dict shares its per-parameter dicts with the optimizer)."""
    def strip(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return None if id(value) in striped else value
        if isinstance(value, dict):
            out = copy.copy(value)  # an OrderedDict's _metadata (load_state_dict's versions) comes along
            for key, item in value.items():
                out[key] = strip(item)
            return out
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    return {name: strip(state) for name, state in states.items()}


# ---------------------------------------------------------------- the save: every rank's part, rank 0's commit

def commit(store: CheckpointStore, group: Any, *, step: int, states: Callable[[], Mapping[str, Any]],
           min_bytes: int, on_rank0: Callable[[Callable[[], Any]], Any],
           write_file: Callable[[dict[str, Any], dict[str, Any], int], Any]) -> Any | None:
    """Every rank writes its part of ``states()`` (the tracked objects' state dicts); rank 0 commits (a collective).

    None, on every rank, when rank 0 finds fewer than ``min_bytes`` of tensors:
    the caller saves one file instead. ``write_file(skeleton, record, serial)``:
    rank 0's .pt (the states without the striped tensors) and manifest. A
    ``state_dict()`` that fails on any rank fails the save on every rank.
    Tensors whose values differ between ranks are not striped: rank 0's .pt
    holds rank 0's values, as in a one-file save.
    """
    try:
        taken, problem = states(), None
    except Exception as exc:  # raised in rank 0's decision or any rank's part: every rank hears of it
        taken, problem = {}, exc
    tensors = stripable(taken)
    mine = layout(tensors)
    wanted_here = problem is None and sum(t.nbytes for _, t in tensors) >= min_bytes
    # Hashed only where a striped save is likely (a rank with another layout is refused in write_part).
    digests = group.gather((mine, [digest(t) for _, t in tensors] if wanted_here else None))

    def decide() -> tuple[str, list[int]] | None:
        if problem is not None:
            raise problem
        if not wanted_here:
            return None
        comparable = [d for lay, d in digests if lay == mine and d is not None]
        kept = unproven(comparable) if len(comparable) == len(digests) else []
        if kept:
            names = ", ".join(_name(tensors[i][0]) for i in kept[:3]) + (", ..." if len(kept) > 3 else "")
            log.info("%d of %d tensors differ between the ranks (%s): rank 0's values are saved, as one file "
                     "would hold them", len(kept), len(tensors), names)
        return mine, kept

    wanted = on_rank0(decide)
    if wanted is None:
        return None
    layout_wanted, kept = wanted
    held = set(kept)
    spread = [pair for i, pair in enumerate(tensors) if i not in held] if mine == layout_wanted else []
    owners = plan([t.nbytes for _, t in spread], group.world_size)

    def write_part(folder: str) -> dict[str, dict[str, Any]]:
        if problem is not None:
            raise problem
        if mine != layout_wanted:
            raise StateMismatchError(
                f"rank {group.rank}'s tracked state has another layout than rank 0's (tensor names, shapes or "
                f"dtypes differ): striping needs the same state on every rank, as DDP keeps it. Track only "
                f"replicated objects, or set JOBWRAP_STRIPE_MIN_BYTES to more than the state (stripe_min_bytes=) "
                f"to save from rank 0 alone")
        part = {i: t for i, (_, t) in enumerate(spread) if owners[i] == group.rank}
        written = store.write_part(folder, part_name(group.rank), part)
        crash_point("part-written")
        return {part_name(group.rank): written}

    def write_sealed(record: dict[str, Any], serial: int) -> Any:
        record["tensors"] = [[owners[i], path] for i, (path, _) in enumerate(spread)]
        return write_file(skeleton(taken, {id(t) for _, t in spread}), record, serial)

    return sharded.commit_folder(store, group, step=step, write_part=write_part, catch=(Exception,),
                                 what="striped state", on_rank0=on_rank0, write_file=write_sealed)


# ---------------------------------------------------------------- the load: every part verified, put back

def fill(store: CheckpointStore, checkpoint: Checkpoint, payload: dict[str, Any], device: Any) -> None:
    """Put the striped tensors of ``checkpoint`` back into its loaded ``payload``; each part is read verified.

    A part that is missing, damaged or does not fit the record raises
    :class:`CorruptCheckpointError`: the checkpoint is set aside like a damaged .pt.
    """
    record = payload["jobwrap"].get("stripes")
    if not record:
        return
    source = os.path.basename(checkpoint.path)
    folder = store.folder_path(checkpoint.step, checkpoint.serial)  # its own folder, never a path from the file
    places = _check_record(record, folder_name(checkpoint.step, checkpoint.serial), source)
    for rank in range(record["world_size"]):
        name = part_name(rank)
        path = os.path.join(folder, name)
        if os.path.islink(folder) or os.path.islink(path):
            raise CorruptCheckpointError(f"{path}: a symlink, not followed")
        expected = record["files"][name]
        part = store.read_verified(
            dataclasses.replace(checkpoint, path=path, size=expected["size"], checksum=expected["checksum"]),
            lambda f: torch.load(f, map_location=device, weights_only=True))
        if not isinstance(part, dict) or sorted(part) != [i for i, r in places.items() if r == rank]:
            raise CorruptCheckpointError(f"{path}: its tensors are not the ones {source} places in it")
        for index, tensor in part.items():
            _put(payload, record["tensors"][index][1], tensor, source)


def _check_record(record: Any, folder: str, source: str) -> dict[int, int]:
    """``{tensor index: rank}`` from ``source``'s stripes record, once it is checked to be jobwrap's own."""
    try:
        ranks, files, tensors = int(record["world_size"]), record["files"], record["tensors"]
        if record["folder"] != folder or set(files) != {part_name(r) for r in range(ranks)}:
            raise ValueError(f"its parts are said to be {sorted(files)} in {record['folder']!r}")
        return {index: int(rank) for index, (rank, _) in enumerate(tensors) if 0 <= int(rank) < ranks}
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{source}: its striped-state record is not jobwrap's ({exc}); "
                                     f"nothing in the folder is read") from None


def _put(payload: dict[str, Any], path: Place, tensor: torch.Tensor, source: str) -> None:
    try:
        *parents, last = path
        container: Any = payload
        for key in parents:
            container = container[key]
        if container[last] is not None:
            raise ValueError("the place is not empty")
        container[last] = tensor
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{source}: a striped tensor's place {path!r} is not in it ({exc})") from None
