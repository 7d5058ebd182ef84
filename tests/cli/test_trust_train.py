"""``softtargets train`` keeps earlier runs and reports epochs truly; bars stay off a pipe; ``--json`` summaries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import softtargets as st
from softtargets.cli import main
from tests.cli.test_precompute_config import write_config
from tests.store_data import linear_teachers, write_packed
from tests.teacher_zoo import mlp

N, D, C = 256, 8, 5
BAR = re.compile(r"\[\d\d:\d\d")  # tqdm's "[elapsed<remaining, rate]": in every bar, in no summary or log line
TRIP: dict[str, int | None] = {"rows_left": None}  # set: the tripwire teacher raises once it has seen more rows


class Tripwire(nn.Sequential):
    """:func:`tests.teacher_zoo.mlp` (same weights' keys) that raises once ``TRIP["rows_left"]`` rows are used up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if TRIP["rows_left"] is not None:
            TRIP["rows_left"] -= len(x)
            if TRIP["rows_left"] < 0:
                raise RuntimeError("simulated crash")
        return super().forward(x)


def tripwire_mlp(in_features: int, num_classes: int, hidden: int = 16) -> nn.Module:
    return Tripwire(*mlp(in_features, num_classes, hidden))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """wds store of N rows, inputs packed (x [8] float32), 2 teachers = a linear map + noise."""
    x, w, logits = linear_teachers(N, D, C)
    return write_packed(tmp_path_factory.mktemp("trust_train") / "t.wds", x, logits, (x @ w).argmax(dim=1))


def write_train_config(tmp_path: Path, store: Path, epochs: int = 2) -> Path:
    config = tmp_path / "train.toml"
    config.write_text(f"""[student]
factory = "torch.nn:Linear"
kwargs = {{ in_features = {D}, out_features = {C} }}

[data]
store = "{store}"

[loss]
temperature = 2.0
alpha = 0.8

[train]
epochs = {epochs}
batch_size = 64
lr = 0.05
out = "run"
""")
    return config


def train_cli(config: Path, *flags: str) -> int:
    return main(["train", str(config), "--quiet", *flags])


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_a_new_run_into_an_earlier_runs_folder_is_refused_and_changes_nothing(tmp_path, store, capsys):
    config = write_train_config(tmp_path, store)
    out = tmp_path / "run"
    assert train_cli(config) == 0
    before = snapshot(out)
    assert set(before) == {"student.pt", "metrics.json", "checkpoint.pt"}
    capsys.readouterr()
    assert train_cli(config, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_overwrite_deletes_only_the_runs_own_files(tmp_path, store, capsys):
    config = write_train_config(tmp_path, store)
    out = tmp_path / "run"
    assert train_cli(config) == 0
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"png")
    (out / "metrics.json.tmp").write_text("{")  # a save cut short
    assert train_cli(config, "--overwrite", "--epochs", "1") == 0, capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "loss.png").read_bytes() == b"png"
    assert not (out / "metrics.json.tmp").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1]
    assert metrics["epochs_done"] == 1 and metrics["epochs_run"] == 1 and metrics["config"]["epochs"] == 1


def test_resume_with_no_more_epochs_to_train_says_so_and_changes_nothing(tmp_path, store, capsys):
    config = write_train_config(tmp_path, store, epochs=3)
    out = tmp_path / "run"
    assert train_cli(config) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert train_cli(config, "--resume", "--epochs", "2") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("train: already trained 3 epochs; nothing to do"), line
    assert "--epochs 5 trains 2 more" in line
    assert train_cli(config, "--resume", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs_done"] == 3 and summary["epochs_run"] == 0 and summary["nothing_to_do"] is True
    assert summary["student"] == str(out / "student.pt")
    assert snapshot(out) == before


def test_resume_trains_the_missing_epochs_and_reports_run_and_total(tmp_path, store, capsys):
    config = write_train_config(tmp_path, store, epochs=1)
    assert train_cli(config) == 0
    capsys.readouterr()
    assert train_cli(config, "--resume", "--epochs", "3") == 0
    line = capsys.readouterr().out
    assert line.startswith("train: 2 epochs (epochs 2-3 of 3), final loss"), line
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["epochs_done"] == 3 and metrics["epochs_run"] == 2 and metrics["config"]["epochs"] == 3
    # The same student as one uninterrupted 3-epoch run.
    assert train_cli(config, "--out", str(tmp_path / "whole"), "--epochs", "3", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs_done"] == summary["epochs_run"] == summary["epochs_requested"] == 3
    a, b = torch.load(tmp_path / "run" / "student.pt"), torch.load(tmp_path / "whole" / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def crash_precompute(config: Path, *flags: str) -> None:
    """Run precompute with tripwire teachers until they die in shard 1: shard 0's 16 rows are kept."""
    TRIP["rows_left"] = 40  # rows seen by both teachers: shard 0 passes (2 x 16), shard 1's first batch dies
    try:
        assert main(["precompute", str(config), "--quiet", *flags]) == 2
    finally:
        TRIP["rows_left"] = None


def test_precompute_after_resume_counts_only_the_rows_it_computed(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)  # 40 rows, shards of 16: 16 + 16 + 8
    config.write_text(config.read_text().replace("tests.teacher_zoo:mlp", "tests.cli.test_trust_train:tripwire_mlp"))
    crash_precompute(config)
    assert "simulated crash" in capsys.readouterr().err
    assert main(["precompute", str(config), "--quiet", "--resume"]) == 0
    line = capsys.readouterr().out
    assert re.search(r"\([\d,]+ samples/s over the 24 samples computed in this run\)", line), line
    crash_precompute(config, "--overwrite")
    capsys.readouterr()
    assert main(["precompute", str(config), "--quiet", "--resume", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_computed"] == 24 and summary["samples"] == 40 and summary["shards"] == 3
    assert summary["samples_per_s"] == pytest.approx(24 / summary["seconds"])


def test_json_summaries_of_precompute_convert_merge_and_subset(tmp_path, capsys):
    config, _, _ = write_config(tmp_path)
    assert main(["precompute", str(config), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    src = tmp_path / "out.zarr"
    assert s["url"] == str(src) and s["samples"] == 40 and s["shards"] == 3 and s["rows_computed"] == 40
    assert s["logits_shape"] == [40, 4] and s["content"] == "geometric" and s["dtype"] == "float32"
    assert s["bytes"] == st.open_targets(src).manifest.nbytes and s["nothing_to_do"] is False
    wds = tmp_path / "c.wds"
    assert main(["convert", str(src), str(wds), "--dtype", "float16", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["src"], s["dst"], s["samples"], s["layout"], s["dtype"]) == (str(src), str(wds), 40, "wds", "float16")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert main(["subset", str(src), str(a), "--range", "0:10", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["dst"], s["samples"], s["range"], s["keys"]) == (str(a), 10, "0:10", None)
    assert main(["subset", str(src), str(b), "--range", "10:", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 30
    merged = tmp_path / "m.zarr"
    assert main(["merge", str(b), str(a), str(merged), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["sources"] == [str(b), str(a)] and s["dst"] == str(merged) and s["samples"] == 40
    assert st.open_targets(merged)[:]["key"][:2] == ["img-010", "img-011"]


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, store, capsys):
    """capsys's stderr is no terminal: every command runs with its bars allowed, and none may draw one."""
    config, _, _ = write_config(tmp_path)
    src, wds = tmp_path / "out.zarr", tmp_path / "c.wds"
    runs = [
        ["train", str(write_train_config(tmp_path, store, epochs=1))],
        ["precompute", str(config)],
        ["convert", str(src), str(wds)],
        ["subset", str(src), str(tmp_path / "a.zarr"), "--range", "0:10"],
        ["subset", str(src), str(tmp_path / "b.zarr"), "--range", "10:"],
        ["merge", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), str(tmp_path / "m.zarr")],
        ["inspect", str(wds)],
        ["verify", str(wds)],
    ]
    for argv in runs:
        assert main(argv) == 0, argv
        out, err = capsys.readouterr()
        assert not BAR.search(err), (argv, err)
        assert not BAR.search(out), (argv, out)
        if argv[0] == "train":  # the epoch line is on stderr; stdout holds the summary alone
            assert out.startswith("train: 1 epoch,") and len(out.strip().splitlines()) == 1, out
            assert re.search(r"^epoch 1 +loss", err, re.M), err
