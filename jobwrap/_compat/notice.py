"""What an adapter says when it does not recognise another project's internal: the same words everywhere.

A canary (tests/test_compat.py) fails with :func:`changed`'s text; at run time the adapter
falls back to a safe path and warns once per internal with :func:`fall_back`, or refuses
with a message built on :func:`changed` that adds the way out.
"""
from __future__ import annotations

import importlib.metadata
import logging

log = logging.getLogger("jobwrap")
_warned: set[str] = set()  # internals already warned about in this process


def installed(distribution: str) -> str:
    """The installed version of ``distribution`` (``2.13.0``, without a local part like ``+cpu``)."""
    try:
        return importlib.metadata.version(distribution).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def changed(distribution: str, internal: str, adapter: str, difference: str, checked: str) -> str:
    """One line naming the internal, the installed and the checked versions, and the adapter to look at."""
    return (f"{distribution} {installed(distribution)} changed `{internal}` ({difference}): "
            f"jobwrap/_compat/{adapter} was checked on {distribution} {checked} and needs a look")


def fall_back(text: str, safe_path: str) -> None:
    """Warn once per process and internal that jobwrap takes ``safe_path`` instead of the fast one."""
    if text in _warned:
        return
    _warned.add(text)
    log.warning("%s; jobwrap %s instead", text, safe_path)
