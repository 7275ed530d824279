"""Plain progress lines (a pipe, a CI log): elapsed time and an ETA from the rate of the steps seen so far."""

from __future__ import annotations

from peftcli.cli.progress import StepClock, _clock, _processes


def test_eta_counts_from_the_first_logged_step():
    times = iter([100.0, 110.0, 130.0])  # the first step is logged at 100 s; then 10 s per step
    clock = StepClock(now=lambda: next(times))
    assert clock.tick(5, 20) == ""  # a resumed run's first line: no rate yet
    assert clock.tick(6, 20) == "  elapsed 0:10  eta 2:20"  # 14 steps left at 10 s
    assert clock.tick(8, 20) == "  elapsed 0:30  eta 2:00"


def test_clock_format():
    assert _clock(59.4) == "0:59"
    assert _clock(3600 + 61) == "1:01:01"


def test_one_process_is_not_called_ddp():
    assert _processes({"world_size": 1, "engine": "single process"}) == "1 process"
    assert _processes({"world_size": 1, "engine": "DeepSpeed ZeRO-3"}) == "1 process (DeepSpeed ZeRO-3)"
    assert _processes({"world_size": 2, "engine": "DDP"}) == "2 processes (DDP)"


def test_a_long_line_stays_one_line_in_a_pipe(capsys):
    from peftcli.cli.progress import RichReporter

    reporter = RichReporter()  # capsys: stderr is not a terminal, as in a CI log
    text = "tokenizing " + "/data/some/long/path/" * 8 + "train.jsonl: 1,219 examples"
    assert len(text) > 120
    reporter.message(text)
    assert capsys.readouterr().err == text + "\n"
