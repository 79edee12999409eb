"""The Session in one process, with real signals sent to itself: the flag logic and the resume."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

import jobwrap
from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap.errors import ConfigError, StateMismatchError


def _session(directory, **settings):
    return jobwrap.Session(str(directory), environ={}, **settings)


def _saved_after(directory, steps):
    """A linear model and its SGD, trained ``steps`` steps in a session that saved them; both still live."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with _session(directory) as job:
        job.track(model=model, optimizer=optimizer)
        _train_steps(job, model, optimizer, steps)
        job.save()
    return model, optimizer


def _train_steps(job, model, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.ones(3, 2)).sum().backward()
        optimizer.step()
        job.step_done()


def test_smallest_case_sgd_momentum_resumes_lr_and_buffers(tmp_path):
    """nn.Linear(2, 1) with SGD(lr=0.1, momentum=0.9): after resume lr is 0.1 and momentum buffers match."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(jobwrap.Preempted) as stopped:
        with _session(tmp_path) as job:
            job.track(model=model, optimizer=optimizer)
            _train_steps(job, model, optimizer, 3)
            os.kill(os.getpid(), signal.SIGUSR1)
            _train_steps(job, model, optimizer, 1)
    assert stopped.value.code == jobwrap.REQUEUE_EXIT_CODE and stopped.value.checkpoint.step == 4
    saved = {k: v["momentum_buffer"].clone() for k, v in optimizer.state_dict()["state"].items()}

    model2 = nn.Linear(2, 1)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.0)
    with _session(tmp_path) as job:
        job.track(model=model2, optimizer=optimizer2)
        assert job.step == 4
        assert optimizer2.param_groups[0]["lr"] == 0.1
        assert optimizer2.param_groups[0]["momentum"] == 0.9
        for key, buffer in optimizer2.state_dict()["state"].items():
            assert torch.equal(buffer["momentum_buffer"], saved[key])
        assert torch.equal(model2.weight, model.weight)


def test_handler_only_records_and_is_restored(tmp_path):
    """The trap records the signal (no save inside the handler) and restores the previous handler."""
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
    try:
        with _session(tmp_path) as job:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)  # a second signal: still no save, no second save
            assert job.should_stop
            assert job.store.committed() == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sigterm_checkpoints_and_exits_without_requeue(tmp_path):
    """TERM commits a checkpoint and exits 143 without asking for a requeue (scancel must end the job)."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(jobwrap.Preempted) as stopped:
        with _session(tmp_path) as job:
            job.track(model=model, optimizer=optimizer)
            os.kill(os.getpid(), signal.SIGTERM)
            _train_steps(job, model, optimizer, 2)
    assert stopped.value.code == 143 and not stopped.value.requeued
    assert stopped.value.checkpoint.step == 1
    assert [e["event"] for e in read_events(str(tmp_path))][-2:] == ["stop", "exit"]


def test_signal_during_resume_is_honoured_at_first_boundary(tmp_path):
    """A signal that arrives while resuming stops the run at its first boundary, without a duplicate save."""
    model, optimizer = _saved_after(tmp_path, 2)
    with pytest.raises(jobwrap.Preempted) as stopped:
        with _session(tmp_path, max_no_progress=1) as job:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives before track() restored anything
            job.track(model=model, optimizer=optimizer)
            _train_steps(job, model, optimizer, 1)
    assert stopped.value.checkpoint.step == 2
    assert stopped.value.code == 1 and "committed no newer step" in stopped.value.reason


def test_extras_round_trip_and_bad_extra_is_refused(tmp_path):
    """Extras such as best_loss come back; a value weights_only cannot load is refused by name."""
    with _session(tmp_path) as job:
        job.track(best_loss=float("inf"), history=[1, 2])
        job["best_loss"] = 0.25
        job.save()
    with _session(tmp_path) as job:
        job.track(best_loss=float("inf"), history=[])
        assert job["best_loss"] == 0.25 and job["history"] == [1, 2]
    with pytest.raises(ConfigError, match="'opts'.*weights_only"):
        with _session(tmp_path / "other") as job:
            job.track(opts=object())


def test_model_that_does_not_match_names_the_keys(tmp_path):
    """Loading into a different model fails with the missing and unexpected keys named."""
    with _session(tmp_path) as job:
        job.track(model=nn.Linear(2, 1))
        job.save()
    with pytest.raises(StateMismatchError) as error:
        with _session(tmp_path) as job:
            job.track(model=nn.Sequential(nn.Linear(2, 1)))
    message = str(error.value)
    assert "missing keys [0.bias, 0.weight]" in message and "unexpected keys [bias, weight]" in message
    assert "new directory" in message
    with pytest.raises(StateMismatchError, match="shape mismatch weight"):
        with _session(tmp_path) as job:
            job.track(model=nn.Linear(3, 1))


def test_config_precedence_and_errors(tmp_path):
    """An argument beats JOBWRAP_* variables, which beat defaults; bad values name the fix."""
    from jobwrap._config import load_config

    env = {"JOBWRAP_DIR": str(tmp_path), "JOBWRAP_KEEP": "5", "JOBWRAP_REQUEUE_SIGNALS": "USR2"}
    assert load_config(env).keep_last == 5
    assert load_config(env, keep_last=2).keep_last == 2
    assert load_config(env).requeue_signals == (signal.SIGUSR2,)
    with pytest.raises(ConfigError, match="JOBWRAP_KEEP"):
        load_config({**env, "JOBWRAP_KEEP": "many"})
    with pytest.raises(ConfigError, match="both a requeue and an exit signal"):
        load_config(env, exit_signals=["USR2"])
    with pytest.raises(ConfigError, match="unknown signal"):
        load_config(env, requeue_signals=["USR9"])
    with pytest.raises(ConfigError, match="JOBWRAP_DIR"):
        load_config({})
    with pytest.raises(ConfigError, match="world-writable"):
        load_config(env, file_mode=0o666)
    with pytest.raises(ConfigError, match="'/'"):
        load_config(env, run_id="../escape")


def test_requeue_caps_policy():
    """The requeue loop stops at the cap and after runs that made no progress."""
    from jobwrap._scheduler.stopping import requeue_refusal

    assert requeue_refusal(restart_count=2, max_requeues=3, progress_history=[True], max_no_progress=3) is None
    assert "cap" in requeue_refusal(restart_count=3, max_requeues=3, progress_history=[True], max_no_progress=3)
    assert "no newer step" in requeue_refusal(restart_count=0, max_requeues=9,
                                              progress_history=[True, False, False, False], max_no_progress=3)
    assert requeue_refusal(restart_count=0, max_requeues=9, progress_history=[False, False, True],
                           max_no_progress=3) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without usable CUDA")
def test_unusable_device_is_refused_at_start_and_checkpoints_kept(tmp_path):
    """device="cuda" without usable CUDA: refused at start naming JOBWRAP_DEVICE; the checkpoint is kept and
    a start on a usable device resumes from it."""
    model, optimizer = _saved_after(tmp_path, 3)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match="JOBWRAP_DEVICE"):
        with _session(tmp_path, device="cuda") as job:
            job.track(model=model, optimizer=optimizer)
    assert sorted(n for n in os.listdir(tmp_path) if n != "events.jsonl") == \
        sorted(n for n in before if n != "events.jsonl")
    with _session(tmp_path, save_at_end=False) as job:
        job.track(model=nn.Linear(2, 1), optimizer=optimizer)
        assert job.step == 3


def test_extra_is_validated_when_set_and_must_be_tracked(tmp_path):
    """job[name] = value refuses at once a value a checkpoint cannot hold, and a name never tracked
    (it would be saved but not restored), each with the fix; a tracked extra still takes new values."""
    np = pytest.importorskip("numpy")
    with _session(tmp_path, save_at_end=False) as job:
        job.track(best_loss=float("inf"), confusion=torch.zeros(2, 2))
        with pytest.raises(ConfigError, match=r"'confusion'.*torch\.tensor"):
            job["confusion"] = np.zeros((2, 2))
        with pytest.raises(ConfigError, match=r"job\.track\(accuracy=") as untracked:
            job["accuracy"] = 0.5
        assert "restore" in str(untracked.value)
        job["best_loss"] = np.float64(0.25)
        assert job["best_loss"] == 0.25 and type(job["best_loss"]) is float
        job.step_done()
        job.save()
    with _session(tmp_path, save_at_end=False) as job:
        job.track(best_loss=float("inf"), confusion=torch.zeros(2, 2))
        assert job["best_loss"] == 0.25


def test_second_save_of_a_step_writes_only_when_the_state_moved(tmp_path):
    """At one step: a save right after a periodic save writes nothing; after scheduler.step() and an extra
    changed it writes a new checkpoint, which the resume loads."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with _session(tmp_path, save_every_steps=2, async_save=False) as job:
        job.track(model=model, optimizer=optimizer, scheduler=scheduler, best=1.0)
        _train_steps(job, model, optimizer, 2)
        periodic = job.last_checkpoint
        assert periodic is not None and periodic.step == 2
        assert job.save() is periodic
        scheduler.step()
        job["best"] = 0.5
        moved = job.save()
        assert (moved.step, moved.serial) == (2, 1)
        assert job.save() is moved
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt")) == ["step-000000000002-1.pt",
                                                                            "step-000000000002.pt"]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with _session(tmp_path, save_at_end=False) as job:
        job.track(model=model, optimizer=optimizer, scheduler=scheduler, best=1.0)
        assert job["best"] == 0.5 and scheduler.last_epoch == 1


def test_save_in_the_loader_body_counts_the_batch_and_a_break_does_not(tmp_path):
    """save() inside the body records the batch as done (step and position one ahead of the loop's count);
    a loop left with break leaves its last batch uncounted, also for a later save."""
    with _session(tmp_path) as job:
        job.track(seen=[])
        for _ in job.epochs(1):
            for item in job.loader(list(range(6))):
                if item == 4:
                    break
                job["seen"] = job["seen"] + [item]
                if item == 1:
                    saved = job.save()
                    assert (saved.step, job.step, job.position) == (2, 2, 2)
    assert job.step == 4 and job.last_checkpoint.step == 4
    with _session(tmp_path, save_at_end=False) as job:
        job.track(seen=[])
        assert job["seen"] == [0, 1, 2, 3] and job.step == 4


def test_a_tensor_extra_replaced_by_a_new_value_is_saved_again(tmp_path):
    """job["ema"] = a new tensor at the same step (same shape, new values) writes a new checkpoint."""
    with _session(tmp_path, save_at_end=False) as job:
        job.track(ema=torch.zeros(4))
        job.step_done()
        first = job.save()
        job["ema"] = torch.ones(4)
        second = job.save()
        assert (second.step, second.serial) == (first.step, 1)
    with _session(tmp_path, save_at_end=False) as job:
        job.track(ema=torch.zeros(4))
        assert torch.equal(job["ema"], torch.ones(4))


def _saved(checkpoint):
    return torch.load(checkpoint.path, weights_only=True)


def test_zero_grad_backward_step_adds_no_gradients_to_the_checkpoint(tmp_path):
    """The common loop (zero_grad, backward, step; grads set to None or zeroed) saves no gradients."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with _session(tmp_path, save_at_end=False) as job:
        job.track(model=model, optimizer=optimizer)
        _train_steps(job, model, optimizer, 2)
        optimizer.zero_grad(set_to_none=False)
        model(torch.ones(3, 2)).sum().backward()
        optimizer.step()
        job.step_done()
        assert all(p.grad is not None for p in model.parameters())
        saved = _saved(job.save())
    assert saved["step"] == 3 and "grads" not in saved["jobwrap"]["ranks"][0]


def _accumulate(model, scale=1.0):
    (model(torch.ones(3, 2)).sum() * scale).backward()


def test_gradients_accumulated_since_the_last_step_are_saved_and_restored(tmp_path):
    """Backward without optimizer.step() before a boundary: the checkpoint holds the gradients and the
    resume puts them back into .grad; more backward at the same step makes a same-step save write again."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with _session(tmp_path, save_at_end=False) as job:
        job.track(model=model, optimizer=optimizer)
        _train_steps(job, model, optimizer, 1)
        optimizer.zero_grad()
        _accumulate(model)
        job.step_done()
        first = job.save()
        assert job.save() is first
        _accumulate(model, 2.0)
        second = job.save()
        assert (second.step, second.serial) == (2, 1)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    saved = _saved(second)["jobwrap"]["ranks"][0]["grads"]
    assert set(saved) == {"model"} and torch.equal(saved["model"]["weight"], grads["weight"])
    fresh = nn.Linear(2, 1)
    with _session(tmp_path, save_at_end=False) as job:
        job.track(model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1))
        assert {name: p.grad for name, p in fresh.named_parameters()}.keys() == grads.keys()
        for name, p in fresh.named_parameters():
            assert torch.equal(p.grad, grads[name])


def test_background_save_holds_the_gradients_of_its_boundary(tmp_path):
    """A periodic save written in the background keeps the gradients as they were at the boundary,
    although the next backward changes them in place while the write runs."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with _session(tmp_path, save_every_steps=1, async_save=True, save_at_end=False) as job:
        job.track(model=model, optimizer=optimizer)
        _accumulate(model)
        at_boundary = model.weight.grad.clone()
        job.step_done()  # the periodic save of step 1 is staged here
        _accumulate(model, 5.0)
        job.save()  # collects the background save first
    background = next(c for c in CheckpointStore(str(tmp_path)).committed() if c.key == (1, 0))
    assert background.manifest.get("background")
    saved = _saved(background)["jobwrap"]["ranks"][0]["grads"]["model"]["weight"]
    assert torch.equal(saved, at_boundary) and not torch.equal(saved, model.weight.grad)


def test_resumed_start_event_records_the_read_within_the_load(tmp_path):
    """A resumed start's event holds read_seconds (the checkpoint's read and checksum), part of load_seconds."""
    _saved_after(tmp_path, 2)
    model = nn.Linear(2, 1)
    with _session(tmp_path) as job:
        job.track(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    start = [e for e in read_events(str(tmp_path)) if e["event"] == "start"][-1]
    assert start["resumed_from"] is not None and "read_seconds" in start
    assert 0 <= start["read_seconds"] <= start["load_seconds"]
