"""A small training job made preemptible with jobwrap (used by ./scripts/demo and the tests).

    jobwrap run --dir ckpt -- python examples/train.py --epochs 4

Each step's loss is appended to --loss-log (if given) as "step<TAB>loss", so a
preempted run's history can be compared with an uninterrupted one's.
"""
from __future__ import annotations

import argparse
import random
import time

import numpy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jobwrap


def make_dataset(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, 16, generator=generator)
    y = (x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=generator))
    return TensorDataset(x, y)


def build(args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    return model, optimizer, scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: JOBWRAP_DIR)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step (slow it down)")
    parser.add_argument("--loss-log", default=None)
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True) (on a GPU, set CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    args = parser.parse_args()
    if args.deterministic:
        torch.use_deterministic_algorithms(True)

    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)  # seeds torch's CPU and CUDA generators
    with jobwrap.Session(args.dir) as job:
        model, optimizer, scheduler = build(args)
        model.to(job.device)
        loader = DataLoader(make_dataset(args.samples), batch_size=args.batch_size, shuffle=True,
                            num_workers=args.workers)
        job.track(model=model, optimizer=optimizer, scheduler=scheduler, best_loss=float("inf"))
        for epoch in job.epochs(args.epochs):
            for x, y in job.loader(loader):
                optimizer.zero_grad()
                loss = F.mse_loss(model(x.to(job.device)), y.to(job.device))
                loss.backward()
                optimizer.step()
                if args.loss_log:
                    with open(args.loss_log, "a") as log:
                        log.write(f"{job.step}\t{loss.item()!r}\n")
                if args.step_seconds:
                    time.sleep(args.step_seconds)
            scheduler.step()
            job["best_loss"] = min(job["best_loss"], loss.item())


if __name__ == "__main__":
    main()
