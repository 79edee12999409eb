"""``jobwrap submit [options] -- CMD ARGS...``: write a preemption-safe batch script and sbatch it."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Mapping

from jobwrap._scheduler.proc import MISSING, TIMEOUT, Runner, run_command
from jobwrap._scheduler.sbatch import LAYOUTS, SubmitOptions, render
from jobwrap._storage.store import RUN_FILE, CheckpointStore
from jobwrap.errors import ConfigError, JobwrapError, SchedulerError

Which = Callable[[str], "str | None"]

NAME = "submit"

log = logging.getLogger("jobwrap")

# Flag destinations that map one to one onto SubmitOptions fields.
_FIELDS = {
    "job_name": "job_name", "time": "time", "partition": "partition", "nodes": "nodes",
    "gpus": "gpus_per_node", "ntasks_per_node": "ntasks_per_node", "cpus_per_task": "cpus_per_task",
    "signal": "signal", "lead": "lead_seconds", "dir": "checkpoint_dir",
    "max_requeues": "max_requeues", "output": "output", "sbatch_line": "extra_sbatch",
    "layout": "layout", "master_port": "master_port", "adopt": "adopt",
}

_EXAMPLES = """\
examples:
  jobwrap submit --time 4:00:00 --partition gpu --dir /scratch/$USER/run1 -- python train.py --lr 3e-4
  jobwrap submit --time 1-00:00:00 --nodes 2 --gpus 8 --dir /shared/run2 --dry-run -- python train.py

The script is written next to the checkpoint directory (DIR.sbatch), or to a
temporary file without --dir, and submitted with sbatch --parsable; the job id
is printed. --dry-run prints the script instead. The script starts the jobwrap
this command runs from: by its path where PATH finds another or none (a venv
not activated), so that path must be on storage the compute nodes see.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        NAME, help="write a batch script that checkpoints and requeues on the time-limit signal; sbatch it",
        description="Render a Slurm batch script for CMD (signal before the time limit, requeue, "
                    "appended log, checkpoint directory) and submit it with sbatch.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--job-name", help="job name shown by squeue (default jobwrap)")
    parser.add_argument("--time", required=True,
                        help="time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    parser.add_argument("--partition", help="partition to run in (default: the cluster's)")
    parser.add_argument("--nodes", type=int, help="nodes (default 1)")
    parser.add_argument("--gpus", type=int, help="GPUs per node (default 1; 0 for CPU only)")
    parser.add_argument("--ntasks-per-node", type=int,
                        help="processes per node (default: one per GPU; needed for CPU-only multi-process)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per process")
    parser.add_argument("--signal", help="warning signal: USR1 (default) or USR2 where NCCL owns USR1")
    parser.add_argument("--lead", type=int, metavar="SECONDS",
                        help="send the signal this many seconds before the time limit (default 120)")
    parser.add_argument("--dir", help="checkpoint directory (JOBWRAP_DIR), the same on every restart")
    parser.add_argument("--adopt", action="store_true", default=None,
                        help="continue from the checkpoints another run (or an earlier job) left in --dir; "
                             "without it such a directory is refused here, before the job waits in the queue")
    parser.add_argument("--max-requeues", type=int, help="stop requeueing after this many restarts")
    parser.add_argument("--output", help="log file; %%j is the job id, %%x the name (default jobwrap-%%x-%%j.out)")
    parser.add_argument("--sbatch-line", action="append", metavar="--KEY=VALUE",
                        help="another #SBATCH option, e.g. --sbatch-line=--account=proj (repeatable)")
    parser.add_argument("--layout", choices=LAYOUTS,
                        help="single: one process; multi-gpu: srun, one task per GPU on one node; "
                             "multi-node: the same on several nodes (default: from --nodes and --gpus)")
    parser.add_argument("--master-port", type=int,
                        help="torch.distributed rendezvous port (default: derived from the job id)")
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    parser.set_defaults(func=main)


def options_from_args(args: argparse.Namespace) -> SubmitOptions:
    """The SubmitOptions the parsed flags describe; unset flags keep the dataclass defaults."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    values = {field: getattr(args, dest) for dest, field in _FIELDS.items() if getattr(args, dest, None) is not None}
    return SubmitOptions(command=tuple(command), **values)


def _on_path_here(name: str, bin_dir: str, which: Which) -> bool:
    """Whether PATH finds ``name`` in ``bin_dir``. The directories are compared, not the files: a venv's
    ``python`` is a symlink to the system's, and resolving it would make the two look the same."""
    found = which(name)
    try:
        return found is not None and os.path.samefile(os.path.dirname(os.path.abspath(found)), bin_dir)
    except OSError:
        return False


def running_jobwrap(*, executable: str = sys.executable, which: Which = shutil.which) -> tuple[str, ...]:
    """The words that start, in the job, the jobwrap this process is: ``jobwrap`` where PATH finds the
    one installed beside this interpreter, else its path (a venv used without activating it), else
    ``python -m jobwrap`` by the interpreter's path. The job inherits this shell's PATH (sbatch's
    default ``--export=ALL``), so what PATH finds here is what the job finds."""
    bin_dir = os.path.dirname(os.path.abspath(executable))
    if _on_path_here("jobwrap", bin_dir, which):
        return ("jobwrap",)
    script = os.path.join(bin_dir, "jobwrap")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return (script,)
    return (os.path.abspath(executable), "-m", "jobwrap")


def check_command(command: tuple[str, ...], *, executable: str = sys.executable, which: Which = shutil.which) -> None:
    """Refuse a command whose first word names a program of this interpreter's environment (``python``,
    ``torchrun``) that the job's PATH would find elsewhere: training would run another Python, without
    the packages installed here, and fail only once the job got its nodes."""
    name = command[0]
    bin_dir = os.path.dirname(os.path.abspath(executable))
    if os.sep in name or not os.path.isfile(os.path.join(bin_dir, name)) or _on_path_here(name, bin_dir, which):
        return
    found = which(name)
    elsewhere = f"finds {found}" if found else "finds no such program"
    raise ConfigError(
        f"the command's {name!r} is {os.path.join(bin_dir, name)} beside the jobwrap that submits, but the job's "
        f"PATH {elsewhere}: training would run without this environment's packages. Give its path "
        f"(jobwrap submit ... -- {shlex.join([os.path.join(bin_dir, name), *command[1:]])}) or activate "
        f"the environment (source {os.path.join(bin_dir, 'activate')}) before jobwrap submit")


def check_directory(opts: SubmitOptions, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse, before the job waits in the queue, a --dir holding another run's checkpoints without --adopt:
    the job (a new job id, so a new run) would otherwise stop at its start with ForeignRunError."""
    if opts.checkpoint_dir is None or opts.adopt or opts.is_array or environ.get("JOBWRAP_ADOPT") == "1":
        return
    path = os.path.join(opts.checkpoint_dir, RUN_FILE)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return  # no run recorded: the job's run takes the directory, as jobwrap run would
    if not isinstance(record, dict):
        return
    lineage = record.get("lineage") or [record.get("run_id")]
    if environ.get("JOBWRAP_RUN_ID") in lineage:
        return  # the job continues that run by its id
    committed = CheckpointStore(opts.checkpoint_dir).committed()
    if not committed:
        return
    raise ConfigError(
        f"--dir {opts.checkpoint_dir} holds checkpoints of run {record.get('run_id')!r} (newest: step "
        f"{committed[0].step}), and this job would be a new run: it would stop at its start. To continue "
        f"from them, add --adopt; to start a new run, choose another --dir")


def script_path(opts: SubmitOptions) -> str | None:
    """Where the script is kept: ``DIR.sbatch`` beside the checkpoint directory, or None for a temp file."""
    if opts.checkpoint_dir is None:
        return None
    return os.path.normpath(os.path.abspath(opts.checkpoint_dir)) + ".sbatch"


def write_script(text: str, path: str | None) -> str:
    """Write the script to ``path`` (a new temporary file when None); return the path written."""
    if path is None:
        fd, path = tempfile.mkstemp(prefix="jobwrap-", suffix=".sbatch")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write the batch script to {path}: {exc.strerror}; choose another --dir "
                          f"or use --dry-run and save the output yourself") from None
    return path


def sbatch(path: str, *, run: Runner = subprocess.run, executable: str | None = None,
           timeout: float = 60.0) -> str:
    """Submit ``path`` with ``sbatch --parsable``; return the job id or raise SchedulerError."""
    result = run_command([executable or shutil.which("sbatch") or "sbatch", "--parsable", path],
                         run=run, timeout=timeout)
    if result.status == MISSING:
        raise SchedulerError(f"{result.reason}: run jobwrap submit on a Slurm login node, or use "
                             f"--dry-run to print the script and submit it yourself")
    if result.status == TIMEOUT:
        raise SchedulerError(f"{result.reason}; check the Slurm controller (scontrol ping) and submit {path} again")
    if not result.ok:
        raise SchedulerError(f"sbatch refused {path}: {result.said}; fix the option it names and submit again")
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    job_id = result.stdout.strip().splitlines()[-1].split(";")[0] if result.stdout.strip() else ""
    if not job_id:
        raise SchedulerError(f"sbatch printed no job id for {path}; check squeue before submitting again")
    return job_id


def main(args: argparse.Namespace, *, run: Runner = subprocess.run) -> int:
    try:
        opts = options_from_args(args)
        check_command(opts.command)
        check_directory(opts)
        opts = dataclasses.replace(opts, jobwrap_command=running_jobwrap())
        text = render(opts)
        if args.dry_run:
            sys.stdout.write(text)
            return 0
        path = write_script(text, script_path(opts))
        job_id = sbatch(path, run=run)
    except JobwrapError as exc:
        print(f"jobwrap submit: {exc}", file=sys.stderr)
        return 2
    log.info("submitted %s as job %s", path, job_id)
    print(job_id)
    return 0
