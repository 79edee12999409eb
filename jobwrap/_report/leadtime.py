"""Which ``--signal`` lead time to ask for, and whether a partition's GraceTime is enough, from what
the run measured: its step time and its signal's saves (pure, but :func:`check_directory`, which reads
the events).

After the signal the job must finish the running step, save, and exit. The save is counted twice
over (:data:`SAVE_MARGIN`): when a whole partition is preempted every job saves at once and the
storage slows down. The lead time adds a margin of :data:`MARGIN` and is at least
:data:`MIN_LEAD` (docs/guide.md, "Choosing signals and lead times"); at preemption the budget is the
partition's GraceTime, with no margin to spare.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from jobwrap._format import human_duration
from jobwrap._report.history import History

__all__ = ["MARGIN", "MIN_LEAD", "SAVE_MARGIN", "Advice", "advise", "check", "check_directory"]

SAVE_MARGIN = 2.0
MARGIN = 60.0
MIN_LEAD = 120.0
PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclasses.dataclass(frozen=True, slots=True)
class Advice:
    """The measured step and save, what they need after a signal, and the lead time to ask for."""

    step: float            # the longest step: a launch's mean step time, or a signal's wait for the boundary
    save: float            # the longest save a signal asked for (else the longest save of any kind)
    save_source: str       # "signal" or "periodic"
    needed: float          # step + SAVE_MARGIN x save: what GraceTime must cover
    lead: int              # the N of --signal=B:USR1@N

    def text(self) -> str:
        what = "a signal's save" if self.save_source == "signal" else "a periodic save (no signal's save yet)"
        return (f"ask for --signal=B:USR1@{self.lead} (jobwrap submit --lead {self.lead}): longest step "
                f"{human_duration(self.step)} + {SAVE_MARGIN:g} x {what} {human_duration(self.save)} "
                f"+ {MARGIN:g} s; a preemption's GraceTime must be at least {math.ceil(self.needed)} s")


def advise(history: History, step_seconds: Sequence[float | None]) -> Advice | None:
    """The advice from a run's history and its launches' mean step times; None before any save."""
    signal_saves = [launch.signal_save_seconds for launch in history.launches if launch.signal_save_seconds]
    saves = signal_saves or [launch.longest_save for launch in history.launches if launch.saves]
    if not saves:
        return None
    step = max([s for s in step_seconds if s] + [launch.signal_delay for launch in history.launches] + [0.0])
    save = max(saves)
    needed = step + SAVE_MARGIN * save
    return Advice(step=step, save=save, save_source="signal" if signal_saves else "periodic", needed=needed,
                  lead=int(max(MIN_LEAD, math.ceil(needed + MARGIN))))


def check(advice: Advice, *, lead: float | None, grace: float | None) -> tuple[str, str]:
    """(pass/warn/fail, detail): the advice against the lead time set and the partition's GraceTime."""
    findings, status = [advice.text()], PASS
    if lead is not None and lead < advice.needed:
        status = FAIL
        findings.append(f"the lead time set, {lead:g} s, is shorter than the {advice.needed:.0f} s the run needs")
    elif lead is not None and lead < advice.lead:
        status = WARN
        findings.append(f"the lead time set, {lead:g} s, leaves less than the {MARGIN:g} s margin")
    if grace is not None and grace < advice.needed:
        status = FAIL
        findings.append(f"GraceTime {grace:g} s is too short: at preemption the save would be cut off (the previous "
                        f"checkpoint stays); ask the admin for GraceTime >= {math.ceil(advice.needed)}, or save less")
    elif grace is not None:
        findings.append(f"GraceTime {grace:g} s is enough")
    return status, "; ".join(findings)


def check_directory(directory: str | None, *, lead: float | None, grace: float | None) -> tuple[str, str] | None:
    """``jobwrap doctor``'s row from the run already in ``directory`` (None when it has no saves yet)."""
    if not directory:
        return None
    from jobwrap._report.goodput import breakdown
    from jobwrap._report.history import summarize
    from jobwrap._storage.events import read_events

    try:
        history = summarize(read_events(directory))
    except OSError:  # not a directory, not readable: the directory check reports it
        return None
    advice = advise(history, [launch.step_seconds for launch in breakdown(history).launches])
    return None if advice is None else check(advice, lead=lead, grace=grace)
