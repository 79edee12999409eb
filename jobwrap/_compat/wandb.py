"""The W&B setting jobwrap.trackers relies on (checked on wandb 0.31.0).

W&B's own process writes what a run logs to the run's file every 15 s by default and offers
no flush to call, so a kill loses up to 15 s of logged steps: with periodic saves only, steps
logged before a commit would be missing from the run after it (a gap). The interval is an
internal setting (``x_transaction_log_flush_interval``, set through its ``WANDB__`` variable).
A W&B without it trains as exactly, but a kill may leave that gap: jobwrap warns once and goes
on. The canary is in tests/test_compat.py.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

from jobwrap._compat.notice import changed, fall_back

CHECKED = "0.31.0"
SETTING = "x_transaction_log_flush_interval"
VARIABLE = "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"


def flush_every(seconds: float, environ: MutableMapping[str, str] = os.environ) -> None:
    """Ask W&B's process to write the run's file every ``seconds``, unless the script chose an interval."""
    difference = unrecognised()
    if difference is not None:
        fall_back(difference, "leaves W&B's own interval (a kill may lose the steps it held)")
        return
    environ.setdefault(VARIABLE, str(seconds))


def unrecognised() -> str | None:
    """None where this W&B has the setting; else what changed."""
    from wandb import Settings

    if SETTING in getattr(Settings, "model_fields", {}):
        return None
    return changed("wandb", f"Settings.{SETTING}", "wandb.py", "it is gone", CHECKED)
