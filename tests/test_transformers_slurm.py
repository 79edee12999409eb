"""The Hugging Face Trainer under jobwrap on the local Slurm cluster: a batch job from jobwrap's layout,
signalled mid-run, requeued by Slurm, finished bit for bit like an uninterrupted local run."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the transformers extra is not installed (pip install -e '.[transformers]')")

from slurm_jobs import (  # noqa: E402
    assert_resumed_once,
    checked,
    job_env,
    lines,
    run_reference,
    usr1_requeued_and_completed,
    write_script,
)
from test_transformers import OFFLINE, _assert_same_training  # noqa: E402

pytestmark = pytest.mark.slurm

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "hf_trainer_job.py")


def _args(tmp_path: Path, name: str) -> tuple[str, ...]:
    return (SCRIPT, "--out", str(tmp_path / f"{name}-out"), "--log", str(tmp_path / f"{name}.log"),
            "--final", str(tmp_path / f"{name}.pt"))


def test_trainer_job_signalled_on_slurm_requeues_and_finishes_bit_exact(jobs, tmp_path):
    """scancel --signal=USR1 --batch after 3 logged steps: the Trainer's checkpoint is committed, Slurm
    requeues the job (restart 1), and the run ends with every step's log and the final state of a plain run."""
    run_reference(_args(tmp_path, "ref"), tmp_path / "ref-ckpt", **OFFLINE)
    script = write_script(tmp_path, "hf", command=("python", *_args(tmp_path, "cut"), "--step-seconds", "1"))
    info = usr1_requeued_and_completed(jobs, script, tmp_path, job_env(**OFFLINE),
                                       lambda: len(lines(tmp_path / "cut.log")) >= 3, "3 logged steps")

    def check() -> None:
        assert info["ExitCode"] == "0:0"
        assert_resumed_once(tmp_path / "ckpt", 3, 16)
        _assert_same_training(tmp_path, "ref", "cut")
    checked(info["JobId"], check)
