"""Gradients between optimizer steps: with gradient accumulation they are part of the state.

At a step boundary between micro-batches the gradients accumulated since the
last ``optimizer.step()`` are what the next micro-batch adds to: a checkpoint
taken there holds them (each rank its own), and a resume puts them back into
``.grad``. Which gradients a step consumed is recorded by an optimizer step
post-hook, so the common case (a boundary right after a step) saves none.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Mapping

import torch

from jobwrap._compat import torch_tensor as tensor_internals
from jobwrap._storage.state import few
from jobwrap.errors import ConfigError, StateMismatchError


class PendingGrads:
    """The gradients one process produced since its optimizers last stepped, and those a resume restores."""

    def __init__(self, objects: Mapping[str, Any]) -> None:
        self._objects = objects  # the session's tracked objects (the same dict, filled by track())
        self._stepped: GradRecord = {}
        self._hooks: list[Any] = []  # optimizers' step post-hooks: which gradients a step consumed
        self._saved: dict[str, Any] = {}  # gradients the resumed checkpoint holds, until their owner is tracked
        # Boundaries after a step left at which sharded models are checked for accumulated gradients:
        # accumulation shows at the first boundary (a micro-batch without a step), and walking every
        # parameter at every step would tax the loop; saves still check.
        self._sharded_checks = 2

    def resume(self, saved: dict[str, Any]) -> None:
        """Keep this rank's saved gradients until :meth:`restore` gets their owners."""
        self._saved = saved

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        record_step(optimizer, self._stepped)

    def restore(self, names: Iterable[str]) -> None:
        """Gradients the checkpoint holds (saved between optimizer steps) back into ``.grad``."""
        owners = grad_owners(self._objects)
        for name in names:
            grads = self._saved.pop(name, None)
            if grads:
                restore_grads(name, owners.get(name, {}), grads)

    def pending(self) -> dict[str, Any]:
        """Gradients produced since the last optimizer step: at a boundary between micro-batches of
        gradient accumulation they are part of the state."""
        return pending_grads(grad_owners(self._objects), self._stepped)

    def to_save(self, *, sharded: list[str], step: int, world_size: int) -> dict[str, Any]:
        """``{"grads": ...}`` for this rank's checkpoint entry, or nothing in the common case (no
        gradient since the last ``optimizer.step()``)."""
        grads = self.pending()
        if not grads:
            return {}
        refuse_sharded(grads, sharded, step)
        if world_size > 1:  # gathered to rank 0 as objects: off the GPU, each rank its own
            grads = {name: {k: g.detach().cpu() for k, g in part.items()} for name, part in grads.items()}
        return {"grads": grads}

    def check_sharded(self, sharded: list[str], step: int) -> None:
        """At one of the first boundaries after a step: refuse gradients accumulated in a sharded model."""
        if self._sharded_checks:
            self._sharded_checks -= 1
            refuse_sharded(self.pending(), sharded, step)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def refuse_sharded(grads: Mapping[str, Any], sharded: list[str], step: int) -> None:
    """Sharded gradients between optimizer steps cannot be checkpointed: refused at the first boundary
    that has them, early in the run, rather than at the signal's save, which would lose the work."""
    unsaveable = [name for name in grads if name in sharded]
    if unsaveable:
        raise ConfigError(
            f"step boundary {step}: gradients accumulated since the last optimizer.step() are pending in "
            f"{', '.join(unsaveable)} (sharded), and jobwrap cannot checkpoint sharded (FSDP) gradients. "
            f"Stop at optimizer steps: call job.step_done() only after optimizer.step(), in a loop over the "
            f"loader itself (job.loader() makes every batch, every micro-batch, a step boundary)")


GradRecord = dict[int, Any]  # id(parameter) -> (weakref to its grad, the grad's version) at the last step


def grad_owners(objects: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter of the tracked modules and optimizers, once, under a stable key:
    ``{module name: {parameter name: p}}``, then ``{optimizer name: {"group.index": p}}`` for the
    parameters no tracked module holds."""
    owners: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[int] = set()
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            owners[name] = {key: p for key, p in obj.named_parameters() if id(p) not in seen}
            seen |= {id(p) for p in owners[name].values()}
    for name, obj in objects.items():
        if isinstance(obj, torch.optim.Optimizer):
            owners[name] = {f"{g}.{i}": p for g, group in enumerate(obj.param_groups)
                            for i, p in enumerate(group["params"]) if id(p) not in seen}
            seen |= {id(p) for p in owners[name].values()}
    return owners


def record_step(optimizer: torch.optim.Optimizer, stepped: GradRecord) -> None:
    """After ``optimizer.step()``: the gradients it consumed are spent; note which tensors they were."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            grad = p.grad
            try:
                stepped[id(p)] = None if grad is None else (weakref.ref(grad), tensor_internals.version(grad))
            except (TypeError, RuntimeError):  # a tensor kind without weakrefs or counters: always saved
                stepped.pop(id(p), None)


def pending_grads(owners: Mapping[str, Mapping[str, torch.Tensor]], stepped: GradRecord
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """The gradients produced since the last optimizer step (accumulated between micro-batches):
    ``{object name: {key: grad}}``, only objects that have any. A grad still the one the last step
    consumed, unchanged (its version counter), or None, is not pending."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, params in owners.items():
        grads = {key: p.grad for key, p in params.items() if p.grad is not None
                 and not _spent(stepped.get(id(p)), p.grad)}
        if grads:
            pending[name] = grads
    return pending


def _spent(record: Any, grad: torch.Tensor) -> bool:
    if record is None:
        return False
    ref, version = record
    return ref() is grad and tensor_internals.version(grad) == version


def restore_grads(name: str, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> None:
    """Put saved gradients back into ``.grad``, on each parameter's device and dtype."""
    unknown = sorted(set(grads) - set(params))
    shapes = sorted(k for k in set(grads) & set(params) if grads[k].shape != params[k].shape)
    if unknown or shapes:
        raise StateMismatchError(
            f"checkpoint holds gradients of {name!r} that do not fit its parameters "
            f"({'unknown ' + few(unknown) if unknown else 'shape mismatch ' + few(shapes)}). Build the same "
            f"model and optimizer as the run that saved it, or start a new run in a new directory.")
    for key, grad in grads.items():
        param = params[key]
        param.grad = grad.detach().to(device=param.device, dtype=param.dtype, copy=True)
