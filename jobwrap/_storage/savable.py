"""Proof, at start, that a tracked object's state can be loaded back: one round trip through ``torch.save`` and
``torch.load(weights_only=True)``, in memory.

Without it, a state dict holding a type ``weights_only`` refuses (a NumPy scalar)
commits at every save and fails at every resume. The round trip is of the
state's skeleton: each tensor replaced by an empty one of its dtype, so its cost
is the structure's (keys, numbers, dtypes), not the model's bytes.
"""
from __future__ import annotations

import io
import re
from collections import OrderedDict
from typing import Any

import torch

from jobwrap.errors import ConfigError


def skeleton(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty one of its dtype; containers of the types
    ``weights_only`` accepts are rebuilt, anything else is kept as it is (and judged by the round trip)."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or type(value) not in (torch.Tensor, torch.nn.Parameter):
            return value  # sparse, quantized or a subclass: its own way through pickle is what is proven
        try:
            return torch.empty(0, dtype=value.dtype)
        except (RuntimeError, TypeError):
            return value
    if type(value) in (dict, OrderedDict):
        return type(value)((k, skeleton(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(skeleton(v) for v in value)
    return value


def round_trips(value: Any) -> BaseException | None:
    """None when ``value`` survives ``torch.save`` then ``torch.load(weights_only=True)``, else the failure."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as exc:  # any failure here would be the same failure at the save or at the resume
        return exc
    return None


def culprit(value: Any, path: str) -> tuple[str, Any]:
    """The deepest entry of ``value`` (already a skeleton) that fails the round trip: (its path, the value)."""
    children: list[tuple[str, Any]] = []
    if type(value) in (dict, OrderedDict):
        children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
        children += [(f"{path} key {k!r}", k) for k in value if not isinstance(k, (str, int))]
    elif type(value) in (list, tuple):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    for where, child in children:
        if round_trips(child) is not None:
            return culprit(child, where)
    return path, value


def prove(name: str, state: Any, *, what: str = "state_dict()") -> None:
    """Raise a ConfigError naming ``name``, the entry and its type, unless ``state`` loads back with
    ``weights_only``. Called at ``track()`` and again at the first step boundary (an optimizer's state exists only
    after its first step)."""
    shape = skeleton(state)
    failure = round_trips(shape)
    if failure is None:
        return
    where, value = culprit(shape, name)
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise ConfigError(
        f"cannot checkpoint {name!r}: its {what} holds {where} = {_short(value)} (a {kind}), which "
        f"torch.load(weights_only=True) cannot read back ({_cause(failure)}), so every checkpoint of it "
        f"would fail at the resume. Store plain numbers, strings, lists, dicts or tensors there instead: "
        f"float(x) or int(x) for a NumPy scalar, torch.tensor(x) for an array")


def _cause(failure: BaseException) -> str:
    """torch's refusal in one line: the line naming the unsupported global, else the first."""
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(failure))
    if found:
        return f"{type(failure).__name__}: {found.group(0)}"
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    line = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
    return f"{type(failure).__name__}: {line}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
