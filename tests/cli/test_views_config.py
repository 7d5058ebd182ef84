"""The precompute config's [views] table: `softtargets precompute` stores views whose replay gives the targets."""

from __future__ import annotations

import pytest
import torch

from softtargets.cli import main
from softtargets.cli.commands.precompute import load_config
from softtargets.math.augment import RandomView
from softtargets.store import open_targets
from softtargets.store.views import ViewParams
from tests.cli.test_precompute_config import write_config

VIEWS = """[views]
count = 3
augment = "softtargets.math.augment:RandomView"
kwargs = { shape = [1, 2, 3], degrees = 30.0, flip = 0.5 }
seed = 4
"""


def test_a_views_table_precomputes_replayable_views(tmp_path):
    config, models, x = write_config(tmp_path, extra_top=VIEWS)
    kw = load_config(config)
    assert kw["views"] == 3 and kw["seed"] == 4 and isinstance(kw["augment"], RandomView)
    assert main(["precompute", str(config)]) == 0
    store = open_targets(tmp_path / "out.zarr")
    m = store.manifest
    assert m.num_samples == 3 * len(x) and m.views["seed"] == 4 and m.views["augment"].endswith("RandomView")
    rows = torch.arange(m.num_samples)
    x_view = kw["augment"].replay(x[rows % len(x)], ViewParams(store).take(rows))
    with torch.no_grad():
        ref = torch.stack([t(x_view) for t in models], dim=1).mean(dim=1)
    torch.testing.assert_close(store.take(rows)["logits"], ref - ref.mean(-1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_a_views_table_needs_its_augmentation(tmp_path):
    config, _, _ = write_config(tmp_path, extra_top="[views]\ncount = 3\n")
    with pytest.raises(ValueError, match="augment"):
        load_config(config)
