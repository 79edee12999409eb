"""The configuration matrix: its dimensions, the cells it runs, and what each cell must do.

Everything that decides *which* combinations run and *what* they must give lives
here, as pure functions: the dimensions and their values, the constraints between
them, a deterministic greedy all-pairs cover, the full cross of loader x signal,
the Slurm cells, and :func:`expected`, the one place that says "exact" or
"refused, and why" for a cell. Adjust the expectations there, nowhere else.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Iterable, Iterator

# ---------------------------------------------------------------- dimensions
# The first value of each dimension is its baseline (used where a cell does not vary it).
DIMENSIONS: dict[str, tuple[Any, ...]] = {
    # How the training data is fed (tests/matrix/train_matrix.py builds each).
    # stateful: torchdata's StatefulDataLoader, resumed through its own state_dict (no replay).
    "loader": ("shuffled", "generator", "sampler", "batch_sampler", "iterable", "iterable_state",
               "python_list", "python_generator", "stateful"),
    "workers": (0, 2),
    # Where a map-style dataset's augmentation noise comes from: global: the process's torch and NumPy streams;
    # worker_init_gen: a NumPy Generator that worker_init_fn makes from get_worker_info().seed and stores on the
    # worker's dataset; lazy: __getitem__ makes self.rng on first use from torch.initial_seed().
    "worker_rng": ("global", "worker_init_gen", "lazy"),
    "loader_option": ("none", "persistent_workers", "worker_init_fn", "drop_last"),
    # none; a second DataLoader iterated directly inside the epoch; the same, but wrapped in job.loader() too.
    "validation": ("none", "plain", "wrapped"),
    # epochs: job.epochs() + job.loader(); step_done: a hand-written loop that indexes its data and calls
    # job.step_done(); steps: the same under `for step in job.steps(n)`; endless: `it = iter(job.loader(dl))` over
    # an endless DataLoader (an infinite sampler), `for _ in job.steps(n): x, y = next(it)`; while_next:
    # `while True:` with next() on an endless DataLoader's iterator, job.step_done(), a break at max_iters.
    "loop": ("epochs", "step_done", "steps", "endless", "while_next"),
    "accumulate": (1, 2),
    # Which count decides the optimizer step under accumulation: job.step, or the batch index of
    # `for i, (x, y) in enumerate(job.loader(dl))` (`if (i + 1) % k == 0`), which restarts at 0 in a resumed epoch;
    # loader_enumerate: the index of `for i, (x, y) in job.loader(dl).enumerate()`, which goes on after a resume.
    "accumulate_by": ("step", "enumerate", "loader_enumerate"),
    # single: one training loader; zip: `zip(job.loader(a), job.loader(b))`; aux_unwrapped: a second DataLoader,
    # not wrapped, drawn from with next() at every step of the epoch (`aux = iter(b)` at the epoch's start).
    "composition": ("single", "zip", "aux_unwrapped"),
    # The model: the MLP, or the same with a BatchNorm1d (running statistics as buffers; DDP broadcasts them).
    "norm": ("none", "batchnorm"),
    "save": ("none", "epoch_end", "in_body"),
    "scheduler": ("epoch", "per_batch"),
    "scaler": ("none", "grad_scaler"),
    "optimizers": (1, 2),
    # allowed: one extra of each allowed type; numpy_array: job["confusion"] = np.zeros((2, 2));
    # set_only: an extra set only through job[...] and never passed to track().
    "extras": ("none", "allowed", "numpy_array", "set_only"),
    # usr1: requeue; term: scancel (TERM to every process of the job); usr1_term: USR1, then TERM in the
    # warning window; double: USR1, then USR1 again while the signal's save is being written;
    # sigkill: periodic background saves, then SIGKILL to every process, then a plain relaunch.
    "signal": ("usr1", "term", "usr1_term", "double", "sigkill"),
    "launch": ("plain", "run", "torchrun", "slurm_batch", "srun"),
    # How a signal's, manual or final save of the replicated state is written with 2 ranks: one file by rank 0,
    # or striped (every rank writes its share; JOBWRAP_STRIPE_MIN_BYTES=0 for the matrix's tiny state).
    # Multi-rank launches only: with one rank there is nothing to stripe.
    "layout": ("one_file", "striped"),
}

#: The loaders over the map-style dataset, whose __getitem__ draws the augmentation noise (worker_rng).
MAP_STYLE = ("shuffled", "generator", "sampler", "batch_sampler", "stateful")
LOCAL_LAUNCHES = ("plain", "run", "torchrun")
SLURM_LAUNCHES = ("slurm_batch", "srun")
# The loop as a submitit job (jobwrap.submitit.Preemptible, tests/matrix/submitit_launch.py): under submitit's
# LocalExecutor, no cluster needed; submitit_slurm: its Slurm executor on the local cluster (skipped without it).
# Not a dimension of the cover: see submitit_cells().
SUBMITIT_LAUNCHES = ("submitit", "submitit_slurm")
CLUSTER_LAUNCHES = (*SLURM_LAUNCHES, "submitit_slurm")  # skipped unless the local Slurm cluster is up
MULTI_RANK_LAUNCHES = ("torchrun", "srun")
CANCELS = ("term", "usr1_term", "sigkill")  # the job is not requeued: the test relaunches it, as a user would
# Who runs the loop: the matrix's own script ("loop"), or a framework through jobwrap's integration
# (tests/matrix/train_frameworks.py). Not a dimension of the cover: a framework cell uses only the
# dimensions that framework has (loader, workers, accumulate, signal, launch); see framework_cells().
FRAMEWORKS = ("loop", "lightning", "transformers")
FRAMEWORK_SIGNALS = ("usr1", "term", "usr1_term", "sigkill")  # "double" needs the loop's SaveWatch
# Lightning fit options of the framework cells: none; val_check_interval=0.5 with a validation loader (signalled
# at the batch before the mid-epoch validation); ModelCheckpoint(every_n_train_steps=3) (signalled at its step).
FIT_OPTIONS = ("none", "val_check_interval", "model_checkpoint")
#: The step of the Lightning cells' mid-epoch validation with val_check_interval=0.5 (12 batches an epoch).
LIGHTNING_VALIDATES_AFTER = 6

#: How many cells of the pairwise cover the default (CI) run takes (with one cell per refused value);
#: JOBWRAP_MATRIX=full runs all.
DEFAULT_CELLS = 10


@dataclasses.dataclass(frozen=True)
class Cell:
    """One combination: a value for every dimension."""

    loader: str = "shuffled"
    workers: int = 0
    worker_rng: str = "global"
    loader_option: str = "none"
    validation: str = "none"
    loop: str = "epochs"
    accumulate: int = 1
    accumulate_by: str = "step"
    composition: str = "single"
    norm: str = "none"
    save: str = "none"
    scheduler: str = "epoch"
    scaler: str = "none"
    optimizers: int = 1
    extras: str = "none"
    signal: str = "usr1"
    launch: str = "plain"
    layout: str = "one_file"
    framework: str = "loop"
    fit_option: str = "none"

    @property
    def id(self) -> str:
        """A short readable name: only the values that differ from the baseline."""
        base = Cell()
        parts = [f"{k}={v}" for k, v in dataclasses.asdict(self).items()
                 if k not in ("signal", "launch") and v != getattr(base, k)]
        return "-".join([self.launch, self.signal, *parts]) or "baseline"

    @property
    def ranks(self) -> int:
        """Training processes: 2 under a multi-rank launch."""
        return 2 if self.launch in MULTI_RANK_LAUNCHES else 1

    def training(self) -> dict[str, Any]:
        """The training script's configuration: everything but how it is launched and signalled."""
        values = dataclasses.asdict(self)
        values.pop("signal")
        values.pop("launch")
        values.pop("layout")  # reaches the run through the driver's environment, not the script
        values["ranks"] = self.ranks
        return values


@dataclasses.dataclass(frozen=True)
class Expectation:
    """``exact``: the preempted run equals the uninterrupted one bit for bit; ``refused``: the start fails
    with an error whose text matches ``match`` (it must name the option), for ``reason``.

    ``in_first_epoch``: the refusal may come after some steps, at the first use of what is refused
    in the first epoch (a validation loader reached mid-epoch), never later.
    """

    kind: str
    reason: str = ""
    match: str = ""
    in_first_epoch: bool = False


# ---------------------------------------------------------------- constraints

_REPLAYED = ("iterable", "iterable_state", "stateful")  # loaders resumed by replay or their own state, not by skip

def valid(cell: Cell) -> bool:
    """Whether a combination is meaningful (combinations PyTorch itself rejects, or no-ops, are left out)."""
    python_data = cell.loader in ("python_list", "python_generator")
    if cell.loader_option == "persistent_workers" and cell.workers == 0:
        return False  # DataLoader raises ValueError itself
    if python_data and (cell.workers or cell.loader_option != "none"):
        return False  # no DataLoader: workers and loader options mean nothing
    if cell.loop != "epochs" and (cell.loader != "shuffled" or cell.validation == "wrapped"
                                  or cell.composition != "single"):
        return False  # the step loops build their own data (indexed, or an endless loader) from the shuffled one's
    if cell.accumulate_by != "step" and (cell.accumulate == 1 or cell.loop != "epochs"):
        return False  # no accumulation, or no enumerate(job.loader(...)) / loader.enumerate() to key it on
    if cell.accumulate_by == "loader_enumerate" and cell.composition != "single":
        return False  # the composed loops iterate the loaders themselves
    if cell.worker_rng != "global" and cell.loader not in MAP_STYLE:
        return False  # the generator lives in the map-style dataset's __getitem__
    if cell.worker_rng == "worker_init_gen" and (not cell.workers or cell.loader_option == "worker_init_fn"
                                                 or cell.loop in ("step_done", "steps")):
        return False  # worker_init_fn runs only in workers (and is the cell's one worker_init_fn)
    if cell.layout == "striped" and cell.ranks == 1:
        return False  # one rank writes everything: nothing to stripe
    return True


def _partial_ok(values: dict[str, Any]) -> bool:
    """Whether some valid cell, not known to be inexact or refused, could still extend these values (for the
    greedy cover): an inexact or refused pair (persistent workers on an iterable loader), like a refused
    value, would hide the pairs its cell was meant to cover."""
    cell = Cell(**{**dataclasses.asdict(Cell()), **_fill_neutral(values)})
    return valid(cell) and expected(cell).kind not in ("inexact", "refused")


def _fill_neutral(values: dict[str, Any]) -> dict[str, Any]:
    """Fill unset dimensions with the value least likely to clash with what is set."""
    filled = dict(values)
    if "workers" not in filled:
        filled["workers"] = 2 if (filled.get("loader_option") == "persistent_workers"
                                  or filled.get("worker_rng") == "worker_init_gen") else 0
    if "accumulate" not in filled and filled.get("accumulate_by", "step") != "step":
        filled["accumulate"] = 2
    if "loader" not in filled:
        filled["loader"] = "shuffled"
    if "launch" not in filled and filled.get("layout") == "striped":
        filled["launch"] = "torchrun"  # striping needs several ranks
    return filled


# ---------------------------------------------------------------- generators

def pairwise(dimensions: dict[str, tuple[Any, ...]]) -> list[Cell]:
    """A deterministic greedy all-pairs cover: every valid pair of values of two dimensions is in some cell.

    Each new cell is built dimension by dimension, taking the value that covers
    the most uncovered pairs with the values already chosen (ties: the earlier
    value), starting from the most-needed uncovered pair. No randomness, so the
    same dimensions always give the same cells, in the same order.
    """
    names = list(dimensions)
    uncovered = {pair for pair in _all_pairs(dimensions) if _partial_ok(dict(pair))}
    cells: list[Cell] = []
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=lambda p: (names.index(p[0][0]), names.index(p[1][0]),
                                                          dimensions[p[0][0]].index(p[0][1]),
                                                          dimensions[p[1][0]].index(p[1][1])))
        chosen: dict[str, Any] = {a: va, b: vb}
        for name in names:
            if name in chosen:
                continue
            best = max(dimensions[name], key=lambda v: (
                _partial_ok({**chosen, name: v}),
                sum(((name, v), (o, chosen[o])) in uncovered or ((o, chosen[o]), (name, v)) in uncovered
                    for o in chosen),
                -dimensions[name].index(v)))
            chosen[name] = best
        cell = Cell(**chosen)
        if not valid(cell):  # cannot happen with _partial_ok, but never emit an invalid cell
            uncovered.discard(((a, va), (b, vb)))
            continue
        cells.append(cell)
        uncovered -= set(_pairs_of(cell, names))
    return cells


def _all_pairs(dimensions: dict[str, tuple[Any, ...]]) -> Iterator[tuple[tuple[str, Any], tuple[str, Any]]]:
    for a, b in itertools.combinations(dimensions, 2):
        for va in dimensions[a]:
            for vb in dimensions[b]:
                yield (a, va), (b, vb)


def _pairs_of(cell: Cell, names: list[str]) -> Iterator[tuple[tuple[str, Any], tuple[str, Any]]]:
    for a, b in itertools.combinations(names, 2):
        yield (a, getattr(cell, a)), (b, getattr(cell, b))


def refused_values() -> dict[str, tuple[Any, ...]]:
    """The values :func:`expected` refuses on their own (in the baseline cell), by dimension.

    They are kept out of the pairwise cover: a refused cell tests nothing about
    its other values, so each would hide the pairs it was meant to cover.
    """
    found: dict[str, tuple[Any, ...]] = {}
    for name, values in DIMENSIONS.items():
        bad = tuple(v for v in values if expected(Cell(**_fill_neutral({name: v}))).kind == "refused")
        if bad:
            found[name] = bad
    return found


def local_pairwise() -> list[Cell]:
    """The all-pairs cover over every dimension's accepted values, launches without Slurm."""
    return pairwise(_accepted({**DIMENSIONS, "launch": LOCAL_LAUNCHES}))


def refusal_cells() -> list[Cell]:
    """Each refused value alone, under each local launch: the refusal must come at start, whatever the launch.
    A lazily made dataset generator also with workers (a check in the workers refuses it, not the one here)."""
    alone = [_fill_neutral({name: value}) for name, values in refused_values().items() for value in values]
    alone += [_fill_neutral({"worker_rng": "lazy", "workers": 2})]
    return [Cell(**values, launch=launch) for values in alone for launch in LOCAL_LAUNCHES]


def _accepted(dimensions: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    refused = refused_values()
    return {name: tuple(v for v in values if v not in refused.get(name, ())) for name, values in dimensions.items()}


def single_value_cells() -> list[Cell]:
    """Each value alone on the baseline (TERM where it matters most): a failing pair is traced to a value."""
    cells = []
    for name, values in DIMENSIONS.items():
        for value in values[1:]:
            cell = Cell(**_fill_neutral({name: value}))
            if valid(cell) and value not in SLURM_LAUNCHES:
                cells.append(cell)
    return cells


def loader_by_signal() -> list[Cell]:
    """The full cross of loader x signal under ``jobwrap run``, with 2 workers wherever a DataLoader is used."""
    cells = []
    for loader, sig in itertools.product(DIMENSIONS["loader"], DIMENSIONS["signal"]):
        workers = 0 if loader in ("python_list", "python_generator") else 2
        cells.append(Cell(loader=loader, workers=workers, signal=sig, launch="run"))
    return cells


def framework_cells() -> list[Cell]:
    """Lightning and the Hugging Face Trainer through jobwrap's integrations: each signal under ``jobwrap run``,
    a plain relaunch loop, gradient accumulation, loader workers, 2 ranks, and the loader Lightning refuses."""
    lightning = dict(framework="lightning", loader="stateful")
    trainer = dict(framework="transformers")
    return ([Cell(signal=s, launch="run", **lightning) for s in FRAMEWORK_SIGNALS]
            + [Cell(launch="plain", **lightning), Cell(launch="run", accumulate=2, **lightning),
               Cell(launch="run", workers=2, **lightning), Cell(launch="torchrun", **lightning),
               Cell(launch="run", framework="lightning")]
            + [Cell(signal=s, launch="run", **trainer) for s in FRAMEWORK_SIGNALS]
            + [Cell(launch="plain", **trainer), Cell(launch="run", accumulate=2, **trainer),
               Cell(launch="torchrun", **trainer)]
            + lightning_option_cells())


def lightning_option_cells() -> list[Cell]:
    """Lightning's own mid-epoch work: validation at val_check_interval=0.5 (signalled at the batch before it) and
    ModelCheckpoint(every_n_train_steps=3) (signalled at its step), under USR1 and TERM."""
    return [Cell(signal=s, launch="run", framework="lightning", loader="stateful", fit_option=option)
            for option in FIT_OPTIONS[1:] for s in ("usr1", "term")]


def term_worker_cells() -> list[Cell]:
    """scancel's TERM to the whole process group while 2 loader workers run: every launch path (those on Slurm are
    skipped without the cluster) with each loader kind it takes: a DataLoader and torchdata's
    StatefulDataLoader for the loop and Lightning, the Trainer's own loader for the Trainer."""
    loop = [Cell(loader=loader, workers=2, signal="term", launch=launch)
            for launch in (*LOCAL_LAUNCHES, *SLURM_LAUNCHES, *SUBMITIT_LAUNCHES) for loader in ("shuffled", "stateful")]
    lightning = [Cell(loader=loader, workers=2, signal="term", launch=launch, framework="lightning")
                 for launch in LOCAL_LAUNCHES for loader in ("stateful", "shuffled")]
    trainer = [Cell(workers=2, signal="term", launch=launch, framework="transformers") for launch in LOCAL_LAUNCHES]
    return loop + lightning + trainer


def submitit_cells() -> list[Cell]:
    """The loop as a submitit job with 2 loader workers under each signal: USR1 is the job's preemption signal
    (submitit requeues it itself), TERM a cancel the user resubmits."""
    return [Cell(workers=2, signal=s, launch=launch) for launch in SUBMITIT_LAUNCHES for s in DIMENSIONS["signal"]]


def default_submitit_cells() -> list[Cell]:
    """The submitit cells CI runs (each a few job launches): TERM with 2 workers, a DataLoader and a
    StatefulDataLoader."""
    return [c for c in term_worker_cells() if c.launch == "submitit"]


def ddp_batchnorm_cells() -> list[Cell]:
    """DDP with a BatchNorm (buffers broadcast from rank 0 at every forward) under torchrun, in both layouts."""
    return [Cell(norm="batchnorm", signal=s, launch="torchrun", layout=layout)
            for layout in DIMENSIONS["layout"] for s in ("usr1", "term")]


def default_framework_cells() -> list[Cell]:
    """The framework cells CI runs (a Trainer fit costs minutes): one exact run each, and Lightning's refusal."""
    return [Cell(launch="run", framework="lightning", loader="stateful"), Cell(launch="run", framework="lightning"),
            Cell(launch="run", framework="transformers", accumulate=2)]


def slurm_cells() -> list[Cell]:
    """Fewer cells on the real local Slurm (slow): each signal in the batch layout, two in srun with 2 tasks."""
    common = dict(workers=2, save="epoch_end", extras="allowed")
    return ([Cell(signal=s, launch="slurm_batch", **common) for s in DIMENSIONS["signal"]]
            + [Cell(signal=s, launch="srun", **common) for s in ("usr1", "term")]
            + [Cell(signal="usr1", launch="srun", layout="striped", **common)])


def default_cells() -> list[Cell]:
    """The fixed subset CI runs: the first cells of the pairwise cover (the greedy cover front-loads pairs),
    the striped saves' cases (see :func:`striped_twins`), each refused value once, the integrations, and DDP with
    BatchNorm in both layouts (a striped cover cell with its twin, or else a TERM pair sharing one reference), and
    TERM with workers in a submitit job."""
    cover = local_pairwise()[:DEFAULT_CELLS]
    stateful = [] if any(c.loader == "stateful" for c in cover) else [Cell(loader="stateful")]
    batchnorm = [] if any(c.norm == "batchnorm" and c.layout == "striped" for c in cover) else [
        Cell(norm="batchnorm", signal="term", launch="torchrun", layout=layout) for layout in DIMENSIONS["layout"]]
    return (cover + striped_twins(cover) + stateful + [c for c in refusal_cells() if c.launch == "run"]
            + [Cell(loader="stateful", workers=2, launch="run")] + default_framework_cells() + batchnorm
            + default_submitit_cells())


def edge_cells() -> list[Cell]:
    """The cells scripts/test runs again in .venv-edge (the newest tested torch with the oldest tested Lightning
    and transformers): the integrations, torchdata's loader with workers, and DDP with BatchNorm under torchrun."""
    return default_framework_cells() + [Cell(loader="stateful", workers=2, launch="run"),
                                        Cell(norm="batchnorm", signal="term", launch="torchrun", layout="striped")]


def striped_twins(cover: list[Cell]) -> list[Cell]:
    """For the cover's striped cells: each one-file (the multi-rank runs the cover had before striping), and
    the first under SIGKILL (periodic background saves with 2 ranks, striped manual and final saves). A twin
    shares its cell's uninterrupted reference run."""
    striped = [c for c in cover if c.layout == "striped"]
    one_file = [dataclasses.replace(c, layout="one_file") for c in striped]
    return list(dict.fromkeys(one_file + [dataclasses.replace(striped[0], signal="sigkill")]))


def full_cells() -> list[Cell]:
    """Every cell of the full matrix, without repeats: pairwise (with its striped cells' twins), loader x signal,
    the frameworks, TERM with workers under every launch, submitit under each signal, DDP with BatchNorm, Slurm."""
    cover = local_pairwise()
    return list(dict.fromkeys(cover + striped_twins(cover) + refusal_cells() + single_value_cells()
                              + loader_by_signal() + framework_cells() + term_worker_cells()
                              + submitit_cells() + ddp_batchnorm_cells() + slurm_cells()))


def selected_cells(environ: dict[str, str] | None = None) -> list[Cell]:
    """``JOBWRAP_MATRIX=full``: the full matrix; ``edge``: the few cells of the edge venv; otherwise the default subset."""
    environ = os.environ if environ is None else environ
    choice = environ.get("JOBWRAP_MATRIX", "").strip().lower()
    return full_cells() if choice == "full" else edge_cells() if choice == "edge" else default_cells()


def pair_coverage(cells: Iterable[Cell], dimensions: dict[str, tuple[Any, ...]] | None = None) -> float:
    """The share of valid pairs the cells cover (1.0 for the pairwise cover)."""
    dimensions = dimensions or _accepted({**DIMENSIONS, "launch": LOCAL_LAUNCHES})
    wanted = {p for p in _all_pairs(dimensions) if _partial_ok(dict(p))}
    covered = {p for cell in cells for p in _pairs_of(cell, list(dimensions))}
    return len(wanted & covered) / len(wanted)


# ---------------------------------------------------------------- expectations

def expected(cell: Cell) -> Expectation:
    """What jobwrap must do with ``cell`` once issues 11 and 21 are fixed: the one table to adjust.

    Refusals come first (the start must fail with the option named); then what the docs
    (docs/integrations.md) name as not exact; everything else must be bit-exact,
    whatever the signal and the launch.
    """
    if cell.framework != "loop":
        return _expected_framework(cell)
    if cell.extras == "numpy_array":
        return Expectation("refused", "a numpy array cannot be read back with weights_only; refused when set "
                                      "(defect 4), not at the preemption", match=r"confusion")
    if cell.extras == "set_only":
        return Expectation("refused", "an extra set only through job[...] would not be restored on resume; "
                                      "refused when set, naming job.track(name=initial)", match=r"track\(")
    if cell.loader_option == "persistent_workers" and cell.loop == "epochs" and cell.loader in _REPLAYED:
        return Expectation("refused", "persistent workers keep their RNG state across epochs, which a replayed "
                                      "loader cannot rebuild (a map-style one seeds them per batch); refused at "
                                      "loader()", match=r"persistent_workers")
    if cell.loader == "python_generator":
        return Expectation("refused", "a one-shot generator cannot be replayed to resume mid-epoch; "
                                      "refused at loader()", match=r"(?i)generator|re-?iterable")
    if cell.composition == "zip":
        return Expectation("refused", "two loaders zipped, each in job.loader(), would both count steps and "
                                      "replace each other's position; refused at the second loader(), naming "
                                      "job.loader", match=r"(?i)loader")
    if cell.composition == "aux_unwrapped":
        return Expectation("refused", "a second loader drawn with next() inside the epoch without job.loader() "
                                      "restarts from its first batch on a resume; refused at the latest in the "
                                      "first epoch, naming the loader", match=r"(?i)loader", in_first_epoch=True)
    if cell.loop == "while_next":
        return Expectation("refused", "the batches come from an iterator of an unwrapped DataLoader, which a "
                                      "resume restarts from its first batch; refused at the latest in the first "
                                      "epoch, naming job.loader", match=r"(?i)loader", in_first_epoch=True)
    if cell.accumulate_by == "enumerate":
        return _expected_index_accumulation()
    if cell.validation == "wrapped":
        return Expectation("refused", "a second loader wrapped in job.loader() inside the epoch would replace "
                                      "the training loader's position; refused at the second loader(), the first "
                                      "time validation runs", match=r"(?i)loader", in_first_epoch=True)
    if cell.worker_rng != "global":
        return _expected_worker_rng(cell)
    return Expectation("exact")


def _expected_index_accumulation() -> Expectation:
    """``if (i + 1) % k == 0: optimizer.step()`` over ``enumerate(job.loader(dl))``: a resumed epoch's enumerate
    starts at 0, so the accumulation windows shift; jobwrap cannot make the plain enumerate exact, so it refuses it
    at the first batch of every launch (``accumulate_by=loader_enumerate``, ``job.loader(dl).enumerate()``, is
    exact)."""
    return Expectation("refused", "enumerate() restarts at 0 in a resumed epoch, shifting the optimizer steps "
                                  "keyed on the batch index; refused in the first epoch, naming the loader's batch "
                                  "index", match=r"(?i)enumerate|index", in_first_epoch=True)


def _expected_worker_rng(cell: Cell) -> Expectation:
    """A dataset with its own generator. Made by worker_init_fn from get_worker_info().seed: exact (each worker
    seeds it before every batch). Made lazily in __getitem__ from torch.initial_seed(), in a worker or with
    num_workers=0 (a DataLoader that skips on resume, a StatefulDataLoader): refused at the first batch,
    naming the generator (issue 21)."""
    if cell.worker_rng == "lazy":
        return Expectation("refused", "a generator the dataset makes in its first fetch would start over in another "
                                      "batch on a resume; refused at the first batch, naming it",
                           match=r"made the random generator dataset\.rng")
    return Expectation("exact")


def _expected_framework(cell: Cell) -> Expectation:
    """Lightning (jobwrap.lightning.Preemptible) and the Trainer (jobwrap.transformers.attach), as
    docs/integrations.md states them."""
    if cell.framework == "lightning" and cell.loader != "stateful":
        return Expectation("refused", "a torch DataLoader cannot tell Lightning where an epoch stopped (it would "
                                      "retrain the epoch's first batches); refused at the fit's start, naming "
                                      "StatefulDataLoader", match=r"StatefulDataLoader")
    if cell.framework == "transformers" and cell.ranks > 1:
        return Expectation("refused", "jobwrap.transformers runs one training process; refused at attach()",
                           match=r"one training process")
    return Expectation("exact")
