"""Gradient accumulation on two DDP ranks, as users write it: the micro-batches before each
optimizer.step() run under model.no_sync(), so each rank holds its own, unreduced gradients
between steps. Each trained step appends "step rank loss" to --loss-log."""
from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--loss-log", required=True)
    parser.add_argument("--accumulate", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    random.seed(rank)  # unseeded, these streams differ between any two runs, preempted or not
    np.random.seed(rank)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(128, 4), torch.randn(128, 1))
    with jobwrap.Session() as job:
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sampler = DistributedSampler(data, shuffle=True, seed=3)
        loader = DataLoader(data, batch_size=8, sampler=sampler)
        job.track(model=model, optimizer=optimizer)
        for epoch in job.epochs(2):
            sampler.set_epoch(epoch)
            for x, y in job.loader(loader):
                stepping = (job.step + 1) % args.accumulate == 0
                with contextlib.nullcontext() if stepping else ddp.no_sync():
                    loss = nn.functional.mse_loss(ddp(x), y)
                    (loss / args.accumulate).backward()
                if stepping:
                    optimizer.step()
                    optimizer.zero_grad()
                with open(args.loss_log, "a") as f:
                    f.write(f"{job.step} {rank} {loss.item():.8f}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
