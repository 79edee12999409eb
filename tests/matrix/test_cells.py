"""The matrix's generator: the pairwise cover is complete, deterministic and valid; expectations are total."""
from __future__ import annotations

import dataclasses
import itertools

from cells import (
    DIMENSIONS,
    FRAMEWORK_SIGNALS,
    Cell,
    default_cells,
    edge_cells,
    expected,
    full_cells,
    loader_by_signal,
    local_pairwise,
    pair_coverage,
    refusal_cells,
    refused_values,
    selected_cells,
    valid,
)


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


def test_edge_subset_runs_each_integration_and_several_ranks():
    """JOBWRAP_MATRIX=edge (scripts/test's second venv) picks valid cells of the full matrix: Lightning, the Trainer,
    torchdata's loader with workers and a torchrun launch, where the other torch and extras releases matter."""
    edge = selected_cells({"JOBWRAP_MATRIX": "edge"})
    assert edge == edge_cells() and set(edge) <= set(full_cells()) and all(valid(c) for c in edge)
    assert {"lightning", "transformers"} <= {c.framework for c in edge}
    assert any(c.loader == "stateful" and c.workers for c in edge) and any(c.launch == "torchrun" for c in edge)
    assert selected_cells({}) == default_cells()


def test_expected_is_exact_or_refused_with_a_pattern():
    """Each cell's expectation is exact, or refused/inexact with a reason and the text the outcome must contain."""
    for cell in full_cells():
        want = expected(cell)
        assert want.kind in ("exact", "refused", "inexact")
        if want.kind != "exact":
            assert want.reason and want.match


def test_no_cell_is_expected_inexact():
    """Exact or refused, nothing between: no cell of the full matrix is expected to finish and diverge, and
    StatefulDataLoader with workers drawing from the global streams (seeded per batch) is exact and covered."""
    assert not [c for c in full_cells() if expected(c).kind == "inexact"]
    assert expected(Cell(loader="stateful", workers=2)).kind == "exact"
    assert any(c.loader == "stateful" and c.workers for c in local_pairwise())


def test_each_integration_has_rows_in_the_default_and_full_matrix():
    """Lightning, the Trainer and StatefulDataLoader each have an exact cell in CI's subset; the full matrix has
    every framework signal, and each refusal docs/integrations.md states."""
    default = default_cells()
    for framework in ("lightning", "transformers"):
        assert [c for c in default if c.framework == framework and expected(c).kind == "exact"]
        assert len([c for c in default if c.framework == framework]) <= 2
        signals = {c.signal for c in full_cells() if c.framework == framework and expected(c).kind == "exact"}
        assert signals == set(FRAMEWORK_SIGNALS)
    assert [c for c in default if c.loader == "stateful" and c.framework == "loop" and expected(c).kind == "exact"]
    refused = {(c.framework, c.launch) for c in full_cells() if c.framework != "loop"
               and expected(c).kind == "refused"}
    assert ("lightning", "run") in refused and ("transformers", "torchrun") in refused


def test_cell_ids_are_unique():
    """Cell ids name the cell: no two different cells share one."""
    cells = full_cells()
    assert len({c.id for c in cells}) == len(cells)
    assert Cell().id.startswith("plain-usr1")
    assert dataclasses.replace(Cell(), workers=2).id != Cell().id


def test_compatibility_page_marks_what_differs_from_expected():
    """docs/compatibility.md's renderer says how it was made and marks each cell that did not behave as expected."""
    from drive import Outcome
    from report import render

    refused = Cell(extras="numpy_array")
    page = render([(Cell(), expected(Cell()), Outcome("exact")),
                   (refused, expected(refused), Outcome("failed", "ConfigError: extra 'confusion' | at save"))],
                  made="test")
    assert "Generated by `scripts/matrix` (test)" in page
    assert "2 cells; 1 behave as expected, 1 do not." in page
    rows = [line for line in page.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert "**exact** |" in rows[0] and "✗" not in rows[0]
    assert "**failed** ✗" in rows[1] and "\\|" in rows[1]  # a | in the detail does not break the table


def test_striped_layout_needs_several_ranks_and_meets_every_value():
    """layout=striped is valid only with a multi-rank launch; the cover pairs it with every signal and loader,
    and the full matrix runs torchrun under every signal in both layouts."""
    assert not valid(Cell(layout="striped")) and not valid(Cell(layout="striped", launch="run"))
    assert valid(Cell(layout="striped", launch="torchrun"))
    cover = local_pairwise()
    assert all(c.ranks == 2 for c in cover if c.layout == "striped")
    striped = [c for c in cover if c.layout == "striped"]
    assert {c.signal for c in striped} == set(DIMENSIONS["signal"])
    assert {c.loader for c in striped} >= set(DIMENSIONS["loader"]) - set(refused_values()["loader"])
    assert [c for c in full_cells() if c.layout == "striped" and c.launch == "srun"]
    torchrun = {(c.signal, c.layout) for c in full_cells() if c.launch == "torchrun" and c.framework == "loop"}
    assert torchrun == set(itertools.product(DIMENSIONS["signal"], DIMENSIONS["layout"]))  # the twins keep one_file


def test_default_subset_runs_striped_saves_and_keeps_its_one_file_multi_rank_cells():
    """CI runs torchrun cells with striped saves, under SIGKILL and under a signal's save, all expected exact;
    each has its one-file twin, which shares its uninterrupted reference (the layout is not the script's)."""
    default = default_cells()
    striped = [c for c in default if c.layout == "striped"]
    assert all(c.launch == "torchrun" and expected(c).kind == "exact" for c in striped)
    assert "sigkill" in {c.signal for c in striped}
    assert {c.signal for c in striped} & {"usr1", "term", "usr1_term"}
    for cell in (c for c in striped if c.signal != "sigkill"):
        twin = dataclasses.replace(cell, layout="one_file")
        assert twin in default and twin.training() == cell.training()


def test_a_striped_cell_without_striped_checkpoints_is_judged_a_problem(tmp_path):
    """The judge of a striped cell flags a run that wrote only one-file checkpoints, or resumed from one after a
    signal, so that a cell whose setting never reached the run cannot pass."""
    import torch

    import jobwrap
    from drive import _striping_problems, checkpoint_layouts
    from jobwrap._storage.events import read_events

    with jobwrap.Session(directory=str(tmp_path)) as job:  # one process: a one-file save, as without striping
        job.track(model=torch.nn.Linear(2, 2))
        job.save()
    layouts = checkpoint_layouts(tmp_path)
    assert list(layouts.values()) == [False]
    cell = Cell(layout="striped", launch="torchrun", signal="term")
    assert _striping_problems(cell, read_events(str(tmp_path)), layouts)
    [one_file] = layouts
    resumed = [{"event": "start", "resumed_from": str(tmp_path / one_file)}]
    layouts = {**layouts, "step-000000000009.pt": True}
    assert _striping_problems(cell, resumed, layouts)  # resumed from a one-file checkpoint after a TERM
    assert not _striping_problems(dataclasses.replace(cell, signal="sigkill"), resumed, layouts)  # periodic
    assert not _striping_problems(cell, [{"event": "start", "resumed_from": "ck/step-000000000009.pt"}], layouts)


def test_a_kill_that_did_not_stop_the_training_is_judged_a_problem():
    """A SIGKILL cell whose relaunches did not resume at or before each kill's step (ranks that outlived the kill,
    in sessions of their own, trained on) is flagged instead of passing on the survivors' final state."""
    from drive import _kill_problems

    def start(step: int) -> dict:
        return {"event": "start", "step": step}

    assert _kill_problems([start(0), start(8)], [3, 4])
    assert _kill_problems([start(0), start(2)], [3, 4])  # the second kill gave no relaunch
    assert not _kill_problems([start(0), start(2), start(4)], [3, 4])


def test_term_with_workers_runs_under_every_launch_path_and_loader_kind():
    """The full matrix sends scancel's TERM with 2 workers under every launch path and every loader kind it takes,
    each expected exact except the two refusals docs/integrations.md states (Lightning's DataLoader, the Trainer
    under torchrun)."""
    term = [c for c in full_cells() if c.signal == "term" and c.workers == 2 and c.worker_rng == "global"
            and c == dataclasses.replace(Cell(), loader=c.loader, workers=2, signal="term", launch=c.launch,
                                         framework=c.framework)]
    loop = {(c.launch, c.loader) for c in term if c.framework == "loop"}
    launches = ("plain", "run", "torchrun", "slurm_batch", "srun", "submitit", "submitit_slurm")
    assert loop >= set(itertools.product(launches, ("shuffled", "stateful")))
    lightning = {(c.launch, c.loader) for c in term if c.framework == "lightning"}
    assert lightning == set(itertools.product(("plain", "run", "torchrun"), ("stateful", "shuffled")))
    assert {c.launch for c in term if c.framework == "transformers"} == {"plain", "run", "torchrun"}
    not_exact = {(c.framework, c.launch, c.loader) for c in term if expected(c).kind != "exact"
                 and not (c.framework == "loop" and c.loader == "stateful")}  # the documented worker noise
    assert not_exact == {("lightning", launch, "shuffled") for launch in ("plain", "run", "torchrun")} | {
        ("transformers", "torchrun", "shuffled")}


def test_worker_rng_kinds_are_expected_from_one_place():
    """A generator made by worker_init_fn meets loaders, workers and launches in the cover; one made lazily is
    refused, so it is kept out of the cover and refused alone under each launch, with and without workers; each
    expectation comes from _expected_worker_rng alone, whatever else the cell has."""
    from cells import _expected_worker_rng

    cover = local_pairwise()
    made = [c for c in cover if c.worker_rng == "worker_init_gen"]
    assert {c.launch for c in made} == {"plain", "run", "torchrun"}
    assert all(expected(c) == _expected_worker_rng(c) for c in made)
    assert not any(c.worker_rng == "lazy" for c in cover)
    lazy = [c for c in refusal_cells() if c.worker_rng == "lazy"]
    assert {(c.launch, c.workers) for c in lazy} == {(l, w) for l in ("plain", "run", "torchrun") for w in (0, 2)}
    assert all(expected(c) == _expected_worker_rng(c) and expected(c).kind == "refused" for c in lazy)
    assert not valid(Cell(worker_rng="worker_init_gen"))  # worker_init_fn never runs without workers
    assert not valid(Cell(worker_rng="lazy", loader="iterable"))  # no __getitem__ to hold it
    assert expected(Cell(worker_rng="lazy", loader="stateful", workers=2)).kind == "refused"


def test_loop_shapes_accumulation_and_composition_have_cells():
    """Every loop shape, the enumerate-keyed accumulation and each loader composition is in the full matrix; the
    exact ones meet every signal in the cover, the refused ones run under each local launch."""
    full, cover = full_cells(), local_pairwise()
    assert {c.loop for c in full} == set(DIMENSIONS["loop"])
    for loop in ("steps", "endless"):
        assert {c.signal for c in cover if c.loop == loop} == set(DIMENSIONS["signal"])
    refused = refused_values()
    assert refused["loop"] == ("while_next",) and refused["accumulate_by"] == ("enumerate",)
    assert set(refused["composition"]) == {"zip", "aux_unwrapped"}
    for name, value in (("loop", "while_next"), ("accumulate_by", "enumerate"), ("composition", "zip"),
                        ("composition", "aux_unwrapped")):
        assert {c.launch for c in full if getattr(c, name) == value} == {"plain", "run", "torchrun"}


def test_default_subset_keeps_one_cell_per_refused_value():
    """CI's subset runs each refused value once (under jobwrap run), so every refusal is checked on each change."""
    default = default_cells()
    for name, values in refused_values().items():
        for value in values:
            assert [c for c in default if getattr(c, name) == value and expected(c).kind == "refused"], (name, value)


def test_ddp_batchnorm_runs_under_both_layouts_and_lightning_options_are_signalled(tmp_path):
    """DDP with BatchNorm runs under torchrun in both layouts, in CI's subset too; Lightning's
    val_check_interval and ModelCheckpoint cells run under USR1 and TERM, signalled at the step before the
    validation."""
    from drive import Run, preemption_points

    batchnorm = {(c.layout, c.signal) for c in full_cells() if c.norm == "batchnorm" and c.launch == "torchrun"}
    assert batchnorm >= set(itertools.product(DIMENSIONS["layout"], ("usr1", "term")))
    default_batchnorm = {c.layout for c in default_cells() if c.norm == "batchnorm" and c.launch == "torchrun"}
    assert default_batchnorm == set(DIMENSIONS["layout"])
    options = {(c.fit_option, c.signal) for c in full_cells() if c.framework == "lightning"}
    assert options >= set(itertools.product(("val_check_interval", "model_checkpoint"), ("usr1", "term")))
    (tmp_path / "ck.loss.r0").write_text("".join(f"{s}\t{s // 12}\t[0.5]\n" for s in range(24)))  # 2 epochs of 12
    reference = Run(directory=tmp_path / "ck", codes=[0], signalled=[], output="", problems=[])
    assert preemption_points(reference, "lightning", "val_check_interval") == [6, 13]
    assert preemption_points(reference, "lightning") == [3, 13]


def test_submitit_cells_in_ci_and_in_the_full_matrix():
    """CI runs exactly two submitit cells (TERM, 2 workers, a DataLoader and a StatefulDataLoader, not marked
    as needing Slurm); the full matrix runs the submitit job under every signal, locally and on Slurm (marked)."""
    from test_matrix import _marks

    default = [c for c in default_cells() if c.launch == "submitit"]
    assert default == [Cell(workers=2, signal="term", launch="submitit"),
                       Cell(loader="stateful", workers=2, signal="term", launch="submitit")]
    assert not any(_marks(c) for c in default)
    full = {c.signal for c in full_cells() if c.launch == "submitit" and c.loader == "shuffled" and c.workers == 2}
    assert full == set(DIMENSIONS["signal"])
    on_slurm = [c for c in full_cells() if c.launch == "submitit_slurm"]
    assert {c.signal for c in on_slurm} == set(DIMENSIONS["signal"]) and all(_marks(c) for c in on_slurm)
