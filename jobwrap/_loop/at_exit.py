"""Closing a session started without ``with``: at the process's exit, with how the process ended.

A module-level script writes ``job = jobwrap.Session().start()`` and never
closes it; the interpreter's exit does, so the events log still records the end
(``finished``, the ``Preempted`` stop, or the error that ended the script) and
the directory's lock is let go.
"""
from __future__ import annotations

import atexit
import sys
from typing import Any

_open: dict[int, Any] = {}  # id -> session started outside a with block and not closed yet
_hooked = False
_uncaught: list[BaseException] = []


def close_at_exit(session: Any) -> None:
    """Close ``session`` when the interpreter exits, unless the script closes it first."""
    global _hooked
    _open[id(session)] = session
    if not _hooked:
        _hooked = True
        atexit.register(_close_all)
        _chain_excepthook()


def forget(session: Any) -> None:
    """``session`` was closed: nothing left to do at exit."""
    _open.pop(id(session), None)


def _chain_excepthook() -> None:
    """Remember an uncaught error (a SystemExit such as Preempted never reaches the hook)."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        _uncaught.append(exc)
        previous(kind, exc, tb)

    sys.excepthook = hook


def _close_all() -> None:
    for session in list(_open.values()):
        exc = _uncaught[-1] if _uncaught else session._preempted
        try:
            session.close(exc)
        except Exception as failure:  # noqa: BLE001 - at exit there is no caller left to raise to
            print(f"jobwrap: closing the session at exit failed: {failure}", file=sys.stderr)
