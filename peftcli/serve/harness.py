"""`peft eval --lm-eval TASKS`: the lm-eval harness run on a loaded run (an optional extra, imported only here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peftcli.errors import PeftCliError
from peftcli.serve.load import LoadedModel

INSTALL = "pip install 'peftcli[lm-eval]'"
BACKENDS = {"causal_lm": "causal", "seq2seq": "seq2seq"}


def check_installed() -> None:
    """Refuse before anything loads when the harness is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise PeftCliError(f"--lm-eval: the lm-eval harness is not installed; {INSTALL}")


def task_manager(include: Path | None, tasks: list[str]):
    """lm-eval's task index with `include` (a directory of task YAML files) added; unknown names refused."""
    from lm_eval.tasks import TaskManager

    if include is not None and not include.is_dir():
        raise PeftCliError(f"--lm-eval-include: {include} is not a directory of task YAML files")
    manager = TaskManager(include_path=str(include) if include is not None else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" or in {include}" if include is not None else " (add your own with --lm-eval-include DIR)"
        raise PeftCliError(f"--lm-eval: no task named {', '.join(unknown)} in lm-eval{where}")
    return manager


def run_harness(loaded: LoadedModel, tasks: list[str], manager, limit: int | None, batch_size: int) -> dict:
    """lm_eval.simple_evaluate on our model object and tokenizer (no second load, the adapter stays on)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if loaded.task not in BACKENDS:
        raise PeftCliError(f"--lm-eval: the harness scores language models; {loaded.source} is a {loaded.task} model")
    device = next(loaded.model.parameters()).device
    model = HFLM(
        pretrained=loaded.model,
        tokenizer=loaded.tokenizer,
        backend=BACKENDS[loaded.task],
        batch_size=batch_size,
        device=str(device),
    )
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    if results is None:  # only a non-zero rank of a distributed run gets None
        raise RuntimeError("lm-eval returned no results")
    return results


def results_table(results: dict) -> str:
    """One line per task and metric: value, standard error and how many samples were scored."""
    rows = [("task", "metric", "value", "stderr", "samples")]
    counts = results.get("n-samples") or {}
    for task, metrics in results.get("results", {}).items():
        samples = (counts.get(task) or {}).get("effective", "")
        for key, value in metrics.items():
            name, _, filtered = key.partition(",")
            if key in ("alias", "sample_len") or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{filtered}" if filtered else f"{name}_stderr")
            shown = f"{name} ({filtered})" if filtered and filtered != "none" else name
            error = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            rows.append((task, shown, f"{value:.4f}", error, str(samples)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def results_record(results: dict) -> dict:
    """The parts of lm-eval's results worth keeping as JSON: scores, sample counts, task versions and configs."""
    keep = ("results", "groups", "n-samples", "versions", "n-shot", "higher_is_better", "configs")
    return {key: results[key] for key in keep if key in results}
