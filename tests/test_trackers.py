"""Experiment trackers continue across requeues (jobwrap.trackers): TensorBoard, W&B (offline) and MLflow
(its file store), with the real packages. A run preempted three times (USR1, then TERM, then SIGKILL after
a periodic save) logs into one tracker run, and what the tracker shows is every step once, with the
value of the uninterrupted run, and no gap."""
from __future__ import annotations

import dataclasses
import json
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
SAVE_EVERY = 5  # periodic saves of the launch that is killed


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Where the preempted run is signalled, and what its tracker must then show. ``offset``: the step number
    a framework logs a step under, less the steps done before it (the Trainer logs step n once n are done)."""

    steps: int
    usr1: int = 3
    term: int = 7
    kill: int = 12  # two steps after the periodic save of step 10
    offset: int = 0

    @property
    def commit(self) -> int:
        """The last periodic save before the kill."""
        return self.kill - self.kill % SAVE_EVERY if self.kill % SAVE_EVERY else self.kill - SAVE_EVERY

    @property
    def logged(self) -> list[int]:
        return [s + self.offset for s in range(self.steps)]

    @property
    def starts(self) -> list[int]:
        """The first step each launch of the preempted run logs."""
        return [s + self.offset for s in (0, self.usr1, self.term, self.commit)]

    @property
    def relogged(self) -> list[int]:
        """Logged by the killed launch after its last commit, and again by the next one."""
        return [s + self.offset for s in range(self.commit, self.kill)]


PLAIN_RUN = Schedule(steps=16)
LIGHTNING_RUN = Schedule(steps=24, kill=17)  # 12 steps an epoch: no signal at an epoch's last step
TRAINER_RUN = Schedule(steps=16, offset=1)


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
    pytest.importorskip(tracker, reason=f"{tracker} is not installed (pip install -e '.[trackers]')")


def _require_all() -> None:
    for tracker in ("tensorboard", "wandb", "mlflow"):
        _require(tracker)


def _launch(command: list[str], directory: Path, env: dict[str, str], hold_at: list[int],
            control: Path) -> subprocess.Popen:
    control.mkdir(parents=True, exist_ok=True)
    run_env = {**os.environ, **env, "JOBWRAP_DIR": str(directory), "JOBWRAP_TEST_CONTROL": str(control),
               "JOBWRAP_TEST_HOLD_AT": ",".join(map(str, hold_at)), "PYTHONFAULTHANDLER": "1"}
    with open(control / "stderr", "a") as err:
        return subprocess.Popen([sys.executable, "-m", "jobwrap", "run", "--", *command], env=run_env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _wait(proc: subprocess.Popen, control: Path, timeout: float = 600) -> int:
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


def run_preempted_three_times(command: list[str], directory: Path, env: dict[str, str], at: Schedule, *,
                              settle: float = 0.0) -> None:
    """USR1 at ``at.usr1`` (committed, requeued: `jobwrap run` relaunches), TERM at ``at.term`` (committed,
    exit 143, no requeue), a new launch killed with SIGKILL at ``at.kill``, two steps after a periodic save,
    with its whole process group (a node failure), ``settle`` seconds after it reached the step, and a last
    launch that resumes from that save and finishes."""
    control = Path(tempfile.mkdtemp(prefix="jobwrap-trackers-"))
    launched: list[subprocess.Popen] = []
    try:
        first = _launch(command, directory, env, [at.usr1, at.term], control)
        launched.append(first)
        signal_when_held(control, at.usr1, lambda held: os.kill(first.pid, signal.SIGUSR1), timeout=600)
        signal_when_held(control, at.term, lambda held: os.kill(first.pid, signal.SIGTERM), timeout=600)
        assert _wait(first, control) == 143, (control / "stderr").read_text()[-4000:]

        killed = _launch(command, directory, {**env, "JOBWRAP_SAVE_EVERY_STEPS": str(SAVE_EVERY)}, [at.kill],
                         control)
        launched.append(killed)
        deadline = time.monotonic() + 600
        while not list(control.glob(f"held-{at.kill}-r*")):
            assert killed.poll() is None and time.monotonic() < deadline, (control / "stderr").read_text()[-4000:]
            time.sleep(0.05)
        time.sleep(settle)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
        assert CheckpointStore(str(directory)).committed()[0].step == at.commit

        last = _launch(command, directory, env, [], control)
        launched.append(last)
        assert _wait(last, control) == 0, (control / "stderr").read_text()[-4000:]
    finally:
        for proc in launched:  # a failed test leaves no run behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)


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


def wandb_launches(wandb_dir: Path, key: str = "loss",
                   step_key: str = "_step") -> list[tuple[str, list[tuple[int, float]]]]:
    """Each launch's offline run file in time order: (its run id, [(step, value)] of its history rows)."""
    launches = []
    for path in sorted(p for p in wandb_dir.rglob("run-*.wandb") if p.parent.name.startswith("offline-run-")):
        run_id, rows = None, []
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                if key in items:
                    rows.append((items[step_key], items[key]))
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


def mlflow_history(out: Path, key: str = "loss"
                   ) -> tuple[list[tuple[int, float]], list[tuple[int, float]], dict[str, str]]:
    """(every value logged in order, what the rule 'the last value of a step wins' makes of it, the tags)."""
    client, runs = mlflow_runs(out)
    assert len(runs) == 1, f"{len(runs)} MLflow runs"
    history = sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: (m.timestamp, m.step))
    logged = [(m.step, m.value) for m in history]
    return logged, sorted(dict(logged).items()), runs[0].data.tags


def _relogged(rows: list[tuple[int, float]]) -> list[int]:
    steps = [step for step, _ in rows]
    return sorted({step for step in steps if steps.count(step) > 1})


def check_tensorboard(ref: Path, cut: Path, at: Schedule, tag: str) -> None:
    """TensorBoard shows one run, each step once with the uninterrupted run's value: the purge dropped the
    killed launch's steps past its commit."""
    expected = tensorboard_scalars(ref, tag)
    assert [s for s, _ in expected] == at.logged
    assert tensorboard_scalars(cut, tag) == expected


def check_wandb(ref: Path, cut: Path, at: Schedule, key: str, step_key: str) -> None:
    """One W&B run id in every launch's run file; every step logged with the uninterrupted run's value and no
    gap; the steps the killed launch logged past its commit are in the files twice with equal values, and
    W&B's rule for a resumed run (a step lower than the next one is ignored) keeps one of each."""
    (_, expected), = wandb_launches(ref, key, step_key)
    assert [s for s, _ in expected] == at.logged
    launches = wandb_launches(cut, key, step_key)
    assert len(launches) == 4 and len({run_id for run_id, _ in launches}) == 1, launches
    assert [rows[0][0] for _, rows in launches] == at.starts
    logged = [row for _, rows in launches for row in rows]
    assert sorted(set(logged)) == expected
    if step_key == "_step":
        # A row logged with step= is written once a later step is logged: the killed launch's last one was not.
        assert _relogged(logged) == at.relogged[:-1]
        assert wandb_history(launches) == expected
    else:
        assert _relogged(logged) == at.relogged


def check_mlflow(ref: Path, cut: Path, at: Schedule, key: str) -> None:
    """One MLflow run; every step logged with the uninterrupted run's value, no gap; the killed launch's steps
    past its commit hold two equal values (the last wins); the tag lists where each launch started."""
    expected, _, _ = mlflow_history(ref, key)
    assert [s for s, _ in expected] == at.logged
    logged, last_wins, tags = mlflow_history(cut, key)
    assert last_wins == expected
    assert sorted(set(logged)) == expected
    assert _relogged(logged) == at.relogged
    assert tags["jobwrap.resumed_at"] == ",".join(map(str, at.starts))


# W&B's process writes what it holds every 0.25 s under jobwrap (WANDB__TRANSACTION_LOG_FLUSH_INTERVAL) and
# has no flush to call; a kill sooner than that after the last steps loses them (docs/integrations.md).
WANDB_SETTLE = 1.0


def _ref_and_cut(tmp_path: Path, command, env, at: Schedule, *, settle: float) -> tuple[Path, Path]:
    """Run ``command(out)`` uninterrupted and preempted three times; their tracker folders."""
    outs = {}
    for name in ("ref", "cut"):
        out = outs[name] = tmp_path / f"{name}-out"
        out.mkdir()
        if name == "ref":
            run_uninterrupted(command(out), tmp_path / name, env(out))
        else:
            run_preempted_three_times(command(out), tmp_path / name, env(out), at, settle=settle)
    return outs["ref"], outs["cut"]


def _env_for(*trackers: str):
    def env(out: Path) -> dict[str, str]:
        merged = {}
        for tracker in trackers:
            merged.update(_tracker_env(tracker, out))
        return merged
    return env


# ---------------------------------------------------------------- plain script
PLAIN = SCRIPTS / "trackers_plain.py"


@pytest.mark.timeout(1200)
def test_plain_script_preempted_three_times_logs_each_step_once_into_one_run_of_each_tracker(tmp_path):
    """A loop logging to TensorBoard, W&B and MLflow through jobwrap.trackers' one-liners, preempted by USR1,
    TERM and SIGKILL after a periodic save: one run in each tracker, each step with the uninterrupted run's
    value, no gap (TensorBoard purged, W&B resumed by id, MLflow's run found again by its tag)."""
    _require_all()
    ref, cut = _ref_and_cut(
        tmp_path, lambda out: [sys.executable, str(PLAIN), "--trackers", "tensorboard,wandb,mlflow", "--out",
                               str(out), "--steps", str(PLAIN_RUN.steps)],
        _env_for("wandb", "mlflow"), PLAIN_RUN, settle=WANDB_SETTLE)
    check_tensorboard(ref / "tb", cut / "tb", PLAIN_RUN, "loss")
    check_wandb(ref, cut, PLAIN_RUN, "loss", "_step")
    check_mlflow(ref, cut, PLAIN_RUN, "loss")


# ---------------------------------------------------------------- Lightning and the Trainer
@pytest.mark.timeout(1200)
def test_lightning_loggers_continue_one_run_each_across_usr1_term_and_sigkill(tmp_path):
    """Lightning's TensorBoardLogger, WandbLogger and MLFlowLogger, made by the script as usual, with only
    Preemptible() added: after USR1, TERM and SIGKILL each logs into one run, every step with the
    uninterrupted fit's loss, no gap."""
    pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")
    _require_all()
    script = SCRIPTS / "trackers_lightning.py"
    ref, cut = _ref_and_cut(tmp_path, lambda out: [sys.executable, str(script), "--out", str(out)],
                            _env_for("wandb", "mlflow"), LIGHTNING_RUN, settle=WANDB_SETTLE)
    check_tensorboard(ref / "tb", cut / "tb", LIGHTNING_RUN, "loss")
    check_wandb(ref, cut, LIGHTNING_RUN, "loss", "trainer/global_step")
    check_mlflow(ref, cut, LIGHTNING_RUN, "loss")


def test_lightning_logger_whose_run_was_made_before_the_fit_is_refused_at_its_start(tmp_path):
    """A TensorBoardLogger whose experiment the script used before trainer.fit() already wrote into a new
    version folder: the fit is refused at its start with a ConfigError naming the way out, not left to log
    each relaunch into another folder."""
    pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")
    _require_all()
    env = {**os.environ, **_env_for("wandb", "mlflow")(tmp_path), "JOBWRAP_DIR": str(tmp_path / "ck")}
    out = subprocess.run([sys.executable, str(SCRIPTS / "trackers_lightning.py"), "--out", str(tmp_path), "--early"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "ConfigError: the TensorBoardLogger's run was made before trainer.fit() started" in out.stderr
    assert not list(tmp_path.rglob("offline-run-*"))  # no W&B run started
    assert not (tmp_path / "mlruns").exists() or not mlflow_runs(tmp_path)[1]  # nor an MLflow run


@pytest.mark.timeout(1200)
def test_trainer_report_to_continues_one_run_each_across_usr1_term_and_sigkill(tmp_path):
    """The Trainer's report_to=["tensorboard", "wandb", "mlflow"] with jobwrap.transformers.attach: after USR1,
    TERM and SIGKILL each logs into one run, every step (the Trainer's global_step) with the uninterrupted
    run's loss, no gap."""
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    _require_all()
    script = SCRIPTS / "trackers_trainer.py"
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "MLFLOW_EXPERIMENT_NAME": "jobwrap-test", "WANDB_PROJECT": "jobwrap-test"}
    ref, cut = _ref_and_cut(tmp_path, lambda out: [sys.executable, str(script), "--out", str(out / "trainer")],
                            lambda out: {**_env_for("wandb", "mlflow")(out), **offline}, TRAINER_RUN,
                            settle=WANDB_SETTLE)
    check_tensorboard(ref / "trainer" / "runs", cut / "trainer" / "runs", TRAINER_RUN, "train/loss")
    check_wandb(ref, cut, TRAINER_RUN, "train/loss", "train/global_step")
    check_mlflow(ref, cut, TRAINER_RUN, "loss")


REWIND = """
import sys, torch, jobwrap, jobwrap.trackers
with jobwrap.Session(sys.argv[1]) as job:
    job.track(model=torch.nn.Linear(2, 2))
    run = jobwrap.trackers.wandb_init(job, project="jobwrap-test", dir=sys.argv[2], rewind=True)
    print("KEY", run.id, jobwrap.trackers.run_key(job))
    for step in job.steps(int(sys.argv[3])):
        run.log({"x": float(step)}, step=step)
    run.finish()
"""


def test_wandb_rewind_records_the_resumed_step_in_the_offline_run(tmp_path):
    """wandb_init(rewind=True): a fresh launch resumes by id; a launch that resumed at step 3 asks W&B to rewind
    the run to step 3 (resume_from), recorded as the run's branch point in its offline file for `wandb sync`."""
    _require("wandb")
    env = {**os.environ, **_tracker_env("wandb", tmp_path)}
    keys = []
    for total in (3, 5):
        out = subprocess.run([sys.executable, "-c", REWIND, str(tmp_path / "ck"), str(tmp_path), str(total)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        keys.append([line.split()[1:] for line in out.stdout.splitlines() if line.startswith("KEY")][0])
    assert keys[0] == keys[1] and keys[0][0] == keys[0][1]
    points = []
    for path in sorted(p for p in tmp_path.rglob("run-*.wandb") if p.parent.name.startswith("offline-run-")):
        run, = [r.run for r in _wandb_records(path) if r.WhichOneof("record_type") == "run"]
        points.append((run.run_id, run.branch_point.run, run.branch_point.value, run.resume))
    assert points == [(keys[0][0], "", 0, True), (keys[0][0], keys[0][0], 3, False)]


def test_a_failing_hook_before_a_checkpoint_does_not_cost_the_checkpoint(tmp_path, caplog):
    """job.on_checkpoint hooks run before every save, in order; one that raises (a tracker's full disk) is
    logged and the checkpoint is committed all the same."""
    import torch

    import jobwrap

    calls = []

    def broken() -> None:
        calls.append("broken")
        raise OSError(28, "No space left on device")

    with jobwrap.Session(tmp_path / "ck") as job:
        job.track(model=torch.nn.Linear(2, 2))
        job.on_checkpoint(broken)
        job.on_checkpoint(lambda: calls.append("flushed"))
        for _ in job.steps(2):
            pass
        saved = job.save()
    assert calls[:2] == ["broken", "flushed"] and saved.step == 2
    assert CheckpointStore(str(tmp_path / "ck")).committed()[0].step == 2
    assert "failed, the checkpoint goes ahead" in caplog.text
