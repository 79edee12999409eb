"""The public surface is small and pinned."""
import subprocess
import sys

import jobwrap


def test_public_names_are_pinned():
    """__all__ lists exactly the supported names, and each resolves."""
    assert sorted(jobwrap.__all__) == sorted([
        "REQUEUE_EXIT_CODE", "CheckpointError", "Config", "ConfigError", "CorruptCheckpointError",
        "ForeignRunError", "JobwrapError", "Preempted", "SchedulerError", "Session", "StateMismatchError",
        "StorageError", "preemptible",
    ])
    for name in jobwrap.__all__:
        assert getattr(jobwrap, name) is not None


def test_tracker_helpers_are_pinned_and_import_no_tracker():
    """jobwrap.trackers offers one helper per tracker and the run's key; importing it loads no tracker package."""
    code = ("import sys, jobwrap.trackers as t; print(sorted(t.__all__)); "
            "print([m for m in ('wandb', 'mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["['mlflow_run', 'run_key', 'tensorboard_writer', 'wandb_init']", "[]"]


def test_cli_starts_without_importing_torch():
    """`jobwrap --help` and `jobwrap ls` stay fast: the CLI does not import torch."""
    code = "import sys, jobwrap.cli; jobwrap.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs_the_cli():
    """`python -m jobwrap --help` shows the subcommands with an example."""
    out = subprocess.run([sys.executable, "-m", "jobwrap", "--help"], capture_output=True, text=True, check=True)
    assert "run" in out.stdout and "ls" in out.stdout and "example:" in out.stdout
