"""A training script as a user writes it, independent of the examples: a shuffled loader, a per-epoch
LR schedule, job.save() at the end of each epoch, then validation that updates extras.

Options make it do what real scripts do at awkward moments:
  --signal-in-validation E   send itself SIGUSR1 during the validation of epoch E (once per directory)
  --save-in-body S           call job.save() inside the loop's body, after optimizer.step(), at step S
  --kill-after-body-save     SIGKILL itself right after that save (once per directory): only it survives
  --accumulate K             gradient accumulation: backward every batch, optimizer.step() every K batches
Each trained step appends "step loss" to --loss-log, so a step trained twice shows.
"""
from __future__ import annotations

import argparse
import os
import random
import signal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jobwrap


def once(marker: str) -> bool:
    """True the first time per checkpoint directory: the relaunched run must not repeat the event."""
    path = os.path.join(os.environ["JOBWRAP_DIR"] + f".{marker}")
    if os.path.exists(path):
        return False
    open(path, "w").close()
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loss-log", required=True)
    parser.add_argument("--signal-in-validation", type=int, default=-1)
    parser.add_argument("--save-in-body", type=int, default=-1)
    parser.add_argument("--kill-after-body-save", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    random.seed(0)  # unseeded, Python's and NumPy's streams differ between any two runs, preempted or not
    np.random.seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    val = TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train_loader = DataLoader(data, batch_size=8, shuffle=True)
    val_loader = DataLoader(val, batch_size=8, shuffle=True)  # draws from the RNG, as augmentations do

    with jobwrap.Session() as job:
        job.track(model=model, optimizer=optimizer, scheduler=scheduler, best_val=float("inf"), val_history=[])
        for epoch in job.epochs(args.epochs):
            model.train()
            for x, y in job.loader(train_loader):
                if args.accumulate == 1:
                    optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                (loss / args.accumulate).backward()
                if (job.step + 1) % args.accumulate == 0:
                    optimizer.step()
                    if args.accumulate > 1:
                        optimizer.zero_grad()
                with open(args.loss_log, "a") as f:
                    f.write(f"{job.step} {loss.item():.8f}\n")
                if job.step + 1 == args.save_in_body:
                    job.save()
                    if args.kill_after_body_save and once("killed"):
                        os.kill(os.getpid(), signal.SIGKILL)
            scheduler.step()
            job.save()
            model.eval()
            total = 0.0
            with torch.no_grad():
                for x, y in val_loader:
                    total += nn.functional.mse_loss(model(x), y).item()
                    if epoch == args.signal_in_validation and once("signalled"):
                        os.kill(os.getpid(), signal.SIGUSR1)
            job["val_history"] = job["val_history"] + [round(total, 6)]
            job["best_val"] = min(job["best_val"], total)


if __name__ == "__main__":
    main()
