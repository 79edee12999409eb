"""Resume to a ready model and optimizer from a cold page cache: jobwrap (verified), torch.load + load_state_dict,
and a raw read of the file into new memory and into memory already touched."""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

import torch
from benchmarks.common import build_like, cleanup, drop_cache, fresh_dir, peak_memory, release_free_memory, session

RESUME_KEYS = ["raw read into touched memory", "raw read into new memory", "torch.load + load_state_dict",
               "jobwrap resume (verified)"]


def bench_resume(model, optimizer, reps: int, memory: dict[str, list[int]]) -> dict[str, list[float]]:
    directory = fresh_dir("resume")
    with session(directory) as job:
        job.track(model=model, optimizer=optimizer)
        checkpoint = job.save()
    path = Path(checkpoint.path)
    size = path.stat().st_size
    target, target_opt = build_like(model)
    touched = torch.ones(size, dtype=torch.uint8)

    def jobwrap_resume() -> Callable[[], None]:
        again = session(directory)
        again.start()
        again.track(model=target, optimizer=target_opt)
        assert again.step == 0 and again.resumed_from is not None
        return again.close  # ready: what closing records is not part of the resume

    def torch_resume() -> None:
        payload = torch.load(path, weights_only=True)
        target.load_state_dict(payload["model"])
        target_opt.load_state_dict(payload["optimizer"])

    def read_all(view: memoryview) -> None:
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < size:  # one read() returns at most 2 GiB
                done += f.readinto(view[done:])

    def raw_new() -> None:
        read_all(memoryview(torch.empty(size, dtype=torch.uint8).numpy()))

    def raw_touched() -> None:
        read_all(memoryview(touched.numpy()))

    methods = {"raw read into new memory": raw_new, "raw read into touched memory": raw_touched,
               "torch.load + load_state_dict": torch_resume, "jobwrap resume (verified)": jobwrap_resume}
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            target_opt.state.clear()     # a new process has a model but no optimizer state yet
            release_free_memory()
            drop_cache(path)
            with peak_memory(memory.setdefault(name, [])):
                started = time.perf_counter()
                after = methods[name]()
                times[name].append(time.perf_counter() - started)
            if after is not None:
                after()
            gc.collect()
    check = torch.load(path, weights_only=True)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in check["model"].items())
    del check
    touched = None  # freed before cleanup(); rebound, not deleted: raw_touched() above reads it
    cleanup()
    return times
