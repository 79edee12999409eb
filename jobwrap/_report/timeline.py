"""``jobwrap status --plot``: the run's timeline as a picture (matplotlib, an optional extra).

One bar per launch along wall time, coloured by where the time went (the parts of
:mod:`jobwrap._report.goodput`), with each save's pause and each signal marked. Gaps between
bars are time the job did not hold (the queue, with Slurm's accounting).
"""
from __future__ import annotations

from typing import Any, Sequence

from jobwrap._report.goodput import Goodput, LaunchTime
from jobwrap.errors import ConfigError

__all__ = ["COLOURS", "segments", "draw"]

COLOURS = {"startup": "#9e9e9e", "loading": "#42a5f5", "training": "#66bb6a", "saving": "#ffa726",
           "lost": "#ef5350", "exit": "#616161", "evaluation": "#ce93d8"}


def segments(launch: LaunchTime) -> list[tuple[str, float, float]]:
    """(part, start, width) in wall time: start-up and loading first, lost work and exit last,
    training in between (the save pauses are drawn over it where they happened)."""
    parts = [("startup", launch.startup), ("loading", launch.loading)]
    middle = launch.training + launch.saving
    parts += [("training", middle), ("evaluation", launch.evaluation), ("lost", launch.lost), ("exit", launch.exit)]
    out, at = [], launch.begin
    for part, width in parts:
        if width > 0:
            out.append((part, at, width))
            at += width
    return out


def _marks(events: Sequence[dict[str, Any]], launch: LaunchTime) -> tuple[list[tuple[float, float]], list[float]]:
    """The save pauses (start, width) and the signal times that fall in this launch."""
    inside = [e for e in events if launch.begin <= float(e.get("time") or 0) <= launch.end and e.get("rank", 0) == 0]
    pauses = []
    for event in inside:
        if event.get("event") == "save":
            width = float((event.get("pause") if event.get("background") else event.get("seconds")) or 0.0)
            pauses.append((float(event["time"]) - width, width))
    signals = [float(e["time"]) for e in inside if e.get("event") == "signal"]
    return pauses, signals


def draw(goodput: Goodput, events: Sequence[dict[str, Any]], path: str, *, title: str = "") -> None:
    """Write the timeline to ``path`` (PNG, or any format matplotlib knows by the suffix)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'jobwrap[plot]'") from None
    if not goodput.launches:
        raise ConfigError("nothing to plot: the directory has no run history (events.jsonl)")
    origin = goodput.launches[0].begin
    scale, unit = (60.0, "min") if goodput.launches[-1].end - origin > 600 else (1.0, "s")
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.45 * len(goodput.launches)))
    for row, launch in enumerate(goodput.launches):
        for part, start, width in segments(launch):
            ax.broken_barh([((start - origin) / scale, width / scale)], (row - 0.35, 0.7), color=COLOURS[part])
        pauses, signals = _marks(events, launch)
        if pauses:
            ax.broken_barh([((s - origin) / scale, max(w / scale, 0.002 * (launch.end - origin) / scale))
                            for s, w in pauses], (row - 0.35, 0.7), color=COLOURS["saving"])
        for t in signals:
            ax.plot([(t - origin) / scale], [row - 0.45], marker="v", color="black", markersize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    labels = [f"{part} {goodput.total(part) / scale:.1f} {unit}" for part in COLOURS]
    handles.append(plt.Line2D([], [], marker="v", color="black", linestyle=""))
    labels.append("signal")
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_yticks(range(len(goodput.launches)), [f"launch {t.number}" for t in goodput.launches])
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} since the first launch began")
    share = f"goodput {goodput.fraction:.1%}" if goodput.fraction is not None else ""
    ax.set_title(" - ".join(x for x in (title, share) if x))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
