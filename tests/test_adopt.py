"""Adopting an existing script (tests/scripts/adopted_script.py, module level, no `with`): a prefetched batch
carried as state, where the RNG streams are restored, `job.steps` owning the end, a user's own checkpoint
to start from, and the messages an adopter meets. Real processes, real signals."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jobwrap
from jobwrap._storage.events import read_events
from jobwrap.testing import assert_same_run, run_preempted

SCRIPT = Path(__file__).resolve().parent / "scripts" / "adopted_script.py"


def _cmd(loss_log: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--loss-log", str(loss_log), *extra]


def _simulate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobwrap", "simulate", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_prefetched_batch_carried_as_state_is_bit_exact(tmp_path, accumulate):
    """The next batch drawn at the end of each step and tracked (job['batch']): USR1 twice, bit-exact, no warning."""
    args = ("--accumulate", str(accumulate))
    run_preempted(_cmd(tmp_path / "ref.loss", *args), tmp_path / "ref").check()
    cut = run_preempted(_cmd(tmp_path / "cut.loss", *args), tmp_path / "cut", preempt_at=[3, 7]).check()
    assert cut.signalled_at == [3, 7]
    assert (tmp_path / "cut.loss").read_text() == (tmp_path / "ref.loss").read_text()
    assert_same_run(tmp_path / "ref", tmp_path / "cut")
    assert "drew from a random stream" not in cut.stderr


def test_draw_between_track_and_the_loop_is_warned(tmp_path):
    """A first batch drawn after job.track() and carried untracked: the resumed launch warns that it is not exact."""
    cut = run_preempted(_cmd(tmp_path / "cut.loss", "--untracked-batch"), tmp_path / "cut", preempt_at=[4]).check()
    assert cut.signalled_at == [4]
    assert cut.stderr.count("drew from a random stream between job.track() and the loop") == 1, cut.stderr[-3000:]


def test_signal_after_the_last_step_trains_no_step_too_many(tmp_path):
    """USR1 at the boundary after the last step: the relaunch trains nothing more and says the run is finished."""
    cut = run_preempted(_cmd(tmp_path / "cut.loss"), tmp_path / "cut", preempt_at=[10]).check()
    assert cut.signalled_at == [10]
    assert [line.split()[0] for line in (tmp_path / "cut.loss").read_text().splitlines()] == list(map(str, range(10)))
    assert "already finished at step 10" in cut.stderr


def test_simulate_preempts_the_last_step_of_a_script_that_names_its_directory(tmp_path):
    """simulate --at <last step> on a script whose code names its directory: redirected, preempted, PASS."""
    out = _simulate(tmp_path, "--dir", "sim", "--at", "2,10", "--",
                    *_cmd(tmp_path / "sim.loss", "--directory", str(tmp_path / "named-in-code")))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS: preempted 2 time(s)" in out.stdout
    assert not (tmp_path / "named-in-code").exists()


def test_simulate_names_unseeded_python_and_numpy_streams(tmp_path):
    """A script that never seeds Python's and NumPy's random streams: simulate says they were never seeded,
    not that tensors differ."""
    out = _simulate(tmp_path, "--dir", "sim", "--at", "4", "--", *_cmd(tmp_path / "sim.loss", "--unseeded"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "only the Python and NumPy random stream(s) differ" in out.stdout and "never seeded" in out.stdout
    assert "max abs diff" not in out.stdout


def test_session_without_with_records_how_each_launch_ended(tmp_path):
    """Module level, `job = Session().start()` and no close: each launch's end is in the events log
    (the requeue's exit, then the error), and the directory is free for the next launch."""
    run_preempted(_cmd(tmp_path / "cut.loss", "--fail-at", "6"), tmp_path / "cut", preempt_at=[3])
    exits = [(e["code"], e["reason"]) for e in read_events(str(tmp_path / "cut")) if e["event"] == "exit"]
    assert "requeue requested" in exits[0][1]
    assert exits[1] == (1, "RuntimeError: failing at step 6 as asked")
    again = run_preempted(_cmd(tmp_path / "cut.loss"), tmp_path / "cut").check()
    assert read_events(str(tmp_path / "cut"))[-1]["reason"] == "finished"
    assert "epoch" not in again.stderr  # a loop without epochs: log lines name only the step


def test_relaunch_by_hand_does_not_quote_equal_restart_counts(tmp_path):
    """Launched twice by hand (no scheduler, no jobwrap run): the resume line names no restart counts."""
    env = {"JOBWRAP_DIR": str(tmp_path / "run"), "JOBWRAP_NO_SLURM": "1"}
    first = _cmd(tmp_path / "a.loss", "--max-iters", "3")
    subprocess.run(first, env={**_env(), **env}, check=True, capture_output=True, timeout=300)
    second = subprocess.run(_cmd(tmp_path / "a.loss", "--max-iters", "5"), env={**_env(), **env},
                            capture_output=True, text=True, timeout=300, check=True)
    assert "resumed from step-000000000003.pt: step 3, run" in second.stderr
    assert "restart" not in second.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _seed_checkpoint(path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A checkpoint as the seed script writes it: epoch, model, optimizer, best_loss."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 2, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "best_loss": 0.25}, path)
    return model, optimizer


def test_first_launch_starts_from_the_users_checkpoint(tmp_path):
    """init_from: the first launch loads the user's torch.save dict by key, goes on after its epoch, records
    it in the events log; once jobwrap saved, its own checkpoint takes over."""
    saved, _ = _seed_checkpoint(tmp_path / "ckpt.pt")
    model = torch.nn.Linear(4, 2)
    with jobwrap.Session(tmp_path / "run", init_from=str(tmp_path / "ckpt.pt"), init_epoch="done") as job:
        job.track(model=model, optimizer=torch.optim.Adam(model.parameters()), best_loss=float("inf"))
        assert (job.epoch, job.step, job["best_loss"]) == (3, 0, 0.25)
        assert torch.equal(model.weight, saved.weight)
        job["best_loss"] = 0.125
        job.save()
    [record] = [e for e in read_events(str(tmp_path / "run")) if e["event"] == "init_from"]
    assert record["path"] == str(tmp_path / "ckpt.pt") and record["epoch"] == 3
    with jobwrap.Session(tmp_path / "run", init_from=str(tmp_path / "ckpt.pt"), init_epoch="done") as job:
        job.track(model=model, optimizer=torch.optim.Adam(model.parameters()), best_loss=float("inf"))
        assert job["best_loss"] == 0.125 and job.resumed_from is not None
    assert sum(e["event"] == "init_from" for e in read_events(str(tmp_path / "run"))) == 1


def test_init_from_with_other_keys_is_refused(tmp_path):
    """A tracked name the user's checkpoint has no entry for: a ConfigError naming the file's keys and the fix."""
    _seed_checkpoint(tmp_path / "ckpt.pt")
    net = torch.nn.Linear(4, 2)
    with jobwrap.Session(tmp_path / "run", init_from=str(tmp_path / "ckpt.pt"), init_epoch="done") as job:
        with pytest.raises(jobwrap.ConfigError, match=r"no entry 'net'.*'model'.*JOBWRAP_INIT_FROM"):
            job.track(net=net)
    with pytest.raises(jobwrap.ConfigError, match="is not a file"):
        jobwrap.Session(tmp_path / "other", init_from=str(tmp_path / "missing.pt")).start()


def test_nanogpt_style_checkpoint_starts_the_first_launch_then_the_store_takes_over(tmp_path):
    """JOBWRAP_INIT_FROM with nanoGPT's keys (model, optimizer, iter_num, config): the script goes on at iter_num,
    is preempted with USR1, and resumes from jobwrap's own checkpoint; the untracked entry is named."""
    torch.manual_seed(3)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": 4,
                "config": {"lr": 0.05}}, tmp_path / "ckpt.pt")
    cut = run_preempted(_cmd(tmp_path / "cut.loss"), tmp_path / "cut", preempt_at=[6],
                        env={"JOBWRAP_INIT_FROM": str(tmp_path / "ckpt.pt")}).check()
    assert cut.signalled_at == [6]
    assert [line.split()[0] for line in (tmp_path / "cut.loss").read_text().splitlines()] == list(
        map(str, range(4, 10)))
    events = read_events(str(tmp_path / "cut"))
    assert [(e["event"], e["step"]) for e in events if e["event"] in ("init_from", "start")] == [
        ("init_from", 4), ("start", 4), ("start", 6)]
    assert "entries ['config'] were not tracked and are ignored" in cut.stderr


def _imagenet_checkpoint(path: Path, finished_epoch: int) -> torch.nn.Module:
    """What pytorch/examples' ImageNet main.py saves after ``finished_epoch``: 'epoch': epoch + 1, the next to run."""
    torch.manual_seed(2)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    torch.save({"epoch": finished_epoch + 1, "arch": "resnet18", "state_dict": model.state_dict(),
                "best_acc1": torch.tensor(71.5), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, path)
    return model


def _imagenet_objects() -> dict:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"state_dict": model, "optimizer": optimizer,
            "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1),
            "best_acc1": torch.tensor(0.0)}


def test_init_from_with_an_epoch_is_refused_until_its_convention_is_said(tmp_path):
    """An ImageNet-style file (epoch + 1) without init_epoch: refused at start naming both readings, the ImageNet
    convention and the setting; the directory is let go, so the same launch with init_epoch='next' starts."""
    _imagenet_checkpoint(tmp_path / "checkpoint.pth.tar", finished_epoch=2)
    with pytest.raises(jobwrap.ConfigError, match=r"holds epoch=3.*epoch finished \(training goes on with epoch 4\)"
                                                  r".*next epoch to run.*ImageNet.*init_epoch='next'.*"
                                                  r"JOBWRAP_INIT_EPOCH"):
        jobwrap.Session(tmp_path / "run", init_from=str(tmp_path / "checkpoint.pth.tar")).start()
    env = {"JOBWRAP_INIT_FROM": str(tmp_path / "checkpoint.pth.tar"), "JOBWRAP_INIT_EPOCH": "next"}
    with jobwrap.Session(tmp_path / "run", environ=env) as job:
        assert job.epoch == 3
    with pytest.raises(jobwrap.ConfigError, match=r"init_epoch='last'.*'done'.*'next'"):
        jobwrap.Session(tmp_path / "other", init_epoch="last")


def test_imagenet_style_checkpoint_goes_on_with_the_epoch_it_names_as_next(tmp_path, caplog):
    """init_epoch='next' on ImageNet's dict (finished epoch 2, saved 'epoch': 3): epochs 3 and 4 run, none is
    skipped; the state dicts and best_acc1 come back; the log line and the event say which convention was used."""
    saved = _imagenet_checkpoint(tmp_path / "checkpoint.pth.tar", finished_epoch=2)
    objects = _imagenet_objects()
    caplog.set_level("INFO", logger="jobwrap")
    with jobwrap.Session(tmp_path / "run", init_from=str(tmp_path / "checkpoint.pth.tar"), init_epoch="next") as job:
        job.track(**objects)
        ran = list(job.epochs(5))
        assert torch.equal(objects["state_dict"].weight, saved.weight) and job["best_acc1"].item() == 71.5
    assert ran == [3, 4]
    assert objects["scheduler"].last_epoch == 1
    assert "at step 0, epoch 3 (epoch 3 is the next epoch to run (init_epoch='next'))" in caplog.text
    assert "entries ['arch'] were not tracked" in caplog.text
    [record] = [e for e in read_events(str(tmp_path / "run")) if e["event"] == "init_from"]
    assert (record["epoch"], record["epoch_is"]) == (3, "next")


def test_nanogpt_style_checkpoint_needs_no_epoch_convention(tmp_path, caplog):
    """nanoGPT's dict (iter_num, model, optimizer, model_args, best_val_loss, config) has no epoch: it starts at
    step iter_num without init_epoch, and the log line says iter_num was read as the steps done."""
    torch.manual_seed(4)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_args": {"n_layer": 12, "n_embd": 768}, "iter_num": 2000, "best_val_loss": 2.85,
                "config": {"learning_rate": 6e-4}}, tmp_path / "ckpt.pt")
    caplog.set_level("INFO", logger="jobwrap")
    fresh = torch.nn.Linear(8, 1)
    with jobwrap.Session(tmp_path / "run", init_from=str(tmp_path / "ckpt.pt"), save_at_end=False) as job:
        job.track(model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=6e-4), best_val_loss=1e9)
        assert (job.step, job.epoch, job["best_val_loss"]) == (2000, 0, 2.85)
        assert torch.equal(fresh.weight, model.weight)
    assert "from " + str(tmp_path / "ckpt.pt") + " at step 2000 (iter_num 2000 is the steps done)" in caplog.text


def test_the_scripts_own_start_epoch_begins_a_fresh_directory_and_jobwraps_checkpoint_wins_after(
        tmp_path, caplog, monkeypatch):
    """job.epochs(n, start=args.start_epoch): in a directory without a jobwrap checkpoint the script's own resume
    stands (epochs 1..); once jobwrap saved, its checkpoint wins and, with --resume on the command line, a warning
    names both epochs; without --resume (a loop counted from 1) the same is an info line, not a warning."""
    caplog.set_level("INFO", logger="jobwrap")
    monkeypatch.setattr(sys, "argv", ["main.py", "--resume", "checkpoint.pth.tar"])
    with jobwrap.Session(tmp_path / "run") as job:
        job.track(model=torch.nn.Linear(2, 2))
        assert list(job.epochs(2, start=1)) == [1]
    assert "beginning at epoch 1, the script's own" in caplog.text
    with jobwrap.Session(tmp_path / "run") as job:
        job.track(model=torch.nn.Linear(2, 2))
        assert list(job.epochs(4, start=1)) == [2, 3]
    [warned] = [r for r in caplog.records if r.levelname == "WARNING" and "job.epochs(start=1)" in r.getMessage()]
    assert ("job.epochs(start=1), the script's own resume (--resume checkpoint.pth.tar), is not where jobwrap goes "
            "on: step-") in warned.getMessage()
    assert "training goes on with epoch 2" in warned.getMessage()
    caplog.clear()
    monkeypatch.setattr(sys, "argv", ["main.py"])
    with jobwrap.Session(tmp_path / "run") as job:
        job.track(model=torch.nn.Linear(2, 2))
        assert list(job.epochs(5, start=1)) == [4]
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert "job.epochs(start=1) is the first epoch of a fresh run; resumed from step-" in caplog.text
    with jobwrap.Session(tmp_path / "other") as job, pytest.raises(jobwrap.ConfigError, match="start=-1"):
        list(job.epochs(2, start=-1))


def test_a_resume_flag_with_no_start_epoch_is_named(tmp_path):
    """A script launched with --resume FILE whose job.epochs() gets no start= in an empty directory: a warning
    names the flag, that training begins at epoch 0, and both ways out (issue 22's silent 48 steps instead of 16)."""
    (tmp_path / "own_resume.py").write_text(
        "import argparse\nimport jobwrap\nparser = argparse.ArgumentParser()\n"
        "parser.add_argument('--resume', default='')\nparser.parse_args()\n"
        "with jobwrap.Session() as job:\n    for epoch in job.epochs(1):\n        pass\n")
    out = subprocess.run([sys.executable, "own_resume.py", "--resume", "checkpoint.pth.tar"], cwd=tmp_path,
                         env={**_env(), "JOBWRAP_DIR": str(tmp_path / "run"), "JOBWRAP_NO_SLURM": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "asks for --resume checkpoint.pth.tar, but job.epochs() was given no start=" in out.stderr
    assert "start=args.start_epoch" in out.stderr and "init_from=checkpoint.pth.tar" in out.stderr
