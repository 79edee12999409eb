"""Random generators a loader's parts hold, told by kind, and seeded: for the loader here and its workers.

A generator a ``worker_init_fn`` makes from ``get_worker_info().seed`` and keeps on
the dataset (the pattern PyTorch's docs recommend) lives only in the worker; a
resumed loader that skips batches starts it over. So a skipping loader's workers
find such generators after ``worker_init_fn`` and seed each one before every batch,
like the global streams, from the batch's seed and the generator's attribute path.
One made only by a fetch (lazily, in ``__getitem__``) has drawn for the worker's
first batch before it could be seeded: it is found after that fetch and refused.
"""
from __future__ import annotations

import hashlib
import random
import sys
from typing import Any

from jobwrap._compat import numpy_random

_DEPTH = 2  # the dataset's attributes and theirs: where worker_init_fn and __getitem__ keep generators
_ITEMS = 32  # containers longer than this hold data, not generators


def rng_kind(obj: Any) -> str | None:
    """``"torch"``, ``"python"``, ``"numpy"``, ``"numpy-legacy"`` for a random generator, else None."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Generator):
        return "torch"
    if isinstance(obj, random.Random):
        return "python"
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(obj, numpy.random.RandomState):
            return "numpy-legacy"
        if isinstance(obj, numpy.random.Generator):
            return "numpy"
    return None


def own_rngs(root: Any, path: str = "dataset") -> dict[str, Any]:
    """{attribute path: generator} of the generators ``root`` holds (two levels deep), the global streams left out."""
    found: dict[str, Any] = {}
    _walk(root, path, found, {id(g) for g in _globals()}, _DEPTH)
    return found


def _walk(obj: Any, path: str, found: dict[str, Any], seen: set[int], depth: int) -> None:
    if obj is None or id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if rng_kind(obj) is not None:
        found[path] = obj
        return
    if isinstance(obj, (list, tuple)):
        items: Any = enumerate(obj) if len(obj) <= _ITEMS else ()
    elif isinstance(obj, dict):
        items = obj.items() if len(obj) <= _ITEMS else ()
    elif isinstance(obj, (str, bytes, int, float, type)) or _library_data(obj):
        return
    else:
        items = getattr(obj, "__dict__", {}).items()
    for key, value in list(items):
        _walk(value, f"{path}.{key}", found, seen, depth - 1)


def _library_data(obj: Any) -> bool:
    """Tensors, modules, arrays: data, no generator of the user's (torch's datasets, e.g. Subset, are walked)."""
    module = type(obj).__module__
    return module.startswith("numpy") or (module.startswith("torch") and not module.startswith("torch.utils.data"))


def _globals() -> list[Any]:
    streams: list[Any] = [getattr(random, "_inst", None)]
    torch = sys.modules.get("torch")
    if torch is not None:
        streams.append(torch.default_generator)
    streams.append(numpy_random.global_stream())
    return [s for s in streams if s is not None]


def derived_seed(*parts: Any) -> bytes:
    """16 bytes of seed, the same for the same parts in every process."""
    return hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=16).digest()


def reseed(obj: Any, digest: bytes) -> None:
    """Seed generator ``obj`` from ``digest`` (its kind kept: a NumPy Generator keeps its bit generator's type)."""
    seed = int.from_bytes(digest[:8], "little")
    kind = rng_kind(obj)
    if kind == "torch":
        obj.manual_seed(seed)
    elif kind == "python":
        obj.seed(seed)
    elif kind == "numpy-legacy":
        obj.seed([int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)])
    elif kind == "numpy":
        obj.bit_generator.state = type(obj.bit_generator)(seed).state
