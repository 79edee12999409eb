"""`jobwrap status`: the run's life from its events, pure summary first, then real preempted runs."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from signal import SIGINT

import torch

from jobwrap._format import human_duration
from jobwrap._report.history import render, summarize
from jobwrap._report.relaunch import PARTS as relaunch_parts
from jobwrap._report.relaunch import facts, relaunches
from jobwrap._storage import progress
from jobwrap._storage.events import read_events
from jobwrap._storage.store import CheckpointStore
from jobwrap.testing import run_preempted


def _start(t, step=0, restart=0, resumed=None, **extra):
    return {"event": "start", "time": t, "step": step, "restart": restart, "run_id": "r1",
            "resumed_from": resumed, **extra}


def _save(t, step, seconds=0.5, nbytes=1000, **extra):
    return {"event": "save", "time": t, "step": step, "seconds": seconds, "bytes": nbytes,
            "path": f"/ck/step-{step:012d}.pt", "reason": "periodic", **extra}


def _preempted(t, step, sig="SIGUSR1"):
    return [{"event": "signal", "time": t, "step": step, "signal": sig}, _save(t + 1, step, reason=f"signal {sig}"),
            {"event": "requeue", "time": t + 1, "step": step, "exit_code": 0, "progress": True},
            {"event": "exit", "time": t + 1, "step": step, "code": 0, "reason": "requeued"}]


def test_clean_preemptions_lose_nothing():
    """Two USR1 preemptions, each resumed from the step it stopped at: 3 launches, 0 steps lost."""
    events = ([_start(0)] + _preempted(10, 5) + [_start(20, 5, 1, "/ck/5", load_seconds=0.25)]
              + _preempted(30, 12) + [_start(40, 12, 2, "/ck/12", load_seconds=0.5), _save(50, 20, reason="end"),
                                      {"event": "exit", "time": 51, "step": 20, "code": 0, "reason": "finished"}])
    history = summarize(events)
    assert [launch.outcome for launch in history.launches] == ["requeued", "requeued", "finished"]
    assert history.preemptions == 2 and history.signal_counts == {"SIGUSR1": 2} and history.requeues == 2
    assert history.steps_lost == 0 and history.unrecorded_ends == 0
    assert history.saves == 3 and history.save_bytes == 3000
    assert history.loads == 2 and history.load_seconds == 0.75
    assert history.state == "finished" and history.wall_seconds == 51


def test_resuming_behind_an_earlier_launch_counts_lost_steps():
    """A launch that resumed from step 4 after one had reached step 9 (its checkpoint corrupt) lost 5 steps."""
    events = ([_start(0)] + [_save(5, 4)] + _preempted(10, 9) + [_start(20, 4, 1, "/ck/4")])
    history = summarize(events)
    assert history.launches[1].steps_lost == 5 and history.steps_lost == 5
    assert history.state == "running or killed"


def test_killed_launch_is_reported_not_guessed():
    """A launch with no exit event (SIGKILL) is counted apart: its steps after the last save are unknown."""
    events = [_start(0), _save(5, 8), _start(20, 8, 1, "/ck/8"),
              {"event": "exit", "time": 30, "step": 16, "code": 0, "reason": "finished"}]
    history = summarize(events)
    assert history.launches[0].outcome == "unknown" and history.unrecorded_ends == 1
    assert history.steps_lost == 0
    text = render(history, "/ck", None, now=100)
    assert "ended without a record" in text and "no exit recorded" in text


def test_background_saves_count_only_their_pause():
    """An async save costs the loop its staging pause, not its write time; a failed save is counted."""
    events = [_start(0), _save(5, 4, seconds=3.0, background=True, pause=0.1), _save(9, 8, seconds=2.0),
              {"event": "save-failed", "time": 10, "step": 12}]
    history = summarize(events)
    assert history.save_seconds == 5.0 and history.pause_seconds == 2.1 and history.failed_saves == 1
    assert "1 written in the background" in render(history, "/ck", None, now=20)


def test_events_of_other_ranks_are_ignored():
    """Only rank 0 tells the story (other ranks' events, if any, do not make extra launches)."""
    assert len(summarize([_start(0), _start(0, rank=1)]).launches) == 1


def test_empty_directory_says_so():
    """No events: a clear sentence, not an empty table."""
    assert "no run history" in render(summarize([]), "/ck", None, now=0)


def test_relaunch_without_jobwrap_run_or_new_fields_counts_from_what_the_log_has():
    """An older log (no Session start, no first step) and no jobwrap run: the exit ends at the exit event,
    the parts not recorded are None, and a creation time before the exit event makes no negative part."""
    events = ([_start(0)] + _preempted(10, 5) + [_start(20, 5, 1, "/ck/5", load_seconds=0.3, read_seconds=0.2,
                                                       process_started=10.995)])
    events[1]["delay"] = 0.5
    (relaunch,) = relaunches(events)
    assert relaunch.exit_seen == "exit event" and relaunch.total is None
    assert relaunch.boundary == 0.5 and relaunch.save == 1 and relaunch.exit == 0 and relaunch.relaunch == 0
    assert relaunch.interpreter is None and relaunch.first_batch is None and relaunch.first_step is None
    assert abs(relaunch.jobwrap_start - (20 - 0.2 - 11)) < 1e-9 and abs(relaunch.load - 0.2) < 1e-9
    assert "first new step not recorded" in facts([relaunch])[0][1]


def test_slow_save_logs_a_start_line_and_ticks_in_a_terminal(monkeypatch, caplog):
    """A save expected to be slow gets a log line; a tty also gets a line rewritten in place, cleared at the end."""
    monkeypatch.setattr(progress, "SLOW_SECONDS", 0.05)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    caplog.set_level(logging.INFO, logger="jobwrap")
    with progress.phase("saving step 7", expected_seconds=3.0, note="the last save took 3.00 s",
                        probe=lambda: 2_000_000, total_bytes=4_000_000, stream=stream):
        import time
        time.sleep(0.4)
    assert "saving step 7 (the last save took 3.00 s)..." in caplog.text
    assert "saving step 7:" in stream.getvalue() and "2.0 MB of ~4.0 MB" in stream.getvalue()
    assert stream.getvalue().endswith("\r\033[K")


def test_quick_save_in_a_batch_log_says_nothing_extra(caplog):
    """A save expected to be quick, and no terminal: no start line (the end line is the usual one)."""
    caplog.set_level(logging.INFO, logger="jobwrap")
    with progress.phase("saving step 7", expected_seconds=0.1, stream=io.StringIO()):
        pass
    assert caplog.text == ""


def test_human_duration():
    """Durations read naturally at every scale."""
    assert [human_duration(s) for s in (0.041, 12.34, 245, 7625)] == ["0.04 s", "12.3 s", "4 min 05 s", "2 h 07 min"]


def _train(tmp_path, epochs=2):
    from conftest import TRAIN
    return [sys.executable, str(TRAIN), "--epochs", str(epochs), "--samples", "256"]


def _status(directory, *args):
    return subprocess.run([sys.executable, "-m", "jobwrap", "status", str(directory), *args],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def test_status_of_a_preempted_run(tmp_path):
    """Real run preempted at steps 3 and 10: status shows 3 launches, both signals, 0 lost, the final checkpoint,
    and a goodput whose parts add up to the allocated time of each launch."""
    ck = tmp_path / "ck"
    run_preempted(_train(tmp_path), ck, preempt_at=[3, 10]).check()
    record = json.loads(_status(ck, "--json"))
    assert record["launches"] == 3 and record["preemptions"] == 2 and record["requeues"] == 2
    assert record["signals"] == {"SIGUSR1": 2} and record["steps_lost"] == 0
    assert record["state"] == "finished" and record["last_checkpoint"]["step"] == 16
    assert record["loads"] == 2 and all(r["load_seconds"] is not None for r in record["runs"][1:])
    times = record["time"]
    assert len(times["launches"]) == 3 and times["queue_wait"] is None and times["lost"] == 0
    for launch in times["launches"]:
        parts = sum(launch[part] for part in ("training", "saving", "loading", "startup", "lost", "exit"))
        assert abs(parts - launch["allocated"]) < 1e-3 and launch["training"] > 0 and launch["startup"] > 0
    assert [b["begin"] for b in times["launches"][1:]] == [a["end"] for a in times["launches"][:-1]]
    assert abs(times["allocated"] - sum(launch["allocated"] for launch in times["launches"])) < 1e-3
    assert abs(record["goodput"] - times["training"] / times["allocated"]) < 1e-3
    text = _status(ck)
    assert text.splitlines()[2].split()[0] == "goodput"
    assert "finished at step 16" in text and "USR1@3" in text and "USR1@10" in text
    assert "steps lost       0" in text and "step-000000000016.pt" in text


def test_status_counts_steps_redone_after_a_corrupt_checkpoint(tmp_path):
    """Newest checkpoint truncated: the next launch resumes from the previous one and status reports the loss."""
    ck = tmp_path / "ck"
    run_preempted(_train(tmp_path), ck, preempt_at=[4, 9], run_args=["--max-requeues", "1"])
    newest = CheckpointStore(str(ck)).committed()[0]
    assert newest.step == 9
    with open(newest.path, "r+b") as f:
        f.truncate(100)
    run_preempted(_train(tmp_path), ck).check()
    record = json.loads(_status(ck, "--json"))
    assert record["steps_lost"] == 5, read_events(str(ck))
    assert record["runs"][-1]["start_step"] == 4 and record["runs"][-1]["steps_lost"] == 5
    assert [r["outcome"] for r in record["runs"]] == ["requeued", "stopped", "finished"]


def test_status_splits_each_relaunch_from_the_signal_to_the_first_new_step(tmp_path):
    """Real run under jobwrap run, preempted at steps 3 and 10: each relaunch's parts are all recorded,
    non-negative, add up to the span from the signal to the first new step, and match the events they come from."""
    ck = tmp_path / "ck"
    run_preempted(_train(tmp_path), ck, preempt_at=[3, 10]).check()
    record = json.loads(_status(ck, "--json"))
    events = read_events(str(ck))
    signals = [e for e in events if e["event"] == "signal"]
    firsts = [e for e in events if e["event"] == "first-step"]
    starts = [e for e in events if e["event"] == "start" and e.get("resumed_from")]
    assert [r["launch"] for r in record["relaunches"]] == [2, 3] and len(firsts) == 2
    for relaunch, signal, first, start in zip(record["relaunches"], signals, firsts, starts):
        parts = [relaunch[part] for part in relaunch_parts]
        assert all(seconds is not None and seconds >= 0 for seconds in parts), relaunch
        assert relaunch["exit_seen"] == "process gone" and relaunch["signal"] == "SIGUSR1"
        measured = first["time"] - (signal["time"] - signal["delay"])  # the signal -> the first new step
        assert abs(relaunch["total"] - measured) < 1e-3 and abs(sum(parts) - relaunch["total"]) < 1e-3
        assert abs(relaunch["load"] - start["read_seconds"]) < 1e-3 and first["step"] == relaunch["step"] + 1
        assert start["session_started"] >= start["process_started"] and start["previous_exit"] <= start["time"]
    text = _status(ck)
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("  relaunch ")}
    assert "USR1@3 -> first new step in" in lines["2"] and "USR1@10 -> first new step in" in lines["3"]
    assert all(f" {part.replace('_', ' ')} " in lines["2"] for part in relaunch_parts)


def test_run_restart_counts_on_after_a_launch_by_hand_and_a_lost_start():
    """The table's restart number goes on across launches by hand (scheduler count 0 again) and keeps the
    scheduler's where it is ahead (a Slurm restart whose start was never recorded)."""
    events = [_start(0, restart=0), _start(10, restart=2), _start(20, restart=0), _start(30, restart=0)]
    history = summarize(events)
    assert [launch.run_restart for launch in history.launches] == [0, 2, 3, 4]
    assert [launch.restart for launch in history.launches] == [0, 2, 0, 0]


# The README's hand-written loop: a final job.save() after `while job.step < total`, which a finished
# run launched again reaches without a step; before it, an evaluation that draws from the RNG ("draw")
# or that records its result in an extra ("extra").
LOOP = """\
import sys, time, torch, jobwrap
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with jobwrap.Session(sys.argv[1]) as job:
    job.track(model=model, optimizer=optimizer, note="")
    while job.step < int(sys.argv[2]):
        optimizer.zero_grad()
        model(torch.randn(4, 2)).sum().backward()
        optimizer.step()
        time.sleep(float(sys.argv[3]))
        job.step_done()
    if sys.argv[4] == "draw":
        torch.randn(3)
    if sys.argv[4] == "extra":
        job["note"] = "evaluated"
    job.save()
"""


def _launch_by_hand(script, ck, steps=3, sleep=0.0, evaluation="none", **kwargs):
    return subprocess.run([sys.executable, str(script), str(ck), str(steps), str(sleep), evaluation],
                          capture_output=True, text=True, timeout=180, **kwargs)


def test_launches_by_hand_count_restarts_idle_time_and_evaluation_only_launches(tmp_path):
    """A run launched by hand 3 times (the 2nd and 3rd after it finished, 2 s apart): restarts 0, 1, 2; the gaps
    are idle, not start-up; the later launches trained no step, are not 'finished' and wrote no checkpoint."""
    script, ck = tmp_path / "loop.py", tmp_path / "ck"
    script.write_text(LOOP)
    for _ in range(3):
        done = _launch_by_hand(script, ck)
        assert done.returncode == 0, done.stderr
        time.sleep(2)
    committed = CheckpointStore(str(ck)).committed()
    assert [(c.step, c.serial) for c in committed] == [(3, 0)], "a relaunch of a finished run saved a copy"
    record = json.loads(_status(ck, "--json"))
    runs, times = record["runs"], record["time"]
    assert [r["run_restart"] for r in runs] == [0, 1, 2] and [r["restart"] for r in runs] == [0, 0, 0]
    assert [r["outcome"] for r in runs] == ["finished", "evaluated", "evaluated"] and record["evaluated"] == 2
    assert record["state"] == "finished" and [r["saves"] for r in runs] == [1, 0, 0]
    starts = [e for e in read_events(str(ck)) if e["event"] == "start"]
    gaps = [later["process_started"] - earlier["ended"] for earlier, later in zip(runs, starts[1:])]
    assert all(gap >= 2 for gap in gaps)
    assert abs(times["idle"] - sum(gaps)) < 1e-2
    for launch, start in zip(times["launches"], starts):
        assert abs(launch["begin"] - start["process_started"]) < 1e-3  # start-up from its own process, not the gap
    assert times["launches"][1]["training"] == 0 and times["launches"][1]["evaluation"] > 0
    text = _status(ck)
    assert "finished at step 3" in text and "2 launch(es) by hand, idle" in text
    assert "3 (1 fresh, 2 resumed, 2 without a training step)" in text
    assert text.count("no step trained (finished already, or evaluation only)") == 2


def test_finished_run_relaunched_saves_again_only_what_changed(tmp_path):
    """Relaunched after it finished, a script whose final job.save() follows a random draw (evaluation) writes
    no copy of the final checkpoint; one that changed an extra before it commits the change (a new serial)."""
    script, ck = tmp_path / "loop.py", tmp_path / "ck"
    script.write_text(LOOP)
    for evaluation in ("none", "draw"):
        done = _launch_by_hand(script, ck, evaluation=evaluation)
        assert done.returncode == 0, done.stderr
    assert [(c.step, c.serial) for c in CheckpointStore(str(ck)).committed()] == [(3, 0)]
    done = _launch_by_hand(script, ck, evaluation="extra")
    assert done.returncode == 0, done.stderr
    newest = CheckpointStore(str(ck)).committed()[0]
    assert (newest.step, newest.serial) == (3, 1)
    assert torch.load(newest.path, weights_only=True)["note"] == "evaluated"


def test_ctrl_c_launch_is_shown_interrupted_not_failed(tmp_path):
    """A launch ended by SIGINT (Ctrl-C) shows as interrupted, with its exit code, not as failed."""
    script, ck = tmp_path / "loop.py", tmp_path / "ck"
    script.write_text(LOOP)
    proc = subprocess.Popen([sys.executable, str(script), str(ck), "1000", "0.05", "none"], stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(e["event"] == "start" for e in read_events(str(ck))) if (ck / "events.jsonl").exists() else True:
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(SIGINT)
        assert proc.wait(timeout=60) in (130, -SIGINT)  # Python ends an uncaught KeyboardInterrupt by SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    record = json.loads(_status(ck, "--json"))
    assert record["state"] == "interrupted" and record["runs"][0]["outcome"] == "interrupted"
    text = _status(ck)
    assert "interrupted (Ctrl-C), exit 130" in text and "failed" not in text
