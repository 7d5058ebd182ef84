"""The textlm pipeline (``python -m pipelines.textlm --quick``) end to end: stdlib text, a trained BPE tokenizer,
LM teachers, a sequence store, students; then its results files, and the store against the saved teachers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import softtargets as st

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from pipelines.textlm.config import config  # noqa: E402
from pipelines.textlm.data import stdlib_corpus  # noqa: E402
from pipelines.textlm.models import CausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("textlm")
    proc = subprocess.run([sys.executable, "-m", "pipelines.textlm", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_results_files_and_fields(run):
    out, r = run
    assert (out / "results.md").read_text().count("| dense |") == 1
    assert (out / "ppl_vs_bytes.png").stat().st_size > 1000
    assert [s["targets"] for s in r["students"]] == ["hard labels", "dense"]
    for s in r["students"] + r["teachers"]:
        assert math.isfinite(s["ppl"]) and s["ppl"] > 1
    cfg = config(quick=True)
    assert r["transfer_tokens"] == cfg["transfer_sequences"] * cfg["context"]
    assert r["text"]["fingerprint"] == stdlib_corpus(cfg["max_files"], cfg["heldout_every"]).fingerprint


def test_store_holds_the_saved_teachers_mean_logits(run):
    out, r = run
    cfg = config(quick=True)
    store = st.open_sequences(r["stores"][0]["url"])
    m = store.manifest
    assert m.transfer_set["fingerprint"] == r["text"]["fingerprint"]
    assert store.num_tokens == r["transfer_tokens"] and m.num_classes == r["text"]["vocab_size"]
    teachers = []
    for spec in cfg["teachers"]:
        t = CausalLM(m.num_classes, spec["d"], spec["layers"], spec["heads"], cfg["context"])
        t.load_state_dict(torch.load(out / "teachers" / f"teacher-{spec['seed']}.pt"))
        teachers.append(t.eval())
    for i in (0, len(store) - 1):
        x = store[i]
        with torch.no_grad():
            ref = torch.stack([t(x["input_ids"][None])[0] for t in teachers]).mean(0)
        ref = ref - ref.mean(-1, keepdim=True)
        torch.testing.assert_close(x["teacher_logits"].float(), ref, atol=2e-2, rtol=1e-2)  # float16 storage
        assert torch.equal(x["label"][:-1], x["input_ids"][1:])
