"""The loss sparkline: block characters scaled from the lowest to the highest value, shown at the end of
`peft train` on a terminal only."""

from __future__ import annotations

import io
import json

from rich.console import Console

from peftcli.cli.progress import RichReporter
from peftcli.cli.sparkline import sparkline


def test_values_map_onto_the_eight_blocks_from_lowest_to_highest():
    assert sparkline([7, 6, 5, 4, 3, 2, 1, 0]) == "█▇▆▅▄▃▂▁"
    assert sparkline([2.0, 2.0, 2.0]) == "▄▄▄"  # a flat curve sits in the middle
    assert sparkline([3.0, float("nan"), 1.0]) == "█ ▁"  # a NaN loss is a gap
    assert sparkline([]) == ""


def test_a_long_curve_is_averaged_into_equal_buckets():
    line = sparkline([float(i) for i in range(400)], width=40)
    assert len(line) == 40 and line[0] == "▁" and line[-1] == "█"
    assert list(line) == sorted(line)  # a rising curve stays rising
    assert sparkline([0, 0, 9, 9], width=2) == "▁█"  # buckets are means: [0, 0] and [9, 9]


def _finish(tmp_path, terminal: bool) -> str:
    losses = [5.0, 4.0, 3.4, 3.0, 2.0]
    records = [{"type": "train", "step": i + 1, "loss": v} for i, v in enumerate(losses)]
    records.insert(0, {"type": "eval", "step": 0, "eval_loss": 6.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    reporter = RichReporter()
    out = io.StringIO()
    reporter.console = Console(file=out, force_terminal=terminal, width=200, color_system=None)
    reporter.live = reporter.console.is_terminal
    summary = {"steps": 5, "train_tokens": 100, "time_s": 1.0, "tokens_per_s": 100.0, "output_dir": str(tmp_path)}
    reporter.finish(summary)
    return out.getvalue()


def test_the_final_summary_shows_the_loss_sparkline_on_a_terminal_only(tmp_path):
    shown = _finish(tmp_path, terminal=True)
    assert "train loss █▆▄▃▁ 5.0000 -> 2.0000\n" in shown
    piped = _finish(tmp_path, terminal=False)
    assert "train loss" not in piped and piped.startswith("done: 5 steps")
