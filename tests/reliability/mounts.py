"""Real disk faults: size-limited tmpfs, read-only remounts, ext4 on a failing loop device, and,
where the machine cannot make a fault real, a system call made to fail.

Mounting needs root; elsewhere these raise :class:`Skip` with the reason.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from typing import Any, Iterator

from .results import Skip


def _run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def _unmount(point: str) -> None:
    if _run("umount", point).returncode != 0:
        _run("umount", "-l", point)


@contextlib.contextmanager
def tmpfs(base: str, size: str) -> Iterator[str]:
    """A real size-limited tmpfs mounted under ``base``; raises :class:`Skip` where mount is not allowed."""
    if os.geteuid() != 0:
        raise Skip("needs root to mount a size-limited tmpfs")
    if shutil.which("mount") is None:
        raise Skip("no mount command")
    point = tempfile.mkdtemp(prefix="tmpfs-", dir=base)
    result = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", point)
    if result.returncode != 0:
        os.rmdir(point)
        raise Skip(f"mount -t tmpfs refused: {result.stderr.strip() or result.returncode}")
    try:
        yield point
    finally:
        _unmount(point)
        with contextlib.suppress(OSError):
            os.rmdir(point)


def remount(point: str, mode: str) -> None:
    """Remount ``point`` ``ro`` or ``rw``."""
    result = _run("mount", "-o", f"remount,{mode}", point)
    if result.returncode != 0:
        raise Skip(f"mount -o remount,{mode} refused: {result.stderr.strip()}")


@contextlib.contextmanager
def read_only(point: str) -> Iterator[None]:
    """``point`` remounted read-only while the block runs."""
    remount(point, "ro")
    try:
        yield
    finally:
        remount(point, "rw")


def fill(directory: str, leave_bytes: int = 0) -> None:
    """Fill the filesystem of ``directory`` until only ``leave_bytes`` (rounded to blocks) are free."""
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize - leave_bytes
    with open(os.path.join(directory, "filler"), "wb") as f:
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            while free > 0:
                free -= f.write(chunk[:min(len(chunk), free)])


@contextlib.contextmanager
def ext4_over_full_tmpfs(base: str) -> Iterator[str]:
    """ext4 (256 MB as it says) on a loop device backed by a 24 MB tmpfs: writes succeed, writeback fails."""
    if os.geteuid() != 0:
        raise Skip("needs root for a loop device")
    for tool in ("losetup", "mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            raise Skip(f"no {tool}")
    with tmpfs(base, "24m") as back:
        image = os.path.join(back, "disk.img")
        with open(image, "wb") as f:
            f.truncate(256 << 20)
        made = _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", image,
                    timeout=60)
        if made.returncode != 0:
            raise Skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
        attached = _run("losetup", "-f", "--show", image)
        if attached.returncode != 0:
            raise Skip(f"losetup refused: {attached.stderr.strip()}")
        loop = attached.stdout.strip()
        mnt = tempfile.mkdtemp(prefix="ext4-", dir=base)
        try:
            mounted = _run("mount", "-t", "ext4", "-o", "errors=continue", loop, mnt)
            if mounted.returncode != 0:
                raise Skip(f"mounting ext4 on {os.path.basename(loop)} refused: {mounted.stderr.strip()}")
            try:
                yield mnt
            finally:
                _unmount(mnt)
        finally:
            _run("losetup", "-d", loop)
            with contextlib.suppress(OSError):
                os.rmdir(mnt)


def device_mapper_reason() -> str:
    """Why no device-mapper 'error' target makes a real EIO here."""
    if shutil.which("dmsetup") is None:
        return "no dmsetup on this machine"
    result = _run("dmsetup", "version")
    if result.returncode != 0:
        return "device-mapper is not available in this kernel/container (dmsetup version: " + \
            (result.stderr.strip().splitlines() or ["failed"])[0] + "); EIO is injected at the syscall instead"
    return "device-mapper present but not used: the syscall injection and the loop device cover the path"


@contextlib.contextmanager
def failing_syscall(name: str, nth: int, err: int = errno.EIO) -> Iterator[list[int]]:
    """Make the ``nth`` call of ``os.<name>`` fail with ``err`` (the other calls go through)."""
    original = getattr(os, name)
    calls = [0]

    def fake(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(err, os.strerror(err))
        return original(*args, **kwargs)
    setattr(os, name, fake)
    try:
        yield calls
    finally:
        setattr(os, name, original)
