"""PyTorch Lightning under jobwrap (jobwrap.lightning.Preemptible), preempted for real under `jobwrap run`.

A preempted fit is compared with an uninterrupted one: the loss of every optimizer
step (tests/lightning_jobs.py writes each, bit for bit) and the final checkpoint
(model, optimizer, scheduler, loops, callbacks, RNG streams).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning (pip install 'jobwrap[lightning]')")
pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")

from jobwrap._storage.store import CheckpointStore  # noqa: E402
from jobwrap.testing import assert_same_run, final_state, run_preempted  # noqa: E402

JOB = Path(__file__).resolve().parent / "lightning_jobs.py"
STEPS = 24  # 2 epochs of 12 batches
DREW = "something drew from a random stream"  # jobwrap's warning of a draw before the first resumed step


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
    assert "resumed from" in cut_run.stderr and DREW not in cut_run.stderr  # an exact resume: no warning
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


def test_gradient_accumulation_preempted_fit_matches_uninterrupted_fit_bit_for_bit(tmp_path):
    """accumulate_grad_batches=2, USR1 in both epochs: every micro-batch's loss and the final checkpoint equal."""
    plain, plain_run = _fit(tmp_path, "plain", "--accumulate", "2")
    cut, cut_run = _fit(tmp_path, "cut", "--accumulate", "2", preempt_at=[3, 8])
    assert cut_run.signalled_at == [3, 8]
    assert len(plain) == STEPS  # one line per micro-batch, two per optimizer step
    assert cut == plain
    assert_same_run(plain_run.directory, cut_run.directory)
    assert final_state(cut_run.directory)["lightning"]["global_step"] == STEPS // 2


def test_ckpt_path_on_a_jobwrap_resume_is_refused(tmp_path):
    """fit(ckpt_path=...) while jobwrap resumes its own checkpoint: refused, naming the fix; the checkpoint is kept."""
    env = {**os.environ, "JOBWRAP_DIR": str(tmp_path / "ck")}
    job = [sys.executable, str(JOB), "--losses", str(tmp_path / "l.txt"), "--root", str(tmp_path)]
    subprocess.run([*job, "--epochs", "1", "--save-lightning", str(tmp_path / "own.ckpt")],
                   env=env, capture_output=True, text=True, timeout=300, check=True)
    saved = [c.path for c in CheckpointStore(str(tmp_path / "ck")).committed()]
    assert saved and (tmp_path / "own.ckpt").exists()
    done = subprocess.run([*job, "--epochs", "2", "--ckpt-path", str(tmp_path / "own.ckpt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "drop ckpt_path= from trainer.fit()" in done.stderr
    assert len((tmp_path / "l.txt").read_text().splitlines()) == STEPS // 2  # the second fit trained nothing
    assert [c.path for c in CheckpointStore(str(tmp_path / "ck")).committed()] == saved
    final_state(tmp_path / "ck")  # still verifies


def _slurm_job_env(folder: Path) -> dict[str, str]:
    """A one-task Slurm job's variables (Lightning picks its SLURMEnvironment), and an scontrol on PATH that
    records its arguments in ``folder/calls`` and succeeds."""
    path = folder / "scontrol"
    path.write_text(f"#!/bin/sh\necho \"$@\" >> '{folder}/calls'\nexit 0\n")
    path.chmod(0o700)
    return {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_lightning_slurm_auto_requeue_is_off_under_jobwrap(tmp_path):
    """In a Slurm job's environment USR1 gives one requeue (jobwrap's), no Lightning hpc checkpoint or requeue."""
    slurm = _slurm_job_env(tmp_path)
    root = tmp_path / "root"
    run = run_preempted([sys.executable, str(JOB), "--losses", str(tmp_path / "l.txt"), "--root", str(root)],
                        tmp_path / "ck", preempt_at=[5], env=slurm, supervised=False)
    assert run.signalled_at == [5]
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "calls").read_text() == "requeue 4242\n"  # one request, from jobwrap
    assert "SLURM auto-requeueing enabled" not in run.stderr  # Lightning set no handler
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))  # Lightning's auto-requeue saved nothing
    assert final_state(run.directory)["lightning"]["global_step"] == 5
    assert "cluster environment: SLURMEnvironment" in run.stderr  # Lightning saw a Slurm job


def test_lightning_sigterm_handler_is_off_under_jobwrap(tmp_path):
    """In a Slurm job's environment SIGTERM is jobwrap's alone: a checkpoint at the step, Lightning's handler unset."""
    slurm = _slurm_job_env(tmp_path)
    run = run_preempted([sys.executable, str(JOB), "--losses", str(tmp_path / "l.txt"), "--root", str(tmp_path)],
                        tmp_path / "ck", preempt_at=[5], signal_=signal.SIGTERM, env=slurm, supervised=False)
    assert "cluster environment: SLURMEnvironment" in run.stderr  # Lightning saw a Slurm job
    assert "Received SIGTERM" not in run.stderr and "SIGTERMException" not in run.stderr  # its handler never ran
    assert "checkpoint committed, exiting without requeueing" in run.stderr  # jobwrap's SIGTERM
    assert not (tmp_path / "calls").exists()
    assert final_state(run.directory)["lightning"]["global_step"] == 5


def test_plain_dataloader_is_refused_at_start(tmp_path):
    """A torch DataLoader (Lightning would retrain the epoch's first batches on resume): refused, naming the fix."""
    env = {**os.environ, "JOBWRAP_DIR": str(tmp_path / "ck")}
    done = subprocess.run([sys.executable, str(JOB), "--losses", str(tmp_path / "l.txt"), "--plain-loader"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "StatefulDataLoader" in done.stderr and "jobwrap[torchdata]" in done.stderr
    assert not (tmp_path / "l.txt").exists()  # nothing trained


def test_train_loader_without_a_length_is_refused_at_start(tmp_path):
    """A StatefulDataLoader over an IterableDataset (Lightning fetches it a batch ahead, which its saved place would
    count): refused before a step, naming the fix."""
    env = {**os.environ, "JOBWRAP_DIR": str(tmp_path / "ck")}
    done = subprocess.run([sys.executable, str(JOB), "--losses", str(tmp_path / "l.txt"), "--iterable"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "fetches a batch ahead" in done.stderr and "give the dataset a __len__" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "l.txt").exists()  # nothing trained


def test_ddp_own_distributed_sampler_is_refused_at_start(tmp_path):
    """DDP with a DistributedSampler subclass of the user's (its place is not saved): refused on every rank before
    a step, naming the fix."""
    run = run_preempted([sys.executable, str(JOB), "--losses", str(tmp_path / "l.txt"), "--devices", "2",
                         "--own-sampler"], tmp_path / "ck", supervised=False)
    assert run.returncode != 0
    assert "the train loader's sampler OwnSampler (a DistributedSampler of your own)" in run.stderr
    assert "StatefulDistributedSampler" in run.stderr
    assert not list(tmp_path.glob("l.txt*"))  # no rank trained a step
    assert not CheckpointStore(str(tmp_path / "ck")).committed()


def test_example_under_jobwrap_simulate_is_bit_exact(tmp_path):
    """examples/lightning_train.py unchanged under `jobwrap simulate --at 5,14`: every check passes,
    the final committed checkpoint included."""
    example = Path(__file__).resolve().parent.parent / "examples" / "lightning_train.py"
    result = subprocess.run([sys.executable, "-m", "jobwrap", "simulate", "--dir", str(tmp_path / "sim"),
                             "--at", "5,14", "--", sys.executable, str(example)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "PASS" in result.stdout


@pytest.mark.timeout(900)
def test_term_to_the_whole_group_with_stateful_loader_workers_commits_and_resumes_bit_exact(tmp_path):
    """TERM to every process (a plain scancel) mid-epoch, StatefulDataLoader with 2 workers: the workers live,
    the step's checkpoint commits, and the relaunch ends with every loss and the state of an uninterrupted fit."""
    plain, plain_run = _fit(tmp_path, "plain", "--workers", "2")
    losses = tmp_path / "cut-losses.txt"
    command = [sys.executable, str(JOB), "--losses", str(losses), "--workers", "2"]
    cut = run_preempted(command, tmp_path / "cut", preempt_at=[5], signal_=signal.SIGTERM, to_group=True)
    assert cut.signalled_at == [5]
    assert cut.returncode == 143, cut.stderr[-3000:]  # a cancel: committed, no relaunch
    assert "is killed by signal" not in cut.stderr
    assert final_state(cut.directory)["lightning"]["global_step"] == 5  # nothing lost
    again = run_preempted(command, tmp_path / "cut").check()
    assert losses.read_text().splitlines() == plain
    assert_same_run(plain_run.directory, cut.directory)
    assert DREW not in again.stderr  # the workers' base seed drawn again by the resumed iterator: no false warning


@pytest.mark.timeout(900)
def test_workers_drawing_augmentation_noise_resume_bit_exact(tmp_path):
    """StatefulDataLoader, 2 workers drawing noise from torch and NumPy in __getitem__, USR1 mid-epoch: bit-exact."""
    plain, plain_run = _fit(tmp_path, "plain", "--workers", "2", "--augment")
    cut, cut_run = _fit(tmp_path, "cut", "--workers", "2", "--augment", preempt_at=[5])
    assert cut_run.signalled_at == [5]
    assert cut == plain  # every step's loss
    assert_same_run(plain_run.directory, cut_run.directory)


def test_draw_in_a_users_hook_before_the_first_resumed_step_still_warns(tmp_path):
    """A user's on_train_start draws from torch's stream: resumed, that draw differs from the uninterrupted run's, and
    jobwrap says so (the warning left out for Lightning's own loader rebuild stays for real draws)."""
    _, cut_run = _fit(tmp_path, "cut", "--draw-on-train-start", preempt_at=[5])
    assert cut_run.signalled_at == [5]
    assert cut_run.stderr.count(DREW) == 1, cut_run.stderr[-3000:]  # the resumed launch only


def test_stop_before_mid_epoch_validation_comes_after_it_and_after_model_checkpoint(tmp_path):
    """val_check_interval=0.5 and ModelCheckpoint(every_n_train_steps=3), USR1 at step 6 (the batch that validation
    and the step-6 save follow): both run before the stop; same validation batches, ckpt files, losses, state."""
    plain, plain_run = _fit(tmp_path, "plain", "--validate", str(tmp_path / "ckpts"))
    (tmp_path / "ckpts").rename(tmp_path / "ckpts-plain")  # the same dirpath for both: ModelCheckpoint saves it
    cut, cut_run = _fit(tmp_path, "cut", "--validate", str(tmp_path / "ckpts"), preempt_at=[6])
    assert cut_run.signalled_at == [6]
    assert "saved step 6 (signal SIGUSR1)" in cut_run.stderr
    plain_val = (tmp_path / "plain-losses.txt.val").read_text().splitlines()
    assert len(plain_val) == 8  # 2 epochs x 2 validations x 2 batches
    assert (tmp_path / "cut-losses.txt.val").read_text().splitlines() == plain_val
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == \
        sorted(p.name for p in (tmp_path / "ckpts-plain").iterdir())
    assert (tmp_path / "ckpts" / "epoch=0-step=6.ckpt").exists()
    assert cut == plain
    assert (tmp_path / "cut-losses.txt.weights.rank0").read_text() == \
        (tmp_path / "plain-losses.txt.weights.rank0").read_text()
    assert_same_run(plain_run.directory, cut_run.directory)
