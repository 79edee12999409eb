"""The adoption examples (examples/adopt/<shape>/before.py -> after.py), as the guide shows them.

Each before.py runs as is; each after.py resumes bit-exact under USR1 at a mid-epoch step, TERM to its whole
process group with its loader workers running, and SIGKILL after a periodic save (then a relaunch); the
ImageNet-style script's own --resume meets jobwrap's checkpoint and jobwrap says which wins; the guide's diff of
each adoption and its line counts are the files' own. Real processes, real signals, under `jobwrap run`.

`python tests/test_examples.py` rewrites the guide's diffs and counts from the examples.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from jobwrap._storage.store import CheckpointStore
from jobwrap.testing import PreemptedRun, assert_same_run, run_preempted

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "adopt"
GUIDE = REPO / "docs" / "guide.md"


@dataclasses.dataclass(frozen=True)
class Shape:
    """How the tests run one example: its arguments, and the steps where each kind of interruption lands."""

    args: tuple[str, ...]
    usr1: int  # a step boundary in the middle of an epoch
    term: int
    save_every: int  # the first periodic save, after which the process is SIGKILLed


SHAPES = {
    # 2 epochs x 6 batches, 2 workers augmenting; USR1 in epoch 0, TERM in epoch 1
    "imagenet": Shape(("--epochs", "2"), usr1=3, term=8, save_every=5),
    # 3 epochs x 13 batches; the learning rate is annealed after epoch 2 (step 26), so a resume after it
    # must restore the global lr, and in mid-epoch the carried hidden state
    "word_language_model": Shape(("--lr", "60"), usr1=31, term=20, save_every=30),
    # 3 epochs x 6 batches, train() called per epoch
    "mnist": Shape((), usr1=8, term=4, save_every=13),
    # 24 iterations of an endless loader with 2 workers; the callback samples (draws) at iterations 0, 10, 20
    "mingpt": Shape((), usr1=10, term=17, save_every=7),
}


def _script(shape: str, which: str = "after") -> Path:
    return EXAMPLES / shape / f"{which}.py"


def _run(shape: str, where: Path, args: tuple[str, ...] | None = None, **kwargs: Any) -> PreemptedRun:
    """after.py under `jobwrap run`, in ``where`` (its own files, checkpoint.pth.tar or model.pt, land there)."""
    where.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(_script(shape)), *(SHAPES[shape].args if args is None else args)]
    with contextlib.chdir(where):
        return run_preempted(command, where / "ck", timeout=600, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], PreemptedRun]:
    """The uninterrupted run of each after.py, made once for the module."""
    done: dict[str, PreemptedRun] = {}

    def get(shape: str) -> PreemptedRun:
        if shape not in done:
            done[shape] = _run(shape, tmp_path_factory.mktemp(f"plain-{shape}")).check()
        return done[shape]
    return get


def _resumed_at(run: PreemptedRun, step: int) -> bool:
    return f"resumed from step-{step:012d}.pt" in run.stderr


def _losses(output: str) -> list[str]:
    """The lines a script prints about training, without the times in them."""
    lines = [line for line in output.splitlines() if re.search(r"[Ll]oss", line)]
    return [re.sub(r"(ms/batch|time:|iter_dt)\s*[\d.]+(ms|s)?[;|]?", "", line) for line in lines]


@pytest.mark.parametrize("shape", SHAPES)
def test_before_runs_as_is(shape: str, tmp_path: Path, reference: Callable[[str], PreemptedRun]) -> None:
    """Each before.py is a real script without jobwrap: it runs to its end; where it has no loader workers, the
    adopted after.py trains the same numbers (adopting changes what survives a signal, not what is trained)."""
    assert "jobwrap" not in _script(shape, "before").read_text()
    out = subprocess.run([sys.executable, str(_script(shape, "before")), *SHAPES[shape].args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _losses(out.stdout)
    if shape in ("word_language_model", "mnist"):  # with workers, jobwrap seeds each batch (guide: loaders)
        assert _losses(out.stdout) == _losses(reference(shape).stdout)


@pytest.mark.parametrize("shape", SHAPES)
def test_usr1_mid_epoch_resumes_bit_exact(shape: str, tmp_path: Path, reference: Callable[[str], PreemptedRun]):
    """USR1 at a step in the middle of an epoch: requeued by `jobwrap run`, resumed there, final state bit-exact."""
    step = SHAPES[shape].usr1
    cut = _run(shape, tmp_path, preempt_at=[step]).check()
    assert cut.signalled_at == [step] and _resumed_at(cut, step), cut.stderr[-3000:]
    assert_same_run(reference(shape).directory, cut.directory)


@pytest.mark.parametrize("shape", SHAPES)
def test_term_to_the_process_group_with_workers_resumes_bit_exact(shape: str, tmp_path: Path,
                                                                   reference: Callable[[str], PreemptedRun]):
    """TERM to every process of the run, loader workers included (a plain scancel): the step finishes, the
    checkpoint commits, exit 143 without a requeue; launched again, it resumes there bit-exact."""
    step = SHAPES[shape].term
    stopped = _run(shape, tmp_path, preempt_at=[step], signal_=signal.SIGTERM, to_group=True)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "killed by signal" not in stopped.stderr  # no DataLoader worker died of it
    again = _run(shape, tmp_path).check()
    assert _resumed_at(again, step), again.stderr[-3000:]
    assert_same_run(reference(shape).directory, again.directory)


@pytest.mark.parametrize("shape", SHAPES)
def test_sigkill_after_a_periodic_save_resumes_bit_exact(shape: str, tmp_path: Path,
                                                         reference: Callable[[str], PreemptedRun]):
    """Periodic saves, and SIGKILL the moment the first one commits (no signal, no warning): the relaunch
    resumes from that save and ends bit-exact, the steps after it trained again."""
    every = SHAPES[shape].save_every
    env = {"JOBWRAP_SAVE_EVERY_STEPS": str(every)}
    killed = _run(shape, tmp_path, env={**env, "JOBWRAP_TEST_KILL_AT": "committed"})
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr[-3000:]
    assert [c.step for c in CheckpointStore(str(tmp_path / "ck")).committed()] == [every]
    again = _run(shape, tmp_path, env=env).check()
    assert _resumed_at(again, every), again.stderr[-3000:]
    assert_same_run(reference(shape).directory, again.directory)


def test_imagenet_own_resume_meets_jobwraps_checkpoint_and_jobwrap_says_which_wins(tmp_path: Path) -> None:
    """imagenet/after.py --resume FILE (its own save_checkpoint() of epoch 0): with no jobwrap checkpoint yet the
    script's epoch 1 begins the run (an info line says so); preempted in epoch 2, the relaunch loads FILE again
    (epoch 1) but jobwrap's checkpoint wins, with a warning naming both; bit-exact against the same command
    uninterrupted."""
    seeded = subprocess.run([sys.executable, str(_script("imagenet", "before")), "--epochs", "1", "-j", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    shutil.move(tmp_path / "checkpoint.pth.tar", tmp_path / "seed.pth.tar")  # 'epoch': 1, the next to run
    args = ("--epochs", "3", "-j", "0", "--resume", str(tmp_path / "seed.pth.tar"))  # workers: tested above
    plain = _run("imagenet", tmp_path / "plain", args).check()
    cut = _run("imagenet", tmp_path / "cut", args, preempt_at=[8]).check()  # 6 batches an epoch: epoch 2
    for run in (plain, cut):
        assert "no jobwrap checkpoint yet: beginning at epoch 1, the script's own" in run.stderr
    assert ("job.epochs(start=1), the script's own resume (--resume " + str(tmp_path / "seed.pth.tar") + "), is not "
            "where jobwrap goes on: step-000000000008.pt wins, training goes on with epoch 2") in cut.stderr
    assert "is not where jobwrap goes on" not in plain.stderr
    assert_same_run(plain.directory, cut.directory)


# ---------------------------------------------------------------- the guide shows the examples as they are

def adoption_diff(shape: str) -> str:
    """The unified diff from before.py to after.py, as the guide prints it."""
    before, after = (_script(shape, which).read_text().splitlines(keepends=True) for which in ("before", "after"))
    return "".join(difflib.unified_diff(before, after, f"examples/adopt/{shape}/before.py",
                                        f"examples/adopt/{shape}/after.py"))


def changed_lines(shape: str) -> tuple[int, int]:
    """(lines added or changed, lines removed) by the adoption, blank lines left out."""
    lines = adoption_diff(shape).splitlines()[2:]
    return (sum(line.startswith("+") and bool(line[1:].strip()) for line in lines),
            sum(line.startswith("-") and bool(line[1:].strip()) for line in lines))


_BLOCK = re.compile(r"<!-- adoption: (?P<shape>\w+) -->\n```diff\n(?P<diff>.*?)```\n", re.S)
_ROW = re.compile(r"^\| \[`(?P<shape>\w+)`\]\(\.\./examples/adopt/\w+\) \|(?P<what>[^|]*)\| (?P<added>\d+) \| "
                  r"(?P<removed>\d+) \|$", re.M)


def test_the_guide_shows_each_adoption_diff_and_its_line_counts() -> None:
    """docs/guide.md holds each example's before->after diff exactly as difflib makes it from the files, and its
    table states each adoption's line counts as the diff has them (run this file as a script to rewrite both)."""
    guide = GUIDE.read_text()
    blocks = {m["shape"]: m["diff"] for m in _BLOCK.finditer(guide)}
    rows = {m["shape"]: (int(m["added"]), int(m["removed"])) for m in _ROW.finditer(guide)}
    assert set(blocks) == set(SHAPES) == set(rows), (sorted(blocks), sorted(rows))
    for shape in SHAPES:
        assert blocks[shape] == adoption_diff(shape), f"{shape}: python tests/test_examples.py rewrites the guide"
        assert rows[shape] == changed_lines(shape), f"{shape}: python tests/test_examples.py rewrites the guide"


def test_the_readme_counts_the_lines_it_changes() -> None:
    """README.md's line counts are the diffs': its quickstart's before and after blocks (the numbered comments left
    out), and the four examples in the order it names them."""
    readme = (REPO / "README.md").read_text()
    before, after = (re.sub(r"\s+# \d+:.*", "", block).splitlines(keepends=True)
                     for block in re.findall(r"```python\n(.*?)```", readme, re.S)[:2])
    lines = list(difflib.unified_diff(before, after))[2:]
    added = sum(line.startswith("+") and bool(line[1:].strip()) for line in lines)
    assert f"After: {added} lines added or changed" in readme
    paragraph = readme[readme.index("A real script takes"):].split("\n\n")[0]
    assert [int(n) for n in re.findall(r"\((\d+)(?: lines)?\)", paragraph)] == [
        changed_lines(shape)[0] for shape in ("imagenet", "word_language_model", "mnist", "mingpt")]


def rewrite_guide() -> None:
    """Put each example's diff and line counts into docs/guide.md (blocks and table rows already there)."""
    guide = GUIDE.read_text()
    guide = _BLOCK.sub(lambda m: f"<!-- adoption: {m['shape']} -->\n```diff\n{adoption_diff(m['shape'])}```\n", guide)
    guide = _ROW.sub(lambda m: (f"| [`{m['shape']}`](../examples/adopt/{m['shape']}) |{m['what']}| "
                                f"{changed_lines(m['shape'])[0]} | {changed_lines(m['shape'])[1]} |"), guide)
    GUIDE.write_text(guide)


if __name__ == "__main__":
    rewrite_guide()
