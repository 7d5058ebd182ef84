"""Small real stores and real corruptions for the sharing tests (inspect, verify, convert, remote), and the
command line run in this process."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

import softtargets as st
from softtargets.cli import main

from .store_data import bits as bits  # re-exported: the sharing tests import them from here
from .store_data import softmax as softmax
from .store_data import store_path

C, K, N = 10, 3, 150


def teachers(k: int = K, tag: str = "") -> list[dict[str, Any]]:
    """K teacher descriptions with fixed weight fingerprints."""
    return [{"name": f"net{i}", "sha256": hashlib.sha256(f"net{i}{tag}".encode()).hexdigest(), "num_params": 1000 + i}
            for i in range(k)]


def teacher_logits(n: int = N, k: int = K, c: int = C, seed: int = 0) -> torch.Tensor:
    """float64 ``[n, k, c]`` logits whose teachers mostly agree with ``labels(n)`` (so accuracy is not trivial)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, c, generator=g, dtype=torch.float64) * 2.0
    y = labels(n, c, seed)
    x[torch.arange(n), :, y] += 2.5
    return x + torch.randn(n, 1, 1, generator=g, dtype=torch.float64) * 3.0


def labels(n: int = N, c: int = C, seed: int = 0) -> torch.Tensor:
    """int64 ``[n]`` labels, every 7th row unlabeled (-1)."""
    y = torch.arange(n, dtype=torch.int64).mul(7 + seed).remainder(c)
    y[::7] = -1
    return y


def sample_keys(n: int, prefix: str = "img", start: int = 0) -> list[str]:
    return [f"{prefix}/{i:06d}.jpg" for i in range(start, start + n)]


def make_store(
    root: Path, layout: str, name: str = "t", *, n: int = N, k: int = K, c: int = C, dtype: str = "float16",
    content: str = "per_teacher", temperature: float | None = None, seed: int = 0, key_prefix: str = "img",
    key_start: int = 0, shard_rows: int = 32, block_rows: int = 8, sample_layout: str = "block",
    with_labels: bool = True, teacher_tag: str = "", transfer_set: dict | None = None,
) -> Path:
    """Write a store of ``n`` rows (keys ``img/000000.jpg``...) through the public writer; returns its path."""
    path = store_path(root, layout, name)
    x = teacher_logits(n, k, c, seed)
    if content != "per_teacher":
        x = st.reduce_teachers(x, content, temperature or 1.0)
    writer = st.create_targets(
        path, num_classes=c, content=content, teachers=teachers(k, teacher_tag), layout=layout, dtype=dtype,
        temperature=temperature, shard_rows=shard_rows, block_rows=block_rows, sample_layout=sample_layout,
        class_names=[f"class{i}" for i in range(c)],
        transfer_set=transfer_set or {"name": "toy", "fingerprint": "f" * 64},
    )
    y = labels(n, c, seed) if with_labels else None
    for lo in range(0, n, 50):
        writer.write(sample_keys(min(50, n - lo), key_prefix, key_start + lo), x[lo:lo + 50],
                     None if y is None else y[lo:lo + 50])
    writer.close()
    return path


def data_file(path: Path, shard_id: int, part: str = "logits") -> Path:
    """The file holding ``part`` of shard ``shard_id`` (the tar for wds), from the manifest."""
    m = json.loads((path / "manifest.json").read_text())
    files = [f["path"] for f in m["shards"][shard_id]["files"]]
    return path / next((f for f in files if f.startswith(f"{part}/")), files[0])


def flip_byte(file: Path, pos: int | None = None) -> None:
    """Flip one bit in the middle of ``file`` (or at ``pos``)."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2 if pos is None else pos] ^= 0x10
    file.write_bytes(bytes(data))


def truncate(file: Path, drop: int = 700) -> None:
    """Cut the last ``drop`` bytes off ``file`` (an interrupted copy)."""
    data = file.read_bytes()
    file.write_bytes(data[: max(0, len(data) - drop)])


def edit_manifest(path: Path, **changes: Any) -> None:
    """Rewrite manifest.json with top-level ``changes``; ``last_rows_delta`` shifts the last shard's row count."""
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    delta = changes.pop("last_rows_delta", 0)
    m["shards"][-1]["rows"] += delta
    m.update(changes)
    mpath.write_text(json.dumps(m))


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    """``relative path -> (size, mtime_ns, mode)`` of every file and folder under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            s = p.stat()
            out[str(p.relative_to(root))] = (s.st_size, s.st_mtime_ns, s.st_mode)
    return out


def all_rows(store: st.TargetStore) -> dict[str, Any]:
    """Every row of ``store`` as one dict (keys list, logits, labels)."""
    return store[0:len(store)]


def assert_same_rows(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Keys, labels and logits bitwise equal."""
    assert a["key"] == b["key"]
    assert torch.equal(a["label"], b["label"])
    assert a["logits"].dtype == b["logits"].dtype
    assert torch.equal(bits(a["logits"]), bits(b["logits"]))


def run_cli(argv: list[Any], capsys: Any) -> tuple[int, str, str]:
    """``softtargets ARGV`` in this process: ``(exit status, stdout, stderr)``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err
