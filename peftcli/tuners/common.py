"""Recipe fields that many methods share (targets, exclusions, modules to train in full), defined once."""

from __future__ import annotations

from pydantic import Field

TargetSpec = list[str] | str

TARGETS_HELP = (
    "a list matched on whole dotted-name suffixes (q_proj matches model.layers.0.self_attn.q_proj), "
    "a regex matched against the full name, or 'all-linear' (every linear layer except the output head)"
)


def target_modules_field(default: TargetSpec | None = "all-linear", what: str = "Modules to adapt") -> object:
    """A `target_modules` field with the shared description."""
    return Field(default, description=f"{what}: {TARGETS_HELP}.")


def exclude_modules_field() -> object:
    """An `exclude_modules` field with the shared description."""
    return Field(None, description="Modules never to adapt, in the same forms as target_modules.")


def modules_to_save_field() -> object:
    """A `modules_to_save` field: modules trained in full and saved with the adapter."""
    return Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (suffix match), e.g. [lm_head].",
    )


def check_target_spec(value):
    """Validator body: a target list must not be empty and a regex must not be blank."""
    if isinstance(value, list) and not value:
        raise ValueError("must name at least one module (or use 'all-linear')")
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


# Fields whose HF PEFT key has the same name in every method that has them.
SHARED_HF_FIELDS = {"exclude_modules": "exclude_modules", "modules_to_save": "modules_to_save"}


def hf_fields(cfg: dict, names: dict[str, str], hf_defaults: dict | None = None) -> dict:
    """Our params fields from an HF PEFT adapter_config.json; `names` maps each of our fields to HF's key.

    A key HF left out, or wrote as null or empty, means HF's default: that is our own default (the params
    model fills it in) unless `hf_defaults` gives HF's value for one of our fields (LoRA's alpha: 8 in HF
    PEFT, 16 here). Values are passed as they are; the params model validates them.
    """
    hf_defaults = hf_defaults or {}
    fields = {}
    for ours, theirs in {**SHARED_HF_FIELDS, **names}.items():
        value = cfg.get(theirs)
        if value is None or value == [] or value == {}:
            if ours in hf_defaults:
                fields[ours] = hf_defaults[ours]
            continue
        fields[ours] = value
    return fields
