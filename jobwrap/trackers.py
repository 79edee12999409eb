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
  value twice. ``rewind=True`` asks W&B to rewind the run to the first step
  instead (``resume_from``; W&B's server does it, also for an offline run's
  ``wandb sync``).
- MLflow: the run is found again by its tag; MLflow cannot delete a metric, so
  a step logged twice holds two equal values (the last one wins), and the tag
  ``jobwrap.resumed_at`` lists the step each launch started from.

Every writer is flushed before each checkpoint (:meth:`jobwrap.Session.on_checkpoint`),
so a step logged before a commit is on disk once the commit is: a kill loses
no step that the next launch does not log again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable

from jobwrap._storage.store import RUN_FILE
from jobwrap.errors import ConfigError

if TYPE_CHECKING:
    from jobwrap._loop.session import Session

__all__ = ["mlflow_run", "run_key", "tensorboard_writer", "wandb_init"]

log = logging.getLogger("jobwrap")

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


def mlflow_run_id(job: "Session") -> str | None:
    """The id of the MLflow run tagged with ``job``'s :func:`run_key`, in any experiment; None before the first."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    found = client.search_runs(experiments, filter_string=f"tags.`{MLFLOW_KEY_TAG}` = '{run_key(job)}'",
                               max_results=2)
    if len(found) > 1:
        raise ConfigError(f"two MLflow runs carry the tag {MLFLOW_KEY_TAG}={run_key(job)} "
                          f"({found[0].info.run_id}, {found[1].info.run_id}): delete the one that is not this run's")
    return found[0].info.run_id if found else None


def mark_mlflow_resume(run_id: str, first_step: int) -> None:
    """Append ``first_step`` to the run's ``jobwrap.resumed_at`` tag: where each launch started logging."""
    from mlflow import MlflowClient

    client = MlflowClient()
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


# ---------------------------------------------------------------- integrations: Lightning and the Trainer
Flush = Callable[[], None]
