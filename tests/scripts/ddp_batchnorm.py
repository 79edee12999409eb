"""DDP with BatchNorm on two ranks (gloo, CPU), as users write it: DDP broadcasts rank 0's buffers at the
start of each forward, then each rank moves its running statistics with its own batch, so they differ
between the ranks at every step boundary. At the end of training each rank writes its own BatchNorm
buffers to ``--buffers-dir``/rank-R.pt, for the test to compare with the checkpoint."""
from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import jobwrap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--buffers-dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(128, 8) * 3 + 1, torch.randn(128, 1))
    with jobwrap.Session() as job:
        model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
        ddp = DistributedDataParallel(model)  # broadcast_buffers=True: rank 0's statistics before each forward
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        sampler = DistributedSampler(data, shuffle=True, seed=5)
        loader = DataLoader(data, batch_size=8, sampler=sampler)
        job.track(model=model, optimizer=optimizer)
        for epoch in job.epochs(args.epochs):
            sampler.set_epoch(epoch)
            for x, y in job.loader(loader):
                optimizer.zero_grad()
                nn.functional.mse_loss(ddp(x), y).backward()
                optimizer.step()
        buffers = {name: value.clone() for name, value in model.named_buffers()}
        torch.save(buffers, os.path.join(args.buffers_dir, f"rank-{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
