"""The checkpointing a user would otherwise pick, on the state scripts/bench measures jobwrap with.

``torch.distributed.checkpoint`` (DCP) as its documentation shows it: ``get_state_dict`` of model and
optimizer, then ``save`` (blocking), ``async_save`` with the thread and with the process checkpointer
(its blocking part: the call until it returns, staging included; the write is awaited before the next
one, untimed), and ``load`` + ``set_state_dict`` into a new model's optimizer from a cold page cache.
DCP needs a process group: a one-rank gloo group lives in this process for the measurements
(jobwrap treats a one-rank group as a single process).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from benchmarks.common import free_port

PEER_KEYS = ["DCP save", "DCP async_save blocking (thread)", "DCP async_save blocking (process)", "DCP load"]


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A one-rank gloo process group for DCP, torn down afterwards (DCP's checkpoint daemon lives on)."""
    before = os.environ.get("MASTER_ADDR")
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # where the process checkpointer's daemon sets up its own group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        if before is None:
            os.environ.pop("MASTER_ADDR", None)
        else:
            os.environ["MASTER_ADDR"] = before


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def dcp_save(model, optimizer, directory: Path) -> float:
    started = time.perf_counter()
    dcp.save(_state(model, optimizer), checkpoint_id=str(_fresh(directory)))  # its writer fsyncs each file
    return time.perf_counter() - started


def dcp_async_blocking(model, optimizer, directory: Path, kind: AsyncCheckpointerType) -> float:
    """The time ``async_save`` holds the training loop; its write is then awaited, untimed."""
    _fresh(directory)
    started = time.perf_counter()
    pending = dcp.async_save(_state(model, optimizer), checkpoint_id=str(directory), async_checkpointer_type=kind)
    blocked = time.perf_counter() - started
    (pending.upload_completion if hasattr(pending, "upload_completion") else pending).result()
    return blocked


def dcp_load(target: nn.Module, target_opt: torch.optim.Optimizer, directory: Path) -> float:
    """To a ready model and optimizer: the optimizer has no state yet, as in a new process."""
    started = time.perf_counter()
    state = _state(target, target_opt)  # get_state_dict initialises the optimizer's state to load into
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(target, target_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return time.perf_counter() - started


def bench_peers(model, optimizer, target, target_opt, reps: int, work: Path,
                drop_cache: Callable[[Path], None]) -> dict[str, list[float]]:
    """DCP's save, async saves and load on the same state, medians' samples by name (rotating order)."""
    saved = work / "dcp-load"
    with one_rank_group():
        dcp.save(_state(model, optimizer), checkpoint_id=str(_fresh(saved)))
        # The first process save spawns DCP's daemon (a new interpreter, then a group): once per job, untimed.
        dcp_async_blocking(model, optimizer, work / "dcp-warm", AsyncCheckpointerType.PROCESS)

        def load() -> float:
            target_opt.state.clear()
            for file in saved.iterdir():
                drop_cache(file)
            return dcp_load(target, target_opt, saved)

        methods: dict[str, Callable[[int], float]] = {
            "DCP save": lambda i: dcp_save(model, optimizer, work / f"dcp-{i}"),
            "DCP async_save blocking (thread)":
                lambda i: dcp_async_blocking(model, optimizer, work / f"dcpt-{i}", AsyncCheckpointerType.THREAD),
            "DCP async_save blocking (process)":
                lambda i: dcp_async_blocking(model, optimizer, work / f"dcpp-{i}", AsyncCheckpointerType.PROCESS),
            "DCP load": lambda i: load(),
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        names = list(methods)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                os.sync()
                times[name].append(methods[name](rep))
                for path in work.iterdir():
                    if path.is_dir() and path.name.startswith("dcp") and path != saved:
                        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(saved, ignore_errors=True)
    shutil.rmtree(work / "dcp-warm", ignore_errors=True)
    return times
