"""The Zarr v3 layout: one group, three arrays, sharded along samples.

```
store.zarr/
  zarr.json            group; attrs["softtargets"] says what the logits mean
  logits/              [N, C] or [N, K, C]; float32 | float16 | uint16 (bfloat16 bits)
  labels/              [N] int64, -1 = unlabeled
  keys/                [N] str
  manifest.json        written last
  README.md            the dataset card
```

Every array is chunked along samples (``block_rows`` rows per inner chunk) inside
shards of ``shard_rows`` rows, so 10^8 rows stay ~10^3 files per array. A shard is
written whole by one writer: zarr loses rows when writers share a shard. The writer encodes
those shard files itself, byte for byte as zarr would, for the codec chains it creates
(:meth:`ZarrWriter._shard_parts`; blosc still goes through zarr).

Reading a local store: shard files are memory-mapped and decoded whole by
:mod:`.zarr_shards` (uncompressed logits, the default, are viewed in place: no read at all);
keys and labels are decoded once per shard and kept. Remote stores are read through zarr.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.storage
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    Endian,
    ShardingCodec,
    ShardingCodecIndexLocation,
    VLenUTF8Codec,
    ZstdCodec,
)

from ..manifest import FileRecord, Manifest
from .base import StoreError, TargetStore, TargetWriter
from .encoding import NUMPY_STORAGE
from .files import file_record, is_local, join
from .mapped import MappedFiles
from .zarr_shards import ShardDecoder

ARRAYS = ("logits", "labels", "keys")
COMPRESSORS = {
    "none": None,
    "zstd": ZstdCodec(level=3),
    "blosc": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
}
# Write and read every chunk, including those equal to the fill value, so each shard is one file.
ARRAY_CONFIG = {"write_empty_chunks": True}
_VLEN_UTF8 = numcodecs.VLenUTF8()
_CRC32C = numcodecs.CRC32C(location="end")
# Reader-side cache of whole shards' keys and labels (a key as a Python str ~ 70 bytes, a label 8).
META_BYTES_PER_ROW = 80


def _zarr_store(fs: Any, root: str, read_only: bool) -> Any:
    if is_local(fs):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(f"{fs.unstrip_protocol(root)}", read_only=read_only)


class ZarrWriter(TargetWriter):
    layout = "zarr"

    def _group(self, mode: str) -> zarr.Group:
        return zarr.open_group(_zarr_store(self.fs, self.root, read_only=False), mode=mode)

    def _create_layout(self) -> None:
        spec = self.spec
        compressor = COMPRESSORS[spec.extra.get("compressor", "none")]
        group = self._group("w")
        group.attrs["softtargets"] = {
            "format_version": spec.format_version, "content": spec.content, "dtype": spec.dtype,
            "temperature": spec.temperature, "num_teachers": spec.num_teachers,
            "note": "see manifest.json; bfloat16 logits are stored as their uint16 bits",
        }
        n = spec.num_samples if self.fixed_rows else 0
        trailing = spec.logits_shape[1:]
        rows = (spec.block_rows,)
        shards = (spec.shard_rows,)
        logits = group.create_array(
            "logits", shape=(n, *trailing), dtype=NUMPY_STORAGE[spec.dtype], chunks=rows + trailing,
            shards=shards + trailing, compressors=compressor, fill_value=0, config=ARRAY_CONFIG,
            dimension_names=("sample", "teacher", "class")[-len(spec.logits_shape):] if spec.per_teacher
            else ("sample", "class"),
            attributes={"dtype": spec.dtype},
        )
        labels = group.create_array(
            "labels", shape=(n,), dtype="int64", chunks=rows, shards=shards, compressors=compressor, fill_value=-1,
            config=ARRAY_CONFIG,
            dimension_names=("sample",),
        )
        keys = group.create_array(
            "keys", shape=(n,), dtype=str, chunks=rows, shards=shards, config=ARRAY_CONFIG,
            dimension_names=("sample",),
        )
        # The arrays as created (no second open); with_config as in _open_layout.
        self._arrays = {name: arr.with_config(ARRAY_CONFIG) for name, arr in zip(ARRAYS, (logits, labels, keys),
                                                                               strict=True)}

    def _open_layout(self) -> None:
        group = self._group("r+")
        # open_array ignores config=; with_config keeps write_empty_chunks (one file per shard, always).
        self._arrays = {name: group[name].with_config(ARRAY_CONFIG) for name in ARRAYS}

    def _read_shard_keys(self, shard_id: int) -> list[str]:
        start, stop = self.spec.shard_range(shard_id)
        return self._arrays["keys"][start:stop].tolist()

    def _shard_files(self, shard_id: int) -> list[str]:
        out = []
        for name in ARRAYS:
            arr = self._arrays[name]
            coords = (shard_id,) + (0,) * (arr.ndim - 1)
            out.append(f"{name}/{arr.metadata.encode_chunk_key(coords)}")
        return out

    def _write_shard_files(
        self, shard_id: int, start: int, keys: np.ndarray, logits: np.ndarray, labels: np.ndarray,
        inputs: list[dict] | None,
    ) -> list[FileRecord]:
        if inputs is not None:
            raise ValueError("the zarr layout stores targets only; pack inputs with layout='wds'")
        stop = start + len(keys)
        records = []
        for name, data, rel in zip(ARRAYS, (logits, labels, keys), self._shard_files(shard_id), strict=True):
            arr = self._arrays[name]
            if arr.shape[0] < stop:  # appending without a known size: one process grows the arrays
                arr.resize((stop, *arr.shape[1:]))
            parts = self._shard_parts(arr, shard_id, data)
            if parts is None:
                arr[start:stop] = data
                records.append(file_record(self.fs, self.root, rel))
            else:
                records.append(self._put(rel, parts))
        return records

    def _put(self, rel: str, parts: list[Any]) -> FileRecord:
        """Write a shard file from its parts (bytes-like) as zarr's stores do: locally to a temporary name,
        then renamed (no fsync); hashed as written, so the file is neither joined nor read back."""
        path = join(self.root, rel)
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        record = FileRecord(path=rel, bytes=sum(memoryview(p).nbytes for p in parts), sha256=digest.hexdigest())
        if not is_local(self.fs):
            self.fs.pipe_file(path, b"".join(parts))
            return record
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # the name zarr's LocalStore uses (cleaned up at finalize)
        try:
            with open(tmp, "wb") as f:
                f.writelines(parts)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return record

    @staticmethod
    def _shard_parts(arr: zarr.Array, shard_id: int, data: np.ndarray) -> list[Any] | None:
        """The file of shard ``shard_id`` of ``arr`` holding ``data`` (its rows), byte for byte as zarr writes it,
        as a list of bytes-like parts (uncompressed chunks are views of ``data``).

        zarr's own write path costs ~3 ms of Python per array and shard (9 ms a shard): on a writer
        thread, time taken from the compute thread's GIL. Encoded here for the chains this layout
        creates: ``bytes`` (little endian) or ``vlen-utf8``, then any ``zstd``; index at the end,
        ``bytes`` + ``crc32c``; sharded along axis 0 only. ``None`` for others (``blosc``): zarr writes.
        Inner chunks go in order (the Morton order of a 1-D grid); the one holding the array's last
        row is padded with the fill value; those past the end are absent (index entry ``2**64 - 1``).
        """
        codecs = arr.metadata.codecs
        sharding = codecs[0] if len(codecs) == 1 else None
        if not isinstance(sharding, ShardingCodec) or sharding.index_location != ShardingCodecIndexLocation.end:
            return None
        index_codecs = [(type(c), getattr(c, "endian", None)) for c in sharding.index_codecs]
        if index_codecs != [(BytesCodec, Endian.little), (Crc32cCodec, None)]:
            return None
        serializer, *compressors = sharding.codecs
        strings = isinstance(serializer, VLenUTF8Codec)
        if not (strings or isinstance(serializer, BytesCodec) and serializer.endian == Endian.little):
            return None
        if not all(isinstance(c, ZstdCodec) for c in compressors):
            return None
        shard_shape, block_shape = arr.metadata.chunk_grid.chunk_shape, sharding.chunk_shape
        if tuple(shard_shape[1:]) != arr.shape[1:] or tuple(block_shape[1:]) != arr.shape[1:]:
            return None
        shard_rows, block = shard_shape[0], block_shape[0]
        zstd = [numcodecs.Zstd(level=c.level, checksum=c.checksum) for c in compressors]
        present = -(-min(shard_rows, arr.shape[0] - shard_id * shard_rows) // block)  # inner chunks zarr writes
        if len(data) < present * block:
            fill = np.full((present * block - len(data), *data.shape[1:]), arr.metadata.fill_value, dtype=data.dtype)
            data = np.concatenate([data, fill])
        parts: list[Any] = []
        index = np.full((shard_rows // block, 2), 2**64 - 1, dtype="<u8")  # (offset, bytes) per inner chunk
        offset = 0
        for i in range(present):
            chunk = data[i * block:(i + 1) * block]
            if strings:
                blob: Any = _VLEN_UTF8.encode(chunk.astype(object))
            else:
                blob = memoryview(np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<"))).cast("B")
            for codec in zstd:
                blob = codec.encode(blob)
            parts.append(blob)
            index[i] = offset, len(blob)
            offset += len(blob)
        return [*parts, _CRC32C.encode(index.tobytes())]

    def _finish_layout(self) -> None:
        for arr in self._arrays.values():
            if arr.shape[0] != self.spec.num_samples:
                arr.resize((self.spec.num_samples, *arr.shape[1:]))


class ZarrStore(TargetStore):
    """A finished Zarr store, read through zarr (local files, or any fsspec URL)."""

    meta_cache_bytes = 256 << 20

    def __init__(self, url: str, manifest: Manifest, fs: Any, root: str, verify: str = "lazy"):
        super().__init__(url, manifest, fs, root, verify)
        group = zarr.open_group(_zarr_store(fs, root, read_only=True), mode="r")
        self.arrays = {name: group[name] for name in ARRAYS}
        self._meta: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._meta_bytes = 0
        # Local stores: shard files mapped and decoded here; None where zarr must decode an array.
        self._decoders = {name: ShardDecoder.of(arr) for name, arr in self.arrays.items()} if is_local(fs) else {}
        self._maps = MappedFiles()
        if self.arrays["logits"].shape != manifest.logits_shape:
            raise StoreError(
                f"{url}: logits array has shape {self.arrays['logits'].shape}, the manifest says "
                f"{manifest.logits_shape}"
            )

    def _files(self, shard_id: int) -> dict[str, str]:
        """Array name -> relative path of its shard ``shard_id`` file, for the arrays decoded here."""
        files = {}
        for name, decoder in self._decoders.items():
            if decoder is not None:
                arr = self.arrays[name]
                files[name] = f"{name}/{arr.metadata.encode_chunk_key((shard_id,) + (0,) * (arr.ndim - 1))}"
        return files

    def _held_files(self, shard_id: int) -> dict[str, Any]:
        files = self._files(shard_id)
        maps = {}
        for rel in files.values():
            try:
                maps[rel] = self._maps(join(self.root, rel))
            except FileNotFoundError:
                raise StoreError(f"{self._file_url(rel)}: missing (shard {shard_id})") from None
        return maps

    def _mapped(self, shard_id: int) -> dict[str, np.ndarray]:
        """Array name -> the bytes of its shard ``shard_id`` file, memory-mapped (arrays with a decoder only);
        the shard is checked first, hashing the same maps."""
        held = self._held_files(shard_id)
        self.check_shard(shard_id, held)
        return {name: held[rel] for name, rel in self._files(shard_id).items()}

    def _decoded(self, name: str, shard_id: int, maps: dict[str, np.ndarray]) -> np.ndarray | None:
        if name not in maps:
            return None
        return self._decoders[name].read(maps[name], self.manifest.shards[shard_id].rows)

    def _shard_meta(self, shard_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(keys, labels)`` of a whole shard, kept once read (decoding a shard's keys costs as much as
        copying ~20 times their rows' logits). Shards are kept until ``meta_cache_bytes`` is reached, then
        later ones are read per range (no eviction, so a random block order never thrashes)."""
        if shard_id in self._meta:
            return self._meta[shard_id]
        s = self.manifest.shards[shard_id]
        cost = s.rows * META_BYTES_PER_ROW
        if self._meta_bytes + cost > self.meta_cache_bytes:
            return None
        maps = self._mapped(shard_id)
        keys, labels = self._decoded("keys", shard_id, maps), self._decoded("labels", shard_id, maps)
        meta = (
            self.arrays["keys"][s.start:s.stop].astype(object) if keys is None else keys,
            self.arrays["labels"][s.start:s.stop] if labels is None else labels,
        )
        self._meta[shard_id] = meta
        self._meta_bytes += cost
        return meta

    def read_block(self, shard_id: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        maps = self._mapped(shard_id)
        self.check_shard(shard_id)
        start = self.manifest.shards[shard_id].start
        a, b = start + lo, start + hi
        meta = self._shard_meta(shard_id)
        if meta is not None:
            keys, labels = meta[0][lo:hi], meta[1][lo:hi]
        else:
            keys, labels = self.arrays["keys"][a:b].astype(object), self.arrays["labels"][a:b]
        rows = self.manifest.shards[shard_id].rows
        logits = self._decoders["logits"].read(maps["logits"], rows, lo, hi) if "logits" in maps else None
        if logits is None:
            logits = self.arrays["logits"][a:b]
        return {"key": keys, "logits": logits, "label": labels}

    def _read_keys(self, shard_id: int) -> list[str]:
        meta = self._shard_meta(shard_id)
        if meta is not None:
            return meta[0].tolist()
        return self.read_block(shard_id, 0, self.manifest.shards[shard_id].rows)["key"].tolist()
