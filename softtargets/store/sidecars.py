"""Arrays beside the logits: ``[N, D]`` per-row arrays a finished store carries in addition to its targets
(FitNets hints, specialists' logits, the eq. 5 combination), each declared in the manifest.

An array is named like a path (``hint/fc1``, ``specialist/s0``, ``combined``) and stored shard by shard, with
the store's ``shard_rows`` rows per file, so that it reads with plain zarr or plain webdataset:

* zarr layout: a Zarr v3 array at ``<name>`` in the store's group, ``[N, D]``, one chunk of
  ``[shard_rows, D]`` per shard (codecs ``bytes`` little-endian then ``crc32c``), file ``<name>/c/<i>/0``;
* wds layout: one tar per shard, ``<name with / as ->-NNNNNN.tar``, samples of ``block_rows`` rows with
  members ``index.npy`` (int64 ``[b]``, the rows' numbers) and ``<member>.npy`` (``[b, D]``).

Each array's record (in the manifest field that declares it) is ``{"array", "member", "shape", "dtype",
"files"}``, ``files`` one ``{"path", "bytes", "sha256"}`` per shard, in shard order. Arrays are written after
the store is finished (:class:`SidecarWriter`; the manifest is rewritten last, atomically), and read by
:class:`SidecarReader`, which checks each file's sha256 on its first read unless the store was opened with
``verify="none"``.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds
import zarr
from zarr.codecs import Crc32cCodec

from ..errors import ChecksumError, StoreError
from .files import atomic_write, file_record, join, sha256_hex
from .manifest import MANIFEST_NAME, FileRecord, Manifest
from .wds_layout import npy_bytes, npy_load
from .zarr_layout import ARRAY_CONFIG, _zarr_store

SIDECAR_DTYPES = ("float16", "float32")


def sidecar_records(m: Manifest) -> dict[str, dict[str, Any]]:
    """Every array the manifest declares beside the logits: name -> record (hints, specialists, combination)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in (m.hints or {}).values():
        out[rec["array"]] = rec
    if m.specialists:
        for rec in m.specialists.get("teachers", []):
            out[rec["array"]] = rec
        if m.specialists.get("combined"):
            out[m.specialists["combined"]["array"]] = m.specialists["combined"]
    return out


def sidecar_files(m: Manifest) -> list[FileRecord]:
    """The data files of every declared array (for ``verify``)."""
    return [FileRecord(**f) for rec in sidecar_records(m).values() for f in rec["files"]]


def sidecar_path_problems(m: Manifest) -> list[str]:
    """What is wrong with the declared arrays' records: a bad name, a shard count or a path that is not the
    layout's (``<name>/c/<i>/0`` or ``<name with / as ->-NNNNNN.tar``), a shape other than ``[N, D]``."""
    out = []
    for name, rec in sidecar_records(m).items():
        try:
            _check_name(name)
        except ValueError as e:
            out.append(str(e))
            continue
        if rec["shape"][0] != m.num_samples:
            out.append(f"array {name!r} has {rec['shape'][0]} rows, the store {m.num_samples}")
        if len(rec["files"]) != m.num_shards:
            out.append(f"array {name!r} lists {len(rec['files'])} files, the store has {m.num_shards} shards")
        for i, f in enumerate(rec["files"]):
            if f["path"] != sidecar_path(m.layout, name, i):
                out.append(f"array {name!r}, shard {i}: path {f['path']!r}, expected "
                           f"{sidecar_path(m.layout, name, i)!r}")
    return out


def sidecar_path(layout: str, name: str, shard_id: int) -> str:
    """The file holding shard ``shard_id`` of array ``name``."""
    if layout == "zarr":
        return f"{name}/c/{shard_id}/0"
    return f"{name.replace('/', '-')}-{shard_id:06d}.tar"


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or any(not p or p in (".", "..") or p.startswith(".") for p in parts) or \
            any(c in name for c in "\\:*?{}[] ") or parts[0] in ("logits", "labels", "keys") or \
            name.startswith("shard-"):
        raise ValueError(f"array name {name!r}: use letters, digits, '.', '_', '-' and '/' between parts, not "
                         "a name the store uses (logits, labels, keys, shard-)")
    return name


@dataclass
class _Open:
    arr: Any  # zarr.Array (zarr layout) or None (wds)
    width: int
    dtype: str
    member: str
    files: list[FileRecord]


class SidecarWriter:
    """Adds arrays to the finished store at ``store.url``; :meth:`commit` rewrites its manifest.

    Args:
        store: the finished store, open (:func:`softtargets.open_targets`).
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.m: Manifest = store.manifest
        self.fs, self.root = store.fs, store.root
        self._open: dict[str, _Open] = {}

    def begin(self, name: str, width: int, dtype: str, member: str) -> None:
        """Start array ``name`` ``[N, width]`` of ``dtype`` (tar member ``<member>.npy`` in the wds layout); then
        :meth:`put` every shard in order and :meth:`end` it. Several arrays may be open at once.

        Raises:
            ValueError: a bad name, dtype or member, or an array of that name already begun.
        """
        _check_name(name)
        if dtype not in SIDECAR_DTYPES:
            raise ValueError(f"array dtype {dtype!r}; expected one of {SIDECAR_DTYPES}")
        if not member.replace("_", "").isalnum():
            raise ValueError(f"member {member!r}: letters, digits and '_' only")
        if name in self._open:
            raise ValueError(f"array {name!r} begun twice")
        m = self.m
        arr = None
        if m.layout == "zarr":
            group = zarr.open_group(_zarr_store(self.fs, self.root, read_only=False), mode="r+")
            arr = group.create_array(name, shape=(m.num_samples, width), dtype=dtype, chunks=(m.shard_rows, width),
                                     compressors=(Crc32cCodec(),), fill_value=0, overwrite=True,
                                     dimension_names=("sample", "feature"),
                                     config=ARRAY_CONFIG)
        self._open[name] = _Open(arr, width, dtype, member, [])

    def put(self, name: str, shard_id: int, rows: np.ndarray) -> None:
        """Shard ``shard_id``'s rows ``[shard rows, width]`` (any float dtype) of array ``name``, written now.

        Raises:
            ValueError: a shard out of order or of the wrong shape; values not finite or beyond float16's range
                (``|x| > 65504``) for a float16 array.
        """
        o = self._open[name]
        m = self.m
        if shard_id != len(o.files):
            raise ValueError(f"array {name!r}: shard {shard_id} given, expected shard {len(o.files)}")
        start, stop = m.shard_range(shard_id)
        data = np.asarray(rows, dtype=np.float32)
        if data.shape != (stop - start, o.width):
            raise ValueError(f"array {name!r}: shard {shard_id} has shape {list(data.shape)}, expected "
                             f"[{stop - start}, {o.width}]")
        if not np.isfinite(data).all() or (o.dtype == "float16" and np.abs(data).max(initial=0) > 65504):
            raise ValueError(f"array {name!r}: shard {shard_id} holds values that are not finite or do not fit "
                             f"{o.dtype} (|x| <= 65504 for float16); store it as float32")
        stored = data.astype(o.dtype)
        rel = sidecar_path(m.layout, name, shard_id)
        if o.arr is not None:
            o.arr[start:stop] = stored
            o.files.append(file_record(self.fs, self.root, rel))
        else:
            blob = self._tar(start, stored, o.member)
            atomic_write(self.fs, join(self.root, rel), blob, fsync=False)
            o.files.append(file_record(self.fs, self.root, rel, blob))

    def end(self, name: str) -> dict[str, Any]:
        """Finish array ``name``; its record for the manifest (:meth:`commit` writes it).

        Raises:
            ValueError: not every shard was given.
        """
        o = self._open.pop(name)
        m = self.m
        if len(o.files) != m.num_shards:
            raise ValueError(f"array {name!r}: {len(o.files)} shards written, the store has {m.num_shards}")
        return {"array": name, "member": o.member, "shape": [m.num_samples, o.width], "dtype": o.dtype,
                "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in o.files]}

    def write(self, name: str, shards: Iterable[tuple[int, np.ndarray]], width: int, dtype: str,
              member: str) -> dict[str, Any]:
        """:meth:`begin`, :meth:`put` of each ``(shard id, rows)``, :meth:`end`: one array at once."""
        self.begin(name, width, dtype, member)
        for shard_id, rows in shards:
            self.put(name, shard_id, rows)
        return self.end(name)

    def _tar(self, start: int, stored: np.ndarray, member: str) -> bytes:
        buf = io.BytesIO()
        step = self.m.block_rows
        with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
            for lo in range(0, len(stored), step):
                hi = min(lo + step, len(stored))
                sink.write({"__key__": f"{start + lo:012d}",
                            "index.npy": npy_bytes(np.arange(start + lo, start + hi, dtype=np.int64)),
                            f"{member}.npy": npy_bytes(stored[lo:hi])})
        return buf.getvalue()

    def commit(self, **fields: Any) -> Manifest:
        """Set manifest ``fields`` (``hints=...``, ``specialists=...``) and rewrite ``manifest.json`` atomically;
        returns the new manifest (schema-checked)."""
        d = self.m.to_dict()
        d.update({k: v for k, v in fields.items()})
        m = Manifest.from_dict(d, f"{self.store.url}/{MANIFEST_NAME}")
        atomic_write(self.fs, join(self.root, MANIFEST_NAME), m.to_json().encode())
        self.m = self.store.manifest = m
        return m


class SidecarReader:
    """Rows of the arrays a store declares beside its logits.

    Args:
        store: an open store (:func:`softtargets.open_targets`); its ``verify_mode`` decides whether files are
            hashed on first read (``lazy``/``full``) or not (``none``).
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.records = sidecar_records(store.manifest)
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.records)

    def record(self, name: str) -> dict[str, Any]:
        try:
            return self.records[name]
        except KeyError:
            raise KeyError(f"{self.store.url}: no array {name!r} beside the logits; it has "
                           f"{self.names or 'none'}") from None

    def shard(self, name: str, shard_id: int) -> np.ndarray:
        """Array ``name``'s rows of shard ``shard_id``, ``[rows, D]`` in the stored dtype (read-only)."""
        key = (name, shard_id)
        if key in self._cache:
            return self._cache[key]
        rec = self.record(name)
        m = self.store.manifest
        f = rec["files"][shard_id]
        start, stop = m.shard_range(shard_id)
        url = f"{self.store.url}/{f['path']}"
        if f["path"] != sidecar_path(m.layout, name, shard_id) or rec["shape"][0] != m.num_samples:
            raise StoreError(f"{self.store.url}/{MANIFEST_NAME}: array {name!r}'s record does not describe the "
                             f"layout's files (shard {shard_id}: {f['path']!r}); run softtargets verify",
                             path=self.store.url)
        try:
            raw = self.store.fs.cat_file(join(self.store.root, f["path"]))
        except FileNotFoundError:
            raise StoreError(f"{url}: missing (array {name!r}, shard {shard_id})", path=url) from None
        if self.store.verify_mode != "none" and (len(raw) != f["bytes"] or sha256_hex(raw) != f["sha256"]):
            raise ChecksumError(f"{url}: size or sha256 differs from the manifest's (array {name!r}, shard "
                                f"{shard_id}); run softtargets verify", path=url)
        width, dtype = rec["shape"][1], np.dtype(rec["dtype"]).newbyteorder("<")
        if m.layout == "zarr":  # one chunk of [shard_rows, D], then its crc32c
            out = np.frombuffer(raw[:-4], dtype).reshape(m.shard_rows, width)[:stop - start]
        else:
            parts = []
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
                for info in tar:
                    if info.name.endswith(f".{rec['member']}.npy"):
                        fh = tar.extractfile(info)
                        assert fh is not None
                        parts.append(npy_load(fh.read()))
            out = np.concatenate(parts) if parts else np.empty((0, width), dtype)
            if out.shape != (stop - start, width):
                raise StoreError(f"{url}: holds {list(out.shape)}, expected [{stop - start}, {width}]", path=url)
        if len(self._cache) > 16:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = out
        return out

    def take(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``indices`` (store row numbers, any order) of array ``name``: ``[B, D]``, stored dtype."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        m = self.store.manifest
        rec = self.record(name)
        out = np.empty((len(idx), rec["shape"][1]), np.dtype(rec["dtype"]))
        shard_ids = idx // m.shard_rows
        for sid in np.unique(shard_ids):
            sel = shard_ids == sid
            out[sel] = self.shard(name, int(sid))[idx[sel] - int(sid) * m.shard_rows]
        return out


def read_array(store: Any, name: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Rows of array ``name`` that store ``store`` (an open store or its URL) holds beside its logits.

    Args:
        store: a :class:`~softtargets.store.base.TargetStore` or a URL (opened with ``verify="lazy"``).
        name: e.g. ``"hint/fc1"``, ``"specialist/s0"``, ``"combined"``.
        indices: store rows; ``None`` = all.

    Returns:
        ``[B, D]`` in the stored dtype (float16 hints, float32 specialist logits and ``log q``).

    Raises:
        KeyError: the store declares no such array.
        ChecksumError: a file's bytes differ from the manifest's sha256.
    """
    if isinstance(store, (str, os.PathLike)):
        from . import open_targets

        store = open_targets(store)
    reader = SidecarReader(store)
    if indices is None:
        indices = np.arange(store.manifest.num_samples)
    return reader.take(name, indices)
