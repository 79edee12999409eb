"""What ``track()`` accepts, refused at the call: a class where an object belongs, an object with only half of
``state_dict``/``load_state_dict``, a ``state_dict()`` that fails. Each would otherwise be accepted and fail at
the signal's save (exit 1, nothing committed, no requeue)."""
from __future__ import annotations

from typing import Any

from jobwrap.errors import ConfigError

_METHODS = ("state_dict", "load_state_dict")


def check(name: str, obj: Any) -> None:
    """Raise a ConfigError naming ``name`` and the fix unless ``obj`` can be tracked."""
    if isinstance(obj, type):
        example = f"{obj.__name__}(optimizer, ...)" if "lr_scheduler" in obj.__module__ else f"{obj.__name__}(...)"
        raise ConfigError(f"cannot track {name!r}: it is the class {obj.__module__}.{obj.__qualname__}, not an "
                          f"object of it; pass the instance your loop uses, e.g. job.track({name}={example})")
    has = [callable(getattr(obj, method, None)) for method in _METHODS]
    if any(has) and not all(has):
        missing = _METHODS[has.index(False)]
        raise ConfigError(f"cannot track {name!r}: its {type(obj).__name__} has {_METHODS[has.index(True)]}() but "
                          f"no {missing}(), so a checkpoint of it could not be put back; give it {missing}(), or "
                          f"track the values it holds as extras (job.track({name}_value=...))")


def state_of(name: str, obj: Any) -> Any:
    """``obj.state_dict()``; its failure as a ConfigError naming ``name`` (at the signal it would fail the save)."""
    try:
        return obj.state_dict()
    except Exception as exc:
        raise ConfigError(f"cannot checkpoint {name!r}: its state_dict() fails ({type(exc).__name__}: {exc}); "
                          f"every save would fail the same way. Fix its state_dict(), or track another object "
                          f"in its place") from exc


def needs_proof(obj: Any) -> bool:
    """Whether ``obj``'s state is proven loadable at start. Not jobwrap's own adapters (Lightning's and the
    Hugging Face Trainer's state): their state_dict() is a whole checkpoint, read or built from the library's
    files, too costly to build twice and not there before the first save."""
    return not type(obj).__module__.startswith("jobwrap.")
