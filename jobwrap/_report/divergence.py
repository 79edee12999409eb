"""Where a preempted run first differs from the uninterrupted one, and the known cause in words (pure).

Input: the two runs' step traces (:mod:`jobwrap._loop.trace`, one record per step boundary with
digests of every tracked object's keys, each random stream, the loader's state and the batch).
The preempted run's records are compared in the order they were made, launch by launch, with the
uninterrupted run's at the same (epoch, step); the first that differs is a :class:`Divergence`.
Where it lies says most of the cause:

- in the first launch, before any preemption: the run is not deterministic by itself (a stream
  never seeded, when streams differ);
- at a resume, before any step: the state put back differs, so something changed it after ``track()``;
- at the first step after a resume, the state put back being right: the batch differs (a loader
  replayed instead of skipped, or one whose randomness the checkpoint does not hold), else a stream
  differs (a draw between ``track()`` and the loop), else the step depends on state carried from the
  previous step that nothing tracks (a hidden state, a running average, a prefetched batch);
- later: something used only now and then (at an epoch's end, every k steps) is not tracked.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

#: The words for each stream of jobwrap._storage.state.capture_rng, and how a script seeds it.
_STREAMS = {"python": ("Python", "random.seed(0)"), "numpy": ("NumPy", "numpy.random.seed(0)"),
            "torch": ("torch CPU", "torch.manual_seed(0)"), "cuda": ("CUDA", "torch.manual_seed(0)")}
_NOT_STREAMS = {"cuda_device"}  # which device the CUDA streams belong to, not a stream


@dataclasses.dataclass
class Launch:
    """One process of a run: the step it resumed from (None: a fresh start), its records, how its loader
    found its place when it resumed mid-epoch (``skip``, ``replay``, ``state``; None: it did not need to)."""

    resumed_from: int | None
    records: list[dict[str, Any]]
    loader: str | None = None


@dataclasses.dataclass
class Divergence:
    """The first record of the preempted run that differs from the uninterrupted run's at its (epoch, step)."""

    step: int
    epoch: int
    position: int
    launch: int  # 0: before any preemption
    resumed_from: int | None
    when: str  # "before" any preemption, at the "resume", the "first" step after it, or "later"
    objects: dict[str, list[str]]  # tracked object -> the keys that differ
    extras: list[str]
    streams: list[str]
    loader_keys: list[str]
    batch: bool  # the batch handed out for this step differs
    losses: dict[str, tuple[Any, Any]]  # an extra named like a loss -> (uninterrupted, preempted)
    loader_kind: str | None  # how that launch's loader found its place mid-epoch
    unseeded: list[str] = dataclasses.field(default_factory=list)  # streams that differed from the start, set aside
    batch_seen: bool = False  # both runs recorded the step's batch (a job.loader() loop)

    @property
    def steps_after(self) -> int:
        return self.step - (self.resumed_from or 0)


def launches(trace: Sequence[dict[str, Any]]) -> list[Launch]:
    """The trace split at each process's first line."""
    found: list[Launch] = []
    for entry in trace:
        if "launch" in entry:
            found.append(Launch(resumed_from=entry.get("resumed_from"), records=[]))
        elif not found:
            continue  # a trace cut at its head: nothing to attribute it to
        elif "objects" in entry:
            found[-1].records.append(entry)
        elif "loader" in entry:
            found[-1].loader = entry["loader"]
    return found


def first_divergence(plain: Sequence[dict[str, Any]], cut: Sequence[dict[str, Any]]) -> Divergence | None:
    """The first record of ``cut`` that differs from ``plain``'s at the same (epoch, step), or None.

    Streams that differ from the very first record, and nothing else with them (never seeded: Python's
    and NumPy's, which the training draws nothing from, in a script that seeds only torch), would hide
    the difference that matters: they are set aside, named in ``unseeded``, and the search goes on without
    them; where nothing else differs, that first record is the divergence.
    """
    first = _first_divergence(plain, cut, ignore=())
    if first is None or first.when != "before" or first.objects or first.extras or first.batch or not first.streams:
        return first
    later = _first_divergence(plain, cut, ignore=first.streams)
    if later is None:
        return first
    later.unseeded = list(first.streams)
    return later


def _first_divergence(plain: Sequence[dict[str, Any]], cut: Sequence[dict[str, Any]],
                      ignore: Sequence[str]) -> Divergence | None:
    reference: dict[tuple[int, int], dict[str, Any]] = {}
    for launch in launches(plain):
        for rec in launch.records:
            reference.setdefault((rec["epoch"], rec["step"]), rec)
    for number, launch in enumerate(launches(cut)):
        seen_new_step = False
        for rec in launch.records:
            first_new = launch.resumed_from is not None and rec["step"] > launch.resumed_from and not seen_new_step
            seen_new_step = seen_new_step or first_new
            other = reference.get((rec["epoch"], rec["step"]))
            if other is None:
                continue
            found = _differences(other, rec, ignore)
            if not any(found.values()):
                continue
            if number == 0 or launch.resumed_from is None:
                when = "before"
            elif rec["step"] == launch.resumed_from:
                when = "resume"
            else:
                when = "first" if first_new else "later"
            return Divergence(step=rec["step"], epoch=rec["epoch"], position=rec.get("position", -1),
                              launch=number, resumed_from=launch.resumed_from, when=when, losses=_losses(other, rec),
                              loader_kind=launch.loader, batch_seen=bool(other.get("batch") and rec.get("batch")),
                              **found)
    return None


def _differences(a: dict[str, Any], b: dict[str, Any], ignore: Sequence[str]) -> dict[str, Any]:
    objects = {name: _keys_differing(a["objects"][name], b["objects"][name])
               for name in a.get("objects", {}) if name in b.get("objects", {})}
    streams = [s for s in a.get("rng", {}) if s in b.get("rng", {}) and s not in _NOT_STREAMS and s not in ignore
               and not _same(a["rng"][s], b["rng"][s])]
    loader_keys = _keys_differing(a["loader"], b["loader"]) \
        if a.get("loader") is not None and b.get("loader") is not None else []
    # The loader keeps copies of the streams (the epoch's start): those of an ignored stream are ignored too.
    loader_keys = [k for k in loader_keys if not any(f"rng.{s}" in k for s in ignore)]
    return {"objects": {name: keys for name, keys in objects.items() if keys},
            "extras": [n for n in a.get("extras", {}) if n in b.get("extras", {})
                       and not _same(a["extras"][n], b["extras"][n])],
            "streams": streams, "loader_keys": loader_keys,
            "batch": a.get("batch") is not None and b.get("batch") is not None and a["batch"] != b["batch"]}


def _keys_differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in a if k not in b or not _same(a[k], b[k])] + [k for k in b if k not in a]


def _same(x: Any, y: Any) -> bool:
    return x == y or (x != x and y != y)  # NaN equals NaN here, as in assert_same_state


def _losses(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {name: (a["extras"][name], b["extras"].get(name)) for name in a.get("extras", {})
            if "loss" in name.lower() and name in b.get("extras", {})}


# ---------------------------------------------------------------- in words

def what(d: Divergence) -> str:
    """The evidence: which tracked objects and keys, extras, streams, the batch, the loader's state."""
    parts = [f"{name}: {_some(keys)}" for name, keys in d.objects.items()]
    if d.extras:
        parts.append(f"extra(s) {_some(d.extras)}")
    if d.streams:
        parts.append(f"the {_stream_words(d.streams)} random stream(s)")
    if d.batch:
        parts.append("the batch itself")
    if d.loader_keys and not d.streams:  # the loader's copies of the streams say nothing more
        parts.append(f"the loader's state ({_some(d.loader_keys)})")
    return "; ".join(parts) or "nothing named"


def where(d: Divergence) -> str:
    if d.when == "before":
        return "before any preemption"
    if d.when == "resume":
        return f"at the resume from step {d.resumed_from}, before any step"
    if d.when == "first":
        return f"the first step after the resume from step {d.resumed_from}"
    return f"{d.steps_after} steps after the resume from step {d.resumed_from}"


def summary(d: Divergence) -> str:
    """One line: the first step that differs, where it lies, what differs, the loss if the script keeps one."""
    line = f"first differs at step {d.step} (epoch {d.epoch}), {where(d)}: {what(d)}"
    if d.losses and (d.objects or d.extras):
        line += "; " + ", ".join(f"{name} {_num(a)} uninterrupted vs {_num(b)} preempted"
                                 for name, (a, b) in d.losses.items())
    return line


def cause(d: Divergence) -> tuple[str, str]:
    """(the cause's name, what it means and what to do), from where the first difference lies and what it is."""
    step, since = d.step, d.resumed_from
    if d.when == "before":
        if d.streams:
            return "stream never seeded", _never_seeded(d.streams, f"already at step {step}, before any preemption")
        return ("not deterministic", (
            f"the run differs at step {step}, before any preemption: it is not deterministic by itself (kernels "
            f"without a deterministic mode, files read in an order that varies, time-dependent code), so two "
            f"uninterrupted runs differ too. Make them agree first: torch.use_deterministic_algorithms(True), "
            f"sorted file lists"))
    if d.when == "resume":
        return ("changed after track()", (
            f"the state put back at the resume from step {since} is not the uninterrupted run's at that step: "
            f"something changed it after job.track() restored it (weights loaded or initialized, an extra set, a "
            f"learning rate changed between track() and the loop). Do that before track(), or only in a fresh run "
            f"(job.resumed_from is None)"))
    if d.when == "first" and d.batch:
        if d.loader_kind == "replay":
            return ("loader replayed", (
                f"the batch of step {step}, the first after the resume from step {since}, is not the uninterrupted "
                f"run's: jobwrap found the loader's place by replaying it (it fetched the done batches again and "
                f"dropped them: it can skip only a map-style DataLoader), and the replay gave other batches, so its "
                f"iteration is not the same each time (a generator of its own, a stream, state its fetches "
                f"advance). Give the iterable state_dict()/load_state_dict(), or make it a map-style DataLoader "
                f"whose randomness comes from seeded generators"))
        return ("loader gave other batches", (
            f"the batch of step {step}, the first after the resume from step {since}, is not the uninterrupted "
            f"run's (the loader resumed by {d.loader_kind or 'starting its epoch'}): its batches depend on "
            f"something the checkpoint does not hold, such as a random generator or a file position of the "
            f"dataset's own. Draw from the sampler's generator or torch's stream, or give the dataset "
            f"state_dict()/load_state_dict()"))
    if d.when == "first" and d.streams:
        return ("draw between track() and the loop", (
            f"the {_stream_words(d.streams)} random stream(s) differ at step {step}, the first after the resume "
            f"from step {since}, though they were put back as saved: something drew from them between job.track() "
            f"(which restores them) and the loop's first step, such as a batch fetched before the loop, and the "
            f"resumed run made that draw again. Draw it before track() and track it "
            f"(job.track(batch=get_batch()), job['batch'] = get_batch() at the end of each step), or draw it "
            f"inside the loop"))
    if d.when == "first":
        return ("carried state not tracked", (
            f"step {step}, the first after the resume from step {since}, trains differently although the tracked "
            f"state was put back as saved{' and its batch is the same' if d.batch_seen else ''}: the step depends on something carried over "
            f"from the previous step that the checkpoint does not hold: a hidden state (an RNN's, repackaged from "
            f"batch to batch), a running average or EMA kept in a plain variable, a batch prefetched in the "
            f"previous step, an optimizer or scheduler not tracked. Track it: job.track(hidden=...) and "
            f"job['hidden'] = hidden after each step, reset where the uninterrupted run resets it (an epoch's "
            f"start: when job.position == 0), or track the object"))
    if d.position == 0:
        return ("end-of-epoch state not tracked", (
            f"the run first differs at the start of epoch {d.epoch} (step {step}), {d.steps_after} steps after "
            f"the resume from step {since}, the steps in between being equal: code at the epoch's end uses "
            f"something the checkpoint does not hold (a learning-rate scheduler or an EMA not tracked, a value kept "
            f"from epoch to epoch). Track it"))
    return ("occasional state not tracked", (
        f"the run first differs {d.steps_after} steps after the resume from step {since}, not at once: something "
        f"used only now and then is not in the checkpoint (a window every k steps: gradient accumulation, a "
        f"periodic update; a scheduler not tracked), or the computation is not deterministic. Track it"))


def explain(plain: Sequence[dict[str, Any]], cut: Sequence[dict[str, Any]]) -> tuple[Divergence, str, str] | None:
    """(the first divergence, its summary line, 'cause: words'), or None where every compared step is equal."""
    d = first_divergence(plain, cut)
    if d is None:
        return None
    name, words = cause(d)
    if d.unseeded:
        words += f". Besides, {_never_seeded(d.unseeded, 'from the first step on')}"
    return d, summary(d), f"{name}: {words}"


def _never_seeded(streams: Sequence[str], since: str) -> str:
    seeds = ", ".join(dict.fromkeys(_STREAMS.get(s, (s, f"seed {s}"))[1] for s in streams))
    return (f"the {_stream_words(streams)} random stream(s) differ {since}: never seeded, so two uninterrupted "
            f"runs differ too. Seed them at the start of the script ({seeds})")


def _stream_words(streams: Sequence[str]) -> str:
    return " and ".join(_STREAMS.get(s, (s, ""))[0] for s in streams)


def _some(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _num(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
