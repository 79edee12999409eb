"""Striped saves of replicated (DDP) state under torchrun (gloo, CPU): every rank writes its part, one commit."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap._storage.striped import checksum, digest, plan, unproven
from jobwrap.testing import assert_same_run, assert_same_state, final_state, run_preempted

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(REPO / "examples" / "train_ddp.py"), "--epochs", "2"]
STRIPE = {"JOBWRAP_STRIPE_MIN_BYTES": "0"}  # the example's state is tiny: stripe it anyway


def _folder(directory, step: int):
    return directory / f"step-{step:012d}.dcp"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBWRAP_")}
    return subprocess.run([sys.executable, *args], env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-rank run, saved in one file (the default threshold)."""
    directory = tmp_path_factory.mktemp("ddp-reference")
    run_preempted(TORCHRUN, directory, ranks=2, timeout=180).check()
    return directory


@pytest.fixture(scope="module")
def striped(tmp_path_factory):
    """A two-rank run preempted at step 5, striped saves at 5 (the signal's) and 16 (the end)."""
    directory = tmp_path_factory.mktemp("ddp-striped")
    run = run_preempted(TORCHRUN, directory, ranks=2, preempt_at=[5], env=STRIPE, timeout=300).check()
    assert run.signalled_at == [5]
    return directory


@pytest.fixture
def copied(tmp_path, striped):
    """A copy of the striped run's directory, to damage or resume."""
    shutil.copytree(striped, tmp_path / "ck")
    return tmp_path / "ck"


def test_plan_puts_the_largest_tensors_first_on_the_least_loaded_rank():
    """The assignment is a pure function of the sizes: balanced bins, the same on every call."""
    sizes = [4, 10, 3, 9, 8, 1, 1]
    owners = plan(sizes, 2)
    assert owners == plan(sizes, 2) == [0, 0, 0, 1, 1, 0, 1]
    assert sorted(sum(s for s, o in zip(sizes, owners) if o == r) for r in (0, 1)) == [18, 18]
    assert plan([5], 4) == [0] and plan([], 3) == []


def test_signal_save_is_written_by_both_ranks_and_resumes_bit_exact(striped, reference):
    """USR1 at step 5: each rank wrote a part of about half the tensor bytes, one manifest, bit-exact resume."""
    assert [e["step"] for e in read_events(str(striped)) if e["event"] == "save"] == [5, 16]
    assert sorted(p.name for p in _folder(striped, 5).iterdir()) == ["part-0.pt", "part-1.pt"]
    assert [p.name for p in striped.glob("step-000000000005*.json")] == ["step-000000000005.json"]
    manifest = {c.step: c.manifest for c in CheckpointStore(str(striped)).committed()}[5]
    assert manifest["reason"] == "signal SIGUSR1" and manifest["stripes"]["world_size"] == 2
    # A jobwrap from before striping skips it as "written by a newer jobwrap" rather than load its Nones.
    assert manifest["format"] == 2
    by_hand = torch.load(striped / "step-000000000005.pt", weights_only=True)
    assert by_hand["model"]["0.weight"] is None  # its bytes are in a part
    parts = [torch.load(_folder(striped, 5) / f"part-{r}.pt", weights_only=True) for r in (0, 1)]
    written = [sum(t.nbytes for t in part.values()) for part in parts]
    assert all(share > sum(written) / 3 for share in written), written
    assert_same_run(reference, striped)


RESUME_ONE = """\
import argparse, sys, torch
sys.path.insert(0, sys.argv[2])
import jobwrap
from train import build

with jobwrap.Session(allow_world_size_change=True) as job:
    model, optimizer, scheduler = build(argparse.Namespace(optimizer="adam"))
    job.track(model=model, optimizer=optimizer, scheduler=scheduler)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, sys.argv[1])
"""


def test_striped_checkpoint_resumes_on_one_process(tmp_path, copied):
    """A 2-rank striped checkpoint loaded by one process: model and optimizer equal the saved state exactly."""
    script = tmp_path / "one.py"
    script.write_text(RESUME_ONE)
    result = _run(str(script), str(tmp_path / "one.pt"), str(REPO / "examples"), env={"JOBWRAP_DIR": str(copied)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step-000000000016.pt" in result.stderr
    saved, loaded = final_state(copied), torch.load(tmp_path / "one.pt", weights_only=True)
    assert_same_state(saved["model"], loaded["model"], "model")
    assert_same_state(saved["optimizer"], loaded["optimizer"], "optimizer")


def test_corrupt_part_falls_back_to_the_previous_checkpoint(copied, reference):
    """A flipped byte in step 16's part-1.pt: the checkpoint is set aside with one line, resume from step 5."""
    part = _folder(copied, 16) / "part-1.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    run = run_preempted(TORCHRUN, copied, ranks=2, env=STRIPE, timeout=240).check()
    reports = [line for line in run.stderr.splitlines() if "corrupt checkpoint" in line]
    assert len(reports) == 1 and "part-1.pt: checksum" in reports[0] and "damaged on disk" in reports[0], reports
    assert "resumed from step-000000000005.pt" in run.stderr
    assert list(copied.glob("step-000000000016.dcp.corrupt-*"))  # set aside with its .pt, not deleted
    assert_same_run(reference, copied)


def test_kill_after_a_part_leaves_the_previous_checkpoint_newest(copied, reference):
    """SIGKILL once a rank's part of step 16 is durable: nothing commits; the next start cleans up, resumes at 5."""
    (copied / "step-000000000016.json").unlink()  # as if the run had been cut after step 5
    killed = run_preempted(TORCHRUN, copied, ranks=2, timeout=240,
                           env={**STRIPE, "JOBWRAP_TEST_KILL_AT": "part-written"})
    assert killed.returncode != 0
    assert [c.step for c in CheckpointStore(str(copied)).committed()] == [5]
    assert any(p.name.startswith("part-") for p in _folder(copied, 16).iterdir())

    run = run_preempted(TORCHRUN, copied, ranks=2, env=STRIPE, timeout=240).check()
    assert "removing step-000000000016.dcp left by an interrupted save" in run.stderr
    assert "resumed from step-000000000005.pt" in run.stderr
    assert_same_run(reference, copied)


def test_export_writes_one_weights_only_file_from_one_file_and_striped_checkpoints(tmp_path, reference, striped):
    """jobwrap export: from a directory (one-file) and a striped .pt, a file weights_only opens, equal to the state."""
    for source, out in ((reference, tmp_path / "one.pt"), (striped / "step-000000000016.pt", tmp_path / "two.pt")):
        result = _run("-m", "jobwrap", "export", str(source), str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "exported step 16" in result.stdout
        exported = torch.load(out, weights_only=True)
        state = final_state(reference if source == reference else striped)
        assert sorted(exported) == sorted(k for k in state if k != "jobwrap")
        assert_same_state(exported, {k: v for k, v in state.items() if k != "jobwrap"})
    bad = _run("-m", "jobwrap", "export", str(tmp_path / "one.pt"), str(tmp_path / "x.pt"))
    assert bad.returncode == 1 and "is not a committed jobwrap checkpoint" in bad.stderr


RANK1_FAILS = """\
import sys, torch, torch.distributed as dist
import jobwrap
dist.init_process_group("gloo")
rank = dist.get_rank()

class Fragile:
    def state_dict(self):
        if rank == 1:
            raise RuntimeError("state_dict failed on rank 1")
        return {}
    def load_state_dict(self, state):
        pass

with jobwrap.Session(sys.argv[1], stripe_min_bytes=0) as job:
    job.track(model=torch.nn.Linear(64, 64), fragile=Fragile())
    job.step_done()
    try:
        job.save()
    except Exception as exc:
        print(f"rank {rank}: {type(exc).__name__}: {exc}", flush=True)
dist.destroy_process_group()
"""


def test_a_failure_on_rank_1_fails_the_striped_save_on_every_rank(tmp_path):
    """Rank 1 cannot produce its state: both ranks raise StorageError naming rank 1, nothing is committed."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(RANK1_FAILS)
    result = _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                  str(tmp_path / "ck"), env={"JOBWRAP_NO_SLURM": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2 and all("StorageError" in line and "rank 1 could not write its part of the striped "
                                   "state of step 1: RuntimeError: state_dict failed on rank 1" in line
                                   for line in lines), result.stdout + result.stderr[-3000:]
    assert CheckpointStore(str(tmp_path / "ck")).committed() == []
    assert not _folder(tmp_path / "ck", 1).exists()


def test_unproven_names_every_tensor_whose_digest_is_not_the_same_on_every_rank():
    """Pure: a tensor is striped only if every rank hashed it to one value; an unhashable one never is."""
    assert unproven([[1, 2, 3], [1, 5, 3], [1, 2, 3]]) == [1]
    assert unproven([[1, None, 3], [1, None, 3]]) == [1]
    assert unproven([[7, 8]]) == []
    value = torch.randn(4, 5)
    assert digest(value) == digest(value.clone()) != digest(value + 1e-7)
    changed = value.clone()
    changed.view(-1)[13] = torch.nextafter(changed.view(-1)[13], torch.tensor(float("inf")))  # one bit
    assert digest(changed) != digest(value)
    assert digest(torch.empty(3, device="meta")) is None


@pytest.mark.parametrize("size", [4 * 5, 4 * 5 + 3])
def test_accelerator_checksum_tells_any_changed_or_swapped_word(size, monkeypatch):
    """The on-device checksum (run here on the CPU, in small pieces): one changed bit, two swapped words, a changed
    last byte and a changed length all change it; equal bytes give equal values."""
    monkeypatch.setattr("jobwrap._storage.striped._WORDS", 3)  # several pieces even for a tiny tensor
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    assert checksum(data) == checksum(data.clone())
    flipped = data.clone()
    flipped[9] ^= 1
    swapped = data.clone()
    swapped[0:4], swapped[12:16] = data[12:16], data[0:4]
    last = data.clone()
    last[-1] ^= 128
    others = [checksum(flipped), checksum(swapped), checksum(last), checksum(data[:-1])]
    assert checksum(data) not in others and len(set(others)) == 4


# ---------------------------------------------------------------- DDP with BatchNorm: buffers differ per rank

BATCHNORM = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(REPO / "tests" / "scripts" / "ddp_batchnorm.py")]


def _batchnorm_run(directory, preempt_at=(), env=None):
    """A DDP + BatchNorm run in ``directory``; each rank's final BatchNorm buffers land in ``directory``/buffers."""
    (directory / "buffers").mkdir(parents=True)
    run = run_preempted([*BATCHNORM, "--buffers-dir", str(directory / "buffers")], directory / "ck", ranks=2,
                        preempt_at=preempt_at, env=env, timeout=300).check()
    assert run.signalled_at == list(preempt_at)
    return run


def _rank_buffers(directory, rank: int):
    return torch.load(directory / "buffers" / f"rank-{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def batchnorm_reference(tmp_path_factory):
    """An uninterrupted two-rank DDP + BatchNorm run, saved in one file (the default threshold)."""
    directory = tmp_path_factory.mktemp("bn-reference")
    _batchnorm_run(directory)
    return directory


def test_one_file_save_under_ddp_holds_rank_0s_batchnorm_statistics(batchnorm_reference):
    """The ranks end with different running statistics; the one-file checkpoint holds rank 0's exactly."""
    saved = final_state(batchnorm_reference / "ck")["model"]
    ours, theirs = _rank_buffers(batchnorm_reference, 0), _rank_buffers(batchnorm_reference, 1)
    assert not torch.equal(ours["1.running_mean"], theirs["1.running_mean"])  # the premise: they differ
    assert_same_state({k: saved[k] for k in ours}, ours, "rank 0's buffers")


def test_one_file_save_under_ddp_batchnorm_resumes_bit_exact(tmp_path, batchnorm_reference):
    """USR1 at step 5, one-file layout: every rank resumes with rank 0's statistics, bit-exact with the reference."""
    _batchnorm_run(tmp_path, preempt_at=[5])
    assert "stripes" not in {c.step: c.manifest for c in CheckpointStore(str(tmp_path / "ck")).committed()}[5]
    assert_same_run(batchnorm_reference / "ck", tmp_path / "ck")


def test_striped_save_under_ddp_batchnorm_keeps_rank_0s_statistics_and_resumes_bit_exact(tmp_path, batchnorm_reference):
    """USR1 at step 5, striped: the BatchNorm statistics that differ come from rank 0, the resume is bit-exact."""
    run = _batchnorm_run(tmp_path, preempt_at=[5], env=STRIPE)
    ck = tmp_path / "ck"
    manifests = {c.step: c.manifest for c in CheckpointStore(str(ck)).committed()}
    assert manifests[5]["stripes"]["world_size"] == 2 and manifests[16]["stripes"]["world_size"] == 2
    by_hand = torch.load(ck / "step-000000000005.pt", weights_only=True)["model"]
    assert by_hand["0.weight"] is None  # proven equal on both ranks: striped
    assert by_hand["1.running_mean"] is not None and by_hand["1.running_var"] is not None  # differ: rank 0's
    assert "tensors differ between the ranks (model.1.running_mean, model.1.running_var)" in run.stderr
    saved = final_state(ck)["model"]
    assert_same_state({k: saved[k] for k in _rank_buffers(tmp_path, 0)}, _rank_buffers(tmp_path, 0), "rank 0's")
    assert_same_run(batchnorm_reference / "ck", ck)
