"""Per-step cost of the stop agreement between ranks (a 3-int all-reduce on a gloo side group).

    scripts/bench agreement [--ranks 2] [--steps 3000]

Spawns the ranks on this machine (gloo over loopback), times RankGroup.agree
per call, and prints the median and 99th percentile in microseconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, steps: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from jobwrap._loop.distributed import RankGroup

    group = RankGroup()
    for _ in range(200):  # warm up
        group.agree(0, False)
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        group.agree(0, False)
        samples.append(time.perf_counter() - start)
    if rank == 0:
        samples.sort()
        queue.put((statistics.median(samples), samples[int(0.99 * len(samples))]))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(args.ranks, args.steps, 29620, queue), nprocs=args.ranks)
    median, p99 = queue.get()
    print(f"agreement over {args.ranks} ranks (gloo, loopback): median {median * 1e6:.0f} us, "
          f"p99 {p99 * 1e6:.0f} us per step over {args.steps} steps")


if __name__ == "__main__":
    main()
