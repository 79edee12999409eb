"""The pause of a periodic save with several ranks: in the background (rank 0 writes) against blocking.

    scripts/bench rank_pause [--quick] [--mb 400] [--ranks 2] [--reps 5]

Spawns the ranks on this machine (gloo over loopback, one torch thread each), each
with the state of ``benchmarks.common``'s ``build()`` (square layers and Adam's moments),
and trains them in step. At each even step a periodic save is due; a barrier lines
the ranks up just before that boundary, so a rank's pause is what the save costs
it: the time ``step_done()`` blocks, plus the time the next ``optimizer.step()``
waits for the copy still running on rank 0's writer thread (``lazy_copy``). The
pause of a save is the maximum over the ranks (in a DDP job every rank waits for
the slowest at the next all-reduce); medians over the repetitions. Blocking: the
same loop with ``async_save=False`` (every rank waits while rank 0 writes).
Target: the background pause at most 0.1x the blocking one.

``bench_rank_pause(reps, work_dir, ...)`` returns the numbers, for ``scripts/bench``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from benchmarks.common import axes, build, free_port, save_figure

REPO = Path(__file__).resolve().parents[2]
TARGET = 0.10  # background pause / blocking pause
MODES = {"background": True, "blocking": False}


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimizer.step()


def _measure(rank: int, directory: Path, background: bool, reps: int, nbytes: int, batch: int) -> list[float]:
    """This rank's pause at each periodic save: step_done() at the save, plus the next step's wait for the copy."""
    import jobwrap

    model, optimizer = build(nbytes, "cpu")
    x = torch.randn(batch, next(model.parameters()).shape[1])
    pauses = []
    job = jobwrap.Session(str(directory), environ={}, run_id="bench", save_at_end=False, save_every_steps=2,
                          keep_last=1, async_save=background)
    with job:
        job.track(model=model, optimizer=optimizer)
        _train_step(model, optimizer, x)
        job.step_done()                           # step 1: rank 0 reserves the staging buffers in the background
        if rank == 0:
            assert job._saver.background.wait(600)
        _train_step(model, optimizer, x)
        for _ in range(reps):
            dist.barrier()                        # the ranks reach the boundary together, as DDP's steps keep them
            started = time.perf_counter()
            job.step_done()                       # even step: a periodic save is due
            pause = time.perf_counter() - started
            _train_step(model, optimizer, x)      # on rank 0 its step() may wait for the writer's copy
            pauses.append(pause + job._saver.copy_wait)
            if rank == 0:
                assert job._saver.background.wait(600)  # written before the next one comes due: none is skipped
            job.step_done()                       # odd step: the outcome is shared, nothing due
            _train_step(model, optimizer, x)
        assert job.last_checkpoint is not None and job.last_checkpoint.step == 2 * reps, job.last_checkpoint
        if background:
            saves = [e for e in job.events.read() if e["event"] == "save"]
            assert rank != 0 or all(e.get("background") for e in saves), saves
    return pauses


def _rank(rank: int, world: int, port: int, work: str, reps: int, nbytes: int, batch: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share this machine's cores, as torchrun's OMP_NUM_THREADS=1 would
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode, background in MODES.items():
            directory = Path(work) / mode
            if rank == 0:
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir(parents=True)
            dist.barrier()
            queue.put((mode, rank, _measure(rank, directory, background, reps, nbytes, batch)))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def bench_rank_pause(reps: int, work_dir: Path, *, nbytes: int = 100 << 20, ranks: int = 2,
                     batch: int = 8) -> dict[str, Any]:
    """Medians of the periodic save's pause (the maximum over ``ranks``) in the background and blocking,
    the per-rank medians, the ratio and whether it meets :data:`TARGET`. Files go under ``work_dir``
    and are deleted afterwards."""
    work = Path(work_dir) / "rank-pause"
    queue = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_rank, args=(ranks, free_port(), str(work), reps, nbytes, batch, queue), nprocs=ranks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_rank: dict[str, dict[int, list[float]]] = {mode: {} for mode in MODES}
    while not queue.empty():
        mode, rank, pauses = queue.get()
        per_rank[mode][rank] = pauses
    result: dict[str, Any] = {"ranks": ranks, "state bytes": nbytes, "reps": reps}
    for mode, by_rank in per_rank.items():
        worst = [max(values) for values in zip(*by_rank.values())]
        result[f"{mode} pause"] = statistics.median(worst)
        result[f"{mode} pauses"] = worst
        result[f"{mode} pause by rank"] = {r: statistics.median(v) for r, v in sorted(by_rank.items())}
    result["ratio"] = result["background pause"] / result["blocking pause"]
    result["met"] = result["ratio"] <= TARGET
    return result


def print_rank_pause(result: dict[str, Any]) -> None:
    """The result in a few lines, with the target's verdict."""
    print(f"periodic save pause, {result['ranks']} ranks, {result['state bytes'] / 1e6:.0f} MB of state, "
          f"median of {result['reps']} (the maximum over ranks; step_done + the next step's wait for the copy):")
    for mode in MODES:
        by_rank = ", ".join(f"rank {r} {v * 1e3:.1f} ms" for r, v in result[f"{mode} pause by rank"].items())
        print(f"  {mode:10s} {result[f'{mode} pause'] * 1e3:9.1f} ms   ({by_rank})")
    print(f"  background / blocking = {result['ratio']:.3f}: target <= {TARGET} "
          f"{'met' if result['met'] else 'NOT MET'}")


def targets(result: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(name, target, value) for scripts/bench's table of targets."""
    return [(f"periodic pause, {result['ranks']} ranks / blocking save of the same state", TARGET, result["ratio"])]


def report_lines(result: dict[str, Any], plot_name: str | None) -> list[str]:
    """scripts/bench's section on docs/benchmarks.md."""
    lines = ["## Periodic saves with several ranks", "",
             f"{result['ranks']} ranks on this machine (gloo over loopback; `scripts/benchmarks/rank_pause.py`), each with "
             f"{result['state bytes'] / 1e6:.0f} MB of replicated state, trained in step; the pause of a periodic "
             "save is the time `step_done()` blocks plus the next `optimizer.step()`'s wait for the copy on rank 0's "
             "writer thread, the maximum over the ranks (in a DDP job every rank waits for the slowest at the next "
             f"all-reduce). Medians of {result['reps']} saves. *blocking*: `async_save=False`, every rank waits while "
             "rank 0 writes; *background*: rank 0 stages the state and writes it on its writer thread, the other "
             "ranks hand over their own small state (RNG, data position) and go on.", "",
             "| mode | pause, median (worst rank) | by rank |", "|---|---|---|"]
    for mode in MODES:
        by_rank = ", ".join(f"rank {r}: {v * 1e3:.1f} ms" for r, v in result[f"{mode} pause by rank"].items())
        lines.append(f"| {mode} | {result[f'{mode} pause'] * 1e3:.1f} ms | {by_rank} |")
    lines += ["", f"Target: background / blocking <= {TARGET:g}: {result['ratio']:.3f}, "
              f"{'met' if result['met'] else '**not met**'}.", ""]
    if plot_name:
        lines += [f"![{plot_name}]({plot_name})", ""]
    return lines


def plot(result: dict[str, Any], out: Path, title_suffix: str = "") -> str:
    """Each rank's pause, background against blocking (log scale)."""
    fig, ax = axes(7, 3.6)
    ranks = list(result["blocking pause by rank"])
    width = 0.38
    for i, (mode, color) in enumerate((("blocking", "#bbbbbb"), ("background", "#1f77b4"))):
        values = [result[f"{mode} pause by rank"][r] for r in ranks]
        bars = ax.bar([j + (i - 0.5) * width for j in range(len(ranks))], values, width, color=color, label=mode)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value * 1e3:.1f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_yscale("log")
    ax.set_ylabel("pause per periodic save, s (median)")
    ax.legend(fontsize=8)
    ax.set_title(f"periodic save pause, {result['ranks']} ranks, {result['state bytes'] / 1e6:.0f} MB"
                 f"{title_suffix}", fontsize=10)
    return save_figure(fig, out, "bench-rank-pause.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 100 MB of state, 3 repetitions")
    parser.add_argument("--mb", type=float, default=None, help="state size in MB (default 400, 100 with --quick)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="saves measured per mode (default 5, 3 with --quick)")
    parser.add_argument("--work", default=str(REPO / "run" / "bench"), help="where the checkpoints go (deleted after)")
    args = parser.parse_args()
    mb = args.mb if args.mb is not None else (100 if args.quick else 400)
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    print_rank_pause(bench_rank_pause(reps, Path(args.work), nbytes=int(mb * (1 << 20)), ranks=args.ranks))


if __name__ == "__main__":
    main()
