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

