"""Slurm batch scripts for preemptible training, from a pure function.

``render(SubmitOptions(...))`` returns the whole script text; nothing here
touches the disk, the environment or the scheduler, so the output is checked
against golden files (``tests/golden/``, ``slurm/*.sbatch``). Every line of
the script carries a comment saying why it is there.

Three layouts:

* ``single``: one process. ``exec jobwrap run -- CMD``; the signal goes to the
  batch shell only (``--signal=B:...``), which after the ``exec`` is the
  supervisor, and it forwards the signal to the training process tree.
* ``multi-gpu``: one node, ``srun`` starts one task per GPU; the signal goes
  to the tasks (``--signal=...`` without ``B:``), so every rank gets it.
* ``multi-node``: the same over several nodes, with the rendezvous address
  taken from the first node of the allocation.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import textwrap

from jobwrap.errors import ConfigError

__all__ = ["LAYOUTS", "SIGNALS", "SubmitOptions", "parse_time", "render"]

#: The batch layouts :func:`render` knows.
LAYOUTS = ("single", "multi-gpu", "multi-node")
#: Signals a job may be warned with: USR1, or USR2 where NCCL or another library owns USR1.
SIGNALS = ("USR1", "USR2")

# Exit code of a training process that could not requeue itself (jobwrap.REQUEUE_EXIT_CODE);
# repeated here so that this module imports nothing heavier than the errors.
_REQUEUE_EXIT_CODE = 75
# Slurm stores the --signal lead time in 16 bits.
_MAX_LEAD_SECONDS = 0xFFFF
# Ports derived from the job id stay below Linux's ephemeral range (32768-60999), where
# the kernel hands out ports to outgoing connections.
_PORT_BASE, _PORT_SPAN = 10000, 20000
_WIDTH = 88

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
_OPTION = re.compile(r"--([a-z][a-z0-9-]*)(?:=(.*))?")

# sbatch options a SubmitOptions field sets, and the field to use instead.
_OWNED_OPTIONS = {
    "job-name": "job_name (--job-name)",
    "time": "time (--time)",
    "partition": "partition (--partition)",
    "nodes": "nodes (--nodes)",
    "ntasks": "ntasks_per_node (--ntasks-per-node)",
    "ntasks-per-node": "ntasks_per_node (--ntasks-per-node)",
    "cpus-per-task": "cpus_per_task (--cpus-per-task)",
    "gpus": "gpus_per_node (--gpus)",
    "gpus-per-node": "gpus_per_node (--gpus)",
    "gpus-per-task": "gpus_per_node (--gpus)",
    "signal": "signal and lead_seconds (--signal, --lead)",
    "output": "output (--output)",
}
# sbatch options that would break preemption handling, and why.
_FORBIDDEN_OPTIONS = {
    "no-requeue": "the job must stay requeueable; that is what jobwrap is for",
    "requeue": "jobwrap always sets --requeue",
    "open-mode": "jobwrap needs --open-mode=append: each restart would truncate the log",
    "wrap": "the script itself is the job; pass the command after --",
}


@dataclasses.dataclass(kw_only=True, frozen=True)
class SubmitOptions:
    """What :func:`render` needs to write a batch script. Bad values raise ConfigError.

    ``time`` is a Slurm time limit: minutes as an int, or ``MM``, ``MM:SS``,
    ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``. ``layout`` left as None
    is inferred: ``multi-node`` for several nodes, ``multi-gpu`` for several
    tasks on one node, else ``single``. ``jobwrap_command`` starts jobwrap in the
    job: ``("jobwrap",)`` from PATH, or the path of the one that rendered the
    script where PATH would find another or none (``jobwrap submit`` decides).
    ``adopt`` lets the job continue from another run's checkpoints in the directory.
    """

    command: tuple[str, ...]
    time: str | int
    job_name: str = "jobwrap"
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    signal: str = "USR1"
    lead_seconds: int = 120
    checkpoint_dir: str | None = None
    max_requeues: int | None = None
    output: str = "jobwrap-%x-%j.out"
    extra_sbatch: tuple[str, ...] = ()
    layout: str | None = None
    master_port: int | None = None
    jobwrap_command: tuple[str, ...] = ("jobwrap",)
    adopt: bool = False

    def __post_init__(self) -> None:
        # Frozen: normalised values are stored through object.__setattr__, once, here.
        set_ = object.__setattr__
        set_(self, "command", _check_command(self.command))
        set_(self, "jobwrap_command", _check_jobwrap_command(self.jobwrap_command))
        if not isinstance(self.adopt, bool):
            raise ConfigError(f"adopt={self.adopt!r}: give True or False")
        set_(self, "extra_sbatch", _check_extra(self.extra_sbatch))
        set_(self, "signal", _check_signal(self.signal))
        limit = parse_time(self.time)
        if isinstance(self.time, str):
            set_(self, "time", self.time.strip())
        _check_int("nodes", self.nodes, minimum=1)
        _check_int("gpus_per_node", self.gpus_per_node, minimum=0)
        for name in ("ntasks_per_node", "cpus_per_task"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.max_requeues is not None:
            _check_int("max_requeues", self.max_requeues, minimum=0)
        _check_int("lead_seconds", self.lead_seconds, minimum=1)
        if self.lead_seconds > _MAX_LEAD_SECONDS:
            raise ConfigError(f"lead_seconds={self.lead_seconds}: Slurm allows at most "
                              f"{_MAX_LEAD_SECONDS} s of signal lead time; lower --lead")
        if self.lead_seconds >= limit:
            raise ConfigError(
                f"lead_seconds={self.lead_seconds} is not shorter than the time limit {self.time!r} "
                f"({limit} s): the warning signal would come before the job could train; "
                f"lower --lead or raise --time")
        if not isinstance(self.job_name, str) or not _NAME.fullmatch(self.job_name):
            raise ConfigError(f"job_name={self.job_name!r}: use letters, digits and . _ + - only, "
                              f"starting with a letter or digit")
        if self.partition is not None and not (isinstance(self.partition, str)
                                               and _PARTITION.fullmatch(self.partition)):
            raise ConfigError(f"partition={self.partition!r}: give a partition name (or several, "
                              f"comma-separated) without spaces")
        if not isinstance(self.output, str) or not self.output or any(c.isspace() for c in self.output):
            raise ConfigError(f"output={self.output!r}: give a log path without spaces, such as "
                              f"'logs/%x-%j.out' (%j stays the same across requeues)")
        if self.checkpoint_dir is not None and (
                not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir
                or any(c in self.checkpoint_dir for c in "\n\r\0")):
            raise ConfigError(f"checkpoint_dir={self.checkpoint_dir!r}: give a directory path on one "
                              f"line, or None to let the training script choose")
        if self.master_port is not None:
            _check_int("master_port", self.master_port, minimum=1024)
            if self.master_port > 65535:
                raise ConfigError(f"master_port={self.master_port}: use a port from 1024 to 65535, "
                                  f"or None to derive one from the job id")
        set_(self, "layout", self._check_layout())

    def _check_layout(self) -> str:
        layout = self.layout
        if layout is None:
            if self.nodes > 1:
                return "multi-node"
            return "multi-gpu" if self.tasks_per_node > 1 else "single"
        if layout not in LAYOUTS:
            raise ConfigError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")
        if layout == "single":
            if self.nodes != 1:
                raise ConfigError(f"layout='single' runs one process on one node, not nodes={self.nodes}; "
                                  f"use layout='multi-node' (--layout multi-node)")
            if self.ntasks_per_node not in (None, 1):
                raise ConfigError(f"layout='single' runs one process, not ntasks_per_node="
                                  f"{self.ntasks_per_node}; use layout='multi-gpu' (--layout multi-gpu)")
            return layout
        if layout == "multi-gpu" and self.nodes != 1:
            raise ConfigError(f"layout='multi-gpu' is one node, not nodes={self.nodes}; "
                              f"use layout='multi-node' (--layout multi-node)")
        if layout == "multi-node" and self.nodes < 2:
            raise ConfigError(f"layout='multi-node' needs nodes >= 2, not {self.nodes}; raise --nodes, "
                              f"or use layout='multi-gpu' on one node")
        if self.gpus_per_node == 0 and self.ntasks_per_node is None:
            raise ConfigError(f"layout={layout!r} with gpus_per_node=0 runs CPU tasks: set "
                              f"ntasks_per_node (--ntasks-per-node) to the processes per node")
        if self.gpus_per_node and self.ntasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(
                f"ntasks_per_node={self.ntasks_per_node} with gpus_per_node={self.gpus_per_node}: "
                f"layout={layout!r} runs one task per GPU; leave ntasks_per_node unset or set it to "
                f"{self.gpus_per_node}")
        return layout

    @property
    def tasks_per_node(self) -> int:
        """Processes per node: one per GPU in the srun layouts, one in ``single``."""
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        if self.layout == "single":
            return 1
        return max(self.gpus_per_node, 1)

    @property
    def is_array(self) -> bool:
        """Whether an extra ``--array=...`` line makes this a job array."""
        return any(line == "--array" or line.startswith("--array=") for line in self.extra_sbatch)


def parse_time(value: str | int) -> int:
    """A Slurm time limit in seconds: int minutes, ``MM``, ``MM:SS``, ``HH:MM:SS``,
    ``D-HH``, ``D-HH:MM`` or ``D-HH:MM:SS``. Raises ConfigError for anything else."""
    formats = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"time={value!r}: give a Slurm time limit ({formats})")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"time={value}: give a positive number of minutes")
        return value * 60
    text = value.strip()
    if text.upper() in ("INFINITE", "UNLIMITED"):
        raise ConfigError(f"time={value!r}: jobwrap needs a finite limit, since the warning signal "
                          f"comes a lead time before it; give e.g. --time 4:00:00")
    days_text, dash, clock = text.rpartition("-") if "-" in text else ("", "", text)
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or (dash and not days_text.isdigit()) or len(parts) > 3:
        raise ConfigError(f"time={value!r} is not a Slurm time limit; use {formats}")
    numbers = [int(p) for p in parts]
    if dash:
        # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        total = ((int(days_text) * 24 + hours) * 60 + minutes) * 60 + seconds
        bounded = [("hours", hours, 23)] + [("minutes", minutes, 59), ("seconds", seconds, 59)][:len(numbers) - 1]
    elif len(numbers) == 1:
        total, bounded = numbers[0] * 60, []
    elif len(numbers) == 2:
        total, bounded = numbers[0] * 60 + numbers[1], [("seconds", numbers[1], 59)]
    else:
        hours, minutes, seconds = numbers
        total = (hours * 60 + minutes) * 60 + seconds
        bounded = [("minutes", minutes, 59), ("seconds", seconds, 59)]
    for what, number, top in bounded:
        if number > top:
            raise ConfigError(f"time={value!r}: {number} {what} is more than {top}; use {formats}")
    if total < 1:
        raise ConfigError(f"time={value!r} is zero; give a positive time limit")
    return total


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r}: give a whole number")
    if value < minimum:
        raise ConfigError(f"{name}={value}: use {minimum} or more")


def _check_command(command: object) -> tuple[str, ...]:
    if isinstance(command, str):
        raise ConfigError(f"command={command!r} is one string; give a list of arguments, "
                          f"e.g. ['python', 'train.py'] (shlex.split does it)")
    items = tuple(command) if command is not None else ()
    if not items or not items[0]:
        raise ConfigError("no command: give the training command, e.g. jobwrap submit ... -- python train.py")
    for item in items:
        if not isinstance(item, str) or "\0" in item:
            raise ConfigError(f"command argument {item!r} is not a string without NUL bytes")
    return items


def _check_jobwrap_command(command: object) -> tuple[str, ...]:
    items = (command,) if isinstance(command, str) else tuple(command or ())  # type: ignore[arg-type]
    if not items or not all(isinstance(item, str) and item and not any(c in item for c in "\n\r\0")
                            for item in items):
        raise ConfigError(f"jobwrap_command={command!r}: give the words that start jobwrap in the job, "
                          f"e.g. ('jobwrap',) or ('/path/to/venv/bin/jobwrap',)")
    return items


def _check_signal(name: object) -> str:
    text = str(name).strip().upper()
    text = text[3:] if text.startswith("SIG") else text
    if text in SIGNALS:
        return text
    if text == "TERM":
        raise ConfigError("signal='TERM': Slurm already sends TERM at the time limit and on scancel, and "
                          "jobwrap treats it as checkpoint-and-exit without requeue; use USR1 or USR2")
    raise ConfigError(f"signal={name!r} is not a signal jobwrap can warn with; use USR1, or USR2 where "
                      f"NCCL or another library already owns USR1")


def _check_extra(lines: object) -> tuple[str, ...]:
    if isinstance(lines, str):
        lines = (lines,)
    checked = []
    for raw in tuple(lines or ()):
        line = str(raw).strip()
        match = _OPTION.fullmatch(line)
        if not match or any(c in line for c in "\n\r\0"):
            raise ConfigError(f"sbatch line {raw!r} is not an sbatch option; give the long form "
                              f"'--key=value' (or '--flag'), e.g. '--account=myproject', without '#SBATCH'")
        key, value = match.group(1), match.group(2) or ""
        if key in _FORBIDDEN_OPTIONS:
            raise ConfigError(f"sbatch line {line!r} is not allowed: {_FORBIDDEN_OPTIONS[key]}")
        if key in _OWNED_OPTIONS:
            raise ConfigError(f"sbatch line {line!r} sets what the option {_OWNED_OPTIONS[key]} sets; "
                              f"use that instead")
        if key == "gres" and "gpu" in value:
            raise ConfigError(f"sbatch line {line!r} requests GPUs; use gpus_per_node (--gpus) so "
                              f"that the task count follows the GPU count")
        checked.append(line)
    return tuple(checked)


# --- rendering -------------------------------------------------------------------------


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH - 2, initial_indent="# ", subsequent_indent="# ",
                         break_long_words=False, break_on_hyphens=False)


def _with_why(why: str, *lines: str) -> list[str]:
    return _comment(why) + list(lines)


def _directives(opts: SubmitOptions) -> list[str]:
    srun = opts.layout != "single"
    lines: list[str] = []
    lines += _with_why("The name shown by squeue; %x in the log file name below.",
                       f"#SBATCH --job-name={opts.job_name}")
    lines += _with_why(f"Slurm ends the job at this limit (rounded up to whole minutes); the warning "
                       f"signal below comes {opts.lead_seconds} s before it.",
                       f"#SBATCH --time={opts.time}")
    if opts.partition is not None:
        lines += _with_why("Where the job runs (sinfo lists the partitions).",
                           f"#SBATCH --partition={opts.partition}")
    if srun:
        nodes_why = ("One node: the tasks talk over shared memory and NVLink."
                     if opts.nodes == 1 else
                     "Several nodes; srun starts the same number of tasks on each.")
        tasks_why = ("One task per GPU, each its own Python process that receives the signal itself."
                     if opts.gpus_per_node else "The CPU processes on each node, one rank each.")
    else:
        nodes_why = "One node: a single process cannot span nodes."
        tasks_why = ("One process; jobwrap run supervises it in the batch shell, no srun step.")
    lines += _with_why(nodes_why, f"#SBATCH --nodes={opts.nodes}")
    lines += _with_why(tasks_why, f"#SBATCH --ntasks-per-node={opts.tasks_per_node}")
    if opts.gpus_per_node:
        gpus_why = ("GPUs on each node, one per task; per node so that every node gets the same "
                    "number." if srun else "The GPUs the training process sees.")
        lines += _with_why(gpus_why, f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task is not None:
        lines += _with_why("CPU cores for each process (data loader workers).",
                           f"#SBATCH --cpus-per-task={opts.cpus_per_task}")
    lines += _with_why("%j is the job id, which a requeue keeps: every restart writes to this one "
                       "file.", f"#SBATCH --output={opts.output}")
    lines += _with_why("Append: each restart of a requeued job would otherwise truncate the log and "
                       "lose the earlier runs' output.", "#SBATCH --open-mode=append")
    lines += _with_why("Requeueable (scontrol requeue, preemption) even where the cluster's JobRequeue "
                       "default is 0; with --no-requeue, scontrol requeue is refused.",
                       "#SBATCH --requeue")
    timing = (f"{opts.signal} {opts.lead_seconds} s before the time limit (and at preemption where "
              f"the admin set preempt_send_user_signal). slurmctld checks every 30 s, so it can come "
              f"up to 30 s early, never late. ")
    if srun:
        lines += _with_why(timing + "No B: prefix: the signal goes to every task of the srun step, "
                           "so every rank sees it (with B: only the batch shell would, and it would "
                           "have to forward it across nodes).",
                           f"#SBATCH --signal={opts.signal}@{opts.lead_seconds}")
    else:
        lines += _with_why(timing + "B: sends it to the batch shell only, which after the exec below "
                           "is jobwrap run; it forwards it to the training process tree. Without B: "
                           "it would go to srun steps, and this script starts none.",
                           f"#SBATCH --signal=B:{opts.signal}@{opts.lead_seconds}")
    for extra in opts.extra_sbatch:
        lines += _with_why("Added by the user (--sbatch-line).", f"#SBATCH {extra}")
    return lines


def _environment(opts: SubmitOptions) -> list[str]:
    lines = _with_why("Stop at the first failing command or unset variable rather than train with a "
                      "half-built environment.", "set -eu")
    if opts.checkpoint_dir is not None:
        why = ("The checkpoint directory, the same on every restart: a requeued run finds and resumes "
               "from its newest verified checkpoint here. On storage every node sees.")
        directory = shlex.quote(opts.checkpoint_dir)
        if opts.is_array:
            why += (" One subdirectory per array task: tasks sharing a directory would load each "
                    "other's checkpoints.")
            directory = shlex.quote(opts.checkpoint_dir.rstrip("/") or "/") + '/"$SLURM_ARRAY_TASK_ID"'
        lines += _with_why(why, f"export JOBWRAP_DIR={directory}")
    lines += _with_why("The signal lead time, so the training process knows its deadline: the "
                       "checkpoint must be committed within this many seconds of the signal.",
                       f"export JOBWRAP_GRACE_SECONDS={opts.lead_seconds}")
    lines += _with_why("Which signal means checkpoint, requeue and exit; it must be the one --signal "
                       "sends. TERM keeps meaning checkpoint and exit, so that scancel still ends "
                       "the job.", f"export JOBWRAP_REQUEUE_SIGNALS={opts.signal}")
    if opts.adopt:
        lines += _with_why("Continue from the checkpoints another run left in the directory (--adopt): "
                           "without it the job would stop at its start, since the directory is not this "
                           "job's. The lineage is recorded in run.json.", "export JOBWRAP_ADOPT=1")
    if opts.max_requeues is not None:
        lines += _with_why("Stop requeueing after this many restarts, so a job that keeps failing does "
                           "not loop forever.", f"export JOBWRAP_MAX_REQUEUES={opts.max_requeues}")
    return lines


def _which_jobwrap(opts: SubmitOptions) -> str:
    if opts.jobwrap_command == ("jobwrap",):
        return "jobwrap must be on PATH: sbatch passes on the submitting shell's environment."
    return ("jobwrap by the path jobwrap submit ran from, since PATH finds another or none; that path "
            "must be on storage every node sees.")


def _single_body(opts: SubmitOptions) -> list[str]:
    return _with_why(
        "exec: jobwrap run replaces this shell, so the B: signal reaches it at once (bash would hold "
        "a trapped signal until its foreground child exits). It forwards the signal to the training "
        f"process tree and, when training exits {_REQUEUE_EXIT_CODE} (requeue me), runs scontrol "
        f"requeue, or relaunches where scontrol is missing. {_which_jobwrap(opts)}",
        f"exec {shlex.join(opts.jobwrap_command)} run -- {shlex.join(opts.command)}")


def _rendezvous(opts: SubmitOptions) -> list[str]:
    if opts.layout == "multi-node":
        lines = _with_why(
            "torch.distributed rendezvous (init_method env://): rank 0 runs on the first node of "
            "the allocation, since srun numbers tasks node by node, so that node's name is the "
            "address every rank connects to. Set here once, outside srun, so all tasks agree.",
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
            'export MASTER_ADDR=${MASTER_ADDR:?scontrol gave no node name for the rendezvous}')
    else:
        lines = _with_why("torch.distributed rendezvous (init_method env://): every task is on this "
                          "node, so loopback.", "export MASTER_ADDR=127.0.0.1")
    if opts.master_port is not None:
        lines += _with_why("The rendezvous port, fixed by --master-port.",
                           f"export MASTER_PORT={opts.master_port}")
    else:
        lines += _with_why(
            "The rendezvous port, from the job id: two jobs sharing a node do not collide, a "
            "requeued job (same id) gets the same port, and it stays below the kernel's ephemeral "
            "port range.",
            f"export MASTER_PORT=$(({_PORT_BASE} + SLURM_JOB_ID % {_PORT_SPAN}))")
    return lines


def _srun_body(opts: SubmitOptions) -> list[str]:
    srun = ["srun", f"--ntasks-per-node={opts.tasks_per_node}"]
    if opts.cpus_per_task is not None:
        srun.append(f"--cpus-per-task={opts.cpus_per_task}")
    launch = shlex.join(srun + [*opts.jobwrap_command, "task", "--", *opts.command])
    cpus = (" --cpus-per-task is repeated because srun of Slurm 22.05 to 23.02 does not take it from "
            "the allocation." if opts.cpus_per_task is not None else "")
    lines = _rendezvous(opts)
    lines += _with_why(
        "srun starts one task per GPU, each a Python process that receives the signal itself. Not "
        "torchrun: it does not pass USR1/USR2 on to its workers and SIGKILLs them 30 s after passing "
        f"on TERM, too soon to commit a large checkpoint.{cpus} In each task, `jobwrap task` "
        "turns srun's numbering into the variables torch.distributed reads (RANK, LOCAL_RANK, "
        f"WORLD_SIZE), holds back a {opts.signal} that comes before training traps it (it would kill the "
        "task while torch imports), and execs the command, so Python itself is the signalled "
        "task. The exit status is kept, where set -e would end the script."
        + ("" if opts.jobwrap_command == ("jobwrap",) else " " + _which_jobwrap(opts)),
        "status=0",
        f"{launch} || status=$?")
    lines += _with_why(
        f"{_REQUEUE_EXIT_CODE}: training committed its checkpoint and asked to be requeued but could "
        "not run scontrol itself (it is missing in many containers); this shell runs outside the "
        "container, so it requeues the job here. The id is ARRAYJOB_TASK for an array task.",
        f'if [ "$status" -eq {_REQUEUE_EXIT_CODE} ]; then',
        '    job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}',
        '    if scontrol requeue "${job:-$SLURM_JOB_ID}"; then',
        "        exit 0",
        "    fi",
        '    echo "jobwrap: scontrol requeue failed; submit this script again to resume from the'
        ' last checkpoint" >&2',
        "fi")
    lines += _with_why("The job ends with training's status: COMPLETED on 0, FAILED otherwise.",
                       'exit "$status"')
    return lines


def render(opts: SubmitOptions, *, header: str = "") -> str:
    """The whole batch script for ``opts``; ``header`` becomes comment lines after the shebang."""
    lines = ["#!/bin/bash"]
    for text in header.splitlines():
        lines.append(f"# {text}".rstrip())
    if header:
        lines.append("#")
    lines += _comment(f"Made by jobwrap submit, layout {opts.layout}. Each "
                      f"line comes with the reason it is there; #SBATCH lines must precede the first "
                      f"command.")
    lines += _directives(opts)
    lines.append("")
    lines += _environment(opts)
    lines.append("")
    lines += _single_body(opts) if opts.layout == "single" else _srun_body(opts)
    return "\n".join(lines) + "\n"
