"""Training scripts written as users write them (tests/scripts/), preempted at awkward moments under
`jobwrap run` with real signals, compared bit for bit with their uninterrupted runs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap.testing import assert_same_run, run_preempted

SCRIPT = Path(__file__).resolve().parent / "scripts" / "user_loop.py"


def _cmd(loss_log: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--loss-log", str(loss_log), *extra]


def test_signal_during_validation_after_an_epoch_end_save_is_bit_exact(tmp_path):
    """job.save() at epoch end, then the signal during validation: the stop writes the state after
    validation (same step, new epoch and extras) and the resume does not redo the epoch's end."""
    run_preempted(_cmd(tmp_path / "ref.loss"), tmp_path / "ref").check()
    cut = run_preempted(_cmd(tmp_path / "cut.loss", "--signal-in-validation", "1"), tmp_path / "cut").check()
    events = read_events(str(tmp_path / "cut"))
    assert [e["step"] for e in events if e["event"] == "signal"] == [16]
    assert sum(e["event"] == "requeue" for e in events) == 1, cut.stderr[-2000:]
    assert_same_run(tmp_path / "ref", tmp_path / "cut")
    assert (tmp_path / "cut.loss").read_text() == (tmp_path / "ref.loss").read_text()
    # Step 16 was saved twice: at the epoch's end, then after validation, under its own name.
    saved = [Path(e["path"]).name for e in events if e["event"] == "save" and e["step"] == 16]
    assert saved == ["step-000000000016.pt", "step-000000000016-1.pt"]


def test_save_inside_the_loop_body_counts_the_batch(tmp_path):
    """job.save() after optimizer.step() inside the body, then the process is SIGKILLed: the resume starts
    after that batch, which is not trained twice."""
    run_preempted(_cmd(tmp_path / "ref.loss", "--save-in-body", "5"), tmp_path / "ref").check()
    killed = run_preempted(_cmd(tmp_path / "cut.loss", "--save-in-body", "5", "--kill-after-body-save"),
                           tmp_path / "cut")
    assert killed.returncode != 0
    assert [c.step for c in CheckpointStore(str(tmp_path / "cut")).committed()] == [5]
    run_preempted(_cmd(tmp_path / "cut.loss", "--save-in-body", "5"), tmp_path / "cut").check()
    assert (tmp_path / "cut.loss").read_text() == (tmp_path / "ref.loss").read_text()
    assert_same_run(tmp_path / "ref", tmp_path / "cut")


@pytest.mark.parametrize("accumulate,preempt_at", [(2, [5]), (3, [5, 13])])
def test_gradient_accumulation_preempted_between_micro_batches_is_bit_exact(tmp_path, accumulate, preempt_at):
    """Backward every batch, optimizer.step() every k: a USR1 between a backward and its step saves the
    accumulated gradients, and the resumed run matches the uninterrupted one bit for bit."""
    args = ("--accumulate", str(accumulate), "--epochs", "2")
    run_preempted(_cmd(tmp_path / "ref.loss", *args), tmp_path / "ref").check()
    cut = run_preempted(_cmd(tmp_path / "cut.loss", *args), tmp_path / "cut", preempt_at=preempt_at).check()
    assert cut.signalled_at == preempt_at
    assert [e["step"] for e in read_events(str(tmp_path / "cut")) if e["event"] == "signal"] == preempt_at
    assert (tmp_path / "cut.loss").read_text() == (tmp_path / "ref.loss").read_text()
    assert_same_run(tmp_path / "ref", tmp_path / "cut")
