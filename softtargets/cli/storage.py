"""Storage options on the command line and in TOML configs: ``--storage-option KEY=VALUE`` and ``[storage]``.

Storage options are fsspec's keyword arguments for a store's filesystem (s3fs: ``key``, ``secret``,
``client_kwargs.endpoint_url``, ``anon`` ...). They go to every filesystem a command opens (the store, a
destination, dask workers with the job) and are never written into a store, its manifest or its card, nor
printed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["add_storage_args", "merge_options", "parse_storage_option", "storage_options"]

_HELP = ("fsspec storage option for the store's filesystem, e.g. client_kwargs.endpoint_url=http://host:9000 or "
         "key=... (repeatable; a dotted KEY nests; a VALUE that parses as JSON is taken as JSON, else as a string)")


def parse_storage_option(text: str) -> dict[str, Any]:
    """``"a.b=1"`` -> ``{"a": {"b": 1}}``: a dotted key nests; the value is JSON where it parses, else the string.

    Raises:
        ValueError: no ``=``, or an empty key or key part.
    """
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"--storage-option {text!r}: expected KEY=VALUE (a dotted KEY nests, e.g. "
                         "client_kwargs.endpoint_url=http://host:9000)")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def merge_options(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``, nested tables merged key by key (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_options(out[key], value)
        else:
            out[key] = value
    return out


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--storage-option KEY=VALUE`` (repeatable) to a command's parser."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        dest="storage_option", help=_HELP)


def storage_options(args: argparse.Namespace, config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The storage options of a command: the config's ``[storage]`` table (``config``), then every
    ``--storage-option`` in order; None when there are none."""
    out: dict[str, Any] = dict(config or {})
    for text in getattr(args, "storage_option", None) or []:
        out = merge_options(out, parse_storage_option(text))
    return out or None
