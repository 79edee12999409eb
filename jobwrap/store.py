"""Atomic, verified checkpoint files in one directory on shared storage.

Layout of a checkpoint directory::

    run.json                   which run owns the directory (and runs it adopted)
    step-000000001200.pt       a plain ``torch.save`` dict
    step-000000001200.json     its manifest: size, checksum, metadata -- the commit record
    events.jsonl               the run's history (see :mod:`jobwrap.events`)

Commit protocol: data to a temporary file in the same directory, fsync, rename;
then the manifest the same way; then fsync the directory. A checkpoint without
its manifest was never committed and is ignored (and cleaned up at the next
start). Readers trust a checkpoint only when its size and checksum match.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import time
import uuid
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import xxhash

from jobwrap.errors import CorruptCheckpointError, ForeignRunError, StorageError
from jobwrap.faults import crash_point

log = logging.getLogger("jobwrap")

FORMAT_VERSION = 1
RUN_FILE = "run.json"
_NAME = re.compile(r"^step-(\d{12})\.(pt|json)$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 16 << 20


# ---------------------------------------------------------------- pure policy

@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """What a directory listing says about one step: which of its two files exist."""

    step: int
    has_data: bool
    has_manifest: bool

    @property
    def committed(self) -> bool:
        return self.has_data and self.has_manifest


def parse_listing(names: Iterable[str]) -> list[Listing]:
    """Group file names by step, newest first. Unknown names are ignored."""
    found: dict[int, set[str]] = {}
    for name in names:
        match = _NAME.match(name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return [Listing(step, "pt" in kinds, "json" in kinds)
            for step, kinds in sorted(found.items(), reverse=True)]


def retention_victims(committed_steps: Iterable[int], keep_last: int) -> list[int]:
    """Steps to delete so that the newest ``keep_last`` committed checkpoints remain (never below one)."""
    keep = max(1, keep_last)
    return sorted(committed_steps, reverse=True)[keep:]


def leftovers(names: Iterable[str]) -> list[str]:
    """Files a killed save left behind: temporaries and data files whose manifest never landed."""
    names = list(names)
    orphans = [f"step-{item.step:012d}.pt" for item in parse_listing(names)
               if item.has_data and not item.has_manifest]
    return [n for n in names if n.startswith(_TMP_PREFIX)] + orphans


# ---------------------------------------------------------------- records

@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A committed checkpoint as its manifest describes it."""

    path: str
    step: int
    epoch: int
    size: int
    checksum: str
    manifest: dict[str, Any]

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id")


def _data_name(step: int) -> str:
    return f"step-{step:012d}.pt"


def _manifest_name(step: int) -> str:
    return f"step-{step:012d}.json"


class _HashingWriter:
    """A file object for ``torch.save`` that hashes the bytes as they go to disk (one pass)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = xxhash.xxh3_64()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.hash.update(data)
        written = self.raw.write(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.raw.flush()


def checksum_of(path: str) -> tuple[str, int]:
    """The checksum and size of a file, read in large chunks."""
    digest = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return "xxh3_64:" + digest.hexdigest(), size


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_oserror(exc: OSError) -> str:
    hints = {
        errno.ENOSPC: "the disk is full: free space or point JOBWRAP_DIR at a larger filesystem",
        errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota",
        errno.EACCES: "permission denied: make the directory writable or choose another",
        errno.EROFS: "the filesystem is read-only: choose a writable checkpoint directory",
        errno.ENOENT: "the checkpoint directory disappeared: recreate it or choose another",
        errno.EIO: "an I/O error from the storage: check the filesystem",
    }
    return hints.get(exc.errno or -1, os.strerror(exc.errno) if exc.errno else str(exc))


class CheckpointStore:
    """One run's checkpoint directory: write with the commit protocol, list, verify, load, retain."""

    def __init__(self, directory: str, *, file_mode: int = 0o600) -> None:
        self.directory = os.path.abspath(directory)
        self.file_mode = file_mode

    # ------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Create the directory, prove it is writable, and clean what a killed save left."""
        dir_mode = 0o700 | ((self.file_mode & 0o040) and 0o050)
        try:
            os.makedirs(self.directory, mode=dir_mode, exist_ok=True)
            probe = os.path.join(self.directory, f"{_TMP_PREFIX}probe-{uuid.uuid4().hex}")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StorageError(exc.errno, f"checkpoint directory {self.directory} is not usable: "
                               f"{_describe_oserror(exc)}") from exc
        for name in leftovers(os.listdir(self.directory)):
            log.info("removing %s left by an interrupted save", name)
            self._remove(name)

    def claim(self, run_id: str | None, *, adopt: bool = False) -> tuple[str, list[str]]:
        """Make sure this directory belongs to ``run_id``; return (run id, accepted lineage).

        A directory with another run's committed checkpoints is refused unless
        ``adopt`` is set, so two jobs never resume from each other's state.
        """
        path = os.path.join(self.directory, RUN_FILE)
        record = self._read_json(path)
        if record is None:
            run_id = run_id or uuid.uuid4().hex[:12]
            self._write_json(RUN_FILE, {"run_id": run_id, "lineage": [run_id], "created": time.time()})
            return run_id, [run_id]
        owner = record.get("run_id")
        lineage = list(record.get("lineage") or [owner])
        if run_id is None or run_id in lineage:
            return (run_id or owner), lineage
        if not adopt and self.committed():
            raise ForeignRunError(
                f"checkpoint directory {self.directory} holds checkpoints of run {owner!r}, "
                f"but this is run {run_id!r}. Use a new directory for a new run, or set "
                f"JOBWRAP_ADOPT=1 (adopt=True, jobwrap run --adopt) to continue from that run's checkpoints.")
        if adopt:
            log.info("run %s adopts the checkpoints of run %s in %s", run_id, owner, self.directory)
        lineage.append(run_id)
        self._write_json(RUN_FILE, {"run_id": run_id, "lineage": lineage, "created": time.time()})
        return run_id, lineage

    # ------------------------------------------------------------ write
    def save(self, payload: dict[str, Any], *, step: int, epoch: int, meta: dict[str, Any]) -> Checkpoint:
        """Write ``payload`` with ``torch.save`` and commit it; nothing older is touched."""
        import torch

        existing = self._manifest(step)
        if existing is not None:
            log.info("step %d is already committed in %s; not saving it twice", step, existing.path)
            return existing
        data_tmp = self._tmp_name(_data_name(step))
        started = time.monotonic()
        try:
            fd = os.open(os.path.join(self.directory, data_tmp),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
            with os.fdopen(fd, "wb", buffering=_CHUNK) as raw:
                writer = _HashingWriter(raw)
                torch.save(payload, writer)
                raw.flush()
                crash_point("data-written")
                os.fsync(raw.fileno())
            crash_point("data-synced")
            os.replace(os.path.join(self.directory, data_tmp),
                       os.path.join(self.directory, _data_name(step)))
            crash_point("data-renamed")
            manifest = {
                "format": FORMAT_VERSION,
                "file": _data_name(step),
                "size": writer.size,
                "checksum": "xxh3_64:" + writer.hash.hexdigest(),
                "step": step,
                "epoch": epoch,
                "save_seconds": round(time.monotonic() - started, 6),
                **meta,
            }
            self._write_json(_manifest_name(step), manifest, before_rename="manifest-written")
            crash_point("committed")
        except OSError as exc:
            self._remove(data_tmp)
            self._remove(_data_name(step))
            previous = self.committed()
            kept = f"the previous checkpoint (step {previous[0].step}) is intact" if previous else \
                "no earlier checkpoint exists"
            raise StorageError(exc.errno, f"could not save step {step} in {self.directory}: "
                               f"{_describe_oserror(exc)}; {kept}") from exc
        return self._as_checkpoint(manifest)

    def retain(self, keep_last: int) -> list[int]:
        """Delete committed checkpoints beyond the newest ``keep_last``; uncommit before deleting data."""
        victims = retention_victims([c.step for c in self.committed()], keep_last)
        for step in victims:
            self._remove(_manifest_name(step))
            crash_point("retention")
            self._remove(_data_name(step))
        if victims:
            fsync_dir(self.directory)
        return victims

    # ------------------------------------------------------------ read
    def committed(self) -> list[Checkpoint]:
        """Committed checkpoints (manifest present and readable), newest first; not yet verified."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        result = []
        for item in parse_listing(names):
            if item.committed:
                checkpoint = self._manifest(item.step)
                if checkpoint is not None:
                    result.append(checkpoint)
        return result

    def verify(self, checkpoint: Checkpoint) -> None:
        """Raise :class:`CorruptCheckpointError` unless size and checksum match the manifest."""
        try:
            actual_size = os.path.getsize(checkpoint.path)
        except OSError as exc:
            raise CorruptCheckpointError(f"{checkpoint.path}: cannot be read ({exc.strerror})") from exc
        if actual_size != checkpoint.size:
            raise CorruptCheckpointError(
                f"{checkpoint.path}: {actual_size} bytes, manifest says {checkpoint.size} (truncated or replaced)")
        digest, _ = checksum_of(checkpoint.path)
        if digest != checkpoint.checksum:
            raise CorruptCheckpointError(f"{checkpoint.path}: checksum {digest} does not match manifest "
                                         f"{checkpoint.checksum} (damaged on disk)")

    def newest_loadable(self, load: Callable[[Checkpoint], Any], *,
                        lineage: list[str] | None = None) -> tuple[Checkpoint, Any] | None:
        """The newest checkpoint that verifies and loads; bad ones are reported and set aside."""
        for checkpoint in self.committed():
            if checkpoint.manifest.get("format", 0) > FORMAT_VERSION:
                log.warning("skipping %s: written by a newer jobwrap (format %s > %s); upgrade jobwrap to use it",
                            checkpoint.path, checkpoint.manifest.get("format"), FORMAT_VERSION)
                continue
            if lineage is not None and checkpoint.run_id not in lineage:
                log.warning("skipping %s: it belongs to run %r, not to this run's lineage %s",
                            checkpoint.path, checkpoint.run_id, lineage)
                continue
            try:
                self.verify(checkpoint)
                return checkpoint, load(checkpoint)
            except CorruptCheckpointError as exc:
                reason = str(exc)
            except Exception as exc:  # unpicklable, refused by weights_only, not a torch file
                reason = f"{checkpoint.path}: cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            moved = self.quarantine(checkpoint)
            log.warning("corrupt checkpoint: %s; set aside as %s, trying the previous one", reason, moved)
        return None

    def quarantine(self, checkpoint: Checkpoint) -> str:
        """Rename a bad checkpoint out of the way (never delete it: a human may want it)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = ""
        for name in (_manifest_name(checkpoint.step), _data_name(checkpoint.step)):
            source = os.path.join(self.directory, name)
            target = f"{source}.corrupt-{stamp}"
            try:
                os.replace(source, target)
            except FileNotFoundError:
                pass
        fsync_dir(self.directory)
        return os.path.basename(target)

    # ------------------------------------------------------------ helpers
    def _manifest(self, step: int) -> Checkpoint | None:
        record = self._read_json(os.path.join(self.directory, _manifest_name(step)))
        if record is None:
            return None
        try:
            return self._as_checkpoint(record)
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring unreadable manifest %s", _manifest_name(step))
            return None

    def _as_checkpoint(self, record: dict[str, Any]) -> Checkpoint:
        step = int(record["step"])
        return Checkpoint(path=os.path.join(self.directory, _data_name(step)), step=step,
                          epoch=int(record["epoch"]), size=int(record["size"]),
                          checksum=str(record["checksum"]), manifest=record)

    def _tmp_name(self, final: str) -> str:
        return f"{_TMP_PREFIX}{final}.{uuid.uuid4().hex[:8]}"

    def _write_json(self, name: str, record: dict[str, Any], *, before_rename: str = "") -> None:
        tmp = self._tmp_name(name)
        tmp_path = os.path.join(self.directory, tmp)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            crash_point(before_rename)
            os.replace(tmp_path, os.path.join(self.directory, name))
        except BaseException:
            self._remove(tmp)
            raise
        fsync_dir(self.directory)

    @staticmethod
    def _read_json(path: str) -> dict[str, Any] | None:
        try:
            with open(path) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _remove(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass

