#!/usr/bin/env python3
"""Replay a preemption trace against a model of a run: goodput of save_every="auto" and of fixed intervals.

The model (docs/goodput.md): a launch starts (restart R, load L), trains in steps of S seconds and
makes a periodic save whenever the interval has passed since the last (a pause C the loop sees,
then a background write W before the checkpoint commits; one save in flight at a time). An
interruption with a warning finishes the step and saves (E seconds): nothing is lost. One without
a warning loses every step since the last committed checkpoint. Then the next launch starts.
Goodput = training kept / wall time. The auto interval is jobwrap._loop.interval's, fed the simulated
history as Session feeds it the real one (the prior first, then the interruptions seen).

  scripts/goodput_sim.py                              # the two target scenarios, table and verdicts
  scripts/goodput_sim.py --plot docs/goodput-sweep.png
  scripts/goodput_sim.py --trace my-trace.txt --step 0.8 --pause 0.02   # one "SECONDS warned|unwarned" a line
  scripts/goodput_sim.py --real                       # one real local run: the model's goodput vs the measured
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobwrap._loop.interval import FLOOR, choose, estimate_mtbi  # noqa: E402
from jobwrap._storage.events import read_events  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

SWEEP = (10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)


@dataclasses.dataclass(frozen=True)
class Model:
    """The run: seconds per step, save pause and background write, emergency save, load and restart."""

    step: float = 1.0
    pause: float = 0.005
    write: float = 2.0
    emergency: float = 3.0
    load: float = 2.0
    restart: float = 20.0


Trace = list[tuple[float, bool]]  # (wall seconds, warned)
Policy = Callable[[float, int, float | None], float]  # (seconds run, unwarned seen, measured pause) -> interval


def poisson_trace(mean: float, unwarned_share: float, horizon: float, seed: int) -> Trace:
    """Interruptions of a Poisson process of the given mean, each without warning with the given chance."""
    rng, t, trace = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(1.0 / mean)
        if t >= horizon:
            return trace
        trace.append((t, rng.random() >= unwarned_share))


def read_trace(path: str) -> Trace:
    """One interruption a line: seconds since the start, then ``warned`` or ``unwarned``."""
    trace = []
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            seconds, kind = line.split()[:2]
            trace.append((float(seconds), kind.lower() in ("warned", "1", "true", "signal")))
    return sorted(trace)


def fixed(seconds: float) -> Policy:
    return lambda run, seen, cost: seconds


def auto(run: float, seen: int, cost: float | None, *, write: float) -> float:
    return choose(cost, estimate_mtbi(run, seen), run=run, seen=seen, write=write).seconds


def simulate(trace: Trace, model: Model, policy: Policy, horizon: float) -> tuple[float, float]:
    """(goodput, mean interval used) of one policy over one trace."""
    t, kept, run, seen, cost, i = 0.0, 0.0, 0.0, 0, None, 0
    intervals: list[float] = []
    while t < horizon:
        next_cut = trace[i][0] if i < len(trace) else math.inf
        start = t
        t += model.restart + model.load
        if t >= min(next_cut, horizon):  # cut during the restart: nothing trained, nothing lost
            t, seen, i = min(next_cut, horizon), seen + (i < len(trace) and not trace[i][1]), i + 1
            run += t - start
            continue
        work, committed, pending = kept, kept, None  # pending: (work it holds, when it commits)
        while True:
            interval = policy(run + t - start, seen, cost)
            intervals.append(interval)
            steps = max(1, math.ceil(interval / model.step))
            end = t + steps * model.step
            stop = min(next_cut, horizon)
            if pending and pending[1] <= min(end, stop):
                committed, pending = pending[0], None
            if stop <= end:
                done = stop - t
                if stop == horizon:
                    kept, t = work + done, horizon
                elif trace[i][1]:  # warned: finish the step, save, exit
                    finished = math.ceil(done / model.step) * model.step
                    kept, t = work + finished, t + finished + model.emergency
                else:
                    kept, t, seen = committed, stop, seen + 1
                run += t - start
                i += 1
                break
            t, work = end, work + steps * model.step
            if pending is None:  # one save in flight at a time
                t += model.pause
                pending, cost = (work, t + model.write), model.pause
    return min(1.0, kept / horizon), sum(intervals) / max(1, len(intervals))


def sweep(traces: list[Trace], model: Model, horizon: float) -> dict[str, tuple[float, float]]:
    """Mean goodput (and mean interval) of auto and of each fixed interval over the traces."""
    policies: dict[str, Policy] = {"auto": lambda r, s, c: auto(r, s, c, write=model.write)}
    policies.update({f"{seconds} s": fixed(seconds) for seconds in SWEEP})
    results = {}
    for name, policy in policies.items():
        runs = [simulate(trace, model, policy, horizon) for trace in traces]
        results[name] = (sum(g for g, _ in runs) / len(runs), sum(m for _, m in runs) / len(runs))
    return results


def report(title: str, results: dict[str, tuple[float, float]], min_goodput: float | None) -> bool:
    best_name = max((n for n in results if n != "auto"), key=lambda n: results[n][0])
    best, mine = results[best_name][0], results["auto"][0]
    print(f"\n{title}")
    for name, (goodput, mean) in results.items():
        print(f"  {name:>8}  goodput {goodput:.2%}" + (f"  (mean interval {mean:.0f} s)" if name == "auto" else ""))
    ok = mine >= best * 0.98
    print(f"  target: auto within 2 % of the best fixed ({best_name}, {best:.2%}): auto {mine:.2%} "
          f"-> {'met' if ok else 'NOT met'}")
    if min_goodput is not None:
        met = mine >= min_goodput
        print(f"  target: auto goodput >= {min_goodput:.0%} (save pause < 1 % of a step): {mine:.2%} "
              f"-> {'met' if met else 'NOT met'}")
        ok = ok and met
    return ok


def plot(scenarios: list[tuple[str, dict[str, tuple[float, float]]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (title, results), colour in zip(scenarios, ("#1e88e5", "#e53935")):
        ax.plot(SWEEP, [results[f"{s} s"][0] * 100 for s in SWEEP], "o-", color=colour, label=f"fixed: {title}")
        goodput, interval = results["auto"]
        ax.axhline(goodput * 100, color=colour, linestyle="--", linewidth=1)
        ax.plot([interval], [goodput * 100], "*", color=colour, markersize=14, label=f"auto: {goodput:.1%}")
    ax.set_xscale("log")
    ax.set_xlabel("periodic save interval (s)")
    ax.set_ylabel("goodput (%)")
    ax.set_title("MTBI 20 min, 1 in 5 interruptions without warning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


# ---------------------------------------------------------------- the model against one real run

REAL_INTERVAL = 3.0  # --save-every-seconds of the real run
# Seconds after the start, and how: SIGUSR1 to `jobwrap run` (a warning: it saves, exits 75 and is
# relaunched in place), or SIGKILL to the training process (none: `jobwrap run` is started again).
REAL_CUTS = ((12.0, "warned"), (24.0, "unwarned"), (38.0, "warned"))
REAL_TRAIN = ("--epochs", "3", "--samples", "2400", "--batch-size", "16", "--step-seconds", "0.1")  # 450 steps


def _local_env() -> dict[str, str]:
    """This environment without the caller's JOBWRAP_* and Slurm variables: a plain local run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWRAP_", "SLURM_"))}
    env.update(JOBWRAP_NO_SLURM="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def real_run(directory: str) -> list[tuple[float, bool]]:
    """`jobwrap run` of examples/train.py with periodic saves, cut at REAL_CUTS; (wall time, warned) of each cut."""
    command = [sys.executable, "-m", "jobwrap", "run", "--dir", directory, "--save-every-seconds",
               str(REAL_INTERVAL), "--", sys.executable, str(REPO / "examples" / "train.py"), *REAL_TRAIN]
    cuts = []
    with open(os.path.join(directory, "run.log"), "w") as log:
        def start() -> subprocess.Popen:
            return subprocess.Popen(command, env=_local_env(), stdout=log, stderr=subprocess.STDOUT)

        proc, began = start(), time.monotonic()
        try:
            for at, kind in REAL_CUTS:
                time.sleep(max(0.0, at - (time.monotonic() - began)))
                if proc.poll() is not None:
                    break
                cuts.append((time.time(), kind == "warned"))
                if kind == "warned":
                    proc.send_signal(signal.SIGUSR1)
                    continue
                for child in _children(proc.pid):
                    os.kill(child, signal.SIGKILL)
                proc.wait(timeout=60)
                proc = start()
            code = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    if code != 0:
        raise SystemExit(f"the real run failed (exit {code}); see {directory}/run.log")
    return cuts


def measured_model(status: dict, events: list[dict], cuts: Trace) -> tuple[Model, Trace]:
    """The run's measured parameters as a :class:`Model`, and its interruptions as a trace."""
    launches = status["time"]["launches"]
    saves = [e for e in events if e.get("event") == "save" and e.get("rank", 0) == 0]
    periodic = [e for e in saves if e.get("reason") == "periodic"]
    emergency = [e for e in saves if str(e.get("reason") or "").startswith("signal")]
    steps = sum(launch["steps"] for launch in launches)
    model = Model(
        step=sum(launch["step_seconds"] * launch["steps"] for launch in launches if launch["steps"]) / steps,
        pause=_mean(float(e.get("pause") if e.get("background") else e.get("seconds") or 0.0) for e in periodic),
        write=_mean(float(e.get("seconds") or 0.0) for e in periodic if e.get("background")),
        emergency=_mean(float(e.get("seconds") or 0.0) for e in emergency),
        load=sum(launch["loading"] for launch in launches) / len(launches),
        restart=sum(launch["startup"] for launch in launches) / len(launches),
    )
    return model, [(at - launches[0]["begin"], warned) for at, warned in cuts]


def _mean(values: object) -> float:
    values = list(values)  # type: ignore[call-overload]
    return sum(values) / len(values) if values else 0.0


def check_real(tolerance: float = 0.10) -> bool:
    """One real run; the model fed its measurements predicts its goodput within ``tolerance``."""
    with tempfile.TemporaryDirectory(prefix="goodput-real-") as directory:
        print(f"\nreal run: examples/train.py {' '.join(REAL_TRAIN)}, --save-every-seconds {REAL_INTERVAL:g}, "
              f"cut at " + ", ".join(f"{t:g} s ({kind})" for t, kind in REAL_CUTS))
        cuts = real_run(directory)
        done = subprocess.run([sys.executable, "-m", "jobwrap", "status", directory, "--json"], env=_local_env(),
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise SystemExit(f"jobwrap status failed: {done.stderr[-2000:]}")
        status = json.loads(done.stdout)
        model, trace = measured_model(status, read_events(directory), cuts)
    horizon = status["time"]["allocated"]
    predicted, _ = simulate(trace, model, fixed(REAL_INTERVAL), horizon)
    measured = status["goodput"]
    print("  measured: " + ", ".join(f"{f.name} {getattr(model, f.name):.3g} s" for f in dataclasses.fields(model)))
    print(f"  {len(status['time']['launches'])} launches, {horizon:.1f} s allocated, interruptions at "
          + ", ".join(f"{t:.1f} s" for t, _ in trace) + f"; {status['steps_lost']} steps lost, "
          f"{status['time']['lost']:.1f} s")
    error = abs(predicted - measured) / measured
    ok = error <= tolerance
    print(f"  target: model's goodput within {tolerance:.0%} of jobwrap status's: predicted {predicted:.2%}, "
          f"measured {measured:.2%} ({error:.1%} apart) -> {'met' if ok else 'NOT met'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", help="replay this trace file instead of the synthetic ones")
    parser.add_argument("--mtbi", type=float, default=1200.0, help="synthetic traces' mean seconds between interruptions")
    parser.add_argument("--unwarned", type=float, default=0.2, help="share of interruptions without warning")
    parser.add_argument("--hours", type=float, default=100.0, help="length of each synthetic trace")
    parser.add_argument("--seeds", type=int, default=5, help="synthetic traces to average over")
    for field in dataclasses.fields(Model):
        parser.add_argument(f"--{field.name}", type=float, default=None, help=f"model: {field.name} seconds")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the sweep (needs matplotlib)")
    parser.add_argument("--real", action="store_true",
                        help="instead: run examples/train.py here (about a minute), cut three times, and check "
                             "the model's goodput against the one jobwrap status measures")
    args = parser.parse_args(argv)
    if args.real:
        return 0 if check_real() else 1
    horizon = args.hours * 3600
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Model) if getattr(args, f.name) is not None}
    traces = ([read_trace(args.trace)] if args.trace else
              [poisson_trace(args.mtbi, args.unwarned, horizon, seed) for seed in range(args.seeds)])
    if args.trace:
        horizon = max(t for t, _ in traces[0]) if traces[0] else horizon
    print(f"{len(traces)} trace(s) of {horizon / 3600:.0f} h, {sum(map(len, traces))} interruptions, "
          f"{sum(not w for tr in traces for _, w in tr)} without warning; floor {FLOOR:g} s")
    scenarios = []
    if given or args.trace:
        model = Model(**given)
        scenarios.append((f"{model}", sweep(traces, model, horizon)))
        ok = report(scenarios[0][0], scenarios[0][1], None)
    else:
        fast, slow = Model(), Model(pause=5.0, write=0.0, emergency=5.0)
        scenarios = [(f"async save, pause {fast.pause:g} s per {fast.step:g} s step", sweep(traces, fast, horizon)),
                     (f"blocking save, pause {slow.pause:g} s per {slow.step:g} s step", sweep(traces, slow, horizon))]
        ok = report(scenarios[0][0], scenarios[0][1], 0.95)
        ok = report(scenarios[1][0], scenarios[1][1], None) and ok
    if args.plot:
        plot(scenarios, args.plot)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
