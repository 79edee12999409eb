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
from jobwrap import trackers
from jobwrap._compat import lightning as internals
from jobwrap._compat import lightning_loggers as logger_internals
from jobwrap._compat import torchdata as torchdata_internals
from jobwrap._compat.versions import warn_untested
from jobwrap._loop.session import Session
from jobwrap.errors import ConfigError

warn_untested("torch", "torchdata", "pytorch-lightning")

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
        checkpoint = internals.dump_checkpoint(self.trainer)
        if self.before_fetch:
            _as_lightning_restores_after_validation(self.trainer, checkpoint)
        return {k: v for k, v in checkpoint.items() if k not in _HPARAM_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # fit() restores model, datamodule, callbacks, then (after the strategy's setup) precision, loops,
        # optimizers and schedulers from this dict; its ckpt_path stays None, so it keeps this one.
        internals.load_checkpoint(self.trainer, state)
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
        trainer = logger_internals.trainer_of_log(log_fn)
        if trainer is not None and trainer.state.fn == "fit":
            trackers.defer_lightning_loggers(trainer)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        _refuse_unrecognised(trainer)
        _lightning_signals_off(trainer)
        self.session = Session(self._directory, **self._settings).start()
        self.session.hand_data_to_framework()  # fit() iterates and resumes its loaders itself
        self._state = _TrainerState(trainer)
        self.session.track(lightning=self._state)
        self._resuming = self._state.loaded
        trackers.continue_lightning_loggers(trainer, self.session)  # TensorBoard, W&B, MLflow: this run's
        _exact_distributed_samplers_on_load(trainer)
        if self._resuming:
            _loader_rebuild_unchecked(trainer, self.session)
        internals.before_each_fetch(trainer, lambda: self._before_fetch(trainer))

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
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Not a boundary: a fit resumed from an epoch's end draws the next epoch's order differently
            # (the loader's finished state); a signal here is honoured after the next epoch's first step.
            self.session.framework_counts(step=trainer.global_step, epoch=trainer.current_epoch)
            self._boundary_due = False
            return
        self.session.framework_counts(epoch=trainer.current_epoch)
        # Not yet: validation and the callbacks after this one (ModelCheckpoint last) run for this batch first.
        self._boundary_due = True

    def _before_fetch(self, trainer: "pl.Trainer") -> None:
        """The train loop is about to fetch a batch: everything the previous batch triggered has run."""
        if self._resuming:
            # The loaders' iterators are made (their draws from the RNG done): now the streams are the checkpoint's.
            self._resuming = False
            self.session.framework_ready()
            return
        if not self._boundary_due:
            return
        self._boundary_due = False
        self._state.before_fetch = True
        try:  # a signal: the checkpoint commits here, then Preempted (SystemExit) ends fit()
            self.session.framework_step(step=trainer.global_step, epoch=trainer.current_epoch)
        finally:
            self._state.before_fetch = False

    # ------------------------------------------------------------ end
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.session.framework_counts(epoch=trainer.current_epoch)
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
    environment = internals.cluster_environment(trainer)
    if getattr(environment, "auto_requeue", False):
        log.info("Lightning's SLURM auto-requeue is off: jobwrap checkpoints and requeues this fit")
        environment.auto_requeue = False
    internals.no_signal_handlers(trainer)


def _refuse_unrecognised(trainer: "pl.Trainer") -> None:
    """A Lightning whose internals are not those jobwrap.lightning was checked on: refused before the first step."""
    difference = internals.unrecognised(trainer)
    if difference is not None:
        raise ConfigError(
            f"{difference}. jobwrap.lightning.Preemptible reaches into Lightning where it has no public seam (the "
            f"trainer's checkpoint without a file, its signal handlers, the moment before each fetch), and has no "
            f"exact way without that internal. Install pytorch-lightning {internals.CHECKED}, or drive a "
            f"jobwrap.Session from a loop of your own")


def _as_lightning_restores_after_validation(trainer: "pl.Trainer", checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint dumped before a fetch restore the count Lightning's loggers step by.

    Restored there (every batch counter equal: Lightning's "restarted on last"), the epoch
    loop skips the validation the batch ran already, but counts the batch in
    ``_batches_that_stepped`` once more, as for a checkpoint saved at validation's end, before
    the count: the dump says one less, so the resumed count is the uninterrupted one.
    """
    fetcher = internals.data_fetcher(trainer)
    if fetcher is None or not internals.validates_after_batch(trainer, fetcher):
        return
    internals.uncount_batch(checkpoint)


def _refuse_prefetched(trainer: "pl.Trainer") -> None:
    """A train loader without a length is fetched a batch ahead (in ``iter``, before ``on_train_start``): its saved
    place would be a batch past every step, and a resumed fit would skip that batch."""
    if getattr(internals.data_fetcher(trainer), "batches", None):
        raise ConfigError(
            "Lightning fetches a batch ahead from a train loader without a length (an IterableDataset), so the "
            "loader's saved place is one batch past the step and a resumed fit would skip that batch: give the "
            "dataset a __len__, so that Lightning fetches only the batch it trains on")


def _exact_distributed_samplers_on_load(trainer: "pl.Trainer") -> None:
    """Give each train loader a sampler whose place is saved, once Lightning has injected its distributed one and
    before the loaders' state is loaded (both happen inside the fit loop's ``setup_data``, with no hook between)."""
    load_states = internals.loader_states_load(trainer)

    def load() -> None:
        for loader in internals.combined_loader(trainer).flattened:
            _exact_distributed_sampler(loader, epoch=trainer.fit_loop.epoch_progress.current.processed)
        load_states()

    internals.set_loader_states_load(trainer, load)


def _loader_rebuild_unchecked(trainer: "pl.Trainer", session: Session) -> None:
    """Leave the draws of Lightning's resumed train iterator out of the check for draws before the first step.

    Resumed, the fit loop creates its train loaders' iterators again (``iter(combined_loader)`` in
    ``setup_data``, right after loading the loaders' state): they draw a shuffle seed and the
    workers' base seed, which the loaders' loaded state overrides, and the first boundary puts
    the streams back. No warning for those. Any other draw between ``track()`` and the first
    step (an ``on_train_start`` hook of the user's, say) still warns: the resumed
    run draws it from other streams than the uninterrupted one did. Checked with Lightning 2.6.
    """
    load_states = internals.loader_states_load(trainer)

    def load() -> None:
        load_states()
        combined = internals.combined_loader(trainer)
        if combined is not None:
            combined.__class__ = _unchecked_first_iter(type(combined), session)
        internals.set_loader_states_load(trainer, load_states)  # once: later epochs draw as the uninterrupted run

    internals.set_loader_states_load(trainer, load)


def _unchecked_first_iter(cls: type, session: Session) -> type:
    """``cls`` whose next ``__iter__`` (only that one: it puts ``cls`` back) draws as the framework's own rebuild
    (:meth:`Session.framework_draws`), unwarned when nothing else drew before it."""
    class FirstIterUnchecked(cls):  # type: ignore[misc, valid-type]
        def __iter__(self) -> Any:
            try:
                with session.framework_draws():
                    return super().__iter__()
            finally:
                self.__class__ = cls
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
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

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
        inner = internals.wrapped_sampler(sampler)
        if not torchdata_internals.plain_shuffle(inner):
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
    loader = internals.combined_loader(trainer)
    flat = loader.flattened if loader is not None else []
    stateful = internals.stateful_protocol()
    plain = [type(part).__name__ for part in flat if not isinstance(part, stateful)]
    if plain:
        raise ConfigError(
            f"the train loader ({', '.join(plain)}) cannot tell Lightning where an epoch stopped, so a resumed fit "
            f"would train the epoch's first batches again: use torchdata.stateful_dataloader.StatefulDataLoader "
            f"(pip install 'jobwrap[torchdata]') in place of torch.utils.data.DataLoader, with the same arguments")
