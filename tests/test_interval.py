"""save_every="auto": the Young/Daly interval from a run's recorded history, its bounds, its settings."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys

import pytest

from jobwrap._config import load_config
from jobwrap._format import human_duration
from jobwrap._loop.interval import CEILING, FLOOR, PRIOR_MTBI, AutoInterval, choose, young_daly
from jobwrap.errors import ConfigError


@dataclasses.dataclass
class Saved:
    """What the policy reads of a committed checkpoint: its key and its manifest."""

    key: tuple[int, int]
    manifest: dict


def _history():
    """Launch 1: 2 h, periodic background saves pausing 0.2 and 0.4 s, then SIGKILLed (no exit event).
    Launch 2: 1 h, a foreground periodic save of 0.6 s, preempted with a signal and requeued. Launch 3: now."""
    def save(t, step, **fields):
        return {"event": "save", "time": t, "step": step, "reason": "periodic", "bytes": 1, **fields}
    return [
        {"event": "start", "time": 100, "step": 0, "process_started": 0, "restart": 0},
        save(1000, 10, seconds=3.0, background=True, pause=0.2),
        save(2000, 20, seconds=3.0, background=True, pause=0.4),
        {"event": "start", "time": 7300, "step": 20, "resumed_from": "/ck/20", "process_started": 7200, "restart": 1},
        save(9000, 30, seconds=0.6),
        {"event": "signal", "time": 10700, "step": 40, "signal": "SIGUSR1"},
        {"event": "save", "time": 10800, "step": 40, "reason": "signal SIGUSR1", "seconds": 5.0},
        {"event": "exit", "time": 10800, "step": 40, "code": 0, "reason": "requeued"},
        {"event": "start", "time": 11000, "step": 40, "resumed_from": "/ck/40", "process_started": 10900, "restart": 2},
    ]


def test_chosen_interval_is_the_formula_on_a_recorded_history(caplog):
    """sqrt(2 x mean periodic pause x (prior + time run) / (1 + interruptions without warning)), logged with why."""
    caplog.set_level(logging.INFO, logger="jobwrap")
    policy = AutoInterval(_history(), logging.getLogger("jobwrap"))
    ran = 2000 + (10800 - 7200)          # launch 1 to its last event, launch 2 to its exit
    mtbi = (PRIOR_MTBI + ran) / (1 + 1)  # one launch ended without a signal's checkpoint
    cost = (0.2 + 0.4 + 0.6) / 3         # the periodic saves' pauses; the signal's save is not one
    assert policy.choice.seconds == pytest.approx(math.sqrt(2 * cost * mtbi))
    assert policy.choice.mtbi == pytest.approx(mtbi) and policy.choice.cost == pytest.approx(cost)
    assert "save_every=auto: a periodic save every" in caplog.text and "1 such interruption" in caplog.text
    assert not policy.due(policy.choice.seconds - 1) and policy.due(policy.choice.seconds)


def test_interval_is_revised_by_new_saves_and_not_by_a_signals_save():
    """A new periodic save's pause enters the mean (the last five); a signal's save changes nothing."""
    policy = AutoInterval(_history())
    before = policy.choice.seconds
    policy.due(0, Saved((40, 0), {"reason": "signal SIGUSR1", "save_seconds": 9.0}))
    assert policy.choice.seconds == before
    policy.due(0, Saved((50, 0), {"reason": "periodic", "background": True, "stage_seconds": 2.4,
                                  "save_seconds": 30.0}))
    assert policy.choice.cost == pytest.approx((0.2 + 0.4 + 0.6 + 2.4) / 4)
    assert policy.choice.seconds == pytest.approx(max(30.0, young_daly(0.9, policy.mtbi)))
    policy.due(0, Saved((50, 0), {"reason": "periodic", "save_seconds": 100.0}))  # the same checkpoint again
    assert len(policy.costs) == 4


def test_bounds_and_the_unmeasured_start():
    """No save measured: the floor, to measure one; a tiny pause: the floor (or the background write);
    no interruption ever: at most the ceiling."""
    fresh = AutoInterval([{"event": "start", "time": 0, "step": 0}])
    assert fresh.choice.seconds == FLOOR and fresh.choice.cost is None and fresh.choice.mtbi == PRIOR_MTBI
    assert choose(1e-5, PRIOR_MTBI, run=0, seen=0).seconds == FLOOR
    assert choose(1e-5, PRIOR_MTBI, run=0, seen=0, write=42.0).seconds == 42.0
    assert choose(60.0, 1e9, run=1e9, seen=0).seconds == CEILING


def test_save_every_setting():
    """JOBWRAP_SAVE_EVERY=auto is read; any other value, or auto with a fixed interval, is refused naming the fix."""
    assert load_config({"JOBWRAP_SAVE_EVERY": "Auto"}, directory="d").save_every == "auto"
    with pytest.raises(ConfigError, match="save_every_steps or save_every_seconds"):
        load_config({}, directory="d", save_every="100")
    with pytest.raises(ConfigError, match="unset save_every_steps"):
        load_config({"JOBWRAP_SAVE_EVERY_STEPS": "5"}, directory="d", save_every="auto")


def test_session_uses_the_auto_interval_from_the_directorys_history(tmp_path, caplog):
    """A Session with save_every="auto" in a directory with history logs the interval the formula gives."""
    import torch

    import jobwrap

    (tmp_path / "events.jsonl").write_text("".join(json.dumps({**e, "run_id": "r"}) + "\n" for e in _history()[:-1]))
    caplog.set_level(logging.INFO, logger="jobwrap")
    model = torch.nn.Linear(2, 1)
    with jobwrap.Session(str(tmp_path), environ={}, save_every="auto", adopt=True) as job:
        job.track(model=model)
        for _ in job.loader(range(3)):
            pass
    expected = young_daly((0.2 + 0.4 + 0.6) / 3, (PRIOR_MTBI + 2000 + 3600) / 2)
    assert f"a periodic save every {human_duration(expected)}" in caplog.text


def _simulator():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "goodput_sim.py"
    spec = importlib.util.spec_from_file_location("goodput_sim", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["goodput_sim"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_simulator_accounts_for_every_second_of_a_simple_trace():
    """No interruption: goodput = (horizon - restart - load - pauses) / horizon; one without warning after
    the first committed save loses the steps since, one with a warning loses only its emergency save and restart."""
    sim = _simulator()
    model = sim.Model(step=1.0, pause=0.5, write=0.0, emergency=3.0, load=2.0, restart=8.0)
    # 10 s start, then 10 steps + 0.5 s pause per save: saves end at 20.5, 31, ...
    goodput, _ = sim.simulate([], model, sim.fixed(10), 100.0)
    assert goodput == pytest.approx((100 - 10 - 8 * 0.5) / 100)
    unwarned, _ = sim.simulate([(35.0, False)], model, sim.fixed(10), 100.0)
    warned, _ = sim.simulate([(35.0, True)], model, sim.fixed(10), 100.0)
    # unwarned at 35 (4 steps after the save of step 20 at 31): those 4 steps are lost, plus a restart
    assert unwarned < warned < goodput
    assert sim.poisson_trace(1200, 0.2, 3600 * 10, seed=1) == sim.poisson_trace(1200, 0.2, 3600 * 10, seed=1)
