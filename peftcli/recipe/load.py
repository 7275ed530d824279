"""Read a recipe file: YAML, `${VAR}` expansion, `--set a.b=c` overrides, strict validation."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from peftcli.errors import PeftCliError, RecipeError
from peftcli.recipe.errors import format_validation_error, suggest, walk
from peftcli.recipe.schema import Recipe

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path: str, problems: list[str], source: str) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; an unset VAR without default is an error."""
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), problems, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", problems, source) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(f"{source}: {path}: environment variable {name} is not set (or write ${{{name}:-default}})")
        return match.group(0)

    return _ENV_PATTERN.sub(replace, value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.max_steps=10' -> (['training', 'max_steps'], 10); the value is read as YAML."""
    if "=" not in text:
        raise PeftCliError(f"--set {text}: expected KEY=VALUE, e.g. --set training.max_steps=10")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise PeftCliError(f"--set {text}: the key must be a dotted path like training.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def _check_override_path(data: dict, keys: list[str], text: str) -> None:
    """Refuse an override whose key the schema does not have, with a suggestion."""
    loc: list[Any] = []
    for index, key in enumerate(keys):
        if isinstance(key, int):  # an entry of a list (data.train.1.weight), checked by apply_overrides
            loc.append(key)
            continue
        _, holders = walk(Recipe, tuple(loc + [key]))
        if index == 0:
            holders = [Recipe]
        if key == "name" and loc == ["method"]:
            return
        if loc == ["method"]:
            # the method's own keys depend on which method the recipe (after overrides) names
            method = data.get("method") if isinstance(data.get("method"), dict) else {}
            loc = ["method", method.get("name", "")]
            _, holders = walk(Recipe, tuple(loc + [key]))
        fields = sorted({f for m in holders for f in m.model_fields})
        if holders and key not in fields:
            where = ".".join(map(str, keys[:index])) or "top level"
            raise PeftCliError(f"--set {text}: no key '{key}' under {where}{suggest(key, fields)}")
        if not holders:
            return  # below a free-form mapping (e.g. data.train.columns)
        loc.append(key)


def _list_index(entries: list, key: str, above: list, text: str) -> int:
    """The entry a --set key names in a list (data.train.1.weight), or an error saying how to name one."""
    if key.isdigit() and int(key) < len(entries):
        return int(key)
    where = ".".join(map(str, above))
    raise PeftCliError(
        f"--set {text}: {where} is a list of {len(entries)} entries; name one by its index (0 to "
        f"{len(entries) - 1}), e.g. {where}.0.{'path' if key.isdigit() else key}"
    )


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of the raw recipe with each `--set KEY=VALUE` applied in order."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for index, key in enumerate(keys):
            last = index == len(keys) - 1
            if isinstance(node, list):  # a list of sources: the key is an entry's index
                keys[index] = key = _list_index(node, key, keys[:index], text)
            if not last:
                if not isinstance(node[key] if isinstance(node, list) else node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]
        node[keys[-1]] = value
        _check_override_path(data, keys, text)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last silently,
    so a second `method:` section would replace the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' appears twice in one mapping (first on line {seen[key] + 1}); keep one",
                    key_node.start_mark,
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_text_file(path: Path, what: str) -> str:
    """A text file as UTF-8, or an error naming the file and the first byte that is not."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PeftCliError(
            f"{path}: the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def read_recipe_dict(path: str | Path) -> dict:
    """The raw mapping of a recipe file, with YAML errors reported by line and column."""
    path = Path(path)
    if not path.is_file():
        raise PeftCliError(f"{path}: recipe file not found")
    text = read_text_file(path, "recipe")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PeftCliError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        raise PeftCliError(f"{path}: the recipe is empty; it needs model, method, data and output sections")
    if not isinstance(data, dict):
        raise PeftCliError(f"{path}: a recipe is a mapping of sections (model, method, ...), got {type(data).__name__}")
    return data


def _non_finite(value: Any, path: str) -> list[tuple[str, float]]:
    """Every inf or nan in a raw recipe (YAML reads .inf and .nan as numbers; no setting wants one)."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in _non_finite(v, f"{path}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, value)]
    return []


def validate_recipe_dict(data: dict, source: str) -> Recipe:
    """Validate a raw mapping; every problem of the file is reported at once."""
    problems: list[str] = []
    data = _expand_env(data, "", problems, source)
    problems += [f"{source}: {key}: {value} is not a finite number" for key, value in _non_finite(data, "")]
    if problems:
        raise RecipeError(problems)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(source, Recipe, exc)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    data = apply_overrides(read_recipe_dict(path), list(overrides))
    return validate_recipe_dict(data, str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe (defaults filled in) as plain data."""
    return recipe.model_dump(mode="json")


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, sections in recipe order."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)
