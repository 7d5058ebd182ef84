"""``benchmarks/sparse.py --quick`` end to end on the textlm pipeline's quick teachers: every content and baseline
reported at every temperature, and the exact content (hidden) exact."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_sparse_benchmark_on_the_pipeline_teachers(tmp_path):
    out = tmp_path / "sparse.json"
    proc = subprocess.run([sys.executable, "benchmarks/sparse.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["teacher"]["kind"].startswith("textlm pipeline ensemble") and len(r["teacher"]["teachers"]) >= 2
    assert {x["method"] for x in r["results"]} == {"topk+tail", "topk renorm", "topk+bucket^(1/T)", "sampled",
                                                   "hidden"}
    for x in r["results"]:
        assert list(x["kl"]) == [str(t) for t in r["temperatures"]]
        assert all(v >= -1e-9 for v in x["kl"].values())
        if x["method"] != "topk renorm":
            assert all(math.isfinite(v) for v in x["kl"].values()), x
    hidden = r["goals"]["hidden_float16"]
    assert hidden["met"] and hidden["bytes"] == 2 * r["hidden_size"]
    assert out.with_suffix(".png").stat().st_size > 1000
