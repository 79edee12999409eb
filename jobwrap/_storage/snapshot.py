"""Asynchronous periodic checkpoints: a short pause on the training thread, the write on another.

:meth:`StagingArea.stage` gives the writer a copy of the checkpoint payload:
the containers are rebuilt at once, and every tensor gets a CPU buffer that is
allocated once and reused (pinned when the tensor is on a GPU, so the copy
runs at full link speed). Tensors are copied during the pause, except the
storages the caller marks as deferred (the optimizers' CPU parameters and
state, which only ``optimizer.step()`` changes): :meth:`StagingArea.copy_deferred`
copies those on the writer thread while the next step computes, and
:mod:`jobwrap._loop.async_save` holds the next ``step()`` until it is done.
:class:`BackgroundSave` runs that copy and the write and commit on its own
thread, at most one at a time; its outcome, a committed checkpoint or the exception, is kept until the
training thread collects it at a step boundary, so a failure is raised there
and never lost.

Memory: one staging copy of the state (the bytes of its distinct tensor
storages), reserved once and reused; while a save is in flight the next one is
skipped, never staged into a second copy.
"""
from __future__ import annotations

import copy
import ctypes
import os
import threading
import time
from typing import Any, Callable, Collection

import torch

from jobwrap._compat import torch_tensor as tensor_internals
from jobwrap._storage.store import SaveCancelled

_COPY_CHUNK = 64 << 20  # a deferred copy checks for cancellation between pieces
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
              torch.layout, torch.memory_format)


class ChangedWhileCopied(Exception):
    """A deferred tensor was changed in place while the writer copied it: the copy may be torn."""


def check_unchanged(watched: list[tuple[torch.Tensor, int]]) -> None:
    """Raise :class:`ChangedWhileCopied` if a tensor's version counter moved since it was recorded.

    Every in-place operation (an optimizer step, ``load_state_dict``, ``add_``) bumps
    the counter; writes through ``tensor.data`` do not, and are not seen here.
    """
    changed = sum(1 for tensor, version in watched if tensor_internals.version(tensor) != version)
    if changed:
        raise ChangedWhileCopied(f"{changed} parameter or optimizer tensor(s) changed outside optimizer.step() "
                                 "while being copied")


class StagingArea:
    """Reusable CPU buffers that receive a copy of a checkpoint payload's tensors.

    Each distinct tensor storage gets one buffer, in the order the payload
    lists them; the next :meth:`stage` of a payload with the same structure
    reuses every buffer, so after the first save no memory is allocated.
    Views keep their offsets and strides and storages shared between tensors
    stay shared, so ``torch.save`` writes the same bytes from the copy as from
    the live state.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._used = 0
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._devices: set[torch.device] = set()
        self._defer: Collection[int] = ()
        self._pending: list[tuple[torch.Tensor, torch.UntypedStorage]] = []

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (the memory the asynchronous path adds)."""
        return sum(b.numel() for b in self._buffers)

    def stage(self, payload: Any, *, defer: Collection[Any] = ()) -> Any:
        """A copy of ``payload`` whose tensors live in the staging buffers.

        Storages listed in ``defer`` (by their key, ``jobwrap._compat.torch_tensor.storage_key``; CPU only)
        get their buffer now but their bytes only in :meth:`copy_deferred`; the
        caller guarantees they do not change until then. Everything else is
        copied before this returns.
        """
        self._used = 0
        self._storages = {}
        self._devices = set()
        self._defer = defer
        self._pending = []
        try:
            staged = self._copy(payload, {})
            for device in self._devices:  # the copies to pinned memory were queued without waiting
                torch.cuda.current_stream(device).synchronize()
        finally:
            self._storages = {}
            self._defer = ()
        del self._buffers[self._used:]  # a payload that shrank frees what it no longer needs
        return staged

    def copy_deferred(self, cancel: threading.Event | None = None) -> None:
        """Copy the deferred storages into their buffers (one thread, no torch thread pool)."""
        pending, self._pending = self._pending, []
        for buffer, storage in pending:
            nbytes = storage.nbytes()
            for start in range(0, nbytes, _COPY_CHUNK):
                if cancel is not None and cancel.is_set():
                    raise SaveCancelled()
                length = min(_COPY_CHUNK, nbytes - start)
                ctypes.memmove(buffer.data_ptr() + start, storage.data_ptr() + start, length)

    def plan(self, payload: Any) -> list[tuple[int, bool]]:
        """The buffers a :meth:`stage` of ``payload`` needs, in order: (bytes, pinned). Cheap: no copy."""
        sizes: list[tuple[int, bool]] = []
        self._walk(payload, set(), set(), sizes)
        return sizes

    def reserve(self, sizes: list[tuple[int, bool]], cancel: threading.Event | None = None) -> int:
        """Allocate and touch the buffers of :meth:`plan`, so that no save pays for fresh memory.

        Meant for a background thread while training runs (the training thread
        must not stage meanwhile); the page faults of new memory then happen
        here, not in the training loop's pause. Returns the bytes reserved.
        """
        for index, (nbytes, pinned) in enumerate(sizes):
            if cancel is not None and cancel.is_set():
                break
            if index < len(self._buffers) and self._buffers[index].numel() == nbytes \
                    and self._buffers[index].is_pinned() == pinned:
                continue
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            if nbytes:
                # One thread, no torch thread pool: the training thread keeps the cores it uses.
                ctypes.memset(buffer.data_ptr(), 0, nbytes)
            if index < len(self._buffers):
                self._buffers[index] = buffer
            else:
                self._buffers.append(buffer)
        return self.nbytes

    def _walk(self, obj: Any, seen: set[int], storages: set[Any], sizes: list[tuple[int, bool]]) -> None:
        # The same traversal order as _copy, so buffer i of the plan is buffer i of the stage.
        if isinstance(obj, _IMMUTABLE) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if _plain_tensor(obj):
                storage = obj.untyped_storage()
                key = tensor_internals.storage_key(storage)
                if key not in storages:
                    storages.add(key)
                    sizes.append((storage.nbytes(), pinned_staging(storage.device.type)))
        elif isinstance(obj, dict):
            for value in obj.values():
                self._walk(value, seen, storages, sizes)
            extra = getattr(obj, "__dict__", None)
            if extra:
                for value in extra.values():
                    self._walk(value, seen, storages, sizes)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                self._walk(value, seen, storages, sizes)

    def _copy(self, obj: Any, memo: dict[int, Any]) -> Any:
        if isinstance(obj, _IMMUTABLE):
            return obj
        key = id(obj)
        if key in memo:  # the same object twice stays one object, as pickle sees it
            return memo[key]
        if isinstance(obj, torch.Tensor):
            result: Any = self._tensor(obj)
        elif isinstance(obj, dict):
            result = copy.copy(obj)  # keeps the type (OrderedDict) and attributes (state_dict's _metadata)
            memo[key] = result
            for name, value in obj.items():
                result[name] = self._copy(value, memo)
            extra = getattr(obj, "__dict__", None)
            if extra:
                result.__dict__.update(self._copy(dict(extra), memo))
        elif isinstance(obj, list):
            result = copy.copy(obj)
            memo[key] = result
            result[:] = [self._copy(value, memo) for value in obj]
        elif isinstance(obj, tuple):
            items = [self._copy(value, memo) for value in obj]
            if type(obj) is tuple:
                result = tuple(items)
            elif hasattr(obj, "_fields"):  # a namedtuple
                result = type(obj)(*items)
            else:  # torch.Size and other tuple types
                result = type(obj)(items)
        else:
            result = copy.deepcopy(obj)  # anything else: a private copy the training thread cannot change
        memo[key] = result
        return result

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if not _plain_tensor(tensor):
            return tensor.detach().to("cpu", copy=True)  # rare kinds: a fresh copy, not a reused buffer
        storage = tensor.untyped_storage()
        key = tensor_internals.storage_key(storage)
        staged_storage = self._storages.get(key)
        if staged_storage is None:
            on_gpu = pinned_staging(storage.device.type)
            buffer = self._buffer(storage.nbytes(), pinned=on_gpu)
            if not on_gpu and key in self._defer:
                self._pending.append((buffer, storage))
            else:
                source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
                buffer.copy_(source, non_blocking=on_gpu)
                if on_gpu:
                    self._devices.add(storage.device)
            staged_storage = self._storages[key] = buffer.untyped_storage()
        staged = torch.empty(0, dtype=tensor.dtype).set_(staged_storage, tensor.storage_offset(),
                                                          tensor.size(), tensor.stride())
        if type(tensor) is torch.nn.Parameter:
            return torch.nn.Parameter(staged, requires_grad=tensor.requires_grad)
        if tensor.requires_grad:
            staged.requires_grad_(True)
        return staged

    def _buffer(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        index = self._used
        self._used += 1
        if index < len(self._buffers):
            buffer = self._buffers[index]
            if buffer.numel() == nbytes and buffer.is_pinned() == pinned:
                return buffer
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        if index < len(self._buffers):
            self._buffers[index] = buffer
        else:
            self._buffers.append(buffer)
        return buffer


class BackgroundSave:
    """At most one save in flight on its own thread; its outcome waits to be collected.

    ``work(cancel)`` runs on the thread and returns what it committed; setting
    ``cancel`` asks it to give up at its next chunk (a newer save supersedes
    it). The training thread checks :attr:`finished` (an attribute read) at
    each step boundary and calls :meth:`collect` once it is set. ``clock``: the
    session's, for :meth:`remaining_seconds`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self.finished = False
        self.step: int | None = None
        self.started = 0.0
        self.expected_seconds: float | None = None

    @property
    def busy(self) -> bool:
        """A save is in flight, or finished and not collected yet."""
        return self._thread is not None

    def submit(self, step: int | None, work: Callable[[threading.Event], Any], *,
               expected_seconds: float | None = None) -> None:
        """Start ``work`` on a new thread (the previous one must have been collected).

        ``step`` is the step being saved, or None for other work on the same
        thread (reserving the staging buffers).
        """
        if self._thread is not None:
            raise RuntimeError(f"a save of step {self.step} is still in flight; collect it first")
        self._cancel = threading.Event()
        self._result, self._error, self.finished = None, None, False
        self.step, self.started, self.expected_seconds = step, self._clock(), expected_seconds
        # Not a daemon: a save that is writing when the script ends still commits before exit.
        self._thread = threading.Thread(target=self._run, args=(work, self._cancel),
                                        name=f"jobwrap-save-{step if step is not None else 'staging'}", daemon=False)
        self._thread.start()

    def _run(self, work: Callable[[threading.Event], Any], cancel: threading.Event) -> None:
        try:
            self._result = work(cancel)
        except BaseException as exc:  # kept for the training thread, raised there
            self._error = exc
        self.finished = True

    def remaining_seconds(self, now: float | None = None) -> float | None:
        """A guess at how long the save in flight still needs (from its expected duration)."""
        if self._thread is None or self.expected_seconds is None:
            return None
        elapsed = (self._clock() if now is None else now) - self.started
        return max(0.0, self.expected_seconds - elapsed)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the save in flight ends; True if it has (or none was in flight)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def cancel(self) -> None:
        """Ask the save in flight to stop at its next chunk (it removes its temporary file)."""
        self._cancel.set()

    def collect(self) -> tuple[Any, BaseException | None]:
        """(result, error) of the finished save, and the slot freed for the next; waits if needed."""
        self.wait()
        result, error = self._result, self._error
        self._thread, self._result, self._error, self.finished = None, None, None, False
        return result, error


def pinned_staging(device_type: str) -> bool:
    """Whether a tensor on ``device_type`` is staged into pinned host memory.

    Pinned (page-locked) memory lets a GPU copy run at full link speed and without
    blocking the training thread; for CPU tensors it would only lock memory away.
    """
    return device_type != "cpu"


def _plain_tensor(tensor: torch.Tensor) -> bool:
    """A dense tensor with real storage: staged into a reused buffer (other kinds get a fresh copy)."""
    return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided
            and not tensor.is_quantized and tensor.device.type != "meta")


def lower_priority() -> None:
    """The calling thread yields the CPU to training (Linux: each thread has its own nice value).

    For work nothing waits on: the write after the copy, the buffers' reservation.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
