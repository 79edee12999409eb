"""``jobwrap status DIR [--json] [--plot FILE.png]``: a run's life from its event log, in a few lines and one table."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from jobwrap._report import goodput, leadtime, relaunch
from jobwrap._report.history import checkpoint_summary, render, summarize
from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap.errors import ConfigError

NAME = "status"

_EXAMPLES = """\
examples:
  jobwrap status checkpoints/
  jobwrap status /scratch/$USER/run1 --json | jq .goodput
  jobwrap status checkpoints/ --plot timeline.png
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="summarize a run: goodput, restarts, preemptions, steps lost, saving, loading, relaunches",
        description="Read the run's event log (DIR/events.jsonl) and print how it went: the goodput (the share "
                    "of the allocated time that trained the model) and where the rest went, each launch, "
                    "the signals that stopped it, the work redone after a resume (steps lost; 0 is "
                    "right), the time spent saving and loading, the last checkpoint, how each launch ended and "
                    "what each relaunch cost from the signal to the first new step, part by part. "
                    "On Slurm, sacct (where available) gives the allocations and the queue waits.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", help="the run's checkpoint directory (JOBWRAP_DIR)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also draw the run's timeline to FILE.png (needs: pip install 'jobwrap[plot]')")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.directory):
        print(f"jobwrap status: {args.directory} is not a directory; pass the run's checkpoint directory")
        return 2
    events = read_events(args.directory)
    history = summarize(events)
    committed = CheckpointStore(args.directory).committed()
    checkpoint = checkpoint_summary(committed[0]) if committed else None
    slurm_jobs = [launch.job_id for launch in history.launches if launch.scheduler == "slurm" and launch.job_id]
    accounting, _ = goodput.read_accounting(slurm_jobs) if slurm_jobs else ({}, "")
    times = goodput.breakdown(history, accounting)
    advice = leadtime.advise(history, [launch.step_seconds for launch in times.launches])
    relaunches = relaunch.relaunches(events)
    if args.json:
        record = history.as_dict()
        record["directory"] = os.path.abspath(args.directory)
        record["last_checkpoint"] = checkpoint
        record["time"] = times.as_dict()
        record["goodput"] = record["time"]["goodput"]
        record["lead_time"] = dataclasses.asdict(advice) if advice else None
        record["relaunches"] = [r.as_dict() for r in relaunches]
        print(json.dumps(record, indent=1))
    else:
        top, more = goodput.facts(times)
        if advice is not None:
            more.append(("lead time", advice.text()))
        more += relaunch.facts(relaunches)
        print(render(history, args.directory, checkpoint, time.time(), top=top, more=more))
    if args.plot:
        from jobwrap._report.timeline import draw
        try:
            draw(times, events, args.plot, title=", ".join(history.run_ids))
        except ConfigError as exc:
            print(f"jobwrap status: {exc}", file=sys.stderr)
            return 2
    return 0
