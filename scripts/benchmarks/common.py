"""What the benchmarks share: the state they measure, the clock's helpers, the work directory, the machine's
description and the way figures are opened and saved. No measurement here; every other module imports this one.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import jobwrap

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPTS = REPO / "scripts"
#: Where the measurements write (deleted afterwards); scripts/gpu-check points it elsewhere.
WORK = REPO / "run" / "bench"
#: --report-only: the machine and software of the run being reported.
RECORDED: dict[str, str] = {}


def log(message: str) -> None:
    print(message, flush=True)



def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")



def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0



def release_free_memory() -> None:
    """Give the allocator's free memory back to the system: what is freed is not silently reused."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)



@contextlib.contextmanager
def peak_memory(out: list[int]):
    """Appends the peak resident memory above the level at entry (Linux: VmHWM reset by clear_refs)."""
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status("VmRSS")
    yield
    out.append(max(0, _status("VmHWM") - before) if reset else -1)



def durable_sync() -> None:
    os.sync()



def drop_cache(path: Path) -> None:
    """Evict one file from the page cache (posix_fadvise DONTNEED after fsync): a cold read follows."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)



def build(nbytes: int, device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A stack of square layers plus Adam's moments: about ``nbytes`` of state in all (params x 12 bytes)."""
    width = 4096 if nbytes >= (1 << 30) else 1024
    layers = max(1, round(nbytes / 12 / (width * width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer



def build_like(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    layers = [nn.Linear(m.in_features, m.out_features, bias=False) for m in model]
    other = nn.Sequential(*layers).to(next(model.parameters()).device)
    return other, torch.optim.Adam(other.parameters(), lr=1e-4)



def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    for s in optimizer.state.values():
        tensors += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in tensors)



def torch_save(model, optimizer, path: Path) -> float:
    """The blocking baseline: torch.save of {model, optimizer} into ``path``, flush, fsync; its seconds."""
    started = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started




def fresh_dir(name: str) -> Path:
    path = WORK / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path



def session(directory: Path, **settings: Any) -> jobwrap.Session:
    return jobwrap.Session(str(directory), environ={}, run_id="bench", save_at_end=False, **settings)



def cleanup() -> None:
    for path in WORK.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def free_port() -> int:
    """A free TCP port on the loopback, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def module_command(module: str, *args: str) -> list[str]:
    """The command that runs ``benchmarks.<module>`` in a new interpreter (it finds the package through
    :func:`with_scripts_path`'s environment)."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def with_scripts_path(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with scripts/ on PYTHONPATH, so that a child process imports this package."""
    path = environ.get("PYTHONPATH")
    return {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPTS), path]))}


def machine() -> str:
    if "machine" in RECORDED:
        return RECORDED["machine"]
    import psutil

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB, {gpu}"



def software() -> str:
    if "software" in RECORDED:
        return RECORDED["software"]
    return f"Linux {platform.release().split('-')[0]}, Python {platform.python_version()}, torch {torch.__version__}"


def axes(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    """A new figure and its axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height))


def save_figure(fig: Any, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` and free the figure; the name, for the report's image link."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
