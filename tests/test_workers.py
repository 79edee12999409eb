"""DataLoader workers started during a Session outlive a stop signal from anyone but their parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Starts a loader's workers inside a Session, waits until the test has sent TERM to them, then
# reads every batch; the parent then terminates one worker itself, and one iterator is left
# alive for the interpreter's exit, where multiprocessing terminates and joins its workers.
SCRIPT = """\
import os, sys, time
import torch
from torch.utils.data import DataLoader, TensorDataset
import jobwrap
if sys.argv[5] == "stateful":  # torchdata's loader runs its own worker loop
    from torchdata.stateful_dataloader import StatefulDataLoader as DataLoader

KEPT = []  # alive at the interpreter's exit


def main():
    ready, sent = sys.argv[2], sys.argv[3]
    with jobwrap.Session(sys.argv[1]):
        loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=2,
                            multiprocessing_context=sys.argv[4])
        it = iter(loader)
        # One batch from each worker: both are in their loop, past the start-up a spawned worker is not
        # protected in (docs/design.md); a TERM then must not end either.
        (first,), (second,) = next(it), next(it)
        with open(ready, "w") as f:
            f.write(" ".join(str(w.pid) for w in it._workers))
        deadline = time.monotonic() + 60
        while not os.path.exists(sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        total = first.sum().item() + second.sum().item() + sum(batch.sum().item() for (batch,) in it)
        print("sum", int(total), flush=True)
        if sys.argv[4] != "fork":
            return  # their imports' threads (OpenBLAS) do not block the signals: the parent's TERM may be ignored
        other = iter(loader)
        next(other)
        other._workers[0].terminate()  # the parent's TERM still ends a worker
        other._workers[0].join(30)
        print("terminated", other._workers[0].exitcode, flush=True)
        KEPT.append(iter(loader))
        next(KEPT[0])


if __name__ == "__main__":  # spawn and forkserver workers import this file
    main()
"""


@pytest.mark.parametrize("context, kind", [("fork", "torch"), ("spawn", "torch"), ("forkserver", "torch"),
                                           ("fork", "stateful"), ("spawn", "stateful")])
def test_worker_survives_term_from_others_and_obeys_its_parent(tmp_path: Path, context: str, kind: str):
    """TERM from outside leaves the workers working (DataLoader's and StatefulDataLoader's); a forked one's parent
    still ends it, also at exit."""
    if kind == "stateful":
        pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")
    script = tmp_path / "loader.py"
    script.write_text(SCRIPT)
    ready, sent = tmp_path / "ready", tmp_path / "sent"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBWRAP_", "SLURM_"))}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck"), str(ready), str(sent), context, kind],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ready.exists() and ready.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.01)
        for pid in ready.read_text().split():
            os.kill(int(pid), signal.SIGTERM)
        sent.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    expected = ["sum", str(sum(range(64)))] + (["terminated", "0"] if context == "fork" else [])
    assert out.split() == expected, err[-3000:]


def test_worker_entry_point_is_hooked_once_whatever_the_order_of_the_undos():
    """The shield and the per-batch seeding share one hook of torch's worker entry point; a seeding that ends while
    the session's shield holds leaves the shield in place, and the last undo puts torch's own function back."""
    from torch.utils.data._utils import worker

    from jobwrap._compat.torch_loader import WORKER_LOOP
    from jobwrap._loop.workers import _current_steps, guard_dataloader_workers, seeded_workers

    original = worker._worker_loop
    seeding = seeded_workers(3)
    seeding.__enter__()  # a loader's iterator starts its workers...
    hook = worker._worker_loop
    unguard = guard_dataloader_workers([signal.SIGUSR1])  # ...while a session starts
    assert worker._worker_loop is hook
    assert [type(step).__name__ for step in _current_steps(WORKER_LOOP)] == ["_SeedBatches", "_Shield"]
    seeding.__exit__(None, None, None)  # the seeding ends first: the shield stays
    assert worker._worker_loop is hook
    assert [type(step).__name__ for step in _current_steps(WORKER_LOOP)] == ["_Shield"]
    unguard()
    assert worker._worker_loop is original and WORKER_LOOP.original() is original
