"""The digits views pipeline (``python -m pipelines.digits_views --quick``) end to end, as a user runs it: teachers
trained with augmentation, a clean store and a views store, every student variant; then its files, and the
views store against its own manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import softtargets as st

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_results_table_and_plot(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.digits_views", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in range(1, 5):
        assert f"== [{stage}/4]" in proc.stdout
    r = json.loads((out / "results.json").read_text())
    assert set(r["summary"]) == {"hard", "clean", "views2", "online"}
    assert {s["variant"] for s in r["students"]} == set(r["summary"])
    for s in r["students"]:
        assert 0 <= s["test_errors"] <= 360 and s["seconds_per_epoch"] > 0
    clean, views = r["stores"]["clean"], r["stores"]["views2"]
    assert clean["rows"] == 1078 and views["rows"] == 2 * 1078
    assert clean["bytes_per_view_payload"] == 20  # 10 float16 logits
    assert views["bytes_per_view_payload"] == 20 + 7 * 2  # and 7 float16 parameters
    assert r["gaps"]["views2"]["time_vs_online"] > 0
    md = (out / "results.md").read_text()
    assert "(b) replayed views, V = 2" in md and "ml-dr" in md
    assert (out / "test_error_vs_views.png").stat().st_size > 10_000
    store = st.open_targets(views["url"])
    assert store.manifest.views["count"] == 2 and st.verify_store(views["url"]).ok
    params = np.load(Path(views["url"]) / "views" / "params-000000.npy", allow_pickle=False)
    assert params.dtype.names == ("crop_x", "crop_y", "crop_w", "crop_h", "angle", "tx", "ty")
