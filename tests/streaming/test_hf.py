"""The transformers integration (softtargets.streaming.hf): the collator joins stored targets with examples by
key, and a Trainer distils a GPT-2 built from a config from a sequence store."""

from __future__ import annotations

import pytest
import torch

import softtargets as st
from softtargets.errors import JoinMismatchError
from softtargets.precompute.sequences import precompute_sequences
from softtargets.streaming.hf import SequenceCollator, distillation_loss_hf, distillation_trainer
from tests.sequence_data import V, sequences

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _gpt2(seed: int, d: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=d, n_layer=1, n_head=2, bos_token_id=0,
                                   eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def test_collator_and_trainer(tmp_path):
    seqs = sequences(12, seed=5)
    teacher = _gpt2(0, 16).eval()
    precompute_sequences([teacher], seqs, tmp_path / "t.zarr", vocab_size=V, dtype="float32")
    store = st.open_sequences(tmp_path / "t.zarr")
    collate = SequenceCollator(store)
    by_key = dict(seqs)
    batch = collate([{"key": "doc003"}, {"key": "doc007", "input_ids": by_key["doc007"].tolist()}])
    for r, key in enumerate(("doc003", "doc007")):
        x = store.sequence(store.keys().index(key))
        n = len(x["input_ids"])
        assert batch["input_ids"][r, :n].tolist() == by_key[key].tolist()
        assert torch.equal(batch["teacher_logits"][r, :n], x["teacher_logits"])
        assert batch["attention_mask"][r].sum() == n
        assert batch["next_token"][r, :n - 1].tolist() == by_key[key][1:].tolist()
    with pytest.raises(JoinMismatchError, match="doc001"):
        collate([{"key": "doc001", "input_ids": [0, 1]}])
    # alpha=1: the loss is T^2 KL at the real positions; the teacher itself scores 0
    with torch.no_grad():
        own = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert distillation_loss_hf(own, batch, 2.0, 1.0).abs() < 1e-4
    m = batch["attention_mask"].bool()
    p = torch.softmax(batch["teacher_logits"][m] / 2.0, -1)  # against a uniform student, by hand
    ref = 4.0 * (p * (p.log() + torch.log(torch.tensor(float(V))))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss_hf(torch.zeros_like(own), batch, 2.0, 1.0), ref)
    # alpha=0: the next-token cross-entropy of the real, known positions
    ce = torch.nn.functional.cross_entropy(own[m][batch["next_token"][m] >= 0],
                                           batch["next_token"][m][batch["next_token"][m] >= 0])
    torch.testing.assert_close(distillation_loss_hf(own, batch, 2.0, 0.0), ce)

    student = _gpt2(1, 8)
    trainer_cls = distillation_trainer()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False,
                                          learning_rate=1e-2, logging_steps=1)
    examples = [{"key": k} for k in list(store.keys())]
    trainer = trainer_cls(model=student, args=args, train_dataset=examples, data_collator=collate, temperature=2.0,
                          alpha=0.5)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_compact_stores_through_the_collator_and_trainer(tmp_path):
    seqs = sequences(10, seed=6)
    teacher = _gpt2(0, 16).eval()
    specs = {"topk": st.CompactSpec("topk", k=8, temperatures=(1.0, 2.0, 4.0)),
             "hidden": st.CompactSpec("hidden", head="lm_head")}
    for name, spec in specs.items():
        precompute_sequences([teacher], seqs, tmp_path / f"{name}.zarr", vocab_size=V, compact=spec)
        store = st.open_sequences(tmp_path / f"{name}.zarr")
        collate = SequenceCollator(store)
        batch = collate([{"key": "doc002"}, {"key": "doc005"}])
        assert batch["teacher_logits"].dtype == torch.uint8
        with torch.no_grad():
            own = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        compact = store.manifest.compact
        head = store.head() if name == "hidden" else None
        for divergence in ("forward", "reverse", "jsd"):  # the teacher scores 0 under each
            loss = distillation_loss_hf(own, batch, 2.0, 1.0, compact=compact, head=head, divergence=divergence)
            assert abs(float(loss)) < 1e-3, (name, divergence)
        assert float(distillation_loss_hf(torch.zeros_like(own), batch, 2.0, 1.0, compact=compact, head=head)) > 1e-3
        args = transformers.TrainingArguments(output_dir=str(tmp_path / f"out-{name}"), max_steps=2,
                                              per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                              save_strategy="no", remove_unused_columns=False, logging_steps=1)
        trainer = distillation_trainer()(model=_gpt2(1, 8), args=args, data_collator=collate, temperature=2.0,
                                         alpha=0.5, train_dataset=[{"key": k} for k in list(store.keys())])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
