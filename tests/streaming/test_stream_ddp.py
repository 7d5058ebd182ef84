"""softtargets.stream under real torch.distributed: 2 gloo processes on 127.0.0.1, each with a
DataLoader of 2 worker processes, over a zarr store and a wds store (one spawn for both).
The ranks take their split from torch.distributed itself.

A hang (seen once in CI; never in ~2,500 rank-epochs here) is reported, not waited out: SIGALRM after
WATCHDOG_S dumps every thread of a rank or worker still busy (faulthandler, no extra thread at fork
time), and the DataLoader times out before gloo does. The spawn then runs once more; the first try's
error goes out as a warning."""

from __future__ import annotations

import faulthandler
import json
import signal
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

import softtargets as st
from softtargets.streaming import stream
from tests.ddp import init_gloo, spawn_ranks
from tests.store_data import LAYOUTS, keys, store_path, write_store

C, WORLD, BATCH = 10, 2, 16
ODD_N = 301  # the remainder policy matters
EXACT_N = 320  # = WORLD * BATCH * 10: no padding, nothing dropped
WATCHDOG_S, LOADER_TIMEOUT_S, GLOO_TIMEOUT_S = 20, 30, 60  # a stuck rank reports, then raises, before gloo


def _epoch(store: str, remainder: str) -> dict:
    """One epoch on this rank through 2 DataLoader workers, with a DDP all_reduce per step."""
    ds = stream(store, batch_size=BATCH, seed=5, remainder=remainder, buffer_size=48)
    assert (ds.rank, ds.world_size) == (dist.get_rank(), WORLD)
    seen, keys, steps = [], [], 0
    signal.alarm(WATCHDOG_S)
    # Ranks made by mp.spawn default to spawning their workers too (seconds each); torchrun's use fork.
    loader = ds.loader(num_workers=2, multiprocessing_context="fork", timeout=LOADER_TIMEOUT_S,
                       worker_init_fn=_arm_watchdog)  # forked workers keep the SIGALRM dump, not the alarm
    for batch in loader:
        # A DDP step: every rank must take part, or the all_reduce hangs.
        total = batch["teacher_logits"].float().sum().reshape(1)
        dist.all_reduce(total)
        seen += batch["index"].tolist()
        keys += batch["key"]
        steps += 1
    signal.alarm(0)
    return {"steps": steps, "seen": seen, "keys": keys, "state": ds.state_dict(), "len": ds.batches_per_epoch}


def _arm_watchdog(worker_id: int) -> None:
    signal.alarm(WATCHDOG_S)


def _rank_main(rank: int, port: int, stores: dict[str, str], out: str) -> None:
    stacks = open(f"{out}.stacks", "a")  # noqa: SIM115 (faulthandler writes to it until the process ends)
    faulthandler.register(signal.SIGALRM, file=stacks, all_threads=True)  # dump the threads, do not exit
    init_gloo(rank, port, WORLD, timeout_s=GLOO_TIMEOUT_S)
    try:
        result = {}
        for name, store in stores.items():
            remainders = ("pad", "drop") if name.startswith("odd") else ("pad",)
            for remainder in remainders:
                gathered: list = [None] * WORLD
                dist.all_gather_object(gathered, _epoch(store, remainder))
                result[f"{name}/{remainder}"] = gathered
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _write(root: Path, name: str, layout: str, n: int) -> str:
    path = str(store_path(root, layout, name))
    write_store(path, torch.randn(n, C, generator=torch.Generator().manual_seed(0)), layout=layout,
                content="geometric", dtype="float16", shard_rows=64, block_rows=16)
    return path


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("ddp")
    stores = {}
    for layout in LAYOUTS:
        stores[f"odd-{layout}"] = _write(root, "odd", layout, ODD_N)
        stores[f"exact-{layout}"] = _write(root, "exact", layout, EXACT_N)
    out = root / "result.json"

    def ranks() -> None:
        spawn_ranks(_rank_main, stores, str(out), world=WORLD)

    try:
        ranks()
    except ProcessException as first:  # the module docstring says why once more
        stacks = Path(f"{out}.stacks")
        dumped = stacks.read_text() if stacks.exists() else ""
        stacks.unlink(missing_ok=True)
        warnings.warn(f"DDP ranks failed once, ran again: {first}\nthreads of those still busy after {WATCHDOG_S} s"
                      f" (ranks and workers):\n{dumped or 'none'}", stacklevel=1)
        ranks()
    return stores, json.loads(out.read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_split_covers_every_key_once(ddp_result, layout):
    stores, result = ddp_result
    ranks = result[f"exact-{layout}/pad"]
    all_keys = st.open_targets(stores[f"exact-{layout}"]).keys()
    assert len(all_keys) == EXACT_N
    seen_keys = [k for r in ranks for k in r["keys"]]
    assert len(seen_keys) == len(set(seen_keys)) == EXACT_N  # no duplicates
    assert set(seen_keys) == set(all_keys)  # the union over ranks is the whole store
    assert sorted(i for r in ranks for i in r["seen"]) == list(range(EXACT_N))
    assert [r["steps"] for r in ranks] == [r["len"] for r in ranks] == [EXACT_N // (WORLD * BATCH)] * WORLD
    for r in ranks:  # keys and indices travel together
        assert r["keys"] == [keys(1, i)[0] for i in r["seen"]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_store_pad_and_drop(ddp_result, layout):
    _, result = ddp_result
    pad, drop = result[f"odd-{layout}/pad"], result[f"odd-{layout}/drop"]
    # pad: 151 rows per rank = 10 batches each; every row once, the epoch's first row twice.
    assert [r["steps"] for r in pad] == [10, 10]
    counts = Counter(i for r in pad for i in r["seen"])
    assert sorted(counts) == list(range(ODD_N)) and sorted(counts.values()) == [1] * (ODD_N - 1) + [2]
    # drop: 150 rows per rank; one row skipped this epoch, none repeated.
    assert [r["steps"] for r in drop] == [10, 10]
    counts = Counter(i for r in drop for i in r["seen"])
    assert len(counts) == ODD_N - 1 and set(counts.values()) == {1}
    # The ranks' parts are disjoint apart from the padding, and each finished its epoch.
    assert len(set(drop[0]["seen"]) & set(drop[1]["seen"])) == 0
    assert all(r["state"]["epoch"] == 1 and r["state"]["consumed"] == [] for r in pad + drop)
