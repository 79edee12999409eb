"""The figures of scripts/bench's report: one way to open and to save them (Agg, 100 dpi, the file's name)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def axes(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    """A new figure and its axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height))


def save(fig: Any, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` and free the figure; the name, for the report's image link."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
