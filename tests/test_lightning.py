"""PyTorch Lightning under jobwrap (jobwrap.lightning.Preemptible), preempted for real under `jobwrap run`.

A preempted fit is compared with an uninterrupted one: the loss of every optimizer
step (tests/lightning_jobs.py writes each, bit for bit) and the final checkpoint
(model, optimizer, scheduler, loops, callbacks, RNG streams).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning (pip install 'jobwrap[lightning]')")
pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")

from jobwrap.testing import assert_same_run, final_state, run_preempted  # noqa: E402

JOB = Path(__file__).resolve().parent / "lightning_jobs.py"
STEPS = 24  # 2 epochs of 12 batches


def _fit(tmp_path: Path, name: str, *options: str, **kwargs) -> tuple[list[str], Path]:
    losses = tmp_path / f"{name}-losses.txt"
    run = run_preempted([sys.executable, str(JOB), "--losses", str(losses), *options], tmp_path / name, **kwargs)
    run.check()
    return losses.read_text().splitlines(), run


def test_preempted_fit_matches_uninterrupted_fit_bit_for_bit(tmp_path):
    """USR1 mid-epoch, right after an epoch's first step and again: every step's loss and the final checkpoint equal."""
    plain, plain_run = _fit(tmp_path, "plain")
    cut, cut_run = _fit(tmp_path, "cut", preempt_at=[5, 13, 17])
    assert cut_run.signalled_at == [5, 13, 17]
    assert len(plain) == STEPS
    assert cut == plain  # no step lost or repeated, each loss identical
    assert_same_run(plain_run.directory, cut_run.directory)
    state = final_state(cut_run.directory)
    assert state["lightning"]["global_step"] == STEPS
    assert state["lightning"]["lr_schedulers"][0]["last_epoch"] == STEPS


def test_ddp_two_ranks_preempted_fit_matches_uninterrupted_fit_bit_for_bit(tmp_path):
    """DDP on CPU (gloo, Lightning starts rank 1), USR1 in both epochs: every rank's losses and weights equal."""
    plain, plain_run = _fit(tmp_path, "plain", "--devices", "2")
    cut, run = _fit(tmp_path, "cut", "--devices", "2", preempt_at=[3, 8])
    assert run.signalled_at == [3, 8]
    assert [int(line.split()[0]) for line in cut] == list(range(1, STEPS // 2 + 1))
    assert cut == plain
    for name in ("cut-losses.txt.rank1", "cut-losses.txt.weights.rank0", "cut-losses.txt.weights.rank1"):
        assert (tmp_path / name).read_text() == (tmp_path / name.replace("cut", "plain")).read_text(), name
    assert_same_run(plain_run.directory, run.directory)
    state = final_state(run.directory)
    assert state["lightning"]["global_step"] == STEPS // 2
    assert state["jobwrap"]["world_size"] == 2


def test_plain_dataloader_is_refused_at_start(tmp_path):
    """A torch DataLoader (Lightning would retrain the epoch's first batches on resume): refused, naming the fix."""
    env = {**os.environ, "JOBWRAP_DIR": str(tmp_path / "ck")}
    done = subprocess.run([sys.executable, str(JOB), "--losses", str(tmp_path / "l.txt"), "--plain-loader"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "StatefulDataLoader" in done.stderr and "jobwrap[torchdata]" in done.stderr
    assert not (tmp_path / "l.txt").exists()  # nothing trained
