"""``jobwrap simulate [options] -- CMD ARGS...``: preempt your own training command and check the resume.

Runs the command twice under ``jobwrap run``, in ``DIR/plain`` without
interruption and in ``DIR/preempted`` with a real signal at each chosen step,
relaunching it the way Slurm would; then checks that every preemption
happened, that no step was trained twice, that every step's state and the
final checkpoints are identical. Where a step differs it names the first one,
what differs there and the known cause. ``--quick`` is the check for a user's
CI: one signal, mid-epoch in the middle of a small run. Exit status 0 when
every check passes, 1 when one fails, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from jobwrap._config import ENV_VARS, load_run_settings, parse_signal
from jobwrap._format import table
from jobwrap.errors import ConfigError

NAME = "simulate"

_EXAMPLES = """\
examples:
  jobwrap simulate --dir /tmp/sim --at 5,17 -- python train.py --epochs 2
  jobwrap simulate --dir /tmp/sim --quick -- python train.py --epochs 1 --samples 256
  jobwrap simulate --dir /tmp/sim --random 3 --seed 7 --signal TERM -- python train.py

simulate points the command's checkpoint directory at DIR/plain, then at
DIR/preempted, through JOBWRAP_DIR_OVERRIDE, which beats even a directory
given in the code. A step equal to the run's last one preempts at the
boundary after its last step.
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
    where.add_argument("--quick", action="store_true",
                       help="one signal, at a step inside an epoch in the middle of the run (state carried from "
                            "batch to batch is lost only there): the check for CI, on a small config")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    parser.add_argument("--signal", help="the signal to send (default: the first of JOBWRAP_REQUEUE_SIGNALS, "
                                         "USR1); it must be one jobwrap traps")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="limit for each launch of the command (default 1800, with --quick 300)")
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


def _fail(message: str, run: Any = None) -> None:
    print(f"jobwrap simulate: {message}", file=sys.stderr)
    if run is not None and run.stderr.strip():
        print("--- its last output ---\n" + "\n".join(run.stderr.strip().splitlines()[-15:]), file=sys.stderr)


def _signal(name: str | None) -> signal.Signals:
    """--signal, or the first requeue signal; refused unless training traps it."""
    settings = load_run_settings()
    sig = parse_signal(name) if name else settings.requeue_signals[0]
    if sig not in settings.requeue_signals + settings.exit_signals:
        trapped = ", ".join(s.name for s in settings.requeue_signals + settings.exit_signals)
        raise ConfigError(f"{sig.name} is not a signal jobwrap traps here ({trapped}); set "
                          f"{ENV_VARS['requeue_signals']}={sig.name.removeprefix('SIG')} (checkpoint, requeue) "
                          f"or {ENV_VARS['exit_signals']} (checkpoint, exit) first")
    return sig


def main(args: argparse.Namespace) -> int:
    # Imported here: the testing tools import pytest when it is installed, which `jobwrap --help` need not.
    from jobwrap.testing import SimulationFailed, simulate

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise ConfigError("no command given; use: jobwrap simulate --dir DIR -- python train.py")
        sig = _signal(args.signal)
        at = parse_steps(args.at) if args.at else None
        if args.random is not None and args.random < 1:
            raise ConfigError(f"--random {args.random}: use 1 or more")
        work = Path(args.dir).resolve()
        timeout = args.timeout if args.timeout is not None else 300 if args.quick else 1800
        result = simulate(command, work, sig=sig, at=at, count=args.random or 3, seed=args.seed, quick=args.quick,
                          timeout=timeout, say=lambda line: print(line, flush=True))
    except ConfigError as exc:
        print(f"jobwrap simulate: {exc}", file=sys.stderr)
        return 2
    except SimulationFailed as exc:
        _fail(str(exc), exc.run)
        return 1
    cut_dir = work / "preempted"
    print()
    print(table(["check", "", "detail"], [[name, "ok" if ok else "FAIL", detail] for name, ok, detail in result.checks]))
    print()
    if result.passed:
        print(f"PASS: preempted {len(result.signalled)} time(s) with {sig.name}, resumed without losing a step, "
              f"every step and the final checkpoint identical, in {result.seconds:.0f} s (jobwrap status {cut_dir})")
        return 0
    if result.diagnosis is not None:
        _, summary, cause = result.diagnosis
        print(summary)
        print(cause)
        print()
    if result.runs[-1].returncode != 0:
        _fail(f"the preempted run ended with exit {result.runs[-1].returncode} (log: {work / 'preempted.log'})",
              result.runs[-1])
    print(f"FAIL: see the checks above, {work / 'preempted.log'} and jobwrap status {cut_dir}")
    return 1
