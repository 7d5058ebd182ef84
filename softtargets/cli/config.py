"""What the TOML-configured commands share: reading a config, resolving its paths and import paths."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from ..text import plural

_JSON_TYPES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "object": "a table", "array": "a list", "null": "absent"}


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed TOML file at ``path``; a clear error naming the file when it is not valid TOML."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ImportError("reading TOML configs on Python 3.10 needs tomli: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def resolve_path(value: str, base: Path) -> str:
    """``value`` relative to the config's folder ``base``, unless it is absolute or a URL."""
    if "://" in value or value.startswith("pipe:") or os.path.isabs(value):
        return value
    return str(base / value)


@functools.cache
def config_schema(name: str) -> dict[str, Any]:
    """The JSON schema ``schemas/<name>.schema.json`` (installed package data, else the repo's ``schemas/``)."""
    file = f"{name}.schema.json"
    packaged = resources.files("softtargets") / "schemas" / file
    if packaged.is_file():
        return json.loads(packaged.read_text())
    return json.loads((Path(__file__).resolve().parents[2] / "schemas" / file).read_text())


@functools.cache
def _validator(name: str) -> Any:
    schema = config_schema(name)
    return jsonschema.validators.validator_for(schema)(schema)


def validate_config(raw: dict[str, Any], schema: str, path: str | os.PathLike[str]) -> None:
    """Check a parsed TOML config against ``schemas/<schema>.schema.json``.

    Raises:
        ValueError: one line naming ``path``, the key at fault and what it should be (an unknown key, a
            value of the wrong type or out of range, a missing key).
    """
    # What is wrong inside a table before what is missing, and a missing key deep down before a missing table.
    errors = sorted(_validator(schema).iter_errors(raw), key=lambda e: (e.validator == "required", -len(e.path)))
    if errors:
        raise ValueError(f"{path}: {_describe(jsonschema.exceptions.best_match(errors[:1]))}")


def _where(location: Sequence[Any]) -> str:
    """A TOML location: ``[]`` -> "the top level", ``["output"]`` -> "[output]", ``["teachers", 1]`` ->
    "teachers[1]"."""
    if not location:
        return "the top level"
    head, *rest = location
    text = f"[{head}]" if not rest or not isinstance(rest[0], int) else str(head)
    for part in rest:
        text += f"[{part}]" if isinstance(part, int) else f" {part}"
    return text


def _key(location: Sequence[Any]) -> str:
    """The key at ``location`` as written in the file: ``batch_size``, ``[output] shard_rows``, ``teachers[0]``."""
    if len(location) == 1:
        return str(location[0])
    *table, last = location
    return f"{_where(table)} {last}" if not isinstance(last, int) else _where(location)


def _toml_type(value: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "a list"}
    return names.get(type(value), type(value).__name__)


def _expected(types: str | Sequence[str]) -> str:
    return " or ".join(_JSON_TYPES.get(t, t) for t in ([types] if isinstance(types, str) else types))


def _types(schema: dict[str, Any]) -> list[str]:
    """The JSON types a (sub)schema allows, for messages: its ``type``, else those of its ``enum`` values."""
    if "type" in schema:
        return [schema["type"]] if isinstance(schema["type"], str) else list(schema["type"])
    return [repr(v) for v in schema.get("enum", [])]


def _describe(e: jsonschema.exceptions.ValidationError) -> str:
    loc, value = list(e.absolute_path), e.instance
    if e.validator == "additionalProperties":
        unknown = sorted(set(value) - set(e.schema.get("properties", {})))
        names = ", ".join(repr(k) for k in unknown)
        allowed = ", ".join(sorted(e.schema.get("properties", {})))
        return f"{plural(len(unknown), 'unknown key')} in {_where(loc)}: {names}; allowed: {allowed}"
    if e.validator == "required":
        missing = [k for k in e.validator_value if k not in value]
        if not loc and missing[0] == "teachers":
            return "no [[teachers]]: add one table per teacher"
        if not loc:
            return f"missing [{missing[0]}]"
        return f"{_where(loc)} needs {missing[0]}"
    if e.validator == "minItems" and loc == ["teachers"]:
        return "[[teachers]] must list at least one teacher"
    shown = f"{_key(loc)} = {value!r}" if not isinstance(value, dict | list) else _key(loc)
    if e.validator == "type":
        return f"{shown} must be {_expected(e.validator_value)}, not {_toml_type(value)}"
    if e.validator in ("anyOf", "oneOf"):
        return f"{shown} must be {_expected([t for sub in e.validator_value for t in _types(sub)])}"
    if e.validator == "enum":
        return f"{shown} must be one of {', '.join(repr(v) for v in e.validator_value)}"
    if e.validator in ("minLength", "minItems"):
        return f"{shown} must not be empty"
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if e.validator in bounds:
        return f"{shown} must be {bounds[e.validator]} {e.validator_value}"
    return f"{shown}: {e.message}"
