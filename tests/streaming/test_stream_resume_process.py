"""Resuming a stream in a fresh Python process: the state saved after n batches, loaded by a new
interpreter, yields exactly the rest of the epoch, over a real zarr store and real tar shards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from softtargets.streaming import stream
from tests.store_data import store_path, write_store

N, C, STOP = 300, 10, 5
KW = dict(batch_size=16, seed=11, rank=1, world_size=2, remainder="pad", buffer_size=48)
EPOCH = 2

# Runs in the new process: load the saved state, consume the rest with 0 and 2 DataLoader workers.
RESUME = textwrap.dedent("""
    import json, sys, torch
    from softtargets.streaming import stream
    store, state_path, kw, epoch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    out = {}
    for workers in (0, 2):
        ds = stream(store, **kw)
        ds.load_state_dict(torch.load(state_path))
        ds.set_epoch(epoch)  # the resumed epoch keeps its progress
        out[workers] = [[b["batch_idx"], b["index"].tolist()] for b in ds.loader(num_workers=workers)]
        out[f"state{workers}"] = ds.state_dict()
    print(json.dumps(out))
""")


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_resume_in_a_fresh_process(tmp_path, layout):
    store = str(store_path(tmp_path, layout))
    write_store(store, torch.randn(N, C, generator=torch.Generator().manual_seed(3)), layout=layout,
                content="geometric", dtype="float16", shard_rows=64, block_rows=16)
    whole = stream(store, **KW)
    whole.set_epoch(EPOCH)
    uninterrupted = [b["index"].tolist() for b in whole.loader(num_workers=0)]

    ds = stream(store, **KW)
    ds.set_epoch(EPOCH)
    head = []
    for b in ds.loader(num_workers=0):
        head.append(b["index"].tolist())
        if len(head) == STOP:
            break
    state_path = tmp_path / "state.pt"
    torch.save(ds.state_dict(), state_path)
    del ds  # nothing of this process's stream reaches the next one but the file

    proc = subprocess.run(
        [sys.executable, "-c", RESUME, store, str(state_path), json.dumps(KW), str(EPOCH)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rest = json.loads(proc.stdout)
    assert len(uninterrupted) == whole.batches_per_epoch == 10
    # Without workers the rest comes in order: head + rest is the uninterrupted epoch, batch for batch.
    assert [b for _, b in rest["0"]] and head + [b for _, b in rest["0"]] == uninterrupted
    assert [j for j, _ in rest["0"]] == list(range(STOP, len(uninterrupted)))
    # With 2 workers the batches interleave; by batch number they are the same rest.
    assert head + [b for _, b in sorted(rest["2"])] == uninterrupted
    assert rest["state0"]["epoch"] == rest["state2"]["epoch"] == EPOCH + 1
