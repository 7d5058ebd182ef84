"""``softtargets inspect`` against numpy references, and the dataset card's recipes run for real."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

import softtargets as st
from softtargets.cli import main
from softtargets.sharing.convert import convert_store
from softtargets.sharing.inspect import inspect_store
from softtargets.store.card import URL_PLACEHOLDER

from ..sharing import C, K, all_rows, bits, make_store, softmax


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(-1)


@pytest.fixture(scope="module", params=["zarr", "wds"])
def store(request, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("inspect"), request.param)


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("inspect-zarr"), "zarr")


def reference(x: np.ndarray, y: np.ndarray, temperatures) -> dict:
    """Accuracy, agreement and entropies of per-teacher logits ``[N, K, C]`` in float64 numpy."""
    has = y >= 0
    preds = x.argmax(-1)
    geo = x.mean(1).argmax(-1)
    return {
        "teachers": [(preds[has, k] == y[has]).mean() for k in range(x.shape[1])],
        "geometric": (geo[has] == y[has]).mean(),
        "arithmetic": (softmax(x).mean(1).argmax(-1)[has] == y[has]).mean(),
        "with_ensemble": [(preds[:, k] == geo).mean() for k in range(x.shape[1])],
        "all": (preds == preds[:, :1]).all(1).mean(),
        "pairwise_01": (preds[:, 0] == preds[:, 1]).mean(),
        "H_geo": [entropy(softmax(x.mean(1), t)).mean() for t in temperatures],
        "H_ari": [entropy(softmax(x, t).mean(1)).mean() for t in temperatures],
        "conf": softmax(x.mean(1)).max(-1),
    }


def test_stats_match_numpy(store):
    rows = all_rows(st.open_targets(store))
    x, y = rows["logits"].double().numpy(), rows["label"].numpy()
    temps = [0.5, 1.0, 3.0, 10.0]
    r = inspect_store(store, temperatures=temps, progress=False)
    s, ref = r["stats"], reference(x, y, temps)
    assert s["rows"] == 150 and s["labeled"] == int((y >= 0).sum()) == r["labeled"]
    np.testing.assert_allclose(s["accuracy"]["teachers"], ref["teachers"], atol=1e-12)
    assert s["accuracy"]["ensemble"]["geometric"] == pytest.approx(ref["geometric"])
    assert s["accuracy"]["ensemble"]["arithmetic"] == pytest.approx(ref["arithmetic"])
    assert 0.5 < ref["geometric"] < 1.0  # the data make accuracy informative
    np.testing.assert_allclose(s["agreement"]["with_ensemble"], ref["with_ensemble"], atol=1e-12)
    assert s["agreement"]["all"] == pytest.approx(ref["all"])
    assert s["agreement"]["pairwise"][0][1] == pytest.approx(ref["pairwise_01"])
    assert s["agreement"]["pairwise"][2][2] == 1
    np.testing.assert_allclose(s["entropy"]["geometric"], ref["H_geo"], rtol=1e-5)
    np.testing.assert_allclose(s["entropy"]["arithmetic"], ref["H_ari"], rtol=1e-5)
    assert all(s["entropy_exact"]["geometric"]) and s["max_entropy"] == pytest.approx(np.log(C))
    counts = np.histogram(ref["conf"], bins=np.linspace(0, 1, 21))[0]
    assert s["confidence"]["counts"]["geometric"] == counts.tolist()
    assert s["confidence"]["mean"]["geometric"] == pytest.approx(ref["conf"].mean(), rel=1e-5)


def test_manifest_facts(store):
    r = inspect_store(store, stats=False)
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file() and p.name not in (
        "manifest.json", "README.md", "zarr.json"))
    assert r["stats"] is None
    assert r["bytes"] == on_disk and r["bytes_per_sample"] == pytest.approx(on_disk / 150)
    assert r["logit_bytes_per_sample"] == K * C * 2
    assert [t["sha256"] for t in r["teachers"]] == [t["sha256"] for t in st.open_targets(store).manifest.teachers]
    assert r["class_names"][:2] == ["class0", "class1"] and r["transfer_set"]["name"] == "toy"
    assert "versions" in r["provenance"] and r["provenance"]["versions"]["zarr"]


def test_limit_reads_the_first_rows(store):
    r = inspect_store(store, limit=40, progress=False)["stats"]
    rows = all_rows(st.open_targets(store))
    x = rows["logits"][:40].double().numpy()
    assert r["rows"] == 40 and r["limit"] == 40
    np.testing.assert_allclose(r["entropy"]["geometric"][1], entropy(softmax(x.mean(1))).mean(), rtol=1e-5)


def test_reduced_stores(tmp_path, zarr_store):
    """Geometric: one rule, no per-teacher stats. Arithmetic: exact only at T0, flagged elsewhere."""
    store = zarr_store
    geo, ari = tmp_path / "g.zarr", tmp_path / "a.wds"
    convert_store(store, geo, content="geometric", progress=False)
    convert_store(store, ari, content="arithmetic", temperature=2.0, dtype="float32", progress=False)
    full = inspect_store(store, temperatures=[1.0, 2.0, 4.0], progress=False)["stats"]
    g = inspect_store(geo, temperatures=[1.0, 2.0, 4.0], progress=False)["stats"]
    a = inspect_store(ari, temperatures=[1.0, 4.0], progress=False)["stats"]
    assert list(g["entropy"]) == ["geometric"] and g["agreement"] is None and g["accuracy"]["teachers"] is None
    np.testing.assert_allclose(g["entropy"]["geometric"], full["entropy"]["geometric"], rtol=2e-3)
    assert a["temperatures"] == [1.0, 2.0, 4.0] and a["entropy_exact"]["arithmetic"] == [False, True, False]
    assert a["entropy"]["arithmetic"][1] == pytest.approx(full["entropy"]["arithmetic"][1], rel=1e-5)
    assert a["confidence"]["temperature"] == 2.0


def test_cli_text_and_json(store, capsys):
    assert main(["inspect", str(store), "--no-progress", "--temperatures", "1,4"]) == 0
    out = capsys.readouterr().out
    for want in ("150 in 5 shards", "per_teacher [N, K, C], K = 3 teachers", "net0", "net2", "toy (fingerprint",
                 "ensemble accuracy  geometric", "mean entropy", "class0, class1", "bytes/sample"):
        assert want in out, want
    assert main(["inspect", str(store), "--json", "--no-progress", "--limit", "10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["rows"] == 10 and report["num_teachers"] == 3


def test_cli_plot(zarr_store, tmp_path):
    png = tmp_path / "plot.png"
    assert main(["inspect", str(zarr_store), "--plot", str(png), "--no-progress", "--json"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_get_it(zarr_store, tmp_path, capsys, monkeypatch):
    store = zarr_store
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the optional extra were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["inspect", str(store), "--plot", str(tmp_path / "p.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'softtargets[plot]'" in err
    assert not (tmp_path / "p.png").exists()


# -- the dataset card's recipes, run as written ------------------------------------------------------------


def card_blocks(path) -> list[str]:
    """The python code blocks of the card's 'Read it without softtargets' section, naming the store at ``path``."""
    text = (path / "README.md").read_text().replace(URL_PLACEHOLDER, str(path))
    section = text.split("## Read it without softtargets", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_card_recipes_plain_zarr_and_dask(tmp_path, monkeypatch, dtype):
    path = make_store(tmp_path, "zarr", dtype=dtype)
    monkeypatch.chdir(tmp_path)  # the card names the store by the path it was written to
    store = st.open_targets(path)
    rows = all_rows(store)
    zarr_code, dask_code = card_blocks(path)
    ns: dict = {}
    exec(zarr_code, ns)  # noqa: S102 - the recipe under test
    assert ns["keys"].tolist() == rows["key"] and np.array_equal(ns["labels"], rows["label"].numpy())
    stored = torch.from_numpy(ns["logits"].view(np.int16) if dtype == "bfloat16" else ns["logits"])
    assert torch.equal(stored, bits(rows["logits"]) if dtype == "bfloat16" else rows["logits"])
    np.testing.assert_allclose(ns["targets"], store.probs(range(150), 4.0, "geometric").numpy(), atol=1e-6)
    np.testing.assert_allclose(ns["arithmetic"], store.probs(range(150), 4.0, "arithmetic").numpy(), atol=1e-6)
    ns = {}
    exec(dask_code, ns)  # noqa: S102
    np.testing.assert_allclose(ns["mean_logits"], rows["logits"].float().mean(0).numpy(), atol=1e-5)
    assert np.array_equal(ns["labels"].compute(), rows["label"].numpy())


@pytest.mark.parametrize("sample_layout", ["block", "sample"])
def test_card_recipe_plain_webdataset(tmp_path, monkeypatch, sample_layout):
    path = make_store(tmp_path, "wds", sample_layout=sample_layout, block_rows=1 if sample_layout == "sample" else 8)
    monkeypatch.chdir(tmp_path)
    rows = all_rows(st.open_targets(path))
    (code,) = card_blocks(path)
    seen = []  # run the loop body once per sample, recording what it read
    code = code.replace("    x = ", "    seen.append(dict(locals()))\n    x = ")
    ns: dict = {"seen": seen}
    exec(code, ns)  # noqa: S102
    assert len(seen) == (150 if sample_layout == "sample" else 150 // 8 + 1)
    for s in seen:
        idx = np.atleast_1d(s["index"])
        assert np.array_equal(np.atleast_1d(s["logits"].reshape(len(idx), K, C)), rows["logits"][idx].numpy())
        got_keys = s["keys"].tolist() if "keys" in s else [s["key"]]
        got_labels = s["labels"].tolist() if "labels" in s else [s["label"]]
        assert got_keys == [rows["key"][i] for i in idx] and got_labels == rows["label"][idx].tolist()
