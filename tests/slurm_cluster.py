"""Helpers for tests against the local Slurm cluster of scripts/slurm-local.

Every call to a Slurm command and every wait is bounded; a failed wait raises
AssertionError carrying the job's record, its output tail and the daemon log tails.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = [
    "FINAL_STATES",
    "accounted_runs",
    "SlurmError",
    "cancel",
    "cluster_available",
    "daemon_log_tail",
    "job_info",
    "job_state",
    "output_tail",
    "parse_record",
    "restart_count",
    "sbatch",
    "wait_for",
]

CMD_TIMEOUT = 15.0
# States after which a job's record no longer changes (a requeue goes through PENDING).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
)
HOW_TO_START = 'scripts/slurm-local up && eval "$(scripts/slurm-local env)"'
# A key starts after whitespace; `TRES=cpu=1,node=1` keeps its inner '=' in the value.
_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")

JobInfo = dict[str, str]


class SlurmError(RuntimeError):
    """A Slurm command failed or answered something unexpected."""


def _run(args: list[str], timeout: float = CMD_TIMEOUT) -> str:
    """Runs a Slurm client command; its stdout, or SlurmError naming command and stderr."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(args)} did not answer within {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def cluster_available() -> tuple[bool, str]:
    """Whether the local cluster answers, and if not, why (a skip reason)."""
    if reason := os.environ.get("JOBWRAP_SLURM_UNAVAILABLE"):
        return False, reason
    if not os.environ.get("SLURM_CONF"):
        return False, f"SLURM_CONF is not set; start the local cluster: {HOW_TO_START}"
    if shutil.which("scontrol") is None:
        return False, f"scontrol is not installed; {HOW_TO_START} installs it"
    try:
        out = _run(["scontrol", "ping"], timeout=10)
    except SlurmError as exc:
        return False, f"scontrol ping failed ({exc}); {HOW_TO_START}"
    if "is UP" not in out:
        return False, f"slurmctld is not up ({out.strip()}); {HOW_TO_START}"
    return True, "up"


def sbatch(script: str | os.PathLike[str], *args: str, cwd: str | os.PathLike[str] | None = None) -> str:
    """Submits a batch script with extra sbatch options; returns the job id."""
    chdir = [f"--chdir={os.fspath(cwd)}"] if cwd is not None else []
    out = _run(["sbatch", "--parsable", *chdir, *args, os.fspath(script)])
    job_id = out.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {out!r}, expected a job id")
    return job_id


def parse_record(line: str) -> JobInfo:
    """Parses one `scontrol show -o` line of Key=Value pairs (values may hold spaces)."""
    keys = list(_KEY.finditer(line))
    return {
        m.group(1): line[m.end(): keys[i + 1].start() if i + 1 < len(keys) else len(line)].strip()
        for i, m in enumerate(keys)
    }


def job_info(job_id: str) -> JobInfo:
    """The job's `scontrol show job -o` record as a dict."""
    out = _run(["scontrol", "show", "job", "-o", job_id])
    # A job array or het job prints one line per component; ours are plain jobs.
    return parse_record(out.strip().splitlines()[0])


def job_state(job_id: str) -> str:
    """The job's state word, e.g. PENDING, RUNNING, COMPLETED."""
    return job_info(job_id)["JobState"]


def restart_count(info: Mapping[str, str] | str) -> int:
    """How many times the job was requeued (`Restarts=`), from a record or a job id."""
    record = job_info(info) if isinstance(info, str) else info
    return int(record.get("Restarts", "0"))


ACCOUNTING_FIELDS = ("JobID", "State", "ExitCode", "Start", "End")


def accounted_runs(job_id: str, *, last_state: str | None = None, timeout: float = 30.0) -> list[dict[str, str]]:
    """Every run of a job in Slurm's accounting (``sacct --duplicates``), oldest first.

    A requeued job has one record per run. slurmctld sends records to slurmdbd
    asynchronously, so with ``last_state`` this waits (bounded) until the newest
    record is in that state.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = _run(["sacct", "--duplicates", "--allocations", "--parsable2", "--noheader", "-j", job_id,
                    "-o", ",".join(ACCOUNTING_FIELDS)])
        runs = [dict(zip(ACCOUNTING_FIELDS, line.split("|"))) for line in out.splitlines() if line]
        if last_state is None or (runs and runs[-1]["State"] == last_state):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct: job {job_id}'s newest run is not {last_state} after {timeout:.0f} s: "
                                 f"{runs}\n{daemon_log_tail()}")
        time.sleep(0.5)


def cancel(*job_ids: str) -> None:
    """Cancels jobs, ignoring ones already gone; for test cleanup."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=CMD_TIMEOUT, check=False)


def _tail(path: Path, lines: int) -> str:
    """The last lines of a file, or a note that it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc.strerror})"


def output_tail(info: Mapping[str, str] | str, lines: int = 30) -> str:
    """The tail of the job's stdout file, from a record or a job id."""
    record = job_info(info) if isinstance(info, str) else info
    path = record.get("StdOut")
    return _tail(Path(path), lines) if path else "(job has no StdOut)"


def _conf_value(key: str) -> str | None:
    """A setting of the slurm.conf named by SLURM_CONF (keys are case-insensitive)."""
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        return None
    try:
        text = Path(conf).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, value = line.split("#", 1)[0].strip().partition("=")
        if sep and name.strip().lower() == key.lower():
            return value.strip()
    return None


def daemon_log_tail(lines: int = 30) -> str:
    """The last lines of the slurmctld, slurmd and slurmdbd logs, headed by their paths."""
    parts = []
    dbd_log = Path(os.environ.get("SLURM_CONF", ".")).parent / "log" / "slurmdbd.log"
    if dbd_log.exists():
        parts.append(f"----- {dbd_log}\n{_tail(dbd_log, lines)}")
    for key in ("SlurmctldLogFile", "SlurmdLogFile"):
        path = _conf_value(key)
        if path:  # SlurmdLogFile has %n, the node's name: one log per node
            for log in sorted(Path(path).parent.glob(Path(path).name.replace("%n", "*"))):
                parts.append(f"----- {log}\n{_tail(log, lines)}")
        else:
            parts.append(f"----- {key}: not found in SLURM_CONF={os.environ.get('SLURM_CONF')}")
    return "\n".join(parts)


def _failure(job_id: str, why: str, info: Mapping[str, str] | None) -> AssertionError:
    """An AssertionError telling what was awaited, with the job's record, output and daemon logs."""
    record = " ".join(f"{k}={v}" for k, v in info.items()) if info else "(no record)"
    output = output_tail(info) if info else "(unknown)"
    return AssertionError(
        f"job {job_id}: {why}\n----- job record\n{record}\n----- job output\n{output}\n{daemon_log_tail()}"
    )


def wait_for(
    job_id: str,
    states: Iterable[str] | None = None,
    predicate: Callable[[JobInfo], bool] | None = None,
    timeout: float = 60.0,
    poll: float = 0.2,
) -> JobInfo:
    """Polls until the job is in one of `states` and `predicate` holds; returns its record.

    Fails at once when the job reaches a final state that cannot satisfy the wait, and
    after `timeout` seconds otherwise.
    """
    wanted = frozenset(states) if states is not None else None
    if wanted is None and predicate is None:
        raise ValueError("wait_for needs states, a predicate, or both")
    what = " and ".join(
        ([f"state in {sorted(wanted)}"] if wanted is not None else [])
        + ([f"{getattr(predicate, '__name__', 'predicate')}() to hold"] if predicate is not None else [])
    )
    deadline = time.monotonic() + timeout
    info: JobInfo | None = None
    while True:
        try:
            info = job_info(job_id)
        except SlurmError as exc:
            raise _failure(job_id, f"no record while waiting for {what}: {exc}", info) from exc
        state = info.get("JobState", "")
        if (wanted is None or state in wanted) and (predicate is None or predicate(info)):
            return info
        if state in FINAL_STATES:
            raise _failure(job_id, f"ended {state} while waiting for {what}", info)
        if time.monotonic() >= deadline:
            raise _failure(job_id, f"still {state} after {timeout:.0f}s waiting for {what}", info)
        time.sleep(poll)
