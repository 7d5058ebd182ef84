"""Stage one writes compact contents (topk, sampled, hidden) computed per batch on the device; the store reads,
verifies and streams them like any store, plain zarr/numpy read them, and readers refuse what they cannot give."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import TensorDataset

from softtargets import create_targets, open_targets, precompute, stream, verify_store
from softtargets.errors import ChecksumError
from softtargets.math.compact import CompactSpec, numpy_record_dtype
from softtargets.math.compact_losses import hidden_kd_loss, sampled_kd_loss, topk_kd_loss
from softtargets.precompute.contents import encode_rows
from softtargets.store.compact_rows import compact_spec_of

C, N, D = 300, 40, 12


def teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("body", nn.Linear(6, D))
    m.add_module("act", nn.Tanh())
    m.add_module("fc", nn.Linear(D, C))
    with torch.no_grad():
        m.fc.weight.mul_(8)
    return m.eval()


@pytest.fixture(scope="module")
def setup() -> tuple[list[nn.Module], torch.Tensor, TensorDataset, torch.Tensor]:
    teachers = [teacher(1), teacher(2)]
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = torch.stack([t(x) for t in teachers], 1)  # [N, K, C]
    return teachers, x, TensorDataset(x, torch.zeros(N, dtype=torch.long)), logits


def run(tmp_path, setup, spec, content="geometric", layout="zarr"):
    teachers, _, ds, _ = setup
    url = tmp_path / f"{spec.kind}-{content}.{'zarr' if layout == 'zarr' else 'wds'}"
    precompute(teachers, ds, url, content=content, compact=spec, num_workers=0, progress=False, shard_rows=16,
               batch_size=10, layout=layout)
    return url, open_targets(url, verify="full")


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_topk_store_round_trip_measured_error_and_exact_loss(tmp_path, setup, layout):
    _, _, _, logits = setup
    spec = CompactSpec("topk", k=16, temperatures=(0.5, 1.0, 2.0, 4.0, 8.0))
    url, store = run(tmp_path, setup, spec, layout=layout)
    m = store.manifest
    assert m.format_version == 3 and m.compact["kind"] == "topk" and m.logits_shape == (N, m.compact["row_bytes"])
    assert m.compact["row_bytes"] == 16 * 2 + 16 * 2 + 5 * 4 * 2 and m.compact["temperature_range"] == [0.5, 8.0]
    assert 0 < m.compact["tail_error"] < 1e-2
    assert verify_store(url).ok
    fields = store.compact_fields(range(N))
    mean = logits.mean(1)
    assert torch.equal(fields["ids"], mean.topk(16, -1).indices)  # the geometric mean's top ids
    cs = compact_spec_of(m)
    for t in (0.5, 2.0, 8.0):
        assert abs(float(topk_kd_loss(mean, fields, cs, t))) < 1e-4
        assert float(topk_kd_loss(logits[:, 0], fields, cs, t)) > 1e-2
    with pytest.raises(ValueError, match="outside the temperature range"):
        topk_kd_loss(mean, fields, cs, 20.0)
    with pytest.raises(ValueError, match="topk store holds no full distribution"):
        store.log_probs([0], 1.0)
    batch = list(stream(store, batch_size=8, shuffle=True, seed=1))[0]  # stage two moves the records
    assert batch["teacher_logits"].dtype == torch.uint8
    assert torch.equal(batch["teacher_logits"], store.take(batch["index"])["logits"])


def test_plain_zarr_reads_the_records(tmp_path, setup):
    url, store = run(tmp_path, setup, CompactSpec("topk", k=8, temperatures=(1.0, 2.0)))
    manifest = json.loads((url / "manifest.json").read_text())
    raw = zarr.open_group(str(url), mode="r")["logits"][:]  # uint8 [N, row_bytes]
    rows = raw.view(numpy_record_dtype(manifest["compact"]["fields"]))[:, 0]
    assert np.array_equal(rows["ids"], store.compact_fields(range(N))["ids"].numpy())
    assert rows["values"].dtype == np.float16 and (rows["values"][:, 0] == 0).all()


def test_sampled_store_draws_are_reproducible_and_estimate_the_loss(tmp_path, setup):
    _, _, _, logits = setup
    spec = CompactSpec("sampled", k=32, proposal_temperature=1.0, temperatures=(1.0, 2.0), seed=3)
    url, store = run(tmp_path, setup, spec)
    again = tmp_path / "again"
    url2, store2 = run(again if again.mkdir() is None else again, setup, spec)
    f = store.compact_fields(range(N))
    assert torch.equal(f["ids"], store2.compact_fields(range(N))["ids"])  # seeded per batch's first row
    assert (f["counts"].sum(-1) == 32).all()
    cs = compact_spec_of(store.manifest)
    mean = logits.mean(1)
    assert abs(float(sampled_kd_loss(mean, f, cs, 2.0))) < 1e-3  # the teacher itself: every term ~0
    with pytest.raises(ValueError, match="only the forward KL"):
        sampled_kd_loss(mean, f, cs, 1.0, divergence="jsd")


@pytest.mark.parametrize("content, quant", [("geometric", "float16"), ("per_teacher", "int8")])
def test_hidden_store_holds_the_head_once_and_is_exact(tmp_path, setup, content, quant):
    _, _, _, logits = setup
    url, store = run(tmp_path, setup, CompactSpec("hidden", head="fc", quantization=quant), content=content)
    m = store.manifest
    width = 2 * D if content == "geometric" else D
    assert m.compact["row_bytes"] == (width * 2 if quant == "float16" else 2 * (D + 4))
    assert m.compact["logit_error"] < (0.01 if quant == "float16" else 0.2)
    weight, bias = store.head()
    assert weight.shape == ((C, 2 * D) if content == "geometric" else (2, C, D))
    target = store.log_probs(range(N), 2.0)
    want = torch.log_softmax(logits.double().mean(1) / 2.0, -1)
    assert (target - want).abs().max() < (1e-3 if quant == "float16" else 3e-2)
    loss = hidden_kd_loss(logits.mean(1) if content == "geometric" else logits[:, 0], store.compact_fields(range(N)),
                          weight, bias, 4.0)
    assert (float(loss) < 1e-3) if content == "geometric" else (float(loss) > 1e-3)
    head = url / "head" / "weight.npy"
    blob = bytearray(head.read_bytes())
    blob[-1] ^= 1
    head.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match="weight.npy: sha256 does not match"):
        open_targets(url).head()


def test_writer_refuses_dense_rows_and_arithmetic(tmp_path, setup):
    spec = CompactSpec("topk", k=4, temperatures=(1.0,))
    w = create_targets(tmp_path / "a.zarr", num_classes=C, content="geometric", compact=spec, num_samples=2)
    with pytest.raises(ValueError, match=r"takes packed records uint8 \[B, 24\].*encode_rows"):
        w.write(["a", "b"], torch.zeros(2, C))
    records, stats = encode_rows(setup[3][:2], w.spec)
    w.write(["a", "b"], records)
    w.close()
    with pytest.raises(ValueError, match="not arithmetic"):
        create_targets(tmp_path / "b.zarr", num_classes=C, content="arithmetic", temperature=1.0, compact=spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compact_rows_computed_on_cuda_match_the_cpu(tmp_path, setup):
    """Stage one on a GPU: top-k, tail and hidden states are computed there, only records reach the host."""
    teachers, _, ds, _ = setup
    for spec in (CompactSpec("topk", k=16, temperatures=(0.5, 1.0, 4.0)), CompactSpec("hidden", head="fc"),
                 CompactSpec("sampled", k=16, temperatures=(1.0, 2.0))):
        got = {}
        for device in ("cpu", "cuda"):
            url = tmp_path / f"{spec.kind}-{device}.zarr"
            precompute(teachers, ds, url, content="geometric", compact=spec, num_workers=0, progress=False,
                       shard_rows=16, batch_size=10, device=device)
            got[device] = open_targets(url, verify="full").compact_fields(range(N))
        cpu, gpu = got["cpu"], got["cuda"]
        if spec.kind == "topk":
            assert torch.equal(cpu["ids"], gpu["ids"])
            assert torch.allclose(cpu["values"].float(), gpu["values"].float(), atol=2e-2)
            assert torch.allclose(cpu["tail_logz"], gpu["tail_logz"], atol=1e-3)
        elif spec.kind == "hidden":
            assert torch.allclose(cpu["hidden"].float(), gpu["hidden"].float(), atol=2e-3)
        else:
            assert (gpu["counts"].sum(-1) == 16).all()


def test_plain_webdataset_reads_the_records_and_the_loss_refuses_other_rows(tmp_path, setup):
    import io
    import tarfile

    from softtargets import compact_kd_loss

    _, _, _, logits = setup
    url, store = run(tmp_path, setup, CompactSpec("topk", k=8, temperatures=(1.0, 2.0)), layout="wds")
    fields = json.loads((url / "manifest.json").read_text())["compact"]["fields"]
    with tarfile.open(url / "shard-000000.tar") as tar:  # plain tar + numpy: no softtargets
        member = next(m for m in tar.getmembers() if m.name.endswith(".logits.npy"))
        block = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
    rows = block.view(numpy_record_dtype(fields))[:, 0]
    assert block.dtype == np.uint8 and np.array_equal(rows["ids"], store.compact_fields(range(len(rows)))["ids"])
    f = store.compact_fields(range(N))
    cs = compact_spec_of(store.manifest)
    by_kind = compact_kd_loss(logits[:, 1], f, store.manifest.compact, 2.0)
    assert torch.equal(by_kind, topk_kd_loss(logits[:, 1], f, cs, 2.0))
    hidden_spec = CompactSpec("hidden", head="fc")
    with pytest.raises(ValueError, match="not a hidden store's fields"):
        compact_kd_loss(logits[:, 1], f, hidden_spec, 2.0)
    _, hstore = run(tmp_path, setup, hidden_spec)
    with pytest.raises(ValueError, match="needs its output head: pass head=store.head()"):
        compact_kd_loss(logits[:, 1], hstore.compact_fields(range(N)), hstore.manifest.compact, 2.0)
