"""An epoch loop that commits with job.save() after each epoch's end-of-epoch code (scheduler.step()), as
many scripts do. Each trained step appends "step epoch loss" to --loss-log.

--kill-after-save EPOCH: the process SIGKILLs itself right after that epoch's job.save() (a node lost before
the next boundary): the next launch resumes from that save. --after-save: what the epoch's body does after
its job.save() ("nothing", or "draw": a draw from torch's global stream, which a resume would skip).
--save-first: job.save() right after the loader's loop, before scheduler.step()."""
from __future__ import annotations

import argparse
import os
import random
import signal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import jobwrap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loss-log", required=True)
    parser.add_argument("--kill-after-save", type=int, default=-1)
    parser.add_argument("--after-save", choices=["nothing", "draw"], default="nothing")
    parser.add_argument("--save-first", action="store_true")
    args = parser.parse_args()
    random.seed(0)  # unseeded, these streams differ between any two runs, preempted or not
    np.random.seed(0)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(52, 4, generator=g), torch.randn(52, 1, generator=g))
    with jobwrap.Session() as job:
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        loader = DataLoader(data, batch_size=8, shuffle=True)
        job.track(model=model, optimizer=optimizer, scheduler=scheduler)
        with open(args.loss_log, "a") as log:
            for epoch in job.epochs(3):
                for x, y in job.loader(loader):
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    log.write(f"{job.step}\t{epoch}\t{loss.item()!r}\n")
                    log.flush()
                if not args.save_first:
                    scheduler.step()
                job.save()
                if epoch == args.kill_after_save:
                    os.kill(os.getpid(), signal.SIGKILL)
                if args.save_first:
                    scheduler.step()
                if args.after_save == "draw":
                    torch.rand(1)


if __name__ == "__main__":
    main()
