"""A Ctrl-C (SIGINT) that the script catches, as pytorch/examples' word language model does, is recorded as an
interrupted launch with its newest checkpoint, never as finished; the next launch says what it trains again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import jobwrap
from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap.testing import assert_same_run

# pytorch/examples/word_language_model/main.py's shape: `try: for epoch ...: train() except KeyboardInterrupt`.
CATCHES_CTRL_C = '''\
import random

import numpy
import torch
from torch.utils.data import DataLoader, TensorDataset

import jobwrap

random.seed(0)
numpy.random.seed(0)
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8, shuffle=True)


def train(job):
    for x, y in job.loader(data):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()


with jobwrap.Session() as job:
    job.track(model=model, optimizer=optimizer)
    try:
        for epoch in job.epochs(2):
            train(job)
    except KeyboardInterrupt:
        print("Exiting from training early", flush=True)
'''


def _launch(script: Path, directory: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JOBWRAP_DIR": str(directory), "JOBWRAP_NO_SLURM": "1", **env})


def _interrupt_at(script: Path, directory: Path, step: int, *, goes_on: bool = False) -> tuple[int, str, str]:
    """Run ``script`` held at ``step`` (the test hold), send it a real SIGINT there, return how it ended.

    ``goes_on``: the script trains on and comes back to ``step`` (the broken epoch's steps never counted); its
    hold there ends once the interrupt was recorded at that boundary.
    """
    control = Path(tempfile.mkdtemp(prefix="jobwrap-control-"))
    proc = _launch(script, directory, JOBWRAP_SAVE_EVERY_STEPS="4", JOBWRAP_TEST_HOLD_AT=str(step),
                   JOBWRAP_TEST_CONTROL=str(control))
    held = control / f"held-{step}-r0"
    deadline = time.monotonic() + 120
    while not (held.exists() and held.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never held at step {step}: {proc.communicate(timeout=30)[1][-3000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    while goes_on and not any(e["event"] == "interrupt" for e in read_events(str(directory))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no interrupt event: {proc.communicate(timeout=30)[1][-3000:]}")
        time.sleep(0.01)
    (control / f"done-{step}").touch()
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_ctrl_c_caught_by_the_script_is_recorded_interrupted_and_the_next_launch_says_so(tmp_path):
    """A real SIGINT at step 7 to a script that catches KeyboardInterrupt: it exits 0 but the launch is recorded
    interrupted (exit 130) with its newest checkpoint (step 4), not finished; the next launch warns that steps 5-7
    are trained again, resumes from 4 and ends bit for bit like an uninterrupted run."""
    script = tmp_path / "word_lm.py"
    script.write_text(CATCHES_CTRL_C)
    code, out, err = _interrupt_at(script, tmp_path / "cut", 7)
    assert code == 0 and "Exiting from training early" in out, err[-3000:]
    last = read_events(str(tmp_path / "cut"))[-1]
    assert last["event"] == "exit" and last["code"] == 130 and last["step"] == 7, last
    assert last["reason"].startswith("interrupted: SIGINT (Ctrl-C) at step 7, caught by the script"), last
    assert "the newest checkpoint is step 4" in last["reason"] and "trains steps 5-7 again" in last["reason"]
    assert [c.step for c in CheckpointStore(str(tmp_path / "cut")).committed()] == [4]

    again = _launch(script, tmp_path / "cut")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert ("the previous launch did not finish: SIGINT (Ctrl-C) interrupted it at step 7; resuming from its "
            "newest checkpoint, step 4, so steps 5-7 are trained again") in err
    assert read_events(str(tmp_path / "cut"))[-1]["reason"] == "finished"

    plain = _launch(script, tmp_path / "plain")
    assert plain.communicate(timeout=300) and plain.returncode == 0
    assert_same_run(tmp_path / "plain", tmp_path / "cut")


def test_uncaught_ctrl_c_is_recorded_interrupted_and_the_handler_is_put_back(tmp_path):
    """A KeyboardInterrupt from a real SIGINT that leaves the with block: exit 130, 'not caught', never finished;
    Python's own SIGINT handler is back after the session."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with jobwrap.Session(tmp_path / "ck", environ={}) as job:
            job.track(step_count=0)
            job.step_done()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt lands here
    exit_event = read_events(str(tmp_path / "ck"))[-1]
    assert (exit_event["code"], exit_event["step"]) == (130, 1)
    assert exit_event["reason"].startswith("interrupted: SIGINT (Ctrl-C) at step 1, not caught; no checkpoint")
    assert signal.getsignal(signal.SIGINT) is before


def test_training_on_after_a_caught_ctrl_c_is_warned_at_the_next_boundary(tmp_path):
    """A script that catches KeyboardInterrupt inside its epoch loop and goes on to the next epoch: the next boundary
    warns that the run is no longer the uninterrupted one, records an interrupt event, and the end is interrupted."""
    script = tmp_path / "goes_on.py"
    script.write_text(CATCHES_CTRL_C.replace(
        "    try:\n        for epoch in job.epochs(2):\n            train(job)\n    except KeyboardInterrupt:\n",
        "    for epoch in job.epochs(2):\n        try:\n            train(job)\n        except KeyboardInterrupt:\n"
        "    "))
    assert "        except KeyboardInterrupt:\n            print(" in script.read_text()
    code, out, err = _interrupt_at(script, tmp_path / "ck", 3, goes_on=True)
    assert code == 0 and "Exiting from training early" in out, err[-3000:]
    assert err.count("SIGINT (Ctrl-C) interrupted training and the script caught it and went on, now at step 3, "
                     "epoch 1") == 1, err[-3000:]
    events = read_events(str(tmp_path / "ck"))
    assert [(e["step"], e["epoch"]) for e in events if e["event"] == "interrupt"] == [(3, 1)]
    assert events[-1]["code"] == 130 and events[-1]["reason"].startswith(
        "interrupted: SIGINT (Ctrl-C) at step 11, caught by the script")
