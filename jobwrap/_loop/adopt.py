"""Starting from a checkpoint the user already has (``init_from``): a plain ``torch.save`` dict.

The first launch in an empty directory loads the file (``weights_only=True``):
each tracked name takes the entry of the same key, ``step`` (or nanoGPT's
``iter_num``: steps done) and ``epoch`` say where training goes on. From its
first save on, jobwrap's own checkpoints take over and the file is not read again.

An ``epoch`` has two conventions in the wild, a step apart: the epoch finished
(``'epoch': epoch``) and the next one to run (pytorch/examples' ImageNet script:
``'epoch': epoch + 1``). The file cannot say which, so ``init_epoch`` must; read
the wrong way, an epoch is skipped or trained twice without a word.

A script may also resume on its own (``--resume``, ``start_epoch``) into a
directory jobwrap has not saved in yet: :func:`start_epoch` settles whose epoch wins.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import torch

from jobwrap._storage.state import load_into
from jobwrap.errors import ConfigError

log = logging.getLogger("jobwrap")

STEP_KEYS = ("step", "iter_num")
#: The keys of pytorch/examples' ImageNet checkpoint, which saves ``'epoch': epoch + 1`` (named in the refusal).
IMAGENET_KEYS = frozenset({"epoch", "arch", "state_dict", "best_acc1", "optimizer"})
EPOCH_MEANINGS = {"done": "the epoch finished", "next": "the next epoch to run"}


class Adopted:
    """A user's checkpoint on its way into the tracked objects; the interface of :class:`~jobwrap._loop.resume.Resumed`."""

    checkpoint = None
    sharded_record: dict[str, Any] = {}
    data = None
    grads: dict[str, Any] = {}
    read_seconds = 0.0
    position = 0

    def __init__(self, path: str, loaded: dict[str, Any], epoch_is: str | None = None) -> None:
        self.path = path
        self.payload = loaded
        step_key = next((k for k in STEP_KEYS if k in loaded), None)
        self.step = _whole(loaded[step_key], path, step_key) if step_key else 0
        self.epoch_is = epoch_is if "epoch" in loaded else None
        self.epoch = _epoch(path, loaded, epoch_is) if "epoch" in loaded else 0
        said = [f"{step_key} {self.step} is the steps done"] if step_key else []
        if self.epoch_is:
            said.append(f"epoch {loaded['epoch']} is {EPOCH_MEANINGS[self.epoch_is]} (init_epoch={self.epoch_is!r})")
        #: How the file's numbers were read, for the start's log line.
        self.convention = "; ".join(said)

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


def _whole(value: Any, path: str, key: str) -> int:
    """An entry that counts (step, epoch) as an int; a tensor of one number is accepted."""
    try:
        number = value.item() if isinstance(value, torch.Tensor) else value
        if isinstance(number, bool) or int(number) != number or number < 0:
            raise ValueError
        return int(number)
    except (ValueError, TypeError, RuntimeError):
        raise ConfigError(f"init_from {path}: its {key!r} is {value!r}, not a count; save a whole number "
                          f"there, or unset init_from") from None


def _epoch(path: str, loaded: dict[str, Any], epoch_is: str | None) -> int:
    """The epoch training goes on with, as ``init_epoch`` says the file's ``epoch`` means; refused unsaid."""
    saved = _whole(loaded["epoch"], path, "epoch")
    if epoch_is is None:
        looks = (" Its keys are those of pytorch/examples' ImageNet script, which saves 'epoch': epoch + 1 "
                 "(init_epoch='next')." if IMAGENET_KEYS <= set(map(str, loaded)) else "")
        raise ConfigError(
            f"init_from {path} holds epoch={saved}, and jobwrap cannot tell whether it is the epoch finished "
            f"(training goes on with epoch {saved + 1}) or the next epoch to run (training goes on with epoch "
            f"{saved}).{looks} Say which: init_epoch='done' or init_epoch='next' (JOBWRAP_INIT_EPOCH)")
    return saved + 1 if epoch_is == "done" else saved


def start_epoch(start: int | None, *, epoch: int, source: str | None, argv: Sequence[str]) -> int:
    """The epoch ``job.epochs(total, start=...)`` begins at; says which won where two disagree.

    ``source`` is what jobwrap's own ``epoch`` came from (its checkpoint, the
    init_from file), None in a directory it has not saved in yet. jobwrap's
    wins: ``track()`` has put its state back over whatever the script loaded
    itself; that is a warning only where the command line has ``--resume``,
    since a constant ``start=1`` (a loop counted from 1) differs from every
    resumed epoch without any second resume at work. Without a source the
    script's ``start`` (its own resume, or the loop's first epoch) stands.
    Without either, a ``--resume`` on the command line is named: the script
    may have loaded a checkpoint that jobwrap's epoch 0 would train again.
    """
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise ConfigError(f"job.epochs(start={start!r}): give the first epoch to run, a whole number from 0, "
                          f"or None")
    flag = resume_flag(argv)
    if source is not None:
        if start is not None and start != epoch and flag is not None:
            log.warning("job.epochs(start=%d), the script's own resume (--resume %s), is not where jobwrap goes "
                        "on: %s wins, training goes on with epoch %d (job.track() put its state back over what the "
                        "script loaded)", start, flag, source, epoch)
        elif start is not None and start != epoch:  # a loop counted from 1 (range(1, n + 1)) is no resume of its own
            log.info("job.epochs(start=%d) is the first epoch of a fresh run; resumed from %s, training goes on "
                     "with epoch %d", start, source, epoch)
        return epoch
    if start is not None:
        if start != epoch:
            log.info("no jobwrap checkpoint yet: beginning at epoch %d, the script's own (job.epochs(start=))", start)
        return start
    if flag is not None and epoch == 0:
        log.warning("the command line asks for --resume %s, but job.epochs() was given no start= and jobwrap has "
                    "no checkpoint here yet: training begins at epoch 0. Pass job.epochs(total, "
                    "start=args.start_epoch) where the script resumed itself, or let jobwrap load the file: "
                    "init_from=%s with init_epoch", flag, flag)
    return epoch


def resume_flag(argv: Sequence[str]) -> str | None:
    """The value of a ``--resume PATH`` (or ``--resume=PATH``) on the command line, if one is given (pure)."""
    for i, arg in enumerate(argv):
        if arg == "--resume" and i + 1 < len(argv) and argv[i + 1] and not argv[i + 1].startswith("-"):
            return argv[i + 1]
        if arg.startswith("--resume=") and arg.removeprefix("--resume="):
            return arg.removeprefix("--resume=")
    return None


def load(path: str, device: torch.device, epoch_is: str | None = None) -> Adopted:
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
    return Adopted(path, loaded, epoch_is)
