"""Bad files: a copy of a real two-checkpoint run damaged one way, then resumed with a real Session.

The resume must use the named step with the exact saved content and log exactly
one line naming the bad file.
"""
from __future__ import annotations

import functools
import os
import random
import shutil
import zipfile
from typing import Callable

import torch

from .files import edit_manifest, flip_bit, intact, rehash
from .internals import data_path, manifest_path
from .results import Campaign, Fault, Outcome, Row, short, tally, verdict
from .training import new_directory, resume, train_to

Damage = Callable[[str], None]


def base_run(workdir: str) -> str:
    """A real run with committed checkpoints at steps 1 and 2; its directory."""
    directory = new_directory(workdir, "base")
    train_to(directory, [1, 2])
    return directory


def copy_of(base: str, workdir: str) -> str:
    """A copy of the run ``base`` in a new folder under ``workdir``, for one case to damage."""
    target = new_directory(workdir, "case")
    shutil.copytree(base, target)
    return target


def _put_foreign(directory: str, workdir: str, step: int, *, run_id: str = "other-run",
                 fmt: int | None = None) -> None:
    other = new_directory(workdir, "other")
    train_to(other, [step], run_id=run_id)
    for path in (data_path(other, step), manifest_path(other, step)):
        shutil.copy(path, directory)
    if fmt is not None:
        edit_manifest(directory, step, format=fmt)


def _write(path: Callable[[str, int], str], content: bytes, *, then_rehash: bool = False) -> Damage:
    """Step 2's data file or manifest replaced by ``content`` (the manifest made to agree, if asked)."""
    def damage(d: str) -> None:
        with open(path(d, 2), "wb") as f:
            f.write(content)
        if then_rehash:
            rehash(d, 2)
    return damage


def _torch_file_not_jobwrap(d: str) -> None:
    torch.save({"w": torch.zeros(3)}, data_path(d, 2))
    rehash(d, 2)


def _zip_not_torch(d: str) -> None:
    with zipfile.ZipFile(data_path(d, 2), "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    rehash(d, 2)


def _appended(d: str) -> None:
    with open(data_path(d, 2), "ab") as f:
        f.write(b"trailing garbage")


def _swapped(d: str) -> None:
    """Step 2's manifest, step 1's data: sizes match, checksums do not."""
    shutil.copy(data_path(d, 1), data_path(d, 2))
    edit_manifest(d, 2, size=os.path.getsize(data_path(d, 2)))


def damage_cases(workdir: str) -> dict[str, tuple[Damage, int, str]]:
    """name -> (damage(directory), expected resumed step, the file the one-line report must name)."""
    two, three = "step-000000000002", "step-000000000003"
    return {
        "zero-byte data file": (lambda d: os.truncate(data_path(d, 2), 0), 1, two),
        "zero-byte manifest": (_write(manifest_path, b""), 1, two),
        "manifest is not JSON (damaged)": (_write(manifest_path, b"{\"step\": 2, \"si\x00\xffze"), 1, two),
        "manifest is JSON but not a manifest": (_write(manifest_path, b"[1, 2, 3]"), 1, two),
        "data file with trailing garbage": (_appended, 1, two),
        "manifest lies: size": (lambda d: edit_manifest(d, 2, size=os.path.getsize(data_path(d, 2)) + 1), 1, two),
        "manifest lies: checksum": (lambda d: edit_manifest(d, 2, checksum="xxh3_64:0123456789abcdef"), 1, two),
        "manifest lies: data of another step, size fixed up": (_swapped, 1, two),
        "manifest lies: step (says 1, file is step 2)": (lambda d: edit_manifest(d, 2, step=1), 1, two),
        "manifest lies: step (says 7, file is step 2)": (lambda d: edit_manifest(d, 2, step=7), 1, two),
        "manifest lies: step is not a number": (lambda d: edit_manifest(d, 2, step="../../2"), 1, two),
        "checkpoint of another run": (lambda d: _put_foreign(d, workdir, 3), 2, three),
        "checkpoint in a newer format version": (lambda d: _put_foreign(d, workdir, 3, run_id="mine", fmt=99), 2,
                                                 three),
        "no checkpoint at all: random bytes, manifest matches": (
            _write(data_path, random.Random(5).randbytes(5000), then_rehash=True), 1, two),
        "no checkpoint at all: a text file, manifest matches": (
            _write(data_path, b"hello\n" * 100, then_rehash=True), 1, two),
        "no checkpoint at all: a zip that is not torch's": (_zip_not_torch, 1, two),
        "a torch file that is not a jobwrap checkpoint": (_torch_file_not_jobwrap, 1, two),
    }


def check_bad_file(base: str, workdir: str, damage: Damage, expect: int, names: str) -> Outcome:
    """Damage a copy of the base run, resume it: the expected step is used and one line names the bad file."""
    directory = copy_of(base, workdir)
    damage(directory)
    outcome = resume(directory)
    about = [w for w in outcome.warnings if names in w]
    problems = []
    if outcome.error:
        problems.append(f"resume failed: {outcome.error}")
    if outcome.step != expect:
        problems.append(f"resumed step {outcome.step}, expected {expect}")
    if not outcome.content_ok:
        problems.append("resumed content differs from what was saved")
    if len(about) != 1:
        problems.append(f"{len(about)} warning lines name {names} (want 1): {outcome.warnings}")
    if any("\n" in w for w in about):
        problems.append("the report spans several lines")
    if intact(directory, 1) is False:
        problems.append("step 1 damaged")
    shutil.rmtree(os.path.dirname(directory), ignore_errors=True)
    ok, observed = verdict(problems, about[0] if about else "")
    return ok, short(observed)


def check_orphan_junk(base: str, workdir: str) -> Outcome:
    """A step file without a manifest is removed at start and never loaded."""
    directory = copy_of(base, workdir)
    with open(data_path(directory, 9), "wb") as f:
        f.write(b"junk")
    outcome = resume(directory)
    ok = outcome.step == 2 and outcome.content_ok and not os.path.exists(data_path(directory, 9))
    return ok, "step 2 used; step 9's file removed at start" if ok else f"got {outcome}"


def _random_damage(c: Campaign, base: str, label: str, count: int, make: Callable[[], Damage]) -> None:
    """``count`` copies, each damaged by a fresh ``make()``: always detected, step 1 used."""
    seen = tally(check_bad_file(base, c.workdir, make(), 1, "step-000000000002") for _ in range(count))
    c.add(Row("bad files", label, count, "detected, one line, previous checkpoint (step 1) used",
              f"{seen.held}/{count} detected and step 1 used; e.g. {seen.example}", seen.failures))


def section(c: Campaign) -> None:
    print("bad files", flush=True)
    base = base_run(c.workdir)
    rng = random.Random(c.seed + 1)
    size = os.path.getsize(data_path(base, 2))
    _random_damage(c, base, "bit flip at a random offset of the newest data file", c.sizes["bitflips"],
                   lambda: (lambda d: flip_bit(data_path(d, 2), rng)))
    _random_damage(c, base, "truncation of the newest data file at a random length", c.sizes["truncations"],
                   lambda: (lambda d, n=rng.randrange(1, size): os.truncate(data_path(d, 2), n)))
    for label, (damage, expect, names) in damage_cases(c.workdir).items():
        c.run(Fault("bad files", label, f"detected, one line, step {expect} used",
                    functools.partial(check_bad_file, base), (damage, expect, names)))
    c.run(Fault("bad files", "a data file without a manifest (e.g. copied in by hand)",
                "never loaded; removed at start as an unfinished save", functools.partial(check_orphan_junk, base)))
