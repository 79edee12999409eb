"""The configuration matrix (tests/matrix/cells.py): each cell is bit-exact after real preemptions, or refused at start.

The default run takes a fixed pairwise subset; ``JOBWRAP_MATRIX=full`` runs every cell
(``scripts/matrix`` does, and writes docs/compatibility.md); ``JOBWRAP_MATRIX=edge`` the few that scripts/test
runs again on the other end of the tested releases (.venv-edge).
"""
from __future__ import annotations

import re

import pytest
from cells import CLUSTER_LAUNCHES, SUBMITIT_LAUNCHES, Cell, expected, selected_cells
from drive import Matrix

CELLS = selected_cells()


@pytest.fixture(scope="session")
def matrix(tmp_path_factory) -> Matrix:
    """One runner for the session: each uninterrupted reference run is shared by the cells that need it."""
    return Matrix(tmp_path_factory.mktemp("matrix"))


#: The optional package a cell needs (the test extra brings each); without it the cell is skipped.
NEEDS = {"lightning": "pytorch_lightning", "transformers": "transformers", "stateful": "torchdata.stateful_dataloader"}


def _marks(cell: Cell) -> list:
    return [pytest.mark.slurm] if cell.launch in CLUSTER_LAUNCHES else []


@pytest.mark.timeout(800)  # each run is bounded (drive.TIMEOUT); a cell runs at most three
@pytest.mark.parametrize("cell", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CELLS])
def test_cell(matrix, cell):
    """A cell ends bit-exact with its uninterrupted run after real signals, is refused at start naming the option,
    or (a setup documented as not exact) finishes and differs."""
    if cell.launch in CLUSTER_LAUNCHES:
        from slurm_cluster import cluster_available

        up, why = cluster_available()
        if not up:
            pytest.skip(why)
    if cell.launch in SUBMITIT_LAUNCHES:  # under its LocalExecutor, no cluster needed
        pytest.importorskip("submitit", reason=f"{cell.id} needs submitit (pip install -e '.[submitit]')")
    for needed in (NEEDS.get(cell.framework), NEEDS.get(cell.loader)):
        if needed:
            pytest.importorskip(needed, reason=f"{cell.id} needs {needed} (pip install -e '.[test]')")
    want = expected(cell)
    got = matrix.run(cell)
    if want.kind == "refused":
        assert got.kind == "refused", f"expected a refusal at start ({want.reason}), got {got.kind}: {got.detail}"
        assert re.search(want.match, got.detail), f"refusal does not name the option ({want.match!r}): {got.detail}"
    elif want.kind == "inexact":  # documented as not exact: it must finish, and differ where the docs say
        assert got.kind == "diverged", f"expected a finished run that differs ({want.reason}), got {got.kind}"
        assert re.search(want.match, got.detail), f"differs elsewhere than {want.match!r}: {got.detail}"
    else:
        assert got.kind == "exact", f"{got.kind}: {got.detail}"
