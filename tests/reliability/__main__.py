"""The runner: ``python -m reliability [--quick] [--seed N] [--only SECTIONS] [--out FILE]`` from tests/."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

import torch

from . import badfiles, disk, hostile, kills, policy, scheduler, signals
from .internals import REPO
from .report import render
from .results import FULL, QUICK, Campaign

SECTIONS: dict[str, Callable[[Campaign], None]] = {
    "kills": kills.section,
    "disk": disk.section,
    "bad-files": badfiles.section,
    "hostile": hostile.section,
    "signals": signals.section,
    "scheduler": scheduler.section,
    "policy": policy.section,
}


def run(sections: list[str], *, quick: bool, seed: int, out: str | None) -> Campaign:
    """Run ``sections`` in a scratch folder (removed afterwards); write the report to ``out``."""
    workdir = tempfile.mkdtemp(prefix="jobwrap-reliability-")
    campaign = Campaign(seed, QUICK if quick else FULL, workdir)
    started = time.monotonic()
    torch.set_num_threads(1)
    try:
        for name in sections:
            SECTIONS[name](campaign)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - started
    if out:
        with open(out, "w") as f:
            f.write(render(campaign, seconds=seconds, quick=quick))
        print(f"wrote {out}")
    return campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/reliability",
                                     description="jobwrap's reliability and security campaign")
    parser.add_argument("--quick", action="store_true", help="a small version of every section (under a minute)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "reliability.md"),
                        help="where to write the report ('' for none)")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    campaign = run(sections, quick=args.quick, seed=args.seed, out=args.out or None)
    failures = campaign.failures + (campaign.kills.failures if campaign.kills else 0)
    print(f"{len(campaign.rows)} rows, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
