"""Gather and restore what a training process is: objects' state dicts, RNG streams, plain extras.

Everything is stored as tensors and plain Python values so that
``torch.load(path, weights_only=True)`` opens a checkpoint without jobwrap.
"""
from __future__ import annotations

import logging
import random
import sys
from typing import Any, Mapping

import torch

from jobwrap._compat import torch_tensor as tensor_internals
from jobwrap._storage.devices import cuda_rng_plan
from jobwrap.errors import ConfigError, StateMismatchError

log = logging.getLogger("jobwrap")

RESERVED_KEYS = frozenset({"epoch", "step", "jobwrap"})


def is_stateful(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


# ---------------------------------------------------------------- RNG

def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG stream this process may draw from: Python, NumPy (if used), torch CPU, each CUDA device.

    ``device``: the one this rank computes on; recorded, so that its stream can
    follow it to a node with another number of GPUs.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    # Only touch CUDA if this process already uses it: querying would create a context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [t.cpu() for t in torch.cuda.get_rng_state_all()]
        if device is not None and device.type == "cuda":
            state["cuda_device"] = device.index if device.index is not None else torch.cuda.current_device()
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> str | None:
    """Put every captured stream back; returns a one-line warning when the CUDA streams cannot all be
    (another number of GPUs, or none: see :func:`jobwrap._storage.devices.cuda_rng_plan`), never fails on it."""
    python = state["python"]
    internal = tuple(int(v) for v in python["state"].tolist())
    random.setstate((python["version"], internal, python["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy

        np_state = state["numpy"]
        numpy.random.set_state((np_state["kind"], np_state["keys"].cpu().numpy().astype("uint32"),
                                np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    cuda_states = state.get("cuda") or []
    visible = torch.cuda.device_count() if cuda_states and torch.cuda.is_available() else 0
    on_cuda = device is not None and device.type == "cuda"
    plan, warning = cuda_rng_plan(saved=len(cuda_states), visible=visible, saved_device=state.get("cuda_device"),
                                  device=(device.index or 0) if on_cuda else None)
    for saved, index in plan:
        torch.cuda.set_rng_state(cuda_states[saved].cpu(), index)
    return warning


# ---------------------------------------------------------------- plain values

def plain(value: Any, name: str) -> Any:
    """``value`` as something ``weights_only=True`` can load, or a ConfigError naming ``name``."""
    if value is None or isinstance(value, torch.Tensor) or type(value) in (bool, int, float, str):
        return value
    for base in (bool, int, float, str):  # subclasses such as numpy.float64 or an IntEnum
        if isinstance(value, base):
            return base(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # other numpy scalars
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: plain(v, f"{name}[{k!r}]") for k, v in value.items()}
    raise ConfigError(
        f"extra {name!r} is a {type(value).__name__}, which torch.load(weights_only=True) cannot read back; "
        f"store numbers, strings, lists, dicts or tensors (e.g. torch.tensor(...) for an array)")


# ---------------------------------------------------------------- objects

def load_into(name: str, obj: Any, state: Any) -> None:
    """``obj.load_state_dict(state)`` with errors that say what does not match."""
    if isinstance(obj, torch.nn.Module):
        _check_module(name, obj, state)
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise StateMismatchError(
            f"checkpoint entry {name!r} does not fit the {type(obj).__name__} it is loaded into: "
            f"{str(exc).strip().splitlines()[0]}. Build the same {type(obj).__name__} as the run that saved it, "
            f"or start a new run in a new directory.") from exc


def _check_module(name: str, module: torch.nn.Module, state: Mapping[str, Any]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state)
                    if isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape)
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {few(unexpected)}")
    if shapes:
        parts.append("shape mismatch " + ", ".join(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes[:5]))
    raise StateMismatchError(
        f"checkpoint entry {name!r} does not match the model: {'; '.join(parts)}. "
        f"Build the model exactly as the run that saved it, or start a new run in a new directory.")


def few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


# ---------------------------------------------------------------- has anything changed?

_CONTENT_LIMIT = 1 << 20  # bytes: larger tensors count by version counter only, never copied to compare

def fingerprint(value: Any, *, by_content: bool = False) -> Any:
    """A cheap picture of ``value`` to compare with a later one: equal pictures, nothing changed in between.

    Tensors count by storage and version counter (every in-place change, an
    optimizer step included, bumps it; nothing is read), or ``by_content`` when
    small (RNG states made fresh at each call; extras, which a script replaces
    with new tensors that may reuse a freed address). Modules count by their
    parameters and buffers, optimizers by their groups and state, other
    stateful objects (schedulers, GradScaler) by their state dict, plain
    values by value.
    """
    if isinstance(value, torch.Tensor):
        if by_content and value.numel() * value.element_size() <= _CONTENT_LIMIT:
            return ("tensor", value.dtype, tuple(value.shape), value.detach().cpu().numpy().tobytes())
        return _tensor_version(value)
    if isinstance(value, torch.nn.Module):
        return ("module", tuple((name, _tensor_version(t)) for name, t in value.named_parameters()),
                tuple((name, _tensor_version(t)) for name, t in value.named_buffers()))
    if isinstance(value, torch.optim.Optimizer):
        return ("optimizer", fingerprint(value.param_groups), fingerprint(list(value.state.values())))
    if is_stateful(value):
        return ("stateful", fingerprint(value.state_dict(), by_content=by_content))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), fingerprint(v, by_content=by_content)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(fingerprint(v, by_content=by_content) for v in value))
    if isinstance(value, (bool, int, float, str, bytes)) or value is None:
        return value
    return object()  # unknown: never equal, so a save is written rather than wrongly skipped


def _tensor_version(tensor: torch.Tensor) -> Any:
    tensor = tensor_internals.local_shard(tensor)  # a DTensor (FSDP2): this rank's shard holds the counter
    try:
        return ("tensor", tensor.data_ptr(), tensor_internals.version(tensor), tuple(tensor.shape), tensor.dtype,
                str(tensor.device))
    except (RuntimeError, NotImplementedError):  # inference tensors, some tensor subclasses: no counter
        return object()
