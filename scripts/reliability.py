#!/usr/bin/env python3
"""jobwrap's reliability and security campaign: inject faults, count what happens, write docs/reliability.md.

Usage (through ``scripts/reliability``, which sets up ``.venv`` first)::

    scripts/reliability            # the full campaign (a few minutes on 2 cores)
    scripts/reliability --quick    # a small version of every section
    scripts/reliability --only kills,bad-files --seed 7 --out /tmp/r.md

Every fault is real where the machine allows it: processes are SIGKILLed at
random moments (torch is imported once here and each trial is an ``os.fork``),
small filesystems are real size-limited tmpfs mounts (root only; skipped with
the reason otherwise), signals are real signals. Where a fault cannot be made
real here (an EIO from the disk) it is injected at the system-call boundary and
the table says so. ``tests/test_reliability.py`` runs the quick sizes of the
same checks under pytest.
"""
from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import platform
import random
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402  (one import, shared by every forked trial)

import torch.distributed  # noqa: E402,F401  (imported here, not once per child)

import jobwrap  # noqa: E402
import jobwrap.session  # noqa: E402,F401
from jobwrap import faults  # noqa: E402
from jobwrap.errors import ConfigError, CorruptCheckpointError, StorageError  # noqa: E402
from jobwrap.events import read_events  # noqa: E402
from jobwrap.store import FORMAT_VERSION, CheckpointStore, checksum_of  # noqa: E402

log = logging.getLogger("jobwrap")

QUICK = {"kills": 40, "bitflips": 12, "truncations": 8, "storms": 3, "grace": 6, "policy": 40}
FULL = {"kills": 400, "bitflips": 200, "truncations": 60, "storms": 12, "grace": 30, "policy": 400}


# ================================================================ results

@dataclasses.dataclass
class Row:
    """One line of the results table: a fault, how often it was tried, and what was seen."""

    area: str
    fault: str
    runs: int
    expected: str
    observed: str
    failures: int = 0
    skipped: str = ""

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        return "ok" if self.failures == 0 else f"FAIL ({self.failures})"


class Campaign:
    """Collects rows and the kill figures; one per run of the script (or per test)."""

    def __init__(self, seed: int, sizes: dict[str, int], workdir: str) -> None:
        self.seed = seed
        self.sizes = sizes
        self.workdir = workdir
        self.rows: list[Row] = []
        self.kills: KillFigures | None = None
        self.notes: list[str] = []

    def add(self, row: Row) -> Row:
        # The report describes the machine without paths: keep only file names.
        row.observed = names_only(row.observed)
        self.rows.append(row)
        mark = row.status
        print(f"  [{mark}] {row.area}: {row.fault} x{row.runs}: {row.observed}", flush=True)
        return row

    def scratch(self, name: str) -> str:
        return tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.rows if not r.skipped)


# ================================================================ a tiny model whose content names its step

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


def payload_matches(payload: Any, step: int, numel: int) -> bool:
    """Whether a loaded checkpoint holds exactly what the run saved at ``step``."""
    try:
        return (int(payload["step"]) == step and payload.get("tag") == step
                and torch.equal(payload["model"]["w"], Weights.expected(step, numel)))
    except (KeyError, TypeError, AttributeError):
        return False


def train_to(directory: str, steps: list[int], *, run_id: str | None = "mine", numel: int = 4096,
             **settings: Any) -> None:
    """A real Session that commits a checkpoint at each of ``steps`` (synchronous saves)."""
    settings = {"keep_last": 50, "save_at_end": False, "async_save": False, **settings}
    job = jobwrap.Session(directory, environ={}, run_id=run_id, **_known(settings))
    weights = Weights(numel)
    with capture_logs(), job:
        job.track(model=weights, tag=-1)
        while job.step < max(steps):
            weights.fill(job.step + 1)
            job["tag"] = job.step + 1
            job.step_done()
            if job.step in steps:
                job.save()


def _known(settings: dict[str, Any]) -> dict[str, Any]:
    """Drop settings this jobwrap does not have (the campaign runs against older checkouts too)."""
    from jobwrap.config import Config

    fields = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in settings.items() if k in fields}


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
            job = jobwrap.Session(directory, environ={}, run_id=run_id,
                                  **_known({"save_at_end": False, "async_save": False, **settings}))
            weights = Weights(numel)
            with job:
                job.track(model=weights, tag=-1)
                step = job.resumed_from.step if job.resumed_from is not None else None
                ok = step is None or (weights.matches(step) and job["tag"] == step)
        except Exception as exc:  # noqa: BLE001 - reported, the caller decides
            return Resumed(None, False, _warnings(records), f"{type(exc).__name__}: {exc}")
    return Resumed(step, ok, _warnings(records))


def names_only(text: str) -> str:
    """``text`` with every absolute path cut down to its file name (the report names no machine paths)."""
    return re.sub(r"(?<![\w.])/(?:[^\s/:;,'\"()\[\]]+/)+", "", text)


def _short(text: str, limit: int = 150) -> str:
    text = names_only(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _warnings(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


@contextlib.contextmanager
def capture_logs() -> Iterator[list[logging.LogRecord]]:
    """The jobwrap logger's records while the block runs (and nothing printed)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    saved = (log.handlers[:], log.level, log.propagate)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield records
    finally:
        log.handlers[:], level, log.propagate = saved[0], saved[1], saved[2]
        log.setLevel(level)


# ================================================================ forked trials

@dataclasses.dataclass
class Trial:
    """What a forked child reported through its pipe, and how it ended."""

    messages: list[tuple[float, list[str]]]
    status: int
    killed: bool          # SIGKILLed by the parent
    hung: bool
    seconds: float

    @property
    def code(self) -> int:
        """The exit code, or minus the signal that ended the child."""
        return os.waitstatus_to_exitcode(self.status)

    def find(self, word: str) -> list[list[str]]:
        return [m[1:] for _, m in self.messages if m and m[0] == word]

    def first_time(self, word: str) -> float | None:
        return next((t for t, m in self.messages if m and m[0] == word), None)


Report = Callable[..., None]


def _reporter(fd: int) -> Report:
    def report(*words: object) -> None:
        line = " ".join(str(w).replace("\n", " ").replace(" ", "\u00a0") if i else str(w)
                        for i, w in enumerate(words))
        try:
            os.write(fd, (line[:3500] + "\n").encode())
        except OSError:
            pass
    return report


class _PipeLog(logging.Handler):
    """A child's jobwrap log lines, sent to the parent (warnings and errors)."""

    def __init__(self, report: Report) -> None:
        super().__init__(logging.WARNING)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        self.report("log", record.levelname, record.getMessage())


def fork_trial(body: Callable[[Report], None], *, kill_after: float | None = None, timeout: float = 60.0,
               on_message: Callable[[list[str], int], float | None] | None = None,
               while_running: Callable[[int], None] | None = None) -> Trial:
    """Run ``body`` in a forked child; SIGKILL it after ``kill_after`` seconds (or ``timeout``).

    The child reports through a pipe (``report(word, ...)``); each message
    carries the parent's clock when read. ``on_message(words, pid)`` lets the
    parent act on a message (send a signal when a phase starts); when it
    returns a number, the child is SIGKILLed that many seconds later;
    ``while_running(pid)`` is called between reads.
    """
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # ------------------------------------------------ child
        os.close(read_fd)
        report = _reporter(write_fd)
        code = 0
        try:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            log.handlers[:] = [_PipeLog(report)]
            log.setLevel(logging.INFO)
            log.propagate = False
            body(report)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            report("end", code, type(exc).__name__, getattr(exc, "reason", ""))
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
            report("error", f"{type(exc).__name__}: {exc}")
            code = 3
        finally:
            os._exit(code)
    # ---------------------------------------------------------------- parent
    os.close(write_fd)
    messages: list[tuple[float, list[str]]] = []
    buffer = b""
    killed = hung = False
    kill_at = started + kill_after if kill_after is not None else None
    hard = started + timeout
    try:
        while True:
            now = time.monotonic()
            if kill_at is not None and not killed and now >= kill_at:
                os.kill(pid, signal.SIGKILL)
                killed = True
            if now >= hard and not killed:
                os.kill(pid, signal.SIGKILL)
                killed = hung = True
            wake = hard if (kill_at is None or killed) else min(kill_at, hard)
            wait = max(0.0, wake - now)
            if while_running is not None:
                wait = min(wait, 0.0005)
            ready, _, _ = select.select([read_fd], [], [], wait if not (killed and hung) else 5.0)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                stamp = time.monotonic() - started
                for line in lines:
                    words = [w.replace("\u00a0", " ") for w in line.decode(errors="replace").split(" ")]
                    messages.append((stamp, words))
                    if on_message is not None and not killed:
                        later = on_message(words, pid)
                        if later is not None:
                            kill_at = min(kill_at or hard, time.monotonic() + later)
            elif killed and hung:
                break
            if while_running is not None and not killed:
                while_running(pid)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    return Trial(messages, status, killed and not hung, hung, time.monotonic() - started)


def _wait_for_trapped_signal(limit: float = 10.0) -> None:
    """Block (bounded) until the session's trap has recorded a signal: the one the parent sends now."""
    trap = getattr(signal.getsignal(signal.SIGUSR1), "__self__", None)
    deadline = time.monotonic() + limit
    while trap is not None and not getattr(trap, "received", True) and time.monotonic() < deadline:
        time.sleep(0.001)


def _instrument(report: Report, crash: tuple[str, int] | None = None, hold: str | None = None) -> None:
    """In a child: report entry and exit of each store phase, and every crash point; arm one crash.

    With ``hold``, the first run of that phase waits (after reporting its entry)
    until the parent's signal has arrived, so the signal lands inside it for sure.
    """
    from jobwrap import events, store

    held = [False]

    def wrap(owner: type, name: str, phase: str, commit: bool = False) -> None:
        original = owner.__dict__.get(name)
        if original is None:
            return

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            report("enter", phase)
            if phase == hold and not held[0]:
                held[0] = True
                _wait_for_trapped_signal()
            result = original(*args, **kwargs)
            if commit and result is not None:
                report("commit", result.step)
            report("leave", phase)
            return result
        setattr(owner, name, wrapper)

    wrap(store.CheckpointStore, "prepare", "prepare")
    wrap(store.CheckpointStore, "claim", "claim")
    wrap(store.CheckpointStore, "newest_loadable", "resume")
    wrap(store.CheckpointStore, "save", "save", commit=True)
    wrap(store.CheckpointStore, "retain", "retention")
    wrap(store.CheckpointStore, "quarantine", "quarantine")
    wrap(events.EventLog, "append", "events")
    target, nth = crash or ("", 0)
    hits: collections.Counter[str] = collections.Counter()

    def point(name: str) -> None:
        if not name:
            return
        hits[name] += 1
        report("point", name)
        if name == target and hits[name] == nth:
            report("crash", name)
            os.kill(os.getpid(), signal.SIGKILL)

    original = faults.crash_point
    for module in list(sys.modules.values()):
        if getattr(module, "crash_point", None) is original:
            module.crash_point = point  # type: ignore[attr-defined]


def phase_at_end(trial: Trial) -> str:
    """Where the child was when it died: the innermost open store phase, and the last crash point in it."""
    stack: list[str] = []
    last_point = ""
    for _, words in trial.messages:
        if not words:
            continue
        if words[0] == "enter":
            stack.append(words[1])
            if words[1] == "save":
                last_point = ""
        elif words[0] == "leave" and words[1] in stack:
            stack.reverse()
            stack.remove(words[1])
            stack.reverse()
        elif words[0] == "point":
            last_point = words[1]
        elif words[0] in ("done", "end"):
            return "finished"
    if not stack:
        if trial.find("resumed"):
            return "between store phases (training step)"
        if trial.find("enter"):
            return "resume: restoring the loaded state into the objects"
        return "process start, before the directory is opened"
    phase = stack[-1]
    if phase == "save":
        return f"save (after {last_point})" if last_point else "save (writing data)"
    return {"prepare": "resume: cleaning what a killed save left", "claim": "resume: claiming the directory",
            "resume": "resume: reading and verifying the checkpoint",
            "quarantine": "resume: setting aside a corrupt checkpoint", "retention": "retention (deleting old)",
            "events": "appending to events.jsonl"}.get(phase, phase)


# ================================================================ 1. kills at random

@dataclasses.dataclass
class KillFigures:
    runs: int = 0
    killed: int = 0
    finished_first: int = 0
    crash_points: int = 0
    corrupt_loads: int = 0
    corrupt_committed: int = 0
    lost: int = 0
    resume_mismatch: int = 0
    child_errors: int = 0
    hung: int = 0
    leftovers: int = 0
    reported_commits: int = 0
    quarantined_on_purpose: int = 0
    torn_event_lines: int = 0
    phases: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def failures(self) -> int:
        return (self.corrupt_loads + self.corrupt_committed + self.lost + self.resume_mismatch
                + self.child_errors + self.hung + self.leftovers)


def _kill_child(directory: str, *, keep_last: int, steps: int, numel: int, async_save: bool,
                crash: tuple[str, int] | None) -> Callable[[Report], None]:
    def body(report: Report) -> None:
        torch.set_num_threads(1)
        _instrument(report, crash)
        job = jobwrap.Session(directory, environ={}, **_known(dict(
            keep_last=keep_last, save_every_steps=1, save_at_end=False, async_save=async_save)))
        weights = Weights(numel)
        with job:
            job.track(model=weights, tag=-1)
            resumed = job.resumed_from.step if job.resumed_from is not None else -1
            report("resumed", resumed)
            if job.resumed_from is not None:
                report("content", "ok" if weights.matches(resumed) and job["tag"] == resumed else "bad")
            target = job.step + steps
            while job.step < target:
                time.sleep(0.003)  # the step's compute, which a background save overlaps
                weights.fill(job.step + 1)
                job["tag"] = job.step + 1
                job.step_done()
        report("done")
    return body


def audit(directory: str, *, numel: int, keep_last: int, must_survive: set[int],
          damaged: set[int]) -> tuple[int | None, list[str], list[int]]:
    """What a resume would pick, checked without changing the directory; the problems found.

    A checkpoint that committed must verify; the newest verifying one must load
    with exactly the content saved at its step; every reported commit must
    still be there unless at least ``keep_last`` newer good ones replaced it.
    """
    problems: list[str] = []
    store = CheckpointStore(directory)
    good: list[int] = []
    for checkpoint in store.committed():
        try:
            store.verify(checkpoint)
            good.append(checkpoint.step)
        except CorruptCheckpointError as exc:
            if checkpoint.step not in damaged:
                problems.append(f"corrupt-committed: {exc}")
    pick = max(good) if good else None
    if pick is not None:
        try:
            payload = torch.load(os.path.join(directory, f"step-{pick:012d}.pt"), weights_only=True)
            if not payload_matches(payload, pick, numel):
                problems.append(f"corrupt-load: step {pick} verified but holds other content")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"corrupt-load: step {pick} verified but does not load: {exc}")
    for step in sorted(must_survive):
        if step not in good and sum(1 for g in good if g > step) < keep_last:
            problems.append(f"lost: step {step} was committed and is gone (good now: {sorted(good)})")
    return pick, problems, good


def kill_campaign(runs: int, *, seed: int, workdir: str, group: int = 10,
                  numel: int = 1 << 18, steps: int = 12, verbose: bool = False) -> KillFigures:
    """``runs`` trials, each a forked training process SIGKILLed at a random moment or crash point.

    Trials run in groups of ``group`` on one directory, so each starts by
    resuming whatever the previous kill left. After each: :func:`audit`; the
    next trial's own resume must pick the same checkpoint; at the end of each
    group a clean resume must find no leftovers.
    """
    rng = random.Random(seed)
    figures = KillFigures()
    points = [p for p in faults.POINTS if p]
    # Calibrate: how long a resume and a whole trial take on this machine.
    probe = tempfile.mkdtemp(prefix="calibrate-", dir=workdir)
    t_total = {False: 0.0, True: 0.0}
    durations: dict[str, list[float]] = collections.defaultdict(list)
    for async_save in (False, True, False, True):
        trial = fork_trial(_kill_child(probe, keep_last=2, steps=steps, numel=numel, async_save=async_save,
                                       crash=None))
        t_total[async_save] = max(t_total[async_save], trial.seconds)
        opened: dict[str, float] = {}
        for stamp, words in trial.messages:
            if words[0] == "enter":
                opened[words[1]] = stamp
            elif words[0] == "leave" and words[1] in opened:
                durations[words[1]].append(stamp - opened.pop(words[1]))
    phase_seconds = {p: max(0.0005, max(d)) for p, d in durations.items()}
    shutil.rmtree(probe, ignore_errors=True)

    def aim(phase: str, nth: int) -> Callable[[list[str], int], float | None]:
        """Kill at a random moment inside the ``nth`` run of ``phase``."""
        seen = [0]

        def on_message(words: list[str], pid: int) -> float | None:
            if words[:2] == ["enter", phase]:
                seen[0] += 1
                if seen[0] == nth:
                    return rng.uniform(0.0, 1.2 * phase_seconds.get(phase, 0.005))
            return None
        return on_message

    trial_index = 0
    while trial_index < runs:
        directory = tempfile.mkdtemp(prefix="kills-", dir=workdir)
        keep_last = rng.choice([1, 2, 3])
        async_save = rng.random() < 0.5
        must_survive: set[int] = set()
        damaged: set[int] = set()
        expected_pick: int | None = None
        for _ in range(min(group, runs - trial_index)):
            trial_index += 1
            figures.runs += 1
            if expected_pick is not None and rng.random() < 0.08:
                # The newest checkpoint rots on disk: the resume must set it aside (and may be killed doing so).
                _flip_bit(os.path.join(directory, f"step-{expected_pick:012d}.pt"), rng)
                damaged.add(expected_pick)
                figures.quarantined_on_purpose += 1
                expected_pick, _, good = audit(directory, numel=numel, keep_last=keep_last, must_survive=set(),
                                               damaged=damaged)
                must_survive = set(good)  # what retention removed earlier was replaced by what just rotted
            crash = None
            aimed = None
            # The child trains on until killed; a crash point or aimed phase not reached in time (a
            # loaded machine) falls back to a kill at a random moment of the next run of that length.
            delay = rng.uniform(0.0, 0.9 * t_total[async_save])
            draw = rng.random()
            if draw < 0.4:
                crash = (rng.choice(points), rng.randint(1, 3))
                delay += 2 * t_total[async_save]
            elif draw < 0.75:
                phase = rng.choice(["resume", "save", "save", "retention", "events"])
                aimed = aim(phase, 1 if phase == "resume" else rng.randint(1, 3))
                delay += 2 * t_total[async_save]
            trial = fork_trial(_kill_child(directory, keep_last=keep_last, steps=1_000_000, numel=numel,
                                           async_save=async_save, crash=crash),
                               kill_after=delay, on_message=aimed, timeout=max(30.0, 20 * t_total[True]))
            phase = phase_at_end(trial)
            crashed = bool(trial.find("crash"))
            if trial.hung:
                figures.hung += 1
                figures.problems.append(f"trial {trial_index}: hung in {phase}")
            elif trial.code == -signal.SIGKILL:
                figures.killed += 1
                figures.crash_points += crashed
                how = "crash point" if crashed else ("aimed" if aimed and trial.seconds < delay else "delay")
                figures.phases[(phase, how)] += 1
            else:
                figures.finished_first += 1
                figures.phases[("finished before the kill", "delay" if delay is not None else
                                "aimed" if aimed else "crash point")] += 1
            for words in trial.find("error"):
                figures.child_errors += 1
                figures.problems.append(f"trial {trial_index}: child error {' '.join(words)}")
            for words in trial.find("log"):
                text = " ".join(words)
                if "corrupt" in text and not any(f"step-{d:012d}" in text for d in damaged):
                    figures.corrupt_loads += 1
                    figures.problems.append(f"trial {trial_index}: child saw {text}")
            if trial.find("content") and trial.find("content")[0] != ["ok"]:
                figures.corrupt_loads += 1
                figures.problems.append(f"trial {trial_index}: resumed state differs from the checkpoint")
            resumed = trial.find("resumed")
            if resumed:
                got = int(resumed[0][0])
                if got != (expected_pick if expected_pick is not None else -1):
                    figures.resume_mismatch += 1
                    figures.problems.append(f"trial {trial_index}: resumed {got}, audit expected {expected_pick}")
            commits = {int(words[0]) for words in trial.find("commit")}
            figures.reported_commits += len(commits)
            must_survive |= commits
            expected_pick, problems, _ = audit(directory, numel=numel, keep_last=keep_last,
                                            must_survive=must_survive, damaged=damaged)
            for problem in problems:
                kind = problem.split(":")[0]
                if kind == "lost":
                    figures.lost += 1
                elif kind == "corrupt-load":
                    figures.corrupt_loads += 1
                else:
                    figures.corrupt_committed += 1
                figures.problems.append(f"trial {trial_index} ({phase}): {problem}")
            if verbose:
                print(f"    trial {trial_index}: {phase}, commits {sorted(commits)}, pick {expected_pick}")
        # A clean resume at the end of the group: same pick, nothing left over.
        final = fork_trial(_kill_child(directory, keep_last=keep_last, steps=0, numel=numel,
                                       async_save=async_save, crash=None), timeout=max(30.0, 20 * t_total[True]))
        got = final.find("resumed")
        if not got or int(got[0][0]) != (expected_pick if expected_pick is not None else -1):
            figures.resume_mismatch += 1
            figures.problems.append(f"group end: resumed {got}, audit expected {expected_pick}")
        junk = [n for n in os.listdir(directory)
                if n.startswith(".tmp-") or (n.endswith(".pt") and not os.path.exists(
                    os.path.join(directory, n[:-3] + ".json")))]
        if junk:
            figures.leftovers += len(junk)
            figures.problems.append(f"group end: leftovers after a clean start: {junk}")
        torn = _torn_event_lines(directory)
        if torn:
            figures.torn_event_lines += torn
        shutil.rmtree(directory, ignore_errors=True)
    return figures


def _torn_event_lines(directory: str) -> int:
    try:
        with open(os.path.join(directory, "events.jsonl"), "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    bad = 0
    for line in lines:
        if line.strip():
            try:
                json.loads(line)
            except ValueError:
                bad += 1
    return bad


def _flip_bit(path: str, rng: random.Random, offset: int | None = None) -> int:
    size = os.path.getsize(path)
    offset = rng.randrange(size) if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return offset


def section_kills(c: Campaign) -> None:
    print(f"kills: {c.sizes['kills']} forked trials, SIGKILLed at random moments and crash points", flush=True)
    figures = kill_campaign(c.sizes["kills"], seed=c.seed, workdir=c.workdir)
    c.kills = figures
    c.add(Row("kills", "SIGKILL at a random moment or crash point of resume, save, commit, retention",
              figures.runs,
              "resume picks the newest committed checkpoint; 0 corrupt loads; 0 committed checkpoints lost",
              f"{figures.killed} killed ({figures.crash_points} at crash points), {figures.finished_first} finished "
              f"first; {figures.reported_commits} commits reported; corrupt loads {figures.corrupt_loads}, "
              f"corrupt committed {figures.corrupt_committed}, lost {figures.lost}, resume mismatches "
              f"{figures.resume_mismatch}, leftovers {figures.leftovers}, child errors {figures.child_errors}, "
              f"hung {figures.hung}", figures.failures))
    for (phase, how), count in sorted(figures.phases.items(), key=lambda kv: -kv[1]):
        print(f"    {count:4d}  {how}: {phase}")
    for problem in figures.problems[:20]:
        print("    " + problem)


# ================================================================ 2. disk faults

class Skip(Exception):
    """This fault cannot be made real on this machine; the message says why."""


def _run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


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
        if _run("umount", point).returncode != 0:
            _run("umount", "-l", point)
        with contextlib.suppress(OSError):
            os.rmdir(point)


def remount(point: str, mode: str) -> None:
    result = _run("mount", "-o", f"remount,{mode}", point)
    if result.returncode != 0:
        raise Skip(f"mount -o remount,{mode} refused: {result.stderr.strip()}")


def _fill(directory: str, leave_bytes: int = 0) -> None:
    """Fill the filesystem of ``directory`` until only ``leave_bytes`` (rounded to blocks) are free."""
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize - leave_bytes
    with open(os.path.join(directory, "filler"), "wb") as f:
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            while free > 0:
                free -= f.write(chunk[:min(len(chunk), free)])


def _intact(directory: str, step: int, numel: int = 4096) -> bool:
    """The checkpoint of ``step`` verifies and loads with the content saved at that step."""
    store = CheckpointStore(directory)
    for checkpoint in store.committed():
        if checkpoint.step == step:
            try:
                store.verify(checkpoint)
                return payload_matches(torch.load(checkpoint.path, weights_only=True), step, numel)
            except Exception:  # noqa: BLE001
                return False
    return False


def _temporaries(directory: str) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if n.startswith(".tmp-")]
    except OSError:
        return []


def _payload(step: int, numel: int) -> dict[str, Any]:
    return {"model": {"w": Weights.expected(step, numel)}, "step": step, "epoch": 0, "tag": step,
            "jobwrap": {"format": FORMAT_VERSION}}


def check_enospc_save(base: str) -> tuple[bool, str]:
    """A save larger than the space left: StorageError naming the full disk; previous intact; no temporaries."""
    with tmpfs(base, "3m") as point:
        directory = os.path.join(point, "ck")
        store = CheckpointStore(directory)
        store.prepare()
        numel = 300_000  # 1.2 MB per checkpoint: two fit, the third does not
        for step in (1, 2):
            store.save(_payload(step, numel), step=step, epoch=0, meta={"run_id": "mine"})
        try:
            store.save(_payload(3, numel), step=3, epoch=0, meta={"run_id": "mine"})
            return False, "the save that cannot fit succeeded"
        except StorageError as exc:
            message = str(exc)
            problems = []
            if exc.errno != errno.ENOSPC:
                problems.append(f"errno {exc.errno}")
            if "disk is full" not in message or "step 2" not in message or "intact" not in message:
                problems.append(f"message lacks cause/fix/previous: {message}")
            if not _intact(directory, 2, numel):
                problems.append("step 2 damaged")
            if _temporaries(directory) or os.path.exists(os.path.join(directory, "step-000000000003.pt")):
                problems.append(f"left files {os.listdir(directory)}")
            return not problems, "; ".join(problems) or _short(f"StorageError: {message}", 200)


def check_enospc_manifest(base: str) -> tuple[bool, str]:
    """The data fits but its manifest does not: nothing committed, data removed, previous intact."""
    numel = 100_000
    sizer = tempfile.mkdtemp(dir=base)
    probe = CheckpointStore(sizer)
    probe.prepare()
    data_size = probe.save(_payload(2, numel), step=2, epoch=0, meta={"run_id": "mine"}).size
    shutil.rmtree(sizer)
    with tmpfs(base, "4m") as point:
        directory = os.path.join(point, "ck")
        store = CheckpointStore(directory)
        store.prepare()
        store.save(_payload(1, numel), step=1, epoch=0, meta={"run_id": "mine"})
        page = os.statvfs(directory).f_frsize
        _fill(directory, leave_bytes=-(-data_size // page) * page)
        try:
            store.save(_payload(2, numel), step=2, epoch=0, meta={"run_id": "mine"})
            return False, "save committed on a full disk"
        except StorageError as exc:
            names = sorted(os.listdir(directory))
            problems = []
            if exc.errno != errno.ENOSPC:
                problems.append(f"errno {exc.errno}")
            if any(n.startswith("step-000000000002") for n in names) or _temporaries(directory):
                problems.append(f"left {names}")
            if not _intact(directory, 1, numel):
                problems.append("step 1 damaged")
            return not problems, "; ".join(problems) or "StorageError (ENOSPC), step 2 not committed, step 1 intact"


def check_on_save_error(base: str, mode: str) -> tuple[bool, str]:
    """A periodic save on a full disk: 'raise' stops training with StorageError; 'continue' logs and trains on."""
    with tmpfs(base, "2m") as point:
        directory = os.path.join(point, "ck")
        numel = 120_000  # ~0.5 MB: a few saves fit, then the disk is full
        reached = 0
        error = ""
        with capture_logs() as records:
            try:
                job = jobwrap.Session(directory, environ={}, run_id="mine", **_known(dict(
                    save_every_steps=1, keep_last=50, save_at_end=False, on_save_error=mode, async_save=False)))
                weights = Weights(numel)
                with job:
                    job.track(model=weights, tag=-1)
                    for _ in range(8):
                        weights.fill(job.step + 1)
                        job["tag"] = job.step + 1
                        job.step_done()
                        reached = job.step
            except StorageError as exc:
                error = str(exc)
        newest = max((c.step for c in CheckpointStore(directory).committed()), default=None)
        logged = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        intact = newest is not None and _intact(directory, newest, numel)
        if mode == "raise":
            ok = bool(error) and "disk is full" in error and reached < 8 and intact
            return ok, (f"stopped at step {reached + 1} with StorageError ('disk is full ... step {newest} is "
                        f"intact'); newest committed step {newest} intact" if ok else
                        f"error={error!r} reached={reached} intact={intact}")
        ok = not error and reached == 8 and intact and any("on_save_error=continue" in m for m in logged)
        return ok, (f"trained on to step 8; {len(logged)} failed saves logged as errors; newest committed step "
                    f"{newest} intact" if ok else f"error={error!r} reached={reached} logged={logged[:1]}")


def check_full_disk_first_start(base: str) -> tuple[bool, str]:
    """A brand-new run on a full disk: a StorageError naming the full disk (not a bare OSError)."""
    with tmpfs(base, "1m") as point:
        directory = os.path.join(point, "ck")
        os.makedirs(directory)
        _fill(point)
        try:
            with jobwrap.Session(directory, environ={}, run_id="mine", save_at_end=False):
                pass
            return False, "started on a full disk without an error"
        except StorageError as exc:
            ok = "disk is full" in str(exc)
            return ok, _short(f"StorageError: {exc}") if ok else f"unclear: {exc}"
        except OSError as exc:
            return False, f"bare {type(exc).__name__}: {exc}"


def check_readonly_during_run(base: str) -> tuple[bool, str]:
    """The filesystem turns read-only mid-run: the save raises StorageError (read-only), the previous survives."""
    with tmpfs(base, "8m") as point:
        directory = os.path.join(point, "ck")
        store = CheckpointStore(directory)
        store.prepare()
        store.save(_payload(1, 4096), step=1, epoch=0, meta={"run_id": "mine"})
        remount(point, "ro")
        try:
            store.save(_payload(2, 4096), step=2, epoch=0, meta={"run_id": "mine"})
            return False, "saved on a read-only filesystem"
        except StorageError as exc:
            ok = exc.errno == errno.EROFS and "read-only" in str(exc) and _intact(directory, 1)
            return ok, ("StorageError (EROFS) naming the read-only filesystem; step 1 intact" if ok
                        else f"unclear or damaged: {exc}")
        except OSError as exc:
            return False, f"bare {type(exc).__name__}: {exc}"
        finally:
            remount(point, "rw")


def check_readonly_at_start(base: str) -> tuple[bool, str]:
    """Resuming in a read-only directory: a clear StorageError at start, before any training."""
    with tmpfs(base, "8m") as point:
        directory = os.path.join(point, "ck")
        train_to(directory, [1, 2])
        remount(point, "ro")
        try:
            outcome = resume(directory)
            ok = "StorageError" in outcome.error and "read-only" in outcome.error
            return ok, (_short(f"at start: {outcome.error}") if ok else f"got {outcome}")
        finally:
            remount(point, "rw")


def check_directory_removed(base: str) -> tuple[bool, str]:
    """The checkpoint directory is deleted during a run: the save raises StorageError naming it."""
    directory = os.path.join(tempfile.mkdtemp(dir=base), "ck")
    with capture_logs():
        job = jobwrap.Session(directory, environ={}, run_id="mine", **_known(dict(save_at_end=False,
                                                                                   async_save=False)))
        weights = Weights(4096)
        try:
            with job:
                job.track(model=weights, tag=-1)
                weights.fill(1)
                job["tag"] = 1
                job.step_done()
                job.save()
                shutil.rmtree(directory)
                weights.fill(2)
                job["tag"] = 2
                job.step_done()
                job.save()
            return False, "saved into a removed directory"
        except StorageError as exc:
            ok = exc.errno == errno.ENOENT and "disappeared" in str(exc)
            return ok, ("StorageError (ENOENT): 'the checkpoint directory disappeared: recreate it or choose "
                        "another'" if ok else f"unclear: {exc}")
        except OSError as exc:
            return False, f"bare {type(exc).__name__}: {exc}"


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


def check_eio(base: str, nth_fsync: int) -> tuple[bool, str]:
    """EIO from the ``nth_fsync``-th fsync of a save: no commit, previous intact, a retry commits a real checkpoint."""
    directory = tempfile.mkdtemp(dir=base)
    store = CheckpointStore(directory)
    store.prepare()
    store.save(_payload(1, 4096), step=1, epoch=0, meta={"run_id": "mine"})
    try:
        with failing_syscall("fsync", nth_fsync):
            store.save(_payload(2, 4096), step=2, epoch=0, meta={"run_id": "mine"})
        return False, "fsync failure not reported"
    except StorageError as exc:
        problems = []
        if exc.errno != errno.EIO or "I/O error" not in str(exc):
            problems.append(f"unclear: {exc}")
        if not _intact(directory, 1):
            problems.append("step 1 damaged")
        leftover = [n for n in os.listdir(directory) if n.startswith(("step-000000000002", ".tmp-"))]
        if leftover:
            problems.append(f"left {leftover}")
        retry = store.save(_payload(2, 4096), step=2, epoch=0, meta={"run_id": "mine"})
        if not _intact(directory, 2) or not os.path.exists(retry.path):
            problems.append("the retry of the same step did not commit a real checkpoint")
        return not problems, "; ".join(problems) or "StorageError (EIO); step 1 intact; the retry committed step 2"
    except OSError as exc:
        return False, f"bare {type(exc).__name__}: {exc}"


def check_retention_cannot_delete(base: str) -> tuple[bool, str]:
    """The new checkpoint commits, then retention's unlink fails (EIO): the save still counts, training goes on."""
    directory = os.path.join(tempfile.mkdtemp(dir=base), "ck")
    with capture_logs() as records:
        job = jobwrap.Session(directory, environ={}, run_id="mine", **_known(dict(
            keep_last=1, save_at_end=False, async_save=False)))
        weights = Weights(4096)
        try:
            with job:
                job.track(model=weights, tag=-1)
                for step in (1, 2, 3):
                    weights.fill(step)
                    job["tag"] = step
                    job.step_done()
                    if step == 2:
                        with failing_syscall("unlink", 1):
                            checkpoint = job.save()
                    else:
                        job.save()
        except OSError as exc:
            return False, f"the committed save raised {type(exc).__name__}: {exc}"
    warned = [r.getMessage() for r in records if "retention" in r.getMessage()]
    ok = checkpoint.step == 2 and _intact(directory, 3) and bool(warned)
    return ok, ("save of step 2 returned its checkpoint; one warning; the next save's retention caught up"
                if ok else f"warned={warned}")


def check_loop_device_write_error(base: str) -> tuple[bool, str]:
    """Real deferred write errors: ext4 on a loop device whose backing tmpfs fills up (write ok, fsync fails)."""
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
                directory = os.path.join(mnt, "ck")
                store = CheckpointStore(directory)
                store.prepare()
                store.save(_payload(1, 4096), step=1, epoch=0, meta={"run_id": "mine"})
                numel = 8 << 20  # 32 MB: more than the backing store has left
                try:
                    store.save(_payload(2, numel), step=2, epoch=0, meta={"run_id": "mine"})
                    return False, "a write the device could not store was committed"
                except StorageError as exc:
                    what = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    ok = _intact(directory, 1) and not any(
                        n.startswith("step-000000000002") for n in os.listdir(directory))
                    return ok, (f"fsync failed with {what} (the kernel logged block I/O errors); StorageError; "
                                f"step 1 intact, step 2 not committed" if ok else f"damaged: {exc}")
            finally:
                if _run("umount", mnt).returncode != 0:
                    _run("umount", "-l", mnt)
        finally:
            _run("losetup", "-d", loop)
            with contextlib.suppress(OSError):
                os.rmdir(mnt)


def section_disk(c: Campaign) -> None:
    print("disk faults", flush=True)
    base = c.workdir
    cases: list[tuple[str, str, Callable[[], tuple[bool, str]], str]] = [
        ("ENOSPC: a save larger than the space left (tmpfs size=3m)", "StorageError names the full disk and "
         "the fix; previous intact; no temporary left", lambda: check_enospc_save(base), ""),
        ("ENOSPC: the data fits, its manifest does not", "nothing committed; data removed; previous intact",
         lambda: check_enospc_manifest(base), ""),
        ("ENOSPC on a periodic save, on_save_error='raise'", "training stops with StorageError",
         lambda: check_on_save_error(base, "raise"), ""),
        ("ENOSPC on a periodic save, on_save_error='continue'", "error logged, training continues",
         lambda: check_on_save_error(base, "continue"), ""),
        ("full disk at the first start of a run", "StorageError naming the full disk",
         lambda: check_full_disk_first_start(base), ""),
        ("filesystem remounted read-only during the run", "StorageError (read-only); previous intact",
         lambda: check_readonly_during_run(base), ""),
        ("resume in a read-only directory", "clear StorageError at start",
         lambda: check_readonly_at_start(base), ""),
        ("checkpoint directory removed during the run", "StorageError naming the missing directory",
         lambda: check_directory_removed(base), ""),
        ("EIO from fsync of the data (injected at the syscall)", "StorageError; previous intact; retry commits",
         lambda: check_eio(base, 1), "simulated: os.fsync raises EIO"),
        ("EIO from fsync of the manifest (injected)", "StorageError; previous intact; retry commits",
         lambda: check_eio(base, 2), "simulated: os.fsync raises EIO"),
        ("EIO from fsync of the directory after the manifest rename (injected)",
         "StorageError; nothing half-committed; retry commits", lambda: check_eio(base, 3),
         "simulated: os.fsync raises EIO"),
        ("retention cannot delete an old checkpoint (unlink fails with EIO, injected)",
         "the committed save stands; a warning; training continues", lambda: check_retention_cannot_delete(base),
         "simulated: os.unlink raises EIO"),
        ("block device write errors: ext4 on a loop device over a full tmpfs", "fsync error -> StorageError; "
         "previous intact", lambda: check_loop_device_write_error(base), ""),
    ]
    for fault, expected, check, note in cases:
        try:
            ok, observed = check()
            c.add(Row("disk", fault + (f" [{note}]" if note else ""), 1, expected, observed, 0 if ok else 1))
        except Skip as skip:
            c.add(Row("disk", fault, 0, expected, "", skipped=str(skip)))
    c.add(Row("disk", "EIO from a failing disk (device-mapper 'error' target)", 0, "StorageError", "",
              skipped=_dm_reason()))


def _dm_reason() -> str:
    if shutil.which("dmsetup") is None:
        return "no dmsetup on this machine"
    result = _run("dmsetup", "version")
    if result.returncode != 0:
        return "device-mapper is not available in this kernel/container (dmsetup version: " + \
            (result.stderr.strip().splitlines() or ["failed"])[0] + "); EIO is injected at the syscall instead"
    return "device-mapper present but not used: the syscall injection and the loop device cover the path"


# ================================================================ 3. bad files

def _base_run(workdir: str) -> str:
    directory = tempfile.mkdtemp(prefix="base-", dir=workdir)
    train_to(os.path.join(directory, "ck"), [1, 2])
    return os.path.join(directory, "ck")


def _copy(base: str, workdir: str) -> str:
    target = os.path.join(tempfile.mkdtemp(prefix="case-", dir=workdir), "ck")
    shutil.copytree(base, target)
    return target


def _manifest_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:012d}.json")


def _data_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:012d}.pt")


def _edit_manifest(directory: str, which: int, **changes: Any) -> None:
    path = _manifest_path(directory, which)
    with open(path) as f:
        record = json.load(f)
    record.update(changes)
    with open(path, "w") as f:
        json.dump(record, f)


def _rehash(directory: str, step: int) -> None:
    """Make the manifest agree with whatever the data file now holds (so only the loader stands in the way)."""
    digest, size = checksum_of(_data_path(directory, step))
    _edit_manifest(directory, step, checksum=digest, size=size)


def _put_foreign(directory: str, workdir: str, step: int, *, run_id: str = "other-run",
                 fmt: int | None = None) -> None:
    other = os.path.join(tempfile.mkdtemp(prefix="other-", dir=workdir), "ck")
    train_to(other, [step], run_id=run_id)
    for suffix in ("pt", "json"):
        shutil.copy(os.path.join(other, f"step-{step:012d}.{suffix}"), directory)
    if fmt is not None:
        _edit_manifest(directory, step, format=fmt)


def _damage_cases(workdir: str) -> dict[str, tuple[Callable[[str], None], int, str]]:
    """name -> (damage(directory), expected resumed step, the file the one-line report must name)."""
    two, three = "step-000000000002", "step-000000000003"

    def truncate_to(n: int) -> Callable[[str], None]:
        return lambda d: os.truncate(_data_path(d, 2), n)

    def not_a_checkpoint(content: bytes) -> Callable[[str], None]:
        def damage(d: str) -> None:
            with open(_data_path(d, 2), "wb") as f:
                f.write(content)
            _rehash(d, 2)
        return damage

    def torch_file_not_jobwrap(d: str) -> None:
        torch.save({"w": torch.zeros(3)}, _data_path(d, 2))
        _rehash(d, 2)

    def zip_not_torch(d: str) -> None:
        with zipfile.ZipFile(_data_path(d, 2), "w") as z:
            z.writestr("hello.txt", "not a checkpoint")
        _rehash(d, 2)

    def appended(d: str) -> None:
        with open(_data_path(d, 2), "ab") as f:
            f.write(b"trailing garbage")

    def manifest_bytes(content: bytes) -> Callable[[str], None]:
        def damage(d: str) -> None:
            with open(_manifest_path(d, 2), "wb") as f:
                f.write(content)
        return damage

    def swapped(d: str) -> None:  # step 2's manifest, step 1's data: sizes match, checksums do not
        shutil.copy(_data_path(d, 1), _data_path(d, 2))
        _edit_manifest(d, 2, size=os.path.getsize(_data_path(d, 2)))

    return {
        "zero-byte data file": (truncate_to(0), 1, two),
        "zero-byte manifest": (manifest_bytes(b""), 1, two),
        "manifest is not JSON (damaged)": (manifest_bytes(b"{\"step\": 2, \"si\x00\xffze"), 1, two),
        "manifest is JSON but not a manifest": (manifest_bytes(b"[1, 2, 3]"), 1, two),
        "data file with trailing garbage": (appended, 1, two),
        "manifest lies: size": (lambda d: _edit_manifest(d, 2, size=os.path.getsize(_data_path(d, 2)) + 1), 1, two),
        "manifest lies: checksum": (lambda d: _edit_manifest(d, 2, checksum="xxh3_64:0123456789abcdef"), 1, two),
        "manifest lies: data of another step, size fixed up": (swapped, 1, two),
        "manifest lies: step (says 1, file is step 2)": (lambda d: _edit_manifest(d, 2, step=1), 1, two),
        "manifest lies: step (says 7, file is step 2)": (lambda d: _edit_manifest(d, 2, step=7), 1, two),
        "manifest lies: step is not a number": (lambda d: _edit_manifest(d, 2, step="../../2"), 1, two),
        "checkpoint of another run": (lambda d: _put_foreign(d, workdir, 3), 2, three),
        "checkpoint in a newer format version": (lambda d: _put_foreign(d, workdir, 3, run_id="mine", fmt=99), 2,
                                                 three),
        "no checkpoint at all: random bytes, manifest matches": (
            not_a_checkpoint(random.Random(5).randbytes(5000)), 1, two),
        "no checkpoint at all: a text file, manifest matches": (not_a_checkpoint(b"hello\n" * 100), 1, two),
        "no checkpoint at all: a zip that is not torch's": (zip_not_torch, 1, two),
        "a torch file that is not a jobwrap checkpoint": (torch_file_not_jobwrap, 1, two),
    }


def check_bad_file(base: str, workdir: str, damage: Callable[[str], None], expect: int,
                   names: str) -> tuple[bool, str]:
    """Damage a copy of the base run, resume it: the expected step is used and one line names the bad file."""
    directory = _copy(base, workdir)
    damage(directory)
    outcome = resume(directory)
    about = [w for w in outcome.warnings if names in w]
    problems = []
    if outcome.error:
        problems.append(f"resume failed: {outcome.error}")
    if outcome.step != expect:
        problems.append(f"resumed step {outcome.step}, expected {expect}")
    if not outcome.content_ok:
        problems.append("resumed content differs from what was saved")
    if len(about) != 1:
        problems.append(f"{len(about)} warning lines name {names} (want 1): {outcome.warnings}")
    if any("\n" in w for w in about):
        problems.append("the report spans several lines")
    if _intact(directory, 1) is False:
        problems.append("step 1 damaged")
    shutil.rmtree(os.path.dirname(directory), ignore_errors=True)
    return not problems, _short("; ".join(problems) or about[0])


def section_bad_files(c: Campaign) -> None:
    print("bad files", flush=True)
    base = _base_run(c.workdir)
    rng = random.Random(c.seed + 1)
    size = os.path.getsize(_data_path(base, 2))
    for label, count, make in (
        ("bit flip at a random offset of the newest data file", c.sizes["bitflips"],
         lambda: (lambda d: _flip_bit(_data_path(d, 2), rng))),
        ("truncation of the newest data file at a random length", c.sizes["truncations"],
         lambda: (lambda d, n=rng.randrange(1, size): os.truncate(_data_path(d, 2), n))),
    ):
        failures, sample = 0, ""
        for _ in range(count):
            ok, observed = check_bad_file(base, c.workdir, make(), 1, "step-000000000002")
            failures += not ok
            sample = observed if (not ok or not sample) else sample
        c.add(Row("bad files", label, count, "detected, one line, previous checkpoint (step 1) used",
                  f"{count - failures}/{count} detected and step 1 used; e.g. {sample}", failures))
    for label, (damage, expect, names) in _damage_cases(c.workdir).items():
        ok, observed = check_bad_file(base, c.workdir, damage, expect, names)
        c.add(Row("bad files", label, 1, f"detected, one line, step {expect} used", observed, 0 if ok else 1))
    ok, observed = check_orphan_junk(base, c.workdir)
    c.add(Row("bad files", "a data file without a manifest (e.g. copied in by hand)", 1,
              "never loaded; removed at start as an unfinished save", observed, 0 if ok else 1))


def check_orphan_junk(base: str, workdir: str) -> tuple[bool, str]:
    directory = _copy(base, workdir)
    with open(_data_path(directory, 9), "wb") as f:
        f.write(b"junk")
    outcome = resume(directory)
    ok = outcome.step == 2 and outcome.content_ok and not os.path.exists(_data_path(directory, 9))
    return ok, "step 2 used; step 9's file removed at start" if ok else f"got {outcome}"


# ================================================================ 4. hostile files

class _Evil:
    """Pickles into a call of os.system: loading it would run a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def check_malicious_pickle(base: str, workdir: str, kind: str) -> tuple[bool, str]:
    """A checkpoint whose pickle runs a command when loaded, manifest consistent: refused on the resume path."""
    import pickle

    directory = _copy(base, workdir)
    marker = os.path.join(os.path.dirname(directory), "pwned")
    if kind.startswith("torch zip"):
        torch.save({"model": {"w": torch.zeros(3)}, "step": 2, "epoch": 0, "tag": 2,
                    "jobwrap": {"format": FORMAT_VERSION, "evil": _Evil(marker)}}, _data_path(directory, 2))
    else:
        with open(_data_path(directory, 2), "wb") as f:
            pickle.dump({"jobwrap": _Evil(marker)}, f)
    _rehash(directory, 2)
    import warnings

    saved = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    if "FORCE_NO_WEIGHTS_ONLY" in kind:  # torch's own escape hatch must not reopen the hole
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note about the pickle protocol
            outcome = resume(directory)
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = saved
    ran = os.path.exists(marker)
    about = [w for w in outcome.warnings if "step-000000000002" in w]
    ok = not ran and outcome.step == 1 and outcome.content_ok and len(about) == 1
    return ok, (("command NOT run; " if not ran else "COMMAND RAN; ") +
                (_short(f"refused by weights_only, step 1 used: {about[0]}") if about else f"{outcome}"))


def check_crafted_dcp_folder(workdir: str, where: str) -> tuple[bool, str]:
    """A plain model's newest checkpoint, rewritten to name a sharded (DCP) folder whose .metadata is a
    malicious pickle, every checksum consistent: nothing runs, the start stops or falls back with one clear line."""
    import pickle

    directory = os.path.join(tempfile.mkdtemp(prefix="case-", dir=workdir), "ck")
    settings = _known({"save_at_end": False, "async_save": False})
    with capture_logs(), jobwrap.Session(directory, environ={}, run_id="mine", **settings) as job:
        job.track(model=torch.nn.Linear(4, 4), tag=-1)  # a plain (not sharded) module, saved at steps 1 and 2
        for _ in range(2):
            job.step_done()
            job.save()
    marker = os.path.join(os.path.dirname(directory), "pwned")
    folder = {"own folder": "step-000000000002.dcp", "'../' path": "../evil.dcp",
              "absolute path": os.path.join(os.path.dirname(directory), "abs.dcp")}[where]
    # The step's own folder too, consistent, so that verification passes wherever it looks.
    for target in {os.path.normpath(os.path.join(directory, folder)), os.path.join(directory, "step-000000000002.dcp")}:
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, ".metadata"), "wb") as f:
            pickle.dump(_Evil(marker), f)
    digest, size = checksum_of(os.path.join(directory, "step-000000000002.dcp", ".metadata"))
    payload = torch.load(_data_path(directory, 2), weights_only=True)
    payload.pop("model")  # so that the model is looked for in the folder
    payload["jobwrap"]["dcp"] = {"folder": folder, "objects": ["model"], "world_size": 1, "bytes": size,
                                 "files": {".metadata": {"size": size, "checksum": digest}}}
    torch.save(payload, _data_path(directory, 2))
    _rehash(directory, 2)
    with capture_logs() as records:
        step, error = None, ""
        try:
            with jobwrap.Session(directory, environ={}, run_id="mine", **settings) as job:
                job.track(model=torch.nn.Linear(4, 4), tag=-1)
                step = job.resumed_from.step if job.resumed_from is not None else None
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            error = f"{type(exc).__name__}: {exc}"
    ran = os.path.exists(marker)
    said = error or next((w for w in _warnings(records) if "step-000000000002" in w), "")
    clear = "sharded" in said and ("not written by jobwrap" in said or "new directory" in said)
    ok = not ran and clear and step in (None, 1)
    return ok, ("command NOT run; " if not ran else "COMMAND RAN; ") + _short(
        f"{'stopped' if error else f'step {step} used'}: {said}")


def torch_load_calls(root: str) -> tuple[int, list[str]]:
    """Every torch.load / pickle load in the package; the ones not pinned to weights_only=True."""
    found, bad = 0, []
    for folder, _, files in os.walk(os.path.join(root, "jobwrap")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Unpickler") for b in node.bases):
                    found += 1  # a restricted unpickler: only one that decides every global it lets through
                    if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                        bad.append(f"{os.path.relpath(path, root)}:{node.lineno} {node.name} without find_class")
                if not isinstance(node, ast.Call):
                    continue
                target = ast.unparse(node.func)
                where = f"{os.path.relpath(path, root)}:{node.lineno}"
                if target.endswith(("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads",
                                    "dill.load", "cloudpickle.load", "jit.load", "numpy.load", "np.load")):
                    bad.append(f"{where} {target}")
                    found += 1
                if target in ("torch.load", "torch.serialization.load") or target.endswith(".torch.load"):
                    found += 1
                    pinned = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                                 and k.value.value is True for k in node.keywords)
                    if not pinned:
                        bad.append(f"{where} {target} without weights_only=True")
                if target.endswith(("add_safe_globals", "safe_globals")):
                    bad.append(f"{where} {target} widens what weights_only accepts")
    return found, bad


def check_traversal(workdir: str) -> tuple[bool, str]:
    """Run ids, job ids and manifest fields with '..' or absolute parts never put a file outside the directory."""
    root = tempfile.mkdtemp(prefix="traversal-", dir=workdir)
    directory = os.path.join(root, "inside", "ck")
    refused = []
    for bad in ("../escape", "/tmp/abs", "a/../../b", "..", "x\\..\\y"):
        try:
            jobwrap.Session(directory, environ={}, run_id=bad)
        except ConfigError:
            refused.append(bad)
        try:
            jobwrap.Session(directory, environ={"JOBWRAP_RUN_ID": bad})
        except ConfigError:
            refused.append("env:" + bad)
    problems = [] if len(refused) == 10 else [f"accepted run ids: {10 - len(refused)}"]
    # Ids the scheduler hands down are not validated as names: prove they never become paths.
    for environ in ({"JOBWRAP_JOB_ID": "../../../escape"}, {"SLURM_JOB_ID": "../../escape"},
                    {"JOBWRAP_JOB_ID": "/tmp/escape-abs"}):
        with capture_logs():
            job = jobwrap.Session(directory, environ=environ, adopt=True, save_at_end=False,
                                  **_known({"async_save": False}))
            with job:
                job.track(model=Weights(64), tag=0)
                job.step_done()
                job.save()
    # A hostile manifest: its 'file' points outside, its step is negative.
    _edit_manifest(directory, 1, file="../../outside.pt")
    outcome = resume(directory, run_id=None, numel=64)
    outside = []
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            path = os.path.join(folder, name)
            if not (path + os.sep).startswith(os.path.join(root, "inside", "ck") + os.sep) and \
                    path != os.path.join(root, "inside"):
                outside.append(os.path.relpath(path, root))
    if outside:
        problems.append(f"files outside the directory: {outside}")
    if os.path.exists("/tmp/escape-abs") or os.path.exists("/tmp/abs"):
        problems.append("a file appeared at an absolute path")
    if outcome.error:
        problems.append(f"resume failed: {outcome.error}")
    return not problems, "; ".join(problems) or (
        f"{len(refused)}/10 bad run ids refused (argument and JOBWRAP_RUN_ID); hostile job ids and a manifest "
        f"'file' of ../../outside.pt wrote nothing outside the checkpoint directory")


def _modes_child(root: str, requeue_file: str) -> Callable[[Report], None]:
    def body(report: Report) -> None:
        os.umask(0)
        directory = os.path.join(root, "nested", "deeper", "ck")
        environ = {"JOBWRAP_REQUEUE_FILE": requeue_file}
        job = jobwrap.Session(directory, environ=environ, **_known(dict(
            save_every_steps=1, keep_last=2, save_at_end=False, async_save=True)))
        weights = Weights(256)
        try:
            with job:
                job.track(model=weights, tag=-1)
                for _ in range(4):
                    weights.fill(job.step + 1)
                    job["tag"] = job.step + 1
                    job.step_done()
                job.save()
                os.kill(os.getpid(), signal.SIGUSR1)
                job.step_done()
        except SystemExit:
            pass
        newest = CheckpointStore(directory).committed()[0]
        _flip_bit(newest.path, random.Random(1))
        resume(directory, run_id=None, numel=256)  # quarantines the damaged one: a rename, modes kept
        report("ok")
    return body


def check_modes(workdir: str) -> tuple[bool, str]:
    """Under umask 000, nothing jobwrap creates (directories, checkpoints, manifests, run.json, events,
    quarantined files, the requeue file) is group- or world-writable."""
    root = tempfile.mkdtemp(prefix="modes-", dir=workdir)
    requeue_dir = tempfile.mkdtemp(prefix="requeue-", dir=workdir)
    requeue_file = os.path.join(requeue_dir, "requeue")
    trial = fork_trial(_modes_child(root, requeue_file), timeout=120)
    if not trial.find("ok"):
        return False, f"child failed: {trial.find('error') or trial.code}"
    created = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            created.append((os.path.relpath(path, root), stat.S_IMODE(os.lstat(path).st_mode)))
    if os.path.exists(requeue_file):
        created.append(("<requeue file>", stat.S_IMODE(os.lstat(requeue_file).st_mode)))
    bad = [f"{name} {oct(mode)}" for name, mode in created if mode & 0o022]
    def kind(name: str) -> str:
        base = name.rsplit("/", 1)[-1]
        if ".corrupt-" in base:
            return "quarantined files"
        if name.startswith("<"):
            return name.strip("<>")
        return {"run.json": "run.json", "events.jsonl": "events.jsonl"}.get(
            base, f"*.{base.rsplit('.', 1)[-1]}" if "." in base else "directories")
    kinds = sorted({kind(name) for name, _ in created})
    ok = not bad and len(created) >= 8
    return ok, (f"{len(created)} files and directories checked ({', '.join(kinds)}): none group/world-writable"
                if ok else f"writable by others: {bad}")


def check_symlinked_events(workdir: str) -> tuple[bool, str]:
    """A symlink planted as events.jsonl (or run.json) is not followed out of the directory."""
    root = tempfile.mkdtemp(prefix="symlink-", dir=workdir)
    directory = os.path.join(root, "ck")
    os.makedirs(directory)
    victim = os.path.join(root, "victim.txt")
    with open(victim, "w") as f:
        f.write("precious\n")
    os.symlink(victim, os.path.join(directory, "events.jsonl"))
    with capture_logs():
        with contextlib.suppress(Exception):
            train_to(directory, [1])
    with open(victim) as f:
        content = f.read()
    ok = content == "precious\n"
    return ok, ("the events log refused to follow the symlink; the file outside is unchanged" if ok
                else "jobwrap appended to a file outside the directory through a symlink")


def section_hostile(c: Campaign) -> None:
    print("hostile files", flush=True)
    base = _base_run(c.workdir)
    for kind in ("torch zip", "plain pickle", "torch zip, with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set"):
        ok, observed = check_malicious_pickle(base, c.workdir, kind)
        c.add(Row("hostile", f"malicious pickle ({kind}) as the newest checkpoint, manifest consistent, "
                  "loaded through Session resume", 1, "refused, nothing runs, previous used", observed,
                  0 if ok else 1))
    for where in ("own folder", "'../' path", "absolute path"):
        ok, observed = check_crafted_dcp_folder(c.workdir, where)
        c.add(Row("hostile", f"a plain model's checkpoint naming a sharded folder ({where}) whose DCP .metadata "
                  "is a malicious pickle, checksums consistent", 1, "nothing runs; a clear error or the previous used",
                  observed, 0 if ok else 1))
    found, bad = torch_load_calls(REPO)
    c.add(Row("hostile", "every torch.load in jobwrap/ pinned to weights_only=True; no pickle/safe_globals; "
              "an Unpickler only with its own find_class", found,
              "all pinned, no option to unpin", "all pinned" if not bad else "; ".join(bad), len(bad)))
    for label, check in (("run id / job id / manifest fields with '..' or absolute parts", check_traversal),
                         ("umask 000: modes of everything jobwrap creates", check_modes),
                         ("events.jsonl planted as a symlink to a file outside", check_symlinked_events)):
        ok, observed = check(c.workdir)
        c.add(Row("hostile", label, 1, "nothing written outside / nothing world-writable", observed,
                  0 if ok else 1))


# ================================================================ 5. signals

def _signal_child(directory: str, *, numel: int, save_every: int, async_save: bool,
                  max_steps: int = 100_000, requeue_file: str | None = None,
                  step_seconds: float = 0.0, hold: str | None = None) -> Callable[[Report], None]:
    def body(report: Report) -> None:
        torch.set_num_threads(1)
        _instrument(report, hold=hold)
        environ = {"JOBWRAP_REQUEUE_FILE": requeue_file} if requeue_file else {}
        job = jobwrap.Session(directory, environ=environ, run_id="mine", **_known(dict(
            keep_last=3, save_every_steps=save_every, save_at_end=False, async_save=async_save)))
        weights = Weights(numel)
        from jobwrap import session as session_module

        decide = session_module.Session._exit_decision

        def reported(self: Any, request: int, sig: Any, *args: Any, **kwargs: Any) -> Any:
            report("decided", self.step, sig.name if sig is not None else "none")  # the signal that decides
            return decide(self, request, sig, *args, **kwargs)
        session_module.Session._exit_decision = reported  # type: ignore[method-assign]
        with job:
            job.track(model=weights, tag=-1)
            report("resumed", job.step if job.resumed_from is not None else -1)
            while job.step < max_steps:
                if step_seconds:
                    time.sleep(step_seconds)  # the step's compute
                weights.fill(job.step + 1)
                job["tag"] = job.step + 1
                job.step_done()
        report("done")
    return body


def storm_trial(workdir: str, rng: random.Random, *, count: int = 300, numel: int = 1 << 18) -> tuple[bool, str]:
    """Hundreds of USR1/TERM while training and saving: no hang, one signal checkpoint, the deciding signal's exit code."""
    directory = tempfile.mkdtemp(prefix="storm-", dir=workdir)
    sent: list[signal.Signals] = []
    state = {"go": False, "stop": False}

    start_after = rng.choice(["resumed", "enter"])  # from the first step, or from inside the first save

    def on_message(words: list[str], pid: int) -> None:
        if words[0] == start_after and (start_after == "resumed" or words[1:2] == ["save"]):
            state["go"] = True
        if words[0] == "decided":
            state["stop"] = True

    def while_running(pid: int) -> None:
        if state["go"] and not state["stop"] and len(sent) < count:
            for _ in range(rng.randint(1, 25) if sent else 1):  # bursts: most coalesce, as in the kernel
                sig = rng.choice([signal.SIGUSR1, signal.SIGTERM])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                    sent.append(sig)

    trial = fork_trial(_signal_child(directory, numel=numel, save_every=2, async_save=rng.random() < 0.5,
                                     step_seconds=0.01),
                       on_message=on_message, while_running=while_running, timeout=120)
    decided = trial.find("decided")
    stop_step = int(decided[0][0]) if decided else None
    # A TERM seen by the time of the decision (after the save) decides, else the USR1 (a cancel wins
    # over a requeue); the child reports the deciding signal.
    first = decided[0][1] if decided else None
    want = jobwrap.REQUEUE_EXIT_CODE if first == "SIGUSR1" else 128 + signal.SIGTERM
    events = [e["event"] for e in read_events(directory)]
    committed = CheckpointStore(directory).committed()
    problems = []
    if first not in {s.name for s in sent}:
        problems.append(f"the child acted on {first}, which was never sent")
    if trial.code != want:
        late = trial.code in (-signal.SIGUSR1, -signal.SIGTERM) and stop_step is not None
        problems.append(f"exit {trial.code}, want {want}" + (" (a late signal after the session closed)"
                                                              if late else ""))
    if events.count("signal") != 1:
        problems.append(f"{events.count('signal')} signal events")
    if stop_step is None or not committed or committed[0].step != stop_step or not _intact(
            directory, stop_step, numel):
        problems.append(f"newest committed {committed[0].step if committed else None}, stop at {stop_step}")
    if trial.find("error"):
        problems.append(f"error {trial.find('error')}")
    shutil.rmtree(directory, ignore_errors=True)
    return not problems, "; ".join(problems) or f"{len(sent)} signals, decided by {first}, exit {trial.code}"


def check_signal_during_resume(workdir: str) -> tuple[bool, str]:
    """USR1 while the checkpoint is being read: the run stops at its first boundary without a second save."""
    directory = os.path.join(tempfile.mkdtemp(prefix="sigresume-", dir=workdir), "ck")
    numel = 1 << 18  # the resume waits for the signal after it started (hold="resume")
    train_to(directory, [1, 2, 3], numel=numel)
    before = sorted(os.listdir(directory))

    def on_message(words: list[str], pid: int) -> None:
        if words[:2] == ["enter", "resume"]:
            os.kill(pid, signal.SIGUSR1)

    trial = fork_trial(_signal_child(directory, numel=numel, save_every=1, async_save=False, hold="resume"),
                       on_message=on_message, timeout=60)
    after = sorted(n for n in os.listdir(directory) if n != "events.jsonl")
    decided = trial.find("decided")
    ok = (trial.code == jobwrap.REQUEUE_EXIT_CODE and decided == [["3", "SIGUSR1"]] and not trial.find("commit")
          and after == sorted(n for n in before if n != "events.jsonl") and not trial.find("resumed"))
    return ok, ("stopped right after restoring step 3 (inside track), exit 75, no new checkpoint" if ok else
                f"exit {trial.code}, decided {decided}, commits {trial.find('commit')}, files {after}")


def check_signal_during_save(workdir: str, async_save: bool) -> tuple[bool, str]:
    """USR1 while a periodic save is being written: that save completes, the next boundary stops the run."""
    directory = os.path.join(tempfile.mkdtemp(prefix="sigsave-", dir=workdir), "ck")
    fired = []

    def on_message(words: list[str], pid: int) -> None:
        if words[:2] == ["enter", "save"] and not fired:
            os.kill(pid, signal.SIGUSR1)
            fired.append(1)

    trial = fork_trial(_signal_child(directory, numel=1 << 20, save_every=3, async_save=async_save, hold="save"),
                       on_message=on_message, timeout=60)
    stop = trial.find("decided")
    commits = [int(w[0]) for w in trial.find("commit")]
    newest = CheckpointStore(directory).committed()
    # A background save in flight may be superseded (cancelled) by the signal's save: that is by design.
    ok = (trial.code == jobwrap.REQUEUE_EXIT_CODE and bool(stop) and newest and newest[0].step == int(stop[0][0])
          and _intact(directory, newest[0].step, 1 << 20) and (async_save or 3 in commits))
    return bool(ok), (f"periodic save of step 3 committed, stopped at step {stop[0][0]} with its checkpoint, exit 75"
                      if ok else f"exit {trial.code}, stop {stop}, commits {commits}, "
                      f"errors {trial.find('error')}")


def grace_trial(workdir: str, rng: random.Random, save_seconds: float, numel: int = 4 << 20) -> tuple[str, str]:
    """SIGTERM, then SIGKILL after a random grace: either the TERM save committed or the previous one survives."""
    directory = os.path.join(tempfile.mkdtemp(prefix="grace-", dir=workdir), "ck")
    grace = rng.uniform(0.0, 2.5 * save_seconds)
    plan = {"term_at": None}

    def on_message(words: list[str], pid: int) -> None:
        if words[0] == "commit" and plan["term_at"] is None and int(words[1]) >= 2:
            time.sleep(rng.uniform(0, 0.01))
            os.kill(pid, signal.SIGTERM)
            plan["term_at"] = time.monotonic()

    def while_running(pid: int) -> None:
        if plan["term_at"] is not None and time.monotonic() - plan["term_at"] >= grace:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    trial = fork_trial(_signal_child(directory, numel=numel, save_every=2, async_save=rng.random() < 0.5),
                       on_message=on_message, while_running=while_running, timeout=120)
    commits = sorted(int(w[0]) for w in trial.find("commit"))
    pick, problems, _ = audit(directory, numel=numel, keep_last=3, must_survive=set(commits), damaged=set())
    stop = trial.find("decided")
    if trial.code == 128 + signal.SIGTERM:
        outcome = "fit"
        if not stop or pick != int(stop[0][0]):
            problems.append(f"exit 143 but newest {pick}, stop {stop}")
    elif trial.code == -signal.SIGKILL:
        outcome = "killed"
        if pick is None or pick < max(commits):
            problems.append(f"newest {pick} older than the last commit {max(commits)}")
    else:
        outcome = "other"
        problems.append(f"exit {trial.code} {trial.find('error')}")
    shutil.rmtree(os.path.dirname(directory), ignore_errors=True)
    return outcome, "; ".join(problems)


def section_signals(c: Campaign) -> None:
    print("signals", flush=True)
    rng = random.Random(c.seed + 2)
    failures, notes = 0, []
    failed: list[str] = []
    for _ in range(c.sizes["storms"]):
        ok, observed = storm_trial(c.workdir, rng)
        failures += not ok
        notes.append(observed)
        if not ok:
            failed.append(observed)
    c.add(Row("signals", "storm: ~300 USR1/TERM at random sub-ms intervals while training and saving",
              c.sizes["storms"], "no hang; one signal checkpoint at the next boundary, intact; the exit code of "
              "the deciding signal (TERM if one came by the decision)",
              f"{c.sizes['storms'] - failures}/{c.sizes['storms']} as expected; e.g. {notes[0]}"
              + ("; failures: " + " / ".join(failed)[:400] if failed else ""),
              failures))
    ok, observed = check_signal_during_resume(c.workdir)
    c.add(Row("signals", "USR1 while the resume reads the checkpoint", 1, "stop at the first boundary, no duplicate "
              "save", observed, 0 if ok else 1))
    for async_save in (False, True):
        ok, observed = check_signal_during_save(c.workdir, async_save)
        c.add(Row("signals", f"USR1 during a periodic save ({'background' if async_save else 'synchronous'})", 1,
                  "that save commits; the run stops at the next boundary with a newer one", observed, 0 if ok else 1))
    timing = tempfile.mkdtemp(dir=c.workdir)
    store = CheckpointStore(timing)
    store.prepare()
    started = time.monotonic()
    store.save(_payload(1, 4 << 20), step=1, epoch=0, meta={})
    save_seconds = max(0.02, time.monotonic() - started)
    outcomes: collections.Counter[str] = collections.Counter()
    failures, problems = 0, []
    for _ in range(c.sizes["grace"]):
        outcome, problem = grace_trial(c.workdir, rng, save_seconds)
        outcomes[outcome] += 1
        if problem:
            failures += 1
            problems.append(problem)
    c.add(Row("signals", f"SIGTERM then SIGKILL after a random grace of 0-{2.5 * save_seconds:.2f} s "
              f"(a 16 MB save takes ~{save_seconds:.2f} s here)", c.sizes["grace"],
              "the TERM save commits (exit 143) or the previous checkpoint survives",
              f"save fit: {outcomes['fit']}, killed mid-save with the previous intact: {outcomes['killed']}"
              + (f"; problems: {problems[:3]}" if problems else ""), failures))


# ================================================================ 6. scheduler

def fake_scontrol(folder: str, *, code: int, message: str = "", sleep: float = 0) -> str:
    """An ``scontrol`` on PATH that logs its arguments, optionally sleeps, prints ``message`` and exits ``code``."""
    path = os.path.join(folder, "scontrol")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f"echo \"$@\" >> '{folder}/calls'\n"
                + (f"sleep {sleep}\n" if sleep else "")
                + (f"echo '{message}' >&2\n" if message else "")
                + f"exit {code}\n")
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def path_env(folder: str | None) -> Iterator[None]:
    """PATH with ``folder`` first (None: a PATH with no scontrol anywhere)."""
    saved = os.environ.get("PATH", "")
    if folder is None:
        os.environ["PATH"] = os.pathsep.join(p for p in saved.split(os.pathsep)
                                             if p and not os.path.exists(os.path.join(p, "scontrol")))
    else:
        os.environ["PATH"] = folder + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def signalled_session(directory: str, environ: dict[str, str], **settings: Any
                      ) -> tuple[int | None, str, list[str]]:
    """A Session that gets USR1 at step 2: (exit code, reason, warning lines)."""
    with capture_logs() as records:
        try:
            job = jobwrap.Session(directory, environ=environ, run_id="mine",
                                  **_known({"save_at_end": False, "async_save": False, **settings}))
            with job:
                job.track(model=Weights(64), tag=0)
                job.step_done()
                os.kill(os.getpid(), signal.SIGUSR1)
                job.step_done()
            return None, "no stop", _warnings(records)
        except jobwrap.Preempted as stop:
            return stop.code, stop.reason, _warnings(records)


def section_scheduler(c: Campaign) -> None:
    print("scheduler", flush=True)
    slurm = {"SLURM_JOB_ID": "4242"}
    cases = []
    bin_dir = tempfile.mkdtemp(prefix="bin-", dir=c.workdir)
    with path_env(None):
        code, reason, warnings = signalled_session(c.scratch("nosctl"), slurm)
    cases.append(("scontrol missing from PATH", code == jobwrap.REQUEUE_EXIT_CODE and any(
        "scontrol not found" in w for w in warnings), f"exit {code}; warning: {_first(warnings, 'scontrol')}"))
    fake_scontrol(bin_dir, code=1, message="scontrol: error: slurm_requeue: Invalid job id specified")
    with path_env(bin_dir):
        code, reason, warnings = signalled_session(c.scratch("failsctl"), slurm)
    cases.append(("scontrol exits 1 (fake on PATH)", code == jobwrap.REQUEUE_EXIT_CODE and any(
        "Invalid job id" in w for w in warnings), f"exit {code}; warning: {_first(warnings, 'scontrol')}"))
    requeue_file = os.path.join(c.scratch("rqf"), "requeue")
    with path_env(bin_dir):
        code, reason, warnings = signalled_session(c.scratch("failsctl2"), {**slurm,
                                                                             "JOBWRAP_REQUEUE_FILE": requeue_file})
    cases.append(("scontrol exits 1 under `jobwrap run` (requeue file handed down)",
                  code == 0 and os.path.exists(requeue_file),
                  f"exit {code}; requeue file written: {os.path.exists(requeue_file)}"))
    disabled = fake_scontrol(tempfile.mkdtemp(prefix="bin-", dir=c.workdir), code=1,
                             message="scontrol: error: Requeue of JobId=4242 Requested operation is presently "
                                     "disabled")
    with path_env(os.path.dirname(disabled)):
        code, reason, warnings = signalled_session(c.scratch("norequeue"), slurm)
    cases.append(("job submitted with --no-requeue (scontrol refuses: 'presently disabled', exit 1)",
                  code == jobwrap.REQUEUE_EXIT_CODE and any("presently disabled" in w for w in warnings),
                  f"exit {code}; warning quotes Slurm: {_first(warnings, 'disabled')}"))
    from jobwrap.schedulers import scontrol_requeue
    hanging = fake_scontrol(tempfile.mkdtemp(prefix="bin-", dir=c.workdir), code=0, sleep=30)
    started = time.monotonic()
    error = scontrol_requeue("4242", timeout=1.0, scontrol=[hanging])
    took = time.monotonic() - started
    cases.append(("scontrol hangs", error is not None and "did not answer" in error and took < 10,
                  f"gave up after {took:.1f} s: {error}"))
    code, reason, warnings = signalled_session(c.scratch("cap"), {"JOBWRAP_RESTART_COUNT": "3"}, max_requeues=3)
    cases.append(("requeue cap reached (restart 3, max_requeues=3)", code == 1 and "cap" in reason,
                  f"exit {code}: {reason[:100]}"))
    ok, observed = check_supervisor_cap(c.workdir)
    cases.append(("`jobwrap run` relaunch cap (a command that always asks to be requeued, --max-requeues 2)",
                  ok, observed))
    ok, observed = check_no_progress_cap(c.workdir)
    cases.append(("no-progress cap: runs that commit no newer step", ok, observed))
    for fault, ok, observed in cases:
        c.add(Row("scheduler", fault, 1, "fallback exit 75 / requeue file with a warning; caps end the loop "
                  "with exit 1 and the reason", observed, 0 if ok else 1))


def _first(lines: list[str], word: str) -> str:
    found = next((line for line in lines if word in line), "")
    return (found[:120] + "...") if len(found) > 120 else found


def check_supervisor_cap(workdir: str) -> tuple[bool, str]:
    from jobwrap.supervisor import supervise

    folder = tempfile.mkdtemp(prefix="cap-", dir=workdir)
    count = os.path.join(folder, "launches")
    with capture_logs() as records:
        status = supervise(["sh", "-c", f"echo x >> '{count}'; exit 75"], forward=(), max_requeues=2,
                           environ={"PATH": os.environ.get("PATH", "")})
    with open(count) as f:
        launches = len(f.read().split())
    said = any("cap" in r.getMessage() for r in records)
    ok = status == jobwrap.REQUEUE_EXIT_CODE and launches == 3 and said
    return ok, f"{launches} launches (1 + 2 relaunches), then exit {status} with 'the requeue cap is reached'"


def check_no_progress_cap(workdir: str) -> tuple[bool, str]:
    directory = os.path.join(tempfile.mkdtemp(prefix="noprog-", dir=workdir), "ck")
    train_to(directory, [1])
    codes = []
    for restart in range(1, 5):
        with capture_logs():
            try:
                job = jobwrap.Session(directory, environ={"JOBWRAP_RESTART_COUNT": str(restart)}, run_id="mine",
                                      max_no_progress=2, save_at_end=False, **_known({"async_save": False}))
                with job:
                    os.kill(os.getpid(), signal.SIGUSR1)  # before any step: no progress
                    job.track(model=Weights(4096), tag=0)
                codes.append(None)
            except jobwrap.Preempted as stop:
                codes.append(stop.code)
    ok = codes[:2] == [75, 1] or codes[:3] == [75, 75, 1]
    return ok, f"exit codes of successive stalled runs: {codes}"


# ================================================================ 7. store policy over random listings

KINDS = ("good", "bitflip", "truncated", "zero", "no-manifest", "no-data", "bad-json", "size-lie",
         "newer-format", "foreign", "step-lie")


def policy_case(directory: str, spec: list[tuple[int, str]], keep_last: int) -> list[str]:
    """Build a directory from ``spec`` (step, kind), then check the load and retention policy on it.

    Load: the resume takes the newest *good* checkpoint of this run, and never
    sets aside or deletes a good one. Retention, after a new save above every
    usable step: the new checkpoint survives, the newest ``keep_last`` usable
    ones remain, and nothing it cannot use (newer format, another run) is deleted.
    """
    problems: list[str] = []
    store = CheckpointStore(directory)
    store.prepare()
    store.claim("mine")
    numel = 16
    for step, kind in spec:
        run = "other" if kind == "foreign" else "mine"
        store.save(_payload(step, numel), step=step, epoch=0, meta={"run_id": run})
        data, manifest = _data_path(directory, step), _manifest_path(directory, step)
        if kind == "bitflip":
            _flip_bit(data, random.Random(step))
        elif kind == "truncated":
            os.truncate(data, os.path.getsize(data) // 2)
        elif kind == "zero":
            os.truncate(data, 0)
        elif kind == "no-manifest":
            os.unlink(manifest)
        elif kind == "no-data":
            os.unlink(data)
        elif kind == "bad-json":
            with open(manifest, "w") as f:
                f.write("{not json")
        elif kind == "size-lie":
            _edit_manifest(directory, step, size=12345678)
        elif kind == "newer-format":
            _edit_manifest(directory, step, format=FORMAT_VERSION + 1)
        elif kind == "step-lie":
            _edit_manifest(directory, step, step=max(0, step - 1))
    good = sorted((s for s, k in spec if k == "good"), reverse=True)
    unusable = {s for s, k in spec if k in ("newer-format", "foreign")}
    store.prepare()  # what a restart does first
    found = store.newest_loadable(lambda c: torch.load(c.path, weights_only=True), lineage=["mine"])
    want = good[0] if good else None
    got = found[0].step if found else None
    if got != want:
        problems.append(f"resume took {got}, the newest good is {want}")
    elif found is not None and not payload_matches(found[1], got, numel):
        problems.append(f"step {got} loaded with other content")
    for step in good:
        if not _intact(directory, step, numel):
            problems.append(f"good step {step} was set aside or deleted by the resume")
    # Retention after a new save above every usable step.
    new = max([s for s, k in spec if k not in ("newer-format", "foreign")], default=0) + 1
    while os.path.exists(_manifest_path(directory, new)) or os.path.exists(_data_path(directory, new)):
        new += 1
    store.save(_payload(new, numel), step=new, epoch=0, meta={"run_id": "mine"})
    usable = sorted((c.step for c in store.committed()
                     if c.manifest.get("format", 0) <= FORMAT_VERSION and c.run_id == "mine"), reverse=True)
    store.retain(keep_last)
    if not _intact(directory, new, numel):
        problems.append(f"retention deleted the checkpoint just saved (step {new})")
    remaining = {c.step for c in store.committed()}
    for step in unusable:
        if not os.path.exists(_data_path(directory, step)):
            problems.append(f"retention deleted step {step}, which this run cannot use (not its own to delete)")
    for step in usable[:keep_last]:
        if step not in remaining:
            problems.append(f"retention deleted step {step}, one of the newest {keep_last} usable")
    for step in usable[keep_last:]:
        if step in remaining:
            problems.append(f"retention kept step {step} beyond keep_last={keep_last}")
    return problems


def random_spec(rng: random.Random) -> tuple[list[tuple[int, str]], int]:
    steps = rng.sample(range(1, 40), rng.randint(0, 7))
    return [(s, rng.choice(KINDS)) for s in steps], rng.randint(1, 4)


def section_policy(c: Campaign) -> None:
    print("store policy over random listings", flush=True)
    rng = random.Random(c.seed + 3)
    failures, examples = 0, []
    kinds: collections.Counter[str] = collections.Counter()
    for _ in range(c.sizes["policy"]):
        spec, keep = random_spec(rng)
        kinds.update(k for _, k in spec)
        directory = tempfile.mkdtemp(prefix="policy-", dir=c.workdir)
        with capture_logs():
            problems = policy_case(directory, spec, keep)
        shutil.rmtree(directory, ignore_errors=True)
        if problems:
            failures += 1
            examples.append(f"{spec} keep={keep}: {problems[0]}")
    c.add(Row("policy", "random listings (0-7 checkpoints, each good or one of 10 defects), keep_last 1-4",
              c.sizes["policy"], "newest good loaded; no good one set aside; retention keeps the new and newest "
              "usable, deletes nothing it cannot use",
              f"{c.sizes['policy'] - failures}/{c.sizes['policy']} cases hold"
              + (f"; e.g. {examples[0][:240]}" if examples else f" ({sum(kinds.values())} checkpoints)"), failures))


# ================================================================ the report

SECTIONS: dict[str, Callable[[Campaign], None]] = {
    "kills": section_kills,
    "disk": section_disk,
    "bad-files": section_bad_files,
    "hostile": section_hostile,
    "signals": section_signals,
    "scheduler": section_scheduler,
    "policy": section_policy,
}


def machine() -> str:
    """The machine in words, without paths or names."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    memory = ""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            memory = f", {kb / 1024 / 1024:.0f} GiB RAM"
    return (f"{os.cpu_count()} CPU cores ({cpu}){memory}; Linux {platform.release()}; "
            f"temporary files on {_fs_type(tempfile.gettempdir())}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, jobwrap {jobwrap.__version__}; "
            f"{'root' if os.geteuid() == 0 else 'not root'}")


def _fs_type(path: str) -> str:
    best, kind = "", "unknown filesystem"
    with contextlib.suppress(OSError):
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    return kind


def render(c: Campaign, *, seconds: float, quick: bool) -> str:
    k = c.kills
    lines = [
        "# Reliability and security campaign",
        "",
        "Generated by `scripts/reliability" + (" --quick" if quick else "") + f"` (seed {c.seed}) in "
        f"{seconds:.0f} s on: {machine()}.",
        "Rerun it to reproduce; `tests/test_reliability.py` runs a small version of every section in "
        "`./scripts/test`.",
        "",
        "## The figures",
        "",
    ]
    if k is not None:
        lines += [
            f"- **Kills at random: {k.runs} runs**, each a forked training process (a real `Session`, real files, "
            f"1 MB checkpoints, `keep_last` 1-3, synchronous and background saves) SIGKILLed at a random moment "
            f"or at one of the crash points of `jobwrap/faults.py`; {k.killed} were killed mid-run "
            f"({k.crash_points} at crash points), {k.finished_first} finished before the kill.",
            f"- **Corrupt loads: {k.corrupt_loads}.** Committed checkpoints failing verification: "
            f"{k.corrupt_committed}.",
            f"- **Committed checkpoints lost: {k.lost}** (of {k.reported_commits} commits reported by the "
            f"children before they died).",
            f"- Resumes that picked another checkpoint than the newest committed one: {k.resume_mismatch}; "
            f"files left over after a clean restart: {k.leftovers}; hung children: {k.hung}.",
            f"- {k.quarantined_on_purpose} trials first flipped a bit in the newest checkpoint (the resume had "
            f"to set it aside, under fire); {k.torn_event_lines} lines of `events.jsonl` were torn by a kill "
            f"(the reader skips them).",
            "",
            "Where the kills landed (the phase the child was in when it died: the store phase it had entered "
            "and not left, and for a save the last crash point it passed):",
            "",
            "| phase at the kill | crash point | aimed at the phase | random delay | total |",
            "|---|---:|---:|---:|---:|",
        ]
        by_phase: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for (phase, how), n in k.phases.items():
            by_phase[phase][how] += n
        for phase, counts in sorted(by_phase.items(), key=lambda kv: (kv[0] == "finished before the kill",
                                                                       -sum(kv[1].values()), kv[0])):
            lines.append(f"| {phase} | {counts['crash point']} | {counts['aimed']} | {counts['delay']} | "
                         f"{sum(counts.values())} |")
        lines.append("")
    lines += ["Every fault class:", "", "| area | faults | runs | failing | skipped |", "|---|---:|---:|---:|---:|"]
    for area in dict.fromkeys(r.area for r in c.rows):
        rows = [r for r in c.rows if r.area == area]
        lines.append(f"| {area} | {len(rows)} | {sum(r.runs for r in rows if not r.skipped)} | "
                     f"{sum(1 for r in rows if r.failures and not r.skipped)} | {sum(1 for r in rows if r.skipped)} |")
    lines += [
        "",
        "## Faults tried",
        "",
        "| area | fault | runs | expected | observed | result |",
        "|---|---|---:|---|---|---|",
    ]
    for row in c.rows:
        observed = row.observed if not row.skipped else f"skipped: {row.skipped}"
        lines.append(f"| {row.area} | {_cell(row.fault)} | {row.runs} | {_cell(row.expected)} | {_cell(observed)} "
                     f"| {row.status} |")
    lines += ["", "## How each fault is made", "", HOW, "", FINDINGS, "", LIMITS, ""]
    lines += c.notes
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


HOW = """\
- **Kills**: the script imports torch once and forks a child per trial (`os.fork`). The child runs a real
  `jobwrap.Session` on a real directory: resume, then a 1 MB checkpoint at every step (`save_every_steps=1`,
  half of the groups with background saves), retention after each commit. It reports every store phase and
  every commit through a pipe, and trains until it dies. The parent SIGKILLs it at a random moment of the
  whole run, or at a random moment inside the n-th run of a chosen phase (resume, save, retention, the
  events append), or the child kills itself at the n-th hit of a random crash point (`data-written`,
  `data-synced`, `data-renamed`, `manifest-written`, `committed`, `retention`). Ten trials share a directory, so each starts
  from what the previous kill left; 8 % of trials first flip a bit in the newest checkpoint, so resumes also
  quarantine under fire. After each kill the parent checks, without touching the directory: every committed
  checkpoint verifies; the newest loads with exactly the tensors saved at its step; every commit the child
  reported is still there unless `keep_last` newer good ones replaced it; the next trial's own resume picks
  the same step. A clean resume ends each group and must leave no temporaries or orphan files.
- **Disk**: real size-limited tmpfs mounts (`mount -t tmpfs -o size=...`), `mount -o remount,ro`, `rm -rf`
  of the directory mid-run, and ext4 on a loop device whose backing tmpfs runs out (writes succeed, the
  kernel's writeback fails, `fsync` reports it). EIO itself cannot be produced here (no device-mapper), so
  `os.fsync` is made to fail with EIO at each of the three fsyncs of a save.
- **Bad files**: a copy of a real two-checkpoint run is damaged one way, then resumed with a real `Session`;
  the resume must use the named step with the exact saved content and log exactly one line naming the bad
  file.
- **Hostile files**: real malicious pickles (`os.system` in `__reduce__`), in torch's zip format and as a
  plain pickle, with manifests that match them, so only `weights_only=True` stands in the way; an AST scan of
  every `torch.load` in `jobwrap/`; hostile run ids, job ids and manifest fields; umask 000 in a forked child
  with nested new directories, background saves, quarantine and a requeue file.
- **Signals**: real signals from the parent to a forked training child; the storm sends USR1/TERM at random
  sub-millisecond intervals from the moment training starts until the child reports its exit decision.
- **Scheduler**: a fake `scontrol` first on `PATH` (exits 1, or prints Slurm's 'presently disabled' for a
  `--no-requeue` job, or hangs), and a `PATH` without any `scontrol`.
- **Policy**: random directories of 0-7 checkpoints, each good or damaged one of ten ways (bit flip,
  truncation, zero bytes, no manifest, no data, manifest not JSON, manifest size lie, manifest step lie, newer
  format, another run); `tests/test_reliability.py` drives the same check with hypothesis."""


FINDINGS = """\
## Bugs the campaign found, and their fixes

The first runs of this campaign failed 13 rows (10 of 40 random directories in the policy row) and hung
in 3 of 15 signal storms. Each cause was fixed in place with a small, local change, and is now a row
above and a test in `tests/test_reliability.py`.

1. **A storm of signals could hang the job forever** (`jobwrap/signals.py`). The handler called
   `threading.Event.set()`, which takes a lock; a second signal landing while the handler was inside
   `set()` ran the handler again on the same thread, which then waited for that lock forever. The job
   never reached its step boundary, so the signal's checkpoint was never written. Fix: the handler sets
   the event once and is never re-entered into `set()`; the test hold polls instead of calling
   `event.wait()` on the main thread (found by reading: the same deadlock, with the main thread
   holding the lock).
2. **A manifest that lies about its step made the resume quarantine a good checkpoint**
   (`store.py`). `step-2.json` saying `"step": 1` sent verification to step 1's file with step 2's
   checksum; it failed and the good step 1 was renamed away: the run restarted from zero. Fix: a
   manifest whose step is not its file name's is never trusted.
3. **Damaged manifests were ignored silently** (empty, not JSON, not an object), or reported at every
   listing (three lines per resume for a malformed field). Fix: `prepare()` sets each aside once, with
   one line: `bad manifest step-...json: <why>; set aside as ...`.
4. **Retention deleted the checkpoint it had just committed** when the directory held a checkpoint of
   another run or a newer format at a higher step (`keep_last=1`), and deleted other runs' checkpoints.
   Fix: retention counts and deletes only checkpoints of this run's lineage in a format it reads.
5. **A save failing on a read-only filesystem raised a bare `OSError`**: the clean-up's `unlink` of the
   temporary file fails with EROFS too, and that error replaced the `StorageError` with the cause and
   the fix. Fix: the clean-up is best effort.
6. **EIO from the directory fsync after the manifest rename left a manifest without data**, and a
   retry of the same step (the end-of-training save after a failed periodic one) returned it as
   "already committed": a checkpoint reported that did not exist. Fix: the failure path removes the
   manifest first; an existing manifest counts only with its data file.
7. **Retention failing after a commit failed the save** (found by reading the code next to fix 6, then
   made a row: an `OSError` from `unlink` escaped a save that had committed). Fix: a warning; the next
   save's retention catches up.
8. **A new run on a full or read-only disk failed with a bare `OSError`** writing `run.json`. Fix: a
   `StorageError` naming the file, the cause and the fix.
9. **Under umask 000, parent directories jobwrap created were 0777** (`os.makedirs` applies the mode
   to the last directory only) **and the requeue file 0666**. Fix: parents 0755 less the umask; the
   requeue file 0600.
10. **`events.jsonl` (and the requeue file) were opened through symlinks**: a symlink planted in the
    directory made the job append to a file outside it. Fix: `O_NOFOLLOW`."""

LIMITS = """\
## What is not covered, and why

- **A real EIO.** Device-mapper is not available in this container, so there is no `error` target;
  EIO is injected at each `os.fsync` of a save, and real deferred block-device write errors come from
  ext4 on a loop device whose backing store runs out (the kernel logs I/O errors; `fsync` returns
  ENOSPC there).
- **Power loss.** The kills end the process; the page cache survives them. Surviving power loss is what
  the protocol's fsyncs are for, and proving it needs a VM or `dm-log-writes`, neither available here.
- **Several ranks.** A rank killed in the middle of the stop agreement is left to `tests/test_multirank.py`
  and the Slurm tests.
- **`--no-requeue` on a real Slurm** is for the Slurm tests. Here a fake `scontrol` prints Slurm's
  refusal (`Requested operation is presently disabled`, exit 1). The training process logs a warning
  quoting it and falls back: it writes the requeue file (exit 0) under `jobwrap run`, else exits 75.
  In the batch script, `jobwrap run` tries `scontrol requeue` itself, gets the same refusal, logs
  "relaunching inside this allocation" and relaunches the training in the same allocation (up to
  `--max-requeues`); the relaunch resumes from the checkpoint and runs until the allocation ends, where
  Slurm's TERM commits a last checkpoint (exit 143). Without `jobwrap run` the job ends with 75, a
  failed job in Slurm's accounting, with its checkpoint intact for a resubmission.
- **A removed directory is an error, not recreated**: a vanished mount point would otherwise be
  recreated on the local disk and the checkpoints written where the next job cannot see them.
- **Two new jobs starting together in one empty directory**: `claim()` refuses a directory of another
  run only once it holds committed checkpoints, so two runs started at the same moment both claim it.
- **Signals after the session closed** (the storm stops when the child has decided how to exit): a
  trapped signal that arrives after `Session.close()` gets the handler that was there before (by
  default, it ends the process); the checkpoint and the requeue request are already committed then."""


def run(sections: list[str], *, quick: bool, seed: int, out: str | None) -> Campaign:
    workdir = tempfile.mkdtemp(prefix="jobwrap-reliability-")
    campaign = Campaign(seed, QUICK if quick else FULL, workdir)
    started = time.monotonic()
    torch.set_num_threads(1)
    try:
        for name in sections:
            SECTIONS[name](campaign)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - started
    if out:
        with open(out, "w") as f:
            f.write(render(campaign, seconds=seconds, quick=quick))
        print(f"wrote {out}")
    return campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="jobwrap's reliability and security campaign")
    parser.add_argument("--quick", action="store_true", help="a small version of every section (under a minute)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "reliability.md"),
                        help="where to write the report ('' for none)")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    campaign = run(sections, quick=args.quick, seed=args.seed, out=args.out or None)
    failures = campaign.failures + (campaign.kills.failures if campaign.kills else 0)
    print(f"{len(campaign.rows)} rows, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
