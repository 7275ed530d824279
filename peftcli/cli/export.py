"""`peft export DIR --format safetensors|peft|gguf`: what people deploy, from a run or a model directory."""

from __future__ import annotations

from pathlib import Path

import typer

from peftcli.cli.merge import (
    check_dtype,
    clean_before_writing,
    default_output,
    refuse_unfinished_run,
    report,
    run_merge,
)


def export(
    source: Path = typer.Argument(..., metavar="DIR", help="A run/adapter directory, or a model directory (gguf)."),
    fmt: str = typer.Option(..., "--format", "-f", help="safetensors (merged model) | peft (adapter) | gguf."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output directory, or file for gguf."),
    quant: str = typer.Option("f16", "--quant", help="gguf: f32 | f16 | bf16 | q8_0."),
    dtype: str = typer.Option("bf16", "--dtype", help="safetensors: dtype of the merged weights (bf16|fp16|fp32)."),
    base: str | None = typer.Option(None, "--base", help="Base model directory (default: the run's recipe)."),
    max_shard_size: str | None = typer.Option(None, "--max-shard-size", help="safetensors: largest shard, e.g. 2GB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Export a trained adapter (or a model) for deployment."""
    from peftcli.errors import PeftCliError

    check_dtype(dtype)
    is_adapter = (source / "adapter_config.json").is_file()
    if not is_adapter:
        refuse_unfinished_run(source)
    if fmt == "safetensors":
        if not is_adapter:
            raise PeftCliError(f"{source}: no adapter_config.json; --format safetensors merges a run's adapter")
        report(run_merge(source, output or default_output(source, "merged"), dtype, base, max_shard_size, overwrite))
    elif fmt == "peft":
        _export_peft(source, output or default_output(source, "peft"), overwrite, is_adapter)
    elif fmt == "gguf":
        _export_gguf(source, output, quant, base, overwrite, is_adapter)
    else:
        raise PeftCliError(f"--format: {fmt!r} is not one of safetensors, peft, gguf")


def _export_peft(source: Path, output: Path, overwrite: bool, is_adapter: bool) -> None:
    from peftcli.errors import PeftCliError
    from peftcli.export.peft_format import export_peft
    from peftcli.train.safe_write import staged_dir

    if not is_adapter:
        raise PeftCliError(f"{source}: no adapter_config.json; --format peft exports a run's adapter")
    clean_before_writing(output)
    with staged_dir(output, overwrite) as tmp:
        export_peft(source, tmp)
    typer.echo(f"wrote the adapter in HF PEFT format with a model card -> {output}")


def _export_gguf(source: Path, output: Path | None, quant: str, base, overwrite: bool, is_adapter: bool) -> None:
    from peftcli.errors import PeftCliError
    from peftcli.export.gguf import GGUF_TYPES, write_gguf, write_gguf_from_run

    if quant not in GGUF_TYPES:
        raise PeftCliError(f"--quant: {quant!r} is not one of {', '.join(GGUF_TYPES)}")
    output = output or source.parent / f"{source.resolve().name}-{quant}.gguf"
    clean_before_writing(output)
    if output.exists() and not overwrite:
        raise PeftCliError(f"{output} already exists; pass --overwrite to replace it, or choose another --output")
    if is_adapter:  # merged tensor by tensor straight into the file (fp32, so the GGUF type is the only rounding)
        _, notes = write_gguf_from_run(source, output, quant, base=base, overwrite=overwrite)
        for note in notes:
            typer.echo(f"note: {note}")
    else:
        write_gguf(source, output, quant, overwrite=overwrite)
    typer.echo(f"wrote GGUF ({quant}) -> {output}")
