"""What each relaunch cost, from the signal to the relaunched process's first new step: pure, over the events.

A relaunch joins two launches: the one a signal stopped (its ``signal`` event, the signal's
``save`` and its ``exit``) and the one that resumed after it: its ``start`` records when its
process was created, when jobwrap's Session started and how long its construction took, how
long the read took and, under ``jobwrap run``, when the previous process ended; its
``first-step`` records when the loader handed out the first batch and when the step ended.
The parts follow one another on the wall clock and add up to the total:

  boundary       the signal -> the step boundary that acted on it (the rest of the user's step)
  save           -> the checkpoint committed
  exit           -> the process gone, as ``jobwrap run`` saw it (else: its exit event)
  relaunch       -> the new process created (by ``jobwrap run``; or by the scheduler, queue included)
  interpreter    -> jobwrap's Session began: the interpreter, the user's imports and model
  jobwrap start  the Session's construction and start less the read: the lock, the directory scan, the claim
  load           reading and verifying the checkpoint (torch.load, the checksum in the same pass)
  first batch    -> the loader's first batch: restoring the tracked state, starting the loader
  first step     -> the first new step ended: the step itself

A part not recorded (an older log, a loop without ``job.loader()``: no first batch) is None and
its time counts in the next part. A timestamp earlier than the one before it counts as equal to
it: the process's creation is known to 10 ms, event times to 1 ms.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

from jobwrap._report.history import by_launch

__all__ = ["PARTS", "Relaunch", "facts", "relaunches"]

PARTS = ("boundary", "save", "exit", "relaunch", "interpreter", "jobwrap_start", "load", "first_batch", "first_step")
SHOWN = 10  # relaunches listed in the text; --json has every one


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Relaunch:
    """One relaunch's parts in seconds (None: not recorded), in :data:`PARTS` order."""

    launch: int            # the launch that resumed (its number in jobwrap status's table)
    signal: str
    step: int              # the step the signal's checkpoint holds
    exit_seen: str         # "process gone" (jobwrap run saw it end) or "exit event"
    total: float | None    # the signal -> the first new step; None when the new launch made no step
    boundary: float | None
    save: float | None
    exit: float | None
    relaunch: float | None
    interpreter: float | None
    jobwrap_start: float | None
    load: float | None
    first_batch: float | None
    first_step: float | None

    def parts(self) -> dict[str, float | None]:
        return {part: getattr(self, part) for part in PARTS}

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def relaunches(events: Iterable[dict[str, Any]]) -> list[Relaunch]:
    """Every relaunch of a run whose events tell it: a launch stopped by a signal, with the signal's save,
    followed by a launch that resumed."""
    groups = by_launch(events)
    found = (_relaunch(number, stopped, resumed)
             for number, (stopped, resumed) in enumerate(zip(groups, groups[1:]), start=2))
    return [relaunch for relaunch in found if relaunch is not None]


def _relaunch(number: int, stopped: Sequence[dict[str, Any]], resumed: Sequence[dict[str, Any]]) -> Relaunch | None:
    start = resumed[0]
    signal = next((e for e in reversed(stopped) if e.get("event") == "signal"), None)
    if signal is None or not start.get("resumed_from"):
        return None
    save = next((e for e in stopped if e.get("event") == "save" and str(e.get("reason", "")).startswith("signal")
                 and _time(e) >= _time(signal)), None)
    if save is None:
        return None
    ended = next((e for e in reversed(stopped) if e.get("event") == "exit"), None)
    first = next((e for e in resumed if e.get("event") == "first-step"), None)
    gone = _number(start.get("previous_exit"))
    anchors = {
        "boundary": _time(signal),
        "save": _time(save),
        "exit": gone if gone is not None else (_time(ended) if ended else None),
        "relaunch": _number(start.get("process_started")),
        "interpreter": _minus(_number(start.get("session_started")), start.get("init_seconds")),
        "jobwrap_start": _minus(_time(start), start.get("read_seconds")),
        "load": _time(start),
        "first_batch": _number(first.get("first_batch")) if first else None,
        "first_step": _time(first) if first else None,
    }
    origin = _time(signal) - (_number(signal.get("delay")) or 0.0)
    parts, at = {}, origin
    for part, when in anchors.items():
        if when is None:
            parts[part] = None
            continue
        when = max(when, at)
        parts[part], at = when - at, when
    return Relaunch(launch=number, signal=str(signal.get("signal")), step=int(save.get("step") or 0),
                    exit_seen="process gone" if gone is not None else "exit event",
                    total=at - origin if first else None, **parts)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _time(event: dict[str, Any]) -> float:
    return _number(event.get("time")) or 0.0


def _minus(when: float | None, seconds: Any) -> float | None:
    """``when`` less a recorded duration; None when either is missing."""
    return None if when is None or _number(seconds) is None else when - float(seconds)


# ---------------------------------------------------------------- the text `jobwrap status` prints

def facts(found: Sequence[Relaunch]) -> list[tuple[str, str]]:
    """One line per relaunch (the last :data:`SHOWN`), for ``jobwrap status``."""
    lines = [(f"relaunch {r.launch}", _line(r)) for r in found[-SHOWN:]]
    if len(found) > SHOWN:
        lines.insert(0, ("relaunches", f"{len(found)}, the last {SHOWN} below (every one: --json)"))
    return lines


def _line(relaunch: Relaunch) -> str:
    head = f"{relaunch.signal.removeprefix('SIG')}@{relaunch.step} -> first new step "
    head += f"in {relaunch.total:.2f} s" if relaunch.total is not None else "not recorded"
    parts = ", ".join(f"{part.replace('_', ' ')} {seconds:.2f}"
                      for part, seconds in relaunch.parts().items() if seconds is not None)
    return f"{head}: {parts}" + ("" if relaunch.exit_seen == "process gone" else " (exit: to its exit event)")
