"""Tests of softtargets.precompute.transfer: item forms, keys, fingerprints, collation, WebDataset shards."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from softtargets.precompute.transfer import (
    Batch,
    TransferSet,
    WebDatasetSource,
    as_transfer_set,
    check_unique_keys,
)


class ListDataset(Dataset):
    """Returns the stored items as they are."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class KeyedDataset(ListDataset):
    """Has a ``keys`` attribute."""

    def __init__(self, items: list, keys: list[str]) -> None:
        super().__init__(items)
        self.keys = keys


class KeyMethodDataset(ListDataset):
    """Has a ``key(i)`` method."""

    def key(self, i: int) -> str:
        return f"img-{i:03d}"


def _xs(n: int, dim: int = 3) -> list[torch.Tensor]:
    return [torch.full((dim,), float(i)) for i in range(n)]


def _batch(ts: TransferSet, batch_size: int = 100, **kwargs) -> Batch:
    return next(iter(DataLoader(ts, batch_size=batch_size, collate_fn=ts.collate, **kwargs)))


# ---------------------------------------------------------------------------- item forms


def test_bare_tensors_use_index_keys_and_no_labels():
    ts = TransferSet(ListDataset(_xs(4)))
    assert len(ts) == 4 and ts.key_source == "index"
    assert [ts.key(i) for i in range(4)] == ["0", "1", "2", "3"] == ts.all_keys()
    indices, keys, x, labels = _batch(ts)
    assert indices.dtype == torch.int64 and indices.tolist() == [0, 1, 2, 3]
    assert keys == ["0", "1", "2", "3"]
    assert x.shape == (4, 3) and torch.equal(x[2], torch.full((3,), 2.0))
    assert labels.dtype == torch.int64 and labels.tolist() == [-1, -1, -1, -1]
    assert ts.name == "ListDataset"
    assert ts.fingerprint == hashlib.sha256(b"index:4").hexdigest()


def test_tuples_with_and_without_labels():
    xs = _xs(5)
    items = [(xs[0], 3), (xs[1], torch.tensor(1)), (xs[2], np.int64(2), "extra", 9), (xs[3],), (xs[4], None)]
    _, keys, x, labels = _batch(TransferSet(ListDataset(items)))
    assert labels.tolist() == [3, 1, 2, -1, -1]
    assert torch.equal(x, torch.stack(xs))
    assert keys == ["0", "1", "2", "3", "4"]


def test_numpy_inputs_and_lists():
    items = [[np.arange(4, dtype=np.float32) + i, i] for i in range(3)]
    _, _, x, labels = _batch(TransferSet(ListDataset(items)))
    assert x.dtype == torch.float32 and x.shape == (3, 4)
    assert labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("x_field", "y_field", "key_field"),
    [("x", "y", "key"), ("image", "label", "__key__"), ("input", "target", None)],
)
def test_dict_items(x_field, y_field, key_field):
    items = []
    for i, x in enumerate(_xs(3)):
        item = {x_field: x, y_field: i + 5, "other": "ignored"}
        if key_field:
            item[key_field] = f"sample/{i}"
        items.append(item)
    ts = TransferSet(ListDataset(items))
    expected = [f"sample/{i}" for i in range(3)] if key_field else ["0", "1", "2"]
    assert ts.key_source == ("item" if key_field else "index")
    assert [ts.key(i) for i in range(3)] == expected == ts.all_keys()
    _, keys, x, labels = _batch(ts)
    assert keys == expected
    assert labels.tolist() == [5, 6, 7]
    assert torch.equal(x, torch.stack(_xs(3)))


def test_dict_without_label_is_unlabeled():
    ts = TransferSet(ListDataset([{"image": x, "key": f"k{i}"} for i, x in enumerate(_xs(2))]))
    assert _batch(ts).labels.tolist() == [-1, -1]


def test_dataset_keys_attribute_method_and_override():
    items = [(x, 0) for x in _xs(3)]
    assert TransferSet(KeyedDataset(items, ["a", "b", "c"])).all_keys() == ["a", "b", "c"]
    by_method = TransferSet(KeyMethodDataset(items))
    assert by_method.key_source == "method" and by_method.key(2) == "img-002"
    assert _batch(by_method).keys == ["img-000", "img-001", "img-002"]
    assert TransferSet(ListDataset(items), keys=["x", "y", "z"]).all_keys() == ["x", "y", "z"]
    assert TransferSet(ListDataset(items), keys=lambda i: i * 10).key(1) == "10"


def test_item_key_must_agree_with_dataset_keys():
    ts = TransferSet(KeyedDataset([{"x": torch.zeros(2), "key": "q"}], ["p"]))
    with pytest.raises(ValueError, match="'q'.*'p'"):
        ts[0]


def test_keys_attribute_of_wrong_length():
    with pytest.raises(ValueError, match="keys="):
        TransferSet(KeyedDataset(_xs(3), ["a"]))


@pytest.mark.parametrize(("label", "error"), [(1.5, TypeError), (True, TypeError), ("3", TypeError),
                                              (torch.tensor([1, 2]), TypeError), (-5, ValueError)])
def test_bad_labels(label, error):
    ts = TransferSet(ListDataset([(torch.zeros(2), label)]))
    with pytest.raises(error):
        ts[0]


def test_bad_inputs_and_datasets():
    with pytest.raises(TypeError, match="transform"):
        TransferSet(ListDataset([("not a tensor", 1)]))[0]
    with pytest.raises(ValueError, match="input fields"):
        TransferSet(ListDataset([{"pixels": torch.zeros(2)}]))[0]

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2)

    with pytest.raises(TypeError, match="map-style"):
        TransferSet(Stream())
    with pytest.raises(IndexError):
        TransferSet(ListDataset(_xs(2))).key(2)


def test_collate_refuses_ragged_inputs():
    ts = TransferSet(ListDataset([torch.zeros(2), torch.zeros(3)]))
    with pytest.raises(ValueError, match=r"'0' \(2,\) vs '1' \(3,\)"):
        _batch(ts)


# ---------------------------------------------------------------------------- keys and fingerprint


def test_check_unique_keys():
    check_unique_keys(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"'b' at indices \[1, 3\]; 'a' at indices \[0, 4\]"):
        check_unique_keys(["a", "b", "c", "b", "a"])


def test_fingerprint_follows_keys():
    items = [(x, 0) for x in _xs(3)]
    base = TransferSet(KeyedDataset(items, ["a", "b", "c"]))
    same = TransferSet(KeyedDataset(list(reversed(items)), ["a", "b", "c"]))
    assert base.fingerprint == same.fingerprint  # keys only, items not read
    assert TransferSet(KeyedDataset(items, ["a", "b", "d"])).fingerprint != base.fingerprint
    assert TransferSet(KeyedDataset(items, ["b", "a", "c"])).fingerprint != base.fingerprint
    assert TransferSet(KeyedDataset(items[:2], ["a", "b"])).fingerprint != base.fingerprint
    assert TransferSet(KeyedDataset(items, ["ab", "", "c"])).fingerprint != base.fingerprint
    assert TransferSet(ListDataset(items)).fingerprint != TransferSet(ListDataset(items[:2])).fingerprint
    given = TransferSet(ListDataset(items), name="digits", fingerprint="v1")
    assert given.info() == {"name": "digits", "fingerprint": "v1"}


# ---------------------------------------------------------------------------- WebDataset


def _write_shard(path, samples, compress=False) -> None:
    with wds.TarWriter(str(path), compress=compress, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)


def _npy_samples(start: int, stop: int, labeled=lambda i: True) -> list[dict]:
    out = []
    for i in range(start, stop):
        sample = {"__key__": f"s{i:04d}", "input.npy": np.full((2, 3), i, dtype=np.float32)}
        if labeled(i):
            sample["cls"] = i % 7
        out.append(sample)
    return out


@pytest.fixture
def shards(tmp_path):
    _write_shard(tmp_path / "part-000.tar", _npy_samples(0, 6, labeled=lambda i: i != 2))
    _write_shard(tmp_path / "part-001.tar", _npy_samples(6, 10))
    return tmp_path


def test_webdataset_shards_by_brace_url(shards):
    source = WebDatasetSource(str(shards / "part-{000..001}.tar"))
    ts = TransferSet(source)
    assert len(ts) == 10 and ts.key_source == "list"
    expected_keys = [f"s{i:04d}" for i in range(10)]
    assert ts.all_keys() == expected_keys
    check_unique_keys(ts.all_keys())
    indices, keys, x, labels = _batch(ts)
    assert keys == expected_keys
    assert x.shape == (10, 2, 3) and x.dtype == torch.float32
    assert torch.equal(x[:, 0, 0], torch.arange(10, dtype=torch.float32))
    assert labels.tolist() == [0, 1, -1, 3, 4, 5, 6, 0, 1, 2]
    assert ts.fingerprint == TransferSet(WebDatasetSource(
        [str(shards / "part-000.tar"), str(shards / "part-001.tar")])).fingerprint


def test_webdataset_in_dataloader_workers(shards):
    ts = as_transfer_set(str(shards / "part-{000..001}.tar"), name="toy")
    assert ts.name == "toy"
    loader = DataLoader(ts, batch_size=3, collate_fn=ts.collate, num_workers=2, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    seen = {}
    for indices, keys, x, _ in loader:
        for i, key, row in zip(indices.tolist(), keys, x, strict=True):
            seen[i] = key
            assert row[0, 0].item() == float(key[1:])
    assert seen == {i: f"s{i:04d}" for i in range(10)}


def test_webdataset_compressed_shard_and_png(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8) for _ in range(3)]
    samples = [{"__key__": f"img/{i}", "png": img, "cls": i} for i, img in enumerate(images)]
    _write_shard(tmp_path / "imgs.tar.gz", samples, compress=True)
    ts = TransferSet(WebDatasetSource(str(tmp_path / "imgs.tar.gz")))
    _, keys, x, labels = _batch(ts)
    assert keys == ["img/0", "img/1", "img/2"]
    assert x.shape == (3, 3, 4, 5) and x.dtype == torch.float32
    assert torch.allclose(x[1], torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255)
    assert labels.tolist() == [0, 1, 2]


def test_webdataset_explicit_extensions_and_transform(tmp_path):
    samples = [{"__key__": f"k{i}", "x.npy": np.ones(2) * i, "aux.npy": np.zeros(5), "label": str(i)}
               for i in range(2)]
    _write_shard(tmp_path / "a.tar", samples)
    source = WebDatasetSource(str(tmp_path / "a.tar"), x_ext="aux.npy", transform=lambda t: t + 1)
    assert source[1]["x"].tolist() == [1.0] * 5
    assert source[1]["y"] == 1  # "label" found among the default label extensions
    with pytest.raises(ValueError, match="no input member"):
        WebDatasetSource(str(tmp_path / "a.tar"), x_ext="png")[0]


def test_webdataset_duplicate_keys_across_shards(tmp_path):
    _write_shard(tmp_path / "a.tar", _npy_samples(0, 3))
    _write_shard(tmp_path / "b.tar", _npy_samples(2, 4))
    ts = TransferSet(WebDatasetSource([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]))
    with pytest.raises(ValueError, match=r"'s0002' at indices \[2, 3\]"):
        check_unique_keys(ts.all_keys())


def test_webdataset_member_offsets_match_tarfile(shards):
    """The offset index reads exactly the bytes tarfile extracts."""
    source = WebDatasetSource(str(shards / "part-000.tar"))
    with tarfile.open(shards / "part-000.tar") as tar:
        raw = tar.extractfile("s0003.input.npy").read()
    assert torch.equal(source[3]["x"], torch.from_numpy(np.load(io.BytesIO(raw))))


# ---------------------------------------------------------------------------- batched fetching


class BatchReadDataset(ListDataset):
    """Has torch's batched-read hook ``__getitems__``; counts its calls."""

    calls = 0

    def __getitems__(self, indices: list[int]) -> list:
        self.calls += 1
        return [self.items[i] for i in indices]


def _same_batch(a: Batch, b: Batch) -> None:
    assert torch.equal(a.indices, b.indices) and a.keys == b.keys
    assert a.x.dtype == b.x.dtype and torch.equal(a.x, b.x)
    assert a.labels.dtype == b.labels.dtype and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("labels", [None, "int", "column", "uint8"])
@pytest.mark.parametrize("keys", [None, "list"])
def test_batch_of_a_tensor_dataset_equals_collated_items(labels, keys) -> None:
    x = torch.randn(10, 3, 2)
    y = {"int": torch.tensor([3, -1, 0, 9, 2, 2, 1, 0, 5, 7]), "column": torch.arange(10)[:, None],
         "uint8": torch.arange(10, dtype=torch.uint8)}.get(labels)
    ds = torch.utils.data.TensorDataset(x) if y is None else torch.utils.data.TensorDataset(x, y)
    ts = TransferSet(ds, keys=[f"s{i}" for i in range(10)] if keys else None)
    idx = [7, 2, 2 + 1, 9]
    got = ts.batch(idx)
    _same_batch(got, ts.collate([ts[i] for i in idx]))
    assert got.keys == ([f"s{i}" for i in idx] if keys else [str(i) for i in idx])


@pytest.mark.parametrize("keys", [None, "list", "method"])
@pytest.mark.parametrize("rows", [range(2, 7), range(8, 1, -3), range(0, 10)])
def test_batch_of_a_range_equals_batch_of_its_list(keys, rows) -> None:
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
    key_arg = {"list": [f"s{i}" for i in range(10)], "method": lambda i: f"m{i}"}.get(keys)
    ts = TransferSet(ds, keys=key_arg)
    _same_batch(ts.batch(rows), ts.batch(list(rows)))
    assert ts.all_keys() == [ts.key(i) for i in range(10)]
    for bad in (range(8, 11), range(-1, 2)):
        with pytest.raises(IndexError, match="out of range"):
            ts.batch(bad)


def test_batch_refuses_what_items_refuse() -> None:
    ts = TransferSet(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([0.5, 1.0, 2.0])))
    with pytest.raises(TypeError, match="label must be an integer"):
        ts.batch([0, 1])
    ts = TransferSet(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([0, -2, 1])))
    with pytest.raises(ValueError, match="label must be >= 0"):
        ts.batch([0, 1])
    with pytest.raises(IndexError, match="out of range"):
        ts.batch([0, 3])
    with pytest.raises(ValueError, match="empty batch"):
        ts.batch([])


def test_batch_uses_getitems_once() -> None:
    items = [{"x": x, "y": i % 3, "key": f"k{i}"} for i, x in enumerate(_xs(6))]
    ds = BatchReadDataset(items)
    ts = TransferSet(ds)
    got = ts.batch([5, 0, 3])
    assert ds.calls == 1
    _same_batch(got, ts.collate([ts[i] for i in (5, 0, 3)]))
    assert got.keys == ["k5", "k0", "k3"]
