"""A mid-epoch resume that draws the skipped batches' indices without loading them.

A DataLoader over a map-style dataset finds its place from the sampler alone: the
sampler's order depends on its RNG, put back to the epoch's start, and not on the
data. The iterator is built as the run built it (the same draws, in the same order:
its workers' base seed, the sampler's seed) over an index sampler that drops the
first ``position`` batches of indices before handing out any, so no worker fetches
them. What a skip cannot rebuild is where the random streams inside the workers
stood; so every batch's worker draws start from a seed made of the iterator's base
seed and the batch's index in the epoch (:func:`jobwrap._loop.workers.seed_batch`), in
the uninterrupted run as in the resumed one. With ``num_workers=0`` the dataset
draws from this process's streams, which the resume puts back to the checkpoint's
state after the skip, as after a replay; the generators the dataset holds itself are
seeded before each batch from the same seed, the batch's index and their attribute
path, as in a worker, and one the dataset makes lazily in a fetch is refused at the
first batch (:class:`jobwrap._loop.workers.BatchSeeding`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader

from jobwrap._compat import torch_loader
from jobwrap._compat.notice import fall_back
from jobwrap._loop.workers import BatchSeeding, SeededFetcher, seeded_workers
from jobwrap.errors import ConfigError

_END = object()


def can_skip(loader: Any, sources: dict[str, Any], rng_kind: Callable[[Any], str | None]) -> bool:
    """Whether ``loader`` finds its place by its indices alone; else the epoch is replayed.

    ``sources`` are the loader's RNGs and stateful parts by path, ``rng_kind(obj)`` names an RNG (None otherwise).
    A subclass that builds its own iterator, or a dataset that holds state a fetch
    advances (its own RNG in a worker's copy, or a ``state_dict``), needs the replay.
    So does a torch whose DataLoader internals are not those the skip was checked on
    (:func:`jobwrap._compat.torch_loader.skip_unrecognised`): one warning names the internal;
    persistent workers, which only the skip makes exact, are then refused.
    """
    if not torch_loader.is_map_style(loader) or torch_loader.builds_own_iterator(loader):
        return False
    if any(_in_dataset(path) and (loader.num_workers > 0 or rng_kind(obj) is None) for path, obj in sources.items()):
        return False
    difference = torch_loader.skip_unrecognised(loader)
    if difference is None:
        return True
    if loader.persistent_workers and loader.num_workers > 0:
        raise ConfigError(
            f"{difference}. DataLoader(persistent_workers=True) keeps the RNG state inside its workers from one "
            f"epoch to the next, which only jobwrap's skip of the done batches can make exact, and the skip relies "
            f"on that internal. Build the DataLoader with persistent_workers=False, or install torch "
            f"{torch_loader.CHECKED}")
    fall_back(difference, "replays a mid-epoch resume's done batches instead of skipping them (exact, slower)")
    return False


def _in_dataset(path: str) -> bool:
    return path == "dataset" or path.startswith("dataset.")


def open_at(loader: DataLoader, position: int) -> Iterator[Any]:
    """``loader``'s iterator for this epoch, starting at batch ``position`` without loading batches before it.

    With ``persistent_workers`` the workers of the previous epoch are kept for a new one (``position`` 0):
    the epoch's seed is drawn as a new iterator draws its base seed, and reaches them with the epoch's
    start message, so that kept and new workers seed each batch alike.
    """
    kept = torch_loader.kept_iterator(loader) if _persistent(loader) else None
    if kept is not None and position == 0:
        return torch_loader.restart_kept(loader, torch_loader.draw_base_seed(loader))
    if kept is not None:
        torch_loader.drop_kept(loader)
    with seeded_workers(position):
        iterator = torch_loader.iterator_over(loader, _Skipping(torch_loader.index_sampler(loader), position))
    # A worker loader sends its first indices while it is built; without workers the first batch is asked
    # later, after the caller has put the checkpoint's RNG state back: skip now, while the epoch's state holds.
    torch_loader.sampler_iterator(iterator).advance()
    if loader.num_workers == 0:  # the dataset lives here: its own generators are seeded per batch as in a worker
        dataset = loader.dataset
        seeding = BatchSeeding(torch_loader.base_seed(iterator), position, lambda: dataset, in_worker=False)
        torch_loader.wrap_fetcher(iterator, lambda fetcher: SeededFetcher(fetcher, seeding))
    if _persistent(loader):  # kept for the next epochs, which start at their first batch
        torch_loader.keep(loader, iterator)
    return iterator


def _persistent(loader: DataLoader) -> bool:
    return bool(loader.persistent_workers and loader.num_workers > 0)


class _Skipping:
    """An index sampler whose iterators drop its first ``batches`` items before handing out one."""

    def __init__(self, sampler: Any, batches: int) -> None:
        self.sampler, self.batches = sampler, batches

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> "_SkippingIterator":
        return _SkippingIterator(iter(self.sampler), self.batches)


class _SkippingIterator:
    """Drops lazily, at the first ``next`` (or ``advance``): the run drew its sampler's seed there too."""

    def __init__(self, inner: Iterator[Any], batches: int) -> None:
        self.inner, self.left = inner, batches

    def __iter__(self) -> "_SkippingIterator":
        return self

    def __next__(self) -> Any:
        self.advance()
        return next(self.inner)

    def advance(self) -> None:
        while self.left > 0:
            self.left -= 1
            if next(self.inner, _END) is _END:
                self.left = 0
                return
