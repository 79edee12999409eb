"""``jobwrap export CHECKPOINT_OR_DIR OUT.pt``: one file that ``torch.load(OUT.pt, weights_only=True)`` opens.

A jobwrap checkpoint may be more than one file: striped parts written by every
rank, or sharded (FSDP) state in a torch.distributed.checkpoint folder. The
export is what a user would have saved by hand -- each tracked object's state
dict under its name, the extras, ``epoch`` and ``step`` -- verified, gathered
into full tensors on the CPU, in one plain ``torch.save`` file. jobwrap's own
entry (RNG streams, loader positions) is left out: it is for resuming.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from jobwrap._format import human_size
from jobwrap._storage.store import Checkpoint, CheckpointStore, parse_name
from jobwrap.errors import CorruptCheckpointError, JobwrapError

NAME = "export"
log = logging.getLogger("jobwrap")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="write a checkpoint (striped or sharded too) as one file torch.load(weights_only=True) opens",
        epilog="example: jobwrap export checkpoints/ model.pt   (the newest verified checkpoint of the directory)")
    parser.add_argument("source", help="a checkpoint's .pt (or .json) file, or a directory: its newest verified one")
    parser.add_argument("out", help="the file to write")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        checkpoint, state = export(args.source, args.out)
    except (JobwrapError, OSError) as exc:
        print(f"jobwrap export: {exc}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.out)
    print(f"exported step {checkpoint.step} of {checkpoint.path} to {args.out} ({human_size(size)}): "
          f"{', '.join(map(str, state))}")
    return 0


def export(source: str, out: str) -> tuple[Checkpoint, dict[str, Any]]:
    """Write ``source``'s state to ``out`` (through a temporary file and a rename); the checkpoint and the state."""
    import torch

    checkpoint, loaded = _read(source)
    state = {key: value for key, value in loaded.items() if key != "jobwrap"}
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return checkpoint, state


def _read(source: str) -> tuple[Checkpoint, dict[str, Any]]:
    """The verified payload of ``source`` (a checkpoint file, or a directory's newest verified checkpoint).

    Nothing is set aside or changed: a damaged checkpoint is reported and the previous one tried.
    """
    from jobwrap._loop import payload

    if os.path.isdir(source):
        store = CheckpointStore(source)
        for checkpoint in store.committed():
            try:
                return checkpoint, payload.whole(store, checkpoint)
            except CorruptCheckpointError as exc:
                log.warning("skipping %s: %s", os.path.basename(checkpoint.path), exc)
        raise JobwrapError(f"{source} holds no verified checkpoint (see `jobwrap ls {source}`)")
    parsed = parse_name(os.path.basename(source))
    store = CheckpointStore(os.path.dirname(os.path.abspath(source)))
    found = [c for c in store.committed() if parsed and c.key == parsed[:2]]
    if not found:
        raise JobwrapError(f"{source} is not a committed jobwrap checkpoint (a step-N.pt with its step-N.json "
                           f"manifest beside it): pass one, or the checkpoint directory for its newest")
    return found[0], payload.whole(store, found[0])
