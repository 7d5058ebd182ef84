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
(:meth:`.zarr_shards.ShardFormat.encode`; blosc still goes through zarr).

Format 2 appends a crc32c to every inner chunk (zarr's ``crc32c`` codec) and records each
file's ``chunks_sha256``, so a reader checks a chunk when it reads it (see ``store/base.py``).

Reading a local store: shard files are memory-mapped and decoded by :mod:`.zarr_shards`
(uncompressed logits, the default, are viewed in place: no read at all); keys and labels are
decoded once per shard and kept. A remote store (:mod:`.remote`) is decoded the same way from
bytes fetched. One that a reader can hold has a shard's files fetched whole when first read (checked
as a local lazy reader checks its maps); a bigger one has each file's index and crc32c trailers
fetched and checked against ``chunks_sha256`` instead. Either way the chunk index and trailers are
kept, and a file not held is then read by the inner chunks a read needs (ranges merged per file,
fetched concurrently), each checked against its trailer. Arrays in codec chains :mod:`.zarr_shards`
does not decode (blosc) are read through zarr.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NoReturn

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata import ArrayV3Metadata

from ..choices import VerifyMode
from ..errors import ChecksumError, StoreError
from .base import ShardRange, ShardStream, TargetStore, TargetWriter
from .card import dask_recipe, zarr_recipe
from .files import atomic_write, file_record, flush_and_close, is_local, join
from .manifest import FileRecord, Manifest, ShardRecord
from .mapped import MappedFiles
from .zarr_shards import ShardFileWriter, ShardFormat, chunks_digest, crc32c, file_chunks_digest, index_ends

ARRAYS = ("logits", "labels", "keys")
COMPRESSORS = {
    "none": None,
    "zstd": ZstdCodec(level=3),
    "blosc": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
}
KEYS_COMPRESSOR = ZstdCodec(level=0, checksum=False)  # zarr's default for strings
# Write and read every chunk, including those equal to the fill value, so each shard is one file.
# zarr takes a partial config (its TypedDict is total; parse_array_config fills the defaults).
ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}  # type: ignore[typeddict-item]
# Reader-side cache of whole shards' keys and labels (a key as a Python str ~ 70 bytes, a label 8).
META_BYTES_PER_ROW = 80


def shard_file(name: str, arr: zarr.Array, shard_id: int) -> str:
    """Relative path of array ``name``'s file for shard ``shard_id`` (sharded along axis 0 only)."""
    return f"{name}/{arr.metadata.encode_chunk_key((shard_id,) + (0,) * (arr.ndim - 1))}"


def least_shard_bytes(fmt: ShardFormat | None, rows: int) -> int | None:
    """The fewest bytes a shard file of ``rows`` rows in format ``fmt`` can have: every inner chunk it holds,
    whole, where the chunks are uncompressed numbers; None (no bound) for strings, compressed or other chains."""
    if fmt is None or fmt.strings or fmt.zstd:
        return None
    return -(-rows // fmt.chunk_rows) * fmt.chunk_rows * fmt.dtype.itemsize * int(np.prod(fmt.trailing, dtype=np.int64))


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """Member ``name`` of ``group``, an array (``KeyError`` where there is none)."""
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{name} is a group, not an array; not a softtargets store?")
    return arr


def _chunks_per_shard(arr: zarr.Array) -> int:
    """Index entries of ``arr``'s shard files (sharded along axis 0 only)."""
    meta = arr.metadata
    # Arrays softtargets writes: zarr v3, a regular grid of shards, the sharding codec first.
    assert isinstance(meta, ArrayV3Metadata) and isinstance(meta.chunk_grid, RegularChunkGrid)
    codec = meta.codecs[0]
    assert isinstance(codec, ShardingCodec)
    return meta.chunk_grid.chunk_shape[0] // codec.chunk_shape[0]


def _zarr_store(fs: Any, root: str, read_only: bool) -> Any:
    if is_local(fs):
        return zarr.storage.LocalStore(root, read_only=read_only)
    if fs.async_impl:  # an asynchronous instance with the same storage options (endpoint, credentials)
        async_fs = type(fs)(**{**fs.storage_options, "asynchronous": True})
        return zarr.storage.FsspecStore(async_fs, path=root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(f"{fs.unstrip_protocol(root)}", read_only=read_only)


def _refuse_ignored_ranges(fs: Any, root: str, url: str) -> None:
    """Over http(s), refuse a server that answers a byte-range request with the whole file (Python's
    ``http.server`` does): zarr reads parts of shard files, and would find their checksums wrong."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not {"http", "https"} & set(protocols):
        return
    got = len(fs.cat_file(join(root, "zarr.json"), start=0, end=1))
    if got != 1:
        raise StoreError(f"{url}: the HTTP server ignores Range requests (asked for 1 byte, got {got}); serve the "
                         "store from one that honours them (nginx, an object store), or convert it to wds")


def _refuse_inputs(inputs: list[dict] | None) -> None:
    if inputs is not None:
        raise ValueError("the zarr layout stores targets only; pack inputs with layout='wds'")


class _ShardStream(ShardStream):
    """A zarr shard's files (logits, labels, keys) written as its rows come (:class:`ShardFileWriter`). Each
    inner chunk of logits but the last is handed to ``to_disk(fd)`` once written (a duplicate ``fd`` of the
    file, to flush and close), so a big shard's bytes go to disk while the run goes on."""

    def __init__(self, paths: list[str], rels: list[str], formats: list[ShardFormat], shard_id: int,
                 array_rows: int, count_clipped: bool, to_disk: Callable[[int], None]) -> None:
        super().__init__(shard_id, paths, rels, count_clipped)
        self.writers = [ShardFileWriter(fmt, shard_id, array_rows, f) for fmt, f in zip(formats, self.files,
                                                                                         strict=True)]
        self.to_disk = to_disk

    def _write(self, logits: np.ndarray, labels: np.ndarray, keys: np.ndarray, inputs: list[dict] | None) -> None:
        _refuse_inputs(inputs)
        logits_file = self.writers[0]
        chunks = logits_file.chunks
        for writer, rows in zip(self.writers, (logits, labels, keys), strict=True):
            writer.append(rows)
        if logits_file.chunks > chunks and logits_file.done < logits_file.rows:
            self.files[0].flush()
            self.to_disk(os.dup(self.files[0].fileno()))

    def _finish(self) -> list[tuple[int, str, str | None, str | None]]:
        return [(*writer.finish(), None) for writer in self.writers]


class ZarrWriter(TargetWriter):
    layout = "zarr"

    def _group(self, mode: Literal["w", "r+"]) -> zarr.Group:
        return zarr.open_group(_zarr_store(self.fs, self.root, read_only=False), mode=mode)

    def _create_layout(self) -> None:
        spec = self.spec
        compressor = COMPRESSORS[spec.extra.get("compressor", "none")]
        # Every inner chunk ends with its crc32c (format 2): readers check the chunks they read.
        checked = (*([compressor] if compressor else []), Crc32cCodec())
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
            "logits", shape=(n, *trailing), dtype=spec.storage_dtype, chunks=rows + trailing,
            shards=shards + trailing, compressors=checked, fill_value=0, config=ARRAY_CONFIG,
            dimension_names=("sample", "byte") if spec.compact is not None
            else ("sample", "teacher", "class") if spec.per_teacher else ("sample", "class"),
            attributes={"dtype": spec.dtype},
        )
        labels = group.create_array(
            "labels", shape=(n,), dtype="int64", chunks=rows, shards=shards, compressors=checked, fill_value=-1,
            config=ARRAY_CONFIG,
            dimension_names=("sample",),
        )
        keys = group.create_array(
            "keys", shape=(n,), dtype=str, chunks=rows, shards=shards, compressors=(KEYS_COMPRESSOR, Crc32cCodec()),
            config=ARRAY_CONFIG,
            dimension_names=("sample",),
        )
        self._use_arrays(dict(zip(ARRAYS, (logits, labels, keys), strict=True)))  # as created: no second open

    def _open_layout(self) -> None:
        group = self._group("r+")
        self._use_arrays({name: _array(group, name) for name in ARRAYS})

    def _use_arrays(self, arrays: dict[str, zarr.Array]) -> None:
        """Write through ``arrays``. ``with_config`` keeps write_empty_chunks (one file per shard, always;
        opening ignores ``config=``); their shard formats are the same for every shard: worked out once."""
        self._arrays = {name: arr.with_config(ARRAY_CONFIG) for name, arr in arrays.items()}
        self._formats = {name: ShardFormat.of(arr) for name, arr in self._arrays.items()}

    def _read_shard_keys(self, shard_id: int) -> list[str]:
        start, stop = self.spec.shard_range(shard_id)
        return np.asarray(self._arrays["keys"][start:stop]).tolist()

    def _shard_files(self, shard_id: int) -> list[str]:
        return [shard_file(name, self._arrays[name], shard_id) for name in ARRAYS]

    def _write_shard_files(
        self, shard_id: int, start: int, keys: np.ndarray, logits: np.ndarray, labels: np.ndarray,
        inputs: list[dict] | None,
    ) -> list[FileRecord]:
        _refuse_inputs(inputs)
        stop = start + len(keys)
        records = []
        for name, data, rel in zip(ARRAYS, (logits, labels, keys), self._shard_files(shard_id), strict=True):
            arr = self._arrays[name]
            if arr.shape[0] < stop:  # appending without a known size: one process grows the arrays
                arr.resize((stop, *arr.shape[1:]))
            shard_format = self._formats[name]
            if shard_format is None:  # a chain zarr must encode (blosc)
                arr[start:stop] = data
                blob = self.fs.cat_file(join(self.root, rel))
                chunks = file_chunks_digest(np.frombuffer(blob, np.uint8), _chunks_per_shard(arr))
                records.append(dataclasses.replace(file_record(self.fs, self.root, rel, blob), chunks_sha256=chunks))
            else:
                parts = shard_format.encode(shard_id, data, arr.shape[0])
                records.append(self._put(rel, parts, shard_format.parts_digest(parts)))
        return records

    def shard_stream(self, shard_id: int) -> _ShardStream | None:
        """Local stores of a known size, in formats softtargets writes itself: the shard's files are written as
        its rows arrive (a big shard then costs the writer a few MB at a time, not all at its end)."""
        formats = [f for f in (self._formats[name] for name in ARRAYS) if f is not None]
        if len(formats) < len(ARRAYS) or not is_local(self.fs) or not self.fixed_rows:
            return None
        rels = self._shard_files(shard_id)
        paths = [self.fs._strip_protocol(self._path(rel)) for rel in rels]
        return _ShardStream(paths, rels, formats, shard_id, self._arrays["logits"].shape[0], self.clips,
                            lambda fd: self._in_sync_thread(flush_and_close, fd))

    def _put(self, rel: str, parts: list[Any], chunks_sha256: str | None) -> FileRecord:
        """Write a shard file from its parts (bytes-like) atomically (flushed to disk later: ``sync()``);
        hashed as written, so the file is neither joined nor read back."""
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        atomic_write(self.fs, join(self.root, rel), parts, fsync=False)
        return FileRecord(path=rel, bytes=sum(memoryview(p).nbytes for p in parts), sha256=digest.hexdigest(),
                          chunks_sha256=chunks_sha256)

    def _finish_layout(self) -> None:
        for arr in self._arrays.values():
            if arr.shape[0] != self.spec.num_samples:
                arr.resize((self.spec.num_samples, *arr.shape[1:]))


class ZarrStore(TargetStore):
    """A finished Zarr store, read through zarr (local files, or any fsspec URL)."""

    meta_cache_bytes = 256 << 20
    compresses = True

    @classmethod
    def card_recipes(cls, m: Manifest, url: str) -> list[str]:
        """Reading the store with zarr alone, and with dask.array."""
        plain = [f"### Plain zarr\n\n{zarr_recipe(m, url)}"]
        return plain if m.compact is not None else [*plain, f"### dask.array\n\n{dask_recipe(m, url)}"]

    def __init__(self, url: str, manifest: Manifest, fs: Any, root: str, verify: VerifyMode = "lazy"):
        self._meta: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._meta_bytes = 0
        self._maps = MappedFiles()
        # Files checked by chunks_sha256 (lazy, format 2): relative path -> chunks not yet checked (bool [chunks]).
        self._unchecked: dict[str, np.ndarray] = {}
        # Remote files: relative path -> (offset, bytes) of each inner chunk [chunks, 2], and their crc32c
        # trailers where checked against the manifest (None: not checked, or no trailers).
        self._spans: dict[str, tuple[np.ndarray, list[bytes] | None]] = {}
        super().__init__(url, manifest, fs, root, verify)

    @property
    def metadata_files(self) -> list[str]:
        return ["zarr.json", *(f"{name}/zarr.json" for name in ARRAYS)]

    def _open_layout(self) -> None:
        """The group's arrays, each checked against the manifest: shape, dtype, shard and inner chunk rows."""
        # Remote, each metadata read is a round trip: the Range probe beside the group, the arrays side by side.
        with ThreadPoolExecutor(len(ARRAYS), thread_name_prefix="softtargets-open") as pool:
            probe = pool.submit(_refuse_ignored_ranges, self.fs, self.root, self._file_url("zarr.json"))
            # zarr v3, never consolidated: no requests for format-2 or consolidated metadata
            group = zarr.open_group(_zarr_store(self.fs, self.root, read_only=True), mode="r", zarr_format=3,
                                    use_consolidated=False)
            probe.result()
            try:
                self.arrays = dict(zip(ARRAYS, pool.map(functools.partial(_array, group), ARRAYS), strict=True))
            except KeyError as e:
                raise StoreError(f"{self._file_url('zarr.json')}: the group lacks array {e}; not a softtargets "
                                 "store?") from None
        for name, arr in self.arrays.items():
            self._check_array(name, arr)
        self._layouts = {name: ShardFormat.of(arr) for name, arr in self.arrays.items()}
        # Shard files decoded here (local: mapped; remote: fetched); None where zarr must decode an array.
        self._formats = self._layouts

    def _check_array(self, name: str, arr: zarr.Array) -> None:
        """Array ``name``'s metadata agrees with the manifest (one :class:`StoreError` naming both)."""
        m = self.manifest
        expected: dict[str, tuple[tuple[int, ...], Any]] = {
            "logits": (m.logits_shape, m.storage_dtype), "labels": ((m.num_samples,), np.int64),
            "keys": ((m.num_samples,), None),
        }
        shape, dtype = expected[name]
        found = {"shape": tuple(arr.shape), "shard rows": (arr.shards or arr.chunks)[0], "chunk rows": arr.chunks[0]}
        want = {"shape": tuple(shape), "shard rows": m.shard_rows, "chunk rows": m.block_rows}
        if dtype is not None:
            found["dtype"], want["dtype"] = str(arr.dtype), str(np.dtype(dtype))
        elif not isinstance(arr.dtype, np.dtypes.StringDType) and np.dtype(arr.dtype).kind not in "OUT":
            found["dtype"], want["dtype"] = str(arr.dtype), "str"
        wrong = [k for k in want if found[k] != want[k]]
        if wrong:
            raise StoreError(
                f"{self._file_url(f'{name}/zarr.json')}: {name} array has "
                + ", ".join(f"{k} {found[k]}" for k in wrong) + "; the manifest says "
                + ", ".join(f"{k} {want[k]}" for k in wrong) + " (the manifest does not describe these arrays)"
            )

    def shard_files(self, shard_id: int) -> list[str]:
        return [shard_file(name, self.arrays[name], shard_id) for name in ARRAYS]

    def least_bytes(self, shard: ShardRecord) -> dict[str, int]:
        """Uncompressed numeric arrays (the default logits, labels): every inner chunk the shard holds is stored
        whole. Compressed chunks have no bound."""
        bounds = {f.path: least_shard_bytes(self._layouts[name], shard.rows) for name, f in zip(ARRAYS, shard.files,
                                                                                                strict=True)}
        return {rel: least for rel, least in bounds.items() if least is not None}

    @property
    def piece_rows(self) -> int:
        return self.manifest.block_rows  # one inner chunk; format 2's crc32c trailers sit between chunks

    def _files(self, shard_id: int) -> dict[str, str]:
        """Array name -> relative path of its shard ``shard_id`` file, for the arrays decoded here."""
        return {name: shard_file(name, self.arrays[name], shard_id)
                for name, shard_format in self._formats.items() if shard_format is not None}

    def _held_files(self, shard_id: int) -> dict[str, Any]:
        files = self._files(shard_id)
        maps = {}
        for rel in files.values():
            try:
                maps[rel] = self._maps(join(self.root, rel))
            except FileNotFoundError:
                raise StoreError(f"{self._file_url(rel)}: missing (shard {shard_id})") from None
        return maps

    def _check_file(self, shard_id: int, f: FileRecord, blob: Any) -> None:
        """Lazily, a mapped format-2 file is checked by its chunk checksums and index here, and its chunks as
        they are read (:meth:`_check_chunks`); otherwise by its sha256, and (``full``, format 2) by its chunk
        checksums, index and every inner chunk's crc32c too: ``full`` checks all that ``lazy`` does. A remote
        file is checked from the bytes fetched, which then tell where its chunks are (:meth:`_learn`)."""
        name = f.path.split("/", 1)[0]
        shard_format = self._formats.get(name)
        if blob is None and self._remote is not None:
            blob = self._fetched([(shard_id, f.path, 0, f.bytes)])[0]
        chunked = blob is not None and f.chunks_sha256 is not None and shard_format is not None and shard_format.crc
        if not chunked or self.verify_mode != "lazy":
            super()._check_file(shard_id, f, blob)
        if chunked:
            assert shard_format is not None  # chunked
            if len(blob) != f.bytes:
                raise StoreError(f"{self._file_url(f.path)}: {len(blob)} bytes, the manifest says {f.bytes}")
            if file_chunks_digest(blob, shard_format.chunks_per_shard) != f.chunks_sha256:
                self._refuse_chunks_digest(shard_id, f)
            todo = np.ones(shard_format.chunks_per_shard, dtype=bool)
            if self.verify_mode != "lazy":
                self._check_chunk_ids(f.path, shard_format, shard_id, blob, list(range(len(todo))), todo)
            elif self._remote is None:
                self._unchecked[f.path] = todo
        if self._remote is not None and shard_format is not None:
            self._learn(f.path, shard_format, shard_id, blob, checked=True)

    def _learn(self, rel: str, shard_format: ShardFormat, shard_id: int, blob: np.ndarray, checked: bool) -> None:
        """Keep where remote file ``rel``'s inner chunks lie, from its bytes ``blob``, and (``checked``: ``blob``
        matched the manifest) their crc32c trailers, against which later reads of single chunks are checked."""
        spans = shard_format.spans(blob, self.manifest.shards[shard_id].rows)
        if spans is None:
            return  # a damaged index: zarr reads the file, and reports it
        trailers = [blob[o + n - 4:o + n].tobytes() for o, n in spans.tolist()] if checked and shard_format.crc \
            else None
        self._spans[rel] = (spans, trailers)

    def _check_chunks(self, name: str, shard_id: int, buf: np.ndarray, lo: int, hi: int) -> None:
        """The inner chunks of array ``name`` holding rows ``[lo, hi)`` of shard ``shard_id`` (file bytes
        ``buf``) match their crc32c, each checked once (only files :meth:`_check_file` left to this)."""
        rel = self._files(shard_id)[name]
        todo = self._unchecked.get(rel)
        if todo is None:
            return
        shard_format = self._formats[name]
        assert shard_format is not None  # rel is in self._files: arrays with a format only
        self._check_chunk_ids(rel, shard_format, shard_id, buf, list(shard_format.chunks_of(lo, hi)), todo)

    def _check_chunk_ids(self, rel: str, shard_format: ShardFormat, shard_id: int, buf: np.ndarray, ids: list[int],
                         todo: np.ndarray) -> None:
        """Those of inner chunks ``ids`` of file ``rel`` still marked in ``todo`` match their crc32c; marked done."""
        rows = self.manifest.shards[shard_id].rows
        ids = [i for i in ids if i < -(-rows // shard_format.chunk_rows) and todo[i]]
        bad = shard_format.bad_chunks(buf, rows, ids) if ids else []
        if bad:
            self._refuse_chunk(rel, shard_format, shard_id, bad[0])
        todo[ids] = False
        if not todo[:-(-rows // shard_format.chunk_rows)].any():  # every chunk of the file checked: remember it
            self._remember(next(f for f in self.manifest.shards[shard_id].files if f.path == rel))

    def _refuse_chunk(self, rel: str, shard_format: ShardFormat, shard_id: int, chunk: int) -> NoReturn:
        """Raise the :class:`ChecksumError` of inner chunk ``chunk`` of file ``rel`` (shard ``shard_id``)."""
        a = chunk * shard_format.chunk_rows
        b = min(self.manifest.shards[shard_id].rows, a + shard_format.chunk_rows)
        raise ChecksumError(f"{self._file_url(rel)}: inner chunk {chunk} (rows {a}-{b - 1} of shard {shard_id}) "
                            f"does not match its crc32c (corrupt file)", path=self._file_url(rel), shard=shard_id)

    def _mapped(self, shard_id: int) -> dict[str, np.ndarray]:
        """Array name -> the bytes of its shard ``shard_id`` file, memory-mapped (arrays with a decoder only);
        the shard is checked first, hashing the same maps."""
        held = self._held_files(shard_id)
        self.check_shard(shard_id, held)
        return {name: held[rel] for name, rel in self._files(shard_id).items()}

    def _decoded(self, name: str, shard_id: int, maps: dict[str, np.ndarray]) -> np.ndarray | None:
        if name not in maps:
            return None
        shard_format = self._formats[name]
        assert shard_format is not None  # maps holds the files of arrays with a format only
        return shard_format.read(maps[name], self.manifest.shards[shard_id].rows)

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
        keys: np.ndarray | None
        labels: np.ndarray | None
        if self._remote is not None:
            keys, labels = self._remote_rows("keys", shard_id, 0, s.rows), self._remote_rows("labels", shard_id, 0,
                                                                                              s.rows)
        else:
            maps = self._mapped(shard_id)
            for name in maps.keys() & {"keys", "labels"}:
                self._check_chunks(name, shard_id, maps[name], 0, s.rows)
            keys, labels = self._decoded("keys", shard_id, maps), self._decoded("labels", shard_id, maps)
        meta = (
            np.asarray(self.arrays["keys"][s.start:s.stop]).astype(object) if keys is None else keys,
            np.asarray(self.arrays["labels"][s.start:s.stop]) if labels is None else labels,
        )
        self._meta[shard_id] = meta
        self._meta_bytes += cost
        return meta

    def read_block(self, shard_id: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        if self._remote is not None:
            return self._read_remote(shard_id, lo, hi)
        maps = self._mapped(shard_id)
        self.check_shard(shard_id)
        start = self.manifest.shards[shard_id].start
        a, b = start + lo, start + hi
        meta = self._shard_meta(shard_id)
        if meta is not None:
            keys, labels = meta[0][lo:hi], meta[1][lo:hi]
        else:
            keys, labels = np.asarray(self.arrays["keys"][a:b]).astype(object), np.asarray(self.arrays["labels"][a:b])
        rows = self.manifest.shards[shard_id].rows
        logits = None
        if "logits" in maps:
            self._check_chunks("logits", shard_id, maps["logits"], lo, hi)
            logits_format = self._formats["logits"]
            assert logits_format is not None  # maps holds the files of arrays with a format only
            logits = logits_format.read(maps["logits"], rows, lo, hi)
        if logits is None:
            logits = np.asarray(self.arrays["logits"][a:b])
        return {"key": keys, "logits": logits, "label": labels}

    def _read_keys(self, shard_id: int) -> list[str]:
        meta = self._shard_meta(shard_id)
        if meta is not None:
            return meta[0].tolist()
        return self.read_block(shard_id, 0, self.manifest.shards[shard_id].rows)["key"].tolist()

    # -- remote stores ----------------------------------------------------------------------------

    def prefetch(self, pieces: Sequence[tuple[int, int, int]]) -> None:
        """Checks the pieces' shards (:meth:`_check_group`), then fetches the inner chunks the pieces need (and the
        whole shards' keys and labels) that are not held, all in one round of requests."""
        super().prefetch(pieces)
        if self._remote is None:
            return
        fresh = sorted({sid for sid, _, _ in pieces if self._unlearnt(sid)})  # not checked: verify="none"
        for sid, files in self.fetch_shards(fresh).items():
            self._learn_shard(sid, files)
        self._fetched(self._piece_ranges(pieces))

    def _piece_ranges(self, pieces: Sequence[tuple[int, int, int]], spans: dict[str, np.ndarray] | None = None
                      ) -> list[ShardRange]:
        """The byte ranges of the inner chunks holding ``pieces`` (shard id, store rows ``[a, b)``), and of the whole
        shards' keys and labels not kept yet (:meth:`_shard_meta`), for files whose chunks are known here (or in
        ``spans``: relative path -> chunk spans)."""
        wanted = []
        for sid, a, b in pieces:
            start = self.manifest.shards[sid].start
            wanted += self._chunk_ranges("logits", sid, a - start, b - start, spans)[1]
        for sid in {sid for sid, _, _ in pieces} - self._meta.keys():
            rows = self.manifest.shards[sid].rows
            wanted += [r for name in ("keys", "labels") for r in self._chunk_ranges(name, sid, 0, rows, spans)[1]]
        return wanted

    def _check_group(self, shard_ids: list[int], pieces: Sequence[tuple[int, int, int]] = ()) -> None:
        """A remote store too big to hold (more than half of ``remote_cache_bytes``), checked lazily: the format-2
        files of shards ``shard_ids`` are checked by their chunk index and crc32c trailers alone (fetched in two
        rounds of requests: the indexes, then the trailers with the inner chunks ``pieces`` need), not fetched
        whole. Otherwise (and for other files) as every layout."""
        m = self.manifest
        by_chunk = self._remote is not None and self.verify_mode == "lazy" and \
            sum(f.bytes for s in m.shards for f in s.files) > self.remote_cache_bytes // 2
        ranged = [s for s in shard_ids if by_chunk and all(self._checkable_by_chunk(f) for f in m.shards[s].files)]
        rest = [s for s in shard_ids if s not in set(ranged)]
        if ranged:
            self._check_by_chunk(ranged, [p for p in pieces if p[0] in set(ranged)])
        if rest:
            super()._check_group(rest)

    def _checkable_by_chunk(self, f: FileRecord) -> bool:
        shard_format = self._formats.get(f.path.split("/", 1)[0])
        return f.chunks_sha256 is not None and shard_format is not None and shard_format.crc

    def _format_of(self, f: FileRecord) -> ShardFormat:
        """The format of file ``f``'s array (one :meth:`_checkable_by_chunk` accepted)."""
        shard_format = self._formats.get(f.path.split("/", 1)[0])
        assert shard_format is not None  # checkable by chunk
        return shard_format

    def _check_by_chunk(self, shard_ids: list[int], pieces: Sequence[tuple[int, int, int]] = ()) -> None:
        """Check the files of remote shards ``shard_ids`` against the manifest's ``chunks_sha256`` from their
        indexes and chunk trailers only; keep where their chunks lie and the trailers. The inner chunks
        ``pieces`` need come with the trailers (their rows are used only once the check has passed)."""
        files = [(sid, f, self._format_of(f)) for sid in shard_ids for f in self.manifest.shards[sid].files]
        indexes = self._fetched([(sid, f.path, f.bytes - fmt.index_bytes, f.bytes) for sid, f, fmt in files])
        ends, spans = [], []
        for (sid, f, fmt), index in zip(files, indexes, strict=True):
            found = index_ends(index, fmt.chunks_per_shard)
            where = fmt.index_spans(index, f.bytes, self.manifest.shards[sid].rows)
            if found is None or where is None or any(e > f.bytes - fmt.index_bytes for e in found):
                self._refuse_chunks_digest(sid, f)
            ends.append(found)
            spans.append(where)
        where_of = {f.path: where for (_, f, _), where in zip(files, spans, strict=True)}
        trailers = self._fetched([(sid, f.path, e - 4, e) for (sid, f, _), found in zip(files, ends, strict=True)
                                  for e in found] + self._piece_ranges(pieces, where_of))
        at = 0
        for (sid, f, _), index, found, where in zip(files, indexes, ends, spans, strict=True):
            mine = [t.tobytes() for t in trailers[at:at + len(found)]]
            at += len(found)
            if chunks_digest(mine, index) != f.chunks_sha256:
                self._refuse_chunks_digest(sid, f)
            self._spans[f.path] = (where, mine[:len(where)])
        self._verified.update(shard_ids)

    def _refuse_chunks_digest(self, shard_id: int, f: FileRecord) -> NoReturn:
        raise ChecksumError(f"{self._file_url(f.path)}: chunk checksums or shard index do not match the manifest "
                            f"(corrupt or altered file)", path=self._file_url(f.path), shard=shard_id,
                            expected=f.chunks_sha256)

    def _unlearnt(self, shard_id: int) -> bool:
        return any(rel not in self._spans for rel in self._files(shard_id).values())

    def _learn_shard(self, shard_id: int, files: dict[str, np.ndarray]) -> None:
        for name, rel in self._files(shard_id).items():
            if rel not in self._spans:
                fmt = self._formats[name]
                assert fmt is not None  # self._files: arrays with a format only
                self._learn(rel, fmt, shard_id, files[rel], checked=False)

    def _read_remote(self, shard_id: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``[lo, hi)`` of shard ``shard_id`` of a remote store (see :meth:`read_block`)."""
        self.check_shards([shard_id])
        meta = self._shard_meta(shard_id)
        if meta is not None:
            keys, labels = meta[0][lo:hi], meta[1][lo:hi]
        else:
            keys, labels = self._remote_rows("keys", shard_id, lo, hi), self._remote_rows("labels", shard_id, lo, hi)
        return {"key": keys, "logits": self._remote_rows("logits", shard_id, lo, hi), "label": labels}

    def _chunk_ranges(self, name: str, shard_id: int, lo: int, hi: int, spans: dict[str, np.ndarray] | None = None
                      ) -> tuple[list[int], list[ShardRange]]:
        """The inner chunks of array ``name``'s shard ``shard_id`` file holding rows ``[lo, hi)``, and their byte
        ranges ``(shard id, relative path, start, end)``; none where the file's chunks are not known here (or in
        ``spans``)."""
        rel = shard_file(name, self.arrays[name], shard_id)
        known = (spans or {}).get(rel)
        if known is None and rel in self._spans:
            known = self._spans[rel][0]
        shard_format = self._formats.get(name)
        if known is None or shard_format is None or lo >= hi:
            return [], []
        ids = list(shard_format.chunks_of(lo, hi))
        return ids, [(shard_id, rel, int(o), int(o + n)) for o, n in known[ids].tolist()]

    def _remote_rows(self, name: str, shard_id: int, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` of array ``name`` in shard ``shard_id`` of a remote store: the inner chunks holding
        them (held, or fetched), each checked against its crc32c kept when the file was checked, decoded here;
        through zarr where :mod:`.zarr_shards` does not decode the array or its file's chunks are not known."""
        shard_format = self._formats.get(name)
        if shard_format is not None and self._unlearnt(shard_id):
            self._learn_shard(shard_id, self.fetch_shards([shard_id])[shard_id])
        ids, wanted = self._chunk_ranges(name, shard_id, lo, hi)
        out = None
        if shard_format is not None and wanted:
            blobs = self._fetched(wanted)
            trailers = self._spans[wanted[0][1]][1]
            if trailers is not None:
                bad = [i for i, blob in zip(ids, blobs, strict=True) if crc32c(blob[:-4]) != trailers[i]]
                if bad:
                    self._refuse_chunk(wanted[0][1], shard_format, shard_id, bad[0])
            out = shard_format.decode_chunks([blob[:len(blob) - 4 * shard_format.crc] for blob in blobs], ids[0],
                                             lo, hi)
        if out is None and lo < hi or shard_format is None:
            start = self.manifest.shards[shard_id].start
            out = np.asarray(self.arrays[name][start + lo:start + hi])
        elif out is None:
            out = np.zeros((0, *self.arrays[name].shape[1:]), self.arrays[name].dtype)
        return out.astype(object) if name == "keys" and out.dtype != object else out
