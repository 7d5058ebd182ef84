"""Tests of softtargets.precompute.teachers: real modules, real weight files and archives in tmp_path."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from softtargets.precompute.teachers import (
    Teacher,
    TeacherLoadError,
    fingerprint,
    load_teacher,
    load_teachers,
    num_classes_of,
)
from tests.teacher_zoo import mlp

FACTORY = "tests.teacher_zoo:mlp"
KWARGS = {"in_features": 6, "num_classes": 4, "hidden": 16}
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def original() -> nn.Module:
    torch.manual_seed(0)
    return mlp(**KWARGS).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def _outputs_equal(teacher: Teacher, module: nn.Module, x: torch.Tensor) -> bool:
    with torch.inference_mode():
        return torch.equal(teacher.module(x), module(x))


# ---------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_across_save_and_load(original, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(original.state_dict(), path)
    fresh = mlp(**KWARGS)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fingerprint(fresh) == fingerprint(original)
    assert fingerprint(original) == fingerprint(original)
    assert len(fingerprint(original)) == 64


def test_fingerprint_stable_across_processes(original, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(original.state_dict(), path)
    code = (
        "import torch; from softtargets.precompute.teachers import fingerprint; from tests.teacher_zoo import mlp; "
        f"m = mlp(**{KWARGS!r}); m.load_state_dict(torch.load({str(path)!r}, weights_only=True)); "
        "print(fingerprint(m))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fingerprint(original)


def test_fingerprint_changes_with_one_weight(original):
    before = fingerprint(original)
    with torch.no_grad():
        original[3].weight[2, 7] += 1e-6
    assert fingerprint(original) != before


def test_fingerprint_sees_dtype_and_names():
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2).double()
    b.load_state_dict({k: v.double() for k, v in a.state_dict().items()})
    assert fingerprint(a) != fingerprint(b)
    wrapped = nn.Sequential(a)  # same tensors, keys "0.weight" instead of "weight"
    assert fingerprint(wrapped) != fingerprint(a)


def test_fingerprint_handles_bfloat16_and_scalar_buffers():
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(torch.bfloat16)  # 0-d int64 buffer too
    digest = fingerprint(m)
    assert digest == fingerprint(m)
    with torch.no_grad():
        m[1].num_batches_tracked += 1
    assert fingerprint(m) != digest


# ---------------------------------------------------------------------------- spec kinds


def test_module_spec_named_by_class_and_put_in_eval(original, x):
    original.train()
    teacher = load_teacher(original)
    assert teacher.name == "Sequential"
    assert not teacher.module.training
    assert teacher.num_params == sum(p.numel() for p in original.parameters())
    assert teacher.info() == {"name": "Sequential", "sha256": fingerprint(original),
                              "num_params": teacher.num_params}
    assert load_teacher(original, name="t9").name == "t9"
    assert load_teacher({"name": "t8", "module": original}).name == "t8"


def test_factory_with_pt_weights(original, x, tmp_path):
    path = tmp_path / "t0.pt"
    torch.save(original.state_dict(), path)
    teacher = load_teacher({"name": "t0", "factory": FACTORY, "kwargs": KWARGS, "weights": str(path)})
    assert teacher.name == "t0"
    assert not teacher.module.training
    assert teacher.sha256 == fingerprint(original)
    assert _outputs_equal(teacher, original, x)


def test_factory_with_nested_checkpoint(original, x, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": original.state_dict(), "epoch": 3}, path)
    teacher = load_teacher({"factory": FACTORY, "kwargs": KWARGS, "weights": path,
                            "weights_key": "state_dict"})
    assert teacher.name == "mlp"
    assert _outputs_equal(teacher, original, x)


def test_torchscript(original, x, tmp_path):
    path = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(original), str(path))
        teacher = load_teacher({"name": "ts", "torchscript": str(path)})
    assert not teacher.module.training
    assert teacher.sha256 == fingerprint(original)
    assert _outputs_equal(teacher, original, x)


def test_exported(original, x, tmp_path):
    path = tmp_path / "ex.pt2"
    program = torch.export.export(original, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    teacher = load_teacher({"exported": str(path)})
    assert teacher.name == "ex"
    assert teacher.sha256 == fingerprint(original)
    assert _outputs_equal(teacher, original, x)
    bigger = torch.randn(9, 6)
    assert _outputs_equal(teacher, original, bigger)


def test_exported_in_training_mode_is_refused(original, x, tmp_path):
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(original.train(), (x,)), path)
    with pytest.raises(TeacherLoadError, match=r"'bad'.*training mode"):
        load_teacher({"name": "bad", "exported": str(path)})


def test_safetensors(original, x, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "t0.safetensors"
    safetensors_torch.save_file(original.state_dict(), str(path))
    teacher = load_teacher({"name": "st", "factory": FACTORY, "kwargs": KWARGS, "weights": str(path)})
    assert teacher.sha256 == fingerprint(original)
    assert _outputs_equal(teacher, original, x)


def test_safetensors_missing_names_the_extra(original, tmp_path, monkeypatch):
    path = tmp_path / "t0.safetensors"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"softtargets\[safetensors\]"):
        load_teacher({"name": "st", "factory": FACTORY, "kwargs": KWARGS, "weights": str(path)})


# ---------------------------------------------------------------------------- refusals


class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: what weights_only must prevent."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_weights_only_refuses_arbitrary_objects(original, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({**original.state_dict(), "payload": _Payload(marker)}, path)
    with pytest.raises(TeacherLoadError, match=r"'t0'.*evil\.pt.*weights_only"):
        load_teacher({"name": "t0", "factory": FACTORY, "kwargs": KWARGS, "weights": str(path)})
    assert not marker.exists()


def test_missing_and_unexpected_keys_name_teacher_and_file(original, tmp_path):
    state = original.state_dict()
    state["extra.weight"] = state.pop("3.weight")
    path = tmp_path / "renamed.pt"
    torch.save(state, path)
    with pytest.raises(TeacherLoadError) as info:
        load_teacher({"name": "t3", "factory": FACTORY, "kwargs": KWARGS, "weights": str(path)})
    message = str(info.value)
    assert "'t3'" in message and "renamed.pt" in message
    assert "'3.weight'" in message and "'extra.weight'" in message


def test_shape_mismatch_names_teacher_and_file(original, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(original.state_dict(), path)
    with pytest.raises(TeacherLoadError, match=r"'small'.*w\.pt"):
        load_teacher({"name": "small", "factory": FACTORY, "kwargs": {**KWARGS, "hidden": 8},
                      "weights": str(path)})


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(TeacherLoadError, match="state dict"):
        load_teacher({"name": "t", "factory": FACTORY, "kwargs": KWARGS, "weights": str(path)})


@pytest.mark.parametrize(
    ("factory", "error", "pattern"),
    [
        ("no_such_package.models:mlp", ImportError, r"no_such_package\.models"),
        ("tests.teacher_zoo:nope", ImportError, r"tests\.teacher_zoo:nope"),
        ("tests.teacher_zoo.mlp", ValueError, r"package\.module:function"),
        ("tests.teacher_zoo:not_a_module", TypeError, "not an nn.Module"),
    ],
)
def test_factory_errors_name_the_path(factory, error, pattern):
    with pytest.raises(error, match=pattern):
        load_teacher({"name": "t", "factory": factory})


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "t", "factory": FACTORY, "torchscript": "m.pt"},
        {"name": "t"},
        {"name": "t", "factory": FACTORY, "weigths": "w.pt"},
        {"name": "t", "torchscript": "m.pt", "weights": "w.pt"},
        {"name": "a/b", "module": nn.Linear(2, 2)},
    ],
)
def test_malformed_specs(spec):
    with pytest.raises(ValueError):
        load_teacher(spec)


# ---------------------------------------------------------------------------- ensembles


def test_load_teachers_requires_unique_names(original):
    teachers = load_teachers([{"name": "a", "module": original}, {"name": "b", "module": mlp(6, 4)}])
    assert [t.name for t in teachers] == ["a", "b"]
    assert [t.info() for t in teachers] == [load_teacher(t.module, name=t.name).info() for t in teachers]
    with pytest.raises(ValueError, match=r"'a' at positions \[0, 1\]"):
        load_teachers([{"name": "a", "module": original}, {"name": "a", "module": mlp(6, 4)}])
    with pytest.raises(ValueError):
        load_teachers([])


def test_num_classes_agree(original, x):
    teachers = load_teachers([{"name": "a", "module": original}, {"name": "b", "module": mlp(6, 4, 8)}])
    assert num_classes_of(teachers, x) == 4


def test_num_classes_mismatch_names_every_teacher(original, x):
    teachers = load_teachers([
        {"name": "a", "module": original},
        {"name": "b", "module": mlp(6, 4)},
        {"name": "c", "module": mlp(6, 10)},
    ])
    with pytest.raises(ValueError, match=r"'a': 4, 'b': 4, 'c': 10"):
        num_classes_of(teachers, x)


class _Flatten3d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


@pytest.mark.parametrize(("module", "pattern"), [(_Flatten3d(), "2-D"), (_Pair(), "tuple")])
def test_num_classes_requires_2d_logits(module, pattern, x):
    with pytest.raises(ValueError, match=pattern):
        num_classes_of([load_teacher(module, name="odd")], x)
