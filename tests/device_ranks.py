"""One rank of a two-rank job (gloo, CPU) that saves as on cuda:LOCAL_RANK and resumes; run by test_devices.py.

Rank 0 writes the checkpoint, then records every storage in it as on
``cuda:0``, as a GPU node's rank 0 writes it (the ranks' RNG states reach it
through a gather; its model sits on its GPU). Then each rank draws from its streams (what the
uninterrupted run would draw next), scrambles them, resumes from that file in
a new session and draws again. Prints one JSON line: the resumed device, where
the model's tensors landed, and both draws.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from fake_gpu import as_gpu_node
from torch import nn

import jobwrap


def main(directory: str) -> None:
    dist.init_process_group("gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    torch.manual_seed(0)
    model = nn.Linear(4, 2)  # the same on every rank, as DDP keeps it
    torch.manual_seed(100 + rank)  # each rank its own stream
    with jobwrap.Session(directory, save_at_end=False) as job:
        job.track(model=model)
        job.save()
    if rank == 0:  # the file only rank 0 writes, as from its GPU
        as_gpu_node(directory, location=f"cuda:{local_rank}")
    dist.barrier()
    expected = torch.rand(4).tolist()
    torch.manual_seed(999)
    resumed = nn.Linear(4, 2)
    with jobwrap.Session(directory, save_at_end=False) as job:
        job.track(model=resumed)
        got = torch.rand(4).tolist()
        report = {"rank": rank, "device": str(job.device), "resumed": job.resumed_from is not None,
                  "model_devices": sorted({str(p.device) for p in resumed.parameters()}),
                  "same_model": all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters())),
                  "expected": expected, "got": got}
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
