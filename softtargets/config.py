"""What the TOML-configured commands share: reading a config, resolving its paths and import paths."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed TOML file at ``path``; a clear error naming the file when it is not valid TOML."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
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


def import_object(path: str, what: str = "factory") -> Any:
    """``"package.module:attr[.attr]"`` -> the object.

    A malformed path raises ValueError; a missing module or attribute raises ImportError; both
    messages name ``what`` and the path.
    """
    module_path, sep, attr_path = str(path).partition(":")
    if not sep or not module_path or not attr_path:
        raise ValueError(f"{what}: expected an import path 'package.module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_path)
    except ImportError as exc:
        raise ImportError(f"{what}: cannot import module {module_path!r} of {path!r}: {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"{what}: {path!r} not found ({part!r} missing)")
        obj = getattr(obj, part)
    return obj
