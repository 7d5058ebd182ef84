"""softtargets verify checks a views store's parameter files against the manifest."""

from __future__ import annotations

import torch
from torch import nn

import softtargets as st
from softtargets.math.augment import RandomView


def test_verify_names_a_damaged_or_missing_parameter_file(tmp_path):
    torch.manual_seed(0)
    teachers = [nn.Linear(16, 4)]
    data = torch.utils.data.TensorDataset(torch.rand(24, 16), torch.arange(24) % 4)
    url = tmp_path / "v.wds"
    st.precompute(teachers, data, url, views=2, augment=RandomView(flip=0.5, shape=(1, 4, 4)), shard_rows=16,
                  progress=False, num_workers=0)
    assert st.verify_store(url).ok
    path = url / "views" / "params-000001.npy"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    report = st.verify_store(url)
    assert not report.ok and [str(p) for p in report.problems] == [
        f"{url}/views/params-000001.npy: sha256 does not match the manifest (corrupt or altered file)"]
    path.unlink()
    assert [str(p) for p in st.verify_store(url).problems] == [
        f"{url}/views/params-000001.npy: missing (view parameters of shard 1)"]
