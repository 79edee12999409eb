"""Goodput: where a run's allocated time went, from recorded event lists and sacct output (pure)."""
from __future__ import annotations

import pytest

from jobwrap._report.goodput import PARTS, Allocation, breakdown, facts, parse_sacct
from jobwrap._report.history import summarize


def _start(t, step=0, restart=0, resumed=None, process=None, scheduler="local", load=None, job="7"):
    event = {"event": "start", "time": t, "step": step, "restart": restart, "run_id": "r1", "job_id": job,
             "resumed_from": resumed, "scheduler": scheduler, "process_started": process}
    if load is not None:
        event["load_seconds"] = load
    return event


def _save(t, step, seconds=1.0, **extra):
    return {"event": "save", "time": t, "step": step, "seconds": seconds, "bytes": 10, "reason": "periodic", **extra}


def _preempted(t, step, save=2.0):
    return [{"event": "signal", "time": t, "step": step, "signal": "SIGUSR1", "delay": 0.5},
            _save(t + save, step, seconds=save, reason="signal SIGUSR1"),
            {"event": "requeue", "time": t + save, "step": step, "progress": True},
            {"event": "exit", "time": t + save, "step": step, "code": 0, "reason": "requeued"}]


def _adds_up(goodput):
    for launch in goodput.launches:
        assert sum(getattr(launch, part) for part in PARTS) == pytest.approx(launch.allocated)
    assert goodput.fraction == pytest.approx(goodput.total("training") / goodput.allocated)


def test_local_relaunch_counts_the_gap_as_start_up():
    """Relaunched in place: each launch starts where the previous ended; start-up, load, pauses and training add up."""
    events = ([_start(10, process=0)] + [_save(50, 40, seconds=1.0)] + _preempted(100, 90)
              + [_start(112, 90, 1, "/ck/90", process=105, load=2.0),
                 _save(212, 190, seconds=0.5, background=True, pause=0.25),
                 {"event": "exit", "time": 300, "step": 278, "code": 0, "reason": "finished"}])
    goodput = breakdown(summarize(events))
    first, second = goodput.launches
    assert (first.begin, first.end, first.startup, first.saving) == (0, 102, 10, 3.0)
    assert first.training == pytest.approx(89.0) and first.lost == 0
    assert second.begin == 102 and second.startup == pytest.approx(8.0) and second.loading == 2.0
    assert second.saving == 0.25 and second.background_write == 0.5
    assert second.training == pytest.approx(300 - 112 - 0.25)
    assert goodput.allocated == 300 and goodput.queue_wait is None
    _adds_up(goodput)
    top, more = facts(goodput)
    assert top[0][0] == "goodput" and f"{goodput.fraction:.1%}" in top[0][1]
    assert "written in the background" in more[0][1]


def test_killed_launch_loses_its_steps_after_the_last_checkpoint_and_its_unrecorded_end():
    """SIGKILLed at an unknown step after saving step 40: the redone steps at its step time, and the time
    from its last event to the relaunch, are lost; nothing of it is counted as training twice."""
    events = ([_start(0, process=0), _save(41, 40, seconds=1.0), {"event": "signal", "time": 60, "step": 60,
                                                                   "signal": "SIGUSR1"}]
              + [_start(90, 40, 1, "/ck/40", process=80, load=1.0),
                 {"event": "exit", "time": 150, "step": 100, "code": 0, "reason": "finished"}])
    goodput = breakdown(summarize(events))
    killed = goodput.launches[0]
    assert killed.steps == 60 and killed.steps_lost == 20
    assert killed.step_seconds == pytest.approx(59 / 60)
    assert killed.lost == pytest.approx(20 * 59 / 60 + (80 - 60))
    assert killed.training == pytest.approx(40 * 59 / 60)
    assert killed.end == 80 and goodput.launches[1].begin == 80
    _adds_up(goodput)


def test_slurm_allocations_give_start_up_exit_and_queue_wait():
    """With sacct: the allocation's start to jobwrap's start is start-up, after the exit event is exit,
    and the time between two runs is queue wait, not allocated time."""
    events = ([_start(110, process=105, scheduler="slurm")] + _preempted(200, 90)
              + [_start(520, 90, 1, "/ck/90", process=515, scheduler="slurm", load=3.0),
                 {"event": "exit", "time": 700, "step": 270, "code": 0, "reason": "finished"}])
    runs = {"7": [Allocation(100, 205, "REQUEUED"), Allocation(500, 710, "COMPLETED")]}
    goodput = breakdown(summarize(events), runs)
    first, second = goodput.launches
    assert (first.begin, first.end, first.startup, first.exit) == (100, 205, 10, 3)
    assert (second.begin, second.end, second.exit) == (500, 710, 10)
    assert second.startup == pytest.approx(17.0) and second.loading == 3.0
    assert goodput.queue_wait == 295 and goodput.allocated == 105 + 210
    assert "sacct" in goodput.accounting
    _adds_up(goodput)


def test_slurm_without_accounting_leaves_the_gap_out():
    """No sacct: a Slurm run's launches span process start to last event; the wait between them is not allocated."""
    events = ([_start(110, process=105, scheduler="slurm")] + _preempted(200, 90)
              + [_start(520, 90, 1, "/ck/90", process=515, scheduler="slurm")])
    goodput = breakdown(summarize(events))
    assert [(t.begin, t.end) for t in goodput.launches] == [(105, 202), (515, 520)]
    assert goodput.queue_wait is None and "sacct unavailable" in goodput.accounting
    _adds_up(goodput)


def test_an_old_log_without_process_times_still_adds_up():
    """Events written before the start-up fields: start-up is unknown (0), the parts still add up."""
    events = [{"event": "start", "time": 5, "step": 0, "restart": 0}, _save(20, 10),
              {"event": "exit", "time": 30, "step": 20, "code": 0, "reason": "finished"}]
    goodput = breakdown(summarize(events))
    assert goodput.launches[0].startup == 0 and goodput.allocated == 25
    _adds_up(goodput)


def test_no_events_no_goodput():
    """Nothing ran: no fraction, and status shows no goodput line."""
    goodput = breakdown(summarize([]))
    assert goodput.fraction is None and facts(goodput) == ([], [])


def test_parse_sacct_reads_epoch_and_iso_times_oldest_first():
    """One record per run; a run that never started is left out; a running one has no end."""
    text = ("42|COMPLETED|1700000500|1700000700\n42|REQUEUED|1700000000|1700000100\n"
            "42|PENDING|Unknown|Unknown\n42|RUNNING|2023-11-20T10:00:00|Unknown\n")
    runs = parse_sacct(text)
    assert [r.state for r in runs] == ["REQUEUED", "COMPLETED", "RUNNING"]
    assert runs[0] == Allocation(1700000000.0, 1700000100.0, "REQUEUED") and runs[2].end is None


def test_parse_sacct_leaves_out_a_pending_run_with_an_expected_start():
    """sacct 22.05 shows a just-submitted job PENDING with the start it expects: not an allocation yet."""
    assert parse_sacct("4|PENDING|1796096493|Unknown\n") == []


def test_timeline_segments_follow_the_parts_in_order():
    """The plot's bar for a launch: start-up, loading, training (with its pauses), lost, exit, end to end."""
    from jobwrap._report.timeline import segments

    events = [_start(10, process=0), _save(41, 40), {"event": "signal", "time": 60, "step": 60, "signal": "SIGUSR1"},
              _start(90, 40, 1, "/ck/40", process=80, load=1.0)]
    bar = segments(breakdown(summarize(events)).launches[0])
    assert [part for part, _, _ in bar] == ["startup", "training", "lost"]
    assert bar[0][1] == 0 and bar[-1][1] + bar[-1][2] == pytest.approx(80)
    assert all(a[1] + a[2] == pytest.approx(b[1]) for a, b in zip(bar, bar[1:]))


def test_status_plot_writes_a_png_or_names_the_extra(tmp_path):
    """--plot draws a PNG with matplotlib; without it, exit 2 and the message names pip install 'jobwrap[plot]'."""
    import json
    import subprocess
    import sys

    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        _start(10, process=0), _save(41, 40), {"event": "exit", "time": 60, "step": 60, "code": 0,
                                               "reason": "finished"}]))
    png = tmp_path / "t.png"
    status = [sys.executable, "-c", "import sys; {block}from jobwrap.cli import main; sys.exit(main(sys.argv[1:]))",
              "status", str(tmp_path), "--plot", str(png)]
    without = subprocess.run([status[0], status[1], status[2].format(block="sys.modules['matplotlib'] = None; "),
                              *status[3:]], capture_output=True, text=True, timeout=120)
    assert without.returncode == 2 and "pip install 'jobwrap[plot]'" in without.stderr
    pytest.importorskip("matplotlib")
    drawn = subprocess.run([status[0], status[1], status[2].format(block=""), *status[3:]],
                           capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
