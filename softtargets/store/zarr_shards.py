"""zarr v3 shard files written and read in one piece, without zarr's asynchronous pipeline.

A shard file (sharding codec, index at the end) is its encoded inner chunks followed by an
index of two little-endian uint64 per inner chunk (offset, size; 2^64-1 for a chunk never
written) and a crc32c of that index. For the codec chains softtargets creates -- ``bytes``
(raw, little-endian) or ``vlen-utf8`` strings, then any ``zstd``, then ``crc32c`` (format 2: each
inner chunk ends with the crc32c of its bytes), index ``bytes`` + ``crc32c``, sharded along axis 0
only -- :class:`ShardFormat` encodes whole shards byte for byte as zarr does (the writer's path) and
decodes rows with numcodecs, one call per inner chunk they lie in (strings as Python ``str``, not
numpy ``StringDType``); uncompressed chunks are *viewed* in place. zarr's own per-call overhead (per
inner chunk to read, per array and shard to write) costs more than copying the chunk
(``benchmarks/store.py`` measures reads and writes per layout). Other chains get None: zarr does the work.

:func:`chunks_digest` fingerprints a shard file by its chunk checksums and index (the manifest's
``chunks_sha256``): a reader that matches it, then checks each chunk's crc32c as it first reads
it, has checked every byte it used without hashing the whole file first.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import (
    BytesCodec,
    Crc32cCodec,
    Endian,
    ShardingCodec,
    ShardingCodecIndexLocation,
    VLenUTF8Codec,
    ZstdCodec,
)
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata import ArrayV3Metadata

from .files import crc32c_extend

EMPTY_CHUNK = 2**64 - 1
_CRC32C = numcodecs.CRC32C(location="end")
_VLEN_UTF8 = numcodecs.VLenUTF8()


@dataclass(frozen=True)
class ShardFormat:
    """One array's shard files: inner chunks of ``chunk_rows`` rows of shape ``trailing``,
    ``chunks_per_shard`` index entries, values of ``dtype`` (object for strings), ``zstd`` codecs
    applied in order after serialising, then a 4-byte crc32c trailer when ``crc``; ``fill_value``
    padding the last inner chunk."""

    chunk_rows: int
    chunks_per_shard: int
    dtype: np.dtype
    trailing: tuple[int, ...]
    strings: bool
    zstd: tuple[Any, ...]  # numcodecs.Zstd, in encoding order
    fill_value: Any
    crc: bool = False

    @classmethod
    def of(cls, arr: zarr.Array) -> ShardFormat | None:
        """The format of ``arr``'s shards, or None where zarr must do the work (another codec chain,
        a big-endian machine, chunks or shards that split a row)."""
        meta = arr.metadata
        if not isinstance(meta, ArrayV3Metadata) or not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        codecs = meta.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or sys.byteorder != "little":
            return None
        sharding = codecs[0]
        index_codecs = [(type(c), getattr(c, "endian", None)) for c in sharding.index_codecs]
        if sharding.index_location != ShardingCodecIndexLocation.end or index_codecs != [
            (BytesCodec, Endian.little), (Crc32cCodec, None)
        ]:
            return None
        shard_shape, chunk_shape = meta.chunk_grid.chunk_shape, sharding.chunk_shape
        if tuple(shard_shape[1:]) != tuple(arr.shape[1:]) or tuple(chunk_shape[1:]) != tuple(arr.shape[1:]):
            return None
        serializer, *compressors = sharding.codecs
        crc = bool(compressors) and isinstance(compressors[-1], Crc32cCodec)
        zstd_codecs = [c for c in (compressors[:-1] if crc else compressors) if isinstance(c, ZstdCodec)]
        if len(zstd_codecs) != len(compressors) - crc:
            return None
        if isinstance(serializer, VLenUTF8Codec):
            dtype, strings = np.dtype(object), True
        elif isinstance(serializer, BytesCodec) and isinstance(arr.dtype, np.dtype) and arr.dtype.kind in "fiu":
            if serializer.endian != Endian.little and not (serializer.endian is None and arr.dtype.itemsize == 1):
                return None
            dtype, strings = np.dtype(arr.dtype), False
        else:
            return None
        zstd = tuple(numcodecs.Zstd(level=c.level, checksum=c.checksum) for c in zstd_codecs)
        return cls(chunk_shape[0], shard_shape[0] // chunk_shape[0], dtype, tuple(arr.shape[1:]), strings, zstd,
                   meta.fill_value, crc)

    def encode(self, shard_id: int, data: np.ndarray, array_rows: int) -> list[Any]:
        """The file of shard ``shard_id`` holding ``data`` (its rows) of an array of ``array_rows`` rows, byte
        for byte as zarr writes it, as bytes-like parts (uncompressed chunks are views of ``data``).

        Inner chunks go in order (the Morton order of a 1-D grid); the one holding the array's last row
        is padded with the fill value; those past the end are absent (index entry ``2**64 - 1``).
        """
        block = self.chunk_rows
        parts: list[Any] = []
        for i in range(self.present_chunks(shard_id, array_rows)):
            parts += self.chunk_parts(data[i * block:(i + 1) * block])
        return [*parts, self.index_part([memoryview(p).nbytes for p in parts])]

    def present_chunks(self, shard_id: int, array_rows: int) -> int:
        """Inner chunks zarr writes for shard ``shard_id`` of an array of ``array_rows`` rows."""
        shard_rows = self.chunks_per_shard * self.chunk_rows
        return -(-min(shard_rows, array_rows - shard_id * shard_rows) // self.chunk_rows)

    def chunk_parts(self, chunk: np.ndarray) -> list[Any]:
        """One inner chunk's bytes (a view of ``chunk`` where uncompressed numbers) and, with ``crc``, its
        4-byte crc32c as a part of its own; ``chunk`` rows short of ``chunk_rows`` are padded with the fill value."""
        if len(chunk) < self.chunk_rows:
            chunk = np.concatenate([chunk, self.padding(self.chunk_rows - len(chunk), chunk.dtype)])
        if self.strings:
            blob: Any = _VLEN_UTF8.encode(chunk.astype(object))
        else:
            blob = np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<")).data.cast("B")
        for codec in self.zstd:
            blob = codec.encode(blob)
        return [blob, crc32c(blob)] if self.crc else [blob]

    def padding(self, rows: int, dtype: np.dtype) -> np.ndarray:
        """``rows`` rows of the fill value: what pads the array's last inner chunk."""
        return np.full((rows, *self.trailing), self.fill_value, dtype=dtype)

    def index_part(self, sizes: list[int]) -> bytes:
        """The index (and its crc32c) of a shard file whose inner chunks, in order, are ``sizes`` bytes long
        (each with its crc32c trailer, where the format has one): the file's last part."""
        if self.crc:
            sizes = [a + b for a, b in zip(sizes[::2], sizes[1::2], strict=True)]
        index = np.full((self.chunks_per_shard, 2), EMPTY_CHUNK, dtype="<u8")  # (offset, bytes) per inner chunk
        if sizes:
            index[:len(sizes), 1] = sizes
            index[:len(sizes), 0] = np.cumsum([0, *sizes[:-1]])
        return _CRC32C.encode(index.tobytes())

    @property
    def _chunk_bytes(self) -> int:
        return self.chunk_rows * self.dtype.itemsize * int(np.prod(self.trailing, dtype=np.int64))

    def spans(self, buf: np.ndarray, rows: int) -> np.ndarray | None:
        """``[chunks, 2]`` (offset, size) of the inner chunks holding the first ``rows`` rows, or None
        where the index is damaged, a chunk is missing, or a chunk lies outside the file."""
        index_bytes = self.index_bytes
        if len(buf) < index_bytes:
            return None
        return self.index_spans(buf[len(buf) - index_bytes:], len(buf), rows)

    @property
    def index_bytes(self) -> int:
        """Bytes of a shard file's index (its entries and their crc32c), at the file's end."""
        return 16 * self.chunks_per_shard + 4

    def index_spans(self, index: Any, file_bytes: int, rows: int) -> np.ndarray | None:
        """:meth:`spans` from a shard file's index alone (its last :attr:`index_bytes` bytes) and size."""
        try:
            decoded = _CRC32C.decode(index)
        except RuntimeError:
            return None
        chunks = np.frombuffer(decoded, "<u8").reshape(-1, 2)[: -(-rows // self.chunk_rows)]
        if (chunks == EMPTY_CHUNK).any() or (chunks.sum(axis=1) > file_bytes - self.index_bytes).any():
            return None
        return chunks

    def view(self, buf: np.ndarray, rows: int) -> np.ndarray | None:
        """The first ``rows`` rows as a view of the shard file's bytes ``buf`` (no copy), or None where the
        chunks are compressed or not stored one after another in order. The whole index must be exactly
        that layout's (a stronger check than its crc32c)."""
        if self.strings or self.zstd:
            return None
        size, entries = self._chunk_bytes, 16 * self.chunks_per_shard
        written = -(-rows // self.chunk_rows)
        if len(buf) < entries + 4 or len(buf) - entries - 4 < written * size:
            return None
        expected = np.full((self.chunks_per_shard, 2), EMPTY_CHUNK, dtype=np.uint64)
        expected[:written, 0] = np.arange(written, dtype=np.uint64) * size
        expected[:written, 1] = size
        if buf[len(buf) - entries - 4:len(buf) - 4].tobytes() != expected.astype("<u8").tobytes():
            return None
        return buf[:rows * (size // self.chunk_rows)].view(self.dtype).reshape(rows, *self.trailing)

    def read(self, buf: np.ndarray, rows: int, lo: int = 0, hi: int | None = None) -> np.ndarray | None:
        """Rows ``[lo, hi)`` (default: all) of a shard of ``rows`` rows whose file's bytes are ``buf``: a view
        where the rows lie in one uncompressed chunk (or :meth:`view` can), else the inner chunks holding
        them decoded and joined. Chunk checksums are not checked here (:meth:`bad_chunks`). None where
        the file is not what the array's metadata describes (then zarr reads it, and reports it)."""
        hi = rows if hi is None else hi
        whole = None if self.crc else self.view(buf, rows)
        if whole is not None:
            return whole[lo:hi]
        chunks = self.spans(buf, rows)
        if chunks is None:
            return None
        first = lo // self.chunk_rows
        spans = chunks[first:-(-hi // self.chunk_rows)].tolist()
        return self.decode_chunks([buf[offset:offset + size - 4 * self.crc] for offset, size in spans], first, lo, hi)

    def decode_chunks(self, payloads: list[np.ndarray], first: int, lo: int, hi: int) -> np.ndarray | None:
        """Rows ``[lo, hi)`` of a shard from the bytes (``uint8``, without crc32c trailers) of its inner chunks
        ``first, first + 1, ...`` that hold them; None where a chunk is not what the format describes."""
        parts = []
        for data in payloads:
            for codec in reversed(self.zstd):
                data = np.frombuffer(codec.decode(data), np.uint8)
            if self.strings:
                part = _VLEN_UTF8.decode(data)
            elif len(data) == self._chunk_bytes:
                part = data.view(self.dtype)
            else:
                return None
            if part.size != self.chunk_rows * int(np.prod(self.trailing, dtype=np.int64)):
                return None
            parts.append(part.reshape(self.chunk_rows, *self.trailing))
        if not parts:
            return np.zeros((0, *self.trailing), self.dtype)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out[lo - first * self.chunk_rows:hi - first * self.chunk_rows]

    def chunks_of(self, lo: int, hi: int) -> range:
        """Inner chunks holding rows ``[lo, hi)``."""
        return range(lo // self.chunk_rows, -(-hi // self.chunk_rows))

    def bad_chunks(self, buf: np.ndarray, rows: int, ids: list[int]) -> list[int]:
        """Those of inner chunks ``ids`` (of a shard of ``rows`` rows, file bytes ``buf``) whose bytes do not
        match their crc32c trailer, or that the index does not place inside the file."""
        chunks = self.spans(buf, rows)
        if chunks is None or not self.crc:
            return list(ids)
        bad = []
        for i in ids:
            offset, size = (int(v) for v in chunks[i])
            if size < 4 or crc32c(buf[offset:offset + size - 4]) != buf[offset + size - 4:offset + size].tobytes():
                bad.append(i)
        return bad

    def parts_digest(self, parts: list[Any]) -> str | None:
        """:func:`chunks_digest` of a file :meth:`encode` made (parts: chunk, crc, chunk, crc, ..., index)."""
        return chunks_digest(parts[1:-1:2], parts[-1]) if self.crc else None


def crc32c(data: Any) -> bytes:
    """The crc32c of bytes-like ``data`` as zarr's ``crc32c`` codec stores it (4 bytes, little-endian)."""
    return crc32c_extend(0, data).to_bytes(4, "little")


def chunks_digest(trailers: Any, index: Any) -> str:
    """sha256 hex of a shard file's chunk checksums (each inner chunk's 4-byte crc32c trailer, in index order)
    followed by its index (entries and their crc32c): the manifest's ``chunks_sha256``."""
    h = hashlib.sha256()
    for t in trailers:
        h.update(t)
    h.update(index)
    return h.hexdigest()


def index_ends(index: Any, chunks_per_shard: int) -> list[int] | None:
    """End offsets of the inner chunks a shard index (its last ``16 * chunks_per_shard + 4`` bytes) lists, in
    index order, or None where its crc32c fails or a chunk is too short to hold a trailer."""
    if len(index) != 16 * chunks_per_shard + 4:
        return None
    try:
        spans = np.frombuffer(_CRC32C.decode(index), "<u8").reshape(-1, 2)
    except RuntimeError:
        return None
    spans = spans[spans[:, 0] != EMPTY_CHUNK]
    return None if (spans[:, 1] < 4).any() else spans.sum(axis=1).tolist()


def file_chunks_digest(buf: np.ndarray, chunks_per_shard: int) -> str | None:
    """:func:`chunks_digest` of the shard file whose bytes are ``buf`` (inner chunks ending in crc32c), or
    None where its index is damaged or places a chunk outside the file."""
    n = 16 * chunks_per_shard + 4
    index = buf[max(0, len(buf) - n):]
    ends = index_ends(index, chunks_per_shard)
    if ends is None or any(e > len(buf) - n for e in ends):
        return None
    return chunks_digest((buf[e - 4:e] for e in ends), index)


class ShardFileWriter:
    """A shard file of ``fmt`` written as its rows arrive, to an open binary file, and hashed as written:
    the same bytes as ``fmt.encode(shard_id, rows, array_rows)``, without holding them all. Uncompressed
    numbers go to the file as they come (each inner chunk's crc32c extended piece by piece), so the caller
    can encode each batch into one small buffer it reuses; strings and compressed chunks are kept until
    their inner chunk is complete."""

    def __init__(self, fmt: ShardFormat, shard_id: int, array_rows: int, file: Any) -> None:
        self.fmt, self.file = fmt, file
        shard_rows = fmt.chunks_per_shard * fmt.chunk_rows
        self.rows = min(shard_rows, array_rows - shard_id * shard_rows)  # this shard's
        self.done = 0  # rows written
        self.chunks = 0  # inner chunks written whole
        self.sizes: list[int] = []  # bytes of each part written (a chunk, its crc32c trailer, ...)
        self.trailers: list[bytes] = []
        self.sha256 = hashlib.sha256()
        self._direct = not (fmt.strings or fmt.zstd)
        self._pending: list[np.ndarray] = []  # the open inner chunk's rows (strings, compressed chunks)
        self._chunk_rows = 0  # rows of the open inner chunk so far
        self._chunk_bytes = 0
        self._crc = 0

    def append(self, rows: np.ndarray) -> None:
        """The shard's next rows ``[n, *trailing]``, in order (``rows`` may be reused once this returns)."""
        if self.done + len(rows) > self.rows:
            raise ValueError(f"shard file of {self.rows} rows given {self.done + len(rows)}")
        while len(rows):
            take = min(len(rows), self.fmt.chunk_rows - self._chunk_rows)
            piece, rows = rows[:take], rows[take:]
            if self._direct:
                self._put(np.ascontiguousarray(piece, piece.dtype.newbyteorder("<")).data.cast("B"))
            else:
                self._pending.append(piece.copy())
            self._chunk_rows += take
            self.done += take
            if self._chunk_rows == self.fmt.chunk_rows or self.done == self.rows:
                self._close_chunk()

    def finish(self) -> tuple[int, str, str | None]:
        """Write the index; ``(bytes, sha256 hex, chunks_sha256 or None)`` of the whole file."""
        if self.done != self.rows:
            raise ValueError(f"shard file finished at {self.done} of its {self.rows} rows")
        index = self.fmt.index_part(self.sizes)
        self._write(index)
        self.sizes.append(len(index))
        digest = chunks_digest(self.trailers, index) if self.fmt.crc else None
        return sum(self.sizes), self.sha256.hexdigest(), digest

    def _close_chunk(self) -> None:
        if self._direct:
            short = self.fmt.chunk_rows - self._chunk_rows  # the array's last inner chunk: padded
            if short:
                pad = np.ascontiguousarray(self.fmt.padding(short, self.fmt.dtype.newbyteorder("<")))
                self._put(pad.data.cast("B"))
            self.sizes.append(self._chunk_bytes)
            if self.fmt.crc:
                trailer = int(self._crc).to_bytes(4, "little")
                self._write(trailer)
                self.sizes.append(4)
                self.trailers.append(trailer)
        else:
            parts = self.fmt.chunk_parts(np.concatenate(self._pending))
            for part in parts:
                self._write(part)
            self.sizes += [memoryview(p).nbytes for p in parts]
            if self.fmt.crc:
                self.trailers.append(bytes(parts[1]))
        self._pending, self._chunk_rows, self._chunk_bytes, self._crc = [], 0, 0, 0
        self.chunks += 1

    def _put(self, data: memoryview) -> None:
        """Bytes of the open (uncompressed) inner chunk."""
        self._write(data)
        self._chunk_bytes += data.nbytes
        if self.fmt.crc:
            self._crc = crc32c_extend(self._crc, data)

    def _write(self, data: Any) -> None:
        self.file.write(data)
        self.sha256.update(data)
