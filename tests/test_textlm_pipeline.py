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
    md = (out / "results.md").read_text()
    assert md.count("| dense |") == 1 and "Goal (a student from <= 128 B/token" in md
    assert (out / "ppl_vs_bytes.png").stat().st_size > 1000
    names = ["dense", "topk k=8", "topk k=32", "sampled n=12", "hidden float16", "hidden int8"]
    assert [s["targets"] for s in r["students"]] == ["hard labels", *names]
    assert [s["name"] for s in r["stores"]] == names
    d = 2 * config(quick=True)["teachers"][0]["d"]  # hidden: both teachers' states side by side
    g = 8 * len(config(quick=True)["grid"])  # a float32 log-partition and its derivative per grid temperature
    assert [s["bytes_per_token"] for s in r["stores"]] == [2 * r["text"]["vocab_size"], 4 * 8 + g, 4 * 32 + g,
                                                         6 * 12 + g, 2 * d, d + 4]
    assert r["goal"]["bytes_per_token_max"] == 128 and isinstance(r["goal"]["met"], bool)
    for s in r["students"] + r["teachers"]:
        assert math.isfinite(s["ppl"]) and s["ppl"] > 1
    cfg = config(quick=True)
    assert r["transfer_tokens"] == cfg["transfer_sequences"] * cfg["context"]
    assert r["text"]["fingerprint"] == stdlib_corpus(cfg["max_files"], cfg["heldout_every"]).fingerprint


def _teachers(out: Path, vocab: int) -> list[CausalLM]:
    cfg = config(quick=True)
    teachers = []
    for spec in cfg["teachers"]:
        t = CausalLM(vocab, spec["d"], spec["layers"], spec["heads"], cfg["context"])
        t.load_state_dict(torch.load(out / "teachers" / f"teacher-{spec['seed']}.pt"))
        teachers.append(t.eval())
    return teachers


def _mean_logits(teachers: list[CausalLM], ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([t(ids[None])[0] for t in teachers]).mean(0)


def test_store_holds_the_saved_teachers_mean_logits(run):
    out, r = run
    store = st.open_sequences(r["stores"][0]["url"])
    m = store.manifest
    assert m.transfer_set["fingerprint"] == r["text"]["fingerprint"]
    assert store.num_tokens == r["transfer_tokens"] and m.num_classes == r["text"]["vocab_size"]
    teachers = _teachers(out, m.num_classes)
    for i in (0, len(store) - 1):
        x = store[i]
        ref = _mean_logits(teachers, x["input_ids"])
        ref = ref - ref.mean(-1, keepdim=True)
        torch.testing.assert_close(x["teacher_logits"].float(), ref, atol=2e-2, rtol=1e-2)  # float16 storage
        assert torch.equal(x["label"][:-1], x["input_ids"][1:])


def test_compact_stores_hold_the_saved_teachers_targets(run):
    """topk: the ensemble's k largest ids; hidden float16: the ensemble's logits from the stored head."""
    out, r = run
    stores = {s["name"]: st.open_sequences(s["url"]) for s in r["stores"]}
    teachers = _teachers(out, r["text"]["vocab_size"])
    x = stores["dense"][0]
    ref = _mean_logits(teachers, x["input_ids"])
    top = stores["topk k=8"]
    rows = top[top.keys().index(x["key"])]
    assert torch.equal(rows["input_ids"], x["input_ids"])
    fields = st.unpack_rows(top.manifest, rows["teacher_logits"])
    kth = ref.topk(8, dim=-1).values[:, -1:]
    assert bool((ref.gather(-1, fields["ids"]) >= kth - 1e-4).all())  # the stored ids are a top 8 (ties aside)
    hid = stores["hidden float16"]
    rows = hid[hid.keys().index(x["key"])]
    weight, bias = hid.head()
    h = st.unpack_rows(hid.manifest, rows["teacher_logits"])["hidden"].float()
    torch.testing.assert_close(h @ weight.T + bias, ref, atol=2e-2, rtol=1e-2)


def test_students_retrained_with_other_seeds(run):
    """``pipelines.textlm.seeds``: the run's own seed kept, another trained from the same stores."""
    out, r = run
    proc = subprocess.run([sys.executable, "-m", "pipelines.textlm.seeds", "--run", str(out), "--seeds", "3",
                           "--targets", "sampled n=12"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "student_seeds.json").read_text())
    own = config(quick=True)["student"]["seed"]
    assert s["seeds"] == [own, 3]
    assert [x["targets"] for x in s["students"]["3"]] == ["hard labels", "dense", "sampled n=12"]
    summary = s["summary"]["sampled n=12"]
    assert summary["ppl"][0] == next(x["ppl"] for x in r["students"] if x["targets"] == "sampled n=12")
    assert all(math.isfinite(p) and p > 1 for p in summary["ppl"])
    assert all(g in (1.0, None) for g in s["summary"]["dense"]["gap_closed"])
