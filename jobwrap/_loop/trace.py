"""The step trace of ``jobwrap simulate``: a digest of the whole tracked state at every step boundary.

Off unless ``test_trace`` (``JOBWRAP_TEST_TRACE=1``, set by ``jobwrap simulate`` and the
``jobwrap_preempt`` fixture). A final checkpoint that differs says *that* a resume went wrong;
the uninterrupted run's and the preempted run's traces, compared step by step
(:mod:`jobwrap._report.divergence`), say *where*: the first step whose result differs, and
which tracked object and key, which random stream, whether the batch itself, and the loss.

Rank 0 appends one JSON line per boundary to ``TRACE_FILE`` in the checkpoint directory:

- ``{"launch": pid, "resumed_from": step or null, "position": p}`` when a process starts recording;
- ``{"step", "epoch", "position", "objects": {name: {key: digest}}, "extras": {name: value or digest},
  "rng": {stream: digest}, "loader": {key: digest} or null, "batch": digest or null}`` per boundary
  (the first at each (epoch, step) of a process: the epoch's start and its loader's first batch share one);
- ``{"loader": "skip" | "replay" | "state", "step", "position"}`` once, when a launch resumed mid-epoch
  hands out its first batch: how the loader found its place (a replay fetches again what was trained).

A digest reads every tensor (8-byte BLAKE2b of its bytes, dtype and shape): meant for the small
configuration a simulation runs, not for production runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any

import torch

from jobwrap._storage.state import capture_rng

#: The trace's file in the checkpoint directory (jobwrap.testing reads it back).
TRACE_FILE = "trace.jsonl"

#: Whether any session of this process records: the loader's per-batch hook costs one global read otherwise.
active = False

_RECORDERS: "weakref.WeakKeyDictionary[Any, _Recorder]" = weakref.WeakKeyDictionary()


class _Recorder:
    """One session's trace: where it goes, what was last recorded, the batch handed out since."""

    def __init__(self, session: Any) -> None:
        self.path = os.path.join(session.config.directory, TRACE_FILE)
        self.last: tuple[int, int] | None = None
        self.batch: str | None = None
        resumed = session.resumed_from is not None
        self.resumed_mid_epoch = resumed and session.position > 0
        self.loader_told = False
        # Made at the first boundary: in a step_done() loop that comes after the resumed launch's first step.
        _append(self.path, {"launch": os.getpid(),
                            "resumed_from": session.resumed_from.step if resumed else None,
                            "position": session.position})


def record(session: Any) -> None:
    """At a step boundary (rank 0): the state's digests, once per (epoch, step) of this process."""
    global active
    if session.group.rank != 0:
        return
    recorder = _RECORDERS.get(session)
    if recorder is None:
        recorder = _RECORDERS[session] = _Recorder(session)
        active = True
    where = (session.epoch, session.step)
    if where == recorder.last:
        return
    recorder.last = where
    loader = session._loader
    _append(recorder.path, {
        "step": session.step, "epoch": session.epoch, "position": session.position,
        "objects": {name: _object_digests(session, name, obj) for name, obj in session._objects.items()},
        "extras": {name: _extra(value) for name, value in session.extras.items()},
        "rng": {stream: digest(state) for stream, state in capture_rng(session.device).items()},
        "loader": _loader_digests(loader),
        "batch": recorder.batch,
    })
    recorder.batch = None


def note_batch(session: Any, batch: Any) -> None:
    """The loader handed out ``batch``: its digest goes in the next boundary's record."""
    recorder = _RECORDERS.get(session)
    if recorder is None:
        return
    recorder.batch = digest(batch)
    if recorder.resumed_mid_epoch and not recorder.loader_told and session._loader is not None:
        recorder.loader_told = True
        _append(recorder.path, {"loader": session._loader.resume_kind(), "step": session.step,
                                "position": session.position})


def read(directory: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The trace of a run directory, or None where it holds none (not recorded, or another layout)."""
    path = os.path.join(os.fspath(directory), TRACE_FILE)
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return None
    except ValueError:  # a line cut by a kill: what came before it is still evidence
        with open(path) as f:
            return [json.loads(line) for line in f.read().splitlines()[:-1] if line.strip()]


def _object_digests(session: Any, name: str, obj: Any) -> dict[str, Any]:
    if name in session._sharded:  # an FSDP state_dict() is a collective only rank 0 would enter here
        return {}
    if type(obj).__module__.split(".")[0] == "jobwrap":
        # An integration's whole-trainer state (jobwrap.transformers, jobwrap.lightning): its state_dict()
        # writes the Trainer's checkpoint folder or runs Lightning's save hooks, which a trace must not do.
        return {}
    try:
        return flat_digests(obj.state_dict())
    except Exception as exc:  # the save reports a failing state_dict(); the trace only loses that object
        return {"?": f"state_dict() failed: {type(exc).__name__}"}


def _loader_digests(loader: Any) -> dict[str, Any] | None:
    """The loader's place and generators; not a loader with its own state (a StatefulDataLoader's state_dict()
    before iter() makes its iterator and starts its workers, which the run itself would not do there)."""
    if loader is None or loader.resume_kind() == "state":
        return None
    return flat_digests(loader.state_dict())


def _extra(value: Any) -> Any:
    """A number as itself (a loss reads better than its digest), anything else by digest."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return digest(value)


def flat_digests(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"state.0.exp_avg": digest, "param_groups.0.lr": 0.1, ...}``: each leaf of nested dicts and lists
    by its path, a number as itself."""
    if isinstance(value, dict) and value:
        found: dict[str, str] = {}
        for key, item in value.items():
            found.update(flat_digests(item, f"{prefix}.{key}" if prefix else str(key)))
        return found
    if isinstance(value, (list, tuple)) and value and any(isinstance(v, (dict, list, tuple, torch.Tensor))
                                                          for v in value):
        found = {}
        for i, item in enumerate(value):
            found.update(flat_digests(item, f"{prefix}.{i}" if prefix else str(i)))
        return found
    return {prefix or "": _extra(value)}


def digest(value: Any) -> str:
    """16 hex digits that change with any bit of ``value`` (tensors by dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=8)
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        h.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        try:
            h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        except Exception:  # a layout without plain bytes (sparse, quantized): its values
            h.update(repr(tensor.tolist()).encode())
    elif isinstance(value, dict):
        h.update(b"{")
        for key, item in value.items():
            h.update(repr(key).encode())
            _feed(h, item)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif hasattr(value, "tobytes"):  # a NumPy array
        h.update(f"A{getattr(value, 'dtype', '')}{getattr(value, 'shape', '')}".encode())
        h.update(value.tobytes())
    else:
        h.update(repr(value).encode())


def _append(path: str, entry: dict[str, Any]) -> None:
    """One line, flushed at once: a launch that is killed keeps what it recorded."""
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=repr) + "\n")
