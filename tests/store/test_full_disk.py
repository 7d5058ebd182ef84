"""A disk that fills up while a shard is written: the error names the file (or the store's folder), and
no partial shard file is left behind. A real tmpfs of 256 KiB; needs root (CI runs as root)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from torch import nn

import softtargets as st
from softtargets.cli import main

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("layout", ["wds", "zarr"])
def test_a_full_disk_names_where_the_shard_was_written(small_disk, layout):
    data = torch.utils.data.TensorDataset(torch.randn(4096, 8), torch.randint(0, 10, (4096,)))
    out = small_disk / f"t.{layout}"
    with pytest.raises(OSError, match="No space left on device writing") as err:
        st.precompute([nn.Linear(8, 1000)], data, out, layout=layout, batch_size=256, shard_rows=2048,
                      num_workers=0)
    assert str(out) in str(err.value)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a partial shard file was left"


def test_the_cli_reports_a_full_disk_in_one_line(small_disk, tmp_path, capsys):
    src = tmp_path / "src.zarr"
    with st.create_targets(src, num_classes=1000, num_samples=4096, shard_rows=2048) as w:
        w.write([f"k{i}" for i in range(4096)], torch.randn(4096, 1000))
    assert main(["convert", str(src), str(small_disk / "copy.wds")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device writing" in err[0] and str(small_disk) in err[0]
