"""PyTorch Lightning internals that jobwrap.lightning relies on, one adapter each (checked on pytorch-lightning
2.6.6, lightning-fabric 2.6.6).

Lightning has no public seam for what :class:`jobwrap.lightning.Preemptible` does: dump and
load the trainer's full checkpoint without a file, keep Lightning's own signal handlers out,
run jobwrap's boundary right before the train loop fetches a batch, and reach the train
loaders between their set-up and the load of their state. No exact fallback exists for any of
them, so :func:`unrecognised` checks them all when the callback starts (``setup``), and the
callback refuses a Lightning that lacks one, naming the internal and the version, before the
first step. Each adapter has its canary in tests/test_compat.py.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from jobwrap._compat.notice import changed

CHECKED = "2.6.6"
ADAPTER = "lightning.py"
DISTRIBUTION = "pytorch-lightning"


def _changed(internal: str, difference: str) -> str:
    return changed(DISTRIBUTION, internal, ADAPTER, difference, CHECKED)


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """``trainer._checkpoint_connector.dump_checkpoint(weights_only=False)``: the dict ``trainer.save_checkpoint``
    writes (model, optimizers, schedulers, loops, callbacks, the train loaders' state), without a file."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def load_checkpoint(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """``trainer._checkpoint_connector._loaded_checkpoint``: the dict ``fit()`` restores from, part by part, when
    its ``ckpt_path`` is None (as if it had read it from a file)."""
    trainer._checkpoint_connector._loaded_checkpoint = dict(checkpoint)


def cluster_environment(trainer: Any) -> Any:
    """``trainer._accelerator_connector.cluster_environment``: where Lightning's SLURM ``auto_requeue`` is set."""
    return trainer._accelerator_connector.cluster_environment


def no_signal_handlers(trainer: Any) -> None:
    """``trainer._signal_connector.register_signal_handlers``: made a no-op, so ``fit()`` installs no handler of
    Lightning's (its SLURM requeue saves inside the handler; its SIGTERM handler runs a collective there)."""
    trainer._signal_connector.register_signal_handlers = lambda: None


def before_each_fetch(trainer: Any, boundary: Callable[[], None]) -> None:
    """Call ``boundary()`` each time the train loop is about to fetch a batch.

    The train epoch loop hands its fetcher ``_on_before_fetch`` (its profiler's start) in
    ``on_run_start``, every epoch, and the fetcher calls it (``_start_profiler``) right
    before ``next`` on the loaders: after the previous batch's ``on_advance_end``
    (validation, plateau schedulers, loggers), before the next batch draws anything.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    profile = epoch_loop._on_before_fetch

    def before_fetch() -> None:
        boundary()
        profile()

    epoch_loop._on_before_fetch = before_fetch


def data_fetcher(trainer: Any) -> Any:
    """``trainer.fit_loop._data_fetcher``: the train loop's fetcher (None before ``setup_data``)."""
    return trainer.fit_loop._data_fetcher


def validates_after_batch(trainer: Any, fetcher: Any) -> bool:
    """Whether the epoch loop runs validation after the batch just trained (``_should_accumulate``,
    ``_should_check_val_fx``)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return not epoch_loop._should_accumulate() and bool(epoch_loop._should_check_val_fx(fetcher))


def uncount_batch(checkpoint: dict[str, Any]) -> None:
    """One less in the epoch loop's ``_batches_that_stepped`` (the count Lightning's loggers step by)."""
    checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def loader_states_load(trainer: Any) -> Callable[[], None]:
    """``trainer.fit_loop._load_combined_loader_states``: run inside ``setup_data`` after Lightning has built the
    train loaders (its distributed sampler injected) and before their iterators are made."""
    return trainer.fit_loop._load_combined_loader_states


def set_loader_states_load(trainer: Any, load: Callable[[], None]) -> None:
    """Replace what :func:`loader_states_load` returns, for this trainer's fit loop."""
    trainer.fit_loop._load_combined_loader_states = load


def combined_loader(trainer: Any) -> Any:
    """``trainer.fit_loop._combined_loader``: the train loaders (``.flattened``), None before ``setup_data``."""
    return trainer.fit_loop._combined_loader


def wrapped_sampler(wrapper: Any) -> Any:
    """The sampler a ``DistributedSamplerWrapper`` shards (``wrapper.dataset._sampler``)."""
    return wrapper.dataset._sampler


def stateful_protocol() -> type:
    """``lightning_fabric.utilities.types._Stateful``: what Lightning saves a train loader's place through."""
    from lightning_fabric.utilities.types import _Stateful

    return _Stateful


# ---------------------------------------------------------------- is this Lightning the one these were checked on

def _has(owner: Any, path: str, *names: str) -> str | None:
    """None where ``owner.<path>`` has every attribute in ``names``; else what is gone."""
    part = owner
    for step in path.split(".") if path else []:
        part = getattr(part, step, None)
        if part is None:
            return _changed(f"{type(owner).__name__}.{path}", "it is gone")
    missing = next((name for name in names if not hasattr(part, name)), None)
    return None if missing is None else _changed(f"{type(part).__name__}.{missing}", "it is gone")


def _dump_takes_weights_only(trainer: Any) -> str | None:
    found = _has(trainer, "_checkpoint_connector", "dump_checkpoint", "_loaded_checkpoint")
    dump = getattr(getattr(trainer, "_checkpoint_connector", None), "dump_checkpoint", None)
    if found is None and "weights_only" not in inspect.signature(dump).parameters:
        return _changed("_CheckpointConnector.dump_checkpoint", "it takes no weights_only")
    return found


def _loop_counts_stepped_batches(trainer: Any) -> str | None:
    if "_batches_that_stepped" not in trainer.fit_loop.state_dict().get("epoch_loop.state_dict", {}):
        return _changed("_TrainingEpochLoop._batches_that_stepped", "the fit loop's state no longer holds it")
    return None


def _fetcher_calls_hook(trainer: Any) -> str | None:
    from pytorch_lightning.loops.fetchers import _DataFetcher

    if "_start_profiler" not in vars(_DataFetcher()):
        return _changed("_DataFetcher._start_profiler", "the fetcher calls no hook before a fetch")
    return _has(trainer, "fit_loop.epoch_loop", "_on_before_fetch")


def _stateful_importable(trainer: Any) -> str | None:
    try:
        stateful_protocol()
    except ImportError:
        return changed("lightning-fabric", "lightning_fabric.utilities.types._Stateful", ADAPTER, "it is gone",
                       CHECKED)
    return None


# What each adapter above needs of a trainer: checked all at once when Preemptible starts (one canary each).
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "dump_checkpoint/load_checkpoint": _dump_takes_weights_only,
    "cluster_environment": lambda trainer: _has(trainer, "_accelerator_connector", "cluster_environment"),
    "no_signal_handlers": lambda trainer: _has(trainer, "_signal_connector", "register_signal_handlers"),
    "before_each_fetch": _fetcher_calls_hook,
    "data_fetcher": lambda trainer: _has(trainer, "fit_loop", "_data_fetcher"),
    "validates_after_batch": lambda trainer: _has(trainer, "fit_loop.epoch_loop", "_should_accumulate",
                                                  "_should_check_val_fx"),
    "uncount_batch": _loop_counts_stepped_batches,
    "loader_states_load": lambda trainer: _has(trainer, "fit_loop", "_load_combined_loader_states"),
    "combined_loader": lambda trainer: _has(trainer, "fit_loop", "_combined_loader"),
    "stateful_protocol": _stateful_importable,
}


def unrecognised(trainer: Any) -> str | None:
    """None where ``trainer`` has every internal above as 2.6.6 has it; else the first that differs.

    Checked on the trainer ``Preemptible.setup`` gets, before anything is replaced, so a
    Lightning release that renamed one is refused before the first step instead of failing
    (or, for the fetch hook, skipping every boundary) at the signal.
    """
    return next((found for found in (check(trainer) for check in CHECKS.values()) if found is not None), None)


def hands_fetch_hook_to_fetcher() -> bool:
    """Whether the epoch loop's ``on_run_start`` still hands ``_on_before_fetch`` to the fetcher (canary only:
    it reads Lightning's source)."""
    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

    return "_start_profiler = self._on_before_fetch" in inspect.getsource(_TrainingEpochLoop.on_run_start)
