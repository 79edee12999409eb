"""Cost of checking, before a striped save, that the ranks' tensors are equal (xxh3 per tensor + one gather).

    scripts/bench stripe_check [--ranks 2] [--mb 400] [--repeats 5]

Spawns the ranks on this machine (gloo over loopback); each builds benchmarks.common's
state (a stack of linear layers with Adam's moments) and times what
``jobwrap._storage.striped.commit`` adds per save: hashing every stripable tensor and
rank 0 gathering the digests, then broadcasting the tensors it keeps. Prints the
median over the repeats of the slowest rank, and the hashing rate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch.distributed as dist
import torch.multiprocessing as mp



def worker(rank: int, world: int, nbytes: int, repeats: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from benchmarks.common import build

    from jobwrap._loop.distributed import RankGroup
    from jobwrap._storage.striped import digest, layout, stripable, unproven

    model, optimizer = build(nbytes, "cpu")
    states = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    tensors = stripable(states)
    group = RankGroup()
    samples = []
    for _ in range(repeats + 1):  # the first one warms up
        group.barrier()
        start = time.perf_counter()
        gathered = group.gather((layout(tensors), [digest(t) for _, t in tensors]))
        group.broadcast(unproven([d for _, d in gathered]) if rank == 0 else None)
        samples.append(time.perf_counter() - start)
    queue.put((rank, samples[1:], sum(t.nbytes for _, t in tensors), len(tensors)))
    group.close(clean=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    port = 29000 + os.getpid() % 1000
    mp.spawn(worker, args=(args.ranks, args.mb * 10**6, args.repeats, port, queue), nprocs=args.ranks)
    results = sorted(queue.get() for _ in range(args.ranks))
    slowest = [max(r[1][i] for r in results) for i in range(args.repeats)]
    nbytes, count = results[0][2], results[0][3]
    median = statistics.median(slowest)
    print(f"{args.ranks} ranks, {nbytes / 1e6:.0f} MB in {count} tensors per rank: check {median * 1e3:.0f} ms "
          f"(median of {args.repeats}, slowest rank; min {min(slowest) * 1e3:.0f}, max {max(slowest) * 1e3:.0f}), "
          f"{nbytes / median / 1e9:.2f} GB/s per rank")


if __name__ == "__main__":
    main()
