"""``softtargets specialists plan``: confusable class subsets from a store's generalist, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import softtargets as st


def _confusable_store(path: Path) -> Path:
    """A store over 9 classes whose generalist confuses classes within {0,1,2}, {3,4,5}, {6,7,8}."""
    rng = np.random.default_rng(0)
    n = 300
    z = np.full((n, 9), -5.0)
    group = rng.integers(3, size=n)
    for i, g in enumerate(group):
        z[i, 3 * g:3 * g + 3] = rng.normal(size=3)
    w = st.create_targets(path, num_classes=9, content="geometric", teachers=[{"name": "g"}], shard_rows=64,
                          block_rows=16, class_names=[f"c{i}" for i in range(9)])
    w.write([str(i) for i in range(n)], torch.tensor(z, dtype=torch.float32))
    w.close()
    return path


@pytest.mark.parametrize("method", ["kmeans", "spectral"])
def test_plan_finds_the_confusable_groups(tmp_path: Path, cli, method: str) -> None:
    store = _confusable_store(tmp_path / "g.zarr")
    rc, out, err = cli("specialists", "plan", store, "--specialists", "3", "--size", "3", "--method", method,
                       "-o", tmp_path / "plan.json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan == json.loads((tmp_path / "plan.json").read_text())
    assert sorted(s["classes"] for s in plan["subsets"]) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert plan["subsets"][0]["names"] == [f"c{i}" for i in plan["subsets"][0]["classes"]]
    assert all(s["confusability"] > 0.2 for s in plan["subsets"])
    assert sum(s["share"] for s in plan["subsets"]) == pytest.approx(1.0)
    assert plan["rows"] == 300


def test_plan_refuses_sizes_out_of_range(tmp_path: Path, cli) -> None:
    store = _confusable_store(tmp_path / "g.zarr")
    rc, _, err = cli("specialists", "plan", store, "--specialists", "3", "--size", "9")
    assert rc == 2 and "--size must lie in [1, 8]" in err


def test_a_toml_config_declares_a_specialist_and_hints(tmp_path: Path, cli) -> None:
    from tests.cli.test_precompute_config import C, D, write_config
    from tests.teacher_zoo import mlp

    torch.manual_seed(5)
    torch.save(mlp(D, 3).eval().state_dict(), tmp_path / "s.pt")
    config, _, _ = write_config(tmp_path, extra_output='hints = { mid = "t0:1" }\nspecialist_top = 2\n')
    config.write_text(config.read_text() + '[[teachers]]\nname = "s"\nfactory = "tests.teacher_zoo:mlp"\n'
                      f'kwargs = {{ in_features = {D}, num_classes = 3 }}\nweights = "s.pt"\n'
                      'classes = [0, 2]\noversample = 2.0\n')
    rc, out, err = cli("precompute", config)
    assert rc == 0, err
    m = st.open_targets(tmp_path / "out.zarr").manifest
    assert m.num_teachers == 2 and m.num_classes == C
    (spec,) = m.specialists["teachers"]
    assert spec["name"] == "s" and spec["classes"] == [0, 2] and spec["oversample"] == 2.0 and m.specialists["top"] == 2
    assert m.hints["mid"]["shape"] == [m.num_samples, 16]
