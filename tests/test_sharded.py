"""Sharded (FSDP2) state under torchrun (gloo, CPU): DCP folders committed last, bit-exact resume, resharding."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap.errors import CorruptCheckpointError
from jobwrap.testing import assert_same_run, assert_same_state, final_state, run_preempted

SCRIPT = str(REPO / "examples" / "train_fsdp.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT]
SAVES = {"JOBWRAP_SAVE_EVERY_STEPS": "6"}  # 16 steps on 2 ranks: checkpoints at 6, 12 and 16


def _folder(directory, step: int):
    return directory / f"step-{step:012d}.dcp"


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _one_process(directory, *args: str) -> subprocess.CompletedProcess:
    """The example as one process (world size 1, gloo), without jobwrap run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWRAP_")}
    env.update(JOBWRAP_DIR=str(directory), MASTER_PORT=_free_port(), PYTHONFAULTHANDLER="1")
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-rank run with checkpoints at steps 6, 12 and 16."""
    directory = tmp_path_factory.mktemp("fsdp-reference")
    run_preempted([*TORCHRUN, "--epochs", "2"], directory, ranks=2, env=SAVES, timeout=180).check()
    return directory


@pytest.fixture
def copied(tmp_path, reference):
    """A copy of the reference run's directory, to damage or resume."""
    shutil.copytree(reference, tmp_path / "ck")
    return tmp_path / "ck"


def test_signal_to_one_rank_commits_sharded_state_and_resumes_bit_exact(tmp_path, reference):
    """USR1 to rank 1 only: both ranks write their shards at step 5, one commit, and the resumed run is bit-exact."""
    run = run_preempted([*TORCHRUN, "--epochs", "2"], tmp_path, ranks=2, preempt_at=[5], target_ranks=[1],
                        env=SAVES, timeout=240).check()
    assert run.signalled_at == [5]
    events = read_events(str(tmp_path))
    assert [e["step"] for e in events if e["event"] == "requeue"] == [5]
    assert [e["step"] for e in events if e["event"] == "save"] == [5, 6, 12, 16]
    assert len(re.findall(r"saved step 5\b", run.stderr)) == 1 and "step-000000000005.dcp/" in run.stderr
    # Retention (keep_last=3) deleted step 5's folder with its checkpoint.
    assert sorted(p.name for p in tmp_path.glob("step-*.dcp")) == [_folder(tmp_path, s).name for s in (6, 12, 16)]
    state = final_state(tmp_path)
    assert state["jobwrap"]["dcp"]["world_size"] == 2 and state["jobwrap"]["dcp"]["objects"] == ["model", "optimizer"]
    assert "model" in state and "optimizer" in state  # gathered from the folder by final_state
    assert_same_run(reference, tmp_path)


def test_two_rank_checkpoint_reshards_onto_one_process_and_back(tmp_path, copied):
    """2 -> 1 -> 2 ranks: after each resume the full model and optimizer state equal the saved values exactly."""
    saved = final_state(copied)
    one = _one_process(copied, "--epochs", "3", "--dump", str(tmp_path / "one.pt"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming 2-rank checkpoint with 1 ranks" in one.stderr and "resharded exactly" in one.stderr
    dumped = torch.load(tmp_path / "one.pt", weights_only=True)
    assert_same_state(saved["model"], dumped["model"], "model")
    assert_same_state(saved["optimizer"]["state"], dumped["optimizer"]["state"], "optimizer")

    # The one process trained epoch 3 alone (16 steps of all 256 samples) and saved with world size 1.
    saved_by_one = final_state(copied)
    assert saved_by_one["step"] == 32 and saved_by_one["jobwrap"]["dcp"]["world_size"] == 1
    run = run_preempted([*TORCHRUN, "--epochs", "3", "--dump", str(tmp_path / "two.pt")], copied, ranks=2,
                        timeout=180).check()
    assert "resuming 1-rank checkpoint with 2 ranks" in run.stderr
    dumped = torch.load(tmp_path / "two.pt", weights_only=True)
    assert_same_state(saved_by_one["model"], dumped["model"], "model")
    assert_same_state(saved_by_one["optimizer"]["state"], dumped["optimizer"]["state"], "optimizer")


def test_damaged_shard_and_missing_folder_fall_back_to_the_previous_checkpoint(copied, reference):
    """A flipped byte in step 16's shard and step 12's folder gone: both set aside with one line, resume from 6."""
    shard = _folder(copied, 16) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    shutil.rmtree(_folder(copied, 12))
    run = run_preempted([*TORCHRUN, "--epochs", "2"], copied, ranks=2, env=SAVES, timeout=180).check()
    reports = [line for line in run.stderr.splitlines() if "corrupt checkpoint" in line]
    assert len(reports) == 2, run.stderr[-3000:]
    assert "__1_0.distcp: checksum" in reports[0] and "damaged on disk" in reports[0]
    assert "step-000000000012.dcp: the sharded state" in reports[1] and "is missing" in reports[1]
    assert "resumed from step-000000000006.pt" in run.stderr
    assert list(copied.glob("step-000000000016.dcp.corrupt-*"))  # set aside with its checkpoint, not deleted
    assert_same_run(reference, copied)


def test_kill_during_sharded_write_commits_nothing(copied, reference):
    """SIGKILL on every rank after its shard data, before DCP's .metadata: no commit; the next start cleans up."""
    for step in (12, 16):  # as if the run had been cut after step 6
        (copied / f"step-{step:012d}.json").unlink()
    killed = run_preempted([*TORCHRUN, "--epochs", "2"], copied, ranks=2, timeout=180,
                           env={**SAVES, "JOBWRAP_TEST_KILL_AT": "dcp-data-written"})
    assert killed.returncode != 0
    assert [c.name for c in copied.glob("step-*.json")] == ["step-000000000006.json"]
    left = _folder(copied, 12)
    assert left.is_dir() and not (left / ".metadata").exists(), sorted(os.listdir(copied))

    run = run_preempted([*TORCHRUN, "--epochs", "2"], copied, ranks=2, env=SAVES, timeout=180).check()
    assert "removing step-000000000012.dcp left by an interrupted save" in run.stderr
    assert "resumed from step-000000000006.pt" in run.stderr
    assert_same_run(reference, copied)


def test_a_different_model_is_a_clear_error(copied):
    """A model that does not match the sharded checkpoint: StateMismatchError naming the tensor and the fix."""
    result = _one_process(copied, "--epochs", "2", "--hidden", "32")
    assert result.returncode != 0
    assert "StateMismatchError" in result.stderr
    assert "model.0.weight" in result.stderr and "Build the model exactly as the run that saved it" in result.stderr


@pytest.fixture
def small_disk(tmp_path, request):
    """A real tmpfs of ``request.param`` bytes: room for one sharded checkpoint of the example (~190 KB)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a size-limited tmpfs")
    point = tmp_path / "disk"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param},mode=0700", "tmpfs", str(point)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused: {mounted.stderr.strip()}")
    yield point
    if subprocess.run(["umount", str(point)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


# 240 KB: step 12's shards do not fit. 340 KB: its shards fit, rank 0's .pt does not.
@pytest.mark.parametrize("small_disk", ["240k", "340k"], indirect=True, ids=["shards", "pt"])
def test_full_disk_during_a_sharded_save_keeps_the_previous_checkpoint(small_disk):
    """ENOSPC while step 12 is written: every rank stops with StorageError; step 6 stays committed and whole."""
    directory = small_disk / "ck"
    run = run_preempted([*TORCHRUN, "--epochs", "2"], directory, ranks=2, env=SAVES, timeout=180)
    assert run.returncode != 0
    assert "StorageError" in run.stderr and "No space left on device" in run.stderr, run.stderr[-3000:]
    assert [c.step for c in CheckpointStore(str(directory)).committed()] == [6]
    assert not _folder(directory, 12).exists(), sorted(os.listdir(directory))  # its partial shards removed
    assert final_state(directory)["step"] == 6  # verified: the .pt and every file of its folder


class _Evil:
    """Pickles into a call of os.system: unpickling it would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dcp_folder(folder, state) -> set[str]:
    """``state`` saved by DCP in one process (no torch.distributed); the names of the files written."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return set(os.listdir(folder))


def test_crafted_dcp_metadata_is_refused_without_running_it(tmp_path):
    """A .metadata whose pickle would run a command: a clear CorruptCheckpointError, the command never runs."""
    import pickle

    from jobwrap._storage import sharded

    marker = tmp_path / "pwned"
    files = _dcp_folder(tmp_path / "real", {"w": torch.ones(3)})
    assert set(sharded.read_metadata(str(tmp_path / "real"), files).state_dict_metadata) == {"w"}  # DCP's own: read
    (tmp_path / "real" / ".metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CorruptCheckpointError, match="not a checkpoint's metadata.*refused without running"):
        sharded.read_metadata(str(tmp_path / "real"), files)
    assert not marker.exists()


def test_dcp_metadata_pointing_outside_the_verified_files_is_refused(tmp_path):
    """Metadata naming a data file that was not verified (say ../x): refused before DCP reads it."""
    from jobwrap._storage import sharded

    files = _dcp_folder(tmp_path / "real", {"w": torch.ones(3)})
    with pytest.raises(CorruptCheckpointError, match="not among the verified files"):
        sharded.read_metadata(str(tmp_path / "real"), files - {"__0_0.distcp"})


def test_crafted_non_tensor_value_in_a_shard_is_loaded_under_weights_only(tmp_path):
    """A non-tensor value in a shard file (DCP loads those with weights_only=False): refused, nothing runs."""
    import torch.distributed.checkpoint as dcp

    from jobwrap._storage import sharded

    marker = tmp_path / "pwned"
    files = _dcp_folder(tmp_path / "f", {"w": torch.ones(3), "lr": _Evil(str(marker))})
    state = {"w": torch.zeros(3), "lr": 0.0}
    with pytest.raises(BaseException):  # DCP wraps the UnpicklingError in its CheckpointException
        dcp.load(state, storage_reader=sharded._safe_reader(str(tmp_path / "f"), files),
                 planner=sharded._safe_planner(), no_dist=True)
    assert not marker.exists()


ACCUMULATING = """
import os, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
import jobwrap
dist.init_process_group("gloo")
with jobwrap.Session() as job:
    model = fully_shard(nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    job.track(model=model, optimizer=optimizer)
    for _ in job.epochs(1):
        for x in job.loader([torch.ones(3, 4)] * 4):
            model(x).sum().backward()  # accumulate: step every other batch
            if job.step % 2:
                optimizer.step()
                optimizer.zero_grad()
dist.destroy_process_group()
"""


def test_accumulated_gradients_of_a_sharded_model_are_refused_at_the_first_boundary(tmp_path):
    """FSDP with gradient accumulation under job.loader(): the first boundary between micro-batches stops
    with an error naming the fix (boundaries only after optimizer.step()), not a resume that diverges."""
    script = tmp_path / "accumulate_fsdp.py"
    script.write_text(ACCUMULATING)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWRAP_")}
    env.update(JOBWRAP_DIR=str(tmp_path / "ck"), MASTER_PORT=_free_port(),
               MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", JOBWRAP_NO_SLURM="1")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ConfigError: step boundary 1: gradients accumulated since the last optimizer.step() are pending" in result.stderr, result.stderr[-3000:]
    assert "call job.step_done()" in result.stderr and "only after optimizer.step()" in result.stderr
    assert CheckpointStore(str(tmp_path / "ck")).committed() == []


def test_export_gathers_a_sharded_checkpoint_into_one_weights_only_file(tmp_path, reference):
    """jobwrap export of an FSDP checkpoint: one file weights_only opens, the full tensors equal to the state."""
    out = tmp_path / "model.pt"
    result = subprocess.run([sys.executable, "-m", "jobwrap", "export", str(reference), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = torch.load(out, weights_only=True)
    state = {k: v for k, v in final_state(reference).items() if k != "jobwrap"}
    assert sorted(exported) == sorted(state) and "model" in exported
    assert_same_state(exported, state)
