"""A Session's stop: the signal's checkpoint committed, then rank 0 decides the exit and the requeue.

Every rank arrives at the same step. The decision (jobwrap._scheduler.stopping) is made after the
save, from every signal received by then, so a cancel that lands during a requeue's save wins.
"""
from __future__ import annotations

import logging
import signal

from jobwrap._loop.distributed import NO_STOP, STOP_EXIT, STOP_REQUEUE
from jobwrap._loop.phases import Phase, move
from jobwrap._scheduler.stopping import (
    EXIT,
    REQUEUE,
    Limits,
    Preempted,
    Stop,
    carry_out,
    decide_stop,
    interrupted_exit,
)
from jobwrap._storage.store import Checkpoint

log = logging.getLogger("jobwrap")


def clean_exit(exc: BaseException | None) -> bool:
    """A finished run or a Preempted: every rank ends together (after an error some may not come)."""
    return exc is None or isinstance(exc, Preempted)


class Stopping:
    """Session's stop at a boundary: commit, decide (exit or requeue), raise Preempted; and the exit's record."""

    def _stop(self, request: int) -> None:
        """Every rank arrives here at the same step: commit, then rank 0 decides the exit and requeue."""
        self._phase = move(self._phase, Phase.STOPPING)
        sig = self._trap.first
        name = sig.name if sig is not None else ("jobwrap run gone" if self._orphaned else "another rank's signal")
        delay = None
        if sig is not None:
            delay = self.clock() - (self._trap.first_time or self.clock())
            log.info("%s received %.2f s ago: checkpointing at %s", name, delay, self._where())
        self.events.append("signal", signal=name, step=self.step, epoch=self.epoch,
                           delay=None if delay is None else round(delay, 4))
        checkpoint = self._save_before_exit(f"signal {name}")
        # Decided after the save, from every signal received by now on any rank: a TERM (scancel)
        # that came during the save still makes the stop a cancel instead of a requeue.
        settled = self.group.agree(max(request, self._local_stop_request()), False)[0]
        if settled == STOP_EXIT:
            sig = self._exit_signal() or signal.SIGTERM
            if settled != request:
                log.info("%s arrived during the save: the job is cancelled, not requeued", sig.name)
        decision = self.group.broadcast(self._exit_decision(settled, sig, checkpoint)
                                        if self.group.rank == 0 else None)
        code, requeued, reason = decision
        self._preempted = Preempted(code, signal=sig or signal.SIGTERM, checkpoint=checkpoint, requeued=requeued,
                                    reason=reason)
        self._phase = move(self._phase, Phase.PREEMPTED)
        raise self._preempted

    def _exit_decision(self, request: int, sig: signal.Signals | None,
                       checkpoint: Checkpoint) -> tuple[int, bool, str]:
        """(exit code, requeued, reason), decided by rank 0 alone; it runs the one requeue."""
        progressed = checkpoint.key > (self.resumed_from.key if self.resumed_from else (-1, 0))
        history = self._progress_history()
        stop = Stop(EXIT if request == STOP_EXIT else REQUEUE, sig, restart_count=self.job.restart_count,
                    progressed=progressed, history=history)
        return carry_out(decide_stop(stop, Limits(self.config.max_requeues, self.config.max_no_progress)), stop,
                         scheduler=self.scheduler, events=self.events, step=self.step)

    def _progress_history(self) -> tuple[bool, ...]:
        """Whether each earlier stop of the run made progress, from its events. Read between the commit and
        the requeue, where nothing may raise: a log that cannot be read counts as no history (logged)."""
        try:
            return tuple(bool(e.get("progress")) for e in self.events.read() if e["event"] in ("requeue", "stop"))
        except Exception as exc:  # the records are validated; this guards the requeue against the unforeseen
            log.warning("cannot read the run's stops from %s (%s: %s): deciding without them", self.events.path,
                        type(exc).__name__, exc)
            return ()

    def _local_stop_request(self) -> int:
        """The strongest stop this process was asked for: a cancel (an exit signal) beats a requeue,
        whichever came first (USR1 warns of the time limit, then a user's scancel sends TERM)."""
        if self._exit_signal() is not None or self._orphaned:
            return STOP_EXIT
        return STOP_REQUEUE if self._trap.received else NO_STOP

    def _exit_signal(self) -> signal.Signals | None:
        """The first exit signal received, unless exit signals requeue too (``requeue_on_exit_signals``)."""
        if self.config.requeue_on_exit_signals:
            return None
        return next((sig for sig, _ in list(self._trap.received) if sig in self.config.exit_signals), None)

    def _record_exit(self, exc: BaseException | None) -> None:
        """The exit event of a closing session: preempted, interrupted (Ctrl-C), failed or finished."""
        if isinstance(exc, Preempted):
            self.events.append("exit", code=exc.code, reason=exc.reason, step=self.step)
        elif isinstance(exc, KeyboardInterrupt) or (exc is None and self._interrupts.received):
            newest = self.last_checkpoint.step if self.last_checkpoint is not None else None
            code, reason = interrupted_exit(step=self.step, newest=newest, caught=exc is None)
            log.warning("%s", reason)
            self.events.append("exit", code=code, reason=reason, step=self.step)
        elif exc is not None:
            self.events.append("exit", code=1, reason=f"{type(exc).__name__}: {exc}", step=self.step)
        else:
            if self._trap.received:
                log.info("%s arrived after training ended; nothing left to checkpoint or requeue",
                         self._trap.first.name)
            self.events.append("exit", code=0, reason="finished", step=self.step)
