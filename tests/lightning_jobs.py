"""examples/lightning_train.py with every optimizer step's loss recorded, for tests/test_lightning.py.

    jobwrap run --dir ck -- python tests/lightning_jobs.py --losses losses.txt [--devices 2] [--workers 2]

Rank 0 appends "global_step loss.hex()" after each step; a resumed run appends from its step on,
so a preempted run's file equals the uninterrupted run's exactly when no step was lost or repeated.
Other ranks write the same into LOSSES.rankN; at the fit's end each rank writes the SHA-256 of its
weights into LOSSES.weights.rankN.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from lightning_train import Regression, data  # noqa: E402

from jobwrap.lightning import Preemptible  # noqa: E402


class OwnSampler(DistributedSampler):
    """A user's DistributedSampler subclass: it saves no place in its order (refused under DDP)."""


class LossLog(pl.Callback):
    def __init__(self, path: str, step_seconds: float = 0.0) -> None:
        self.path = path
        self.step_seconds = step_seconds

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        # Tells tests which cluster environment Lightning detected (SLURMEnvironment in a Slurm job).
        environment = trainer._accelerator_connector.cluster_environment
        print(f"cluster environment: {type(environment).__name__}", file=sys.stderr)

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        path = self.path if trainer.is_global_zero else f"{self.path}.rank{trainer.global_rank}"
        with open(path, "a") as f:
            f.write(f"{trainer.global_step} {outputs['loss'].item().hex()}\n")
        time.sleep(self.step_seconds)  # a Slurm test's signal arrives mid-fit

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        digest = hashlib.sha256()
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        with open(f"{self.path}.weights.rank{trainer.global_rank}", "w") as f:
            f.write(digest.hexdigest())


class Augmented(Dataset):
    """The example's samples with noise from torch's and NumPy's global streams drawn in __getitem__ (in the workers)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        import numpy

        x, y = self.dataset[i]
        return x + 0.01 * (torch.rand(x.shape) + float(numpy.random.rand())), y


class DrawOnTrainStart(pl.Callback):
    """A user's hook that draws from torch's stream before the first step (resumed: not the uninterrupted draw)."""

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        self.noise = torch.rand(1)


class WithValidation(Regression):
    """The example's model with a validation step; rank 0 appends one line per validation batch to ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(f"{self.trainer.global_step} {loss.item().hex()}\n")


class Stream(IterableDataset):
    """The example's samples as a stream without a length (Lightning fetches such a loader a batch ahead)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Any:
        return iter(self.dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--losses", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--augment", action="store_true", help="noise drawn in __getitem__ (Augmented)")
    parser.add_argument("--plain-loader", action="store_true", help="a torch DataLoader (refused)")
    parser.add_argument("--own-sampler", action="store_true", help="an OwnSampler per rank (refused under DDP)")
    parser.add_argument("--draw-on-train-start", action="store_true", help="a callback draws in on_train_start")
    parser.add_argument("--validate", default=None, metavar="CKPT_DIR",
                        help="validate twice an epoch (LOSSES.val) and ModelCheckpoint every 3 steps into CKPT_DIR")
    parser.add_argument("--iterable", action="store_true", help="a loader over a Stream (refused)")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep after each batch")
    parser.add_argument("--root", default=None, help="the Trainer's default_root_dir")
    parser.add_argument("--ckpt-path", default=None, help="trainer.fit(ckpt_path=...) (refused on a resume)")
    parser.add_argument("--save-lightning", default=None, help="trainer.save_checkpoint() here after the fit")
    args = parser.parse_args()
    pl.seed_everything(0, workers=True)
    # LossLog before Preemptible: the step's loss is written before its boundary may stop the fit.
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto",
                         callbacks=[*([DrawOnTrainStart()] if args.draw_on_train_start else []),
                                    LossLog(args.losses, args.step_seconds), Preemptible(),
                                    *([ModelCheckpoint(dirpath=args.validate, every_n_train_steps=3, save_top_k=-1)]
                                      if args.validate else [])],
                         accumulate_grad_batches=args.accumulate,
                         logger=False, enable_checkpointing=bool(args.validate), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.root,
                         val_check_interval=0.5 if args.validate else None)
    loader = data(args.workers)
    if args.augment:
        loader = StatefulDataLoader(Augmented(loader.dataset), batch_size=8, shuffle=True, num_workers=args.workers)
    if args.plain_loader:
        loader = DataLoader(loader.dataset, batch_size=8, shuffle=True)
    if args.iterable:
        loader = StatefulDataLoader(Stream(loader.dataset), batch_size=8)
    if args.own_sampler:  # Lightning starts rank 1 with LOCAL_RANK set
        sampler = OwnSampler(loader.dataset, num_replicas=args.devices, rank=int(os.environ.get("LOCAL_RANK", "0")))
        loader = StatefulDataLoader(loader.dataset, batch_size=8, sampler=sampler)
    model, val = Regression(), None
    if args.validate:
        model = WithValidation(f"{args.losses}.val")
        val = DataLoader(data(0).dataset, batch_size=48)  # 2 batches; its iterator draws a base seed
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=val, ckpt_path=args.ckpt_path)
    if args.save_lightning:
        trainer.save_checkpoint(args.save_lightning)


if __name__ == "__main__":
    main()
