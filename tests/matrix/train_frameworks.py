"""The matrix's framework cells: a Lightning fit and a Hugging Face Trainer run, shaped by the cell's configuration.

train_matrix.py hands a cell with ``framework`` other than "loop" to :func:`main` here. Each
uses jobwrap the way docs/integrations.md tells a user to (``Preemptible()`` in the callbacks;
``attach(trainer, job)``) and writes "step<TAB>epoch<TAB>record" after every optimizer step to
LOSS_LOG.rN, the format the driver compares (step counted from 0, as in the loop cells).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"


def main(cfg: dict[str, Any], loss_log: str) -> None:
    torch.set_num_threads(1)
    if cfg["framework"] == "lightning":
        lightning_fit(cfg, loss_log)
    else:
        trainer_run(cfg, loss_log)


# ---------------------------------------------------------------- PyTorch Lightning

def lightning_fit(cfg: dict[str, Any], loss_log: str) -> None:
    """examples/lightning_train.py's module and data; a torch DataLoader when the cell's loader is not "stateful";
    the cell's fit option: validation twice an epoch (val_check_interval=0.5), or ModelCheckpoint every 3 steps."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(EXAMPLES))
    from lightning_train import Regression, data

    from jobwrap.lightning import Preemptible

    class LossLog(pl.Callback):
        """One line per optimizer step (a jobwrap step) with the loss of each of its micro-batches; before
        Preemptible in the callbacks, so the step is written before its boundary may stop the fit."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.stepped_at = 0

        def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
            self.stepped_at = trainer.global_step  # restored on a resume

        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
            self.losses.append(outputs["loss"].item())
            if trainer.global_step == self.stepped_at:
                return  # a micro-batch of gradient accumulation: no optimizer step yet
            self.stepped_at = trainer.global_step
            with open(f"{loss_log}.r{trainer.global_rank}", "a") as f:
                f.write(f"{trainer.global_step - 1}\t{trainer.current_epoch}\t{self.losses!r}\n")
            self.losses = []

    class Validated(Regression):
        """The example's module with a validation step, as a fit with val_check_interval has."""

        def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("val_loss", loss)
            return loss

    pl.seed_everything(0, workers=True)
    callbacks: list[Any] = [LossLog()]
    options: dict[str, Any] = dict(enable_checkpointing=False)
    fit: dict[str, Any] = {}
    if cfg["fit_option"] == "val_check_interval":
        options = dict(enable_checkpointing=False, val_check_interval=0.5)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(16, 4, generator=g)
        fit["val_dataloaders"] = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
    elif cfg["fit_option"] == "model_checkpoint":
        checkpoints = ModelCheckpoint(dirpath="lightning-ck", every_n_train_steps=3, save_top_k=-1)
        # Relative to the run's own folder, as ModelCheckpoint would not keep it (it stores the real path): the
        # reference and the preempted run live in different folders, where a user's relaunches share one, and
        # the paths it records (best_model_path) are compared.
        os.chdir(Path(os.environ["JOBWRAP_DIR"]).parent)
        checkpoints.dirpath = "lightning-ck"
        callbacks.append(checkpoints)
        options = dict(enable_checkpointing=True)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=cfg["ranks"],
                         strategy="ddp" if cfg["ranks"] > 1 else "auto",
                         callbacks=[*callbacks, Preemptible()], accumulate_grad_batches=cfg["accumulate"],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, **options)
    loader = data(cfg["workers"])
    if cfg["loader"] != "stateful":
        loader = DataLoader(loader.dataset, batch_size=8, shuffle=True, num_workers=cfg["workers"])
    trainer.fit(Validated() if "val_dataloaders" in fit else Regression(), train_dataloaders=loader, **fit)


# ---------------------------------------------------------------- Hugging Face Trainer

def trainer_run(cfg: dict[str, Any], loss_log: str) -> None:
    """A 2-layer GPT-2 with dropout on fixed random token ids (no network), 2 epochs of 8 batches."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(name, "1")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    import jobwrap
    import jobwrap.transformers

    class TokenIds(torch.utils.data.Dataset):
        def __init__(self, samples: int = 32, length: int = 16, vocab: int = 64) -> None:
            self.ids = torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(1234))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class LossLog(TrainerCallback):
        """Each step's log (loss, grad norm, learning rate) without its timings, which differ in every run."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not logs or "loss" not in logs:
                return
            kept = {k: v for k, v in logs.items() if not k.endswith(("runtime", "per_second"))}
            epoch = max(math.ceil(state.epoch) - 1, 0)
            with open(f"{loss_log}.r{args.process_index}", "a") as f:
                f.write(f"{state.global_step - 1}\t{epoch}\t{json.dumps(kept, sort_keys=True)}\n")

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    # output_dir relative to the run's own folder: the Trainer's pickled arguments are the same in every run.
    os.chdir(Path(os.environ["JOBWRAP_DIR"]).parent)
    training = TrainingArguments(
        output_dir="trainer-out", num_train_epochs=2, per_device_train_batch_size=4,
        gradient_accumulation_steps=cfg["accumulate"], learning_rate=1e-3, lr_scheduler_type="linear",
        warmup_steps=2, logging_steps=1, save_strategy="no", seed=7, report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=cfg["workers"])
    with jobwrap.Session() as job:
        torch.manual_seed(7)  # before the model: its initial weights are drawn here, before the Trainer seeds
        trainer = Trainer(model=GPT2LMHeadModel(config), args=training, train_dataset=TokenIds(),
                          callbacks=[LossLog()])
        trainer.train(resume_from_checkpoint=jobwrap.transformers.attach(trainer, job))
