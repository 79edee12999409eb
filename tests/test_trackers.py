"""Experiment trackers continue across requeues (jobwrap.trackers): TensorBoard, W&B (offline) and MLflow
(its file store), with the real packages. A run preempted three times (USR1, then TERM, then SIGKILL after
a periodic save) logs into one tracker run, and what the tracker shows is every step once, with the
value of the uninterrupted run, and no gap."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobwrap._storage.store import CheckpointStore
from jobwrap.testing import signal_when_held

SCRIPTS = Path(__file__).resolve().parent / "scripts"
STEPS = 16
USR1_AT, TERM_AT, KILL_AT, SAVE_EVERY = 3, 7, 12, 5  # the kill comes two steps after the periodic save of step 10
LAUNCH_STARTS = [0, USR1_AT, TERM_AT, 10]  # where each launch of the preempted run resumed
RELOGGED = {10, 11}  # logged by the killed launch after its last commit, and again by the next one


def _tracker_env(tracker: str, out: Path) -> dict[str, str]:
    """No network: W&B offline, MLflow on a local file store; one intra-op thread in every run alike."""
    env = {"OMP_NUM_THREADS": "1", "JOBWRAP_ASYNC_SAVE": "0"}
    if tracker == "wandb":
        env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true", WANDB_DIR=str(out),
                   WANDB_CONSOLE="off", WANDB_DISABLE_CODE="true")
    if tracker == "mlflow":
        env.update(MLFLOW_TRACKING_URI=(out / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
    return env


def _require(tracker: str) -> None:
    module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[tracker]
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[trackers]')")


def _launch(command: list[str], directory: Path, env: dict[str, str], hold_at: list[int],
            control: Path) -> subprocess.Popen:
    control.mkdir(parents=True, exist_ok=True)
    run_env = {**os.environ, **env, "JOBWRAP_DIR": str(directory), "JOBWRAP_TEST_CONTROL": str(control),
               "JOBWRAP_TEST_HOLD_AT": ",".join(map(str, hold_at)), "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen([sys.executable, "-m", "jobwrap", "run", "--", *command], env=run_env,
                            stdout=subprocess.DEVNULL, stderr=open(control / "stderr", "a"), start_new_session=True)


def _wait(proc: subprocess.Popen, control: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise AssertionError(f"run did not finish in {timeout:.0f} s:\n{(control / 'stderr').read_text()[-4000:]}")


def run_uninterrupted(command: list[str], directory: Path, env: dict[str, str]) -> None:
    """The run never stopped, under `jobwrap run`."""
    control = Path(tempfile.mkdtemp(prefix="jobwrap-trackers-"))
    code = _wait(_launch(command, directory, env, [], control), control)
    assert code == 0, (control / "stderr").read_text()[-4000:]


def run_preempted_three_times(command: list[str], directory: Path, env: dict[str, str]) -> None:
    """USR1 at step 3 (committed, requeued: `jobwrap run` relaunches), TERM at 7 (committed, exit 143, no
    requeue), a new launch killed with SIGKILL at step 12 with its whole process group after the periodic
    save of step 10 (a node failure), and a last launch that resumes from 10 and finishes."""
    control = Path(tempfile.mkdtemp(prefix="jobwrap-trackers-"))
    first = _launch(command, directory, env, [USR1_AT, TERM_AT], control)
    signal_when_held(control, USR1_AT, lambda held: os.kill(first.pid, signal.SIGUSR1), timeout=300)
    signal_when_held(control, TERM_AT, lambda held: os.kill(first.pid, signal.SIGTERM), timeout=300)
    assert _wait(first, control) == 143, (control / "stderr").read_text()[-4000:]

    killed = _launch(command, directory, {**env, "JOBWRAP_SAVE_EVERY_STEPS": str(SAVE_EVERY)}, [KILL_AT],
                     control)
    deadline = time.monotonic() + 300
    while not list(control.glob(f"held-{KILL_AT}-r*")):
        assert killed.poll() is None and time.monotonic() < deadline, (control / "stderr").read_text()[-4000:]
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert CheckpointStore(str(directory)).committed()[0].step == 10

    last = _launch(command, directory, env, [], control)
    assert _wait(last, control) == 0, (control / "stderr").read_text()[-4000:]


# ---------------------------------------------------------------- reading each tracker back
def tensorboard_scalars(log_dir: Path, tag: str = "loss") -> list[tuple[int, float]]:
    """What TensorBoard shows: its event files read by its own loader, purged events dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {p.parent for p in log_dir.rglob("events.out.tfevents.*")}
    assert len(runs) == 1, f"TensorBoard sees {len(runs)} runs: {sorted(map(str, runs))}"
    accumulator = EventAccumulator(str(runs.pop()), purge_orphaned_data=True)
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _wandb_records(path: Path):
    """The records of a W&B run file (.wandb): a LevelDB-style log of protobuf records in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, partial = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            yield record


def wandb_launches(wandb_dir: Path, key: str = "loss") -> list[tuple[str, list[tuple[int, float]]]]:
    """Each launch's offline run file in time order: (its run id, [(step, value)] of its history rows)."""
    import json

    launches = []
    for path in sorted(wandb_dir.rglob("offline-run-*/run-*.wandb")):
        run_id, rows = None, []
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                items = {item.key: json.loads(item.value_json) for item in record.history.item}
                if key in items:
                    rows.append((items["_step"], items[key]))
        launches.append((run_id, rows))
    return launches


def wandb_history(launches: list[tuple[str, list[tuple[int, float]]]]) -> list[tuple[int, float]]:
    """The history a W&B user sees of those launches synced into one run: a resumed run goes on from the
    step after the last one logged, and a step lower than that is ignored (W&B's rule)."""
    seen: dict[int, float] = {}
    for _, rows in launches:
        start = max(seen, default=-1)
        seen.update({step: value for step, value in rows if step > start})
    return sorted(seen.items())


def mlflow_runs(out: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


def mlflow_history(out: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], dict[str, str]]:
    """(every value logged in order, what the rule 'the last value of a step wins' makes of it, the tags)."""
    client, runs = mlflow_runs(out)
    assert len(runs) == 1, f"{len(runs)} MLflow runs"
    history = sorted(client.get_metric_history(runs[0].info.run_id, "loss"), key=lambda m: (m.timestamp, m.step))
    logged = [(m.step, m.value) for m in history]
    return logged, sorted(dict(logged).items()), runs[0].data.tags


# ---------------------------------------------------------------- plain script
PLAIN = SCRIPTS / "trackers_plain.py"


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_plain_script_preempted_three_times_logs_each_step_once_into_one_tracker_run(tmp_path, tracker):
    """USR1, TERM and SIGKILL after a periodic save: one tracker run, each step once with the uninterrupted
    run's value, no gap (TensorBoard purged, W&B resumed by id, MLflow's run found again by its tag)."""
    _require(tracker)
    results = {}
    for name in ("ref", "cut"):
        out = tmp_path / f"{name}-out"
        out.mkdir()
        command = [sys.executable, str(PLAIN), "--tracker", tracker, "--out", str(out), "--steps", str(STEPS)]
        env = _tracker_env(tracker, out)
        if name == "ref":
            run_uninterrupted(command, tmp_path / name, env)
        else:
            run_preempted_three_times(command, tmp_path / name, env)
        results[name] = out
    ref, cut = results["ref"], results["cut"]
    if tracker == "tensorboard":
        expected = tensorboard_scalars(ref / "tb")
        assert [s for s, _ in expected] == list(range(STEPS))
        assert tensorboard_scalars(cut / "tb") == expected
    elif tracker == "wandb":
        (_, expected), = wandb_launches(ref)
        launches = wandb_launches(cut)
        assert len(launches) == 4 and {run_id for run_id, _ in launches} == {launches[0][0]}
        assert [rows[0][0] for _, rows in launches] == LAUNCH_STARTS
        assert [s for s, _ in expected] == list(range(STEPS))
        assert wandb_history(launches) == expected
        # The offline files hold the killed launch's steps past its commit twice, with equal values.
        logged = [row for _, rows in launches for row in rows]
        assert sorted(s for s in {s for s, _ in logged} if [t for t, _ in logged].count(s) > 1) == sorted(RELOGGED)
        assert sorted(set(logged)) == expected
    else:
        expected, _, _ = mlflow_history(ref)
        assert [s for s, _ in expected] == list(range(STEPS))
        logged, last_wins, tags = mlflow_history(cut)
        assert last_wins == expected
        assert sorted(set(logged)) == expected  # a step logged twice has its one value twice
        assert sorted(s for s, _ in logged) == sorted([*range(STEPS), *RELOGGED])
        assert tags["jobwrap.resumed_at"] == ",".join(map(str, LAUNCH_STARTS))
