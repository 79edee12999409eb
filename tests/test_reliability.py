"""The reliability and security campaign, small: kills at random, disk faults, bad and hostile files,
signal storms, scheduler failures, and the store's policy under hypothesis.

Each test drives one check of the campaign package ``tests/reliability`` (run in full by
``scripts/reliability``, which writes docs/reliability.md) with quick sizes. Faults that need root
(tmpfs mounts, loop devices) are skipped with the reason where the machine does not allow them.
"""
from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import badfiles, disk, files, hostile, kills, policy, report, scheduler, signals
from reliability.internals import data_path
from reliability.results import QUICK, Campaign, Row, Skip
from reliability.training import capture_logs

REPO = Path(__file__).resolve().parent.parent


def _check(check, *args):
    """Run one campaign check; skip with its reason where the machine cannot make the fault real."""
    try:
        ok, observed = check(*args)
    except Skip as reason:
        pytest.skip(str(reason))
    assert ok, observed
    return observed


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A real run with committed checkpoints at steps 1 and 2, copied by each bad-file test."""
    return badfiles.base_run(str(tmp_path_factory.mktemp("base")))


# ---------------------------------------------------------------- kills at random

def test_random_kills_never_corrupt_or_lose_a_checkpoint(tmp_path):
    """40 training processes SIGKILLed at random moments and crash points: 0 corrupt loads, 0 commits lost."""
    figures = kills.kill_campaign(40, seed=11, workdir=str(tmp_path))
    assert figures.runs == 40
    assert figures.killed >= 38, figures.phases  # a trial ends only by its kill (or a hang, counted below)
    assert figures.failures == 0, figures.problems
    assert figures.corrupt_loads == 0 and figures.lost == 0 and figures.corrupt_committed == 0


# ---------------------------------------------------------------- disk faults

def test_enospc_during_save_keeps_previous_and_names_the_fix(tmp_path):
    """A save that does not fit a 3 MB tmpfs: StorageError naming the full disk; step 2 intact; no temporaries."""
    _check(disk.check_enospc_save, str(tmp_path))


def test_enospc_for_the_manifest_commits_nothing(tmp_path):
    """The data fits but the manifest does not: no half-committed step; the previous checkpoint intact."""
    _check(disk.check_enospc_manifest, str(tmp_path))


@pytest.mark.parametrize("mode", ["raise", "continue"])
def test_on_save_error_on_a_full_disk(tmp_path, mode):
    """on_save_error='raise' stops training with StorageError; 'continue' logs each failure and trains on."""
    _check(disk.check_on_save_error, str(tmp_path), mode)


def test_full_disk_at_first_start_is_a_storage_error(tmp_path):
    """A new run on a full disk fails with StorageError naming the full disk, not a bare OSError."""
    _check(disk.check_full_disk_first_start, str(tmp_path))


def test_filesystem_turning_read_only_mid_run(tmp_path):
    """A remount read-only during the run: the save raises StorageError (EROFS); the previous one survives."""
    _check(disk.check_readonly_during_run, str(tmp_path))


def test_read_only_directory_at_resume(tmp_path):
    """Resuming in a read-only directory stops at start with a StorageError that says read-only."""
    _check(disk.check_readonly_at_start, str(tmp_path))


def test_directory_removed_during_run(tmp_path):
    """The checkpoint directory deleted mid-run: StorageError (ENOENT) naming the missing directory."""
    _check(disk.check_directory_removed, str(tmp_path))


@pytest.mark.parametrize("nth_fsync", [1, 2, 3], ids=["data", "manifest", "directory"])
def test_eio_from_each_fsync_of_a_save(tmp_path, nth_fsync):
    """EIO at any fsync of a save: StorageError, nothing half-committed, and a retry commits a real checkpoint."""
    _check(disk.check_eio, str(tmp_path), nth_fsync)


def test_retention_that_cannot_delete_does_not_fail_the_save(tmp_path):
    """A committed save stands when retention's unlink fails; a warning says so."""
    _check(disk.check_retention_cannot_delete, str(tmp_path))


def test_block_device_write_errors(tmp_path):
    """ext4 on a loop device whose backing store runs out: fsync fails, StorageError, previous intact."""
    _check(disk.check_loop_device_write_error, str(tmp_path))


# ---------------------------------------------------------------- bad files

@pytest.mark.parametrize("name", list(badfiles.damage_cases(tempfile.gettempdir())))
def test_bad_file_is_reported_in_one_line_and_skipped(tmp_path, base_run, name):
    """Each kind of damaged or foreign file is detected, named in one warning line, and the right step used."""
    damage, expect, names = badfiles.damage_cases(str(tmp_path))[name]
    _check(badfiles.check_bad_file, base_run, str(tmp_path), damage, expect, names)


def test_bit_flips_and_truncations_at_random_offsets(tmp_path, base_run):
    """Bit flips and truncations anywhere in the newest checkpoint: always detected, step 1 used."""
    rng = random.Random(3)
    path = data_path(base_run, 2)
    size = os.path.getsize(path)
    for _ in range(8):
        _check(badfiles.check_bad_file, base_run, str(tmp_path), lambda d: files.flip_bit(data_path(d, 2), rng),
               1, "step-000000000002")
    for length in sorted(rng.sample(range(1, size), 4)):
        _check(badfiles.check_bad_file, base_run, str(tmp_path),
               lambda d, n=length: os.truncate(data_path(d, 2), n), 1, "step-000000000002")


def test_orphan_data_file_is_never_loaded(tmp_path, base_run):
    """A step file without a manifest is removed at start and never loaded."""
    _check(badfiles.check_orphan_junk, base_run, str(tmp_path))


# ---------------------------------------------------------------- hostile files

@pytest.mark.parametrize("kind", ["torch zip", "plain pickle", "torch zip, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_malicious_pickle_is_refused_on_the_resume_path(tmp_path, base_run, kind):
    """A pickle that would run a command, with a consistent manifest, is refused by Session resume."""
    _check(hostile.check_malicious_pickle, base_run, str(tmp_path), kind)


@pytest.mark.parametrize("where", ["own folder", "'../' path", "absolute path"])
def test_crafted_sharded_folder_runs_nothing_for_a_plain_model(tmp_path, where):
    """A .pt naming a DCP folder with a malicious .metadata (checksums consistent): nothing runs, a clear error."""
    _check(hostile.check_crafted_dcp_folder, str(tmp_path), where)


def test_every_torch_load_is_weights_only():
    """No torch.load in jobwrap/ without weights_only=True, and no pickle/safe_globals loophole."""
    found, bad = hostile.torch_load_calls(str(REPO))
    assert found >= 1
    assert bad == []


def test_traversal_in_ids_and_manifests_stays_inside(tmp_path):
    """Run ids with '..' or '/' are refused; hostile job ids and manifest fields write nothing outside."""
    _check(hostile.check_traversal, str(tmp_path))


def test_nothing_created_is_writable_by_others_under_umask_000(tmp_path):
    """Directories (new parents too), checkpoints, manifests, run.json, events, quarantined files, requeue file."""
    _check(hostile.check_modes, str(tmp_path))


def test_symlinked_events_log_is_not_followed(tmp_path):
    """events.jsonl planted as a symlink to a file outside: that file is left unchanged."""
    _check(hostile.check_symlinked_events, str(tmp_path))


# ---------------------------------------------------------------- signals

def test_signal_storm_gives_one_checkpoint_and_the_deciding_signals_exit(tmp_path):
    """~300 USR1/TERM in bursts while training and saving: one intact signal checkpoint, no hang."""
    rng = random.Random(5)
    for _ in range(3):
        _check(signals.storm_trial, str(tmp_path), rng)


def test_signal_during_resume(tmp_path):
    """USR1 while the checkpoint is read: stop right after restoring, no duplicate save."""
    _check(signals.check_signal_during_resume, str(tmp_path))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "background"])
def test_signal_during_a_save(tmp_path, async_save):
    """USR1 while a periodic save is written: the run stops at the next boundary with an intact checkpoint."""
    _check(signals.check_signal_during_save, str(tmp_path), async_save)


def test_sigterm_then_sigkill_after_grace(tmp_path):
    """TERM, then KILL after a random grace: the TERM save commits, or the previous checkpoint survives."""
    rng = random.Random(9)
    outcomes = [signals.grace_trial(str(tmp_path), rng, 0.03, numel=1 << 20) for _ in range(4)]
    assert [problem for _, problem in outcomes if problem] == []


# ---------------------------------------------------------------- scheduler

@pytest.fixture
def slurm_session(tmp_path):
    def run(environ, **settings):
        return scheduler.signalled_session(str(tmp_path / "ck"), {"SLURM_JOB_ID": "4242", **environ}, **settings)
    return run


def test_scontrol_missing_falls_back_to_exit_75(slurm_session):
    """No scontrol on PATH: a warning and the requeue exit code for the batch script's jobwrap run."""
    with scheduler.path_env(None):
        code, _, warnings = slurm_session({})
    assert code == 75 and any("scontrol not found" in w for w in warnings)


def test_scontrol_failing_falls_back_to_exit_75(slurm_session, tmp_path):
    """A fake scontrol that exits 1: its error is quoted in the warning, the process exits 75."""
    folder = tmp_path / "bin"
    folder.mkdir()
    scheduler.fake_scontrol(str(folder), code=1, message="scontrol: error: slurm_requeue: Invalid job id specified")
    with scheduler.path_env(str(folder)):
        code, _, warnings = slurm_session({})
    assert code == 75 and any("Invalid job id" in w for w in warnings)
    assert (folder / "calls").read_text().split() == ["requeue", "4242"]


def test_scontrol_failing_under_jobwrap_run_uses_the_requeue_file(slurm_session, tmp_path):
    """With a requeue file handed down, a failing scontrol still gets the job requeued (exit 0, file written)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    scheduler.fake_scontrol(str(folder), code=1, message="scontrol: error: oops")
    requeue = tmp_path / "requeue"
    with scheduler.path_env(str(folder)):
        code, _, _ = slurm_session({"JOBWRAP_REQUEUE_FILE": str(requeue)})
    assert code == 0 and requeue.read_text() == "requeue\n"
    assert oct(requeue.stat().st_mode & 0o777) == "0o600"


def test_no_requeue_job_is_reported(slurm_session, tmp_path):
    """A --no-requeue job: Slurm's 'presently disabled' is quoted, and the process exits 75."""
    folder = tmp_path / "bin"
    folder.mkdir()
    scheduler.fake_scontrol(str(folder), code=1,
                            message="scontrol: error: Requeue of JobId=4242 Requested operation is presently disabled")
    with scheduler.path_env(str(folder)):
        code, _, warnings = slurm_session({})
    assert code == 75 and any("presently disabled" in w for w in warnings)


def test_hanging_scontrol_times_out(tmp_path):
    """An scontrol that never answers is abandoned after the timeout with a reason."""
    from jobwrap._scheduler.schedulers import scontrol_requeue

    hanging = scheduler.fake_scontrol(str(tmp_path), code=0, sleep=30)
    error = scontrol_requeue("4242", timeout=1.0, scontrol=[hanging])
    assert error is not None and "did not answer" in error


def test_requeue_cap_in_the_session(slurm_session):
    """At the cap the session does not requeue: exit 1 and the reason."""
    code, reason, _ = slurm_session({"JOBWRAP_RESTART_COUNT": "3"}, max_requeues=3)
    assert code == 1 and "requeue cap is reached" in reason


def test_relaunch_cap_of_jobwrap_run(tmp_path):
    """jobwrap run relaunches a command that always asks for a requeue only max_requeues times."""
    _check(scheduler.check_supervisor_cap, str(tmp_path))


def test_no_progress_cap(tmp_path):
    """Runs that commit no newer step stop the requeue loop."""
    _check(scheduler.check_no_progress_cap, str(tmp_path))


# ---------------------------------------------------------------- the store's policy, property-based

_WORK = tempfile.mkdtemp(prefix="jobwrap-policy-")
atexit.register(shutil.rmtree, _WORK, True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.integers(min_value=1, max_value=60), st.sampled_from(policy.KINDS), max_size=6),
       st.integers(min_value=1, max_value=4))
def test_store_policy_over_random_listings_and_corruption(spec, keep_last):
    """Resume loads the newest good checkpoint and sets aside no good one; retention keeps the one just
    saved and the newest keep_last usable ones, and deletes nothing this run cannot use."""
    directory = tempfile.mkdtemp(dir=_WORK)
    with capture_logs():
        problems = policy.policy_case(directory, sorted(spec.items()), keep_last)
    assert problems == []


# ---------------------------------------------------------------- the report

def test_report_renders_without_paths(tmp_path):
    """docs/reliability.md's generator gives figures and a table, and no file system paths."""
    campaign = Campaign(1, QUICK, str(tmp_path))
    campaign.kills = kills.KillFigures(runs=3, killed=2, finished_first=1)
    campaign.add(Row("disk", "a fault", 1, "ok", f"saw {tmp_path}/x/step-000000000001.pt: fine"))
    text = report.render(campaign, seconds=1.0, quick=True)
    assert "Corrupt loads: 0" in text and "Committed checkpoints lost: 0" in text
    assert "| disk | a fault | 1 |" in text and str(tmp_path) not in text
    assert "step-000000000001.pt" in text
