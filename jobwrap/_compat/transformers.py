"""transformers internals that jobwrap.transformers relies on, one adapter each (checked on transformers 5.25.0).

The Trainer writes its checkpoint folder only at its own save steps; jobwrap needs one at the
step a signal stops at, written by the same code so that the Trainer's own resume reads it.
``Trainer._save_checkpoint`` is that code (behind every periodic save). No exact fallback
exists: :func:`unrecognised` is checked when the Trainer is attached, and a Trainer without
the method as 5.25.0 has it is refused there, naming the version, not at the signal.
Its canary is in tests/test_compat.py.
"""
from __future__ import annotations

import inspect
from typing import Any

from jobwrap._compat.notice import changed

CHECKED = "5.25.0"
ADAPTER = "transformers.py"


def save_checkpoint(trainer: Any) -> None:
    """``trainer._save_checkpoint(model, trial=None)``: the Trainer's folder ``checkpoint-<global step>`` written
    now, as its periodic saves write it (weights, optimizer, scheduler, scaler, RNG streams, trainer state)."""
    trainer._save_checkpoint(trainer.model_wrapped, trial=None)


def unrecognised(trainer: Any) -> str | None:
    """None where ``trainer`` has ``_save_checkpoint(model, trial)`` as transformers 5.25.0 has it; else what
    differs."""
    method = getattr(trainer, "_save_checkpoint", None)
    if not callable(method):
        return changed("transformers", "Trainer._save_checkpoint", ADAPTER, "it is gone", CHECKED)
    try:
        params = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return changed("transformers", "Trainer._save_checkpoint", ADAPTER, "its signature cannot be read", CHECKED)
    if params[:2] != ["model", "trial"]:
        return changed("transformers", "Trainer._save_checkpoint", ADAPTER, f"its parameters are {params}", CHECKED)
    return None
