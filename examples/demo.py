"""Preempt a training job with real signals, let `jobwrap run` relaunch it, and compare.

Run by ./scripts/demo. The last line says whether the preempted run is bit for
bit the uninterrupted one and how many steps were trained twice (lost work).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from jobwrap.testing import assert_same_run, run_preempted

HERE = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 16  # 512 samples / batch 32


def read_losses(path: Path) -> list[tuple[int, str]]:
    return [(int(step), loss) for step, loss in
            (line.split("\t") for line in path.read_text().splitlines())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-output", help="where the two runs write")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # Before the first epoch ends, mid-epoch, exactly at an epoch boundary, and late mid-epoch.
    preempt_at = [5, STEPS_PER_EPOCH + 7, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH + 11]
    train = [sys.executable, str(HERE / "train.py"), "--epochs", str(args.epochs), "--workers", "2"]

    print(f"1/2 uninterrupted run ({args.epochs} epochs, {args.epochs * STEPS_PER_EPOCH} steps)", flush=True)
    plain = run_preempted(train + ["--loss-log", str(out / "plain.loss")], out / "plain").check()
    print(f"2/2 the same run, sent SIGUSR1 at steps {preempt_at} through `jobwrap run`", flush=True)
    cut = run_preempted(train + ["--loss-log", str(out / "preempted.loss")], out / "preempted",
                        preempt_at=preempt_at).check()
    print(cut.stderr.strip())
    print()
    subprocess.run([sys.executable, "-m", "jobwrap", "ls", str(out / "preempted")], check=True)
    newest = sorted((out / "preempted").glob("step-*.pt"))[-1]
    state = torch.load(newest, weights_only=True)  # no jobwrap needed to read it
    print(f"\nplain torch.load({newest.name}, weights_only=True): keys {sorted(state)}, "
          f"epoch {state['epoch']}, step {state['step']}, best_loss {state['best_loss']:.4f}\n")

    plain_losses, cut_losses = read_losses(out / "plain.loss"), read_losses(out / "preempted.loss")
    lost = sum(n - 1 for n in Counter(step for step, _ in cut_losses).values() if n > 1)
    problems = []
    if dict(cut_losses) != dict(plain_losses):
        problems.append("per-step loss history differs")
    try:
        assert_same_run(plain.directory, cut.directory)
    except AssertionError as exc:
        problems.append(f"final state differs: {exc}")
    if cut.preemptions != len(preempt_at):
        problems.append(f"only {cut.preemptions} of {len(preempt_at)} preemptions happened")
    for problem in problems:
        print(f"problem: {problem}")
    verdict = "differs" if problems else "identical"
    print(f"resume check: {verdict} after {cut.preemptions} preemptions, {lost} steps lost")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
