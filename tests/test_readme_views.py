"""The README's views section runs as written: precompute with views, stream with replay, and the plain zarr /
webdataset + numpy recipe, whose replayed views give the stored targets again."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

import softtargets as st

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def marked_block(marker: str) -> str:
    found = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", README, flags=re.S)
    assert found, f"README has no block marked {marker!r}"
    return found.group(1)


def test_the_views_recipes_run_and_replay_the_views_the_teachers_saw(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__main__"}
    exec(compile(marked_block("views"), "README views", "exec"), ns)
    assert capsys.readouterr().out.startswith("4096 ['crop_x', 'crop_y', 'crop_w', 'crop_h', 'flip', 'angle']")
    exec(compile(marked_block("views-plain"), "README views-plain", "exec"), ns)
    with torch.no_grad():
        ref = torch.stack([t(ns["x_view"]) for t in ns["teachers"]], dim=1).mean(dim=1)
    ref = ref - ref.mean(-1, keepdim=True)
    assert ns["logits"].shape == (512, 10)
    np.testing.assert_allclose(ns["logits"].astype(np.float32), ref.numpy(), atol=2e-3, rtol=1e-3)
    store = st.open_targets(tmp_path / "views.wds")
    np.testing.assert_array_equal(ns["block_logits"], store.take(ns["index"])["logits"].numpy())
    np.testing.assert_array_equal(ns["block_params"], ns["params"][ns["index"]])  # the same views, either layout
