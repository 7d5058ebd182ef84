"""Make the training example's data: 3 small teachers on sklearn digits, their logits in two stores.

    python pipelines/train_example/prepare.py            # -> pipelines/train_example/data/

Writes ``digits.wds`` (WebDataset, one sample per row, the 64 pixels packed beside the
targets as ``input.npy``) and ``digits.zarr`` (targets only, joined to ``DigitsInputs`` by key).
Both hold per-teacher float16 logits ``[1297, 3, 10]``; half the rows keep their label, the
others are unlabelled (-1). Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import digits_data  # noqa: E402

import softtargets as st  # noqa: E402

TEACHERS = 3


def train_teacher(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 120) -> nn.Module:
    """A 64-64-10 MLP, full-batch Adam from its own random start; well under a second on a CPU."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small runs fastest on one thread (no thread hand-offs)
    try:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def prepare(out: Path, overwrite: bool = True) -> dict[str, Path]:
    """Write both stores under ``out``; returns their paths."""
    x_np, y_np, rows = digits_data.split("train")
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    teachers = [train_teacher(x, y, seed) for seed in range(TEACHERS)]
    with torch.no_grad():
        logits = torch.stack([t(x) for t in teachers], dim=1)  # [N, K, C]
    labels = y.clone()
    labels[1::2] = -1  # half the transfer set unlabelled
    keys = digits_data.keys(rows)
    names = [{"name": f"mlp{s}", "sha256": None, "num_params": sum(p.numel() for p in t.parameters())}
             for s, t in enumerate(teachers)]
    transfer = {"name": "sklearn-digits-train", "fingerprint": hashlib.sha256(x_np.tobytes()).hexdigest()}
    paths = {"wds": out / "digits.wds", "zarr": out / "digits.zarr"}
    w = st.create_targets(
        paths["wds"], num_classes=10, teachers=names, layout="wds", sample_layout="sample", dtype="float16",
        shard_rows=512, inputs={"input.npy": "float32 [64] pixel intensities in [0, 1]"}, overwrite=overwrite,
        transfer_set=transfer,
    )
    w.write(keys, logits, labels, inputs=[{"input.npy": row} for row in x_np])
    w.close()
    w = st.create_targets(paths["zarr"], num_classes=10, teachers=names, dtype="float16", shard_rows=512,
                          block_rows=128, overwrite=overwrite, transfer_set=transfer)
    w.write(keys, logits, labels)
    w.close()
    x_test, y_test, _ = digits_data.split("test")
    with torch.no_grad():
        ens = torch.stack([t(torch.from_numpy(x_test)) for t in teachers], dim=1).mean(dim=1)
    acc = float((ens.argmax(-1) == torch.from_numpy(y_test)).float().mean())
    print(f"teachers' geometric ensemble: test accuracy {acc:.3f}; stores in {out}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "data", help="folder for the stores")
    args = parser.parse_args(argv)
    prepare(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
