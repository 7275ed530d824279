"""What an import produces: the recipe as plain data, and an account of every source key it did not carry over."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftcli.errors import PeftCliError


class ConfigImportError(PeftCliError):
    """A source config that cannot be read or converted; the message names the file."""


@dataclass
class Unmapped:
    """One source key that the recipe does not carry (or carries only approximately), and why."""

    key: str
    reason: str

    def line(self) -> str:
        """The `key: reason` line printed and written as a comment."""
        return f"{self.key}: {self.reason}"


@dataclass
class ImportResult:
    """A converted config: the recipe mapping, the source tool, the unmapped keys and the defaults written out."""

    tool: str
    source: str
    recipe: dict[str, Any]
    unmapped: list[Unmapped] = field(default_factory=list)
    # (recipe key, value, why): values the source tool takes by default and peftcli would not.
    defaults: list[tuple[str, Any, str]] = field(default_factory=list)
