"""``python -m pipelines.textlm.seeds --run runs/textlm --seeds 8,9,10``: the students of a finished textlm run
trained again with other seeds (initialisation and shuffle), from the run's own stores, to see how far one
seed's "gap closed" can be trusted.

Trains the hard-label and dense students and those of ``--targets`` (store names, default: every store) per
seed, and writes ``student_seeds.json`` into the run folder: every student, and per seed each one's share of
the dense student's gain over the hard-label one (the run's own seed included, from its ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.textlm.seeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/textlm"), help="a finished run folder")
    p.add_argument("--seeds", default="8,9,10", help="student seeds, comma-separated (default 8,9,10)")
    p.add_argument("--targets", nargs="*", help="store names to train from besides dense (default: every store)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tokenizers import Tokenizer

    from .data import encode_files, stdlib_corpus, stream_of
    from .pipeline import gap_closed, train_student

    r = json.loads((args.run / "results.json").read_text())
    cfg = r["config"]
    torch.set_num_threads(cfg["threads"])
    tok = Tokenizer.from_file(str(args.run / "tokenizer.json"))
    corpus = stdlib_corpus(cfg["max_files"], cfg["heldout_every"])
    if corpus.fingerprint != r["text"]["fingerprint"]:
        raise SystemExit(f"{args.run}: made from another standard library (fingerprint differs)")
    held = stream_of(encode_files(tok, corpus.heldout))[:cfg["eval_tokens"]]
    urls = {s["name"]: s["url"] for s in r["stores"]}
    names = ["dense", *[n for n in (args.targets if args.targets else urls) if n != "dense"]]
    unknown = [n for n in names if n not in urls]
    if unknown:
        raise SystemExit(f"no store named {unknown} in {args.run}; its stores: {sorted(urls)}")
    by_seed: dict[int, list[dict[str, Any]]] = {
        cfg["student"]["seed"]: [dict(s) for s in r["students"] if s["targets"] in ("hard labels", *names)]}
    started = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        students = []
        for name in ["hard labels", *names]:
            alpha = 0.0 if name == "hard labels" else cfg["alpha"]
            url = urls["dense" if name == "hard labels" else name]
            students.append({"targets": name, **train_student(cfg, tok.get_vocab_size(), url, alpha, seed, held)})
            print(f"seed {seed}, student from {name}: held-out perplexity {students[-1]['ppl']:.1f}", flush=True)
        gap_closed(students)
        by_seed[seed] = students
    summary = {}
    for name in ["hard labels", *names]:
        ppl = [next(s["ppl"] for s in v if s["targets"] == name) for v in by_seed.values()]
        gaps = [next(s["gap_closed"] for s in v if s["targets"] == name) for v in by_seed.values()]
        summary[name] = {"ppl": ppl, "gap_closed": gaps,
                         "gap_closed_mean": None if None in gaps else sum(gaps) / len(gaps)}
        gap = "" if None in gaps else "  gap closed " + ", ".join(f"{100 * g:.0f} %" for g in gaps)
        print(f"{name}: perplexity " + ", ".join(f"{p:.1f}" for p in ppl) + gap)
    out = {"run": str(args.run), "seeds": list(by_seed), "students": {str(k): v for k, v in by_seed.items()},
           "summary": summary, "seconds": time.perf_counter() - started}
    (args.run / "student_seeds.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.run / 'student_seeds.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
