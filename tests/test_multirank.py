"""Two ranks under torchrun (gloo, CPU): all stop at the same step, one commit, one requeue, bit-exact resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap.testing import assert_same_run, final_state, run_preempted

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


THREADS_AFTER_CLOSE = """\
import os, sys, torch, torch.distributed as dist
import jobwrap
dist.init_process_group("gloo")
def threads():
    return len(os.listdir("/proc/self/task"))
before = threads()
with jobwrap.Session(sys.argv[1]) as job:
    job.track(model=torch.nn.Linear(2, 2), best=0.0)
    job.step_done()
    job.save()
after = threads()  # `job` is still referenced, as in any script using `with ... as job`
print(f"rank {dist.get_rank()}: {before} threads before the session, {after} after close", flush=True)
dist.destroy_process_group()
sys.exit(0 if after == before else 3)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_close_joins_jobwrap_gloo_threads(tmp_path):
    """After close() no gloo worker of jobwrap's group is left to die at interpreter exit (the teardown abort)."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_AFTER_CLOSE)
    result = subprocess.run([*TORCHRUN[:-3], str(script), str(tmp_path / "ck")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "JOBWRAP_NO_SLURM": "1"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("after close") == 2


SIGNAL_DURING_RESUME = """\
import os, signal, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import jobwrap
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = [torch.randn(8, 4) for _ in range(6)]
try:
    with jobwrap.Session(sys.argv[1]) as job:
        if job.resumed_from is not None and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # the signal reaches one rank while it restores its state
        job.track(model=model, optimizer=optimizer)
        ddp = DistributedDataParallel(model)  # a collective on the default group, before the first boundary
        for epoch in job.epochs(1):
            for x in job.loader(data):
                optimizer.zero_grad()
                ddp(x).sum().backward()
                optimizer.step()
                if job.resumed_from is None and job.step == 3:
                    break
            if job.resumed_from is None:
                break
        if job.resumed_from is None:
            job.save()  # the first run stops at step 3 with a checkpoint
except jobwrap.Preempted as stop:
    print(f"rank {rank}: stopped at step {job.step}, requeued={stop.requeued}", flush=True)
dist.destroy_process_group()
"""


def _torchrun(script, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The script under torchrun with 2 ranks; a hang is killed (the whole process group) and fails the test."""
    proc = subprocess.Popen([*TORCHRUN[:-3], str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "JOBWRAP_NO_SLURM": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        for member in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            member.kill()  # torchrun's workers may sit in sessions of their own
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the ranks hung for {timeout:.0f} s\n--- stdout ---\n{out}\n--- stderr ---\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_signal_during_resume_on_one_rank_does_not_deadlock_a_collective_after_track(tmp_path):
    """USR1 to rank 1 while it restores, then DDP is built (a collective): both ranks stop together, no hang."""
    script = tmp_path / "resume_signal.py"
    script.write_text(SIGNAL_DURING_RESUME)
    first = _torchrun(script, str(tmp_path / "ck"))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(script, str(tmp_path / "ck"))
    assert "rank 0: stopped at step 3" in resumed.stdout and "rank 1: stopped at step 3" in resumed.stdout, \
        resumed.stdout + resumed.stderr[-3000:]
    assert [e["step"] for e in read_events(str(tmp_path / "ck")) if e["event"] in ("requeue", "stop")] == [3]


RANK0_WRITE_FAILS = """\
import os, sys, time, torch, torch.distributed as dist
import jobwrap
dist.init_process_group("gloo")
rank = dist.get_rank()
done = os.path.join(sys.argv[1], "..", "rank1-done")

class Fragile:
    def state_dict(self):
        if rank == 0:
            raise RuntimeError("state_dict failed on rank 0")
        return {}
    def load_state_dict(self, state):
        pass

with jobwrap.Session(sys.argv[1]) as job:
    job.track(model=torch.nn.Linear(2, 2), fragile=Fragile())
    job.step_done()
    try:
        job.save()
    except Exception as exc:
        print(f"rank {rank}: {type(exc).__name__}: {exc}", flush=True)
    if rank == 1:
        open(done, "w").close()
    else:  # rank 0 stays alive (as a script that handles the error would): rank 1 must not wait for it
        deadline = time.monotonic() + 60
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.05)
dist.destroy_process_group()
"""


def test_a_failed_write_on_rank_0_is_a_clear_error_on_every_rank(tmp_path):
    """Rank 0's save fails with a plain exception while it stays alive: rank 1 gets a clear error, not a hang."""
    script = tmp_path / "rank0_fails.py"
    script.write_text(RANK0_WRITE_FAILS)
    result = _torchrun(script, str(tmp_path / "ck"))
    assert "rank 0: RuntimeError: state_dict failed on rank 0" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "rank 1: CheckpointError: rank 0 could not save: RuntimeError: state_dict failed on rank 0" \
        in result.stdout, result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]


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


def test_periodic_saves_of_two_ranks_run_in_the_background_and_resume_bit_exact(tmp_path, reference):
    """Two ranks save periodically in the background (rank 0 writes); a signal mid-run still resumes bit-exact."""
    run = run_preempted(TORCHRUN, tmp_path, ranks=2, preempt_at=[5], env={"JOBWRAP_SAVE_EVERY_STEPS": "2"},
                        timeout=240).check()
    assert run.signalled_at == [5]
    saves = [e for e in read_events(str(tmp_path)) if e["event"] == "save"]
    periodic = [e for e in saves if e["reason"] == "periodic"]
    assert periodic and all(e.get("background") is True and e["step"] % 2 == 0 for e in periodic), saves
    assert [(e["step"], e.get("background")) for e in saves if e["reason"].startswith("signal")] == [(5, None)]
    assert any(c.manifest.get("background") for c in CheckpointStore(str(tmp_path)).committed())
    assert_same_run(reference, tmp_path)


IN_FLIGHT = """\
import os, signal, sys, threading, time, torch, torch.distributed as dist
import jobwrap
dist.init_process_group("gloo")
rank = dist.get_rank()
writing = os.path.join(sys.argv[1], "..", "writing")
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.Adam(model.parameters())
try:
    with jobwrap.Session(sys.argv[1], save_every_steps=2) as job:
        job.track(model=model, optimizer=optimizer)
        if rank == 0:  # rank 0's background write is held until the signal's save cancels it
            real_save = job.store.save
            def held_save(payload, *, cancel=None, **kwargs):
                if threading.current_thread() is not threading.main_thread():
                    open(writing, "w").close()
                    cancel.wait(60)
                return real_save(payload, cancel=cancel, **kwargs)
            job.store.save = held_save
        while job.step < 10:
            optimizer.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            optimizer.step()
            job.step_done()
            if job.step == 3 and rank == 1:  # the save of step 2 is being written: USR1 reaches rank 1 only
                deadline = time.monotonic() + 60
                while not os.path.exists(writing) and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGUSR1)
except jobwrap.Preempted as stop:
    print(f"rank {rank}: stopped at step {job.step}, checkpoint of step {stop.checkpoint.step}", flush=True)
dist.destroy_process_group()
"""


def test_signal_while_rank_0_writes_in_the_background_commits_the_newest_state(tmp_path):
    """USR1 to rank 1 while rank 0 writes a periodic save: both stop at the next step, whose state is committed."""
    script = tmp_path / "in_flight.py"
    script.write_text(IN_FLIGHT)
    result = _torchrun(script, str(tmp_path / "ck"))
    for rank in (0, 1):
        assert f"rank {rank}: stopped at step 4, checkpoint of step 4" in result.stdout, \
            result.stdout + result.stderr[-3000:]
    assert "cancelling it, saving this step now" in result.stderr
    assert [c.step for c in CheckpointStore(str(tmp_path / "ck")).committed()] == [4]
    assert not [n for n in os.listdir(tmp_path / "ck") if n.startswith(".tmp-")]
    assert final_state(tmp_path / "ck")["jobwrap"]["world_size"] == 2


BACKGROUND_WRITE_FAILS = """\
import os, sys, torch, torch.distributed as dist
import jobwrap
dist.init_process_group("gloo")
rank = dist.get_rank()
directory, on_error, last_step, failure = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

class Fragile:
    broken = False
    def state_dict(self):
        if self.broken:
            raise RuntimeError("state_dict failed on rank 0")
        return {}
    def load_state_dict(self, state):
        pass

fragile = Fragile()
try:
    with jobwrap.Session(directory, save_every_steps=2, save_at_end=False, on_save_error=on_error) as job:
        job.track(model=model, optimizer=optimizer, fragile=fragile)
        while job.step < last_step:
            optimizer.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            optimizer.step()
            if job.step == 1 and rank == 0 and failure == "moved":
                os.rename(directory, directory + "-moved")  # a real failure: the writer cannot create its file
            if job.step == 1 and rank == 0 and failure == "staging":
                fragile.broken = True  # rank 0 fails while staging, on the training thread
            job.step_done()
            if job.step == 2 and rank == 0:
                assert job._saver.background.wait(60)  # failed already: the next agreement hears of it
    print(f"rank {rank}: trained to step {job.step}", flush=True)
except jobwrap.errors.CheckpointError as exc:
    print(f"rank {rank}: {type(exc).__name__} at step {job.step}: {exc}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("last_step", [6, 2], ids=["at-a-boundary", "at-close"])
def test_a_failed_background_write_of_rank_0_is_raised_on_both_ranks(tmp_path, last_step):
    """Rank 0's background write fails: both ranks raise StorageError naming it at the same step (or at close)."""
    script = tmp_path / "write_fails.py"
    script.write_text(BACKGROUND_WRITE_FAILS)
    result = _torchrun(script, str(tmp_path / "ck"), "raise", str(last_step), "moved")
    lines = {line[:6]: line for line in result.stdout.splitlines() if line.startswith("rank ")}
    raised_at = 3 if last_step == 6 else 2
    for rank, told in (("rank 0", "background save of step 2 failed"),
                       ("rank 1", "rank 0 could not save: [Errno 2] background save of step 2 failed")):
        line = lines.get(rank, "")
        assert line.startswith(f"{rank}: StorageError at step {raised_at}: ") and told in line \
            and "directory or a part of its path disappeared" in line, result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_failed_background_write_with_continue_keeps_both_ranks_training(tmp_path):
    """on_save_error=continue: rank 0's failed background writes are logged and both ranks train to the end."""
    script = tmp_path / "write_fails.py"
    script.write_text(BACKGROUND_WRITE_FAILS)
    result = _torchrun(script, str(tmp_path / "ck"), "continue", "6", "moved")
    assert "rank 0: trained to step 6" in result.stdout and "rank 1: trained to step 6" in result.stdout, \
        result.stdout + result.stderr[-3000:]
    assert "background save of step 2 failed" in result.stderr
    assert result.returncode == 0, result.stderr[-3000:]


def test_rank_0_failing_to_stage_a_background_save_is_raised_on_both_ranks(tmp_path):
    """state_dict() fails on rank 0 as it stages a periodic save: both ranks raise it at the next step."""
    script = tmp_path / "write_fails.py"
    script.write_text(BACKGROUND_WRITE_FAILS)
    result = _torchrun(script, str(tmp_path / "ck"), "raise", "6", "staging")
    for rank, told in (("rank 0", "background save of step 2 failed: RuntimeError: state_dict failed on rank 0"),
                       ("rank 1", "rank 0 could not save: background save of step 2 failed: RuntimeError: "
                                  "state_dict failed on rank 0")):
        assert f"{rank}: CheckpointError at step 3: {told}" in result.stdout, result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
