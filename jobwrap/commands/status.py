"""``jobwrap status DIR [--json]``: a run's life from its event log, in a few lines and one table."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from jobwrap.deadline import checkpoint_bytes
from jobwrap.events import read_events
from jobwrap.format import human_age, human_duration, human_size, table
from jobwrap.history import History, Launch, summarize
from jobwrap.store import CheckpointStore

NAME = "status"

_EXAMPLES = """\
examples:
  jobwrap status checkpoints/
  jobwrap status /scratch/$USER/run1 --json | jq .steps_lost
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="summarize a run: restarts, preemptions, steps lost, time saving and loading",
        description="Read the run's event log (DIR/events.jsonl) and print how it went: each launch, "
                    "the signals that stopped it, the work redone after a resume (steps lost; 0 is "
                    "right), the time spent saving and loading, the last checkpoint and how each launch ended.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", help="the run's checkpoint directory (JOBWRAP_DIR)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(func=main)


def newest_committed(directory: str) -> dict[str, Any] | None:
    """The newest committed checkpoint on disk (manifest only, not verified: `jobwrap ls` verifies)."""
    committed = CheckpointStore(directory).committed()
    if not committed:
        return None
    newest = committed[0]
    return {"step": newest.step, "epoch": newest.epoch, "bytes": checkpoint_bytes(newest.manifest), "path": newest.path,
            "reason": newest.manifest.get("reason"), "time": newest.manifest.get("wall_time")}


def _ended(launch: Launch) -> str:
    if launch.outcome == "unknown":
        return "no exit recorded (killed, or running)"
    if launch.outcome == "finished":
        return "finished"
    if launch.outcome == "requeued":
        return f"requeued (exit {launch.exit_code})"
    if launch.outcome == "stopped":
        return f"stopped, exit {launch.exit_code}: {_short(launch.reason)}"
    return f"failed, exit {launch.exit_code}: {_short(launch.reason)}"


def _short(reason: str | None, limit: int = 70) -> str:
    """The reason without its explanation in parentheses, cut to fit a table cell."""
    text = (reason or "").split(" (")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _signals(launch: Launch) -> str:
    return ", ".join(f"{name.removeprefix('SIG')}@{step}" for name, step in launch.signals)


def _saving(history: History) -> str:
    if not history.saves and not history.failed_saves:
        return "no saves"
    longest = max((launch.longest_save for launch in history.launches), default=0.0)
    text = (f"{history.saves} save(s), {human_size(history.save_bytes)}, {human_duration(history.save_seconds)} "
            f"in all, longest {human_duration(longest)}")
    background = sum(launch.background_saves for launch in history.launches)
    if background:
        text += (f"; {background} written in the background, training paused "
                 f"{human_duration(history.pause_seconds)} in all")
    if history.failed_saves:
        text += f"; {history.failed_saves} FAILED (see the log)"
    return text


def _loading(history: History) -> str:
    if not history.loads:
        return "no loads"
    timed = [l.load_seconds for l in history.launches if l.resumed_from and l.load_seconds is not None]
    if not timed:
        return f"{history.loads} load(s), time not recorded"
    return (f"{history.loads} load(s), {human_duration(sum(timed))} in all, "
            f"longest {human_duration(max(timed))} (verify + torch.load)")


def render(history: History, directory: str, checkpoint: dict[str, Any] | None, now: float) -> str:
    """The human-readable summary (pure: the clock is passed in)."""
    if not history.launches:
        return f"no run history in {directory} (no events.jsonl): nothing has run there yet"
    last = history.launches[-1]
    runs = ", ".join(history.run_ids) or "?"
    head = f"run {runs} in {directory}: {history.state} at step {last.reached_step}"
    if last.ended:
        head += f", last event {human_age(now - last.ended)}"
    signals = ", ".join(f"{name.removeprefix('SIG')} x{n}" for name, n in history.signal_counts.items())
    lost = f"{history.steps_lost}"
    if history.unrecorded_ends:
        lost += (f" recorded; {history.unrecorded_ends} launch(es) ended without a record (SIGKILL?), "
                 f"their steps after the last checkpoint are not counted")
    elif history.steps_lost == 0 and history.restarts:
        lost += " (every launch resumed where the previous one stopped)"
    fresh = sum(1 for launch in history.launches if not launch.resumed_from)
    facts = [
        ("launches", f"{len(history.launches)} ({fresh} fresh, {history.loads} resumed)"),
        ("preemptions", f"{history.preemptions}" + (f" ({signals})" if signals else "")
         + f", {history.requeues} requeue(s)"),
        ("steps lost", lost),
        ("saving", _saving(history)),
        ("loading", _loading(history)),
        ("wall time", f"{human_duration(history.wall_seconds)} from the first start to the last event"),
    ]
    if checkpoint is not None:
        age = f", {human_age(now - checkpoint['time'])}" if checkpoint.get("time") else ""
        facts.append(("last checkpoint", f"step {checkpoint['step']} (epoch {checkpoint['epoch']}), "
                                         f"{human_size(checkpoint['bytes'])}{age}, "
                                         f"{os.path.basename(checkpoint['path'])}"
                                         + (f" ({checkpoint['reason']})" if checkpoint.get("reason") else "")))
    else:
        facts.append(("last checkpoint", "none committed: a resume would start fresh"))
    width = max(len(k) for k, _ in facts)
    lines = [head, ""] + [f"  {k.ljust(width)}  {v}" for k, v in facts] + [""]
    lines.append(table(
        ["#", "restart", "started", "from", "reached", "signals", "saves", "saving", "loading", "lost", "ended"],
        [[launch.number, "" if launch.restart is None else launch.restart, human_age(now - launch.started),
          launch.start_step if launch.resumed_from else "fresh", launch.reached_step, _signals(launch),
          launch.saves, human_duration(launch.save_seconds) if launch.saves else "",
          human_duration(launch.load_seconds), launch.steps_lost or "",
          _ended(launch)]
         for launch in history.launches]))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.directory):
        print(f"jobwrap status: {args.directory} is not a directory; pass the run's checkpoint directory")
        return 2
    history = summarize(read_events(args.directory))
    checkpoint = newest_committed(args.directory)
    if args.json:
        record = history.as_dict()
        record["directory"] = os.path.abspath(args.directory)
        record["last_checkpoint"] = checkpoint
        print(json.dumps(record, indent=1))
        return 0
    print(render(history, args.directory, checkpoint, time.time()))
    return 0
