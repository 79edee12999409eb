"""Preemption as a test: run a training command, signal it at step N, relaunch, compare runs.

Real processes and real signals. The training process holds at each requested
step boundary (``JOBWRAP_TEST_HOLD_AT``) until the signal has arrived, so
"preempted at step 17" means exactly step 17, with no sleeps and no races::

    from jobwrap.testing import run_preempted, assert_same_run

    plain = run_preempted(["python", "train.py"], tmp_path / "a")
    cut = run_preempted(["python", "train.py"], tmp_path / "b", preempt_at=[5, 17, 32])
    assert cut.preemptions == 3
    assert_same_run(plain.directory, cut.directory)

With pytest, the ``jobwrap_preempt`` fixture gives the same with ``tmp_path`` filled in.
``jobwrap simulate`` is :func:`simulate`: a plain run and a preempted one of the user's command, compared.
For a job launched some other way (submitit, sbatch), set ``JOBWRAP_TEST_HOLD_AT`` and
``JOBWRAP_TEST_CONTROL`` in its environment and call :func:`signal_when_held`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from jobwrap._config import DIR_OVERRIDE, ENV_VARS
from jobwrap._loop import trace as step_trace
from jobwrap._loop.hold import done_name, got_name, held_pattern, held_rank
from jobwrap._loop.trace import TRACE_FILE
from jobwrap._report.divergence import Divergence, explain, where
from jobwrap._report.history import summarize
from jobwrap._storage.events import EVENTS_FILE, read_events
from jobwrap._storage.lock import HOLDER_FILE, LOCK_FILE
from jobwrap._storage.store import RUN_FILE, CheckpointStore
from jobwrap.errors import ConfigError

__all__ = ["PreemptedRun", "run_preempted", "signal_when_held", "final_state", "assert_same_run",
           "assert_same_state", "step_diagnosis"]


@dataclasses.dataclass
class PreemptedRun:
    """What happened: exit status, output, at which steps the signal was sent."""

    returncode: int
    stdout: str
    stderr: str
    directory: Path
    signalled_at: list[int]
    asked: list[int] = dataclasses.field(default_factory=list)  # the steps preempt_at named

    @property
    def preemptions(self) -> int:
        return len(self.signalled_at)

    def check(self) -> "PreemptedRun":
        """The run finished (exit 0) and was signalled at every step asked for.

        A run that never reached a step (it finished earlier, or resumed past it)
        was never preempted there: passing it would make a preemption test that cannot fail.
        """
        if self.returncode != 0:
            raise AssertionError(f"run exited with {self.returncode}\n--- stderr tail ---\n{self.stderr[-3000:]}")
        missed = [step for step in self.asked if step not in self.signalled_at]
        if missed:
            raise AssertionError(
                f"asked to preempt at steps {self.asked} but signalled at {self.signalled_at}: the run never held at "
                f"{missed} (it ended before them, or resumed past them from checkpoints already in {self.directory})"
                f"\n--- stderr tail ---\n{self.stderr[-3000:]}")
        return self


def run_preempted(command: Sequence[str], directory: str | os.PathLike, *,
                  preempt_at: Iterable[int] = (), signal_: int | Sequence[int] = signal.SIGUSR1,
                  env: Mapping[str, str] | None = None, run_args: Sequence[str] = (),
                  ranks: int = 1, target_ranks: Sequence[int] | None = None,
                  to_group: bool = False, supervised: bool = True, fresh: bool = False,
                  resume: bool = False, trace: bool = False, timeout: float = 300) -> PreemptedRun:
    """Run ``command`` under ``jobwrap run`` and send ``signal_`` when it reaches each step in ``preempt_at``.

    By default the signal goes to the supervisor, which forwards it to the
    training processes and relaunches them when they ask to be requeued, as
    Slurm would. With ``target_ranks`` it goes straight to those ranks only
    (``ranks`` training processes must all reach the step first). With
    ``to_group`` it goes to every process of the run (its process group, with
    DataLoader workers and launchers), as a plain ``scancel`` or an ``srun``
    step's signal does. ``supervised=False`` runs ``command`` itself, without
    ``jobwrap run`` (nothing relaunches it). ``signal_`` may be several signals
    (``[SIGUSR1, SIGTERM]``: a warning, then a cancel): they are sent in order,
    and the hold ends once the targets have seen every one. On a timeout every
    Python process of the run dumps its stack into the error.

    A directory that already holds a run is refused when ``preempt_at`` asks for
    signals: the command would resume it (a finished run trains nothing), never
    reach the steps, and the test could not fail. ``fresh=True`` deletes that run
    first (a jobwrap directory only); ``resume=True`` continues it on purpose.

    ``trace=True`` records a digest of the state at every step boundary in the
    directory (``JOBWRAP_TEST_TRACE``): :func:`assert_same_run` then names the first
    step that differs and the likely cause.
    """
    directory = Path(directory)
    pending = sorted(set(preempt_at))
    _claim(directory, preempting=bool(pending), fresh=fresh, resume=resume)
    signals = [signal_] if isinstance(signal_, int) else list(signal_)
    control = Path(tempfile.mkdtemp(prefix="jobwrap-control-"))
    run_env = {**os.environ, **(env or {}), "JOBWRAP_DIR": str(directory),
               "JOBWRAP_TEST_CONTROL": str(control), "PYTHONFAULTHANDLER": "1",
               "JOBWRAP_TEST_HOLD_AT": ",".join(str(s) for s in pending),
               **({"JOBWRAP_TEST_TRACE": "1"} if trace else {})}
    argv = [sys.executable, "-m", "jobwrap", "run", *run_args, "--", *command] if supervised else list(command)
    out_path, err_path = control / "stdout", control / "stderr"
    signalled: list[int] = []
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, env=run_env, stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    _dump_stacks(proc.pid)
                    raise AssertionError(f"run did not finish within {timeout:.0f} s: {list(command)}\n"
                                         f"--- stderr tail (with every process's stack) ---\n"
                                         f"{err_path.read_text()[-6000:]}")
                for step in list(pending):
                    held = _held(control, step)
                    if len(held) < ranks:
                        continue
                    targets = list(held) if target_ranks is None else list(target_ranks)
                    for sig in signals:
                        if to_group:
                            os.killpg(proc.pid, sig)  # start_new_session: the group of the run
                        else:
                            for pid in [proc.pid] if target_ranks is None else [held[r] for r in targets]:
                                os.kill(pid, sig)
                    _release(control, step, targets, deadline, want=len(set(signals)))
                    pending.remove(step)
                    signalled.append(step)
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    return PreemptedRun(returncode=proc.returncode, stdout=out_path.read_text(), stderr=err_path.read_text(),
                        directory=directory, signalled_at=signalled, asked=sorted(set(preempt_at)))


def _claim(directory: Path, *, preempting: bool, fresh: bool, resume: bool) -> None:
    """Refuse (or, with ``fresh``, empty) a directory whose run a preemption test would only resume."""
    if fresh and resume:
        raise ConfigError("run_preempted(fresh=True, resume=True): choose one, fresh deletes the run that resume "
                          "would continue")
    held = _held_run(directory)
    if held is None or resume:
        return
    if fresh:
        foreign = [p.name for p in directory.iterdir() if not _jobwrap_entry(p.name)]
        if foreign:
            raise ConfigError(f"run_preempted(fresh=True) will not delete {directory}: besides a jobwrap run it holds "
                              f"{sorted(foreign)[:5]}; give a directory of its own")
        shutil.rmtree(directory)
        return
    if preempting:
        raise ConfigError(f"{directory} already holds a run ({held}): preempted there, the command would resume it "
                          f"and might never reach the steps asked for. Pass fresh=True to delete it and start "
                          f"clean, resume=True to continue it on purpose, or use a new directory")


def _held_run(directory: Path) -> str | None:
    """What run ``directory`` holds (its newest checkpoint, its end), or None where it holds none."""
    if not directory.is_dir():
        return None
    events = read_events(str(directory))
    committed = CheckpointStore(str(directory)).committed()
    if not events and not committed:
        return None
    parts = [f"checkpoint at step {committed[0].step}" if committed else "no checkpoint"]
    exits = [e for e in events if e.get("event") == "exit"]
    if exits:
        parts.append("finished" if exits[-1].get("reason") == "finished" else f"last exit {exits[-1].get('code')}")
    return ", ".join(parts)


def _jobwrap_entry(name: str) -> bool:
    """A name jobwrap writes in a checkpoint directory (checkpoints, manifests, folders, events, lock, temporaries)."""
    return name.startswith(("step-", ".tmp-")) or name in (EVENTS_FILE, RUN_FILE, LOCK_FILE, HOLDER_FILE, TRACE_FILE)


def signal_when_held(control: str | os.PathLike, step: int, send: Callable[[dict[int, int]], None], *,
                     ranks: int = 1, timeout: float = 300) -> None:
    """Wait until ``ranks`` processes hold at ``step``, call ``send``, release them once it arrived.

    For jobs started by another driver with ``JOBWRAP_TEST_CONTROL=control`` and
    ``JOBWRAP_TEST_HOLD_AT`` in their environment. ``send`` gets ``{rank: pid}``
    of the held processes and delivers the signal its own way (``os.kill``,
    ``scancel --signal=USR2 JOB``); the hold ends when every rank has seen it.
    """
    control = Path(control)
    deadline = time.monotonic() + timeout
    _wait_for(lambda: len(_held(control, step)) >= ranks, deadline,
              f"{ranks} process(es) did not reach step {step} within {timeout:.0f} s (control: {control})")
    held = _held(control, step)
    send(held)
    _release(control, step, list(held), deadline)


def _held(control: Path, step: int) -> dict[int, int]:
    """{rank: pid} of the processes holding at ``step`` (each writes its pid into held-STEP-rRANK)."""
    return {held_rank(p.name): int(p.read_text())
            for p in control.glob(held_pattern(step)) if p.read_text().strip()}


def _release(control: Path, step: int, targets: list[int], deadline: float, want: int = 1) -> None:
    """Wait until ``targets`` saw ``want`` kinds of signal, then let every rank go on; relaunches pass the step."""
    _wait_for(lambda: all(len(_seen(control / got_name(step, r))) >= want for r in targets),
              deadline, f"ranks {targets} did not see the {want} signal(s) at step {step}")
    (control / done_name(step)).touch()


def _seen(path: Path) -> set[str]:
    """The signal names a held process wrote into its got-STEP-rRANK file (one or more once it exists)."""
    try:
        return set(path.read_text().split()) or {"?"}
    except FileNotFoundError:
        return set()


def _wait_for(condition: Any, deadline: float, message: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.005)


def _dump_stacks(pid: int) -> None:
    """SIGABRT every process of the run: with PYTHONFAULTHANDLER each prints its Python stack."""
    import psutil

    try:
        members = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in members:
        try:
            proc.send_signal(signal.SIGABRT)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(members, timeout=5)


def final_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The newest committed checkpoint of a directory, verified and loaded with ``weights_only=True``
    (striped tensors put back, sharded state gathered into full tensors as if rank 0 had saved it)."""
    from jobwrap._loop import payload

    store = CheckpointStore(os.fspath(directory))
    committed = store.committed()
    if not committed:
        raise AssertionError(f"no committed checkpoint in {directory}")
    return payload.whole(store, committed[0])


def assert_same_state(a: Any, b: Any, path: str = "checkpoint") -> None:
    """Bit-for-bit equality of two loaded checkpoints (tensors, numbers, nested containers)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise AssertionError(f"{path}: tensor vs {type(b).__name__}")
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            raise AssertionError(f"{path}: tensors differ (max abs diff "
                                 f"{(a.double() - b.double()).abs().max().item() if a.shape == b.shape else 'n/a'})")
        return
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise AssertionError(f"{path}: keys differ: only in first {sorted(map(str, set(a) - set(b)))}, "
                                 f"only in second {sorted(map(str, set(b) - set(a)))}")
        for key in a:
            assert_same_state(a[key], b[key], f"{path}[{key!r}]")
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            raise AssertionError(f"{path}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
        return
    if a != b and not (a != a and b != b):  # NaN equals NaN here
        raise AssertionError(f"{path}: {a!r} != {b!r}")


def assert_same_run(first: str | os.PathLike, second: str | os.PathLike) -> None:
    """The final checkpoints of two runs are identical, apart from the run's identity; and where both runs
    were traced (``run_preempted(trace=True)``, the ``jobwrap_preempt`` fixture), every step's state too.

    A failure names the first step whose state differs, what differs there and the likely cause.
    """
    a, b = final_state(first), final_state(second)
    for state in (a, b):
        state["jobwrap"].pop("run_id", None)
        state["jobwrap"].get("dcp", {}).pop("files", None)  # checksums: DCP's .metadata holds a random save id
        state["jobwrap"].get("dcp", {}).pop("bytes", None)
        state["jobwrap"].pop("stripes", None)  # where the tensors were written, not what they hold
        state["jobwrap"].pop("format", None)  # the layout (one file or striped), likewise
    diagnosis = step_diagnosis(first, second)
    try:
        assert_same_state(a, b)
    except AssertionError as exc:
        if diagnosis is None:
            raise
        raise AssertionError(f"{exc}\n{diagnosis[1]}\n{diagnosis[2]}") from None
    if diagnosis is not None:
        raise AssertionError(f"the final checkpoints are equal, but a step is not\n{diagnosis[1]}\n{diagnosis[2]}")


def step_diagnosis(first: str | os.PathLike, second: str | os.PathLike) -> tuple[Divergence, str, str] | None:
    """Where the traced run ``second`` first differs from ``first``: (the evidence, a line naming the step and
    what differs there with the loss if the script keeps one, 'cause: what it means and what to do'); None
    where every step both recorded is equal, or either run has no trace."""
    plain, cut = step_trace.read(first), step_trace.read(second)
    if not plain or not cut:
        return None
    return explain(plain, cut)


# ---------------------------------------------------------------- jobwrap simulate

#: The record ``jobwrap simulate`` leaves in its work directory; it also marks the directory as its own.
SIMULATE_RECORD = "simulate.json"


@dataclasses.dataclass
class Simulation:
    """What ``jobwrap simulate`` found: where the signal went, every launch of the preempted run, each check."""

    signal: signal.Signals
    steps: list[int]
    signalled: list[int]
    total_steps: int
    runs: list[PreemptedRun]
    checks: list[tuple[str, bool, str]]  # (check, passed, detail)
    diagnosis: tuple[Divergence, str, str] | None = None  # the first step that differs, what, the cause
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


class SimulationFailed(Exception):
    """The simulation stopped before its checks; ``run`` is the launch whose output shows why."""

    def __init__(self, message: str, run: PreemptedRun | None = None) -> None:
        super().__init__(message)
        self.run = run


def random_steps(count: int, total: int, seed: int) -> list[int]:
    """``count`` distinct steps in ``[0, total)`` from ``seed`` (fewer when the run is shorter)."""
    return sorted(random.Random(seed).sample(range(total), min(count, total)))


def quick_step(trace: Sequence[dict[str, Any]] | None, total: int) -> int:
    """The one step ``--quick`` preempts at: the middle of the run, inside an epoch.

    Mid-epoch, because state carried from batch to batch (a hidden state, a running
    average) is lost only there: an epoch's start resets it in the uninterrupted run
    too, so a preemption there would pass a wrong adoption. From the uninterrupted run's
    trace: a step with a batch done before it and one after it in the same epoch.
    """
    middle = max(total // 2, 1) if total else 0
    records = [r for r in trace or () if "objects" in r]
    steps_of = {(r["epoch"], r["step"]) for r in records}
    inside = [r["step"] for r in records if r.get("position", 0) > 0 and (r["epoch"], r["step"] + 1) in steps_of]
    return min(inside, key=lambda step: (abs(step - middle), step)) if inside else middle


def prepare_workdir(work: Path) -> None:
    """Make ``work`` ready: new or empty, or an earlier simulate's whose two runs are replaced."""
    if work.exists() and any(work.iterdir()):
        if not (work / SIMULATE_RECORD).exists():
            raise ConfigError(f"--dir {work} is not empty and was not made by jobwrap simulate; "
                              f"choose a new directory")
        for name in ("plain", "preempted", "plain.log", "preempted.log", SIMULATE_RECORD):
            path = work / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / SIMULATE_RECORD).write_text("{}\n")


def _write_log(path: Path, runs: Sequence[PreemptedRun]) -> None:
    with open(path, "w") as f:
        for run in runs:
            f.write(run.stdout)
            f.write(run.stderr)


def preempt_and_relaunch(command: Sequence[str], directory: Path, steps: Sequence[int], sig: signal.Signals,
                         timeout: float, trace: bool = False) -> tuple[list[PreemptedRun], list[int]]:
    """Run under ``jobwrap run``, signalled at ``steps``; relaunch after an exit signal's stop, as Slurm would.

    A requeue signal's relaunch happens inside ``jobwrap run``; an exit signal
    (TERM) ends it, and the job comes back only because the scheduler requeues
    it, so that is done here. Returns every invocation and the steps signalled.
    """
    runs: list[PreemptedRun] = []
    signalled: list[int] = []
    remaining = list(steps)
    for restart in range(len(steps) + 1):
        env = {DIR_OVERRIDE: str(directory), **({"JOBWRAP_RESTART_COUNT": str(restart)} if restart else {})}
        run = run_preempted(command, directory, preempt_at=remaining, signal_=sig, timeout=timeout, env=env,
                            resume=bool(restart), trace=trace)
        runs.append(run)
        signalled += run.signalled_at
        remaining = [s for s in remaining if s not in run.signalled_at]
        events = read_events(str(directory))
        stopped = bool(events) and events[-1].get("event") == "exit" and any(
            e.get("event") == "stop" for e in events[-3:])
        if run.returncode != 128 + sig or not run.signalled_at or not stopped:
            break
    return runs, signalled


def resume_checks(plain: Path, cut: Path, steps: Sequence[int], signalled: Sequence[int],
                  returncode: int) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for each thing a good resume guarantees."""
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
        unseeded = unseeded_streams(final_state(plain), final_state(cut))
        results.append(("same final checkpoint", False, (
            f"only the {' and '.join(unseeded)} random stream(s) differ, everything else is equal: never "
            f"seeded, so two plain runs would differ too; seed them at the start of the script "
            f"(random.seed(0), numpy.random.seed(0))") if unseeded else str(exc).splitlines()[0][:200]))
    return results


def step_check(plain: Path, cut: Path) -> tuple[tuple[str, bool, str], tuple[Divergence, str, str] | None]:
    """The check row that compares the two runs step by step, and the diagnosis where a step differs."""
    if step_trace.read(plain) is None or step_trace.read(cut) is None:
        # Rank 0 records at every boundary, so a run that has a checkpoint has a trace: this is another layout.
        return ("same at every step", True, "no step trace recorded: only the final checkpoint is compared"), None
    diagnosis = step_diagnosis(plain, cut)
    if diagnosis is None:
        return ("same at every step", True, "every step's state equal to the uninterrupted run's"), None
    d = diagnosis[0]
    return ("same at every step", False, f"first differs at step {d.step}, {where(d)}"), diagnosis


_SEEDABLE = {"python": "Python", "numpy": "NumPy"}


def unseeded_streams(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The Python/NumPy streams that alone make two final checkpoints differ ([] if anything else differs).

    Each rank holds every stream twice where a ``job.loader`` ran: its current
    state, and the loader's copy from the epoch's start (to rebuild the epoch's
    order). An unseeded stream differs in both; neither is a tensor difference.
    """
    differ = []
    for name in _SEEDABLE:
        streams = [[_pop_stream(rank, name) for rank in state["jobwrap"]["ranks"]] for state in (a, b)]
        try:
            assert_same_state(*streams)
        except AssertionError:
            differ.append(_SEEDABLE[name])
    for state in (a, b):
        state["jobwrap"].pop("run_id", None)
    try:
        assert_same_state(a, b)
    except AssertionError:
        return []
    return differ


def _pop_stream(rank: dict[str, Any], name: str) -> list[Any]:
    """Take the stream ``name`` out of a rank's entry: its current state, then the loader's epoch-start copy."""
    epoch = rank.get("data", {}).get("epoch") if isinstance(rank.get("data"), dict) else None
    copies = [rank.get("rng", {}), epoch.get("rng", {}) if isinstance(epoch, dict) else {}]
    return [copy.pop(name, None) if isinstance(copy, dict) else None for copy in copies]


def _final_step(plain: PreemptedRun, log: Path) -> int:
    """The step of the uninterrupted run's last checkpoint, or why there is nothing to compare with."""
    where = plain.directory
    if plain.returncode != 0:
        raise SimulationFailed(f"the uninterrupted run failed with exit {plain.returncode} (log: {log})", plain)
    if not read_events(str(where)):
        raise SimulationFailed(f"the command wrote nothing to {where}: it must take its checkpoint directory from "
                               f"{ENV_VARS['directory']} or {DIR_OVERRIDE}, which simulate sets", plain)
    committed = CheckpointStore(str(where)).committed()
    if not committed:
        raise SimulationFailed("the uninterrupted run committed no checkpoint, so there is no final state to "
                               "compare: end training with job.save() (job.epochs() does it for you)", plain)
    return committed[0].step


def simulate(command: Sequence[str], work: Path, *, sig: signal.Signals, at: Sequence[int] | None = None,
             count: int = 3, seed: int = 0, quick: bool = False, timeout: float = 1800,
             say: Callable[[str], None] = print) -> Simulation:
    """``jobwrap simulate``: run ``command`` uninterrupted in ``work/plain``, then preempted with ``sig`` in
    ``work/preempted`` at ``at`` (or ``count`` random steps from ``seed``; ``quick``: one step, mid-epoch in
    the middle of the run), and check the resume: every preemption, no step lost, every step's state and the
    final checkpoint equal to the uninterrupted run's. Where a step differs, ``diagnosis`` names the first,
    what differs there and the known cause.

    ``say`` gets a line as each run starts. Raises :class:`ConfigError` for a work
    directory or steps that cannot be used, :class:`SimulationFailed` when the
    uninterrupted run gives nothing to compare with. The outcome is recorded in
    ``work/simulate.json``, each run's output in ``work/plain.log`` and ``work/preempted.log``.
    """
    began = time.monotonic()
    prepare_workdir(work)
    plain_dir, cut_dir = work / "plain", work / "preempted"
    say(f"1/2 uninterrupted run in {plain_dir}")
    plain = run_preempted(command, plain_dir, timeout=timeout, env={DIR_OVERRIDE: str(plain_dir)}, trace=True)
    _write_log(work / "plain.log", [plain])
    total = _final_step(plain, work / "plain.log")
    if at is not None:
        steps = list(at)
    elif quick:
        steps = [quick_step(step_trace.read(plain_dir), total)]
    else:
        steps = random_steps(count, total, seed)
    beyond = [s for s in steps if s > total]  # at `total`: the boundary after the last step
    if beyond:
        raise ConfigError(f"steps {beyond} are beyond the run's last step ({total}); choose steps up to {total}")
    say(f"2/2 the same command, {sig.name} at steps {', '.join(map(str, steps))}, in {cut_dir}")
    runs, signalled = preempt_and_relaunch(command, cut_dir, steps, sig, timeout, trace=True)
    _write_log(work / "preempted.log", runs)
    checks = resume_checks(plain_dir, cut_dir, steps, signalled, runs[-1].returncode)
    row, diagnosis = step_check(plain_dir, cut_dir)
    checks.insert(-1, row)
    result = Simulation(signal=sig, steps=steps, signalled=signalled, total_steps=total, runs=runs,
                        checks=checks, diagnosis=diagnosis, seconds=round(time.monotonic() - began, 1))
    record = {"command": list(command), "signal": sig.name, "steps": steps, "signalled": signalled,
              "total_steps": total, "passed": result.passed, "seconds": result.seconds,
              "checks": [{"check": n, "passed": ok, "detail": d} for n, ok, d in result.checks]}
    if diagnosis is not None:
        record["first_difference"] = dataclasses.asdict(diagnosis[0])
        record["summary"], record["cause"] = diagnosis[1], diagnosis[2]
    (work / SIMULATE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return result


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional for users of the helpers
    pytest = None

if pytest is not None:
    @pytest.fixture
    def jobwrap_preempt(tmp_path: Path):
        """``run(command, name, preempt_at=[...])`` with a fresh directory under ``tmp_path`` per name, each
        step traced (``trace=True``), so that :func:`assert_same_run` names the first step that differs."""
        def run(command: Sequence[str], name: str = "run", **kwargs: Any) -> PreemptedRun:
            kwargs.setdefault("trace", True)  # assert_same_run then names the first step that differs, and why
            return run_preempted(command, tmp_path / name, **kwargs)
        return run
