"""Time from job.loader() to the first new batch, fresh and resumed at 10, 50 and 90 % of an epoch.

    .venv/bin/python scripts/bench_resume_position.py [--quick]

A map-style dataset that takes 2 ms per sample, batch 8, 2 workers. Each resumed
point is a real checkpoint taken mid-epoch (a SIGUSR1 to this process), resumed
by a new Session: once as jobwrap resumes it (the done batches' indices skipped,
nothing loaded) and once through the replay that jobwrap keeps for loaders it
cannot skip (a DataLoader subclass with its own __iter__), for reference.
Target (issue 12): resumed at 90 % at most 1.2x the fresh start. Medians over repetitions.
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
from torch.utils.data import DataLoader, Dataset

import jobwrap

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "run" / "bench-resume-position"
TARGET = 1.2
BATCH, WORKERS, SAMPLE_S = 8, 2, 0.002


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="200 batches per epoch, 3 repetitions")
    args = parser.parse_args()
    batches, reps = (200, 3) if args.quick else (1000, 5)
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"map-style dataset, {SAMPLE_S * 1000:g} ms/sample, batch {BATCH}, {WORKERS} workers, "
          f"{batches} batches per epoch; median of {reps}", flush=True)
    fresh = statistics.median(first_batch(None, batches, False) for _ in range(reps))
    print(f"  {'fresh start':24s} {fresh:8.3f} s", flush=True)
    ratio_at_90 = float("nan")
    for percent in (10, 50, 90):
        position = batches * percent // 100
        times = {}
        for replay in (False, True):
            saved = WORK / f"ck-{percent}-{'replay' if replay else 'skip'}"
            checkpoint_at(saved, batches, position, replay)
            times[replay] = statistics.median(first_batch(saved, batches, replay) for _ in range(reps))
        ratio = times[False] / fresh
        ratio_at_90 = ratio if percent == 90 else ratio_at_90
        print(f"  resumed at {percent:2d} % (batch {position:4d}): skip {times[False]:8.3f} s ({ratio:5.2f}x fresh), "
              f"replay {times[True]:8.3f} s ({times[True] / fresh:6.1f}x)", flush=True)
    verdict = "met" if ratio_at_90 <= TARGET else "NOT MET"
    print(f"  resumed at 90 % / fresh start: {ratio_at_90:.2f}  target <= {TARGET:g}  {verdict}")
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
