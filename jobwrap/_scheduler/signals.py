"""Signal handlers that only record the signal; the work happens at the next step boundary."""
from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Callable, Iterable

from jobwrap._scheduler import trainers

log = logging.getLogger("jobwrap")

Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class SignalTrap:
    """Records the first (and every later) arrival of the trapped signals.

    The handler does nothing but append to a list and set an event: no I/O, no
    locks that the interrupted code may hold, so it is safe at any instruction.
    Previous handlers are kept and put back by :meth:`restore`. With ``registry``
    (``jobwrap run``'s ``JOBWRAP_TRAINERS``) the process registers there while the trap
    is installed: the supervisor signals registered processes only (:mod:`jobwrap._scheduler.trainers`).
    ``clock`` stamps each arrival (the session's, so that it can tell how long ago a signal came).
    """

    def __init__(self, signals: Iterable[signal.Signals], *, registry: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.signals = tuple(dict.fromkeys(signals))
        self.registry = registry
        self._registration: str | None = None
        self.received: list[tuple[signal.Signals, float]] = []
        self.event = threading.Event()
        self._setting = False
        self._previous: dict[signal.Signals, Handler] = {}

    def install(self) -> "SignalTrap":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("jobwrap must be started from the main thread to trap signals")
        for sig in self.signals:
            previous = signal.signal(sig, self._record)
            if previous not in (signal.SIG_DFL, signal.SIG_IGN, None) and previous != self._record:
                log.warning("%s already had a handler (%r); jobwrap takes it over and restores it at exit",
                            sig.name, previous)
            self._previous[sig] = previous
        # `jobwrap task` (srun layouts) starts training with these signals blocked, so that one sent
        # before this handler existed waited instead of killing the process: delivered now, recorded.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        self._registration = trainers.register(self.registry)  # handlers first: from now on it may be signalled
        return self

    def restore(self) -> None:
        trainers.unregister(self._registration)
        self._registration = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append((signal.Signals(signum), self._clock()))
        # Event.set() takes a lock. A signal that lands while this handler is inside set() runs the
        # handler again on the same thread, which then waits for that lock forever (seen under a
        # storm of signals). So it is set once, and set() is never re-entered.
        if self._setting or self.event.is_set():
            return
        self._setting = True
        try:
            self.event.set()
        finally:
            self._setting = False

    def wait(self, timeout: float) -> bool:
        """Whether a trapped signal has arrived, waiting up to ``timeout`` s; safe on the main thread.

        It polls instead of ``event.wait()``: a handler interrupting the main
        thread inside ``wait()`` would block on the lock that thread holds.
        """
        deadline = time.monotonic() + timeout
        while not self.received and time.monotonic() < deadline:
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
        return bool(self.received)

    @property
    def first(self) -> signal.Signals | None:
        return self.received[0][0] if self.received else None

    @property
    def first_time(self) -> float | None:
        return self.received[0][1] if self.received else None

    def __enter__(self) -> "SignalTrap":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


class InterruptWatch:
    """Notes each Ctrl-C (SIGINT) and lets Python raise its KeyboardInterrupt, as it always does.

    A script may catch the KeyboardInterrupt and end normally (pytorch/examples' word
    language model: ``except KeyboardInterrupt: print('Exiting from training early')``).
    Nothing then tells the session that training stopped short, and it would record the
    run as finished past its newest checkpoint. The previous handler (Python's, or the
    script's) still runs, unchanged: the script sees what it always saw. Not installed
    where SIGINT is ignored or kills (no Python handler to chain to), nor where SIGINT
    is a configured stop signal (the :class:`SignalTrap` has it).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.received: list[float] = []
        self._previous: Callable[[int, FrameType | None], object] | None = None

    def install(self) -> "InterruptWatch":
        previous = signal.getsignal(signal.SIGINT)
        if callable(previous) and threading.current_thread() is threading.main_thread():
            self._previous = previous
            signal.signal(signal.SIGINT, self._note)
        return self

    def restore(self) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._note:
            signal.signal(signal.SIGINT, self._previous)  # a handler the script set since stays
        self._previous = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(self._clock())  # a list append only, as in SignalTrap._record
        if self._previous is not None:
            self._previous(signum, frame)
