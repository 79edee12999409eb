"""``jobwrap doctor``: check, where training will run, that a preemption ends in a committed checkpoint."""
from __future__ import annotations

import argparse
import os
import socket
import sys

from jobwrap.errors import ConfigError

NAME = "doctor"

_EXAMPLES = """\
Run it the way training runs, with its settings: in the batch script
(exec jobwrap run -- jobwrap doctor ...), under srun in the srun layouts,
or in an allocation. It sends the signal through Slurm (scancel --signal)
and waits for it, so run it before training, not beside it.

examples:
  jobwrap submit --time 5 --partition gpu --dir /shared/run1 -- jobwrap doctor --state-bytes 3GB
  exec jobwrap run -- jobwrap doctor --dir /shared/run1 --lead 120 --state-bytes 3GB
  srun --ntasks-per-node=4 jobwrap doctor --dir /shared/run1 --state-bytes 12GB
  jobwrap doctor --dir checkpoints --lead 60 --state-bytes 500MB      # outside Slurm

Checks: the signal handler is free (a blocked signal is fine: jobwrap unblocks it); the signal
arrives through the launch path; scontrol works or which fallback requeues;
the directory is writable and shared; a save of --state-bytes fits in the
lead time and the partition's GraceTime (twice over); where a run has saved in
the directory already, its measured step and signal saves against both. Exit 1 on any fail.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="check signal delivery, requeue, checkpoint directory and save time where training runs",
        description="Check that a preemption here would end in a committed checkpoint and a requeue: "
                    "prints a pass/warn/fail table, exits 1 on a fail.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", help="checkpoint directory (default JOBWRAP_DIR)")
    parser.add_argument("--signal", help="the warning signal (default: the first of JOBWRAP_REQUEUE_SIGNALS, USR1)")
    parser.add_argument("--lead", type=float, metavar="SECONDS",
                        help="signal lead time, the N of --signal=B:USR1@N (default JOBWRAP_GRACE_SECONDS)")
    parser.add_argument("--state-bytes", metavar="SIZE",
                        help="size of one checkpoint to time a save of, e.g. 3GB, 512MiB (default: not timed)")
    parser.add_argument("--signal-timeout", type=float, default=20.0, metavar="SECONDS",
                        help="how long to wait for the signal to arrive (default 20)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (as training does) to see the signal handlers it installs")
    parser.set_defaults(func=main)


def settings_from_args(args: argparse.Namespace, environ: dict[str, str]):
    """The doctor's Settings: a flag beats its JOBWRAP_* variable, which beats the default."""
    from jobwrap._config import load_config, load_run_settings, parse_signal
    from jobwrap._report.preflight import Settings, parse_size

    state_bytes = None
    if args.state_bytes is not None:
        try:
            state_bytes = parse_size(args.state_bytes)
        except ValueError as exc:
            raise ConfigError(f"--state-bytes: {exc}") from None
    run = load_run_settings(environ)
    try:
        config = load_config(environ, directory=args.dir, grace_seconds=args.lead)
        directory, lead = config.directory, config.grace_seconds
    except ConfigError as exc:
        if "no checkpoint directory" not in str(exc):
            raise
        directory, lead = None, args.lead  # reported by the directory check
    return Settings(
        directory=directory,
        signal=parse_signal(args.signal) if args.signal else run.requeue_signals[0],
        requeue_signals=run.requeue_signals, exit_signals=run.exit_signals,
        lead_seconds=lead, state_bytes=state_bytes,
        signal_timeout=args.signal_timeout, imports=tuple(args.imports),
    )


def main(args: argparse.Namespace) -> int:
    from jobwrap._format import table
    from jobwrap._report.preflight import FAIL, PASS, WARN, place, run_checks

    environ = dict(os.environ)
    try:
        settings = settings_from_args(args, environ)
    except ConfigError as exc:
        print(f"jobwrap doctor: {exc}", file=sys.stderr)
        return 2
    rows = run_checks(settings, environ)
    counts = {status: sum(r.status == status for r in rows) for status in (PASS, WARN, FAIL)}
    lines = [f"jobwrap doctor on {socket.gethostname()} ({place(environ)}), signal {settings.signal.name}, "
             f"directory {settings.directory or '(none)'}",
             table(["check", "result", "detail"], [(r.check, r.status.upper(), r.detail) for r in rows]),
             f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail"]
    # One write: several ranks printing at once do not interleave their tables.
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return 1 if counts[FAIL] else 0
