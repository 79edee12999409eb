"""Disk faults: full, read-only and vanishing disks, EIO at each fsync, retention that cannot delete,
and write errors from a real block device. Each must give a StorageError that names the cause and
the fix, and leave the previous checkpoint intact."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from typing import Any, Callable

from jobwrap import StorageError

from .files import commit, files_of, intact, newest_committed, store_with, temporaries
from .internals import data_path
from .mounts import device_mapper_reason, ext4_over_full_tmpfs, failing_syscall, fill, read_only, tmpfs
from .results import Campaign, Failed, Fault, Outcome, Row, check, short, verdict
from .training import Weights, advance, capture_logs, open_session, resume, train_to


def storage_error(action: Callable[[], Any], succeeded: str) -> StorageError:
    """The StorageError ``action`` raises; :class:`Failed` when it succeeds (``succeeded`` says how) or
    raises a bare OSError (which names neither the cause nor the fix)."""
    try:
        action()
    except StorageError as exc:
        return exc
    except OSError as exc:
        raise Failed(f"bare {type(exc).__name__}: {exc}") from exc
    raise Failed(succeeded)


@check
def check_enospc_save(base: str) -> Outcome:
    """A save larger than the space left: StorageError naming the full disk; previous intact; no temporaries."""
    with tmpfs(base, "3m") as point:
        directory = os.path.join(point, "ck")
        numel = 300_000  # 1.2 MB per checkpoint: two fit, the third does not
        store = store_with(directory, (1, 2), numel)
        exc = storage_error(lambda: commit(store, 3, numel), "the save that cannot fit succeeded")
        message = str(exc)
        problems = []
        if exc.errno != errno.ENOSPC:
            problems.append(f"errno {exc.errno}")
        if "disk is full" not in message or "step 2" not in message or "intact" not in message:
            problems.append(f"message lacks cause/fix/previous: {message}")
        if not intact(directory, 2, numel):
            problems.append("step 2 damaged")
        if temporaries(directory) or os.path.exists(data_path(directory, 3)):
            problems.append(f"left files {os.listdir(directory)}")
        return verdict(problems, short(f"StorageError: {message}", 200))


@check
def check_enospc_manifest(base: str) -> Outcome:
    """The data fits but its manifest does not: nothing committed, data removed, previous intact."""
    numel = 100_000
    sizer = tempfile.mkdtemp(dir=base)
    data_size = commit(store_with(sizer), 2, numel).size
    shutil.rmtree(sizer)
    with tmpfs(base, "4m") as point:
        directory = os.path.join(point, "ck")
        store = store_with(directory, (1,), numel)
        page = os.statvfs(directory).f_frsize
        fill(directory, leave_bytes=-(-data_size // page) * page)
        exc = storage_error(lambda: commit(store, 2, numel), "save committed on a full disk")
        problems = []
        if exc.errno != errno.ENOSPC:
            problems.append(f"errno {exc.errno}")
        if files_of(directory, 2) or temporaries(directory):
            problems.append(f"left {sorted(os.listdir(directory))}")
        if not intact(directory, 1, numel):
            problems.append("step 1 damaged")
        return verdict(problems, "StorageError (ENOSPC), step 2 not committed, step 1 intact")


def check_on_save_error(base: str, mode: str) -> Outcome:
    """A periodic save on a full disk: 'raise' stops training with StorageError; 'continue' logs and trains on."""
    with tmpfs(base, "2m") as point:
        directory = os.path.join(point, "ck")
        numel = 120_000  # ~0.5 MB: a few saves fit, then the disk is full
        reached = 0
        error = ""
        with capture_logs() as records:
            try:
                job = open_session(directory, save_every_steps=1, keep_last=50, on_save_error=mode)
                weights = Weights(numel)
                with job:
                    job.track(model=weights, tag=-1)
                    for _ in range(8):
                        advance(job, weights)
                        reached = job.step
            except StorageError as exc:
                error = str(exc)
        newest = newest_committed(directory)
        logged = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        ok_newest = newest is not None and intact(directory, newest, numel)
        if mode == "raise":
            ok = bool(error) and "disk is full" in error and reached < 8 and ok_newest
            return ok, (f"stopped at step {reached + 1} with StorageError ('disk is full ... step {newest} is "
                        f"intact'); newest committed step {newest} intact" if ok else
                        f"error={error!r} reached={reached} intact={ok_newest}")
        ok = not error and reached == 8 and ok_newest and any("on_save_error=continue" in m for m in logged)
        return ok, (f"trained on to step 8; {len(logged)} failed saves logged as errors; newest committed step "
                    f"{newest} intact" if ok else f"error={error!r} reached={reached} logged={logged[:1]}")


@check
def check_full_disk_first_start(base: str) -> Outcome:
    """A brand-new run on a full disk: a StorageError naming the full disk (not a bare OSError)."""
    with tmpfs(base, "1m") as point:
        directory = os.path.join(point, "ck")
        os.makedirs(directory)
        fill(point)

        def start() -> None:
            with open_session(directory, async_save=True):  # jobwrap's default
                pass
        exc = storage_error(start, "started on a full disk without an error")
        ok = "disk is full" in str(exc)
        return ok, short(f"StorageError: {exc}") if ok else f"unclear: {exc}"


@check
def check_readonly_during_run(base: str) -> Outcome:
    """The filesystem turns read-only mid-run: the save raises StorageError (read-only), the previous survives."""
    with tmpfs(base, "8m") as point:
        directory = os.path.join(point, "ck")
        store = store_with(directory, (1,))
        with read_only(point):
            exc = storage_error(lambda: commit(store, 2), "saved on a read-only filesystem")
            ok = exc.errno == errno.EROFS and "read-only" in str(exc) and intact(directory, 1)
            return ok, ("StorageError (EROFS) naming the read-only filesystem; step 1 intact" if ok
                        else f"unclear or damaged: {exc}")


def check_readonly_at_start(base: str) -> Outcome:
    """Resuming in a read-only directory: a clear StorageError at start, before any training."""
    with tmpfs(base, "8m") as point:
        directory = os.path.join(point, "ck")
        train_to(directory, [1, 2])
        with read_only(point):
            outcome = resume(directory)
            ok = "StorageError" in outcome.error and "read-only" in outcome.error
            return ok, (short(f"at start: {outcome.error}") if ok else f"got {outcome}")


@check
def check_directory_removed(base: str) -> Outcome:
    """The checkpoint directory is deleted during a run: the save raises StorageError naming it."""
    directory = os.path.join(tempfile.mkdtemp(dir=base), "ck")

    def train_through_removal() -> None:
        with capture_logs(), open_session(directory) as job:
            weights = Weights(4096)
            job.track(model=weights, tag=-1)
            advance(job, weights)
            job.save()
            shutil.rmtree(directory)
            advance(job, weights)
            job.save()
    exc = storage_error(train_through_removal, "saved into a removed directory")
    ok = exc.errno == errno.ENOENT and "disappeared" in str(exc)
    return ok, ("StorageError (ENOENT): 'the checkpoint directory or a part of its path "
                "disappeared: recreate it or choose another JOBWRAP_DIR'" if ok else f"unclear: {exc}")


@check
def check_eio(base: str, nth_fsync: int) -> Outcome:
    """EIO from the ``nth_fsync``-th fsync of a save: no commit, previous intact, a retry commits a real checkpoint."""
    directory = tempfile.mkdtemp(dir=base)
    store = store_with(directory, (1,))

    def save_with_eio() -> None:
        with failing_syscall("fsync", nth_fsync):
            commit(store, 2)
    exc = storage_error(save_with_eio, "fsync failure not reported")
    problems = []
    if exc.errno != errno.EIO or "I/O error" not in str(exc):
        problems.append(f"unclear: {exc}")
    if not intact(directory, 1):
        problems.append("step 1 damaged")
    leftover = files_of(directory, 2) + temporaries(directory)
    if leftover:
        problems.append(f"left {leftover}")
    retry = commit(store, 2)
    if not intact(directory, 2) or not os.path.exists(retry.path):
        problems.append("the retry of the same step did not commit a real checkpoint")
    return verdict(problems, "StorageError (EIO); step 1 intact; the retry committed step 2")


def check_retention_cannot_delete(base: str) -> Outcome:
    """The new checkpoint commits, then retention's unlink fails (EIO): the save still counts, training goes on."""
    directory = os.path.join(tempfile.mkdtemp(dir=base), "ck")
    with capture_logs() as records:
        job = open_session(directory, keep_last=1)
        weights = Weights(4096)
        try:
            with job:
                job.track(model=weights, tag=-1)
                for step in (1, 2, 3):
                    advance(job, weights)
                    if step == 2:
                        with failing_syscall("unlink", 1):
                            checkpoint = job.save()
                    else:
                        job.save()
        except OSError as exc:
            return False, f"the committed save raised {type(exc).__name__}: {exc}"
    warned = [r.getMessage() for r in records if "retention" in r.getMessage()]
    ok = checkpoint.step == 2 and intact(directory, 3) and bool(warned)
    return ok, ("save of step 2 returned its checkpoint; one warning; the next save's retention caught up"
                if ok else f"warned={warned}")


@check
def check_loop_device_write_error(base: str) -> Outcome:
    """Real deferred write errors: ext4 on a loop device whose backing tmpfs fills up (write ok, fsync fails)."""
    with ext4_over_full_tmpfs(base) as mnt:
        directory = os.path.join(mnt, "ck")
        store = store_with(directory, (1,))
        numel = 8 << 20  # 32 MB: more than the backing store has left
        exc = storage_error(lambda: commit(store, 2, numel), "a write the device could not store was committed")
        what = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        ok = intact(directory, 1) and not files_of(directory, 2)
        return ok, (f"fsync failed with {what} (the kernel logged block I/O errors); StorageError; "
                    f"step 1 intact, step 2 not committed" if ok else f"damaged: {exc}")


_EIO_NOTE = "simulated: os.fsync raises EIO"
_RETRY = "StorageError; previous intact; retry commits"
FAULTS = [
    Fault("disk", "ENOSPC: a save larger than the space left (tmpfs size=3m)", "StorageError names the full disk "
          "and the fix; previous intact; no temporary left", check_enospc_save),
    Fault("disk", "ENOSPC: the data fits, its manifest does not", "nothing committed; data removed; previous intact",
          check_enospc_manifest),
    Fault("disk", "ENOSPC on a periodic save, on_save_error='raise'", "training stops with StorageError",
          check_on_save_error, ("raise",)),
    Fault("disk", "ENOSPC on a periodic save, on_save_error='continue'", "error logged, training continues",
          check_on_save_error, ("continue",)),
    Fault("disk", "full disk at the first start of a run", "StorageError naming the full disk",
          check_full_disk_first_start),
    Fault("disk", "filesystem remounted read-only during the run", "StorageError (read-only); previous intact",
          check_readonly_during_run),
    Fault("disk", "resume in a read-only directory", "clear StorageError at start", check_readonly_at_start),
    Fault("disk", "checkpoint directory removed during the run", "StorageError naming the missing directory",
          check_directory_removed),
    Fault("disk", "EIO from fsync of the data (injected at the syscall)", _RETRY, check_eio, (1,), _EIO_NOTE),
    Fault("disk", "EIO from fsync of the manifest (injected)", _RETRY, check_eio, (2,), _EIO_NOTE),
    Fault("disk", "EIO from fsync of the directory after the manifest rename (injected)",
          "StorageError; nothing half-committed; retry commits", check_eio, (3,), _EIO_NOTE),
    Fault("disk", "retention cannot delete an old checkpoint (unlink fails with EIO, injected)",
          "the committed save stands; a warning; training continues", check_retention_cannot_delete,
          note="simulated: os.unlink raises EIO"),
    Fault("disk", "block device write errors: ext4 on a loop device over a full tmpfs", "fsync error -> StorageError; "
          "previous intact", check_loop_device_write_error),
]


def section(c: Campaign) -> None:
    print("disk faults", flush=True)
    for fault in FAULTS:
        c.run(fault)
    c.add(Row("disk", "EIO from a failing disk (device-mapper 'error' target)", 0, "StorageError", "",
              skipped=device_mapper_reason()))
