"""End to end: real training processes under `jobwrap run`, real signals, real relaunches.

Each preempted run is compared bit for bit with an uninterrupted run of the same command.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap.errors import ConfigError
from jobwrap.testing import assert_same_run, final_state, run_preempted

STEPS_PER_EPOCH = 8  # --samples 256 / batch 32


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per optimizer, computed once."""
    cache = {}

    def get(optimizer: str, epochs: int = 2):
        key = (optimizer, epochs)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"reference-{optimizer}-{epochs}")
            cmd = [sys.executable, _train(), "--optimizer", optimizer, "--epochs", str(epochs),
                   "--samples", "256", "--loss-log", str(directory / "loss")]
            run_preempted(cmd, directory / "ck").check()
            cache[key] = directory
        return cache[key]
    return get


def _train():
    from conftest import TRAIN
    return str(TRAIN)


def _cmd(optimizer, epochs, loss_log, *extra):
    return [sys.executable, _train(), "--optimizer", optimizer, "--epochs", str(epochs), "--samples", "256",
            "--loss-log", str(loss_log), *extra]


@pytest.mark.parametrize("optimizer,preempt_at,workers", [
    ("sgd", [3], "0"),                                   # before the first checkpoint, mid-epoch
    ("adam", [STEPS_PER_EPOCH], "0"),                    # exactly at an epoch boundary
    ("adam", [0, 5, STEPS_PER_EPOCH + 3, 2 * STEPS_PER_EPOCH - 1], "0"),  # several times, first before step 1
    ("adam", [3, STEPS_PER_EPOCH + 2], "2"),             # DataLoader workers: the same batches as without
])
def test_preempted_run_is_bit_exact(tmp_path, reference, optimizer, preempt_at, workers):
    """SGD+momentum / Adam+StepLR+dropout on a shuffled DataLoader: the preempted run equals the plain one."""
    ref = reference(optimizer)
    run = run_preempted(_cmd(optimizer, 2, tmp_path / "loss", "--workers", workers), tmp_path / "ck",
                        preempt_at=preempt_at).check()
    assert run.signalled_at == preempt_at
    assert_same_run(ref / "ck", tmp_path / "ck")
    history = (tmp_path / "loss").read_text().splitlines()
    assert history == (ref / "loss").read_text().splitlines()  # same losses, no step trained twice
    requeues = [e for e in read_events(str(tmp_path / "ck")) if e["event"] == "requeue"]
    assert [e["step"] for e in requeues] == preempt_at


def test_multiprocess_loader_resumes_mid_epoch(tmp_path, reference):
    """With DataLoader workers the remaining batches of a preempted epoch are the same, in order."""
    cmd = [sys.executable, _train(), "--epochs", "2", "--samples", "256", "--workers", "2"]
    plain = run_preempted(cmd, tmp_path / "plain").check()
    cut = run_preempted(cmd, tmp_path / "cut", preempt_at=[5]).check()
    assert cut.preemptions == 1
    assert_same_run(plain.directory, cut.directory)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_commits_and_does_not_requeue(tmp_path, workers):
    """SIGTERM to jobwrap run (with and without DataLoader workers) commits and ends the job with 143."""
    run = run_preempted(_cmd("adam", 2, tmp_path / "loss", "--workers", workers), tmp_path / "ck",
                        preempt_at=[6], signal_=signal.SIGTERM)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert "exiting without requeueing" in run.stderr
    assert final_state(tmp_path / "ck")["step"] == 6
    assert "relaunching" not in run.stderr
    assert "killed by signal" not in run.stderr


@pytest.mark.parametrize("supervised", [False, True], ids=["plain-python", "jobwrap-run"])
def test_sigterm_to_every_process_with_workers_commits(tmp_path, supervised):
    """TERM to every process of the run, workers included (a plain scancel): the step ends, the checkpoint commits."""
    run = run_preempted(_cmd("adam", 2, tmp_path / "loss", "--workers", "2"), tmp_path / "ck", preempt_at=[6],
                        signal_=signal.SIGTERM, to_group=True, supervised=supervised)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert "killed by signal" not in run.stderr
    assert final_state(tmp_path / "ck")["step"] == 6
    assert [e["step"] for e in read_events(str(tmp_path / "ck")) if e["event"] == "stop"] == [6]


def test_usr1_to_every_process_with_workers_resumes_bit_exact(tmp_path, reference):
    """USR1 to every process of the run, workers included (an srun step's signal): requeued, resumed bit-exact."""
    run = run_preempted(_cmd("adam", 2, tmp_path / "loss", "--workers", "2"), tmp_path / "ck", preempt_at=[5],
                        to_group=True).check()
    assert run.signalled_at == [5]
    assert "killed by signal" not in run.stderr
    assert_same_run(reference("adam") / "ck", tmp_path / "ck")
    assert (tmp_path / "loss").read_text().splitlines() == (reference("adam") / "loss").read_text().splitlines()


def test_requeue_cap_ends_with_a_clear_message(tmp_path):
    """With --max-requeues 1, the second preemption commits a checkpoint and is not requeued."""
    run = run_preempted(_cmd("adam", 2, tmp_path / "loss"), tmp_path / "ck", preempt_at=[2, 4],
                        run_args=["--max-requeues", "1"])
    assert run.returncode == 1, run.stderr
    assert "not requeued: the requeue cap is reached" in run.stderr
    assert final_state(tmp_path / "ck")["step"] == 4


@pytest.mark.parametrize("point", ["data-written", "data-renamed", "manifest-written", "committed", "retention"])
def test_sigkill_during_save_never_loses_the_committed_checkpoint(tmp_path, reference, point):
    """SIGKILL at each point of a save: the next start resumes from the newest committed checkpoint."""
    ck = tmp_path / "ck"
    # Phase 1: one epoch, committed at its end (step 8).
    run_preempted(_cmd("adam", 1, tmp_path / "loss"), ck).check()
    # Phase 2: continue with periodic saves; the first one (step 12) is killed at `point`.
    env = {"JOBWRAP_TEST_KILL_AT": point, "JOBWRAP_SAVE_EVERY_STEPS": "4", "JOBWRAP_KEEP": "1"}
    killed = run_preempted(_cmd("adam", 2, tmp_path / "loss"), ck, env=env)
    assert killed.returncode == 128 + signal.SIGKILL
    committed = [c.step for c in CheckpointStore(str(ck)).committed()]
    survivor = 12 if point in ("committed", "retention") else 8
    assert survivor in committed
    # Phase 3: a plain restart resumes from the survivor, never from a broken file, and finishes exactly.
    resumed = run_preempted(_cmd("adam", 2, tmp_path / "loss"), ck).check()
    assert f"resumed from step-{survivor:012d}.pt" in resumed.stderr
    assert "corrupt" not in resumed.stderr
    assert_same_run(reference("adam") / "ck", ck)
    assert not [n for n in os.listdir(ck) if n.startswith(".tmp-")]


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, reference):
    """A truncated newest checkpoint is reported in one line, set aside, and the run resumes from the previous."""
    ck = tmp_path / "ck"
    run_preempted(_cmd("adam", 2, tmp_path / "loss"), ck, preempt_at=[4, 9], run_args=["--max-requeues", "1"])
    newest = CheckpointStore(str(ck)).committed()[0]
    assert newest.step == 9
    with open(newest.path, "r+b") as f:
        f.truncate(100)
    resumed = run_preempted(_cmd("adam", 2, tmp_path / "loss"), ck).check()
    warnings = [line for line in resumed.stderr.splitlines() if "corrupt checkpoint" in line]
    assert len(warnings) == 1 and "truncated" in warnings[0]
    assert "resumed from step-000000000004.pt" in resumed.stderr
    assert any(n.startswith("step-000000000009.pt.corrupt") for n in os.listdir(ck))
    assert_same_run(reference("adam") / "ck", ck)


def test_another_runs_directory_is_refused_end_to_end(tmp_path):
    """A run with another run id on the same directory is refused with the fix named; --adopt continues."""
    ck = tmp_path / "ck"
    run_preempted(_cmd("adam", 1, tmp_path / "loss"), ck, run_args=["--run-id", "first"]).check()
    second = run_preempted(_cmd("adam", 2, tmp_path / "loss"), ck, run_args=["--run-id", "second"])
    assert second.returncode != 0
    assert "holds checkpoints of run 'first'" in second.stderr and "JOBWRAP_ADOPT=1" in second.stderr
    adopted = run_preempted(_cmd("adam", 2, tmp_path / "loss"), ck,
                            run_args=["--run-id", "second", "--adopt"]).check()
    assert "resumed from step-000000000008.pt" in adopted.stderr


def test_ls_lists_what_a_run_wrote(tmp_path):
    """`jobwrap ls` shows the checkpoints, verified, and marks the one a resume would pick."""
    ck = tmp_path / "ck"
    run_preempted(_cmd("adam", 1, tmp_path / "loss"), ck, preempt_at=[3]).check()
    out = subprocess.run([sys.executable, "-m", "jobwrap", "ls", str(ck)], capture_output=True, text=True,
                         check=True).stdout
    lines = out.splitlines()
    assert lines[1].startswith("->") and "step-000000000008.pt" in lines[1] and "verified" in lines[1]
    assert "step-000000000003.pt" in out


def test_preempting_a_directory_that_holds_a_run_is_refused_or_started_fresh(tmp_path):
    """preempt_at on a finished run's directory: refused at start; resume=True is never signalled and check()
    fails; fresh=True deletes the run and is signalled at every step."""
    cmd = _cmd("adam", 1, tmp_path / "loss")
    run_preempted(cmd, tmp_path / "cut").check()
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint at step 8, finished\).*fresh=True"
                                          r".*resume=True"):
        run_preempted(cmd, tmp_path / "cut", preempt_at=[3, 6])
    resumed = run_preempted(cmd, tmp_path / "cut", preempt_at=[3, 6], resume=True)
    assert resumed.returncode == 0 and resumed.signalled_at == []
    with pytest.raises(AssertionError, match=r"signalled at \[\]: the run never held at \[3, 6\]"):
        resumed.check()
    fresh = run_preempted(cmd, tmp_path / "cut", preempt_at=[3, 6], fresh=True).check()
    assert fresh.signalled_at == [3, 6]
    assert [e["event"] for e in read_events(str(tmp_path / "cut"))].count("start") == 3


def test_check_fails_when_a_step_was_never_reached(tmp_path):
    """A step beyond the run's end is never signalled: check() fails naming it, though the run exited 0."""
    run = run_preempted(_cmd("adam", 1, tmp_path / "loss"), tmp_path / "ck", preempt_at=[2, 500])
    assert run.returncode == 0 and run.signalled_at == [2]
    with pytest.raises(AssertionError, match=r"never held at \[500\]"):
        run.check()


def test_fresh_never_deletes_a_directory_with_other_files(tmp_path):
    """fresh=True on a directory holding a jobwrap run and a file of the user's: refused, nothing deleted."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "events.jsonl").write_text('{"event": "start", "step": 0}\n')
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"will not delete .*notes\.txt"):
        run_preempted(["true"], tmp_path / "ck", fresh=True)
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"


def _epoch_end_cmd(loss_log, *extra):
    from conftest import REPO
    return [sys.executable, str(REPO / "tests" / "scripts" / "epoch_end_save.py"), "--loss-log", str(loss_log), *extra]


@pytest.mark.parametrize("order,resumed_at", [([], "step 7, epoch 1"), (["--save-first"], "step 7, run")],
                         ids=["scheduler-then-save", "save-then-scheduler"])
def test_sigkill_after_epoch_end_save_resumes_bit_exact(tmp_path, order, resumed_at):
    """SIGKILL right after job.save() at an epoch's end: after end-of-epoch code (scheduler.step()) the relaunch
    starts the next epoch (it used to re-enter the ended epoch and step the scheduler twice); a save before it
    re-enters the ended epoch and runs that code once. Both bit-exact."""
    plain = run_preempted(_epoch_end_cmd(tmp_path / "plain-loss", *order), tmp_path / "plain",
                          supervised=False).check()
    killed = run_preempted(_epoch_end_cmd(tmp_path / "loss", "--kill-after-save", "0", *order), tmp_path / "ck",
                           supervised=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_preempted(_epoch_end_cmd(tmp_path / "loss", *order), tmp_path / "ck", supervised=False).check()
    assert f"resumed from step-000000000007.pt: {resumed_at}" in resumed.stderr
    assert_same_run(plain.directory, tmp_path / "ck")
    assert (tmp_path / "loss").read_text().splitlines() == (tmp_path / "plain-loss").read_text().splitlines()


def test_state_changed_after_epoch_end_save_is_warned_in_the_first_epoch(tmp_path):
    # scheduler.step() before the save, a draw after it: a kill in between resumes without the draw
    """Code after an epoch-end job.save() that changes the state (an RNG draw) is warned about once, at the end
    of epoch 0, naming the fix: a kill between the save and the epoch's end would resume without it."""
    run = run_preempted(_epoch_end_cmd(tmp_path / "loss", "--after-save", "draw"), tmp_path / "ck",
                        supervised=False)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("epoch 0: job.save() after the epoch's job.loader() loop") == 1
    assert "Make job.save() the last statement of the epoch's body" in run.stderr
    assert "epoch 1: job.save() after" not in run.stderr
