"""How a stop ends: exit, refuse the requeue, or requeue. One pure decision for training and ``jobwrap run``.

The deciders do the side effects around it, each in one place: the training
process (``Session._exit_decision``, rank 0, through :func:`carry_out`) asks its
``Scheduler`` for the requeue and records the event; ``jobwrap run`` (``supervisor.supervise``) asks
the scheduler and else relaunches the command itself. "The scheduler, else the
fallback" is the ``Scheduler`` seam's (``jobwrap/_scheduler/schedulers.py``).
"""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from jobwrap._config import REQUEUE_EXIT_CODE

if TYPE_CHECKING:
    from jobwrap._storage.store import Checkpoint

log = logging.getLogger("jobwrap")

#: What the stop asks for: a requeue (a requeue signal), or an exit (an exit signal: a cancel).
REQUEUE, EXIT = "requeue", "exit"
#: Who decides: the training process, or ``jobwrap run`` when the command it runs asked for a requeue.
TRAINING, SUPERVISOR = "training", "jobwrap run"


@dataclass(frozen=True)
class Stop:
    """One stop, as the process that decides it sees it."""

    request: str                          # REQUEUE or EXIT
    signal: signal.Signals | None = None  # the signal of an EXIT (None: SIGTERM)
    restart_count: int = 0                # restarts of this job so far
    progressed: bool = True               # this run committed a newer step than it resumed from
    history: Sequence[bool] = ()          # ``progressed`` of each earlier requeue or stop, oldest first
    status: int = REQUEUE_EXIT_CODE       # jobwrap run: the exit status of the command
    by: str = TRAINING


@dataclass(frozen=True)
class Limits:
    """The caps of the requeue loop (``max_requeues``, ``max_no_progress``: see :class:`jobwrap._config.Config`)."""

    max_requeues: int
    max_no_progress: int | None = None  # None: no cap on runs without progress (jobwrap run cannot see it)


@dataclass(frozen=True)
class Decision:
    """What the decider does. ``exit_code``: how the process ends where no requeue happens (for a
    requeue the scheduler's answer decides); ``relaunch``: ``jobwrap run`` relaunches the command
    itself where the scheduler did not take the requeue; ``cause``: the reason as the events log
    records it (a refusal without its preface)."""

    exit_code: int
    requeue: bool
    reason: str
    relaunch: bool = False
    cause: str = ""


def decide_stop(stop: Stop, limits: Limits) -> Decision:
    """What ``stop`` ends in. Pure: the caller requeues, logs and records.

    A cancel wins over a requeue. Training caps every requeue, since it alone
    knows whether its runs progress; ``jobwrap run`` caps only the relaunches it
    does itself, where the scheduler did not take the requeue: one through Slurm
    was asked for by training, within training's caps.
    """
    if stop.request == EXIT:
        return _cancel(stop)
    if stop.by == SUPERVISOR:
        return _relaunch(stop, limits)
    refusal = requeue_refusal(restart_count=stop.restart_count, max_requeues=limits.max_requeues,
                              progress_history=[*stop.history, stop.progressed],
                              max_no_progress=limits.max_no_progress)
    if refusal is not None:
        return Decision(1, False, f"not requeued: {refusal}", cause=refusal)
    return Decision(REQUEUE_EXIT_CODE, True, "checkpoint committed, requeue requested")


def _cancel(stop: Stop) -> Decision:
    """An exit signal: no requeue, exit 128 + the signal (143 for TERM, 130 for INT)."""
    sig = stop.signal or signal.SIGTERM
    if stop.by == SUPERVISOR:
        return Decision(128 + sig, False, f"{sig.name} received: not relaunching although training asked "
                                          f"to be requeued (a cancel wins over a requeue)")
    reason = (f"{sig.name}: checkpoint committed, exiting without requeueing "
              f"(Slurm requeues a preempted job itself; a user's scancel must end the job)")
    return Decision(128 + sig, False, reason, cause=reason)


def _relaunch(stop: Stop, limits: Limits) -> Decision:
    """``jobwrap run``: requeue through the scheduler, else relaunch here up to the cap (else keep the status)."""
    code = stop.status or REQUEUE_EXIT_CODE
    if _cap_reached(stop.restart_count, limits.max_requeues):
        return Decision(code, True, f"not relaunched: the requeue cap is reached ({stop.restart_count} restarts, "
                                    f"--max-requeues {limits.max_requeues})")
    return Decision(code, True, f"training asked to be requeued: relaunching (restart {stop.restart_count + 1} "
                                f"of at most {limits.max_requeues})", relaunch=True)


def _cap_reached(restart_count: int, max_requeues: int) -> bool:
    return restart_count >= max_requeues


def requeue_refusal(*, restart_count: int, max_requeues: int,
                    progress_history: Sequence[bool], max_no_progress: int | None) -> str | None:
    """Why this job must not be requeued again, or None. Pure: the caps of the requeue loop.

    ``progress_history`` says, for each earlier stop and then this one, whether
    the run committed a newer step than it resumed from.
    """
    if _cap_reached(restart_count, max_requeues):
        return (f"the requeue cap is reached ({restart_count} restarts, max_requeues={max_requeues}); "
                f"raise JOBWRAP_MAX_REQUEUES to allow more")
    streak = 0
    for progressed in reversed(progress_history):
        if progressed:
            break
        streak += 1
    if max_no_progress is not None and streak >= max_no_progress:
        return (f"the last {streak} runs committed no newer step; the job is stuck in a requeue loop "
                f"(is the signal lead time too short to reach a step boundary?). Raise "
                f"JOBWRAP_MAX_NO_PROGRESS or fix the cause")
    return None


class Preempted(SystemExit):
    """Raised at a step boundary after a signal's checkpoint committed; exits with ``code``.

    It is a ``SystemExit`` so an unchanged script ends with the right exit code;
    catch it to run something after the checkpoint.
    """

    def __init__(self, code: int, *, signal: signal.Signals, checkpoint: Checkpoint | None,
                 requeued: bool, reason: str) -> None:
        super().__init__(code)
        self.signal = signal
        self.checkpoint = checkpoint
        self.requeued = requeued
        self.reason = reason


def carry_out(decision: Decision, stop: Stop, *, scheduler: Any, events: Any, step: int) -> tuple[int, bool, str]:
    """Training's side effects of ``decision`` (rank 0): the log line, the events-log entry, the one requeue.

    Returns (exit code, requeued, reason), what every rank's ``Preempted`` carries.
    """
    if not decision.requeue:
        (log.info if stop.request == EXIT else log.error)("%s", decision.reason)
        events.append("stop", step=step, progress=stop.progressed, requeue=False, reason=decision.cause)
        return decision.exit_code, False, decision.reason
    code = scheduler.requeue()
    events.append("requeue", step=step, progress=stop.progressed, exit_code=code, scheduler=scheduler.name)
    return code, True, f"{decision.reason} ({scheduler.name})"


#: The start of an interrupted launch's exit reason (a Ctrl-C, caught by the script or not).
INTERRUPTED = "interrupted"


def interrupted_exit(*, step: int, newest: int | None, caught: bool) -> tuple[int, str]:
    """(exit code, reason) of a launch a SIGINT (Ctrl-C) ended: never "finished", and where the next resumes.

    No checkpoint is written for it: the KeyboardInterrupt may have broken a step
    in the middle, and committing that state would make the resumed run diverge.
    """
    how = "caught by the script, which then ended normally" if caught else "not caught"
    if newest is None:
        after = "no checkpoint was committed: the next launch starts from step 0"
    elif newest < step:
        after = (f"the newest checkpoint is step {newest}: the next launch resumes there and trains steps "
                 f"{newest + 1}-{step} again")
    else:
        after = f"the newest checkpoint is step {newest}: the next launch resumes there"
    return 128 + signal.SIGINT, f"{INTERRUPTED}: SIGINT (Ctrl-C) at step {step}, {how}; {after}"


def after_interrupt(events: Sequence[dict[str, Any]], step: int) -> str | None:
    """What a launch that goes on from ``step`` says when the launch before it was interrupted, else None (pure)."""
    exits = [e for e in events if e.get("event") == "exit" and e.get("rank", 0) == 0]
    if not exits or not str(exits[-1].get("reason", "")).startswith(INTERRUPTED):
        return None
    stopped = exits[-1].get("step")
    said = f"the previous launch did not finish: SIGINT (Ctrl-C) interrupted it at step {stopped}"
    if not isinstance(stopped, int) or step >= stopped:
        return f"{said}; going on from step {step}"
    start = f"resuming from its newest checkpoint, step {step}" if step else "starting from step 0 (no checkpoint)"
    return f"{said}; {start}, so steps {step + 1}-{stopped} are trained again"
