"""Fixtures shared by the test files. Plain helpers live in the helper modules beside them: ``store_data.py``
(logits, keys, stores written through the public writer, numpy references), ``sharing.py`` (stores with
teachers and labels, corruptions, the command line run in this process), ``teacher_zoo.py`` (teachers) and
``http_server.py`` (a directory served over loopback HTTP)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

from tests.sharing import run_cli

# Records of verified files (softtargets/store/verified.py) go to a folder of this test run, not the user's cache.
os.environ["SOFTTARGETS_VERIFY_CACHE"] = tempfile.mkdtemp(prefix="softtargets-test-verified-")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``cli(*argv) -> (exit status, stdout, stderr)``: ``softtargets ARGV`` run in this process."""

    def run(*argv: Any) -> tuple[int, str, str]:
        return run_cli(list(argv), capsys)

    return run
