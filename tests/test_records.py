"""Every file jobwrap reads back, with wrong types and ranges: skipped with one warning, never a crash."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobwrap._loop.interval import AutoInterval
from jobwrap._report import goodput, leadtime, relaunch
from jobwrap._report.history import summarize
from jobwrap._storage import records
from jobwrap._storage.events import EVENTS_FILE, read_events
from jobwrap._storage.lock import HOLDER_FILE, DirectoryLock
from jobwrap._storage.store import CheckpointStore
from jobwrap.testing import run_preempted

REPO = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(REPO / "examples" / "train.py"), "--epochs", "2", "--samples", "256"]

# Records that are JSON but cannot be trusted: each crashed a reader before the schema (issue 21, item 11).
BAD_EVENTS = {
    "negative duration": {"event": "save", "time": 5.0, "step": 3, "reason": "periodic", "seconds": -4.0},
    "not an object": [1, 2, 3],
    "a string for a number": {"event": "save", "time": 6.0, "step": "three", "seconds": "0.5", "reason": "periodic"},
    "empty object": {},
    "no event name": {"time": 7.0, "step": 1},
    "infinite time": {"event": "start", "time": float("inf"), "step": 0},
    "text as a signal": {"event": "signal", "time": 8.0, "step": 2, "signal": 10},
    "a bool as a step": {"event": "exit", "time": 9.0, "step": True, "code": 0, "reason": "finished"},
    "null": None,
}

GOOD = [
    {"event": "start", "time": 100.0, "step": 0, "run_id": "r", "restart": 0, "resumed_from": None},
    {"event": "save", "time": 110.0, "step": 5, "seconds": 0.5, "bytes": 10, "reason": "periodic", "path": "p"},
    {"event": "signal", "time": 120.0, "step": 8, "signal": "SIGUSR1", "delay": 0.1},
    {"event": "save", "time": 121.0, "step": 8, "seconds": 0.5, "bytes": 10, "reason": "signal SIGUSR1", "path": "p"},
    {"event": "requeue", "time": 121.5, "step": 8, "progress": True, "exit_code": 0},
    {"event": "exit", "time": 121.6, "step": 8, "code": 0, "reason": "requeued"},
    {"event": "start", "time": 130.0, "step": 8, "run_id": "r", "restart": 1, "resumed_from": "p",
     "load_seconds": 0.2, "process_started": 129.0, "session_started": 129.5, "init_seconds": 0.1},
    {"event": "first-step", "time": 131.0, "step": 9, "first_batch": 130.8},
]


def _write_events(directory: Path, bad: object) -> None:
    lines = [json.dumps(e) for e in GOOD[:3]] + [json.dumps(bad)] * 3 + [json.dumps(e) for e in GOOD[3:]]
    (directory / EVENTS_FILE).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind", sorted(BAD_EVENTS))
def test_every_events_reader_skips_an_odd_record_with_one_warning(tmp_path, kind, caplog):
    """A bad events.jsonl record is dropped by read_events (one warning for the file) and every reader of the
    history (auto interval, summary, goodput, lead time, relaunches, `jobwrap status`) works on the rest."""
    _write_events(tmp_path, BAD_EVENTS[kind])
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        events = read_events(str(tmp_path))
    assert events == GOOD
    warnings = [r.getMessage() for r in caplog.records if "cannot be trusted" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 3 record(s)" in warnings[0]
    auto = AutoInterval(events)
    assert auto.choice is not None and auto.choice.seconds > 0
    history = summarize(events)
    assert len(history.launches) == 2
    times = goodput.breakdown(history, {})
    leadtime.advise(history, [launch.step_seconds for launch in times.launches])
    assert leadtime.check_directory(str(tmp_path), lead=120, grace=60) is not None
    assert len(relaunch.relaunches(events)) == 1
    for extra in ([], ["--json"]):
        status = subprocess.run([sys.executable, "-m", "jobwrap", "status", str(tmp_path), *extra],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "Traceback" not in status.stderr


def test_event_schema_accepts_what_jobwrap_writes():
    """Every record kind jobwrap appends passes the schema unchanged (no good record is dropped)."""
    for record in GOOD:
        assert records.event(record) is record
    assert isinstance(records.event({"event": "save", "seconds": float("nan")}), str)


def test_torn_last_line_is_skipped_silently(tmp_path, caplog):
    """A kill mid-write leaves a torn last line: it is skipped without a warning (it is expected)."""
    (tmp_path / EVENTS_FILE).write_text(json.dumps(GOOD[0]) + "\n" + '{"event": "sa')
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        assert read_events(str(tmp_path)) == GOOD[:1]
    assert not [r for r in caplog.records if "cannot be trusted" in r.getMessage()]


@pytest.mark.parametrize("bad", [
    {"host": "h", "pid": "12", "started": 0.0, "boot_id": "b", "job_id": None, "restart": 0, "since": 1.0,
     "heartbeat": 1.0},
    {"host": "h", "pid": 12, "started": 0.0, "boot_id": "b", "job_id": None, "restart": 0, "since": 1.0,
     "heartbeat": "yesterday"},
    {"host": "h", "pid": -3, "started": 0.0, "boot_id": "b", "job_id": 7, "restart": 0, "since": 1.0,
     "heartbeat": 1.0},
    [], "text", {},
])
def test_lock_record_of_wrong_types_is_not_trusted(tmp_path, bad, caplog):
    """A lock.json whose fields have the wrong types is read as no record (one warning), not a crash."""
    (tmp_path / HOLDER_FILE).write_text(json.dumps(bad))
    lock = DirectoryLock(str(tmp_path), job_id=None, restart=0, timeout=60)
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        lock.acquire()
    try:
        assert any("lock.json" in r.getMessage() and "cannot be trusted" in r.getMessage() for r in caplog.records)
    finally:
        lock.release()


@pytest.mark.parametrize("field,value", [("step", "3"), ("step", -1), ("size", 1.5), ("epoch", True),
                                         ("checksum", 5), ("serial", -2)])
def test_manifest_of_wrong_types_is_not_trusted(tmp_path, field, value):
    """A manifest whose step/size/epoch/checksum/serial has the wrong type or range is not listed as committed
    (and `jobwrap ls` still runs)."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    store.save({"x": 1, "jobwrap": {}}, step=3, epoch=0, meta={})
    manifest = tmp_path / "step-000000000003.json"
    record = json.loads(manifest.read_text())
    record[field] = value
    manifest.write_text(json.dumps(record))
    assert store.committed() == []
    listed = subprocess.run([sys.executable, "-m", "jobwrap", "ls", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert "Traceback" not in listed.stderr


@pytest.mark.parametrize("field,value", [("wall_time", "yesterday"), ("reason", 5), ("save_seconds", -1.0),
                                         ("run_id", ["a"]), ("restart_count", "2")])
def test_manifest_description_of_wrong_types_is_dropped_not_the_checkpoint(tmp_path, field, value, caplog):
    """A manifest whose descriptive field (time, reason, save seconds...) has the wrong type keeps its
    checkpoint trusted, without that field, and `jobwrap status` and `jobwrap ls` print without a traceback."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    store.save({"x": 1, "jobwrap": {}}, step=3, epoch=0, meta={"run_id": "r", "wall_time": 1.0, "reason": "manual"})
    manifest = tmp_path / "step-000000000003.json"
    record = json.loads(manifest.read_text())
    record[field] = value
    manifest.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        committed = store.committed()
    assert [c.step for c in committed] == [3] and field not in committed[0].manifest
    assert any(field in r.getMessage() for r in caplog.records)
    for command in (["status"], ["status", "--json"], ["ls"]):
        done = subprocess.run([sys.executable, "-m", "jobwrap", *command, str(tmp_path)], capture_output=True,
                              text=True, timeout=60)
        assert "Traceback" not in done.stderr, done.stderr


def test_odd_events_do_not_stop_an_auto_run_or_its_requeue(tmp_path):
    """Under save_every="auto" a run whose events.jsonl holds odd records starts, commits at the signal and is
    requeued (relaunched by `jobwrap run`), then finishes: nothing between the commit and the requeue raises."""
    directory = tmp_path / "ck"
    directory.mkdir()
    (directory / EVENTS_FILE).write_text("".join(json.dumps(bad) + "\n" for bad in BAD_EVENTS.values()))
    run = run_preempted(TRAIN, directory, preempt_at=[5], env={"JOBWRAP_SAVE_EVERY": "auto"}, timeout=240)
    run.check()
    events = read_events(str(directory))
    assert [e["event"] for e in events].count("requeue") == 1
    assert sum(1 for e in events if e["event"] == "start") == 2
    assert os.path.exists(directory / EVENTS_FILE)


PLANTED = ["events.jsonl", "lock", "lock.json", "run.json", "step-000000000001.pt", "step-000000000001.json",
           "step-000000000001.dcp", "step-000000000002.pt", "step-000000000002.json"]


@pytest.mark.parametrize("name", PLANTED)
def test_symlink_planted_where_jobwrap_writes_is_never_written_through(tmp_path, name):
    """A symlink planted at a name jobwrap writes (its log, its lock, run.json, a checkpoint, its manifest, a step
    folder) pointing outside the directory: the run fails clearly or replaces the link, and the target outside
    is left byte for byte as it was."""
    import torch

    import jobwrap

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    directory = tmp_path / "ck"
    directory.mkdir()
    target = outside if name.endswith(".dcp") else victim
    os.symlink(target, directory / name)
    try:
        with jobwrap.Session(str(directory), environ={}, run_id="r", async_save=False) as job:
            job.track(model=torch.nn.Linear(2, 2))
            for _ in range(2):
                job.step_done()
                job.save()
    except jobwrap.JobwrapError as exc:  # a clear refusal is fine; writing through the link is not
        assert str(exc)
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(outside)) == ["victim"]
