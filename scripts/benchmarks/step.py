"""The wrapper's cost per step: step_done() with nothing due, and a tiny model's step with and without it."""
from __future__ import annotations

import time

import torch
from benchmarks.common import cleanup, fresh_dir, session
from torch import nn

def bench_step(reps: int) -> dict[str, list[float]]:
    """step_done() alone (nothing due), and a tiny model's training step with and without it."""
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 16)
    result: dict[str, list[float]] = {"step_done (us)": [], "tiny step, plain (us)": [],
                                      "tiny step, jobwrap (us)": []}
    directory = fresh_dir("step")

    def train_step() -> None:
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    with session(directory) as job:
        job.track(model=model, optimizer=optimizer)
        calls = 200_000
        for _ in range(reps):
            started = time.perf_counter()
            for _ in range(calls):
                job.step_done()
            result["step_done (us)"].append((time.perf_counter() - started) / calls * 1e6)
            steps = 2000
            for name, wrapped in (("tiny step, plain (us)", False), ("tiny step, jobwrap (us)", True)):
                started = time.perf_counter()
                for _ in range(steps):
                    train_step()
                    if wrapped:
                        job.step_done()
                result[name].append((time.perf_counter() - started) / steps * 1e6)
    cleanup()
    return result
