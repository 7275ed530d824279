"""`peft export DIR --format safetensors|peft|gguf|lora|gguf-lora`: what people deploy, from a run or a model
directory."""

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

# peftcli.export.as_lora's DEFAULT_RANK and DEFAULT_MAX_EFFECT_LOSS, repeated so that --help does not import torch
DEFAULT_RANK = 16
DEFAULT_MAX_EFFECT_LOSS = 0.5
FORMATS = ("safetensors", "peft", "gguf", "lora", "gguf-lora")


def export(
    source: Path = typer.Argument(..., metavar="DIR", help="A run/adapter directory, or a model directory (gguf)."),
    fmt: str = typer.Option(
        ...,
        "--format",
        "-f",
        help="safetensors (merged model) | peft (adapter) | gguf | lora (any mergeable adapter as plain LoRA, by "
        "SVD) | gguf-lora (a LoRA adapter as the GGUF adapter llama.cpp loads beside the base's GGUF: --lora).",
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output directory, or file for gguf(-lora)."),
    quant: str | None = typer.Option(
        None, "--quant", help="gguf: f32 | f16 | bf16 | q8_0 (default f16); gguf-lora: the same (default f32)."
    ),
    dtype: str = typer.Option("bf16", "--dtype", help="safetensors: dtype of the merged weights (bf16|fp16|fp32)."),
    base: str | None = typer.Option(None, "--base", help="Base model directory (default: the run's recipe)."),
    max_shard_size: str | None = typer.Option(None, "--max-shard-size", help="safetensors: largest shard, e.g. 2GB."),
    rank: int | None = typer.Option(
        None,
        "--rank",
        help=f"lora: one rank for every layer (default {DEFAULT_RANK}; vLLM needs one rank). gguf-lora: convert by "
        "SVD first, as lora does (needed for methods other than plain LoRA, and DoRA).",
    ),
    energy: float | None = typer.Option(
        None,
        "--energy",
        help="lora, gguf-lora: per layer, the smallest rank keeping this share of the squared singular values, "
        "e.g. 0.99 (ranks may differ: rank_pattern).",
    ),
    max_effect_loss: float | None = typer.Option(
        None,
        "--max-effect-loss",
        help="lora, gguf-lora: fail (exit 1, nothing written) when the LoRA loses more than this share of the "
        "adapter's effect on a few fixed prompts' logits, ||LoRA - adapter|| / ||adapter - base|| (0: exact; 1: as "
        f"if there were no adapter). Default {DEFAULT_MAX_EFFECT_LOSS}: keep at least half. Raise --rank/--energy "
        "to lose less, or raise this to accept the loss.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="safetensors: before publishing, compare the merged model's logits with base + adapter (both fp32) "
        "and fail beyond what the dtype's rounding explains. gguf: read the file back and compare its metadata "
        "and every tensor with the weights it was written from, within the --quant type's rounding bound. "
        "gguf-lora: read the file back, every factor within its type's rounding. peft and lora always read back "
        "what they wrote (lora: through HF PEFT when installed, to fp32 rounding).",
    ),
) -> None:
    """Export a trained adapter (or a model) for deployment."""
    from peftcli.errors import PeftCliError

    check_dtype(dtype)
    converting = rank is not None or energy is not None or max_effect_loss is not None
    if fmt not in ("lora", "gguf-lora") and converting:
        raise PeftCliError("--rank, --energy and --max-effect-loss apply to --format lora and gguf-lora only")
    bound = DEFAULT_MAX_EFFECT_LOSS if max_effect_loss is None else max_effect_loss
    is_adapter = (source / "adapter_config.json").is_file()
    if not is_adapter:
        refuse_unfinished_run(source)
    if fmt == "safetensors":
        if not is_adapter:
            raise PeftCliError(f"{source}: no adapter_config.json; --format safetensors merges a run's adapter")
        output = output or default_output(source, "merged")
        report(run_merge(source, output, dtype, base, max_shard_size, overwrite, verify=verify))
    elif fmt == "peft":
        _export_peft(source, output or default_output(source, "peft"), overwrite, is_adapter)
    elif fmt == "gguf":
        _export_gguf(source, output, quant or "f16", base, overwrite, is_adapter, verify)
    elif fmt == "lora":
        _export_lora(source, output, rank, energy, bound, base, overwrite, is_adapter)
    elif fmt == "gguf-lora":
        _export_gguf_lora(source, output, quant or "f32", rank, energy, bound, base, overwrite, verify, is_adapter)
    else:
        raise PeftCliError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")


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
    _warn_for_servers(output)


def _warn_for_servers(adapter_dir: Path) -> None:
    import json

    from peftcli.export.safetensors_stream import read_header
    from peftcli.export.serving import serving_warnings
    from peftcli.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME

    config = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    tensors = {name: info.shape for name, info in read_header(adapter_dir / WEIGHTS_NAME)[0].items()}
    for line in serving_warnings(config, tensors):
        typer.echo(f"warning: {line}", err=True)


def _export_gguf(
    source: Path, output: Path | None, quant: str, base, overwrite: bool, is_adapter: bool, verify: bool = True
) -> None:
    from peftcli.errors import PeftCliError
    from peftcli.export.gguf import GGUF_TYPES, write_gguf, write_gguf_from_run

    if quant not in GGUF_TYPES:
        raise PeftCliError(f"--quant: {quant!r} is not one of {', '.join(GGUF_TYPES)}")
    output = output or source.parent / f"{source.resolve().name}-{quant}.gguf"
    clean_before_writing(output)
    if output.exists() and not overwrite:
        raise PeftCliError(f"{output} already exists; pass --overwrite to replace it, or choose another --output")
    options = {"overwrite": overwrite, "verify": verify, "on_verified": _report_gguf_check}
    if is_adapter:  # merged tensor by tensor straight into the file (fp32, so the GGUF type is the only rounding)
        _, notes = write_gguf_from_run(source, output, quant, base=base, **options)
        for note in notes:
            typer.echo(f"note: {note}")
    else:
        write_gguf(source, output, quant, **options)
    typer.echo(f"wrote GGUF ({quant}) -> {output}")


def _report_gguf_check(check) -> None:
    worst, line = check.worst, f"verify: read back the metadata and {check.tensors} tensors"
    if worst.error == 0:
        typer.echo(f"{line}: every value exactly that of the weights it was written from")
        return
    typer.echo(
        f"{line}, each within its storage type's rounding bound; worst {worst.name} ({worst.qtype}) at "
        f"{worst.ratio:.2f} of its bound (|error| {worst.error:.3g}, bound {worst.bound:.3g})"
    )


def _export_lora(source: Path, output, rank, energy, max_effect_loss, base, overwrite: bool, is_adapter: bool) -> None:
    from peftcli.errors import PeftCliError
    from peftcli.export.as_lora import REPORT_NAME, check_method, check_request, convert_to_lora
    from peftcli.tuners.adapter import read_adapter_config

    if not is_adapter:
        raise PeftCliError(f"{source}: no adapter_config.json; --format lora converts a run's adapter")
    check_request(rank, energy, max_effect_loss)
    check_method(read_adapter_config(source)[0])
    output = output or default_output(source, "lora")
    clean_before_writing(output)
    result = convert_to_lora(
        source, output, rank=rank, energy=energy, max_effect_loss=max_effect_loss, base=base, overwrite=overwrite
    )
    _report_conversion(result)
    typer.echo(f"wrote the LoRA adapter (HF PEFT format; per-layer table in {REPORT_NAME}) -> {output}")
    _warn_for_servers(output)


def _report_conversion(result) -> None:
    """What the SVD conversion kept: ranks, the per-layer error, the probe's logit difference, the read-back."""
    for note in result.notes:
        typer.echo(f"note: {note}")
    ranks = result.ranks
    shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    typer.echo(f"converted {result.method} to LoRA ({shown}) on {len(result.layers)} linear layers of {result.base}")
    if result.layers:
        worst = ", ".join(f"{fit.module} {fit.relative_error:.3g} (r={fit.rank})" for fit in result.worst(3))
        typer.echo(f"relative error per layer ||dW - BA|| / ||dW||: median {result.median_error:.3g}; worst {worst}")
    typer.echo(
        f"probe logits, base + LoRA vs base + original adapter: max |diff| {result.probe_max_abs:.3g} "
        f"({result.probe_relative:.3g} of the largest logit); {result.effect_lost:.1%} of the adapter's effect lost "
        f"(bound {result.max_effect_loss:g})"
    )
    typer.echo(
        f"read back: {result.reader} loads the written adapter as computed (max |logit diff| "
        f"{result.reload_max_abs:.3g}, bound {result.reload_tolerance:.3g})"
    )


def _export_gguf_lora(
    source: Path, output, quant: str, rank, energy, max_effect_loss, base, overwrite, verify, is_adapter
) -> None:
    """A LoRA adapter as llama.cpp's GGUF adapter; other methods (and DoRA) through the SVD conversion first,
    which must be asked for (--rank/--energy): it approximates, and says by how much."""
    import tempfile

    from peftcli.errors import PeftCliError
    from peftcli.export.gguf_lora import check_adapter, check_type, write_gguf_lora

    if not is_adapter:
        raise PeftCliError(f"{source}: no adapter_config.json; --format gguf-lora exports a run's adapter")
    check_type(quant)
    output = output or source.parent / f"{source.resolve().name}-lora-{quant}.gguf"
    clean_before_writing(output)
    if output.exists() and not overwrite:
        raise PeftCliError(f"{output} already exists; pass --overwrite to replace it, or choose another --output")
    if rank is None and energy is None:
        check_adapter(source)
        result = write_gguf_lora(source, output, quant, base=base, overwrite=overwrite, verify=verify)
    else:
        from peftcli.export.as_lora import check_method, check_request, convert_to_lora
        from peftcli.tuners.adapter import read_adapter_config

        check_request(rank, energy, max_effect_loss)
        check_method(read_adapter_config(source)[0])
        with tempfile.TemporaryDirectory(prefix="peft-gguf-lora-") as tmp:
            conversion = convert_to_lora(
                source, Path(tmp) / "lora", rank=rank, energy=energy, max_effect_loss=max_effect_loss, base=base
            )
            if conversion.modules_to_save:
                raise PeftCliError(
                    f"{source}: the method replaces whole modules ({', '.join(conversion.modules_to_save[:3])}), "
                    "which llama.cpp's LoRA adapter cannot carry; export the merged model instead (--format gguf)"
                )
            _report_conversion(conversion)
            result = write_gguf_lora(
                Path(tmp) / "lora",
                output,
                quant,
                base=base or conversion.base,
                overwrite=overwrite,
                verify=verify,
                metadata_name=source.resolve().name,
            )
    for note in result.notes:
        typer.echo(f"note: {note}")
    ranks = result.ranks
    shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    if verify and result.worst_ratio == 0:
        typer.echo(f"verify: read back all {2 * result.pairs} factors, equal to the adapter's")
    elif verify:
        typer.echo(
            f"verify: read back all {2 * result.pairs} factors, each within its storage type's rounding of the "
            f"adapter's values (the largest difference is {result.worst_ratio:.2f} of that bound)"
        )
    typer.echo(
        f"wrote the LoRA adapter as a llama.cpp GGUF adapter ({quant}, {result.architecture}, alpha "
        f"{result.alpha:g}, {shown}, {result.pairs} weights) -> {output}"
    )
    typer.echo(
        f"use it beside the base's GGUF (peft export BASE_DIR --format gguf): llama-server -m BASE.gguf --lora {output}"
    )
