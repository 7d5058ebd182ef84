"""Views: a store of the targets of augmented views, one row per (view, sample), and the views' parameters.

A views store of ``N`` samples and ``V`` views holds ``N * V`` rows, **view-major**: row ``r`` is view
``r // N`` of sample ``r % N``, keyed ``"{sample key}#{view}"``. Every other part of the store (layouts,
shards, checksums, contents) is that of any store of ``N * V`` rows. The manifest's ``views`` says so:

```
"views": {"count": V, "samples": N, "seed": s, "order": "view_major",
          "params": [{"name": "dx", "dtype": "float32"}, ...], "augment": "module.function",
          "files": [{"path": "views/params-000000.npy", "bytes": ..., "sha256": ...}, ...]}
```

The parameters of each shard's rows are one ``.npy`` file per shard (``views/params-{shard:06d}.npy``, a
numpy structured array with one named field per parameter, ``[rows]``, read with ``allow_pickle=False``);
the manifest lists its size and sha256, and readers check both before using it.

View ``v`` of the sample keyed ``key`` is made by ``augment(x, rng)`` with ``rng`` a ``torch.Generator``
seeded by :func:`view_seed`: the first 8 bytes (little-endian, top bit cleared) of
``sha256("softtargets.view\\0{seed}\\0{key}\\0{v}")``. Any process, on any machine, makes the same view.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Number
from typing import Any

import numpy as np
import torch

from ..errors import ChecksumError, StoreError
from .files import atomic_write, join, sha256_hex
from .manifest import FileRecord, Manifest

VIEW_SEP = "#"
PARAMS_DIR = "views"
ORDER = "view_major"
# Parameter dtypes a store declares (numpy names).
PARAM_DTYPES = ("float32", "float16", "float64", "int32", "int16", "int8", "uint8", "int64")

__all__ = [
    "PARAM_DTYPES", "ViewParams", "Views", "params_file", "params_problems", "split_view_key", "view_generator",
    "view_key", "view_seed", "views_of", "write_params_files",
]


def view_key(key: str, view: int) -> str:
    """The stored key of view ``view`` of the sample keyed ``key``: ``"{key}#{view}"``."""
    return f"{key}{VIEW_SEP}{int(view)}"


def split_view_key(stored: str) -> tuple[str, int]:
    """``(sample key, view)`` of a stored key ``"{key}#{view}"`` (the key itself may hold ``#``)."""
    key, _, view = str(stored).rpartition(VIEW_SEP)
    return key, int(view)


def view_seed(seed: int, key: str, view: int) -> int:
    """The seed of view ``view`` of the sample keyed ``key`` in a store of seed ``seed``: a stable hash (sha256,
    never Python's ``hash``), an int in ``[0, 2**63)``."""
    digest = hashlib.sha256(f"softtargets.view\0{int(seed)}\0{key}\0{int(view)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def view_generator(seed: int, key: str, view: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`view_seed`: the ``rng`` an augmentation gets for this view."""
    return torch.Generator().manual_seed(view_seed(seed, key, view))


def params_file(shard_id: int) -> str:
    """Relative path of shard ``shard_id``'s parameter file."""
    return posixpath.join(PARAMS_DIR, f"params-{int(shard_id):06d}.npy")


def params_dtype(params: Sequence[Mapping[str, str]]) -> np.dtype:
    """The structured numpy dtype of declared parameters ``[{"name", "dtype"}, ...]`` (little-endian)."""
    return np.dtype([(p["name"], np.dtype(p["dtype"]).newbyteorder("<")) for p in params])


def declare_params(example: Mapping[str, Any], dtypes: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The declaration of an augmentation's parameters: names in the order ``example`` (one call's parameters)
    gives them; dtypes from ``dtypes`` where given, else ``uint8`` for bools, ``int32`` for ints, ``float32``
    for other numbers.

    Raises:
        ValueError: a parameter is not a number, or a declared dtype is not one of :data:`PARAM_DTYPES`.
    """
    out = []
    for name, value in example.items():
        if dtypes and name in dtypes:
            dtype = str(dtypes[name])
        elif isinstance(value, (bool, np.bool_)):
            dtype = "uint8"
        elif isinstance(value, (int, np.integer)):
            dtype = "int32"
        elif isinstance(value, (Number, np.number)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            dtype = "float32"
        else:
            raise ValueError(f"view parameter {name!r} is {type(value).__name__}; parameters are numbers")
        if dtype not in PARAM_DTYPES:
            raise ValueError(f"view parameter {name!r}: dtype {dtype!r} is not one of {list(PARAM_DTYPES)}")
        out.append({"name": str(name), "dtype": dtype})
    if not out:
        raise ValueError("the augmentation returned no parameters: replay needs them (a flat dict of numbers)")
    return out


def encode_params(rows: Sequence[Mapping[str, Any]], params: Sequence[Mapping[str, str]]) -> np.ndarray:
    """One structured row per view from the augmentation's parameter dicts, each checked: the declared names,
    and values that the declared dtype holds exactly (else replay would rebuild another view).

    Raises:
        ValueError: names differ from the declaration, or a value changes when stored.
    """
    dtype = params_dtype(params)
    names = [p["name"] for p in params]
    out = np.zeros(len(rows), dtype)
    for i, row in enumerate(rows):
        if sorted(row) != sorted(names):
            raise ValueError(f"view parameters {sorted(row)} differ from the declared {sorted(names)}")
        for name in names:
            value = row[name]
            value = value.item() if isinstance(value, (torch.Tensor, np.generic)) else value
            out[name][i] = value
            if float(out[name][i]) != float(value):
                raise ValueError(
                    f"view parameter {name!r} = {value!r} is not exactly a {dtype[name]}: round it to the "
                    f"declared dtype before applying it (e.g. float(torch.tensor(v, dtype=torch.float32))), "
                    "so replay rebuilds the very view the teachers saw")
    return out


def npy_file(arr: np.ndarray) -> bytes:
    """``arr`` as the bytes ``np.save`` writes (structured dtypes included; never pickles)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_params_files(writer: Any, shard_params: Callable[[int, int], np.ndarray]) -> None:
    """Write each shard's parameter file of a views store being written, and list them in
    ``writer.spec.views["files"]`` for the manifest written next.

    Args:
        writer: an open ``TargetWriter`` created with ``views=`` (the declaration).
        shard_params: ``(start, stop) -> structured [stop - start]``, the parameters of rows ``[start, stop)``.
    """
    spec = writer.spec
    dtype = params_dtype(spec.views["params"])
    files = []
    for sid in range(spec.num_shards):
        start, stop = spec.shard_range(sid)
        arr = np.asarray(shard_params(start, stop))
        if arr.dtype != dtype or arr.shape != (stop - start,):
            raise ValueError(f"parameters of rows {start}-{stop - 1}: {arr.dtype} {arr.shape}, expected {dtype} "
                             f"({stop - start},)")
        blob = npy_file(arr)
        rel = params_file(sid)
        writer.fs.makedirs(join(writer.root, PARAMS_DIR), exist_ok=True)
        atomic_write(writer.fs, join(writer.root, rel), blob)
        files.append({"path": rel, "bytes": len(blob), "sha256": sha256_hex(blob)})
    spec.views["files"] = files


@dataclass(frozen=True)
class Views:
    """The manifest's ``views``: ``count`` V views of each of ``samples`` N samples, rows view-major."""

    count: int
    samples: int
    seed: int
    params: list[dict[str, str]]
    files: list[FileRecord]
    augment: str | None = None

    @property
    def names(self) -> list[str]:
        return [p["name"] for p in self.params]

    def rows_of_view(self, view: int) -> tuple[int, int]:
        """Rows ``[a, b)`` of view ``view`` (every sample's)."""
        return int(view) * self.samples, (int(view) + 1) * self.samples

    def row(self, sample: Any, view: Any) -> Any:
        """Row of view ``view`` of sample ``sample`` (ints or arrays)."""
        return view * self.samples + sample

    def split(self, rows: Any) -> tuple[Any, Any]:
        """``(sample, view)`` of rows (ints, numpy or torch integer arrays)."""
        return rows % self.samples, rows // self.samples

    def declaration(self, samples: int | None = None) -> dict[str, Any]:
        """The manifest's ``views`` of a store derived from this one, without its files (written with the store):
        the same views, of ``samples`` samples (default the same)."""
        return {"count": self.count, "samples": self.samples if samples is None else int(samples), "seed": self.seed,
                "order": ORDER, "params": [dict(p) for p in self.params], "augment": self.augment}


def views_of(manifest: Manifest) -> Views | None:
    """The store's views, or None for a store of one target per sample."""
    d = getattr(manifest, "views", None)
    if not d:
        return None
    return Views(count=int(d["count"]), samples=int(d["samples"]), seed=int(d["seed"]), params=list(d["params"]),
                 files=[FileRecord(**f) for f in d.get("files", [])], augment=d.get("augment"))


def params_problems(fs: Any, root: str, manifest: Manifest) -> list[tuple[str, str]]:
    """``(relative path, what is wrong)`` for each parameter file of a views store that is not as the manifest says:
    named as its shard's, present, of its recorded size and sha256, an array of the declared dtype and the
    shard's rows. ``[]`` for a sound views store, or a store without views."""
    views = views_of(manifest)
    if views is None:
        return []
    out: list[tuple[str, str]] = []
    if len(views.files) != manifest.num_shards:
        out.append(("manifest.json", f"lists {len(views.files)} view parameter files for {manifest.num_shards} shards"))
    dtype = params_dtype(views.params)
    for sid, rec in enumerate(views.files[:manifest.num_shards]):
        if rec.path != params_file(sid):
            out.append(("manifest.json", f"names {rec.path!r} for shard {sid}'s view parameters, not "
                                         f"{params_file(sid)!r}"))
            continue
        try:
            blob = fs.cat_file(join(root, rec.path))
        except FileNotFoundError:
            out.append((rec.path, f"missing (view parameters of shard {sid})"))
            continue
        if len(blob) != rec.bytes:
            out.append((rec.path, f"{len(blob)} bytes, the manifest says {rec.bytes}"))
        elif sha256_hex(blob) != rec.sha256:
            out.append((rec.path, "sha256 does not match the manifest (corrupt or altered file)"))
        else:
            arr = np.load(io.BytesIO(blob), allow_pickle=False)
            rows = manifest.shards[sid].rows if sid < len(manifest.shards) else -1
            if arr.dtype != dtype or arr.shape != (rows,):
                out.append((rec.path, f"holds {arr.dtype} {arr.shape}, the manifest declares {dtype} ({rows},)"))
    return out


class ViewParams:
    """The parameters of a views store's rows, read per shard (checked against the manifest's size and sha256
    once per process) and kept: ``take(rows)`` -> ``{name: tensor [B]}``.

    Args:
        store: an open store (``TargetStore``) whose manifest declares views.
    """

    def __init__(self, store: Any) -> None:
        views = views_of(store.manifest)
        if views is None:
            raise StoreError(f"{store.url}: not a views store (its manifest declares no views)", path=str(store.url))
        self.store, self.views = store, views
        self.dtype = params_dtype(views.params)
        self._shards: dict[int, np.ndarray] = {}
        self._columns: dict[int, dict[str, np.ndarray]] = {}
        m = store.manifest
        if len(views.files) != m.num_shards:
            raise StoreError(f"{store.url}: the manifest lists {len(views.files)} view parameter files for "
                             f"{m.num_shards} shards", path=str(store.url))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}, "_columns": {}}

    def shard(self, shard_id: int) -> np.ndarray:
        """Shard ``shard_id``'s parameters, structured ``[rows]``."""
        got = self._shards.get(shard_id)
        if got is not None:
            return got
        store, rec = self.store, self.views.files[shard_id]
        url = posixpath.join(str(store.url).rstrip("/"), rec.path)
        if rec.path != params_file(shard_id):
            raise StoreError(f"{url}: the manifest names {rec.path!r} for shard {shard_id}'s view parameters, not "
                             f"{params_file(shard_id)!r}; refused", path=url, shard=shard_id)
        try:
            blob = store.fs.cat_file(join(store.root, rec.path))
        except FileNotFoundError:
            raise StoreError(f"{url}: missing (view parameters of shard {shard_id})", path=url,
                             shard=shard_id) from None
        if store.verify_mode != "none":
            if len(blob) != rec.bytes:
                raise StoreError(f"{url}: {len(blob)} bytes, the manifest says {rec.bytes}", path=url, shard=shard_id)
            if sha256_hex(blob) != rec.sha256:
                raise ChecksumError(f"{url}: sha256 does not match the manifest (corrupt or altered file)", path=url,
                                    shard=shard_id, expected=rec.sha256, found=sha256_hex(blob))
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
        rows = store.manifest.shards[shard_id].rows
        if arr.dtype != self.dtype or arr.shape != (rows,):
            raise StoreError(f"{url}: holds {arr.dtype} {arr.shape}, the manifest declares {self.dtype} ({rows},)",
                             path=url, shard=shard_id)
        self._shards[shard_id] = arr
        return arr

    def rows(self, rows: Any) -> np.ndarray:
        """Structured parameters of store rows ``rows`` (int64 array-like), in that order."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        m = self.store.manifest
        out = np.zeros(len(idx), self.dtype)
        sids = idx // m.shard_rows
        for sid in np.unique(sids):
            at = sids == sid
            out[at] = self.shard(int(sid))[idx[at] - int(sid) * m.shard_rows]
        return out

    def columns(self, shard_id: int) -> dict[str, np.ndarray]:
        """Shard ``shard_id``'s parameters as one contiguous array ``[rows]`` per name."""
        got = self._columns.get(shard_id)
        if got is None:
            arr = self.shard(shard_id)
            got = self._columns[shard_id] = {name: np.ascontiguousarray(arr[name]) for name in self.views.names}
        return got

    def take(self, rows: Any) -> dict[str, torch.Tensor]:
        """``{name: tensor [B]}`` of the parameters of store rows ``rows`` (torch dtypes as declared)."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        shard_rows = self.store.manifest.shard_rows
        if len(idx) and idx.min() // shard_rows == idx.max() // shard_rows:  # one shard (a batch, mostly)
            sid = int(idx[0]) // shard_rows
            local = idx - sid * shard_rows
            return {name: torch.from_numpy(col[local]) for name, col in self.columns(sid).items()}
        arr = self.rows(idx)
        # a copy per field: a structured field's strides are the row's size, which torch refuses (even for 1 row)
        return {name: torch.from_numpy(arr[name].copy()) for name in self.views.names}
