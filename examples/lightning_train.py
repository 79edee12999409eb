"""A small PyTorch Lightning fit made preemptible by jobwrap (CPU; one process or DDP with 2 ranks).

    jobwrap run --dir ck -- python examples/lightning_train.py
    jobwrap simulate --at 5 -- python examples/lightning_train.py
    python examples/lightning_train.py --devices 2      # DDP on CPU (gloo), Lightning starts rank 1

The lines jobwrap adds: the import, ``callbacks=[Preemptible()]``, and a
StatefulDataLoader in place of DataLoader (Lightning needs it to resume mid-epoch).
Every step's loss goes into ``losses.txt`` in the checkpoint directory's parent,
one line per step, rewritten by a resumed run from its step on.
"""
from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from jobwrap.lightning import Preemptible


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def data(workers: int) -> StatefulDataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(96, 1, generator=g)
    return StatefulDataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", callbacks=[Preemptible()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Regression(), train_dataloaders=data(args.workers))


if __name__ == "__main__":
    main()
