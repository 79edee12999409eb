"""`jobwrap simulate` on real training commands, and the `jobwrap_preempt` pytest fixture."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from jobwrap._report.divergence import explain
from jobwrap.commands.simulate import parse_steps
from jobwrap.errors import ConfigError
from jobwrap.testing import assert_same_run, final_state, quick_step, random_steps

TRAIN = Path(__file__).resolve().parent.parent / "examples" / "train.py"
# word_language_model's shape: an LSTM whose hidden state is carried from batch to batch (8 batches an epoch).
LSTM = Path(__file__).resolve().parent / "scripts" / "lstm_lm.py"
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
    # step_done() loop: the resumed launch's first record is after its first step, where Adam's moments restarted
    assert "first differs at step 6 (epoch 0), the first step after the resume from step 5: model:" in out.stdout
    assert "carried state not tracked" in out.stdout and "an optimizer or scheduler not tracked" in out.stdout


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
    assert "first differs at step 0 (epoch 0), before any preemption: the Python and NumPy random stream(s)" \
        in out.stdout
    assert "stream never seeded:" in out.stdout and "carried state" not in out.stdout
    plain = final_state(tmp_path / "sim" / "plain")
    assert "numpy" in plain["jobwrap"]["ranks"][0]["data"]["epoch"]["rng"]  # the copy this test is about


def test_quick_catches_a_hidden_state_carried_but_not_tracked(tmp_path):
    """--quick on a naive LSTM adoption (hidden state carried across batches, untracked): exit 1, the first step
    after the mid-epoch resume named, the cause named as carried state not tracked, the loss values shown."""
    out = _simulate(tmp_path, "--dir", "sim", "--quick", "--", sys.executable, str(LSTM), "--report-loss")
    assert out.returncode == 1, out.stdout + out.stderr
    record = json.loads((tmp_path / "sim" / "simulate.json").read_text())
    (step,) = record["signalled"]
    assert step % 8 != 0, record  # inside an epoch: an epoch's start resets the hidden state in both runs
    summary = next(l for l in out.stdout.splitlines() if l.startswith("first differs"))
    assert summary.startswith(f"first differs at step {step + 1} (epoch {step // 8}), the first step after the "
                              f"resume from step {step}: model: "), summary
    assert "loss " in summary and " uninterrupted vs " in summary and " preempted" in summary, summary
    assert "carried state not tracked: " in out.stdout and "hidden state" in out.stdout
    assert record["first_difference"]["when"] == "first" and record["cause"].startswith("carried state not tracked")
    assert not record["passed"] and record["seconds"] > 0


def test_quick_passes_once_the_hidden_state_is_tracked(tmp_path):
    """The same LSTM with its hidden state tracked (reset at each epoch's start, as the uninterrupted run does):
    --quick passes, every step equal."""
    out = _simulate(tmp_path, "--dir", "sim", "--quick", "--", sys.executable, str(LSTM), "--track-hidden")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS: preempted 1 time(s)" in out.stdout and "every step and the final checkpoint identical" in out.stdout
    line = next(l for l in out.stdout.splitlines() if l.startswith("same at every step"))
    assert "ok" in line, line


def test_fixture_failure_names_the_first_step_and_the_cause(jobwrap_preempt):
    """The jobwrap_preempt fixture traces each run: assert_same_run's failure gives simulate's diagnosis."""
    cmd = [sys.executable, str(LSTM), "--epochs", "1"]
    plain = jobwrap_preempt(cmd, "plain").check()
    cut = jobwrap_preempt(cmd, "cut", preempt_at=[3]).check()
    with pytest.raises(AssertionError) as failed:
        assert_same_run(plain.directory, cut.directory)
    message = str(failed.value)
    assert "first differs at step 4 (epoch 0), the first step after the resume from step 3: model:" in message
    assert "carried state not tracked: " in message


def _record(step, epoch=0, position=None, model="m", torch_rng="t", python="p", batch=None, loss=None):
    extras = {} if loss is None else {"loss": loss}
    return {"step": step, "epoch": epoch, "position": step if position is None else position,
            "objects": {"model": {"weight": f"{model}{step}"}}, "extras": extras,
            "rng": {"torch": f"{torch_rng}{step}", "python": f"{python}{step}"}, "loader": None,
            "batch": batch}


def _cut(plain, at, changed):
    """The preempted run's trace: plain's records to `at`, a launch resumed there (its record at `at`), then
    plain's records from `at` on with `changed(record)` applied."""
    before = [r for r in plain if "objects" in r and r["step"] <= at]
    after = [changed(dict(r)) for r in plain if "objects" in r and r["step"] >= at]
    return ([{"launch": 1, "resumed_from": None, "position": 0}, *before,
             {"launch": 2, "resumed_from": at, "position": at}, {"loader": "replay", "step": at, "position": at},
             *after])


PLAIN = [{"launch": 1, "resumed_from": None, "position": 0}] + [_record(s, batch=f"b{s}", loss=1.0 / (s + 1))
                                                                  for s in range(9)]


@pytest.mark.parametrize("changed, cause, step", [
    (lambda r: {**r, "objects": {"model": {"weight": "x"}}} if r["step"] >= 5 else r,
     "carried state not tracked", 5),
    (lambda r: {**r, "objects": {"model": {"weight": "x"}}, "rng": {**r["rng"], "torch": "x"}} if r["step"] >= 5
     else r, "draw between track() and the loop", 5),
    (lambda r: {**r, "batch": "x", "objects": {"model": {"weight": "x"}}} if r["step"] >= 5 else r,
     "loader replayed", 5),
    (lambda r: {**r, "objects": {"model": {"weight": "x"}}}, "changed after track()", 4),
    (lambda r: {**r, "objects": {"model": {"weight": "x"}}} if r["step"] >= 7 else r,
     "occasional state not tracked", 7),
])
def test_causes_from_the_step_traces(changed, cause, step):
    """Pure: where the first difference lies and what differs there picks the cause (resume at step 4)."""
    found = explain(PLAIN, _cut(PLAIN, 4, changed))
    assert found is not None
    d, summary, words = found
    assert d.step == step and words.startswith(cause + ": "), (summary, words)
    assert summary.startswith(f"first differs at step {step} (epoch 0)")
    if step == 5:
        assert "loss 0.166667 uninterrupted vs 0.166667 preempted" in summary


def test_unseeded_streams_set_aside_to_find_the_real_divergence():
    """Pure: streams that differ from step 0 alone are named as never seeded; a later difference is still found
    and comes first in the diagnosis; with no later one, the never-seeded cause is the diagnosis."""
    def unseeded(r):
        return {**r, "rng": {**r["rng"], "python": "other"}} if "objects" in r else r

    def carried(r):
        return {**r, "objects": {"model": {"weight": "x"}}} if r["step"] >= 5 else r

    d, summary, words = explain(PLAIN, [unseeded(r) for r in _cut(PLAIN, 4, lambda r: r)])
    assert d.when == "before" and words.startswith("stream never seeded: the Python random stream(s)"), words
    d, summary, words = explain(PLAIN, [unseeded(r) for r in _cut(PLAIN, 4, carried)])
    assert d.step == 5 and words.startswith("carried state not tracked: "), words
    assert "Besides, the Python random stream(s) differ from the first step on: never seeded" in words
    assert explain(PLAIN, _cut(PLAIN, 4, lambda r: r)) is None


def test_quick_step_is_inside_an_epoch_near_the_middle():
    """--quick's step: the middle of the run, moved off an epoch's start (where carried state is reset anyway)."""
    # Two epochs of 8 steps: (0, 0..7), then the epoch boundary (1, 8) at position 0, then (1, 9..16).
    records = [{"objects": {}, "epoch": 0, "step": s, "position": s} for s in range(8)] + \
              [{"objects": {}, "epoch": 1, "step": s, "position": s - 8} for s in range(8, 17)]
    assert quick_step(records, 16) == 9
    assert quick_step(None, 16) == 8 and quick_step([], 1) == 1


def test_trace_is_off_unless_asked_and_records_each_boundary_once(tmp_path):
    """JOBWRAP_TEST_TRACE off: no trace file. On: one record per (epoch, step), with each tracked object's keys,
    the streams, the extras by value and the batch trained in that step."""
    import torch

    import jobwrap
    from jobwrap._loop.trace import TRACE_FILE, read

    for on in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with jobwrap.Session(tmp_path / str(on), environ={"JOBWRAP_TEST_TRACE": "1"} if on else {}) as job:
            job.track(model=model, optimizer=optimizer, loss=0.0)
            for epoch in job.epochs(2):
                for x in job.loader([torch.full((2,), float(i)) for i in range(3)]):
                    optimizer.zero_grad()
                    loss = model(x).pow(2).sum()
                    loss.backward()
                    optimizer.step()
                    job["loss"] = loss.item()
        assert (tmp_path / str(on) / TRACE_FILE).exists() == on
    records = [r for r in read(tmp_path / "True") if "objects" in r]
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (2, 6)]
    assert set(records[1]["objects"]["model"]) == {"weight", "bias"} and "torch" in records[1]["rng"]
    assert records[0]["extras"]["loss"] == 0.0 and records[1]["extras"]["loss"] > 0  # the value set in step 1
    assert records[0]["batch"] is None and all(r["batch"] for r in records[1:])
    assert records[1]["batch"] == records[4]["batch"] != records[2]["batch"]  # each epoch: the same 3 batches
