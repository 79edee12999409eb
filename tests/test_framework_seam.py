"""The seam a framework's own loop drives a Session through (jobwrap/_loop/framework.py), in process."""
from __future__ import annotations

import logging
import os
import signal

import pytest
import torch

import jobwrap
from jobwrap._storage.events import read_events

DREW = "drew from a random stream between job.track()"


def _job(directory) -> jobwrap.Session:
    return jobwrap.Session(directory, save_every_steps=None, save_at_end=False)


def test_framework_step_is_the_boundary_and_framework_counts_is_not(tmp_path):
    """A signal waits through framework_counts() and commits at the next framework_step's step and epoch."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(jobwrap.Preempted) as stopped:
        with _job(tmp_path) as job:
            job.hand_data_to_framework()
            job.track(model=model)
            job.framework_ready()
            job.framework_step(step=1, epoch=0)
            os.kill(os.getpid(), signal.SIGUSR1)
            job.framework_counts(step=4, epoch=1)  # an epoch's last batch: no boundary, the signal waits
            job.framework_counts(epoch=1)
            assert job.should_stop and (job.step, job.epoch) == (4, 1)
            job.framework_step(step=5, epoch=1)
    assert (stopped.value.checkpoint.step, stopped.value.checkpoint.epoch) == (5, 1)
    assert [e["step"] for e in read_events(str(tmp_path)) if e["event"] == "signal"] == [5]


def _resume_and_draw(directory, caplog, framework_draws: bool) -> list[str]:
    """Resume, draw from torch's stream between track() and the first boundary, return the warnings."""
    with _job(directory) as job:
        job.track(model=torch.nn.Linear(2, 2))
        job.framework_step(step=1, epoch=0)
        job.save()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jobwrap"), _job(directory) as job:
        job.hand_data_to_framework()
        job.track(model=torch.nn.Linear(2, 2))
        if framework_draws:
            with job.framework_draws():
                torch.rand(3)  # the framework's own rebuild of its loaders (a shuffle seed)
        else:
            torch.rand(3)
        job.framework_ready()
    return [r.getMessage() for r in caplog.records if DREW in r.getMessage()]


def test_draws_inside_framework_draws_are_not_warned_of(tmp_path, caplog):
    """A draw before the first resumed step warns, unless it is made inside framework_draws()."""
    assert _resume_and_draw(tmp_path / "outside", caplog, framework_draws=False)
    assert not _resume_and_draw(tmp_path / "inside", caplog, framework_draws=True)


def test_requeue_through_hands_the_requeue_to_another_scheduler(tmp_path):
    """After the signal's commit, the scheduler given to requeue_through() is asked to requeue."""
    asked = []

    class Requeuer:
        name = "test"

        def requeue(self) -> int:
            asked.append(True)
            return 0

    with pytest.raises(jobwrap.Preempted) as stopped:
        with _job(tmp_path) as job:
            job.requeue_through(Requeuer())
            job.track(model=torch.nn.Linear(2, 2))
            os.kill(os.getpid(), signal.SIGUSR1)
            job.step_done()
    assert asked == [True] and stopped.value.requeued
