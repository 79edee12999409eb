"""A tiny model whose content names its step, and real Sessions that train, save and resume it.

Every scenario trains through these helpers, so a wrong load shows as a tensor
that does not match its step, and every session is opened the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from typing import Any, Iterator

import torch

import jobwrap

from .internals import FORMAT_VERSION, known

log = logging.getLogger("jobwrap")


class Weights:
    """A stateful object whose tensor is a known function of the step, so a wrong load is visible."""

    def __init__(self, numel: int = 4096) -> None:
        self.numel = numel
        self.w = self.expected(0, numel)

    @staticmethod
    def expected(step: int, numel: int) -> torch.Tensor:
        return (torch.arange(numel, dtype=torch.float32) % 1000) + float(step) * 1000.0

    def fill(self, step: int) -> None:
        self.w = self.expected(step, self.numel)

    def matches(self, step: int) -> bool:
        return self.w.shape == (self.numel,) and torch.equal(self.w, self.expected(step, self.numel))

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = state["w"].clone()


def payload(step: int, numel: int) -> dict[str, Any]:
    """What a Session saves at ``step`` for :class:`Weights` (for writing through the store directly)."""
    return {"model": {"w": Weights.expected(step, numel)}, "step": step, "epoch": 0, "tag": step,
            "jobwrap": {"format": FORMAT_VERSION}}


def payload_matches(loaded: Any, step: int, numel: int) -> bool:
    """Whether a loaded checkpoint holds exactly what the run saved at ``step``."""
    try:
        return (int(loaded["step"]) == step and loaded.get("tag") == step
                and torch.equal(loaded["model"]["w"], Weights.expected(step, numel)))
    except (KeyError, TypeError, AttributeError):
        return False


def open_session(directory: str, *, environ: dict[str, str] | None = None, run_id: str | None = "mine",
                 **settings: Any) -> Any:
    """A real Session on ``directory``: no save at the end, synchronous saves, unless ``settings`` say so."""
    return jobwrap.Session(directory, environ={} if environ is None else environ, run_id=run_id,
                           **known({"save_at_end": False, "async_save": False, **settings}))


def advance(job: Any, weights: Weights) -> None:
    """One training step: the weights and the tag become the next step's, then the boundary."""
    weights.fill(job.step + 1)
    job["tag"] = job.step + 1
    job.step_done()


def train_to(directory: str, steps: list[int], *, run_id: str | None = "mine", numel: int = 4096,
             **settings: Any) -> None:
    """A real Session that commits a checkpoint at each of ``steps`` (synchronous saves)."""
    job = open_session(directory, run_id=run_id, **{"keep_last": 50, **settings})
    weights = Weights(numel)
    with capture_logs(), job:
        job.track(model=weights, tag=-1)
        while job.step < max(steps):
            advance(job, weights)
            if job.step in steps:
                job.save()


def new_directory(workdir: str, prefix: str = "tmp") -> str:
    """A checkpoint directory not yet created, in a new folder of its own under ``workdir``."""
    return os.path.join(tempfile.mkdtemp(prefix=f"{prefix}-", dir=workdir), "ck")


@dataclasses.dataclass
class Resumed:
    step: int | None
    content_ok: bool
    warnings: list[str]
    error: str = ""


def resume(directory: str, *, run_id: str | None = "mine", numel: int = 4096, **settings: Any) -> Resumed:
    """Open ``directory`` with a real Session, as a relaunched job does; report what it resumed from."""
    with capture_logs() as records:
        try:
            job = open_session(directory, run_id=run_id, **settings)
            weights = Weights(numel)
            with job:
                job.track(model=weights, tag=-1)
                step = job.resumed_from.step if job.resumed_from is not None else None
                ok = step is None or (weights.matches(step) and job["tag"] == step)
        except Exception as exc:  # noqa: BLE001 - reported, the caller decides
            return Resumed(None, False, warnings_of(records), f"{type(exc).__name__}: {exc}")
    return Resumed(step, ok, warnings_of(records))


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """``os.environ`` with ``values`` set (None: unset) while the block runs."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set(name, value)


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def warnings_of(records: list[logging.LogRecord]) -> list[str]:
    """The messages of the warning and error records."""
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


@contextlib.contextmanager
def capture_logs() -> Iterator[list[logging.LogRecord]]:
    """The jobwrap logger's records while the block runs (and nothing printed)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    saved = (log.handlers[:], log.level, log.propagate)
    log.handlers[:] = [Keep(logging.DEBUG)]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield records
    finally:
        log.handlers[:], level, log.propagate = saved[0], saved[1], saved[2]
        log.setLevel(level)
