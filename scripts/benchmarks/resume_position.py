"""Time from job.loader() to the first new batch, fresh and resumed at 10, 50 and 90 % of an epoch.

    scripts/bench resume_position [--quick]

A map-style dataset that takes 2 ms per sample, batch 8, 2 workers. Each resumed
point is a real checkpoint taken mid-epoch (a SIGUSR1 to this process), resumed
by a new Session: once as jobwrap resumes it (the done batches' indices skipped,
nothing loaded) and once through the replay that jobwrap keeps for loaders it
cannot skip (a DataLoader subclass with its own __iter__), for reference.
Target: resumed at 90 % at most 1.2x the fresh start. Medians over repetitions.
scripts/bench runs it (``bench_resume_position``) and adds its section and plot to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import time
from pathlib import Path

import torch
from benchmarks.common import axes, save_figure
from torch.utils.data import DataLoader, Dataset

import jobwrap

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "run" / "bench-resume-position"
TARGET = 1.2
BATCH, WORKERS, SAMPLE_S = 8, 2, 0.002
PERCENTS = (10, 50, 90)


class Slow(Dataset):
    """A sample costs SAMPLE_S (decoding, augmenting), and draws from torch's RNG as augmentation does."""

    def __init__(self, samples: int) -> None:
        self.samples, self.delay = samples, SAMPLE_S

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.full((4,), float(i)) + torch.rand(4)


class Replayed(DataLoader):
    """A DataLoader subclass that builds its own iterator: jobwrap replays it, as before skipping existed."""

    def __iter__(self):
        return super().__iter__()


def make_loader(batches: int, replay: bool) -> DataLoader:
    kind = Replayed if replay else DataLoader
    return kind(Slow(batches * BATCH), batch_size=BATCH, shuffle=True, num_workers=WORKERS)


def checkpoint_at(directory: Path, batches: int, position: int, replay: bool) -> None:
    """A committed checkpoint taken by a real signal during batch ``position`` of the first epoch (loading fast)."""
    shutil.rmtree(directory, ignore_errors=True)
    loader = make_loader(batches, replay)
    loader.dataset.delay = 0.0
    try:
        with jobwrap.Session(str(directory), environ={}, run_id="bench") as job:
            for _ in job.epochs(1):
                for _ in job.loader(loader):
                    if job.position + 1 == position:
                        os.kill(os.getpid(), signal.SIGUSR1)
    except jobwrap.Preempted:
        return
    raise RuntimeError("the signal did not stop the session")


def first_batch(directory: Path | None, batches: int, replay: bool) -> float:
    """Seconds from job.loader() to the first batch, in a new session over a copy of ``directory`` (or a fresh one)."""
    run = WORK / "run"
    shutil.rmtree(run, ignore_errors=True)
    if directory is not None:
        shutil.copytree(directory, run)
    loader = make_loader(batches, replay)
    with jobwrap.Session(str(run), environ={}, run_id="bench", save_at_end=False) as job:
        for _ in job.epochs(1):
            started = time.perf_counter()
            iterator = iter(job.loader(loader))
            next(iterator)
            took = time.perf_counter() - started
            iterator.close()
            return took
    raise RuntimeError("no epoch left to run")


def bench_resume_position(reps: int, batches: int) -> dict:
    """Seconds to the first batch: fresh, and resumed at 10, 50, 90 % by skipping and by replaying."""
    WORK.mkdir(parents=True, exist_ok=True)
    fresh = [first_batch(None, batches, False) for _ in range(reps)]
    points: dict[str, dict[str, list[float]]] = {}
    try:
        for percent in PERCENTS:
            position = batches * percent // 100
            points[str(percent)] = {}
            for replay in (False, True):
                saved = WORK / f"ck-{percent}-{'replay' if replay else 'skip'}"
                checkpoint_at(saved, batches, position, replay)
                points[str(percent)]["replay" if replay else "skip"] = [
                    first_batch(saved, batches, replay) for _ in range(reps)]
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    ratio = statistics.median(points["90"]["skip"]) / statistics.median(fresh)
    return {"batches": batches, "reps": reps, "fresh": fresh, "points": points, "ratio_at_90": ratio}


def summary_lines(result: dict) -> list[str]:
    """The result as printed: each position's medians against the fresh start, then the target."""
    fresh = statistics.median(result["fresh"])
    lines = [f"map-style dataset, {SAMPLE_S * 1000:g} ms/sample, batch {BATCH}, {WORKERS} workers, "
             f"{result['batches']} batches per epoch; median of {result['reps']}",
             f"  {'fresh start':24s} {fresh:8.3f} s"]
    for percent, times in result["points"].items():
        skip, replay = statistics.median(times["skip"]), statistics.median(times["replay"])
        lines.append(f"  resumed at {int(percent):2d} % (batch {result['batches'] * int(percent) // 100:4d}): "
                     f"skip {skip:8.3f} s ({skip / fresh:5.2f}x fresh), replay {replay:8.3f} s "
                     f"({replay / fresh:6.1f}x)")
    verdict = "met" if result["ratio_at_90"] <= TARGET else "NOT MET"
    lines.append(f"  resumed at 90 % / fresh start: {result['ratio_at_90']:.2f}  target <= {TARGET:g}  {verdict}")
    return lines


def targets(result: dict) -> list[tuple[str, float, float]]:
    """(name, target, value) for scripts/bench's table of targets."""
    return [("resume at 90 % of an epoch / fresh start (first batch)", TARGET, result["ratio_at_90"])]


def report_lines(result: dict, plot_name: str | None) -> list[str]:
    """scripts/bench's section: the table, the plot, the target."""
    fresh = statistics.median(result["fresh"])
    lines = ["## Resume against position in the epoch", "",
             f"From `job.loader()` to the first new batch (`scripts/benchmarks/resume_position.py`): a map-style "
             f"dataset at {SAMPLE_S * 1000:g} ms per sample (it also draws from torch's RNG, as augmentation does), "
             f"batch {BATCH}, {WORKERS} workers, {result['batches']} batches per epoch; each point a real checkpoint "
             f"taken by a SIGUSR1 mid-epoch, resumed by a new Session. *skip*: jobwrap's resume (the trained "
             "batches' indices skipped, nothing loaded, each batch's worker RNG derived from the loader's seed and "
             "the batch index); *replay*: what jobwrap still does for a loader it cannot skip (a DataLoader subclass "
             f"with its own `__iter__`, an IterableDataset without `state_dict`). Medians of {result['reps']}.", "",
             "| resumed at | skip: seconds (x fresh) | replay: seconds (x fresh) |", "|---|---|---|",
             f"| fresh start | {fresh:.3f} | |"]
    for percent, times in result["points"].items():
        skip, replay = statistics.median(times["skip"]), statistics.median(times["replay"])
        lines.append(f"| {percent} % | {skip:.3f} ({skip / fresh:.2f}x) | {replay:.3f} ({replay / fresh:.1f}x) |")
    met = result["ratio_at_90"] <= TARGET
    lines += ["", f"Target: resumed at 90 % / fresh start <= {TARGET:g}: {result['ratio_at_90']:.2f}, "
              f"{'met' if met else '**not met**'}.", ""]
    if plot_name:
        lines += [f"![{plot_name}]({plot_name})", ""]
    return lines


def plot(result: dict, out: Path, title_suffix: str = "") -> str:
    """Seconds to the first batch against the position resumed at: skip and replay, the fresh start, the target."""
    percents = [int(p) for p in result["points"]]
    fresh = statistics.median(result["fresh"])
    fig, ax = axes(7, 4)
    for kind, color in (("skip", "#1f77b4"), ("replay", "#bbbbbb")):
        ax.plot(percents, [statistics.median(result["points"][str(p)][kind]) for p in percents], "o-",
                color=color, label=f"resumed ({kind})")
    ax.axhline(fresh, color="black", linewidth=0.8, label="fresh start")
    ax.axhline(fresh * TARGET, color="black", linewidth=0.8, linestyle="--", label=f"target: {TARGET:g}x fresh")
    ax.set_xlabel("position resumed at (% of the epoch)")
    ax.set_ylabel("seconds to the first new batch")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"resume time against position in the epoch{title_suffix}", fontsize=10)
    return save_figure(fig, out, "bench-resume-position.png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="200 batches per epoch, 3 repetitions")
    args = parser.parse_args()
    batches, reps = (200, 3) if args.quick else (1000, 5)
    print("\n".join(summary_lines(bench_resume_position(reps, batches))), flush=True)


if __name__ == "__main__":
    main()
