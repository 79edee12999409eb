"""An LSTM language model, shaped like pytorch/examples' word_language_model/main.py, on a synthetic corpus.

Module level, manual batching (batchify, get_batch), a hidden state carried from batch to batch and
repackaged, plain SGD by hand with a global learning rate annealed when the validation loss stops
improving, the best model saved, Ctrl-C caught. Small enough to run in seconds on a CPU.
"""
import argparse
import math
import random
import time

import numpy as np
import torch
from torch import nn

import jobwrap

parser = argparse.ArgumentParser(description="LSTM language model (synthetic corpus)")
parser.add_argument("--lr", type=float, default=20)
parser.add_argument("--clip", type=float, default=0.25)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch_size", type=int, default=4)
parser.add_argument("--bptt", type=int, default=6)
parser.add_argument("--seed", type=int, default=1111)
parser.add_argument("--log-interval", type=int, default=4)
parser.add_argument("--save", type=str, default="model.pt")
args = parser.parse_args()

random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)

ntokens = 24
corpus = torch.randint(0, ntokens, (420,), generator=torch.Generator().manual_seed(7))


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data[:nbatch * bsz].view(bsz, -1).t().contiguous()


train_data = batchify(corpus[:300], args.batch_size)
val_data = batchify(corpus[300:], 2)


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, dropout=0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid = nhid

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(input)), hidden)
        return self.decoder(self.drop(output)).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(1, bsz, self.nhid), weight.new_zeros(1, bsz, self.nhid))


model = RNNModel(ntokens, 16, 16)
criterion = nn.NLLLoss()


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def get_batch(source, i):
    seq_len = min(args.bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].view(-1)


def evaluate(data_source):
    model.eval()
    total_loss = 0.
    hidden = model.init_hidden(data_source.size(1))
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, args.bptt):
            data, targets = get_batch(data_source, i)
            output, hidden = model(data, hidden)
            total_loss += len(data) * criterion(torch.log_softmax(output, 1), targets).item()
            hidden = repackage_hidden(hidden)
    return total_loss / (len(data_source) - 1)


def train():
    model.train()
    total_loss = 0.
    start_time = time.time()
    for batch, i in job.loader(range(0, train_data.size(0) - 1, args.bptt)).enumerate():
        hidden = job["hidden"] if batch > 0 else model.init_hidden(args.batch_size)  # reset at the epoch's start only
        data, targets = get_batch(train_data, i)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        job["hidden"] = hidden  # carried to the next batch: state at the step boundary
        loss = criterion(torch.log_softmax(output, 1), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        total_loss += loss.item()
        if batch % args.log_interval == 0 and batch > 0:
            cur_loss = total_loss / args.log_interval
            elapsed = time.time() - start_time
            print(f"| epoch {epoch:3d} | {batch:5d} batches | lr {lr:02.2f} | ms/batch "
                  f"{elapsed * 1000 / args.log_interval:5.2f} | loss {cur_loss:5.2f} | ppl {math.exp(cur_loss):8.2f}")
            total_loss = 0
            start_time = time.time()


job = jobwrap.Session().start()
job.track(model=model, lr=args.lr, best_val_loss=None, hidden=None)
lr, best_val_loss = job["lr"], job["best_val_loss"]  # globals the loop changes are state

try:
    for epoch in job.epochs(args.epochs + 1, start=1):
        epoch_start_time = time.time()
        train()
        val_loss = evaluate(val_data)
        print(f"| end of epoch {epoch:3d} | time: {time.time() - epoch_start_time:5.2f}s | "
              f"valid loss {val_loss:5.2f} | valid ppl {math.exp(val_loss):8.2f}")
        if not best_val_loss or val_loss < best_val_loss:
            torch.save(model.state_dict(), args.save)
            best_val_loss = job["best_val_loss"] = val_loss
        else:
            lr = job["lr"] = lr / 4.0  # anneal the learning rate when the validation loss did not improve
except KeyboardInterrupt:
    print("Exiting from training early")

model.load_state_dict(torch.load(args.save, weights_only=True))
print(f"| end of training | best valid loss {evaluate(val_data):5.2f}")
