"""Loader setups people use, preempted for real under `jobwrap run`: bit-exact, or refused at job.loader().

Each setup is run once uninterrupted and once preempted at an epoch boundary and
mid-epoch in the next epoch (tests/loader_jobs.py), and the two final
checkpoints are compared bit for bit.
"""
from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import numpy
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import jobwrap
from jobwrap.errors import ConfigError
from jobwrap.testing import assert_same_run, run_preempted

JOB = Path(__file__).resolve().parent / "loader_jobs.py"
STEPS_PER_EPOCH = 7  # 40 samples in batches of 6; 6 with drop_last


@pytest.mark.parametrize("options", [
    ["--loader", "generator"],                               # DataLoader(generator=g) at an epoch boundary
    ["--loader", "sampler", "--augment"],                    # sampler=RandomSampler(generator=g)
    ["--loader", "generator", "--workers", "2", "--worker-init", "--augment", "--validate", "--drop-last"],
    ["--loader", "batch-sampler", "--augment", "--validate"],  # a custom batch_sampler with its own RNGs
    ["--loader", "batch-sampler-generator", "--workers", "2"],
    ["--loader", "distributed"],                             # DistributedSampler with set_epoch
    ["--loader", "shuffle", "--workers", "2", "--augment"],  # numpy in forked workers, no worker_init_fn
    ["--loader", "iterable"],                                # IterableDataset without __len__
    ["--loader", "iterable", "--workers", "2"],
    ["--loader", "stateful-iterable"],                       # resumed through its state_dict
    ["--loader", "stateful-iterable", "--workers", "2"],     # its state is in the workers: replayed
    ["--loader", "list"],
], ids=lambda options: "-".join(o.lstrip("-") for o in options[1:]))
def test_loader_setup_resumes_bit_exact(tmp_path, options):
    """A preempted run of this loader setup ends with the uninterrupted run's checkpoint, bit for bit."""
    steps = STEPS_PER_EPOCH - ("--drop-last" in options)
    command = [sys.executable, str(JOB), "--epochs", "2", *options]
    plain = run_preempted(command, tmp_path / "plain").check()
    cut = run_preempted(command, tmp_path / "cut", preempt_at=[steps, steps + 3]).check()
    assert cut.signalled_at == [steps, steps + 3]
    assert_same_run(plain.directory, cut.directory)


def _table() -> TensorDataset:
    return TensorDataset(torch.arange(12.0).reshape(12, 1))


class _Count(torch.utils.data.IterableDataset):
    """An iterable dataset: its loader is replayed, not skipped."""

    def __iter__(self):
        return iter(range(12))


@pytest.mark.parametrize("make, problem", [
    (lambda: (x for x in range(3)), "can be iterated only once"),
    (lambda: iter([1, 2, 3]), "can be iterated only once"),
    (lambda: DataLoader(_Count(), num_workers=2, persistent_workers=True), "persistent_workers=True"),
    (lambda: DataLoader(_table(), num_workers=2, in_order=False), "in_order=False"),
    (lambda: DataLoader(_table(), sampler=iter(range(12))), "sampler"),
    (lambda: DataLoader(_table(), batch_sampler=iter([[0, 1], [2, 3]])), "batch_sampler"),
])
def test_loader_that_cannot_be_resumed_is_refused(tmp_path, make, problem):
    """A one-shot iterator or sampler, persistent workers of a replayed loader or out-of-order batches: refused."""
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        with pytest.raises(ConfigError, match=problem) as refused:
            job.loader(make())
    assert "instead" in str(refused.value) or "Pass" in str(refused.value)


def test_second_loader_inside_the_epoch_is_refused(tmp_path):
    """Wrapping a validation loader with job.loader() during or after the training epoch is refused."""
    train = DataLoader(_table(), batch_size=3, sampler=RandomSampler(_table()))
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        for epoch in job.epochs(2):
            for _ in job.loader(train):
                if job.position == 1:
                    with pytest.raises(ConfigError, match="validation"):
                        job.loader(DataLoader(_table(), batch_size=4))
            with pytest.raises(ConfigError, match="validation"):
                job.loader(DataLoader(_table(), batch_size=4))
            train = DataLoader(_table(), batch_size=3, shuffle=True)  # a new loader each epoch is fine
    assert job.step == 8


class _NumpyShuffle(torch.utils.data.Sampler):
    """A custom sampler with its own NumPy Generator (no torch RNG at all)."""

    def __init__(self, n: int) -> None:
        self.n, self.rng = n, numpy.random.default_rng(3)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.rng.permutation(self.n).tolist())


def _batches_seen(directory, stop_after: int | None) -> list[list[float]]:
    """Two epochs of a loader with a NumPy-generator sampler; SIGUSR1 to this process during step stop_after."""
    seen = []
    loader = DataLoader(_table(), batch_size=2, sampler=_NumpyShuffle(12))
    try:
        with jobwrap.Session(str(directory), environ={}) as job:
            for _ in job.epochs(2):
                for (x,) in job.loader(loader):
                    seen.append(x.flatten().tolist())
                    if job.step + 1 == stop_after:
                        os.kill(os.getpid(), signal.SIGUSR1)
    except jobwrap.Preempted:
        pass
    return seen


@pytest.mark.parametrize("stop_after", [8, 6])  # mid second epoch; the last batch of the first
def test_numpy_generator_in_a_sampler_resumes_exactly(tmp_path, stop_after):
    """A sampler's own numpy.random.Generator is put back: the resumed batches are the uninterrupted ones."""
    plain = _batches_seen(tmp_path / "plain", None)
    first = _batches_seen(tmp_path / "cut", stop_after)
    assert len(first) == stop_after
    assert first + _batches_seen(tmp_path / "cut", None) == plain


class _UnsavableSampler(_NumpyShuffle):
    def state_dict(self) -> dict:
        return {"order": numpy.arange(self.n)}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_sampler_state_a_checkpoint_cannot_hold_is_refused(tmp_path):
    """A stateful sampler whose state_dict holds a NumPy array is refused at job.loader(), not at the signal."""
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        with pytest.raises(ConfigError, match="_UnsavableSampler has a state_dict"):
            job.loader(DataLoader(_table(), sampler=_UnsavableSampler(12)))


class _Recorded(torch.utils.data.Dataset):
    """Map-style: draws from torch, random and NumPy in __getitem__, and appends each fetched index to a file."""

    def __init__(self, log: Path) -> None:
        self.log = str(log)

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        noise = torch.rand(1).item() + random.random() + float(numpy.random.rand())
        return torch.tensor([float(i), round(noise, 6)])


class _Reversed(torch.utils.data.Sampler):
    """A custom sampler: a permutation from its own torch Generator, reversed."""

    def __init__(self, n: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(4)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(reversed(torch.randperm(self.n, generator=self.generator).tolist()))


def _skip_loader(sampler: str, workers: int, log: Path, context: str | None = None) -> DataLoader:
    dataset = _Recorded(log)
    common = dict(num_workers=workers, multiprocessing_context=context)
    if sampler == "shuffle":
        return DataLoader(dataset, batch_size=2, shuffle=True, **common)
    if sampler == "generator":
        return DataLoader(dataset, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(5), **common)
    if sampler == "custom":
        return DataLoader(dataset, batch_size=2, sampler=_Reversed(12), **common)
    batches = torch.utils.data.BatchSampler(_Reversed(12), batch_size=2, drop_last=False)
    return DataLoader(dataset, batch_sampler=batches, **common)


def _draws_seen(directory: Path, loader: DataLoader, stop_after: int | None) -> list[list[float]]:
    """Two epochs of 6 batches; SIGUSR1 to this process during step stop_after; each batch's indices and draws."""
    seen = []
    torch.manual_seed(0), random.seed(0), numpy.random.seed(0)
    try:
        with jobwrap.Session(str(directory), environ={}) as job:
            for _ in job.epochs(2):
                for batch in job.loader(loader):
                    seen.append(batch.flatten().tolist() + [torch.rand(1).item(), random.random()])
                    if job.step + 1 == stop_after:
                        os.kill(os.getpid(), signal.SIGUSR1)
    except jobwrap.Preempted:
        pass
    return seen


def _fetched(log: Path) -> list[int]:
    return sorted(int(line) for line in log.read_text().split())


_SKIP_CELLS = [(sampler, workers, None) for sampler in ("shuffle", "generator", "custom", "batch_sampler")
               for workers in (0, 2)] + [("custom", 2, "spawn")]  # spawn workers start slowly: one sampler


@pytest.mark.parametrize("sampler, workers, context", _SKIP_CELLS, ids=lambda v: str(v))
def test_mid_epoch_resume_skips_without_loading(tmp_path, sampler, workers, context):
    """Resumed mid-epoch: the uninterrupted run's batches and draws, and no skipped batch is fetched again."""
    plain = _draws_seen(tmp_path / "plain", _skip_loader(sampler, workers, tmp_path / "plain.log", context), None)
    first = _draws_seen(tmp_path / "cut", _skip_loader(sampler, workers, tmp_path / "first.log", context), 9)
    assert len(first) == 9
    resumed_log = tmp_path / "resumed.log"
    resumed = _draws_seen(tmp_path / "cut", _skip_loader(sampler, workers, resumed_log, context), None)
    assert first + resumed == plain
    # Steps 9..11 are the second epoch's batches 3..5: their 6 items, and none of batches 0..2.
    assert _fetched(resumed_log) == sorted(int(batch[j]) for batch in plain[9:] for j in (0, 2))
@pytest.mark.parametrize("options", [
    ["--augment"],                   # noise from the global streams, drawn in this process
    ["--workers", "2"],              # each worker's place in the sampler, from the loader's own state
], ids=lambda options: "-".join(o.lstrip("-") for o in options))
def test_stateful_dataloader_resumes_through_its_state_bit_exact(tmp_path, options):
    """torchdata's StatefulDataLoader, preempted at an epoch's end and mid-epoch: the uninterrupted run's checkpoint."""
    pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")
    command = [sys.executable, str(JOB), "--epochs", "2", "--loader", "stateful-dataloader", *options]
    plain = run_preempted(command, tmp_path / "plain").check()
    cut = run_preempted(command, tmp_path / "cut", preempt_at=[STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3]).check()
    assert cut.signalled_at == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3]
    assert_same_run(plain.directory, cut.directory)


_AUGMENTED_STATEFUL = [sys.executable, str(JOB), "--epochs", "2", "--loader", "stateful-dataloader", "--workers", "2",
                       "--augment"]


def test_stateful_dataloader_workers_drawing_random_numbers_resume_bit_exact(tmp_path):
    """StatefulDataLoader, 2 workers whose __getitem__ draws from torch/random/NumPy: USR1 mid-epoch twice, bit-exact."""
    pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")
    plain = run_preempted(_AUGMENTED_STATEFUL, tmp_path / "plain").check()
    cut = run_preempted(_AUGMENTED_STATEFUL, tmp_path / "cut", preempt_at=[3, STEPS_PER_EPOCH + 3]).check()
    assert cut.signalled_at == [3, STEPS_PER_EPOCH + 3]
    assert_same_run(plain.directory, cut.directory)


def test_stateful_dataloader_workers_drawing_random_numbers_resume_bit_exact_after_term_to_the_group(tmp_path):
    """The same loader, TERM to every process (workers too) mid-epoch, then a relaunch: the uninterrupted run."""
    pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")
    plain = run_preempted(_AUGMENTED_STATEFUL, tmp_path / "plain").check()
    cut = run_preempted(_AUGMENTED_STATEFUL, tmp_path / "cut", preempt_at=[STEPS_PER_EPOCH + 3],
                        signal_=signal.SIGTERM, to_group=True)
    assert cut.returncode == 128 + signal.SIGTERM and "killed by signal" not in cut.stderr, cut.stderr[-2000:]
    run_preempted(_AUGMENTED_STATEFUL, tmp_path / "cut", resume=True).check()
    assert_same_run(plain.directory, cut.directory)


def test_stateful_dataloader_workers_refused_where_torchdata_lacks_the_internals(tmp_path, monkeypatch):
    """A torchdata whose loader internals are not 0.11's: a StatefulDataLoader with workers is refused at iter()."""
    sdl = pytest.importorskip("torchdata.stateful_dataloader.stateful_dataloader")
    loop = sdl._worker_loop
    monkeypatch.setattr(sdl, "_worker_loop", lambda *args: loop(*args))  # its parameters unnamed, as elsewhere
    loader = sdl.StatefulDataLoader(_table(), batch_size=3, num_workers=2)
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        with pytest.raises(ConfigError, match=r"torchdata .*num_workers=0") as refused:
            for _ in job.loader(loader):
                pass
        assert "StatefulDataLoader(num_workers=2)" in str(refused.value)
        assert list(sdl.StatefulDataLoader(_table(), batch_size=3))  # without workers: nothing to seed
    assert list(loader)  # the session's end puts torchdata's loader back


def test_stateful_dataloader_is_resumed_without_replay(tmp_path):
    """A StatefulDataLoader resumed mid-epoch loads its own state: the batches before the stop are not fetched again."""
    pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")
    from torchdata.stateful_dataloader import StatefulDataLoader

    fetched: list[int] = []

    class Counted(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> torch.Tensor:
            fetched.append(i)
            return torch.tensor([float(i)])

    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(Counted(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(3))

    with pytest.raises(RuntimeError, match="stop"), jobwrap.Session(str(tmp_path), environ={}) as job:
        for _ in job.epochs(1):
            for batch in job.loader(loader()):
                job.save()
                raise RuntimeError("stop after the first batch")
    done_before, fetched[:] = list(fetched), []
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        rest = [b.flatten().tolist() for _ in job.epochs(1) for b in job.loader(loader())]
    assert len(rest) == 3 and len(fetched) == 9
    assert sorted(done_before[:3] + fetched) == list(range(12))


# ---------------------------------------------------------------- loops that are not `for batch in job.loader()`

@pytest.mark.parametrize("workers", [0, 2])
def test_step_counted_loop_over_a_loader_resumes_bit_exact(tmp_path, workers):
    """job.steps(n) pulling next() from job.loader(): n steps, one boundary each, resumed bit-exact across passes."""
    from jobwrap.testing import final_state

    command = [sys.executable, str(JOB), "--loader", "generator", "--augment", "--steps", "10",
               "--workers", str(workers)]
    plain = run_preempted(command, tmp_path / "plain").check()
    cut = run_preempted(command, tmp_path / "cut", preempt_at=[3, STEPS_PER_EPOCH + 1]).check()
    assert cut.signalled_at == [3, STEPS_PER_EPOCH + 1]
    state = final_state(plain.directory)
    assert state["step"] == 10 and len(state["seen"]) == 10  # one batch per step, no step counted twice
    assert state["jobwrap"]["position"] == 10 - STEPS_PER_EPOCH  # the second pass's batches handed out
    assert_same_run(plain.directory, cut.directory)


def test_accumulation_keyed_on_the_batch_index_resumes_mid_window(tmp_path):
    """optimizer.step() every 3 batches keyed on loader.enumerate()'s index: a stop mid-window resumes bit-exact."""
    command = [sys.executable, str(JOB), "--epochs", "2", "--loader", "shuffle", "--augment", "--accumulate", "3"]
    plain = run_preempted(command, tmp_path / "plain").check()
    # Step 8 is the second epoch's batch 1: inside the window that steps at its batch 2.
    cut = run_preempted(command, tmp_path / "cut", preempt_at=[8]).check()
    assert cut.signalled_at == [8]
    assert_same_run(plain.directory, cut.directory)


def test_enumerate_goes_on_from_the_resumed_position(tmp_path):
    """loader.enumerate() yields each batch's index in its epoch, also after a mid-epoch resume."""
    loader = DataLoader(_table(), batch_size=2)
    with pytest.raises(RuntimeError, match="stop"), jobwrap.Session(str(tmp_path), environ={}) as job:
        for _ in job.epochs(1):
            for i, _batch in job.loader(loader).enumerate():
                if i == 2:
                    job.save()
                    raise RuntimeError("stop inside batch 2")
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        pairs = [(i, int(b[0][0].item())) for _ in job.epochs(1) for i, b in job.loader(loader).enumerate()]
    assert pairs == [(3, 6), (4, 8), (5, 10)]


def test_wrapped_loader_reads_like_the_loader(tmp_path):
    """job.loader(dl) passes dataset, sampler, batch_size, num_workers, drop_last and len() through, mid-loop too."""
    dataset = _table()
    loader = DataLoader(dataset, batch_size=5, drop_last=True)
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        wrapped = job.loader(loader)
        for _ in wrapped:
            assert wrapped.dataset is dataset and wrapped.sampler is loader.sampler
            assert (wrapped.batch_size, wrapped.num_workers, wrapped.drop_last, len(wrapped)) == (5, 0, True, 2)
        with pytest.raises(AttributeError):
            wrapped.no_such_attribute


def _save_after_break(directory: Path, shape: str) -> int:
    """Trains 5 batches, breaks off at the 6th, then saves: the saved step."""
    loader = DataLoader(_table(), batch_size=1)
    with jobwrap.Session(str(directory), environ={}, save_at_end=False) as job:
        for _ in job.epochs(1):
            batches = job.loader(loader).enumerate()
            if shape == "held":
                batches = iter(batches)
            for i, _batch in batches:
                if i == 5:
                    break
                try:
                    if i == 4:
                        raise ValueError
                except ValueError:
                    job.save()  # in the body (an except clause is compiled after the loop): the batch counts
            saved = job.save()
            assert batches is not None  # the held iterator is alive here
            return saved.step


def test_save_after_leaving_a_loader_loop_records_the_batches_trained(tmp_path):
    """job.save() after `break` records 5 steps for 5 trained batches, whether or not the iterator is still held."""
    assert _save_after_break(tmp_path / "for", "for") == 5
    assert _save_after_break(tmp_path / "held", "held") == 5


def _stop_mid_epoch(directory: Path, loader: DataLoader, at: int) -> None:
    """Trains ``at`` batches of the first epoch, saves, and dies."""
    with pytest.raises(RuntimeError, match="stop"), jobwrap.Session(str(directory), environ={}) as job:
        for _ in job.epochs(1):
            for _batch in job.loader(loader):
                if job.position + 1 == at:
                    job.save()
                    raise RuntimeError("stop")


@pytest.mark.parametrize("rebuilt, changed", [
    (lambda: DataLoader(TensorDataset(torch.arange(40.0)), batch_size=8), "batch_size 6 -> 8"),
    (lambda: DataLoader(TensorDataset(torch.arange(30.0)), batch_size=6), "samples 40 -> 30"),
    (lambda: DataLoader(TensorDataset(torch.arange(40.0)), batch_size=6, shuffle=True), "RandomSampler"),
    (lambda: DataLoader(TensorDataset(torch.arange(40.0)), batch_size=6, drop_last=True), "drop_last False -> True"),
])
def test_loader_rebuilt_differently_is_refused_mid_epoch(tmp_path, rebuilt, changed):
    """A resume mid-epoch with another batch size, dataset length, sampler or drop_last is refused, naming it."""
    _stop_mid_epoch(tmp_path, DataLoader(TensorDataset(torch.arange(40.0)), batch_size=6), at=3)
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        with pytest.raises(jobwrap.StateMismatchError, match=changed) as refused:
            job.loader(rebuilt())
    assert "restart_epoch=True" in str(refused.value) and "3 batches into epoch 0" in str(refused.value)


def test_restart_epoch_trains_the_epoch_again_with_the_new_loader(tmp_path):
    """job.loader(new, restart_epoch=True) after a mid-epoch stop starts the epoch over from its first batch."""
    _stop_mid_epoch(tmp_path, DataLoader(TensorDataset(torch.arange(40.0)), batch_size=6), at=3)
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        firsts = [int(b[0][0].item()) for _ in job.epochs(1)
                  for b in job.loader(DataLoader(TensorDataset(torch.arange(40.0)), batch_size=8), restart_epoch=True)]
    assert firsts == [0, 8, 16, 24, 32] and job.step == 3 + 5


# ---------------------------------------------------------------- generators that live only in the workers

@pytest.mark.parametrize("kind", ["numpy", "torch", "python"])
def test_generator_made_by_worker_init_fn_resumes_bit_exact(tmp_path, kind):
    """A dataset's generator made in worker_init_fn from get_worker_info().seed (2 workers): resumed bit-exact."""
    command = [sys.executable, str(JOB), "--epochs", "2", "--loader", "shuffle", "--workers", "2",
               "--worker-rng", kind]
    plain = run_preempted(command, tmp_path / "plain").check()
    cut = run_preempted(command, tmp_path / "cut", preempt_at=[STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3]).check()
    assert cut.signalled_at == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3]
    assert_same_run(plain.directory, cut.directory)


def test_generator_made_lazily_in_a_worker_is_refused_at_the_first_batch(tmp_path):
    """A generator a worker's first __getitem__ makes is refused at the first batch, naming it and the way out."""
    command = [sys.executable, str(JOB), "--epochs", "1", "--loader", "shuffle", "--workers", "2",
               "--worker-rng", "lazy-numpy"]
    run = run_preempted(command, tmp_path, supervised=False)
    assert run.returncode != 0
    assert "ConfigError" in run.stderr and "dataset.rng" in run.stderr and "worker_init_fn" in run.stderr
    assert not list(tmp_path.glob("step-*.pt"))  # refused before any step was trained


def test_generator_made_in_init_with_no_workers_resumes_bit_exact(tmp_path):
    """num_workers=0, a NumPy Generator made in the dataset's __init__ drawing in __getitem__: preempted mid-epoch
    with a real signal, the resumed run equals the uninterrupted one bit for bit."""
    command = [sys.executable, str(JOB), "--epochs", "2", "--loader", "shuffle", "--workers", "0",
               "--worker-rng", "init-numpy"]
    plain = run_preempted(command, tmp_path / "plain").check()
    cut = run_preempted(command, tmp_path / "cut", preempt_at=[3, STEPS_PER_EPOCH + 2]).check()
    assert cut.signalled_at == [3, STEPS_PER_EPOCH + 2]
    assert_same_run(plain.directory, cut.directory)


@pytest.mark.parametrize("loader", ["shuffle", "stateful-dataloader"])
def test_generator_made_lazily_with_no_workers_is_refused_at_the_first_batch(tmp_path, loader):
    """num_workers=0 (a DataLoader skipped on resume, torchdata's StatefulDataLoader resumed through its state),
    a generator the first __getitem__ makes from torch.initial_seed(): refused at the first batch with the
    worker-side message, naming it and the way out."""
    command = [sys.executable, str(JOB), "--epochs", "1", "--loader", loader, "--workers", "0",
               "--worker-rng", "lazy-numpy"]
    run = run_preempted(command, tmp_path, supervised=False)
    assert run.returncode != 0
    assert "ConfigError" in run.stderr and "made the random generator dataset.rng" in run.stderr, run.stderr[-2000:]
    assert "num_workers=0" in run.stderr and "__init__" in run.stderr
    assert not list(tmp_path.glob("step-*.pt"))  # refused before any step was trained


def test_persistent_workers_resume_bit_exact_after_term_to_the_process_group(tmp_path):
    """persistent_workers=True, 2 workers drawing noise: TERM to every process mid-epoch, relaunch, bit-exact."""
    command = [sys.executable, str(JOB), "--epochs", "3", "--loader", "generator", "--workers", "2", "--augment",
               "--persistent", "--worker-rng", "numpy"]
    plain = run_preempted(command, tmp_path / "plain").check()
    cut = run_preempted(command, tmp_path / "cut", preempt_at=[STEPS_PER_EPOCH + 3], signal_=signal.SIGTERM,
                        to_group=True)
    assert cut.returncode == 128 + signal.SIGTERM and "killed by signal" not in cut.stderr, cut.stderr[-2000:]
    run_preempted(command, tmp_path / "cut").check()  # the relaunch: kept workers again from its next epoch
    assert_same_run(plain.directory, cut.directory)


class _PidNoise(torch.utils.data.Dataset):
    """Each item: the worker's pid and a draw from torch's global stream."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(os.getpid()), torch.rand(1).item()], dtype=torch.float64)


def test_persistent_workers_are_kept_and_draw_anew_each_epoch(tmp_path):
    """With persistent_workers=True the same worker processes serve every epoch, and each epoch draws other noise."""
    loader = DataLoader(_PidNoise(), batch_size=2, num_workers=2, persistent_workers=True)
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        epochs = [torch.cat(list(job.loader(loader))) for _ in job.epochs(2)]
    assert set(epochs[0][:, 0].tolist()) == set(epochs[1][:, 0].tolist())  # the same two workers
    assert len(set(epochs[0][:, 0].tolist())) == 2
    assert not set(epochs[0][:, 1].tolist()) & set(epochs[1][:, 1].tolist())  # no draw repeated


def _stop_in_batch_2(directory: Path, loader: DataLoader) -> None:
    """Trains batches 0 and 1 of the first epoch through loader.enumerate(), saves inside batch 2, then fails."""
    with pytest.raises(RuntimeError, match="stop"), jobwrap.Session(str(directory), environ={}) as job:
        for _ in job.epochs(1):
            for i, _batch in job.loader(loader).enumerate():
                if i == 2:
                    job.save()
                    raise RuntimeError("stop inside batch 2")


@pytest.mark.parametrize("launch", ["fresh", "resumed"])
def test_enumerate_around_a_wrapped_loader_is_refused_at_its_first_batch(tmp_path, launch):
    """enumerate(job.loader(dl)) is refused at the first batch of a fresh launch and of a resumed one, before
    any step trains, with the message naming loader.enumerate(); a resumed run's position is left as saved."""
    loader = DataLoader(_table(), batch_size=2)
    if launch == "resumed":
        _stop_in_batch_2(tmp_path, loader)
    bodies = 0
    with pytest.raises(ConfigError, match=r"enumerate\(job\.loader\(\.\.\.\)\) restarts at 0 .*"
                                          r"job\.loader\(dl\)\.enumerate\(\)"):
        with jobwrap.Session(str(tmp_path), environ={}) as job:
            for _ in job.epochs(1):
                for _pair in enumerate(job.loader(loader)):
                    bodies += 1
    assert bodies == 0 and job.step == (3 if launch == "resumed" else 0)


def test_loader_enumerate_method_is_not_refused_and_resumes(tmp_path):
    """loader.enumerate() (unlike the builtin around the loader) runs on a resumed launch, from the saved index."""
    loader = DataLoader(_table(), batch_size=2)
    _stop_in_batch_2(tmp_path, loader)
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        indices = [i for _ in job.epochs(1) for i, _batch in job.loader(loader).enumerate()]
    assert indices == [3, 4, 5]


def test_zipped_wrapped_loaders_are_refused_at_the_second_ones_first_batch(tmp_path):
    """zip(job.loader(a), job.loader(b)) is refused when b's iterator asks for its first batch, before a step."""
    a, b = DataLoader(_table(), batch_size=2), DataLoader(_table(), batch_size=2, shuffle=True)
    bodies = 0
    with pytest.raises(ConfigError, match=r"job\.loader\(\): a second job\.loader\(\) iterator .*StackDataset"):
        with jobwrap.Session(str(tmp_path), environ={}) as job:
            for _ in job.epochs(1):
                for _pair in zip(job.loader(a), job.loader(b)):
                    bodies += 1
    assert bodies == 0 and job.step == 0


def test_wrapped_loaders_one_after_the_other_are_not_refused(tmp_path):
    """A wrapped iterator left by break (and dropped) leaves the next epoch's new job.loader() iterator free."""
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        for epoch in job.epochs(3):
            for _batch in job.loader(DataLoader(_table(), batch_size=2 + epoch)):
                if job.position == 2:
                    break
    assert job.step == 3 * 2


def _hand_out_across_steps(directory: Path, shape: str, workers: int) -> list[int]:
    """Trains with a second, unwrapped DataLoader's iterator in the shape asked; the steps its batches came at."""
    aux_loader = DataLoader(_table(), batch_size=2, shuffle=True, num_workers=workers)
    at: list[int] = []
    with jobwrap.Session(str(directory), environ={}) as job:
        if shape == "while_next":  # nanoGPT: it = iter(train_loader); while True: next(it) ...; job.step_done()
            it = iter(aux_loader)
            while job.step < 4:
                next(it)
                at.append(job.step)
                job.step_done()
            return at
        for _ in job.epochs(1):
            aux = iter(aux_loader)
            for _batch in job.loader(DataLoader(_table(), batch_size=4)):
                next(aux)
                at.append(job.step)
    return at


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shape", ["while_next", "aux"])
def test_unwrapped_iterator_spanning_a_step_boundary_is_refused(tmp_path, shape, workers):
    """A DataLoader iterator not from job.loader() that hands out batches at two steps is refused at the second,
    naming its dataset and iter(job.loader(dl)); the batch of the first step was trained."""
    at: list[int] = []
    with pytest.raises(ConfigError, match=r"DataLoader over TensorDataset handed out batches at step 0 and again "
                                          r"at step 1 .*iter\(job\.loader\(dl\)\)"):
        at = _hand_out_across_steps(tmp_path, shape, workers)
    assert at == []  # raised in the second step's next(), before its body
    events = (tmp_path / ".jobwrap" / "events.jsonl")
    assert not events.exists() or "ConfigError" in events.read_text()


@pytest.mark.parametrize("workers", [0, 2])
def test_unwrapped_loaders_used_within_one_step_are_not_refused(tmp_path, workers):
    """Validation loaders iterated within one step (whole, left by break, or with persistent workers whose iterator
    a new pass resets), and an iterator re-created each step, train every step to the end."""
    val = DataLoader(_table(), batch_size=3, num_workers=workers, persistent_workers=bool(workers))
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        for _ in job.epochs(2):
            for _batch in job.loader(DataLoader(_table(), batch_size=4)):
                assert len(list(val)) == 4
                for _val_batch in val:
                    break
                held = iter(DataLoader(_table(), batch_size=5))
                next(held)
    assert job.step == 2 * 3


def test_iterator_watch_ends_with_the_session(tmp_path):
    """After the session closes, torch's DataLoader iterators are torch's own again and span steps freely."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter
    original = _BaseDataLoaderIter.__next__
    loader = DataLoader(_table(), batch_size=2)
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        assert _BaseDataLoaderIter.__next__ is not original
        it = iter(loader)
        next(it)
        job.step_done()
    assert _BaseDataLoaderIter.__next__ is original
    next(it)  # a later step of a script that goes on without jobwrap
