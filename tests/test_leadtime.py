"""Lead-time advice: from a run's measured step and signal saves, the --signal lead time and whether GraceTime suffices."""
from __future__ import annotations

import json
import signal

from jobwrap._report.goodput import breakdown
from jobwrap._report.history import summarize
from jobwrap._report.leadtime import MIN_LEAD, advise, check
from jobwrap._report.preflight import Settings, check_measured_lead


def _events():
    """One launch of 100 steps in 200 s (2 s a step), a periodic save of 1 s, a USR1 whose save took 8 s."""
    return [{"event": "start", "time": 0, "step": 0, "process_started": 0},
            {"event": "save", "time": 101, "step": 50, "seconds": 1.0, "reason": "periodic"},
            {"event": "signal", "time": 201, "step": 100, "signal": "SIGUSR1", "delay": 1.5},
            {"event": "save", "time": 209, "step": 100, "seconds": 8.0, "reason": "signal SIGUSR1"},
            {"event": "exit", "time": 209, "step": 100, "code": 0, "reason": "requeued"}]


def _advice(events):
    history = summarize(events)
    return advise(history, [launch.step_seconds for launch in breakdown(history).launches])


def test_advice_is_step_plus_twice_the_signals_save_plus_margin():
    """Longest step 2 s + 2 x 8 s signal save = 18 s needed; the lead asked for is at least 120 s."""
    advice = _advice(_events())
    assert advice.step == 2.0 and advice.save == 8.0 and advice.save_source == "signal"
    assert advice.needed == 18.0 and advice.lead == MIN_LEAD
    assert "--signal=B:USR1@120" in advice.text() and "at least 18 s" in advice.text()


def test_slow_saves_raise_the_lead_and_fail_a_short_grace_time():
    """A 100 s signal save needs 262 s of lead; a GraceTime of 60 s fails, 300 s passes; a lead set too short fails."""
    events = _events()
    events[3] = {**events[3], "seconds": 100.0}
    advice = _advice(events)
    assert advice.lead == 2 + 200 + 60
    assert check(advice, lead=None, grace=60)[0] == "fail" and "GraceTime 60 s is too short" in check(
        advice, lead=None, grace=60)[1]
    assert check(advice, lead=None, grace=300) == ("pass", advice.text() + "; GraceTime 300 s is enough")
    assert check(advice, lead=150, grace=None)[0] == "fail" and check(advice, lead=230, grace=None)[0] == "warn"


def test_no_save_no_advice_and_periodic_saves_stand_in():
    """Before any save: no advice; with only periodic saves, their time is the estimate, said so."""
    assert _advice(_events()[:1]) is None
    advice = _advice(_events()[:2])
    assert advice.save_source == "periodic" and "no signal's save yet" in advice.text()


def test_doctor_reports_the_measured_lead_of_the_run_in_its_directory(tmp_path):
    """jobwrap doctor: a row from the directory's events when a run has saved there, none for a new directory."""
    settings = Settings(directory=str(tmp_path), signal=signal.SIGUSR1, requeue_signals=(signal.SIGUSR1,),
                        exit_signals=(signal.SIGTERM,), lead_seconds=10.0, state_bytes=None)
    assert check_measured_lead(settings, {}) == []
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _events()))
    [row] = check_measured_lead(settings, {})
    assert row.check == "lead time (measured)" and row.status == "fail" and "10 s, is shorter" in row.detail


def test_a_directory_that_is_not_one_gives_no_row(tmp_path):
    """A --dir under a file (the directory check fails it): no lead-time row, no crash."""
    from jobwrap._report.leadtime import check_directory

    (tmp_path / "file").write_text("")
    assert check_directory(str(tmp_path / "file" / "ckpt"), lead=None, grace=None) is None
