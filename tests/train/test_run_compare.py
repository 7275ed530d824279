"""A compare row of a run still running: its numbers come from metrics.jsonl, the rest is unknown."""

from __future__ import annotations

from pathlib import Path

from peftcli.train.curves import RunMetrics
from peftcli.train.run_compare import compare_row


def test_an_unfinished_run_is_compared_from_its_metrics():
    records = [
        {"type": "eval", "step": 0, "eval_loss": 3.0},
        {"type": "generation", "step": 0, "gen_score": 0.25},
        *({"type": "train", "step": s, "loss": float(20 - s)} for s in range(1, 13)),
        {"type": "eval", "step": 12, "eval_loss": 2.0},
        {"type": "generation", "step": 12, "gen_score": 0.5},
    ]
    recipe = {"method": {"name": "dora"}, "objective": {"name": "sft"}}
    row = compare_row(RunMetrics(Path("runs/live"), records, {}, recipe))
    assert row["finished"] is False and (row["method"], row["objective"], row["steps"]) == ("dora", "sft", 12)
    assert row["final_train_loss"] == sum(range(8, 18)) / 10  # the last ten logged losses, as the summary takes
    assert (row["eval_loss_before"], row["eval_loss_after"]) == (3.0, 2.0)
    assert (row["accuracy_metric"], row["accuracy_before"], row["accuracy_after"]) == ("generation score", 0.25, 0.5)
    assert row["time_s"] is None and row["trainable_params"] is None and row["peak_host_memory_bytes"] is None
