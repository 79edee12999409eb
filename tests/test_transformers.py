"""The Hugging Face Trainer under jobwrap (jobwrap.transformers): a tiny GPT-2 preempted with real signals
under `jobwrap run`, compared bit for bit with its uninterrupted run (tests/scripts/hf_trainer_job.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed "
                                                          "(pip install -e '.[transformers]')")

import torch  # noqa: E402

from jobwrap._storage.events import read_events  # noqa: E402
from jobwrap._storage.store import CheckpointStore  # noqa: E402
from jobwrap.errors import ConfigError  # noqa: E402
from jobwrap.testing import assert_same_state, final_state, run_preempted  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "scripts" / "hf_trainer_job.py"
# No network (nothing is downloaded anyway), one intra-op thread in every run alike.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}


def _cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--out", str(tmp / f"{name}-out"), "--log", str(tmp / f"{name}.log"),
            "--final", str(tmp / f"{name}.pt"), *extra]


def _run(tmp: Path, name: str, *extra: str, **kwargs) -> object:
    return run_preempted(_cmd(tmp, name, *extra), tmp / name, env=OFFLINE, **kwargs)


def _assert_same_training(tmp: Path, first: str, second: str) -> None:
    """Every logged step (loss, grad norm, learning rate, eval loss) and the final model, optimizer and
    scheduler states, bit for bit."""
    assert (tmp / f"{second}.log").read_text() == (tmp / f"{first}.log").read_text()
    assert_same_state(torch.load(tmp / f"{first}.pt", weights_only=True),
                      torch.load(tmp / f"{second}.pt", weights_only=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(*args) -> the directory of an uninterrupted run with those arguments (run once)."""
    done: dict[tuple[str, ...], Path] = {}

    def run(*extra: str) -> Path:
        if extra not in done:
            tmp = tmp_path_factory.mktemp("hf-ref")
            _run(tmp, "ref", *extra).check()
            done[extra] = tmp
        return done[extra]
    return run


def _same_as_reference(ref: Path, tmp: Path, name: str) -> None:
    for suffix in (".log", ".pt"):
        (tmp / f"ref{suffix}").write_bytes((ref / f"ref{suffix}").read_bytes())
    _assert_same_training(tmp, "ref", name)


def test_trainer_preempted_mid_epoch_and_at_an_epoch_end_is_bit_exact(tmp_path, reference):
    """USR1 mid-epoch (step 3) and after the epoch's last step (8): two requeues, and every step's loss,
    grad norm and learning rate, and the final weights, optimizer and scheduler equal the plain run's."""
    ref = reference()
    cut = _run(tmp_path, "cut", preempt_at=[3, 8]).check()
    assert cut.signalled_at == [3, 8]
    events = read_events(str(tmp_path / "cut"))
    assert [e["step"] for e in events if e["event"] == "signal"] == [3, 8]
    assert [e["step"] for e in events if e["event"] == "requeue"] == [3, 8]
    _same_as_reference(ref, tmp_path, "cut")
    # jobwrap's checkpoint holds the Trainer's whole folder, in the Trainer's layout.
    files = final_state(tmp_path / "cut")["trainer"]["files"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(files)
    assert json.loads(bytes(files["trainer_state.json"].tolist()))["global_step"] == 16


def test_accumulation_evaluation_and_trainer_saves_preempted_is_bit_exact(tmp_path, reference):
    """Gradient accumulation 2, evaluation every 3 steps, the Trainer's own save every 2: USR1 after an
    evaluation (3), at a Trainer save that ends an epoch (4) and at one mid-epoch (6, 8 steps in all);
    the Trainer's saves are committed through jobwrap too, and the run is bit-exact."""
    args = ("--accumulate", "2", "--eval-steps", "3", "--save-steps", "2")
    ref = reference(*args)
    cut = _run(tmp_path, "cut", *args, preempt_at=[3, 4, 6]).check()
    assert cut.signalled_at == [3, 4, 6]
    _same_as_reference(ref, tmp_path, "cut")
    log = [json.loads(line) for line in (tmp_path / "cut.log").read_text().splitlines()]
    assert [entry["step"] for entry in log if "eval_loss" in entry] == [3, 6, 8]  # and at the end
    events = read_events(str(tmp_path / "cut"))
    committed = [(e["step"], e["reason"]) for e in events if e["event"] == "save"]
    assert ("trainer save", 2) in [(r, s) for s, r in committed]
    assert ("signal SIGUSR1", 6) in [(r, s) for s, r in committed]


def test_killed_outright_resumes_from_the_last_trainer_save_not_from_a_broken_folder(tmp_path, reference):
    """SIGKILL at step 5 (no signal to trap): the relaunch resumes from the Trainer's save of step 4 as jobwrap
    committed it, ignoring a damaged checkpoint-4 and a half-written checkpoint-5 in the output folder."""
    args = ("--save-steps", "4")
    ref = reference(*args)
    control = tmp_path / "control"
    control.mkdir()
    env = {**os.environ, **OFFLINE, "JOBWRAP_DIR": str(tmp_path / "cut"), "JOBWRAP_TEST_HOLD_AT": "5",
           "JOBWRAP_TEST_CONTROL": str(control)}
    proc = subprocess.Popen(_cmd(tmp_path, "cut", *args), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(control.glob("held-5-r*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 5"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [c.step for c in CheckpointStore(str(tmp_path / "cut")).committed()] == [4]
    # Step 5 was trained (and logged) by the killed launch and is trained again from step 4's checkpoint.
    log = tmp_path / "cut.log"
    log.write_text("".join(line for line in log.read_text().splitlines(keepends=True)
                           if json.loads(line)["step"] <= 4))
    out = tmp_path / "cut-out"
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"torn")
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "trainer_state.json").write_text("{")
    _run(tmp_path, "cut", *args).check()
    _same_as_reference(ref, tmp_path, "cut")


def test_term_after_usr1_cancels_and_a_later_launch_resumes_exactly(tmp_path, reference):
    """USR1 then TERM at step 5 (a time-limit warning, then scancel): committed, exit 143, no requeue; a new
    launch resumes from step 5 and the whole run is still bit-exact."""
    ref = reference()
    cancelled = _run(tmp_path, "cut", preempt_at=[5], signal_=[signal.SIGUSR1, signal.SIGTERM])
    assert cancelled.returncode == 143, cancelled.stderr[-2000:]
    events = read_events(str(tmp_path / "cut"))
    assert not [e for e in events if e["event"] == "requeue"]
    assert [c.step for c in CheckpointStore(str(tmp_path / "cut")).committed()] == [5]
    _run(tmp_path, "cut").check()
    _same_as_reference(ref, tmp_path, "cut")


@pytest.mark.parametrize("setting,value", [("save_only_model", True), ("ignore_data_skip", True)])
def test_settings_that_cannot_resume_exactly_are_refused_at_attach(tmp_path, setting, value):
    """save_only_model (no optimizer or RNG in the folder) and ignore_data_skip (the epoch restarts) are
    refused when the Trainer is attached, with the setting to change named."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    import jobwrap
    import jobwrap.transformers

    model = GPT2LMHeadModel(GPT2Config(vocab_size=8, n_positions=4, n_embd=8, n_layer=1, n_head=1))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                             **{setting: value})
    with jobwrap.Session(tmp_path / "ckpt", environ={}) as job:
        trainer = Trainer(model=model, args=args, train_dataset=[])
        with pytest.raises(ConfigError, match=f"{setting}=False"):
            jobwrap.transformers.attach(trainer, job)


def test_example_under_jobwrap_simulate_is_bit_exact(tmp_path):
    """examples/hf_trainer.py unchanged under `jobwrap simulate --at 5,12`: every check passes, including the
    final committed checkpoint (the Trainer's folder) equal bit for bit to the uninterrupted run's."""
    example = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
    result = subprocess.run([sys.executable, "-m", "jobwrap", "simulate", "--dir", str(tmp_path / "sim"),
                             "--at", "5,12", "--", sys.executable, str(example)],
                            cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "same final checkpoint" in result.stdout
