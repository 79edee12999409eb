"""Checks shared by the submitit tests, whatever executor ran the jobs (local or Slurm)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jobwrap._storage.events import read_events
from jobwrap.testing import assert_same_run


def wait_done(job: Any, deadline: float) -> None:
    """Until submitit has the job's result; bounded, unlike ``job.result()``."""
    while not job.done():
        if time.monotonic() > deadline:
            raise AssertionError(f"submitit job {job.job_id} not done in time\n"
                                 f"--- stderr ---\n{(job.stderr() or '')[-3000:]}")
        time.sleep(0.2)


def assert_resumed_like_plain(plain: Any, cut: Any, tmp_path: Path, signalled_at: list[int]) -> list[dict]:
    """``cut`` (signalled at those steps) ended as ``plain``: same result, same state; its events."""
    assert cut.result() == plain.result()
    assert_same_run(tmp_path / "plain", tmp_path / "cut")
    events = read_events(str(tmp_path / "cut"))
    assert [e["step"] for e in events if e["event"] == "signal"] == signalled_at
    assert [e["scheduler"] for e in events if e["event"] == "requeue"] == ["submitit"] * len(signalled_at)
    assert len([e for e in events if e["event"] == "start"]) == len(signalled_at) + 1
    return events
