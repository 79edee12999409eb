"""Starting from a checkpoint the user already has (``init_from``): a plain ``torch.save`` dict.

The first launch in an empty directory loads the file (``weights_only=True``):
each tracked name takes the entry of the same key, ``step`` (or nanoGPT's
``iter_num``) and ``epoch`` say where training goes on. From its first save on,
jobwrap's own checkpoints take over and the file is not read again.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch

from jobwrap._storage.state import load_into
from jobwrap.errors import ConfigError

log = logging.getLogger("jobwrap")

STEP_KEYS = ("step", "iter_num")


class Adopted:
    """A user's checkpoint on its way into the tracked objects; the interface of :class:`~jobwrap._loop.resume.Resumed`."""

    checkpoint = None
    sharded_record: dict[str, Any] = {}
    data = None
    grads: dict[str, Any] = {}
    read_seconds = 0.0
    position = 0

    def __init__(self, path: str, loaded: dict[str, Any]) -> None:
        self.path = path
        self.payload = loaded
        self.step = int(next((loaded[k] for k in STEP_KEYS if k in loaded), 0))
        # The seed convention: the epoch saved at its end; training goes on with the next one.
        self.epoch = int(loaded["epoch"]) + 1 if "epoch" in loaded else 0

    def restore(self, name: str, obj: Any) -> bool:
        if name not in self.payload:
            raise ConfigError(
                f"init_from {self.path} has no entry {name!r} for the tracked object of that name (its keys: "
                f"{sorted(map(str, self.payload))}); track it under the file's key, e.g. "
                f"job.track({next(iter(self._stateful()), 'model')}=...), or unset init_from / JOBWRAP_INIT_FROM")
        load_into(name, obj, self.payload[name])
        return False

    def extra(self, name: str, value: Any) -> Any:
        return self.payload.get(name, value)

    def restore_rng(self) -> None:
        """The file has no RNG streams: the script's own seeding stands."""

    def warn_untracked(self, tracked: Iterable[str]) -> None:
        unused = sorted(k for k in map(str, self.payload) if k not in set(tracked) and k not in (*STEP_KEYS, "epoch"))
        if unused:
            log.warning("init_from %s: entries %s were not tracked and are ignored", self.path, unused)

    def _stateful(self) -> list[str]:
        return [k for k, v in self.payload.items() if isinstance(v, dict)]


def load(path: str, device: torch.device) -> Adopted:
    """The user's checkpoint at ``path``, or a ConfigError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise ConfigError(f"init_from {path!r} (JOBWRAP_INIT_FROM or init_from=) is not a file; give the path of "
                          f"the checkpoint to start from, or unset it")
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"init_from {path!r} cannot be loaded with torch.load(weights_only=True) ({exc}); "
                          f"save it as a dict of state dicts and plain values") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"init_from {path!r} holds a {type(loaded).__name__}, not a dict of named entries; "
                          f"save it as torch.save({{'model': model.state_dict(), ...}}, path)")
    return Adopted(path, loaded)
