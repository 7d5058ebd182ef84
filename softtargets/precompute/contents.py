"""Stage one's compact contents, per batch on the teachers' device: the teachers' logits ``[R, K, C]`` (and, for
``hidden``, their heads' inputs ``[R, d_k]``) become packed records ``uint8 [R, row_bytes]``, so a full
``[R, C]`` never reaches the CPU. Rows are independent: samples of a classifier, or the token positions of a
language model's batch flattened to rows (masked positions dropped).

:func:`encode_rows` is the one entry point (stage one's runner and sequence pipelines call it); :class:`HeadCapture`
takes a head's input with a forward hook; :func:`head_weights` gives the head a ``hidden`` store keeps once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..store.compact_rows import encode_compact_rows
from ..store.manifest import Manifest

__all__ = ["HeadCapture", "encode_rows", "head_module", "head_weights", "hidden_size_of"]


def head_module(module: nn.Module, name: str) -> nn.Linear:
    """The teacher's output head: its submodule ``name`` (e.g. ``"lm_head"``), an ``nn.Linear``.

    Raises:
        ValueError: no such submodule, or not an ``nn.Linear`` (logits must be ``h W^T + b`` exactly).
    """
    try:
        head = module.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the teacher has no submodule {name!r} to take as its output head; name its final "
                         "nn.Linear (e.g. head='lm_head', head='fc')") from None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the teacher's head {name!r} is a {type(head).__name__}, not an nn.Linear: its logits "
                         "are not h W^T + b")
    return head


def hidden_size_of(modules: Sequence[nn.Module], name: str, content: str) -> int:
    """d of a ``hidden`` store: the heads' input sizes summed (``geometric``) or their common size (``per_teacher``)."""
    sizes = [head_module(m, name).in_features for m in modules]
    if content == "per_teacher" and len(set(sizes)) > 1:
        raise ValueError(f"a per_teacher hidden store needs heads of one input size; got {sizes} (store the "
                         "geometric mean, whose head joins them)")
    return sum(sizes) if content == "geometric" else sizes[0]


def head_weights(modules: Sequence[nn.Module], name: str, content: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The head a ``hidden`` store keeps, float32 on the CPU: ``geometric``: ``W = [W_1, ..., W_K] / K``
    ``[C, sum d_k]`` and ``b = mean_k b_k`` ``[C]`` (so ``W [h_1; ...; h_K] + b`` is the teachers' mean logits);
    ``per_teacher``: ``W [K, C, d]``, ``b [K, C]``."""
    heads = [head_module(m, name) for m in modules]
    ws = [h.weight.detach().float().cpu() for h in heads]
    bs = [h.bias.detach().float().cpu() if h.bias is not None else torch.zeros(h.out_features) for h in heads]
    if content == "geometric":
        return torch.cat(ws, dim=1) / len(ws), torch.stack(bs).mean(dim=0)
    if len(ws) == 1:  # one teacher: its head as it is
        return ws[0], bs[0]
    return torch.stack(ws), torch.stack(bs)


class HeadCapture:
    """Forward hooks on the teachers' head modules that keep each call's input (the last hidden state).

    Use: ``cap = HeadCapture(modules, "lm_head")``; run the teachers; ``cap.take()`` -> one ``[..., d_k]`` tensor
    per teacher (on the device, as the head saw it); ``cap.remove()`` when done.
    """

    def __init__(self, modules: Sequence[nn.Module], name: str) -> None:
        self._seen: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [head_module(m, name).register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._seen[i] = args[0].detach()
        return hook

    def take(self) -> list[torch.Tensor]:
        """The inputs each head saw in its last call (cleared).

        Raises:
            RuntimeError: a head was not called since the last take (the teacher does not use it).
        """
        seen, self._seen = self._seen, [None] * len(self._seen)
        if any(h is None for h in seen):
            raise RuntimeError("a teacher's head module was not called in its forward pass; name the module that "
                               "computes its logits")
        return [h for h in seen if h is not None]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def encode_rows(
    logits: torch.Tensor, store: Manifest, *, hidden: Sequence[torch.Tensor] | torch.Tensor | None = None,
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None, generator: torch.Generator | None = None,
    measure: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rows of teacher logits -> the compact store's packed records, on their device.

    Args:
        logits: ``[R, K, C]`` (or ``[R, C]`` for one teacher), any float dtype, on the teachers' device.
        store: the store's manifest (``writer.spec``): its ``compact`` entry and ``content`` (``geometric``: the
            record summarises the mean logits; ``per_teacher``: each teacher).
        hidden: ``hidden`` stores: the K heads' inputs, ``[R, d_k]`` each (a list, or ``[R, K, d]``).
        head: ``hidden``: ``(weight, bias)`` as :func:`head_weights` gives them, to measure the stored states'
            logit error (optional).
        generator: ``sampled``: the draws' random generator (on the logits' device).
        measure: ``topk``: measure the tail interpolation's error at the grid's midpoints.

    Returns:
        ``(records uint8 [R, row_bytes]`` on the logits' device, ``stats)``: ``tail_error`` (``topk``: the
        largest log-partition error in nats at the midpoints) or ``logit_error`` (``hidden``: the largest
        ``|h W^T + b - logits|``, with ``head``).
    """
    return encode_compact_rows(logits, store, hidden=hidden, head=head, generator=generator, measure=measure)
