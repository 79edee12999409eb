"""A run's life told from its event log (``events.jsonl``): pure functions over the events.

One *launch* is one process's life, from its ``start`` event to its ``exit``
event (or to the next ``start`` when it was killed without one). The summary
counts launches, preemptions and requeues, adds up save and load times, and
measures lost work: a launch that resumed from step S while an earlier launch
had already reached step T > S trained T - S steps twice.

Launches by hand (``python train.py`` again, a new ``jobwrap run`` or ``sbatch``)
start the scheduler's restart count again at 0; the run's own count
(``run_restart``) goes on across them. A launch that ended normally without
training a step (a finished run launched again, a script that only evaluates)
is ``evaluated``, not ``finished``, and does not change the run's state.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any, Iterable, Sequence

from jobwrap._format import human_age, human_duration, human_size, table
from jobwrap._scheduler.stopping import INTERRUPTED
from jobwrap._storage.deadline import checkpoint_bytes

__all__ = ["Launch", "History", "by_launch", "checkpoint_summary", "render", "summarize"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    """One process of the run, as its events describe it."""

    number: int                      # 1 for the first launch
    restart: int | None              # the scheduler's restart count, when known (0 again after a launch by hand)
    run_restart: int                 # the run's restarts before this launch, whoever relaunched it
    job_id: str | None
    scheduler: str                   # slurm | local (a log from before the field: local)
    process_started: float | None    # when the training process was created (start-up runs to the load)
    previous_exit: float | None      # when the previous process ended, where jobwrap run relaunched this one
    started: float                   # wall time of the start event
    resumed_from: str | None         # checkpoint path, None for a fresh start
    start_step: int
    reached_step: int                # the highest step its events mention
    load_seconds: float | None
    signals: tuple[tuple[str, int], ...]   # (signal name, step at the boundary)
    saves: int
    save_bytes: int
    save_seconds: float              # writing, from the first byte to the commit
    longest_save: float
    signal_save_seconds: float       # the longest save a signal asked for (what a lead time must cover)
    signal_delay: float              # the longest wait from a signal to the step boundary that saved
    background_saves: int            # written on a background thread (async_save)
    background_write_seconds: float  # their writing, while training went on
    pause_seconds: float             # what the saves cost the training loop: all of a foreground
                                     # save, only the staging copy of a background one
    failed_saves: int
    steps_lost: int                  # steps an earlier launch had passed that this one trains again
    outcome: str                     # finished | evaluated | requeued | stopped | interrupted | failed | unknown
    exit_code: int | None
    reason: str | None
    ended: float | None              # wall time of its last event


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class History:
    """The summary ``jobwrap status`` prints."""

    run_ids: tuple[str, ...]
    launches: tuple[Launch, ...]
    last_save: dict[str, Any] | None     # the newest save event

    @property
    def restarts(self) -> int:
        return max(0, len(self.launches) - 1)

    @property
    def preemptions(self) -> int:
        return sum(len(launch.signals) for launch in self.launches)

    @property
    def signal_counts(self) -> dict[str, int]:
        return dict(Counter(name for launch in self.launches for name, _ in launch.signals))

    @property
    def requeues(self) -> int:
        return sum(1 for launch in self.launches if launch.outcome == "requeued")

    @property
    def steps_lost(self) -> int:
        return sum(launch.steps_lost for launch in self.launches)

    @property
    def unrecorded_ends(self) -> int:
        """Launches before the last that left no exit event (SIGKILL, node failure): their losses are unknown."""
        return sum(1 for launch in self.launches[:-1] if launch.outcome == "unknown")

    @property
    def saves(self) -> int:
        return sum(launch.saves for launch in self.launches)

    @property
    def save_seconds(self) -> float:
        return sum(launch.save_seconds for launch in self.launches)

    @property
    def pause_seconds(self) -> float:
        return sum(launch.pause_seconds for launch in self.launches)

    @property
    def failed_saves(self) -> int:
        return sum(launch.failed_saves for launch in self.launches)

    @property
    def save_bytes(self) -> int:
        return sum(launch.save_bytes for launch in self.launches)

    @property
    def loads(self) -> int:
        return sum(1 for launch in self.launches if launch.resumed_from)

    @property
    def load_seconds(self) -> float:
        return sum(launch.load_seconds or 0.0 for launch in self.launches)

    @property
    def wall_seconds(self) -> float:
        if not self.launches:
            return 0.0
        last = self.launches[-1]
        return (last.ended or last.started) - self.launches[0].started

    @property
    def evaluated(self) -> int:
        """Launches that ended normally without training a step."""
        return sum(1 for launch in self.launches if launch.outcome == "evaluated")

    @property
    def state(self) -> str:
        """finished, requeued (waiting to run again), stopped, interrupted, failed, or running (or killed);
        a launch that trained no step leaves the state the launch before it left."""
        if not self.launches:
            return "never started"
        trained = [launch for launch in self.launches if launch.outcome != "evaluated"]
        if not trained:
            return "no step trained"
        outcome = trained[-1].outcome if self.launches[-1].outcome == "evaluated" else self.launches[-1].outcome
        return "running or killed" if outcome == "unknown" else outcome

    def as_dict(self) -> dict[str, Any]:
        """Everything, as plain JSON values, for ``jobwrap status --json``."""
        return {
            "run_ids": list(self.run_ids),
            "state": self.state,
            "launches": len(self.launches),
            "restarts": self.restarts,
            "evaluated": self.evaluated,
            "preemptions": self.preemptions,
            "signals": self.signal_counts,
            "requeues": self.requeues,
            "steps_lost": self.steps_lost,
            "unrecorded_ends": self.unrecorded_ends,
            "saves": self.saves,
            "save_bytes": self.save_bytes,
            "save_seconds": round(self.save_seconds, 4),
            "pause_seconds": round(self.pause_seconds, 4),
            "failed_saves": self.failed_saves,
            "loads": self.loads,
            "load_seconds": round(self.load_seconds, 4),
            "wall_seconds": round(self.wall_seconds, 3),
            "last_save": self.last_save,
            "runs": [dataclasses.asdict(launch) for launch in self.launches],
        }


def _outcome(exit_event: dict[str, Any] | None, requeued: bool, stopped: bool, trained: bool) -> str:
    if exit_event is None:
        return "unknown"
    if requeued:
        return "requeued"
    if stopped:
        return "stopped"
    if exit_event.get("code") == 0 and exit_event.get("reason") == "finished":
        return "finished" if trained else "evaluated"
    if str(exit_event.get("reason") or "").startswith(INTERRUPTED):
        return "interrupted"
    return "failed"


def _run_restart(restart: Any, before: int | None) -> int:
    """The run's restart number: the scheduler's where it counts further (a Slurm requeue whose start was
    never recorded), else one more than the launch before (a launch by hand starts its count at 0)."""
    own = restart if isinstance(restart, int) and not isinstance(restart, bool) and restart >= 0 else 0
    return own if before is None else max(own, before + 1)


def by_launch(events: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Events grouped by launch; events before the first start (none expected) are dropped."""
    groups: list[list[dict[str, Any]]] = []
    for event in events:
        if event.get("rank", 0) != 0:
            continue  # only rank 0 tells the run's story
        if event.get("event") == "start":
            groups.append([event])
        elif groups:
            groups[-1].append(event)
    return groups


def _pause(save: dict[str, Any]) -> float:
    """Seconds the training loop stood still for a save event."""
    if save.get("background"):
        return float(save.get("pause") or 0.0)
    return float(save.get("seconds") or 0.0)


def _steps(events: Iterable[dict[str, Any]]) -> list[int]:
    return [int(e["step"]) for e in events if isinstance(e.get("step"), (int, float))]


def summarize(events: Iterable[dict[str, Any]]) -> History:
    """The :class:`History` of a run from its events, in file order."""
    launches: list[Launch] = []
    furthest = 0  # the highest step any earlier launch reached
    last_save: dict[str, Any] | None = None
    run_ids: list[str] = []
    for number, group in enumerate(by_launch(events), start=1):
        start = group[0]
        if start.get("run_id") and start["run_id"] not in run_ids:
            run_ids.append(start["run_id"])
        start_step = int(start.get("step") or 0)
        saves = [e for e in group if e.get("event") == "save"]
        if saves:
            last_save = {k: saves[-1].get(k) for k in ("step", "epoch", "bytes", "seconds", "path",
                                                         "reason", "time")}
        exit_event = next((e for e in reversed(group) if e.get("event") == "exit"), None)
        reached = max([start_step] + _steps(group))
        launches.append(Launch(
            number=number,
            restart=start.get("restart"),
            run_restart=_run_restart(start.get("restart"), launches[-1].run_restart if launches else None),
            job_id=start.get("job_id"),
            scheduler=str(start.get("scheduler") or "local"),
            process_started=start.get("process_started"),
            previous_exit=start.get("previous_exit"),
            started=float(start.get("time") or 0.0),
            resumed_from=start.get("resumed_from"),
            start_step=start_step,
            reached_step=reached,
            load_seconds=start.get("load_seconds"),
            signals=tuple((str(e.get("signal")), int(e.get("step") or 0))
                          for e in group if e.get("event") == "signal"),
            saves=len(saves),
            save_bytes=sum(int(e.get("bytes") or 0) for e in saves),
            save_seconds=sum(float(e.get("seconds") or 0.0) for e in saves),
            longest_save=max((float(e.get("seconds") or 0.0) for e in saves), default=0.0),
            signal_save_seconds=max((float(e.get("seconds") or 0.0) for e in saves
                                     if str(e.get("reason") or "").startswith("signal")), default=0.0),
            signal_delay=max((float(e.get("delay") or 0.0) for e in group if e.get("event") == "signal"),
                             default=0.0),
            background_saves=sum(1 for e in saves if e.get("background")),
            background_write_seconds=sum((float(e.get("seconds") or 0.0) for e in saves if e.get("background")),
                                         0.0),
            pause_seconds=sum(_pause(e) for e in saves),
            failed_saves=sum(1 for e in group if e.get("event") == "save-failed"),
            steps_lost=max(0, furthest - start_step) if number > 1 else 0,
            outcome=_outcome(exit_event, any(e.get("event") == "requeue" for e in group),
                             any(e.get("event") == "stop" for e in group), trained=reached > start_step),
            exit_code=exit_event.get("code") if exit_event else None,
            reason=exit_event.get("reason") if exit_event else None,
            ended=float(group[-1].get("time") or 0.0),
        ))
        furthest = max(furthest, reached)
    return History(run_ids=tuple(run_ids), launches=tuple(launches), last_save=last_save)


# ---------------------------------------------------------------- the text `jobwrap status` prints

def checkpoint_summary(newest: Any) -> dict[str, Any]:
    """What status shows of the newest committed checkpoint (a store ``Checkpoint``: manifest only,
    not verified; `jobwrap ls` verifies)."""
    return {"step": newest.step, "epoch": newest.epoch, "bytes": checkpoint_bytes(newest.manifest), "path": newest.path,
            "reason": newest.manifest.get("reason"), "time": newest.manifest.get("wall_time")}


def _ended(launch: Launch) -> str:
    if launch.outcome == "unknown":
        return "no exit recorded (killed, or running)"
    if launch.outcome == "finished":
        return "finished"
    if launch.outcome == "evaluated":
        return "no step trained (finished already, or evaluation only)"
    if launch.outcome == "interrupted":
        return f"interrupted (Ctrl-C), exit {launch.exit_code}"
    if launch.outcome == "requeued":
        return f"requeued (exit {launch.exit_code})"
    if launch.outcome == "stopped":
        return f"stopped, exit {launch.exit_code}: {_short(launch.reason)}"
    return f"failed, exit {launch.exit_code}: {_short(launch.reason)}"


def _short(reason: str | None, limit: int = 70) -> str:
    """The reason without its explanation in parentheses, cut to fit a table cell."""
    text = (reason or "").split(" (")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _signals(launch: Launch) -> str:
    return ", ".join(f"{name.removeprefix('SIG')}@{step}" for name, step in launch.signals)


def _saving(history: History) -> str:
    if not history.saves and not history.failed_saves:
        return "no saves"
    longest = max((launch.longest_save for launch in history.launches), default=0.0)
    text = (f"{history.saves} save(s), {human_size(history.save_bytes)}, {human_duration(history.save_seconds)} "
            f"in all, longest {human_duration(longest)}")
    background = sum(launch.background_saves for launch in history.launches)
    if background:
        text += (f"; {background} written in the background, training paused "
                 f"{human_duration(history.pause_seconds)} in all")
    if history.failed_saves:
        text += f"; {history.failed_saves} FAILED (see the log)"
    return text


def _loading(history: History) -> str:
    if not history.loads:
        return "no loads"
    timed = [l.load_seconds for l in history.launches if l.resumed_from and l.load_seconds is not None]
    if not timed:
        return f"{history.loads} load(s), time not recorded"
    return (f"{history.loads} load(s), {human_duration(sum(timed))} in all, "
            f"longest {human_duration(max(timed))} (verify + torch.load)")


def render(history: History, directory: str, checkpoint: dict[str, Any] | None, now: float, *,
           top: Sequence[tuple[str, str]] = (), more: Sequence[tuple[str, str]] = ()) -> str:
    """The human-readable summary (pure: the clock is passed in); ``top`` and ``more``: facts shown
    first and after the others."""
    if not history.launches:
        return f"no run history in {directory} (no events.jsonl): nothing has run there yet"
    last = history.launches[-1]
    runs = ", ".join(history.run_ids) or "?"
    head = f"run {runs} in {directory}: {history.state} at step {last.reached_step}"
    if last.ended:
        head += f", last event {human_age(now - last.ended)}"
    signals = ", ".join(f"{name.removeprefix('SIG')} x{n}" for name, n in history.signal_counts.items())
    lost = f"{history.steps_lost}"
    if history.unrecorded_ends:
        lost += (f" recorded; {history.unrecorded_ends} launch(es) ended without a record (SIGKILL?), "
                 f"their steps after the last checkpoint are not counted")
    elif history.steps_lost == 0 and history.restarts:
        lost += " (every launch resumed where the previous one stopped)"
    fresh = sum(1 for launch in history.launches if not launch.resumed_from)
    evaluated = f", {history.evaluated} without a training step" if history.evaluated else ""
    facts = [
        *top,
        ("launches", f"{len(history.launches)} ({fresh} fresh, {history.loads} resumed{evaluated})"),
        ("preemptions", f"{history.preemptions}" + (f" ({signals})" if signals else "")
         + f", {history.requeues} requeue(s)"),
        ("steps lost", lost),
        ("saving", _saving(history)),
        ("loading", _loading(history)),
        ("wall time", f"{human_duration(history.wall_seconds)} from the first start to the last event"),
    ]
    if checkpoint is not None:
        age = f", {human_age(now - checkpoint['time'])}" if checkpoint.get("time") else ""
        facts.append(("last checkpoint", f"step {checkpoint['step']} (epoch {checkpoint['epoch']}), "
                                         f"{human_size(checkpoint['bytes'])}{age}, "
                                         f"{os.path.basename(checkpoint['path'])}"
                                         + (f" ({checkpoint['reason']})" if checkpoint.get("reason") else "")))
    else:
        facts.append(("last checkpoint", "none committed: a resume would start fresh"))
    facts += more
    width = max(len(k) for k, _ in facts)
    lines = [head, ""] + [f"  {k.ljust(width)}  {v}" for k, v in facts] + [""]
    lines.append(table(
        ["#", "restart", "started", "from", "reached", "signals", "saves", "saving", "loading", "lost", "ended"],
        [[launch.number, launch.run_restart, human_age(now - launch.started),
          launch.start_step if launch.resumed_from else "fresh", launch.reached_step, _signals(launch),
          launch.saves, human_duration(launch.save_seconds) if launch.saves else "",
          human_duration(launch.load_seconds), launch.steps_lost or "",
          _ended(launch)]
         for launch in history.launches]))
    return "\n".join(lines)
