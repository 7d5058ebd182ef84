"""The manifest: what a target store holds, as a dataclass <-> ``manifest.json``.

The JSON form is defined by ``schemas/manifest.schema.json`` and
validated with :mod:`jsonschema` on every read and write. A store is complete only
when its ``manifest.json`` exists; writers write it last.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from ..choices import Content, Dtype, Layout, Normalization, Overflow, choices
from ..errors import ManifestError

# 2: zarr inner chunks end with a crc32c, and files record ``chunks_sha256``. 3: optional fields for new
# features (``sequences``: rows grouped into token sequences; ``hints``, ``specialists``: arrays beside the
# logits; ``views``: augmented views; ``compact``: packed compact rows; ``crc32c`` of wds shard files).
# Readers read 1, 2 and 3.
FORMAT_VERSION = 3
READS_FORMATS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
SCHEMA_NAME = "manifest.schema.json"
CONTENTS = choices(Content)
DTYPES = choices(Dtype)
LAYOUTS = choices(Layout)


@dataclass
class FileRecord:
    """One data file of a store: path relative to the root, size in bytes, sha256 hex; for zarr shard files
    of format 2, ``chunks_sha256``: sha256 hex of the file's inner-chunk crc32c trailers and its shard index
    (:func:`softtargets.store.zarr_shards.chunks_digest`), which lets a reader check the chunks it reads
    without hashing the whole file; for wds shard files, ``crc32c``: the whole file's crc32c (8 hex digits,
    Castagnoli), which lazy readers check instead of the sha256 (about 4x faster to compute)."""

    path: str
    bytes: int
    sha256: str
    chunks_sha256: str | None = None
    crc32c: str | None = None


@dataclass
class ShardRecord:
    """One shard: rows ``[start, start + rows)`` and the files that hold them."""

    id: int
    start: int
    rows: int
    files: list[FileRecord]
    labeled: int = 0
    clipped: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.rows

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(**{**d, "files": [FileRecord(**f) for f in d["files"]]})


@dataclass
class Manifest:
    """Everything a reader needs to interpret a store; see the JSON schema for field meanings.

    ``logits`` are ``[num_samples, num_teachers, num_classes]`` for ``per_teacher``
    content, else ``[num_samples, num_classes]``.
    """

    layout: str
    num_samples: int
    num_classes: int
    content: Content
    num_teachers: int
    dtype: Dtype
    shard_rows: int
    block_rows: int
    teachers: list[dict[str, Any]] = field(default_factory=list)
    temperature: float | None = None
    normalization: Normalization = "zero_mean"
    overflow: Overflow = "error"
    clipped_values: int = 0
    has_labels: bool = False
    sample_layout: str | None = None
    inputs: dict[str, str] | None = None
    class_names: list[str] | None = None
    transfer_set: dict[str, str] | None = None
    shards: list[ShardRecord] = field(default_factory=list)
    created: str = ""
    softtargets_version: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # Optional (format 3): rows are token positions grouped into sequences; see softtargets.store.sequences.
    sequences: dict[str, Any] | None = None
    # Optional (format 3), absent from the JSON when None: arrays beside the logits (store/sidecars.py).
    hints: dict[str, Any] | None = None  # FitNets hints: name -> {teacher, module, array record}
    specialists: dict[str, Any] | None = None  # generalist + specialists (Hinton et al. §5), eq. 5's q
    # Optional (format 3): augmented views, rows view-major; see softtargets.store.views.
    views: dict[str, Any] | None = None
    compact: dict[str, Any] | None = None  # compact contents (topk/sampled/hidden): the packed record's fields

    @property
    def storage_dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the stored logits array: the stored dtype's (bfloat16 as uint16), or ``uint8``
        for compact rows (packed records)."""
        if self.compact is not None:
            return np.dtype("uint8")
        return np.dtype({"float32": "float32", "float16": "float16", "bfloat16": "uint16"}[self.dtype])

    @property
    def per_teacher(self) -> bool:
        return self.content == "per_teacher"

    @property
    def logits_shape(self) -> tuple[int, ...]:
        """Shape of the whole logits array: ``(N, K, C)`` or ``(N, C)``; compact rows: ``(N, row_bytes)``."""
        if self.compact is not None:
            return (self.num_samples, int(self.compact["row_bytes"]))
        if self.per_teacher:
            return (self.num_samples, self.num_teachers, self.num_classes)
        return (self.num_samples, self.num_classes)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_rows)

    def shard_range(self, shard_id: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` that shard ``shard_id`` holds."""
        start = shard_id * self.shard_rows
        return start, min(start + self.shard_rows, self.num_samples)

    @property
    def nbytes(self) -> int:
        """Bytes of all data files listed in the manifest."""
        return sum(f.bytes for s in self.shards for f in s.files)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for optional in ("hints", "specialists"):
            if d[optional] is None:
                del d[optional]
        if d.get("compact") is None:  # optional (format 3): absent for dense stores
            d.pop("compact", None)
        for shard in d["shards"]:
            shard["files"] = [{k: v for k, v in f.items() if v is not None} for f in shard["files"]]
        for optional in ("sequences", "views"):  # optional fields are absent, not null
            if d.get(optional) is None:
                d.pop(optional, None)
        return d

    def to_json(self) -> str:
        """The manifest as JSON, schema-checked. Shard records all come from :class:`ShardRecord`, so
        the first and the last stand for the rest: writing costs the same for 10 shards or 10 000
        (a reader, :meth:`from_json`, checks every record)."""
        d = self.to_dict()
        validate({**d, "shards": d["shards"][:1] + d["shards"][1:][-1:]})
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> Manifest:
        validate(d, source)
        kw = dict(d)
        kw["shards"] = [ShardRecord.from_dict(s) for s in d["shards"]]
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{source}: not valid JSON ({e})", path=source) from None
        return cls.from_dict(d, source)


@cache
def schema() -> dict[str, Any]:
    """The manifest JSON schema (installed package data, else the repo's ``schemas/``)."""
    packaged = resources.files("softtargets") / "schemas" / SCHEMA_NAME
    if packaged.is_file():
        return json.loads(packaged.read_text())
    return json.loads((Path(__file__).resolve().parents[2] / "schemas" / SCHEMA_NAME).read_text())


@cache
def _validator() -> Any:
    """A validator of :func:`schema`, made once. The schema itself is checked by the tests, not here: that
    check would be paid in every process (DataLoader workers included) before its first store opens."""
    return jsonschema.validators.validator_for(schema())(schema())


def validate(d: Any, source: str = "manifest") -> None:
    """Raise :class:`ManifestError` naming ``source`` unless ``d`` is a valid manifest of a format this reads."""
    if not isinstance(d, dict):
        raise ManifestError(f"{source}: a manifest is a JSON object, got {type(d).__name__}", path=source)
    version = d.get("format_version")
    if version not in READS_FORMATS:
        raise ManifestError(
            f"{source}: unknown format_version {version!r}; this softtargets reads format_version "
            f"{' and '.join(map(str, READS_FORMATS))} (a newer softtargets may read it)", path=source,
        )
    e = jsonschema.exceptions.best_match(_validator().iter_errors(d))  # as jsonschema.validate does
    if e is not None:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ManifestError(f"{source}: schema-invalid at {where}: {e.message}", path=source) from None
    if d["content"] == "arithmetic" and d.get("temperature") is None:
        raise ManifestError(f"{source}: an arithmetic store must record its temperature T0", path=source)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, Any]:
    """Command line and library versions of the running process, for the manifest."""
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("torch", "numpy", "zarr", "webdataset", "numcodecs", "dask"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            versions[name] = str(mod.__version__)
    return {"command": list(sys.argv), "versions": versions, "platform": platform_name()}


def platform_name() -> str:
    """The OS, release, machine and C library, as ``"Linux-6.1.0-x86_64-with-glibc2.36"``.

    Unlike ``platform.platform()``, it starts no subprocess (that one runs ``uname -p``): it is called
    on helper threads while DataLoader workers fork, and a forked child that inherits a subprocess's
    pipe leaves the thread reading it waiting forever.
    """
    if not hasattr(os, "uname"):  # Windows: platform.platform() reads the registry, no subprocess
        return platform.platform()
    u = os.uname()
    libc, version = platform.libc_ver()  # os.confstr, or reads the interpreter's binary
    parts = [u.sysname, u.release, u.machine] + (["with", libc + version] if libc else [])
    return "-".join(p.replace(" ", "_") for p in parts if p)
