"""``python -m pipelines.specialists --quick`` end to end: a generalist, planned specialists, stores with eq. 5's
q and hints, students; then its results files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import softtargets as st

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_demonstration_runs_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines.specialists", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    assert sum(v["examples"] for v in run["by_covering"].values()) == run["test_examples"] == 360
    combined = sum(v["combined_correct"] for v in run["by_covering"].values())
    assert combined == round(run["combined_accuracy"] * 360)
    assert run["solver"]["max_residual"] < run["solver"]["tol"]
    assert len(run["plan"]) == 3 and all(len(s["classes"]) == 4 for s in run["plan"])
    assert all(0 <= v <= 1 for v in [*run["students"].values(), *run["thin_students"].values()])
    assert (tmp_path / "specialists.png").stat().st_size > 1000
    assert "| specialists covering |" in (tmp_path / "results.md").read_text()
    store = st.open_targets(tmp_path / "seed0" / "train.zarr")
    assert [t["classes"] for t in store.manifest.specialists["teachers"]] == [s["classes"] for s in run["plan"]]
    assert store.manifest.hints["hidden"]["shape"] == [len(store), 24]
    assert st.verify_store(tmp_path / "seed0" / "train.zarr").ok
