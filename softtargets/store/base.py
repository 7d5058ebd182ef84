"""One writer and one reader interface over every layout.

Writers take ``(keys, logits, labels)`` in batches, cut them into shards of
``shard_rows`` rows and write each shard whole (the unit of atomicity and of
parallel work), then write ``manifest.json`` last. While a store is being written,
``.softtargets-pending.json`` holds its spec and ``.softtargets-shards/`` one marker
per finished shard, so a crashed run can be resumed and a shard task can run in any
process (:meth:`TargetWriter.attach`).

Readers check the manifest and the files' sizes when opened (each file listed at the path the
layout reads, inside the store, and big enough for its rows), and each file's sha256
the first time this process reads it (``verify="lazy"``), or all at open
(``"full"``, which checks all that ``"lazy"`` does), or never (``"none"``). Lazily, a local
zarr store of format 2 checks less up front and the same bytes in the end: each shard file's chunk checksums and
index against the manifest's ``chunks_sha256`` when first read, then each inner chunk
against its crc32c when first read (a shuffle window waits for its own chunks, not for
hashing every file it touches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import shutil
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

import fsspec
import numpy as np
import torch

from .._version import __version__
from ..choices import Rule, VerifyMode, WriteMode, parse_choice
from ..errors import ChecksumError, StoreError
from ..forksafe import ForkSafeLock
from ..math.compact import decode_hidden, head_logits
from ..math.temperature import ensemble_log_probs
from .compact_rows import compact_records, read_head, unpack_rows
from .encoding import at_limit, decode_logits, encode_keys, encode_labels, encode_logits
from .files import (
    atomic_write,
    crc32c_hex,
    fsync_files,
    is_local,
    join,
    link_outside,
    list_sizes,
    local_tree,
    naming_full_disk,
    remove_file,
    remove_temporaries,
    sha256_hex,
    temporary_path,
    unsafe_path,
    url_to_fs,
)
from .manifest import MANIFEST_NAME, FileRecord, Manifest, ManifestError, ShardRecord, provenance, utc_now
from .remote import CACHE_BYTES, RemoteFiles, ShortRead
from .verified import is_verified, record_verified

ShardRange = tuple[int, str, int, int]  # bytes [start, end) of a store's file: (shard id, relative path, start, end)
PENDING_NAME = ".softtargets-pending.json"
MARKER_DIR = ".softtargets-shards"
CARD_NAME = "README.md"
# Manifest fields that must agree between a pending store and a run that resumes it.
SPEC_FIELDS = (
    "layout", "num_samples", "num_classes", "content", "num_teachers", "teachers", "temperature", "dtype",
    "normalization", "overflow", "shard_rows", "block_rows", "sample_layout", "inputs", "transfer_set", "views",
    "compact",
)


def _marker(shard_id: int) -> str:
    return f"{MARKER_DIR}/{shard_id:06d}.json"


class ShardStream(ABC):
    """A shard's files written as its rows are encoded (:meth:`TargetWriter.shard_stream`), each under a
    temporary name beside its own until :meth:`commit` renames them into place. A killed run leaves only
    temporaries (which ``remove_temporaries`` deletes); :meth:`discard` deletes them after a failure.
    Counts what :meth:`TargetWriter.write_shard` records: ``rows``, ``labeled``, ``clipped``."""

    def __init__(self, shard_id: int, paths: list[str], rels: list[str], count_clipped: bool) -> None:
        self.shard_id, self.paths, self.rels, self.count_clipped = shard_id, paths, rels, count_clipped
        self.tmps = [temporary_path(path) for path in paths]
        self.files: list[Any] = []
        for tmp in self.tmps:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            self.files.append(open(tmp, "wb"))  # noqa: SIM115 (closed by commit or discard)
        self.rows = self.labeled = 0
        self.clipped = 0  # values at float16's limit (counted where overflow="clip")
        self._keys: set[str] = set()

    def append(self, logits: np.ndarray, labels: np.ndarray, keys: np.ndarray, inputs: list[dict] | None = None
               ) -> None:
        """The shard's next rows as :meth:`TargetWriter.encode` returns them, in order (the arrays may be reused
        once this returns); ``inputs``: one dict per row, for stores that pack them. A repeated key is refused."""
        add_new_keys(self._keys, keys, f" in shard {self.shard_id}")
        if self.count_clipped:
            self.clipped += at_limit(logits)
        self.labeled += int((labels >= 0).sum())
        with naming_full_disk(self._where):
            self._write(logits, labels, keys, inputs)
        self.rows += len(keys)

    @property
    def _where(self) -> str:
        """The shard's file, or the folder of its files: what a full disk is reported against."""
        return self.paths[0] if len(self.paths) == 1 else os.path.commonpath(self.paths)

    @abstractmethod
    def _write(self, logits: np.ndarray, labels: np.ndarray, keys: np.ndarray, inputs: list[dict] | None) -> None:
        """Write the rows to the files."""

    @abstractmethod
    def _finish(self) -> list[tuple[int, str, str | None, str | None]]:
        """Write what the files still lack; ``(bytes, sha256 hex, chunks_sha256, crc32c hex)`` of each."""

    def commit(self) -> list[FileRecord]:
        """Finish the files and rename them into place; their records."""
        with naming_full_disk(self._where):
            done = self._finish()
        records = []
        for f, tmp, path, rel, (nbytes, sha256, chunks, crc) in zip(self.files, self.tmps, self.paths, self.rels,
                                                                     done, strict=True):
            f.close()
            os.replace(tmp, path)
            records.append(FileRecord(path=rel, bytes=nbytes, sha256=sha256, chunks_sha256=chunks, crc32c=crc))
        return records

    def discard(self) -> None:
        for f, tmp in zip(self.files, self.tmps, strict=True):
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


class TargetWriter(ABC):
    """Writes one store. Use :func:`softtargets.create_targets` to make one.

    ``write()`` appends rows in batches; ``close()`` flushes the last shard and writes
    the manifest. For parallel writing, a coordinator creates the store with
    ``num_samples`` set and each task calls :meth:`write_shard` for whole shards (in
    any process, after :meth:`attach`); the coordinator then calls :meth:`finalize`.
    """

    layout: ClassVar[str]

    def __init__(
        self, url: str, spec: Manifest, *, mode: str = "create", fixed_rows: bool = True,
        storage_options: dict | None = None, defer: bool = False,
    ):
        self.url = str(url)
        self.fixed_rows = fixed_rows or mode in ("attach", "resume")
        self.fs, self.root = url_to_fs(self.url, **(storage_options or {}))
        self.spec = spec
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[dict] | None]] = []
        self._buffered = 0
        self._next_shard = 0
        self._seen_keys: set[str] = set()
        self._resumed = False
        self._records: dict[int, ShardRecord] = {}
        self._closed = False
        self._syncing: list[Future[None]] = []  # shard files being flushed to disk, on _syncer's thread
        self._syncer: ThreadPoolExecutor | None = None
        self._deferred: str | None = None
        if mode == "attach":
            self._open_layout()
            return
        parse_choice("mode", mode, WriteMode)
        if defer:
            self._deferred = mode
        else:
            self._prepare(mode)

    def prepare(self) -> None:
        """Create (or open) the store on storage, for a writer made with ``defer=True``; once. Writing and
        finalizing do it themselves; call it earlier to choose the moment (and the thread)."""
        if self._deferred is not None:
            mode, self._deferred = self._deferred, None
            self._prepare(mode)

    # -- life cycle -------------------------------------------------------------------------------

    def _path(self, rel: str) -> str:
        return join(self.root, rel)

    def _prepare(self, mode: str) -> None:
        fs, root = self.fs, self.root
        exists = fs.exists(root) and (not fs.isdir(root) or bool(fs.ls(root)))
        has_manifest = fs.exists(self._path(MANIFEST_NAME))
        has_pending = fs.exists(self._path(PENDING_NAME))
        if mode == "resume" and has_pending and not has_manifest:
            self._resume_spec()
            self._open_layout()
            self._resumed = True  # write() and rows_done look for the completed shards on first use
            return
        if exists and mode != "overwrite":
            if has_manifest:
                raise FileExistsError(f"{self.url} is a finished store; pass overwrite=True to replace it")
            if has_pending:
                raise FileExistsError(
                    f"{self.url} holds an unfinished store (a crashed run?); resume it or pass overwrite=True"
                )
            raise FileExistsError(f"{self.url} exists; choose a new path or pass overwrite=True")
        if exists:
            delete_store(fs, root, self.url)
        fs.makedirs(root, exist_ok=True)
        self.spec.created = self.spec.created or utc_now()
        self.spec.softtargets_version = __version__
        self.spec.provenance = {**provenance(), **self.spec.provenance}
        self._create_layout()
        atomic_write(fs, self._path(PENDING_NAME), json.dumps(self.spec.to_dict(), indent=1).encode())

    def _resume_spec(self) -> None:
        pending = json.loads(self.fs.cat_file(self._path(PENDING_NAME)))
        new = self.spec.to_dict()
        diff = [f for f in SPEC_FIELDS if pending.get(f) != new.get(f)]
        if diff:
            detail = "; ".join(f"{f}: stored {pending.get(f)!r}, now {new.get(f)!r}" for f in diff)
            raise ValueError(f"cannot resume {self.url}: the run differs from the unfinished store ({detail})")
        self.spec.created = pending["created"]
        self.spec.softtargets_version = pending["softtargets_version"]
        self.spec.provenance = pending["provenance"]

    def _resume_appending(self) -> None:
        """Let :meth:`write` go on after the leading run of shards an earlier run completed (checked), with
        their keys counted as seen; a later shard that was done is written again, bitwise the same."""
        if not self._resumed:
            return
        self._resumed = False
        done = self.completed_shards()
        while self._next_shard in done and self._next_shard < self.spec.num_shards:
            self._records[self._next_shard] = done[self._next_shard]
            self._seen_keys.update(self._read_shard_keys(self._next_shard))
            self._next_shard += 1

    @property
    def rows_done(self) -> int:
        """Rows already in the store when a resumed writer opened it: skip this many rows of the input and
        :meth:`write` the rest (0 for a new store)."""
        self._resume_appending()
        return min(self._next_shard * self.spec.shard_rows, self.spec.num_samples or 0)

    @abstractmethod
    def _read_shard_keys(self, shard_id: int) -> list[str]:
        """The keys of a shard this writer's store holds (for a resumed writer's duplicate check)."""

    @abstractmethod
    def _create_layout(self) -> None:
        """Create the layout's empty structure (arrays at their final shape where known)."""

    def _open_layout(self) -> None:
        """Re-open an existing layout for writing (resume, attach)."""

    @abstractmethod
    def _shard_files(self, shard_id: int) -> list[str]:
        """Paths (relative to the root) of the files that hold shard ``shard_id``."""

    @abstractmethod
    def _write_shard_files(
        self, shard_id: int, start: int, keys: np.ndarray, logits: np.ndarray, labels: np.ndarray,
        inputs: list[dict] | None,
    ) -> list[FileRecord]:
        """Write one whole shard's files and return their records."""

    @property
    def clips(self) -> bool:
        """float16 values beyond its range are clipped (``overflow="clip"``): shards count those at the limit."""
        return self.spec.dtype == "float16" and self.spec.overflow == "clip"

    def shard_stream(self, shard_id: int) -> ShardStream | None:
        """The files of shard ``shard_id``, to write as its rows are encoded, or None (then :meth:`write_shard`
        writes them whole)."""
        return None

    def _finish_layout(self) -> None:
        """Last layout step before the manifest is written."""

    # -- appending --------------------------------------------------------------------------------

    def write(self, keys: Sequence[Any], logits: Any, labels: Any = None, inputs: list[dict] | None = None) -> None:
        """Append a batch of rows.

        Args:
            keys: ``B`` unique, non-empty sample keys (str-able).
            logits: ``[B, C]``, or ``[B, K, C]`` for a ``per_teacher`` store; torch or numpy, any float dtype.
            labels: ``[B]`` integer class labels, ``-1`` = unlabeled; ``None`` = all unlabeled.
            inputs: wds ``sample`` layout only: ``B`` dicts of extension -> bytes or numpy array.
        """
        self._check_open()
        self._resume_appending()
        stored, keys_arr, labels_arr = self.encode(keys, logits, labels, inputs)
        add_new_keys(self._seen_keys, keys_arr)
        self._buffer.append((keys_arr, stored, labels_arr, inputs))
        self._buffered += len(keys_arr)
        if self.fixed_rows and self._next_shard * self.spec.shard_rows + self._buffered > self.spec.num_samples:
            raise ValueError(f"more rows written than the store's num_samples={self.spec.num_samples}")
        while self._buffered >= self.spec.shard_rows:
            self._flush(self.spec.shard_rows)

    def encode(
        self, keys: Any, logits: Any, labels: Any = None, inputs: list[dict] | None = None, *,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check a batch of rows and encode it for this store: ``(stored logits, keys, labels)`` as numpy.

        Arguments as for :meth:`write`; ``out`` as for :func:`~softtargets.store.encoding.encode_logits`
        (shaped like ``logits``). Rows are encoded independently of each other, so a shard encoded
        batch by batch into one array is bitwise what :meth:`write_shard` would encode (pass it with
        ``encoded=True``).
        """
        spec = self.spec
        if spec.compact is not None:  # packed compact records, uint8 [B, row_bytes], stored as given
            stored = compact_records(logits, spec, out)
        else:
            stored, _ = encode_logits(logits, spec.dtype, spec.normalization, spec.overflow, out=out)
        if spec.per_teacher and stored.ndim == 2 and spec.compact is None and spec.num_teachers == 1:
            stored = stored[:, None, :]
        want = spec.logits_shape[1:]
        if stored.shape[1:] != want:
            raise ValueError(
                f"logits of shape {tuple(stored.shape)} do not fit this {spec.content} store, which takes "
                f"[B, {', '.join(map(str, want))}]"
            )
        rows = stored.shape[0]
        if inputs is not None and len(inputs) != rows:
            raise ValueError(f"got {len(inputs)} inputs for {rows} logit rows")
        if inputs is not None and not spec.inputs:
            raise ValueError("this store was created without inputs; pass inputs={ext: description} at creation")
        labels_arr = encode_labels(labels, rows)
        if ((labels_arr < -1) | (labels_arr >= spec.num_classes)).any():
            raise ValueError(f"labels must lie in [0, {spec.num_classes}) or be -1 (unlabeled)")
        return stored, encode_keys(keys, rows), labels_arr

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` buffered rows as the next shard."""
        parts = list(zip(*self._buffer, strict=True))
        keys, stored, labels = (np.concatenate(p) for p in parts[:3])
        inputs = None if parts[3][0] is None else [x for chunk in parts[3] for x in chunk]
        self._buffer = []
        if rows < len(keys):
            tail_inputs = None if inputs is None else inputs[rows:]
            self._buffer = [(keys[rows:], stored[rows:], labels[rows:], tail_inputs)]
        self._buffered = len(keys) - rows
        shard_id = self._next_shard
        if not self.fixed_rows:
            self.spec.num_samples = shard_id * self.spec.shard_rows + rows
        self.write_shard(
            shard_id, keys[:rows], stored[:rows], labels[:rows], None if inputs is None else inputs[:rows],
            encoded=True,
        )
        self._next_shard += 1

    def close(self) -> Manifest:
        """Flush the last (partial) shard and write the manifest. Returns it."""
        self._check_open()
        if self._buffered:
            self._flush(self._buffered)
        return self.finalize()

    def __enter__(self) -> TargetWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None and not self._closed:
            self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"writer for {self.url} is closed")

    # -- shards (the unit of parallel work) -------------------------------------------------------

    def write_shard(
        self, shard_id: int, keys: Any = None, logits: Any = None, labels: Any = None,
        inputs: list[dict] | None = None, *, encoded: bool = False, stream: ShardStream | None = None,
    ) -> ShardRecord:
        """Write shard ``shard_id`` whole, idempotently, and mark it done. Returns its record.

        The rows must be exactly the shard's range ``[shard_id * shard_rows, ...)``. Re-writing a
        shard replaces it; a marker file makes it count as done only once its files are complete.
        ``encoded=True``: ``keys``, ``logits``, ``labels`` are what :meth:`encode` returned (for
        the whole shard, or its batches concatenated); ``inputs`` were checked there too.
        ``stream``: from :meth:`shard_stream`, given every row of the shard (then ``keys``, ``logits``,
        ``labels`` are not used): its files become the shard's.
        """
        self.prepare()
        spec = self.spec
        start, stop = spec.shard_range(shard_id)
        if stream is not None:
            rows, labeled, clipped = stream.rows, stream.labeled, stream.clipped
        elif keys is None or logits is None:
            raise TypeError("write_shard needs the shard's keys and logits, or a stream that holds them")
        else:
            if encoded:
                stored, keys_arr, labels_arr = logits, keys, labels
            else:
                stored, keys_arr, labels_arr = self.encode(keys, logits, labels, inputs)
            add_new_keys(set(), keys_arr, f" in shard {shard_id}")
            rows, labeled = len(keys_arr), int((labels_arr >= 0).sum())
            # Values at float16's limit: what overflow="clip" produced (the error policy lets none through).
            clipped = at_limit(stored) if self.clips else 0
        if rows != stop - start:
            raise ValueError(f"shard {shard_id} holds rows [{start}, {stop}); got {rows} rows")
        marker = self._path(_marker(shard_id))
        for path in (marker, *(self._path(rel) for rel in self._shard_files(shard_id))):
            remove_file(self.fs, path)
        if stream is not None:
            files = stream.commit()
        else:
            files = self._write_shard_files(shard_id, start, keys_arr, stored, labels_arr, inputs)
        rec = ShardRecord(id=shard_id, start=start, rows=rows, files=files, labeled=labeled, clipped=clipped)
        atomic_write(self.fs, marker, json.dumps(dataclasses.asdict(rec)).encode(), fsync=False)
        self._records[shard_id] = rec
        self._sync_later([self._path(f.path) for f in files])
        return rec

    def _sync_later(self, paths: list[str]) -> None:
        """fsync ``paths`` (local files) on a helper thread: the caller goes on, :meth:`sync` waits.

        Shard files are written without waiting for the disk (a killed process loses nothing that
        is renamed into place; a resume re-hashes every shard it keeps); the manifest, which says
        the store is complete, is written only after they are on disk.
        """
        if is_local(self.fs):
            self._in_sync_thread(fsync_files, paths)

    def _in_sync_thread(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` on the helper thread that flushes files to disk, after what it was given before;
        :meth:`sync` waits for it (and raises its error)."""
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="softtargets-fsync")
        self._syncing.append(self._syncer.submit(fn, *args))

    def sync(self) -> None:
        """Wait until every shard this writer wrote is on disk (raises the first fsync error)."""
        pending, self._syncing = self._syncing, []
        for future in pending:
            future.result()

    def completed_shards(self, verify: bool = True) -> dict[int, ShardRecord]:
        """Shards an earlier (possibly crashed) run finished, with files checked against their markers."""
        done: dict[int, ShardRecord] = {}
        marker_dir = self._path(MARKER_DIR)
        if not self.fs.exists(marker_dir):
            return done
        for path in sorted(self.fs.ls(marker_dir, detail=False)):
            if not path.endswith(".json"):
                continue
            try:
                rec = ShardRecord.from_dict(json.loads(self.fs.cat_file(path)))
            except (ValueError, KeyError, TypeError):
                continue
            if not verify or all(_file_matches(self.fs, self.root, f) for f in rec.files):
                done[rec.id] = rec
        return done

    def finalize(self, records: Sequence[ShardRecord] | None = None) -> Manifest:
        """Check that every shard is done, then write the card and, last, ``manifest.json``."""
        self.prepare()
        spec = self.spec
        by_id = {**self._records, **{rec.id: rec for rec in records or ()}}
        if len(by_id) < spec.num_shards:  # shards of earlier runs or other processes: their markers
            by_id = {**self.completed_shards(verify=False), **by_id}
        missing = [i for i in range(spec.num_shards) if i not in by_id]
        if missing:
            raise StoreError(f"{self.url}: shards {missing[:10]} of {spec.num_shards} were never written")
        spec.shards = [by_id[i] for i in range(spec.num_shards)]
        total = sum(s.rows for s in spec.shards)
        if total != spec.num_samples:
            raise StoreError(f"{self.url}: shards hold {total} rows, expected {spec.num_samples}")
        spec.has_labels = any(s.labeled for s in spec.shards)
        spec.clipped_values = sum(s.clipped for s in spec.shards)
        self._finish_layout()
        remove_temporaries(self.fs, self.root)
        self.sync()
        from .card import dataset_card

        ran_here = spec.provenance.get("command") == sys.argv  # its relative paths are relative to this cwd
        card = dataset_card(spec, self.url, cwd=os.getcwd() if ran_here else None)
        atomic_write(self.fs, self._path(CARD_NAME), card.encode())
        atomic_write(self.fs, self._path(MANIFEST_NAME), spec.to_json().encode())
        for rel in (PENDING_NAME, MARKER_DIR):
            remove_tree(self.fs, self._path(rel))
        self._closed = True
        return spec


def _duplicates(keys: np.ndarray) -> list[str]:
    """Keys that occur more than once in ``keys``, sorted."""
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq[counts > 1].tolist()


def add_new_keys(seen: set[str], keys: np.ndarray, where: str = "") -> None:
    """Add ``keys`` to ``seen``; refuses (ValueError, ``seen`` unchanged) a key already seen or repeated."""
    fresh = set(keys.tolist())
    if len(fresh) != len(keys) or not seen.isdisjoint(fresh):
        dup = sorted(k for k in fresh if k in seen) or _duplicates(keys)
        raise ValueError(f"duplicate sample keys{where}: {dup[:5]}")
    seen |= fresh


def _file_matches(fs: fsspec.AbstractFileSystem, root: str, rec: FileRecord) -> bool:
    try:
        data = fs.cat_file(join(root, rec.path))
    except FileNotFoundError:
        return False
    return len(data) == rec.bytes and sha256_hex(data) == rec.sha256


# ---------------------------------------------------------------------------------------------------
# Deleting a store: only what is recognisably one, never what lies outside it


def not_a_store(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """Why ``root`` is not recognisably a softtargets store, or None when it is one: its ``manifest.json``
    parses as a softtargets manifest (schema and format version checked), or its pending spec (the marker
    of an unfinished run) does."""
    reasons = []
    for name in (MANIFEST_NAME, PENDING_NAME):
        try:
            text = fs.cat_file(join(root, name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            continue
        try:
            d = json.loads(text)
            Manifest.from_dict({**d, "shards": []} if name == PENDING_NAME and isinstance(d, dict) else d, name)
            return None
        except (ValueError, TypeError, KeyError) as e:  # ManifestError and JSON errors are ValueErrors
            reasons.append(" ".join(str(e).split())[:200] if isinstance(e, ManifestError) else f"{name}: {e}")
    return "; ".join(reasons) or f"no {MANIFEST_NAME} or {PENDING_NAME}"


def _within(inner: str, outer: str) -> bool:
    """Local real path ``inner`` is ``outer`` or lies under it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _protected(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """What makes ``root`` a folder never to delete (the filesystem's root, or a folder holding the current
    folder or the home folder), or None."""
    if not root.strip("/"):
        return "the filesystem's root"
    if not is_local(fs):
        return None
    real = os.path.realpath(fs._strip_protocol(root))
    if os.path.dirname(real) == real:
        return "the filesystem's root"
    for what, path in (("the current folder", os.getcwd()), ("the home folder", os.path.expanduser("~"))):
        if _within(os.path.realpath(path), real):
            return f"{what} or a folder above it"
    return None


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete the file or folder ``path`` where there is one, without following symbolic links: a link is
    removed, never what it points to."""
    if not is_local(fs):
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    local = fs._strip_protocol(path)
    if os.path.isdir(local) and not os.path.islink(local):
        shutil.rmtree(local)  # unlinks the links inside, never enters them
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local)


def delete_store(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Delete the softtargets store at ``root`` (named ``url`` in errors), and nothing else.

    Raises:
        FileExistsError: ``root`` is not recognisably a store (:func:`not_a_store`), or is a folder never to
            delete (the filesystem's root, the current or home folder or one above them); nothing is deleted.
    """
    protected = _protected(fs, root)
    if protected is not None:
        raise FileExistsError(f"refusing to delete {url}: it is {protected}; choose another path for the store")
    why = not_a_store(fs, root)
    if why is not None:
        raise FileExistsError(f"{url} exists and is not a softtargets store; refusing to delete it ({why}): "
                              "choose a new path or remove it yourself")
    local = fs._strip_protocol(root) if is_local(fs) else None
    if local is not None and os.path.islink(local):  # the store is where the link leads: empty it, keep the link
        for entry in os.listdir(local):
            remove_tree(fs, join(root, entry))
        return
    remove_tree(fs, root)


# ---------------------------------------------------------------------------------------------------
# Reading


class TargetStore(ABC):
    """A finished store, opened read-only. Use :func:`softtargets.open_targets`.

    Indexing gives dicts: ``store[i]`` -> ``{"index": int, "key": str, "logits": [C] or [K, C],
    "label": int}``; ``store[a:b]``, ``store[[i, j, ...]]`` -> ``{"index": int64 [B], "key":
    list[str], "logits": [B, C] or [B, K, C] in the stored dtype, "label": int64 [B]}``;
    ``store["key"]`` looks a sample up by key.

    A layout's class also says what the layout is, so that no other module branches on its name:
    ``grouped_units`` (read units are grouped by shard), ``packs_inputs`` (inputs can be written beside the
    targets), ``compresses`` (a compressor is recorded in the manifest's ``extra``), ``checker`` (the class
    ``softtargets verify`` checks the layout's files with; filled in by the sharing part), and the
    classmethods below.

    A store on a remote filesystem (object storage, http: :attr:`remote`) fetches the bytes it reads with
    ``cat_ranges`` (many ranges per round trip, concurrently), checks them as a local reader checks its files,
    and holds up to ``remote_cache_bytes`` of them (:mod:`.remote`), so each range is downloaded once.
    """

    grouped_units: ClassVar[bool] = False
    packs_inputs: ClassVar[bool] = False
    remote_cache_bytes: ClassVar[int] = CACHE_BYTES  # bytes of a remote store a reader holds (store/remote.py)
    compresses: ClassVar[bool] = False
    checker: ClassVar[type | None] = None

    @classmethod
    def sample_layout_of(cls, sample_layout: str | None) -> str | None:
        """The ``sample_layout`` this layout records for the one asked for (``None``: it has none)."""
        return None

    @classmethod
    def unit_rows(cls, block_rows: int, shard_rows: int, sample_layout: str | None) -> int:
        """Rows per read unit of a store of this layout: its ``block_rows``."""
        return block_rows

    @classmethod
    def manifest_extra(cls, compressor: str) -> dict[str, Any]:
        """The layout's entries in a new manifest's ``extra``."""
        return {"compressor": compressor} if cls.compresses else {}

    @classmethod
    def compressor_of(cls, m: Manifest) -> str:
        """The compressor a store of this layout was written with (``none`` where the layout has none)."""
        return m.extra.get("compressor", "none") if cls.compresses else "none"

    @classmethod
    def card_recipes(cls, m: Manifest, url: str) -> list[str]:
        """The dataset card's sections on reading the store without softtargets."""
        return []

    def __init__(
        self, url: str, manifest: Manifest, fs: fsspec.AbstractFileSystem, root: str, verify: VerifyMode = "lazy"
    ):
        parse_choice("verify mode", verify, VerifyMode)
        self.url, self.manifest, self.fs, self.root, self.verify_mode = url, manifest, fs, root, verify
        self._verified: set[int] = set()
        self._checking: dict[int, threading.Event] = {}  # shards a thread is checking (check_shards)
        self._checking_lock, self._checking_pid = ForkSafeLock(), os.getpid()
        self._key_index: dict[str, int] | None = None
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._starts = np.array([s.start for s in manifest.shards], dtype=np.int64)
        # Remote filesystems: the bytes fetched, each range once (concurrently), and kept while they fit.
        self._remote = None if is_local(fs) else RemoteFiles(fs, root, self.remote_cache_bytes)
        self._check_rows()
        self._check_metadata_paths()
        self._open_layout()
        self._check_files()
        if verify == "full" and self._remote is not None:
            self.check_shards(s.id for s in manifest.shards)  # fetched together, a group at a time
        elif verify == "full":
            for s in manifest.shards:
                self.check_shard(s.id, self._held_files(s.id))

    @property
    def remote(self) -> bool:
        """Whether the store is read from a remote filesystem (not a local one): reads then fetch bytes."""
        return self._remote is not None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as "open again" (for DataLoader workers): no caches, zarr handles or file handles travel."""
        return (type(self), (self.url, self.manifest, self.fs, self.root, self.verify_mode))

    # -- integrity --------------------------------------------------------------------------------

    def _file_url(self, rel: str) -> str:
        return posixpath.join(self.url.rstrip("/"), rel)

    def _check_rows(self) -> None:
        """The shard table covers rows ``[0, num_samples)`` once each, in order (catches an edited row count)."""
        m = self.manifest
        total = sum(s.rows for s in m.shards)
        bad = [s.id for i, s in enumerate(m.shards) if (s.id, s.start, s.stop) != (i, *m.shard_range(i))]
        if total != m.num_samples or len(m.shards) != m.num_shards or bad:
            raise StoreError(
                f"{self._file_url(MANIFEST_NAME)}: inconsistent row counts: {len(m.shards)} shards hold {total} rows, "
                f"num_samples says {m.num_samples} in shards of {m.shard_rows}"
                + (f"; shards {bad[:5]} do not cover their rows" if bad else "")
            )

    def _check_metadata_paths(self) -> None:
        """No layout metadata file (:attr:`metadata_files`) is a link out of the store; checked before any is read."""
        for rel in self.metadata_files:
            real = link_outside(self.fs, self.root, rel)
            if real is not None:
                raise StoreError(f"{self._file_url(rel)}: a link out of the store (to {real}); refused, not read")

    def _check_files(self) -> None:
        """Every file the manifest lists is at the path the layout computes for it (so the file checked is the one
        read), stays inside the store (no link out of it), exists with its recorded size (listable filesystems),
        and is large enough for the rows the manifest gives its shard (so no row count is believed that the
        files cannot hold)."""
        sizes, links = self._listing()
        for shard in self.manifest.shards:
            paths = [f.path for f in shard.files]
            expected = self.shard_files(shard.id)
            if paths != expected:
                raise StoreError(self._path_refusal(shard.id, paths, expected))
            least = self.least_bytes(shard)
            for f in shard.files:
                real = link_outside(self.fs, self.root, f.path, links)
                if real is not None:
                    raise StoreError(f"{self._file_url(f.path)}: a link out of the store (to {real}), shard "
                                     f"{shard.id}; refused, not read")
                if sizes is not None and f.path not in sizes:
                    raise StoreError(f"{self._file_url(f.path)}: missing (listed in the manifest, shard {shard.id})")
                if sizes is not None and sizes[f.path] != f.bytes:
                    raise StoreError(
                        f"{self._file_url(f.path)}: {sizes[f.path]} bytes, the manifest says {f.bytes} "
                        f"(truncated or replaced)"
                    )
                if f.bytes < least.get(f.path, 0):
                    raise StoreError(
                        f"{self._file_url(f.path)}: {f.bytes} bytes cannot hold the {shard.rows} rows the manifest "
                        f"gives shard {shard.id} (at least {least[f.path]} bytes); the manifest's row counts are wrong"
                    )

    def _listing(self) -> tuple[dict[str, int] | None, set[str] | None]:
        """Relative path -> bytes of every file in the store and, for local stores, the symbolic links in it
        (``(None, None)`` where the filesystem cannot list)."""
        if is_local(self.fs):
            return local_tree(self.fs._strip_protocol(self.root))
        return list_sizes(self.fs, self.root), None

    def _path_refusal(self, shard_id: int, paths: list[str], expected: list[str]) -> str:
        """The one-line refusal of shard ``shard_id``'s file paths ``paths`` where the layout reads ``expected``."""
        for rel in paths:
            why = unsafe_path(rel)
            if why is not None:
                return (f"{self._file_url(MANIFEST_NAME)}: shard {shard_id} lists the file {rel!r}, which leaves the "
                        f"store ({why}); refused, not read")
        return (f"{self._file_url(MANIFEST_NAME)}: shard {shard_id} lists files {paths}, but this layout reads "
                f"{expected}; rewrite the manifest with the layout's paths")

    def check_shard(self, shard_id: int, data: dict[str, Any] | None = None) -> None:
        """Check shard ``shard_id``'s files against the manifest (once per process; ``data``: the bytes of
        files at hand, by relative path)."""
        if shard_id in self._verified or self.verify_mode == "none":
            return
        files = self.manifest.shards[shard_id].files
        if self.verify_mode == "lazy" and is_local(self.fs) and all(
                is_verified(self._local_path(f.path), f.sha256) for f in files):
            self._verified.add(shard_id)  # checked on this machine before, unchanged since (store/verified.py)
            return
        for f in files:
            self._check_file(shard_id, f, (data or {}).get(f.path))
        self._verified.add(shard_id)

    def _local_path(self, rel: str) -> str:
        """The path of a local store's file ``rel`` on this machine."""
        return str(self.fs._strip_protocol(join(self.root, rel)))

    def _remember(self, f: FileRecord) -> None:
        """Record local file ``f`` as checked against the manifest on this machine (store/verified.py)."""
        if is_local(self.fs):
            record_verified(self._local_path(f.path), f.sha256)

    def _check_file(self, shard_id: int, f: FileRecord, blob: Any) -> None:
        """File ``f`` of shard ``shard_id`` has its recorded size and sha256 (``blob``: its bytes, or None
        to read them). A file that records its crc32c is checked lazily by that alone (a quarter of sha256's
        time), and by both in ``full``."""
        if blob is None and self._remote is not None:
            blob = self._fetched([(shard_id, f.path, 0, f.bytes)])[0]
        if blob is None:
            try:
                blob = self.fs.cat_file(join(self.root, f.path))
            except FileNotFoundError:
                raise StoreError(f"{self._file_url(f.path)}: missing (shard {shard_id})",
                                 path=self._file_url(f.path), shard=shard_id) from None
        if len(blob) != f.bytes:
            raise StoreError(f"{self._file_url(f.path)}: {len(blob)} bytes, the manifest says {f.bytes}")
        if (f.crc32c is None or self.verify_mode != "lazy") and sha256_hex(blob) != f.sha256:
            raise ChecksumError(
                f"{self._file_url(f.path)}: sha256 does not match the manifest (corrupt or altered file)",
                path=self._file_url(f.path), shard=shard_id, expected=f.sha256, found=sha256_hex(blob),
            )
        if f.crc32c is not None and crc32c_hex(blob) != f.crc32c:
            raise ChecksumError(
                f"{self._file_url(f.path)}: crc32c does not match the manifest (corrupt or altered file)",
                path=self._file_url(f.path), shard=shard_id, expected=f.crc32c, found=crc32c_hex(blob),
            )
        self._remember(f)

    def check_shards(self, shard_ids: Iterable[int], pieces: Sequence[tuple[int, int, int]] = ()) -> None:
        """:meth:`check_shard` for several shards at once, hashed on parallel threads (hashlib releases
        the GIL): what a shuffle window that starts in many shards waits for, divided by the cores. A
        remote store fetches the shards' files first, together (:meth:`fetch_shards`); ``pieces``: what
        will be read of them next (as for :meth:`prefetch`), which a layout may fetch along with the check."""
        todo = sorted({int(s) for s in shard_ids} - self._verified) if self.verify_mode != "none" else []
        mine, others = self._claim(todo)
        try:
            self._check_group(mine, pieces)
        finally:
            self._release(mine)
        for done in others:
            done.wait()
        failed = [s for s in todo if s not in self._verified]
        if others and failed:  # another thread's check failed: checked again here, to raise the same
            self.check_shards(failed, pieces)

    def _check_group(self, shard_ids: list[int], pieces: Sequence[tuple[int, int, int]] = ()) -> None:
        """:meth:`check_shard` of each of ``shard_ids`` (none checked yet, none being checked by another thread),
        hashed on parallel threads; remote files fetched whole, as many at once as can be held. ``pieces``: see
        :meth:`check_shards`."""
        for group in self._fetch_groups(shard_ids):
            # Maps are made here, on one thread; remote files are fetched in one round of requests.
            held = {s: self._held_files(s) for s in group} if self._remote is None else self.fetch_shards(group)
            if len(group) <= 1:
                for s in group:
                    self.check_shard(s, held[s])
                continue
            with ThreadPoolExecutor(min(len(group), os.cpu_count() or 1), thread_name_prefix="softtargets-sha256") \
                    as pool:
                list(pool.map(self.check_shard, group, [held[s] for s in group]))

    def _claim(self, shard_ids: list[int]) -> tuple[list[int], list[threading.Event]]:
        """Shards ``shard_ids`` this thread checks (no other thread is checking them), and the events of those
        another thread is checking (a read-ahead thread's window): each shard is hashed once."""
        with self._checking_lock:
            if self._checking_pid != os.getpid():  # a forked child: the parent's threads are not here
                self._checking, self._checking_pid = {}, os.getpid()
            mine = [s for s in shard_ids if s not in self._checking]
            others = [self._checking[s] for s in shard_ids if s in self._checking]
            for s in mine:
                self._checking[s] = threading.Event()
        return mine, others

    def _release(self, shard_ids: list[int]) -> None:
        with self._checking_lock:
            for s in shard_ids:
                self._checking.pop(s).set()

    def prefetch(self, pieces: Sequence[tuple[int, int, int]]) -> None:
        """Make ready to read pieces ``(shard id, a, b)`` (store rows ``[a, b)`` of that shard): their shards are
        checked, all at once (:meth:`check_shards`); a remote store also fetches the bytes they need that it
        does not hold, in one round of concurrent requests. Reading works without it, a request at a time."""
        self.check_shards((sid for sid, _, _ in pieces), pieces)

    def _fetch_groups(self, shard_ids: list[int]) -> list[list[int]]:
        """``shard_ids`` cut into runs whose files a remote reader can hold at once (half its capacity); one run
        for a local store."""
        if self._remote is None or not shard_ids:
            return [shard_ids] if shard_ids else []
        groups: list[list[int]] = [[]]
        size = 0
        for sid in shard_ids:
            nbytes = sum(f.bytes for f in self.manifest.shards[sid].files)
            if groups[-1] and size + nbytes > self._remote.capacity // 2:
                groups.append([])
                size = 0
            groups[-1].append(sid)
            size += nbytes
        return groups

    def fetch_shards(self, shard_ids: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
        """Remote stores: the whole files of shards ``shard_ids``, by shard id and relative path (``uint8``),
        fetched in one round of concurrent requests (those held already are not fetched again)."""
        wanted = [(sid, f.path, 0, f.bytes) for sid in shard_ids for f in self.manifest.shards[sid].files]
        out: dict[int, dict[str, np.ndarray]] = {int(sid): {} for sid in shard_ids}
        for (sid, rel, _, _), data in zip(wanted, self._fetched(wanted), strict=True):
            out[sid][rel] = data
        return out

    def _fetched(self, wanted: Sequence[ShardRange]) -> list[np.ndarray]:
        """A remote store's bytes ``[a, b)`` of each file ``(shard id, relative path, a, b)``; a missing or short
        file refused (:class:`StoreError` naming it and its shard)."""
        assert self._remote is not None  # remote stores only
        shard_of = {rel: sid for sid, rel, _, _ in wanted}
        try:
            return self._remote.get([(rel, a, b) for _, rel, a, b in wanted])
        except FileNotFoundError as e:
            url = self._file_url(str(e.filename))
            raise StoreError(f"{url}: missing (shard {shard_of.get(e.filename)})", path=url,
                             shard=shard_of.get(e.filename)) from None
        except ShortRead as e:
            url = self._file_url(e.rel)
            raise StoreError(f"{url}: asked for bytes {e.start}-{e.end - 1}, got {e.got}: shorter than the manifest "
                             f"says (truncated or replaced)", path=url, shard=shard_of.get(e.rel)) from None

    # -- layout hooks -----------------------------------------------------------------------------

    @property
    def piece_rows(self) -> int:
        """Rows from a shard's start at whose multiples :meth:`read_block` ranges are best cut (a range
        inside one such piece can be a view rather than a copy)."""
        return self.manifest.shard_rows

    @property
    def metadata_files(self) -> list[str]:
        """Relative paths of the layout's own files read at open, besides the manifest (zarr: its ``zarr.json``)."""
        return []

    def _open_layout(self) -> None:
        """Open what the layout reads besides the shard files (zarr: its arrays), checking it against the manifest;
        runs at open, after the manifest's row counts and before the files are checked."""

    @abstractmethod
    def shard_files(self, shard_id: int) -> list[str]:
        """Relative paths of shard ``shard_id``'s files, in the order the manifest lists them: the files read."""

    def least_bytes(self, shard: ShardRecord) -> dict[str, int]:
        """Relative path -> the fewest bytes that file of ``shard`` can have for ``shard.rows`` rows, for files
        whose layout bounds it (uncompressed data); files not named have no bound."""
        return {}

    def _held_files(self, shard_id: int) -> dict[str, Any]:
        """Relative path -> bytes of the shard's files this reader has at hand (memory-mapped), so hashing
        them costs no second read. Files not given are read by :meth:`check_shard`."""
        return {}

    @abstractmethod
    def read_block(self, shard_id: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``[lo, hi)`` of shard ``shard_id`` (offsets within the shard) as numpy: ``{"key": str [n],
        "logits": [n, C] or [n, K, C] in the storage dtype (bfloat16 as uint16 bits), "label": int64 [n]}``;
        checks the shard first. The arrays may be read-only views of the store's files or caches:
        copy before writing. The reads behind ``rows``, ``take`` and ``stream``."""

    def read_inputs(self, index: int) -> dict[str, Any]:
        """Inputs packed beside the targets of row ``index`` (wds ``sample`` layout only)."""
        raise StoreError(f"{self.url}: this store holds no inputs")

    def read_shard(self, shard_id: int) -> dict[str, Any]:
        """The whole shard with the inputs packed beside its targets (wds ``sample`` layout only)."""
        raise StoreError(f"{self.url}: this store holds no inputs")

    # -- access -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __repr__(self) -> str:
        m = self.manifest
        return (f"<{type(self).__name__} {self.url!r}: {m.num_samples} samples x {m.num_classes} classes, "
                f"{m.content}, K={m.num_teachers}, {m.dtype}>")

    @property
    def shards(self) -> list[ShardRecord]:
        return self.manifest.shards

    def _pack(self, index: np.ndarray, parts: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        if not parts:
            parts = [self._empty()]
        keys = np.concatenate([p["key"] for p in parts])
        logits = np.concatenate([p["logits"] for p in parts])
        labels = np.concatenate([p["label"] for p in parts])
        return {
            "index": torch.from_numpy(index.astype(np.int64)),
            "key": keys.tolist(),
            "logits": decode_logits(logits, self.manifest.dtype),
            "label": torch.from_numpy(labels.astype(np.int64)),
        }

    def _empty(self) -> dict[str, np.ndarray]:
        return {
            "key": np.zeros(0, dtype=str),
            "logits": np.zeros((0, *self.manifest.logits_shape[1:]), self.manifest.storage_dtype),
            "label": np.zeros(0, dtype=np.int64),
        }

    def shard_of(self, index: int) -> int:
        return int(np.searchsorted(self._starts, index, side="right") - 1)

    def rows(self, start: int, stop: int) -> dict[str, Any]:
        """Contiguous rows ``[start, stop)``, read shard by shard (no per-row reads)."""
        n = len(self)
        start, stop = max(0, start), min(stop, n)
        parts = []
        pos = start
        while pos < stop:
            sid = self.shard_of(pos)
            shard = self.manifest.shards[sid]
            hi = min(stop, shard.stop)
            parts.append(self.read_block(sid, pos - shard.start, hi - shard.start))
            pos = hi
        return self._pack(np.arange(start, max(start, stop)), parts)

    def take(self, indices: Any) -> dict[str, Any]:
        """Rows at ``indices`` (any order, repeats allowed), grouped into one read per shard."""
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a store of {n} samples")
        idx = np.where(idx < 0, idx + n, idx)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        parts = []
        shard_ids = np.searchsorted(self._starts, sorted_idx, side="right") - 1
        for sid in np.unique(shard_ids):
            sel = sorted_idx[shard_ids == sid]
            start = self.manifest.shards[sid].start
            lo, hi = int(sel[0]) - start, int(sel[-1]) - start + 1
            block = self.read_block(int(sid), lo, hi)
            parts.append({k: v[sel - start - lo] for k, v in block.items()})
        packed = self._pack(sorted_idx, parts)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        inv = torch.from_numpy(inverse)
        return {
            "index": packed["index"][inv], "key": [packed["key"][i] for i in inverse],
            "logits": packed["logits"][inv], "label": packed["label"][inv],
        }

    def __getitem__(self, item: Any) -> dict[str, Any]:
        if isinstance(item, str):
            return self[self.index_of(item)]
        if isinstance(item, (int, np.integer)) or (isinstance(item, torch.Tensor) and item.dim() == 0):
            i = int(item)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for a store of {len(self)} samples")
            row = self.rows(i % len(self), i % len(self) + 1)
            return {"index": int(row["index"][0]), "key": row["key"][0], "logits": row["logits"][0],
                    "label": int(row["label"][0])}
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step == 1:
                return self.rows(start, stop)
            return self.take(np.arange(start, stop, step))
        return self.take(item)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Shard by shard: one dict of rows (as :meth:`rows`) per shard, in order."""
        for s in self.manifest.shards:
            yield self.rows(s.start, s.stop)

    def keys(self) -> list[str]:
        """All sample keys in row order (reads every shard's keys)."""
        return [k for s in self.manifest.shards for k in self._read_keys(s.id)]

    def _read_keys(self, shard_id: int) -> list[str]:
        s = self.manifest.shards[shard_id]
        return self.read_block(shard_id, 0, s.rows)["key"].tolist()

    def index_of(self, key: str) -> int:
        """Row index of a sample key (builds a key -> row table on first use: O(N) memory)."""
        if self._key_index is None:
            self._key_index = {k: i for i, k in enumerate(self.keys())}
        try:
            return self._key_index[str(key)]
        except KeyError:
            raise KeyError(f"no sample with key {key!r} in {self.url}") from None

    # -- compact contents ---------------------------------------------------------------------------

    def compact_fields(self, indices: Any) -> dict[str, torch.Tensor]:
        """Rows ``indices`` of a compact store as their record's fields (:mod:`softtargets.math.compact`):
        ``topk``: ``ids``, ``values``, ``tail_logz``, ``tail_dlogz``; ``sampled``: ``ids``, ``counts``, ``values``,
        ``logz``, ``dlogz``; ``hidden``: ``hidden`` (and ``scale``). Refused (ValueError) for dense stores."""
        return unpack_rows(self.manifest, self.take(indices)["logits"])

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A ``hidden`` store's output head ``(weight [C, d] or [K, C, d], bias [C] or [K, C] or None)``, float32,
        checked against the manifest's sha256."""
        if self._head is None:
            self._head = read_head(self.fs, self.root, self.url, self.manifest)
        return self._head

    # -- targets at a temperature -----------------------------------------------------------------

    def log_probs(
        self, indices: Any, temperature: float = 1.0, rule: Rule = "geometric", *, approximate: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Ensemble log-probabilities ``[B, C]`` (``dtype``) of rows ``indices`` at temperature T.

        Exact where the store's content allows it; see :func:`check_rule` for the refusals.
        """
        m = self.manifest
        check_rule(m, temperature, rule, approximate)
        if m.compact is not None:
            if m.compact["kind"] != "hidden":
                raise ValueError(f"this {m.compact['kind']} store holds no full distribution (only k ids per row and "
                                 "their tail); use softtargets.math.compact_losses with store.compact_fields()")
            weight, bias = self.head()
            logits = head_logits(decode_hidden(self.compact_fields(indices)).double(), weight, bias)
            return ensemble_log_probs(logits, temperature, rule, per_teacher=m.per_teacher).to(dtype)
        logits = self.take(indices)["logits"].to(torch.float64)
        t0 = m.temperature  # always recorded for an arithmetic store
        if m.content == "arithmetic" and t0 is not None:
            # Stored: log mean_k softmax(v_k / T0). Re-tempered as if they were logits at T=1 x T0.
            out = torch.log_softmax(logits * (t0 / float(temperature)), dim=-1)
        else:
            out = ensemble_log_probs(logits, temperature, rule, per_teacher=m.per_teacher)
        return out.to(dtype)

    def probs(
        self, indices: Any, temperature: float = 1.0, rule: Rule = "geometric", *, approximate: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Ensemble probabilities ``[B, C]``: ``exp`` of :meth:`log_probs`."""
        return self.log_probs(indices, temperature, rule, approximate=approximate, dtype=torch.float64).exp().to(dtype)


def check_rule(m: Manifest, temperature: float, rule: str, approximate: bool = False) -> None:
    """Refuse ensemble requests the store's content cannot serve exactly.

    * geometric: from per_teacher or geometric stores, any T;
    * arithmetic: from per_teacher stores, any T; from an arithmetic store only at its T0,
      unless ``approximate=True`` (then re-tempered; measured KL errors 1e-3 to 1e-1 nats, largest at low T);
    * geometric from an arithmetic store, arithmetic from a geometric one: refused
      (unless the store has a single teacher, for which the rules coincide).
    """
    parse_choice("ensemble rule", rule, Rule)
    if float(temperature) <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if m.per_teacher or m.num_teachers == 1:
        return
    if m.content == "geometric" and rule == "arithmetic":
        raise ValueError(
            "this store holds geometric-mean logits; arithmetic-mean targets need per-teacher logits "
            "(or an arithmetic store) and cannot be derived from it"
        )
    t0 = m.temperature  # always recorded for an arithmetic store
    if m.content == "arithmetic" and t0 is not None:
        if rule == "geometric":
            raise ValueError(
                f"this store holds arithmetic-mean log-probabilities at T0={t0}; geometric targets "
                "need per-teacher or geometric-mean logits and cannot be derived from it"
            )
        if abs(float(temperature) - t0) > 1e-12 * t0 and not approximate:
            raise ValueError(
                f"this store holds arithmetic targets exact only at T0={m.temperature}; T={temperature} would be "
                "an approximation (re-tempering errs by 1e-3 to 1e-1 nats, most at low T): pass approximate=True "
                "to accept it, or store per-teacher logits"
            )


def read_manifest(url: str, fs: fsspec.AbstractFileSystem, root: str) -> Manifest:
    """The manifest of the store at ``url``; clear errors when missing or invalid."""
    path = join(root, MANIFEST_NAME)
    where = posixpath.join(url.rstrip("/"), MANIFEST_NAME)
    real = link_outside(fs, root, MANIFEST_NAME)
    if real is not None:
        raise ManifestError(f"{where}: a link out of the store (to {real}); refused, not read", path=where)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        pending = fs.exists(join(root, PENDING_NAME))
        why = "the store is unfinished (its writer never closed, or crashed)" if pending else "not a softtargets store?"
        raise ManifestError(f"{where}: missing; {why}", path=where) from None
    return Manifest.from_json(text, source=where)
