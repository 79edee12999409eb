"""Validated settings; the one place that reads ``JOBWRAP_*`` environment variables.

Precedence: a Python argument beats the environment variable, which beats the
default. ``jobwrap run`` flags reach the training process as variables.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
from typing import Any, Mapping

from jobwrap.errors import ConfigError

#: Exit code of a training process that asks its supervisor to requeue it (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75

DEFAULT_REQUEUE_SIGNALS = ("SIGUSR1",)
DEFAULT_EXIT_SIGNALS = ("SIGTERM",)
DEFAULT_MAX_REQUEUES = 50


def parse_signal(name: str | int | signal.Signals) -> signal.Signals:
    """``"USR1"``, ``"SIGUSR1"``, ``10`` or ``signal.SIGUSR1`` to ``signal.SIGUSR1``."""
    if isinstance(name, signal.Signals):
        return name
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        try:
            return signal.Signals(int(name))
        except ValueError:
            raise ConfigError(f"unknown signal number {name}; use a name such as USR1") from None
    text = str(name).strip().upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        raise ConfigError(f"unknown signal {name!r}; use a name such as USR1, USR2 or TERM") from None


def parse_signals(value: str | tuple | list) -> tuple[signal.Signals, ...]:
    """``"USR1,USR2"``, a list or tuple of names or numbers, or one signal, to a tuple of signals."""
    if isinstance(value, str):
        value = [part for part in value.replace(" ", ",").split(",") if part]
    elif isinstance(value, signal.Signals):
        value = [value]
    elif not isinstance(value, (list, tuple)):
        raise ConfigError(f"{value!r} (of type {type(value).__name__}) is not a list of signals; "
                          f"use names such as ('USR1',) or 'USR1,USR2'")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ConfigError(f"{v!r} (of type {type(v).__name__}) is not a signal; use a name such as USR1")
    return tuple(parse_signal(v) for v in value)


@dataclasses.dataclass(kw_only=True, slots=True)
class Config:
    """Everything a :class:`jobwrap.Session` can be told. See docs/guide.md for each field."""

    directory: str
    run_id: str | None = None
    adopt: bool = False
    # A user's own torch.save checkpoint the first launch starts from (jobwrap/_loop/adopt.py).
    init_from: str | None = None
    # What init_from's "epoch" means: "done" (the epoch finished) or "next" (the next to run, pytorch/examples'
    # ImageNet `epoch + 1`). Required where the file holds an epoch: jobwrap cannot tell them apart.
    init_epoch: str | None = None
    requeue_signals: tuple[signal.Signals, ...] = dataclasses.field(
        default_factory=lambda: parse_signals(DEFAULT_REQUEUE_SIGNALS))
    exit_signals: tuple[signal.Signals, ...] = dataclasses.field(
        default_factory=lambda: parse_signals(DEFAULT_EXIT_SIGNALS))
    requeue_on_exit_signals: bool = False
    keep_last: int = 3
    save_every_steps: int | None = None
    save_every_seconds: float | None = None
    # "auto": the interval chosen from this run's measured save pause and interruptions (jobwrap/_loop/interval.py).
    save_every: str | None = None
    save_at_end: bool = True
    max_requeues: int = DEFAULT_MAX_REQUEUES
    max_no_progress: int = 3
    grace_seconds: float | None = None
    file_mode: int = 0o600
    device: str | None = None
    on_save_error: str = "raise"
    allow_world_size_change: bool = False
    sync_every_steps: int = 1
    # With several ranks and replicated (DDP) state, a signal's or manual save of at least this many tensor
    # bytes is striped: every rank writes its share (jobwrap/_storage/striped.py); 0 stripes every such save.
    stripe_min_bytes: int = 1 << 30
    # Periodic saves copy the state into reused CPU buffers and write it on a background thread.
    async_save: bool = True
    # ...and copy the tracked optimizers' CPU parameters and state on the writer thread while the next
    # step computes (their next step() waits for it); False copies everything during the pause.
    lazy_copy: bool = True
    # One live trainer per directory (jobwrap/_storage/lock.py): a holder on another host whose lock this host
    # cannot see is taken over after this many seconds without a heartbeat; break_lock takes it anyway.
    lock_timeout: float = 120.0
    break_lock: bool = False
    # Test hooks (jobwrap.testing): hold at these steps until a signal arrives.
    test_hold_at: tuple[int, ...] = ()
    test_control: str | None = None
    # ...and record a digest of the state at every step boundary (jobwrap simulate's step trace).
    test_trace: bool = False

    def __post_init__(self) -> None:
        if not self.directory:
            raise ConfigError("no checkpoint directory: pass directory=... or set JOBWRAP_DIR")
        self._check_types()
        self.directory = os.fspath(self.directory)
        for field in ("requeue_signals", "exit_signals"):
            try:
                setattr(self, field, parse_signals(getattr(self, field)))
            except ConfigError as exc:
                raise ConfigError(f"{field}: {exc} (or set {ENV_VARS[field]})") from None
        both = set(self.requeue_signals) & set(self.exit_signals)
        if both:
            names = ", ".join(s.name for s in both)
            raise ConfigError(f"{names} is both a requeue and an exit signal; list it in only one")
        if signal.SIGKILL in self.requeue_signals + self.exit_signals:
            raise ConfigError("SIGKILL cannot be trapped; use USR1, USR2 or TERM")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last={self.keep_last}: keep at least 1 checkpoint")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise ConfigError(f"save_every_steps={self.save_every_steps}: use a positive number or None")
        if self.save_every_seconds is not None and self.save_every_seconds <= 0:
            raise ConfigError(f"save_every_seconds={self.save_every_seconds}: use a positive number or None")
        self._check_save_every()
        if self.max_requeues < 0:
            raise ConfigError(f"max_requeues={self.max_requeues}: use 0 or more")
        if self.max_no_progress < 1:
            raise ConfigError(f"max_no_progress={self.max_no_progress}: use 1 or more")
        if self.file_mode & 0o002:
            raise ConfigError(f"file_mode={oct(self.file_mode)} is world-writable; use 0o600 or 0o640")
        if self.sync_every_steps < 1:
            raise ConfigError(f"sync_every_steps={self.sync_every_steps}: use 1 or more")
        if self.stripe_min_bytes < 0:
            raise ConfigError(f"stripe_min_bytes={self.stripe_min_bytes}: use 0 (always stripe) or more bytes")
        if self.lock_timeout <= 0:
            raise ConfigError(f"lock_timeout={self.lock_timeout}: use a positive number of seconds")
        if self.on_save_error not in ("raise", "continue"):
            raise ConfigError(f"on_save_error={self.on_save_error!r}: use 'raise' (stop training) or "
                              f"'continue' (log it and keep training; the signal's save still raises)")
        if self.run_id is not None:
            _check_run_id(self.run_id)
        if self.init_epoch not in (None, "done", "next"):
            raise ConfigError(f"init_epoch={self.init_epoch!r} (JOBWRAP_INIT_EPOCH): use 'done' where init_from's "
                              f"epoch is the epoch finished, 'next' where it is the next epoch to run")

    def _check_types(self) -> None:
        """Every setting of its type, at construction: a value of the wrong type (grace_seconds="120" from an
        environment read by the script) would be accepted here and fail hours later, at the signal's save."""
        for field, (kind, optional) in _TYPES.items():
            value = getattr(self, field)
            if value is None and optional:
                continue
            if kind is _seconds:
                if _is_number(value) and math.isfinite(value):
                    setattr(self, field, float(value))
                    continue
            elif kind is _signals or _is_a(value, kind):
                continue
            if kind is _steps and isinstance(value, (list, tuple)) and all(_is_a(v, _count) for v in value):
                setattr(self, field, tuple(value))
                continue
            raise ConfigError(_type_error(field, value, kind, optional))
        if self.file_mode & ~0o777:
            raise ConfigError(f"file_mode={oct(self.file_mode)} is not a file mode: use permission bits such as "
                              f"0o600 or 0o640 (JOBWRAP_FILE_MODE=640)")
        if self.grace_seconds is not None and self.grace_seconds <= 0:
            raise ConfigError(f"grace_seconds={self.grace_seconds}: the signal's lead time is a positive number "
                              f"of seconds (JOBWRAP_GRACE_SECONDS=120 for --signal=B:USR1@120), or None")
        if any(step < 0 for step in self.test_hold_at):
            raise ConfigError(f"test_hold_at={self.test_hold_at}: steps are 0 or more")

    def _check_save_every(self) -> None:
        if self.save_every is None:
            return
        self.save_every = str(self.save_every).strip().lower()
        if self.save_every != "auto":
            raise ConfigError(f"save_every={self.save_every!r}: the one value is 'auto' (JOBWRAP_SAVE_EVERY=auto); "
                              f"for a fixed interval set save_every_steps or save_every_seconds instead")
        if self.save_every_steps or self.save_every_seconds:
            raise ConfigError("save_every='auto' chooses the interval itself: unset save_every_steps and "
                              "save_every_seconds (JOBWRAP_SAVE_EVERY_STEPS, JOBWRAP_SAVE_EVERY_SECONDS, "
                              "--save-every-steps, --save-every-seconds), or drop save_every")


class _Kind:
    """An expected type in words, for the error that names it."""

    def __init__(self, words: str, *types: type) -> None:
        self.words = words
        self.types = types


_text = _Kind("text (a str)", str)
_path = _Kind("a path (a str or os.PathLike)", str, os.PathLike)
_flag_kind = _Kind("True or False (a bool)", bool)
_count = _Kind("a whole number (an int)", int)
_seconds = _Kind("a finite number of seconds (an int or float)", int, float)
_signals = _Kind("signal names")  # parse_signals() checks these and names the bad one
_steps = _Kind("a tuple of step numbers (ints)", tuple)

# Each field's expected type, and whether None is allowed (docs/guide.md, "Settings", lists them).
_TYPES: dict[str, tuple[_Kind, bool]] = {
    "directory": (_path, False), "run_id": (_text, True), "adopt": (_flag_kind, False),
    "init_from": (_path, True), "requeue_signals": (_signals, False), "exit_signals": (_signals, False),
    "requeue_on_exit_signals": (_flag_kind, False), "keep_last": (_count, False),
    "save_every_steps": (_count, True), "save_every_seconds": (_seconds, True), "save_every": (_text, True),
    "save_at_end": (_flag_kind, False), "max_requeues": (_count, False), "max_no_progress": (_count, False),
    "grace_seconds": (_seconds, True), "file_mode": (_count, False), "device": (_text, True),
    "on_save_error": (_text, False), "allow_world_size_change": (_flag_kind, False),
    "sync_every_steps": (_count, False), "stripe_min_bytes": (_count, False), "async_save": (_flag_kind, False),
    "lazy_copy": (_flag_kind, False), "lock_timeout": (_seconds, False), "break_lock": (_flag_kind, False),
    "test_hold_at": (_steps, False), "test_control": (_path, True),
    "test_trace": (_flag_kind, False),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_a(value: Any, kind: _Kind) -> bool:
    """``value`` is of ``kind`` (a bool is no number: ``keep_last=True`` is a mistake, not 1)."""
    if isinstance(value, bool) and bool not in kind.types:
        return False
    return isinstance(value, kind.types)


def _type_error(field: str, value: Any, kind: _Kind, optional: bool) -> str:
    """The message for a setting of the wrong type: the setting, what it got, what it takes, where it is set."""
    variable = ENV_VARS.get(field)
    hint = ""
    if isinstance(value, str) and (kind is _count or kind is _seconds):
        hint = f"; convert it where you read it, e.g. {field}={'int' if kind is _count else 'float'}({value!r})"
    elif kind is _text and type(value).__name__ == "device":  # a torch.device
        hint = f"; pass {field}={str(value)!r}"
    return (f"{field}={value!r} (of type {type(value).__name__}): expected {kind.words}"
            f"{' or None' if optional else ''}{hint}" + (f" (or set {variable})" if variable else ""))


def _check_run_id(run_id: str) -> None:
    if not run_id or any(c in run_id for c in "/\\\0") or run_id in (".", ".."):
        raise ConfigError(f"run_id {run_id!r} must be a plain name without '/' or '..'")


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


_ENV_FIELDS: dict[str, tuple[str, Any]] = {
    "JOBWRAP_DIR": ("directory", str),
    "JOBWRAP_RUN_ID": ("run_id", str),
    "JOBWRAP_ADOPT": ("adopt", _flag),
    "JOBWRAP_INIT_FROM": ("init_from", str),
    "JOBWRAP_INIT_EPOCH": ("init_epoch", str),
    "JOBWRAP_REQUEUE_SIGNALS": ("requeue_signals", parse_signals),
    "JOBWRAP_EXIT_SIGNALS": ("exit_signals", parse_signals),
    "JOBWRAP_KEEP": ("keep_last", int),
    "JOBWRAP_SAVE_EVERY_STEPS": ("save_every_steps", int),
    "JOBWRAP_SAVE_EVERY_SECONDS": ("save_every_seconds", float),
    "JOBWRAP_SAVE_EVERY": ("save_every", str),
    "JOBWRAP_MAX_REQUEUES": ("max_requeues", int),
    "JOBWRAP_MAX_NO_PROGRESS": ("max_no_progress", int),
    "JOBWRAP_GRACE_SECONDS": ("grace_seconds", float),
    "JOBWRAP_FILE_MODE": ("file_mode", lambda v: int(v, 8)),
    "JOBWRAP_DEVICE": ("device", str),
    "JOBWRAP_ON_SAVE_ERROR": ("on_save_error", str),
    "JOBWRAP_ALLOW_WORLD_SIZE_CHANGE": ("allow_world_size_change", _flag),
    "JOBWRAP_SYNC_EVERY_STEPS": ("sync_every_steps", int),
    "JOBWRAP_ASYNC_SAVE": ("async_save", _flag),
    "JOBWRAP_STRIPE_MIN_BYTES": ("stripe_min_bytes", int),
    "JOBWRAP_LAZY_COPY": ("lazy_copy", _flag),
    "JOBWRAP_LOCK_TIMEOUT": ("lock_timeout", float),
    "JOBWRAP_BREAK_LOCK": ("break_lock", _flag),
    "JOBWRAP_TEST_HOLD_AT": ("test_hold_at", lambda v: tuple(int(x) for x in v.split(",") if x)),
    "JOBWRAP_TEST_CONTROL": ("test_control", str),
    "JOBWRAP_TEST_TRACE": ("test_trace", _flag),
}


#: Beats even a directory given in code (JOBWRAP_DIR does not): set by ``jobwrap simulate``.
DIR_OVERRIDE = "JOBWRAP_DIR_OVERRIDE"

#: The environment variable of each setting, by :class:`Config` field (docs/guide.md lists them all).
ENV_VARS: dict[str, str] = {field: var for var, (field, _) in _ENV_FIELDS.items()}


def _from_env(environ: Mapping[str, str] | None, fields: Any = None) -> dict[str, Any]:
    """The settings the ``JOBWRAP_*`` variables set (all, or only ``fields``), converted and checked."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for var, (field, convert) in _ENV_FIELDS.items():
        raw = environ.get(var)
        if raw is None or raw == "" or (fields is not None and field not in fields):
            continue
        try:
            values[field] = convert(raw)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{var}={raw!r} is not valid: {exc}") from None
    return values


def load_config(environ: Mapping[str, str] | None = None, **arguments: Any) -> Config:
    """Build a :class:`Config`: an argument beats its ``JOBWRAP_*`` variable, which beats the default."""
    values = _from_env(environ)
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = set(arguments) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
    values.update({k: v for k, v in arguments.items() if v is not None})
    values.setdefault("directory", "")
    override = (os.environ if environ is None else environ).get(DIR_OVERRIDE)
    if override:  # jobwrap simulate points a script whose code names its directory elsewhere
        values["directory"] = override
    return Config(**values)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunSettings:
    """What ``jobwrap run`` itself needs: the signals it forwards and how often it may relaunch."""

    requeue_signals: tuple[signal.Signals, ...]
    exit_signals: tuple[signal.Signals, ...]
    max_requeues: int

    @property
    def forwarded(self) -> tuple[signal.Signals, ...]:
        """Every trapped signal, and INT so that Ctrl-C reaches the training process too."""
        return tuple(dict.fromkeys(self.requeue_signals + self.exit_signals + (signal.SIGINT,)))

    @property
    def cancelling(self) -> tuple[signal.Signals, ...]:
        """Signals that end the job even after training asked to be requeued: the exit signals and INT."""
        return tuple(dict.fromkeys(self.exit_signals + (signal.SIGINT,)))


def load_run_settings(environ: Mapping[str, str] | None = None, **arguments: Any) -> RunSettings:
    """The :class:`RunSettings` with the same precedence as :func:`load_config` (argument > variable > default)."""
    values = {"requeue_signals": DEFAULT_REQUEUE_SIGNALS, "exit_signals": DEFAULT_EXIT_SIGNALS,
              "max_requeues": DEFAULT_MAX_REQUEUES}
    values.update(_from_env(environ, values))
    values.update({k: v for k, v in arguments.items() if v is not None})
    settings = RunSettings(requeue_signals=parse_signals(values["requeue_signals"]),
                           exit_signals=parse_signals(values["exit_signals"]),
                           max_requeues=int(values["max_requeues"]))
    if settings.max_requeues < 0:
        raise ConfigError(f"max_requeues={settings.max_requeues}: use 0 or more")
    return settings
