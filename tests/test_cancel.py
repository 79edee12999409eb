"""A cancel wins over a requeue: USR1 then TERM ends the job, in one process, across ranks and in `jobwrap run`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, TRAIN
from torch import nn

import jobwrap
from jobwrap._storage.events import read_events
from jobwrap.testing import final_state, run_preempted

CANCEL = 128 + signal.SIGTERM


def _requeues(directory) -> list[dict]:
    return [e for e in read_events(str(directory)) if e["event"] == "requeue"]


def test_usr1_then_term_at_a_held_step_ends_as_a_cancel(tmp_path):
    """USR1, then TERM before the step boundary: one checkpoint at that step, exit 143, no requeue, no relaunch."""
    cmd = [sys.executable, str(TRAIN), "--epochs", "2", "--samples", "256"]
    run = run_preempted(cmd, tmp_path / "ck", preempt_at=[6], signal_=[signal.SIGUSR1, signal.SIGTERM])
    assert run.returncode == CANCEL, run.stderr[-3000:]
    assert final_state(tmp_path / "ck")["step"] == 6
    assert _requeues(tmp_path / "ck") == []
    assert "training asked to be requeued" not in run.stderr


class _TermDuringSave:
    """A tracked object whose state_dict() (read while a checkpoint is written) sends this process a real TERM,
    once ``armed`` (track() and the first boundary read it too, to prove it loadable)."""

    def __init__(self) -> None:
        self.sent = False
        self.armed = False

    def state_dict(self) -> dict:
        if self.armed and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return {"x": torch.zeros(1)}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_term_during_the_requeue_save_makes_it_a_cancel(tmp_path):
    """USR1, then TERM while USR1's checkpoint is written: it commits, and the exit is 143 without a requeue."""
    model = nn.Linear(2, 1)
    with pytest.raises(jobwrap.Preempted) as stopped:
        with jobwrap.Session(str(tmp_path), environ={}, save_at_end=False) as job:
            probe = _TermDuringSave()
            job.track(model=model, probe=probe)
            job.step_done()
            probe.armed = True
            os.kill(os.getpid(), signal.SIGUSR1)
            job.step_done()
    assert stopped.value.code == CANCEL and not stopped.value.requeued, stopped.value.reason
    assert stopped.value.signal == signal.SIGTERM
    assert stopped.value.checkpoint.step == 2
    assert _requeues(tmp_path) == []
    assert [e["event"] for e in read_events(str(tmp_path))][-2:] == ["stop", "exit"]


RANKS_SCRIPT = textwrap.dedent('''
    """Rank 0 gets USR1 at step 3; rank 1 gets TERM while rank 0 writes that checkpoint."""
    import os, signal, sys
    import torch, torch.distributed as dist
    import jobwrap

    pid_file = sys.argv[1]

    class TermToRank1:
        armed = False  # track() and the first boundary read the state too, to prove it loadable

        def state_dict(self):  # only rank 0 writes, so only rank 0 calls this armed, inside the save
            if self.armed:
                os.kill(int(open(pid_file).read()), signal.SIGTERM)
            return {"x": torch.zeros(1)}

        def load_state_dict(self, state):
            pass

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
    dist.barrier()
    with jobwrap.Session(save_at_end=False) as job:
        probe = TermToRank1()
        job.track(probe=probe)
        for _ in range(20):
            if job.step == 3 and dist.get_rank() == 0:
                probe.armed = True
                os.kill(os.getpid(), signal.SIGUSR1)
            job.step_done()
    dist.destroy_process_group()
''')


def test_term_on_rank1_during_rank0s_requeue_save_is_a_cancel(tmp_path):
    """Rank 0 saw USR1 only; rank 1 gets TERM during the save: every rank exits 143 and nobody requeues."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path / "rank1.pid")]
    result = subprocess.run(cmd, env={**os.environ, "JOBWRAP_DIR": str(tmp_path / "ck")},
                            capture_output=True, text=True, timeout=240)
    assert result.returncode != 0  # torchrun reports the ranks' 143 as a failure
    events = read_events(str(tmp_path / "ck"))
    assert _requeues(tmp_path / "ck") == [], result.stderr[-3000:]
    assert [(e["event"], e["step"]) for e in events if e["event"] == "stop"] == [("stop", 4)], result.stderr[-3000:]
    assert [e["code"] for e in events if e["event"] == "exit"] == [CANCEL]
    assert final_state(tmp_path / "ck")["step"] == 4


def test_supervisor_given_term_after_the_child_asked_for_a_requeue_does_not_relaunch(tmp_path):
    """The child asks for a requeue, then `jobwrap run` gets TERM (a scancel): no relaunch, exit 143."""
    runs = tmp_path / "runs"
    child = textwrap.dedent(f'''
        import os, signal, threading
        seen = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: seen.set())  # the forwarded TERM, if it comes
        with open({str(runs)!r}, "a") as f:
            f.write("run\\n")
        with open(os.environ["JOBWRAP_REQUEUE_FILE"], "w") as f:
            f.write("requeue\\n")
        os.kill(os.getppid(), signal.SIGTERM)  # the scancel reaches jobwrap run after the request
        seen.wait(10)
    ''')
    result = subprocess.run([sys.executable, "-m", "jobwrap", "run", "--max-requeues", "3", "--",
                             sys.executable, "-c", child],
                            cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert runs.read_text().splitlines() == ["run"], result.stderr
    assert result.returncode == CANCEL, result.stderr
    assert "not relaunching" in result.stderr


def test_which_signal_received_by_jobwrap_run_cancels_a_requested_requeue():
    """TERM and INT cancel a requeue; a request made with requeue_on_exit_signals is cancelled by INT only."""
    from jobwrap._scheduler.schedulers import DESPITE_EXIT_SIGNALS
    from jobwrap._scheduler.supervisor import cancelled_by

    cancel = (signal.SIGTERM, signal.SIGINT)
    assert cancelled_by([signal.SIGUSR1, signal.SIGTERM], cancel, "requeue\n") == signal.SIGTERM
    assert cancelled_by([signal.SIGUSR1], cancel, "requeue\n") is None
    assert cancelled_by([signal.SIGTERM], cancel, f"requeue {DESPITE_EXIT_SIGNALS}\n") is None
    assert cancelled_by([signal.SIGTERM, signal.SIGINT], cancel, f"requeue {DESPITE_EXIT_SIGNALS}\n") == signal.SIGINT


def test_requeue_on_exit_signals_keeps_usr1_then_term_a_requeue(tmp_path):
    """With requeue_on_exit_signals=True, USR1 then TERM requeues (the configured meaning of TERM)."""
    with pytest.raises(jobwrap.Preempted) as stopped:
        with jobwrap.Session(str(tmp_path), environ={}, save_at_end=False, requeue_on_exit_signals=True) as job:
            job.track(model=nn.Linear(2, 1))
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            job.step_done()
    assert stopped.value.requeued and stopped.value.code == jobwrap.REQUEUE_EXIT_CODE
