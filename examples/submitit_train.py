"""The example training job submitted with submitit; jobwrap saves at the step boundary, submitit requeues.

    python examples/submitit_train.py --dir ckpt                 # submitit's LocalExecutor, here
    python examples/submitit_train.py --dir /shared/ckpt --slurm # submitit's Slurm executor

The train function is the one of ``@jobwrap.preemptible``: it receives the
session first. It lives in an importable module because submitit pickles the
call and the job imports it again, possibly after a requeue.
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


def train(job, epochs: int = 2, samples: int = 256, step_seconds: float = 0.0, workers: int = 0) -> dict:
    """Train a small regression model (``workers`` DataLoader workers); return the final step and best loss."""
    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, 16, generator=generator)
    y = x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, num_workers=workers)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    job.track(model=model, optimizer=optimizer, scheduler=scheduler, best_loss=float("inf"))
    for epoch in job.epochs(epochs):
        for xb, yb in job.loader(loader):
            optimizer.zero_grad()
            loss = F.mse_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
            if step_seconds:
                time.sleep(step_seconds)
        scheduler.step()
        job["best_loss"] = min(job["best_loss"], loss.item())
    return {"step": job.step, "best_loss": job["best_loss"]}


def main() -> None:
    import submitit

    from jobwrap.submitit import Preemptible

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="checkpoint directory, the same on every requeue")
    parser.add_argument("--logs", default="submitit-logs", help="submitit's folder")
    parser.add_argument("--slurm", action="store_true", help="submit to Slurm instead of running locally")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.slurm:
        executor = submitit.AutoExecutor(folder=args.logs, cluster="slurm")
        # USR2 (submitit's signal) 120 s before the time limit; submitit requeues up to 3 time-outs.
        executor.update_parameters(timeout_min=60, slurm_signal_delay_s=120)
    else:
        executor = submitit.LocalExecutor(folder=args.logs)
        executor.update_parameters(timeout_min=30)
    job = executor.submit(Preemptible(train, args.dir), epochs=args.epochs)
    print(f"submitted job {job.job_id}; result: {job.result()}")


if __name__ == "__main__":
    main()
