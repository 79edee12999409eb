"""Other projects' internals behind jobwrap/_compat: one canary per adapter, and the safe paths taken for real.

A canary fails with a message naming the internal, the installed version and the adapter to
look at ("torch 2.14.0 changed `DataLoader._index_sampler` (...): jobwrap/_compat/torch_loader.py
was checked on torch 2.13.0 and needs a look"). The fallback tests simulate a future release
(a sitecustomize in the child, or a monkeypatch) and show the run still resumes bit-exact by
replay, or is refused at start with the internal and the version.
"""
from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import jobwrap
from jobwrap._compat import torch_loader
from jobwrap._compat.notice import changed
from jobwrap.errors import ConfigError
from jobwrap.testing import assert_same_run, run_preempted

JOB = Path(__file__).resolve().parent / "loader_jobs.py"
STEPS_PER_EPOCH = 7


def _torch_changed(internal: str, difference: str) -> str:
    return changed("torch", internal, "torch_loader.py", difference, torch_loader.CHECKED)


def _table() -> TensorDataset:
    return TensorDataset(torch.arange(12.0).reshape(12, 1))


# ---------------------------------------------------------------- canaries: torch's DataLoader

def test_canary_torch_worker_entry_point():
    """torch starts each worker with `_utils.worker._worker_loop`, read then, taking the arguments jobwrap rewires."""
    from torch.utils.data import dataloader

    assert torch_loader.WORKER_LOOP.unrecognised() is None, _torch_changed(
        "torch.utils.data._utils.worker._worker_loop", str(torch_loader.WORKER_LOOP.unrecognised()))
    source = inspect.getsource(dataloader._MultiProcessingDataLoaderIter.__init__)
    assert "target=_utils.worker._worker_loop" in source, _torch_changed(
        "torch.utils.data._utils.worker._worker_loop", "the iterator no longer starts its workers from it")


def test_canary_torch_worker_signal_handlers():
    """torch's worker loop installs its C signal handlers through `signal_handling._set_worker_signal_handlers`."""
    from torch.utils.data._utils import signal_handling, worker

    assert callable(getattr(signal_handling, "_set_worker_signal_handlers", None)) and (
        "signal_handling._set_worker_signal_handlers()" in inspect.getsource(worker._worker_loop)), _torch_changed(
        "torch.utils.data._utils.signal_handling._set_worker_signal_handlers", "the worker loop no longer calls it")


def test_canary_torch_worker_tasks():
    """A worker's task is `(send index, indices)`; a persistent worker's epoch starts with `_ResumeIteration(seed)`."""
    from torch.utils.data import dataloader
    from torch.utils.data._utils import worker

    put = inspect.getsource(dataloader._MultiProcessingDataLoaderIter._try_put_index)
    assert ".put((self._send_idx, index))" in put, _torch_changed("_MultiProcessingDataLoaderIter._try_put_index",
                                                                 "a task is no longer (send index, indices)")
    assert torch_loader.batch_task_index((3, [1, 2])) == 3
    assert torch_loader.resume_seed(worker._ResumeIteration(7)) == 7, _torch_changed(
        "torch.utils.data._utils.worker._ResumeIteration", "it carries no seed")


def test_canary_torch_skip_path_probe():
    """The skip's probe recognises this torch: an iterator takes its indices from `_index_sampler`, draws its base
    seed as jobwrap does, and has a fetcher (with workers and persistent workers too)."""
    for loader in (DataLoader(_table()), DataLoader(_table(), num_workers=2),
                   DataLoader(_table(), num_workers=2, persistent_workers=True)):
        difference = torch_loader.skip_unrecognised(loader)
        assert difference is None, difference


def test_canary_torch_index_sampler():
    """`DataLoader._index_sampler` is the batch sampler with automatic batching and the sampler without."""
    batched, unbatched = DataLoader(_table(), batch_size=3), DataLoader(_table(), batch_size=None)
    assert torch_loader.index_sampler(batched) is batched.batch_sampler, _torch_changed(
        "DataLoader._index_sampler", "it is not the batch sampler")
    assert torch_loader.index_sampler(unbatched) is unbatched.sampler, _torch_changed(
        "DataLoader._index_sampler", "it is not the sampler without batching")


def test_canary_torch_base_seed_draw():
    """`_BaseDataLoaderIter` draws its workers' base seed from the loader's generator as `draw_base_seed` does."""
    from torch.utils.data import dataloader

    source = inspect.getsource(dataloader._BaseDataLoaderIter.__init__)
    assert ".random_(generator=loader.generator)" in source, _torch_changed(
        "_BaseDataLoaderIter._base_seed", "it is drawn otherwise")
    iterator = iter(DataLoader(_table(), generator=torch.Generator().manual_seed(9)))
    assert torch_loader.base_seed(iterator) == torch_loader.draw_base_seed(
        DataLoader(_table(), generator=torch.Generator().manual_seed(9)))


def test_canary_torch_single_process_fetcher():
    """A single-process iterator fetches each batch through `_dataset_fetcher.fetch`, which jobwrap wraps."""
    iterator = iter(DataLoader(_table(), batch_size=4))
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def fetch(self, indices):
            calls.append(list(indices))
            return self.inner.fetch(indices)

    torch_loader.wrap_fetcher(iterator, Counting)
    next(iterator)
    assert calls == [[0, 1, 2, 3]], _torch_changed("_SingleProcessDataLoaderIter._dataset_fetcher",
                                                   "batches are fetched otherwise")


def test_canary_torch_iterable_fetcher_end():
    """A single-process iterator over an IterableDataset says it hit the dataset's end in `_dataset_fetcher.ended`."""
    class Five(IterableDataset):
        def __iter__(self):
            return iter(range(5))

    iterator = iter(DataLoader(Five(), batch_size=3))
    next(iterator)
    assert not torch_loader.fetcher_ended(iterator)
    next(iterator)  # the short last batch: the dataset ran out inside it
    assert torch_loader.fetcher_ended(iterator), _torch_changed("_IterableDatasetFetcher.ended",
                                                                "the end is kept elsewhere")


def test_canary_torch_kept_iterator():
    """Persistent workers: the loader keeps its iterator in `_iterator`; `_reset` and `_shutdown_workers` as 2.13."""
    loader = DataLoader(_table(), num_workers=2, persistent_workers=True)
    from torch.utils.data import dataloader

    assert torch_loader.kept_unrecognised(loader) is None, torch_loader.kept_unrecognised(loader)
    assert torch_loader.kept_iterator(loader) is None
    reset = inspect.getsource(dataloader._BaseDataLoaderIter._reset)
    assert "self._sampler_iter = iter(self._index_sampler)" in reset, _torch_changed(
        "_BaseDataLoaderIter._index_sampler", "a kept iterator's next epoch takes its indices from elsewhere")


def test_canary_torch_map_style_and_own_iterator():
    """torch tells map-style loaders by the dataset's class (`_dataset_kind`); a subclass's own iterator is seen."""
    from torch.utils.data.dataloader import _DatasetKind

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    for loader in (DataLoader(_table()), DataLoader(Stream())):
        assert torch_loader.is_map_style(loader) == (loader._dataset_kind == _DatasetKind.Map), _torch_changed(
            "DataLoader._dataset_kind", "map-style is decided otherwise")

    class Own(DataLoader):
        def _get_iterator(self):
            return super()._get_iterator()

    assert torch_loader.builds_own_iterator(Own(_table())) and not torch_loader.builds_own_iterator(
        DataLoader(_table()))


def test_canary_torch_iterator_watch():
    """Iterators outside job.loader() are watched through `_BaseDataLoaderIter.__next__`, `_num_yielded`, `_dataset`."""
    dataset = _table()
    iterator = iter(DataLoader(dataset))
    assert torch_loader.iterator_class() is not None, torch_loader.iterator_class_missing()
    assert isinstance(iterator, torch_loader.iterator_class())
    next(iterator)
    assert torch_loader.yielded(iterator) == 1, _torch_changed("_BaseDataLoaderIter._num_yielded", "it is gone")
    assert torch_loader.iterator_dataset(iterator) is dataset, _torch_changed("_BaseDataLoaderIter._dataset",
                                                                            "it is gone")


# ---------------------------------------------------------------- canaries: torchdata

def test_canary_torchdata_stateful_loader():
    """StatefulDataLoader has the worker loop, `_get_iterator` and snapshot keys that per-batch seeding uses."""
    pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")
    from jobwrap._compat import torchdata

    assert torchdata.has_loader()
    difference = torchdata.unrecognised()
    assert difference is None, difference
    assert callable(torchdata.loader_module().StatefulDataLoader.__dict__.get("__iter__")), changed(
        "torchdata", "StatefulDataLoader.__iter__", "torchdata.py", "the class does not define it", torchdata.CHECKED)


def test_canary_torchdata_snapshot_step():
    """A StatefulDataLoader's state holds the step of its snapshot where `resumed_offset` reads it."""
    pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")
    from torchdata.stateful_dataloader import StatefulDataLoader

    from jobwrap._compat import torchdata

    loader = StatefulDataLoader(_table(), batch_size=2, num_workers=1, snapshot_every_n_steps=2)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    del iterator
    resumed = StatefulDataLoader(_table(), batch_size=2, num_workers=1, snapshot_every_n_steps=2)
    resumed.load_state_dict(state)
    assert torchdata.resumed_offset(resumed) == 2, changed(
        "torchdata", "StatefulDataLoader.next_iter_state", "torchdata.py", "the snapshot step is kept elsewhere",
        torchdata.CHECKED)
    assert torchdata.resumed_offset(StatefulDataLoader(_table())) == 0


def test_canary_torchdata_random_sampler():
    """torchdata's RandomSampler keeps the `num_samples` it was given in `_num_samples` (Lightning's DDP swap)."""
    pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata (pip install 'jobwrap[torchdata]')")
    from torchdata.stateful_dataloader.sampler import RandomSampler

    from jobwrap._compat import torchdata

    assert torchdata.sampler_unrecognised() is None, torchdata.sampler_unrecognised()
    assert torchdata.plain_shuffle(RandomSampler(range(4)))
    assert not torchdata.plain_shuffle(RandomSampler(range(4), num_samples=2))


def test_canary_torch_dcp_folder_reads_back(tmp_path):
    """A DCP folder this torch writes reads back through jobwrap's metadata unpickler (its list of DCP's
    classes) and its weights-only planner, tensors and plain values alike (jobwrap/_compat/torch_dcp.py)."""
    import torch.distributed.checkpoint as dcp

    from jobwrap._compat import torch_dcp
    from jobwrap._storage import sharded

    assert torch_dcp.unrecognised() is None, torch_dcp.unrecognised()
    state = {"model": {"weight": torch.arange(6.0).reshape(2, 3)},
             "optimizer": {"param_groups": [{"lr": 0.1, "params": ["weight"]}]}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    files = {path.name for path in tmp_path.iterdir()} - {sharded.METADATA}
    try:
        whole = sharded.read_full(str(tmp_path), files)
    except Exception as exc:
        raise AssertionError(changed("torch", "torch.distributed.checkpoint's folder", "torch_dcp.py",
                                     f"it no longer reads back: {exc!r}", torch_dcp.CHECKED)) from exc
    assert torch.equal(whole["model"]["weight"], state["model"]["weight"])
    assert whole["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def test_canary_torch_storage_key_and_version_counter():
    """Views of one storage share its key, another storage has another; every in-place change bumps the version
    counter (jobwrap/_compat/torch_tensor.py: the background save's staging and its lazy copy)."""
    from jobwrap._compat import torch_tensor

    base = torch.zeros(6)
    view, other = base[2:], torch.zeros(6)
    key = torch_tensor.storage_key(base.untyped_storage())
    assert key == torch_tensor.storage_key(view.untyped_storage()) != torch_tensor.storage_key(
        other.untyped_storage()), changed("torch", "UntypedStorage._cdata", "torch_tensor.py",
                                          "it no longer names the storage", torch_tensor.CHECKED)
    assert torch_tensor.has_versions()
    before = torch_tensor.version(base)
    view.add_(1)
    assert torch_tensor.version(base) > before, changed("torch", "Tensor._version", "torch_tensor.py",
                                                        "an in-place change through a view no longer bumps it",
                                                        torch_tensor.CHECKED)
    assert torch_tensor.local_shard(base) is base


def test_canary_dtensor_local_shard(monkeypatch):
    """A DTensor keeps this rank's shard where `local_shard` reads it: the tensor `to_local()` views."""
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh

    from jobwrap._compat import torch_tensor

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        local = torch.arange(4.0)
        dtensor = DTensor.from_local(local, init_device_mesh("cpu", (1,)), [Replicate()])
        shard = torch_tensor.local_shard(dtensor)
        assert shard is not dtensor and shard.data_ptr() == dtensor.to_local().data_ptr(), changed(
            "torch", "DTensor._local_tensor", "torch_tensor.py", "the local shard is kept elsewhere",
            torch_tensor.CHECKED)
    finally:
        torch.distributed.destroy_process_group()


def test_canary_numpy_global_stream():
    """`numpy.random.mtrand._rand` is the stream behind np.random.seed and np.random.rand (numpy_random.py)."""
    numpy = pytest.importorskip("numpy")
    from jobwrap._compat import numpy_random

    stream = numpy_random.global_stream()
    numpy.random.seed(3)
    drawn = numpy.random.rand()
    stream.seed(3)
    assert stream.rand() == drawn, changed("numpy", "numpy.random.mtrand._rand", "numpy_random.py",
                                           "it is no longer the global stream", "2.x")


def test_storages_are_told_apart_without_the_storage_identity(monkeypatch):
    """A torch without `UntypedStorage._cdata`: storages are keyed by device, address and size, views still share."""
    from jobwrap._compat import torch_tensor

    base, other = torch.zeros(4), torch.zeros(4)
    monkeypatch.setattr(torch_tensor, "getattr", lambda obj, name, default=None: default, raising=False)
    assert torch_tensor.storage_key(base.untyped_storage()) == torch_tensor.storage_key(base[1:].untyped_storage())
    assert torch_tensor.storage_key(base.untyped_storage()) != torch_tensor.storage_key(other.untyped_storage())
    assert isinstance(torch_tensor.storage_key(base.untyped_storage()), tuple)


def test_a_torch_without_version_counters_takes_the_safe_paths(monkeypatch, caplog):
    """A torch without `Tensor._version`: one warning, no lazy copy, and a stepped gradient is never taken for
    spent (it is saved)."""
    from jobwrap._compat import torch_tensor
    from jobwrap._loop import grads

    monkeypatch.setattr(torch_tensor, "getattr", lambda obj, name, default=None: default, raising=False)
    torch_tensor.has_versions.cache_clear()
    try:
        assert not torch_tensor.has_versions()
        assert "Tensor._version" in caplog.text
        with pytest.raises(RuntimeError, match="no version counter"):
            torch_tensor.version(torch.zeros(1))
        param = torch.nn.Parameter(torch.ones(2))
        param.grad = torch.ones(2)
        optimizer = torch.optim.SGD([param], lr=0.1)
        stepped: dict = {}
        grads.record_step(optimizer, stepped)
        assert id(param) not in stepped
    finally:
        torch_tensor.has_versions.cache_clear()


# ---------------------------------------------------------------- canaries: Lightning and transformers

def _trainer():
    pl = pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning (pip install 'jobwrap[lightning]')")
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_epochs=1)


_LIGHTNING_ADAPTERS = ["dump_checkpoint/load_checkpoint", "cluster_environment", "no_signal_handlers",
                       "before_each_fetch", "data_fetcher", "validates_after_batch", "uncount_batch",
                       "loader_states_load", "combined_loader", "stateful_protocol"]


@pytest.mark.parametrize("adapter", _LIGHTNING_ADAPTERS)
def test_canary_lightning_trainer_internal(adapter):
    """The trainer has the internal this adapter of jobwrap/_compat/lightning.py reaches, as Lightning 2.6.6 has it."""
    _trainer()
    from jobwrap._compat import lightning

    assert set(lightning.CHECKS) == set(_LIGHTNING_ADAPTERS)
    difference = lightning.CHECKS[adapter](_trainer())
    assert difference is None, difference


def test_canary_lightning_fetch_hook():
    """The train epoch loop hands `_on_before_fetch` to its fetcher each epoch: jobwrap's boundary rides on it."""
    _trainer()
    from jobwrap._compat import lightning

    assert lightning.hands_fetch_hook_to_fetcher(), changed(
        "pytorch-lightning", "_TrainingEpochLoop._on_before_fetch", "lightning.py",
        "on_run_start no longer hands it to the fetcher", lightning.CHECKED)


def test_canary_lightning_distributed_sampler_wrapper():
    """Lightning's DistributedSamplerWrapper keeps the wrapped sampler where `wrapped_sampler` reads it."""
    _trainer()
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import RandomSampler

    from jobwrap._compat import lightning

    inner = RandomSampler(range(4))
    assert lightning.wrapped_sampler(DistributedSamplerWrapper(inner, num_replicas=1, rank=0)) is inner, changed(
        "lightning-fabric", "_DatasetSamplerWrapper._sampler", "lightning.py", "the sampler is kept elsewhere",
        lightning.CHECKED)


def _lightning_logger(kind: str, tmp_path: Path):
    pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning (pip install 'jobwrap[lightning]')")
    from pytorch_lightning import loggers

    if kind == "TensorBoardLogger":
        pytest.importorskip("tensorboard", reason="needs the trackers extra")
        return loggers.TensorBoardLogger(str(tmp_path))
    if kind == "WandbLogger":
        pytest.importorskip("wandb", reason="needs the trackers extra")
        return loggers.WandbLogger(save_dir=str(tmp_path), offline=True)
    pytest.importorskip("mlflow", reason="needs the trackers extra")
    return loggers.MLFlowLogger(tracking_uri=(tmp_path / "mlruns").as_uri())


@pytest.mark.parametrize("kind", ["TensorBoardLogger", "WandbLogger", "MLFlowLogger"])
def test_canary_lightning_logger_internals(kind, tmp_path, monkeypatch):
    """The logger has what jobwrap/_compat/lightning_loggers.py names its run through, as Lightning 2.6.6 has it."""
    from jobwrap._compat import lightning_loggers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store the trackers' tests use
    assert set(lightning_loggers.CHECKS) == {"TensorBoardLogger", "WandbLogger", "MLFlowLogger"}
    logger = _lightning_logger(kind, tmp_path)
    difference = lightning_loggers.unrecognised(kind, logger)
    assert difference is None, difference
    assert not lightning_loggers.run_made(logger)


def test_canary_lightning_hands_callbacks_the_log():
    """A fit's start sets each callback's `log` (the moment jobwrap holds the loggers back) and the module's
    `_trainer` names the trainer."""
    pl = pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning (pip install 'jobwrap[lightning]')")
    from jobwrap._compat import lightning_loggers

    assert lightning_loggers.hands_callbacks_the_log(), changed(
        "pytorch-lightning", "_CallbackConnector._attach_model_logging_functions", "lightning_loggers.py",
        "it no longer sets callback.log", lightning_loggers.CHECKED)
    module, trainer = pl.LightningModule(), _trainer()
    module.trainer = trainer
    assert lightning_loggers.trainer_of_log(module.log) is trainer, changed(
        "pytorch-lightning", "LightningModule._trainer", "lightning_loggers.py", "the trainer is kept elsewhere",
        lightning_loggers.CHECKED)


def test_canary_wandb_flush_interval():
    """W&B has the setting jobwrap shortens its write interval through (jobwrap/_compat/wandb.py)."""
    pytest.importorskip("wandb", reason="needs the trackers extra")
    from jobwrap._compat import wandb as wandb_internals

    difference = wandb_internals.unrecognised()
    assert difference is None, difference


def test_canary_transformers_save_checkpoint():
    """The Trainer writes its checkpoint folder with `_save_checkpoint(model, trial)`."""
    transformers = pytest.importorskip("transformers", reason="needs the transformers extra")
    from jobwrap._compat import transformers as internals

    difference = internals.unrecognised(transformers.Trainer.__new__(transformers.Trainer))
    assert difference is None, difference


# ---------------------------------------------------------------- the safe paths, for real

def _future_torch(tmp_path: Path, body: str) -> dict[str, str]:
    """An environment whose Python processes import a sitecustomize that changes torch as a future release might."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(body))
    return {"PYTHONPATH": str(site)}


_READS_PUBLIC_SAMPLERS = """
    from torch.utils.data import dataloader

    _init = dataloader._BaseDataLoaderIter.__init__

    def __init__(self, loader):  # a future torch: an iterator takes its indices from the loader's samplers
        _init(self, loader)
        self._index_sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
        self._sampler_iter = iter(self._index_sampler)

    dataloader._BaseDataLoaderIter.__init__ = __init__
"""


def test_torch_that_no_longer_reads_the_index_sampler_is_replayed_bit_exact(tmp_path):
    """A torch whose iterator ignores `_index_sampler`: seen by the probe, one warning, replayed, bit-exact."""
    env = _future_torch(tmp_path, _READS_PUBLIC_SAMPLERS)
    command = [sys.executable, str(JOB), "--epochs", "2", "--loader", "generator", "--augment"]
    plain = run_preempted(command, tmp_path / "plain", env=env).check()
    cut = run_preempted(command, tmp_path / "cut", env=env, preempt_at=[STEPS_PER_EPOCH + 3]).check()
    assert cut.signalled_at == [STEPS_PER_EPOCH + 3]
    assert_same_run(plain.directory, cut.directory)
    assert "changed `DataLoader._index_sampler`" in cut.stderr and "jobwrap/_compat/torch_loader.py" in cut.stderr
    assert "replays a mid-epoch resume's done batches" in cut.stderr


_UNNAMED_WORKER_ARGUMENTS = """
    from torch.utils.data._utils import worker

    _loop = worker._worker_loop

    def _worker_loop(*args):  # a future torch: the worker loop's arguments are no longer named as in 2.13
        return _loop(*args)

    worker._worker_loop = _worker_loop
"""


def test_torch_with_another_worker_loop_is_replayed_bit_exact_with_workers(tmp_path):
    """A torch whose worker loop takes other arguments: workers are not seeded per batch, the epoch is replayed,
    and a run preempted mid-epoch with 2 augmenting workers still ends bit-exact."""
    env = _future_torch(tmp_path, _UNNAMED_WORKER_ARGUMENTS)
    command = [sys.executable, str(JOB), "--epochs", "2", "--loader", "shuffle", "--workers", "2", "--augment"]
    plain = run_preempted(command, tmp_path / "plain", env=env).check()
    cut = run_preempted(command, tmp_path / "cut", env=env, preempt_at=[STEPS_PER_EPOCH + 3]).check()
    assert_same_run(plain.directory, cut.directory)
    assert "changed `torch.utils.data._utils.worker._worker_loop` (it takes no argument index_queue" in cut.stderr


def test_persistent_workers_refused_where_torch_restarts_kept_workers_otherwise(tmp_path, monkeypatch):
    """Persistent workers need the skip; under a torch whose kept iterator restarts otherwise they are refused at
    job.loader(), naming the internal, the version and the way out."""
    from torch.utils.data import dataloader

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_reset", lambda self, loader: None)
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        with pytest.raises(ConfigError, match=r"torch \S+ changed `_MultiProcessingDataLoaderIter._reset`") as refused:
            job.loader(DataLoader(_table(), num_workers=2, persistent_workers=True))
    assert "persistent_workers=False" in str(refused.value) and torch_loader.CHECKED in str(refused.value)


def test_lightning_without_the_fetch_hook_is_refused_at_setup(tmp_path, monkeypatch):
    """A Lightning whose epoch loop lost `_on_before_fetch`: refused at the callback's setup, no step run."""
    pl = pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning (pip install 'jobwrap[lightning]')")
    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

    from jobwrap.lightning import Preemptible

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, index):
            raise AssertionError("no step may run")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monkeypatch.delattr(_TrainingEpochLoop, "_on_before_fetch")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=1, callbacks=[Preemptible(str(tmp_path))])
    with pytest.raises(ConfigError, match=r"pytorch-lightning \S+ changed `_TrainingEpochLoop._on_before_fetch`"):
        trainer.fit(Model(), DataLoader(_table()))


def test_transformers_without_save_checkpoint_is_refused_at_attach(tmp_path, monkeypatch):
    """A Trainer without `_save_checkpoint` is refused when attached, naming transformers' version, not at a signal."""
    transformers = pytest.importorskip("transformers", reason="needs the transformers extra")
    import jobwrap.transformers

    monkeypatch.delattr(transformers.Trainer, "_save_checkpoint")
    with jobwrap.Session(str(tmp_path), environ={}) as job:
        with pytest.raises(ConfigError, match=r"transformers \S+ changed `Trainer._save_checkpoint` \(it is gone\)"):
            jobwrap.transformers.attach(transformers.Trainer.__new__(transformers.Trainer), job)


def test_lightning_logger_without_its_naming_internal_is_refused_before_a_step(tmp_path):
    """A TensorBoardLogger that lacks `_kwargs` (where its writer's purge_step goes): the fit is refused at its
    start, naming the internal and the version, before any step or any event file."""
    pl = pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning (pip install 'jobwrap[lightning]')")
    logger = _lightning_logger("TensorBoardLogger", tmp_path / "tb")
    from jobwrap.lightning import Preemptible

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, index):
            raise AssertionError("no step may run")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    del logger._kwargs  # as a Lightning release that keeps SummaryWriter's arguments elsewhere
    trainer = pl.Trainer(logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=1, callbacks=[Preemptible(str(tmp_path / "run"))])
    with pytest.raises(ConfigError, match=r"pytorch-lightning \S+ changed `TensorBoardLogger._kwargs`.*logger=False"):
        trainer.fit(Model(), DataLoader(_table()))
    assert not list((tmp_path / "tb").rglob("events.out.tfevents*"))


def test_sharded_model_refused_at_track_where_torch_lacks_a_dcp_internal(tmp_path, monkeypatch):
    """A torch without DCP's `_load_state_dict`: tracking a sharded model is refused at once, naming the internal,
    where a resume hours later could not read the checkpoint back."""
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh

    monkeypatch.delattr(state_dict_loader, "_load_state_dict")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(2, 2)
        mesh = init_device_mesh("cpu", (1,))
        model.weight = torch.nn.Parameter(DTensor.from_local(model.weight.detach(), mesh, [Replicate()]))
        with jobwrap.Session(str(tmp_path), environ={}) as job:
            with pytest.raises(ConfigError, match=r"torch \S+ changed `torch.distributed.checkpoint.state_dict_loader"
                                                  r"._load_state_dict` \(it is gone\).*track an unsharded model"):
                job.track(model=model)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
