"""Objects with tensors pickled for dask: tensor bytes out of band, objects around them as they were."""

from __future__ import annotations

import pickle

import torch
from torch import nn
from torch.utils.data import TensorDataset

from softtargets.precompute import PrecomputeJob, RunOptions
from softtargets.precompute.shipped import Shipped


def _round_trip(obj):
    """Pickled as dask pickles task arguments: protocol 5, buffers handed over beside the stream."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=buffers), len(data), sum(memoryview(b).nbytes for b in buffers)


def test_tensors_travel_out_of_band_and_come_back_equal():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied: one parameter used twice
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    obj = {"model": model, "data": TensorDataset(x[10:20], torch.arange(10)), "bf16": x[:3].bfloat16(),
           "scalar": torch.tensor(3.0), "empty": torch.empty(0, 5), "transposed": x.t()[:2]}
    back, stream, out_of_band = _round_trip(Shipped(obj))
    assert out_of_band >= 4 * (10 * 8 + 10 * 4 + 10) and stream < 4096  # bytes beside the stream, not in it
    assert back["model"][1].weight is back["model"][0].weight
    assert torch.equal(back["model"][1].bias, model[1].bias)
    assert torch.equal(back["data"].tensors[0], x[10:20]) and back["data"].tensors[0].untyped_storage().nbytes() == 320
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], obj["bf16"])
    assert torch.equal(back["scalar"], obj["scalar"]) and back["empty"].shape == (0, 5)
    assert torch.equal(back["transposed"], x.t()[:2])
    back["data"].tensors[0][0, 0] = 7.0  # writable, and a copy
    assert x[10, 0] != 7.0


def test_a_precompute_job_ships_its_transfer_set_out_of_band():
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1))
    job = PrecomputeJob(url="t.zarr", teachers=[{"name": "t", "module": nn.Linear(16, 3)}], fingerprints=["f"],
                        dataset=TensorDataset(x), num_samples=4096, dataset_fingerprint="d", options=RunOptions())
    back, stream, out_of_band = _round_trip(job)
    assert isinstance(back, PrecomputeJob) and back.token == job.token and back.options == job.options
    assert torch.equal(back.dataset.tensors[0], x) and out_of_band >= x.nbytes and stream < 8192
    assert torch.equal(back.teachers[0]["module"].weight, job.teachers[0]["module"].weight)
