"""The torch, Lightning, transformers and torchdata releases jobwrap is tested on, and a warning beside any other.

jobwrap reaches into these projects (RNG state, loader positions, Lightning's fit loop, the Trainer's
checkpoints), so a release CI has not run may change what a resume restores without an error. The table
below is the single source of what is tested: pyproject.toml's declared ranges start at its oldest release
(tests/test_versions.py checks that), scripts/setup-env installs its two ends (``.venv``: the oldest torch
with the newest extras; ``.venv-edge``: the newest torch with the oldest extras) and scripts/test runs the
tests on both. A release between the two ends counts as tested, and so does a later patch of a tested minor.

The check runs where torch comes in (the first ``jobwrap.Session``, ``jobwrap.lightning``,
``jobwrap.transformers``), from the installed metadata, so the CLI starts without it. No jobwrap or
torch import here: scripts/setup-env runs this file as a script (``python jobwrap/_compat/versions.py
pins edge``) before jobwrap is installed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections.abc import Mapping

logger = logging.getLogger("jobwrap")

#: Set (to anything but empty or 0) to silence the warning about an untested release. Read here, not in
#: jobwrap._config: the check runs when the Session is imported, before any Config exists.
SILENCE_VAR = "JOBWRAP_UNTESTED_VERSIONS_OK"


@dataclasses.dataclass(frozen=True)
class Tested:
    """One project and the two releases CI installs: ``oldest`` (pyproject.toml's lower bound) and ``newest``."""

    distribution: str
    oldest: str
    newest: str

    def covers(self, version: str) -> bool:
        """Whether ``version`` lies in the tested range: from ``oldest`` up to any patch of ``newest``'s minor."""
        release = _release(version)
        return release is not None and _release(self.oldest) <= release and release[:2] <= _release(self.newest)[:2]

    def describe(self) -> str:
        """'2.13.0 to 2.14.x': the tested range in words."""
        if self.oldest == self.newest:
            return self.oldest
        return f"{self.oldest} to {'.'.join(map(str, _release(self.newest)[:2]))}.x"

    def requirement(self) -> str:
        """The pip requirement of the tested range: '>=2.13.0,<2.15'."""
        major, minor = _release(self.newest)[:2]
        return f"{self.distribution}>={self.oldest},<{major}.{minor + 1}"


#: What CI runs (scripts/setup-env pins these): update a row only with the CI run that tested it.
TESTED: tuple[Tested, ...] = (
    Tested("torch", "2.13.0", "2.14.1"),
    Tested("pytorch-lightning", "2.6.0", "2.6.6"),
    Tested("transformers", "5.0.0", "5.25.0"),
    Tested("torchdata", "0.11.0", "0.11.0"),
)
_BY_NAME = {row.distribution: row for row in TESTED}

#: Which end of each range a venv takes: the default one the oldest torch and the newest extras, the edge one
#: the newest torch and the oldest extras, so that each end of every range runs in one of the two.
ENDS = {
    "default": {"torch": "oldest", "pytorch-lightning": "newest", "transformers": "newest", "torchdata": "oldest"},
    "edge": {"torch": "newest", "pytorch-lightning": "oldest", "transformers": "oldest", "torchdata": "newest"},
}

_warned: set[str] = set()


def _release(version: str) -> tuple[int, ...] | None:
    """(2, 14, 1) for '2.14.1+cpu' or '2.14.1rc2'; None for what is not a version number."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        return None
    numbers = tuple(int(part) for part in match.group(0).split("."))
    return (numbers + (0, 0, 0))[:3]


def pins(end: str) -> list[str]:
    """The pip requirements that install one end of the tested ranges (``default`` or ``edge``)."""
    return [f"{name}=={getattr(_BY_NAME[name], which)}" for name, which in ENDS[end].items()]


def untested(installed: Mapping[str, str]) -> list[str]:
    """One warning per installed release outside its tested range (``installed``: distribution -> version)."""
    messages = []
    for name, version in installed.items():
        row = _BY_NAME.get(name)
        if row is None or row.covers(version):
            continue
        messages.append(
            f"{name} {version} is installed, but jobwrap is tested with {name} {row.describe()}: a resume may "
            f"not be bit-exact with an untested release. Install a tested one (pip install '{row.requirement()}'), "
            f"or check yours first: `jobwrap simulate --dir DIR --random 3 -- <your command>` on a small config "
            f"preempts and resumes your job and compares it with an uninterrupted run, bit for bit. "
            f"{SILENCE_VAR}=1 silences this.")
    return messages


def installed_version(distribution: str) -> str | None:
    """The installed release of ``distribution`` from its metadata (nothing imported), or None."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def warn_untested(*distributions: str, environ: Mapping[str, str] | None = None) -> None:
    """Log a warning, once a process for each, for the installed ``distributions`` outside the tested range.

    A warning, not a refusal: most untested releases work, and ``jobwrap simulate`` shows whether one does.
    """
    environ = os.environ if environ is None else environ
    if environ.get(SILENCE_VAR, "").strip() not in ("", "0"):
        return
    fresh = [name for name in distributions if name not in _warned]
    _warned.update(fresh)
    installed = {name: version for name in fresh if (version := installed_version(name)) is not None}
    for message in untested(installed):
        logger.warning("%s", message)


def _main(argv: list[str]) -> int:
    """``versions.py pins default|edge``: one requirement a line, for scripts/setup-env."""
    if len(argv) != 2 or argv[0] != "pins" or argv[1] not in ENDS:
        print(f"usage: versions.py pins {'|'.join(ENDS)}", file=sys.stderr)
        return 2
    print("\n".join(pins(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
