"""A zarr v3 shard file read in one piece, without zarr's asynchronous pipeline.

A shard file (sharding codec, index at the end) is its encoded inner chunks followed by an
index of two little-endian uint64 per inner chunk (offset, size; 2^64-1 for a chunk never
written) and a crc32c of that index. For the codec chains softtargets writes, rows are decoded
here with numcodecs, one call per inner chunk they lie in: ``bytes`` (raw), ``zstd`` on top, and
``vlen-utf8`` strings (as Python ``str`` objects, not numpy ``StringDType``). Uncompressed
chunks stored in order are *viewed* in place. zarr's own per-call overhead is ~1 ms per inner
chunk here, more than copying the chunk; other chains return None and zarr reads them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, ShardingCodec, ShardingCodecIndexLocation, VLenUTF8Codec, ZstdCodec

EMPTY_CHUNK = 2**64 - 1
_CRC32C = numcodecs.CRC32C()
_VLEN_UTF8 = numcodecs.VLenUTF8()


@dataclass(frozen=True)
class ShardDecoder:
    """How to decode one array's shard files: inner chunks of ``chunk_rows`` rows of shape ``trailing``,
    ``chunks_per_shard`` index entries, values of ``dtype`` (object for strings)."""

    chunk_rows: int
    chunks_per_shard: int
    dtype: np.dtype
    trailing: tuple[int, ...]
    strings: bool
    compressor: Any  # numcodecs codec or None

    @classmethod
    def of(cls, arr: zarr.Array) -> ShardDecoder | None:
        """The decoder for ``arr``'s shards, or None where zarr must read them (another codec chain,
        a big-endian machine, chunks that split a row)."""
        codecs = arr.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or sys.byteorder != "little":
            return None
        sharding = codecs[0]
        if sharding.index_location != ShardingCodecIndexLocation.end or tuple(sharding.chunk_shape[1:]) != tuple(
            arr.shape[1:]
        ):
            return None
        first, *rest = sharding.codecs
        compressor = None
        if rest:
            if len(rest) != 1 or not isinstance(rest[0], ZstdCodec):
                return None
            compressor = numcodecs.Zstd(level=rest[0].level)
        if isinstance(first, VLenUTF8Codec):
            dtype, strings = np.dtype(object), True
        elif isinstance(first, BytesCodec) and isinstance(arr.dtype, np.dtype) and arr.dtype.kind in "fiu":
            if arr.dtype.itemsize > 1 and (first.endian is None or first.endian.value != "little"):
                return None
            dtype, strings = np.dtype(arr.dtype), False
        else:
            return None
        shard_rows = arr.metadata.chunk_grid.chunk_shape[0]
        return cls(sharding.chunk_shape[0], shard_rows // sharding.chunk_shape[0], dtype, tuple(arr.shape[1:]),
                   strings, compressor)

    @property
    def _chunk_bytes(self) -> int:
        return self.chunk_rows * self.dtype.itemsize * int(np.prod(self.trailing, dtype=np.int64))

    def _index(self, buf: np.ndarray, rows: int) -> np.ndarray | None:
        """``[chunks, 2]`` (offset, size) of the inner chunks holding the first ``rows`` rows, or None
        where the index is damaged, a chunk is missing, or a chunk lies outside the file."""
        index_bytes = 16 * self.chunks_per_shard + 4
        if len(buf) < index_bytes:
            return None
        try:
            index = _CRC32C.decode(buf[len(buf) - index_bytes:])
        except RuntimeError:
            return None
        chunks = np.frombuffer(index, "<u8").reshape(-1, 2)[: -(-rows // self.chunk_rows)]
        if (chunks == EMPTY_CHUNK).any() or (chunks.sum(axis=1) > len(buf) - index_bytes).any():
            return None
        return chunks

    def view(self, buf: np.ndarray, rows: int) -> np.ndarray | None:
        """The first ``rows`` rows as a view of the shard file's bytes ``buf`` (no copy), or None where the
        chunks are compressed or not stored one after another in order. The whole index must be exactly
        that layout's (a stronger check than its crc32c)."""
        if self.strings or self.compressor is not None:
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
        where :meth:`view` can, else the inner chunks holding them decoded. None where the file is not what
        the array's metadata describes (then zarr reads it, and reports it)."""
        hi = rows if hi is None else hi
        whole = self.view(buf, rows)
        if whole is not None:
            return whole[lo:hi]
        chunks = self._index(buf, rows)
        if chunks is None:
            return None
        first = lo // self.chunk_rows
        parts = []
        for offset, size in chunks[first:-(-hi // self.chunk_rows)].tolist():
            data = buf[offset:offset + size]
            if self.compressor is not None:
                data = np.frombuffer(self.compressor.decode(data), np.uint8)
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
