"""Check a finished store end to end and list every problem, naming the file at fault.

Built on the manifest and raw file reads (not on :func:`softtargets.open_targets`, which
stops at the first problem), so a broken store can still be examined whole:

1. ``manifest.json``: valid JSON, schema, known ``format_version``; the shard table
   covers rows ``[0, num_samples)`` with no gap or overlap (ids, starts, row counts).
2. every data file: listed at the path the layout reads, inside the store (no ``..``, absolute path or
   link out of it: such a file is named, not read), big enough for its shard's rows, present, of its
   recorded size, with its recorded sha256 (zarr, format 2: and its ``chunks_sha256``, which lazy
   readers check);
3. every shard whose files pass: decoded, holding exactly its rows (wds: every block's
   ``index.npy`` continues the last; zarr: array shapes, chunking and dtype), keys
   non-empty, labels in ``[-1, C)`` and as many labeled as recorded, logits finite;
4. keys unique over the whole store, in bounded memory (:mod:`softtargets.sharing.unique_keys`).

Memory: about two shards (one read, one decoded) plus the key check's ``key_memory``
(default 64 MiB; hashes beyond it spill to temporary files, 16 bytes a row), whatever the
store's size; shards are read one at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from tqdm.auto import tqdm

from ..store import layout_class
from ..store.base import MARKER_DIR, PENDING_NAME, read_manifest
from ..store.compact_rows import HEAD_FILES
from ..store.files import crc32c_extend, is_local, join, link_outside, list_sizes, local_tree, unsafe_path, url_to_fs
from ..store.manifest import MANIFEST_NAME, FileRecord, Manifest, ManifestError, ShardRecord
from ..store.sequences import KEYS_FILE, OFFSETS_FILE, TOKENS_FILE, offsets_problem
from ..store.sidecars import sidecar_files, sidecar_path_problems
from ..store.views import params_problems
from ..store.wds_layout import WdsStore, least_tar_bytes, npy_load, shard_name
from ..store.zarr_layout import ARRAYS, ZarrStore, _zarr_store, least_shard_bytes, shard_file
from ..store.zarr_shards import ShardFormat, chunks_digest, index_ends
from .unique_keys import KeyChecker, str_array

READ_BYTES = 4 << 20  # hashing reads zarr shard files in pieces of this size
MAX_PER_FILE = 5  # content problems listed per file before "and N more"
KEY_MEMORY = 64 << 20  # default memory of the key-uniqueness check


@dataclass
class Problem:
    """One thing wrong with a store: the URL of the file at fault and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify_store` found. ``ok`` is true when ``problems`` is empty."""

    url: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layout: str | None = None
    num_samples: int | None = None
    num_shards: int | None = None
    files_checked: int = 0
    bytes_checked: int = 0
    rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_files(self) -> list[str]:
        """Distinct paths named by problems, in the order first found."""
        return list(OrderedDict.fromkeys(p.path for p in self.problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"], d["bad_files"] = self.ok, self.bad_files
        return d


class _Checker:
    """Shared state of one verification: the store, its manifest, the problems found."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str, m: Manifest, report: VerifyReport):
        self.url, self.fs, self.root, self.m, self.report = url, fs, root, m, report
        # Every file in the store (None where the filesystem cannot list) and, locally, its symbolic links.
        self.sizes: dict[str, int] | None
        self.links: set[str] | None
        self.sizes, self.links = local_tree(fs._strip_protocol(root)) if is_local(fs) else (list_sizes(fs, root), None)

    def shard_files(self, rec: ShardRecord) -> list[str] | None:
        """The paths this layout reads for shard ``rec`` (None where it cannot tell)."""
        raise NotImplementedError

    def least_bytes(self, rec: ShardRecord) -> dict[str, int]:
        """Relative path -> the fewest bytes that file of ``rec`` can have for its rows (files with a bound)."""
        return {}

    def paths_ok(self, rec: ShardRecord) -> bool:
        """Whether every file of shard ``rec`` is listed at the path this layout reads, inside the store (no
        ``..``, absolute path or link out of it), and large enough for the shard's rows; each one that is not
        is named, and none of the shard's files is read."""
        expected, ok = self.shard_files(rec), True
        for i, f in enumerate(rec.files):
            why = unsafe_path(f.path)
            real = None if why else link_outside(self.fs, self.root, f.path, self.links)
            want = expected[i] if expected is not None and i < len(expected) else None
            if why or real:
                where = f"leaves the store ({why})" if why else f"is a link out of the store (to {real})"
                self.problem(f.path, f"shard {rec.id}: the path {where}; refused, not read")
            elif expected is not None and f.path != want:
                self.problem(f.path, f"shard {rec.id}: listed where this layout reads {want!r} (a manifest that "
                             "points at another file than the one readers read)")
            else:
                continue
            ok = False
        if expected is not None and len(rec.files) != len(expected):
            self.problem(MANIFEST_NAME, f"shard {rec.id} lists {len(rec.files)} files; this layout reads {expected}")
            ok = False
        if not ok:
            return False
        least = self.least_bytes(rec)
        for f in rec.files:
            if f.bytes < least.get(f.path, 0):
                self.problem(f.path, f"shard {rec.id}: {f.bytes} bytes cannot hold its {rec.rows} rows (at least "
                             f"{least[f.path]} bytes); the manifest's row counts are wrong")
                ok = False
        return ok

    def file_url(self, rel: str) -> str:
        return posixpath.join(self.url.rstrip("/"), rel)

    def problem(self, rel: str, message: str) -> None:
        self.report.problems.append(Problem(self.file_url(rel), message))

    def _missing(self, rel: str, e: OSError) -> None:
        missing = isinstance(e, FileNotFoundError)
        self.problem(rel, "missing (listed in the manifest)" if missing else f"unreadable ({e})")

    def _matches(self, f: FileRecord, got: int, digest: str, crc: int) -> bool:
        """Whether ``got`` bytes whose sha256 is ``digest`` and crc32c ``crc`` are what record ``f`` says."""
        self.report.files_checked += 1
        self.report.bytes_checked += got
        if got != f.bytes:
            self.problem(f.path, f"{got} bytes, the manifest says {f.bytes} (truncated or replaced)")
            return False
        if digest != f.sha256:
            self.problem(f.path, "sha256 does not match the manifest (corrupt or altered file)")
            return False
        if f.crc32c is not None and f"{crc:08x}" != f.crc32c:  # what lazy readers check: it must agree
            self.problem(f.path, "crc32c does not match the manifest (the file matches its sha256: the manifest's "
                                 "crc32c is wrong)")
            return False
        return True

    def hash_file(self, f: FileRecord) -> bool:
        """Whether file ``f`` exists with its recorded size, sha256 (and crc32c), read in pieces (bounded
        memory)."""
        hasher, got, crc = hashlib.sha256(), 0, 0
        try:
            with self.fs.open(join(self.root, f.path), "rb") as fh:
                while piece := fh.read(READ_BYTES):
                    hasher.update(piece)
                    if f.crc32c is not None:
                        crc = crc32c_extend(crc, piece)
                    got += len(piece)
        except OSError as e:
            self._missing(f.path, e)
            return False
        return self._matches(f, got, hasher.hexdigest(), crc)

    def read_file(self, f: FileRecord) -> bytes | None:
        """File ``f``'s bytes when it exists with its recorded size, sha256 (and crc32c), else None."""
        try:
            data = self.fs.cat_file(join(self.root, f.path))
        except OSError as e:
            self._missing(f.path, e)
            return None
        crc = crc32c_extend(0, data) if f.crc32c is not None else 0
        return data if self._matches(f, len(data), hashlib.sha256(data).hexdigest(), crc) else None

    def file_for(self, rec: ShardRecord, part: str) -> str:
        """The file of shard ``rec`` that holds ``part`` (keys, labels or logits)."""
        for f in rec.files:
            if f.path.startswith(f"{part}/"):
                return f.path
        return rec.files[0].path if rec.files else MANIFEST_NAME

    def check_rows(self, rec: ShardRecord, keys: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> None:
        """Row-level checks of one decoded shard: keys non-empty, labels in range and counted, logits finite."""
        m = self.m
        empty = int((np.char.str_len(keys) == 0).sum())
        if empty:
            self.problem(self.file_for(rec, "keys"), f"shard {rec.id}: {empty} rows have an empty key (never written?)")
        bad = (labels < -1) | (labels >= m.num_classes)
        if bad.any():
            self.problem(self.file_for(rec, "labels"), f"shard {rec.id}: {int(bad.sum())} labels outside "
                         f"[-1, {m.num_classes}), e.g. {labels[bad][:3].tolist()}")
        labeled = int((labels >= 0).sum())
        if labeled != rec.labeled:
            self.problem(self.file_for(rec, "labels"),
                         f"shard {rec.id}: {labeled} labeled rows, the manifest says {rec.labeled}")
        if m.dtype != "bfloat16" and logits.size and not np.isfinite(logits).all():
            self.problem(self.file_for(rec, "logits"),
                         f"shard {rec.id}: {int((~np.isfinite(logits)).sum())} non-finite logit values")


class _ZarrChecker(_Checker):
    """The zarr layout: array metadata once, then each shard's rows through zarr."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        m = self.m
        want = {"logits": (m.logits_shape, m.storage_dtype), "labels": ((m.num_samples,), np.dtype("int64")),
                "keys": ((m.num_samples,), None)}
        self.arrays: dict[str, Any] | None = {}
        self.opened: dict[str, Any] = {}  # every array that opened, sound or not (for its paths)
        escaping = [(rel, link_outside(self.fs, self.root, rel)) for rel in ("zarr.json", *(f"{a}/zarr.json"
                                                                                          for a in ARRAYS))]
        for rel, real in escaping:
            if real is not None:
                self.problem(rel, f"a link out of the store (to {real}); refused, not read")
        if any(real for _, real in escaping):
            self.arrays = None
            return
        try:
            group = zarr.open_group(_zarr_store(self.fs, self.root, read_only=True), mode="r")
        except Exception as e:  # noqa: BLE001 - any failure here means the group is unreadable
            self.problem("zarr.json", f"cannot open the zarr group ({type(e).__name__}: {e})")
            self.arrays = None
            return
        for name, (shape, dtype) in want.items():
            rel = f"{name}/zarr.json"
            try:
                arr = group[name]
            except Exception as e:  # noqa: BLE001
                self.problem(rel, f"cannot open array {name!r} ({type(e).__name__}: {e})")
                self.arrays = None
                continue
            if not isinstance(arr, zarr.Array):
                self.problem(rel, f"{name!r} is a group, not an array")
                self.arrays = None
                continue
            self.opened[name] = arr
            found = []
            if tuple(arr.shape) != tuple(shape):
                self.problem(MANIFEST_NAME, f"num_samples={m.num_samples} makes {name} {tuple(shape)}, but {rel} "
                             f"has shape {tuple(arr.shape)} (the manifest or the array lies about the row count)")
                found.append("shape")
            if dtype is not None and np.dtype(arr.dtype) != dtype:
                found.append(f"dtype {arr.dtype}, the manifest's {m.dtype} is stored as {dtype}")
            if (arr.shards or arr.chunks)[0] != m.shard_rows:
                found.append(f"shards of {(arr.shards or arr.chunks)[0]} rows, the manifest says {m.shard_rows}")
            if arr.chunks[0] != m.block_rows:
                found.append(f"inner chunks of {arr.chunks[0]} rows, the manifest says {m.block_rows}")
            for msg in found:
                if msg != "shape":
                    self.problem(rel, msg)
            if found:
                self.arrays = None
            elif self.arrays is not None:
                self.arrays[name] = arr

    def shard_files(self, rec: ShardRecord) -> list[str] | None:
        if set(self.opened) != set(ARRAYS):
            return None
        return [shard_file(name, self.opened[name], rec.id) for name in ARRAYS]

    def least_bytes(self, rec: ShardRecord) -> dict[str, int]:
        if self.arrays is None:
            return {}
        bounds = {f.path: least_shard_bytes(ShardFormat.of(self.arrays[name]), rec.rows)
                  for name, f in zip(ARRAYS, rec.files, strict=True)}
        return {rel: least for rel, least in bounds.items() if least is not None}

    def chunks_match(self, f: FileRecord) -> bool:
        """Whether file ``f`` (sound by its sha256) has the ``chunks_sha256`` its manifest records (format 2),
        which lazy readers check: its index and each chunk's crc32c trailer, read in small pieces."""
        if f.chunks_sha256 is None or self.arrays is None:
            return True
        arr = self.arrays[f.path.split("/", 1)[0]]
        per_shard = arr.metadata.chunk_grid.chunk_shape[0] // arr.chunks[0]
        n = 16 * per_shard + 4
        with self.fs.open(join(self.root, f.path), "rb") as fh:
            fh.seek(max(0, f.bytes - n))
            index = fh.read(n)
            ends = index_ends(index, per_shard) or []
            trailers = []
            for end in ends:
                fh.seek(end - 4)
                trailers.append(fh.read(4))
        if not ends or chunks_digest(trailers, index) != f.chunks_sha256:
            self.problem(f.path, "chunk checksums or shard index do not match the manifest's chunks_sha256")
            return False
        return True

    def check_shard(self, rec: ShardRecord) -> np.ndarray | None:
        if not self.paths_ok(rec):
            return None
        good = [self.hash_file(f) and self.chunks_match(f) for f in rec.files]  # every file: every bad one named
        if not all(good) or self.arrays is None:
            return None
        try:
            keys = str_array(self.arrays["keys"][rec.start:rec.stop])
            labels = self.arrays["labels"][rec.start:rec.stop]
            logits = self.arrays["logits"][rec.start:rec.stop]
        except Exception as e:  # noqa: BLE001 - a decode failure of any kind is a finding
            self.problem(self.file_for(rec, "logits"), f"shard {rec.id}: cannot decode ({type(e).__name__}: {e})")
            return None
        self.check_rows(rec, keys, logits, labels)
        return keys

    def read_keys(self, rec: ShardRecord) -> np.ndarray:
        assert self.arrays is not None  # shards are read only once the arrays opened
        return str_array(self.arrays["keys"][rec.start:rec.stop])


class _WdsChecker(_Checker):
    """The WebDataset layout: each tar shard read once, hashed, then decoded member by member."""

    def shard_files(self, rec: ShardRecord) -> list[str] | None:
        return [shard_name(rec.id)]

    def least_bytes(self, rec: ShardRecord) -> dict[str, int]:
        return {shard_name(rec.id): least_tar_bytes(self.m, rec.rows)}

    def check_shard(self, rec: ShardRecord) -> np.ndarray | None:
        if not self.paths_ok(rec):
            return None
        data = self.read_file(rec.files[0])
        if data is None:
            return None
        rel = rec.files[0].path
        found: list[str] = []
        decoded = self.decode(data, rec, found)
        for msg in found[:MAX_PER_FILE]:
            self.problem(rel, f"shard {rec.id}: {msg}")
        if len(found) > MAX_PER_FILE:
            self.problem(rel, f"shard {rec.id}: and {len(found) - MAX_PER_FILE} more problems")
        if decoded is None:
            return None
        self.check_rows(rec, *decoded)
        return decoded[0]

    def decode(self, data: bytes, rec: ShardRecord, found: list[str]) -> tuple[np.ndarray, ...] | None:
        """``(keys, logits, labels)`` of a tar shard, appending what is wrong to ``found``."""
        samples: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for info in tar:
                    member = tar.extractfile(info) if info.isfile() else None
                    if member is not None:
                        key, _, ext = info.name.partition(".")
                        samples.setdefault(key, {})[ext] = member.read()
        except (tarfile.TarError, EOFError, OSError) as e:
            found.append(f"not a readable tar ({e})")
            return None
        m = self.m
        trailing = m.logits_shape[1:]
        keys, logits, labels = [], [], []
        pos = rec.start
        for i, (name, members) in enumerate(samples.items()):
            need = ("logits.npy", "labels.npy", "keys.npy", "index.npy") if m.sample_layout == "block" else (
                "logits.npy", "label.cls", "key.txt")
            missing = [e for e in need if e not in members]
            if missing:
                found.append(f"sample {name!r} lacks {missing}")
                return None
            try:
                lg = npy_load(members["logits.npy"])
                if m.sample_layout == "block":
                    kk, lb, ix = (npy_load(members[e]) for e in ("keys.npy", "labels.npy", "index.npy"))
                else:
                    lg, kk = lg[None], np.array([members["key.txt"].decode()])
                    lb, ix = np.array([int(members["label.cls"])]), np.array([int(name)])
            except (ValueError, UnicodeDecodeError, EOFError) as e:
                found.append(f"sample {name!r}: undecodable member ({e})")
                return None
            n = len(kk)
            if lg.shape[1:] != trailing or lg.dtype != m.storage_dtype or len(lg) != n or len(lb) != n:
                found.append(f"sample {name!r}: logits {lg.dtype}{list(lg.shape)}, {len(lb)} labels, {n} keys; "
                             f"expected {m.storage_dtype}[{n}, {', '.join(map(str, trailing))}]")
                return None
            if m.sample_layout == "block" and not (0 < n <= m.block_rows and (n == m.block_rows
                                                                            or i == len(samples) - 1)):
                found.append(f"sample {name!r} holds {n} rows, block_rows is {m.block_rows}")
                return None
            if not np.array_equal(ix, np.arange(pos, pos + n)):
                found.append(f"sample {name!r} holds rows {ix[:1].tolist()}..., expected row {pos} next "
                             "(gap, overlap or reordering)")
            keys.append(kk)
            logits.append(lg)
            labels.append(lb.astype(np.int64))
            pos += n
        if pos - rec.start != rec.rows:
            found.append(f"holds {pos - rec.start} rows, the manifest says {rec.rows}")
        if found:
            return None
        if not keys:
            return np.zeros(0, str), np.zeros((0, *trailing), m.storage_dtype), np.zeros(0, np.int64)
        return np.concatenate(keys).astype(str), np.concatenate(logits), np.concatenate(labels)

    def read_keys(self, rec: ShardRecord) -> np.ndarray:
        data = self.fs.cat_file(join(self.root, rec.files[0].path))
        out = self.decode(data, rec, [])
        return out[0] if out is not None else np.zeros(0, str)


# Each layout's store class names the checker of its files (the format may not import this part).
ZarrStore.checker, WdsStore.checker = _ZarrChecker, _WdsChecker


def check_shard_table(m: Manifest) -> list[str]:
    """What is inconsistent in a manifest's shard table (rows ``[0, N)`` once each, in order)."""
    out = []
    if len(m.shards) != m.num_shards:
        out.append(f"{len(m.shards)} shards listed; {m.num_samples} samples in shards of {m.shard_rows} rows "
                   f"make {m.num_shards}")
    for i, s in enumerate(m.shards):
        start, stop = m.shard_range(i)
        if s.id != i:
            out.append(f"shard #{i} has id {s.id}")
        if (s.start, s.rows) != (start, max(0, stop - start)):
            out.append(f"shard {s.id} covers rows [{s.start}, {s.stop}), expected [{start}, {stop})")
    total = sum(s.rows for s in m.shards)
    if total != m.num_samples:
        out.append(f"shards hold {total} rows, num_samples says {m.num_samples}")
    labeled = sum(s.labeled for s in m.shards)
    if m.has_labels != (labeled > 0):
        out.append(f"has_labels is {m.has_labels} but the shards record {labeled} labeled rows")
    return out


def verify_store(
    url: str | os.PathLike[str], *, progress: bool | None = None, storage_options: dict | None = None,
    tmpdir: str | None = None, key_memory: int = KEY_MEMORY,
) -> VerifyReport:
    """Check the store at ``url`` (path or fsspec URL) and return every problem found.

    Args:
        progress: show a tqdm bar over shards (None: only on a terminal).
        tmpdir: where the key-uniqueness check spills hashes (16 bytes a row) when they outgrow memory.
        key_memory: bytes that check may hold: a quarter buffers hashes, half is one partition being sorted.
    """
    url = os.fspath(url)
    report = VerifyReport(url=url)
    fs, root = url_to_fs(url, **(storage_options or {}))
    manifest_url = posixpath.join(url.rstrip("/"), MANIFEST_NAME)
    try:
        m = read_manifest(url, fs, root)
    except ManifestError as e:
        report.problems.append(Problem(manifest_url, str(e).removeprefix(f"{manifest_url}: ")))
        return report
    except OSError as e:
        report.problems.append(Problem(manifest_url, f"unreadable ({e})"))
        return report
    report.layout, report.num_samples, report.num_shards = m.layout, m.num_samples, len(m.shards)
    checker_cls = layout_class(m.layout).checker
    if checker_cls is None:
        raise NotImplementedError(f"{url}: no checker is registered for the {m.layout} layout")
    checker = checker_cls(url, fs, root, m, report)
    for msg in check_shard_table(m):
        checker.problem(MANIFEST_NAME, msg)
    _leftovers(checker)
    bad_paths = sidecar_path_problems(m)  # arrays beside the logits (hints, specialists): paths, size, sha256
    for msg in bad_paths:
        checker.problem(MANIFEST_NAME, msg)
    if not bad_paths:
        for f in sidecar_files(m):
            checker.hash_file(f)
    with KeyChecker(m.num_samples, partition_bytes=key_memory // 2, buffer_bytes=key_memory // 4,
                    tmpdir=tmpdir) as keys:
        for rec in tqdm(m.shards, desc="verify", unit="shard", disable=None if progress is None else not progress):
            shard_keys = checker.check_shard(rec)
            if shard_keys is not None:
                keys.add(shard_keys, rec.start)
                report.rows_checked += len(shard_keys)
        dups = keys.duplicates(lambda rows: _keys_at(checker, rows))
    for key, rows in dups.groups.items():
        where = ", ".join(f"row {r} ({_shard_file(checker, r)})" for r in rows[:5])
        checker.problem(_shard_file(checker, rows[0]), f"duplicate key {key!r} at {where}")
    if dups.unconfirmed:
        checker.problem(MANIFEST_NAME, f"{dups.unconfirmed} more groups of rows with equal key hashes "
                        "(almost surely duplicate keys) left unlisted")
    for rel, message in params_problems(fs, root, m):  # a views store's parameter files (format 3)
        checker.problem(rel, message)
    _check_named_files(checker)
    if report.rows_checked < m.num_samples:
        report.warnings.append(f"keys checked for uniqueness in {report.rows_checked} of {m.num_samples} rows "
                               "(those of the shards that passed their checks)")
    return report


def _named_files(m: Manifest) -> list[tuple[str, dict[str, Any] | None]]:
    """Files at fixed paths beside the rows (format 3): a sequence store's ``sequences/*.npy`` and a ``hidden``
    store's output head ``head/*.npy``, as ``(expected path, manifest record or None)``."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    if m.sequences is not None:
        listed = {f.get("path"): f for f in m.sequences.get("files", [])}
        out += [(rel, listed.get(rel)) for rel in (OFFSETS_FILE, TOKENS_FILE, KEYS_FILE)]
    if m.compact is not None and m.compact.get("kind") == "hidden":
        heads = m.compact.get("head_files") or {}
        out.append((HEAD_FILES["weight"], heads.get("weight")))
        if heads.get("bias") is not None:
            out.append((HEAD_FILES["bias"], heads["bias"]))
    return out


def _check_named_files(checker: _Checker) -> None:
    """Each named file (:func:`_named_files`) exists with its recorded size and sha256; a sequence store's offsets
    cut its rows into its sequences."""
    ok = True
    for rel, rec in _named_files(checker.m):
        if rec is None or rec.get("path") != rel:
            checker.problem(MANIFEST_NAME, f"the manifest does not list {rel} at its path")
            ok = False
        else:
            ok = checker.hash_file(FileRecord(rel, int(rec["bytes"]), str(rec["sha256"]))) and ok
    if ok and checker.m.sequences is not None:
        data = checker.fs.cat_file(join(checker.root, OFFSETS_FILE))
        try:
            problem = offsets_problem(np.load(io.BytesIO(data), allow_pickle=False).astype(np.int64), checker.m)
        except ValueError as e:
            problem = f"not a numpy array ({e})"
        if problem:
            checker.problem(OFFSETS_FILE, problem)


def _shard_file(checker: _Checker, row: int) -> str:
    m = checker.m
    return checker.file_for(m.shards[min(row // m.shard_rows, len(m.shards) - 1)], "keys")


def _keys_at(checker: Any, rows: np.ndarray) -> Sequence[str]:
    """Keys at sorted global ``rows``, reading each shard involved once."""
    m = checker.m
    out: list[str] = []
    sids = np.minimum(rows // m.shard_rows, len(m.shards) - 1)
    for sid in np.unique(sids):
        rec = m.shards[int(sid)]
        keys = checker.read_keys(rec)
        out.extend(keys[rows[sids == sid] - rec.start].tolist())
    return out


def _leftovers(checker: _Checker) -> None:
    """Warnings for writer state left beside a finished store, and data files no manifest lists."""
    fs, root, report = checker.fs, checker.root, checker.report
    for rel in (PENDING_NAME, MARKER_DIR):
        try:
            if fs.exists(join(root, rel)):
                report.warnings.append(f"{checker.file_url(rel)}: writer state left beside a finished store")
        except OSError:
            pass
    sizes = checker.sizes
    if sizes is None:
        return
    listed = {f.path for s in checker.m.shards for f in s.files} | {f.path for f in sidecar_files(checker.m)}
    for rel in sizes:
        if (rel.endswith(".tar") or "/c/" in rel) and rel not in listed:
            report.warnings.append(f"{checker.file_url(rel)}: data file not listed in the manifest (ignored)")


def format_report(report: VerifyReport) -> str:
    """Human-readable lines: every problem, warnings, then a one-line verdict."""
    lines = [f"warning: {w}" for w in report.warnings]
    lines += [f"BAD {p}" for p in report.problems]
    if report.ok:
        lines.append(f"OK {report.url}: {report.num_samples} samples in {report.num_shards} shards; "
                     f"{report.files_checked} files, {report.bytes_checked} bytes checked; keys unique")
    else:
        n, f = len(report.problems), len(report.bad_files)
        lines.append(f"FAILED {report.url}: {n} problem{'s' * (n != 1)} in {f} file{'s' * (f != 1)}")
    return "\n".join(lines)


def to_json(report: VerifyReport) -> str:
    return json.dumps(report.to_dict(), indent=1)
