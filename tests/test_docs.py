"""Every ```python block of README.md and docs/*.md runs, as a real script, and the guide matches the code.

Convention: an HTML comment on the line before a block chooses how it runs,
``<!-- snippet: HARNESS [call] [preempt=S1,S2] -->``. Without one the block
is a complete script. A harness puts definitions before the block that the
prose leaves out (``build``, ``loader``, ``loss_fn``...); ``call`` appends
``train(epochs=2)``; ``preempt=...`` runs the script under ``jobwrap run``
twice, uninterrupted and with SIGUSR1 at those steps, and compares the final
checkpoints bit for bit.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobwrap._config import ENV_VARS, Config
from jobwrap._storage.events import read_events
from jobwrap.testing import assert_same_run, run_preempted

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TRAIN_PY = REPO / "examples" / "train.py"
_MARKER = re.compile(r"^<!--\s*snippet:\s*(?P<spec>.*?)\s*-->$")

# Definitions the prose leaves out. Small and seeded, so that runs are deterministic and quick;
# dropout draws random numbers, so a resume that lost the RNG state would show.
_TRAIN_DEFS = '''\
import os, random
import numpy, torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.chdir(os.environ.get("SNIPPET_CWD", "."))
random.seed(0); numpy.random.seed(0); torch.manual_seed(0)
_data = torch.Generator().manual_seed(1234)
_x = torch.randn(128, 8, generator=_data)
loader = DataLoader(TensorDataset(_x, _x[:, :3].sum(1, keepdim=True)), batch_size=16, shuffle=True)
loss_fn = F.mse_loss

def build():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
'''
_LOOP_DEFS = _TRAIN_DEFS + '''\
import jobwrap
model, optimizer, _ = build()
total_steps = 12

def train_one_step():  # full batch: the same data at every step; dropout draws from torch's RNG
    optimizer.zero_grad()
    loss_fn(model(_x), _x[:, :3].sum(1, keepdim=True)).backward()
    optimizer.step()
'''
HARNESSES = {"script": "", "train-defs": _TRAIN_DEFS, "loop-defs": _LOOP_DEFS, "train-py": "", "pytest": ""}


@dataclasses.dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    code: str
    harness: str = "script"
    call: bool = False
    preempt: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _parse_spec(spec: str) -> dict:
    words = spec.split()
    options: dict = {"harness": words[0] if words else "script"}
    for word in words[1:]:
        if word == "call":
            options["call"] = True
        elif word.startswith("preempt="):
            options["preempt"] = tuple(int(s) for s in word.split("=", 1)[1].split(","))
        elif word != "submitit":  # submitit: a label; the block submits a job itself
            raise ValueError(f"unknown snippet option {word!r}")
    return options


def snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of a Markdown file, each with the options of the marker before it."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            previous = next((lines[j].strip() for j in range(start - 2, -1, -1) if lines[j].strip()), "")
            match = _MARKER.match(previous)
            options = _parse_spec(match.group("spec")) if match else {}
            found.append(Snippet(path, start, "\n".join(body) + "\n", **options))
        i += 1
    return found


ALL = [s for doc in DOCS for s in snippets(doc)]


def _env(cwd: Path | None = None) -> dict[str, str]:
    """A clean environment: the venv's python first on PATH (blocks say "python"), no JOBWRAP_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBWRAP_")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if cwd is not None:
        env["SNIPPET_CWD"] = str(cwd)
    return env


def _script(snippet: Snippet) -> str:
    return HARNESSES[snippet.harness] + snippet.code + ("train(epochs=2)\n" if snippet.call else "")


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_every_block_is_collected_with_a_known_harness():
    """The docs have python blocks, and every marker names a harness this file knows."""
    assert len(ALL) >= 8
    assert {s.harness for s in ALL} <= set(HARNESSES)
    assert any(s.preempt for s in ALL if s.path.name == "README.md")


@pytest.mark.parametrize("snippet", ALL, ids=[s.name for s in ALL])
def test_snippet_runs(snippet: Snippet, tmp_path: Path):
    """The block runs as a real script (and, with preempt=..., resumes bit-exactly under real signals)."""
    script = tmp_path / "snippet.py"
    script.write_text(_script(snippet))
    if snippet.harness in ("train-py", "pytest"):
        shutil.copy(TRAIN_PY, tmp_path / "train.py")
    if snippet.harness == "pytest":
        test_file = tmp_path / "test_snippet.py"
        script.rename(test_file)
        out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)], tmp_path, 600)
        assert "1 passed" in out.stdout
        return
    if not snippet.preempt:
        _run([sys.executable, str(script)], tmp_path, 600)
        return
    runs = {}
    for name, steps in (("plain", ()), ("cut", snippet.preempt)):
        work = tmp_path / name
        work.mkdir()
        runs[name] = run_preempted([sys.executable, str(script)], work / "checkpoints", preempt_at=steps,
                                   env=_env(work), timeout=300).check()
    assert runs["cut"].signalled_at == list(snippet.preempt)
    assert [e["event"] for e in read_events(str(tmp_path / "cut" / "checkpoints"))].count("start") == \
        len(snippet.preempt) + 1
    assert_same_run(tmp_path / "plain" / "checkpoints", tmp_path / "cut" / "checkpoints")


def test_guide_lists_every_setting():
    """Each Config field and each JOBWRAP_* variable config.py reads appears in the guide's settings table."""
    guide = (REPO / "docs" / "guide.md").read_text()
    table = guide[guide.index("## Settings"):guide.index("## What happened")]
    for field in dataclasses.fields(Config):
        assert f"`{field.name}`" in table, field.name
    for var in ENV_VARS.values():
        assert f"`{var}`" in table, var


def test_every_subcommand_help_has_an_example():
    """`jobwrap --help` and each subcommand's --help end with an example."""
    from jobwrap.cli import build_parser

    parser = build_parser()
    assert "example" in parser.format_help()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"run", "ls", "status", "simulate", "submit"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        assert "example" in sub.format_help(), name
