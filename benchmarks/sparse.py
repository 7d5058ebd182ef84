"""KL(dense || reconstructed) against bytes per token for the compact contents, on a language model's logits.

Run: ``python benchmarks/sparse.py`` (about a minute on 2 cores; ``--quick``: seconds, for the tests).

The teacher is a small word-level language model trained here, on CPU, on the running Python's standard
library (a fixed, sorted file list, fingerprinted; held-out files give the evaluated positions): vocabulary
8192 (the most frequent tokens of the training files, one ``<unk>``), context 4 tokens, last hidden state
d = 64, output head ``nn.Linear(64, 8192)``. Its float32 logits at held-out positions are the dense reference.

Each content is encoded as stage one encodes it (:func:`softtargets.precompute.contents.encode_rows`, the
stored dtypes: values float16, log-partitions float32, hidden float16 or int8) and reconstructed over the
whole vocabulary at each temperature T: classes a content names get their stored probability; the mass it
does not name is spread evenly over the classes it does not name. KL is in nats, averaged over positions.

- ``topk+tail`` (k, grid): the top k exact; the tail's mass from its log-partition, interpolated in 1/T.
- ``sampled`` (n draws at T0 = 1): the distinct drawn ids exact at T (their logits and the log-partition).
- ``hidden`` float16 / int8: every logit, ``h W^T + b``.
- baseline ``topk renorm``: the top k renormalised over themselves (DistillKit's first mode): no mass
  outside them, so the KL is infinite wherever the teacher's tail has mass; its dropped mass is reported.
- baseline ``topk+bucket^(1/T)``: the top k log-probabilities at T = 1 and one tail bucket, re-tempered as
  if the bucket were one token (``q ∝ p^(1/T)`` over the k + 1 buckets; DistillKit's second mode).

Baselines are run at the k of each topk+tail row and at the k that costs the same bytes (4 bytes per id).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import math
import re
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from timing import write_report
from torch import nn

import softtargets as st
from softtargets.math.compact import CompactSpec, decode_hidden, head_logits, unpack_record
from softtargets.math.compact_losses import sampled_weights, topk_log_probs
from softtargets.store.compact_rows import compact_entry
from softtargets.store.manifest import Manifest

TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 20.0)
VOCAB, CONTEXT, WIDTH = 8192, 4, 64
GRID9 = (0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0, 8.0, 20.0)
GRID6 = (0.5, 1.0, 2.0, 4.0, 8.0, 20.0)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sparse.json"
TOKEN = re.compile(r"[A-Za-z_]\w*|\d+|\s+|[^\w\s]")


# ---------------------------------------------------------------------------------------------------
# The teacher: a word-level LM on the standard library's source


def corpus(files: int) -> tuple[list[str], list[str], str]:
    """Training and held-out texts from the standard library's ``.py`` files (sorted; every 10th held out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.glob("*.py"))[:files]
    digest = hashlib.sha256()
    train, held = [], []
    for i, p in enumerate(paths):
        text = p.read_text(encoding="utf-8", errors="replace")
        digest.update(p.name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        (held if i % 10 == 9 else train).append(text)
    return train, held, digest.hexdigest()


def tokenize(texts: list[str], vocab: dict[str, int] | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    tokens = [t for text in texts for t in TOKEN.findall(text)]
    if vocab is None:
        common = [t for t, _ in collections.Counter(tokens).most_common(VOCAB - 1)]
        vocab = {t: i + 1 for i, t in enumerate(common)}  # 0 = <unk>
    return torch.tensor([vocab.get(t, 0) for t in tokens], dtype=torch.long), vocab


class WordLM(nn.Module):
    """``[B, CONTEXT]`` token ids -> logits ``[B, VOCAB]``; ``lm_head``'s input is the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 48)
        self.body = nn.Sequential(nn.Linear(48 * CONTEXT, 256), nn.GELU(), nn.Linear(256, WIDTH), nn.Tanh())
        self.lm_head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(self.embed(ids).flatten(1)))


def windows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = ids.unfold(0, CONTEXT + 1, 1)
    return x[:, :CONTEXT], x[:, CONTEXT]


def train_teacher(ids: torch.Tensor, steps: int, seed: int = 0) -> WordLM:
    torch.manual_seed(seed)
    model = WordLM()
    x, y = windows(ids)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(x), (512,), generator=g)
        loss = nn.functional.cross_entropy(model(x[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Reconstructions and their KL


def kl_named(lp: torch.Tensor, named: torch.Tensor, lq_named: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q): q holds ``lq_named`` at the ``named [R, k]`` ids (valid ones: distinct), mass ``rest [R]``
    spread evenly over the other ids. ``lp [R, C]``: the dense log-probabilities."""
    c = lp.shape[-1]
    member = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, named, True)
    k = member.sum(-1, keepdim=True)
    fill = torch.log(rest.clamp_min(0).unsqueeze(-1) / (c - k).clamp_min(1))
    lq = torch.where(member, lp.new_zeros(()), fill)
    lq = lq.scatter(1, named, lq_named.to(lq.dtype))
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(-1).mean()


def encode(logits: torch.Tensor, spec: CompactSpec, hidden: torch.Tensor | None = None,
           head: Any = None) -> tuple[dict[str, torch.Tensor], int]:
    """The stored fields of ``spec`` for rows ``logits [R, C]`` (packed and unpacked, as a store holds them), and
    the bytes per row."""
    entry = compact_entry(spec, logits.shape[-1], 1, None if hidden is None else hidden.shape[-1])
    m = Manifest(layout="zarr", num_samples=len(logits), num_classes=logits.shape[-1], content="geometric",
                 num_teachers=1, dtype="float16", shard_rows=1, block_rows=1, compact=entry)
    records, _ = st.encode_rows(logits, m, hidden=None if hidden is None else [hidden], head=head,
                                generator=torch.Generator().manual_seed(0))
    return unpack_record(records, entry["fields"]), entry["row_bytes"]


def run(quick: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    train_txt, held_txt, fingerprint = corpus(40 if quick else 120)
    train_ids, vocab = tokenize(train_txt)
    held_ids, _ = tokenize(held_txt, vocab)
    teacher = train_teacher(train_ids, 40 if quick else 600)
    x, _ = windows(held_ids)
    rows = 256 if quick else 2048
    x = x[torch.linspace(0, len(x) - 1, rows).long()]
    captured: list[torch.Tensor] = []
    hook = teacher.lm_head.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    with torch.no_grad():
        z = teacher(x).double()
    hook.remove()
    h = captured[0].float()
    head = (teacher.lm_head.weight.detach(), teacher.lm_head.bias.detach())
    setup_s = time.perf_counter() - t0
    lps = {t: torch.log_softmax(z / t, -1) for t in TEMPERATURES}
    results: list[dict[str, Any]] = []

    def add(method: str, param: Any, nbytes: int, kls: list[float], **extra: Any) -> None:
        results.append({"method": method, "param": param, "bytes_per_token": nbytes,
                        "kl": dict(zip(map(str, TEMPERATURES), kls, strict=True)), **extra})

    ks = (8, 32) if quick else (8, 16, 32, 64, 128)
    for grid_name, grid in (("9-point grid", GRID9), ("6-point grid", GRID6)):
        for k in ks:
            spec = CompactSpec("topk", k=k, temperatures=grid)
            f, nbytes = encode(z, spec)
            kls = []
            for t in TEMPERATURES:
                lp_top, lp_tail = topk_log_probs(f, spec, t)
                kls.append(float(kl_named(lps[t], f["ids"], lp_top, lp_tail.exp())))
            add("topk+tail", {"k": k, "grid": grid_name}, nbytes, kls)
    for k in sorted({*ks, *(r["bytes_per_token"] // 4 for r in results)}):
        top = z.topk(k, -1)
        values = top.values.half().double()  # stored float16, like every baseline's logprobs
        renorm, bucket, dropped = [], [], []
        lp1 = torch.log_softmax(z, -1).gather(1, top.indices).half().double()  # log-probs at T = 1
        tail1 = (1 - lp1.exp().sum(-1)).clamp_min(1e-30)
        for t in TEMPERATURES:
            lq = torch.log_softmax(values / t, -1)
            dropped.append(float((1 - lps[t].gather(1, top.indices).exp().sum(-1)).mean()))
            renorm.append(math.inf if dropped[-1] > 0 else float(kl_named(lps[t], top.indices, lq, torch.zeros(rows))))
            buckets = torch.cat([lp1, tail1.log().unsqueeze(-1)], -1) / t
            lb = torch.log_softmax(buckets, -1)
            bucket.append(float(kl_named(lps[t], top.indices, lb[:, :-1], lb[:, -1].exp())))
        add("topk renorm", {"k": k}, 4 * k, renorm, dropped_mass=dict(zip(map(str, TEMPERATURES), dropped,
                                                                          strict=True)))
        add("topk+bucket^(1/T)", {"k": k}, 4 * k, bucket)
    for n in ((8, 32) if quick else (8, 16, 32, 64)):
        spec = CompactSpec("sampled", k=n, temperatures=GRID9, proposal_temperature=1.0)
        f, nbytes = encode(z, spec)
        kls = []
        valid = f["counts"] > 0
        ids = torch.where(valid, f["ids"], f["ids"][:, :1])  # unused slots repeat the first id
        for t in TEMPERATURES:
            _, lp_ids = sampled_weights(f, spec, t)
            lp_ids = torch.where(valid, lp_ids, lp_ids[:, :1])
            named = torch.where(valid, lp_ids.exp(), torch.zeros_like(lp_ids)).sum(-1)
            kls.append(float(kl_named(lps[t], ids, lp_ids, 1 - named)))
        add("sampled", {"n": n, "T0": 1.0}, nbytes, kls, distinct_ids=float(valid.sum(-1).double().mean()))
    for quant in ("float16", "int8"):
        spec = CompactSpec("hidden", quantization=quant, head="lm_head")
        f, nbytes = encode(z, spec, hidden=h, head=head)
        recon = head_logits(decode_hidden(f).double(), head[0], head[1])
        kls = []
        for t in TEMPERATURES:
            lq = torch.log_softmax(recon / t, -1)
            kls.append(float((lps[t].exp() * (lps[t] - lq)).sum(-1).mean()))
        add("hidden", {"quantization": quant, "d": WIDTH}, nbytes, kls)
    return {"temperatures": list(TEMPERATURES), "rows": rows, "vocab": VOCAB, "hidden_size": WIDTH,
            "teacher": {"kind": "word-level LM, context 4, trained here", "train_tokens": len(train_ids),
                        "held_out_tokens": len(held_ids), "corpus_fingerprint": fingerprint,
                        "setup_seconds": setup_s},
            "results": results, "goals": goals(results), "quick": quick, "seconds": time.perf_counter() - t0}


def goals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, as measured: hidden float16 KL <= 1e-4 at every T at <= 2d + 16 bytes; topk+tail below
    both baselines at every T at equal (or fewer) bytes."""
    hidden = [r for r in results if r["method"] == "hidden" and r["param"]["quantization"] == "float16"]
    out: dict[str, Any] = {"hidden_float16": {
        "max_kl": max(max(r["kl"].values()) for r in hidden), "bytes": hidden[0]["bytes_per_token"],
        "budget": 2 * WIDTH + 16}}
    out["hidden_float16"]["met"] = out["hidden_float16"]["max_kl"] <= 1e-4 and \
        out["hidden_float16"]["bytes"] <= 2 * WIDTH + 16
    per_k = []
    for r in (r for r in results if r["method"] == "topk+tail"):
        k_eq = r["bytes_per_token"] // 4
        rows = {}
        for base in ("topk renorm", "topk+bucket^(1/T)"):
            b = next(x for x in results if x["method"] == base and x["param"]["k"] == k_eq)
            rows[base] = all(r["kl"][t] < b["kl"][t] for t in r["kl"])
        per_k.append({"k": r["param"]["k"], "grid": r["param"]["grid"], "bytes": r["bytes_per_token"],
                      "baseline_k_same_bytes": k_eq, "beats_at_every_T": rows})
    out["topk_vs_baselines"] = per_k
    return out


def table(report: dict[str, Any]) -> str:
    head = "| content | setting | bytes/token | " + " | ".join(f"T={t:g}" for t in report["temperatures"]) + " |"
    lines = [head, "|" + "---|" * (3 + len(report["temperatures"]))]
    for r in report["results"]:
        setting = ", ".join(f"{k}={v}" for k, v in r["param"].items())
        kls = " | ".join("∞" if math.isinf(v) else f"{v:.2e}" for v in r["kl"].values())
        lines.append(f"| {r['method']} | {setting} | {r['bytes_per_token']} | {kls} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    styles = {"topk+tail": "o-", "topk+bucket^(1/T)": "s--", "sampled": "^-", "hidden": "D"}
    for ax, t in zip(axes, report["temperatures"], strict=True):
        for method, style in styles.items():
            for grid in ("9-point grid", "6-point grid") if method == "topk+tail" else (None,):
                pts = sorted((r["bytes_per_token"], r["kl"][str(float(t))]) for r in report["results"]
                             if r["method"] == method and (grid is None or r["param"].get("grid") == grid))
                if pts:
                    label = method + (f" ({grid})" if grid else "")
                    ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], style, label=label, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"T = {t:g}")
        ax.set_xlabel("bytes per token")
        ax.set_ylabel("KL(dense || reconstructed), nats")
    axes[0].legend(fontsize=7)
    fig.suptitle("Compact contents: KL against bytes (top-k renormalised: infinite, not drawn)")
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller teacher and fewer rows (seconds)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report (a .png plot beside it)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = run(args.quick)
    print(table(report))
    g = report["goals"]
    print(f"hidden float16: max KL {g['hidden_float16']['max_kl']:.2e} at {g['hidden_float16']['bytes']} B/token "
          f"(goal <= 1e-4 at <= {g['hidden_float16']['budget']}): {'met' if g['hidden_float16']['met'] else 'NOT met'}")
    for row in g["topk_vs_baselines"]:
        print(f"topk+tail k={row['k']} ({row['grid']}, {row['bytes']} B) vs baselines at "
              f"k={row['baseline_k_same_bytes']}: {row['beats_at_every_T']}")
    write_report(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
