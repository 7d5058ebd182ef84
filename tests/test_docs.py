"""The documentation builds in strict mode: a broken link, anchor or API reference fails the suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_build_strict(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("precompute", "stream", "open_targets", "kd_loss", "verify_store"):
        assert re.search(rf'id="softtargets\.[\w.]*\b{name}"', api), f"the API reference lacks {name}"
