"""Forked training processes: run one, hear what it does through a pipe, signal or kill it at a moment.

torch is imported once by the parent and each trial is an ``os.fork``, so a
trial starts in milliseconds. The child reports every store phase it enters and
leaves, every crash point and commit; the parent acts on those reports.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import select
import signal
import time
from typing import Any, Callable

import torch

from .internals import replace_crash_point, report_exit_decisions, wait_for_trapped_signal, wrap_phases
from .training import Weights, advance, log, open_session

Report = Callable[..., None]
OnMessage = Callable[[list[str], int], "float | None"]


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


def _child(body: Callable[[Report], None], write_fd: int) -> None:
    """The forked child: silence its output, send its jobwrap log up the pipe, run ``body``, exit."""
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


def _messages(buffer: bytes) -> tuple[list[list[str]], bytes]:
    """The whole lines of ``buffer`` as the child's words, and the rest (a line still being written)."""
    *lines, rest = buffer.split(b"\n")
    return [[w.replace("\u00a0", " ") for w in line.decode(errors="replace").split(" ")] for line in lines], rest


def fork_trial(body: Callable[[Report], None], *, kill_after: float | None = None, timeout: float = 60.0,
               on_message: OnMessage | None = None,
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
    if pid == 0:
        os.close(read_fd)
        _child(body, write_fd)
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
                received, buffer = _messages(buffer + chunk)
                stamp = time.monotonic() - started
                for words in received:
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


def instrument(report: Report, crash: tuple[str, int] | None = None, hold: str | None = None) -> None:
    """In a child: report entry and exit of each store phase, and every crash point; arm one crash.

    With ``hold``, the first run of that phase waits (after reporting its entry)
    until the parent's signal has arrived, so the signal lands inside it for sure.
    """
    held = [False]

    def around(phase: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            report("enter", phase)
            if phase == hold and not held[0]:
                held[0] = True
                wait_for_trapped_signal()
            result = original(*args, **kwargs)
            if phase == "save" and result is not None:
                report("commit", result.step)
            report("leave", phase)
            return result
        return wrapper

    wrap_phases(around)
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

    replace_crash_point(point)


def training_child(directory: str, *, numel: int, steps: int, step_seconds: float = 0.0,
                   crash: tuple[str, int] | None = None, hold: str | None = None,
                   environ: dict[str, str] | None = None, decisions: bool = True,
                   **settings: Any) -> Callable[[Report], None]:
    """A child that resumes ``directory`` and trains ``steps`` more steps, reporting what it does.

    It reports the step it resumed from (-1: none) and whether the restored
    content is that step's, every store phase, commit and crash point, and (with
    ``decisions``) each stop decision with the signal that decides it.
    """
    def body(report: Report) -> None:
        torch.set_num_threads(1)
        instrument(report, crash, hold)
        if decisions:
            report_exit_decisions(report)
        job = open_session(directory, environ=environ, **settings)
        weights = Weights(numel)
        with job:
            job.track(model=weights, tag=-1)
            resumed = job.resumed_from.step if job.resumed_from is not None else -1
            report("resumed", resumed)
            if job.resumed_from is not None:
                report("content", "ok" if weights.matches(resumed) and job["tag"] == resumed else "bad")
            target = job.step + steps
            while job.step < target:
                if step_seconds:
                    time.sleep(step_seconds)  # the step's compute, which a background save overlaps
                advance(job, weights)
        report("done")
    return body


def signal_on_entering(phase: str, sig: signal.Signals = signal.SIGUSR1) -> OnMessage:
    """An ``on_message`` that sends ``sig`` to the child when it first enters ``phase``."""
    fired: list[int] = []

    def on_message(words: list[str], pid: int) -> None:
        if words[:2] == ["enter", phase] and not fired:
            os.kill(pid, sig)
            fired.append(pid)
    return on_message


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
