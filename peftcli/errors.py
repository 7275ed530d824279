"""Errors a user can cause. The CLI prints them on one line each and exits with code 2."""

from __future__ import annotations


class PeftCliError(Exception):
    """A problem in the user's input (recipe, data, paths) with a message that says what to do."""

    exit_code = 2

    def lines(self) -> list[str]:
        """The message as the lines the CLI prints (one per problem when it names several)."""
        return str(self).splitlines() or [""]


class RecipeError(PeftCliError):
    """One or more problems in a recipe file, each already formatted as 'file: path: message'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class DataError(PeftCliError):
    """The training or validation data cannot be used as the recipe describes."""


class ModelError(PeftCliError):
    """The base model or tokenizer cannot be loaded or does not fit the recipe."""


class OutputError(PeftCliError):
    """The output directory cannot be written as asked (exists, not empty, not a run directory)."""


class AdapterError(PeftCliError):
    """A saved adapter cannot be read or does not match the model it is loaded onto."""


class VerificationError(PeftCliError):
    """A written artefact does not reproduce what it was made from (`--verify`); nothing is published."""

    exit_code = 1


class DiskFullError(OutputError):
    """A write failed because the disk (or quota) is full; what was half-written has been removed."""
