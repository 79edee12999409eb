"""An LSTM language model in the shape of pytorch/examples' word_language_model, adopted in a few lines.

The hidden state is carried from batch to batch within an epoch (``repackage_hidden``, reset at each
epoch's start). Adopted naively (the default), it is not tracked: a resume mid-epoch starts it from
zeros, and the run diverges from the first step after the resume. ``--track-hidden`` is the right
adoption: the hidden state is an extra, reset where the uninterrupted run resets it.
``--report-loss`` keeps each step's loss in an extra (``job["loss"]``), where jobwrap simulate reads it.
"""
from __future__ import annotations

import argparse
import random

import numpy
import torch
import torch.nn.functional as F
from torch import nn

import jobwrap

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--track-hidden", action="store_true")
parser.add_argument("--report-loss", action="store_true")
args = parser.parse_args()

random.seed(0)
numpy.random.seed(0)
torch.manual_seed(0)
VOCAB, BATCH, BPTT, HIDDEN = 20, 4, 5, 16
data = torch.randint(VOCAB, (41, BATCH))  # batchify()'s layout: (time, batch)


class RNNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, HIDDEN)
        self.decoder = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x, hidden):
        output, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(output), hidden

    def init_hidden(self):
        return (torch.zeros(1, BATCH, HIDDEN), torch.zeros(1, BATCH, HIDDEN))


def repackage_hidden(h):
    return tuple(v.detach() for v in h)


model = RNNModel()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
with jobwrap.Session() as job:
    job.track(model=model, optimizer=optimizer)
    if args.track_hidden:
        job.track(hidden=model.init_hidden())
    if args.report_loss:
        job.track(loss=0.0)
    for epoch in job.epochs(args.epochs):
        hidden = model.init_hidden()
        if args.track_hidden:
            if job.position == 0:  # the epoch's start, where the uninterrupted run resets it
                job["hidden"] = hidden
            hidden = job["hidden"]
        for i in job.loader(range(0, data.size(0) - 1, BPTT)):
            x, y = data[i:i + BPTT], data[i + 1:i + 1 + BPTT]
            hidden = repackage_hidden(hidden)
            optimizer.zero_grad()
            output, hidden = model(x, hidden)
            loss = F.cross_entropy(output.reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()
            if args.track_hidden:
                job["hidden"] = repackage_hidden(hidden)
            if args.report_loss:
                job["loss"] = loss.item()
