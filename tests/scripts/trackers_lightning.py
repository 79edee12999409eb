"""examples/lightning_train.py with Lightning's TensorBoard, W&B (offline) and MLflow (file store) loggers
all at once, as a user writes them: no jobwrap code for them (tests/test_trackers.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from lightning_train import Regression, data  # noqa: E402

from jobwrap.lightning import Preemptible  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--early", action="store_true", help="use the TensorBoard logger's experiment before fit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    out = Path(args.out)
    loggers = [TensorBoardLogger(save_dir=str(out), name="tb"),
               WandbLogger(project="jobwrap-test", save_dir=str(out), offline=True),
               MLFlowLogger(experiment_name="jobwrap-test", tracking_uri=(out / "mlruns").as_uri())]
    if args.early:
        loggers[0].experiment.add_text("note", "before the fit")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", callbacks=[Preemptible()], logger=loggers,
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Regression(), train_dataloaders=data(0))


if __name__ == "__main__":
    main()
