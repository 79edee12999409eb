"""Two ranks under torchrun (gloo, CPU): all stop at the same step, one commit, one requeue, bit-exact resume."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from jobwrap.events import read_events
from jobwrap.testing import assert_same_run, final_state, run_preempted

from conftest import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(REPO / "examples" / "train_ddp.py"), "--epochs", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-rank run."""
    directory = tmp_path_factory.mktemp("ddp-reference")
    run_preempted(TORCHRUN, directory, ranks=2, timeout=180).check()
    return directory


@pytest.mark.parametrize("target_ranks", [[1], [0], None], ids=["rank1-only", "rank0-only", "both"])
def test_two_ranks_stop_together_and_resume_bit_exact(tmp_path, reference, target_ranks):
    """Whichever rank gets SIGUSR1, both stop at step 5, rank 0 commits once and requeues once."""
    run = run_preempted(TORCHRUN, tmp_path, ranks=2, preempt_at=[5], target_ranks=target_ranks,
                        timeout=240).check()
    assert run.signalled_at == [5]
    events = read_events(str(tmp_path))
    assert [e["step"] for e in events if e["event"] == "requeue"] == [5]
    assert [e["step"] for e in events if e["event"] == "save"] == [5, 16]
    assert run.stderr.count("training asked to be requeued") == 1
    assert_same_run(reference, tmp_path)
    assert len(final_state(tmp_path)["jobwrap"]["ranks"]) == 2


def test_sigterm_to_one_rank_stops_all_without_requeue(tmp_path):
    """TERM to rank 1 only: every rank stops at the same step, the checkpoint commits, nobody requeues."""
    run = run_preempted(TORCHRUN, tmp_path, ranks=2, preempt_at=[3], target_ranks=[1],
                        signal_=signal.SIGTERM, timeout=240)
    assert run.returncode != 0  # torchrun reports the ranks' 143 as a failure: the job was cancelled
    assert final_state(tmp_path)["step"] == 3
    assert not [e for e in read_events(str(tmp_path)) if e["event"] == "requeue"]


def test_changed_world_size_is_a_clear_error(tmp_path, reference):
    """A two-rank checkpoint resumed by one process fails with a message naming both sizes and the fix."""
    import shutil

    shutil.copytree(reference, tmp_path / "ck")
    env_cmd = [sys.executable, str(REPO / "examples" / "train_ddp.py"), "--epochs", "3"]
    result = subprocess.run(env_cmd, env={**__import__("os").environ, "JOBWRAP_DIR": str(tmp_path / "ck"),
                                          "MASTER_PORT": "29533"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "saved by 2 rank(s), this job has 1" in result.stderr
    assert "JOBWRAP_ALLOW_WORLD_SIZE_CHANGE=1" in result.stderr


def test_accumulated_unreduced_gradients_of_each_rank_survive_a_preemption(tmp_path):
    """DDP with no_sync() micro-batches, preempted between a backward and its step: each rank's own
    accumulated gradients are saved and restored, and the run matches the uninterrupted one."""
    def command(log):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(REPO / "tests" / "scripts" / "ddp_accumulate.py"), "--loss-log", str(log)]
    run_preempted(command(tmp_path / "ref.loss"), tmp_path / "ref", ranks=2, timeout=240).check()
    cut = run_preempted(command(tmp_path / "cut.loss"), tmp_path / "cut", ranks=2, preempt_at=[5],
                        timeout=240).check()
    assert cut.signalled_at == [5]
    assert_same_run(tmp_path / "ref", tmp_path / "cut")
    ref, got = ((tmp_path / name).read_text().splitlines() for name in ("ref.loss", "cut.loss"))
    assert sorted(got) == sorted(ref)
