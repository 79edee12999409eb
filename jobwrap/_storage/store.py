"""Atomic, verified checkpoint files in one directory on shared storage.

Layout of a checkpoint directory::

    run.json                   which run owns the directory (and runs it adopted)
    step-000000001200.pt       a plain ``torch.save`` dict
    step-000000001200.json     its manifest: size, checksum, metadata -- the commit record
    step-000000001200-1.pt     a second checkpoint of the same step (serial 1; the state moved on
    step-000000001200-1.json   without a step: end-of-epoch code after a save) -- newer than serial 0
    step-000000001200.dcp/     the step's folder, written by every rank; the .pt records its files' sizes
                               and checksums: sharded (FSDP) state, one torch.distributed.checkpoint
                               folder, or striped replicated state, one part-R.pt per rank
                               (see :mod:`jobwrap._storage.striped`)
    events.jsonl               the run's history (see :mod:`jobwrap._storage.events`)
    lock, lock.json            held by the one live trainer of the directory (see :mod:`jobwrap._storage.lock`)

Commit protocol: data to a temporary file in the same directory, fsync, rename;
then the manifest the same way; then fsync the directory. A checkpoint without
its manifest was never committed and is ignored (and cleaned up at the next
start). Readers trust a checkpoint only when its size and checksum match.
A step's ``.dcp`` folder is written before its ``.pt``, so the manifest stays
the one commit marker for both: a folder without a manifest is a leftover.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
import zipfile
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import xxhash

from jobwrap._storage import faults, records
from jobwrap._storage.faults import crash_point
from jobwrap.errors import (
    CorruptCheckpointError,
    ForeignRunError,
    LoadFailedHereError,
    UnreadableStateError,
    describe_oserror,
    storage_error,
)

log = logging.getLogger("jobwrap")

FORMAT_VERSION = 2  # the newest layout this jobwrap reads
#: Each manifest names the oldest format that reads it: a one-file or sharded checkpoint is format 1
#: (jobwrap before striping reads it); a striped one, whose .pt holds None where its tensors were, is 2,
#: so an older jobwrap skips it as "written by a newer jobwrap" instead of loading the Nones.
STRIPED_FORMAT = 2
RUN_FILE = "run.json"
_NAME = re.compile(r"^step-(\d{12})(?:-([1-9]\d{0,5}))?\.(pt|json|dcp)$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 16 << 20
_WRITE_CHUNK = 8 << 20   # hashed while in cache, then written
_SMALL_WRITE = 64 << 10  # smaller writes (pickle, zip headers) are gathered
_HASH_GAP = 1 << 20      # torch.load skips zip headers between records: hash them on the way


# ---------------------------------------------------------------- pure policy

@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """What a directory listing says about one checkpoint: which of its files (and its sharded folder) exist.

    A checkpoint is named by its step and a serial: 0 for the first save of a
    step (the name without a suffix), 1, 2, ... for later saves of the same step.
    """

    step: int
    has_data: bool
    has_manifest: bool
    has_folder: bool = False
    serial: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.step, self.serial)

    @property
    def committed(self) -> bool:
        return self.has_data and self.has_manifest


def parse_name(name: str) -> tuple[int, int, str] | None:
    """(step, serial, kind) of a checkpoint file name, kind "pt", "json" or "dcp"; None for any other name."""
    match = _NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0), match.group(3)


def parse_listing(names: Iterable[str]) -> list[Listing]:
    """Group file names by checkpoint (step, serial), newest first. Unknown names are ignored."""
    found: dict[tuple[int, int], set[str]] = {}
    for name in names:
        parsed = parse_name(name)
        if parsed:
            found.setdefault(parsed[:2], set()).add(parsed[2])
    return [Listing(step, "pt" in kinds, "json" in kinds, "dcp" in kinds, serial)
            for (step, serial), kinds in sorted(found.items(), reverse=True)]


def retention_victims(committed: Iterable[Any], keep_last: int) -> list[Any]:
    """Checkpoints (steps, or (step, serial) keys) to delete so that the newest ``keep_last`` remain (never
    below one)."""
    keep = max(1, keep_last)
    return sorted(committed, reverse=True)[keep:]


def leftovers(names: Iterable[str]) -> list[str]:
    """Files a killed save left behind: temporaries, and data files and folders whose manifest never landed."""
    names = list(names)
    uncommitted = [item for item in parse_listing(names) if not item.has_manifest]
    orphans = [data_name(item.step, item.serial) for item in uncommitted if item.has_data]
    folders = [folder_name(item.step, item.serial) for item in uncommitted if item.has_folder]
    return [n for n in names if n.startswith(_TMP_PREFIX)] + orphans + folders


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
    serial: int = 0

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id")

    @property
    def key(self) -> tuple[int, int]:
        """What orders checkpoints: a later save of the same step is newer."""
        return (self.step, self.serial)


def _stem(step: int, serial: int) -> str:
    return f"step-{step:012d}" + (f"-{serial}" if serial else "")


def data_name(step: int, serial: int = 0) -> str:
    """The checkpoint's ``.pt``: ``step-N.pt`` for the first save of a step, ``step-N-K.pt`` for later ones."""
    return _stem(step, serial) + ".pt"


def manifest_name(step: int, serial: int = 0) -> str:
    """The checkpoint's manifest, its commit record: the name of its ``.pt`` with ``.json``."""
    return _stem(step, serial) + ".json"


def folder_name(step: int, serial: int = 0) -> str:
    """The checkpoint's torch.distributed.checkpoint folder, beside its ``.pt``."""
    return _stem(step, serial) + ".dcp"


def temporary_data_glob(step: int) -> str:
    """A glob for the temporary ``.pt`` a save of ``step`` (any serial) writes before its rename."""
    return f"{_TMP_PREFIX}{_stem(step, 0)}*.pt.*"


class SaveCancelled(Exception):
    """A save was cancelled between two chunks (superseded by a newer one); its temporary file is gone."""


class _HashingWriter:
    """The file object ``torch.save`` writes to: hashes and writes in one pass over memory.

    Small records (the pickle, zip headers) are gathered into one buffer;
    tensor data goes straight from the tensor to the file descriptor in
    :data:`_WRITE_CHUNK` pieces, each hashed just before it is written, while it
    is still in the CPU cache. ``cancel`` is checked between pieces.
    """

    def __init__(self, fd: int, cancel: threading.Event | None = None) -> None:
        self.fd = fd
        self.cancel = cancel
        self.hash = xxhash.xxh3_64()
        self.size = 0
        self._small = bytearray()
        self.error: BaseException | None = None

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        length = len(view)
        if self.error is not None:
            return length
        try:
            self._write(view, length)
        except BaseException as exc:
            # An exception through torch's C++ writer turns into an unrelated "unexpected pos"
            # error; keep it, let torch.save run to its end on no-op writes, and raise it then.
            self.error = exc
        return length

    def finish(self) -> None:
        """Write what is gathered, or raise the error a write met (disk full, cancelled)."""
        if self.error is None:
            self.flush()
        if self.error is not None:
            raise self.error

    def _write(self, view: memoryview, length: int) -> None:
        if length < _SMALL_WRITE:
            self._small += view
            if len(self._small) >= _SMALL_WRITE:
                self.flush()
            return
        self.flush()
        for start in range(0, length, _WRITE_CHUNK):
            self._out(view[start:start + _WRITE_CHUNK])

    def flush(self) -> None:
        if self._small:
            pending, self._small = self._small, bytearray()
            self._out(memoryview(pending))

    def _out(self, view: memoryview) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise SaveCancelled()
        self.hash.update(view)
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        self.size += len(view)
        if faults.WRITE_BPS:
            faults.throttle(len(view))


class _VerifyingReader(io.RawIOBase):
    """A read-only file for ``torch.load`` that hashes the file in order as torch reads it.

    ``torch.load`` reads a checkpoint almost sequentially (the zip directory at
    the end first, then the pickle and each tensor in file order), straight
    into the tensors it allocates. Every byte read at the hashed frontier (or
    a small gap after it) extends the hash; :meth:`digest` hashes whatever was
    never read in order. So the checksum costs one pass over bytes that are
    already in the cache, not a second read of the file.
    """

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self.fd = fd
        self.size = size
        self.position = 0
        self.hashed = 0
        self.hash = xxhash.xxh3_64()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start = self.position
        if self.hashed < start <= self.hashed + _HASH_GAP:
            self._hash_until(start)
        done = 0
        while done < len(view):
            piece = view[done:done + _WRITE_CHUNK]
            n = os.preadv(self.fd, [piece], start + done)
            if n == 0:
                break
            if start + done <= self.hashed < start + done + n:
                self.hash.update(piece[self.hashed - start - done:n])
                self.hashed = start + done + n
            done += n
        self.position = start + done
        return done

    def _hash_until(self, end: int) -> None:
        scratch = bytearray(min(_WRITE_CHUNK, max(end - self.hashed, 1)))
        while self.hashed < end:
            n = os.preadv(self.fd, [memoryview(scratch)[:end - self.hashed]], self.hashed)
            if n == 0:
                return
            self.hash.update(memoryview(scratch)[:n])
            self.hashed += n

    def digest(self) -> str:
        """The checksum of the whole file: the bytes not yet hashed in order are read now."""
        self._hash_until(self.size)
        return "xxh3_64:" + self.hash.hexdigest()


_crc_lock = threading.Lock()
_crc_depth = 0
_crc_previous = True


@contextlib.contextmanager
def _torch_crc_off() -> Iterator[None]:
    """Skip torch's per-record CRC32 (jobwrap's xxh3 covers the file); restore the setting afterwards.

    The setting is process-wide, and a background save may overlap a save on
    the main thread: the first to enter turns it off, the last to leave puts
    back what the user had.
    """
    import torch.serialization

    global _crc_depth, _crc_previous
    with _crc_lock:
        if _crc_depth == 0:
            _crc_previous = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
        _crc_depth += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_depth -= 1
            if _crc_depth == 0:
                torch.serialization.set_crc32_options(_crc_previous)


def _torch_save(payload: Any, fd: int, cancel: threading.Event | None = None) -> _HashingWriter:
    """``torch.save`` into ``fd`` through the hashing writer (torch's CRC32 off); the writer holds size and hash."""
    import torch

    writer = _HashingWriter(fd, cancel)
    with _torch_crc_off():
        torch.save(payload, writer)
    writer.finish()
    return writer


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


def _makedirs(path: str, mode: int) -> None:
    """``os.makedirs``, but the parents it creates are 0755 (less the umask), not 0777: under a loose
    umask (000) no directory jobwrap creates is writable by others."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.exists(parent):  # a file there: ENOTDIR below, not EEXIST
        _makedirs(parent, 0o755)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _not_a_checkpoint(exc: BaseException, path: str) -> bool:
    """Whether a load failure of an intact file says the file is no torch checkpoint at all.

    It is decided by the file, not by the error's wording: a file that is not
    torch's zip archive (a ``data.pkl`` under one top-level folder) is no
    checkpoint, whatever torch raised reading it; in one that is, weights_only
    refusing a pickle that would run code (UnpicklingError) is one too.
    Anything else (no CUDA, out of memory, I/O) depends on the node that loads it.
    """
    import pickle

    if isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return True
    return not _is_torch_archive(path)


def _is_torch_archive(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    tops = {name.split("/", 1)[0] for name in names}
    return len(tops) == 1 and any(name.endswith("/data.pkl") and name.count("/") == 1 for name in names)


def _refused_by_weights_only(exc: BaseException, path: str) -> bool:
    """An intact torch archive that ``weights_only`` refuses: a type it does not allow (a NumPy scalar in a
    state dict), not damage. Whoever wrote it wrote the manifest too: it is what was saved."""
    import pickle

    return isinstance(exc, pickle.UnpicklingError) and _is_torch_archive(path)


def _unreadable_error(checkpoint: "Checkpoint", exc: BaseException) -> UnreadableStateError:
    """The error that stops a start whose checkpoint is intact but holds a type ``weights_only`` refuses."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported (?:global|operand)[^:]*: ?([^\n]+)", text)
    what = found.group(1).strip() if found else text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return UnreadableStateError(
        f"cannot resume from {checkpoint.path}: it matches its checksum, but it holds a {what}, which "
        f"torch.load(weights_only=True) refuses to load. Nothing was set aside. Make the tracked object's "
        f"state_dict() hold plain numbers or tensors instead (float(x), int(x) or torch.tensor(x) for a NumPy "
        f"value), then either start a new run in a new directory, or move this checkpoint and its .json manifest "
        f"out of the directory by hand to resume from the one before it")


def _environment_error(checkpoint: "Checkpoint", exc: BaseException) -> LoadFailedHereError:
    """The error that stops a start whose checkpoint is intact but cannot be loaded on this node."""
    cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    text = str(exc).lower()
    if isinstance(exc, OSError):
        fix = describe_oserror(exc)
    elif "cuda" in text or "device" in text:
        fix = ("the device it is loaded onto is not usable here: run on a node with a working GPU, or set "
               "JOBWRAP_DEVICE (device=...) to one this node has, e.g. JOBWRAP_DEVICE=cpu")
    elif "out of memory" in text or isinstance(exc, MemoryError):
        fix = ("out of memory while loading: free memory, ask for more, or load onto another device with "
               "JOBWRAP_DEVICE (device=...)")
    else:
        fix = "fix the cause above and start again"
    return LoadFailedHereError(
        f"cannot load {checkpoint.path} on this node ({cause}). The file matches its checksum, so it was kept "
        f"(nothing was set aside): {fix}")


class CheckpointStore:
    """One run's checkpoint directory: write with the commit protocol, list, verify, load, retain."""

    def __init__(self, directory: str, *, file_mode: int = 0o600) -> None:
        self.directory = os.path.abspath(directory)
        self.file_mode = file_mode
        self.lineage: list[str] | None = None  # set by claim(): the runs whose checkpoints are this run's

    # ------------------------------------------------------------ setup
    def ensure_directory(self) -> None:
        """Create the directory and prove it is writable (a clear StorageError if not)."""
        try:
            _makedirs(self.directory, self._dir_mode())
            probe = os.path.join(self.directory, f"{_TMP_PREFIX}probe-{uuid.uuid4().hex}")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise storage_error(exc, f"checkpoint directory {self.directory} is not usable") from exc

    def prove_commit(self) -> None:
        """Commit a small probe file the way a manifest is committed, read it back, remove it.

        The protocol itself (temporary file, fsync, rename, directory fsync), not a copy
        of it, so ``jobwrap doctor`` fails on a filesystem where any step of a commit fails.
        A probe a crash leaves behind is a temporary: the next :meth:`prepare` removes it.
        """
        name = f"{_TMP_PREFIX}commit-probe-{uuid.uuid4().hex[:8]}.json"
        record = {"probe": name, "wall_time": time.time()}
        try:
            try:
                self._write_json(name, record)
                if self._read_json(os.path.join(self.directory, name)) != record:
                    raise OSError(errno.EIO, "a committed file read back differently")
            finally:
                self._remove(name)
        except OSError as exc:
            raise storage_error(exc, f"checkpoint directory {self.directory} cannot commit a file") from exc

    def prepare(self, *, proven: bool = False) -> list[Checkpoint]:
        """Create the directory, prove it is writable, and clean what a killed save left; return the
        committed checkpoints, newest first (what :meth:`committed` lists now, from the same one scan).

        Only the trainer holding the directory (:mod:`jobwrap._storage.lock`) may call it: the
        temporaries it removes would be another live trainer's saves in progress. Holding it, the
        listing stays true until this trainer writes. ``proven``: :meth:`ensure_directory` ran
        just before (to take the lock), so the directory is not probed again.
        """
        if not proven:
            self.ensure_directory()
        names = os.listdir(self.directory)
        removed = leftovers(names)
        for name in removed:
            log.info("removing %s left by an interrupted save", name)
            self._remove(name)
        committed = []
        for item in parse_listing(set(names).difference(removed)):
            found = self._read_manifest(item.step, item.serial) if item.has_manifest else None
            if isinstance(found, str):  # damaged or lying: never trusted, reported once, kept for a human
                moved = self._quarantine_step(item.step, item.serial)
                log.warning("bad manifest %s: %s; set aside as %s", manifest_name(item.step, item.serial),
                            found, moved)
            elif found is not None and item.has_data:
                committed.append(found)
        return committed

    def claim(self, run_id: str | None, *, adopt: bool = False) -> tuple[str, list[str]]:
        """Make sure this directory belongs to ``run_id``; return (run id, accepted lineage).

        A directory with another run's committed checkpoints is refused unless
        ``adopt`` is set, so two jobs never resume from each other's state.
        """
        path = os.path.join(self.directory, RUN_FILE)
        record = self._read_json(path)
        if record is None:
            run_id = run_id or uuid.uuid4().hex[:12]
            self._write_run({"run_id": run_id, "lineage": [run_id], "created": time.time()})
            self.lineage = [run_id]
            return run_id, [run_id]
        owner = record.get("run_id")
        lineage = list(record.get("lineage") or [owner])
        if run_id is None or run_id in lineage:
            self.lineage = lineage
            return (run_id or owner), lineage
        if not adopt and self.committed():
            raise ForeignRunError(
                f"checkpoint directory {self.directory} holds checkpoints of run {owner!r}, "
                f"but this is run {run_id!r}. Use a new directory for a new run, or set "
                f"JOBWRAP_ADOPT=1 (adopt=True, jobwrap run --adopt) to continue from that run's checkpoints.")
        if adopt:
            log.info("run %s adopts the checkpoints of run %s in %s", run_id, owner, self.directory)
        lineage.append(run_id)
        self._write_run({"run_id": run_id, "lineage": lineage, "created": time.time()})
        self.lineage = lineage
        return run_id, lineage

    def _write_run(self, record: dict[str, Any]) -> None:
        try:
            self._write_json(RUN_FILE, record)
        except OSError as exc:
            raise storage_error(exc, f"cannot record the run in {os.path.join(self.directory, RUN_FILE)}") from exc

    # ------------------------------------------------------------ write
    def save(self, payload: dict[str, Any], *, step: int, epoch: int, meta: dict[str, Any],
             cancel: threading.Event | None = None, serial: int | None = None) -> Checkpoint:
        """Write ``payload`` with ``torch.save`` and commit it; nothing older is touched.

        A step that is committed already gets a new name (the next serial, or
        ``serial`` when a sharded folder of that name was written first), so a
        second save of a step never replaces a committed file. One pass over
        the tensors (torch's CRC32 off, jobwrap's xxh3 computed as the bytes are
        written), large writes, one fsync of the data. Setting ``cancel``
        abandons the save at the next chunk (:class:`SaveCancelled`).
        """
        serial = self.next_serial(step) if serial is None else serial
        data_tmp = self._tmp_name(data_name(step, serial))
        started = time.monotonic()
        try:
            fd = os.open(os.path.join(self.directory, data_tmp),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
            try:
                writer = _torch_save(payload, fd, cancel)
                crash_point("data-written")
                os.fsync(fd)
            finally:
                os.close(fd)
            crash_point("data-synced")
            os.replace(os.path.join(self.directory, data_tmp),
                       os.path.join(self.directory, data_name(step, serial)))
            crash_point("data-renamed")
            manifest = {
                "format": STRIPED_FORMAT if "stripes" in meta else 1,
                "file": data_name(step, serial),
                "size": writer.size,
                "checksum": "xxh3_64:" + writer.hash.hexdigest(),
                "step": step,
                "epoch": epoch,
                **({"serial": serial} if serial else {}),
                "save_seconds": round(time.monotonic() - started, 6),
                **meta,
            }
            self._write_json(manifest_name(step, serial), manifest, before_rename="manifest-written")
            crash_point("committed")
        except OSError as exc:
            # Best effort (the disk that failed may refuse the unlinks too); the manifest goes first, in
            # case it was renamed before the directory's fsync failed: never a half-committed step.
            for name in (data_tmp, manifest_name(step, serial), data_name(step, serial), folder_name(step, serial)):
                with contextlib.suppress(OSError):
                    self._remove(name)
            previous = self.committed()
            kept = f"the previous checkpoint (step {previous[0].step}) is intact" if previous else \
                "no earlier checkpoint exists"
            raise storage_error(exc, f"could not save step {step} in {self.directory}", note=kept) from exc
        except BaseException:
            self._remove(data_tmp)  # cancelled, or a payload torch.save refused
            raise
        return self._as_checkpoint(manifest)

    def retain(self, keep_last: int) -> list[int]:
        """Delete committed checkpoints beyond the newest ``keep_last``; uncommit before deleting data."""
        # Only checkpoints this run can load count and go: another run's or a newer format's are not
        # ours to delete, and must not push out the one just saved.
        usable = [c.key for c in self.committed() if c.manifest.get("format", 0) <= FORMAT_VERSION
                  and (self.lineage is None or c.run_id in self.lineage)]
        victims = retention_victims(usable, keep_last)
        try:
            for step, serial in victims:
                self._remove(manifest_name(step, serial))
                crash_point("retention")
                self._remove(data_name(step, serial))
                self._remove(folder_name(step, serial))
            if victims:
                fsync_dir(self.directory)
        except OSError as exc:  # the new checkpoint is committed; old ones stay until the next save
            log.warning("retention could not delete old checkpoints in %s: %s", self.directory,
                        describe_oserror(exc))
        return [step for step, _ in victims]

    def next_serial(self, step: int) -> int:
        """The serial of a new save of ``step``: 0 when no file of the step is here, else one past the newest.

        Past every ``.pt`` and manifest of the step, committed or not, so that a
        new save never replaces a file. A sharded folder alone does not count: it
        is the one this save wrote first, or a leftover; nor does a file set aside
        (``*.corrupt-<time>``), whose name is free again.
        """
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 0
        serials = [parsed[1] for parsed in map(parse_name, names)
                   if parsed and parsed[0] == step and parsed[2] != "dcp"]
        return max(serials) + 1 if serials else 0

    # ------------------------------------------------------------ sharded folders
    def folder_path(self, step: int, serial: int = 0) -> str:
        return os.path.join(self.directory, folder_name(step, serial))

    def open_folder(self, step: int, serial: int = 0) -> str:
        """An empty folder for a checkpoint's sharded state; what an earlier failed save of it left is removed."""
        path = self.folder_path(step, serial)
        try:
            self._remove(folder_name(step, serial))
            os.mkdir(path, self._dir_mode())
        except OSError as exc:
            raise storage_error(exc, f"cannot create {path} for the sharded state of step {step}") from exc
        return path

    def write_part(self, folder: str, name: str, payload: Any) -> dict[str, Any]:
        """``payload`` with ``torch.save`` as ``name`` in a step's open folder, fsynced; its size and checksum.

        One rank's part of a striped checkpoint: the same one-pass hashing writer
        as :meth:`save`; nothing is committed (the manifest, written by rank 0
        after every part, is).
        """
        path = os.path.join(folder, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self.file_mode)
        try:
            writer = _torch_save(payload, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"size": writer.size, "checksum": "xxh3_64:" + writer.hash.hexdigest()}

    def seal_folder(self, step: int, files: Iterable[str], serial: int = 0) -> None:
        """After every rank wrote its part: make the folder's entries (and the folder's own) durable."""
        path = self.folder_path(step, serial)
        try:
            for name in files:
                fd = os.open(os.path.join(path, name), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fchmod(fd, self.file_mode)  # DCP creates them under the umask; ours are private
                    os.fsync(fd)  # cheap: DCP fsynced each file as it wrote it (sync_files=True)
                finally:
                    os.close(fd)
            fsync_dir(path)  # the files' names, which DCP does not fsync
            fsync_dir(self.directory)
        except OSError as exc:
            self.discard_folder(step, serial)
            raise storage_error(exc, f"could not make the sharded state of step {step} durable in {path}") from exc

    def discard_folder(self, step: int, serial: int = 0) -> None:
        """Remove an uncommitted folder after a failed sharded save (best effort)."""
        with contextlib.suppress(OSError):
            self._remove(folder_name(step, serial))

    def verify_folder(self, checkpoint: Checkpoint, files: dict[str, dict[str, Any]]) -> None:
        """Raise :class:`CorruptCheckpointError` unless every recorded file of the step's folder matches."""
        path = self.folder_path(checkpoint.step, checkpoint.serial)
        if os.path.islink(path) or not os.path.isdir(path):
            raise CorruptCheckpointError(f"{path}: the sharded state of {os.path.basename(checkpoint.path)} "
                                         f"is missing" + (" (a symlink, not followed)" if os.path.islink(path) else ""))
        for name, expected in sorted(files.items()):
            file_path = os.path.join(path, name)
            try:
                if not stat.S_ISREG(os.lstat(file_path).st_mode):  # a symlink would lead out of the directory
                    raise CorruptCheckpointError(f"{file_path}: not a regular file (a symlink is not followed)")
                digest, size = checksum_of(file_path)
            except OSError as exc:
                raise CorruptCheckpointError(f"{file_path}: cannot be read ({exc.strerror})") from exc
            if size != expected["size"]:
                raise CorruptCheckpointError(f"{file_path}: {size} bytes, checkpoint says {expected['size']} "
                                             f"(truncated or replaced)")
            if digest != expected["checksum"]:
                raise CorruptCheckpointError(f"{file_path}: checksum {digest} does not match "
                                             f"{expected['checksum']} (damaged on disk)")

    # ------------------------------------------------------------ read
    def listing(self) -> list[Listing]:
        """Every checkpoint of the directory, committed or not, newest first (none when it does not exist)."""
        try:
            return parse_listing(os.listdir(self.directory))
        except FileNotFoundError:
            return []

    def data_path(self, step: int, serial: int = 0) -> str:
        return os.path.join(self.directory, data_name(step, serial))

    def committed(self) -> list[Checkpoint]:
        """Committed checkpoints (manifest present and readable), newest first; not yet verified."""
        result = []
        for item in self.listing():
            if item.committed:
                checkpoint = self._manifest(item.step, item.serial)
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

    def read_verified(self, checkpoint: Checkpoint, load: Callable[[BinaryIO], Any]) -> Any:
        """``load(f)`` reads the checkpoint from ``f``; the checksum is computed in the same pass.

        The result is returned only if size and checksum match the manifest,
        else :class:`CorruptCheckpointError` is raised and the result dropped.
        """
        try:
            fd = os.open(checkpoint.path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"{checkpoint.path}: cannot be read ({exc.strerror})") from exc
        except OSError as exc:
            raise _environment_error(checkpoint, exc) from exc
        try:
            actual_size = os.fstat(fd).st_size
            if actual_size != checkpoint.size:
                raise CorruptCheckpointError(f"{checkpoint.path}: {actual_size} bytes, manifest says "
                                             f"{checkpoint.size} (truncated or replaced)")
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            reader = _VerifyingReader(fd, actual_size)
            try:
                value = load(reader)  # type: ignore[arg-type]
            except CorruptCheckpointError:
                raise
            except Exception as exc:
                # The load may have stopped early: hash the rest, to tell damaged bytes from a failing node.
                try:
                    intact = reader.digest() == checkpoint.checksum
                except OSError as failure:
                    raise _environment_error(checkpoint, failure) from failure
                if not intact:
                    raise CorruptCheckpointError(f"{checkpoint.path}: checksum does not match manifest "
                                                 f"{checkpoint.checksum} (damaged on disk)") from None
                if _refused_by_weights_only(exc, checkpoint.path):
                    raise _unreadable_error(checkpoint, exc) from exc
                if _not_a_checkpoint(exc, checkpoint.path):
                    raise
                raise _environment_error(checkpoint, exc) from exc
            digest = reader.digest()
        finally:
            os.close(fd)
        if digest != checkpoint.checksum:
            raise CorruptCheckpointError(f"{checkpoint.path}: checksum {digest} does not match manifest "
                                         f"{checkpoint.checksum} (damaged on disk)")
        return value

    def newest_loadable(self, load: Callable[[Checkpoint], Any], *, lineage: list[str] | None = None,
                        verify: bool = True, committed: list[Checkpoint] | None = None
                        ) -> tuple[Checkpoint, Any] | None:
        """The newest checkpoint that verifies and loads; bad ones are reported and set aside.

        Only a file that fails its checksum or is not a checkpoint is bad. Any
        other failure (no usable CUDA, out of memory, an I/O error) is this
        node's, not the file's: :class:`LoadFailedHereError` stops the start and
        nothing is moved. An intact torch file that ``weights_only`` refuses (a
        NumPy scalar saved in a state dict) is what was saved, not damage:
        :class:`UnreadableStateError` stops the start, and nothing is moved. ``verify=False`` when ``load`` verifies as it reads
        (:meth:`read_verified`), so the file is read once. ``committed``: the directory's committed
        checkpoints when the caller has just listed them (:meth:`prepare`), else they are read here.
        """
        for checkpoint in self.committed() if committed is None else committed:
            if checkpoint.manifest.get("format", 0) > FORMAT_VERSION:
                log.warning("skipping %s: written by a newer jobwrap (format %s > %s); upgrade jobwrap to use it",
                            checkpoint.path, checkpoint.manifest.get("format"), FORMAT_VERSION)
                continue
            if lineage is not None and checkpoint.run_id not in lineage:
                log.warning("skipping %s: it belongs to run %r, not to this run's lineage %s",
                            checkpoint.path, checkpoint.run_id, lineage)
                continue
            try:
                if verify:
                    self.verify(checkpoint)
                return checkpoint, load(checkpoint)
            except (LoadFailedHereError, UnreadableStateError):
                raise
            except CorruptCheckpointError as exc:
                reason = str(exc)
            except Exception as exc:
                if verify and _refused_by_weights_only(exc, checkpoint.path):  # verified above: intact
                    raise _unreadable_error(checkpoint, exc) from exc
                if not _not_a_checkpoint(exc, checkpoint.path):
                    raise _environment_error(checkpoint, exc) from exc
                reason = f"{checkpoint.path}: cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            moved = self.quarantine(checkpoint)
            log.warning("corrupt checkpoint: %s; set aside as %s, trying the previous one", reason, moved)
        return None

    def quarantine(self, checkpoint: Checkpoint) -> str:
        """Rename a bad checkpoint out of the way (never delete it: a human may want it)."""
        return self._quarantine_step(checkpoint.step, checkpoint.serial)

    def _quarantine_step(self, step: int, serial: int = 0) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (manifest_name(step, serial), data_name(step, serial), folder_name(step, serial)):
            source = os.path.join(self.directory, name)
            try:
                os.replace(source, f"{source}.corrupt-{stamp}")  # a sharded folder goes with its files
            except FileNotFoundError:
                pass
        fsync_dir(self.directory)
        return f"{data_name(step, serial)}.corrupt-{stamp}"

    # ------------------------------------------------------------ helpers
    def _dir_mode(self) -> int:
        """0700, plus group read/traverse when files are group-readable."""
        return 0o700 | ((self.file_mode & 0o040) and 0o050)

    def _manifest(self, step: int, serial: int = 0) -> Checkpoint | None:
        found = self._read_manifest(step, serial)
        return found if isinstance(found, Checkpoint) else None

    def _read_manifest(self, step: int, serial: int = 0) -> Checkpoint | str | None:
        """The manifest of ``step``: None if there is none, else the checkpoint, or why it cannot be trusted.

        A manifest that names another step is refused: trusting it would point
        verification (and the quarantine of a failure) at another checkpoint.
        """
        try:
            with open(os.path.join(self.directory, manifest_name(step, serial))) as f:
                record = json.load(f)
        except OSError:
            return None
        except ValueError:
            return "not valid JSON (damaged)"
        if not isinstance(record, dict):
            return "not a manifest (JSON, but not an object)"
        checked = records.manifest(record)
        if isinstance(checked, str):
            newer = isinstance(record.get("format"), int) and record["format"] > FORMAT_VERSION
            if newer:  # a newer jobwrap's layout: not ours to judge (or to set aside)
                return None
            return f"a field is missing or malformed ({checked})"
        record, dropped = records.manifest_description(record)
        if dropped:
            log.warning("manifest %s: ignored the field(s) %s, of the wrong type (they only describe the save)",
                        manifest_name(step, serial), dropped)
        checkpoint = self._as_checkpoint(record)
        if checkpoint.step != step:
            return f"it says step {checkpoint.step} but is the manifest of step {step}"
        if checkpoint.serial != serial:
            return f"it says serial {checkpoint.serial} but is the manifest of {data_name(step, serial)}"
        return checkpoint

    def _as_checkpoint(self, record: dict[str, Any]) -> Checkpoint:
        step, serial = int(record["step"]), int(record.get("serial", 0))
        if serial < 0:
            raise ValueError(f"serial {serial} is negative")
        return Checkpoint(path=self.data_path(step, serial), step=step,
                          epoch=int(record["epoch"]), size=int(record["size"]),
                          checksum=str(record["checksum"]), manifest=record, serial=serial)

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
        path = os.path.join(self.directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)  # a sharded folder; FileNotFoundError inside is as good as removed
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

