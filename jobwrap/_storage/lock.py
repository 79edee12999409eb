"""One live trainer per checkpoint directory: an OS lock where the filesystem has one, and a holder record.

Two trainers in one directory overwrite each other's checkpoints, and the second one's
start-up cleanup deletes the first one's temporary files. Rank 0 of a run holds the
directory; every other trainer is refused with who holds it and the way out.

- ``lock``: ``flock()``ed while held, never removed, and replaced only to break a lock
  (``JOBWRAP_BREAK_LOCK`` past a held one: a fresh file, locked, renamed over it, so the
  breaker holds the lock every later trainer finds busy; the old holder keeps a lock on a
  file nobody opens). The kernel drops the lock when its holder dies. On NFS it
  is a lock on the server (a dead node's lock is dropped after the NFSv4 lease; NFSv3
  keeps it until that node reboots); on Lustre it is cluster-wide only with the ``flock``
  mount option (``localflock``: this node only; neither: ENOSYS).
- ``lock.json``: the holder (host, pid, process start time, boot id, job, restart, since,
  heartbeat). It names the holder in the error, and decides where the OS lock proves
  nothing about other hosts: a record of a dead process on this host (or of a host that
  rebooted, or of an earlier restart of the same job) is taken over at once, one from
  another host only after ``lock_timeout`` seconds without a heartbeat.

docs/design.md ("One trainer per directory") explains the choices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from jobwrap._storage import records
from jobwrap._storage.pids import alive, start_time
from jobwrap.errors import DirectoryHeldError, storage_error

log = logging.getLogger("jobwrap")

LOCK_FILE = "lock"
HOLDER_FILE = "lock.json"

# Filesystems one host mounts: the kernel's lock covers every process that can use the directory.
_LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "zfs",
                                "overlay", "jfs", "reiserfs", "bcachefs"})
# flock() fails with these where the filesystem has no locks (Lustre without flock/localflock,
# NFS without lockd, some FUSE filesystems): then the record alone decides.
_NO_LOCKS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})

#: How long a start waits for the forked workers of a dead holder to let the lock go.
ORPHAN_WAIT = 30.0

_held_here: dict[str, int] = {}  # directories this process holds (realpath -> pid): a second Session is refused


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Holder:
    """Who holds (or held) a directory, as ``lock.json`` records it."""

    host: str
    pid: int
    started: float  # the process's start time: a reused pid is another process
    boot_id: str    # changes when the host reboots: every process of the old boot is dead
    job_id: str | None
    restart: int
    since: float    # wall time the directory was taken
    heartbeat: float

    def describe(self, now: float) -> str:
        since = datetime.datetime.fromtimestamp(self.since).isoformat(sep=" ", timespec="seconds")
        job = f", job {self.job_id} restart {self.restart}" if self.job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, since {since} (last heartbeat {now - self.heartbeat:.0f} s ago)"


def lock_proves_absence(fstype: str, options: set[str]) -> bool:
    """Whether holding the ``flock()`` of a file on this filesystem proves no other live process holds it. Pure.

    True for local filesystems, NFS with server locks, and Lustre mounted with ``flock``;
    False where the lock is node-local (NFS ``nolock``/``local_lock=``, Lustre
    ``localflock``) or unknown (other cluster filesystems: the record decides).
    """
    if fstype in _LOCAL_FILESYSTEMS:
        return True
    if fstype in ("nfs", "nfs4"):
        return "nolock" not in options and not any(o.startswith("local_lock=") and o != "local_lock=none"
                                                   for o in options)
    if fstype == "lustre":
        return "flock" in options
    return False


def mount_of(path: str, mountinfo: str) -> tuple[str, set[str]]:
    """(filesystem type, mount and superblock options) of the mount holding ``path``, from /proc/self/mountinfo. Pure."""
    best: tuple[int, str, set[str]] = (-1, "", set())
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best[0]:  # the last of stacked mounts wins
            best = (len(point), tail[0], set(fields[5].split(",")) | set(tail[2].split(",")))
    return best[1], best[2]


def refusal(holder: Holder | None, me: Holder, *, os_lock: str, now: float, timeout: float,
            alive: Callable[[int, float], bool]) -> str | None:
    """Why ``me`` may not take the directory, or None. Pure (``alive`` answers for this host).

    ``os_lock``: "busy" (another process holds the flock), "proof" (acquired, and the
    filesystem's lock covers every host), "local" (acquired, but it may cover this node
    only) or "none" (no locks on this filesystem).
    """
    if os_lock == "busy":
        if forked_holder(holder, me, alive=alive):
            return (f"that process is gone, but one it forked (a DataLoader worker) still held the lock "
                    f"{ORPHAN_WAIT:.0f} s later: stop that process, then start again")
        return "another process holds its lock"
    if holder is None or os_lock == "proof":
        return None
    if holder.host == me.host and holder.boot_id == me.boot_id:
        return "that process is still running" if alive(holder.pid, holder.started) else None
    if holder.host == me.host:
        return None  # the host rebooted since
    if holder.job_id and holder.job_id == me.job_id and holder.restart < me.restart:
        return None  # an earlier run of this job: the scheduler ended it before starting this one
    if now - holder.heartbeat >= timeout:
        return None
    return (f"its heartbeat is {now - holder.heartbeat:.0f} s old, and a holder on another host is taken over "
            f"only after {timeout:.0f} s without one (JOBWRAP_LOCK_TIMEOUT)")


def forked_holder(holder: Holder | None, me: Holder, *, alive: Callable[[int, float], bool]) -> bool:
    """Whether a busy lock is held only by what a dead process on this host forked: its DataLoader workers
    inherit the lock's descriptor and notice their parent's death within seconds (torch checks every 5 s)."""
    return holder is not None and (holder.host, holder.boot_id) == (me.host, me.boot_id) and not alive(
        holder.pid, holder.started)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class DirectoryLock:
    """Rank 0's hold on a checkpoint directory: :meth:`acquire` at start, :meth:`release` at the end."""

    def __init__(self, directory: str, *, job_id: str | None, restart: int, timeout: float,
                 break_lock: bool = False, file_mode: int = 0o600) -> None:
        self.directory = directory
        self.timeout = timeout
        self.break_lock = break_lock
        self.file_mode = file_mode
        now = time.time()
        self.me = Holder(host=socket.gethostname(), pid=os.getpid(), started=start_time(os.getpid()) or 0.0,
                         boot_id=boot_id(), job_id=job_id, restart=restart, since=now, heartbeat=now)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Hold the directory, or raise :class:`DirectoryHeldError` naming the holder and the way out."""
        key = os.path.realpath(self.directory)
        if _held_here.get(key) == os.getpid():
            raise DirectoryHeldError(f"checkpoint directory {self.directory} is already held by this process "
                                     f"(pid {os.getpid()}): close the other Session on it first")
        os_lock, holder = self._lock_past_orphans()
        reason = refusal(holder, self.me, os_lock=os_lock, now=time.time(), timeout=self.timeout, alive=alive)
        if reason is not None and not self.break_lock:
            self._unlock()
            raise DirectoryHeldError(self._message(holder, reason))
        if reason is not None:
            log.warning("JOBWRAP_BREAK_LOCK: taking %s although %s (%s)", self.directory, reason,
                        holder.describe(time.time()) if holder else "no holder record")
            if os_lock == "busy":  # held by another process: take a lock of our own, or a third trainer
                os_lock = self._replace_lock()  # would take the directory from us once that one exits
        elif holder is not None:
            log.info("taking over %s from a holder that is gone (%s)", self.directory, holder.describe(time.time()))
        try:
            self._write()
        except OSError as exc:
            self._unlock()
            raise storage_error(exc, f"checkpoint directory {self.directory} is not usable") from exc
        _held_here[key] = os.getpid()
        if os_lock != "proof":  # only the record tells other hosts that this one is alive
            self._heartbeat = threading.Thread(target=self._beat, name="jobwrap-lock-heartbeat", daemon=True)
            self._heartbeat.start()

    def _lock_past_orphans(self) -> tuple[str, Holder | None]:
        """Take the OS lock and read the record; while only a dead holder's forked workers keep the lock busy
        (a relaunch right after a SIGKILL), wait for them, up to ``ORPHAN_WAIT`` seconds."""
        deadline = time.monotonic() + ORPHAN_WAIT
        told = False
        while True:
            try:
                os_lock = self._lock()
            except OSError as exc:
                raise storage_error(exc, f"checkpoint directory {self.directory} is not usable") from exc
            holder = self._read()
            if os_lock != "busy" or not forked_holder(holder, self.me, alive=alive) or time.monotonic() > deadline:
                return os_lock, holder
            if not told:
                log.info("%s: its holder (pid %d) is gone, but a process it forked still holds the lock; waiting "
                         "up to %.0f s for it to exit", self.directory, holder.pid, ORPHAN_WAIT)
                told = True
            time.sleep(0.2)

    def release(self) -> None:
        """Give the directory up: stop the heartbeat, remove the record, drop the OS lock."""
        if _held_here.get(os.path.realpath(self.directory)) != os.getpid():
            return
        del _held_here[os.path.realpath(self.directory)]
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        holder = self._read()
        if holder is not None and (holder.host, holder.pid, holder.since) == (self.me.host, self.me.pid, self.me.since):
            try:
                os.unlink(os.path.join(self.directory, HOLDER_FILE))
            except OSError:
                pass  # the directory was removed, or turned read-only: nothing left to hold
        self._unlock()

    # ------------------------------------------------------------ the OS lock
    def _lock(self) -> str:
        """Take the flock of ``lock`` without waiting: "busy", "proof", "local" or "none" (see :func:`refusal`)."""
        path = os.path.join(self.directory, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, self.file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return "busy"
            if exc.errno in _NO_LOCKS:
                log.info("%s has no file locks (%s): one trainer per directory rests on the holder record",
                         self.directory, os.strerror(exc.errno))
                return "none"
            raise
        self._fd = fd
        return self._coverage()

    def _replace_lock(self) -> str:
        """Break a lock another process holds: a fresh ``lock`` file, flocked, then renamed over the held one.

        From the rename on, every trainer opens the new file and finds it busy as long as
        this process lives; the old holder keeps its lock on a file no longer named
        ``lock``. Two breakers at once: the one whose file was renamed over is refused.
        """
        path = os.path.join(self.directory, LOCK_FILE)
        tmp = os.path.join(self.directory, f".tmp-{LOCK_FILE}.{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, self.file_mode)
        except OSError as exc:
            raise storage_error(exc, f"checkpoint directory {self.directory} is not usable") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it yet
            os.replace(tmp, path)
            ours = os.stat(path).st_ino == os.fstat(fd).st_ino
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise storage_error(exc, f"checkpoint directory {self.directory} is not usable") from exc
        if not ours:
            os.close(fd)
            raise DirectoryHeldError(self._message(self._read(), "another trainer broke the lock at the same "
                                                                 "time and holds it now"))
        self._fd = fd
        return self._coverage()

    def _coverage(self) -> str:
        """With the flock held: "proof" where the filesystem's lock covers every host, else "local"."""
        try:
            with open("/proc/self/mountinfo") as f:
                fstype, options = mount_of(os.path.realpath(self.directory), f.read())
        except OSError:
            return "local"
        return "proof" if lock_proves_absence(fstype, options) else "local"

    def _unlock(self) -> None:
        if self._fd is not None:
            # Unlocked before the close: a forked child (a DataLoader worker still shutting down) holds a copy
            # of the descriptor, and the lock would last as long as that copy.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------ the record
    def _read(self) -> Holder | None:
        path = os.path.join(self.directory, HOLDER_FILE)
        try:
            with open(path) as f:
                record = records.lock_holder(json.load(f))
        except (OSError, ValueError):
            return None  # none, or unreadable: nothing it says can be trusted
        if isinstance(record, str):  # wrong types would crash the comparisons of refusal()
            log.warning("%s: skipped 1 record(s) that cannot be trusted (first: %s)", path, record)
            return None
        return Holder(**{field.name: record[field.name] for field in dataclasses.fields(Holder)})

    def _write(self, **changes: Any) -> None:
        self.me = dataclasses.replace(self.me, **changes)
        tmp = os.path.join(self.directory, f".tmp-{HOLDER_FILE}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self.file_mode)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dataclasses.asdict(self.me), f)
            os.replace(tmp, os.path.join(self.directory, HOLDER_FILE))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _beat(self) -> None:
        failed = False
        while not self._stop.wait(max(1.0, self.timeout / 4)):
            holder = self._read()
            if holder is not None and (holder.host, holder.pid, holder.since) != (self.me.host, self.me.pid,
                                                                                 self.me.since):
                # Broken by JOBWRAP_BREAK_LOCK: a heartbeat now would write this process back over its record.
                log.warning("the lock record of %s names another trainer now (%s): this one no longer holds "
                            "the directory (JOBWRAP_BREAK_LOCK)", self.directory, holder.describe(time.time()))
                return
            try:
                self._write(heartbeat=time.time())
                failed = False
            except OSError as exc:
                if not failed:
                    log.warning("could not refresh the lock record in %s (%s); another host may take the "
                                "directory over after %.0f s", self.directory, exc.strerror, self.timeout)
                failed = True

    def _message(self, holder: Holder | None, reason: str) -> str:
        who = holder.describe(time.time()) if holder else "a process that left no record"
        return (f"checkpoint directory {self.directory} is held by another trainer ({who}): {reason}. "
                f"Two trainers in one directory would overwrite each other's checkpoints. Stop that one, or "
                f"give this run another directory (JOBWRAP_DIR); if it is gone for sure (its node died, and the "
                f"filesystem still keeps its lock), set JOBWRAP_BREAK_LOCK=1 (break_lock=True) to take the "
                f"directory anyway")
