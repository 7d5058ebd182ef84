"""``convert`` derives topk and sampled stores from dense logits; ``inspect`` reports their bytes per row and tail
mass by temperature; both refuse what a compact content cannot be made from."""

from __future__ import annotations

import json

import pytest
import torch

from softtargets import convert_store, create_targets, inspect_store, open_targets, verify_store
from softtargets.math.compact import CompactSpec
from softtargets.math.compact_losses import topk_kd_loss
from softtargets.store.compact_rows import compact_spec_of

C, K, N = 400, 2, 50


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    logits = torch.randn(N, K, C, generator=torch.Generator().manual_seed(0)) * 3
    url = tmp_path_factory.mktemp("dense") / "d.zarr"
    with create_targets(url, num_classes=C, num_teachers=K, dtype="float32", num_samples=N, shard_rows=16) as w:
        w.write([f"s{i}" for i in range(N)], logits, torch.arange(N) % C)
    return url, logits


def test_convert_to_topk_matches_stage_one_and_keeps_keys_labels(dense, tmp_path, cli):
    url, logits = dense
    rc, out, _ = cli("convert", url, tmp_path / "t.wds", "--compact", "topk", "--k", "8", "--grid", "0.5,1,2,4,8,20",
                     "--content", "geometric", "--no-progress")
    assert rc == 0 and "topk (80 bytes/row)" in out  # 8*2 + 8*2 + 6*4*2 (C=400: uint16 ids)
    store = open_targets(tmp_path / "t.wds")
    m = store.manifest
    assert m.layout == "wds" and m.content == "geometric" and m.lineage[-1]["operation"] == "convert"
    assert 0 < m.compact["tail_error"] < 0.05 and verify_store(tmp_path / "t.wds").ok
    assert store.keys() == [f"s{i}" for i in range(N)] and store[:]["label"].tolist() == (torch.arange(N) % C).tolist()
    f = store.compact_fields(range(N))
    mean = logits.mean(1)
    assert torch.equal(f["ids"], mean.topk(8, -1).indices)
    assert abs(float(topk_kd_loss(mean, f, compact_spec_of(m), 3.0))) < 1e-4

    rc, out, _ = cli("inspect", tmp_path / "t.wds", "--temperatures", "1,4,50", "--no-progress")
    assert rc == 0 and "topk: 80 bytes/row (dense float16: 800)" in out and "mass outside top-k" in out
    report = inspect_store(tmp_path / "t.wds", temperatures=(1.0, 4.0, 50.0), progress=False)
    st = report["compact_stats"]
    assert st["exact"] == [True, True, False] and report["logit_bytes_per_sample"] == 80
    z = mean / 4.0
    want = 1 - torch.softmax(z, -1).gather(-1, f["ids"]).sum(-1)
    assert st["tail_mass"]["mean"][1] == pytest.approx(float(want.mean()), abs=2e-3)
    assert st["tail_mass"]["mean"][0] < st["tail_mass"]["mean"][1] < st["tail_mass"]["mean"][2]


def test_convert_to_sampled_per_teacher_and_inspect(dense, tmp_path):
    url, _ = dense
    m = convert_store(url, tmp_path / "s.zarr", compact=CompactSpec("sampled", k=16, temperatures=(1.0, 2.0)),
                      progress=False)
    assert m.content == "per_teacher" and m.compact["fields"][0]["shape"] == [K, 16]
    report = inspect_store(tmp_path / "s.zarr", temperatures=(1.0, 2.0), progress=False)
    st = report["compact_stats"]
    assert 1 <= st["distinct_ids_per_row"] <= 16 and 0 < st["covered_mass"]["mean"][0] <= 1
    assert json.loads((tmp_path / "s.zarr" / "manifest.json").read_text())["format_version"] == 3


def test_convert_refuses_what_a_compact_content_cannot_come_from(dense, tmp_path):
    url, _ = dense
    with pytest.raises(ValueError, match="needs the teachers' hidden states"):
        convert_store(url, tmp_path / "h.zarr", compact="hidden", progress=False)
    convert_store(url, tmp_path / "t.zarr", compact=CompactSpec("topk", k=4, temperatures=(1.0,)), progress=False)
    with pytest.raises(ValueError, match="only dense logits convert to a compact content"):
        convert_store(tmp_path / "t.zarr", tmp_path / "t2.zarr", compact="topk", progress=False)
    geo = convert_store(url, tmp_path / "g.zarr", content="geometric", progress=False)
    assert geo.compact is None
    with pytest.raises(ValueError, match="cannot make per_teacher from geometric"):
        convert_store(tmp_path / "g.zarr", tmp_path / "g2.zarr", compact="topk", content="per_teacher", progress=False)
