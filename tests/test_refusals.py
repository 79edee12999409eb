"""Accepted at start, failing at the signal: now refused at start (settings, track()) or at the first boundary
(state that weights_only cannot load back); an intact checkpoint it refuses stops the start, nothing set aside."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy
import pytest
import torch
from torch import nn

import jobwrap
from jobwrap._config import ENV_VARS, load_config
from jobwrap._loop import payload
from jobwrap._storage.savable import prove
from jobwrap._storage.store import CheckpointStore
from jobwrap.errors import ConfigError, UnreadableStateError


def _session(directory, **settings):
    return jobwrap.Session(str(directory), environ={}, **settings)


class Counter:
    """A tracked object of the user's: its state turns into a NumPy scalar once ``numpy_after`` steps ran."""

    def __init__(self, numpy_after: int | None = 0) -> None:
        self.count = 0
        self.numpy_after = numpy_after

    def step(self) -> None:
        self.count += 1

    def state_dict(self) -> dict:
        if self.numpy_after is not None and self.count >= self.numpy_after:
            return {"count": self.count, "ema": numpy.float64(0.5)}
        return {"count": self.count, "ema": 0.5}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


# ------------------------------------------------------------ settings, type-checked when built

BAD_SETTINGS = [
    ("grace_seconds", "120"), ("grace_seconds", float("nan")), ("grace_seconds", 0), ("keep_last", "3"),
    ("keep_last", True), ("keep_last", 2.0), ("save_every_steps", "10"), ("save_every_seconds", "60"),
    ("save_every_seconds", float("inf")), ("max_requeues", 1.5), ("max_no_progress", None), ("adopt", "yes"),
    ("save_at_end", 1), ("async_save", "false"), ("lazy_copy", 0), ("break_lock", "1"),
    ("allow_world_size_change", 1), ("requeue_on_exit_signals", "no"), ("file_mode", "600"),
    ("file_mode", 0o10600), ("device", 0), ("on_save_error", 1), ("sync_every_steps", "2"),
    ("stripe_min_bytes", 1e9), ("lock_timeout", "120"), ("run_id", 7), ("init_from", 3), ("save_every", 1),
    ("requeue_signals", 10.5), ("exit_signals", [True]), ("test_hold_at", "5"), ("test_control", 1),
]


@pytest.mark.parametrize("field,value", BAD_SETTINGS, ids=[f"{f}={v!r}" for f, v in BAD_SETTINGS])
def test_every_setting_of_the_wrong_type_is_refused_when_built(tmp_path, field, value):
    """A setting of the wrong type or range fails at Session() with a ConfigError naming the setting (and its
    variable), before anything is trapped or claimed."""
    settings = {field: value}
    if value is None:  # load_config drops None arguments: None reaches Config only when passed to it directly
        with pytest.raises(ConfigError, match=field):
            jobwrap.Config(directory=str(tmp_path), **settings)
        return
    with pytest.raises(ConfigError, match=field) as raised:
        _session(tmp_path / "ck", **settings)
    if field in ENV_VARS and "expected" in str(raised.value):  # a type error names the variable too
        assert ENV_VARS[field] in str(raised.value)
    assert not (tmp_path / "ck").exists()


def test_good_settings_of_every_type_still_build(tmp_path):
    """Ints for seconds, a list of hold steps, a PathLike directory and a torch.device string all build."""
    config = load_config({}, directory=tmp_path, grace_seconds=120, lock_timeout=30, save_every_seconds=5,
                         test_hold_at=[3, 4], requeue_signals=["USR2"], device="cpu", init_from=tmp_path / "x.pt")
    assert config.grace_seconds == 120.0 and isinstance(config.grace_seconds, float)
    assert config.test_hold_at == (3, 4) and config.directory == str(tmp_path)


def test_grace_seconds_string_from_the_environment_is_refused_at_start(tmp_path):
    """The issue's script: Session(grace_seconds=os.environ[...]) exits at start naming grace_seconds, before
    any step, instead of failing hours later at the signal's save."""
    script = ("import os, jobwrap\n"
              "with jobwrap.Session(os.environ['CK'], grace_seconds=os.environ['GRACE']) as job:\n"
              "    print('STEP', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "CK": str(tmp_path / "ck"),
                                                               "GRACE": "120"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "STEP" not in done.stdout
    assert "grace_seconds='120'" in done.stderr and "float('120')" in done.stderr


# ------------------------------------------------------------ track(), refused at the call

def test_tracking_a_class_instead_of_an_object_is_refused(tmp_path):
    """job.track(scheduler=StepLR) (the class) fails at the call, naming the name and the instance to pass."""
    with _session(tmp_path) as job:
        with pytest.raises(ConfigError, match=r"'scheduler'.*class torch\.optim\.lr_scheduler\.StepLR.*StepLR\("):
            job.track(scheduler=torch.optim.lr_scheduler.StepLR)
        with pytest.raises(ConfigError, match="'model'.*class"):
            job.track(model=nn.Linear)


def test_half_stateful_object_is_refused(tmp_path):
    """An object with state_dict() but no load_state_dict() fails at track(), naming the missing method."""
    class SaveOnly:
        def state_dict(self):
            return {}

    with _session(tmp_path) as job:
        with pytest.raises(ConfigError, match="'thing'.*no load_state_dict"):
            job.track(thing=SaveOnly())


def test_failing_state_dict_is_refused_at_track(tmp_path):
    """A tracked object whose state_dict() raises fails at track(), naming it, instead of at every save."""
    class Broken(Counter):
        def state_dict(self):
            raise RuntimeError("not set up")

    with _session(tmp_path) as job:
        with pytest.raises(ConfigError, match="'thing'.*state_dict\\(\\) fails.*not set up"):
            job.track(thing=Broken())


# ------------------------------------------------------------ state proven loadable

def test_numpy_scalar_in_a_state_dict_is_refused_at_track(tmp_path):
    """A state_dict() holding a NumPy scalar fails at track(), naming the object, the key and the type."""
    with _session(tmp_path) as job:
        with pytest.raises(ConfigError, match=r"'counter'.*counter\['ema'\].*numpy\.float64.*float\(x\)"):
            job.track(counter=Counter(numpy_after=0))
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path))


def test_numpy_scalar_after_the_first_step_is_refused_at_the_first_boundary(tmp_path):
    """State that turns unloadable during the first step (an optimizer's, a counter's) fails at the first
    boundary, before any checkpoint of it is committed, even with a signal pending there."""
    counter = Counter(numpy_after=1)
    with pytest.raises(ConfigError, match=r"counter\['ema'\].*numpy\.float64"):
        with _session(tmp_path, save_every_steps=1) as job:
            job.track(counter=counter)
            counter.step()
            os.kill(os.getpid(), signal.SIGUSR1)
            job.step_done()
    assert not CheckpointStore(str(tmp_path)).committed()


def test_numpy_scalar_after_a_step_is_refused_by_a_save_before_any_boundary(tmp_path):
    """A loop body that calls job.save() after its first step, before the next boundary, is refused there too:
    no checkpoint that no resume could read is committed."""
    counter = Counter(numpy_after=1)
    with pytest.raises(ConfigError, match=r"counter\['ema'\]"):
        with _session(tmp_path, async_save=False) as job:
            job.track(counter=counter)
            for _ in job.loader([0, 1, 2]):
                counter.step()
                job.save()  # the batch counts as trained: step 1
    assert not CheckpointStore(str(tmp_path)).committed()


def test_optimizer_and_model_states_prove_loadable():
    """What jobwrap tracks every day (a model, Adam after a step, StepLR, GradScaler) passes the proof."""
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    for name, obj in {"model": model, "optimizer": optimizer,
                      "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1),
                      "scaler": torch.amp.GradScaler("cpu")}.items():
        prove(name, obj.state_dict())


def _plant_numpy_checkpoint(directory) -> CheckpointStore:
    """A run at step 1, then a step-2 checkpoint jobwrap committed with a NumPy scalar in it (as before the
    proof existed): intact, its checksum right, but weights_only cannot load it."""
    with _session(directory) as job:
        job.track(counter=Counter(numpy_after=None))
        job.step_done()
        job.save()
    store = CheckpointStore(str(directory))
    loaded = payload.whole(store, store.committed()[0])
    loaded["counter"] = {"count": 2, "ema": numpy.float64(0.5)}
    loaded["step"] = 2
    store.save(loaded, step=2, epoch=0, meta={"run_id": loaded["jobwrap"]["run_id"]})
    return store


def test_intact_checkpoint_weights_only_refuses_stops_the_start_and_sets_nothing_aside(tmp_path):
    """An intact checkpoint that weights_only refuses stops every start with an error naming the type and the
    way out; no file is renamed *.corrupt-*, and the next start says the same (no silent restart at step 0)."""
    _plant_numpy_checkpoint(tmp_path)
    before = sorted(os.listdir(tmp_path))
    for _ in range(2):
        with pytest.raises(UnreadableStateError, match=r"step-000000000002\.pt.*numpy.*Nothing was set aside"):
            with _session(tmp_path) as job:
                job.track(counter=Counter(numpy_after=None))
        assert sorted(n for n in os.listdir(tmp_path) if n != "events.jsonl") == \
            sorted(n for n in before if n != "events.jsonl")
    assert not [n for n in os.listdir(tmp_path) if ".corrupt-" in n]
