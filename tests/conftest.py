"""Shared fixtures: the example training script as a command line; the local Slurm cluster and its jobs."""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import FINAL_STATES, SlurmError, cancel, cluster_available, job_info


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the tests' processes even where the suite itself was started with SIGINT ignored (a
    shell's background job, nohup): an ignored signal stays ignored across exec, so every script a test
    interrupts would never see its SIGINT."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "train.py"


@pytest.fixture
def train_cmd() -> list[str]:
    """The example training job, as a command line."""
    return [sys.executable, str(TRAIN)]


@pytest.fixture(scope="session")
def slurm_up() -> None:
    """Skips, with the reason, when the local cluster does not answer."""
    up, reason = cluster_available()
    if not up:
        pytest.skip(reason)


@pytest.fixture
def jobs(slurm_up: None, tmp_path: Path) -> Iterator[list[str]]:
    """Skips without a cluster; cancels every job id the test appends, pass or fail."""
    submitted: list[str] = []
    yield submitted
    cancel(*submitted)
    # A cancelled job leaves the node only after KillWait; the next test needs its CPUs.
    deadline = time.monotonic() + 30
    for job in submitted:
        with contextlib.suppress(SlurmError):
            while job_info(job).get("JobState") not in FINAL_STATES and time.monotonic() < deadline:
                time.sleep(0.2)
