"""The example job on several ranks: DDP over gloo on the CPU (NCCL on GPUs), under torchrun or srun.

    jobwrap run --dir ckpt -- torchrun --nproc-per-node 2 examples/train_ddp.py --epochs 2
    srun --ntasks 2 python examples/train_ddp.py        # RANK etc. from SLURM_PROCID (see slurm/)

Every rank stops at the same step whichever rank got the signal; rank 0 writes
one checkpoint holding every rank's RNG streams, and requeues once.
"""
from __future__ import annotations

import argparse
import os
import random
import time

import numpy
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from train import build, make_dataset

import jobwrap


def init_distributed() -> None:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; under bare srun derive them from Slurm's variables."""
    os.environ.setdefault("RANK", os.environ.get("SLURM_PROCID", "0"))
    os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """The options the multi-rank examples share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step (slow it down)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    return parser


def start_ranks() -> int:
    """Join the job and seed: each rank its own Python and NumPy streams, all the same initial weights."""
    init_distributed()
    rank = dist.get_rank()
    random.seed(rank)
    numpy.random.seed(rank)
    torch.manual_seed(0)
    return rank


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    args = parser.parse_args()

    rank = start_ranks()
    with jobwrap.Session() as job:  # after init_process_group: the ranks agree through it
        model, optimizer, scheduler = build(args)
        model = DistributedDataParallel(model.to(job.device))
        torch.manual_seed(1000 + rank)  # each rank's own dropout stream, saved per rank
        sampler = DistributedSampler(make_dataset(args.samples), shuffle=True, seed=7)
        loader = DataLoader(sampler.dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
        job.track(model=model.module, optimizer=optimizer, scheduler=scheduler)
        train_epochs(job, model, optimizer, scheduler, loader, args)
    dist.destroy_process_group()


def train_epochs(job: jobwrap.Session, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object,
                 loader: DataLoader, args: argparse.Namespace) -> None:
    """The training loop, the same for every rank and every kind of wrapping (DDP, FSDP)."""
    for epoch in job.epochs(args.epochs):
        loader.sampler.set_epoch(epoch)
        for x, y in job.loader(loader):
            optimizer.zero_grad()
            loss = F.mse_loss(model(x.to(job.device)), y.to(job.device))
            loss.backward()
            optimizer.step()
            if args.step_seconds:
                time.sleep(args.step_seconds)
        scheduler.step()


if __name__ == "__main__":
    main()
