"""``jobwrap simulate [options] -- CMD ARGS...``: preempt your own training command and check the resume.

Runs the command twice under ``jobwrap run``, in ``DIR/plain`` without
interruption and in ``DIR/preempted`` with a real signal at each chosen step,
relaunching it the way Slurm would; then checks that every preemption
happened, that no step was trained twice, and that the final checkpoints are
identical. Exit status 0 when every check passes, 1 when one fails, 2 for a
usage error.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from jobwrap.config import ENV_VARS, load_run_settings, parse_signal
from jobwrap.errors import ConfigError
from jobwrap.events import read_events
from jobwrap.format import table
from jobwrap.history import summarize
from jobwrap.store import CheckpointStore

NAME = "simulate"
MARKER = "simulate.json"

_EXAMPLES = """\
examples:
  jobwrap simulate --dir /tmp/sim --at 5,17 -- python train.py --epochs 2
  jobwrap simulate --dir /tmp/sim --random 3 --seed 7 --signal TERM -- python train.py

The command must take its checkpoint directory from JOBWRAP_DIR (give
jobwrap.Session / jobwrap.preemptible no directory, or read the variable):
simulate points it at DIR/plain, then at DIR/preempted.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="preempt your training command with real signals, relaunch it, compare with a plain run",
        description="Run CMD once uninterrupted and once preempted with a real signal at chosen or random "
                    "steps (relaunched like a requeued job); report whether it resumed without losing "
                    "steps and whether its final checkpoint equals the uninterrupted run's. Exit 0 or 1.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", required=True,
                        help="work directory for the two runs (DIR/plain, DIR/preempted); new, empty, or "
                             "an earlier simulate's, which is replaced")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--at", help="comma-separated steps at which to send the signal, e.g. 5,17")
    where.add_argument("--random", type=int, metavar="N",
                       help="send the signal at N random steps of the run (default: 3 random steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    parser.add_argument("--signal", help="the signal to send (default: the first of JOBWRAP_REQUEUE_SIGNALS, "
                                         "USR1); it must be one jobwrap traps")
    parser.add_argument("--timeout", type=float, default=1800, metavar="SECONDS",
                        help="limit for each launch of the command (default 1800)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    parser.set_defaults(func=main)


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.replace(" ", ",").split(",") if part})
    except ValueError:
        raise ConfigError(f"--at {text!r}: use comma-separated step numbers, e.g. --at 5,17") from None
    if not steps or steps[0] < 0:
        raise ConfigError(f"--at {text!r}: use step numbers of 0 or more, e.g. --at 5,17")
    return steps


def random_steps(count: int, total: int, seed: int) -> list[int]:
    """``count`` distinct steps in ``[0, total)`` from ``seed`` (fewer when the run is shorter)."""
    return sorted(random.Random(seed).sample(range(total), min(count, total)))


def _prepare(work: Path) -> None:
    """Make ``work`` ready: new or empty, or an earlier simulate's whose two runs are replaced."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise ConfigError(f"--dir {work} is not empty and was not made by jobwrap simulate; "
                              f"choose a new directory")
        for name in ("plain", "preempted", "plain.log", "preempted.log", MARKER):
            path = work / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("{}\n")


def _write_log(path: Path, runs: Sequence[Any]) -> None:
    with open(path, "w") as f:
        for run in runs:
            f.write(run.stdout)
            f.write(run.stderr)


def _fail(message: str, run: Any = None) -> None:
    print(f"jobwrap simulate: {message}", file=sys.stderr)
    if run is not None and run.stderr.strip():
        print("--- its last output ---\n" + "\n".join(run.stderr.strip().splitlines()[-15:]), file=sys.stderr)


def preempt(command: Sequence[str], directory: Path, steps: Sequence[int], sig: signal.Signals,
            timeout: float) -> tuple[list[Any], list[int]]:
    """Run under ``jobwrap run``, signalled at ``steps``; relaunch after an exit signal's stop, as Slurm would.

    A requeue signal's relaunch happens inside ``jobwrap run``; an exit signal
    (TERM) ends it, and the job comes back only because the scheduler requeues
    it, so that is done here. Returns every invocation and the steps signalled.
    """
    from jobwrap.testing import run_preempted

    runs: list[Any] = []
    signalled: list[int] = []
    remaining = list(steps)
    for restart in range(len(steps) + 1):
        run = run_preempted(command, directory, preempt_at=remaining, signal_=sig, timeout=timeout,
                            env={"JOBWRAP_RESTART_COUNT": str(restart)} if restart else None)
        runs.append(run)
        signalled += run.signalled_at
        remaining = [s for s in remaining if s not in run.signalled_at]
        events = read_events(str(directory))
        stopped = bool(events) and events[-1].get("event") == "exit" and any(
            e.get("event") == "stop" for e in events[-3:])
        if run.returncode != 128 + sig or not run.signalled_at or not stopped:
            break
    return runs, signalled


def check(plain: Path, cut: Path, steps: Sequence[int], signalled: Sequence[int],
          returncode: int) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for each thing a good resume guarantees."""
    from jobwrap.testing import assert_same_run

    history = summarize(read_events(str(cut)))
    missing = [s for s in steps if s not in signalled]
    fresh_restarts = [launch.number for launch in history.launches[1:] if not launch.resumed_from]
    results = [
        ("finished", returncode == 0, f"the preempted run exited with {returncode}"),
        ("preempted at every step", not missing,
         f"signalled at {list(signalled)}" + (f"; never reached {missing}" if missing else "")),
        ("resumed each time", len(history.launches) == len(signalled) + 1 and not fresh_restarts,
         f"{len(history.launches)} launch(es)"
         + (f"; launch(es) {fresh_restarts} started fresh" if fresh_restarts else "")),
        ("no steps lost", history.steps_lost == 0 and not history.unrecorded_ends,
         f"{history.steps_lost} step(s) trained twice"
         + (f", {history.unrecorded_ends} launch(es) ended without a record" if history.unrecorded_ends else "")),
    ]
    try:
        assert_same_run(plain, cut)
        results.append(("same final checkpoint", True, "bit for bit equal to the uninterrupted run"))
    except AssertionError as exc:
        results.append(("same final checkpoint", False, str(exc).splitlines()[0][:200]))
    return results


def main(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise ConfigError("no command given; use: jobwrap simulate --dir DIR -- python train.py")
        settings = load_run_settings()
        sig = parse_signal(args.signal) if args.signal else settings.requeue_signals[0]
        if sig not in settings.requeue_signals + settings.exit_signals:
            trapped = ", ".join(s.name for s in settings.requeue_signals + settings.exit_signals)
            raise ConfigError(f"{sig.name} is not a signal jobwrap traps here ({trapped}); set "
                              f"{ENV_VARS['requeue_signals']}={sig.name.removeprefix('SIG')} (checkpoint, requeue) "
                              f"or {ENV_VARS['exit_signals']} (checkpoint, exit) first")
        at = parse_steps(args.at) if args.at else None
        if args.random is not None and args.random < 1:
            raise ConfigError(f"--random {args.random}: use 1 or more")
        work = Path(args.dir).resolve()
        _prepare(work)
    except ConfigError as exc:
        print(f"jobwrap simulate: {exc}", file=sys.stderr)
        return 2
    from jobwrap.testing import run_preempted

    plain_dir, cut_dir = work / "plain", work / "preempted"
    print(f"1/2 uninterrupted run in {plain_dir}", flush=True)
    plain = run_preempted(command, plain_dir, timeout=args.timeout)
    _write_log(work / "plain.log", [plain])
    if plain.returncode != 0:
        _fail(f"the uninterrupted run failed with exit {plain.returncode} (log: {work / 'plain.log'})", plain)
        return 1
    committed = CheckpointStore(str(plain_dir)).committed()
    if not read_events(str(plain_dir)):
        _fail(f"the command wrote nothing to {plain_dir}: it must take its checkpoint directory from "
              f"{ENV_VARS['directory']} (a directory passed to Session/preemptible beats the variable)", plain)
        return 1
    if not committed:
        _fail("the uninterrupted run committed no checkpoint, so there is no final state to compare: "
              "end training with job.save() (job.epochs() does it for you)", plain)
        return 1
    total = committed[0].step
    steps = at if at is not None else random_steps(args.random or 3, total, args.seed)
    beyond = [s for s in steps if s >= total]
    if beyond:
        _fail(f"steps {beyond} are not before the run's last step ({total}); choose steps below {total}")
        return 2
    print(f"2/2 the same command, {sig.name} at steps {', '.join(map(str, steps))}, in {cut_dir}", flush=True)
    runs, signalled = preempt(command, cut_dir, steps, sig, args.timeout)
    _write_log(work / "preempted.log", runs)
    results = check(plain_dir, cut_dir, steps, signalled, runs[-1].returncode)
    passed = all(ok for _, ok, _ in results)
    print()
    print(table(["check", "", "detail"], [[name, "ok" if ok else "FAIL", detail] for name, ok, detail in results]))
    print()
    record = {"command": list(command), "signal": sig.name, "steps": steps, "signalled": signalled,
              "total_steps": total, "passed": passed,
              "checks": [{"check": n, "passed": ok, "detail": d} for n, ok, d in results]}
    (work / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    if passed:
        print(f"PASS: preempted {len(signalled)} time(s) with {sig.name}, resumed without losing a step, "
              f"final checkpoint identical (jobwrap status {cut_dir})")
        return 0
    if runs[-1].returncode != 0:
        _fail(f"the preempted run ended with exit {runs[-1].returncode} (log: {work / 'preempted.log'})", runs[-1])
    print(f"FAIL: see the checks above, {work / 'preempted.log'} and jobwrap status {cut_dir}")
    return 1
