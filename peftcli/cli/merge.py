"""`peft merge ADAPTER_DIR`: fold a trained adapter into its base, streaming shard by shard; with several LoRA
adapters and --combine RULE, combine them first (into a merged model, or --as adapter into one adapter)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import typer

DTYPE_HELP = "dtype of the merged weights."


def default_output(adapter_dir: Path, suffix: str) -> Path:
    """Beside the run directory: runs/my-run -> runs/my-run-merged."""
    return adapter_dir.parent / f"{adapter_dir.resolve().name}-{suffix}"


COMBINE_HELP = (
    "With several adapters: how to combine them (HF PEFT's add_weighted_adapter rules): linear, cat, svd, ties, "
    "ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd."
)


def merge(
    adapter_dirs: list[Path] = typer.Argument(
        ..., metavar="ADAPTER_DIR...", help="A run directory (or any adapter dir); several with --combine."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output directory [default: DIR-merged; required with several adapters]."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help=DTYPE_HELP + " bf16 | fp16 | fp32 [default: bf16]."),
    base: str | None = typer.Option(None, "--base", help="Base model directory (default: the run's recipe)."),
    max_shard_size: str | None = typer.Option(
        None, "--max-shard-size", help="Largest output shard, e.g. 2GB [default: the base's largest shard]."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Before publishing, compare the merged model with base + adapter (both in fp32); a difference beyond "
        "what the dtype's rounding explains fails (exit 1) and writes nothing.",
    ),
    combine: str | None = typer.Option(None, "--combine", metavar="RULE", help=COMBINE_HELP),
    weights: str | None = typer.Option(
        None, "--weights", metavar="W1,W2,...", help="One weight per adapter, comma-separated [default: 1 each]."
    ),
    density: float | None = typer.Option(
        None, "--density", help="Pruning rules (ties, dare_*, magnitude_prune*): fraction of entries kept, in (0, 1]."
    ),
    majority_sign: str | None = typer.Option(
        None, "--majority-sign", metavar="total|frequency", help="ties rules: how the sign is elected [default: total]."
    ),
    rank: int | None = typer.Option(None, "--rank", help="SVD rules: rank of the result [default: the largest]."),
    seed: int | None = typer.Option(None, "--seed", help="dare rules: seed of the random masks [default: 0]."),
    output_kind: str | None = typer.Option(
        None,
        "--as",
        metavar="model|adapter",
        help="With --combine: a merged model, or the combined LoRA adapter [default: model].",
    ),
) -> None:
    """Merge an adapter into its base model and write a Hugging Face model directory.

    Given several LoRA adapters of one base and --combine RULE, combine them first: into a merged model, or
    (--as adapter) into one LoRA adapter in HF PEFT's format.
    """
    combining = {"--combine": combine, "--weights": weights, "--density": density, "--majority-sign": majority_sign,
                 "--rank": rank, "--seed": seed, "--as": output_kind}  # fmt: skip
    if len(adapter_dirs) == 1:
        given = [name for name, value in combining.items() if value is not None]
        if given:
            from peftcli.errors import PeftCliError

            raise PeftCliError(f"{', '.join(given)}: combining needs two or more adapter directories")
        report(run_merge(adapter_dirs[0], output, dtype or "bf16", base, max_shard_size, overwrite, verify=verify))
        return
    run_combine(adapter_dirs, output, combine, weights, density, majority_sign, rank, seed, output_kind, base, dtype,
                max_shard_size, overwrite, verify)  # fmt: skip


def check_dtype(dtype: str) -> str:
    """Refuse an unknown --dtype before any work."""
    from peftcli.errors import PeftCliError

    if dtype not in ("bf16", "fp16", "fp32"):
        raise PeftCliError(f"--dtype: {dtype!r} is not one of bf16, fp16, fp32")
    return dtype


def use_huge_pages() -> None:
    """Let torch back large CPU tensors with transparent huge pages (read once, before torch's first allocation).

    A merge allocates a few weight-sized tensors per layer; with 4 KB pages, faulting them in took about 40% of
    a 3B merge (bench/merge_vs_hf.py: 50 s -> 30 s with huge pages on the development machine).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def run_merge(adapter_dir, output, dtype, base, max_shard_size, overwrite, verify: bool = False):
    """The merge with a progress line per shard on stderr, verified before it is published if asked."""
    use_huge_pages()
    from peftcli.export.merge import merge_adapter_dir

    check_dtype(dtype)
    refuse_unfinished_run(adapter_dir)
    output = output or default_output(adapter_dir, "merged")
    clean_before_writing(output)

    def progress(done: int, total: int) -> None:
        typer.echo(f"merged shard {done}/{total}", err=True)

    def check(written: Path) -> None:
        run_verify(adapter_dir, written, base, dtype)

    return merge_adapter_dir(
        adapter_dir, output, base=base, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
        progress=progress, check=check if verify else None,
    )  # fmt: skip


def refuse_unfinished_run(run_dir: Path) -> None:
    """A run directory without its final adapter yet: say so, and how to finish it."""
    from peftcli.errors import AdapterError
    from peftcli.train.run_dir import unfinished_run

    unfinished = unfinished_run(run_dir)
    if unfinished:
        raise AdapterError(unfinished)


def clean_before_writing(output: Path) -> None:
    """Remove (and say) what an interrupted earlier merge or export of `output` left beside it."""
    from peftcli.train.safe_write import clean_leftovers

    for note in clean_leftovers(output):
        typer.echo(f"note: {note}", err=True)


def report(result) -> None:
    """What was written, and any note (a dequantized GGUF base, a run trained on a quantized base)."""
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(
        f"merged {result.method} into {result.merged_modules} modules of {result.base}: {result.tensors} tensors, "
        f"{result.bytes_written / 1e9:.2f} GB in {result.shards} shard(s), {result.dtype}, "
        f"{result.seconds:.1f}s -> {result.output}"
    )


def run_verify(adapter_dir: Path, merged_dir: Path, base: str | None, dtype: str) -> None:
    """Print the largest logit difference between base + adapter and the merged model; fail beyond the bound."""
    from peftcli.errors import VerificationError
    from peftcli.export.verify import verify_merged
    from peftcli.models.load import DTYPES

    result = verify_merged(adapter_dir, merged_dir, DTYPES[dtype], base)
    typer.echo(
        f"verify: max |logit difference| between base + adapter and the merged model: {result.difference:.3g} "
        f"(bound {result.tolerance:.3g}: {dtype} rounding of every weight moves them by about {result.rounding:.3g})"
    )
    if not result.passed:
        raise VerificationError(
            f"verify: the merged model differs from base + adapter by {result.difference:.3g}, more than the "
            f"{result.tolerance:.3g} that {dtype} rounding explains; nothing was written. Please report this with "
            "the run's recipe.yaml and adapter_config.json"
        )


def parse_weights(text: str | None, count: int) -> list[float]:
    """'0.6,0.4' -> [0.6, 0.4]; none given -> 1.0 each (every adapter's whole update)."""
    from peftcli.errors import PeftCliError

    if text is None:
        return [1.0] * count
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise PeftCliError(f"--weights: {text!r} is not a comma-separated list of numbers (e.g. 0.6,0.4)") from None


def run_combine(
    adapter_dirs, output, rule, weights, density, majority_sign, rank, seed, kind, base, dtype, max_shard_size,
    overwrite, verify,
) -> None:  # fmt: skip
    """Check everything, combine, then write the adapter or stream it into the base like a single merge."""
    from peftcli.errors import OutputError, PeftCliError

    if rule is None:
        raise PeftCliError(f"{len(adapter_dirs)} adapters given: say how to combine them with --combine RULE")
    kind = kind or "model"
    if kind not in ("model", "adapter"):
        raise PeftCliError(f"--as: {kind!r} is not model or adapter")
    if output is None:
        raise PeftCliError("combining several adapters needs --output DIR")
    if kind == "adapter":
        given = [n for n, v in (("--dtype", dtype), ("--max-shard-size", max_shard_size)) if v is not None]
        if verify:
            given.append("--verify")
        if given:
            raise PeftCliError(f"{', '.join(given)}: these shape a merged model, not --as adapter")
    dtype = check_dtype(dtype or "bf16")
    if len(set(p.resolve() for p in adapter_dirs)) != len(adapter_dirs):
        raise PeftCliError("the same adapter directory is given twice; give each once and use --weights")
    for adapter_dir in adapter_dirs:
        refuse_unfinished_run(adapter_dir)
    if output.exists() and not overwrite:
        raise OutputError(f"{output} already exists; pass --overwrite to replace it")
    from peftcli.export.combine import (
        RANDOM_RULES,
        check_request,
        combination_record,
        combine_loras,
        module_order,
        read_lora_source,
        write_combined_adapter,
    )

    weight_list = parse_weights(weights, len(adapter_dirs))
    sources = [read_lora_source(path, base) for path in adapter_dirs]
    check_request(sources, weight_list, rule, density, majority_sign, rank, seed)
    order = module_order(sources[0]) if rule in RANDOM_RULES else None
    combination = combine_loras(sources, weight_list, rule, density=density, majority_sign=majority_sign, rank=rank,
                                seed=seed, module_order=order)  # fmt: skip
    record = combination_record(sources, weight_list, rule, density, majority_sign, rank, seed)
    for note in combination.notes:
        typer.echo(f"note: {note}")
    clean_before_writing(output)
    if kind == "adapter":
        write_combined_adapter(output, sources, combination, record, overwrite)
        typer.echo(
            f"combined {len(sources)} LoRA adapters by {rule} into one of rank {combination.rank} "
            f"({len(combination.modules)} modules) -> {output}"
        )
        return
    use_huge_pages()
    from peftcli.export.combine import RECORD_FILE
    from peftcli.export.merge import merge_adapter_dir

    with tempfile.TemporaryDirectory(prefix="peftcli-combine-") as scratch:
        adapter = write_combined_adapter(Path(scratch) / "adapter", sources, combination, record)

        def finish(written: Path) -> None:
            (written / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            if verify:
                run_verify(adapter, written, base, dtype)

        def progress(done: int, total: int) -> None:
            typer.echo(f"merged shard {done}/{total}", err=True)

        result = merge_adapter_dir(adapter, output, base=base, dtype=dtype, max_shard_size=max_shard_size,
                                   overwrite=overwrite, progress=progress, check=finish)  # fmt: skip
    result.method = f"{len(sources)} LoRA adapters combined by {rule} (rank {combination.rank})"
    report(result)
