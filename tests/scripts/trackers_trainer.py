"""The tiny GPT-2 of hf_trainer_job.py trained by the Hugging Face Trainer with report_to= TensorBoard, W&B
(offline) and MLflow (file store) at once, as a user writes it: no jobwrap code for them beyond attach()
(tests/test_trackers.py)."""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_trainer_job import TokenIds  # noqa: E402

import jobwrap  # noqa: E402
import jobwrap.transformers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="the Trainer's output_dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    training = TrainingArguments(
        output_dir=args.out, num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="no", seed=7,
        report_to=["tensorboard", "wandb", "mlflow"], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    with jobwrap.Session() as job:
        torch.manual_seed(7)
        trainer = Trainer(model=GPT2LMHeadModel(config), args=training, train_dataset=TokenIds(32))
        trainer.train(resume_from_checkpoint=jobwrap.transformers.attach(trainer, job))


if __name__ == "__main__":
    main()
