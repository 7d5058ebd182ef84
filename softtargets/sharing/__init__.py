"""Sharing a finished store: look at it, check it, convert it, merge or subset it.

- :mod:`.inspect`: what a store holds, its size and its targets at several temperatures.
- :mod:`.verify`: every file's size and checksum, the manifest, and keys unique over the store.
- :mod:`.convert`: another layout, content, dtype or shard size.
- :mod:`.combine`: merge stores, or keep a subset of rows.
- :mod:`.unique_keys`: key checks in bounded memory.

The dataset card written beside every manifest is part of the format: :mod:`softtargets.store.card`.
"""

from __future__ import annotations

from .combine import merge_stores, subset_store
from .convert import convert_store
from .inspect import inspect_store
from .verify import VerifyReport, verify_store

__all__ = ["VerifyReport", "convert_store", "inspect_store", "merge_stores", "subset_store", "verify_store"]
