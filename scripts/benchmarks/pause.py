"""The training loop's pause for a periodic save (background, lazy and eager copy), against nothing due, and the
memory of the staging buffers; on a GPU machine the pause of a GPU-resident state."""
from __future__ import annotations

import time
from typing import Any

import torch
from benchmarks import common
from benchmarks.common import build, cleanup, fresh_dir, median, peak_memory, session, torch_save

PAUSE_KEYS = ["jobwrap periodic pause (lazy)", "  of which step_done (lazy)", "jobwrap periodic pause (eager)",
              "jobwrap background write (lazy)", "train step, no save",
              "train step during the background save (lazy)"]


def bench_pause(model, optimizer, reps: int, memory: dict[str, list[int]], batch: int) -> dict[str, Any]:
    """The training loop's pause for a periodic save, in a loop that trains (forward, backward, step).

    pause = the time step_done() blocks (stage into the buffers, hand-off) plus the time the next
    optimizer.step() waits for the parameters still being copied on the writer thread. Measured with
    the default (lazy copy) and with every tensor copied during step_done() (lazy_copy=False).
    """
    device = next(model.parameters()).device
    width = next(model.parameters()).shape[1]
    x = torch.randn(batch, width, device=device)
    result: dict[str, Any] = {}

    def train_step(job=None) -> tuple[float, float]:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, (job._saver.copy_wait if job is not None else 0.0)

    for lazy in (True, False):
        label = "lazy" if lazy else "eager"
        job = session(fresh_dir(f"pause-{label}"), save_every_steps=2, lazy_copy=lazy, keep_last=1)
        pauses, waits, busy_steps, quiet_steps, writes = [], [], [], [], []
        with job:
            job.track(model=model, optimizer=optimizer)
            train_step()
            job.step_done()                       # step 1: the staging buffers are reserved in the background
            assert job._saver.background.wait(600)
            train_step()
            for _ in range(reps):
                started = time.perf_counter()
                job.step_done()                   # even step: a save is due
                pauses.append(time.perf_counter() - started)
                seconds, wait = train_step(job)   # runs while the writer copies and writes
                busy_steps.append(seconds)
                waits.append(wait)
                assert job._saver.background.wait(600)
                writes.append(time.perf_counter() - started)
                job.step_done()                   # odd step: collects the save, nothing due
                quiet_steps.append(train_step()[0])
            assert job.last_checkpoint is not None and job.last_checkpoint.step == 2 * reps
        result[f"jobwrap periodic pause ({label})"] = [p + w for p, w in zip(pauses, waits)]
        result[f"  of which step_done ({label})"] = pauses
        result[f"train step during the background save ({label})"] = busy_steps
        result["train step, no save"] = result.get("train step, no save", []) + quiet_steps
        result[f"jobwrap background write ({label})"] = writes
        cleanup()
    # Memory: the staging buffers (reserved after the first step) and the writer, without training.
    job = session(fresh_dir("pause-memory"), save_every_steps=1, keep_last=1)
    extra: list[int] = []
    with peak_memory(extra):
        with job:
            job.track(model=model, optimizer=optimizer)
            for _ in range(3):
                job.step_done()
                assert job._saver.background.wait(600)
        result["staging bytes"] = job._saver.staging.nbytes if job._saver.staging else 0
        result["checkpoint bytes"] = job.last_checkpoint.size if job.last_checkpoint else 0
    memory["jobwrap periodic (async)"] = extra
    cleanup()
    return result



def bench_gpu_pause(nbytes: int, reps: int) -> dict[str, float] | None:
    """On a GPU machine: the pause of a periodic save of a GPU-resident state (device -> pinned host)."""
    if not torch.cuda.is_available():
        return None
    model, optimizer = build(nbytes, "cuda")
    pause = bench_pause(model, optimizer, reps, {}, batch=32)
    blocking = [torch_save(model, optimizer, common.WORK / "gpu.pt") for _ in range(max(1, reps // 2))]
    cleanup()
    del model, optimizer
    torch.cuda.empty_cache()
    return {"jobwrap periodic pause (GPU state)": median(pause["jobwrap periodic pause (lazy)"]),
            "torch.save + fsync (GPU state)": median(blocking)}
