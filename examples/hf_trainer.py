"""A Hugging Face Trainer job made preemptible with jobwrap: two lines changed.

    pip install 'jobwrap[transformers]'
    jobwrap run --dir ckpt -- python examples/hf_trainer.py
    jobwrap simulate --dir /tmp/sim --at 5,12 -- python examples/hf_trainer.py

A tiny GPT-2 built from a config on random token ids (no download); put your own model,
data and TrainingArguments in their place. The checkpoint directory comes from
JOBWRAP_DIR (or `jobwrap run --dir`); the Trainer's own folders go to --out as usual.
"""
from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

import jobwrap
import jobwrap.transformers


class TokenIds(torch.utils.data.Dataset):
    def __init__(self, samples: int, length: int = 32, vocab: int = 128) -> None:
        self.ids = torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="hf-out", help="the Trainer's output_dir")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    training = TrainingArguments(output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=8,
                                 learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=10,
                                 save_total_limit=2, seed=0, report_to="none", disable_tqdm=True)
    with jobwrap.Session() as job:                                                       # changed line 1
        set_seed(0)  # the initial weights: two runs (plain and preempted) must start alike
        model = GPT2LMHeadModel(config)
        trainer = Trainer(model=model, args=training, train_dataset=TokenIds(64))
        trainer.train(resume_from_checkpoint=jobwrap.transformers.attach(trainer, job))  # changed line 2
        trainer.save_model(f"{args.out}/final")


if __name__ == "__main__":
    main()
