"""The textlm pipeline's text: the running Python's standard-library sources, a BPE tokenizer trained on them, and
the token sequences of the transfer set.

The files are the ``*.py`` directly under ``sysconfig.get_paths()["stdlib"]``, sorted by name; every
``heldout_every``-th (from the first) is held out for evaluation. The list is fingerprinted: sha256 over each
file's name and the sha256 of its bytes, in order (recorded in every store's manifest as its transfer set).
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Corpus:
    """The split file list and its fingerprint."""

    root: Path
    train: list[Path]
    heldout: list[Path]
    fingerprint: str

    def transfer_set(self) -> dict[str, str]:
        """The manifest's ``transfer_set`` record."""
        return {"name": f"python-{platform.python_version()}-stdlib", "fingerprint": self.fingerprint}


def stdlib_corpus(max_files: int | None = None, heldout_every: int = 10) -> Corpus:
    """The sorted stdlib file list (the first ``max_files`` of it when given), split and fingerprinted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:max_files]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    heldout = files[::heldout_every]
    train = [p for p in files if p not in set(heldout)]
    return Corpus(root, train, heldout, h.hexdigest())


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (``tokenizers``) trained on ``files``, ``vocab_size`` tokens at most."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([read(p) for p in files], trainer)
    return tok


def encode_files(tok: Any, files: list[Path]) -> list[np.ndarray]:
    """Each file's token ids (int32)."""
    return [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch([read(p) for p in files])]


def stream_of(encoded: list[np.ndarray]) -> torch.Tensor:
    """The files' tokens end to end, int64."""
    return torch.from_numpy(np.concatenate(encoded).astype(np.int64))


def transfer_sequences(files: list[Path], encoded: list[np.ndarray], length: int, count: int
                       ) -> list[tuple[str, np.ndarray, int | None]]:
    """``count`` sequences of ``length`` tokens (key ``"<file>:<start>"``, ids, the token after): the files cut
    into consecutive chunks, then every ``n``-th chunk taken so the set spans all the files."""
    chunks = [(f"{p.name}:{s}", ids[s:s + length], int(ids[s + length]) if s + length < len(ids) else None)
              for p, ids in zip(files, encoded, strict=True) for s in range(0, len(ids) - 1, length)]
    step = max(1, len(chunks) // count)
    return chunks[::step][:count]
