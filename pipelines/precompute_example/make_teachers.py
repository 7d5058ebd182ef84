"""Setup step of the precompute example: train K tiny digit teachers and save their weights.

    python pipelines/precompute_example/make_teachers.py     # a few seconds on 2 CPU cores

Writes ``work/mlp{k}.pt`` (state dicts) next to this file; ``config.toml`` loads them.
Each teacher sees a different 80 % of the digits and its own seed, so the ensemble disagrees a little.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tiny_teachers import Digits, mlp
from torch import nn


def train(seed: int, data: Digits, epochs: int = 20, batch_size: int = 128) -> nn.Module:
    """One teacher: Adam on a seeded 80 % subset of the digits; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model = mlp(seed=seed)
    rows = torch.randperm(len(data), generator=gen)[: int(0.8 * len(data))]
    x, y = data.x[rows], data.y[rows]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(rows), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "work")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = Digits()
    for k in range(args.teachers):
        model = train(seed=k, data=data)
        with torch.inference_mode():
            acc = (model(data.x).argmax(1) == data.y).float().mean().item()
        torch.save(model.state_dict(), args.out / f"mlp{k}.pt")
        print(f"teacher mlp{k}: accuracy {acc:.3f} on all digits -> {args.out / f'mlp{k}.pt'}")


if __name__ == "__main__":
    main()
