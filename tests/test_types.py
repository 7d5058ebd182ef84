"""The package type-checks: ``python -m mypy`` with the ``[tool.mypy]`` configuration in pyproject.toml exits 0.

mypy keeps its cache in ``.mypy_cache`` at the repository root, so only the first run checks every module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_type_checks():
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, "mypy found errors:\n" + (run.stdout + run.stderr)[-8000:]
