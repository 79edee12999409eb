"""The signal's save of replicated (DDP) state with 1, 2 and 4 ranks: one writer against striped parts.

    scripts/bench rank_write --bytes 256M --dir /dev/shm/jobwrap-bench

Each configuration is N real processes (gloo on the CPU) holding the same state as
``benchmarks.common``'s ``build()`` (square layers and Adam's two moments). Rank 0
gets a real SIGUSR1; at the next step boundary every rank stops and the save is
committed: with 1 rank, one file written by one process; with N ranks, striped
(``stripe_min_bytes=0``), each rank writing about 1/N of the bytes. The time is rank
0's, from the signal to the commit (``Preempted`` raised).

Throttled, every process's writes through jobwrap are limited to ``--bps`` (default
200 MB/s, ``JOBWRAP_TEST_WRITE_BPS``): a per-client bandwidth limit, as a parallel
filesystem imposes on each node. On one machine with one disk, N throttled writers
may exceed the disk itself; point ``--dir`` at a memory filesystem (a tmpfs) so that
the aggregate bandwidth is not the limit and only the per-process one is -- the
situation of a parallel filesystem whose aggregate bandwidth exceeds N clients'.
Unthrottled, the same saves show that N writers are not slower than one.
Targets: throttled, >= 1.7x faster with 2 ranks and >= 3x with 4 than with one
writer; unthrottled, N ranks not slower than one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.common import axes, free_port, module_command, save_figure, with_scripts_path


REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "run" / "bench" / "rank-write"
TARGETS = {2: 1.7, 4: 3.0}  # throttled speedup over one writer, by ranks


def _one_save(nbytes: int, ranks: int, bps: float | None, directory: Path, timeout: float) -> float:
    """N worker processes save once at a signal; rank 0's seconds from the signal to the commit."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    result = directory.parent / f"{directory.name}.result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWRAP_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks),
               JOBWRAP_NO_SLURM="1", OMP_NUM_THREADS="1")
    if bps:
        env["JOBWRAP_TEST_WRITE_BPS"] = str(int(bps))
    procs = [subprocess.Popen(module_command("rank_write", "--worker", "--bytes", str(nbytes), "--dir", str(directory),
                                              "--result", str(result)),
                              env=with_scripts_path({**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
             for r in range(ranks)]
    try:
        for proc in procs:
            if proc.wait(timeout=timeout) != 0:
                raise RuntimeError(f"a worker of the {ranks}-rank save failed (exit {proc.returncode})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = json.loads(result.read_text())["seconds"]
    result.unlink()
    shutil.rmtree(directory, ignore_errors=True)
    return seconds


def bench_rank_write(nbytes: int = 256 << 20, ranks: tuple[int, ...] = (1, 2, 4), bps: float = 200e6,
                     directory: Path | str = DEFAULT_DIR, reps: int = 1, timeout: float = 600) -> dict[str, Any]:
    """Median seconds of the signal's save per (throttled or not, ranks), the ratios, and each target met."""
    directory = Path(directory)
    seconds: dict[str, dict[int, float]] = {"throttled": {}, "unthrottled": {}}
    for mode, limit in (("throttled", bps), ("unthrottled", None)):
        for n in ranks:
            runs = [_one_save(nbytes, n, limit, directory / f"{mode}-{n}", timeout) for _ in range(reps)]
            seconds[mode][n] = statistics.median(runs)
            print(f"  {mode:11s} {n} rank(s): {seconds[mode][n]:.3f} s", flush=True)
    targets: dict[str, tuple[float, float, bool]] = {}  # name: (ratio, target, met)
    one = seconds["throttled"].get(1)
    for n, target in TARGETS.items():
        if one and n in seconds["throttled"]:
            ratio = one / seconds["throttled"][n]
            targets[f"throttled speedup, {n} ranks / 1 writer"] = (ratio, target, ratio >= target)
    for n in ranks:
        if n > 1 and 1 in seconds["unthrottled"]:
            ratio = seconds["unthrottled"][n] / seconds["unthrottled"][1]
            targets[f"unthrottled time, {n} ranks / 1 writer"] = (ratio, 1.0, ratio <= 1.0)
    return {"state_bytes": nbytes, "throttle_bytes_per_second": bps, "storage": _storage_kind(directory),
            "reps": reps, "seconds": seconds, "targets": targets}


def _storage_kind(directory: Path) -> str:
    """What the files went to, in words (the report names no path of the machine)."""
    best, kind = "", "a local disk"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and str(directory.resolve()).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], ("a tmpfs (memory)" if fields[2] == "tmpfs" else f"a local {fields[2]} disk")
    return kind


def print_rank_write(result: dict[str, Any]) -> None:
    for name, (ratio, target, met) in result["targets"].items():
        sign = ">=" if "speedup" in name else "<="
        print(f"  {name}: {ratio:.2f} (target {sign} {target}) {'met' if met else 'NOT MET'}")


def targets(result: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(name, target, value) for scripts/bench's table, every one as "value <= target" (a speedup inverted)."""
    found = []
    for name, (ratio, target, _) in result["targets"].items():
        if "speedup" in name:  # time with N ranks / time with one writer <= 1 / speedup target
            found.append((name.replace("speedup, ", "time, "), round(1 / target, 3), 1 / ratio))
        else:
            found.append((name, target, ratio))
    return found


def report_lines(result: dict[str, Any], plot_name: str | None) -> list[str]:
    """scripts/bench's section on docs/benchmarks.md."""
    throttled, unthrottled = _by_ranks(result, "throttled"), _by_ranks(result, "unthrottled")
    lines = ["## Emergency save against ranks, with throttled writers", "",
             f"The signal's save of {result['state_bytes'] / 1e6:.0f} MB of replicated (DDP) state "
             "(`scripts/benchmarks/rank_write.py`): N real processes (gloo), rank 0 gets a real SIGUSR1, every rank "
             "stops at the next boundary; the time is rank 0's, from the signal to the commit. One rank writes one "
             "file; N ranks stripe (`stripe_min_bytes=0`), each writing about 1/N of the bytes, rank 0 committing "
             f"one manifest over the parts. *throttled*: every process's writes limited to "
             f"{result['throttle_bytes_per_second'] / 1e6:.0f} MB/s (`JOBWRAP_TEST_WRITE_BPS`), the per-client "
             "limit of a parallel filesystem; the files go to "
             f"{result['storage']}, standing in for a filesystem whose aggregate bandwidth exceeds N clients' (this "
             "machine's one disk would otherwise be the limit). *unthrottled*: the same saves at full speed. "
             f"Medians of {result.get('reps', 1)}.", "",
             "| ranks | throttled: seconds (speedup) | unthrottled: seconds (x one writer) |", "|---|---|---|"]
    for n in sorted(throttled):
        t, u = throttled[n], unthrottled[n]
        lines.append(f"| {n} | {t:.3f} ({throttled[1] / t:.2f}x) | {u:.3f} ({u / unthrottled[1]:.2f}x) |")
    lines += ["", "Targets: " + "; ".join(
        f"{name} {ratio:.2f} ({'>=' if 'speedup' in name else '<='} {target:g}) {'met' if met else '**not met**'}"
        for name, (ratio, target, met) in result["targets"].items()) + ".", ""]
    if plot_name:
        lines += [f"![{plot_name}]({plot_name})", ""]
    return lines


def _by_ranks(result: dict[str, Any], mode: str) -> dict[int, float]:
    """Seconds by number of ranks (read back from JSON, the numbers are strings)."""
    return {int(n): v for n, v in result["seconds"][mode].items()}


def plot(result: dict[str, Any], out: Path, title_suffix: str = "") -> str:
    """Save time against ranks, throttled and not, with the ideal 1/N of one writer."""
    fig, ax = axes(7, 4)
    for mode, color in (("throttled", "#1f77b4"), ("unthrottled", "#6baed6")):
        by_ranks = _by_ranks(result, mode)
        ranks = sorted(by_ranks)
        ax.plot(ranks, [by_ranks[n] for n in ranks], "o-", color=color, label=mode)
        if mode == "throttled" and 1 in by_ranks:
            ax.plot(ranks, [by_ranks[1] / n for n in ranks], ":", color="black", linewidth=0.8,
                    label="one writer / N (ideal)")
    ax.set_xlabel("ranks writing")
    ax.set_ylabel("signal -> committed, s (median)")
    ax.set_xticks(sorted(_by_ranks(result, "throttled")))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(f"emergency save of {result['state_bytes'] / 1e6:.0f} MB against ranks"
                 f"{title_suffix}", fontsize=10)
    return save_figure(fig, out, "bench-rank-write.png")


# ---------------------------------------------------------------- one rank of one save

def _worker(nbytes: int, directory: str, result: str) -> None:
    import torch.distributed as dist
    from benchmarks.common import build, session

    import jobwrap

    ranks = int(os.environ["WORLD_SIZE"])
    if ranks > 1:
        dist.init_process_group("gloo")
    model, optimizer = build(nbytes, "cpu")
    seconds = None
    try:
        with session(Path(directory), stripe_min_bytes=0, async_save=False) as job:
            job.track(model=model, optimizer=optimizer)
            if ranks > 1:
                dist.barrier()
            started = time.perf_counter()
            if job.group.rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            job.step_done()  # the boundary: every rank stops and saves here
    except jobwrap.Preempted:
        seconds = time.perf_counter() - started
    if seconds is None:
        raise SystemExit("the signal's save did not happen")
    if int(os.environ["RANK"]) == 0:
        Path(result).write_text(json.dumps({"seconds": seconds}))
    if ranks > 1:
        dist.destroy_process_group()


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=_size, default=256 << 20, help="state size (model + Adam), e.g. 512M")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--bps", type=float, default=200e6, help="throttle per process, bytes per second")
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="where the checkpoints go (a tmpfs: see above)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.bytes, args.dir, args.result)
        return
    print(f"signal's save, {args.bytes / 1e6:.0f} MB of state, into {args.dir}, throttle {args.bps / 1e6:.0f} MB/s "
          f"per process:", flush=True)
    result = bench_rank_write(args.bytes, tuple(int(n) for n in args.ranks.split(",")), args.bps, args.dir,
                              args.reps)
    print_rank_write(result)


if __name__ == "__main__":
    main()
