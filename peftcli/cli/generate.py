"""`peft generate RUN` (prompts in, jsonl answers out) and `peft chat RUN` (an interactive conversation)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from peftcli.cli.eval import MERGED_HELP, RUN_HELP

TEMPERATURE_HELP = "0 answers greedily; more samples (with --top-p)."


def generate(
    run: Path = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    prompt: list[str] = typer.Option([], "--prompt", "-p", metavar="TEXT", help="A prompt to answer (repeatable)."),
    input_file: Path | None = typer.Option(None, "--input", "-i", help='A jsonl file of {"prompt": ...} records.'),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the answers here [default: stdout]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most new tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help=TEMPERATURE_HELP),
    top_p: float = typer.Option(1.0, "--top-p", help="Sampling: keep the smallest set of tokens this likely."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling (the same seed, the same answers)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts answered together."),
    merged: Path | None = typer.Option(None, "--merged", help=MERGED_HELP),
    base: str | None = typer.Option(None, "--base", help="Base model directory (default: the run's recipe)."),
) -> None:
    """Answer prompts with a trained run, rendered as its training prompts were; jsonl records out."""
    from peftcli.errors import PeftCliError
    from peftcli.serve.generate import Sampling, check_generative, complete, prompt_style, render_prompt
    from peftcli.serve.load import load_run

    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    sampling.check()
    if output is not None and output.exists() and not overwrite:
        raise PeftCliError(f"--output: {output} already exists; pass --overwrite to replace it")
    records = [{"prompt": text} for text in prompt] + (read_prompts(input_file) if input_file else [])
    if not records:
        raise PeftCliError("give prompts to answer: --prompt TEXT (repeatable) or --input prompts.jsonl")
    typer.echo(f"loading {run}", err=True)
    loaded = load_run(run, merged=merged, base=base)
    check_generative(loaded, "generate")
    style = prompt_style(loaded)
    ids = [render_prompt(loaded, style, record["prompt"]) for record in records]

    def answered(done: int, total: int) -> None:
        typer.echo(f"answered {done}/{total} prompts", err=True)

    answers = complete(loaded, ids, sampling, batch_size, on_batch=answered)
    lines = [
        json.dumps({**record, **answer}, ensure_ascii=False) for record, answer in zip(records, answers, strict=True)
    ]
    if output is None:
        for line in lines:
            typer.echo(line)
        return
    from peftcli.train.safe_write import write_text_atomic

    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, "".join(line + "\n" for line in lines))
    typer.echo(f"wrote {len(lines)} answers to {output}", err=True)


def read_prompts(path: Path) -> list[dict]:
    """The records of a prompts file: one JSON object with a text "prompt" per line (other keys are kept)."""
    from peftcli.errors import DataError

    if not path.is_file():
        raise DataError(f"--input: {path} not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"--input: {path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f'--input: {path}: line {number} needs a text "prompt", e.g. {{"prompt": "Hi"}}')
        records.append(record)
    return records


def chat(
    run: Path = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    system: str | None = typer.Option(None, "--system", help="System prompt [default: the run's data.train one]."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Most new tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help=TEMPERATURE_HELP),
    top_p: float = typer.Option(1.0, "--top-p", help="Sampling: keep the smallest set of tokens this likely."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Print what the model reads each turn (stderr)."),
    merged: Path | None = typer.Option(None, "--merged", help=MERGED_HELP),
    base: str | None = typer.Option(None, "--base", help="Base model directory (default: the run's recipe)."),
) -> None:
    """Chat with a trained run through its chat template. /reset starts over; /exit or Ctrl-D ends."""
    import torch
    from transformers import TextStreamer

    from peftcli.serve.chat import ChatSession
    from peftcli.serve.generate import Sampling, prompt_style
    from peftcli.serve.load import load_run

    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    sampling.check()
    typer.echo(f"loading {run}", err=True)
    loaded = load_run(run, merged=merged, base=base)
    session = ChatSession(loaded, system if system is not None else prompt_style(loaded).system, sampling)
    if seed is not None:
        torch.manual_seed(seed)
    terminal = sys.stdin.isatty()
    typer.echo(f"chatting with {loaded.describe}; /reset starts over, /exit (or Ctrl-D) ends", err=True)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        if terminal:
            typer.echo("you> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D, or the end of piped input
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            typer.echo("(conversation reset)", err=True)
            continue
        if show_prompt:
            typer.echo(f"--- prompt ---\n{session.prompt_text(text)}--- end of prompt ---", err=True)
        session.answer(text, streamer)
        sys.stdout.flush()
