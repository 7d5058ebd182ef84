"""A per-machine record of store files already checked, so each file is hashed once per machine.

A local file that a reader checked completely against its manifest digest (sha256, or for a zarr
format-2 file its ``chunks_sha256`` and every inner chunk's crc32c) gets a small record under
the cache folder, keyed by the file's identity on this machine -- ``(st_dev, st_ino)`` -- and
holding its size, ``st_mtime_ns``, ``st_ctime_ns`` and the digest it matched. A later reader
(any process) that finds a record whose size, times and digest all equal the file's current
ones and the manifest's digest skips hashing that file. Any write to the file changes its
``mtime``/``ctime`` (and a replaced file has a new inode), so the record no longer applies and
the file is hashed again.

What a record cannot see: bytes that change without the file's times changing (media decay
under the filesystem, or a writer that resets the times). ``verify="full"`` and
``softtargets verify`` never consult the record. A file modified less than
:data:`SETTLE_NS` before it was checked is not recorded (a change within the filesystem's
timestamp granularity could otherwise leave the times equal).

The folder: ``$SOFTTARGETS_VERIFY_CACHE`` (empty or ``off``: no record is read or written), else
``$XDG_CACHE_HOME/softtargets/verified``, else ``~/.cache/softtargets/verified``. Records are
written atomically (temporary name, rename); a folder that cannot be written is skipped silently
(the checks then happen every time, as without a record).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

ENV = "SOFTTARGETS_VERIFY_CACHE"
SETTLE_NS = 2_000_000_000  # a file must be this much older than its check to be recorded


def cache_dir() -> str | None:
    """The folder records live in, or None when records are turned off."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip() in ("", "off") else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "softtargets", "verified")


@dataclass(frozen=True)
class Identity:
    """What a record is keyed by and compared with: the file's device, inode, size and times (ns)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str) -> Identity | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def settled(self) -> bool:
        """Whether the file was last changed long enough ago to be recorded."""
        return time.time_ns() - max(self.mtime_ns, self.ctime_ns) >= SETTLE_NS


def _record_path(folder: str, ident: Identity) -> str:
    return os.path.join(folder, f"{ident.dev:x}-{ident.ino:x}.json")


def is_verified(path: str, digest: str, folder: str | None = None) -> bool:
    """Whether local file ``path`` was checked against ``digest`` on this machine and has not changed since."""
    folder = cache_dir() if folder is None else folder
    ident = Identity.of(path)
    if folder is None or ident is None:
        return False
    try:
        with open(_record_path(folder, ident)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return False
    return bool(
        rec.get("digest") == digest and rec.get("size") == ident.size and rec.get("mtime_ns") == ident.mtime_ns
        and rec.get("ctime_ns") == ident.ctime_ns
    )


def record_verified(path: str, digest: str, folder: str | None = None) -> bool:
    """Record that local file ``path`` matched ``digest`` (checked by the caller just now). Returns whether a
    record was written (not when records are off, the file changed too recently, or the folder is not writable)."""
    folder = cache_dir() if folder is None else folder
    ident = Identity.of(path)
    if folder is None or ident is None or not ident.settled():
        return False
    text = json.dumps({"digest": digest, "size": ident.size, "mtime_ns": ident.mtime_ns, "ctime_ns": ident.ctime_ns,
                       "path": os.path.abspath(path)})
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, _record_path(folder, ident))
    except OSError:
        return False
    return True
