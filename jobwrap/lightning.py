"""PyTorch Lightning: jobwrap's signals, verified checkpoints, requeue and mid-epoch resume for ``trainer.fit``.

    from jobwrap.lightning import Preemptible

    trainer = L.Trainer(max_epochs=3, callbacks=[Preemptible()])
    trainer.fit(model, train_dataloaders=StatefulDataLoader(...))

The callback drives a :class:`jobwrap.Session` from inside ``fit`` (after Lightning
has started its process group, so every DDP rank joins it): the requeue cap, the
cancel-wins rule, the ranks' agreement and the atomic, verified store are
jobwrap's. Each optimizer step is a jobwrap step; its boundary is the moment
before the train loop fetches its next batch: after every hook the stepped batch
triggers (``on_train_batch_end`` of every callback, ``ModelCheckpoint``'s saves,
a mid-epoch validation, the plateau schedulers), as the uninterrupted fit runs
them, and before the next batch draws anything. The checkpoint is Lightning's own (``dump_checkpoint``: model,
optimizers, schedulers, loops, callbacks, precision plugin, the train loaders'
state) plus jobwrap's per-rank RNG streams, which Lightning does not save.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.types import _Stateful

from jobwrap import trackers
from jobwrap._loop import steps
from jobwrap._loop.session import Session
from jobwrap.errors import ConfigError

log = logging.getLogger("jobwrap")

__all__ = ["Preemptible"]

# Arbitrary objects a LightningModule may hold; a checkpoint loaded with weights_only cannot hold them,
# and the script builds the module with them again at every launch.
_HPARAM_KEYS = ("hyper_parameters", "hparams_name", "hparams_type", "datamodule_hyper_parameters",
                "datamodule_hparams_name", "datamodule_hparams_type")



class _TrainerState:
    """The trainer's full checkpoint as one tracked object of the Session."""

    def __init__(self, trainer: "pl.Trainer") -> None:
        self.trainer = trainer
        self.loaded = False
        self.before_fetch = False  # inside the boundary before a fetch: the batch's hooks have all run

    def state_dict(self) -> dict[str, Any]:
        checkpoint = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if self.before_fetch:
            _as_lightning_restores_after_validation(self.trainer, checkpoint)
        return {k: v for k, v in checkpoint.items() if k not in _HPARAM_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # fit() restores model, datamodule, callbacks, then (after the strategy's setup) precision, loops,
        # optimizers and schedulers from this dict; its ckpt_path stays None, so it keeps this one.
        self.trainer._checkpoint_connector._loaded_checkpoint = dict(state)
        self.loaded = True


class Preemptible(pl.Callback):
    """Make ``trainer.fit`` preemptible: flag-only signals, a verified checkpoint at the next optimizer step,
    requeue, and resume mid-epoch from the newest verified checkpoint on relaunch.

    ``directory`` and ``settings`` are :class:`jobwrap.Session`'s (``JOBWRAP_*`` variables apply).
    Lightning's own SLURM auto-requeue and SIGTERM handling are switched off for the fit.
    """

    def __init__(self, directory: str | os.PathLike | None = None, **settings: Any) -> None:
        self._directory = directory
        self._settings = settings
        self.session: Session | None = None
        self._state: _TrainerState | None = None
        self._resuming = False
        self._stepped_at = 0
        self._boundary_due = False  # the optimizer stepped: a boundary before the next fetch

    # ------------------------------------------------------------ start
    # Lightning hands each callback the module's log() at the fit's start, before it makes its loggers' runs:
    # the moment to keep them from starting before this run's key and step are known (jobwrap.trackers).
    @property
    def log(self) -> Any:
        return getattr(self, "_log", None)

    @log.setter
    def log(self, log_fn: Any) -> None:
        self._log = log_fn
        trainer = getattr(getattr(log_fn, "__self__", None), "_trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            trackers.defer_lightning_loggers(trainer)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        _lightning_signals_off(trainer)
        self.session = Session(self._directory, **self._settings).start()
        self.session._data_resumed_elsewhere = True  # fit() iterates and resumes its loaders itself
        self._state = _TrainerState(trainer)
        self.session.track(lightning=self._state)
        self._resuming = self._state.loaded
        trackers.continue_lightning_loggers(trainer, self.session)  # TensorBoard, W&B, MLflow: this run's
        _exact_distributed_samplers_on_load(trainer)
        if self._resuming:
            _loader_rebuild_unchecked(trainer, self.session)
        _before_each_fetch(trainer, lambda: self._before_fetch(trainer))

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._resuming and trainer.ckpt_path:
            raise ConfigError(
                f"trainer.fit() loaded {trainer.ckpt_path} while jobwrap resumes from its own checkpoint "
                f"{self.session.resumed_from.path}: drop ckpt_path= from trainer.fit() (and remove hpc_ckpt_*.ckpt "
                f"files from the trainer's default_root_dir), so that one checkpoint is restored")
        _refuse_unresumable_loaders(trainer)
        _refuse_prefetched(trainer)
        self._stepped_at = trainer.global_step

    # ------------------------------------------------------------ step boundaries
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._stepped_at:
            return  # a micro-batch of gradient accumulation: the optimizer has not stepped
        self._stepped_at = trainer.global_step
        self.session.epoch = trainer.current_epoch
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Not a boundary: a fit resumed from an epoch's end draws the next epoch's order differently
            # (the loader's finished state); a signal here is honoured after the next epoch's first step.
            self.session.step = trainer.global_step
            self._boundary_due = False
            return
        # Not yet: validation and the callbacks after this one (ModelCheckpoint last) run for this batch first.
        self._boundary_due = True

    def _before_fetch(self, trainer: "pl.Trainer") -> None:
        """The train loop is about to fetch a batch: everything the previous batch triggered has run."""
        if self._resuming:
            # The loaders' iterators are made (their draws from the RNG done): now the streams are the checkpoint's.
            self._resuming = False
            self.session._boundary()
            return
        if not self._boundary_due:
            return
        self._boundary_due = False
        self.session.epoch = trainer.current_epoch
        self.session.step = trainer.global_step - 1
        self._state.before_fetch = True
        try:
            self.session.step_done()  # a signal: the checkpoint commits here, then Preempted (SystemExit) ends fit()
        finally:
            self._state.before_fetch = False

    # ------------------------------------------------------------ end
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.session.epoch = trainer.current_epoch
        if self.session.config.save_at_end:
            self.session.save(reason="end of training")

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.session is not None:
            self.session.close()
            self.session = None

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        if self.session is not None:
            self.session.close(exception)
            self.session = None


def _lightning_signals_off(trainer: "pl.Trainer") -> None:
    """Lightning's SLURM auto-requeue saves inside the signal handler and its SIGTERM handler runs a collective
    there; jobwrap owns the signals for this fit, so Lightning installs none."""
    environment = trainer._accelerator_connector.cluster_environment
    if getattr(environment, "auto_requeue", False):
        log.info("Lightning's SLURM auto-requeue is off: jobwrap checkpoints and requeues this fit")
        environment.auto_requeue = False
    trainer._signal_connector.register_signal_handlers = lambda: None


def _before_each_fetch(trainer: "pl.Trainer", boundary: Any) -> None:
    """Call ``boundary()`` each time the train loop is about to fetch a batch.

    The train epoch loop hands its fetcher ``_on_before_fetch`` (its profiler's start) in
    ``on_run_start``, every epoch, and the fetcher calls it right before ``next`` on the
    loaders: after the previous batch's ``on_advance_end`` (validation, plateau schedulers,
    loggers), before the next batch draws anything. Checked with Lightning 2.6.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    profile = epoch_loop._on_before_fetch

    def before_fetch() -> None:
        boundary()
        profile()

    epoch_loop._on_before_fetch = before_fetch


def _as_lightning_restores_after_validation(trainer: "pl.Trainer", checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint dumped before a fetch restore the count Lightning's loggers step by.

    Restored there (every batch counter equal: Lightning's "restarted on last"), the epoch
    loop skips the validation the batch ran already, but counts the batch in
    ``_batches_that_stepped`` once more, as for a checkpoint saved at validation's end, before
    the count: the dump says one less, so the resumed count is the uninterrupted one.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None or epoch_loop._should_accumulate() or not epoch_loop._should_check_val_fx(fetcher):
        return
    state = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
    state["_batches_that_stepped"] -= 1


def _refuse_prefetched(trainer: "pl.Trainer") -> None:
    """A train loader without a length is fetched a batch ahead (in ``iter``, before ``on_train_start``): its saved
    place would be a batch past every step, and a resumed fit would skip that batch."""
    if getattr(trainer.fit_loop._data_fetcher, "batches", None):
        raise ConfigError(
            "Lightning fetches a batch ahead from a train loader without a length (an IterableDataset), so the "
            "loader's saved place is one batch past the step and a resumed fit would skip that batch: give the "
            "dataset a __len__, so that Lightning fetches only the batch it trains on")


def _exact_distributed_samplers_on_load(trainer: "pl.Trainer") -> None:
    """Give each train loader a sampler whose place is saved, once Lightning has injected its distributed one and
    before the loaders' state is loaded (both happen inside the fit loop's ``setup_data``, with no hook between)."""
    fit_loop = trainer.fit_loop
    load_states = fit_loop._load_combined_loader_states

    def load() -> None:
        for loader in fit_loop._combined_loader.flattened:
            _exact_distributed_sampler(loader, epoch=fit_loop.epoch_progress.current.processed)
        load_states()

    fit_loop._load_combined_loader_states = load


def _loader_rebuild_unchecked(trainer: "pl.Trainer", session: Session) -> None:
    """Leave the draws of Lightning's resumed train iterator out of the check for draws before the first step.

    Resumed, the fit loop creates its train loaders' iterators again (``iter(combined_loader)`` in
    ``setup_data``, right after loading the loaders' state): they draw a shuffle seed and the
    workers' base seed, which the loaders' loaded state overrides, and the first boundary puts
    the streams back. No warning for those. Any other draw between ``track()`` and the first
    step (an ``on_train_start`` hook of the user's, say) still warns: the resumed
    run draws it from other streams than the uninterrupted one did. Checked with Lightning 2.6.
    """
    fit_loop = trainer.fit_loop
    load_states = fit_loop._load_combined_loader_states

    def load() -> None:
        load_states()
        combined = fit_loop._combined_loader
        if combined is not None and session._rng_restored is not None:
            combined.__class__ = _unchecked_first_iter(type(combined), session)
        fit_loop._load_combined_loader_states = load_states  # once: later epochs draw as the uninterrupted run

    fit_loop._load_combined_loader_states = load


def _unchecked_first_iter(cls: type, session: Session) -> type:
    """``cls`` whose next ``__iter__`` (only that one: it puts ``cls`` back) moves the session's RNG mark along
    with its own draws, when nothing else drew before it."""
    class FirstIterUnchecked(cls):  # type: ignore[misc, valid-type]
        def __iter__(self) -> Any:
            before = steps.rng_mark(session.device)
            try:
                return super().__iter__()
            finally:
                self.__class__ = cls
                if before == session._rng_restored:
                    session._rng_restored = steps.rng_mark(session.device)
    return FirstIterUnchecked


def _exact_distributed_sampler(loader: Any, epoch: int) -> None:
    """Swap Lightning's distributed sampler in a StatefulDataLoader for a StatefulDistributedSampler.

    Lightning wraps torchdata's RandomSampler in a ``DistributedSamplerWrapper``: every epoch the wrapper draws
    a permutation from the inner sampler's generator, whose state no checkpoint holds, so a resumed fit shards
    another order. A plain ``DistributedSampler`` (``shuffle=False``) holds no place either. The swapped sampler
    orders an epoch from ``seed + epoch`` alone (what Lightning gives a shuffled torch ``DataLoader``) and saves
    how far it got. Its epoch is set now: the loader's iterator is made before the loop calls ``set_epoch``.
    """
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader.sampler import RandomSampler, StatefulDistributedSampler

    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if not isinstance(sampler, DistributedSampler) or isinstance(sampler, StatefulDistributedSampler):
        return
    if type(sampler) not in (DistributedSampler, DistributedSamplerWrapper):
        raise ConfigError(
            f"the train loader's sampler {type(sampler).__name__} (a DistributedSampler of your own) saves no place "
            f"in its order, and jobwrap does not replace a sampler that may behave differently: derive it from "
            f"torchdata.stateful_dataloader.sampler.StatefulDistributedSampler instead")
    shuffle = sampler.shuffle
    if isinstance(sampler, DistributedSamplerWrapper):
        inner = sampler.dataset._sampler
        if not (isinstance(inner, RandomSampler) and not inner.replacement and inner._num_samples is None):
            raise ConfigError(
                f"Lightning wraps the train loader's sampler ({type(inner).__name__}) for its ranks, and where each "
                f"rank stopped in that wrapper's order cannot be saved, so a resumed fit would shard other batches: "
                f"use shuffle=True or shuffle=False without a sampler, or build the loader with a "
                f"torchdata.stateful_dataloader.sampler.StatefulDistributedSampler and "
                f"pl.Trainer(use_distributed_sampler=False)")
        shuffle = True
    exact = StatefulDistributedSampler(loader.dataset, num_replicas=sampler.num_replicas, rank=sampler.rank,
                                       shuffle=shuffle, seed=sampler.seed, drop_last=sampler.drop_last)
    exact.set_epoch(epoch)
    loader.batch_sampler.sampler = exact


def _refuse_unresumable_loaders(trainer: "pl.Trainer") -> None:
    """Lightning restarts an epoch from its first batch when a train loader has no state: not exact, refused."""
    loader = trainer.fit_loop._combined_loader
    flat = loader.flattened if loader is not None else []
    plain = [type(part).__name__ for part in flat if not isinstance(part, _Stateful)]
    if plain:
        raise ConfigError(
            f"the train loader ({', '.join(plain)}) cannot tell Lightning where an epoch stopped, so a resumed fit "
            f"would train the epoch's first batches again: use torchdata.stateful_dataloader.StatefulDataLoader "
            f"(pip install 'jobwrap[torchdata]') in place of torch.utils.data.DataLoader, with the same arguments")
