"""Resuming on another number or kind of device: checkpoints that record CUDA locations, loaded here on the CPU."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from fake_gpu import as_gpu_node, locations
from torch import nn

import jobwrap
from jobwrap._storage.devices import cuda_rng_plan, resume_device
from jobwrap._storage.snapshot import StagingArea, pinned_staging
from jobwrap.errors import ConfigError

TESTS = REPO / "tests"


# ---------------------------------------------------------------- the pure rules

@pytest.mark.parametrize("local_rank, cuda_devices, expected", [
    (3, 8, "cuda:3"),   # the node it was saved on
    (3, 1, "cuda:0"),   # a node (or a task) that sees only cuda:0
    (0, 1, "cuda:0"),
    (1, 2, "cuda:1"),
    (3, 0, "cpu"),      # a CPU-only node
])
def test_resume_device_is_local_rank_modulo_visible_devices(local_rank, cuda_devices, expected):
    """Each rank loads onto cuda:LOCAL_RANK among the devices it sees, or the CPU without CUDA."""
    assert resume_device(local_rank=local_rank, cuda_devices=cuda_devices, configured=None) == expected


def test_configured_device_wins_and_an_unreachable_one_is_refused():
    """JOBWRAP_DEVICE beats LOCAL_RANK; a CUDA device this process cannot see is a ConfigError naming the fix."""
    assert resume_device(local_rank=1, cuda_devices=2, configured="cuda:0") == "cuda:0"
    assert resume_device(local_rank=1, cuda_devices=2, configured="cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"sees 1 CUDA device\(s\).*unset it to use cuda:LOCAL_RANK"):
        resume_device(local_rank=0, cuda_devices=1, configured="cuda:3")
    with pytest.raises(ConfigError, match="sees no CUDA device: unset it to resume on the CPU"):
        resume_device(local_rank=0, cuda_devices=0, configured="cuda")


@pytest.mark.parametrize("saved, visible, saved_device, device, plan, warns", [
    (8, 8, 3, 3, [(i, i) for i in range(8)], False),   # the same node layout: exact
    (8, 1, 3, 0, [(3, 0)], True),                      # the rank's own stream follows it to cuda:0
    (1, 8, 0, 3, [(0, 3)], True),                      # one GPU per task before, all visible now
    (8, 2, None, None, [(0, 0), (1, 1)], True),        # unknown saving device: by index
    (8, 0, 3, None, [], True),                         # no CUDA: nothing, and say so
    (0, 2, None, 0, [], False),                        # saved without CUDA
])
def test_cuda_rng_plan(saved, visible, saved_device, device, plan, warns):
    """Saved CUDA RNG states go to the resuming devices by the documented rule, with one line when inexact."""
    got, warning = cuda_rng_plan(saved=saved, visible=visible, saved_device=saved_device, device=device)
    assert got == plan
    assert (warning is not None) == warns
    assert warning is None or "\n" not in warning


def test_staging_is_pinned_only_for_gpu_state():
    """The periodic save's buffers are pinned for GPU tensors (fast device-to-host copies), plain for CPU ones."""
    assert pinned_staging("cuda") is True
    assert pinned_staging("cpu") is False
    state = {"w": torch.ones(1000), "nested": [torch.zeros(10, dtype=torch.int64)]}
    staging = StagingArea()
    assert staging.plan(state) == [(4000, False), (80, False)]
    staged = staging.stage(state)
    assert not staged["w"].is_pinned() and torch.equal(staged["w"], state["w"])


def test_session_refuses_a_cuda_device_it_cannot_see(tmp_path):
    """device='cuda:0' where no CUDA exists fails at start with the fix, not later inside torch."""
    with pytest.raises(ConfigError, match="JOBWRAP_DEVICE"):
        jobwrap.Session(str(tmp_path), environ={}, device="cuda:0")


# ---------------------------------------------------------------- real resumes of GPU checkpoints

def _saved_run(directory, seed=0):
    """A real session that trains two steps and commits; returns the model and the CPU draws that come next."""
    torch.manual_seed(seed)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with jobwrap.Session(str(directory), environ={}, save_at_end=False) as job:
        job.track(model=model, optimizer=optimizer)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(3, 8)).sum().backward()
            optimizer.step()
            job.step_done()
        job.save()
        following = torch.rand(5)
    return model, following


def test_checkpoint_from_cuda3_of_eight_resumes_on_a_cpu_node(tmp_path, caplog):
    """Saved on cuda:3 of an 8-GPU node: loads onto the CPU, state and CPU RNG exact, one warning line."""
    model, following = _saved_run(tmp_path)
    path = as_gpu_node(tmp_path, location="cuda:3", cuda_devices=8, saved_device=3)
    assert locations(path) == {"cuda:3"}
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does with it here
        torch.load(path, weights_only=True)

    torch.manual_seed(42)
    resumed = nn.Linear(8, 4)
    optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    caplog.set_level(logging.WARNING, logger="jobwrap")
    with jobwrap.Session(str(tmp_path), environ={"LOCAL_RANK": "3"}, save_at_end=False) as job:
        job.track(model=resumed, optimizer=optimizer)
        assert job.device == torch.device("cpu") and job.step == 2
        for _ in job.loader([0]):  # the first boundary restores the streams again
            break
        draws = torch.rand(5)
    assert torch.equal(draws, following)
    assert all(torch.equal(a, b) and b.device.type == "cpu" for a, b in zip(model.parameters(), resumed.parameters()))
    assert all(v.device.type == "cpu" for s in optimizer.state.values() for v in s.values())
    warnings = [r.getMessage() for r in caplog.records if "CUDA RNG" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "8 device(s)" in warnings[0] and "no CUDA" in warnings[0]


def test_two_ranks_saved_on_their_gpus_resume_each_on_its_own_device(tmp_path):
    """Two ranks (LOCAL_RANK 0 and 1), rank 0 writing from cuda:0: each rank resumes onto its device and stream."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "JOBWRAP_NO_SLURM": "1",
               "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "device_ranks.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    newest = sorted(tmp_path.glob("step-*.pt"))[-1]
    assert locations(newest) == {"cuda:0"}
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["resumed"] and report["same_model"]
        assert report["device"] == "cpu" and report["model_devices"] == ["cpu"]
        assert report["got"] == report["expected"]
    assert reports[0]["got"] != reports[1]["got"]  # each rank got its own stream back, not rank 0's
