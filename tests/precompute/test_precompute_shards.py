"""Stage one's write path below the engine: shard files encoded without zarr, logits encoded in place.

The zarr writer encodes shard files itself for the codec chains it creates (zarr's async write
path costs ~3 ms of Python per array and shard); these tests hold those files to zarr's own bytes,
and read zarr's files back through the same ShardFormat.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
import zarr

from softtargets.store import create_targets
from softtargets.store.encoding import NUMPY_STORAGE, TORCH_DTYPES, encode_logits
from softtargets.store.zarr_layout import ARRAY_CONFIG, COMPRESSORS
from softtargets.store.zarr_shards import ShardFileWriter, ShardFormat, file_chunks_digest


def _zarr_file(tmp_path, arr: zarr.Array, shard: int) -> bytes:
    return (tmp_path / arr.path / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))).read_bytes()


@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc"])
@pytest.mark.parametrize(("trailing", "shard_rows", "block_rows", "n"), [
    ((1, 50), 64, 64, 100),  # one inner chunk per shard; a short last shard
    ((3, 50), 64, 16, 150),  # four per shard; the last shard holds one partial chunk and two absent ones
    ((50,), 40, 8, 40),  # 2-D logits; one full shard
])
def test_shard_files_are_byte_for_byte_zarr(tmp_path, compressor, trailing, shard_rows, block_rows, n):
    group = zarr.open_group(zarr.storage.LocalStore(tmp_path), mode="w")
    rng = np.random.default_rng(0)
    arrays = {}
    for dtype in ("float16", "float32", "uint16"):
        arrays[dtype] = (rng.standard_normal((n, *trailing)) * 5).astype(dtype) if dtype != "uint16" else \
            rng.integers(0, 2**16, (n, *trailing)).astype(dtype)
    arrays["labels"] = rng.integers(-1, 50, n).astype(np.int64)
    arrays["keys"] = np.array([f"k-{i}-é" * (i % 3) for i in range(n)])
    for name, data in arrays.items():
        kwargs = {"compressors": COMPRESSORS[compressor]} if name != "keys" else {}
        arr = group.create_array(
            name, shape=data.shape, dtype=str if name == "keys" else data.dtype, chunks=(block_rows, *data.shape[1:]),
            shards=(shard_rows, *data.shape[1:]), fill_value=-1 if name == "labels" else None, config=ARRAY_CONFIG,
            **kwargs)
        for shard in range(-(-n // shard_rows)):
            rows = slice(shard * shard_rows, min(n, (shard + 1) * shard_rows))
            arr[rows] = data[rows]
            shard_format = ShardFormat.of(arr)
            if compressor == "blosc" and name != "keys":
                assert shard_format is None  # left to zarr
            else:
                written = _zarr_file(tmp_path, arr, shard)
                assert b"".join(shard_format.encode(shard, data[rows], n)) == written, (name, shard)
                # Streamed as rows arrive, 7 at a time (chunks end mid-step): the same bytes and digests.
                sink = io.BytesIO()
                stream = ShardFileWriter(shard_format, shard, n, sink)
                shard_data = data[rows]
                for lo in range(0, len(shard_data), 7):
                    stream.append(shard_data[lo:lo + 7].copy())
                nbytes, sha256, chunks = stream.finish()
                assert sink.getvalue() == written and nbytes == len(written), (name, shard)
                assert sha256 == hashlib.sha256(written).hexdigest()
                assert chunks == (file_chunks_digest(np.frombuffer(written, np.uint8), shard_format.chunks_per_shard)
                                  if shard_format.crc else None)
                # ... and the reader's side of the same format reads zarr's file back.
                back = shard_format.read(np.frombuffer(written, np.uint8), len(data[rows]))
                assert back.tolist() == data[rows].tolist(), (name, shard)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(7, 3, 20), (7, 20)])
def test_encoding_into_a_buffer_gives_the_bits_of_zero_meaning_then_casting(dtype, shape):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 30 + 5
    before = logits.clone()
    shifted = (logits - logits.mean(dim=-1, keepdim=True)).to(TORCH_DTYPES[dtype])
    want = (shifted.view(torch.uint16) if dtype == "bfloat16" else shifted).numpy()
    out = np.full(shape, 7, NUMPY_STORAGE[dtype])
    got, clipped = encode_logits(logits, dtype, out=out)
    assert got is out and clipped == 0 and out.tobytes() == want.tobytes()
    assert encode_logits(logits, dtype)[0].tobytes() == want.tobytes()
    assert torch.equal(logits, before)  # the input is left as it was
    with pytest.raises(ValueError, match="out is"):
        encode_logits(logits, dtype, out=np.empty((1, *shape[1:]), NUMPY_STORAGE[dtype]))


def test_writer_encodes_batches_into_one_shard_as_it_encodes_the_shard(tmp_path):
    writer = create_targets(tmp_path / "s.zarr", num_classes=20, num_teachers=3, num_samples=10, shard_rows=10,
                            block_rows=5)
    logits = torch.randn(10, 3, 20, generator=torch.Generator().manual_seed(0)) * 10
    keys = [f"k{i}" for i in range(10)]
    whole, _, _ = writer.encode(keys, logits)
    buffer = np.empty((10, 3, 20), np.float16)
    for rows in (slice(0, 4), slice(4, 10)):
        writer.encode(keys[rows], logits[rows], out=buffer[rows])
    assert buffer.tobytes() == whole.tobytes()


def test_a_shard_stream_refuses_repeated_keys_and_leaves_nothing_when_discarded(tmp_path):
    writer = create_targets(tmp_path / "s.zarr", num_classes=20, num_samples=12, shard_rows=12, block_rows=4)
    stream = writer.shard_stream(0)
    keys = [f"k{i}" for i in range(12)]
    logits = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    stream.append(*_encoded(writer, keys[:5], logits[:5]))
    with pytest.raises(ValueError, match=r"duplicate sample keys in shard 0: \['k3'\]"):
        stream.append(*_encoded(writer, ["k3", "k5"], logits[5:7]))
    with pytest.raises(ValueError, match=r"duplicate sample keys in shard 0: \['k9'\]"):
        stream.append(*_encoded(writer, ["k9", "k10", "k9"], logits[7:10]))
    stream.discard()
    assert not [p for p in (tmp_path / "s.zarr").rglob("*") if ".tmp-" in p.name]
    with pytest.raises(TypeError, match="keys and logits, or a stream"):
        writer.write_shard(0)


def _encoded(writer, keys, logits):
    stored, keys_arr, labels = writer.encode(keys, logits)
    return stored, labels, keys_arr
