"""Asynchronous periodic saves, the signal's fast save, the grace-window arithmetic, the one-pass verified load."""
from __future__ import annotations

import collections
import errno
import io
import logging
import os
import signal
import threading

import pytest
import torch
import torch.serialization
from torch import nn

import jobwrap
from jobwrap._loop.async_save import AsyncSaver
from jobwrap._storage import deadline
from jobwrap._storage.events import read_events
from jobwrap._storage.snapshot import BackgroundSave, StagingArea
from jobwrap._storage.store import CheckpointStore, SaveCancelled
from jobwrap.errors import CheckpointError, CorruptCheckpointError, StorageError

WAIT = 30  # seconds: the bound of every wait in this file
Pair = collections.namedtuple("Pair", "a b")


def _session(directory, **settings):
    return jobwrap.Session(str(directory), environ={}, run_id="run", **settings)


def _build(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer


def _train_steps(job, model, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        job.step_done()


def _bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- staging

def test_staged_copy_is_byte_identical_and_independent():
    """A staged payload saves to the same bytes as the live one, and later training does not change it."""
    model, optimizer = _build()
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    base = torch.arange(12.0)
    payload = {
        "model": model.state_dict(),            # an OrderedDict with _metadata
        "optimizer": optimizer.state_dict(),
        "views": [base[2:6], base.view(3, 4).t(), base],  # one storage, offsets and strides
        "pair": Pair(torch.ones(2), 3),
        "size": torch.Size([2, 3]),
        "param": nn.Parameter(torch.zeros(3)),
        "plain": {"lr": 0.1, "names": ["a", "b"], "none": None},
    }
    expected = _bytes(payload)
    area = StagingArea()
    staged = area.stage(payload)
    assert _bytes(staged) == expected
    assert staged["views"][0].untyped_storage().data_ptr() == staged["views"][2].untyped_storage().data_ptr()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    base.zero_()
    payload["plain"]["names"].append("c")
    assert _bytes(staged) == expected


def test_staging_reuses_its_buffers():
    """The second stage of the same structure allocates nothing: the same buffers receive the copy."""
    model, _ = _build()
    area = StagingArea()
    first = area.stage(model.state_dict())
    pointers = [t.data_ptr() for t in first.values()]
    with torch.no_grad():
        model[0].weight.fill_(7.0)
    second = area.stage(model.state_dict())
    assert [t.data_ptr() for t in second.values()] == pointers
    assert torch.equal(second["0.weight"], model[0].weight.detach())
    assert area.nbytes == sum(t.nbytes for t in model.state_dict().values())


def test_background_save_keeps_error_until_collected():
    """A failure on the writer thread is kept, not lost, until the training thread collects it."""
    background = BackgroundSave()

    def fail(cancel):
        raise OSError(28, "No space left on device")

    background.submit(5, fail)
    assert background.wait(WAIT) and background.finished and background.busy
    result, error = background.collect()
    assert result is None and isinstance(error, OSError) and not background.busy


# ---------------------------------------------------------------- sessions

def test_async_save_commits_the_same_bytes_as_a_sync_save(tmp_path):
    """A periodic save written in the background holds exactly the bytes a synchronous save writes."""
    files = {}
    for mode in (True, False):
        model, optimizer = _build()
        directory = tmp_path / ("async" if mode else "sync")
        with _session(directory, save_every_steps=3, async_save=mode, save_at_end=False) as job:
            job.track(model=model, optimizer=optimizer, best=1.5)
            _train_steps(job, model, optimizer, 3)
            if mode:
                assert job._saver.background.busy or job.last_checkpoint is not None
        files[mode] = (directory / "step-000000000003.pt").read_bytes()
        events = [e for e in read_events(str(directory)) if e["event"] == "save"]
        assert [e.get("background", False) for e in events] == [mode]
    assert files[True] == files[False]


def test_background_failure_is_raised_at_the_next_boundary(tmp_path):
    """The directory vanishes under a background save: the next step boundary raises StorageError."""
    model, optimizer = _build()
    directory = tmp_path / "ck"
    with pytest.raises(StorageError, match="background save of step 2 failed.*disappeared") as raised:
        with _session(directory, save_every_steps=2, save_at_end=False) as job:
            job.track(model=model, optimizer=optimizer)
            _train_steps(job, model, optimizer, 1)
            os.rename(directory, tmp_path / "moved")  # a real failure: ENOENT on the temporary file
            _train_steps(job, model, optimizer, 1)    # step 2: staged, written on the background thread
            assert job._saver.background.wait(WAIT)
            _train_steps(job, model, optimizer, 1)    # the next boundary reports it
            pytest.fail("the failed background save was not raised")
    assert raised.value.errno == errno.ENOENT


def test_background_failure_is_not_lost_when_training_ends(tmp_path):
    """A background save that fails after the last boundary is raised when the session closes."""
    model, optimizer = _build()

    class Unpicklable:
        pass

    with pytest.raises(CheckpointError, match="background save of step 1 failed"):
        with _session(tmp_path, save_every_steps=1, save_at_end=False) as job:
            job.track(model=model, optimizer=optimizer)
            job._objects["bad"] = _Holder(Unpicklable())  # a state dict torch.save cannot write
            job._proven = True  # past the proof of loadable state: the writer's failure is tested
            _train_steps(job, model, optimizer, 1)


class _Holder:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_continue_setting_logs_a_background_failure(tmp_path, caplog):
    """With on_save_error=continue a failed background save is logged and training goes on."""
    model, optimizer = _build()
    directory = tmp_path / "ck"
    with caplog.at_level(logging.ERROR, logger="jobwrap"):
        with _session(directory, save_every_steps=2, save_at_end=False, on_save_error="continue") as job:
            job.track(model=model, optimizer=optimizer)
            os.rename(directory, tmp_path / "moved")
            _train_steps(job, model, optimizer, 2)
            assert job._saver.background.wait(WAIT)
            _train_steps(job, model, optimizer, 1)
            assert job.step == 3
    assert any("background save of step 2 failed" in r.getMessage() for r in caplog.records)


def test_signal_supersedes_the_save_in_flight(tmp_path):
    """A signal while an older save is being written cancels it and commits the newest state at once."""
    model, optimizer = _build()
    entered = threading.Event()
    with pytest.raises(jobwrap.Preempted) as stopped:
        with _session(tmp_path, save_every_steps=2) as job:
            job.track(model=model, optimizer=optimizer)
            real_save = job.store.save

            def held_save(payload, *, cancel=None, **kwargs):
                if threading.current_thread() is not threading.main_thread():
                    entered.set()
                    assert cancel.wait(WAIT), "the signal's save never cancelled the one in flight"
                return real_save(payload, cancel=cancel, **kwargs)

            job.store.save = held_save
            _train_steps(job, model, optimizer, 2)  # step 2: a background save, held until cancelled
            assert entered.wait(WAIT)
            _train_steps(job, model, optimizer, 1)
            os.kill(os.getpid(), signal.SIGUSR1)
            _train_steps(job, model, optimizer, 1)
    assert stopped.value.checkpoint.step == 4
    store = CheckpointStore(str(tmp_path))
    assert [c.step for c in store.committed()] == [4]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    loaded = torch.load(stopped.value.checkpoint.path, weights_only=True)
    assert torch.equal(loaded["model"]["0.weight"], model[0].weight.detach())


def test_signal_waits_for_the_save_of_its_own_step(tmp_path):
    """When the save in flight is of the signal's step, it is awaited, not written twice."""
    model, optimizer = _build()
    with pytest.raises(jobwrap.Preempted) as stopped:
        with _session(tmp_path, save_every_steps=2) as job:
            job.track(model=model, optimizer=optimizer)
            _train_steps(job, model, optimizer, 2)  # the save of step 2 is in flight (or done)
            os.kill(os.getpid(), signal.SIGUSR1)
            job._boundary()                          # the same step's boundary again: the signal's save
    assert stopped.value.checkpoint.step == 2
    saves = [e for e in read_events(str(tmp_path)) if e["event"] == "save"]
    assert [(e["step"], e.get("background", False)) for e in saves] == [(2, True)]


def test_emergency_save_loads_with_plain_torch_load_and_restores_crc_setting(tmp_path):
    """The signal's checkpoint (written without torch's CRC) opens with torch.load(weights_only=True)."""
    model, optimizer = _build()
    for user_setting in (True, False):
        torch.serialization.set_crc32_options(user_setting)
        try:
            with pytest.raises(jobwrap.Preempted) as stopped:
                with _session(tmp_path / str(user_setting)) as job:
                    job.track(model=model, optimizer=optimizer, best=0.5)
                    _train_steps(job, model, optimizer, 2)
                    os.kill(os.getpid(), signal.SIGTERM)
                    _train_steps(job, model, optimizer, 1)
            assert torch.serialization.get_crc32_options() is user_setting
        finally:
            torch.serialization.set_crc32_options(True)
        loaded = torch.load(stopped.value.checkpoint.path, weights_only=True)
        assert loaded["step"] == 3 and loaded["best"] == 0.5
        assert torch.equal(loaded["model"]["2.bias"], model[2].bias.detach())
        assert set(loaded["optimizer"]["state"]) == set(optimizer.state_dict()["state"])


def test_cancelled_save_leaves_nothing(tmp_path):
    """A save cancelled between chunks raises SaveCancelled and removes its temporary file."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SaveCancelled):
        store.save({"w": torch.zeros(1 << 20)}, step=1, epoch=0, meta={}, cancel=cancel)
    assert os.listdir(tmp_path) == []


def test_one_pass_load_detects_damage_and_falls_back(tmp_path, caplog):
    """A flipped byte inside a tensor fails the checksum computed while loading; the previous one is used."""
    model, optimizer = _build()
    with _session(tmp_path, save_at_end=False) as job:
        job.track(model=model, optimizer=optimizer)
        _train_steps(job, model, optimizer, 1)
        job.save()
        _train_steps(job, model, optimizer, 1)
        newest = job.save()
    with open(newest.path, "r+b") as f:
        f.seek(newest.size // 2)
        byte = f.read(1)
        f.seek(newest.size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.read_verified(newest, lambda f: torch.load(f, weights_only=True))
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        with _session(tmp_path, save_at_end=False) as job:
            job.track(model=_build()[0], optimizer=_build()[1])
            assert job.step == 1
    assert any("corrupt checkpoint" in r.getMessage() for r in caplog.records)


def test_one_pass_load_equals_a_plain_load(tmp_path):
    """read_verified hands torch.load the file and returns what a plain torch.load returns."""
    store = CheckpointStore(str(tmp_path))
    store.prepare()
    model, optimizer = _build()
    checkpoint = store.save({"model": model.state_dict(), "x": [1, 2]}, step=1, epoch=0, meta={})
    loaded = store.read_verified(checkpoint, lambda f: torch.load(f, weights_only=True))
    plain = torch.load(checkpoint.path, weights_only=True)
    assert _bytes(loaded) == _bytes(plain)


def test_short_grace_window_is_reported_after_the_first_save(tmp_path, caplog):
    """A save slower than the configured grace window is warned about once, after the first save."""
    model, optimizer = _build()
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        with _session(tmp_path, grace_seconds=1e-9) as job:
            job.track(model=model, optimizer=optimizer)
            job.save()
            _train_steps(job, model, optimizer, 1)
            job.save()
    warnings = [r.getMessage() for r in caplog.records if "grace window" in r.getMessage()]
    assert len(warnings) == 1 and "JOBWRAP_GRACE_SECONDS" in warnings[0]
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        caplog.clear()
        with _session(tmp_path, grace_seconds=1e-9, save_at_end=False) as job:  # at start, from the history
            pass
    assert any("grace window" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- grace-window arithmetic

def test_grace_left_takes_the_sooner_of_signal_lead_and_allocation_end():
    """Time left is the signal's lead time minus time since the signal, or the allocation's end if sooner."""
    assert deadline.grace_left(signal_at=100.0, now=130.0, grace_seconds=120, end_time=None, wall_now=0) == 90
    assert deadline.grace_left(signal_at=100.0, now=130.0, grace_seconds=120, end_time=1050.0, wall_now=1000) == 50
    assert deadline.grace_left(signal_at=None, now=0, grace_seconds=None, end_time=None, wall_now=0) is None


def test_emergency_plan():
    """Same step: wait; the older save commits sooner and both do not fit: wait then save; else supersede."""
    plan = deadline.emergency_plan
    assert plan(in_flight_step=5, step=5, remaining=9, fresh=1, left=2) == "wait"
    assert plan(in_flight_step=4, step=5, remaining=1, fresh=5, left=4) == "wait-then-save"
    assert plan(in_flight_step=4, step=5, remaining=1, fresh=5, left=60) == "supersede"
    assert plan(in_flight_step=4, step=5, remaining=8, fresh=5, left=6) == "supersede"
    assert plan(in_flight_step=4, step=5, remaining=None, fresh=None, left=None) == "supersede"


def test_periodic_save_due_by_steps_and_by_seconds():
    """Due every N steps or once the interval passed since the last save, never for a step already saved."""
    due = deadline.periodic_save_due
    assert due(step=4, saved_step=None, every_steps=2, every_seconds=None, now=0, last_save=0)
    assert not due(step=3, saved_step=None, every_steps=2, every_seconds=None, now=0, last_save=0)
    assert not due(step=0, saved_step=None, every_steps=2, every_seconds=None, now=0, last_save=0)
    assert not due(step=4, saved_step=4, every_steps=2, every_seconds=1, now=99, last_save=0)
    assert due(step=3, saved_step=None, every_steps=None, every_seconds=10, now=110, last_save=100)
    assert not due(step=3, saved_step=None, every_steps=None, every_seconds=10, now=109.5, last_save=100)
    assert not due(step=3, saved_step=None, every_steps=None, every_seconds=None, now=1e9, last_save=0)


class _Clock:
    """A clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_time_based_saves_follow_the_injected_clock(tmp_path):
    """save_every_seconds saves when the session's clock says the interval passed, not before; no sleeping."""
    clock = _Clock()
    model, optimizer = _build()
    with _session(tmp_path, save_every_seconds=60, async_save=False, save_at_end=False, clock=clock) as job:
        job.track(model=model, optimizer=optimizer)
        _train_steps(job, model, optimizer, 2)
        assert job.last_checkpoint is None
        clock.now += 60
        _train_steps(job, model, optimizer, 1)  # step 3: the interval has passed
        assert job.last_checkpoint is not None and job.last_checkpoint.step == 3
        clock.now += 59
        _train_steps(job, model, optimizer, 1)
        assert job.last_checkpoint.step == 3
        clock.now += 1
        _train_steps(job, model, optimizer, 1)
    assert [c.step for c in CheckpointStore(str(tmp_path)).committed()] == [5, 3]


def test_signal_save_reads_the_grace_window_from_the_injected_clock(tmp_path, caplog):
    """A signal whose grace window the session's clock says is spent: the save warns it may be cut off, and commits."""
    clock = _Clock()
    model, optimizer = _build()
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        with pytest.raises(jobwrap.Preempted) as stopped:
            with _session(tmp_path, grace_seconds=60, clock=clock) as job:
                job.track(model=model, optimizer=optimizer)
                _train_steps(job, model, optimizer, 1)
                job.save()  # measures the save speed
                os.kill(os.getpid(), signal.SIGUSR1)  # stamped by the session's clock
                clock.now += 61
                _train_steps(job, model, optimizer, 1)
    assert stopped.value.checkpoint.step == 2
    late = [r.getMessage() for r in caplog.records if "left before the kill" in r.getMessage()]
    assert len(late) == 1 and "-1.0 s are left" in late[0]


def test_measured_speed_and_fit_warning():
    """The speed is the median of recent saves; the warning names the signal lead time to ask for."""
    manifests = [{"size": 100, "save_seconds": 1.0}, {"size": 300, "save_seconds": 1.0},
                 {"size": 200, "save_seconds": 1.0}, {"size": 5}]
    assert deadline.measured_speed(manifests) == 200
    assert deadline.measured_speed([{"size": 50, "save_seconds": 1.0, "background": True}, *manifests]) == 200
    assert deadline.measured_speed([{"size": 50, "save_seconds": 1.0, "background": True}]) == 50
    assert deadline.measured_speed([]) is None
    assert deadline.fit_warning(nbytes=10**9, bytes_per_second=10**9, grace_seconds=60) is None
    message = deadline.fit_warning(nbytes=10**11, bytes_per_second=10**9, grace_seconds=60)
    assert message is not None and "--signal=B:USR1@155" in message


def test_sharded_checkpoint_counts_its_folder_in_size_and_speed():
    """An FSDP checkpoint's bytes and save time include every rank's files in its .dcp folder."""
    manifest = {"size": 100, "save_seconds": 1.0, "dcp": {"bytes": 900, "seconds": 4.0}}
    assert deadline.checkpoint_bytes(manifest) == 1000
    assert deadline.measured_speed([manifest]) == 200  # 1000 bytes in 5 s, not 100 in 1 s
    assert deadline.checkpoint_bytes({"size": 100}) == 100


def test_disk_full_during_torch_save_surfaces_as_the_os_error():
    """ENOSPC inside torch.save's writer comes out as that OSError, not torch's 'unexpected pos' error."""
    from jobwrap._storage.store import _HashingWriter

    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        writer = _HashingWriter(fd)
        torch.save({"w": torch.zeros(1 << 20)}, writer)
        with pytest.raises(OSError) as raised:
            writer.finish()
    finally:
        os.close(fd)
    assert raised.value.errno == errno.ENOSPC


def test_staging_buffers_are_reserved_after_the_first_step(tmp_path):
    """After one step the buffers are reserved on the writer thread; the first periodic save reuses them."""
    model, optimizer = _build()
    with _session(tmp_path, save_every_steps=3, save_at_end=False) as job:
        job.track(model=model, optimizer=optimizer)
        _train_steps(job, model, optimizer, 1)
        assert job._saver.background.busy and job._saver.background.step is None  # reserving
        assert job._saver.background.wait(WAIT)
        _train_steps(job, model, optimizer, 1)
        reserved = [b.data_ptr() for b in job._saver.staging._buffers]
        assert job._saver.staging.nbytes >= sum(t.nbytes for t in model.state_dict().values())
        _train_steps(job, model, optimizer, 1)  # step 3: staged into the reserved buffers
        assert [b.data_ptr() for b in job._saver.staging._buffers] == reserved
    assert job.last_checkpoint is not None and job.last_checkpoint.step == 3


def test_next_optimizer_step_waits_for_the_deferred_copy(tmp_path, monkeypatch):
    """Parameters copied on the writer thread are the boundary's: the next optimizer.step() waits for the copy."""
    gate, entered = threading.Event(), threading.Event()
    copy_deferred = StagingArea.copy_deferred
    before_step = AsyncSaver._before_optimizer_step

    def held_copy(self, cancel=None):
        assert gate.wait(WAIT), "the optimizer step never reached its hook"
        return copy_deferred(self, cancel)

    def spied_hook(self, *args):
        entered.set()
        return before_step(self, *args)

    monkeypatch.setattr(StagingArea, "copy_deferred", held_copy)
    monkeypatch.setattr(AsyncSaver, "_before_optimizer_step", spied_hook)
    releaser = threading.Thread(target=lambda: entered.wait(WAIT) and gate.set())
    model, optimizer = _build()
    with _session(tmp_path, save_every_steps=2, save_at_end=False) as job:
        job.track(model=model, optimizer=optimizer)
        _train_steps(job, model, optimizer, 2)     # step 2: staged, its parameters copied later
        at_boundary = model[0].weight.detach().clone()
        releaser.start()
        _train_steps(job, model, optimizer, 1)     # optimizer.step() waits in the hook until the copy ran
        assert job._saver.background.wait(WAIT)
    releaser.join(WAIT)
    saved = torch.load(tmp_path / "step-000000000002.pt", weights_only=True)
    assert torch.equal(saved["model"]["0.weight"], at_boundary)
    assert not torch.equal(model[0].weight.detach(), at_boundary)
    assert job._saver.copy_wait > 0


def test_parameters_changed_outside_the_optimizer_drop_the_lazy_save(tmp_path, monkeypatch, caplog):
    """load_state_dict on the model while its parameters are being copied: that save is dropped, never torn,
    and the following saves copy everything during the pause."""
    gate = threading.Event()
    copy_deferred = StagingArea.copy_deferred

    def held_copy(self, cancel=None):
        assert gate.wait(WAIT)
        return copy_deferred(self, cancel)

    monkeypatch.setattr(StagingArea, "copy_deferred", held_copy)
    model, optimizer = _build()
    with caplog.at_level(logging.WARNING, logger="jobwrap"):
        with _session(tmp_path, save_every_steps=2, save_at_end=False) as job:
            job.track(model=model, optimizer=optimizer)
            _train_steps(job, model, optimizer, 2)            # step 2: parameters copied later
            model.load_state_dict(_build(seed=5)[0].state_dict())  # e.g. swapping in other weights to evaluate
            gate.set()
            assert job._saver.background.wait(WAIT)
            _train_steps(job, model, optimizer, 2)            # step 4: collects the drop, saves eagerly
            assert job._saver.background.wait(WAIT)
    assert any("dropped" in r.getMessage() for r in caplog.records)
    assert not job._saver.lazy_copy and job.config.lazy_copy  # the setting itself is left as given
    assert [c.step for c in CheckpointStore(str(tmp_path)).committed()] == [4]
