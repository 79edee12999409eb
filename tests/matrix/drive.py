"""Run one matrix cell for real: the uninterrupted reference, then the preempted run, and compare.

The launches (plain process with a relaunch loop, ``jobwrap run``, ``jobwrap run --
torchrun`` with 2 ranks, a submitit job under submitit's LocalExecutor, Slurm) and the
signals (USR1, scancel's TERM to every process, USR1 then TERM, a second signal during
the save, SIGKILL after periodic saves) are real. The training process holds at each chosen step boundary
(jobwrap's JOBWRAP_TEST_HOLD_AT protocol) until the signal is there, so every
preemption point is exact and nothing depends on timing.

:func:`run_cell` returns an :class:`Outcome`: ``exact``, ``refused`` (the start
failed with a jobwrap error, the text given), ``diverged`` or ``failed`` (with why).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import psutil
from cells import CANCELS, CLUSTER_LAUNCHES, LIGHTNING_VALIDATES_AFTER, SUBMITIT_LAUNCHES, Cell, expected

import jobwrap.errors
from jobwrap._config import REQUEUE_EXIT_CODE
from jobwrap._loop.hold import done_name, got_name, held_pattern, held_rank
from jobwrap._storage.events import read_events
from jobwrap.testing import assert_same_run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TRAIN = HERE / "train_matrix.py"
SUBMIT = HERE / "submitit_launch.py"  # one launch of a submitit cell: submits the job and waits for it
TIMEOUT = 240  # seconds for one run (all its launches); a hang fails with every process's stack
PERIODIC_EVERY = 2  # JOBWRAP_SAVE_EVERY_STEPS of the sigkill cells
_ERROR = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt)): (.+)$", re.M)
JOBWRAP_ERRORS = frozenset(name for name in dir(jobwrap.errors) if name.endswith("Error"))


@dataclasses.dataclass
class Outcome:
    """What a cell did: ``exact``, ``refused`` (with the error text), ``diverged`` or ``failed`` (with why)."""

    kind: str
    detail: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class Run:
    """One training run, possibly over several launches."""

    directory: Path
    codes: list[int]
    signalled: list[int]
    output: str
    problems: list[str]
    #: Each checkpoint data file seen committed after a launch: whether its manifest records striped parts.
    layouts: dict[str, bool] = dataclasses.field(default_factory=dict)

    def loss_lines(self, rank: int = 0) -> list[str]:
        path = Path(f"{self.directory}.loss.r{rank}")
        return path.read_text().splitlines() if path.exists() else []


# ---------------------------------------------------------------- commands

def command(cell: Cell, loss_log: Path) -> list[str]:
    """The argv of one launch of ``cell``'s training."""
    train = [sys.executable, str(TRAIN), json.dumps(cell.training()), str(loss_log)]
    if cell.launch in SUBMITIT_LAUNCHES:
        return [sys.executable, str(SUBMIT), json.dumps(cell.training()), str(loss_log), f"{loss_log}.submitit",
                *(["--slurm"] if cell.launch == "submitit_slurm" else [])]
    if cell.launch == "plain":
        return train
    if cell.launch == "torchrun":
        train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 *train[1:]]
    return [sys.executable, "-m", "jobwrap", "run", "--", *train]


def environment(cell: Cell, directory: Path, control: Path | None, hold_at: list[int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWRAP_", "SLURM_", "MATRIX_"))}
    env.update(JOBWRAP_DIR=str(directory), PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if control is not None:
        env.update(JOBWRAP_TEST_CONTROL=str(control), JOBWRAP_TEST_HOLD_AT=",".join(map(str, hold_at)))
    if cell.signal == "sigkill":
        env["JOBWRAP_SAVE_EVERY_STEPS"] = str(PERIODIC_EVERY)
    if cell.signal == "double" and control is not None:
        env["MATRIX_HOLD_SAVE"] = str(control)
    if cell.layout == "striped":
        env["JOBWRAP_STRIPE_MIN_BYTES"] = "0"  # the matrix's state is a few KB
    if cell.launch in SUBMITIT_LAUNCHES:  # the job unpickles train_matrix.submitit_train
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])
        env["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"  # the matrix's requeue signal is submitit's preemption signal
    return env


# ---------------------------------------------------------------- running

class Launcher:
    """Runs a cell's launches one after another: relaunches after a requeue exit (plain process) and,
    like a user resubmitting, after a launch that the test cancelled or killed."""

    def __init__(self, cell: Cell, directory: Path, control: Path | None, hold_at: list[int]) -> None:
        self.cell, self.directory, self.control = cell, directory, control
        self.env = environment(cell, directory, control, hold_at)
        self.current: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.signalled: list[int] = []
        self.codes: list[int] = []
        self.layouts: dict[str, bool] = {}
        self.output = directory.parent / f"{directory.name}.out"

    def run(self, deadline: float, max_launches: int) -> None:
        restart = 0
        while len(self.codes) < max_launches:
            seen = len(self.signalled)
            env = {**self.env, "JOBWRAP_RESTART_COUNT": str(restart)}
            with open(self.output, "a") as out:
                out.write(f"=== launch {len(self.codes) + 1}\n")
                out.flush()
                with self.lock:
                    self.current = subprocess.Popen(command(self.cell, Path(f"{self.directory}.loss")), env=env,
                                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                code = self._wait(deadline)
            self.codes.append(code)
            self.layouts.update(checkpoint_layouts(self.directory))  # before a later launch's retention
            if code == 0:
                return
            if code == REQUEUE_EXIT_CODE and self.cell.launch == "plain":
                restart += 1
                continue
            if len(self.signalled) > seen and self.cell.signal in CANCELS:
                continue  # the user resubmits after a cancel, or after the node died
            return

    def _wait(self, deadline: float) -> int:
        proc = self.current
        try:
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _dump_stacks(proc.pid)
            raise AssertionError(f"{self.cell.id}: a launch did not end within {TIMEOUT} s; output:\n"
                                 f"{self.output.read_text()[-6000:]}") from None
        finally:
            _kill_group(proc.pid, signal.SIGKILL)  # leftovers (workers, ranks) of this launch

    def send(self, signum: int, *, group: bool = False, descendants: bool = False) -> None:
        """``signum`` to the launch's first process, to its process group, or (``descendants``) also to every
        process it started in a session of its own (torchrun starts its ranks so)."""
        with self.lock:
            proc = self.current
        if proc is None or proc.poll() is not None:
            return
        members = []
        if descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                members = psutil.Process(proc.pid).children(recursive=True)
        if group:
            _kill_group(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signum)


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _dump_stacks(pid: int) -> None:
    """SIGABRT every process of the launch: with PYTHONFAULTHANDLER each prints its stack into the output."""
    _kill_group(pid, signal.SIGABRT)
    time.sleep(2)


class Signaller(threading.Thread):
    """Waits for the training to hold at each step of ``points`` and delivers the cell's signal there."""

    def __init__(self, launcher: Launcher, points: list[int], ranks: int, stop: threading.Event,
                 deadline: float) -> None:
        super().__init__(daemon=True)
        self.launcher, self.points, self.ranks, self.stop, self.deadline = launcher, points, ranks, stop, deadline
        self.control = launcher.control
        self.problems: list[str] = []

    def run(self) -> None:
        for step in self.points:
            if not self._wait(lambda: len(self._held(step)) >= self.ranks):
                self.problems.append(f"never held at step {step}")
                return
            self.launcher.signalled.append(step)
            self.deliver(step)
            (self.control / done_name(step)).touch()

    def deliver(self, step: int) -> None:
        """The cell's signal, the way the scheduler or the user sends it."""
        send, kind = self.launcher.send, self.launcher.cell.signal
        if kind == "sigkill":
            send(signal.SIGKILL, group=True, descendants=True)  # the node died: torchrun's ranks die too
            return
        if kind in ("usr1", "usr1_term", "double"):
            self.usr1(step)
        if kind in ("term", "usr1_term"):
            send(signal.SIGTERM, group=True)  # scancel: TERM to every process of the job
        self._wait(lambda: all((self.control / got_name(step, r)).exists() for r in self._held(step)))
        if kind == "double":
            (self.control / done_name(step)).touch()
            if self._wait(lambda: (self.control / f"saving-{step}").exists()):
                self.usr1(step)
                time.sleep(0.2)  # let it land while the save waits (the save must not depend on this)
            else:
                self.problems.append(f"the signal's save at step {step} never started")
            (self.control / f"second-{step}").touch()

    def usr1(self, step: int) -> None:
        """USR1 to the launch's first process; in a submitit job to the training task (the pid it holds with),
        as Slurm's ``--signal=USR1`` reaches the task: submitit's local controller has no handler for it."""
        if self.launcher.cell.launch not in SUBMITIT_LAUNCHES:
            self.launcher.send(signal.SIGUSR1)
            return
        for pid in self._held(step).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def _held(self, step: int) -> dict[int, int]:
        held = {}
        for path in self.control.glob(held_pattern(step)):
            text = path.read_text().strip()
            if text:
                held[held_rank(path.name)] = int(text)
        return held

    def _wait(self, condition: Callable[[], bool]) -> bool:
        while not condition():
            if self.stop.is_set() or time.monotonic() > self.deadline:
                return False
            time.sleep(0.01)
        return True


def train(cell: Cell, directory: Path, points: Sequence[int] = ()) -> Run:
    """Run ``cell``'s training in ``directory``, signalled at each step of ``points`` (none: uninterrupted)."""
    points = sorted(points)
    control = Path(tempfile.mkdtemp(prefix="matrix-control-", dir=directory.parent)) if points else None
    launcher = Launcher(cell, directory, control, points)
    deadline = time.monotonic() + TIMEOUT
    stop = threading.Event()
    signaller = Signaller(launcher, points, cell.ranks, stop, deadline) if points else None
    if signaller:
        signaller.start()
    try:
        launcher.run(deadline, max_launches=len(points) + 2)
    finally:
        stop.set()
        if signaller:
            signaller.join(timeout=30)
    problems = list(signaller.problems) if signaller else []
    return Run(directory, launcher.codes, launcher.signalled, launcher.output.read_text(), problems,
               launcher.layouts)


def checkpoint_layouts(directory: Path) -> dict[str, bool]:
    """Each committed checkpoint's data file in ``directory``: whether its manifest records striped parts."""
    layouts = {}
    for path in directory.glob("step-*.json"):
        try:
            manifest = json.loads(path.read_text())
            layouts[manifest["file"]] = bool(manifest.get("stripes"))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a manifest, or one a save is replacing: the judge needs only those it can read
    return layouts


# ---------------------------------------------------------------- judging

def preemption_points(reference: Run, framework: str = "loop", fit_option: str = "none") -> list[int]:
    """Mid-epoch (an odd step: mid-accumulation too) and the first epoch boundary, from the reference's log.

    Lightning's epoch end is no boundary (docs/integrations.md): a signal there is honoured after the
    next epoch's first step, so its cells are signalled there. With val_check_interval, the mid-epoch
    signal comes at the batch before the validation, instead of step 3.
    """
    lines = [line.split("\t") for line in reference.loss_lines()]
    epochs = [int(epoch) for _, epoch, _ in lines]
    boundary = epochs.count(0) if len(set(epochs)) > 1 else len(lines) // 2
    if framework == "lightning":
        boundary += 1
    middle = LIGHTNING_VALIDATES_AFTER if fit_option == "val_check_interval" else 3
    return sorted({middle, boundary})


def refusal(run: Run, *, in_first_epoch: bool = False) -> str | None:
    """The jobwrap error a run refused to start with (before training a step, or with ``in_first_epoch``
    within the first epoch), or None."""
    error = last_error(run)
    trained = run.loss_lines()
    early = not trained or (in_first_epoch and all(line.split("\t")[1] == "0" for line in trained))
    if run.codes[-1:] != [0] and early and error.split(":")[0] in JOBWRAP_ERRORS:
        return error
    return None


def last_error(run: Run) -> str:
    """The last exception line of a run's output (every rank's), or the output's tail."""
    errors = _ERROR.findall(run.output)
    return f"{errors[-1][0]}: {errors[-1][1]}" if errors else f"exit codes {run.codes}: {run.output[-600:]}"


def judge(cell: Cell, reference: Run, cut: Run) -> Outcome:
    """Compare a preempted run with the reference: signals, exit codes, events, losses, final state."""
    problems = list(cut.problems)
    if cut.codes[-1:] != [0]:
        problems.append(f"exit codes {cut.codes}, not ending in 0")
    events = read_events(str(cut.directory))
    requeues = [e["step"] for e in events if e["event"] == "requeue"]
    if cell.signal in ("term", "usr1_term") and any(c in (0, REQUEUE_EXIT_CODE) for c in cut.codes[:-1]):
        problems.append(f"exit codes {cut.codes}: a cancelled launch ended as finished or requeued")
    if cell.signal == "sigkill":
        problems += _kill_problems(events, cut.signalled)
    if cell.signal in CANCELS and requeues:
        problems.append(f"requeued at {requeues} after a cancel (TERM) or a kill")
    if cell.signal not in CANCELS and requeues != cut.signalled:
        problems.append(f"requeued at {requeues}, signalled at {cut.signalled}")
    if cell.signal != "sigkill":
        saved = sorted({e["step"] for e in events if e["event"] == "save"
                        and str(e.get("reason", "")).startswith("signal")})
        if saved != cut.signalled:
            problems.append(f"signal checkpoints at {saved}, signalled at {cut.signalled}")
    if cell.layout == "striped":
        problems += _striping_problems(cell, events, {**cut.layouts, **checkpoint_layouts(cut.directory)})
    for rank in range(cell.ranks):
        problems += _compare_losses(cell, reference.loss_lines(rank), cut.loss_lines(rank), rank)
    try:
        assert_same_run(reference.directory, cut.directory)
    except AssertionError as exc:
        return Outcome("diverged", "; ".join(problems + [f"final state: {str(exc)[:300]}"]))
    if cut.codes[-1:] != [0]:
        problems.append(f"last error: {last_error(cut)}")
    if problems:
        kind = "failed" if cut.codes[-1:] != [0] else "diverged"
        return Outcome(kind, "; ".join(problems))
    return Outcome("exact")


def _kill_problems(events: list[dict], signalled: list[int]) -> list[str]:
    """Each SIGKILL ended the training: the next launch resumed at or before the step it was killed at."""
    resumed = [e["step"] for e in events if e["event"] == "start"][1:]
    if len(resumed) < len(signalled) or any(r > s for r, s in zip(resumed, signalled)):
        return [f"killed at steps {signalled}, but the relaunches resumed at {resumed}: a kill did not stop "
                f"the training"]
    return []


def _striping_problems(cell: Cell, events: list[dict], layouts: dict[str, bool]) -> list[str]:
    """A striped cell wrote striped checkpoints, and (but after a SIGKILL, which resumes from a periodic
    one-file save) resumed from striped ones only: otherwise it could pass without testing striping."""
    if not any(layouts.values()):
        return [f"no striped checkpoint written (JOBWRAP_STRIPE_MIN_BYTES=0); manifests seen: {sorted(layouts)}"]
    resumed = [os.path.basename(e["resumed_from"]) for e in events if e["event"] == "start" and e.get("resumed_from")]
    one_file = [name for name in resumed if layouts.get(name) is False]
    if cell.signal != "sigkill" and one_file:
        return [f"resumed from one-file checkpoints {one_file}, not striped ones"]
    return []


def _compare_losses(cell: Cell, reference: list[str], cut: list[str], rank: int) -> list[str]:
    """Same losses at every step; no step trained twice unless a SIGKILL forced a redo from an older save."""
    expected = {line.split("\t")[0]: line for line in reference}
    wrong = [line for line in cut if expected.get(line.split("\t")[0]) != line]
    if wrong:
        step = wrong[0].split("\t")[0]
        return [f"rank {rank}: step {step} loss {wrong[0]!r}, reference {expected.get(step)!r}"]
    last = {line.split("\t")[0]: line for line in cut}
    if list(last.values()) != reference:
        return [f"rank {rank}: trained steps {list(last)} differ from the reference's {len(reference)}"]
    if cell.signal != "sigkill" and len(cut) != len(reference):
        again = sorted({s for s in (line.split("\t")[0] for line in cut) if
                        [x.split("\t")[0] for x in cut].count(s) > 1}, key=int)
        return [f"rank {rank}: steps {again} trained twice"]
    return []


class Matrix:
    """Runs cells under one base directory; each uninterrupted reference is run once and shared."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.references: dict[str, Run] = {}

    def reference(self, cell: Cell) -> Run:
        # One-file: a striped run must end where the uninterrupted one-file run ends (shared with its twin).
        reference_cell = dataclasses.replace(cell, signal="usr1", launch="torchrun" if cell.ranks == 2 else "plain",
                                             layout="one_file")
        key = json.dumps(reference_cell.training(), sort_keys=True)
        if key not in self.references:
            directory = Path(tempfile.mkdtemp(prefix="reference-", dir=self.base)) / "ck"
            self.references[key] = train(reference_cell, directory)
        return self.references[key]

    def run(self, cell: Cell) -> Outcome:
        started = time.monotonic()
        outcome = self._run(cell)
        outcome.seconds = round(time.monotonic() - started, 1)
        return outcome

    def _run(self, cell: Cell) -> Outcome:
        if cell.launch in CLUSTER_LAUNCHES:
            from slurm_driver import run_slurm_cell  # needs the local cluster

            return run_slurm_cell(self, cell)
        reference = self.reference(cell)
        early = expected(cell).in_first_epoch
        refused = refusal(reference, in_first_epoch=early)
        if refused is not None and cell.launch != "plain":  # refused under this cell's own launch too?
            own = train(dataclasses.replace(cell, signal="usr1"),
                        Path(tempfile.mkdtemp(prefix="start-", dir=self.base)) / "ck")
            if refusal(own, in_first_epoch=early) is None:
                return Outcome("failed", f"refused in a plain process ({refused}) but not under {cell.launch}: "
                                         f"exit codes {own.codes}")
            refused = refusal(own, in_first_epoch=early)
        if refused is not None:
            return Outcome("refused", refused)
        if reference.codes[-1:] != [0]:
            when = "after training" if reference.loss_lines() else "before the first step"
            return Outcome("failed", f"uninterrupted run failed {when}: {last_error(reference)}")
        directory = Path(tempfile.mkdtemp(prefix="cut-", dir=self.base)) / "ck"
        cut = train(cell, directory, preemption_points(reference, cell.framework, cell.fit_option))
        return judge(cell, reference, cut)
