"""What the campaign records: a fault with its expectation, a row of the results table, the campaign.

Pure: no jobwrap, no torch. A check is a function that makes one fault real and
returns ``(ok, observed)``; it raises :class:`Skip` where the machine cannot make
the fault real, and may raise :class:`Failed` to stop early with what it saw.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import tempfile
from typing import Any, Callable, Iterable

QUICK = {"kills": 40, "bitflips": 12, "truncations": 8, "storms": 3, "grace": 6, "policy": 40}
FULL = {"kills": 400, "bitflips": 200, "truncations": 60, "storms": 12, "grace": 30, "policy": 400}

Outcome = tuple[bool, str]


class Skip(Exception):
    """This fault cannot be made real on this machine; the message says why."""


class Failed(Exception):
    """The fault did not go as expected; the message is what was observed."""


def check(body: Callable[..., Outcome]) -> Callable[..., Outcome]:
    """A check that may stop early with :class:`Failed`: that becomes ``(False, message)``."""
    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> Outcome:
        try:
            return body(*args, **kwargs)
        except Failed as failed:
            return False, str(failed)
    return run


def verdict(problems: list[str], success: str) -> Outcome:
    """``(ok, observed)`` from a list of problems: ok when there is none, then ``success`` is what was seen."""
    return not problems, "; ".join(problems) or success


def names_only(text: str) -> str:
    """``text`` with every absolute path cut down to its file name (the report names no machine paths)."""
    return re.sub(r"(?<![\w.])/(?:[^\s/:;,'\"()\[\]]+/)+", "", text)


def short(text: str, limit: int = 150) -> str:
    """``text`` without paths, cut at ``limit`` characters."""
    text = names_only(text)
    return text if len(text) <= limit else text[:limit] + "..."


def first_with(lines: list[str], word: str) -> str:
    """The first line holding ``word``, cut at 120 characters ('' when none does)."""
    found = next((line for line in lines if word in line), "")
    return (found[:120] + "...") if len(found) > 120 else found


@dataclasses.dataclass
class Row:
    """One line of the results table: a fault, how often it was tried, and what was seen."""

    area: str
    fault: str
    runs: int
    expected: str
    observed: str
    failures: int = 0
    skipped: str = ""

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        return "ok" if self.failures == 0 else f"FAIL ({self.failures})"


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault tried once: its area, what is done, what must happen, and the check that does it.

    The check is called with the campaign's scratch folder and ``args``; ``note``
    says how the fault is made where it is not the real thing.
    """

    area: str
    fault: str
    expected: str
    check: Callable[..., Outcome]
    args: tuple[Any, ...] = ()
    note: str = ""


@dataclasses.dataclass
class Tally:
    """The outcomes of a fault tried many times: how many failed, and examples of what was seen."""

    runs: int = 0
    failures: int = 0
    observed: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)

    @property
    def held(self) -> int:
        return self.runs - self.failures

    @property
    def example(self) -> str:
        """The last failure seen, else the first outcome."""
        return self.failed[-1] if self.failed else (self.observed[0] if self.observed else "")


def tally(outcomes: Iterable[Outcome]) -> Tally:
    """Count ``(ok, observed)`` outcomes, keeping what each one saw."""
    result = Tally()
    for ok, observed in outcomes:
        result.runs += 1
        result.observed.append(observed)
        if not ok:
            result.failures += 1
            result.failed.append(observed)
    return result


class Campaign:
    """Collects rows and the kill figures; one per run of the campaign (or per test)."""

    def __init__(self, seed: int, sizes: dict[str, int], workdir: str) -> None:
        self.seed = seed
        self.sizes = sizes
        self.workdir = workdir
        self.rows: list[Row] = []
        self.kills: Any = None  # kills.KillFigures, once the kills section ran
        self.notes: list[str] = []

    def add(self, row: Row) -> Row:
        # The report describes the machine without paths: keep only file names.
        row.observed = names_only(row.observed)
        self.rows.append(row)
        print(f"  [{row.status}] {row.area}: {row.fault} x{row.runs}: {row.observed}", flush=True)
        return row

    def run(self, fault: Fault) -> Row:
        """Try ``fault`` once and add its row (skipped, with the reason, where it cannot be made real)."""
        try:
            ok, observed = fault.check(self.workdir, *fault.args)
        except Skip as skip:
            return self.add(Row(fault.area, fault.fault, 0, fault.expected, "", skipped=str(skip)))
        label = fault.fault + (f" [{fault.note}]" if fault.note else "")
        return self.add(Row(fault.area, label, 1, fault.expected, observed, 0 if ok else 1))

    def scratch(self, name: str) -> str:
        return tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.rows if not r.skipped)
