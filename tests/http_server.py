"""A loopback HTTP file server that honours ``Range: bytes=a-b`` (206 Partial Content).

Python's ``http.server`` ignores Range, and zarr's sharded reads over ``http://`` then get
whole files where they asked for byte ranges. Tests use :func:`serve_directory`; it can add a
delay to every request (object storage's latency) and counts the requests by method and path
(``benchmarks/remote.py`` uses both).
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class Requests:
    """What a server was asked: ``(method, path)`` -> count (threads share it)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._ranges: dict[str, list[str | None]] = {}
        self._lock = threading.Lock()

    def add(self, method: str, path: str, byte_range: str | None = None) -> None:
        with self._lock:
            self._counts[(method, path)] += 1
            self._ranges.setdefault(path, []).append(byte_range)

    def ranges(self, path: str) -> list[str | None]:
        """The ``Range`` header of each request for ``path`` (None: the whole file), in order."""
        with self._lock:
            return list(self._ranges.get(path, []))

    def count(self, method: str = "GET", under: str = "") -> int:
        """Requests of ``method`` for paths starting with ``under``."""
        with self._lock:
            return sum(n for (m, p), n in self._counts.items() if m == method and p.startswith(under))

    def by_path(self, method: str = "GET", under: str = "") -> dict[str, int]:
        with self._lock:
            return {p: n for (m, p), n in self._counts.items() if m == method and p.startswith(under)}

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self._ranges.clear()


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Serves files under ``directory``; a single byte range per request, as zarr and fsspec send. Each request
    waits ``delay`` seconds first and is counted in ``requests``."""

    delay = 0.0
    requests: Requests | None = None

    def send_head(self):  # type: ignore[override]
        if self.requests is not None:
            self.requests.add(self.command, self.path, self.headers.get("Range"))
        if self.delay:
            time.sleep(self.delay)
        self._remaining: int | None = None
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if header is None or not os.path.isfile(path):
            return super().send_head()
        match = _RANGE.match(header.strip())
        size = os.path.getsize(path)
        if match is None or match.groups() == ("", ""):
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"unsupported Range {header!r}")
            return None
        first, last = match.groups()
        if first == "":  # suffix range: the last N bytes
            start, stop = max(0, size - int(last)), size
        else:
            start, stop = int(first), size if last == "" else min(int(last) + 1, size)
        if start >= size or start >= stop:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller (do_GET)
        f.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        self._remaining = stop - start
        return f

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        """The file's bytes from where ``send_head`` left it (the whole file, or the range), sent by the kernel."""
        remaining, self._remaining = self._remaining, None
        if isinstance(source, io.BytesIO):  # a folder's listing, made in memory
            return super().copyfile(source, outputfile)
        offset = source.tell()
        if remaining is None:
            remaining = os.fstat(source.fileno()).st_size - offset
        outputfile.flush()
        while remaining > 0:
            sent = self.connection.sendfile(source, offset, remaining)
            if not sent:
                break
            offset, remaining = offset + sent, remaining - sent

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet in tests
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many concurrent range requests connect at once


@contextmanager
def serve_directory(directory: str | Path, delay: float = 0.0, requests: Requests | None = None) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) in a thread; yields the base URL ``http://127.0.0.1:PORT``.
    Every request waits ``delay`` seconds and is counted in ``requests`` (where given)."""
    handler_class = type("Handler", (RangeRequestHandler,), {"delay": delay, "requests": requests})
    handler = partial(handler_class, directory=str(directory))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="range-http-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
