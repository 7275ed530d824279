"""Runs side by side (`peft runs compare`): one row of numbers per run, from its summary.json, or from its
metrics.jsonl while it is unfinished (then time, parameters and memory are unknown)."""

from __future__ import annotations

from peftcli.train.curves import RunMetrics

# The share a run's evaluation reports, first found wins: classification accuracy, pairs ranked right (dpo,
# orpo, simpo), answers matching the pattern (sft with training.eval_generation).
ACCURACIES = (
    ("eval_accuracy", "accuracy"),
    ("eval_rewards/accuracy", "reward accuracy"),
    ("gen_score", "generation score"),
)


def compare_row(run: RunMetrics) -> dict:
    """The numbers `peft runs compare` shows for one run (None where the run has no such number)."""
    summary, records = run.summary, run.records
    losses = [r["loss"] for r in records if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
    evals = [r for r in records if r.get("type") in ("eval", "generation")]
    row = {
        "run": run.name,
        "path": str(run.path),
        "finished": bool(summary),
        "method": run.method,
        "objective": run.objective,
        "steps": summary.get("steps", max((r["step"] for r in records), default=0)),
        "trainable_params": summary.get("trainable_params"),
        # the summary's own figure when there is one: the mean of the last ten logged train losses
        "final_train_loss": summary.get("final_train_loss", _mean(losses[-10:])),
        "eval_loss_before": _before(evals, "eval_loss"),
        "eval_loss_after": _after(evals, "eval_loss"),
        "accuracy_metric": None,
        "accuracy_before": None,
        "accuracy_after": None,
        "time_s": summary.get("time_s"),
        "peak_device_memory_bytes": summary.get("peak_device_memory_bytes"),
        "peak_host_memory_bytes": summary.get("peak_host_memory_bytes"),
    }
    for key, name in ACCURACIES:
        if any(isinstance(r.get(key), (int, float)) for r in evals):
            row.update(accuracy_metric=name, accuracy_before=_before(evals, key), accuracy_after=_after(evals, key))
            break
    return row


def _before(evals: list[dict], key: str) -> float | None:
    """The value measured before training (at step 0), when the run measured one."""
    found = [r[key] for r in evals if r["step"] == 0 and isinstance(r.get(key), (int, float))]
    return found[0] if found else None


def _after(evals: list[dict], key: str) -> float | None:
    """The last value measured."""
    found = [r[key] for r in evals if isinstance(r.get(key), (int, float))]
    return found[-1] if found else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
