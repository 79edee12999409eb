"""The matrix's generator: the pairwise cover is complete, deterministic and valid; expectations are total."""
from __future__ import annotations

import dataclasses
import itertools

from cells import (DIMENSIONS, Cell, default_cells, expected, full_cells, local_pairwise, loader_by_signal,
                   pair_coverage, refused_values, valid)


def test_pairwise_covers_every_valid_pair():
    """Every valid pair of accepted values of two dimensions appears in some pairwise cell."""
    assert pair_coverage(local_pairwise()) == 1.0


def test_pairwise_is_deterministic_and_valid():
    """Two builds give the same cells in the same order, and none is a combination PyTorch rejects."""
    first, second = local_pairwise(), local_pairwise()
    assert first == second
    assert all(valid(c) for c in first)


def test_refused_values_are_kept_out_of_the_pairwise_cover():
    """A value expected() refuses appears only in its own cells, so it hides no other pair."""
    refused = refused_values()
    assert refused  # the table refuses something: otherwise this test checks nothing
    for cell in local_pairwise():
        assert expected(cell).kind == "exact", cell.id


def test_full_matrix_has_the_full_loader_by_signal_cross():
    """Every loader meets every signal in the full matrix."""
    pairs = {(c.loader, c.signal) for c in full_cells()}
    assert pairs >= set(itertools.product(DIMENSIONS["loader"], DIMENSIONS["signal"]))
    assert len(loader_by_signal()) == len(DIMENSIONS["loader"]) * len(DIMENSIONS["signal"])


def test_default_subset_is_part_of_the_full_matrix():
    """The CI subset is a prefix of the cover plus the refusal cells, all in the full matrix."""
    full = set(full_cells())
    assert set(default_cells()) <= full


def test_expected_is_exact_or_refused_with_a_pattern():
    """Each cell's expectation is exact, or refused with a reason and the text the error must contain."""
    for cell in full_cells():
        want = expected(cell)
        assert want.kind in ("exact", "refused")
        if want.kind == "refused":
            assert want.reason and want.match


def test_cell_ids_are_unique():
    """Cell ids name the cell: no two different cells share one."""
    cells = full_cells()
    assert len({c.id for c in cells}) == len(cells)
    assert Cell().id.startswith("plain-usr1")
    assert dataclasses.replace(Cell(), workers=2).id != Cell().id
