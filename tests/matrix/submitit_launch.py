"""One launch of a matrix cell as a submitit job: what a user's submitting script does (tests/matrix).

    python tests/matrix/submitit_launch.py CONFIG_JSON LOSS_LOG SUBMITIT_FOLDER [--slurm]

Submits ``train_matrix.submitit_train`` wrapped in ``jobwrap.submitit.Preemptible`` to
submitit's ``LocalExecutor`` (real subprocesses: submitit's controller, the task, its
DataLoader workers, all in this process's process group), waits for the job, and
prints the task's log (the matrix judges the output's errors). The exit code is the
job's as a launch's: 0 with a result; 143 when this launch was sent TERM (a cancel:
scancel's TERM reaches every process of the job, the controller forwards it to the task);
1 otherwise. A requeue (submitit's preemption signal, ``SUBMITIT_PREEMPT_SIGNAL``) stays
inside the job: submitit's controller restarts the task, as Slurm requeues the job.
The checkpoint directory is ``JOBWRAP_DIR``; the matrix's driver (drive.py) sets the environment.

``--slurm`` submits to the Slurm cluster instead (submitit's Slurm executor), prints the job id and
exits: slurm_driver.py signals the job with scancel and waits for it as for its other Slurm cells.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import submitit
from train_matrix import submitit_train

from jobwrap.submitit import Preemptible

WAIT = 600  # seconds; the driver's own bound (drive.TIMEOUT) ends the launch before this
cancelled: list[int] = []


def _note(signum: int, frame: object) -> None:
    """This submitting process is not part of the job: a cancel's TERM only marks the launch cancelled.
    (A caught signal is reset to its default in the controller submitit starts, unlike an ignored one.)"""
    cancelled.append(signum)


def main() -> int:
    cfg, loss_log, folder = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    if cfg["framework"] != "loop":
        raise SystemExit(f"submitit cells run the matrix's own loop, not framework={cfg['framework']}")
    if sys.argv[4:] == ["--slurm"]:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(timeout_min=10, slurm_signal_delay_s=60, cpus_per_task=3)  # 2 loader workers
        job = executor.submit(Preemptible(submitit_train, os.environ["JOBWRAP_DIR"]), cfg, loss_log)
        print(job.job_id, flush=True)
        return 0
    signal.signal(signal.SIGTERM, _note)
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=30)  # far away: no time-out signal of submitit's own
    job = executor.submit(Preemptible(submitit_train, os.environ["JOBWRAP_DIR"]), cfg, loss_log)
    print(f"submitit job {job.job_id}", flush=True)
    deadline = time.monotonic() + WAIT
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        print(f"result: {job.result()}")
        code = 0
    except Exception as exc:  # noqa: BLE001 - any failure of the job is the launch's failure, shown
        print(f"no result: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        code = 143 if cancelled else 1
    print(f"--- task log ---\n{job.stdout() or ''}{job.stderr() or ''}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
