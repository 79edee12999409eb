"""submitit integration: jobwrap commits the checkpoint at a step boundary, submitit requeues the job.

::

    import submitit
    from jobwrap.submitit import Preemptible

    def train(job, epochs=10):              # job is a jobwrap.Session, as with @jobwrap.preemptible
        ...

    executor = submitit.AutoExecutor(folder="logs")
    executor.update_parameters(timeout_min=240, slurm_signal_delay_s=120)
    job = executor.submit(Preemptible(train, "/scratch/run1"), epochs=10)

How the two fit together. submitit installs a handler for its preemption
signal (USR2, or ``SUBMITIT_PREEMPT_SIGNAL``) that calls ``checkpoint()``,
requeues and exits, all inside the signal handler, wherever the training
happened to be. :class:`Preemptible` runs the train function in a
:class:`jobwrap.Session` that traps that same signal with a handler that only
sets a flag. At the next step boundary jobwrap commits its checkpoint and
stops; the session puts submitit's handler back, and :class:`Preemptible`
calls it, now outside any signal handler. submitit then does what it always
does: ``checkpoint()`` (cheap here: the resubmission of the same call, the
state lives in jobwrap's checkpoint), its time-out accounting
(``max_num_timeout``), the requeue (``scontrol requeue`` on Slurm, exit code
144 under ``LocalExecutor``) and the exit. The requeued job resumes from
jobwrap's newest verified checkpoint.

SIGTERM (a plain ``scancel``, a preemption without a warning signal, a node
drain: Slurm sends it to every process of the job, then SIGKILL) is jobwrap's
exit signal here too, as everywhere: submitit's own handler would only log it
("Bypassing signal SIGTERM") while the DataLoader workers die of it and the
kill that follows loses every step since the last checkpoint. jobwrap commits
at the next step boundary, shields the workers, and the job exits 143 without
a result; Slurm's requeue (``PreemptMode=REQUEUE``) or a resubmission of the
same call resumes from that checkpoint. ``exit_signals=()`` gives TERM back to
submitit. submitit itself is imported only by this module.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any, Callable, Generic, Iterator, TypeVar

try:
    import submitit
    from submitit.core.job_environment import JobEnvironment
    from submitit.core.utils import UncompletedJobError
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("jobwrap.submitit needs submitit: pip install 'jobwrap[submitit]'") from exc

from jobwrap._config import DEFAULT_EXIT_SIGNALS, _from_env, parse_signal, parse_signals

__all__ = ["Preemptible", "preemption_signal"]

log = logging.getLogger("jobwrap")

R = TypeVar("R")


def preemption_signal() -> signal.Signals:
    """The signal submitit sends before a time-out or preemption (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL``)."""
    return parse_signal(JobEnvironment.USR_SIG)


def _exit_signals_besides(preemption: signal.Signals) -> tuple[signal.Signals, ...]:
    """jobwrap's exit signals (``JOBWRAP_EXIT_SIGNALS``, else TERM), less submitit's preemption signal,
    which requeues (``SUBMITIT_PREEMPT_SIGNAL=TERM`` would otherwise make it both)."""
    configured = _from_env(None, {"exit_signals"}).get("exit_signals", parse_signals(DEFAULT_EXIT_SIGNALS))
    return tuple(s for s in configured if s != preemption)


class _HandOverToSubmitit:
    """A jobwrap scheduler that requeues nothing itself: submitit's handler does it after the commit."""

    name = "submitit"

    def requeue(self) -> int:
        return 0


class Preemptible(submitit.helpers.Checkpointable, Generic[R]):
    """A submitit-checkpointable call of ``train(session, *args, **kwargs)`` inside a jobwrap Session.

    ``directory`` and ``settings`` are those of :class:`jobwrap.Session`; the
    directory must be the same on every requeue (shared storage). By default
    the session traps submitit's preemption signal as its requeue signal,
    whatever ``JOBWRAP_REQUEUE_SIGNALS`` says (jobwrap must catch the signal
    submitit is told to send), and jobwrap's exit signals (TERM unless
    ``JOBWRAP_EXIT_SIGNALS`` says otherwise) in place of submitit's handler,
    which would ignore them. Pass ``requeue_signals`` or ``exit_signals`` to
    choose otherwise.
    """

    def __init__(self, train: Callable[..., R], directory: str | os.PathLike | None = None,
                 **settings: Any) -> None:
        self.train = train
        self.directory = os.fspath(directory) if directory is not None else None
        self.settings = settings

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        from jobwrap._loop.session import Preempted, Session

        sig = preemption_signal()
        settings = {"requeue_signals": (sig,), **self.settings}
        if "exit_signals" not in settings:
            settings["exit_signals"] = _exit_signals_besides(sig)
        submitit_handler = signal.getsignal(sig)
        under_submitit = _is_submitit_handler(submitit_handler)
        session = Session(self.directory, **settings)
        if under_submitit:
            session.requeue_through(_HandOverToSubmitit())
            with _expected_takeover():
                session.start()
            log.info("%s: jobwrap commits a checkpoint at the next step boundary, then submitit's handler "
                     "requeues the job", sig.name)
        try:
            with session:
                return self.train(session, *args, **kwargs)
        except Preempted as stop:
            if not under_submitit:
                raise
            if not stop.requeued:
                if stop.code == 1:  # jobwrap refused the requeue (caps): a failure with its reason
                    raise UncompletedJobError(f"jobwrap: {stop.reason}") from None
                raise  # an exit signal: end without a result, as a scheduler-requeued job would
            log.info("checkpoint committed at step %d; submitit requeues the job", session.step)
            submitit_handler(stop.signal, None)  # checkpoint() + requeue + exit; returns on ranks > 0
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> "submitit.helpers.DelayedSubmission":
        """The same call again. Cheap and safe inside a signal handler: jobwrap's checkpoint holds the state."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@contextlib.contextmanager
def _expected_takeover() -> Iterator[None]:
    """Silence the trap's warning about a signal that already had a handler: submitit's is expected."""
    quiet = _DropTakeoverWarning()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


class _DropTakeoverWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "already had a handler" not in record.getMessage()


def _is_submitit_handler(handler: Any) -> bool:
    """Whether ``handler`` is submitit's checkpoint-and-requeue handler (we run inside a submitit job)."""
    owner = getattr(handler, "__self__", None)
    return type(owner).__module__.startswith("submitit.") and callable(handler)
