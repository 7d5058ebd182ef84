"""Where a store lives: fsspec URLs to (filesystem, root), hashing, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import google_crc32c
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .manifest import FileRecord

_TEMPORARY = re.compile(r"(\.[0-9a-f]{32}\.partial|\.tmp-[0-9a-f]{12})$")


def url_to_fs(url: str | os.PathLike[str], **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, root path)`` for a local path or any fsspec URL (``memory://``, ``http://``...)."""
    fs, root = fsspec.core.url_to_fs(os.fspath(url), **storage_options)
    return fs, root.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def list_sizes(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int] | None:
    """Every file under ``root`` as relative path -> bytes, or None where the filesystem cannot list
    (http). Local and memory filesystems list; one call, whatever the number of files."""
    if is_local(fs):  # os.scandir: a tenth of fsspec's walk, which stats every file twice
        return _local_sizes(fs._strip_protocol(root))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "memory" not in protocols:
        return None
    prefix = fs._strip_protocol(root).rstrip("/") + "/"
    found = fs.find(root, detail=True)
    return {fs._strip_protocol(p)[len(prefix):]: info["size"] for p, info in found.items()}


def _local_sizes(root: str) -> dict[str, int]:
    return local_tree(root)[0]


def local_tree(root: str) -> tuple[dict[str, int], set[str]]:
    """Every file under the local folder ``root`` as relative path -> bytes, and the relative paths of the
    symbolic links met on the way (to files or folders). A linked folder is listed when it lies inside
    ``root`` (once per target, so a loop ends); one that leads out of ``root`` is not entered."""
    sizes: dict[str, int] = {}
    links: set[str] = set()
    base = os.path.realpath(root)
    entered: set[str] = set()
    todo = [("", root)]
    while todo:
        rel, path = todo.pop()
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.is_symlink():
                links.add(f"{rel}{e.name}")
            if e.is_dir():
                if e.is_symlink():
                    real = os.path.realpath(e.path)
                    if not _inside(base, real) or real in entered:
                        continue
                    entered.add(real)
                todo.append((f"{rel}{e.name}/", e.path))
                continue
            with contextlib.suppress(FileNotFoundError):  # a dangling link, or removed meanwhile
                sizes[f"{rel}{e.name}"] = e.stat().st_size
    return sizes, links


def _inside(base: str, real: str) -> bool:
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_path(rel: str) -> str | None:
    """Why the relative path ``rel`` (from a manifest) could name something outside its store, or None when it
    is a plain relative path: no absolute path, ``..`` or ``.`` component, empty component, backslash, colon
    (drive letter, URL scheme) or control character."""
    if not rel:
        return "an empty path"
    if rel.startswith("/") or _DRIVE.match(rel):
        return "an absolute path"
    if "\\" in rel:
        return "a backslash in the path"
    if ":" in rel:
        return "a colon in the path (a drive or URL)"
    if any(ord(ch) < 32 for ch in rel):
        return "a control character in the path"
    parts = rel.split("/")
    if ".." in parts:
        return "a '..' component"
    if "" in parts or "." in parts:
        return "an empty or '.' component"
    return None


def link_outside(fs: fsspec.AbstractFileSystem, root: str, rel: str, links: set[str] | None = None) -> str | None:
    """Where the local file ``root/rel`` really is, when a symbolic link on its way (``rel`` itself or a folder
    above it) leads out of ``root``; else None (always on filesystems without links). ``links``: the store's
    links (:func:`local_tree`), so that paths with none on the way cost no system call."""
    if not is_local(fs) or links is not None and not links:
        return None
    parts = rel.split("/")
    if links is not None and not any("/".join(parts[:i]) in links for i in range(1, len(parts) + 1)):
        return None
    local = fs._strip_protocol(root)
    real = os.path.realpath(join(local, rel))
    return None if _inside(os.path.realpath(local), real) else real


def remove_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Delete what writers killed mid-write left behind under a local ``root``: zarr's
    ``*.<uuid>.partial`` and :func:`atomic_write`'s ``*.tmp-<hex>``. Returns their relative paths.
    Object stores and memory filesystems put whole objects, so they have none."""
    if not is_local(fs):
        return []
    found = [rel for rel in list_sizes(fs, root) or {} if _TEMPORARY.search(rel)]
    for rel in found:
        fs.rm(join(root, rel))
    return found


def remove_file(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete the file ``path`` where there is one (one call, no existence check first)."""
    with contextlib.suppress(FileNotFoundError):
        if is_local(fs):
            os.remove(fs._strip_protocol(path))
        else:
            fs.rm_file(path)


def join(root: str, rel: str) -> str:
    return f"{root}/{rel}" if root else rel


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def crc32c_extend(crc: int, data: Any) -> int:
    """The crc32c (Castagnoli) of bytes already hashed to ``crc`` followed by bytes-like ``data``."""
    return int(google_crc32c.extend(crc, np.frombuffer(data, np.uint8)))  # takes arrays, not memoryviews


def crc32c_hex(data: Any) -> str:
    """The crc32c of bytes-like ``data`` as a manifest records it: 8 hex digits."""
    return f"{crc32c_extend(0, data):08x}"


def file_record(fs: fsspec.AbstractFileSystem, root: str, rel: str, data: bytes | None = None,
                crc: bool = False) -> FileRecord:
    """Size and sha256 of ``root/rel`` (hashing ``data`` when the caller has the bytes already); with ``crc``,
    its crc32c too."""
    if data is None:
        data = fs.cat_file(join(root, rel))
    return FileRecord(path=rel, bytes=len(data), sha256=sha256_hex(data), crc32c=crc32c_hex(data) if crc else None)


def fsync_files(paths: Sequence[str]) -> None:
    """Flush local files to the disk: a killed process leaves its writes in the page cache, a power
    cut does not."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def flush_and_close(fd: int) -> None:
    """Flush the data of open file ``fd`` (a duplicate of a file still being written) to the disk, then close
    ``fd``: what was written so far goes to disk meanwhile, not all at the final fsync."""
    try:
        getattr(os, "fdatasync", os.fsync)(fd)
    finally:
        os.close(fd)


def temporary_path(path: str) -> str:
    """A name beside local ``path`` to write it under before renaming (what :func:`remove_temporaries` removes)."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def atomic_write(
    fs: fsspec.AbstractFileSystem, path: str, data: bytes | Sequence[Any], fsync: bool = True
) -> None:
    """Write ``data`` (bytes, or bytes-like parts written one after another) to ``path`` so a reader
    never sees it half written.

    Local files go to a temporary name in the same folder, are fsynced (unless ``fsync=False``),
    then renamed; object stores and memory filesystems put whole objects already.
    """
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    with naming_full_disk(path):
        _atomic_write(fs, path, parts, fsync)


@contextlib.contextmanager
def naming_full_disk(path: str) -> Iterator[None]:
    """Re-raise a "no space left on device" error (ENOSPC) raised inside with ``path`` and the fix in its message."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, f"No space left on device writing {path}; free space there or write the store "
                                    "elsewhere") from exc


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, parts: list[Any], fsync: bool) -> None:
    if not is_local(fs):
        fs.pipe_file(path, parts[0] if len(parts) == 1 else b"".join(parts))
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.writelines(parts)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
