"""Turn pydantic validation errors into one short line per problem: file, dotted path, what to do."""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationError


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model reachable by unwrapping Optional/Union/Annotated/list/dict of an annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    found: list[type[BaseModel]] = []
    if origin in (Union, types.UnionType, list, tuple, dict):
        for arg in typing.get_args(annotation):
            found.extend(_models_in(arg))
    return found


def _tag_of(model: type[BaseModel]) -> set[str]:
    tags = {model.__name__}
    name_field = model.model_fields.get("name")
    if name_field is not None and isinstance(name_field.default, str):
        tags.add(name_field.default)
    return tags


def _is_union(annotation: Any) -> bool:
    """True when a field accepts one of several types (Optional alone does not count)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_union(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(members) > 1 or (len(members) == 1 and _is_union(members[0]))
    return False


def walk(root: type[BaseModel], loc: tuple) -> tuple[str, list[type[BaseModel]]]:
    """The dotted path a user wrote for an error location, and the models that could hold its last key."""
    parts: list[str] = []
    candidates: list[type[BaseModel]] = [root]
    after_union = False  # pydantic puts the union member's label (a tag, or e.g. 'list[str]') after the field
    for index, item in enumerate(loc):
        is_last = index == len(loc) - 1
        if isinstance(item, int):
            after_union = False
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
            continue
        holder = next((m for m in candidates if item in m.model_fields), None)
        if holder is not None:
            parts.append(item)
            after_union = _is_union(holder.model_fields[item].annotation)
            if not is_last:
                candidates = _models_in(holder.model_fields[item].annotation)
            continue
        tagged = [m for m in candidates if item in _tag_of(m)]
        if after_union:
            after_union = False
            candidates = tagged or candidates  # a union member's label: the user never wrote it
            continue
        if tagged and not is_last:
            candidates = tagged  # a union tag in the location: the user never wrote it
            continue
        parts.append(str(item))
    return ".".join(parts), candidates


def suggest(word: str, options: list[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_PLAIN_TYPES = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
}


def _describe_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_error(root: type[BaseModel], error: dict) -> str:
    """'path: message' for one pydantic error dict."""
    path, holders = walk(root, tuple(error["loc"]))
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        fields = sorted({f for m in holders for f in m.model_fields})
        hint = suggest(key, fields)
        if not hint:
            hint = f"; allowed here: {', '.join(fields)}" if len(fields) <= 12 else "; see `peft recipe schema`"
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag", ""))
        expected = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        where = f"{path}.name" if path else "name"
        return f"{where}: unknown method '{tag}'{suggest(tag, expected)}; available: {', '.join(expected)}"
    if kind == "union_tag_not_found":
        return f"{path}: needs a 'name' key that picks the method"
    if kind == "literal_error":
        given = error.get("input")
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = suggest(str(given), options) if isinstance(given, str) else ""
        return f"{path}: expected one of {ctx.get('expected')}, got {_describe_input(given)}{hint}"
    if kind in _PLAIN_TYPES:
        return f"{path}: expected {_PLAIN_TYPES[kind]}, got {_describe_input(error.get('input'))}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: expected a mapping of keys, got {_describe_input(error.get('input'))}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        return f"{path}: {message}" if path else message
    return f"{path}: {message[0].lower() + message[1:]}, got {_describe_input(error.get('input'))}"


def format_validation_error(source: str, root: type[BaseModel], exc: ValidationError) -> list[str]:
    """One line per problem, each prefixed with the recipe file name."""
    lines: list[str] = []
    # The members of a union (e.g. list[str] | str) each reject the same value: one line naming every type.
    type_errors: dict[tuple[str, str], tuple[int, list[str]]] = {}
    for error in exc.errors(include_url=False):
        line = f"{source}: {describe_error(root, error)}"
        if error["type"] in _PLAIN_TYPES:
            path, _ = walk(root, tuple(error["loc"]))
            key = (path, _describe_input(error.get("input")))
            expected = _PLAIN_TYPES[error["type"]]
            if key in type_errors:
                index, kinds = type_errors[key]
                if expected not in kinds:
                    kinds.append(expected)
                lines[index] = f"{source}: {path}: expected {' or '.join(kinds)}, got {key[1]}"
                continue
            type_errors[key] = (len(lines), [expected])
        if line not in lines:
            lines.append(line)
    return lines
