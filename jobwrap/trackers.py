"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) that continue across requeues.

Every launch of one jobwrap run logs into one tracker run, from the step its
resumed state is at::

    with jobwrap.Session() as job:
        writer = jobwrap.trackers.tensorboard_writer(job, "tb")      # or
        run = jobwrap.trackers.wandb_init(job, project="p")          # or
        jobwrap.trackers.mlflow_run(job, experiment_name="e")
        ...
        for batch in job.loader(loader):
            loss = train_step(batch)
            writer.add_scalar("loss", loss, job.step)   # job.step: the steps done before this one

The tracker run is named by :func:`run_key`, which every launch of the run
computes alike. A launch that dies without a signal's checkpoint (SIGKILL, a
node failure) has logged steps past its last commit; the next launch trains
them again from the commit, bit for bit, and logs them again. What each
tracker makes of that (docs/integrations.md, "Experiment trackers"):

- TensorBoard: the writer opens with ``purge_step`` at the first step the
  launch trains: TensorBoard drops every earlier event at or past it.
- W&B: the run is resumed by id (``resume="allow"``); W&B keeps what was
  logged, so a step logged before the kill and again after it holds the same
  value twice. W&B's own process writes what it is given every 15 s by
  default and has no flush to call: jobwrap sets the interval to 0.25 s
  (``WANDB__TRANSACTION_LOG_FLUSH_INTERVAL``, unless set). ``rewind=True``
  asks W&B to rewind the run to the first step instead (``resume_from``;
  W&B's server does it, also for an offline run's ``wandb sync``).
- MLflow: the run is found again by its tag; MLflow cannot delete a metric, so
  a step logged twice holds two equal values (the last one wins), and the tag
  ``jobwrap.resumed_at`` lists the step each launch started from.

TensorBoard's writer and MLflow's asynchronous logging are flushed before each
checkpoint (:meth:`jobwrap.Session.on_checkpoint`), so a step logged before a
commit is on disk once the commit is: a kill loses no step that the next
launch does not log again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any

from jobwrap._compat import lightning_loggers as logger_internals
from jobwrap._compat import wandb as wandb_internals
from jobwrap._storage.store import RUN_FILE
from jobwrap.errors import ConfigError

if TYPE_CHECKING:
    from jobwrap._loop.session import Session

__all__ = ["mlflow_run", "run_key", "tensorboard_writer", "wandb_init"]

log = logging.getLogger("jobwrap")

#: How often W&B's own process writes what it was given to the run's file (W&B's default: 15 s): a kill loses
#: what it holds, so jobwrap asks for a short interval unless the script chose one.
WANDB_FLUSH_SECONDS = 0.25
#: The MLflow tag that names the jobwrap run an MLflow run belongs to.
MLFLOW_KEY_TAG = "jobwrap.run_key"
#: The MLflow tag listing the step each launch started from (comma-separated).
MLFLOW_RESUMED_TAG = "jobwrap.resumed_at"


def run_key(job: "Session") -> str:
    """The tracker-side id of ``job``'s run, the same at every launch of it (a W&B run id, TensorBoard
    folder, MLflow tag): the run id and 8 hex digits of it with the time the run first claimed its directory.

    The digits keep two runs apart that share a run id (a Slurm job id reused by another cluster).
    """
    job.start()
    record = _read_json(os.path.join(job.config.directory, RUN_FILE)) or {}
    digest = hashlib.sha1(f"{job.run_id}:{record.get('created')}".encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', job.run_id)[:48]}-{digest}"


def tensorboard_writer(job: "Session", log_dir: str | os.PathLike, *, first_step: int | None = None,
                       **kwargs: Any) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir`` that continues the run's curves.

    ``log_dir`` must be the same at every launch (it is the TensorBoard run). ``first_step``: the step
    number of the first step this launch logs, ``job.step`` by default (steps numbered by the steps
    done before them, as ``job.step`` is inside the loop's body). TensorBoard drops any event of an
    earlier launch at that step or later (``purge_step``): a killed launch's steps past its last
    commit, which this launch logs again.
    """
    from torch.utils.tensorboard import SummaryWriter

    job.start()
    if "purge_step" in kwargs:
        raise ConfigError("tensorboard_writer(purge_step=...): the purge step is the step this launch resumes "
                          "at; pass first_step= to number steps otherwise (default: job.step)")
    writer = SummaryWriter(log_dir=os.fspath(log_dir), purge_step=_first(job, first_step), **kwargs)
    job.on_checkpoint(writer.flush)
    return writer


def wandb_init(job: "Session", *, rewind: bool = False, first_step: int | None = None, **kwargs: Any) -> Any:
    """``wandb.init(**kwargs)`` for the run's one W&B run: its id is :func:`run_key` and every launch
    resumes it (``resume="allow"``), online or offline.

    Log each step with ``run.log(..., step=...)`` numbered as ``first_step`` is (``job.step`` by
    default). ``rewind=True``: a launch that resumes a checkpoint rewinds the W&B run to
    ``first_step`` (``resume_from="<id>?_step=<first_step>"``), so the steps a killed launch
    logged past its last commit are dropped by W&B (a W&B preview feature of its server; an
    offline run records it for ``wandb sync``).
    """
    import wandb

    job.start()
    _wandb_flush_often()
    key = kwargs.setdefault("id", run_key(job))
    first = _first(job, first_step)
    if rewind and first > 0:
        kwargs.pop("resume", None)
        kwargs["resume_from"] = f"{key}?_step={first}"
    else:
        kwargs.setdefault("resume", "allow")
    return wandb.init(**kwargs)


def mlflow_run(job: "Session", *, experiment_name: str | None = None, first_step: int | None = None,
               **kwargs: Any) -> Any:
    """``mlflow.start_run`` for the run's one MLflow run: created at the first launch with the tag
    ``jobwrap.run_key`` (:func:`run_key`), found by that tag and continued at every later one.

    MLflow keeps every value logged: a step a killed launch logged past its last commit and this
    launch logs again holds two equal values (the resume is bit-exact; the last one wins). The tag
    ``jobwrap.resumed_at`` lists the step each launch started from (``first_step``, ``job.step`` by
    default). The tracking URI is MLflow's (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``).
    """
    import mlflow

    job.start()
    if experiment_name is not None:
        mlflow.set_experiment(experiment_name)
    run_id = mlflow_run_id(job)
    if run_id is None:
        tags = {**(kwargs.pop("tags", None) or {}), MLFLOW_KEY_TAG: run_key(job)}
        kwargs.setdefault("run_name", run_key(job))
        active = mlflow.start_run(tags=tags, **kwargs)
    else:
        active = mlflow.start_run(run_id=run_id, **kwargs)
    mark_mlflow_resume(active.info.run_id, _first(job, first_step))
    job.on_checkpoint(_mlflow_flush)
    return active


def _wandb_flush_often() -> None:
    """W&B's process writes the run's file every ``WANDB_FLUSH_SECONDS`` (unless the script set the interval),
    and offers no flush to call: a kill loses only what was logged that close before it."""
    wandb_internals.flush_every(WANDB_FLUSH_SECONDS)


def mlflow_run_id(job: "Session", *, tracking_uri: str | None = None) -> str | None:
    """The id of the MLflow run tagged with ``job``'s :func:`run_key`, in any experiment; None before the first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    found = client.search_runs(experiments, filter_string=f"tags.`{MLFLOW_KEY_TAG}` = '{run_key(job)}'",
                               max_results=2)
    if len(found) > 1:
        raise ConfigError(f"two MLflow runs carry the tag {MLFLOW_KEY_TAG}={run_key(job)} "
                          f"({found[0].info.run_id}, {found[1].info.run_id}): delete the one that is not this run's")
    return found[0].info.run_id if found else None


def mark_mlflow_resume(run_id: str, first_step: int, *, tracking_uri: str | None = None) -> None:
    """Append ``first_step`` to the run's ``jobwrap.resumed_at`` tag: where each launch started logging."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    before = client.get_run(run_id).data.tags.get(MLFLOW_RESUMED_TAG)
    client.set_tag(run_id, MLFLOW_RESUMED_TAG, f"{before},{first_step}" if before else str(first_step))


def _mlflow_flush() -> None:
    """Metrics logged with ``synchronous=False`` (the Trainer's callback) reach the store before a checkpoint."""
    import mlflow

    flush = getattr(mlflow, "flush_async_logging", None)
    if flush is not None:
        flush()


def _first(job: "Session", first_step: int | None) -> int:
    return job.step if first_step is None else int(first_step)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------- integrations: Lightning and the Trainer# Lightning makes its loggers' runs (their ``experiment``) before any callback's ``setup``, where the Session
# starts and the run's key and step become known. Preemptible defers them until then (``defer_lightning_loggers``,
# from the moment Lightning hands callbacks the module's ``log``), then names them (``continue_lightning_loggers``).
_LIGHTNING_KINDS = ("TensorBoardLogger", "WandbLogger", "MLFlowLogger")


def _lightning_kind(logger: Any) -> str | None:
    """Which of the loggers jobwrap continues ``logger`` is (by Lightning's class, a user's subclass too)."""
    from pytorch_lightning import loggers

    for name in _LIGHTNING_KINDS:
        if isinstance(logger, getattr(loggers, name)):
            return name
    return None


def defer_lightning_loggers(trainer: Any) -> None:
    """Keep the fit's TensorBoard, W&B and MLflow loggers from making their runs until
    :func:`continue_lightning_loggers` has named them (Lightning makes them before callbacks' ``setup``)."""
    for logger in trainer.loggers:
        kind = _lightning_kind(logger)
        if kind is None or logger_internals.run_made(logger) or hasattr(type(logger), "_jobwrap_made"):
            continue
        difference = logger_internals.unrecognised(kind, logger)
        if difference is not None:
            raise ConfigError(
                f"{difference}. jobwrap names the {kind}'s run after this run through that internal (the "
                f"logger takes its run's name only when made), so without it every relaunch would log into a "
                f"new run: install pytorch-lightning {logger_internals.CHECKED}, or pass logger=False and log "
                f"through jobwrap.trackers")
        logger._jobwrap_version = logger_internals.tensorboard_version(logger)  # a TensorBoard version of the user's
        logger.__class__ = _deferred(type(logger))


def _deferred(cls: type) -> type:
    """``cls`` whose ``experiment`` is None until :func:`continue_lightning_loggers` puts ``cls`` back."""
    class Deferred(cls):  # type: ignore[misc, valid-type]
        _jobwrap_made = cls

        @property
        def experiment(self) -> Any:
            return None  # Lightning only touches it to make it early

    Deferred.__name__ = Deferred.__qualname__ = cls.__name__
    return Deferred


def continue_lightning_loggers(trainer: Any, job: "Session") -> None:
    """Name each deferred logger's run after ``job``'s run and make it, continuing at the resumed step.

    Lightning logs a step under the steps done before it (``_batches_that_stepped``), as ``job.step``
    counts, so the first step this launch logs is ``job.step``. A logger whose run was made before the fit
    (``logger.experiment`` used before ``trainer.fit``) cannot be renamed: refused.
    """
    for logger in trainer.loggers:
        kind = _lightning_kind(logger)
        original = getattr(type(logger), "_jobwrap_made", None)
        if kind is None:
            continue
        if original is None and getattr(logger, "_jobwrap_named", False):
            continue  # a second fit of the same trainer: named by the first
        if original is None:
            raise ConfigError(
                f"the {kind}'s run was made before trainer.fit() started (logger.experiment was used), so "
                f"jobwrap could not name it after this run and every relaunch would log into a new one: "
                f"use logger.experiment only inside the fit (a hook, the LightningModule), or pass "
                f"logger=False and log through jobwrap.trackers")
        logger.__class__ = original
        logger._jobwrap_named = True
        if trainer.is_global_zero:
            _name_lightning_logger(kind, logger, job)
            _ = logger.experiment
            if kind == "MLFlowLogger":
                mark_mlflow_resume(logger.run_id, job.step, tracking_uri=logger_internals.mlflow_tracking_uri(logger))
            if kind == "TensorBoardLogger":
                job.on_checkpoint(logger.experiment.flush)


def _name_lightning_logger(kind: str, logger: Any, job: "Session") -> None:
    key = run_key(job)
    if kind == "TensorBoardLogger":
        version = logger._jobwrap_version if logger._jobwrap_version is not None else key
        logger_internals.name_tensorboard(logger, version, purge_step=job.step)
    elif kind == "WandbLogger":
        _wandb_flush_often()
        logger_internals.name_wandb(logger, key)
    elif kind == "MLFlowLogger" and not logger_internals.mlflow_run_given(logger):
        run_id = mlflow_run_id(job, tracking_uri=logger_internals.mlflow_tracking_uri(logger))
        logger_internals.name_mlflow(logger, run_id=run_id, tags={MLFLOW_KEY_TAG: key}, run_name=key)


# The Trainer's reporting callbacks (report_to=) make their runs at on_train_begin, after attach().
def continue_trainer_reporters(trainer: Any, job: "Session") -> None:
    """Name the runs of the Trainer's TensorBoard, W&B and MLflow callbacks after ``job``'s run.

    The Trainer logs a step under its ``global_step`` once the step is done, so the first step a
    resumed launch logs is one past ``job.step``. TensorBoard: a writer with ``purge_step`` in
    ``<output_dir>/runs/<run key>`` (or ``TENSORBOARD_LOGGING_DIR``); W&B: ``WANDB_RUN_ID`` and
    ``WANDB_RESUME=allow`` (unless set); MLflow: the run found by its tag (or made with it), active
    before the callback starts, which then logs into it.
    """
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    first = job.step + 1
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            if callback.tb_writer is not None:
                log.warning("the Trainer's TensorBoardCallback has a writer of its own: jobwrap leaves it as it is, "
                            "and a relaunch's steps are not purged from it")
                continue
            folder = callback.logging_dir or os.path.join(trainer.args.output_dir, "runs", run_key(job))
            callback.tb_writer = tensorboard_writer(job, folder, first_step=first)
        elif isinstance(callback, WandbCallback):
            _wandb_flush_often()
            os.environ.setdefault("WANDB_RUN_ID", run_key(job))
            os.environ.setdefault("WANDB_RESUME", "allow")
        elif isinstance(callback, MLflowCallback):
            import mlflow

            if mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID"):
                mlflow_run(job, experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME"), first_step=first)
