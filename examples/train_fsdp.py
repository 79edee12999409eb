"""The example job with sharded state: FSDP2 (``fully_shard``) over gloo on the CPU (NCCL on GPUs).

    jobwrap run --dir ckpt -- torchrun --nproc-per-node 2 examples/train_fsdp.py --epochs 2
    JOBWRAP_DIR=ckpt python examples/train_fsdp.py --epochs 3   # one process: resharded from 2 ranks

No rank holds the whole model, so every rank writes its shards through
torch.distributed.checkpoint into the step's folder; the session commits the
checkpoint only once every rank's part is durable. ``--dump PATH`` writes the
full model and optimizer state right after resuming (rank 0), for the tests.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler
from train import make_dataset
from train_ddp import base_parser, start_ranks, train_epochs

import jobwrap


def build(device: torch.device, hidden: int = 64) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """An MLP sharded layer by layer, then as a whole (FSDP2's usual wrapping), with AdamW and a schedule."""
    model = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 32), nn.ReLU(),
                          nn.Linear(32, 1)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    return model, optimizer, scheduler


def dump(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The full (unsharded) state as one file on rank 0: a collective, every rank calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=options),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    if dist.get_rank() == 0:
        torch.save(state, path)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=64, help="width of the first layer")
    parser.add_argument("--dump", default=None, help="write the full state after resuming to this file")
    args = parser.parse_args()

    rank = start_ranks()  # the same initial weights on every rank, before sharding
    with jobwrap.Session() as job:  # after init_process_group: the ranks agree through it
        model, optimizer, scheduler = build(job.device, args.hidden)
        torch.manual_seed(1000 + rank)  # each rank's own dropout stream, saved per rank
        sampler = DistributedSampler(make_dataset(args.samples), shuffle=True, seed=7)
        loader = DataLoader(sampler.dataset, batch_size=args.batch_size, sampler=sampler)
        job.track(model=model, optimizer=optimizer, scheduler=scheduler)  # sharded: loaded through DCP
        if args.dump:
            dump(args.dump, model, optimizer)
        train_epochs(job, model, optimizer, scheduler, loader, args)  # the DDP example's loop, unchanged
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
