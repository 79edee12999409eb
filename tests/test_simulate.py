"""`jobwrap simulate` on real training commands, and the `jobwrap_preempt` pytest fixture."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from jobwrap.commands.simulate import parse_steps
from jobwrap.errors import ConfigError
from jobwrap.testing import assert_same_run, final_state, random_steps

TRAIN = Path(__file__).resolve().parent.parent / "examples" / "train.py"
# A script whose resume is wrong on purpose: the optimizer is not tracked, so Adam's moments restart.
FORGETFUL = '''\
import torch
import jobwrap

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
x = torch.randn(32, 4)
with jobwrap.Session() as job:
    job.track(model=model)
    while job.step < 12:
        optimizer.zero_grad()
        ((model(x) - 1) ** 2).mean().backward()
        optimizer.step()
        job.step_done()
    job.save()
'''

# A good resume through job.loader whose Python and NumPy streams are never seeded (numpy is imported, not drawn
# from): each run starts them from the OS's entropy, so two plain runs differ there too, and only there.
UNSEEDED_LOADER = '''\
import numpy
import torch
from torch.utils.data import DataLoader, TensorDataset
import jobwrap

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8, shuffle=True)
with jobwrap.Session() as job:
    job.track(model=model, optimizer=optimizer)
    for epoch in job.epochs(2):
        for x, y in job.loader(data):
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()
'''


def _simulate(tmp_path, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jobwrap", "simulate", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def test_step_choices():
    """--at parses and sorts; --random is reproducible from the seed and stays inside the run."""
    assert parse_steps("17, 5,5") == [5, 17]
    with pytest.raises(ConfigError):
        parse_steps("five")
    assert random_steps(3, 16, seed=7) == random_steps(3, 16, seed=7)
    assert all(0 <= s < 16 for s in random_steps(3, 16, seed=1)) and len(random_steps(40, 16, 0)) == 16


def test_good_script_passes_with_usr1(tmp_path):
    """The example script, USR1 at steps 3 and 9: exit 0, every check ok, the two runs identical."""
    out = _simulate(tmp_path, "--dir", "sim", "--at", "3,9", "--",
                    sys.executable, str(TRAIN), "--epochs", "2", "--samples", "256")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS: preempted 2 time(s) with SIGUSR1" in out.stdout
    assert "FAIL" not in out.stdout
    record = json.loads((tmp_path / "sim" / "simulate.json").read_text())
    assert record["passed"] and record["signalled"] == [3, 9] and record["total_steps"] == 16
    assert_same_run(tmp_path / "sim" / "plain", tmp_path / "sim" / "preempted")


def test_term_is_relaunched_like_a_requeued_job(tmp_path):
    """TERM means checkpoint and exit: simulate relaunches the command itself, as Slurm would, and it passes."""
    out = _simulate(tmp_path, "--dir", "sim", "--random", "1", "--seed", "3", "--signal", "TERM", "--",
                    sys.executable, str(TRAIN), "--epochs", "1", "--samples", "256")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "with SIGTERM" in out.stdout
    assert "exiting without requeueing" in (tmp_path / "sim" / "preempted.log").read_text()


def test_broken_resume_fails_with_the_difference(tmp_path):
    """A script that forgets to track its optimizer: exit 1, the final-state check names the tensor that differs."""
    (tmp_path / "forgetful.py").write_text(FORGETFUL)
    out = _simulate(tmp_path, "--dir", "sim", "--at", "5", "--", sys.executable, "forgetful.py")
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("same final checkpoint"))
    assert "FAIL" in line and "model" in line
    assert "FAIL: see the checks above" in out.stdout


def test_usage_errors_exit_2(tmp_path, monkeypatch):
    """An untrapped signal, a foreign work directory or no command: exit 2 with the fix named, nothing run."""
    from jobwrap.cli import main

    monkeypatch.delenv("JOBWRAP_REQUEUE_SIGNALS", raising=False)
    monkeypatch.delenv("JOBWRAP_EXIT_SIGNALS", raising=False)
    assert main(["simulate", "--dir", str(tmp_path / "a"), "--signal", "USR2", "--", "python", "x.py"]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.txt").write_text("mine")
    assert main(["simulate", "--dir", str(tmp_path / "busy"), "--", "python", "x.py"]) == 2
    assert (tmp_path / "busy" / "data.txt").exists()
    assert main(["simulate", "--dir", str(tmp_path / "b")]) == 2


def test_pytest_plugin_is_registered():
    """Installing jobwrap registers jobwrap.testing as a pytest plugin (entry point pytest11)."""
    points = metadata.entry_points(group="pytest11")
    assert any(p.value == "jobwrap.testing" for p in points)


def test_jobwrap_preempt_fixture(jobwrap_preempt, tmp_path):
    """The fixture (found through the plugin, not imported here) runs and preempts under tmp_path."""
    cmd = [sys.executable, str(TRAIN), "--epochs", "1", "--samples", "256"]
    plain = jobwrap_preempt(cmd, "plain").check()
    cut = jobwrap_preempt(cmd, "cut", preempt_at=[5]).check()
    assert cut.signalled_at == [5] and cut.directory == tmp_path / "cut"
    assert_same_run(plain.directory, cut.directory)


def test_unseeded_streams_are_named_even_in_the_loaders_epoch_start_copy(tmp_path):
    """job.loader keeps an epoch-start copy of the streams: an unseeded NumPy/Python stream is still diagnosed as
    never seeded (FAIL, but no tensor difference claimed), in both places of the checkpoint."""
    (tmp_path / "unseeded.py").write_text(UNSEEDED_LOADER)
    out = _simulate(tmp_path, "--dir", "sim", "--at", "3,10", "--", sys.executable, "unseeded.py")
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("same final checkpoint"))
    assert "only the Python and NumPy random stream(s) differ" in line and "never seeded" in line, line
    assert "tensors differ" not in out.stdout and "max abs diff" not in out.stdout
    plain = final_state(tmp_path / "sim" / "plain")
    assert "numpy" in plain["jobwrap"]["ranks"][0]["data"]["epoch"]["rng"]  # the copy this test is about
