"""Sequence streaming throughput: tokens/s of ``softtargets.stream_sequences`` over a sequence store, beside
per-sample WebDataset (one tar sample per sequence: ``ids.npy`` + ``targets.npy``) holding the same bytes.

Store: ``--sequences`` sequences of ``--length`` tokens, rows ``topk`` records (k=32, the default temperature
grid) over a vocabulary of ``--vocab`` tokens, zarr layout, written to a temporary folder (reads come from the page
cache: this measures the software path). The records are encoded by ``encode_rows`` from a pool of random
logits rows and reused across sequences (a record's contents do not change how fast it is read). One process,
``torch.set_num_threads(1)``, no DataLoader workers (one core):

* ``stream_sequences`` whole sequences (``mode="sequences"``) and packed windows (``mode="windows"``,
  ``length`` rows), batch 16, shuffled, ``verify="none"``: one epoch, counting real tokens; and whole sequences
  at the defaults (lazy checks: each file's sha256 checked on its first read, so in the first epoch);
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

SPEC = st.CompactSpec("topk", k=32)
POOL = 4096  # distinct records encoded; sequences take runs of them


def write(root: Path, sequences: int, length: int, vocab: int) -> tuple[str, list[str], int]:
    """The sequence store and its per-sample WebDataset copy (the same records); bytes per token of a row."""
    rng = np.random.default_rng(0)
    url = str(root / "seq.zarr")
    tars = [str(root / f"wds-{i:02d}.tar") for i in range(8)]
    writers = [wds.TarWriter(t, mtime=0) for t in tars]
    with st.create_sequences(url, vocab_size=vocab, content="geometric", compact=SPEC,
                             num_samples=sequences * length) as w:
        g = torch.Generator().manual_seed(0)
        pool = torch.cat([st.encode_rows(torch.randn(256, 1, vocab, generator=g), w.writer.spec, measure=False)[0]
                          for _ in range(POOL // 256)]).numpy()
        for s in range(sequences):
            ids = rng.integers(0, vocab, length)
            a = int(rng.integers(0, POOL - length + 1))
            records = pool[a:a + length]
            w.write(f"s{s:06d}", ids, records)
            writers[s % 8].write({"__key__": f"s{s:06d}", "ids.npy": ids.astype(np.int32), "targets.npy": records})
    for tw in writers:
        tw.close()
    return url, tars, int(pool.shape[1])


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
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sequence_stream.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sequences, args.length, args.repeats, args.vocab = 64, 128, 1, 1024
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="seqbench-"))
    try:
        url, tars, row_bytes = write(root, args.sequences, args.length, args.vocab)
        streams = {mode: st.stream_sequences(url, batch_size=16, verify="none", mode=mode,  # type: ignore[arg-type]
                                             length=args.length if mode == "windows" else None)
                   for mode in ("sequences", "windows")}
        streams["lazy"] = st.stream_sequences(url, batch_size=16)  # the defaults: lazy checks
        names = {"stream sequences": "sequences", "stream windows": "windows", "stream sequences, lazy": "lazy"}
        runs: dict[str, list[float]] = {**{k: [] for k in names}, "wds per-sample": []}
        first: dict[str, float] = {}
        for epoch in range(args.repeats + 1):  # interleaved; epoch 0 of a stream also decodes its shards' keys
            for name in runs:
                fn = (lambda: epoch_wds(tars)) if name == "wds per-sample" else \
                    (lambda e=epoch, n=name: epoch_stream(streams[names[n]], e))
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
    print(f"{args.sequences} sequences x {args.length} tokens, topk k=32 records of {row_bytes} B/token "
          f"(vocabulary {args.vocab}), one core")
    print(f"{'reader':<24} {'tokens/s':>12} {'vs wds/sample':>14} {'first epoch':>12}")
    for k, v in best.items():
        print(f"{k:<24} {v:>12,.0f} {v / ref:>13.1f}x {first[k]:>12,.0f}")
    report = {"sequences": args.sequences, "length": args.length, "row_bytes": row_bytes, "content": "topk k=32",
              "vocab": args.vocab,
              "tokens_per_s": best, "first_epoch_tokens_per_s": first, "runs": runs, "quick": args.quick}
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
