"""``softtargets convert | merge | subset`` on real stores: exact copies, exact reductions, clear refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import softtargets as st
from softtargets.sharing.combine import merge_stores, subset_store
from softtargets.sharing.convert import convert_store
from softtargets.sharing.verify import verify_store

from ..sharing import all_rows, assert_same_rows, bits, make_store, run_cli, sample_keys

OTHER = {"zarr": "wds", "wds": "zarr"}


def cli(capsys, *args):
    """``softtargets ARGS --no-progress``: ``(exit status, stdout and stderr together)``."""
    rc, out, err = run_cli([*args, "--no-progress"], capsys)
    return rc, out + err


def manifest_sha(path):
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("layout", ["zarr", "wds"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_is_bitwise(tmp_path, capsys, layout, dtype):
    """layout -> other layout -> back: keys, labels and logits bits unchanged; lineage chains both steps."""
    src = make_store(tmp_path, layout, "src", dtype=dtype)
    mid = tmp_path / f"mid.{OTHER[layout]}"
    back = tmp_path / f"back.{layout}"
    assert cli(capsys, "convert", src, mid)[0] == 0
    assert cli(capsys, "convert", mid, back)[0] == 0
    a, b, c = st.open_targets(src), st.open_targets(mid), st.open_targets(back)
    assert (b.manifest.layout, c.manifest.layout) == (OTHER[layout], layout)
    assert_same_rows(all_rows(a), all_rows(b))
    assert_same_rows(all_rows(a), all_rows(c))
    for m in (b.manifest, c.manifest):
        assert (m.teachers, m.class_names, m.transfer_set, m.dtype) == (
            a.manifest.teachers, a.manifest.class_names, a.manifest.transfer_set, dtype)
        assert [s.labeled for s in m.shards] == [s.labeled for s in a.manifest.shards]
    first, second = c.manifest.lineage
    assert first["sources"][0] == {"url": str(src), "manifest_sha256": manifest_sha(src), "num_samples": 150}
    assert second["sources"][0]["manifest_sha256"] == manifest_sha(mid)
    assert second["operation"] == "convert" and second["parameters"]["layout"] == layout
    assert verify_store(back).ok


def test_dtype_round_trip(tmp_path):
    """float32 -> float16 rounds each value once (as torch does); float16 -> float32 -> float16 is exact."""
    src = make_store(tmp_path, "zarr", "f32", dtype="float32")
    half = convert_store(src, tmp_path / "f16.zarr", dtype="float16", progress=False)
    assert half.dtype == "float16"
    x32 = all_rows(st.open_targets(src))["logits"]
    x16 = all_rows(st.open_targets(tmp_path / "f16.zarr"))["logits"]
    assert torch.equal(bits(x16), bits(x32.to(torch.float16)))
    convert_store(tmp_path / "f16.zarr", tmp_path / "back32.wds", dtype="float32", progress=False)
    convert_store(tmp_path / "back32.wds", tmp_path / "back16.zarr", dtype="float16", progress=False)
    assert torch.equal(bits(all_rows(st.open_targets(tmp_path / "back16.zarr"))["logits"]), bits(x16))


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_geometric_reduction_is_the_mean_of_teachers(tmp_path, capsys, layout):
    src = make_store(tmp_path, layout, "pt", dtype="float16")
    dst = tmp_path / f"geo.{OTHER[layout]}"
    rc, out = cli(capsys, "convert", src, dst, "--content", "geometric")
    assert rc == 0, out
    per_teacher = all_rows(st.open_targets(src))
    geo = st.open_targets(dst)
    got = all_rows(geo)
    expected = per_teacher["logits"].double().mean(dim=1)  # of the stored float16 values
    expected = (expected - expected.mean(dim=-1, keepdim=True)).to(torch.float16)
    diff = (got["logits"].float() - expected.float()).abs()
    ulp = expected.float().abs().clamp(min=2**-14) * 2**-10
    assert got["logits"].shape == (150, 10) and bool((diff <= ulp).all())
    assert got["key"] == per_teacher["key"] and torch.equal(got["label"], per_teacher["label"])
    m = geo.manifest
    assert (m.content, m.num_teachers, m.temperature) == ("geometric", 3, None)
    assert m.lineage[-1]["parameters"]["content"] == "geometric"
    # the reduced store serves the same geometric targets as the per-teacher one
    p_pt = st.open_targets(src).probs(range(150), temperature=3.0, rule="geometric")
    p_geo = geo.probs(range(150), temperature=3.0, rule="geometric")
    assert (p_pt - p_geo).abs().max() < 2e-3


def test_arithmetic_reduction_at_t0(tmp_path):
    src = make_store(tmp_path, "wds", "pt", dtype="float32")
    m = convert_store(src, tmp_path / "ar.zarr", content="arithmetic", temperature=2.0, progress=False)
    assert (m.content, m.temperature) == ("arithmetic", 2.0)
    want = st.open_targets(src).log_probs(range(150), temperature=2.0, rule="arithmetic")
    got = st.open_targets(tmp_path / "ar.zarr").log_probs(range(150), temperature=2.0, rule="arithmetic")
    assert (want - got).abs().max() < 1e-5


def test_content_refusals(tmp_path, capsys):
    src = make_store(tmp_path, "zarr", "pt")
    rc, out = cli(capsys, "convert", src, tmp_path / "x.zarr", "--content", "arithmetic")
    assert rc == 2 and "needs --temperature T0" in out
    geo = tmp_path / "geo.zarr"
    convert_store(src, geo, content="geometric", progress=False)
    rc, out = cli(capsys, "convert", geo, tmp_path / "y.zarr", "--content", "arithmetic", "--temperature", "2")
    assert rc == 2 and "cannot convert geometric content to arithmetic" in out
    rc, out = cli(capsys, "convert", src, src)
    assert rc == 2 and "the destination is the source" in out
    rc, out = cli(capsys, "convert", src, geo)
    assert rc == 2 and "finished store" in out and "overwrite" in out


def test_failed_conversion_leaves_nothing(tmp_path, capsys):
    """float32 values beyond float16's range: refused naming the problem; no half-written destination stays."""
    path = tmp_path / "big.zarr"
    w = st.create_targets(path, num_classes=4, content="geometric", dtype="float32", shard_rows=8, block_rows=4,
                          normalization="none")
    x = torch.zeros(20, 4)
    x[15, 2] = 1e6
    w.write(sample_keys(20), x)
    w.close()
    rc, out = cli(capsys, "convert", path, tmp_path / "half.zarr", "--dtype", "float16")
    assert rc == 2 and "float16" in out and "shard 1" in out
    assert not (tmp_path / "half.zarr").exists()
    m = convert_store(path, tmp_path / "clipped.zarr", dtype="float16", overflow="clip", progress=False)
    assert m.clipped_values == 1


# -- merge -----------------------------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path):
    """Two stores over disjoint key ranges of one transfer set: 150 rows (zarr) and 90 rows (wds)."""
    a = make_store(tmp_path, "zarr", "a", transfer_set={"name": "toy-a", "fingerprint": "a" * 64})
    b = make_store(tmp_path, "wds", "b", n=90, seed=1, key_start=150,
                   transfer_set={"name": "toy-b", "fingerprint": "b" * 64})
    return a, b


@pytest.mark.parametrize("dst_layout", ["zarr", "wds"])
def test_merge_concatenates_bitwise(tmp_path, capsys, parts, dst_layout):
    a, b = parts
    dst = tmp_path / f"ab.{dst_layout}"
    rc, out = cli(capsys, "merge", a, b, dst)
    assert rc == 0, out
    ra, rb = all_rows(st.open_targets(a)), all_rows(st.open_targets(b))
    merged = st.open_targets(dst)
    got = all_rows(merged)
    assert len(merged) == 240 and got["key"] == ra["key"] + rb["key"]
    assert torch.equal(bits(got["logits"]), bits(torch.cat([ra["logits"], rb["logits"]])))
    assert torch.equal(got["label"], torch.cat([ra["label"], rb["label"]]))
    m = merged.manifest
    assert m.transfer_set["name"] == "toy-a + toy-b" and len(m.transfer_set["parts"]) == 2
    entry = m.lineage[0]
    assert entry["operation"] == "merge"
    assert [s["manifest_sha256"] for s in entry["sources"]] == [manifest_sha(a), manifest_sha(b)]
    assert verify_store(dst).ok


def test_merge_refuses_overlapping_keys(tmp_path, capsys, parts):
    a, _ = parts
    c = make_store(tmp_path, "wds", "c", n=40, seed=2, key_start=140)  # rows 140..149 repeat a's keys
    rc, out = cli(capsys, "merge", a, c, tmp_path / "ac.zarr")
    assert rc == 2
    assert "10 keys appear more than once" in out and "'img/000140.jpg'" in out
    assert f"{a} (row 140)" in out and f"{c} (row 0)" in out
    assert not (tmp_path / "ac.zarr").exists()


@pytest.mark.parametrize(
    "kw, field",
    [({"teacher_tag": "retrained"}, "teachers"), ({"c": 12}, "num_classes"), ({"dtype": "float32"}, "dtype"),
     ({"content": "geometric"}, "content"), ({"k": 2}, "num_teachers")],
)
def test_merge_refuses_mismatches(tmp_path, capsys, parts, kw, field):
    a, _ = parts
    other = make_store(tmp_path, "zarr", "other", n=20, key_start=1000, **kw)
    rc, out = cli(capsys, "merge", a, other, tmp_path / "m.zarr")
    assert rc == 2
    assert f"cannot merge stores that differ in {field}: {a} has" in out and f"{other} has" in out


# -- subset ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_subset_by_range_and_keys(tmp_path, capsys, layout):
    src = make_store(tmp_path, layout, "src")
    rows = all_rows(st.open_targets(src))
    rc, out = cli(capsys, "subset", src, tmp_path / f"r.{layout}", "--range", "30:101")
    assert rc == 0, out
    got = all_rows(st.open_targets(tmp_path / f"r.{layout}"))
    assert got["key"] == rows["key"][30:101]
    assert torch.equal(bits(got["logits"]), bits(rows["logits"][30:101]))
    pick = [149, 3, 64, 65, 3, 100]  # any order, repeats ignored; rows keep the source's order
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("\n".join(rows["key"][i] for i in pick) + "\n\n")
    rc, out = cli(capsys, "subset", src, tmp_path / f"k.{OTHER[layout]}", "--keys", keys_file)
    assert rc == 0, out
    sub = st.open_targets(tmp_path / f"k.{OTHER[layout]}")
    got = all_rows(sub)
    order = sorted(set(pick))
    assert got["key"] == [rows["key"][i] for i in order]
    assert torch.equal(bits(got["logits"]), bits(rows["logits"][order]))
    assert torch.equal(got["label"], rows["label"][order])
    params = sub.manifest.lineage[-1]["parameters"]
    assert params["keys"] == 5 and params["keys_source"] == str(keys_file)


def test_subset_refusals(tmp_path, capsys):
    src = make_store(tmp_path, "zarr", "src")
    (tmp_path / "k.txt").write_text("img/000001.jpg\nnot-a-key\n")
    rc, out = cli(capsys, "subset", src, tmp_path / "x.zarr", "--keys", tmp_path / "k.txt")
    assert rc == 2 and "1 of 2 keys are not in" in out and "not-a-key" in out
    rc, out = cli(capsys, "subset", src, tmp_path / "y.zarr", "--range", "100:200")
    assert rc == 2 and "not within the store's 150 rows" in out
    with pytest.raises(ValueError, match="exactly one of"):
        subset_store(src, tmp_path / "z.zarr")


def test_inputs_travel_only_where_they_fit(tmp_path):
    """A wds 'sample' store with packed inputs: carried to another sample store, dropped only on request."""
    path = tmp_path / "in.wds"
    w = st.create_targets(path, num_classes=4, content="geometric", layout="wds", sample_layout="sample",
                          inputs={"input.npy": "float32 [2]"}, shard_rows=8)
    w.write(sample_keys(12), torch.randn(12, 4), inputs=[{"input.npy": torch.full((2,), float(i)).numpy()}
                                                           for i in range(12)])
    w.close()
    with pytest.raises(ValueError, match="packs inputs"):
        convert_store(path, tmp_path / "x.zarr", progress=False)
    convert_store(path, tmp_path / "copy.wds", shard_rows=4, progress=False)
    assert float(st.open_targets(tmp_path / "copy.wds").read_inputs(9)["input.npy"][0]) == 9.0
    m = convert_store(path, tmp_path / "y.zarr", drop_inputs=True, progress=False)
    assert m.inputs is None and m.lineage[-1]["parameters"]["inputs"] == "dropped"
    sub = subset_store(path, tmp_path / "s.wds", row_range=(5, 9), progress=False)
    assert json.loads((tmp_path / "s.wds" / "manifest.json").read_text())["inputs"] == sub.inputs
    assert float(st.open_targets(tmp_path / "s.wds").read_inputs(0)["input.npy"][0]) == 5.0
    with pytest.raises(ValueError, match="12 keys appear more than once"):
        merge_stores([path, tmp_path / "copy.wds"], tmp_path / "never.wds", progress=False)
