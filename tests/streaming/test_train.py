"""The training loop and ``softtargets train``: a real student learns from a real store."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import softtargets as st
from softtargets.cli import main
from softtargets.streaming.train import TrainConfig, train
from tests.store_data import linear_teachers, write_packed

N, D, C = 256, 8, 5
EXAMPLE = Path(__file__).resolve().parents[2] / "pipelines" / "train_example"


class FlakyLinear(nn.Linear):
    """``nn.Linear`` that raises on its ``fail_at``-th forward call: a crash in the middle of training."""

    def __init__(self, in_features: int, out_features: int, fail_at: int = 0):
        super().__init__(in_features, out_features)
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return super().forward(x)


@pytest.fixture(scope="module")
def packed_store(tmp_path_factory) -> Path:
    """wds store, inputs packed: x [8] float32; 2 teachers = a linear map + noise; half the rows labelled."""
    x, w, logits = linear_teachers(N, D, C)
    labels = (x @ w).argmax(dim=1)
    labels[::2] = -1
    return write_packed(tmp_path_factory.mktemp("train") / "t.wds", x, logits, labels)


def config(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(store=str(store), student="tests.streaming.test_train:FlakyLinear", out=str(out),
                student_kwargs={"in_features": D, "out_features": C}, temperature=2.0, alpha=0.8,
                epochs=4, batch_size=32, lr=0.05, seed=0)
    return TrainConfig(**{**base, **kw})


def test_student_learns_from_the_store(packed_store, tmp_path):
    metrics = train(config(packed_store, tmp_path), progress=False)
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and all(e["samples"] == N for e in epochs)
    assert all(e["labelled"] == N // 2 for e in epochs)
    # The soft term cannot go below alpha T^2 H(p_T), the targets' entropy: compare the excess over that floor.
    store = st.open_targets(packed_store)
    p = store.probs(range(N), temperature=2.0)
    floor = 0.8 * 4.0 * float(-(p * p.log()).sum(dim=1).mean())
    excess = [e["loss"] - floor for e in epochs]
    assert excess == sorted(excess, reverse=True) and excess[-1] < 0.25 * excess[0], (floor, excess)
    assert epochs[0]["accuracy_labelled"] < epochs[-1]["accuracy_labelled"] and epochs[-1]["accuracy_labelled"] > 0.75
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["epochs"] == epochs and saved["steps_per_epoch"] == N // 32
    student = nn.Linear(D, C)
    student.load_state_dict(torch.load(tmp_path / "student.pt"))
    x = torch.stack([torch.from_numpy(store.read_inputs(i)["input.npy"]) for i in range(N)])
    teacher = store[:]["logits"].float().mean(dim=1)
    agree = (student(x).argmax(1) == teacher.argmax(1)).float().mean()
    assert agree > 0.75  # 5 classes: chance is about 0.2


def test_resume_after_a_crash_matches_an_uninterrupted_run(packed_store, tmp_path):
    ref = train(config(packed_store, tmp_path / "ref", epochs=3), progress=False)
    crashed = config(packed_store, tmp_path / "run", epochs=3, checkpoint_every=3,
                     student_kwargs={"in_features": D, "out_features": C, "fail_at": 14})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, progress=False)  # 8 steps per epoch: dies in epoch 2 after its step-3 checkpoint (step 11)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["stream"]["epoch"] == 1 and state["stream"]["consumed"] == [[0, 3]]
    resumed = train(config(packed_store, tmp_path / "run", epochs=3), resume=True, progress=False)
    a = torch.load(tmp_path / "ref" / "student.pt")
    b = torch.load(tmp_path / "run" / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in resumed["epochs"]] == pytest.approx([e["loss"] for e in ref["epochs"]], rel=1e-6)


def test_config_errors(packed_store, tmp_path):
    with pytest.raises(ValueError, match="inputs"):
        config(packed_store, tmp_path, inputs="files")
    with pytest.raises(ImportError, match="cannot import"):
        train(config(packed_store, tmp_path, student="no_such_module:f"), progress=False)
    bad = tmp_path / "bad.toml"
    bad.write_text('[student]\nfactory = "x:y"\n[data]\nstore = "s"\nshuffle = true\n')
    assert main(["train", str(bad)]) == 2  # unknown key [data] shuffle: a clear error, exit 2


@pytest.fixture(scope="module")
def example_data(tmp_path_factory) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("train_example_prepare", EXAMPLE / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    return prepare.prepare(tmp_path_factory.mktemp("example"))


@pytest.mark.parametrize("name, store", [("config.toml", "wds"), ("config_join.toml", "zarr")])
def test_cli_trains_the_example(example_data, tmp_path, name, store, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(EXAMPLE / name), "--store", str(example_data[store]), "--out", str(out),
               "--epochs", "3", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "train: 3 epochs" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert metrics["epochs"][-1]["eval_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert (out / "student.pt").exists() and (out / "checkpoint.pt").exists()
