"""The digits pipeline (``python -m pipelines.digits --quick``) end to end: real teachers, real stores
(zarr and wds), real streaming; then its results files, and the stores against the saved teachers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import softtargets as st

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from pipelines.digits.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config(quick=True)


@pytest.fixture(scope="module", params=["zarr", "wds"])
def run(request, tmp_path_factory) -> tuple[Path, dict]:
    """One quick run per layout, as a user runs it: ``python -m pipelines.digits --quick`` in a new process."""
    out = tmp_path_factory.mktemp(f"digits-{request.param}")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.digits", "--quick", "--no-progress", "--layout", request.param,
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in range(1, 6):
        assert f"== [{stage}/5]" in proc.stdout
    return out, json.loads((out / "results.json").read_text())


def _digit_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def _finite_counts(values: list, limit: int) -> bool:
    return all(isinstance(v, int) and 0 <= v <= limit for v in values)


def test_results_json_structure(run):
    out, r = run
    assert {"config", "split", "teachers", "stores", "students", "mythical", "timings", "environment"} <= set(r)
    assert r["config"] == CFG
    split = r["split"]
    idx = split["indices"]
    assert split["seed"] == CFG["split"]["seed"] and split["sizes"] == {"train": 1078, "val": 359, "test": 360}
    every = np.concatenate([idx["train"], idx["val"], idx["test"]])
    assert sorted(every.tolist()) == list(range(1797))  # a partition of load_digits
    assert all(idx[p] == sorted(idx[p]) for p in idx)
    n_val, n_test = 359, 360

    k = len(CFG["ensemble"]["seeds"])
    t = r["teachers"]
    assert len(t["val"]) == len(t["test"]) == k and _finite_counts(t["val"] + t["test"], n_test)
    assert set(t["ensemble"]) == {"arithmetic", "geometric"}

    s, d = r["students"], CFG["distill"]
    seeds = CFG["student"]["seeds"]
    assert len(s["hard"]["val"]) == len(s["hard"]["test"]) == len(seeds)
    grid = s["distilled"]
    assert len(grid) == len(d["rules"]) * len(d["alphas"]) * len(d["temperatures"])
    assert {(e["rule"], e["alpha"], e["T"]) for e in grid} == {
        (ru, a, tt) for ru in d["rules"] for a in d["alphas"] for tt in d["temperatures"]}
    for e in grid:
        assert len(e["val"]) == len(e["test"]) == len(seeds)
        assert _finite_counts(e["val"], n_val) and _finite_counts(e["test"], n_test)
        assert e["val_mean"] == pytest.approx(np.mean(e["val"]))
        assert e["test_mean_std"]["mean"] == pytest.approx(np.mean(e["test"]))
    # the headline is the validation argmin (never chosen on test)
    best = min(e["val_mean"] for e in grid)
    chosen = next(e for e in grid if (e["rule"], e["alpha"], e["T"]) == tuple(s["selected"].values()))
    assert chosen["val_mean"] == best
    hard, dist = np.mean(s["hard"]["test"]), chosen["test_mean_std"]["mean"]
    ens = t["ensemble"][s["selected"]["rule"]]["test"]
    gap = s["gap_closed"]["fraction"]
    assert (gap is None and hard == ens) or gap == pytest.approx((hard - dist) / (hard - ens))

    m = r["mythical"]
    assert m["digit"] == 3 and m["digit_test_rows"] == 37 and len(m["per_seed"]) == len(seeds)
    for row in m["per_seed"]:
        assert 0 <= row["digit_test_accuracy_before"] <= 1 and 0 <= row["digit_test_accuracy_after"] <= 1
        assert row["digit_test_accuracy_after"] >= row["digit_test_accuracy_before"]  # a shift >= 0 only adds 3s
        assert math.isfinite(row["bias_shift"]) and _finite_counts([row["test_errors_after"]], n_test)

    stores = r["stores"]
    assert set(stores) == {"train", "train-without-3"}
    n3 = int((_digit_labels()[idx["train"]] == 3).sum())
    for name, rows in (("train", 1078), ("train-without-3", 1078 - n3)):
        summary = stores[name]
        assert Path(summary["url"]).exists() and summary["layout"] == r["layout"]
        assert summary["logits_shape"] == [rows, k, 10] and summary["labeled"] == rows
        assert summary["num_shards"] == -(-rows // CFG["store"]["shard_rows"])
        assert 0 < summary["max_abs_diff_vs_teachers"] < 0.01  # float16 rounding of the teachers' logits
        assert Path(summary["precompute_config"]).is_file()

    timings = r["timings"]
    assert all(math.isfinite(v) and v > 0 for v in [timings["total_seconds"], *timings["teachers"],
                                                     *timings["students_distilled"]])


def test_table_and_plot(run):
    out, r = run
    table = (out / "results.md").read_text()
    rows = ["single teacher, mean", "teacher ensemble, arithmetic mean", "teacher ensemble, geometric mean",
            "student, hard labels", "before the bias shift", "after a shift of"]
    alpha = CFG["distill"]["alphas"][0]
    rows += [f"student distilled, {rule}, α = {alpha:g}, T = {t:g}"
             for rule in CFG["distill"]["rules"] for t in CFG["distill"]["temperatures"]]
    for row in rows:
        assert f"| {row}" in table, row
    assert "**(val-chosen)**" in table and "| 146 |" in table
    png = (out / "test_error_vs_T.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_stores_hold_the_teachers_logits(run):
    """Open each store; run the saved teachers directly on the images its keys name; compare to float16 rounding."""
    from sklearn.datasets import load_digits

    from pipelines.digits.models import make_teacher

    out, r = run
    data = load_digits()
    x_all = torch.from_numpy((data.data / 16.0).astype(np.float32))
    t = CFG["teacher"]
    teachers = []
    for seed in CFG["ensemble"]["seeds"]:
        net = make_teacher(t["hidden"], t["dropout_in"], t["dropout_hidden"])
        net.load_state_dict(torch.load(out / "teachers" / f"teacher-{seed}.pt", weights_only=True))
        teachers.append(net.eval())
    train_rows = r["split"]["indices"]["train"]
    expected_rows = {"train": train_rows, "train-without-3": [i for i in train_rows if data.target[i] != 3]}
    for name, rows in expected_rows.items():
        store = st.open_targets(r["stores"][name]["url"], verify="full")
        assert store.manifest.layout == r["layout"] and store.manifest.content == "per_teacher"
        got = store[:]
        assert got["key"] == [f"digits/{i:04d}" for i in rows]
        assert got["label"].tolist() == data.target[rows].tolist()
        assert got["logits"].dtype == torch.float16 and got["logits"].shape == (len(rows), len(teachers), 10)
        with torch.no_grad():
            v = torch.stack([net(x_all[rows]) for net in teachers], dim=1)
        direct = v - v.mean(dim=-1, keepdim=True)
        err = (got["logits"].float() - direct).abs()
        assert bool((err <= direct.abs() * 2.0**-11 + 1e-5).all()), float(err.max())


def test_config_refuses_unknown_keys_and_bad_values(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[student]\nhiden = [10]\n")
    with pytest.raises(ValueError, match=r"bad\.toml.*student\.hiden"):
        load_config(bad)
    bad.write_text("[distill]\nrules = ['harmonic']\n")
    with pytest.raises(ValueError, match=r"distill\.rules"):
        load_config(bad)
