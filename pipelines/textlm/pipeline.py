"""The textlm pipeline's stages; :func:`run` chains them and returns the results dict.

1. text: the stdlib file list (sorted, fingerprinted, every 10th file held out), a byte-level BPE tokenizer trained
   on the training files (``tokenizers``), the files tokenized;
2. teachers: small causal transformers trained on the training files' tokens (hard labels), each and their
   geometric-mean ensemble evaluated by held-out perplexity;
3. stage one: ``softtargets.precompute_sequences`` runs the ensemble over the transfer set (sequences of
   ``context`` tokens cut from the training files) and writes each store;
4. stage two: the student trained on every store (``softtargets.stream_sequences``, ``softtargets.kd_loss``) and
   on the same sequences' hard labels, each evaluated by held-out perplexity.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import softtargets as st
from softtargets.precompute.sequences import precompute_sequences

from .data import encode_files, stdlib_corpus, stream_of, train_tokenizer, transfer_sequences
from .models import CausalLM, hard_loss, perplexity, train, windows

GOAL_BYTES = 128
"""The stored bytes per token within which a student should close 80 % of the dense student's gain."""


def header(step: int, total: int, text: str) -> None:
    print(f"\n== [{step}/{total}] {text}", flush=True)


class Ensemble(nn.Module):
    """The teachers' geometric mean: mean logits ``[B, L, V]``."""

    def __init__(self, members: list[CausalLM]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(ids) for m in self.members]).mean(0)


def _batches(stream: st.SequenceStream) -> Iterator[dict[str, Any]]:
    """The stream's batches, epoch after epoch."""
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        yield from stream
        epoch += 1


def store_loss(store: st.SequenceStore | None, alpha: float, temperature: float) -> Any:
    """``alpha * T^2 KL(teacher || student) + (1 - alpha) * CE(next token)`` over a batch's real positions
    (``attention_mask``); the soft term from the store's dense logits (:func:`softtargets.kd_loss`) or its compact
    records (:func:`softtargets.compact_kd_loss`, with the stored head for ``hidden``). ``alpha = 0``: hard labels
    only, the store unread."""
    compact = None if store is None else store.manifest.compact
    head = store.head() if compact is not None and compact["kind"] == "hidden" else None

    def loss(model: CausalLM, batch: dict[str, Any]) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["position_ids"])
        mask = batch["attention_mask"]
        s = logits[mask]
        ce = F.cross_entropy(s, batch["label"][mask], ignore_index=-1)
        if alpha == 0 or store is None:
            return ce
        rows = batch["teacher_logits"][mask]
        if compact is None:
            soft = st.kd_loss(s, rows, temperature)
        else:
            soft = st.compact_kd_loss(s, st.unpack_rows(store.manifest, rows), compact, temperature, head=head)
        return alpha * soft + (1 - alpha) * ce
    return loss


def run(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(cfg["threads"])
    timings: dict[str, float] = {}
    ctx, batch = cfg["context"], cfg["batch"]

    header(1, 4, "text: stdlib sources, BPE tokenizer")
    t0 = time.perf_counter()
    corpus = stdlib_corpus(cfg["max_files"], cfg["heldout_every"])
    tok = train_tokenizer(corpus.train, cfg["vocab_size"])
    vocab = tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    train_enc, held_enc = encode_files(tok, corpus.train), encode_files(tok, corpus.heldout)
    train_tokens = stream_of(train_enc)
    held = stream_of(held_enc)[:cfg["eval_tokens"]]
    held_bytes = sum(len(p.read_bytes()) for p in corpus.heldout)
    text = {"stdlib": str(corpus.root), "python": platform.python_version(), "fingerprint": corpus.fingerprint,
            "train_files": len(corpus.train), "heldout_files": len(corpus.heldout), "vocab_size": vocab,
            "train_tokens": len(train_tokens), "heldout_tokens_total": int(sum(len(e) for e in held_enc)),
            "eval_tokens": len(held), "text_bytes_per_token": held_bytes / max(1, sum(len(e) for e in held_enc))}
    print(f"{text['train_files']} training files ({text['train_tokens']} tokens), {text['heldout_files']} held out; "
          f"vocabulary {vocab}, {text['text_bytes_per_token']:.2f} text bytes/token", flush=True)
    timings["text_seconds"] = time.perf_counter() - t0

    header(2, 4, f"teachers: {len(cfg['teachers'])} causal transformers on hard labels")
    teachers, teacher_rows = [], []
    (out / "teachers").mkdir(exist_ok=True)
    for spec in cfg["teachers"]:
        model = CausalLM(vocab, spec["d"], spec["layers"], spec["heads"], ctx, seed=spec["seed"])
        fit = train(model, windows(train_tokens, ctx, batch, spec["seed"]), cfg["teacher_steps"], cfg["lr"], hard_loss)
        ppl = perplexity(model, held, ctx)
        torch.save(model.state_dict(), out / "teachers" / f"teacher-{spec['seed']}.pt")
        teachers.append(model)
        teacher_rows.append({**spec, "params": sum(p.numel() for p in model.parameters()), "ppl": ppl,
                             "seconds": fit["seconds"]})
        print(f"teacher seed {spec['seed']}: held-out perplexity {ppl:.1f} ({fit['seconds']:.0f} s)", flush=True)
    ensemble_ppl = perplexity(Ensemble(teachers), held, ctx)  # type: ignore[arg-type]
    print(f"ensemble (geometric mean): held-out perplexity {ensemble_ppl:.1f}", flush=True)

    header(3, 4, "stage one: per-token targets of the transfer set")
    seqs = transfer_sequences(corpus.train, train_enc, ctx, cfg["transfer_sequences"])
    n_tokens = sum(len(ids) for _, ids, _ in seqs)
    stores_dir = out / "stores"
    shutil.rmtree(stores_dir, ignore_errors=True)
    stores = []
    for name, kwargs in store_kinds(cfg).items():
        t0 = time.perf_counter()
        url = stores_dir / f"{name.replace(' ', '-').replace('=', '')}.zarr"
        m = precompute_sequences(teachers, seqs, url, vocab_size=vocab, transfer_set=corpus.transfer_set(),
                                 batch_tokens=64 * ctx, **kwargs)
        seconds = time.perf_counter() - t0
        row = m.compact["row_bytes"] if m.compact else vocab * 2
        stores.append({"name": name, "url": str(url), "bytes": m.nbytes + _sidecar(m), "target_bytes": m.nbytes,
                       "bytes_per_token": row, "seconds": seconds, "compact": m.compact})
        print(f"{name}: {row} B/token, store {stores[-1]['bytes'] / 1e6:.1f} MB ({seconds:.1f} s)", flush=True)

    header(4, 4, "stage two: students from each store and from hard labels")
    students = []
    first = stores[0]["url"]
    for source, url, alpha in [("hard labels", first, 0.0)] + [(s["name"], s["url"], cfg["alpha"]) for s in stores]:
        students.append({"targets": source, **train_student(cfg, vocab, url, alpha, cfg["student"]["seed"], held)})
        print(f"student from {source}: held-out perplexity {students[-1]['ppl']:.1f} "
              f"({students[-1]['seconds']:.0f} s)", flush=True)
    gap_closed(students)
    for s in students:
        store = next((x for x in stores if x["name"] == s["targets"]), None)
        s["bytes_per_token"] = store["bytes_per_token"] if store else 0.0
    return {
        "text": text, "config": cfg, "transfer_tokens": n_tokens, "goal": compact_goal(students),
        "teachers": teacher_rows, "ensemble_ppl": ensemble_ppl, "stores": stores, "students": students,
        "timings": {**timings, "total_seconds": time.perf_counter() - started},
        "environment": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "softtargets": st.__version__,
                        "python": platform.python_version(), "platform": platform.platform()},
    }


def train_student(cfg: dict[str, Any], vocab: int, url: str, alpha: float, seed: int, held: torch.Tensor
                  ) -> dict[str, Any]:
    """A student (``cfg["student"]``, initialised and shuffled by ``seed``) trained ``cfg["student_epochs"]``
    epochs on store ``url`` (``alpha = 0``: its hard labels only); held-out perplexity of ``held`` (int64 token
    ids), training seconds and steps."""
    spec, ctx = cfg["student"], cfg["context"]
    model = CausalLM(vocab, spec["d"], spec["layers"], spec["heads"], ctx, seed=seed)
    stream = st.stream_sequences(url, batch_size=cfg["batch"], seed=seed)
    steps = cfg["student_epochs"] * stream.batches_per_epoch
    loss = store_loss(stream.store if alpha else None, alpha, cfg["temperature"])
    fit = train(model, _batches(stream), steps, cfg["lr"], loss)
    return {"ppl": perplexity(model, held, ctx), "seconds": fit["seconds"], "steps": steps}


def gap_closed(students: list[dict[str, Any]]) -> None:
    """Set each student's ``gap_closed``: its gain over the ``hard labels`` student as a share of the ``dense``
    student's, in log perplexity (None without both, or when dense gains nothing)."""
    hard = next((s["ppl"] for s in students if s["targets"] == "hard labels"), None)
    dense = next((s["ppl"] for s in students if s["targets"] == "dense"), None)
    gain = math.log(hard) - math.log(dense) if hard and dense else 0.0
    for s in students:
        s["gap_closed"] = (math.log(hard) - math.log(s["ppl"])) / gain if gain > 0 and hard else None


def compact_goal(students: list[dict[str, Any]], budget: int = GOAL_BYTES) -> dict[str, Any]:
    """The issue's goal: a student distilled from at most ``budget`` bytes/token closes >= 80 % of the dense
    student's gain over the hard-label student (in log perplexity); the best such student."""
    within = [s for s in students if s["gap_closed"] is not None and s["targets"] not in ("hard labels", "dense")
              and 0 < s["bytes_per_token"] <= budget]
    best = max(within, key=lambda s: s["gap_closed"], default=None)
    return {"bytes_per_token_max": budget, "gap_closed_min": 0.8, "best": best and best["targets"],
            "gap_closed": best and best["gap_closed"], "met": bool(best and best["gap_closed"] >= 0.8)}


def store_kinds(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stores stage one writes: name -> ``precompute_sequences`` arguments. Dense float16 first (the
    reference), then ``topk`` at each k of ``cfg["topk"]`` and ``sampled`` with ``cfg["sampled"]`` draws (their
    log-partitions at the temperatures ``cfg["grid"]``), and ``hidden`` (the teachers' last hidden states side by
    side, and their joined head) in float16 and int8."""
    kinds: dict[str, dict[str, Any]] = {"dense": {"content": "geometric", "dtype": "float16"}}
    grid = tuple(cfg["grid"])
    for k in cfg["topk"]:
        kinds[f"topk k={k}"] = {"compact": st.CompactSpec("topk", k=k, temperatures=grid)}
    kinds[f"sampled n={cfg['sampled']}"] = {"compact": st.CompactSpec("sampled", k=cfg["sampled"], temperatures=grid,
                                                                      seed=1)}
    for q in ("float16", "int8"):
        kinds[f"hidden {q}"] = {"compact": st.CompactSpec("hidden", head="lm_head", quantization=q)}
    return kinds


def _sidecar(m: st.Manifest) -> int:
    """Bytes of a store's files beside its target arrays: the sequence files and a hidden store's head."""
    head = (m.compact or {}).get("head_files") or {}
    return sum(int(f["bytes"]) for f in (m.sequences or {}).get("files", [])) + \
        sum(int(f["bytes"]) for f in head.values() if f)
