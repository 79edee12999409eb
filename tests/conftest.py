"""Shared fixtures: paths to the example training script and a Python that runs it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "examples" / "train.py"


@pytest.fixture
def train_cmd() -> list[str]:
    """The example training job, as a command line."""
    return [sys.executable, str(TRAIN)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (``-n 2 --dist loadgroup``), every test on the one local Slurm cluster runs on
    one worker, in order: their jobs share a node and its partitions, and a preemption test needs it idle."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
