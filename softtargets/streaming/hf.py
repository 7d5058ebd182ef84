"""Training a ``transformers`` model from a sequence store: a collator that joins stored targets with the
examples of a dataset, and a ``Trainer`` whose ``compute_loss`` distils from them (optional extra ``[text]``).

    from softtargets.streaming.hf import SequenceCollator, distillation_trainer

    store = st.open_sequences("lm.zarr")
    train = [{"key": k} for k in store.keys()]          # or tokenized examples with "key" and "input_ids"
    Trainer = distillation_trainer()                     # a transformers.Trainer subclass
    trainer = Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=train, data_collator=SequenceCollator(store), temperature=2.0, alpha=0.5)
    trainer.train()

A batch holds ``input_ids`` and ``attention_mask`` (what the model takes), ``teacher_logits`` ``[B, L, V]`` and
``next_token`` ``[B, L]`` (the stored label of each position: the token after it, ``-100`` where padded or
unknown). Targets are not shifted: position ``t``'s target is the distribution of the token after ``t``, which is
what a causal LM's logits at ``t`` predict. The loss is ``alpha * T^2 KL(teacher || student) + (1 - alpha) *
CE(next token)`` over the real positions (:func:`~softtargets.kd_loss`). From a compact store (``topk``,
``sampled``, ``hidden``) ``teacher_logits`` holds its packed records ``uint8 [B, L, row_bytes]`` and the soft term
is :func:`~softtargets.compact_kd_loss` (``hidden``: with the store's head, moved to the logits' device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import JoinMismatchError
from ..math.compact import unpack_record
from ..math.compact_losses import Divergence, compact_kd_loss
from ..math.losses import kd_loss
from ..store.sequences import SequenceStore

IGNORE = -100  # transformers' ignore index

__all__ = ["SequenceCollator", "distillation_loss_hf", "distillation_trainer"]


class SequenceCollator:
    """Joins dataset examples with their stored targets, by the example's sequence ``key``.

    Args:
        store: the sequence store.
        pad_id: input id of padded positions.
        max_length: crop sequences to this many positions (``None``: whole).

    Raises (when called):
        KeyError: an example's key is not in the store.
        JoinMismatchError: an example's own ``input_ids`` differ from the ids stored with its targets.
    """

    def __init__(self, store: SequenceStore, pad_id: int = 0, max_length: int | None = None):
        self.store, self.pad_id, self.max_length = store, int(pad_id), max_length
        self._index: dict[str, int] | None = None

    def index_of(self, key: str) -> int:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.store.keys())}
        try:
            return self._index[str(key)]
        except KeyError:
            raise KeyError(f"no sequence with key {key!r} in {self.store.url}") from None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = []
        for ex in examples:
            x = self.store.sequence(self.index_of(ex["key"]))
            if "input_ids" in ex and list(map(int, ex["input_ids"])) != x["input_ids"].tolist():
                raise JoinMismatchError(f"example {ex['key']!r}: its input_ids differ from those stored with its "
                                        f"targets in {self.store.url} (another tokenizer or text?)")
            seqs.append(x)
        lengths = [len(x["input_ids"]) if self.max_length is None else min(len(x["input_ids"]), self.max_length)
                   for x in seqs]
        width = max(lengths)
        first = seqs[0]["teacher_logits"]
        out = {
            "input_ids": torch.full((len(seqs), width), self.pad_id, dtype=torch.int64),
            "attention_mask": torch.zeros((len(seqs), width), dtype=torch.int64),
            "teacher_logits": first.new_zeros((len(seqs), width, *first.shape[1:])),
            "next_token": torch.full((len(seqs), width), IGNORE, dtype=torch.int64),
        }
        for r, (x, n) in enumerate(zip(seqs, lengths, strict=True)):
            out["input_ids"][r, :n] = x["input_ids"][:n]
            out["attention_mask"][r, :n] = 1
            out["teacher_logits"][r, :n] = x["teacher_logits"][:n]
            out["next_token"][r, :n] = torch.where(x["label"][:n] >= 0, x["label"][:n], IGNORE)
        return out


def distillation_loss_hf(logits: torch.Tensor, inputs: dict[str, torch.Tensor], temperature: float,
                         alpha: float, *, compact: dict[str, Any] | None = None,
                         head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                         divergence: Divergence = "forward") -> torch.Tensor:
    """``alpha * T^2 D(teacher || student) + (1 - alpha) * CE(next token)`` over real positions.

    Args:
        logits: the student's ``[B, L, V]``.
        inputs: a :class:`SequenceCollator` batch (``attention_mask``, ``teacher_logits``, ``next_token``).
        temperature: T > 0.
        alpha: weight of the soft term in ``[0, 1]``.
        compact: a compact store's manifest entry (``store.manifest.compact``): ``teacher_logits`` are its records.
        head: ``hidden`` stores: the head ``(weight [V, d], bias [V])`` on the logits' device.
        divergence: compact stores: ``forward`` KL (dense stores: always), ``reverse`` or ``jsd``.
    """
    mask = inputs["attention_mask"].bool()
    if not alpha:
        soft = logits.new_zeros(())
    elif compact is None:
        soft = kd_loss(logits[mask], inputs["teacher_logits"][mask], temperature)
    else:
        fields = unpack_record(inputs["teacher_logits"][mask], compact["fields"])
        soft = compact_kd_loss(logits[mask].float(), fields, compact, temperature, divergence=divergence, head=head)
    hard = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), inputs["next_token"].reshape(-1),
                           ignore_index=IGNORE) if alpha < 1 else logits.new_zeros(())
    return alpha * soft + (1 - alpha) * hard


def distillation_trainer() -> type:
    """A ``transformers.Trainer`` subclass (made on call: ``transformers`` is imported only then) taking
    ``temperature``, ``alpha`` and ``divergence`` keyword arguments, whose ``compute_loss`` is
    :func:`distillation_loss_hf` (for a compact store, the one its :class:`SequenceCollator` reads).

    Raises:
        ImportError: ``transformers`` (and ``accelerate``) are not installed: ``pip install softtargets[text]``.
    """
    try:
        from transformers import Trainer
    except ImportError as e:
        raise ImportError(f"the transformers integration needs the [text] extra ({e})") from None

    class DistillationTrainer(Trainer):
        """``Trainer`` distilling from :class:`SequenceCollator` batches (see the module docstring)."""

        def __init__(self, *args: Any, temperature: float = 1.0, alpha: float = 0.5,
                     divergence: Divergence = "forward", **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.temperature, self.alpha, self.divergence = float(temperature), float(alpha), divergence
            self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None

        def _compact(self, device: torch.device) -> tuple[dict[str, Any] | None, Any]:
            store = getattr(self.data_collator, "store", None)
            compact = store.manifest.compact if store is not None else None
            if store is None or compact is None or compact["kind"] != "hidden":
                return compact, None
            if self._head is None or self._head[0].device != device:
                w, b = store.head()
                self._head = (w.to(device), None if b is None else b.to(device))
            return compact, self._head

        def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            targets = {k: inputs.pop(k) for k in ("teacher_logits", "next_token")}
            outputs = model(**inputs)
            logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
            compact, head = self._compact(logits.device)
            loss = distillation_loss_hf(logits, {**inputs, **targets}, self.temperature, self.alpha,
                                        compact=compact, head=head, divergence=self.divergence)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer
