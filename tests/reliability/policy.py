"""The store's policy over random listings: which checkpoint a resume loads, and what retention deletes,
in directories of good checkpoints and ones damaged each of ten ways."""
from __future__ import annotations

import collections
import os
import random
import shutil
import tempfile
from typing import Any, Callable

import torch

from .files import commit, edit_manifest, flip_bit, intact, store_with
from .internals import FORMAT_VERSION, data_path, manifest_path
from .results import Campaign, Row
from .training import capture_logs, payload_matches

# kind -> how a committed checkpoint of that step is damaged (directory, step)
_DEFECTS: dict[str, Callable[[str, int], Any]] = {
    "good": lambda d, s: None,
    "bitflip": lambda d, s: flip_bit(data_path(d, s), random.Random(s)),
    "truncated": lambda d, s: os.truncate(data_path(d, s), os.path.getsize(data_path(d, s)) // 2),
    "zero": lambda d, s: os.truncate(data_path(d, s), 0),
    "no-manifest": lambda d, s: os.unlink(manifest_path(d, s)),
    "no-data": lambda d, s: os.unlink(data_path(d, s)),
    "bad-json": lambda d, s: _write_text(manifest_path(d, s), "{not json"),
    "size-lie": lambda d, s: edit_manifest(d, s, size=12345678),
    "newer-format": lambda d, s: edit_manifest(d, s, format=FORMAT_VERSION + 1),
    "foreign": lambda d, s: None,  # saved under another run id
    "step-lie": lambda d, s: edit_manifest(d, s, step=max(0, s - 1)),
}
KINDS = tuple(_DEFECTS)
_UNUSABLE = ("newer-format", "foreign")  # good files this run cannot use, nor delete
_NUMEL = 16


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _build(directory: str, spec: list[tuple[int, str]]) -> Any:
    """A store on ``directory`` claimed by this run, holding a checkpoint of each kind of ``spec``."""
    store = store_with(directory)
    store.claim("mine")
    for step, kind in spec:
        commit(store, step, _NUMEL, run_id="other" if kind == "foreign" else "mine")
        _DEFECTS[kind](directory, step)
    return store


def _check_load(store: Any, directory: str, spec: list[tuple[int, str]]) -> list[str]:
    """The resume takes the newest good checkpoint of this run and sets aside or deletes no good one."""
    problems = []
    good = sorted((s for s, k in spec if k == "good"), reverse=True)
    store.prepare()  # what a restart does first
    found = store.newest_loadable(lambda c: torch.load(c.path, weights_only=True), lineage=["mine"])
    want = good[0] if good else None
    got = found[0].step if found else None
    if got != want:
        problems.append(f"resume took {got}, the newest good is {want}")
    elif found is not None and not payload_matches(found[1], got, _NUMEL):
        problems.append(f"step {got} loaded with other content")
    for step in good:
        if not intact(directory, step, _NUMEL):
            problems.append(f"good step {step} was set aside or deleted by the resume")
    return problems


def _check_retention(store: Any, directory: str, spec: list[tuple[int, str]], keep_last: int) -> list[str]:
    """After a new save above every usable step, retention keeps it and the newest ``keep_last`` usable
    ones, and deletes nothing this run cannot use."""
    problems = []
    new = max([s for s, k in spec if k not in _UNUSABLE], default=0) + 1
    while os.path.exists(manifest_path(directory, new)) or os.path.exists(data_path(directory, new)):
        new += 1
    commit(store, new, _NUMEL)
    usable = sorted((c.step for c in store.committed()
                     if c.manifest.get("format", 0) <= FORMAT_VERSION and c.run_id == "mine"), reverse=True)
    store.retain(keep_last)
    if not intact(directory, new, _NUMEL):
        problems.append(f"retention deleted the checkpoint just saved (step {new})")
    remaining = {c.step for c in store.committed()}
    for step in (s for s, k in spec if k in _UNUSABLE):
        if not os.path.exists(data_path(directory, step)):
            problems.append(f"retention deleted step {step}, which this run cannot use (not its own to delete)")
    for step in usable[:keep_last]:
        if step not in remaining:
            problems.append(f"retention deleted step {step}, one of the newest {keep_last} usable")
    for step in usable[keep_last:]:
        if step in remaining:
            problems.append(f"retention kept step {step} beyond keep_last={keep_last}")
    return problems


def policy_case(directory: str, spec: list[tuple[int, str]], keep_last: int) -> list[str]:
    """Build a directory from ``spec`` (step, kind), then check the load and retention policy on it.

    Load: the resume takes the newest *good* checkpoint of this run, and never
    sets aside or deletes a good one. Retention, after a new save above every
    usable step: the new checkpoint survives, the newest ``keep_last`` usable
    ones remain, and nothing it cannot use (newer format, another run) is deleted.
    """
    store = _build(directory, spec)
    problems = _check_load(store, directory, spec)
    return problems + _check_retention(store, directory, spec, keep_last)


def random_spec(rng: random.Random) -> tuple[list[tuple[int, str]], int]:
    steps = rng.sample(range(1, 40), rng.randint(0, 7))
    return [(s, rng.choice(KINDS)) for s in steps], rng.randint(1, 4)


def section(c: Campaign) -> None:
    print("store policy over random listings", flush=True)
    rng = random.Random(c.seed + 3)
    failures, examples = 0, []
    kinds: collections.Counter[str] = collections.Counter()
    for _ in range(c.sizes["policy"]):
        spec, keep = random_spec(rng)
        kinds.update(k for _, k in spec)
        directory = tempfile.mkdtemp(prefix="policy-", dir=c.workdir)
        with capture_logs():
            problems = policy_case(directory, spec, keep)
        shutil.rmtree(directory, ignore_errors=True)
        if problems:
            failures += 1
            examples.append(f"{spec} keep={keep}: {problems[0]}")
    c.add(Row("policy", "random listings (0-7 checkpoints, each good or one of 10 defects), keep_last 1-4",
              c.sizes["policy"], "newest good loaded; no good one set aside; retention keeps the new and newest "
              "usable, deletes nothing it cannot use",
              f"{c.sizes['policy'] - failures}/{c.sizes['policy']} cases hold"
              + (f"; e.g. {examples[0][:240]}" if examples else f" ({sum(kinds.values())} checkpoints)"), failures))
