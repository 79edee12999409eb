"""``save_every="auto"``: the periodic-save interval chosen from this run's measurements (pure policy).

Young (1974) and Daly (2006): with a save costing C seconds of training and
interruptions that destroy the work since the last checkpoint coming every M
seconds on average, the interval that loses least is about sqrt(2 C M) (Daly's
higher-order terms matter only when C nears M; here C is a pause of
milliseconds to seconds and M hours).

- C is the pause this run's periodic saves cost the training loop (all of a
  foreground save, the staging copy of a background one): the mean of the last
  :data:`RECENT` measured, from the events of earlier launches and then from
  each new save.
- M counts only interruptions without a usable warning: launches that ended
  without a signal's checkpoint (SIGKILL, node failure, a crash). A warned
  preemption loses nothing, whatever the interval. Until the run has history,
  a prior of one such interruption per :data:`PRIOR_MTBI` seconds; with
  history, M = (prior + time run) / (1 + interruptions seen), the mean of a
  Gamma prior's posterior, which the prior weighs like one interruption.
- The interval is kept within [:data:`FLOOR`, :data:`CEILING`], and at least
  as long as a background write takes (one save in flight at a time). Before
  any save is measured, the first save comes after the floor, to measure it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any, Sequence

from jobwrap._format import human_duration

if TYPE_CHECKING:
    from jobwrap._report.history import Launch

__all__ = ["CEILING", "FLOOR", "PRIOR_MTBI", "AutoInterval", "Choice", "choose", "estimate_mtbi", "mean_time_between",
           "young_daly"]

#: The prior: one interruption without warning per 4 hours of run time, until the run's history says otherwise.
PRIOR_MTBI = 4 * 3600.0
#: Saves closer together than this churn the storage for a gain too small to see.
FLOOR = 10.0
#: A checkpoint at least hourly: the prior may be wrong, and an hour of work is a lot to lose.
CEILING = 3600.0
#: How many recent saves the cost is averaged over.
RECENT = 5
#: A new interval is logged when it moves by more than this share.
LOG_CHANGE = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    """An interval and why."""

    seconds: float
    cost: float | None      # the measured save pause (None: not measured yet)
    mtbi: float             # mean seconds between interruptions without warning (with the prior)
    reason: str


def young_daly(cost: float, mtbi: float) -> float:
    """The first-order optimal checkpoint interval: sqrt(2 x save cost x mean time between interruptions)."""
    return math.sqrt(2.0 * cost * mtbi)


def unwarned(launch: Launch) -> bool:
    """A launch that ended without a signal's checkpoint: killed without an exit event, failed or interrupted
    (Ctrl-C, which commits nothing) without a signal."""
    return not launch.signals and launch.outcome in ("unknown", "failed", "interrupted")


def mean_time_between(launches: Sequence[Launch], *, prior: float = PRIOR_MTBI) -> tuple[float, float, int]:
    """(M, seconds run, interruptions without warning) over finished launches, with the prior weighed as one."""
    run = sum(max(0.0, (launch.ended or launch.started)
                  - (launch.started if launch.process_started is None else launch.process_started))
              for launch in launches)
    seen = sum(1 for launch in launches if unwarned(launch))
    return estimate_mtbi(run, seen, prior=prior), run, seen


def estimate_mtbi(run: float, seen: int, *, prior: float = PRIOR_MTBI) -> float:
    """M after ``run`` seconds with ``seen`` interruptions without warning: the prior weighs as one interruption."""
    return (prior + run) / (1 + seen)


def choose(cost: float | None, mtbi: float, *, run: float, seen: int, write: float = 0.0) -> Choice:
    """The interval for a save ``cost`` (None: unmeasured) and ``mtbi``, clamped, with its reason in words."""
    floor = max(FLOOR, write)
    history = (f"prior {human_duration(PRIOR_MTBI)} + {human_duration(run)} run with {seen} such interruption(s)"
               if run else "the prior, no history yet")
    if cost is None:
        return Choice(floor, None, mtbi, f"first save after {human_duration(floor)}, to measure its cost")
    ideal = young_daly(cost, mtbi)
    seconds = min(CEILING, max(floor, ideal))
    bound = "" if seconds == ideal else (f", raised to the floor {human_duration(floor)}" if seconds == floor
                                          else f", lowered to the ceiling {human_duration(CEILING)}")
    return Choice(seconds, cost, mtbi,
                  f"sqrt(2 x save pause {cost:.3g} s x {human_duration(mtbi)} between interruptions without "
                  f"warning ({history})) = {human_duration(ideal)}{bound}")


def _periodic_costs(events: Sequence[dict[str, Any]]) -> list[float]:
    """Pauses of the periodic saves in the events (a background save's pause, a foreground save's time)."""
    return [float((e.get("pause") if e.get("background") else e.get("seconds")) or 0.0)
            for e in events if e.get("event") == "save" and e.get("reason") == "periodic"]


class AutoInterval:
    """The Session's periodic-save clock under ``save_every="auto"``: chosen from the run's events at
    start, revised after each periodic save this process makes."""

    def __init__(self, events: Sequence[dict[str, Any]], log: logging.Logger | None = None) -> None:
        from jobwrap._report.history import summarize  # save_every="auto" only: not on every start

        launches = summarize(events).launches[:-1]  # the last is this process, just started
        self.mtbi, self.run, self.seen = mean_time_between(launches)
        self.costs = _periodic_costs(events)[-RECENT:]
        self.write = 0.0
        self.log = log
        self.choice: Choice | None = None
        self._seen_key: Any = None
        self._revise()

    def due(self, elapsed: float, checkpoint: Any = None) -> bool:
        """Whether ``elapsed`` seconds since the last save call for one; ``checkpoint``: the newest, whose
        manifest (a periodic save's pause and write time) revises the interval once."""
        if checkpoint is not None and checkpoint.key != self._seen_key:
            self._seen_key = checkpoint.key
            self.measure(checkpoint.manifest)
        return elapsed >= self.choice.seconds

    def measure(self, manifest: dict[str, Any]) -> None:
        """Take a new save's cost into account (only periodic saves: a signal's save is not on the clock)."""
        if manifest.get("reason") != "periodic":
            return
        if manifest.get("background"):
            self.costs.append(float(manifest.get("stage_seconds") or 0.0))
            self.write = float(manifest.get("save_seconds") or 0.0)
        else:
            self.costs.append(float(manifest.get("save_seconds") or 0.0))
        self.costs = self.costs[-RECENT:]
        self._revise()

    def _revise(self) -> None:
        cost = sum(self.costs) / len(self.costs) if self.costs else None
        choice = choose(cost, self.mtbi, run=self.run, seen=self.seen, write=self.write)
        previous, self.choice = self.choice, choice
        if self.log is not None and (previous is None or abs(choice.seconds - previous.seconds)
                                     > LOG_CHANGE * previous.seconds):
            self.log.info("save_every=auto: a periodic save every %s: %s", human_duration(choice.seconds),
                          choice.reason)
