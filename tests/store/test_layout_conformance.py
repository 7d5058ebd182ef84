"""One conformance suite that every registered layout runs (``softtargets.store.LAYOUTS``; wds in both of
its sample layouts): what is written reads back bit for bit, a crashed write resumes without touching
its completed shards, and damage to a data file is named by ``verify_store`` and refused on read.

Public API and real stores only. A new layout joins by being registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import softtargets as st
from softtargets.store import LAYOUTS
from tests.sharing import data_file, truncate
from tests.store_data import TORCH_DTYPE, bits, flip_data_byte, keys, teacher_logits

N, C, SHARD, BLOCK = 45, 10, 16, 4  # shards of 16, 16, 13 rows; blocks of 4


def _cases() -> list[tuple[str, str]]:
    """``(layout, sample_layout)`` for every registered layout; wds stores rows in blocks or one per sample."""
    return [(name, sample) for name in LAYOUTS for sample in (("block", "sample") if name == "wds" else ("block",))]


IDS = [layout if layout != "wds" else f"wds-{sample}" for layout, sample in _cases()]
CASES = [pytest.param(layout, sample, id=i) for (layout, sample), i in zip(_cases(), IDS, strict=True)]


def _path(root: Path, layout: str) -> Path:
    return root / f"t.{'wds' if layout == 'wds' else layout}"


def _writer(root: Path, layout: str, sample: str, *, k: int = 3, dtype: str = "float16",
            **kw) -> st.TargetWriter:
    return st.create_targets(root, num_classes=C, num_teachers=k, layout=layout, sample_layout=sample,
                             dtype=dtype, num_samples=N, shard_rows=SHARD,
                             block_rows=1 if sample == "sample" else BLOCK, **kw)


def _labels(n: int = N) -> torch.Tensor:
    y = torch.arange(n, dtype=torch.int64) % C
    y[::5] = -1  # some rows unlabelled
    return y


def _expected(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Rows as stored: zero-meaned over classes, then cast to the store's dtype."""
    return (x - x.mean(dim=-1, keepdim=True)).to(TORCH_DTYPE[dtype])


def _write(root: Path, layout: str, sample: str, x: torch.Tensor, *, dtype: str = "float16") -> Path:
    path = _path(root, layout)
    w = _writer(path, layout, sample, k=x.shape[1], dtype=dtype)
    for lo in range(0, N, 10):  # batches that straddle blocks and shards
        w.write(keys(min(10, N - lo), lo), x[lo:lo + 10], _labels()[lo:lo + 10])
    w.close()
    return path


def _data_files(root: Path) -> dict[str, bytes]:
    """Every file of the store but its bookkeeping (manifest, card, pending markers)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and ".softtargets" not in str(p.relative_to(root))
            and p.name not in ("manifest.json", "README.md")}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize(("layout", "sample"), CASES)
def test_written_rows_read_back_bit_for_bit(tmp_path, layout, sample, dtype, k):
    x = teacher_logits(N, k=k, c=C, seed=k)
    path = _write(tmp_path, layout, sample, x, dtype=dtype)
    store = st.open_targets(path, verify="full")
    m = store.manifest
    assert (m.layout, m.num_samples, m.dtype, len(m.shards)) == (layout, N, dtype, 3)
    assert len(store) == N
    rows = store[0:N]
    assert rows["key"] == keys(N)
    assert torch.equal(rows["index"], torch.arange(N))
    assert torch.equal(rows["label"], _labels())
    assert rows["logits"].shape == (N, k, C) and rows["logits"].dtype == TORCH_DTYPE[dtype]
    assert torch.equal(bits(rows["logits"]), bits(_expected(x, dtype)))
    some = [44, 0, 17, 16, 3]  # across shards, out of order
    taken = store.take(some)
    assert taken["key"] == [keys(N)[i] for i in some]
    assert torch.equal(bits(taken["logits"]), bits(_expected(x, dtype)[some]))


@pytest.mark.parametrize(("layout", "sample"), CASES)
def test_resume_after_a_crash_keeps_completed_shards_byte_identical(tmp_path, layout, sample):
    x = teacher_logits(N, seed=7)
    path = _path(tmp_path / "crashed", layout)
    crashed = _writer(path, layout, sample)
    crashed.write(keys(36), x[:36])  # shards 0 and 1 complete; rows 32-35 only in the buffer
    del crashed  # never closed: the run died here
    before = _data_files(path)
    assert before
    with pytest.raises(st.ManifestError, match="unfinished"):
        st.open_targets(path)
    w = _writer(path, layout, sample, resume=True)
    assert w.rows_done == 2 * SHARD
    w.write(keys(N - w.rows_done, w.rows_done), x[w.rows_done:])
    w.close()
    after = _data_files(path)
    assert {f: after.get(f) for f in before} == before  # completed shards untouched
    ref = _path(tmp_path / "ref", layout)
    rw = _writer(ref, layout, sample)
    rw.write(keys(N), x)
    rw.close()
    assert after == _data_files(ref)  # same bytes as a run that never crashed
    assert st.verify_store(path).ok
    assert st.open_targets(path, verify="full")[0:N]["key"] == keys(N)


@pytest.fixture(params=_cases(), ids=IDS)
def sound(request, tmp_path) -> Path:
    layout, sample = request.param
    return _write(tmp_path, layout, sample, teacher_logits(N, seed=3))


def test_verify_store_passes_a_sound_store(sound):
    report = st.verify_store(sound, progress=False)
    assert report.ok, report.problems
    assert report.num_samples == N and report.num_shards == 3


def _named(report: st.VerifyReport, root: Path, file: Path) -> bool:
    """The report is not ok and names ``file`` by its path in the store."""
    rel = file.relative_to(root).as_posix()
    return not report.ok and any(str(p.path).endswith(rel) for p in report.problems)


def test_verify_store_names_a_logits_file_with_a_flipped_byte(sound):
    bad = data_file(sound, 1)
    flip_data_byte(bad)
    report = st.verify_store(sound, progress=False)
    assert _named(report, sound, bad), report.problems
    assert all(str(p.path).endswith(bad.relative_to(sound).as_posix()) for p in report.problems), report.problems


def test_verify_store_names_a_missing_file(sound):
    gone = data_file(sound, 2)
    gone.unlink()
    report = st.verify_store(sound, progress=False)
    assert _named(report, sound, gone), report.problems


def test_verify_store_names_a_truncated_file(sound):
    short = data_file(sound, 0)
    truncate(short, drop=100)
    report = st.verify_store(sound, progress=False)
    assert _named(report, sound, short), report.problems


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_open_targets_refuses_a_flipped_byte_on_read(sound, verify):
    bad = data_file(sound, 1)
    flip_data_byte(bad)
    with pytest.raises(st.ChecksumError):
        store = st.open_targets(sound, verify=verify)
        store[0:N]  # lazy: the shard is checked on its first read
    assert st.open_targets(sound, verify="none")[0:SHARD]["key"] == keys(SHARD)  # the sound shard still reads
