"""The README's code runs as written: its tour, its plain-zarr recipe and its two commands."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import numpy as np

import softtargets as st

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(text: str, lang: str) -> list[str]:
    """The fenced ``lang`` code blocks of ``text``, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def marked_block(text: str, marker: str) -> str:
    """The code block right after ``<!-- marker -->``."""
    found = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, flags=re.S)
    assert found, f"README has no block marked {marker!r}"
    return found.group(1)


def test_the_tour_and_the_zarr_recipe_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tour = tmp_path / "tour.py"
    tour.write_text(marked_block(README, "tour"))
    runpy.run_path(str(tour), run_name="__main__")
    out = capsys.readouterr().out.split("\n")
    assert out[0] == "per_teacher 2048 10"
    assert out[1] == "torch.Size([2, 10])"

    store = st.open_targets(tmp_path / "targets.zarr")
    assert len(store) == 2048 and store.manifest.num_teachers == 3
    zarr_recipe = next(b for b in blocks(README, "python") if "zarr.open_group" in b)
    ns = runpy.run_path(str(_write(tmp_path / "zarr_recipe.py", zarr_recipe)))
    np.testing.assert_array_equal(ns["logits"], store[0:1000]["logits"].float().numpy())
    np.testing.assert_array_equal(ns["labels"], store[0:1000]["label"].numpy())


def test_the_sequences_block_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(_write(tmp_path / "sequences.py", marked_block(README, "sequences"))), run_name="__main__")
    assert capsys.readouterr().out.split("\n")[0] == "64 100"
    store = st.open_sequences(tmp_path / "lm.zarr")
    assert store.num_tokens == store.manifest.num_samples and store.manifest.num_teachers == 2


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_readme_commands_are_the_ones_ci_and_the_main_job_use():
    commands = [c.strip() for b in blocks(README, "bash") for c in b.strip().split("\n")]
    tests, main_job = "bash pipelines/bootstrap.sh && .venv/bin/python -m pytest -q", \
        "bash pipelines/bootstrap.sh && .venv/bin/python -m pipelines.digits"
    assert tests in commands and main_job in commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci
    argv = shlex.split(main_job.split("&&")[1])
    assert (ROOT / argv[2].replace(".", "/") / "__main__.py").exists()


def test_every_relative_link_in_readme_and_docs_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
