"""``jobwrap doctor``'s checks: would a preemption here end in a committed checkpoint and a requeue?

Each check is a small function returning a :class:`Row` (pass, warn or fail, and one line
saying what was found and what to change). The decisions -- how the signal reaches this
process, which filesystems other nodes see, whether a save fits the lead time -- are pure
functions over what was observed (process chain, ``/proc/mounts``, timings), tested without a
cluster. The side effects (run ``scancel``/``scontrol``, send a signal, write files) sit in the
``check_*`` functions, with the environment and the subprocess runner passed in.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

from jobwrap._config import REQUEUE_EXIT_CODE
from jobwrap._format import human_size
from jobwrap._scheduler.env import read_env, read_slurm_step
from jobwrap._scheduler.proc import Runner, run_command
from jobwrap._scheduler.signals import SignalTrap
from jobwrap._storage.store import CheckpointStore
from jobwrap.errors import describe_oserror

__all__ = ["FAIL", "PASS", "WARN", "Proc", "Row", "Settings", "classify_filesystem", "find_mount",
           "parse_size", "plan_delivery", "run_checks", "save_fits"]

PASS, WARN, FAIL = "pass", "warn", "fail"

#: A save must fit in the budget this many times over: when a whole partition is preempted every
#: job saves at once and the storage slows down, and the running step must finish first.
SAVE_MARGIN = 2.0
_CMD_TIMEOUT = 15.0
_CHUNK = 256 << 20

# Filesystem types every node of a cluster mounts the same way (by /proc/mounts fstype).
SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "fuse.ceph-fuse", "glusterfs",
    "fuse.glusterfs", "wekafs", "panfs", "pvfs2", "orangefs", "gfs2", "ocfs2", "cifs", "smb3", "smbfs",
    "afs", "dvs", "fuse.juicefs", "fuse.moosefs", "fuse.mfs", "fuse.lizardfs", "quobyte", "fuse.quobyte",
    "fuse.sshfs",
})
# In memory, gone when the job leaves the node.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})
# Disks of this machine (and container layers over them).
LOCAL_DISK_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "vfat", "exfat", "ntfs", "ntfs3", "jfs",
    "reiserfs", "overlay", "fuse.overlayfs", "squashfs",
})
_NODE_LOCAL_PATHS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/local", "/scratch/local")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?)([bB]?)\s*$")
_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One line of the report: which check, pass/warn/fail, and what was found or what to change."""

    check: str
    status: str
    detail: str


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """What the doctor checks against: the training command's settings."""

    directory: str | None
    signal: signal.Signals
    requeue_signals: tuple[signal.Signals, ...]
    exit_signals: tuple[signal.Signals, ...]
    lead_seconds: float | None
    state_bytes: int | None
    signal_timeout: float = 20.0
    imports: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Proc:
    """A process on the way from Slurm to this one: pid, name, command line, whether it traps the signal."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    catches: bool | None


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """How to send the signal so that it travels the path Slurm's would: a command or a pid."""

    how: str  # one line: what is sent, to whom, and what it proves
    command: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()  # or kill() these, in this order
    status: str = PASS  # the row's status when the signal arrives
    ranks: int = 1  # tasks of an srun step that must be ready before it is sent


# ---------------------------------------------------------------- pure decisions

def parse_size(text: str | int) -> int:
    """``3GB`` (decimal), ``3GiB`` (binary), ``500M``, ``1.5g``, ``1024`` (bytes) to a number of bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text}: give a positive size")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"size {text!r}: give a number with an optional unit, e.g. 3GB, 512MiB or 1024")
    number, unit, binary, _ = match.groups()
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


def _unescape_mount(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_mount(path: str, mounts_text: str) -> tuple[str, str] | None:
    """(mount point, fstype) of the filesystem holding ``path`` (absolute, resolved), from ``/proc/mounts``."""
    best: tuple[str, str] | None = None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape_mount(fields[1]), fields[2]
        inside = path == point or path.startswith(point.rstrip("/") + "/") or point == "/"
        # The last matching line wins among equal mount points: it is the one mounted on top.
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def _under(path: str, prefixes: Sequence[str]) -> str | None:
    for prefix in prefixes:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return None


def classify_filesystem(path: str, mount: tuple[str, str] | None) -> Row:
    """Whether other nodes see ``path``: a shared filesystem passes, node-local ones warn."""
    name = "directory shared"
    if mount is None:
        return Row(name, WARN, f"{path}: filesystem not found in /proc/mounts; make sure every node sees it")
    point, fstype = mount
    where = f"{path} is on {fstype} (mounted at {point})"
    if fstype in SHARED_FILESYSTEMS:
        return Row(name, PASS, f"{where}, a shared filesystem")
    elsewhere = ("a requeued job may start on another node, find no checkpoint there and start over; "
                 "use storage every node mounts (NFS, Lustre, GPFS, BeeGFS, CephFS, ...)")
    if fstype in MEMORY_FILESYSTEMS:
        return Row(name, WARN, f"{where}: node-local memory, gone when the job leaves the node; {elsewhere}")
    local = _under(path, _NODE_LOCAL_PATHS)
    if fstype in LOCAL_DISK_FILESYSTEMS:
        kind = f"node-local ({local})" if local else "a local disk of this node"
        return Row(name, WARN, f"{where}: {kind}; {elsewhere}")
    if local:
        return Row(name, WARN, f"{where}: {local} is node-local on most clusters; {elsewhere}")
    return Row(name, WARN, f"{where}: unknown filesystem type; make sure every node sees this path")


def save_fits(seconds: float, size: int, budget: float | None, *, check: str, budget_name: str) -> Row:
    """A save of ``seconds`` against a ``budget``: fail unless it fits :data:`SAVE_MARGIN` times over."""
    rate = f"{human_size(size / seconds)}/s" if seconds > 0 else "instant"
    measured = f"a {human_size(size)} save took {seconds:.2f} s ({rate})"
    if budget is None:
        return Row(check, WARN, f"{measured}; no {budget_name} known to compare with "
                                f"(pass --lead or set JOBWRAP_GRACE_SECONDS)")
    needed = seconds * SAVE_MARGIN
    if needed > budget:
        return Row(check, FAIL,
                   f"{measured}: does not fit {SAVE_MARGIN:g} times in the {budget_name} of {budget:g} s. "
                   f"Raise the lead time (--signal=B:USR1@N, jobwrap submit --lead), save less, or use faster storage")
    return Row(check, PASS, f"{measured}: fits in the {budget_name} of {budget:g} s "
                            f"({budget / seconds if seconds > 0 else float('inf'):.1f} times over; "
                            f"plus one training step to reach the boundary)")


def is_jobwrap_run(cmdline: Sequence[str]) -> bool:
    """Whether a command line is ``jobwrap run ...`` (the script, or ``python -m jobwrap run``)."""
    args = list(cmdline)
    for i, arg in enumerate(args[:3]):
        if os.path.basename(arg) == "jobwrap":
            rest = [a for a in args[i + 1:] if not a.startswith("-")]
            return bool(rest) and rest[0] == "run"
    return False


def _describe(proc: Proc) -> str:
    return f"{proc.name} (pid {proc.pid})"


def plan_delivery(chain: Sequence[Proc], *, sig: signal.Signals, environ: Mapping[str, str],
                  scancel: bool = True) -> Delivery | Row:
    """How to send ``sig`` through the real launch path, or the row that says why it must not be sent.

    ``chain`` is this process, then its parents. Under Slurm the process right below
    ``slurmstepd`` is the batch shell (batch step) or the task (srun step):

    * batch step: ``scancel --batch`` signals that shell only, as ``--signal=B:`` does; it must
      be this process (``exec``) or a ``jobwrap run`` that forwards to processes that trap it;
    * srun step: ``scancel JOB.STEP`` signals every process of the step, as ``--signal``
      without ``B:`` does; each one between ``slurmstepd`` and this process must trap it, or it dies;
    * outside Slurm: to a ``jobwrap run`` right above, else to this process itself.

    Without ``scancel`` (a container) the same processes are signalled with ``kill()``, as
    slurmstepd would, and the row warns that Slurm's part was not tested.
    """
    name = sig.name
    short = name.removeprefix("SIG")
    me = chain[0]
    slurm = read_slurm_step(environ)
    job_id = slurm.job_id
    stepd = next((i for i, p in enumerate(chain) if p.name == "slurmstepd"), None)
    no_scancel = " (scancel is not on PATH, so Slurm's own part was not tested)"
    if job_id and stepd is not None and stepd > 0:
        below = list(chain[:stepd])  # this process ... the one slurmstepd started
        root = below[-1]
        step = slurm.step_id
        if slurm.in_srun_step:
            blockers = [p for p in below[1:] if p.catches is not True]
            if blockers:
                return Row("signal delivery", FAIL, (
                    f"{_describe(blockers[0])} stands between srun and this process and does not trap "
                    f"{name}: --signal={short}@N (no B:) signals every process of the step, so it would "
                    f"die and end the task. Exec the training command (bash -c '...; exec \"$@\"', as the "
                    f"jobwrap templates do) or start it with jobwrap run"))
            if not scancel:
                return Delivery(how=f"with kill() to this task's processes {[p.pid for p in below]}, as "
                                    f"slurmstepd does for --signal={short}@N{no_scancel}",
                                pids=tuple(p.pid for p in reversed(below)), status=WARN)
            target = f"{job_id}.{step}"
            return Delivery(how=f"with scancel --signal={short} {target} to every task of step {step}, "
                                f"as --signal={short}@N does",
                            command=("scancel", f"--signal={short}", target), ranks=slurm.tasks)
        if root is me or (is_jobwrap_run(root.cmdline) and root.catches is not False):
            who = ("which is this process (exec)" if root is me else
                   f"jobwrap run (pid {root.pid}), which forwarded it here")
            if not scancel:
                return Delivery(how=f"with kill() to the batch shell, {who}, as slurmstepd does "
                                    f"for --signal=B:{short}@N{no_scancel}", pids=(root.pid,), status=WARN)
            return Delivery(how=f"with scancel --signal={short} --batch {job_id} to the batch shell, {who}, "
                                f"as --signal=B:{short}@N does",
                            command=("scancel", f"--signal={short}", "--batch", job_id))
        if root.catches:
            return Row("signal delivery", WARN, (
                f"not sent: the batch shell {_describe(root)} traps {name} itself, and whether it passes it "
                f"on to training cannot be told from here (a bash trap runs only after its foreground "
                f"child exits). Use exec jobwrap run -- CMD in the batch script"))
        return Row("signal delivery", FAIL, (
            f"not sent: the batch shell {_describe(root)} does not trap {name}, so --signal=B:{short}@N "
            f"would kill it and end the job without a checkpoint. Start training with "
            f"exec jobwrap run -- CMD in the batch script (or jobwrap submit)"))
    if job_id:
        return Delivery(how=(f"to this process itself: SLURM_JOB_ID={job_id} but no slurmstepd above it "
                             f"(an salloc shell, or a container that hides it); run jobwrap doctor from the "
                             f"batch script or under srun, outside any container, to test Slurm's path"),
                        pids=(me.pid,), status=WARN)
    parent = chain[1] if len(chain) > 1 else None
    if parent is not None and is_jobwrap_run(parent.cmdline) and parent.catches is not False:
        return Delivery(how=f"outside Slurm, to jobwrap run (pid {parent.pid}), which forwarded it here",
                        pids=(parent.pid,))
    return Delivery(how=("outside Slurm, to this process itself: only the handler was tested; "
                         "run jobwrap doctor in the batch script to test Slurm's path"), pids=(me.pid,))


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def place(environ: Mapping[str, str]) -> str:
    """Where the doctor runs, for the report's first line: the Slurm job and this task's rank, or outside Slurm."""
    job = read_env(environ)
    where = f"Slurm job {job.job_id}" if job.scheduler == "slurm" else "outside Slurm"
    tasks = str(read_slurm_step(environ).step_tasks or environ.get("WORLD_SIZE") or "1")
    return where + (f", rank {job.rank} of {tasks}" if tasks != "1" else "")


def parse_record(line: str) -> dict[str, str]:
    """One ``scontrol show -o`` line of ``Key=Value`` pairs (values may hold spaces)."""
    keys = list(_KEY.finditer(line))
    return {m.group(1): line[m.end(): keys[i + 1].start() if i + 1 < len(keys) else len(line)].strip()
            for i, m in enumerate(keys)}


# ---------------------------------------------------------------- observations

def process_chain(signum: int) -> list[Proc]:
    """This process and its parents, each with whether it traps ``signum``."""
    import psutil

    from jobwrap._scheduler.supervisor import catches

    chain = []
    me = psutil.Process()
    for proc in [me] + me.parents():
        try:
            chain.append(Proc(proc.pid, proc.name(), tuple(proc.cmdline()), catches(proc.pid, signum)))
        except psutil.Error:  # gone, or not ours to read
            chain.append(Proc(proc.pid, "?", (), None))
    return chain


def _c_level_handler(signum: int) -> bool | None:
    """Whether this process has a handler for ``signum`` at the C level (``/proc/self/status`` SigCgt)."""
    from jobwrap._scheduler.supervisor import catches

    return catches(os.getpid(), signum)


def _run(run: Runner, command: Sequence[str], timeout: float = _CMD_TIMEOUT, **options: Any) -> tuple[int, str]:
    """(exit code, stdout or the one line saying why it failed); 127 when the command is missing, 124 on timeout."""
    done = run_command(command, run=run, timeout=timeout, **options)
    return done.returncode, done.stdout if done.ok else done.reason


# ---------------------------------------------------------------- checks

def check_handler(settings: Settings, environ: Mapping[str, str]) -> Row:
    """(b) Nothing else owns the signal here: no Python or C handler, not blocked; USR1 vs NCCL."""
    sig, name = settings.signal, settings.signal.name
    check = "signal handler"
    for module in ("torch", "torch.distributed") + settings.imports:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is worth one line
            return Row(check, FAIL, f"cannot import {module} to see its handlers: {type(exc).__name__}: {exc}")
    imported = ", ".join(("torch",) + settings.imports)
    if sig not in settings.requeue_signals + settings.exit_signals:
        return Row(check, FAIL, (
            f"training does not trap {name}: JOBWRAP_REQUEUE_SIGNALS is "
            f"{','.join(s.name for s in settings.requeue_signals)}. Export JOBWRAP_REQUEUE_SIGNALS="
            f"{name.removeprefix('SIG')} (jobwrap submit --signal sets both)"))
    # Blocked: by `jobwrap task` (srun layouts) so that an early signal waits, or inherited from a
    # launcher. Either way jobwrap's trap unblocks it once installed, so it is delivered then.
    blocked = sig in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    held = "; held (blocked) until jobwrap's handler is installed" if blocked else "; not blocked"
    current = signal.getsignal(sig)
    if callable(current):
        owner = f"{getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', current)}"
        return Row(check, FAIL, (f"{name} already has a Python handler ({owner}) after importing {imported}: "
                                 f"jobwrap would replace it. Use another signal (jobwrap submit --signal USR2)"))
    if _c_level_handler(sig):
        return Row(check, FAIL, (f"a C library handles {name} in this process after importing {imported}: "
                                 f"jobwrap's handler would replace it. Use another signal (--signal USR2)"))
    notes = []
    if current == signal.SIG_IGN:
        notes.append(f"{name} is ignored (inherited from the launcher); jobwrap's handler replaces that, "
                     f"but check that no process between Slurm and training ignores it too")
    if sig == signal.SIGUSR1 and _nccl_possible(environ):
        notes.append("NCCL may be used here and may take SIGUSR1 for itself; if checkpoints do not happen, "
                     "switch to USR2 (jobwrap submit --signal USR2)")
    if notes:
        return Row(check, WARN, "; ".join(notes))
    return Row(check, PASS, f"no other handler for {name} after importing {imported}{held}")


def _nccl_possible(environ: Mapping[str, str]) -> bool:
    if any(key.startswith(("NCCL_", "TORCH_NCCL_")) for key in environ):
        return True
    import torch

    return bool(torch.cuda.is_available())


def check_delivery(settings: Settings, environ: Mapping[str, str], *, run: Runner = subprocess.run,
                   chain: Sequence[Proc] | None = None,
                   which: Callable[[str], str | None] = shutil.which) -> Row:
    """(a) The signal reaches this process through the real launch path, within ``signal_timeout``."""
    sig = settings.signal
    check = "signal delivery"
    # Training's own trap (which also unblocks a signal `jobwrap task` held). Installed before
    # anything is sent, and kept until the end of the doctor (run_checks puts the previous
    # handler back), so a late second copy of the signal cannot kill it.
    trap = SignalTrap([sig], registry=read_env(environ).trainers_dir).install()
    plan = plan_delivery(chain if chain is not None else process_chain(sig), sig=sig, environ=environ,
                         scancel=which("scancel") is not None)
    if isinstance(plan, Row):
        return plan
    rank = read_slurm_step(environ).task
    ready = _step_ready_dir(settings, environ) if plan.ranks > 1 else None
    if plan.ranks > 1:
        if ready is None:
            return Row(check, WARN, f"not sent: the {plan.ranks} tasks agree on when to send it through files in "
                                    f"the checkpoint directory, which is not usable")
        with open(os.path.join(ready, f"ready-{rank}"), "w"):
            pass
        if rank != 0:
            # Rank 0 may wait up to signal_timeout for the other tasks before it sends.
            if not trap.wait(2 * settings.signal_timeout):
                return Row(check, FAIL, f"rank {rank}: no {sig.name} within {2 * settings.signal_timeout:g} s "
                                        f"of being ready; rank 0 sends it ({plan.how})")
            return Row(check, plan.status, f"arrived on rank {rank}: {plan.how}")
    try:
        return _send_and_wait(plan, settings, run, trap, ready)
    finally:
        if ready is not None:  # rank 0, the last to need it
            shutil.rmtree(ready, ignore_errors=True)


def _send_and_wait(plan: Delivery, settings: Settings, run: Runner, trap: SignalTrap,
                   ready: str | None) -> Row:
    """Rank 0 (or the only process): wait for the step's tasks to be ready, send, wait for the arrival."""
    sig, check = settings.signal, "signal delivery"
    deadline = time.monotonic() + settings.signal_timeout
    while ready is not None and len([n for n in os.listdir(ready) if n.startswith("ready-")]) < plan.ranks:
        if time.monotonic() > deadline:
            return Row(check, FAIL, f"not sent: only some of the {plan.ranks} tasks were ready within "
                                    f"{settings.signal_timeout:g} s (files in {ready})")
        time.sleep(0.05)
    sent = time.monotonic()
    if plan.command:
        # Its own session: scancel to a step signals every process of the step, scancel included
        # where Slurm tracks processes by group. Where it tracks them by cgroup, scancel dies of
        # the signal it sent (-signum), and the signal was sent.
        code, out = _run(run, plan.command, start_new_session=True)
        if code not in (0, -sig):
            return Row(check, FAIL, f"{' '.join(plan.command)} failed: {out.strip()}")
    else:
        for pid in plan.pids:
            os.kill(pid, sig)
    if not trap.wait(settings.signal_timeout):
        return Row(check, FAIL, f"no {sig.name} within {settings.signal_timeout:g} s; sent {plan.how}")
    return Row(check, plan.status, f"arrived in {trap.first_time - sent:.2f} s; sent {plan.how}")


def _step_ready_dir(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """A directory, the same for every task of this step, in the (shared) checkpoint directory."""
    if not settings.directory:
        return None
    slurm = read_slurm_step(environ)
    # A requeued job reuses its id and step numbers: the restart keeps an earlier run's files apart.
    path = os.path.join(settings.directory,
                        f".jobwrap-doctor-{slurm.job_id or ''}.{slurm.step_id or ''}.{slurm.restart_count}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return path


def check_requeue(environ: Mapping[str, str], *, run: Runner = subprocess.run,
                  which: Callable[[str], str | None] = shutil.which) -> Row:
    """(c) ``scontrol`` answers for this job, or which fallback would requeue it."""
    check = "requeue"
    job = read_env(environ)
    if job.scheduler != "slurm":
        if job.requeue_file:
            return Row(check, PASS, "outside Slurm, under jobwrap run: it relaunches training when asked")
        return Row(check, WARN, (f"outside Slurm and not under jobwrap run: a requeue request ends training "
                                 f"with exit {REQUEUE_EXIT_CODE} and nothing relaunches it; use jobwrap run"))
    scontrol = which("scontrol")
    if scontrol is None:
        problem = "scontrol is not on PATH here"
    else:
        code, out = _run(run, [scontrol, "show", "job", "-o", job.job_id or ""])
        if code == 0 and out.strip():
            record = parse_record(out.strip().splitlines()[0])
            if record.get("Requeue") == "0":
                return Row(check, FAIL, (f"job {job.job_id} is not requeueable (Requeue=0: --no-requeue, or "
                                         f"JobRequeue=0 on this cluster); add #SBATCH --requeue"))
            return Row(check, PASS, (f"scontrol show job {job.job_id} works (Requeue={record.get('Requeue', '?')}, "
                                     f"Restarts={record.get('Restarts', '?')}): training runs scontrol requeue "
                                     f"{job.job_id} once its checkpoint is committed"))
        problem = f"scontrol show job {job.job_id} failed: {out.strip()}"
    if job.requeue_file:
        return Row(check, WARN, (f"{problem}; fallback: training touches JOBWRAP_REQUEUE_FILE and the batch "
                                 f"script's jobwrap run (outside any container) runs scontrol requeue"))
    if read_slurm_step(environ).in_srun_step:
        return Row(check, WARN, (f"{problem}; fallback: training exits {REQUEUE_EXIT_CODE} and the batch "
                                 f"script requeues on it (as the jobwrap multi-gpu/multi-node templates do)"))
    return Row(check, FAIL, (f"{problem}, and no jobwrap run above training to requeue it: nothing would "
                             f"requeue this job. Start training with exec jobwrap run -- CMD in the batch "
                             f"script (it runs outside the container, where scontrol is)"))


def check_writable(directory: str | None) -> tuple[Row, str | None]:
    """(d) The checkpoint directory takes a file through the store's commit protocol; returns a scratch dir in it."""
    check = "directory writable"
    if not directory:
        return Row(check, FAIL, "no checkpoint directory: pass --dir or set JOBWRAP_DIR"), None
    store = CheckpointStore(directory)
    scratch = None
    try:
        store.ensure_directory()
        scratch = tempfile.mkdtemp(prefix=".jobwrap-doctor-", dir=store.directory)
        CheckpointStore(scratch).prove_commit()
    except OSError as exc:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        return Row(check, FAIL, f"{store.directory}: {describe_oserror(exc, option='--dir')}"), None
    return Row(check, PASS, f"{store.directory}: a file commits as a checkpoint does "
                            f"(write, fsync, rename, directory fsync) and reads back"), scratch


def check_shared(directory: str, mounts_text: str | None = None) -> Row:
    """(d) Other nodes see the checkpoint directory: its filesystem type from ``/proc/mounts``."""
    path = os.path.realpath(directory)
    if mounts_text is None:
        try:
            with open("/proc/mounts") as f:
                mounts_text = f.read()
        except OSError as exc:
            return Row("directory shared", WARN, f"cannot read /proc/mounts ({exc.strerror}); "
                                                 f"make sure every node sees {path}")
    return classify_filesystem(path, find_mount(path, mounts_text))


def time_save(scratch: str, state_bytes: int) -> tuple[float, int]:
    """Seconds to save and commit a state of ``state_bytes`` in ``scratch`` (as jobwrap does), and its size."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, Any] = {}
    left, i = state_bytes, 0
    while left > 0:
        n = min(left, _CHUNK)
        # Random bytes in a storage of its own per tensor: zeros would flatter a compressing
        # filesystem, and views of one storage are written once.
        words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(generator=generator)
        tensors[f"t{i}"] = words.view(torch.uint8)[:n].clone() if n % 8 else words.view(torch.uint8)
        left, i = left - n, i + 1
    payload = {"model": tensors, "epoch": 0, "step": 0, "jobwrap": {"format": 1, "doctor": True}}
    store = CheckpointStore(scratch)
    started = time.monotonic()
    checkpoint = store.save(payload, step=0, epoch=0, meta={"reason": "jobwrap doctor"})
    return time.monotonic() - started, checkpoint.size


def grace_time(environ: Mapping[str, str], *, run: Runner = subprocess.run,
               which: Callable[[str], str | None] = shutil.which) -> tuple[float | None, str]:
    """The partition's GraceTime when its jobs can be preempted (None otherwise), and a note why."""
    partition = read_slurm_step(environ).partition
    scontrol = which("scontrol")
    if not partition or scontrol is None:
        return None, "not in a Slurm job" if not partition else "scontrol is not on PATH"
    code, out = _run(run, [scontrol, "show", "partition", "-o", partition.split(",")[0]])
    if code != 0 or not out.strip():
        return None, f"scontrol show partition {partition} failed: {out.strip()}"
    record = parse_record(out.strip().splitlines()[0])
    mode = record.get("PreemptMode", "")
    if mode.upper().startswith("OFF"):
        return None, f"partition {partition} is not preempted (PreemptMode=OFF)"
    return float(_int(record.get("GraceTime"), 0)), f"partition {partition}, PreemptMode={mode}"


def check_saves(settings: Settings, scratch: str | None, environ: Mapping[str, str], *,
                run: Runner = subprocess.run) -> list[Row]:
    """(e) A save of ``state_bytes`` against the lead time and the partition's GraceTime."""
    rank = read_env(environ).rank
    if rank != 0:
        return [Row("save time", PASS, f"skipped on rank {rank}: rank 0 writes the checkpoints")]
    if settings.state_bytes is None:
        return [Row("save time", WARN, "not measured: pass --state-bytes SIZE, the size of one checkpoint (e.g. 3GB)")]
    if scratch is None:
        return [Row("save time", FAIL, "not measured: the checkpoint directory is not usable")]
    import psutil

    available = psutil.virtual_memory().available
    if settings.state_bytes * 1.2 > available:
        return [Row("save time", WARN, f"not measured: a {human_size(settings.state_bytes)} state does not fit in "
                                       f"the {human_size(available)} of free memory here")]
    seconds, size = time_save(scratch, settings.state_bytes)
    rows = [save_fits(seconds, size, settings.lead_seconds, check="save vs lead time",
                      budget_name="signal lead time")]
    grace, why = grace_time(environ, run=run)
    if grace is not None:
        if grace <= 0:
            rows.append(Row("save vs GraceTime", WARN, f"{why}: GraceTime=0, a preempted job is sent SIGTERM "
                                                       f"at once and killed KillWait later"))
        else:
            rows.append(save_fits(seconds, size, grace, check="save vs GraceTime",
                                  budget_name=f"GraceTime ({why})"))
    elif read_env(environ).scheduler == "slurm":
        rows.append(Row("save vs GraceTime", PASS, why))
    return rows


def check_measured_lead(settings: Settings, environ: Mapping[str, str], *, run: Runner = subprocess.run) -> list[Row]:
    """(f) From a run already in the directory: its measured step and signal saves against the lead time
    and the partition's GraceTime (jobwrap/_report/leadtime.py); nothing before the run has saved."""
    from jobwrap._report.leadtime import check_directory

    grace = grace_time(environ, run=run)[0] if read_env(environ).scheduler == "slurm" else None
    found = check_directory(settings.directory, lead=settings.lead_seconds, grace=grace)
    return [] if found is None else [Row("lead time (measured)", *found)]


def run_checks(settings: Settings, environ: Mapping[str, str] | None = None, *,
               run: Runner = subprocess.run) -> list[Row]:
    """Every check, in order; the signal's previous handler is restored at the end."""
    environ = os.environ if environ is None else environ
    previous = signal.getsignal(settings.signal)
    rows = [check_handler(settings, environ)]
    try:
        rows.append(check_delivery(settings, environ, run=run))
        rows.append(check_requeue(environ, run=run))
        writable, scratch = check_writable(settings.directory)
        rows.append(writable)
        if settings.directory and scratch is not None:
            rows.append(check_shared(settings.directory))
        try:
            rows += check_saves(settings, scratch, environ, run=run)
            rows += check_measured_lead(settings, environ, run=run)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        signal.signal(settings.signal, previous if previous is not None else signal.SIG_DFL)
    return rows
