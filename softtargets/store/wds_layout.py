"""The WebDataset layout: POSIX tar shards that plain ``webdataset.WebDataset`` reads.

```
store.wds/
  shard-000000.tar ...   one per shard_rows rows; written to a temporary name, then renamed
  manifest.json          written last
  README.md              the dataset card
```

Two sample layouts (the manifest's ``sample_layout``):

* ``block`` (default, for target-only stores): each tar sample holds ``block_rows``
  consecutive rows as ``logits.npy`` ``[b, C]``/``[b, K, C]``, ``labels.npy`` int64 ``[b]``,
  ``keys.npy`` unicode ``[b]`` and ``index.npy`` int64 ``[b]`` (global row numbers).
  Much faster to read than one row per member (``benchmarks/store.py`` compares the two).
* ``sample``: one tar sample per row, ``__key__`` = the zero-padded row number, with
  ``logits.npy`` ``[C]``/``[K, C]``, ``label.cls`` (text int, -1 = unlabeled), ``key.txt`` and the
  inputs packed beside the targets (``input.png``, ``input.npy``, ...).

Every ``.npy`` is written and read with ``allow_pickle=False``; tar headers carry
``mtime=0`` so equal data gives equal bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from collections import OrderedDict
from typing import Any

import numpy as np
import webdataset as wds

from ..choices import SampleLayout, VerifyMode, parse_choice
from .base import ShardStream, StoreError, TargetStore, TargetWriter
from .card import wds_recipe
from .files import atomic_write, crc32c_extend, file_record, is_local, join
from .lru import Lru
from .manifest import FileRecord, Manifest, ShardRecord
from .mapped import MappedFiles

# A one-row-per-sample store is read in runs of up to this many rows.
SAMPLE_LAYOUT_UNIT_ROWS = 256


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as a ``.npy`` file (format 1.0, the bytes ``np.save`` writes), copied once."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        raise ValueError("object arrays are not stored (a store is data, never pickles)")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    return b"".join([header.getvalue(), arr.data.cast("B") if arr.size else b""])


def least_tar_bytes(m: Manifest, rows: int) -> int:
    """The fewest bytes a tar shard of ``rows`` rows of store ``m`` can have: every row's logits, raw; ``block``
    samples also an int64 label and row number per row, ``sample`` samples three members per row, each behind
    a 512-byte header."""
    row = m.storage_dtype.itemsize * int(np.prod(m.logits_shape[1:], dtype=np.int64))
    return rows * (row + (16 if m.sample_layout == "block" else 3 * 512))


def npy_load(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
NPY_HEADER_MAX = 1 << 17  # every format 1.0 header is shorter


def npy_view(member: np.ndarray) -> np.ndarray:
    """The array of a ``.npy`` file's bytes ``member`` (uint8), viewed in place, not copied (read-only when
    ``member`` is). Object arrays are refused: a store is data, never pickles."""
    header = io.BytesIO(member[:NPY_HEADER_MAX].tobytes())
    try:
        shape, fortran, dtype = NPY_HEADER_READERS[np.lib.format.read_magic(header)](header)
    except (KeyError, ValueError):  # another format version, or a header longer than we looked
        return npy_load(member.tobytes())
    if dtype.hasobject:
        raise ValueError("an .npy member holds Python objects (pickles); refused")
    count = int(np.prod(shape, dtype=np.int64))
    body = member[header.tell():header.tell() + count * dtype.itemsize]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"an .npy member is truncated ({len(body)} of {count * dtype.itemsize} data bytes)")
    return body.view(dtype).reshape(shape, order="F" if fortran else "C")


def _input_bytes(ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if ext.endswith("npy"):
        return npy_bytes(np.asarray(value))
    raise TypeError(f"input {ext!r}: give bytes, str, or an array for a '.npy' member; got {type(value).__name__}")


class _Hashed:
    """A binary file that hashes (sha256 and crc32c) and counts what is written to it, in pieces of at least
    ``piece`` bytes (tarfile writes 10 KiB at a time: one write and one hash update each would cost more than
    the bytes)."""

    def __init__(self, file: Any, piece: int = 1 << 20) -> None:
        self.file, self.sha256, self.crc32c, self.bytes, self.piece = file, hashlib.sha256(), 0, 0, piece
        self.pending = bytearray()

    def write(self, data: Any) -> int:
        self.pending += data
        if len(self.pending) >= self.piece:
            self.flush()
        return memoryview(data).nbytes

    def flush(self) -> None:
        self.file.write(self.pending)
        self.sha256.update(self.pending)
        self.crc32c = crc32c_extend(self.crc32c, self.pending)
        self.bytes += len(self.pending)
        self.pending = bytearray()


class _TarStream(ShardStream):
    """A tar shard written as its rows come: each ``block`` sample once its ``block_rows`` rows are in (rows
    held till then), each ``sample`` row at once. The same bytes as ``WdsWriter`` writes whole."""

    def __init__(self, writer: WdsWriter, shard_id: int, path: str, rel: str, count_clipped: bool) -> None:
        super().__init__(shard_id, [path], [rel], count_clipped)
        self.writer = writer
        self.start = writer.spec.shard_range(shard_id)[0]
        self.hashed = _Hashed(self.files[0])
        self.sink = wds.TarWriter(self.hashed, encoder=False, mtime=0)  # as _write_shard_files writes
        self.block = writer.spec.block_rows if writer.spec.sample_layout == "block" else 1
        self.held_logits: np.ndarray | None = None  # the open tar sample's rows: [block, ...] stored logits
        self.held: list[tuple[np.ndarray, np.ndarray, list[dict] | None]] = []  # and their labels, keys, inputs
        self.held_rows = 0
        self.written = 0  # rows in the tar so far

    def _write(self, logits: np.ndarray, labels: np.ndarray, keys: np.ndarray, inputs: list[dict] | None) -> None:
        if self.held_logits is None:
            self.held_logits = np.empty((self.block, *logits.shape[1:]), logits.dtype)
        lo = 0
        while lo < len(keys):
            take = min(len(keys) - lo, self.block - self.held_rows)
            self.held_logits[self.held_rows:self.held_rows + take] = logits[lo:lo + take]
            rows = slice(lo, lo + take)
            self.held.append((labels[rows], keys[rows], None if inputs is None else inputs[rows]))
            self.held_rows += take
            lo += take
            if self.held_rows == self.block:
                self._flush()

    def _flush(self) -> None:
        """Write the held rows as one tar sample (``sample`` layout: one row)."""
        labels, keys = (np.concatenate(p) for p in list(zip(*self.held, strict=True))[:2])
        inputs = None if self.held[0][2] is None else [x for part in self.held for x in (part[2] or [])]
        assert self.held_logits is not None  # allocated by the first _write, which holds the rows flushed here
        for sample in self.writer._samples(self.start + self.written, keys, self.held_logits[:self.held_rows],
                                           labels, inputs):
            self.sink.write(sample)
        self.written += self.held_rows
        self.held, self.held_rows = [], 0

    def _finish(self) -> list[tuple[int, str, str | None, str | None]]:
        if self.held_rows:
            self._flush()
        self.sink.close()
        self.hashed.flush()
        return [(self.hashed.bytes, self.hashed.sha256.hexdigest(), None, f"{self.hashed.crc32c:08x}")]

    def discard(self) -> None:
        self.hashed.pending = bytearray()  # the tar's closing blocks stay in memory: the file is dropped
        with contextlib.suppress(OSError, ValueError):
            self.sink.close()
        super().discard()


class WdsWriter(TargetWriter):
    layout = "wds"

    def shard_stream(self, shard_id: int) -> _TarStream | None:
        """Local stores of a known size: the tar shard is written as its rows come."""
        if not is_local(self.fs) or not self.fixed_rows:
            return None
        rel = shard_name(shard_id)
        return _TarStream(self, shard_id, self.fs._strip_protocol(self._path(rel)), rel, self.clips)

    def _create_layout(self) -> None:
        parse_choice("sample_layout", self.spec.sample_layout, SampleLayout)
        if self.spec.inputs and self.spec.sample_layout != "sample":
            raise ValueError("inputs are packed one row per tar sample: use sample_layout='sample'")

    def _shard_files(self, shard_id: int) -> list[str]:
        return [shard_name(shard_id)]

    def _read_shard_keys(self, shard_id: int) -> list[str]:
        keys: list[str] = []
        data = self.fs.cat_file(join(self.root, shard_name(shard_id)))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                member = tar.extractfile(info)
                if member is not None and info.name.endswith(".keys.npy"):
                    keys += npy_load(member.read()).tolist()
                elif member is not None and info.name.endswith(".key.txt"):
                    keys.append(member.read().decode())
        return keys

    def _write_shard_files(
        self, shard_id: int, start: int, keys: np.ndarray, logits: np.ndarray, labels: np.ndarray,
        inputs: list[dict] | None,
    ) -> list[FileRecord]:
        buf = io.BytesIO()
        # mtime=0 as an int: a float mtime makes tarfile add a 1 KiB PAX header to every member.
        with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
            for sample in self._samples(start, keys, logits, labels, inputs):
                sink.write(sample)
        data = buf.getvalue()
        rel = shard_name(shard_id)
        atomic_write(self.fs, join(self.root, rel), data, fsync=False)  # flushed by sync()
        return [file_record(self.fs, self.root, rel, data, crc=True)]

    def _samples(
        self, start: int, keys: np.ndarray, logits: np.ndarray, labels: np.ndarray, inputs: list[dict] | None
    ) -> Any:
        if self.spec.sample_layout == "block":
            step = self.spec.block_rows
            for lo in range(0, len(keys), step):
                hi = min(lo + step, len(keys))
                yield {
                    "__key__": f"{start + lo:012d}",
                    "logits.npy": npy_bytes(logits[lo:hi]),
                    "labels.npy": npy_bytes(labels[lo:hi]),
                    "keys.npy": npy_bytes(keys[lo:hi]),
                    "index.npy": npy_bytes(np.arange(start + lo, start + hi, dtype=np.int64)),
                }
            return
        for i in range(len(keys)):
            sample = {
                "__key__": f"{start + i:012d}",
                "logits.npy": npy_bytes(logits[i]),
                "label.cls": str(int(labels[i])).encode(),
                "key.txt": str(keys[i]).encode(),
            }
            allowed = self.spec.inputs or {}
            for ext, value in (inputs[i] if inputs is not None else {}).items():
                if ext not in allowed:
                    raise ValueError(f"input member {ext!r} is not among the store's inputs {list(allowed)}")
                sample[ext] = _input_bytes(ext, value)
            yield sample


class WdsStore(TargetStore):
    """A finished WebDataset store: each shard is read whole, checked, and decoded once."""

    cache_shards = 2
    grouped_units = True
    packs_inputs = True

    @classmethod
    def sample_layout_of(cls, sample_layout: str | None) -> str | None:
        """The ``sample_layout`` asked for: a wds store holds many rows per tar sample, or one."""
        return sample_layout

    @classmethod
    def unit_rows(cls, block_rows: int, shard_rows: int, sample_layout: str | None) -> int:
        """Rows per read unit: ``block_rows``; for ``sample`` stores, runs of up to 256 rows."""
        if sample_layout == "sample":
            return max(block_rows, min(shard_rows, SAMPLE_LAYOUT_UNIT_ROWS))
        return block_rows

    @classmethod
    def card_recipes(cls, m: Manifest, url: str) -> list[str]:
        """Reading the store with webdataset alone."""
        return [f"### Plain webdataset\n\n{wds_recipe(m, url)}"]

    def __init__(self, url: str, manifest: Manifest, fs: Any, root: str, verify: VerifyMode = "lazy"):
        self._cache: Lru[int, dict[str, Any]] = Lru(self.cache_shards)
        self._maps = MappedFiles()
        super().__init__(url, manifest, fs, root, verify)

    @property
    def shard_urls(self) -> list[str]:
        """URLs of the tar shards in order (what plain ``webdataset.WebDataset`` takes)."""
        return [self._file_url(shard_name(s.id)) for s in self.manifest.shards]

    def read_shard(self, shard_id: int) -> dict[str, Any]:
        """The whole shard, checked and decoded: ``key`` str [n], ``label`` int64 [n], ``logits`` a list of
        parts (stored dtype, read-only views of the shard's bytes where they can be) holding rows
        ``[starts[i], starts[i + 1])``, ``inputs`` (sample layout: one dict of member bytes per row)."""
        cached = self._cache.get(shard_id)
        if cached is not None:
            return cached
        rel = shard_name(shard_id)
        path = join(self.root, rel)
        source: dict[str, Any]
        try:
            if is_local(self.fs):  # mapped; tarfile reads the headers from the file
                data, source = self._maps(path), {"name": path}
            else:  # fetched once (held from the check of a window's shards, if that came first)
                record = self.manifest.shards[shard_id].files[0]
                data = self._fetched([(shard_id, rel, 0, record.bytes)])[0]
                source = {"fileobj": io.BytesIO(data.tobytes())}
        except FileNotFoundError:
            raise StoreError(f"{self._file_url(rel)}: missing (shard {shard_id})") from None
        self.check_shard(shard_id, {rel: data})
        try:
            with tarfile.open(mode="r:", **source) as tar:
                decoded = self._decode(tar, data, shard_id)
        except StoreError:
            raise
        except (tarfile.TarError, ValueError, KeyError, EOFError) as e:
            raise StoreError(f"{self._file_url(rel)}: cannot decode ({e})") from None
        return self._cache.put(shard_id, decoded)

    def shard_files(self, shard_id: int) -> list[str]:
        return [shard_name(shard_id)]

    def least_bytes(self, shard: ShardRecord) -> dict[str, int]:
        return {shard_name(shard.id): least_tar_bytes(self.manifest, shard.rows)}

    def _decode(self, tar: tarfile.TarFile, data: np.ndarray, shard_id: int) -> dict[str, Any]:
        """Members located by ``tar`` (headers only) in the shard's bytes ``data``; ``.npy`` viewed in place, each
        checked against the manifest's shapes and dtype (:class:`StoreError` naming the shard file)."""
        members: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        for info in tar:
            if info.isfile():
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = data[info.offset_data:info.offset_data + info.size]
        rows = self.manifest.shards[shard_id].rows
        if self.manifest.sample_layout == "block":
            out = self._decode_blocks(members, shard_id)
        else:
            out = self._decode_samples(members, shard_id)
        out["starts"] = np.cumsum([0] + [len(x) for x in out["logits"]])
        if len(out["key"]) != rows or out["starts"][-1] != rows:
            raise ValueError(f"holds {len(out['key'])} rows, the manifest says {rows}")
        return out

    def _decode_blocks(self, members: OrderedDict[str, dict[str, np.ndarray]], shard_id: int) -> dict[str, Any]:
        """``block`` samples: each of ``block_rows`` rows (the shard's last may hold fewer), as the manifest says."""
        logits, keys, labels = [], [], []
        parts = list(members.values())
        for i, (name, p) in enumerate(members.items()):
            lg, kk, lb = (npy_view(p[ext]) for ext in ("logits.npy", "keys.npy", "labels.npy"))
            n = len(lg) if lg.ndim else 0
            full = self.manifest.block_rows
            self._expect(shard_id, name, "logits", lg, n if n and (n == full or i == len(parts) - 1) else full)
            self._expect(shard_id, name, "labels", lb, n, np.dtype(np.int64), ())
            if kk.ndim != 1 or len(kk) != n or kk.dtype.kind != "U":
                self._refuse(shard_id, name, "keys", kk, f"str[{n}]")
            logits.append(lg)
            keys.append(kk)
            labels.append(lb)
        return {
            "key": np.concatenate(keys) if keys else np.zeros(0, str),
            "logits": logits,
            "label": np.concatenate(labels) if labels else np.zeros(0, np.int64),
            "inputs": None,
        }

    def _decode_samples(self, members: OrderedDict[str, dict[str, np.ndarray]], shard_id: int) -> dict[str, Any]:
        """``sample`` samples: one row each, logits of the manifest's shape and dtype."""
        samples = list(members.values())
        wanted = set(self.manifest.inputs or ())
        trailing = self.manifest.logits_shape[1:]
        rows = []
        for name, s in members.items():
            lg = npy_view(s["logits.npy"])
            storage = self.manifest.storage_dtype
            if lg.dtype != storage or lg.shape != trailing:
                self._refuse(shard_id, name, "logits", lg, f"{storage}{self._shape(trailing)}")
            rows.append(lg)
        return {
            "key": np.array([s["key.txt"].tobytes().decode() for s in samples], dtype=str),
            "logits": [np.stack(rows) if rows else np.zeros((0, *trailing), self.manifest.storage_dtype)],
            "label": np.array([int(s["label.cls"].tobytes()) for s in samples], dtype=np.int64),
            "inputs": [{ext: v.tobytes() for ext, v in s.items() if ext in wanted} for s in samples],
        }

    def _expect(self, shard_id: int, name: str, what: str, arr: np.ndarray, rows: int,
                dtype: np.dtype | None = None, trailing: tuple[int, ...] | None = None) -> None:
        """Refuse member ``what`` of tar sample ``name`` unless it is ``dtype[rows, *trailing]`` (default: the
        manifest's stored logits)."""
        dtype = self.manifest.storage_dtype if dtype is None else dtype
        trailing = self.manifest.logits_shape[1:] if trailing is None else trailing
        if arr.dtype != dtype or arr.shape != (rows, *trailing):
            self._refuse(shard_id, name, what, arr, f"{dtype}{self._shape((rows, *trailing))}")

    @staticmethod
    def _shape(shape: tuple[int, ...]) -> str:
        return f"[{', '.join(map(str, shape))}]"

    def _refuse(self, shard_id: int, name: str, what: str, arr: np.ndarray, expected: str) -> None:
        m, found = self.manifest, f"{arr.dtype}{self._shape(arr.shape)}"
        raise StoreError(
            f"{self._file_url(shard_name(shard_id))}: sample {name!r} holds {what} {found}, "
            f"the manifest (C={m.num_classes}, K={m.num_teachers}, {m.dtype}, block_rows={m.block_rows}) says "
            f"{expected}; the manifest does not describe this data"
        )

    def _held_files(self, shard_id: int) -> dict[str, Any]:
        rel = shard_name(shard_id)
        if not is_local(self.fs):
            return {}
        try:
            return {rel: self._maps(join(self.root, rel))}
        except FileNotFoundError:
            raise StoreError(f"{self._file_url(rel)}: missing (shard {shard_id})") from None

    def read_block(self, shard_id: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        shard = self.read_shard(shard_id)
        starts = shard["starts"]
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left"))
        parts = [x[max(lo - a, 0):hi - a] for x, a in zip(shard["logits"][first:last], starts[first:last].tolist(),
                                                            strict=True)]
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else shard["logits"][0][:0]
        return {"key": shard["key"][lo:hi], "logits": logits, "label": shard["label"][lo:hi]}

    def read_inputs(self, index: int) -> dict[str, Any]:
        """Inputs packed beside row ``index``: member extension -> bytes (``.npy`` decoded to arrays)."""
        if not self.manifest.inputs:
            return super().read_inputs(index)
        sid = self.shard_of(index)
        raw = self.read_shard(sid)["inputs"][index - self.manifest.shards[sid].start]
        return {ext: npy_load(v) if ext.endswith("npy") else v for ext, v in raw.items()}
