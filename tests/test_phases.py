"""A Session's lifecycle: the table of moves (jobwrap/_loop/phases.py) and the phases a real session goes through."""
from __future__ import annotations

import os
import signal

import pytest
import torch

import jobwrap
from jobwrap._loop.phases import MOVES, STARTED, Phase, PhaseError, move


def test_every_phase_has_its_moves_and_can_be_reached():
    """The table names every phase, and every phase is the target of some move (CREATED: a failed start)."""
    assert set(MOVES) == set(Phase)
    assert {new for targets in MOVES.values() for new in targets} == set(Phase)


@pytest.mark.parametrize("current, new", [
    (Phase.CREATED, Phase.STARTING), (Phase.STARTING, Phase.RESUMING), (Phase.STARTING, Phase.TRAINING),
    (Phase.STARTING, Phase.CREATED), (Phase.RESUMING, Phase.TRAINING), (Phase.TRAINING, Phase.STOPPING),
    (Phase.STOPPING, Phase.PREEMPTED), (Phase.PREEMPTED, Phase.CLOSED), (Phase.CLOSED, Phase.STARTING)])
def test_the_lifecycle_s_own_moves_are_allowed(current, new):
    """The moves docs/design.md draws are in the table."""
    assert move(current, new) is new


@pytest.mark.parametrize("current, new", [
    (Phase.CREATED, Phase.TRAINING), (Phase.CREATED, Phase.CLOSED), (Phase.RESUMING, Phase.STOPPING),
    (Phase.TRAINING, Phase.RESUMING), (Phase.PREEMPTED, Phase.TRAINING), (Phase.CLOSED, Phase.TRAINING),
    (Phase.TRAINING, Phase.PREEMPTED)])
def test_a_forbidden_move_raises_naming_both_phases(current, new):
    """A move outside the table is an internal error naming where it came from and where it went."""
    with pytest.raises(PhaseError, match=f"from {current.value} to {new.value}"):
        move(current, new)


def test_started_phases_are_those_close_undoes():
    """Every started phase may close; CREATED and CLOSED are not started."""
    assert STARTED == set(Phase) - {Phase.CREATED, Phase.CLOSED}
    assert all(Phase.CLOSED in MOVES[p] for p in STARTED)


def test_a_session_goes_through_its_phases_fresh_resumed_and_stopped(tmp_path):
    """Fresh: created, training, closed; resumed: resuming until the first boundary; a signal: preempted."""
    model = torch.nn.Linear(2, 2)
    job = jobwrap.Session(tmp_path, save_every_steps=None)
    assert job._phase is Phase.CREATED
    with job:
        assert job._phase is Phase.TRAINING
        job.track(model=model)
        job.step_done()
        job.save()
    assert job._phase is Phase.CLOSED
    with pytest.raises(jobwrap.Preempted):
        with jobwrap.Session(tmp_path, save_every_steps=None) as job:
            job.track(model=model)
            assert job._phase is Phase.RESUMING
            job.step_done()
            assert job._phase is Phase.TRAINING
            os.kill(os.getpid(), signal.SIGUSR1)
            try:
                job.step_done()
            finally:
                assert job._phase is Phase.PREEMPTED
    assert job._phase is Phase.CLOSED
