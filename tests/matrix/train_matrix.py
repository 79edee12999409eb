"""A training script written the way people write theirs, shaped by one JSON argument (tests/matrix).

    python tests/matrix/train_matrix.py '{"loader": "sampler", "workers": 2, ...}' LOSS_LOG

Each key is a dimension of tests/matrix/cells.py. Every step appends
"step<TAB>epoch<TAB>loss" to LOSS_LOG (one file per rank: LOSS_LOG.rN), so a
preempted run's history can be compared with the uninterrupted one's.

MATRIX_HOLD_SAVE=DIR (set by the test only for the "double" signal) makes the
signal's save wait, inside a tracked object's state_dict(), until the test has
sent a second signal: the second signal then lands in the middle of the save.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any, Iterator

import numpy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler

import jobwrap

SAMPLES = 52          # 6 full batches of 8 and one of 4 per epoch (drop_last: 6)
BATCH = 8
EPOCHS = 2
VALIDATE_EVERY = 4    # validation inside the epoch, every 4 steps
SAVE_EVERY = 5        # save="in_body": job.save() inside the batch body every 5 steps


# ---------------------------------------------------------------- data

def tensors(samples: int = SAMPLES, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=g)
    return x, x[:, :3].sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=g)


class Noisy(Dataset):
    """Map-style data with augmentation noise from the process's torch and NumPy streams (workers' seeds matter)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.01 * torch.randn(8) + float(numpy.random.normal(0, 0.01))
        return self.x[i] + noise, self.y[i]


class OwnGenerator(Noisy):
    """The same noise from a NumPy Generator the dataset holds, as per-worker augmentation recipes do: made by
    worker_init_fn from get_worker_info().seed (worker_rng="worker_init_gen", see seed_dataset), or made on first
    use from torch.initial_seed() (worker_rng="lazy")."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, lazy: bool) -> None:
        super().__init__(x, y)
        self.lazy = lazy
        self.rng: numpy.random.Generator | None = None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rng is None and self.lazy:
            self.rng = numpy.random.default_rng(torch.initial_seed())
        noise = torch.from_numpy(self.rng.normal(0, 0.01, 8).astype(numpy.float32))
        return self.x[i] + noise, self.y[i]


def seed_dataset(worker_id: int) -> None:
    """worker_init_fn: each worker's copy of the dataset gets a generator from the seed PyTorch gave the worker."""
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = numpy.random.default_rng(info.seed)


class EndlessSampler(Sampler[int]):
    """An infinite sampler (detectron2's TrainingSampler, in short): a new permutation after each pass, forever;
    the training ends by its step count, not by the loader."""

    def __init__(self, size: int, seed: int = 7) -> None:
        self.size, self.seed = size, seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.size, generator=g).tolist()


class Stream(IterableDataset):
    """An iterable dataset as people write one: reshuffled per epoch by set_epoch(), sharded over workers."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int = 7) -> None:
        self.x, self.y, self.seed, self.epoch = x, y, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        info = torch.utils.data.get_worker_info()
        if info is not None:
            order = order[info.id::info.num_workers]
        for i in order.tolist():
            yield self.x[i] + 0.01 * torch.randn(8), self.y[i]


class StatefulStream(Stream):
    """The same with a state_dict, tracked by the script like any stateful object."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])


def seed_worker(worker_id: int) -> None:
    """PyTorch's reproducibility recipe for worker_init_fn."""
    seed = torch.initial_seed() % 2**32
    numpy.random.seed(seed)
    random.seed(seed)


def loader_options(cfg: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"num_workers": cfg["workers"]}
    if cfg["loader_option"] == "persistent_workers":
        options["persistent_workers"] = True
    elif cfg["loader_option"] == "worker_init_fn":
        options["worker_init_fn"] = seed_worker
    if cfg["worker_rng"] == "worker_init_gen":
        options["worker_init_fn"] = seed_dataset
    return options


def map_dataset(cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> Noisy:
    """The map-style dataset with the cell's source of augmentation noise."""
    if cfg["worker_rng"] == "global":
        return Noisy(x, y)
    return OwnGenerator(x, y, lazy=cfg["worker_rng"] == "lazy")


def endless_data(cfg: dict[str, Any], rank: int, world: int) -> DataLoader:
    """An endless DataLoader over this rank's share (the step loops "endless" and "while_next")."""
    x, y = tensors()
    x, y = x[rank::world], y[rank::world]
    return DataLoader(map_dataset(cfg, x, y), batch_size=BATCH, sampler=EndlessSampler(len(x)),
                      drop_last=cfg["loader_option"] == "drop_last", **loader_options(cfg))


def second_data(cfg: dict[str, Any], rank: int, world: int) -> DataLoader:
    """A second training loader (composition): for zip, as many batches as the first; drawn from with next()
    and restarted when exhausted, a shorter one."""
    samples = SAMPLES if cfg["composition"] == "zip" else 24
    x, y = tensors(samples, seed=4321)
    x, y = x[rank::world], y[rank::world]
    batch = BATCH if cfg["composition"] == "zip" else 4
    return DataLoader(Noisy(x, y), batch_size=batch, shuffle=True, num_workers=cfg["workers"])


def training_data(cfg: dict[str, Any], rank: int, world: int) -> Any:
    """The loader the cell asks for, over this rank's share of the samples."""
    x, y = tensors()
    x, y = x[rank::world], y[rank::world]
    drop_last = cfg["loader_option"] == "drop_last"
    options = loader_options(cfg)
    kind = cfg["loader"]
    dataset = map_dataset(cfg, x, y)
    if kind == "shuffled":
        return DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=drop_last, **options)
    if kind == "generator":
        return DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=drop_last,
                          generator=torch.Generator().manual_seed(7), **options)
    if kind == "sampler":
        sampler = RandomSampler(range(len(x)), generator=torch.Generator().manual_seed(7))
        return DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=drop_last, **options)
    if kind == "batch_sampler":
        batches = BatchSampler(RandomSampler(range(len(x))), BATCH, drop_last=drop_last)
        return DataLoader(dataset, batch_sampler=batches, **options)
    if kind in ("iterable", "iterable_state"):
        stream = (StatefulStream if kind == "iterable_state" else Stream)(x, y)
        return DataLoader(stream, batch_size=BATCH, drop_last=drop_last, **options)
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=drop_last, **options)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))
    batches = [(x[order[i:i + BATCH]], y[order[i:i + BATCH]]) for i in range(0, len(x), BATCH)]
    return batches if kind == "python_list" else (b for b in batches)


def validation_data(cfg: dict[str, Any]) -> DataLoader:
    x, y = tensors(16, seed=99)
    return DataLoader(Noisy(x, y), batch_size=8, shuffle=True, num_workers=cfg["workers"])


# ---------------------------------------------------------------- model and loop

class SaveWatch:
    """A tracked helper (a step counter); with MATRIX_HOLD_SAVE it holds the signal's save for the test."""

    def __init__(self, job: jobwrap.Session) -> None:
        self.job, self.count = job, 0

    def state_dict(self) -> dict[str, int]:
        control = os.environ.get("MATRIX_HOLD_SAVE")
        if control and self.job.should_stop:
            marker = os.path.join(control, f"second-{self.job.step}")
            with open(os.path.join(control, f"saving-{self.job.step}"), "w") as f:
                f.write(str(os.getpid()))
            deadline = time.monotonic() + 30
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.01)
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = int(state["count"])


class Trainer:
    """One training step with the cell's optimizers, scheduler, scaler, accumulation and extras."""

    def __init__(self, cfg: dict[str, Any], model: nn.Module, job: jobwrap.Session) -> None:
        self.cfg, self.model, self.job = cfg, model, job
        params = list(model.parameters())
        if cfg["optimizers"] == 2:
            half = len(params) // 2
            self.optimizers = [torch.optim.Adam(params[:half], lr=1e-2),
                               torch.optim.SGD(params[half:], lr=0.05, momentum=0.9)]
        else:
            self.optimizers = [torch.optim.Adam(params, lr=1e-2)]
        if cfg["scheduler"] == "per_batch":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizers[0], max_lr=0.05, total_steps=40)
        else:
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizers[0], step_size=1, gamma=0.7)
        self.scaler = torch.amp.GradScaler("cpu") if cfg["scaler"] == "grad_scaler" else None

    def objects(self) -> dict[str, Any]:
        things: dict[str, Any] = {"model": self.model, "scheduler": self.scheduler}
        things.update({f"optimizer{i}": o for i, o in enumerate(self.optimizers)})
        if self.scaler is not None:
            things["scaler"] = self.scaler
        return things

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        loss = F.mse_loss(self.model(x), y) / self.cfg["accumulate"]
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if (step + 1) % self.cfg["accumulate"] == 0:
            for optimizer in self.optimizers:
                if self.scaler:
                    self.scaler.step(optimizer)
                else:
                    optimizer.step()
                optimizer.zero_grad()
            if self.scaler:
                self.scaler.update()
            if self.cfg["scheduler"] == "per_batch":
                self.scheduler.step()
        return loss.item()

    def end_epoch(self) -> None:
        if self.cfg["scheduler"] == "epoch":
            self.scheduler.step()

    def note(self, loss: float) -> None:
        """The cell's extras, updated every step the way scripts keep their bookkeeping."""
        job = self.job
        if self.cfg["extras"] == "allowed":
            job["best"] = min(job["best"], loss)
            job["seen"] = job["seen"] + 1
            job["tag"] = f"step{job.step}"
            job["history"] = (job["history"] + [loss])[-3:]
            job["stats"] = {"sum": job["stats"]["sum"] + loss, "last": loss}
            job["ema"] = 0.9 * job["ema"] + 0.1 * loss
            job["improved"] = loss <= job["best"]
            job["np_scalar"] = numpy.float64(loss)
        elif self.cfg["extras"] == "set_only":
            job["seen"] = job["seen"] + 1


def allowed_extras() -> dict[str, Any]:
    return {"best": float("inf"), "seen": 0, "tag": "", "history": [], "stats": {"sum": 0.0, "last": 0.0},
            "ema": torch.zeros(1), "improved": False, "np_scalar": 0.0}


def validate(model: nn.Module, data: Any, job: jobwrap.Session, cfg: dict[str, Any]) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in (job.loader(data) if cfg["validation"] == "wrapped" else data):
            total += F.mse_loss(model(x), y).item()
    model.train()
    return total


def start_ranks(cfg: dict[str, Any]) -> tuple[int, int]:
    if cfg["ranks"] == 1:
        return 0, 1
    import torch.distributed as dist

    os.environ.setdefault("RANK", os.environ.get("SLURM_PROCID", "0"))
    os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> None:
    cfg, loss_log = json.loads(sys.argv[1]), sys.argv[2]
    if cfg["framework"] != "loop":
        import train_frameworks

        train_frameworks.main(cfg, loss_log)
        return
    rank, world = seed(cfg)
    with jobwrap.Session() as job:
        train(job, cfg, loss_log, rank, world)


def seed(cfg: dict[str, Any]) -> tuple[int, int]:
    """The ranks, and every stream seeded as the script's first lines do (before track(), which restores them)."""
    rank, world = start_ranks(cfg)
    random.seed(rank)
    numpy.random.seed(rank)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return rank, world


def submitit_train(job: jobwrap.Session, cfg: dict[str, Any], loss_log: str) -> int:
    """The same training as a submitit job's function (``jobwrap.submitit.Preemptible`` passes the session);
    the final step, as the job's result."""
    rank, world = seed(cfg)
    train(job, cfg, loss_log, rank, world)
    return job.step


def train(job: jobwrap.Session, cfg: dict[str, Any], loss_log: str, rank: int, world: int) -> None:
    """The training loop of the matrix's loop cells, in ``job``."""
    norm = [nn.BatchNorm1d(16)] if cfg["norm"] == "batchnorm" else []
    model = nn.Sequential(nn.Linear(8, 16), *norm, nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    trainer = Trainer(cfg, model, job)
    data = training_data(cfg, rank, world)
    val = validation_data(cfg) if cfg["validation"] != "none" else None
    things = {**trainer.objects(), "watch": SaveWatch(job)}
    if cfg["loader"] == "iterable_state":
        things["stream"] = data.dataset
    if cfg["extras"] == "allowed":
        things.update(allowed_extras())
    job.track(**things)
    if cfg["extras"] == "numpy_array":
        job["confusion"] = numpy.zeros((2, 2))
    elif cfg["extras"] == "set_only":
        job["seen"] = 0  # set, never tracked: the way a script starts its bookkeeping
    log = open(f"{loss_log}.r{rank}", "a")

    def body(x: torch.Tensor, y: torch.Tensor, index: int | None = None) -> None:
        """One step; ``index``: the batch index that keys the accumulation (accumulate_by="enumerate",
        "loader_enumerate")."""
        loss = trainer.step(x, y, job.step if index is None else index)
        things["watch"].count += 1
        log.write(f"{job.step}\t{job.epoch}\t{loss!r}\n")
        log.flush()
        trainer.note(loss)
        if val is not None and job.step % VALIDATE_EVERY == VALIDATE_EVERY - 1:
            score = validate(model, val, job, cfg)
            if cfg["extras"] == "allowed":
                job["stats"] = {**job["stats"], "val": score}
        if cfg["save"] == "in_body" and job.step % SAVE_EVERY == SAVE_EVERY - 1:
            job.save()

    if cfg["loop"] == "step_done":
        hand_written_loop(job, trainer, data, body, cfg)
    elif cfg["loop"] in ("steps", "endless", "while_next"):
        STEP_LOOPS[cfg["loop"]](job, trainer, body, cfg, rank, world)
    else:
        second = second_data(cfg, rank, world) if cfg["composition"] != "single" else None
        for epoch in job.epochs(EPOCHS):
            if hasattr(getattr(data, "dataset", None), "set_epoch"):
                data.dataset.set_epoch(epoch)
            if cfg["composition"] == "zip":
                for (x, y), (x2, y2) in zip(job.loader(data), job.loader(second)):
                    body(torch.cat([x, x2]), torch.cat([y, y2]))
            elif cfg["composition"] == "aux_unwrapped":
                aux = iter(second)
                for x, y in job.loader(data):
                    try:
                        x2, y2 = next(aux)
                    except StopIteration:
                        aux = iter(second)
                        x2, y2 = next(aux)
                    body(torch.cat([x, x2]), torch.cat([y, y2]))
            elif cfg["accumulate_by"] == "enumerate":
                for i, (x, y) in enumerate(job.loader(data)):
                    body(x, y, i)
            elif cfg["accumulate_by"] == "loader_enumerate":
                for i, (x, y) in job.loader(data).enumerate():
                    body(x, y, i)
            else:
                for x, y in job.loader(data):
                    body(x, y)
            trainer.end_epoch()
            if cfg["save"] == "epoch_end":
                job.save()
    log.close()


def indexed_batch(dataset: Dataset, step: int, per_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` for loops that index their data: epoch by epoch, a permutation seeded by the epoch."""
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(100 + epoch))
    batch = [dataset[int(i)] for i in order[index * BATCH:(index + 1) * BATCH]]
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def hand_written_loop(job: jobwrap.Session, trainer: Trainer, data: DataLoader, body: Any,
                      cfg: dict[str, Any]) -> None:
    """No job.epochs()/job.loader(): the script indexes its data by job.step and calls step_done()."""
    dataset = data.dataset
    per_epoch = len(dataset) // BATCH
    while job.step < EPOCHS * per_epoch:
        index = job.step % per_epoch
        body(*indexed_batch(dataset, job.step, per_epoch))
        if index == per_epoch - 1:
            trainer.end_epoch()
        job.step_done()
        if index == per_epoch - 1 and cfg["save"] == "epoch_end":
            job.save()
    job.save()


def end_of_pass(step: int, trainer: Trainer, job: jobwrap.Session, cfg: dict[str, Any]) -> None:
    """The step loops' "epoch": every SAMPLES // BATCH steps, the scheduler's step and the epoch-end save."""
    if (step + 1) % (SAMPLES // BATCH) == 0:
        trainer.end_epoch()
        if cfg["save"] == "epoch_end":
            job.save()


def steps_loop(job: jobwrap.Session, trainer: Trainer, body: Any, cfg: dict[str, Any], rank: int,
               world: int) -> None:
    """``for step in job.steps(n)``, the data indexed by the step."""
    x, y = tensors()
    dataset = map_dataset(cfg, x[rank::world], y[rank::world])
    per_epoch = len(dataset) // BATCH
    for step in job.steps(EPOCHS * (SAMPLES // BATCH)):
        body(*indexed_batch(dataset, step, per_epoch))
        end_of_pass(step, trainer, job, cfg)


def endless_loop(job: jobwrap.Session, trainer: Trainer, body: Any, cfg: dict[str, Any], rank: int,
                 world: int) -> None:
    """An endless loader wrapped by job.loader(), drawn with next() under job.steps(max_iters)."""
    it = iter(job.loader(endless_data(cfg, rank, world)))
    for step in job.steps(EPOCHS * (SAMPLES // BATCH)):
        x, y = next(it)
        body(x, y)
        end_of_pass(step, trainer, job, cfg)


def while_next_loop(job: jobwrap.Session, trainer: Trainer, body: Any, cfg: dict[str, Any], rank: int,
                    world: int) -> None:
    """nanoGPT's shape: ``while True``, the next batch from an endless loader's iterator, step_done(), a break."""
    it = iter(endless_data(cfg, rank, world))
    max_iters = EPOCHS * (SAMPLES // BATCH)
    while True:
        x, y = next(it)
        body(x, y)
        step = job.step
        if (step + 1) % (SAMPLES // BATCH) == 0:
            trainer.end_epoch()
        job.step_done()
        if (step + 1) % (SAMPLES // BATCH) == 0 and cfg["save"] == "epoch_end":
            job.save()
        if job.step >= max_iters:
            break
    job.save()


STEP_LOOPS = {"steps": steps_loop, "endless": endless_loop, "while_next": while_next_loop}


if __name__ == "__main__":
    main()
