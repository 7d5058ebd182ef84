"""The language models of the textlm pipeline: a small causal transformer in plain torch, its training loops (hard
labels, or distillation from a sequence store) and held-out perplexity."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CausalLM(nn.Module):
    """Token ids ``[B, L]`` -> logits ``[B, L, V]``: embeddings, ``layers`` pre-norm transformer blocks with a
    causal mask, a final norm and the output head ``lm_head`` (logits = ``lm_head(h)``, ``h`` ``[B, L, d]``)."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.context = context
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = ids.shape[1]
        pos = torch.arange(length, device=ids.device)[None] if position_ids is None else position_ids
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        h = self.blocks(self.tok(ids) + self.pos(pos), mask=mask, is_causal=True)
        return self.lm_head(self.norm(h))


def windows(tokens: torch.Tensor, context: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless random batches ``[batch, context + 1]`` of consecutive tokens (inputs and their next tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = len(tokens) - context - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=g)
        yield torch.stack([tokens[s:s + context + 1] for s in starts.tolist()])


def _schedule(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train(model: CausalLM, batches: Iterator[Any], steps: int, lr: float,
          loss_fn: Callable[[CausalLM, Any], torch.Tensor]) -> dict[str, float]:
    """``steps`` AdamW steps of ``loss_fn(model, batch)`` over ``batches``, cosine schedule; wall time and last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    started, last = time.perf_counter(), float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _schedule(step, steps, lr)
        loss = loss_fn(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = float(loss.detach())
    model.eval()
    return {"seconds": time.perf_counter() - started, "last_loss": last}


def hard_loss(model: CausalLM, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a ``[B, L + 1]`` window batch."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: CausalLM, tokens: torch.Tensor, context: int, batch: int = 16) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``context`` tokens of ``tokens``."""
    model.eval()
    n = (len(tokens) - 1) // context
    total, count = 0.0, 0
    for i in range(0, n, batch):
        rows = torch.stack([tokens[j * context:(j + 1) * context + 1] for j in range(i, min(n, i + batch))])
        logits = model(rows[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += rows[:, 1:].numel()
    return math.exp(total / max(count, 1))
