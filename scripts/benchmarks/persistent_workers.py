"""Worker start-up that persistent_workers=True saves per epoch, under job.loader().

    scripts/bench persistent_workers [--epochs 8] [--workers 2]

A map-style dataset whose workers import what a typical dataset imports (NumPy,
already loaded by torch) and draw augmentation noise, batch 8, a few short
epochs in a Session: the time of each epoch after the first, with and without
persistent workers. The difference is the start-up of the workers, paid at every
epoch without them. Medians; prints one line per setting and the saving.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset

import jobwrap


class Noisy(Dataset):
    """32 samples that draw from torch's RNG, as augmentation does."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((16,), float(i)) + torch.rand(16)


def epoch_seconds(persistent: bool, epochs: int, workers: int) -> list[float]:
    """Wall time of each epoch after the first (whose start-up both settings pay)."""
    loader = DataLoader(Noisy(), batch_size=8, num_workers=workers, persistent_workers=persistent)
    times = []
    with tempfile.TemporaryDirectory() as directory, jobwrap.Session(directory, environ={}, save_at_end=False) as job:
        for epoch in job.epochs(epochs):
            began = time.perf_counter()
            for batch in job.loader(loader):
                batch.sum().item()
            times.append(time.perf_counter() - began)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    medians = {}
    for persistent in (False, True):
        medians[persistent] = statistics.median(epoch_seconds(persistent, args.epochs, args.workers))
        print(f"persistent_workers={persistent}: {medians[persistent] * 1000:.1f} ms per epoch (median)")
    print(f"saved per epoch by persistent workers ({args.workers} workers): "
          f"{(medians[False] - medians[True]) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
