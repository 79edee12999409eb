"""An ImageNet-style training script, shaped like pytorch/examples' imagenet/main.py, on synthetic images.

Its own --resume/--start-epoch, save_checkpoint() with a best model, DataLoader workers with random
augmentation, train() and validate() called per epoch. Small enough to run in seconds on a CPU.
"""
import argparse
import os
import random
import shutil

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

parser = argparse.ArgumentParser(description="ImageNet-style training (synthetic)")
parser.add_argument("--epochs", default=3, type=int)
parser.add_argument("--start-epoch", default=0, type=int, help="manual epoch number (useful on restarts)")
parser.add_argument("-b", "--batch-size", default=16, type=int)
parser.add_argument("--lr", default=0.05, type=float)
parser.add_argument("-j", "--workers", default=2, type=int)
parser.add_argument("--print-freq", default=4, type=int)
parser.add_argument("--resume", default="", type=str, help="path to latest checkpoint (default: none)")
parser.add_argument("--seed", default=0, type=int)
best_acc1 = 0.0


class SyntheticImages(Dataset):
    """Fixed random images of 4 classes; the training set crops and flips at random, as transforms do."""

    def __init__(self, n: int, train: bool) -> None:
        g = torch.Generator().manual_seed(1 if train else 2)
        self.images = torch.randn(n, 3, 12, 12, generator=g)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.train = train

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.train:  # RandomResizedCrop and RandomHorizontalFlip, in the workers
            top, left = random.randint(0, 4), int(torch.randint(0, 5, ()))
            image = image[:, top:top + 8, left:left + 8]
            if torch.rand(()) < 0.5:
                image = image.flip(2)
        else:
            image = image[:, 2:10, 2:10]
        return image, self.labels[i]


def main():
    args = parser.parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    main_worker(args)


def main_worker(args):
    global best_acc1
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.1), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)

    if args.resume:
        if os.path.isfile(args.resume):
            print(f"=> loading checkpoint '{args.resume}'")
            checkpoint = torch.load(args.resume, weights_only=True)
            args.start_epoch = checkpoint["epoch"]
            best_acc1 = checkpoint["best_acc1"]
            model.load_state_dict(checkpoint["state_dict"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            print(f"=> loaded checkpoint '{args.resume}' (epoch {checkpoint['epoch']})")
        else:
            print(f"=> no checkpoint found at '{args.resume}'")

    train_loader = DataLoader(SyntheticImages(96, train=True), batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers)
    val_loader = DataLoader(SyntheticImages(32, train=False), batch_size=args.batch_size, shuffle=False,
                            num_workers=args.workers)

    for epoch in range(args.start_epoch, args.epochs):
        train(train_loader, model, criterion, optimizer, epoch, args)
        acc1 = validate(val_loader, model, criterion, args)
        scheduler.step()

        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)
        save_checkpoint({
            "epoch": epoch + 1,
            "state_dict": model.state_dict(),
            "best_acc1": best_acc1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }, is_best)


def train(train_loader, model, criterion, optimizer, epoch, args):
    model.train()
    for i, (images, target) in enumerate(train_loader):
        output = model(images)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i % args.print_freq == 0:
            print(f"Epoch: [{epoch}][{i}/{len(train_loader)}]\tLoss {loss.item():.4f}")


def validate(val_loader, model, criterion, args):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, target in val_loader:
            output = model(images)
            correct += int((output.argmax(1) == target).sum())
            total += len(target)
    acc1 = 100.0 * correct / total
    print(f" * Acc@1 {acc1:.3f}")
    return acc1


def save_checkpoint(state, is_best, filename="checkpoint.pth.tar"):
    torch.save(state, filename)
    if is_best:
        shutil.copyfile(filename, "model_best.pth.tar")


if __name__ == "__main__":
    main()
