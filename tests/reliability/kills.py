"""Kills at random: forked training processes SIGKILLed at random moments, inside chosen store phases
or at crash points; after each kill the directory must hold every commit, uncorrupted."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import tempfile
from typing import Callable

from .files import audit, flip_bit
from .forked import OnMessage, Trial, fork_trial, phase_at_end, training_child
from .internals import CRASH_POINTS, data_path
from .results import Campaign, Row


@dataclasses.dataclass
class KillFigures:
    """What the kill trials did and every way one went wrong: the figures of docs/reliability.md."""

    runs: int = 0
    killed: int = 0
    finished_first: int = 0
    crash_points: int = 0
    corrupt_loads: int = 0
    corrupt_committed: int = 0
    lost: int = 0
    resume_mismatch: int = 0
    child_errors: int = 0
    hung: int = 0
    leftovers: int = 0
    reported_commits: int = 0
    quarantined_on_purpose: int = 0
    torn_event_lines: int = 0
    phases: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def failures(self) -> int:
        return (self.corrupt_loads + self.corrupt_committed + self.lost + self.resume_mismatch
                + self.child_errors + self.hung + self.leftovers)


@dataclasses.dataclass
class Timing:
    """How long a whole trial (by save mode) and each store phase take on this machine."""

    total: dict[bool, float]
    phases: dict[str, float]


def calibrate(workdir: str, *, numel: int, steps: int) -> Timing:
    """Run a few trials to the end, timing them and each store phase, so that kills can be aimed."""
    probe = tempfile.mkdtemp(prefix="calibrate-", dir=workdir)
    total = {False: 0.0, True: 0.0}
    durations: dict[str, list[float]] = collections.defaultdict(list)
    for async_save in (False, True, False, True):
        trial = fork_trial(_child(probe, keep_last=2, steps=steps, numel=numel, async_save=async_save))
        total[async_save] = max(total[async_save], trial.seconds)
        opened: dict[str, float] = {}
        for stamp, words in trial.messages:
            if words[0] == "enter":
                opened[words[1]] = stamp
            elif words[0] == "leave" and words[1] in opened:
                durations[words[1]].append(stamp - opened.pop(words[1]))
    shutil.rmtree(probe, ignore_errors=True)
    return Timing(total, {p: max(0.0005, max(d)) for p, d in durations.items()})


def _child(directory: str, *, keep_last: int, steps: int, numel: int, async_save: bool,
           crash: tuple[str, int] | None = None) -> Callable:
    return training_child(directory, numel=numel, steps=steps, step_seconds=0.003, crash=crash, decisions=False,
                          run_id=None, keep_last=keep_last, save_every_steps=1, async_save=async_save)


@dataclasses.dataclass
class Kill:
    """When a trial dies: after ``delay`` seconds, or earlier at a crash point or inside an aimed phase."""

    delay: float
    crash: tuple[str, int] | None = None
    aimed: OnMessage | None = None

    def how(self, trial: Trial) -> str:
        if trial.find("crash"):
            return "crash point"
        return "aimed" if self.aimed and trial.seconds < self.delay else "delay"


def draw_kill(rng: random.Random, timing: Timing, total: float) -> Kill:
    """A random moment of a whole run; or, more often, a crash point or a moment inside a chosen phase.

    The child trains on until killed: a crash point or aimed phase not reached in
    time (a loaded machine) falls back to a kill at a random moment a run later.
    """
    kill = Kill(rng.uniform(0.0, 0.9 * total))
    draw = rng.random()
    if draw < 0.4:
        kill.crash = (rng.choice(CRASH_POINTS), rng.randint(1, 3))
        kill.delay += 2 * total
    elif draw < 0.75:
        phase = rng.choice(["resume", "save", "save", "retention", "events"])
        kill.aimed = _aim(rng, timing, phase, 1 if phase == "resume" else rng.randint(1, 3))
        kill.delay += 2 * total
    return kill


def _aim(rng: random.Random, timing: Timing, phase: str, nth: int) -> OnMessage:
    """Kill at a random moment inside the ``nth`` run of ``phase``."""
    seen = [0]

    def on_message(words: list[str], pid: int) -> float | None:
        if words[:2] == ["enter", phase]:
            seen[0] += 1
            if seen[0] == nth:
                return rng.uniform(0.0, 1.2 * timing.phases.get(phase, 0.005))
        return None
    return on_message


@dataclasses.dataclass
class Group:
    """Trials that share one directory: each starts from what the previous kill left."""

    directory: str
    keep_last: int
    async_save: bool
    numel: int
    must_survive: set[int] = dataclasses.field(default_factory=set)
    damaged: set[int] = dataclasses.field(default_factory=set)
    pick: int | None = None  # what the next resume must pick

    def audit(self) -> list[str]:
        """Audit the directory; the next resume must pick what the audit picks."""
        self.pick, problems, _ = audit(self.directory, numel=self.numel, keep_last=self.keep_last,
                                       must_survive=self.must_survive, damaged=self.damaged)
        return problems

    def rot_newest(self, rng: random.Random) -> None:
        """The newest checkpoint rots on disk: the resume must set it aside (and may be killed doing so)."""
        flip_bit(data_path(self.directory, self.pick), rng)
        self.damaged.add(self.pick)
        self.pick, _, good = audit(self.directory, numel=self.numel, keep_last=self.keep_last,
                                   must_survive=set(), damaged=self.damaged)
        self.must_survive = set(good)  # what retention removed earlier was replaced by what just rotted


def _count_death(figures: KillFigures, trial: Trial, kill: Kill, name: str) -> str:
    """Count how the trial ended and where; the phase it died in."""
    phase = phase_at_end(trial)
    if trial.hung:
        figures.hung += 1
        figures.problems.append(f"{name}: hung in {phase}")
    elif trial.code == -signal.SIGKILL:
        figures.killed += 1
        figures.crash_points += bool(trial.find("crash"))
        figures.phases[(phase, kill.how(trial))] += 1
    else:
        figures.finished_first += 1
        figures.phases[("finished before the kill", "delay")] += 1
    return phase


def _count_reports(figures: KillFigures, trial: Trial, group: Group, name: str) -> None:
    """What the child itself saw: errors, corrupt loads, the step it resumed, its commits."""
    for words in trial.find("error"):
        figures.child_errors += 1
        figures.problems.append(f"{name}: child error {' '.join(words)}")
    for words in trial.find("log"):
        text = " ".join(words)
        if "corrupt" in text and not any(f"step-{d:012d}" in text for d in group.damaged):
            figures.corrupt_loads += 1
            figures.problems.append(f"{name}: child saw {text}")
    if trial.find("content") and trial.find("content")[0] != ["ok"]:
        figures.corrupt_loads += 1
        figures.problems.append(f"{name}: resumed state differs from the checkpoint")
    resumed = trial.find("resumed")
    if resumed and int(resumed[0][0]) != (group.pick if group.pick is not None else -1):
        figures.resume_mismatch += 1
        figures.problems.append(f"{name}: resumed {resumed[0][0]}, audit expected {group.pick}")
    commits = {int(words[0]) for words in trial.find("commit")}
    figures.reported_commits += len(commits)
    group.must_survive |= commits


def _count_audit(figures: KillFigures, problems: list[str], where: str) -> None:
    for problem in problems:
        kind = problem.split(":")[0]
        if kind == "lost":
            figures.lost += 1
        elif kind == "corrupt-load":
            figures.corrupt_loads += 1
        else:
            figures.corrupt_committed += 1
        figures.problems.append(f"{where}: {problem}")


def _close_group(figures: KillFigures, group: Group, timeout: float) -> None:
    """A clean resume at the end of the group: same pick, nothing left over."""
    final = fork_trial(_child(group.directory, keep_last=group.keep_last, steps=0, numel=group.numel,
                              async_save=group.async_save), timeout=timeout)
    got = final.find("resumed")
    if not got or int(got[0][0]) != (group.pick if group.pick is not None else -1):
        figures.resume_mismatch += 1
        figures.problems.append(f"group end: resumed {got}, audit expected {group.pick}")
    names = os.listdir(group.directory)
    junk = [n for n in names if n.startswith(".tmp-") or (n.endswith(".pt") and n[:-3] + ".json" not in names)]
    if junk:
        figures.leftovers += len(junk)
        figures.problems.append(f"group end: leftovers after a clean start: {junk}")
    figures.torn_event_lines += torn_event_lines(group.directory)


def kill_campaign(runs: int, *, seed: int, workdir: str, group: int = 10,
                  numel: int = 1 << 18, steps: int = 12, verbose: bool = False) -> KillFigures:
    """``runs`` trials, each a forked training process SIGKILLed at a random moment or crash point.

    Trials run in groups of ``group`` on one directory, so each starts by
    resuming whatever the previous kill left. After each: :func:`audit`; the
    next trial's own resume must pick the same checkpoint; at the end of each
    group a clean resume must find no leftovers.
    """
    rng = random.Random(seed)
    figures = KillFigures()
    timing = calibrate(workdir, numel=numel, steps=steps)
    timeout = max(30.0, 20 * timing.total[True])
    while figures.runs < runs:
        shared = Group(tempfile.mkdtemp(prefix="kills-", dir=workdir), keep_last=rng.choice([1, 2, 3]),
                       async_save=rng.random() < 0.5, numel=numel)
        for _ in range(min(group, runs - figures.runs)):
            figures.runs += 1
            name = f"trial {figures.runs}"
            if shared.pick is not None and rng.random() < 0.08:
                shared.rot_newest(rng)
                figures.quarantined_on_purpose += 1
            kill = draw_kill(rng, timing, timing.total[shared.async_save])
            trial = fork_trial(_child(shared.directory, keep_last=shared.keep_last, steps=1_000_000, numel=numel,
                                      async_save=shared.async_save, crash=kill.crash),
                               kill_after=kill.delay, on_message=kill.aimed, timeout=timeout)
            phase = _count_death(figures, trial, kill, name)
            _count_reports(figures, trial, shared, name)
            _count_audit(figures, shared.audit(), f"{name} ({phase})")
            if verbose:
                print(f"    {name}: {phase}, commits {sorted(int(w[0]) for w in trial.find('commit'))}, "
                      f"pick {shared.pick}")
        _close_group(figures, shared, timeout)
        shutil.rmtree(shared.directory, ignore_errors=True)
    return figures


def torn_event_lines(directory: str) -> int:
    """Lines of ``events.jsonl`` that are not JSON (torn by a kill; the reader skips them)."""
    try:
        with open(os.path.join(directory, "events.jsonl"), "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    bad = 0
    for line in lines:
        if line.strip():
            try:
                json.loads(line)
            except ValueError:
                bad += 1
    return bad


def section(c: Campaign) -> None:
    print(f"kills: {c.sizes['kills']} forked trials, SIGKILLed at random moments and crash points", flush=True)
    figures = kill_campaign(c.sizes["kills"], seed=c.seed, workdir=c.workdir)
    c.kills = figures
    c.add(Row("kills", "SIGKILL at a random moment or crash point of resume, save, commit, retention",
              figures.runs,
              "resume picks the newest committed checkpoint; 0 corrupt loads; 0 committed checkpoints lost",
              f"{figures.killed} killed ({figures.crash_points} at crash points), {figures.finished_first} finished "
              f"first; {figures.reported_commits} commits reported; corrupt loads {figures.corrupt_loads}, "
              f"corrupt committed {figures.corrupt_committed}, lost {figures.lost}, resume mismatches "
              f"{figures.resume_mismatch}, leftovers {figures.leftovers}, child errors {figures.child_errors}, "
              f"hung {figures.hung}", figures.failures))
    for (phase, how), count in sorted(figures.phases.items(), key=lambda kv: -kv[1]):
        print(f"    {count:4d}  {how}: {phase}")
    for problem in figures.problems[:20]:
        print("    " + problem)
