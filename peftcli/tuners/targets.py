"""Which modules a method adapts: one pure function over module names, shared by every method."""

from __future__ import annotations

import re
from collections.abc import Iterable

ALL_LINEAR = "all-linear"


def name_matches(name: str, spec: list[str] | str) -> bool:
    """A list entry matches a whole dotted-name suffix (q_proj, self_attn.q_proj); a string is a full regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def select_targets(
    candidates: Iterable[str],
    target: list[str] | str,
    exclude: list[str] | str | None = None,
    output_heads: Iterable[str] = (),
) -> list[str]:
    """Names among `candidates` (the modules of a supported layer type) that the method should adapt.

    `all-linear` takes every candidate except the output head(s); otherwise `target` decides.
    `exclude` always wins. The result keeps the model's module order.
    """
    heads = set(output_heads)
    chosen = []
    for name in candidates:
        if target == ALL_LINEAR:
            if name in heads:
                continue
        elif not name_matches(name, target):
            continue
        if exclude is not None and name_matches(name, exclude):
            continue
        chosen.append(name)
    return chosen


def short_names(names: Iterable[str]) -> list[str]:
    """The distinct last components of dotted names (q_proj, k_proj, ...), for error messages."""
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def unmatched_entries(names: Iterable[str], target: list[str] | str) -> list[str]:
    """List entries of `target` that match none of `names` (a typo the user should hear about)."""
    if isinstance(target, str):
        return []
    names = list(names)
    return [entry for entry in target if not any(name_matches(n, [entry]) for n in names)]
