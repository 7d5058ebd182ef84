"""The README's compact-contents example runs as written, and its plain-numpy read gives the stored fields."""

from __future__ import annotations

import runpy

import numpy as np

import softtargets as st
from tests.test_readme import README, marked_block


def test_the_compact_example_runs_and_numpy_reads_the_records(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "compact.py"
    script.write_text(marked_block(README, "compact"))
    ns = runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out.split("\n")[0] == "176 torch.Size([64, 32])"  # 32*2 + 32*2 + 6*4*2 bytes
    store = st.open_targets(tmp_path / "topk.zarr")
    fields = store.compact_fields(range(64))
    np.testing.assert_array_equal(ns["ids"], fields["ids"].numpy())
    np.testing.assert_array_equal(ns["values"], fields["values"].numpy())
    assert ns["ids"].dtype == np.uint16 and float(ns["loss"]) > 0
    want = ns["logits"].mean(1).topk(32, -1).indices  # the geometric mean's largest logits
    np.testing.assert_array_equal(ns["ids"], want.numpy())
