"""Per-module ranks and layer selection, matched on module names exactly as HF PEFT matches them (torch-free).

`rank_pattern`/`alpha_pattern` keys are regexes tried, in the order written, against the end of a full module
name at a dot boundary: `foo` matches `foo` and `a.b.foo` but not `a.foobar`; `^foo` matches only a top-level
`foo`. `layers_to_transform` keeps modules whose block index (the number after `layers_pattern`, or after the
first named segment when no pattern is given) is listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def check_pattern_key(key: str) -> None:
    """Raise ValueError when a pattern key is not a usable regex."""
    if not key:
        raise ValueError("pattern keys must not be empty")
    try:
        re.compile(_pattern_regex(key))
    except re.error as exc:
        raise ValueError(f"{key!r} is not a valid regex ({exc})") from None


def pattern_key(patterns: Iterable[str], module_name: str) -> str | None:
    """The first pattern key that matches `module_name`, or None."""
    for key in patterns:
        if re.match(_pattern_regex(key), module_name):
            return key
    return None


def check_pattern_keys(params, names: Iterable[str]) -> None:
    """Refuse a `rank_pattern`/`alpha_pattern` key that matches no name of the model at all: a typo.

    A key that matches only modules left unadapted is accepted: HF PEFT adapters may carry such keys. `names`
    are the model's module names (and the parameters adapted directly).
    """
    from peftcli.errors import PeftCliError

    names = list(names)
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(params, field) or {}:
            if not any(pattern_key([key], name) for name in names):
                raise PeftCliError(
                    f"method.{field}: {key} matches no module of this model; fix or remove it (keys are regexes "
                    "matched against whole dotted-name suffixes, e.g. q_proj or layers\\.0\\..*)"
                )


def pattern_value(patterns: Mapping[str, float], module_name: str, default: float) -> float:
    """The value of the first matching pattern key, else `default`."""
    key = pattern_key(patterns, module_name)
    return default if key is None else patterns[key]


def layer_index(module_name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block index in a module name (`model.layers.3.mlp.up_proj` -> 3), or None when it has none.

    With no `layers_pattern` the first number that follows a named segment counts (so an MoE expert number
    further down is not taken for the layer); otherwise the number right after one of the patterns.
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def in_selected_layers(
    module_name: str,
    target: list[str] | str,
    layers_to_transform: int | list[int] | None,
    layers_pattern: str | list[str] | None,
) -> bool:
    """Whether `layers_to_transform` keeps this (already targeted) module.

    As in HF PEFT, a module named in full in a target list is kept whatever its layer: adapters record their
    resolved module names, so a reloaded adapter adapts exactly the modules it was trained on.
    """
    if layers_to_transform is None or layers_to_transform == []:
        return True
    if isinstance(target, list) and module_name in target:
        return True
    index = layer_index(module_name, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform
