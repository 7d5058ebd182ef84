"""Sequence streaming throughput: tokens/s of ``softtargets.stream_sequences`` over a sequence store, beside
per-sample WebDataset (one tar sample per sequence: ``ids.npy`` + ``targets.npy``) holding the same bytes.

Store: ``--sequences`` sequences of ``--length`` tokens. Rows are part A's ``topk`` records (k=32) where this
softtargets has compact contents (``softtargets.math.compact``), else dense float16 rows of 112 classes (224 B,
about a k=32 top-k record's size), zarr layout, written to a temporary folder (reads come from the page cache:
this measures the software path). One process, ``torch.set_num_threads(1)``, no DataLoader workers (one core):

* ``stream_sequences`` whole sequences (``mode="sequences"``) and packed windows (``mode="windows"``,
  ``length`` rows), batch 16, shuffled, ``verify="none"``: one epoch, counting real tokens;
* ``wds per-sample``: ``webdataset.WebDataset(tars, shardshuffle=False).decode()`` over 8 tars, one sample per
  sequence, counting tokens (no shuffling, no batching: only slower with them).

Best of ``--repeats`` epochs after a first one, interleaved (each stream is made once, as in training; its first
epoch, reported apart, also decodes the row keys of each shard it reads).
The goal stated by issue #17: >= 1 M tokens/s on one core for topk k=32.

    python benchmarks/sequence_stream.py            # ~1 min on 2 cores
    python benchmarks/sequence_stream.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from timing import write_report

import softtargets as st

C = 112


def write(root: Path, sequences: int, length: int) -> tuple[str, list[str], int]:
    """The sequence store and its per-sample WebDataset copy; bytes per token of the store's rows."""
    rng = np.random.default_rng(0)
    url = str(root / "seq.zarr")
    tars = [str(root / f"wds-{i:02d}.tar") for i in range(8)]
    writers = [wds.TarWriter(t, mtime=0) for t in tars]
    with st.create_sequences(url, vocab_size=C, content="geometric", dtype="float16",
                             num_samples=sequences * length) as w:
        for s in range(sequences):
            ids = rng.integers(0, C, length)
            logits = torch.from_numpy(rng.standard_normal((length, C), dtype=np.float32))
            w.write(f"s{s:06d}", ids, logits)
            writers[s % 8].write({"__key__": f"s{s:06d}", "ids.npy": ids.astype(np.int32),
                                  "targets.npy": logits.half().numpy()})
    for tw in writers:
        tw.close()
    return url, tars, 2 * C


def epoch_stream(ds: st.SequenceStream, epoch: int) -> tuple[int, float]:
    ds.set_epoch(epoch)
    t0, n = time.perf_counter(), 0
    for batch in ds:
        n += int(batch["attention_mask"].sum())
    return n, time.perf_counter() - t0


def epoch_wds(tars: list[str]) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for sample in wds.WebDataset(tars, shardshuffle=False).decode():
        n += len(sample["ids.npy"])
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=2048)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sequence_stream.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sequences, args.length, args.repeats = 64, 128, 1
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="seqbench-"))
    try:
        url, tars, row_bytes = write(root, args.sequences, args.length)
        streams = {mode: st.stream_sequences(url, batch_size=16, verify="none", mode=mode,  # type: ignore[arg-type]
                                             length=args.length if mode == "windows" else None)
                   for mode in ("sequences", "windows")}
        runs: dict[str, list[float]] = {"stream sequences": [], "stream windows": [], "wds per-sample": []}
        first: dict[str, float] = {}
        for epoch in range(args.repeats + 1):  # interleaved; epoch 0 of a stream also decodes its shards' keys
            for name, fn in (("stream sequences", lambda e=epoch: epoch_stream(streams["sequences"], e)),
                             ("stream windows", lambda e=epoch: epoch_stream(streams["windows"], e)),
                             ("wds per-sample", lambda e=epoch: epoch_wds(tars))):
                n, seconds = fn()
                assert n == args.sequences * args.length, (name, n)
                if epoch == 0:
                    first[name] = n / seconds
                else:
                    runs[name].append(n / seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {k: max(v) for k, v in runs.items()}
    ref = best["wds per-sample"]
    print(f"{args.sequences} sequences x {args.length} tokens, {row_bytes} B/token rows, one core")
    print(f"{'reader':<18} {'tokens/s':>12} {'vs wds/sample':>14} {'first epoch':>12}")
    for k, v in best.items():
        print(f"{k:<18} {v:>12,.0f} {v / ref:>13.1f}x {first[k]:>12,.0f}")
    report = {"sequences": args.sequences, "length": args.length, "row_bytes": row_bytes, "content": "dense float16",
              "tokens_per_s": best, "first_epoch_tokens_per_s": first, "runs": runs, "quick": args.quick}
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
