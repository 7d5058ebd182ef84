"""The end every pipeline's ``python -m`` entry point shares: time the run, write its reports, say where."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def finish(results: dict[str, Any], out: Path, started: float,
           write_all: Callable[[dict[str, Any], Path], dict[str, Path]]) -> int:
    """Record the wall time since ``started`` (a ``time.perf_counter()`` value) in ``results["timings"]``, write
    the reports with ``write_all(results, out)``, print their paths and the wall time; returns the exit status 0."""
    results["timings"]["main_seconds"] = time.perf_counter() - started
    paths = write_all(results, out)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    print(f"wall time {results['timings']['main_seconds']:.1f} s")
    return 0
