"""Two ranks under torchrun (gloo, CPU): all stop at the same step, one commit, one requeue, bit-exact resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


SLOW_STEP = """\
import sys, time
from pathlib import Path
import torch.distributed as dist
import jobwrap

dist.init_process_group("gloo")
with jobwrap.Session() as job:
    job.track(rank=dist.get_rank())
    while job.step < 100:
        if job.step == 3:  # a step longer than torchrun's 30 s between passing TERM on and SIGKILL
            (Path(sys.argv[1]) / f"slow-{dist.get_rank()}").touch()
            time.sleep(float(sys.argv[2]))
        job.step_done()
dist.destroy_process_group()
"""


def test_term_to_jobwrap_run_reaches_the_ranks_not_torchrun(tmp_path):
    """TERM to jobwrap run over torchrun goes to the ranks only: a step slower than torchrun's 30 s kill still commits."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_STEP)
    command = [sys.executable, "-m", "jobwrap", "run", "--dir", str(tmp_path / "ck"), "--",
               sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(tmp_path), "35"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWRAP_", "SLURM_"))}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("slow-*"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks never reached the slow step"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert final_state(tmp_path / "ck")["step"] == 4, err[-3000:]
    assert "death signal" not in err, "torchrun was signalled"
    assert not [e for e in read_events(str(tmp_path / "ck")) if e["event"] == "requeue"]


def test_term_to_jobwrap_run_over_torchrun_with_workers_commits(tmp_path):
    """TERM to jobwrap run, two ranks with two DataLoader workers each: no worker is signalled, the step commits."""
    run = run_preempted(TORCHRUN + ["--workers", "2"], tmp_path, ranks=2, preempt_at=[3], signal_=signal.SIGTERM,
                        timeout=240)
    assert run.returncode != 0  # torchrun reports the ranks' 143 as a failure: the job was cancelled
    assert "killed by signal" not in run.stderr
    assert final_state(tmp_path)["step"] == 3, run.stderr[-3000:]
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
