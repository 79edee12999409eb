"""jobwrap against plain torch.save / torch.load, torch.distributed.checkpoint and the disk, side by side in one run.

Run through ``scripts/bench`` (sets up .venv with matplotlib). For each state
size (a model of 4096x4096 or 1024x1024 layers and Adam's two moments) it
measures, medians over repetitions, in rotating order:

  save      raw durable write of the same tensor bytes (write + one fsync: the disk's limit),
            torch.save + fsync, jobwrap's signal-to-committed save (a real SIGUSR1 to this process)
  pause     the training thread's pause for a jobwrap periodic (background) save,
            against a blocking torch.save + fsync
  resume    to a ready model and optimizer, cold page cache: jobwrap (verified), torch.load +
            load_state_dict, a raw read of the file into new memory (and into memory already touched)
  step      the wrapper's cost per step (step_done with nothing due), on a tiny model
  memory    peak extra resident memory of each (VmHWM after a reset, minus the resident size before)
  peers     torch.distributed.checkpoint's save, async_save (thread and process) and load on the same
            state (scripts/bench_peers.py)
  relaunch  a real signal to `jobwrap run` -> the relaunched trainer's first new step, split into its
            parts (scripts/bench_relaunch.py)
  position  a mid-epoch resume's time to its first batch against the position in the epoch
            (scripts/bench_resume_position.py)
  ranks     the pause of a periodic save with 2 ranks, background against blocking
            (scripts/bench_rank_pause.py); the signal's save with 1, 2 and 4 ranks, throttled
            writers and not (scripts/bench_rank_write.py)

Benchmark files live under the repository's ignored run/ directory and are deleted afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import bench_plot
import bench_rank_pause
import bench_rank_write
import bench_resume_position
import torch
from bench_peers import PEER_KEYS, bench_peers
from bench_relaunch import OVERHEAD_TARGET, SPLITS, bench_relaunch, print_relaunch
from torch import nn

import jobwrap
from jobwrap._storage.store import CheckpointStore

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "run" / "bench"
TARGETS = {
    "emergency save / raw write": 1.15,
    "periodic pause / blocking torch.save": 0.10,
    "resume / raw cold read": 1.30,
    "step overhead / 1 ms step": 0.01,
    "async extra memory / state": 1.0,
    "emergency save / DCP save": 1.0,
    "periodic pause / DCP async_save blocking": 1.0,
    "resume / DCP load": 1.0,
}


# ---------------------------------------------------------------- helpers

def log(message: str) -> None:
    print(message, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def release_free_memory() -> None:
    """Give the allocator's free memory back to the system: what is freed is not silently reused."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(out: list[int]):
    """Appends the peak resident memory above the level at entry (Linux: VmHWM reset by clear_refs)."""
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status("VmRSS")
    yield
    out.append(max(0, _status("VmHWM") - before) if reset else -1)


def durable_sync() -> None:
    os.sync()


def drop_cache(path: Path) -> None:
    """Evict one file from the page cache (posix_fadvise DONTNEED after fsync): a cold read follows."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def build(nbytes: int, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A stack of square layers plus Adam's moments: about ``nbytes`` of state in all (params x 12 bytes)."""
    width = 4096 if nbytes >= (1 << 30) else 1024
    layers = max(1, round(nbytes / 12 / (width * width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    for s in optimizer.state.values():
        tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in tensors)


def fresh_dir(name: str) -> Path:
    path = WORK / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def session(directory: Path, **settings: Any) -> jobwrap.Session:
    return jobwrap.Session(str(directory), environ={}, run_id="bench", save_at_end=False, **settings)


# ---------------------------------------------------------------- save: raw, torch.save, jobwrap

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


def torch_save(model, optimizer, path: Path) -> float:
    started = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
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
        "raw write + fsync": lambda i: raw_write(model, optimizer, WORK / f"raw-{i}.bin"),
        "torch.save + fsync": lambda i: torch_save(model, optimizer, WORK / f"torch-{i}.pt"),
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


def cleanup() -> None:
    for path in WORK.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- pause of a periodic save

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


# ---------------------------------------------------------------- resume

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


def build_like(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    layers = [nn.Linear(m.in_features, m.out_features, bias=False) for m in model]
    other = nn.Sequential(*layers).to(next(model.parameters()).device)
    return other, torch.optim.Adam(other.parameters(), lr=1e-4)


# ---------------------------------------------------------------- per-step overhead

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


# ---------------------------------------------------------------- report

SAVE_KEYS = ["raw write + fsync", "torch.save + fsync", "jobwrap commit (store.save)", "jobwrap signal -> committed"]
PAUSE_KEYS = ["jobwrap periodic pause (lazy)", "  of which step_done (lazy)", "jobwrap periodic pause (eager)",
              "jobwrap background write (lazy)", "train step, no save",
              "train step during the background save (lazy)"]
RESUME_KEYS = ["raw read into touched memory", "raw read into new memory", "torch.load + load_state_dict",
               "jobwrap resume (verified)"]


_RECORDED: dict[str, str] = {}  # --report-only: the machine and software of the run being reported


GPU_BEGIN, GPU_END = "<!-- gpu-check: begin -->", "<!-- gpu-check: end -->"
GPU_NOT_RUN = ("Not run yet: no GPU machine has been lent to this project so far. On a machine with one GPU and a "
               "python3 with a CUDA torch (2.4 or newer), psutil, xxhash and numpy: `scripts/gpu-check --out DIR` "
               "(at most about 8 minutes; nothing is installed, jobwrap comes from the checkout), then "
               "`scripts/gpu-check --report-only DIR` writes its results here.\n")


def gpu_block(text: str) -> str | None:
    """The body of a benchmarks page's GPU section (written by scripts/gpu-check), if it has one."""
    if GPU_BEGIN in text and GPU_END in text:
        return text.split(GPU_BEGIN, 1)[1].split(GPU_END, 1)[0].strip("\n") + "\n"
    return None


def with_gpu_block(text: str, body: str) -> str:
    """``text`` with its GPU section's body replaced by ``body`` (the section appended where missing)."""
    block = f"{GPU_BEGIN}\n{body}{GPU_END}"
    if GPU_BEGIN in text and GPU_END in text:
        head, rest = text.split(GPU_BEGIN, 1)
        return head + block + rest.split(GPU_END, 1)[1]
    return text.rstrip("\n") + f"\n\n## GPU\n\n{block}\n"


def machine() -> str:
    if "machine" in _RECORDED:
        return _RECORDED["machine"]
    import psutil

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB, {gpu}"


def software() -> str:
    if "software" in _RECORDED:
        return _RECORDED["software"]
    return f"Linux {platform.release().split('-')[0]}, Python {platform.python_version()}, torch {torch.__version__}"


def summarize(size_name: str, nbytes: int, batch: int, save: dict, pause: dict, resume: dict,
              memory: dict, peers: dict) -> dict:
    samples = {k: v for k, v in {**save, **pause, **resume, **peers}.items() if isinstance(v, list)}
    med = {k: median(v) for k, v in samples.items()}
    dcp_blocking = min(med["DCP async_save blocking (thread)"], med["DCP async_save blocking (process)"])
    mem = {k: (median([m for m in v if m >= 0]) if any(m >= 0 for m in v) else None) for k, v in memory.items()}
    ratios = {
        "emergency save / raw write": med["jobwrap signal -> committed"] / med["raw write + fsync"],
        "periodic pause / blocking torch.save": med["jobwrap periodic pause (lazy)"] / med["torch.save + fsync"],
        "resume / raw cold read": med["jobwrap resume (verified)"] / med["raw read into new memory"],
        "async extra memory / state": (mem.get("jobwrap periodic (async)") or 0) / pause["checkpoint bytes"],
        "emergency save / DCP save": med["jobwrap signal -> committed"] / med["DCP save"],
        "periodic pause / DCP async_save blocking": med["jobwrap periodic pause (lazy)"] / dcp_blocking,
        "resume / DCP load": med["jobwrap resume (verified)"] / med["DCP load"],
    }
    other = {
        "torch.save / raw write": med["torch.save + fsync"] / med["raw write + fsync"],
        "eager-copy pause / blocking torch.save": med["jobwrap periodic pause (eager)"] / med["torch.save + fsync"],
        "torch.load resume / raw cold read": med["torch.load + load_state_dict"] / med["raw read into new memory"],
        "resume / raw read into touched memory":
            med["jobwrap resume (verified)"] / med["raw read into touched memory"],
        "train step slowdown during a background save":
            med["train step during the background save (lazy)"] / med["train step, no save"],
        "DCP save / raw write": med["DCP save"] / med["raw write + fsync"],
        "DCP async_save blocking, thread / process":
            med["DCP async_save blocking (thread)"] / med["DCP async_save blocking (process)"],
        "DCP load / raw cold read": med["DCP load"] / med["raw read into new memory"],
    }
    return {"size": size_name, "bytes": nbytes, "batch": batch, "median_seconds": med, "memory_bytes": mem,
            "ratios": ratios, "other_ratios": other, "staging_bytes": pause.get("staging bytes", 0),
            "checkpoint_bytes": pause.get("checkpoint bytes", 0),
            "samples": samples}


def met(name: str, value: float) -> bool:
    """Against its target; memory at 1 % resolution (its measurement moves by a few MB run to run)."""
    if name == "async extra memory / state":
        return round(value, 2) <= TARGETS[name]
    return value <= TARGETS[name]


def print_summary(s: dict) -> None:
    log(f"\n== {s['size']} state ({s['bytes'] / 1e6:.0f} MB) ==")
    for name in SAVE_KEYS + PAUSE_KEYS + RESUME_KEYS + PEER_KEYS:
        memory = s["memory_bytes"].get(name)
        extra = f"   peak extra memory {memory / 1e6:6.0f} MB" if memory is not None else ""
        log(f"  {name:46s} {s['median_seconds'][name]:8.3f} s{extra}")
    memory = s["memory_bytes"].get("jobwrap periodic (async)")
    if memory is not None:
        log(f"  {'jobwrap periodic saves (staging + writer)':46s} {'':10s}   peak extra memory {memory / 1e6:6.0f} MB")
    for name, value in s["ratios"].items():
        target = TARGETS[name]
        log(f"  {name:46s} {value:6.3f}  target <= {target:g}  {'met' if met(name, value) else 'NOT MET'}")
    for name, value in s["other_ratios"].items():
        log(f"  {name:46s} {value:6.3f}")


def plot(summaries: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    groups = [
        ("save: signal to durable", SAVE_KEYS + ["DCP save"]),
        ("training pause for a periodic save", ["torch.save + fsync", "DCP async_save blocking (thread)",
                                                "DCP async_save blocking (process)",
                                                "jobwrap periodic pause (eager)", "jobwrap periodic pause (lazy)"]),
        ("resume to ready, cold page cache", RESUME_KEYS + ["DCP load"]),
    ]
    for s in summaries:
        med = s["median_seconds"]
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
        for ax, (title, keys) in zip(axes, groups):
            keys = [k for k in keys if k in med]  # a report of an older run has no DCP figures
            values = [med[k] for k in keys]
            labels = [textwrap.fill(k, 13, break_long_words=False) for k in keys]
            colors = ["#1f77b4" if k.startswith("jobwrap") else "#bbbbbb" for k in keys]
            bars = ax.bar(range(len(keys)), values, color=colors)
            ax.set_xticks(range(len(keys)), labels, fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("seconds (median)")
            for bar, value in zip(bars, values):
                ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        fig.suptitle(f"jobwrap vs torch.save / torch.load vs DCP vs the disk: {s['size']} state "
                     f"({s['bytes'] / 1e9:.2f} GB); {machine()}", fontsize=11)
        fig.tight_layout()
        name = f"bench-{s['size'].lower()}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def plot_relaunch(relaunch: dict, out: Path) -> str:
    """One bar: a relaunch's parts from the signal to the first new step, jobwrap's own in colour."""
    fig, ax = bench_plot.axes(15, 2.8)
    left = 0.0
    for i, (name, seconds) in enumerate(relaunch["median_seconds"].items()):
        color = ("#1f77b4", "#6baed6")[i % 2] if SPLITS[name] else ("#bbbbbb", "#dddddd")[i % 2]
        ax.barh(0, seconds, left=left, color=color, edgecolor="white")
        if seconds > 0.03 * relaunch["total"]:
            ax.annotate(f"{textwrap.fill(name, 14, break_long_words=False)}\n{seconds:.2f} s",
                        (left + seconds / 2, 0), ha="center", va="center", fontsize=7)
        left += seconds
    ax.set_yticks([])
    ax.set_xlabel("seconds from the signal (medians; jobwrap's parts in blue)")
    ax.set_title(f"relaunch under jobwrap run, signal -> first new step "
                 f"({relaunch['checkpoint_bytes'] / 1e6:.0f} MB checkpoint); {machine()}", fontsize=10)
    return bench_plot.save(fig, out, "bench-relaunch.png")


def relaunch_lines(relaunch: dict) -> list[str]:
    """The report's relaunch section: the split, jobwrap's own total and its target."""
    overhead = relaunch["overhead"]
    reps = len(next(iter(relaunch["samples"].values())))
    lines = [
        "## Relaunch, end to end",
        "",
        f"A small trainer ({relaunch['checkpoint_bytes'] / 1e6:.0f} MB checkpoint: two Linear(1024, 1024) and Adam) "
        "runs under `jobwrap run`; a real `SIGUSR1` to `jobwrap run` is passed on, the trainer saves and asks for a "
        "requeue, `jobwrap run` relaunches it, and the clock stops at the end of the relaunched trainer's first "
        f"new step. Medians of {reps} relaunches (`scripts/bench_relaunch.py`), from the run's events and the "
        "trainer's timestamps:",
        "",
        "| part | seconds, median (min-max) | jobwrap's |",
        "|---|---|---|",
    ]
    for name, seconds in relaunch["median_seconds"].items():
        samples = relaunch["samples"][name]
        lines.append(f"| {name} | {seconds:.3f} ({min(samples):.3f}-{max(samples):.3f}) | "
                     f"{'yes' if SPLITS[name] else ''} |")
    lines += [
        f"| **total** | {relaunch['total']:.3f} | |",
        "",
        f"jobwrap's own parts: {relaunch['jobwrap_own']:.3f} s; the disk's time for the same bytes: write + fsync "
        f"{relaunch['disk_write']:.3f} s, cold read {relaunch['disk_read']:.3f} s. Target: jobwrap's own parts "
        f"minus the disk's time <= {OVERHEAD_TARGET:g} s: {overhead:.3f} s, "
        f"{'met' if overhead <= OVERHEAD_TARGET else '**not met**'}. The relaunched process reads the "
        "checkpoint from the page cache the save left warm (a requeue to another node would read it cold: "
        "the cold read is what the target allows for).",
        "",
    ]
    return lines


def _verdict(name: str, value: float) -> str:
    return f"{value:.3f} {'met' if met(name, value) else '**not met**'}"


#: Measured once per run, each by its own script: key in benchmarks.json -> the script's module, which has
#: ``targets(result)``, ``report_lines(result, plot_name)`` and ``plot(result, out, title_suffix)``.
SECTIONS = {"resume_position": bench_resume_position, "rank_pause": bench_rank_pause,
            "rank_write": bench_rank_write}


def run_targets(relaunch: dict | None, sections: dict[str, dict]) -> list[tuple[str, float, float]]:
    """(name, target, value) of the targets measured once per run rather than per state size."""
    found = []
    if relaunch:
        found.append(("relaunch: jobwrap's own parts - disk time (s)", OVERHEAD_TARGET, relaunch["overhead"]))
    for key, result in sections.items():
        found += SECTIONS[key].targets(result)
    return found


def plot_sections(sections: dict[str, dict], out: Path) -> dict[str, str]:
    return {key: SECTIONS[key].plot(result, out, f"; {machine()}") for key, result in sections.items()}


def write_markdown(summaries: list[dict], step: dict, plots: list[str], gpu: dict, out: Path,
                   args: argparse.Namespace, relaunch: dict | None = None, sections: dict[str, dict] | None = None,
                   section_plots: dict[str, str] | None = None) -> None:
    step_us = median(step["step_done (us)"])
    lines = [
        "# Benchmarks: jobwrap against plain torch.save, torch.load, torch.distributed.checkpoint and the disk",
        "",
        "Written by `./scripts/bench` (this page, its plots and `benchmarks.json`; rerun it rather than edit). "
        f"Machine: {machine()} ({software()}); a local ext4 disk on a virtual block device, shared with other "
        "jobs, so absolute figures are noisy. Each figure is the median of its repetitions, the methods run in "
        "rotating order, and each ratio compares figures of the same run.",
        "",
        "The state is a stack of square linear layers and Adam's two moments (a third model, two thirds "
        "optimizer), the `{model, optimizer}` a training script saves. Repetitions: "
        + ", ".join(f"{len(s['samples']['raw write + fsync'])} for the {s['size']} state" for s in summaries) + ".",
        "",
        "## Targets",
        "",
        "| ratio | target | " + " | ".join(f"{s['size']} state" for s in summaries) + " |",
        "|---|---|" + "---|" * len(summaries),
    ]
    for name, target in TARGETS.items():
        if name == "step overhead / 1 ms step":
            cells = [_verdict(name, step_us / 1000.0)] * len(summaries)
        else:
            cells = [_verdict(name, s["ratios"][name]) if name in s["ratios"] else "not measured" for s in summaries]
        lines.append(f"| {name} | <= {target:g} | " + " | ".join(cells) + " |")
    once = run_targets(relaunch, sections or {})
    if once:
        lines += ["", "Measured once per run (their sections below):", "", "| measure | target | value |",
                  "|---|---|---|"]
        lines += [f"| {name} | <= {target:g} | {value:.3f} {'met' if value <= target else '**not met**'} |"
                  for name, target, value in once]
    lines += ["", "Other ratios from the same runs:", "",
              "| ratio | " + " | ".join(f"{s['size']} state" for s in summaries) + " |",
              "|---|" + "---|" * len(summaries)]
    for name in summaries[0]["other_ratios"]:
        lines.append(f"| {name} | " + " | ".join(f"{s['other_ratios'].get(name, float('nan')):.3f}"
                                                 for s in summaries) + " |")
    lines += ["", "## Medians", "",
              "| measurement | " + " | ".join(f"{s['size']}: seconds, median (min-max) | {s['size']}: peak extra memory"
                                             for s in summaries) + " |",
              "|---|" + "---|---|" * len(summaries)]
    for key in [k for k in SAVE_KEYS + PAUSE_KEYS + RESUME_KEYS + PEER_KEYS if k in summaries[0]["samples"]]:
        cells = []
        for s in summaries:
            memory = s["memory_bytes"].get(key)
            if key == "jobwrap periodic pause (lazy)":
                memory = s["memory_bytes"].get("jobwrap periodic (async)")
            samples = s["samples"][key]
            cells.append(f"{s['median_seconds'][key]:.3f} ({min(samples):.3f}-{max(samples):.3f}) | "
                         + (f"{memory / 1e6:.0f} MB" if memory is not None else ""))
        lines.append(f"| {key.strip()} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "A ratio below 1 against the raw write or read means equal within this machine's noise, not faster "
        "than the disk: compare the ranges.",
        "",
        "State sizes: " + ", ".join(f"{s['size']} = {s['bytes'] / 1e6:.0f} MB (training step: forward and "
                                     f"backward of a batch of {s['batch']}, then Adam)" for s in summaries) + ". "
        "The memory of the periodic saves (staging buffers, reserved after the first step, plus the writer, over "
        "three saves) is compared with the checkpoint's size, at 1 % resolution: "
        + ", ".join(f"{s['size']}: staging {s['staging_bytes'] / 1e6:.1f} MB for a {s['checkpoint_bytes'] / 1e6:.1f} MB "
                    "checkpoint" for s in summaries) + ".",
        "",
        f"Per-step cost of the wrapper (a step boundary with nothing due): **{step_us:.2f} µs**, "
        f"{step_us / 10:.3f} % of a 1 ms step. A tiny model's training step (Linear(16, 16), SGD) took "
        f"{median(step['tiny step, plain (us)']):.0f} µs plain and {median(step['tiny step, jobwrap (us)']):.0f} µs "
        "with `step_done()` after it (the difference is within this machine's noise).",
        "",
    ]
    if gpu:
        lines += ["GPU state (device to pinned host memory): " +
                  ", ".join(f"{k}: {v:.3f} s" for k, v in gpu.items()) + ".", ""]
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    if relaunch:
        lines += relaunch_lines(relaunch)
    for key, result in (sections or {}).items():
        lines += SECTIONS[key].report_lines(result, (section_plots or {}).get(key))
    lines += [
        "## What is measured",
        "",
        "- **raw write + fsync**: the tensors' bytes written to a new file with `os.write`, 8 MiB per call "
        "straight from the tensors' memory (the fastest of the plain variants tried), then one `fsync`: the "
        "disk's limit for these bytes.",
        "- **torch.save + fsync**: `torch.save({model, optimizer}, f)`, flush, `fsync`, with torch's defaults "
        "(a CRC32 of every record).",
        "- **jobwrap commit (store.save)**: jobwrap's write and commit protocol alone, from the same state.",
        "- **jobwrap signal -> committed**: a real `SIGUSR1` sent to the process, through the trap, the step "
        "boundary and the whole commit protocol (data fsynced and renamed, manifest fsynced and renamed, "
        "directory fsynced) until `Preempted` is raised.",
        "- **jobwrap periodic pause**: in a loop that trains, the time `step_done()` blocks when a periodic save "
        "is due (rebuild the state's containers, copy what must be copied now, hand off to the writer thread) "
        "plus the time the next `optimizer.step()` waits for the parameters and optimizer state still being "
        "copied on the writer thread (*lazy*, the default). *eager* (`lazy_copy=False`) copies every tensor "
        "inside `step_done()`. The pause of a loop that saves inline is the blocking `torch.save + fsync`. "
        "*background write*: from the save being due to the checkpoint committed. *train step*: forward, "
        "backward and Adam, alone and while the writer copies and writes: on two cores the writer (at a lower "
        "priority) still takes CPU time and memory bandwidth from a step that uses both cores, which a GPU "
        "step would not feel.",
        "- **resume**, cold page cache (the file evicted with `posix_fadvise(DONTNEED)` before each read): a "
        "raw `readinto` of the file into memory already touched (the disk alone) and into new memory (what any "
        "loader in a new process pays: the pages must be mapped); `torch.load` then `load_state_dict` of model "
        "and optimizer; jobwrap's `Session` start plus `track(model, optimizer)`, which also verifies the "
        "checksum of every byte. The model exists already, the optimizer has no state yet, as in a new process.",
        "- **DCP** (`torch.distributed.checkpoint`, `scripts/bench_peers.py`), as its documentation shows it, "
        "in a one-rank gloo process group: `get_state_dict(model, optimizer)` then `save` (its file writer "
        "fsyncs each file); `async_save` with the thread and with the process checkpointer (torch's default "
        "staging: a blocking copy to CPU memory, no pinned or shared memory on a CPU machine), timed until the "
        "call returns, the write then awaited untimed (the process checkpointer's daemon is started once, "
        "untimed); `load` into a new model's `get_state_dict` (which initialises the optimizer's state) then "
        "`set_state_dict`, cold page cache. The pause target compares with the faster of the two `async_save`s.",
        "- **relaunch**: see its section above; the parts come from the run's `events.jsonl` (`signal`, `save`, "
        "`exit`, and `start` with `load_seconds` and `read_seconds`) and the trainer's wall-clock timestamps; "
        "the new process's creation time from `/proc` (10 ms resolution), its predecessor's end by polling its "
        "pid each millisecond.",
        "- **peak extra memory**: the resident set's high-water mark (reset through `/proc/self/clear_refs`) "
        "minus the resident size before; the allocator's free memory is returned to the system first "
        "(`malloc_trim`), so that memory freed earlier is not silently reused.",
        "",
        "## How jobwrap gets there",
        "",
        "- **Save** (`jobwrap/_storage/store.py`): `torch.save` writes through a file object that hashes (xxh3-64) and "
        "writes each 8 MiB piece of a tensor straight from the tensor's memory while the piece is in the CPU "
        "cache; torch's own CRC32 is off for the duration (the previous setting is restored after), since "
        "jobwrap's checksum covers the whole file; one `fsync`. The file stays a plain `torch.save` file: "
        "`torch.load(path, weights_only=True)` opens it.",
        "- **Periodic saves** (`jobwrap/_storage/snapshot.py`; `async_save=True`, `JOBWRAP_ASYNC_SAVE`): the training "
        "thread copies the state into staging buffers that are allocated once, in the background after the "
        "first step (pinned when the tensors are on a GPU), and reused; a writer thread writes and commits. "
        "With `lazy_copy=True` (`JOBWRAP_LAZY_COPY`) the tracked optimizers' CPU parameters and state are "
        "copied by the writer thread while the next step's forward and backward run: only `optimizer.step()` "
        "changes them, and a step pre-hook holds it until the copy is done (version counters prove nothing else "
        "changed them meanwhile; if something did, that save is dropped and later ones copy everything during "
        "the pause). At most one save is in flight; a "
        "save that comes due meanwhile is skipped. A failed background save is raised at the next step "
        "boundary (or when the session closes), never dropped. **Memory: one extra copy of the state** (the "
        "staging buffers), plus the writer's 1 MiB gather buffer and the pickled structure.",
        "- **A signal during a background save**: a save of the same step is awaited; otherwise the one in "
        "flight is cancelled at its next piece and the current state is written at once, unless it would "
        "commit sooner and the grace window cannot hold both (then it commits first, and the new save follows).",
        "- **Grace window** (`jobwrap/_storage/deadline.py`): `grace_seconds` (`JOBWRAP_GRACE_SECONDS`, the signal's lead "
        "time) and Slurm's job end time, against the save speed recorded in the checkpoints' manifests. jobwrap "
        "warns at start (from the directory's earlier saves) and after the first save when a save would need "
        "more than 80 % of the window, and names the `--signal` lead time to ask for.",
        "- **Resume**: `torch.load` reads the checkpoint through a reader that hashes the bytes in file order "
        "as torch pulls them into its tensors, so the checksum costs no second read and nothing is used before "
        "it matched.",
        "- **Mid-epoch resume** (`jobwrap/_loop/skipping.py`): the sampler's order for the epoch is drawn as in "
        "the uninterrupted run and the batches already trained are skipped by index, nothing loaded; each "
        "batch's worker RNG (torch, `random`, NumPy) is seeded from the loader's base seed and the batch's index, "
        "so batch k's random draws do not depend on batches 0..k-1. A loader jobwrap cannot skip (its own "
        "`__iter__`, an IterableDataset without `state_dict`) is still replayed; torchdata's "
        "`StatefulDataLoader` resumes through its own `state_dict`.",
        "- **Several ranks, periodic saves**: every rank hands its small state (RNG, data position) to rank 0 "
        "and goes on; rank 0 stages and writes in the background as one process does. Rank 0's outcome reaches "
        "every rank at the next agreement, so a failure is raised on all of them at the same step.",
        "- **Several ranks, a signal's save** (`jobwrap/_storage/striped.py`): from `stripe_min_bytes` "
        "(`JOBWRAP_STRIPE_MIN_BYTES`, 1 GiB by default) of replicated state on, every rank writes its share of "
        "the tensors (largest first onto the least-loaded rank, the same plan on every rank) into the step's "
        "folder, and rank 0 commits one manifest over the parts; `jobwrap export` writes one "
        "`torch.load(weights_only=True)` file from any checkpoint.",
        "",
        "## Not covered",
        "",
        "- A GPU: this machine has none. On a GPU machine the same script also measures the pause of a periodic "
        "save of a state on the GPU (device to pinned host memory, copied during the pause); `scripts/gpu-check` "
        "checks the GPU path and fills the GPU section below.",
        "- Sharded (FSDP) state with several ranks: its periodic saves are still synchronous (every rank writes "
        "its part through DCP), and not measured here.",
    ]
    page = out / "benchmarks.md"
    kept = gpu_block(page.read_text()) if page.exists() else None  # scripts/gpu-check's, from a GPU machine
    page.write_text(with_gpu_block("\n".join(lines) + "\n", kept or GPU_NOT_RUN))


def bench_gpu_pause(nbytes: int, reps: int) -> dict[str, float] | None:
    """On a GPU machine: the pause of a periodic save of a GPU-resident state (device -> pinned host)."""
    if not torch.cuda.is_available():
        return None
    model, optimizer = build(nbytes, "cuda")
    pause = bench_pause(model, optimizer, reps, {}, batch=32)
    blocking = [torch_save(model, optimizer, WORK / "gpu.pt") for _ in range(max(1, reps // 2))]
    cleanup()
    del model, optimizer
    torch.cuda.empty_cache()
    return {"jobwrap periodic pause (GPU state)": median(pause["jobwrap periodic pause (lazy)"]),
            "torch.save + fsync (GPU state)": median(blocking)}


def measure_sections(quick: bool) -> dict[str, dict]:
    """The measurements taken once per run, each printed as it ends."""
    position = bench_resume_position.bench_resume_position(*((3, 200) if quick else (5, 1000)))
    log("\n== resume against position in the epoch ==\n" + "\n".join(bench_resume_position.summary_lines(position)))
    pause = bench_rank_pause.bench_rank_pause(3 if quick else 5, WORK, nbytes=(100 if quick else 400) << 20)
    bench_rank_pause.print_rank_pause(pause)
    log("\n== emergency save against ranks, throttled writers ==")
    memory = _memory_dir()
    try:
        write = bench_rank_write.bench_rank_write((128 if quick else 384) << 20, reps=1 if quick else 3,
                                                  directory=memory / "rank-write")
    finally:
        shutil.rmtree(memory, ignore_errors=True)
    bench_rank_write.print_rank_write(write)
    return {"resume_position": position, "rank_pause": pause, "rank_write": write}


def _memory_dir() -> Path:
    """A tmpfs for the throttled-writer benchmark (the per-process limit, not the one disk), else run/bench."""
    shm = Path("/dev/shm")
    return shm / f"jobwrap-bench-{os.getpid()}" if shm.is_dir() and os.access(shm, os.W_OK) else WORK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small state only, fewer repetitions (a few minutes)")
    parser.add_argument("--out", default=None,
                        help="where the report goes (default: docs/, or run/bench-quick/ with --quick)")
    parser.add_argument("--report-only", metavar="JSON", default=None,
                        help="measure nothing: write the page and plots again from a benchmarks.json")
    args = parser.parse_args()
    if args.report_only:
        out = Path(args.out) if args.out else Path(args.report_only).resolve().parent
        results = json.loads(Path(args.report_only).read_text())
        _RECORDED.update({k: results[k] for k in ("machine", "software") if k in results})
        relaunch = results.get("relaunch")
        sections = {key: results[key] for key in SECTIONS if results.get(key)}
        plots = plot(results["sizes"], out) + ([plot_relaunch(relaunch, out)] if relaunch else [])
        section_plots = plot_sections(sections, out)
        write_markdown(results["sizes"], results["step"], plots, results.get("gpu") or {}, out, args, relaunch,
                       sections, section_plots)
        log(f"wrote {out / 'benchmarks.md'} and {', '.join(plots + list(section_plots.values()))} "
            f"from {args.report_only}")
        return
    args.reps_small = 7 if args.quick else 9
    args.reps_large = 5
    sizes = [("100MB", 100 * 10**6, args.reps_small, 32)]   # name, bytes, repetitions, training batch
    if not args.quick:
        sizes.append(("3GB", 3_200 * 10**6, args.reps_large, 8))
    out = Path(args.out) if args.out else (REPO / "run" / "bench-quick" if args.quick else REPO / "docs")
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    need = 3 * max(n for _, n, _, _ in sizes)
    free = shutil.disk_usage(WORK).free
    if free < need:
        sys.exit(f"bench: {free / 1e9:.1f} GB free for run/bench, need {need / 1e9:.1f} GB; free space or use --quick")
    log(f"machine: {machine()}; {software()}")
    started = time.monotonic()
    summaries = []
    gpu: dict[str, float] = {}
    try:
        step = bench_step(3 if args.quick else 5)
        log(f"step_done: {median(step['step_done (us)']):.2f} us per step")
        for size_name, nbytes, reps, batch in sizes:
            model, optimizer = build(nbytes, "cpu")
            actual = state_bytes(model, optimizer)
            log(f"\n{size_name}: {actual / 1e6:.0f} MB of state, {reps} repetitions")
            memory: dict[str, list[int]] = {}
            save = bench_save(model, optimizer, reps, memory)
            log("  save: done")
            pause = bench_pause(model, optimizer, min(reps, 3) if args.quick else reps, memory, batch)
            log("  pause: done")
            resume = bench_resume(model, optimizer, reps, memory)
            log("  resume: done")
            target, target_opt = build_like(model)
            peers = bench_peers(model, optimizer, target, target_opt, min(reps, 3) if args.quick else reps, WORK,
                                drop_cache)
            del target, target_opt
            log("  DCP: done")
            summary = summarize(size_name, actual, batch, save, pause, resume, memory, peers)
            print_summary(summary)
            summaries.append(summary)
            del model, optimizer
            gc.collect()
        gpu = bench_gpu_pause(sizes[-1][1], 3) or {}
        if gpu:
            log(f"GPU: {gpu}")
        relaunch = bench_relaunch(2 if args.quick else 5, WORK, drop_cache)
        print_relaunch(relaunch)
        sections = measure_sections(args.quick)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    step_us = median(step["step_done (us)"])
    log(f"\n  {'step overhead / 1 ms step':46s} {step_us / 1000:6.4f}  target <= 0.01  "
        f"{'met' if step_us / 1000 <= 0.01 else 'NOT MET'}")
    section_plots = plot_sections(sections, out)
    plots = plot(summaries, out) + [plot_relaunch(relaunch, out)]
    write_markdown(summaries, step, plots, gpu, out, args, relaunch, sections, section_plots)
    (out / "benchmarks.json").write_text(json.dumps({"machine": machine(), "software": software(),
                                                     "sizes": summaries, "step": step, "gpu": gpu,
                                                     "relaunch": relaunch, **sections}, indent=1))
    where = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    written = ", ".join(plots + list(section_plots.values()))
    log(f"\nwrote {where}/benchmarks.md, {where}/benchmarks.json and {written} "
        f"in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
