"""softtargets.stream under real torch.distributed: 2 gloo processes on 127.0.0.1, each with a
DataLoader of 2 worker processes. The ranks take their split from torch.distributed itself."""

from __future__ import annotations

import datetime
import json
import socket
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import softtargets as st
from softtargets.streaming import stream

N, C, WORLD = 301, 10, 2  # odd N: the remainder policy matters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, store: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = {}
        for remainder in ("pad", "drop"):
            ds = stream(store, batch_size=16, seed=5, remainder=remainder, buffer_size=48)
            assert (ds.rank, ds.world_size) == (rank, WORLD)
            seen, steps = [], 0
            # Ranks made by mp.spawn default to spawning their workers too (seconds each); torchrun's use fork.
            for batch in ds.loader(num_workers=2, multiprocessing_context="fork"):
                # A DDP step: every rank must take part, or the all_reduce hangs.
                total = batch["teacher_logits"].float().sum().reshape(1)
                dist.all_reduce(total)
                seen += batch["index"].tolist()
                steps += 1
            gathered: list = [None] * WORLD
            dist.all_gather_object(gathered, {"steps": steps, "seen": seen, "state": ds.state_dict()})
            result[remainder] = gathered
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_two_workers_each(tmp_path):
    store = tmp_path / "t.zarr"
    g = torch.Generator().manual_seed(0)
    w = st.create_targets(store, num_classes=C, content="geometric", dtype="float16", shard_rows=64, block_rows=16)
    w.write([f"s{i}" for i in range(N)], torch.randn(N, C, generator=g))
    w.close()
    out = tmp_path / "result.json"
    mp.spawn(_rank_main, args=(_free_port(), str(store), str(out)), nprocs=WORLD, join=True)
    result = json.loads(out.read_text())

    pad, drop = result["pad"], result["drop"]
    # pad: 151 rows per rank = 10 batches each; every row once, the epoch's first row twice.
    assert [r["steps"] for r in pad] == [10, 10]
    counts = Counter(i for r in pad for i in r["seen"])
    assert sorted(counts) == list(range(N)) and sorted(counts.values()) == [1] * (N - 1) + [2]
    # drop: 150 rows per rank; one row skipped this epoch, none repeated.
    assert [r["steps"] for r in drop] == [10, 10]
    counts = Counter(i for r in drop for i in r["seen"])
    assert len(counts) == N - 1 and set(counts.values()) == {1}
    # The ranks' parts are disjoint apart from the padding, and each finished its epoch.
    assert len(set(drop[0]["seen"]) & set(drop[1]["seen"])) == 0
    assert all(r["state"]["epoch"] == 1 and r["state"]["consumed"] == [] for r in pad + drop)
