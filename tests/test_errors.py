"""One errors module: every public exception is a SofttargetsError and still what it was before; errors raised by
real stores carry their facts as attributes. One choices module: every "unknown X" check goes through
parse_choice, with the same message."""

from __future__ import annotations

import pickle
import typing

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import softtargets as st
from softtargets import choices, errors
from softtargets.choices import Autocast, Layout, LossForm, VerifyMode, parse_choice
from tests.store_data import keys, teacher_logits, write_store

OLD_BASES = {
    errors.StoreError: ValueError,
    errors.ChecksumError: errors.StoreError,
    errors.ManifestError: ValueError,
    errors.NonFiniteError: ValueError,
    errors.NonFiniteLogits: ValueError,
    errors.TeacherLoadError: RuntimeError,
    errors.JoinMismatchError: ValueError,
    errors.TrainOutputExists: FileExistsError,
    errors.StorageAccessError: PermissionError,
    errors.PreflightError: RuntimeError,
}


def test_every_public_exception_is_a_softtargets_error_and_keeps_its_old_base():
    public = {getattr(errors, name) for name in errors.__all__} - {errors.SofttargetsError}
    assert public == set(OLD_BASES)
    for cls, base in OLD_BASES.items():
        assert issubclass(cls, errors.SofttargetsError) and issubclass(cls, base), cls


def test_old_import_paths_name_the_same_classes():
    from softtargets.precompute import NonFiniteError
    from softtargets.precompute.teachers import TeacherLoadError
    from softtargets.store.base import ChecksumError, StoreError
    from softtargets.store.encoding import NonFiniteLogits
    from softtargets.store.manifest import ManifestError
    from softtargets.streaming import JoinMismatchError
    from softtargets.streaming.train import TrainOutputExists

    assert (StoreError, ChecksumError, ManifestError, NonFiniteError, NonFiniteLogits, TeacherLoadError,
            JoinMismatchError, TrainOutputExists) == (
        errors.StoreError, errors.ChecksumError, errors.ManifestError, errors.NonFiniteError,
        errors.NonFiniteLogits, errors.TeacherLoadError, errors.JoinMismatchError, errors.TrainOutputExists)
    assert st.SofttargetsError is errors.SofttargetsError and st.JoinMismatchError is JoinMismatchError
    assert {"SofttargetsError", "JoinMismatchError", "StoreError", "ChecksumError"} <= set(st.__all__)


def test_facts_survive_pickling():
    e = errors.ChecksumError("x: bad", path="x", shard=2, expected="aa", found="bb")
    back = pickle.loads(pickle.dumps(e))
    assert (str(back), back.path, back.shard, back.expected, back.found) == ("x: bad", "x", 2, "aa", "bb")
    assert errors.StoreError("m").path is None  # facts the raise site did not have are None


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_a_corrupted_store_raises_checksum_error_with_path_and_shard(tmp_path, layout):
    root = tmp_path / f"t.{layout}"
    m = write_store(root, teacher_logits(48), layout=layout, dtype="float32", shard_rows=16, block_rows=8)
    rel = m.shards[1].files[0].path
    data = bytearray((root / rel).read_bytes())
    data[len(data) // 2] ^= 0x40
    (root / rel).write_bytes(bytes(data))
    with pytest.raises(errors.ChecksumError) as caught:
        st.open_targets(root, verify="full")
    e = caught.value
    assert isinstance(e, ValueError) and e.path.endswith(rel) and e.path in str(e) and e.shard == 1
    assert e.expected == m.shards[1].files[0].sha256 and e.found not in (None, e.expected)


def test_a_missing_manifest_raises_manifest_error_with_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.ManifestError) as caught:
        st.open_targets(tmp_path / "empty")
    assert caught.value.path.endswith("manifest.json") and caught.value.path in str(caught.value)


def test_a_real_join_mismatch_carries_the_keys(tmp_path):
    n = 16
    labels = torch.arange(n) % 4
    root = tmp_path / "t.zarr"
    write_store(root, teacher_logits(n), layout="zarr", labels=labels, shard_rows=8, block_rows=8)
    reversed_set = TensorDataset(torch.arange(n).flip(0).float(), labels.flip(0))
    joined = st.with_targets(reversed_set, st.open_targets(root), by="index")
    with pytest.raises(errors.JoinMismatchError) as caught:
        joined.__getitems__(list(range(n)))
    e = caught.value
    stored, given = labels.numpy(), labels.flip(0).numpy()
    bad = np.flatnonzero(stored != given)
    assert (e.mismatched, e.compared) == (len(bad), n)
    assert e.keys == [keys(n)[i] for i in bad[:3]] and all(repr(k) in str(e) for k in e.keys)


def test_parse_choice_returns_the_value_or_names_the_choices():
    assert parse_choice("layout", "wds", Layout) == "wds"
    assert parse_choice("autocast", None, Autocast | None) is None
    with pytest.raises(ValueError, match=r"^unknown verify mode 'fast'; expected one of 'lazy', 'full', 'none'$"):
        parse_choice("verify mode", "fast", VerifyMode)
    with pytest.raises(ValueError, match=r"^unknown autocast 'tf32'; expected one of 'bf16', 'fp16', None$"):
        parse_choice("autocast", "tf32", typing.Optional[Autocast])  # noqa: UP045 - both spellings work
    with pytest.raises(ValueError, match=r"unknown loss form 'js'; expected one of 'kl', 'ce' \('kl': KL"):
        parse_choice("loss form", "js", LossForm, note="('kl': KL(p || q), 'ce': cross-entropy)")
    assert parse_choice("layout", "zarr", ("zarr", "wds")) == "zarr"  # a collection of values works too


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda tmp: st.create_targets(tmp / "a", num_classes=3, num_teachers=1, layout="parquet"),
         "unknown layout 'parquet'; expected one of 'zarr', 'wds'"),
        (lambda tmp: st.create_targets(tmp / "a.zarr", num_classes=3, num_teachers=1, dtype="int8"),
         "unknown dtype 'int8'; expected one of 'float32', 'float16', 'bfloat16'"),
        (lambda tmp: st.create_targets(tmp / "a.zarr", num_classes=3, num_teachers=1, compressor="lz4"),
         "unknown compressor 'lz4'; expected one of 'none', 'zstd', 'blosc'"),
        (lambda tmp: st.reduce_teachers(torch.zeros(2, 1, 3), "mean"),
         "unknown content 'mean'; expected one of 'per_teacher', 'geometric', 'arithmetic'"),
        (lambda tmp: st.ensemble_probs(torch.zeros(2, 1, 3), rule="median"),
         "unknown ensemble rule 'median'; expected one of 'geometric', 'arithmetic'"),
    ],
)
def test_the_package_checks_its_choices_through_parse_choice(tmp_path, call, message):
    with pytest.raises(ValueError) as caught:
        call(tmp_path)
    assert str(caught.value) == message


def test_the_aliases_agree_with_the_registries():
    from softtargets.store import LAYOUTS
    from softtargets.store.zarr_layout import COMPRESSORS

    assert choices.choices(choices.Layout) == tuple(LAYOUTS)
    assert choices.choices(choices.Compressor) == tuple(COMPRESSORS)


def test_a_missing_teacher_weights_file_names_the_teacher_and_the_path(tmp_path):
    from softtargets.precompute.teachers import load_teachers

    missing = tmp_path / "t0.pt"
    spec = {"name": "t0", "factory": "torch.nn:Linear", "kwargs": {"in_features": 2, "out_features": 3},
            "weights": str(missing)}
    with pytest.raises(errors.TeacherLoadError) as caught:
        load_teachers([spec])
    assert (caught.value.teacher, caught.value.path) == ("t0", str(missing))
