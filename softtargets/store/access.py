"""Whether a store's location can be written with the storage options given: one probe object, then removed.

Stage one checks this on the driver before it creates anything (no credentials, a wrong endpoint or a
missing bucket then cost one line, not a traceback and a half-made store), and on every dask worker before
any shard runs (:mod:`softtargets.precompute.preflight`). The messages name the URL and the fix, never the
storage options' values (they may hold secrets).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from ..errors import StorageAccessError
from .files import is_local, join, remove_file, url_to_fs

__all__ = ["PROBE_PREFIX", "check_writable", "describe_access_error", "probe_location"]

PROBE_PREFIX = ".softtargets-probe-"

# botocore / aiobotocore exceptions (by class name) and S3 error codes -> what to do about them.
_FIXES = {
    "NoCredentialsError": "no credentials: give key and secret as storage options ([storage] in the config, "
                          "--storage-option key=... --storage-option secret=...), or AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where this runs",
    "PartialCredentialsError": "incomplete credentials: give both key and secret",
    "EndpointConnectionError": "cannot reach the endpoint: check client_kwargs.endpoint_url and the network",
    "InvalidAccessKeyId": "the access key is not known to the object store: check key",
    "SignatureDoesNotMatch": "the secret does not match the access key: check secret",
    "AccessDenied": "access denied: these credentials may not write there",
    "NoSuchBucket": "no such bucket: create it first, or fix the URL",
}


def describe_access_error(exc: BaseException) -> str:
    """What went wrong reaching a store, in words and with the fix; never the storage options' values."""
    names = [type(e).__name__ for e in _chain(exc)]
    texts = " ".join(str(e) for e in _chain(exc))
    for key, fix in _FIXES.items():
        if key in names or key in texts:
            return fix
    if isinstance(exc, FileNotFoundError):
        return f"not found ({exc}): check the URL (bucket and path)"
    if isinstance(exc, PermissionError):
        return f"permission denied ({exc}): these credentials may not write there"
    return f"{type(exc).__name__}: {exc}"


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in out:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def probe_location(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Where :func:`check_writable` puts its probe for a store at ``url``: inside the store on an object store
    (nothing is left once it is removed), in the nearest existing folder on a local disk (the store's folder
    is not created to check it)."""
    fs, root = url_to_fs(url, **(storage_options or {}))
    if not is_local(fs):
        return url.rstrip("/")
    path = fs._strip_protocol(root)
    while path and not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


def check_writable(url: str, storage_options: dict[str, Any] | None = None, where: str | None = None) -> None:
    """Write a probe object at ``where`` (default :func:`probe_location` of ``url``), read its size back, and
    remove it.

    Raises:
        StorageAccessError: one line naming ``url`` and the fix (credentials, endpoint, bucket, permissions).
    """
    where = probe_location(url, storage_options) if where is None else where
    try:
        fs, root = url_to_fs(where, **(storage_options or {}))
        probe = join(root, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        try:
            fs.pipe_file(probe, b"softtargets write probe")
            fs.info(probe)
        finally:
            remove_file(fs, probe)
    except StorageAccessError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to write there is the user's to fix, in one line
        raise StorageAccessError(f"cannot write {url}: {describe_access_error(exc)}", url=url) from None
