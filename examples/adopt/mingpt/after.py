"""A minGPT-style trainer, shaped like karpathy/minGPT's mingpt/trainer.py and projects/chargpt, on random text.

A Trainer class whose run() draws batches with next() from an endless loader (a RandomSampler with
replacement and 10**10 samples), stops at max_iters, and calls the callbacks registered for
'on_batch_end'. The callback logs, samples from the model now and then and saves its weights. Small
enough to run in seconds on a CPU.
"""
import argparse
import random
import time
from collections import defaultdict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

import jobwrap


class Trainer:
    def __init__(self, config, model, train_dataset):
        self.config = config
        self.model = model
        self.optimizer = None
        self.train_dataset = train_dataset
        self.callbacks = defaultdict(list)
        self.device = "cpu"
        self.iter_num = 0
        self.iter_time = 0.0
        self.iter_dt = 0.0

    def add_callback(self, onevent, callback):
        self.callbacks[onevent].append(callback)

    def trigger_callbacks(self, onevent):
        for callback in self.callbacks.get(onevent, []):
            callback(self)

    def run(self):
        model, config = self.model, self.config
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95))
        train_loader = DataLoader(
            self.train_dataset,
            sampler=RandomSampler(self.train_dataset, replacement=True, num_samples=int(1e10)),
            shuffle=False,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
        )
        job = jobwrap.Session().start()  # where the optimizer is made: run() builds what a checkpoint holds
        job.track(model=model, optimizer=self.optimizer)
        train_loader = job.loader(train_loader)

        model.train()
        self.iter_num = 0
        self.iter_time = time.time()
        data_iter = iter(train_loader)
        for self.iter_num in job.steps(config.max_iters):  # from the saved step; ends at max_iters
            try:
                batch = next(data_iter)
            except StopIteration:
                data_iter = iter(train_loader)
                batch = next(data_iter)
            x, y = [t.to(self.device) for t in batch]

            logits, self.loss = model(x, y)
            model.zero_grad(set_to_none=True)
            self.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_norm_clip)
            self.optimizer.step()

            self.trigger_callbacks("on_batch_end")
            tnow = time.time()
            self.iter_dt = tnow - self.iter_time
            self.iter_time = tnow


class RandomText(Dataset):
    """Windows of a fixed random text; each is cut at a random offset, an augmentation drawn in the workers."""

    def __init__(self, vocab, block_size):
        self.text = torch.randint(0, vocab, (400,), generator=torch.Generator().manual_seed(3))
        self.block_size = block_size

    def __len__(self):
        return len(self.text) - 2 * self.block_size

    def __getitem__(self, idx):
        idx += int(torch.randint(0, self.block_size, ()))
        chunk = self.text[idx:idx + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class TinyLM(nn.Module):
    def __init__(self, vocab, n_embd=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(n_embd, vocab)

    def forward(self, idx, targets=None):
        logits = self.head(self.drop(self.wte(idx)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits[:, -1], dim=-1), 1)], dim=1)
        return idx


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main():
    parser = argparse.ArgumentParser(description="minGPT-style trainer (random text)")
    parser.add_argument("--max-iters", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3407)
    args = parser.parse_args()
    set_seed(args.seed)

    vocab, block_size = 20, 8
    model = TinyLM(vocab)
    config = argparse.Namespace(learning_rate=5e-3, batch_size=args.batch_size, num_workers=args.workers,
                                max_iters=args.max_iters, grad_norm_clip=1.0)
    trainer = Trainer(config, model, RandomText(vocab, block_size))

    def batch_end_callback(trainer):
        if trainer.iter_num % 4 == 0:
            print(f"iter_dt {trainer.iter_dt * 1000:.2f}ms; iter {trainer.iter_num}: train loss {trainer.loss.item():.5f}")
        if trainer.iter_num % 10 == 0:
            model.eval()
            completion = model.generate(torch.zeros(1, 1, dtype=torch.long), 8)  # samples: draws from torch's RNG
            print("sample:", completion[0].tolist())
            torch.save(model.state_dict(), "model.pt")
            model.train()

    trainer.add_callback("on_batch_end", batch_end_callback)
    trainer.run()


if __name__ == "__main__":
    main()
