"""A Lightning fit under jobwrap on the local Slurm cluster: a batch job from jobwrap's layout, signalled
mid-fit, requeued by Slurm, finished bit for bit like an uninterrupted local fit."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning (pip install 'jobwrap[lightning]')")
pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")

from slurm_jobs import (  # noqa: E402
    assert_resumed_once,
    checked,
    job_env,
    lines,
    run_reference,
    usr1_requeued_and_completed,
    write_script,
)

from jobwrap.testing import assert_same_run  # noqa: E402

pytestmark = pytest.mark.slurm

JOB = str(Path(__file__).resolve().parent / "lightning_jobs.py")
STEPS = 24


def test_lightning_job_signalled_on_slurm_requeues_and_finishes_bit_exact(jobs, tmp_path):
    """scancel --signal=USR1 --batch after 3 steps: the fit's checkpoint is committed, Slurm requeues the job
    (restart 1), and the fit ends with every step's loss and the final checkpoint of a plain local fit."""
    run_reference([JOB, "--losses", str(tmp_path / "ref.txt"), "--root", str(tmp_path)], tmp_path / "ref-ckpt")
    script = write_script(tmp_path, "lightning", command=("python", JOB, "--losses", str(tmp_path / "cut.txt"),
                                                          "--root", str(tmp_path), "--step-seconds", "1"))
    info = usr1_requeued_and_completed(jobs, script, tmp_path, job_env(),
                                       lambda: len(lines(tmp_path / "cut.txt")) >= 3, "3 steps")
    ckpt = tmp_path / "ckpt"

    def check() -> None:
        assert info["ExitCode"] == "0:0"
        assert_resumed_once(ckpt, 3, STEPS)
        assert lines(tmp_path / "cut.txt") == lines(tmp_path / "ref.txt")
        assert len(lines(tmp_path / "ref.txt")) == STEPS
        assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue saved nothing
        assert_same_run(tmp_path / "ref-ckpt", ckpt)
    checked(info["JobId"], check)
