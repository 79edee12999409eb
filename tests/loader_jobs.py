"""Training scripts as users write them, one loader setup per --loader, for tests/test_loaders.py.

    jobwrap run --dir ck -- python tests/loader_jobs.py --loader generator --workers 2

Every batch's content goes into the tracked extra ``seen`` (and every validation
batch's too), so a resumed run that trains another order, or draws other
augmentation noise, ends with another checkpoint than the uninterrupted one.
"""
from __future__ import annotations

import argparse
import random

import numpy
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    TensorDataset,
    get_worker_info,
)

import jobwrap

SAMPLES, BATCH = 40, 6


def table(seed: int = 7) -> torch.Tensor:
    return torch.randn(SAMPLES, 4, generator=torch.Generator().manual_seed(seed))


class Augmented(Dataset):
    """Map-style, noise from all three global streams in __getitem__ (in the worker, or here with 0)."""

    def __init__(self) -> None:
        self.x = table()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> torch.Tensor:
        noise = torch.rand(1).item() + random.random() + float(numpy.random.rand())
        return self.x[i] + 0.01 * noise


class ShuffledBatches:
    """A custom batch sampler with its own random.Random and numpy RandomState."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch = n, batch
        self.rng = random.Random(11)
        self.np_rng = numpy.random.RandomState(12)

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch

    def __iter__(self):
        order = list(range(self.n))
        self.rng.shuffle(order)
        offset = int(self.np_rng.randint(0, self.batch))
        order = order[offset:] + order[:offset]
        for start in range(0, self.n, self.batch):
            yield order[start:start + self.batch]


class Stream(IterableDataset):
    """No __len__, shuffled with the global torch RNG when iterated, split between workers."""

    def __iter__(self):
        x = table()
        order = torch.randperm(SAMPLES).tolist()
        info = get_worker_info()
        if info is not None:
            order = order[info.id::info.num_workers]
        for i in order:
            yield x[i] + 0.01 * torch.rand(1)


class StatefulStream(IterableDataset):
    """An iterable dataset that knows its place: a new order each pass, from where it left off."""

    def __init__(self) -> None:
        self.passes, self.pos = 0, 0

    def __iter__(self):
        x = table()
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(100 + self.passes)).tolist()
        while self.pos < SAMPLES:
            i = order[self.pos]
            self.pos += 1
            yield x[i]
        self.passes, self.pos = self.passes + 1, 0

    def state_dict(self) -> dict:
        return {"passes": self.passes, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.passes, self.pos = state["passes"], state["pos"]


class WorkerRng(Dataset):
    """Map-style, noise from the dataset's own generator, made in each worker as PyTorch's docs show:
    by worker_init_fn from get_worker_info().seed, or lazily by the first __getitem__ ("lazy", from the worker's
    seed, or torch.initial_seed() with num_workers=0), or in __init__ ("init", kept by every worker's copy)."""

    def __init__(self, kind: str) -> None:
        self.x, self.kind, self.rng = table(), kind, None
        if kind.startswith("init-"):
            self.make(1234)

    def __len__(self) -> int:
        return SAMPLES

    def make(self, seed: int) -> None:
        kind = self.kind.removeprefix("lazy-").removeprefix("init-")
        if kind == "numpy":
            self.rng = numpy.random.default_rng(seed)
        elif kind == "torch":
            self.rng = torch.Generator().manual_seed(seed)
        else:
            self.rng = random.Random(seed)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.rng is None:  # "lazy-...": the worker_init_fn made nothing
            info = get_worker_info()
            self.make(info.seed if info is not None else torch.initial_seed())
        if isinstance(self.rng, torch.Generator):
            noise = torch.rand(1, generator=self.rng).item()
        else:
            noise = float(self.rng.random())
        return self.x[i] + 0.01 * noise


def make_worker_rng(worker_id: int) -> None:
    info = get_worker_info()
    if not info.dataset.kind.startswith(("lazy-", "init-")):
        info.dataset.make(info.seed)


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    numpy.random.seed(seed)
    random.seed(seed)


def make_loader(args: argparse.Namespace):
    common = dict(batch_size=BATCH, num_workers=args.workers, drop_last=args.drop_last,
                  worker_init_fn=seed_worker if args.worker_init else None)
    dataset = Augmented() if args.augment else TensorDataset(table())
    if args.persistent:
        common["persistent_workers"] = True
    if args.worker_rng:
        dataset, common["worker_init_fn"] = WorkerRng(args.worker_rng), make_worker_rng
    if args.loader == "shuffle":
        return DataLoader(dataset, shuffle=True, **common)
    if args.loader == "generator":
        return DataLoader(dataset, shuffle=True, generator=torch.Generator().manual_seed(5), **common)
    if args.loader == "sampler":
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(6))
        return DataLoader(dataset, sampler=sampler, **common)
    if args.loader == "batch-sampler":
        common.pop("batch_size"), common.pop("drop_last")
        return DataLoader(dataset, batch_sampler=ShuffledBatches(SAMPLES, BATCH), **common)
    if args.loader == "batch-sampler-generator":
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(8))
        common.pop("batch_size"), common.pop("drop_last")
        return DataLoader(dataset, batch_sampler=BatchSampler(sampler, BATCH, args.drop_last), **common)
    if args.loader == "distributed":
        return DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=1, rank=0, seed=9), **common)
    if args.loader == "iterable":
        return DataLoader(Stream(), **common)
    if args.loader == "stateful-iterable":
        return DataLoader(StatefulStream(), **common)
    if args.loader == "stateful-dataloader":  # torchdata: resumed through the loader's own state_dict
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, shuffle=True, **common)
    if args.loader == "list":
        return list(table(8).split(BATCH))
    raise SystemExit(f"unknown --loader {args.loader}")


def first(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loader", default="shuffle")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--drop-last", action="store_true")
    parser.add_argument("--worker-init", action="store_true")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--persistent", action="store_true", help="DataLoader(persistent_workers=True)")
    parser.add_argument("--worker-rng", choices=["numpy", "torch", "python", "lazy-numpy", "init-numpy"],
                        help="noise from a generator the workers make (WorkerRng)")
    parser.add_argument("--validate", action="store_true", help="a shuffled validation loader every 3 batches")
    parser.add_argument("--steps", type=int, default=0,
                        help="a step-counted loop (job.steps) pulling next() from an endless job.loader")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="optimizer.step() every k batches, keyed on the batch index (loader.enumerate())")
    args = parser.parse_args()

    torch.manual_seed(0)
    random.seed(0)
    numpy.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = make_loader(args)
    validation = DataLoader(TensorDataset(table(9)), batch_size=10, shuffle=True)
    with jobwrap.Session() as job:
        job.track(model=model, optimizer=optimizer, seen=[])

        def train(batch, step: bool = True) -> None:
            x = first(batch)
            loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
            loss.backward()
            if step:
                optimizer.step()
                optimizer.zero_grad()
            job["seen"] = job["seen"] + [round(x.sum().item(), 4)]

        if args.steps:  # nanoGPT's shape: while iter_num < max_iters, X, Y = get_batch()
            def endless():
                while True:
                    yield from job.loader(loader)
            batches = endless()
            for _ in job.steps(args.steps):
                train(next(batches))
            return
        for epoch in job.epochs(args.epochs):
            if args.loader == "distributed":
                loader.sampler.set_epoch(epoch)
            for i, batch in job.loader(loader).enumerate():
                train(batch, step=(i + 1) % args.accumulate == 0)
                if args.validate and job.position % 3 == 0:
                    with torch.no_grad():
                        val = next(iter(validation))[0]
                        job["seen"] = job["seen"] + [round(model(val).sum().item(), 4)]


if __name__ == "__main__":
    main()
