"""Sequence stores: a target store whose rows are token positions, grouped into sequences.

A sequence store is an ordinary store (any layout, any content) plus three plain ``.npy`` files under
``sequences/`` and the manifest's ``sequences`` field that lists them with their size and sha256:

- ``sequences/offsets.npy``: int64 ``[S + 1]``; sequence ``s`` holds rows ``[offsets[s], offsets[s + 1])``;
- ``sequences/tokens.npy``: int32 ``[N]``; the input token id at every row (position ``t`` of its sequence);
- ``sequences/keys.npy``: unicode ``[S]``; each sequence's key.

Row ``t`` of a sequence holds the teacher's logits for the token *after* position ``t``, and its label is that
token (``-1`` where it is unknown: the last position of a sequence written without ``next_id``). Row keys are
``"{sequence key}/{t}"``. The grouping is orthogonal to what a row holds: the rows go through the store's own
writer, so a content of any kind is written and read the same way.

Why files and not the manifest: the offsets of 10^6–10^8 sequences would make ``manifest.json`` (parsed at open
in every DataLoader worker) tens of megabytes; three ``.npy`` files read with ``numpy.load`` anywhere, the
tokens are read by byte range (no need to load ``4 N`` bytes in every worker), and the manifest keeps their
sha256 like any data file's.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
from typing import Any

import numpy as np
import torch

from ..choices import VerifyMode
from ..errors import ChecksumError, StoreError
from .base import TargetStore, TargetWriter
from .encoding import decode_logits
from .files import atomic_write, join

SEQUENCE_DIR = "sequences"
OFFSETS_FILE = f"{SEQUENCE_DIR}/offsets.npy"
TOKENS_FILE = f"{SEQUENCE_DIR}/tokens.npy"
KEYS_FILE = f"{SEQUENCE_DIR}/keys.npy"
TOKEN_DTYPE = "int32"

__all__ = ["SequenceStore", "SequenceWriter", "create_sequences", "open_sequences"]


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _as_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


class SequenceWriter:
    """Writes sequences into a store: one row per token position. Use :func:`create_sequences`.

    Each :meth:`write` appends whole sequences; :meth:`close` writes ``sequences/*.npy`` and the manifest.
    The token ids and offsets are kept in memory until then (4 bytes per token, 8 per sequence).
    """

    def __init__(self, writer: TargetWriter):
        self.writer = writer
        self._tokens: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._keys: list[str] = []
        self._seen: set[str] = set()

    @property
    def num_classes(self) -> int:
        return self.writer.spec.num_classes

    @property
    def rows_written(self) -> int:
        return int(sum(self._lengths))

    def write(self, key: str, ids: Any, logits: Any, next_id: int | None = None) -> None:
        """Append one sequence.

        Args:
            key: the sequence's unique, non-empty key (its rows' keys are ``key/t``).
            ids: ``[L]`` input token ids (int, in ``[0, num_classes)``).
            logits: ``[L, C]`` (or ``[L, K, C]`` for ``per_teacher``), any float dtype, torch or numpy; row ``t``:
                the teacher's logits for the token after position ``t``.
            next_id: the token after the sequence (the last row's label), if known; else that label is ``-1``.

        Raises:
            ValueError: a repeated or empty key, an empty sequence, ids outside the vocabulary, or logits whose
                row count is not ``L``.
        """
        key = str(key)
        if not key:
            raise ValueError("sequence keys must be non-empty strings")
        if key in self._seen:
            raise ValueError(f"sequence key {key!r} written twice")
        arr = np.asarray(_as_numpy(ids)).reshape(-1)
        length = len(arr)
        if length == 0:
            raise ValueError(f"sequence {key!r} is empty")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"sequence {key!r}: token ids must be integers, got {arr.dtype}")
        c = self.num_classes
        if arr.min() < 0 or arr.max() >= c:
            raise ValueError(f"sequence {key!r}: token ids must lie in [0, {c}) (the store's num_classes)")
        if int(logits.shape[0]) != length:
            raise ValueError(f"sequence {key!r}: {length} token ids but {int(logits.shape[0])} logit rows")
        labels = np.empty(length, dtype=np.int64)
        labels[:-1] = arr[1:]
        labels[-1] = -1 if next_id is None else int(next_id)
        self.writer.write([f"{key}/{t}" for t in range(length)], logits, labels)
        self._seen.add(key)
        self._keys.append(key)
        self._lengths.append(length)
        self._tokens.append(arr.astype(np.int32))

    def close(self) -> Any:
        """Write ``sequences/*.npy``, then the store's manifest (with its ``sequences`` field). Returns it."""
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(self._lengths, dtype=np.int64), out=offsets[1:])
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, np.int32)
        keys = np.asarray(self._keys, dtype=str) if self._keys else np.zeros(0, dtype="<U1")
        w = self.writer
        w.prepare()
        files = []
        for rel, arr in ((OFFSETS_FILE, offsets), (TOKENS_FILE, tokens), (KEYS_FILE, keys)):
            data = _npy_bytes(arr)
            w.fs.makedirs(join(w.root, SEQUENCE_DIR), exist_ok=True)
            atomic_write(w.fs, join(w.root, rel), data)
            files.append({"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        w.spec.sequences = {
            "count": len(self._lengths), "target": "next_token", "token_dtype": TOKEN_DTYPE,
            "max_length": int(max(self._lengths, default=0)), "files": files,
        }
        return w.close()

    def __enter__(self) -> SequenceWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()


def create_sequences(url: str | os.PathLike[str], *, vocab_size: int, **kwargs: Any) -> SequenceWriter:
    """Begin a sequence store at ``url``: :func:`~softtargets.create_targets` with ``num_classes=vocab_size``
    (every other argument as there; ``num_samples`` may be left out) wrapped in a :class:`SequenceWriter`."""
    from . import create_targets

    return SequenceWriter(create_targets(url, num_classes=int(vocab_size), **kwargs))


def copy_sequence_files(src: TargetStore, writer: TargetWriter) -> None:
    """Give the store ``writer`` makes the sequences of ``src`` (its rows in the same order: a conversion): the
    three ``sequences/*.npy`` files, each checked against ``src``'s manifest, and the manifest's ``sequences``.
    Nothing for a store without sequences.

    Raises:
        StoreError: a file is missing; ChecksumError: a file does not match its sha256.
    """
    if src.manifest.sequences is None:
        return
    writer.prepare()
    writer.fs.makedirs(join(writer.root, SEQUENCE_DIR), exist_ok=True)
    for rec in src.manifest.sequences["files"]:
        rel = rec["path"]
        if rel not in (OFFSETS_FILE, TOKENS_FILE, KEYS_FILE):
            raise StoreError(f"{src._file_url(rel)}: not a sequence file's path; refused", path=src._file_url(rel))
        try:
            data = src.fs.cat_file(join(src.root, rel))
        except FileNotFoundError:
            raise StoreError(f"{src._file_url(rel)}: missing (listed in the manifest's sequences)",
                             path=src._file_url(rel)) from None
        found = hashlib.sha256(data).hexdigest()
        if len(data) != rec["bytes"] or found != rec["sha256"]:
            raise ChecksumError(f"{src._file_url(rel)}: sha256 {found} does not match the manifest's {rec['sha256']}",
                                path=src._file_url(rel), expected=rec["sha256"], found=found)
        atomic_write(writer.fs, join(writer.root, rel), data)
    writer.spec.sequences = copy.deepcopy(src.manifest.sequences)


def offsets_problem(offsets: np.ndarray, m: Any) -> str | None:
    """What is wrong with a sequence store's ``offsets`` (int ``[S + 1]``) against its manifest ``m``, or None."""
    count = int(m.sequences["count"])
    if offsets.shape != (count + 1,) or offsets[0] != 0 or offsets[-1] != m.num_samples or (np.diff(offsets) < 1).any():
        return f"offsets do not cut the store's {m.num_samples} rows into {count} non-empty sequences"
    return None


class SequenceStore:
    """A finished sequence store, read-only. Use :func:`open_sequences`.

    ``store`` is the row store underneath (rows in sequence order); ``offsets`` int64 ``[S + 1]``;
    ``lengths`` int64 ``[S]``. ``seq[s]`` -> ``{"key": str, "index": s, "input_ids": int64 [L],
    "teacher_logits": [L, C] or [L, K, C] (stored dtype), "label": int64 [L]}``.
    """

    def __init__(self, store: TargetStore):
        m = store.manifest
        if m.sequences is None:
            raise StoreError(f"{store.url}: not a sequence store (its manifest has no 'sequences' field)",
                             path=str(store.url))
        self.store, self.manifest = store, m
        self.url = str(store.url)
        self._records = {f["path"]: f for f in m.sequences["files"]}
        for rel in (OFFSETS_FILE, TOKENS_FILE, KEYS_FILE):
            if rel not in self._records:
                raise StoreError(f"{self.url}: the manifest's sequences lack {rel}", path=self.url)
        self._checked: set[str] = set()
        self.offsets = self._load(OFFSETS_FILE).astype(np.int64)
        problem = offsets_problem(self.offsets, m)
        if problem:
            raise StoreError(f"{store._file_url(OFFSETS_FILE)}: {problem}", path=store._file_url(OFFSETS_FILE))
        self.lengths = np.diff(self.offsets)
        self._keys: list[str] | None = None
        self._tokens: np.ndarray | None = None
        self._tokens_at: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.store,))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def _path(self, rel: str) -> str:
        return join(self.store.root, rel)

    def _check(self, rel: str, data: bytes) -> None:
        rec = self._records[rel]
        if self.store.verify_mode == "none" or rel in self._checked:
            return
        found = hashlib.sha256(data).hexdigest()
        if len(data) != rec["bytes"] or found != rec["sha256"]:
            raise ChecksumError(f"{self.store._file_url(rel)}: sha256 {found} does not match the manifest's "
                                f"{rec['sha256']}", path=self.store._file_url(rel), expected=rec["sha256"], found=found)
        self._checked.add(rel)

    def _load(self, rel: str) -> np.ndarray:
        try:
            data = self.store.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            raise StoreError(f"{self.store._file_url(rel)}: missing (listed in the manifest's sequences)",
                             path=self.store._file_url(rel)) from None
        self._check(rel, data)
        return np.load(io.BytesIO(data), allow_pickle=False)

    def keys(self) -> list[str]:
        """Every sequence's key, in store order."""
        if self._keys is None:
            self._keys = self._load(KEYS_FILE).tolist()
        return self._keys

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Input token ids (int32) of rows ``[start, stop)``: a byte-range read of ``tokens.npy`` (local files are
        memory-mapped). The whole file is hashed against the manifest once, on the first read (``verify`` not
        ``none``)."""
        if self._tokens is None and self._tokens_at is None:
            self._open_tokens()
        if self._tokens is not None:
            return np.asarray(self._tokens[start:stop])
        assert self._tokens_at is not None
        data = self.store.fs.cat_file(self._path(TOKENS_FILE), start=self._tokens_at + 4 * start,
                                      end=self._tokens_at + 4 * stop)
        return np.frombuffer(data, dtype="<i4")

    def _open_tokens(self) -> None:
        path = self._path(TOKENS_FILE)
        if self.store.verify_mode != "none":
            h = hashlib.sha256()
            size = 0
            with self.store.fs.open(path, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
                    size += len(chunk)
            rec = self._records[TOKENS_FILE]
            if size != rec["bytes"] or h.hexdigest() != rec["sha256"]:
                raise ChecksumError(f"{self.store._file_url(TOKENS_FILE)}: sha256 {h.hexdigest()} does not match the "
                                    f"manifest's {rec['sha256']}", path=self.store._file_url(TOKENS_FILE),
                                    expected=rec["sha256"], found=h.hexdigest())
        if os.path.exists(path) and type(self.store.fs).__name__ == "LocalFileSystem":
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
            self._tokens = tokens
        else:
            with self.store.fs.open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                self._tokens_at = f.tell()
            if dtype != np.dtype("<i4") or shape != (self.num_tokens,):
                raise StoreError(f"{self.store._file_url(TOKENS_FILE)}: expected int32 [{self.num_tokens}], "
                                 f"got {dtype} {shape}", path=self.store._file_url(TOKENS_FILE))
            return
        if self._tokens.dtype != np.int32 or self._tokens.shape != (self.num_tokens,):
            raise StoreError(f"{self.store._file_url(TOKENS_FILE)}: expected int32 [{self.num_tokens}], "
                             f"got {self._tokens.dtype} {self._tokens.shape}", path=self.store._file_url(TOKENS_FILE))

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(stored, labels)`` of rows ``[start, stop)``: the rows as stored (numpy; possibly a read-only map of
        the file: :meth:`decode` a copy) and int64 labels, read shard by shard without their row keys."""
        parts, labels = [], []
        store, pos = self.store, start
        while pos < stop:
            sid = store.shard_of(pos)
            shard = store.manifest.shards[sid]
            hi = min(stop, shard.stop)
            block = store.read_block(sid, pos - shard.start, hi - shard.start)
            parts.append(block["logits"])
            labels.append(np.asarray(block["label"], dtype=np.int64))
            pos = hi
        stored = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return stored, labels[0] if len(labels) == 1 else np.concatenate(labels)

    def decode(self, stored: np.ndarray) -> torch.Tensor:
        """Stored rows (numpy) as a tensor of the stored dtype (bfloat16 from its bits; compact records as bytes)."""
        if stored.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(stored))
        return decode_logits(stored, self.manifest.dtype)

    def rows(self, start: int, stop: int) -> dict[str, Any]:
        """Rows ``[start, stop)`` with their input ids: the store's :meth:`~TargetStore.rows` plus ``input_ids``
        int64 ``[stop - start]``."""
        out = self.store.rows(start, stop)
        out["input_ids"] = torch.from_numpy(self.tokens(start, stop).astype(np.int64))
        return out

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A ``hidden`` store's output head ``(weight [V, d], bias [V] or None)``, float32, sha256-checked."""
        return self.store.head()

    def sequence(self, s: int) -> dict[str, Any]:
        """Sequence ``s`` whole (see the class docstring)."""
        if not -len(self) <= s < len(self):
            raise IndexError(f"sequence {s} out of range for a store of {len(self)} sequences")
        s %= len(self)
        a, b = int(self.offsets[s]), int(self.offsets[s + 1])
        rows = self.rows(a, b)
        return {"key": self.keys()[s], "index": s, "input_ids": rows["input_ids"],
                "teacher_logits": rows["logits"], "label": rows["label"]}

    def __getitem__(self, s: int) -> dict[str, Any]:
        return self.sequence(int(s))


def open_sequences(url: str | os.PathLike[str] | TargetStore, *, verify: VerifyMode = "lazy",
                   storage_options: dict | None = None) -> SequenceStore:
    """Open a finished sequence store (or wrap an open :class:`TargetStore`).

    Raises:
        StoreError: the store has no ``sequences`` field, or its sequence files are missing or inconsistent.
        ChecksumError: a sequence file does not match its sha256.
    """
    if isinstance(url, TargetStore):
        return SequenceStore(url)
    from . import open_targets

    return SequenceStore(open_targets(url, verify=verify, storage_options=storage_options))

