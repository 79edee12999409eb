"""``jobwrap run [options] -- CMD ARGS...``: supervise a training command."""
from __future__ import annotations

import argparse
import os
import signal

from jobwrap.config import DEFAULT_EXIT_SIGNALS, DEFAULT_MAX_REQUEUES, DEFAULT_REQUEUE_SIGNALS, parse_signals
from jobwrap.errors import ConfigError

NAME = "run"

# Flags that become JOBWRAP_* variables of the training process.
_PASSED_AS_ENV = {
    "dir": "JOBWRAP_DIR",
    "run_id": "JOBWRAP_RUN_ID",
    "requeue_signals": "JOBWRAP_REQUEUE_SIGNALS",
    "exit_signals": "JOBWRAP_EXIT_SIGNALS",
    "max_requeues": "JOBWRAP_MAX_REQUEUES",
    "keep": "JOBWRAP_KEEP",
    "save_every_steps": "JOBWRAP_SAVE_EVERY_STEPS",
    "save_every_seconds": "JOBWRAP_SAVE_EVERY_SECONDS",
    "grace": "JOBWRAP_GRACE_SECONDS",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="run a training command; forward signals; relaunch it when it asks to be requeued",
        description="Run CMD, forward the scheduler's signals to its whole process tree and, when it exits "
                    "with the requeue code (75), requeue it: scontrol requeue under Slurm, else relaunch here.",
        epilog="example: jobwrap run --dir ckpt --max-requeues 5 -- python train.py --epochs 10",
    )
    parser.add_argument("--dir", help="checkpoint directory (JOBWRAP_DIR)")
    parser.add_argument("--run-id", help="run id kept across requeues (default: the Slurm job id, or a new one)")
    parser.add_argument("--adopt", action="store_true", help="continue from another run's checkpoints in --dir")
    parser.add_argument("--requeue-signals", help="signals meaning checkpoint+requeue+exit (default USR1)")
    parser.add_argument("--exit-signals", help="signals meaning checkpoint+exit (default TERM)")
    parser.add_argument("--max-requeues", type=int, default=None, help="stop requeueing after this many restarts")
    parser.add_argument("--keep", type=int, help="checkpoints to keep (default 3)")
    parser.add_argument("--save-every-steps", type=int, help="periodic checkpoint every N steps")
    parser.add_argument("--save-every-seconds", type=float, help="periodic checkpoint every T seconds")
    parser.add_argument("--grace", type=float, help="seconds between the warning signal and the kill")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from jobwrap.supervisor import supervise

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("jobwrap run: no command given; use: jobwrap run [options] -- python train.py")
    env = dict(os.environ)
    for attr, var in _PASSED_AS_ENV.items():
        value = getattr(args, attr)
        if value is not None:
            env[var] = str(value)
    if args.adopt:
        env["JOBWRAP_ADOPT"] = "1"
    try:
        trapped = (parse_signals(env.get("JOBWRAP_REQUEUE_SIGNALS") or DEFAULT_REQUEUE_SIGNALS)
                   + parse_signals(env.get("JOBWRAP_EXIT_SIGNALS") or DEFAULT_EXIT_SIGNALS))
    except ConfigError as exc:
        raise SystemExit(f"jobwrap run: {exc}") from None
    forward = tuple(dict.fromkeys(trapped + (signal.SIGINT,)))
    max_requeues = int(env.get("JOBWRAP_MAX_REQUEUES") or DEFAULT_MAX_REQUEUES)
    return supervise(command, forward=forward, max_requeues=max_requeues, environ=env)
