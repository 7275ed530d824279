"""The last step of every import: the recipe must validate as peftcli's own recipes do."""

from __future__ import annotations

from peftcli.errors import RecipeError
from peftcli.recipe.importers.result import ConfigImportError, ImportResult
from peftcli.recipe.load import validate_recipe_dict


def validated(result: ImportResult) -> ImportResult:
    """The result once its recipe validates. A launch preset the recipe refuses (ZeRO-3 with a quantized base,
    FSDP2 with 8-bit layers) is dropped and listed; any other problem is an error naming the source file."""
    source = f"{result.source} (imported)"
    try:
        validate_recipe_dict(result.recipe, source)
        return result
    except RecipeError as error:
        problems = error.problems
    if "launch" in result.recipe and any("launch" in p for p in problems):
        preset = result.recipe.pop("launch")["preset"]
        why = next(p for p in problems if "launch" in p).split(": ", 2)[-1]
        for item in result.unmapped:
            if f"launch.preset {preset}" in item.reason:
                item.reason = f"left out: launch.preset {preset} is refused for this recipe ({why})"
        try:
            validate_recipe_dict(result.recipe, source)
            return result
        except RecipeError as error:
            problems = error.problems
    problems = [p.removeprefix(f"{source}: ") for p in problems]
    raise ConfigImportError(f"{result.source}: the imported recipe does not validate: {'; '.join(problems)}")
