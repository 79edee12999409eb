"""A module-level script adopted as a nanoGPT user would: no ``with`` block, the next batch drawn at the end
of each iteration (and inside gradient accumulation), ``job.steps`` owning the end of the loop.

Options make it do what adopted scripts do:
  --untracked-batch    draw the first batch after job.track() and carry it in a local (the mistake jobwrap warns of)
  --unseeded           never seed Python's and NumPy's random streams
  --directory DIR      name the checkpoint directory in code (simulate must still redirect it)
  --fail-at S          raise an error at step S (the at-exit close records it)
Each trained step appends "step loss" to --loss-log, so a step trained twice or one too many shows.
"""
from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from torch import nn

import jobwrap

parser = argparse.ArgumentParser()
parser.add_argument("--max-iters", type=int, default=10)
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--loss-log", required=True)
parser.add_argument("--untracked-batch", action="store_true")
parser.add_argument("--unseeded", action="store_true")
parser.add_argument("--directory")
parser.add_argument("--fail-at", type=int, default=-1)
args = parser.parse_args()

torch.manual_seed(0)
if not args.unseeded:
    random.seed(0)  # unseeded, Python's and NumPy's streams differ between any two runs, preempted or not
    np.random.seed(0)
data = torch.randn(128, 8)


def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(0, len(data), (4,))
    return data[ix], data[ix].sum(1, keepdim=True)


model = nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

job = jobwrap.Session(args.directory).start()  # closed when the script exits
if args.untracked_batch:
    job.track(model=model, optimizer=optimizer)
    X, Y = get_batch()
else:
    job.track(model=model, optimizer=optimizer, batch=get_batch())  # drawn before track(), carried as state

for it in job.steps(args.max_iters):
    if not args.untracked_batch:
        X, Y = job["batch"]
    for micro in range(args.accumulate):
        loss = ((model(X) - Y) ** 2).mean() / args.accumulate
        X, Y = get_batch()  # prefetch the next batch, as nanoGPT does
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not args.untracked_batch:
        job["batch"] = (X, Y)
    if args.unseeded:
        random.random()
    if it == args.fail_at:
        raise RuntimeError(f"failing at step {it} as asked")
    with open(args.loss_log, "a") as f:
        f.write(f"{it} {loss.item():.10f}\n")
