"""Lightning's logger internals that jobwrap.trackers relies on, one adapter each (checked on pytorch-lightning
2.6.6).

Lightning's ``TensorBoardLogger``, ``WandbLogger`` and ``MLFlowLogger`` take their run's name only
in their constructor and make the run the first time ``logger.experiment`` is read, early in
``fit()``. To name that run after the jobwrap run (one tracker run across requeues), jobwrap
holds them back when Lightning hands each callback the module's ``log`` (before any logger
makes its run) and names them in ``Preemptible.setup``, through the attributes below. A
Lightning whose loggers lack one is refused when the fit starts (:func:`unrecognised`),
naming the internal: without it, each relaunch would log into a new run or at step 0. Each
adapter has its canary in tests/test_compat.py.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from jobwrap._compat.notice import changed

CHECKED = "2.6.6"
ADAPTER = "lightning_loggers.py"
DISTRIBUTION = "pytorch-lightning"


def _changed(internal: str, difference: str) -> str:
    return changed(DISTRIBUTION, internal, ADAPTER, difference, CHECKED)


def trainer_of_log(log_fn: Any) -> Any:
    """The trainer of the module whose ``log`` Lightning hands each callback (``module._trainer``; None when
    unattached: the public ``module.trainer`` raises there)."""
    return getattr(getattr(log_fn, "__self__", None), "_trainer", None)


def run_made(logger: Any) -> bool:
    """Whether ``logger`` made its run already (``_experiment``; MLflow's ``_initialized``)."""
    return getattr(logger, "_experiment", None) is not None or bool(getattr(logger, "_initialized", False))


def tensorboard_version(logger: Any) -> Any:
    """The version (sub-folder) a ``TensorBoardLogger`` was given by its user (``_version``), or None."""
    return getattr(logger, "_version", None)


def name_tensorboard(logger: Any, version: Any, purge_step: int) -> None:
    """Log into ``version``'s folder, its writer opened with ``purge_step`` (``_version``, ``_kwargs``: what
    the logger hands ``SummaryWriter``)."""
    logger._version = version
    logger._kwargs["purge_step"] = purge_step


def name_wandb(logger: Any, run_id: str) -> None:
    """Resume the W&B run ``run_id`` unless the user named one (``_wandb_init``: ``wandb.init``'s arguments)."""
    if logger._wandb_init.get("id") is None:
        logger._wandb_init["id"] = logger._id = run_id
    logger._wandb_init.setdefault("resume", "allow")


def mlflow_tracking_uri(logger: Any) -> str | None:
    """Where an ``MLFlowLogger`` logs (``_tracking_uri``)."""
    return logger._tracking_uri


def mlflow_run_given(logger: Any) -> bool:
    """Whether the user handed the logger a run id (``_run_id``) of their own."""
    return logger._run_id is not None


def name_mlflow(logger: Any, *, run_id: str | None, tags: dict[str, str], run_name: str) -> None:
    """Log into the run ``run_id``, or make one with ``tags`` named ``run_name`` unless the user named it
    (``_run_id``, ``_run_name``)."""
    if run_id is not None:
        logger._run_id = run_id
        return
    logger.tags = {**(logger.tags or {}), **tags}
    logger._run_name = logger._run_name or run_name


# ---------------------------------------------------------------- is this Lightning the one these were checked on
def _has(logger: Any, *names: str) -> str | None:
    missing = next((name for name in names if not hasattr(logger, name)), None)
    return None if missing is None else _changed(f"{type(logger).__name__}.{missing}", "it is gone")


def _kwargs_dict(logger: Any) -> str | None:
    found = _has(logger, "_version", "_kwargs", "_experiment")
    if found is None and not isinstance(logger._kwargs, dict):
        return _changed("TensorBoardLogger._kwargs", "it is no dict of SummaryWriter's arguments")
    return found


def _wandb_init_dict(logger: Any) -> str | None:
    found = _has(logger, "_wandb_init", "_id", "_experiment")
    if found is None and not isinstance(logger._wandb_init, dict):
        return _changed("WandbLogger._wandb_init", "it is no dict of wandb.init's arguments")
    return found


#: What each logger kind needs (checked on the fit's loggers before they are held back; one canary each).
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "TensorBoardLogger": _kwargs_dict,
    "WandbLogger": _wandb_init_dict,
    "MLFlowLogger": lambda logger: _has(logger, "_run_id", "_run_name", "_tracking_uri", "_initialized", "tags"),
}


def unrecognised(kind: str, logger: Any) -> str | None:
    """None where ``logger`` (of ``kind``) has every internal its adapters above reach; else the first missing."""
    return CHECKS[kind](logger)


def hands_callbacks_the_log() -> bool:
    """Whether Lightning still sets each callback's ``log`` when a fit starts, the moment the loggers are held
    back (canary only: it reads Lightning's source)."""
    from pytorch_lightning.trainer.connectors.callback_connector import _CallbackConnector

    source = inspect.getsource(_CallbackConnector._attach_model_logging_functions)
    return "callback.log = " in source
