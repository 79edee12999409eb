"""``jobwrap ls DIR [--json]``: the checkpoints of a directory and which one a resume would pick."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from jobwrap._format import human_age, human_size, table
from jobwrap._storage.deadline import checkpoint_bytes
from jobwrap._storage.store import CheckpointStore
from jobwrap.errors import CorruptCheckpointError

NAME = "ls"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="list a directory's checkpoints, verified or not, and the one a resume would pick",
        epilog="example: jobwrap ls checkpoints/ --json",
    )
    parser.add_argument("directory")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--no-verify", action="store_true", help="skip reading files to check their checksums")
    parser.set_defaults(func=main)


def listing(directory: str, *, verify: bool = True) -> list[dict[str, Any]]:
    """One row per checkpoint file pair, newest first, with the resume pick marked."""
    store = CheckpointStore(directory)
    rows: list[dict[str, Any]] = []
    committed = {c.key: c for c in store.committed()}
    picked = False
    for item in store.listing():
        checkpoint = committed.get(item.key)
        row: dict[str, Any] = {"step": item.step, "path": store.data_path(item.step, item.serial),
                               "committed": checkpoint is not None}
        if checkpoint is None:
            row.update(status="uncommitted", epoch=None, size=None, time=None)
        else:
            # with its .dcp folder (FSDP state)
            row.update(epoch=checkpoint.epoch, size=checkpoint_bytes(checkpoint.manifest),
                       time=checkpoint.manifest.get("wall_time"),
                       run_id=checkpoint.run_id, reason=checkpoint.manifest.get("reason"))
            if verify:
                try:
                    store.verify(checkpoint)
                    row["status"] = "verified"
                except CorruptCheckpointError as exc:
                    row["status"] = "corrupt"
                    row["problem"] = str(exc)
            else:
                row["status"] = "unchecked"
        row["resume"] = not picked and row["status"] in ("verified", "unchecked")
        picked = picked or row["resume"]
        rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.directory):
        print(f"jobwrap ls: {args.directory} is not a directory")
        return 2
    rows = listing(args.directory, verify=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no checkpoints in {args.directory}: a resume would start fresh")
        return 0
    now = time.time()
    print(table(["", "step", "epoch", "size", "age", "status", "file"], [
        ["->" if r["resume"] else "", r["step"], "" if r["epoch"] is None else r["epoch"],
         human_size(r["size"]), human_age(now - r["time"]) if r["time"] else "", r["status"],
         os.path.basename(r["path"])]
        for r in rows]))
    if not any(r["resume"] for r in rows):
        print("no verified checkpoint: a resume would start fresh")
    return 0
