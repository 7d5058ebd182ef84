"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict[str, Any]:
    """Where and on what a figure was measured: CPU model, cores, load average, Python, and the git
    commit of the checkout (with ``+dirty`` when it has uncommitted changes)."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "--short", "HEAD")
    if commit and _git(root, "status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "python": platform.python_version(), "commit": commit}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` with :func:`machine` under ``"machine"`` as indented JSON to ``path`` (folders made as
    needed), print the machine line a table's figures belong to, and say where the JSON went."""
    report = {**report, "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_average'][0]:.2f}; commit {m['commit']}")
    print(f"wrote {path}")
