"""Signals: real signals from the parent to a forked training child, in storms, during the resume
and a save, and a TERM followed by a KILL after a random grace."""
from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import signal
import tempfile
import time

import jobwrap

from .files import audit, commit, intact, store_with
from .forked import fork_trial, signal_on_entering, training_child
from .internals import CheckpointStore, read_events
from .results import Campaign, Fault, Outcome, Row, tally, verdict
from .training import new_directory, train_to


def _child(directory: str, *, numel: int, save_every: int, async_save: bool, **options: object):
    """A child that trains (until stopped) with keep_last 3, a periodic save every ``save_every`` steps."""
    return training_child(directory, numel=numel, steps=100_000, keep_last=3, save_every_steps=save_every,
                          async_save=async_save, **options)


def storm_trial(workdir: str, rng: random.Random, *, count: int = 300, numel: int = 1 << 18) -> Outcome:
    """Hundreds of USR1/TERM while training and saving: no hang, one signal checkpoint, the deciding signal's
    exit code."""
    directory = tempfile.mkdtemp(prefix="storm-", dir=workdir)
    sent: list[signal.Signals] = []
    state = {"go": False, "stop": False}

    start_after = rng.choice(["resumed", "enter"])  # from the first step, or from inside the first save

    def on_message(words: list[str], pid: int) -> None:
        if words[0] == start_after and (start_after == "resumed" or words[1:2] == ["save"]):
            state["go"] = True
        if words[0] == "decided":
            state["stop"] = True

    def while_running(pid: int) -> None:
        if state["go"] and not state["stop"] and len(sent) < count:
            for _ in range(rng.randint(1, 25) if sent else 1):  # bursts: most coalesce, as in the kernel
                sig = rng.choice([signal.SIGUSR1, signal.SIGTERM])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                    sent.append(sig)

    trial = fork_trial(_child(directory, numel=numel, save_every=2, async_save=rng.random() < 0.5, step_seconds=0.01),
                       on_message=on_message, while_running=while_running, timeout=120)
    decided = trial.find("decided")
    stop_step = int(decided[0][0]) if decided else None
    # A TERM seen by the time of the decision (after the save) decides, else the USR1 (a cancel wins
    # over a requeue); the child reports the deciding signal.
    first = decided[0][1] if decided else None
    want = jobwrap.REQUEUE_EXIT_CODE if first == "SIGUSR1" else 128 + signal.SIGTERM
    events = [e["event"] for e in read_events(directory)]
    committed = CheckpointStore(directory).committed()
    problems = []
    if first not in {s.name for s in sent}:
        problems.append(f"the child acted on {first}, which was never sent")
    if trial.code != want:
        late = trial.code in (-signal.SIGUSR1, -signal.SIGTERM) and stop_step is not None
        problems.append(f"exit {trial.code}, want {want}" + (" (a late signal after the session closed)"
                                                              if late else ""))
    if events.count("signal") != 1:
        problems.append(f"{events.count('signal')} signal events")
    if stop_step is None or not committed or committed[0].step != stop_step or not intact(
            directory, stop_step, numel):
        problems.append(f"newest committed {committed[0].step if committed else None}, stop at {stop_step}")
    if trial.find("error"):
        problems.append(f"error {trial.find('error')}")
    shutil.rmtree(directory, ignore_errors=True)
    return verdict(problems, f"{len(sent)} signals, decided by {first}, exit {trial.code}")


def check_signal_during_resume(workdir: str) -> Outcome:
    """USR1 while the checkpoint is being read: the run stops at its first boundary without a second save."""
    directory = new_directory(workdir, "sigresume")
    numel = 1 << 18  # the resume waits for the signal after it started (hold="resume")
    train_to(directory, [1, 2, 3], numel=numel)
    before = sorted(n for n in os.listdir(directory) if n != "events.jsonl")
    trial = fork_trial(_child(directory, numel=numel, save_every=1, async_save=False, hold="resume"),
                       on_message=signal_on_entering("resume"), timeout=60)
    after = sorted(n for n in os.listdir(directory) if n != "events.jsonl")
    decided = trial.find("decided")
    ok = (trial.code == jobwrap.REQUEUE_EXIT_CODE and decided == [["3", "SIGUSR1"]] and not trial.find("commit")
          and after == before and not trial.find("resumed"))
    return ok, ("stopped right after restoring step 3 (inside track), exit 75, no new checkpoint" if ok else
                f"exit {trial.code}, decided {decided}, commits {trial.find('commit')}, files {after}")


def check_signal_during_save(workdir: str, async_save: bool) -> Outcome:
    """USR1 while a periodic save is being written: that save completes, the next boundary stops the run."""
    directory = new_directory(workdir, "sigsave")
    trial = fork_trial(_child(directory, numel=1 << 20, save_every=3, async_save=async_save, hold="save"),
                       on_message=signal_on_entering("save"), timeout=60)
    stop = trial.find("decided")
    commits = [int(w[0]) for w in trial.find("commit")]
    newest = CheckpointStore(directory).committed()
    # A background save in flight may be superseded (cancelled) by the signal's save: that is by design.
    ok = (trial.code == jobwrap.REQUEUE_EXIT_CODE and bool(stop) and newest and newest[0].step == int(stop[0][0])
          and intact(directory, newest[0].step, 1 << 20) and (async_save or 3 in commits))
    return bool(ok), (f"periodic save of step 3 committed, stopped at step {stop[0][0]} with its checkpoint, exit 75"
                      if ok else f"exit {trial.code}, stop {stop}, commits {commits}, "
                      f"errors {trial.find('error')}")


def grace_trial(workdir: str, rng: random.Random, save_seconds: float, numel: int = 4 << 20) -> tuple[str, str]:
    """SIGTERM, then SIGKILL after a random grace: either the TERM save committed or the previous one survives."""
    directory = new_directory(workdir, "grace")
    grace = rng.uniform(0.0, 2.5 * save_seconds)
    plan = {"term_at": None}

    def on_message(words: list[str], pid: int) -> None:
        if words[0] == "commit" and plan["term_at"] is None and int(words[1]) >= 2:
            time.sleep(rng.uniform(0, 0.01))
            os.kill(pid, signal.SIGTERM)
            plan["term_at"] = time.monotonic()

    def while_running(pid: int) -> None:
        if plan["term_at"] is not None and time.monotonic() - plan["term_at"] >= grace:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    trial = fork_trial(_child(directory, numel=numel, save_every=2, async_save=rng.random() < 0.5),
                       on_message=on_message, while_running=while_running, timeout=120)
    commits = sorted(int(w[0]) for w in trial.find("commit"))
    pick, problems, _ = audit(directory, numel=numel, keep_last=3, must_survive=set(commits), damaged=set())
    stop = trial.find("decided")
    if trial.code == 128 + signal.SIGTERM:
        outcome = "fit"
        if not stop or pick != int(stop[0][0]):
            problems.append(f"exit 143 but newest {pick}, stop {stop}")
    elif trial.code == -signal.SIGKILL:
        outcome = "killed"
        if pick is None or pick < max(commits):
            problems.append(f"newest {pick} older than the last commit {max(commits)}")
    else:
        outcome = "other"
        problems.append(f"exit {trial.code} {trial.find('error')}")
    shutil.rmtree(os.path.dirname(directory), ignore_errors=True)
    return outcome, "; ".join(problems)


def _storms(c: Campaign, rng: random.Random) -> None:
    n = c.sizes["storms"]
    seen = tally(storm_trial(c.workdir, rng) for _ in range(n))
    c.add(Row("signals", "storm: ~300 USR1/TERM at random sub-ms intervals while training and saving",
              n, "no hang; one signal checkpoint at the next boundary, intact; the exit code of "
              "the deciding signal (TERM if one came by the decision)",
              f"{seen.held}/{n} as expected; e.g. {seen.observed[0]}"
              + ("; failures: " + " / ".join(seen.failed)[:400] if seen.failed else ""),
              seen.failures))


def _time_a_save(workdir: str, numel: int) -> float:
    """Seconds one synchronous save of ``numel`` floats takes here (at least 0.02)."""
    store = store_with(tempfile.mkdtemp(dir=workdir))
    started = time.monotonic()
    commit(store, 1, numel, run_id=None)
    return max(0.02, time.monotonic() - started)


def _grace(c: Campaign, rng: random.Random) -> None:
    save_seconds = _time_a_save(c.workdir, 4 << 20)
    outcomes: collections.Counter[str] = collections.Counter()
    problems = []
    for _ in range(c.sizes["grace"]):
        outcome, problem = grace_trial(c.workdir, rng, save_seconds)
        outcomes[outcome] += 1
        if problem:
            problems.append(problem)
    c.add(Row("signals", f"SIGTERM then SIGKILL after a random grace of 0-{2.5 * save_seconds:.2f} s "
              f"(a 16 MB save takes ~{save_seconds:.2f} s here)", c.sizes["grace"],
              "the TERM save commits (exit 143) or the previous checkpoint survives",
              f"save fit: {outcomes['fit']}, killed mid-save with the previous intact: {outcomes['killed']}"
              + (f"; problems: {problems[:3]}" if problems else ""), len(problems)))


def section(c: Campaign) -> None:
    print("signals", flush=True)
    rng = random.Random(c.seed + 2)
    _storms(c, rng)
    c.run(Fault("signals", "USR1 while the resume reads the checkpoint", "stop at the first boundary, no duplicate "
                "save", check_signal_during_resume))
    for async_save in (False, True):
        c.run(Fault("signals", f"USR1 during a periodic save ({'background' if async_save else 'synchronous'})",
                    "that save commits; the run stops at the next boundary with a newer one", check_signal_during_save,
                    (async_save,)))
    _grace(c, rng)
