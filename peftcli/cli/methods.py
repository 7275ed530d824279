"""`peft methods [NAME]`: the registry as a table, or one method's options with their defaults."""

from __future__ import annotations

import typer

# The share of trainable parameters is measured on this shape (SmolLM2-135M, the quickstart model), built on
# the meta device so no weights are allocated.
REFERENCE_MODEL = "SmolLM2-135M (Llama, 30 layers, hidden 576)"
_REFERENCE_CONFIG = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
_REFERENCE_STEPS = 1000  # for methods whose schedule depends on the training length


def trainable_share(method: str) -> tuple[int, float]:
    """Trainable parameters and their share of the reference model with the method's default options."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.tuners.adapter import apply_adapter
    from peftcli.tuners.protocol import AdapterContext
    from peftcli.tuners.registry import get_tuner

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**_REFERENCE_CONFIG))
    total = sum(p.numel() for p in model.parameters())
    info = apply_adapter(model, get_tuner(method).params(), AdapterContext(total_steps=_REFERENCE_STEPS))
    trainable = info.trainable_count(model)
    return trainable, trainable / total


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def methods(
    name: str | None = typer.Argument(None, metavar="[NAME]", help="A method to describe in full."),
    share: bool = typer.Option(True, "--share/--no-share", help="Measure the trainable share (needs torch)."),
) -> None:
    """List the fine-tuning methods and what each can do, or show one method's options."""
    from rich.markup import escape
    from rich.table import Table

    from peftcli.cli.console import make_console
    from peftcli.errors import PeftCliError
    from peftcli.recipe.errors import suggest
    from peftcli.tuners.registry import all_tuners

    console = make_console()
    tuners = all_tuners()
    if name is not None:
        if name not in tuners:
            hint = suggest(name, list(tuners))
            raise PeftCliError(f"unknown method {name!r}{hint}; `peft methods` lists them")
        _describe(console, tuners[name], share)
        return
    columns = ("method", "kind", "layers", "tasks", "merge", "quantized", "ZeRO-3/FSDP", "packing", "HF PEFT")
    table = Table(*columns, box=None)
    table.columns[0].no_wrap = True  # a method's name is what people type: never cut or folded
    table.columns[0].min_width = max(len(n) for n in tuners)
    if share:
        table.add_column("trainable", justify="right")
    notes: list[str] = []
    for spec in tuners.values():
        caps = spec.capabilities
        row = [
            spec.name,
            caps.kind.replace("_", " "),
            ", ".join(caps.layer_types) or "-",
            ", ".join(caps.task_types),
            _yes(caps.mergeable),
            _yes(caps.quantized_base),
            _yes(caps.zero3_safe),
            _yes(caps.packing),
            _yes(spec.in_hf_peft),
        ]
        if share:
            try:
                _, fraction = trainable_share(spec.name)
                row.append(f"{fraction:.3%}")
            except PeftCliError:  # e.g. BitFit: the reference Llama has no biases
                row.append("n/a")
                notes.append(f"{spec.name}: n/a, needs {spec.model_requirement or 'another model'}")
        table.add_row(*row)
    console.print(table)
    if share:
        console.print(f"trainable: share of {REFERENCE_MODEL} with each method's defaults")
        for note in notes:
            console.print(escape(note))
    console.print("`peft methods NAME` shows a method's options.")


def _describe(console, spec, share: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    caps = spec.capabilities
    console.print(f"[bold]{spec.name}[/bold]: {escape(spec.summary)}")
    console.print(
        f"kind {caps.kind.replace('_', ' ')}; layers {', '.join(caps.layer_types) or '-'}; "
        f"tasks {', '.join(caps.task_types)}; mergeable {_yes(caps.mergeable)}; "
        f"quantized base {_yes(caps.quantized_base)}; ZeRO-3/FSDP {_yes(caps.zero3_safe)}; "
        f"packing {_yes(caps.packing)}; "
        f"adapter format {'HF PEFT ' + spec.peft_type if spec.in_hf_peft else 'peftcli ' + spec.peft_type}"
    )
    if not caps.mergeable and spec.merge_refusal:
        console.print(f"not mergeable: {escape(spec.merge_refusal)}")
    if share:
        from peftcli.errors import PeftCliError

        try:
            count, fraction = trainable_share(spec.name)
            console.print(f"defaults train {count:,} parameters ({fraction:.3%} of {REFERENCE_MODEL})")
        except PeftCliError:
            console.print(f"needs {escape(spec.model_requirement or 'another model')}")
    table = Table("option", "default", "description", box=None)
    for field_name, field in spec.params.model_fields.items():
        if field_name == "name":
            continue
        default = field.get_default(call_default_factory=True)
        shown = "required" if field.is_required() else repr(default)
        table.add_row(field_name, escape(shown), escape(field.description or ""))
    console.print(table)
