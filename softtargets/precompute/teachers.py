"""Loading the teacher ensemble: module objects, factories by import path, state dicts,
TorchScript archives and ``torch.export`` programs.

Every loader returns a :class:`Teacher`: the module on CPU in ``eval()`` mode plus a
fingerprint of its weights, which the store manifest records so a target set can be
traced back to the exact teachers that produced it.

A teacher maps an input batch ``x: [B, ...]`` to logits ``[B, C]`` (floating point).
:func:`num_classes_of` checks that before stage one writes anything.

Spec forms accepted by :func:`load_teacher`::

    model                                           # an nn.Module; name = class name
    {"name": "t0", "module": model}                 # same, named
    {"name": "t0", "factory": "pkg.mod:fn", "kwargs": {...},
     "weights": "t0.pt" | "t0.safetensors", "weights_key": "state_dict"}
    {"name": "t1", "torchscript": "t1.pt"}          # torch.jit.load
    {"name": "t2", "exported": "t2.pt2"}            # torch.export.load(...).module()

State dicts are read with ``torch.load(..., weights_only=True)`` (never arbitrary
unpickling) or with ``safetensors`` (extra ``softtargets[safetensors]``).
TorchScript and exported programs are code archives: load them only from sources you trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import TeacherLoadError
from ..importing import import_object

__all__ = [
    "Teacher",
    "TeacherLoadError",
    "fingerprint",
    "load_teacher",
    "load_teachers",
    "num_classes_of",
]

TeacherSpec = nn.Module | Mapping[str, Any]
_SOURCE_KEYS = ("module", "factory", "torchscript", "exported")
_SPEC_KEYS = frozenset({"name", "kwargs", "weights", "weights_key", *_SOURCE_KEYS})


@dataclass
class Teacher:
    """One loaded teacher.

    Attributes:
        name: unique name within the ensemble (recorded in the manifest).
        module: the network, in ``eval()`` mode; maps ``[B, ...] -> [B, C]`` logits.
        num_params: number of parameter elements.
        digest: :func:`fingerprint` of ``module``'s weights (hex), or its future while a helper thread
            hashes them (:func:`load_teachers`); read it as :attr:`sha256`.
    """

    name: str
    module: nn.Module
    num_params: int
    digest: str | Future[str] = field(repr=False)

    @property
    def sha256(self) -> str:
        """:func:`fingerprint` of the weights (hex digest); waits for the hashing when it is still running."""
        return self.digest if isinstance(self.digest, str) else self.digest.result()

    def info(self) -> dict[str, Any]:
        """What the store manifest records: ``{"name", "sha256", "num_params"}``."""
        return {"name": self.name, "sha256": self.sha256, "num_params": self.num_params}


# ---------------------------------------------------------------------------- fingerprint


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of ``tensor`` (any dtype) as a flat uint8 array; no copy for contiguous CPU tensors."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy()


def fingerprint(module: nn.Module) -> str:
    """sha256 hex digest of ``module.state_dict()``: stable across processes and runs.

    Entries are visited in sorted key order; for each one the key, dtype, shape and raw
    bytes are hashed, length-prefixed so no two different state dicts share a byte
    stream. Non-tensor entries (``_extra_state``) are hashed by ``repr``. The same weights
    give the same digest whatever the device; changing any element changes it.
    """
    hasher = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        value = state[key]
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                raise ValueError(f"cannot fingerprint {key!r}: it is a meta tensor with no data")
            payload: memoryview | bytes = _tensor_bytes(value).data
            header = f"{key}\0{value.dtype}\0{tuple(value.shape)}\0{len(payload)}\n"
        else:
            payload = repr(value).encode()
            header = f"{key}\0{type(value).__qualname__}\0{len(payload)}\n"
        hasher.update(len(header.encode()).to_bytes(8, "little"))
        hasher.update(header.encode())
        hasher.update(payload)
    return hasher.hexdigest()


def _num_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ---------------------------------------------------------------------------- loaders


def _import_factory(path: str, teacher: str) -> Callable[..., Any]:
    """Resolve ``"package.module:attr[.attr]"`` to a callable."""
    obj = import_object(path, f"teacher {teacher!r}: factory")
    if not callable(obj):
        raise TypeError(f"teacher {teacher!r}: factory {path!r} is not callable")
    return obj


def _read_state_dict(path: str | os.PathLike[str], teacher: str,
                     key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, safely, onto CPU."""
    path = Path(path)
    if not path.is_file():
        raise TeacherLoadError(f"teacher {teacher!r}: weights file {str(path)!r} not found; fix 'weights' in "
                               "its spec", teacher=teacher, path=str(path))
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(f"teacher {teacher!r}: reading {str(path)!r} needs the safetensors "
                              "package: pip install 'softtargets[safetensors]'") from exc
        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise TeacherLoadError(f"teacher {teacher!r}: {str(path)!r} is not a plain state dict "
                                   f"(weights_only load refused it; arbitrary pickles are never "
                                   f"loaded): {exc}", teacher=teacher, path=str(path)) from exc
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise TeacherLoadError(f"teacher {teacher!r}: {str(path)!r} has no entry {key!r}", teacher=teacher,
                                   path=str(path))
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise TeacherLoadError(f"teacher {teacher!r}: {str(path)!r} does not hold a state dict "
                               "(a mapping of str -> Tensor); set 'weights_key' if it is nested",
                               teacher=teacher, path=str(path))
    return dict(obj)


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in sorted(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _load_weights(module: nn.Module, state: dict[str, torch.Tensor], teacher: str, path: str) -> None:
    """``module.load_state_dict(state, strict=True)``, with errors naming teacher and file."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise TeacherLoadError(f"teacher {teacher!r}: weights {path!r} do not fit the factory's "
                               f"module: {'; '.join(parts)}", teacher=teacher, path=str(path))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise TeacherLoadError(f"teacher {teacher!r}: weights {path!r} do not fit the factory's "
                               f"module: {exc}", teacher=teacher, path=str(path)) from exc


def _from_factory(spec: Mapping[str, Any], name: str) -> nn.Module:
    factory = _import_factory(str(spec["factory"]), name)
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"teacher {name!r}: 'kwargs' must be a mapping, got {type(kwargs).__name__}")
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise TeacherLoadError(f"teacher {name!r}: factory {spec['factory']!r} failed with kwargs "
                               f"{sorted(kwargs)}: {exc}; fix 'kwargs' in its spec", teacher=name) from exc
    if not isinstance(module, nn.Module):
        raise TypeError(f"teacher {name!r}: factory {spec['factory']!r} returned "
                        f"{type(module).__name__}, not an nn.Module")
    if spec.get("weights") is not None:
        weights = str(spec["weights"])
        _load_weights(module, _read_state_dict(weights, name, spec.get("weights_key")), name, weights)
    return module


def _training_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Ops in an exported graph called with ``train=True``/``training=True`` (dropout, batch norm)."""
    found = []
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.name not in ("train", "training"):
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if value is True:
                found.append(str(node.target))
    return found


def _from_exported(path: str, name: str) -> nn.Module:
    """``torch.export.load(path).module()``; refuses graphs exported in training mode.

    An exported graph fixes train/eval behaviour at export time and does not support
    ``.eval()``, so a teacher exported in training mode (active dropout, batch-statistics
    batch norm) would give wrong, non-deterministic soft targets.
    """
    program = torch.export.load(path)
    training = _training_ops(program)
    if training:
        raise TeacherLoadError(f"teacher {name!r}: {path!r} was exported in training mode "
                               f"({_few(training, 3)}); call model.eval() before torch.export.export",
                               teacher=name, path=str(path))
    return program.module()


def _spec_name(spec: Mapping[str, Any], source: str) -> str:
    if spec.get("name") is not None:
        return str(spec["name"])
    value = spec[source]
    if source == "module":
        return type(value).__name__
    if source == "factory":
        return str(value).rpartition(":")[2].rpartition(".")[2]
    return Path(str(value)).stem


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip() or "/" in name or "\0" in name:
        raise ValueError(f"teacher name must be a non-empty string without '/', NUL or surrounding "
                         f"whitespace, got {name!r}")
    return name


def _module_from_mapping(spec: Mapping[str, Any]) -> tuple[str, nn.Module]:
    unknown = sorted(set(spec) - _SPEC_KEYS)
    sources = [k for k in _SOURCE_KEYS if spec.get(k) is not None]
    label = spec.get("name", "<unnamed>")
    if unknown:
        raise ValueError(f"teacher {label!r}: unknown spec keys {unknown}; allowed: {sorted(_SPEC_KEYS)}")
    if len(sources) != 1:
        raise ValueError(f"teacher {label!r}: give exactly one of {list(_SOURCE_KEYS)}, got {sources}")
    source = sources[0]
    if source != "factory" and any(spec.get(k) is not None for k in ("kwargs", "weights", "weights_key")):
        raise ValueError(f"teacher {label!r}: 'kwargs'/'weights'/'weights_key' go with 'factory' only")
    name = _check_name(_spec_name(spec, source))
    if source == "module":
        module = spec["module"]
        if not isinstance(module, nn.Module):
            raise TypeError(f"teacher {name!r}: 'module' must be an nn.Module, got {type(module).__name__}")
    elif source == "factory":
        module = _from_factory(spec, name)
    elif source == "torchscript":
        module = torch.jit.load(str(spec["torchscript"]), map_location="cpu")
    else:
        module = _from_exported(str(spec["exported"]), name)
    return name, module


def load_teacher(spec: TeacherSpec, name: str | None = None) -> Teacher:
    """Load one teacher from a module object or a config mapping (see the module docstring).

    Args:
        spec: an ``nn.Module`` or a mapping with exactly one of ``module``, ``factory``,
            ``torchscript``, ``exported`` (plus ``name``; ``kwargs``, ``weights`` and
            ``weights_key`` with ``factory``).
        name: overrides the spec's name. Default: ``spec["name"]``, else the module's class
            name, the factory's function name, or the archive's file stem.

    Returns:
        A :class:`Teacher` whose module is in ``eval()`` mode (exported graphs keep the
        mode they were exported in and are refused if that was training mode).

    Raises:
        ImportError: the factory's module or attribute cannot be imported (names the path),
            or safetensors is needed and not installed.
        TeacherLoadError: weights file refused by ``weights_only``, not a state dict, or
            its keys/shapes do not fit the factory's module (names teacher and file).
        ValueError, TypeError: malformed spec.
    """
    teacher_name, module = _named_module(spec, name)
    return Teacher(name=teacher_name, module=module, num_params=_num_params(module), digest=fingerprint(module))


def _named_module(spec: TeacherSpec, name: str | None = None) -> tuple[str, nn.Module]:
    """``(name, module in eval mode)`` of a spec (see :func:`load_teacher`), not yet fingerprinted."""
    if isinstance(spec, nn.Module):
        teacher_name, module = _check_name(name or type(spec).__name__), spec
    elif isinstance(spec, Mapping):
        teacher_name, module = _module_from_mapping(spec)
        teacher_name = _check_name(name) if name is not None else teacher_name
    else:
        raise TypeError(f"a teacher spec is an nn.Module or a mapping, got {type(spec).__name__}")
    _set_eval(module)
    return teacher_name, module


def _set_eval(module: nn.Module) -> None:
    """``module.eval()``; graphs from ``ExportedProgram.module()`` raise there and keep their mode."""
    # exported graph: train/eval is fixed at export time (checked in _from_exported)
    with contextlib.suppress(NotImplementedError):
        module.eval()


def _explicit_name(spec: TeacherSpec) -> bool:
    """Whether ``spec`` names its teacher (a mapping with ``name``); modules and unnamed specs do not."""
    return isinstance(spec, Mapping) and spec.get("name") is not None


def _unique_names(names: Sequence[str], explicit: Sequence[bool]) -> list[str]:
    """``names`` with default (not explicit) duplicates suffixed ``-0``, ``-1``... in list order.

    Explicit duplicates raise ``ValueError``; a suffixed name never takes one that is given explicitly.
    """
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if explicit[i]:
            seen.setdefault(name, []).append(i)
    dups = {n: idx for n, idx in seen.items() if len(idx) > 1}
    if dups:
        listed = "; ".join(f"{n!r} at positions {idx}" for n, idx in dups.items())
        raise ValueError(f"teacher names must be unique: {listed}; give each spec a distinct 'name'")
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    taken = set(seen)
    out: list[str] = []
    for name, given in zip(names, explicit, strict=True):
        if given or (counts[name] == 1 and name not in taken):
            out.append(name)
            taken.add(name)
            continue
        suffix = 0
        while f"{name}-{suffix}" in taken or f"{name}-{suffix}" in counts:
            suffix += 1
        out.append(f"{name}-{suffix}")
        taken.add(out[-1])
    return out


def load_teachers(specs: Sequence[TeacherSpec]) -> list[Teacher]:
    """Load an ensemble, in order, with unique names.

    Names given in the specs (``"name"``) must be unique: a duplicate raises ``ValueError``. Teachers
    named by default (a plain module's class name, a factory's function name, an archive's file stem)
    that collide are numbered in list order: two ``ResNet`` modules become ``ResNet-0`` and ``ResNet-1``.
    Names key the teachers in the manifest, so give explicit names when the order may change.

    The teachers are fingerprinted on helper threads (sha256 releases the GIL) while the caller goes on:
    reading a teacher's ``sha256`` waits for it. The weights must not change meanwhile (moving a module to
    another device is fine).

    Raises:
        ValueError: no specs, or two specs give the same explicit name.
    """
    if isinstance(specs, (nn.Module, Mapping)) or not isinstance(specs, Sequence):
        raise TypeError("load_teachers takes a sequence of teacher specs; use load_teacher for one")
    if not specs:
        raise ValueError("an ensemble needs at least one teacher")
    named = [_named_module(spec) for spec in specs]
    names = _unique_names([n for n, _ in named], [_explicit_name(spec) for spec in specs])
    pool = ThreadPoolExecutor(min(len(named), os.cpu_count() or 1), thread_name_prefix="softtargets-fingerprint")
    teachers = [Teacher(name=n, module=m, num_params=_num_params(m), digest=pool.submit(fingerprint, m))
                for n, (_, m) in zip(names, named, strict=True)]
    pool.shutdown(wait=False)  # its threads end once the hashing is done
    return teachers


# ---------------------------------------------------------------------------- class count


def _output_classes(teacher: Teacher, example_input: torch.Tensor) -> int:
    """Run ``teacher`` once on ``example_input [B, ...]`` (moved to the module's device) and return C of its
    ``[B, C]`` logits."""
    device = module_device(teacher.module)
    if device is not None and example_input.device != device:
        example_input = example_input.to(device)
    with torch.inference_mode():
        out = teacher.module(example_input)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"teacher {teacher.name!r} returned {type(out).__name__}, "
                         "not a logits tensor [B, C]")
    batch = example_input.shape[0]
    if out.dim() != 2 or out.shape[0] != batch:
        raise ValueError(f"teacher {teacher.name!r} returned shape {tuple(out.shape)} for a batch of "
                         f"{batch}; logits must be 2-D [B, C]")
    if not out.is_floating_point():
        raise ValueError(f"teacher {teacher.name!r} returned dtype {out.dtype}; "
                         "logits must be floating point")
    return int(out.shape[1])


def module_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer; ``None`` for a module with neither."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


def num_classes_of(teachers: Sequence[Teacher], example_input: torch.Tensor) -> int:
    """The class count C all teachers agree on; call before anything is written.

    Each teacher runs once under ``torch.inference_mode()`` (already in eval mode) on
    ``example_input`` ``[B, ...]`` with B >= 1, on whatever device input and modules share.

    Raises:
        ValueError: a teacher's output is not a floating ``[B, C]`` tensor, or the teachers
            disagree on C (the message lists every teacher with its C).
    """
    if not teachers:
        raise ValueError("num_classes_of needs at least one teacher")
    if example_input.dim() == 0 or example_input.shape[0] < 1:
        raise ValueError("example_input must be a batch [B, ...] with B >= 1, "
                         f"got {tuple(example_input.shape)}")
    counts = {t.name: _output_classes(t, example_input) for t in teachers}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n!r}: {c}" for n, c in counts.items())
        raise ValueError(f"teachers disagree on the number of classes: {listed}")
    return next(iter(counts.values()))
