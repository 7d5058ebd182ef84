"""Every exception softtargets raises on purpose: one base, :class:`SofttargetsError`, and one class per
failure a caller may want to catch. Each keeps the builtin base it had before (a :class:`StoreError` is
still a ``ValueError``) and carries the facts of its message as attributes (``path``, ``shard``,
``teacher``, ``keys``...), ``None`` (or empty) where the raise site does not know them.

Facts travel with the exception when it is pickled (a DataLoader worker re-raising it keeps them only
if the loader re-raises the object itself, not its message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "ChecksumError",
    "JoinMismatchError",
    "ManifestError",
    "NonFiniteError",
    "NonFiniteLogits",
    "PreflightError",
    "SofttargetsError",
    "StorageAccessError",
    "StoreError",
    "TeacherLoadError",
    "TrainOutputExists",
]


class SofttargetsError(Exception):
    """The base of every softtargets exception. Keyword arguments become attributes (the error's facts)."""

    def __init__(self, *args: Any, **facts: Any):
        super().__init__(*args)
        for name, value in facts.items():
            setattr(self, name, value)


class StoreError(SofttargetsError, ValueError):
    """A store is incomplete, inconsistent or corrupt; the message names the file.

    Attributes:
        path: the file (or store) at fault, as the message names it.
        shard: the shard it belongs to, if known.
    """

    path: str | None = None
    shard: int | None = None


class ChecksumError(StoreError):
    """A data file's bytes do not match the checksum its manifest records.

    Attributes:
        path: the file, as the message names it.
        shard: its shard, if known.
        expected: the checksum the manifest records (sha256 hex), if known.
        found: the checksum of the bytes read, if known.
    """

    expected: str | None = None
    found: str | None = None


class ManifestError(SofttargetsError, ValueError):
    """A manifest is missing, unreadable, schema-invalid or of an unknown format version.

    Attributes:
        path: the manifest (``source``), as the message names it.
    """

    path: str | None = None


class NonFiniteError(SofttargetsError, ValueError):
    """A teacher gave NaN or Inf logits; the message names the teacher and the sample keys.

    Attributes:
        url: the store being written.
        shard: the shard being computed.
        teachers: teacher name -> the keys of the samples it gave non-finite logits for.
        keys: every such key, in order.
    """

    url: str | None = None
    shard: int | None = None
    teachers: dict[str, list[str]] | None = None
    keys: list[str] | None = None


class NonFiniteLogits(SofttargetsError, ValueError):
    """Logits given to :func:`softtargets.store.encoding.encode_logits` hold NaN or Inf.

    Attributes:
        rows: the first (up to ten) rows of the batch at fault.
    """

    rows: list[int] | None = None


class TeacherLoadError(SofttargetsError, RuntimeError):
    """A teacher's spec, weights file or archive could not be turned into a module.

    Attributes:
        teacher: the teacher's name.
        path: the weights file or archive, if one was at fault.
    """

    teacher: str | None = None
    path: str | None = None


class JoinMismatchError(SofttargetsError, ValueError):
    """A joined dataset's labels disagree with the store's on the rows read: not the transfer set the
    targets were computed on, or not in its order. ``mismatched`` of ``compared`` labelled rows disagree;
    ``keys`` are the store keys of the first few (0, 0 and [] when re-raised from a DataLoader worker,
    which keeps only the message)."""

    def __init__(self, message: str, *, mismatched: int = 0, compared: int = 0, keys: list[str] | None = None):
        super().__init__(message)
        self.mismatched, self.compared, self.keys = mismatched, compared, list(keys or [])


class TrainOutputExists(SofttargetsError, FileExistsError):
    """``out`` holds files of an earlier training run (``found``); refused without resume or overwrite."""

    def __init__(self, out: Path, found: list[str]):
        super().__init__(f"{out} holds a training run ({', '.join(found)}); pass resume=True to continue it "
                         "or overwrite=True to replace it")
        self.out, self.found = out, found


class StorageAccessError(SofttargetsError, PermissionError):
    """A store's location cannot be reached or written with the storage options given (no or wrong
    credentials, no such bucket, no endpoint). The message never holds the options' values.

    Attributes:
        url: the store's URL.
    """

    url: str | None = None


class PreflightError(SofttargetsError, RuntimeError):
    """A dask worker cannot run a stage-one job: it cannot import a factory, read the weights or the transfer
    set, or write the output. Raised before any shard runs, naming every such worker.

    Attributes:
        workers: ``[(address, host, problem), ...]``, one per worker refused.
    """

    workers: list[tuple[str, str, str]] = []
