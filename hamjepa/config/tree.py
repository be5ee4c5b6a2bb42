"""The config tree's machinery: nested dicts to frozen dataclasses and back, dotted keys, strict YAML values.

Every failure is a ConfigError (a UserError) with one sentence that names the dotted field or key, quotes the
value and says what would be valid; an unknown key suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from hamjepa.errors import UserError


class ConfigError(UserError):
    """The config tree's kind of UserError: one sentence that names the config field or key and what would be valid."""


def fail(path: str, value: Any, valid: str) -> None:
    raise ConfigError(f"config field '{path}' = {value!r} is invalid: {valid}.")


def check(ok: bool, path: str, value: Any, valid: str) -> None:
    if not ok:
        fail(path, value, valid)


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, name + "."))
        else:
            flat[name] = value
    return flat


def unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{full}'{hint}")


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            valid = sorted(node) if isinstance(node, dict) else []
            raise unknown_key(".".join(parts[:depth]), part, valid)
        if depth == len(parts) - 1:
            if isinstance(node[part], dict):
                raise ConfigError(f"config key '{key}' is a section; set one of its fields, e.g. '{key}."
                                 f"{next(iter(node[part]))}'.")
            node[part] = _parse_value(key, value) if isinstance(value, str) else value
        else:
            node = node[part]


def _parse_value(key: str, text: str) -> Any:
    """A dotted override's value as YAML (`3`, `0.1`, `true`, `null`, `[1, 2]`); one sentence when it is not YAML."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as error:
        fail(key, text, f"it is not a YAML value ({yaml_problem(error)})")


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or fail naming the field."""
    if isinstance(hint, types.UnionType):  # `float | None`: null stays None, anything else is a float
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint in (int, float) and isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
        try:
            value = float(value) if hint is float else int(value)
        except ValueError:
            fail(path, value, f"must be of type {hint.__name__}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        check(math.isfinite(value), path, value, "must be a finite number")
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    fail(path, value, f"must be of type {hint.__name__}")


def build(tree: Mapping[str, Any], cls: type, path: str = "") -> Any:
    """Build a (sub)config of dataclass `cls` from a nested mapping; unknown keys and wrong types are errors."""
    if not isinstance(tree, Mapping):
        fail(path or "<root>", tree, "must be a mapping of config keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in tree.items():
        if key not in fields:
            raise unknown_key(path, str(key), sorted(fields))
        hint = hints[key]
        sub = f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(value, hint, sub)
        else:
            kwargs[key] = _coerce(value, hint, sub)
    return cls(**kwargs)


def field_type(cls: type, key: str) -> type:
    """The declared type of the dotted field `key` of dataclass `cls` (`float | None` gives float); one sentence,
    with the closest valid key, when there is no such field or it is a section."""
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        if part not in fields:
            raise unknown_key(".".join(parts[:depth]), part, sorted(fields))
        hint = hints[part]
        if isinstance(hint, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"config key '{key}' is a section; name one of its fields, e.g. '{key}."
                                  f"{dataclasses.fields(hint)[0].name}'.")
            return hint
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"config key '{key}' is invalid: '{'.'.join(parts[:depth + 1])}' is a field, not a "
                              "section.")
        cls = hint
    raise ConfigError(f"config key {key!r} is empty.")


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key written twice in one mapping is an error, not "the last wins"."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: later keys may override merged ones
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is written twice (lines {seen[key]} and {line}); keep one")
        if isinstance(key, typing.Hashable):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_problem(error: yaml.YAMLError) -> str:
    """The first line of a YAML error, with its position, without the source excerpt PyYAML appends."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None:
        return str(error).splitlines()[0]
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark else problem
