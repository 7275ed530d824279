"""`peft merge ADAPTER_DIR`: fold a trained adapter into its base, streaming shard by shard."""

from __future__ import annotations

import os
from pathlib import Path

import typer

DTYPE_HELP = "dtype of the merged weights."


def default_output(adapter_dir: Path, suffix: str) -> Path:
    """Beside the run directory: runs/my-run -> runs/my-run-merged."""
    return adapter_dir.parent / f"{adapter_dir.resolve().name}-{suffix}"


def merge(
    adapter_dir: Path = typer.Argument(..., metavar="ADAPTER_DIR", help="A run directory (or any adapter dir)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Merged model directory [default: DIR-merged]."),
    dtype: str = typer.Option("bf16", "--dtype", help=DTYPE_HELP + " bf16 | fp16 | fp32."),
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
) -> None:
    """Merge an adapter into its base model and write a Hugging Face model directory."""
    report(run_merge(adapter_dir, output, dtype, base, max_shard_size, overwrite, verify=verify))


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
