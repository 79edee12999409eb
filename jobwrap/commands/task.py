"""``jobwrap task -- CMD ARGS...``: what each ``srun`` task of a multi-process batch script runs.

srun numbers its tasks in ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``;
torch.distributed reads ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``. And Slurm's warning
signal can come before training has imported torch and jobwrap (a requeued job may be
preempted again at once): USR1's default action kills the process, and a preempted job
whose task died of it loses everything since its last checkpoint. So the task blocks
the requeue signals and execs the command. The mask survives ``exec``; a signal that
arrives meanwhile stays pending, and jobwrap's trap unblocks it once its handler is in
place, which delivers it: the first step boundary commits and requeues.
"""
from __future__ import annotations

import argparse
import os
import signal
from typing import Mapping

from jobwrap._config import load_run_settings
from jobwrap.errors import ConfigError

NAME = "task"

# torch.distributed's variable <- srun's, for each task.
RANK_VARIABLES = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_NTASKS"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="run one srun task: rank variables from Slurm's, early signals held for training",
        description="Set RANK, LOCAL_RANK and WORLD_SIZE from srun's SLURM_PROCID, SLURM_LOCALID and "
                    "SLURM_NTASKS, block the requeue signals (JOBWRAP_REQUEUE_SIGNALS, default USR1) so "
                    "that one sent before training traps it waits instead of killing the task, then "
                    "exec CMD. jobwrap's Session unblocks them once its handler is installed; a CMD "
                    "without jobwrap must unblock them itself to see them.",
        epilog="example (in a batch script): srun --ntasks-per-node=4 jobwrap task -- python train.py",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    parser.set_defaults(func=main)


def rank_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with torch.distributed's rank variables taken from srun's, where srun set them."""
    env = dict(environ)
    for torch_name, slurm_name in RANK_VARIABLES.items():
        if slurm_name in environ:
            env[torch_name] = environ[slurm_name]
    return env


def main(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("jobwrap task: no command given; use: srun jobwrap task -- python train.py")
    try:
        held = load_run_settings(os.environ).requeue_signals
    except ConfigError as exc:
        raise SystemExit(f"jobwrap task: {exc}") from None
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        os.execvpe(command[0], command, rank_environment(os.environ))
    except OSError as exc:
        raise SystemExit(f"jobwrap task: cannot run {command[0]!r}: {exc.strerror}") from None
