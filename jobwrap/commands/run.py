"""``jobwrap run [options] -- CMD ARGS...``: supervise a training command."""
from __future__ import annotations

import argparse
import os

from jobwrap._config import ENV_VARS, load_run_settings
from jobwrap.errors import ConfigError

NAME = "run"

# Flags, by the Config field they set; each reaches the training process as that field's JOBWRAP_* variable.
_FLAG_FIELDS = {
    "dir": "directory",
    "run_id": "run_id",
    "requeue_signals": "requeue_signals",
    "exit_signals": "exit_signals",
    "max_requeues": "max_requeues",
    "keep": "keep_last",
    "save_every_steps": "save_every_steps",
    "save_every_seconds": "save_every_seconds",
    "save_every": "save_every",
    "grace": "grace_seconds",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="run a training command; forward signals; relaunch it when it asks to be requeued",
        description="Run CMD, forward the scheduler's signals to its training processes (those that start a "
                    "jobwrap Session register with it; not launchers such as torchrun, not DataLoader workers) "
                    "and, when it exits with the requeue code (75), requeue it: scontrol requeue under Slurm, "
                    "else relaunch here.",
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
    parser.add_argument("--save-every", choices=["auto"],
                        help="auto: periodic checkpoints at the interval chosen from the measured save pause "
                             "and the run's interruptions (Young/Daly)")
    parser.add_argument("--grace", type=float, help="seconds between the warning signal and the kill")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from jobwrap._scheduler.supervisor import supervise

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("jobwrap run: no command given; use: jobwrap run [options] -- python train.py")
    env = dict(os.environ)
    for attr, field in _FLAG_FIELDS.items():
        value = getattr(args, attr)
        if value is not None:
            env[ENV_VARS[field]] = str(value)
    if args.adopt:
        env[ENV_VARS["adopt"]] = "1"
    try:
        settings = load_run_settings(env)  # the flags are in env already: they beat the caller's variables
    except ConfigError as exc:
        raise SystemExit(f"jobwrap run: {exc}") from None
    return supervise(command, forward=settings.forwarded, max_requeues=settings.max_requeues, environ=env,
                     cancel=settings.cancelling)
