"""Save: the disk's limit (raw write + fsync), torch.save + fsync, jobwrap's commit alone and its signal-to-committed
save (a real SIGUSR1 to this process), in rotating order, with each one's peak extra memory."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from benchmarks import common
from benchmarks.common import cleanup, durable_sync, fresh_dir, peak_memory, session, torch_save

import jobwrap
from jobwrap._storage.store import CheckpointStore

SAVE_KEYS = ["raw write + fsync", "torch.save + fsync", "jobwrap commit (store.save)", "jobwrap signal -> committed"]


def raw_write(model, optimizer, path: Path) -> float:
    """The tensors' bytes, 8 MiB per write() straight from their memory, then one fsync: the disk's limit."""
    tensors = list(model.state_dict().values()) + [v for s in optimizer.state.values() for v in s.values()
                                                   if isinstance(v, torch.Tensor) and v.dim() > 0]
    views = [memoryview(t.detach().cpu().contiguous().numpy()).cast("B") for t in tensors]
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for view in views:
            for start in range(0, len(view), 8 << 20):
                piece = view[start:start + (8 << 20)]
                done = 0
                while done < len(piece):
                    done += os.write(fd, piece[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started



def jobwrap_signal_save(model, optimizer, directory: Path) -> float:
    """A real SIGUSR1 to this process, caught by the session; time until the checkpoint is committed."""
    job = session(directory)
    try:
        with job:
            job.track(model=model, optimizer=optimizer)
            started = time.perf_counter()
            os.kill(os.getpid(), signal.SIGUSR1)
            job.step_done()
    except jobwrap.Preempted as stopped:
        assert stopped.checkpoint is not None
        return time.perf_counter() - started
    raise RuntimeError("the signal did not stop the session")



def jobwrap_store_save(model, optimizer, directory: Path) -> float:
    """The commit protocol alone: CheckpointStore.save of {model, optimizer}."""
    store = CheckpointStore(str(directory))
    store.prepare()
    started = time.perf_counter()
    store.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, step=1, epoch=0, meta={})
    return time.perf_counter() - started



def bench_save(model, optimizer, reps: int, memory: dict[str, list[int]]) -> dict[str, list[float]]:
    methods: dict[str, Callable[[int], float]] = {
        "raw write + fsync": lambda i: raw_write(model, optimizer, common.WORK / f"raw-{i}.bin"),
        "torch.save + fsync": lambda i: torch_save(model, optimizer, common.WORK / f"torch-{i}.pt"),
        "jobwrap commit (store.save)": lambda i: jobwrap_store_save(model, optimizer, fresh_dir(f"st-{i}")),
        "jobwrap signal -> committed": lambda i: jobwrap_signal_save(model, optimizer, fresh_dir(f"jw-{i}")),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            durable_sync()
            with peak_memory(memory.setdefault(name, [])):
                times[name].append(methods[name](rep))
            cleanup()
    return times
