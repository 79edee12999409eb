"""The cost of a relaunch, end to end: from a real signal to the relaunched process's first new training step.

A small training command (``--train DIR``: Linear layers and Adam, about 25 MB of state) runs under
``jobwrap run``; a real SIGUSR1 goes to ``jobwrap run``, which passes it on; the trainer saves, exits
asking for a requeue, and ``jobwrap run`` relaunches it. The split comes from the run's events
(``signal``, ``save``, ``exit``, ``start`` with its ``load_seconds`` and ``read_seconds``) and from
the timestamps the trainer prints (wall clock; the process's creation time from ``/proc``, 10 ms
resolution):

  to the step boundary signal sent -> the session's ``signal`` event (the rest of the user's step)
  save                 -> checkpoint committed (the write, the commit)
  requeue and close    committed -> the session's ``exit`` event (the requeue decision, closing the session)
  interpreter exit     -> the process is gone (Python's teardown, torch's mostly): when ``jobwrap run``
                       reaped it, as the relaunched process's ``start`` event records (``previous_exit``;
                       a pid polled for its zombie state is seen earlier: the main thread ends first,
                       the rest of the process after it)
  relaunch by jobwrap run
                       -> the new process exists (``jobwrap run`` reaping the exit and starting the
                       command again; faster than the 10 ms the creation is known to, it may show
                       slightly below 0)
  interpreter          the new process exists -> its first line runs
  import torch, model  the user's imports and model construction
  import jobwrap, start (lock, scan, verify), load (read + checksum), track (restore the state),
  first batch          jobwrap's parts; then the step itself

The trainer reads its modules' bytecode from a cache (``PYTHONPYCACHEPREFIX`` under the work
directory, filled by the first launch), as an installed package does: an environment with
``PYTHONDONTWRITEBYTECODE`` would otherwise compile jobwrap's source on every start (60 ms and more).

Run by scripts/bench (``bench_relaunch`` below); alone: ``scripts/bench relaunch [--reps N]``.
"""
from __future__ import annotations

import time

_BORN, _BORN_BOOT = time.time(), time.clock_gettime(time.CLOCK_BOOTTIME)  # the trainer's first line

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

WAIT_SECONDS = 300  # for each stage of one launch; a hang fails with a message
#: split name -> whether it is jobwrap's own (the rest: interpreter, the user's imports, model, step)
SPLITS = {
    "to the step boundary": False,
    "save (boundary -> committed)": True,
    "requeue and close": True,
    "interpreter exit": False,
    "relaunch by jobwrap run": True,
    "interpreter": False,
    "import torch": False,
    "import jobwrap": True,
    "model construction": False,
    "jobwrap start (lock, scan, verify)": True,
    "load (read + checksum)": True,
    "track (restore the state)": True,
    "loader's first batch": True,
    "first step": False,
}
OVERHEAD_TARGET = 0.3  # seconds of jobwrap's own parts beyond the disk's time to write and read the state


# ---------------------------------------------------------------- the trainer (under jobwrap run)

def _mark(name: str, at: float | None = None, **fields: object) -> None:
    print(json.dumps({"mark": name, "time": at if at is not None else time.time(), "pid": os.getpid(), **fields}),
          flush=True)


def _created() -> float:
    """This process's creation on the wall clock: /proc's start time (clock ticks since boot) against
    CLOCK_BOOTTIME read with the first line's wall time (the boot time /proc/stat gives is whole seconds)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return _BORN - (_BORN_BOOT - ticks / os.sysconf("SC_CLK_TCK"))


def train(directory: str) -> None:
    _mark("interpreter", _BORN, created=_created())
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    _mark("import torch")
    import jobwrap
    _mark("import jobwrap")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = TensorDataset(torch.randn(4096, 1024), torch.randn(4096, 1024))
    _mark("model")
    with jobwrap.Session(directory, save_at_end=False) as job:
        _mark("session start")
        job.track(model=model, optimizer=optimizer)
        _mark("track")
        resumed = job.resumed_from is not None
        for _ in job.epochs(1000):
            for x, y in job.loader(DataLoader(data, batch_size=8, shuffle=True)):
                if resumed:
                    _mark("first batch")
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                if resumed:
                    _mark("first step")
                    return  # a normal end: the measurement is done
                _mark("step", step=job.step)
                time.sleep(0.02)


# ---------------------------------------------------------------- the driver

class _Marks:
    """Collects the trainer's marks from ``jobwrap run``'s output; waits, bounded, for one to appear."""

    def __init__(self, stream) -> None:
        self.marks: list[dict] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "mark" in record:
                with self.changed:
                    self.marks.append(record)
                    self.changed.notify_all()

    def wait(self, name: str, *, count: int = 1, what: str) -> list[dict]:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.named(name)) >= count, timeout=WAIT_SECONDS):
                raise RuntimeError(f"bench_relaunch: no '{name}' mark after {WAIT_SECONDS} s ({what})")
            return self.named(name)

    def named(self, name: str) -> list[dict]:
        return [m for m in self.marks if m["mark"] == name]


def one_relaunch(directory: Path, bytecode: Path) -> tuple[dict[str, float], Path]:
    """One launch preempted by a real SIGUSR1 and its relaunch; the split in seconds, and the checkpoint.

    ``bytecode``: where the trainer's compiled modules are cached (kept between relaunches).
    """
    from jobwrap._storage.events import read_events

    shutil.rmtree(directory, ignore_errors=True)
    env = {**os.environ, "JOBWRAP_NO_SLURM": "1", "PYTHONUNBUFFERED": "1", "PYTHONPYCACHEPREFIX": str(bytecode)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, "-m", "jobwrap", "run", "--dir", str(directory), "--max-requeues", "1", "--",
               sys.executable, os.path.abspath(__file__), "--train", str(directory)]
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        marks = _Marks(run.stdout)
        marks.wait("step", count=5, what="the first launch training")
        sent = time.time()
        os.kill(run.pid, signal.SIGUSR1)
        marks.wait("first step", what="the relaunched trainer's first new step")
        if run.wait(WAIT_SECONDS) != 0:
            raise RuntimeError(f"bench_relaunch: jobwrap run ended with {run.returncode}")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
    events = read_events(str(directory))
    trapped = next(e for e in events if e["event"] == "signal")
    save = next(e for e in events if e["event"] == "save")
    ended = next(e for e in events if e["event"] == "exit")
    start = next(e for e in events if e["event"] == "start" and e.get("resumed_from"))
    new = {m["mark"]: m for m in marks.marks if m["pid"] == marks.named("first step")[0]["pid"]}
    at = {name: m["time"] for name, m in new.items()}
    opened = at["session start"] - at["model"]
    split = {
        "to the step boundary": trapped["time"] - sent,
        "save (boundary -> committed)": save["time"] - trapped["time"],
        "requeue and close": ended["time"] - save["time"],
        "interpreter exit": start["previous_exit"] - ended["time"],
        "relaunch by jobwrap run": new["interpreter"]["created"] - start["previous_exit"],
        "interpreter": at["interpreter"] - new["interpreter"]["created"],
        "import torch": at["import torch"] - at["interpreter"],
        "import jobwrap": at["import jobwrap"] - at["import torch"],
        "model construction": at["model"] - at["import jobwrap"],
        "jobwrap start (lock, scan, verify)": opened - start["read_seconds"],
        "load (read + checksum)": start["read_seconds"],
        "track (restore the state)": at["track"] - at["session start"],
        "loader's first batch": at["first batch"] - at["track"],
        "first step": at["first step"] - at["first batch"],
    }
    return split, Path(start["resumed_from"])


def disk_seconds(path: Path, drop_cache: Callable[[Path], None]) -> tuple[float, float]:
    """The disk's time for the checkpoint's bytes: a write + fsync of a copy, and a cold read of the file."""
    data = path.read_bytes()
    copy = path.with_name("disk-copy.bin")
    started = time.perf_counter()
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view, done = memoryview(data), 0
        while done < len(data):
            done += os.write(fd, view[done:done + (8 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)
    write = time.perf_counter() - started
    copy.unlink()
    drop_cache(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return write, time.perf_counter() - started


def bench_relaunch(reps: int, work: Path, drop_cache: Callable[[Path], None]) -> dict:
    """Medians of the split over ``reps`` relaunches, the disk's time for the same bytes, and the target."""
    import statistics

    samples: dict[str, list[float]] = {name: [] for name in SPLITS}
    writes, reads, size = [], [], 0
    for rep in range(reps):
        split, checkpoint = one_relaunch(work / f"relaunch-{rep}", work / "bytecode")
        for name, seconds in split.items():
            samples[name].append(seconds)
        size = checkpoint.stat().st_size
        write, read = disk_seconds(checkpoint, drop_cache)
        writes.append(write)
        reads.append(read)
        shutil.rmtree(work / f"relaunch-{rep}", ignore_errors=True)
    med = {name: statistics.median(values) for name, values in samples.items()}
    own = sum(seconds for name, seconds in med.items() if SPLITS[name])
    disk = statistics.median(writes) + statistics.median(reads)
    return {"samples": samples, "median_seconds": med, "checkpoint_bytes": size,
            "disk_write": statistics.median(writes), "disk_read": statistics.median(reads),
            "jobwrap_own": own, "total": sum(med.values()), "overhead": own - disk}


def print_relaunch(result: dict) -> None:
    print(f"\n== relaunch under jobwrap run: signal -> first new step "
          f"({result['checkpoint_bytes'] / 1e6:.0f} MB checkpoint) ==")
    for name, seconds in result["median_seconds"].items():
        print(f"  {name:46s} {seconds:8.3f} s{'   jobwrap' if SPLITS[name] else ''}")
    print(f"  {'total':46s} {result['total']:8.3f} s")
    print(f"  {'jobwrap own parts':46s} {result['jobwrap_own']:8.3f} s   disk: write {result['disk_write']:.3f} s "
          f"+ cold read {result['disk_read']:.3f} s")
    verdict = "met" if result["overhead"] <= OVERHEAD_TARGET else "NOT MET"
    print(f"  {'relaunch: own parts - disk time (s)':46s} {result['overhead']:6.3f}  "
          f"target <= {OVERHEAD_TARGET:g}  {verdict}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", metavar="DIR", help=argparse.SUPPRESS)  # the trainer, under jobwrap run
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.train:
        train(args.train)
        return
    from benchmarks.common import drop_cache  # the driver only: the trainer imports nothing before its first mark

    work = Path(__file__).resolve().parents[2] / "run" / "bench-relaunch"
    try:
        print_relaunch(bench_relaunch(args.reps, work, drop_cache))
    finally:
        shutil.rmtree(work, ignore_errors=True)



def plot_relaunch(relaunch: dict, out: Path) -> str:
    """One bar: a relaunch's parts from the signal to the first new step, jobwrap's own in colour."""
    from benchmarks.common import axes, machine, save_figure  # the driver only, as main()'s import

    fig, ax = axes(15, 2.8)
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
    return save_figure(fig, out, "bench-relaunch.png")



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
        f"new step. Medians of {reps} relaunches (`scripts/benchmarks/relaunch.py`), from the run's events and the "
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


if __name__ == "__main__":
    main()
