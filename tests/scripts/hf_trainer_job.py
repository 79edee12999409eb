"""A tiny GPT-2 trained with the Hugging Face Trainer under jobwrap (tests/test_transformers.py).

Every logged step (loss, grad norm, learning rate, eval loss) is appended to --log as one JSON
line; at the end the model, optimizer and scheduler states go to --final, for a bit-exact
comparison of a preempted run with an uninterrupted one. No network: the model is built from
a config and the data are random token ids.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import jobwrap
import jobwrap.transformers


class TokenIds(torch.utils.data.Dataset):
    """Random token ids, the same for every run (a fixed generator)."""

    def __init__(self, samples: int, length: int = 16, vocab: int = 64, seed: int = 1234) -> None:
        self.ids = torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LogLines(TrainerCallback):
    """Each log of a step or an evaluation as a JSON line, without its timings (different in every run).
    The end-of-training summary is left out: it covers only the steps of the last launch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_runtime" in logs:
            return
        kept = {k: v for k, v in logs.items() if not k.endswith(("runtime", "per_second"))}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, **kept}, sort_keys=True) + "\n")


class Slow(TrainerCallback):
    """Sleeps before each step, so that a job on a cluster can be signalled mid-run; nothing else changes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="the Trainer's output_dir")
    parser.add_argument("--log", required=True)
    parser.add_argument("--final", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=0, help="the Trainer's own periodic saves (0: none)")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step (slow it down)")
    parser.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (0: never)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: threads only contend

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)  # dropout: the RNG streams matter
    training = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=4,
        gradient_accumulation_steps=args.accumulate, learning_rate=1e-3, lr_scheduler_type="linear",
        warmup_steps=2, logging_steps=1, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps or None, per_device_eval_batch_size=4, seed=7, report_to="none",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    with jobwrap.Session() as job:
        torch.manual_seed(7)
        model = GPT2LMHeadModel(config)
        trainer = Trainer(model=model, args=training, train_dataset=TokenIds(args.samples),
                          eval_dataset=TokenIds(8, seed=99) if args.eval_steps else None,
                          callbacks=[LogLines(args.log), Slow(args.step_seconds)])
        trainer.train(resume_from_checkpoint=jobwrap.transformers.attach(trainer, job))
        torch.save({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                    "scheduler": trainer.lr_scheduler.state_dict(), "global_step": trainer.state.global_step,
                    "torch_rng": torch.get_rng_state()}, args.final)
    print("finished at step", trainer.state.global_step, "in", os.getcwd())


if __name__ == "__main__":
    main()
