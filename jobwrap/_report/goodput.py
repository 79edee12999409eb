"""Where a run's allocated time went, from its events (and, on Slurm, its accounting): pure functions.

Goodput is the share of the allocated time that trained the model and was kept.
Each launch's allocated time splits into parts that add up to it:

- ``startup``: from the allocation's start (or the process's creation, without
  accounting; or the previous launch's end, for a relaunch in place) until
  jobwrap opened the checkpoint directory;
- ``loading``: verifying and loading the checkpoint it resumed from;
- ``saving``: the pauses the saves cost the training loop (all of a foreground
  save, the staging copy of a background one); the background write itself
  overlaps training and is reported apart (``background_write``);
- ``lost``: steps trained again later because the launch ended without a
  committed checkpoint of them, at the launch's own step time, and the
  unrecorded end of a launch killed without an exit event;
- ``exit``: after the exit event until the allocation ended (accounting only);
- ``evaluation``: the time of a launch that trained no step (a finished run
  launched again, a script that only evaluates), which a goodput must not count;
- ``training``: the rest.

Queue waits between runs are not allocated time; Slurm's accounting
(``sacct``) measures them. Nor is the idle time between a launch's end and the
next launch by hand (``python train.py`` again, a new ``jobwrap run``): that
launch's start-up begins when its process was created, and the gap is ``idle``. The one side effect, running ``sacct``, is
:func:`read_accounting`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from datetime import datetime
from typing import Any, Callable, Sequence

from jobwrap._format import human_duration
from jobwrap._report.history import History, Launch

__all__ = ["Allocation", "Goodput", "LaunchTime", "breakdown", "facts", "parse_sacct", "read_accounting"]

PARTS = ("training", "saving", "loading", "startup", "lost", "exit", "evaluation")
SACCT_FIELDS = ("JobID", "State", "Start", "End")


@dataclasses.dataclass(frozen=True, slots=True)
class Allocation:
    """One run of a Slurm job in the accounting: when it held its nodes."""

    start: float
    end: float | None  # None while it runs
    state: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LaunchTime:
    """One launch's allocated time, split into :data:`PARTS` (which add up to ``allocated``)."""

    number: int
    begin: float
    end: float
    training: float
    saving: float
    loading: float
    startup: float
    lost: float
    exit: float
    evaluation: float
    background_write: float
    steps: int
    step_seconds: float | None  # mean wall time of one step of this launch, saves excluded
    steps_lost: int              # of this launch's steps, those a later launch trained again

    @property
    def allocated(self) -> float:
        return self.end - self.begin

    def as_dict(self) -> dict[str, Any]:
        record = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}
        record["allocated"] = round(self.allocated, 4)
        return record


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Goodput:
    """The run's time: each launch's parts, and the queue waits between runs."""

    launches: tuple[LaunchTime, ...]
    queue_wait: float | None   # between runs, from sacct; None where not measured
    accounting: str            # where the allocation times came from, in words
    idle: float = 0.0          # between a launch's end and the next launch by hand: not allocated

    def total(self, part: str) -> float:
        return sum(getattr(launch, part) for launch in self.launches)

    @property
    def allocated(self) -> float:
        return sum(launch.allocated for launch in self.launches)

    @property
    def fraction(self) -> float | None:
        """Training time / allocated time; None before any time was allocated."""
        return self.total("training") / self.allocated if self.allocated > 0 else None

    def as_dict(self) -> dict[str, Any]:
        """Everything, as plain JSON values, for ``jobwrap status --json``."""
        return {
            "goodput": None if self.fraction is None else round(self.fraction, 4),
            "allocated": round(self.allocated, 4),
            **{part: round(self.total(part), 4) for part in PARTS},
            "background_write": round(self.total("background_write"), 4),
            "queue_wait": None if self.queue_wait is None else round(self.queue_wait, 3),
            "idle": round(self.idle, 3),
            "accounting": self.accounting,
            "launches": [launch.as_dict() for launch in self.launches],
        }


# ---------------------------------------------------------------- pure

def _session_opened(launch: Launch) -> float:
    """When jobwrap started opening the directory: the start event is written after the load."""
    return launch.started - (launch.load_seconds or 0.0)


def _lost_steps(launch: Launch, following: Launch | None) -> int:
    """This launch's steps that the next launch trains again (it resumed from an older checkpoint)."""
    if following is None:
        return 0
    resumed_at = following.start_step if following.resumed_from else 0
    return max(0, launch.reached_step - max(resumed_at, launch.start_step))


def _launch_time(launch: Launch, following: Launch | None, begin: float, end: float) -> LaunchTime:
    opened = _session_opened(launch)
    recorded_end = launch.ended or launch.started
    work = max(0.0, recorded_end - launch.started - launch.pause_seconds)
    steps = max(0, launch.reached_step - launch.start_step)
    step_seconds = work / steps if steps else None
    steps_lost = _lost_steps(launch, following)
    redone = min(work, steps_lost * step_seconds) if step_seconds else 0.0
    tail = max(0.0, end - recorded_end)
    # A launch with an exit event stopped cleanly: what follows is the allocation's end. Without one it
    # was killed, and what it trained after its last event was lost with it.
    unrecorded = launch.outcome == "unknown" and following is not None
    evaluation = work if launch.outcome == "evaluated" else 0.0
    return LaunchTime(
        number=launch.number, begin=begin, end=max(end, recorded_end),
        training=work - redone - evaluation, evaluation=evaluation, saving=launch.pause_seconds,
        loading=launch.load_seconds or 0.0,
        startup=max(0.0, opened - begin), lost=redone + (tail if unrecorded else 0.0),
        exit=0.0 if unrecorded else tail, background_write=launch.background_write_seconds,
        steps=steps, step_seconds=step_seconds, steps_lost=steps_lost,
    )


def _allocation_of(launch: Launch, accounting: dict[str, list[Allocation]]) -> Allocation | None:
    runs = accounting.get(launch.job_id or "")
    if launch.scheduler != "slurm" or not runs or launch.restart is None or launch.restart >= len(runs):
        return None
    return runs[launch.restart]


def relaunched_in_place(launch: Launch, previous: Launch) -> bool:
    """Whether ``launch`` (not on Slurm) follows ``previous`` without idle time between: ``jobwrap run``
    relaunched it in place (it records when the previous process ended; older logs count one restart more),
    or ``previous`` was killed without an exit event, so when it stopped working is not known and the gap
    stays its own (lost). Else it is a launch by hand, after idle time."""
    if launch.previous_exit is not None or previous.outcome == "unknown":
        return True
    return isinstance(launch.restart, int) and isinstance(previous.restart, int) and launch.restart > previous.restart


def breakdown(history: History, accounting: dict[str, list[Allocation]] | None = None) -> Goodput:
    """The :class:`Goodput` of a run from its :class:`History` and, where known, its Slurm allocations
    (by job id, oldest run first, as :func:`parse_sacct` gives them)."""
    accounting = accounting or {}
    launches = history.launches
    times: list[LaunchTime] = []
    waits: list[float] = []
    idle = 0.0
    for i, launch in enumerate(launches):
        previous = launches[i - 1] if i else None
        following = launches[i + 1] if i + 1 < len(launches) else None
        allocation = _allocation_of(launch, accounting)
        # Relaunched in place (by `jobwrap run`, or within one Slurm allocation): the gap was spent restarting.
        in_place = previous is not None and (
            _allocation_of(previous, accounting) == allocation if allocation is not None
            else launch.scheduler == "local" and relaunched_in_place(launch, previous))
        continued = following is not None and (
            _allocation_of(following, accounting) == allocation if allocation is not None
            else following.scheduler == "local" and relaunched_in_place(following, launch))
        if in_place:
            begin = times[-1].end
        elif allocation is not None:
            begin = allocation.start
        else:
            begin = _session_opened(launch) if launch.process_started is None else launch.process_started
        end = launch.ended or launch.started
        if continued and launch.outcome == "unknown":
            # Killed: it held the allocation until the relaunch.
            end = end if following.process_started is None else following.process_started
        elif not continued and allocation is not None and allocation.end is not None:
            end = allocation.end
        if previous is not None and not in_place and allocation is None and launch.scheduler == "local":
            idle += max(0.0, begin - times[-1].end)  # a launch by hand: the gap before it held nothing
        times.append(_launch_time(launch, following, begin, end))
        if allocation is not None and previous is not None and not in_place:
            before = _allocation_of(previous, accounting)
            if before is not None and before.end is not None:
                waits.append(max(0.0, allocation.start - before.end))
    slurm = any(launch.scheduler == "slurm" for launch in launches)
    by_hand = sum(1 for i in range(1, len(launches)) if launches[i].scheduler == "local"
                  and not relaunched_in_place(launches[i], launches[i - 1]))
    if not slurm:
        source, wait = "not a Slurm run: launches relaunched in place", None
        if by_hand:
            others = len(launches) - 1 - by_hand
            source = (f"not a Slurm run: {by_hand} launch(es) by hand, idle {human_duration(idle)} before them "
                      f"(not allocated time)" + (f"; {others} relaunched in place" if others else ""))
    elif accounting:
        source, wait = "Slurm accounting (sacct)", sum(waits)
    else:
        source, wait = "sacct unavailable: allocation from process start to last event, queue wait not measured", None
    return Goodput(launches=tuple(times), queue_wait=wait, accounting=source, idle=idle)


def _parse_time(text: str) -> float | None:
    """sacct's time: epoch seconds (``SLURM_TIME_FORMAT=%s``, which sacct 22.05 honours) or ISO local
    time; None for Unknown/None."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def parse_sacct(text: str) -> list[Allocation]:
    """``sacct --duplicates --allocations --parsable2 --noheader -o JobID,State,Start,End`` output,
    oldest run first; runs that never started are left out (a PENDING record may carry the start
    the scheduler expects, not one that happened)."""
    runs = []
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < len(SACCT_FIELDS):
            continue
        record = dict(zip(SACCT_FIELDS, fields))
        start = _parse_time(record["Start"])
        if start is None or record["State"].startswith("PENDING"):
            continue
        runs.append(Allocation(start=start, end=_parse_time(record["End"]), state=record["State"].split()[0]))
    return sorted(runs, key=lambda run: run.start)


# ---------------------------------------------------------------- side effect

def read_accounting(job_ids: Sequence[str], *, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                    which: Callable[[str], str | None] = shutil.which) -> tuple[dict[str, list[Allocation]], str]:
    """Each job's runs from ``sacct`` (empty where it is missing or fails), and a note why not."""
    sacct = which("sacct")
    if sacct is None or not job_ids:
        return {}, "sacct is not on PATH" if job_ids else "no Slurm job"
    found: dict[str, list[Allocation]] = {}
    env = {**os.environ, "SLURM_TIME_FORMAT": "%s"}
    for job_id in dict.fromkeys(job_ids):
        try:
            done = run([sacct, "--duplicates", "--allocations", "--parsable2", "--noheader", "-j", job_id,
                        "-o", ",".join(SACCT_FIELDS)], capture_output=True, text=True, timeout=15, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {}, f"sacct failed: {exc}"
        if done.returncode != 0:
            return {}, f"sacct failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}"
        runs = parse_sacct(done.stdout)
        if runs:
            found[job_id] = runs
    return found, "" if found else "sacct has no record of the job"


def facts(goodput: Goodput) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``jobwrap status``'s lines: (the goodput line on top, the breakdown below)."""
    if goodput.fraction is None:
        return [], []
    allocated = human_duration(goodput.allocated)
    top = [("goodput", f"{goodput.fraction:.1%} of {allocated} allocated trained the model "
                       f"({human_duration(goodput.total('training'))})")]
    parts = [f"training {human_duration(goodput.total('training'))}",
             f"saving {human_duration(goodput.total('saving'))}"]
    if goodput.total("background_write"):
        parts[-1] += f" (+{human_duration(goodput.total('background_write'))} written in the background)"
    parts += [f"loading {human_duration(goodput.total('loading'))}",
              f"start-up {human_duration(goodput.total('startup'))}",
              f"lost {human_duration(goodput.total('lost'))}"]
    if goodput.total("exit"):
        parts.append(f"exit {human_duration(goodput.total('exit'))}")
    if goodput.total("evaluation"):
        parts.append(f"launches without a training step {human_duration(goodput.total('evaluation'))}")
    wait = ("queue wait between runs " + human_duration(goodput.queue_wait) if goodput.queue_wait is not None
            else goodput.accounting)
    return top, [("time", ", ".join(parts)), ("accounting", wait)]
