"""Objects named by import paths (``"package.module:attr"``), as configs and teacher specs name them.

Shared by stage one (teacher and transfer-set factories), stage two (students, datasets, schedules) and the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any


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
