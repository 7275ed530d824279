"""`peft eval RUN`: the loop's validation metrics on a finished run, or the lm-eval harness with --lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

import typer

RUN_HELP = "A finished run directory (peft train) or a merged model directory (peft merge)."
MERGED_HELP = "Use this merged model directory (peft merge of RUN) instead of base + adapter."


def evaluate(
    run: Path = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    data: str | None = typer.Option(None, "--data", help="Score this file instead of the run's validation data."),
    fmt: str | None = typer.Option(None, "--format", help="The --data file's format [default: the run's]."),
    columns: list[str] = typer.Option(
        [], "--columns", metavar="FIELD=COLUMN", help="FIELD=COLUMN for the --data file (repeatable)."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="[default: the run's batch size]"),
    max_samples: int | None = typer.Option(None, "--max-samples", min=1, help="Score only the first N examples."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the results to this JSON file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
    merged: Path | None = typer.Option(None, "--merged", help=MERGED_HELP),
    base: str | None = typer.Option(None, "--base", help="Base model directory (default: the run's recipe)."),
    lm_eval: str | None = typer.Option(
        None, "--lm-eval", help="Run the lm-eval harness on these tasks (comma-separated) instead."
    ),
    lm_eval_include: Path | None = typer.Option(
        None, "--lm-eval-include", help="A directory of your own lm-eval task YAML files."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="--lm-eval: at most N examples per task."),
) -> None:
    """Score a trained run: loss, perplexity or accuracy (and the generation score), as training reports them."""
    from peftcli.errors import PeftCliError

    if output is not None and output.exists() and not overwrite:
        raise PeftCliError(f"--output: {output} already exists; pass --overwrite to replace it")
    if lm_eval is not None:
        if data or fmt or columns or max_samples:
            raise PeftCliError("--lm-eval reads its tasks' own data; --data, --format, --columns and --max-samples "
                               "belong to the loop's metrics")  # fmt: skip
        _harness(run, lm_eval, lm_eval_include, limit, batch_size, merged, base, as_json, output)
        return
    if lm_eval_include is not None or limit is not None:
        raise PeftCliError("--lm-eval-include and --limit go with --lm-eval TASKS")
    from peftcli.serve.score import DataChoice, evaluate_run, parse_columns

    choice = DataChoice(data, fmt, parse_columns(columns), max_samples, batch_size)
    result = evaluate_run(run, choice, merged=merged, base=base, progress=_progress)
    _write(output, result)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


def _progress(text: str) -> None:
    typer.echo(text, err=True)


def _write(output: Path | None, record: dict) -> None:
    from peftcli.train.safe_write import write_text_atomic

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, json.dumps(record, indent=2, default=str) + "\n")
        typer.echo(f"wrote {output}", err=True)


def _harness(run, tasks_text, include, limit, batch_size, merged, base, as_json, output) -> None:
    from peftcli.errors import PeftCliError
    from peftcli.serve import harness

    harness.check_installed()
    tasks = [t.strip() for t in tasks_text.split(",") if t.strip()]
    if not tasks:
        raise PeftCliError("--lm-eval: name at least one task, e.g. --lm-eval hellaswag,arc_easy")
    manager = harness.task_manager(include, tasks)  # unknown tasks are refused before the model loads
    from peftcli.serve.load import load_run

    _progress(f"loading {run}")
    loaded = load_run(run, merged=merged, base=base)
    _progress(f"running lm-eval on {', '.join(tasks)}" + (f" (at most {limit} examples each)" if limit else ""))
    results = harness.run_harness(loaded, tasks, manager, limit, batch_size or 8)
    record = harness.results_record(results)
    _write(output, record)
    typer.echo(json.dumps(record, default=str) if as_json else harness.results_table(results))
