"""The checkpoint store: commit protocol, verification, retention, run identity, permissions."""
from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import stat

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from jobwrap._storage.store import (
    CheckpointStore,
    checksum_of,
    data_name,
    leftovers,
    manifest_name,
    parse_listing,
    retention_victims,
    temporary_data_glob,
)
from jobwrap.errors import CheckpointError, CorruptCheckpointError, ForeignRunError, StorageError, describe_oserror


def _save(store: CheckpointStore, step: int, value: float = 1.0):
    return store.save({"model": {"w": torch.full((4,), value)}, "step": step, "epoch": 0,
                       "jobwrap": {"format": 1}}, step=step, epoch=0, meta={"run_id": "r"})


def _load(checkpoint):
    return torch.load(checkpoint.path, weights_only=True)


def test_saved_checkpoint_is_plain_torch_file(tmp_path):
    """A committed checkpoint opens with plain torch.load(weights_only=True) and has a manifest."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    checkpoint = _save(store, 7, 2.5)
    loaded = torch.load(checkpoint.path, weights_only=True)
    assert torch.equal(loaded["model"]["w"], torch.full((4,), 2.5))
    assert checkpoint.manifest["size"] == os.path.getsize(checkpoint.path)
    assert checkpoint.manifest["checksum"].startswith("xxh3_64:")
    assert checkpoint.manifest["format"] == 1  # a jobwrap from before striped saves still reads it
    store.verify(checkpoint)


def test_files_are_owner_only_by_default(tmp_path):
    """Checkpoints and manifests are created 0600, never world-readable or writable."""
    store = CheckpointStore(str(tmp_path / "ck"))
    store.prepare()
    _save(store, 1)
    for name in os.listdir(store.directory):
        mode = stat.S_IMODE(os.stat(os.path.join(store.directory, name)).st_mode)
        assert mode & 0o077 == 0, (name, oct(mode))


def test_group_readable_mode_for_teams(tmp_path):
    """file_mode=0o640 makes checkpoints group-readable, still not world-accessible."""
    store = CheckpointStore(str(tmp_path / "ck"), file_mode=0o640)
    store.prepare()
    checkpoint = _save(store, 1)
    assert stat.S_IMODE(os.stat(checkpoint.path).st_mode) & 0o777 in (0o640, 0o600)  # umask may narrow it


def test_truncated_newest_is_set_aside_and_previous_used(tmp_path, caplog):
    """A truncated newest checkpoint is reported in one line, renamed, and the previous one loads."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    _save(store, 1, 1.0)
    newest = _save(store, 2, 2.0)
    with open(newest.path, "r+b") as f:
        f.truncate(newest.size // 2)
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        found = store.newest_loadable(_load)
    assert found is not None and found[0].step == 1
    assert any("truncated" in r.getMessage() for r in caplog.records)
    assert any(name.startswith("step-000000000002.pt.corrupt") for name in os.listdir(tmp_path))


def test_bit_flip_is_detected(tmp_path):
    """One flipped bit anywhere fails verification."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    checkpoint = _save(store, 3)
    with open(checkpoint.path, "r+b") as f:
        f.seek(checkpoint.size // 3)
        byte = f.read(1)
        f.seek(checkpoint.size // 3)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.verify(checkpoint)


def test_malicious_pickle_is_refused(tmp_path):
    """A checkpoint whose pickle would run code is refused by weights_only and set aside."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    store = CheckpointStore(str(tmp_path))
    store.prepare()
    _save(store, 1)
    evil = store.save({"x": 1}, step=2, epoch=0, meta={})
    with open(evil.path, "wb") as f:
        pickle.dump(Evil(), f)
    # Make the manifest agree with the hostile file, so only weights_only stands in the way.
    import json

    from jobwrap._storage.store import checksum_of
    digest, size = checksum_of(evil.path)
    manifest_path = evil.path[:-3] + ".json"
    record = json.load(open(manifest_path))
    record.update(checksum=digest, size=size)
    json.dump(record, open(manifest_path, "w"))
    found = store.newest_loadable(_load)
    assert found is not None and found[0].step == 1
    assert not (tmp_path / "pwned").exists()


def test_retention_keeps_newest_and_deletes_only_after_commit(tmp_path):
    """keep_last=2 leaves the two newest committed checkpoints."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    for step in range(1, 6):
        _save(store, step)
        store.retain(2)
    assert [c.step for c in store.committed()] == [5, 4]


def test_leftovers_of_a_killed_save_are_cleaned(tmp_path):
    """Temporary files and data without a manifest are removed at the next start."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    good = _save(store, 1)
    (tmp_path / ".tmp-step-000000000002.pt.abcd").write_bytes(b"half")
    (tmp_path / "step-000000000003.pt").write_bytes(b"no manifest")
    store.prepare()
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(good.path), "step-000000000001.json"])


def test_another_runs_directory_is_refused(tmp_path):
    """A directory with another run's checkpoints is refused with the fix in the message."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    store.claim("run-a")
    _save(store, 1)
    with pytest.raises(ForeignRunError, match="JOBWRAP_ADOPT=1"):
        store.claim("run-b")
    run_id, lineage = store.claim("run-b", adopt=True)
    assert run_id == "run-b" and lineage == ["run-a", "run-b"]


def test_unwritable_directory_is_a_clear_error(tmp_path):
    """An unwritable directory raises StorageError naming the directory and the fix."""
    if os.geteuid() == 0:
        target = "/proc/jobwrap-checkpoints"  # root can write anywhere on disk; /proc refuses everyone
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "ck")
    with pytest.raises(StorageError, match="not usable"):
        CheckpointStore(target).prepare()


def test_oserror_hints_name_the_cause_and_the_setting():
    """One errno table for the store, the lock and the doctor: the cause, and the setting that changes it."""
    full = describe_oserror(OSError(errno.ENOSPC, "No space left on device"))
    assert full.startswith("the disk is full") and "JOBWRAP_DIR" in full
    assert "choose another --dir" in describe_oserror(OSError(errno.ENOTDIR, "Not a directory"), option="--dir")
    assert describe_oserror(OSError(errno.EACCES, "x"), option="--dir").startswith("permission denied")
    assert describe_oserror(OSError(errno.EBADF, "x")) == os.strerror(errno.EBADF)  # no hint: the system's words


def test_commit_probe_leaves_nothing_and_names_a_missing_directory(tmp_path):
    """prove_commit commits a probe through the protocol and removes it; a vanished directory is a StorageError."""
    store = CheckpointStore(str(tmp_path / "ck"))
    store.ensure_directory()
    store.prove_commit()
    assert os.listdir(store.directory) == []
    os.rmdir(store.directory)
    with pytest.raises(StorageError, match="cannot commit a file: the checkpoint directory .*disappeared") as raised:
        store.prove_commit()
    assert raised.value.errno == errno.ENOENT


def test_temporary_glob_matches_every_serial_of_its_step_only(tmp_path):
    """The progress probe's glob matches the temporaries the store writes for a step, whatever the serial."""
    store = CheckpointStore(str(tmp_path))
    pattern = temporary_data_glob(1200)
    assert fnmatch.fnmatch(store._tmp_name(data_name(1200)), pattern)
    assert fnmatch.fnmatch(store._tmp_name(data_name(1200, 3)), pattern)
    assert not fnmatch.fnmatch(store._tmp_name(data_name(1201)), pattern)
    assert not fnmatch.fnmatch(store._tmp_name(manifest_name(1200)), pattern)


@given(st.lists(st.integers(min_value=0, max_value=10**6), unique=True), st.integers(min_value=0, max_value=8))
def test_retention_policy_never_drops_below_one(steps, keep):
    """Retention deletes the oldest, keeps the newest max(1, keep), never the newest one."""
    victims = retention_victims(steps, keep)
    kept = set(steps) - set(victims)
    assert len(kept) == min(len(steps), max(1, keep))
    if steps:
        assert max(steps) in kept
        assert all(v < min(kept) for v in victims)


@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from(["pt", "json"])), max_size=40),
       st.lists(st.text(min_size=1, max_size=12), max_size=5))
def test_listing_policy(files, junk):
    """Only steps with both files count as committed; orphans are cleanup candidates; junk is ignored."""
    names = {f"step-{s:012d}.{kind}" for s, kind in files} | set(junk)
    listing = parse_listing(names)
    assert [i.step for i in listing] == sorted({s for s, _ in files}, reverse=True)
    for item in listing:
        assert item.committed == ({f"step-{item.step:012d}.pt", f"step-{item.step:012d}.json"} <= names)
    for name in leftovers(names):
        assert name.startswith(".tmp-") or (name.endswith(".pt") and name[:-3] + ".json" not in names)


def _sharded_save(store: CheckpointStore, step: int) -> tuple:
    """A checkpoint with a sharded folder, as the session writes it: folder first, sealed, then the commit."""
    folder = store.open_folder(step)
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(f"{name} of step {step}".encode())
    from jobwrap._storage.sharded import describe

    files = describe(folder, os.listdir(folder))
    store.seal_folder(step, files)
    return _save(store, step), files


def test_sharded_folder_goes_with_its_checkpoint(tmp_path):
    """Retention deletes a step's .dcp folder with it, quarantine sets it aside, an uncommitted one is a leftover."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    saved = [_sharded_save(store, step) for step in (1, 2, 3)]
    store.retain(2)
    assert sorted(p.name for p in tmp_path.glob("step-*.dcp")) == ["step-000000000002.dcp", "step-000000000003.dcp"]
    checkpoint, files = saved[2]
    store.verify_folder(checkpoint, files)
    # Sealed files get the store's mode, like its own files (DCP wrote them under the umask).
    assert {oct((tmp_path / "step-000000000003.dcp" / name).stat().st_mode & 0o777) for name in files} == {"0o600"}
    store.quarantine(checkpoint)
    assert not (tmp_path / "step-000000000003.dcp").exists() and list(tmp_path.glob("step-000000000003.dcp.corrupt-*"))
    store.open_folder(4)  # a save killed before its commit
    store.prepare()
    assert sorted(p.name for p in tmp_path.glob("step-*.dcp")) == ["step-000000000002.dcp"]
    assert [i.has_folder for i in parse_listing(os.listdir(tmp_path))] == [True]


def test_damaged_or_missing_sharded_file_is_corrupt(tmp_path):
    """verify_folder names the damaged shard, the truncated one, and a missing folder."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    checkpoint, files = _sharded_save(store, 5)
    shard = tmp_path / "step-000000000005.dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[::-1])
    with pytest.raises(CorruptCheckpointError, match=r"__1_0.distcp: checksum .* \(damaged on disk\)"):
        store.verify_folder(checkpoint, files)
    shard.write_bytes(b"short")
    with pytest.raises(CorruptCheckpointError, match="truncated or replaced"):
        store.verify_folder(checkpoint, files)
    store.discard_folder(5)
    with pytest.raises(CorruptCheckpointError, match="is missing"):
        store.verify_folder(checkpoint, files)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without usable CUDA")
def test_load_error_of_the_environment_sets_nothing_aside(tmp_path):
    """A good checkpoint that fails to load on this node (map_location="cuda", no CUDA) stops the start
    with the cause and the fix, and every file stays where it is."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    _save(store, 1, 1.0)
    _save(store, 2, 2.0)
    before = sorted(os.listdir(tmp_path))

    def load_on_cuda(checkpoint):
        return store.read_verified(checkpoint, lambda f: torch.load(f, map_location="cuda", weights_only=True))

    with pytest.raises(CheckpointError, match="JOBWRAP_DEVICE") as raised:
        store.newest_loadable(load_on_cuda, verify=False)
    assert not isinstance(raised.value, CorruptCheckpointError)
    assert "step-000000000002.pt" in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == before
    found = store.newest_loadable(lambda c: store.read_verified(c, lambda f: torch.load(f, weights_only=True)),
                                  verify=False)
    assert found is not None and found[0].step == 2


def test_file_that_is_not_a_checkpoint_is_still_set_aside(tmp_path):
    """A file whose manifest matches but that torch cannot read as a checkpoint (plain bytes) is set aside."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    _save(store, 1, 1.0)
    junk = _save(store, 2, 2.0)
    with open(junk.path, "wb") as f:
        f.write(b"not a torch file at all" * 10)
    manifest = tmp_path / "step-000000000002.json"
    record = json.loads(manifest.read_text())
    record["checksum"], record["size"] = checksum_of(junk.path)
    manifest.write_text(json.dumps(record))
    found = store.newest_loadable(lambda c: store.read_verified(c, lambda f: torch.load(f, weights_only=True)),
                                  verify=False)
    assert found is not None and found[0].step == 1
    assert any(n.startswith("step-000000000002.pt.corrupt") for n in os.listdir(tmp_path))


def test_second_save_of_a_step_gets_its_own_name_and_wins(tmp_path):
    """Saving a step that is already committed writes a new serial beside it; the first stays intact."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    first = _save(store, 5, 1.0)
    second = _save(store, 5, 2.0)
    assert os.path.basename(first.path) == "step-000000000005.pt"
    assert os.path.basename(second.path) == "step-000000000005-1.pt" and second.serial == 1
    store.verify(first)
    assert [(c.step, c.serial) for c in store.committed()] == [(5, 1), (5, 0)]
    found = store.newest_loadable(_load)
    assert found is not None and found[0].serial == 1 and torch.equal(found[1]["model"]["w"], torch.full((4,), 2.0))


def test_listing_orders_serials_newest_first_and_retention_counts_them():
    """step-N.pt (old name, serial 0) and step-N-K.pt sort by (step, serial), newest first; orphans of a
    serial are leftovers; retention keeps the newest (step, serial) pairs."""
    names = ["step-000000000005.pt", "step-000000000005.json", "step-000000000005-2.pt",
             "step-000000000005-2.json", "step-000000000005-1.pt", "step-000000000006.pt",
             "step-000000000006.json", "step-000000000005-1x.pt", "step-000000000005-.pt"]
    listing = parse_listing(names)
    assert [(i.step, i.serial, i.committed) for i in listing] == [(6, 0, True), (5, 2, True), (5, 1, False),
                                                                  (5, 0, True)]
    assert leftovers(names) == ["step-000000000005-1.pt"]
    assert retention_victims([(6, 0), (5, 2), (5, 0)], 2) == [(5, 0)]


def test_retention_deletes_the_oldest_serials(tmp_path):
    """With keep_last=2, three saves of one step then one of the next leave the two newest files."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    for value in (1.0, 2.0, 3.0):
        _save(store, 4, value)
    _save(store, 5, 4.0)
    store.retain(2)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt")) == ["step-000000000004-2.pt",
                                                                            "step-000000000005.pt"]
