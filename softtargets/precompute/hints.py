"""Stage one for FitNets hints: a teacher's named intermediate activations, stored beside the logits.

:func:`add_hints` runs the teachers that have hints over the transfer set once more (after the logits are
stored; the main pass is unchanged), captures each named module's output with a forward hook, flattens it to
``[B, D]`` and writes it as array ``hint/<name>`` (float16 by default) of the finished store, declared in the
manifest's ``hints`` (see :mod:`softtargets.store.sidecars`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..store import TargetStore, open_targets
from ..store.manifest import Manifest
from ..store.sidecars import SidecarWriter
from .options import load_transfer_set, resolve_device
from .teachers import Teacher, TeacherSpec, load_teachers, module_device

__all__ = ["HintSpec", "add_hints", "capture_activations", "parse_hints"]


@dataclass(frozen=True)
class HintSpec:
    """One hint: the output of module ``module`` (a name from ``named_modules()``) of teacher ``teacher``,
    stored as array ``hint/<name>``."""

    name: str
    teacher: str
    module: str


def parse_hints(hints: Sequence[str] | Mapping[str, str], teachers: Sequence[str]) -> list[HintSpec]:
    """Hints given as ``["TEACHER:MODULE", ...]`` (named by the module) or ``{name: "TEACHER:MODULE"}``;
    ``MODULE`` alone where there is one teacher.

    Raises:
        ValueError: an unknown teacher, a malformed entry or a repeated name.
    """
    items = list(hints.items()) if isinstance(hints, Mapping) else [(None, h) for h in hints]
    out: list[HintSpec] = []
    for name, where in items:
        teacher, sep, module = str(where).rpartition(":")
        if not sep:
            if len(teachers) != 1:
                raise ValueError(f"hint {where!r}: name the teacher, as 'TEACHER:MODULE' (teachers: {list(teachers)})")
            teacher = teachers[0]
        if teacher not in teachers:
            raise ValueError(f"hint {where!r}: no teacher {teacher!r}; teachers: {list(teachers)}")
        if not module:
            raise ValueError(f"hint {where!r}: name a module, as 'TEACHER:MODULE'")
        out.append(HintSpec(name or module, teacher, module))
    names = [h.name for h in out]
    if len(set(names)) != len(names):
        raise ValueError(f"hint names repeat: {names}; give them as {{name: 'TEACHER:MODULE'}}")
    return out


@contextlib.contextmanager
def capture_activations(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on ``module``'s submodules ``names``: inside the block, each forward pass puts each one's
    output, flattened to ``[B, D]``, into the yielded dict under its name.

    Raises:
        ValueError: a name ``named_modules()`` does not know (the message lists some it does).
    """
    modules = dict(module.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        known = [n for n in modules if n][:12]
        raise ValueError(f"no module {missing[0]!r} in {type(module).__name__}; its modules include {known}")
    found: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(_mod: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"module {name!r} returned {type(output).__name__}; a hint must be a tensor")
            found[name] = output.detach().reshape(output.shape[0], -1)
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _moved_back(module: nn.Module, home: torch.device | None) -> Iterator[None]:
    """Put the caller's module back on its device afterwards (as :func:`softtargets.precompute` does)."""
    try:
        yield
    finally:
        if home is not None:
            module.to(home)


def _check_keys(store: TargetStore, keys: list[str], start: int) -> None:
    stored = store.rows(start, start + len(keys))["key"]
    if list(stored) != list(keys):
        raise ValueError(f"{store.url}: the transfer set's keys differ from the store's at rows {start}.."
                         f"{start + len(keys) - 1}: give the transfer set the logits were computed on")


def add_hints(
    store: str | os.PathLike[str] | TargetStore,
    teachers: Sequence[TeacherSpec | Teacher],
    hints: Sequence[str] | Mapping[str, str],
    dataset: Any,
    *,
    dtype: str = "float16",
    batch_size: int = 256,
    device: str = "auto",
) -> Manifest:
    """Store teachers' intermediate activations beside a finished store's logits.

    Args:
        store: the finished store (URL or open store) whose rows are ``dataset``'s rows.
        teachers: the teachers (specs as for :func:`softtargets.precompute`, or loaded); only those named by a
            hint run.
        hints: ``["TEACHER:MODULE", ...]`` or ``{name: "TEACHER:MODULE"}`` (:func:`parse_hints`).
        dataset: the transfer set the store was computed on (its keys are checked against the store's).
        dtype: ``"float16"`` (the default; values beyond ±65504 are refused) or ``"float32"``.
        batch_size: rows per forward pass.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:1"``, ...

    Returns:
        The store's new manifest, with ``hints`` ``{name: {"teacher", "module", "array": "hint/<name>",
        "shape": [N, D], "dtype", ...}}`` (arrays read back by :func:`softtargets.read_array` and streamed
        by ``stream(..., arrays=[...])``).
    """
    st = store if isinstance(store, TargetStore) else open_targets(store)
    loaded = [t for t in teachers if isinstance(t, Teacher)]
    if len(loaded) != len(teachers):
        loaded = load_teachers([t.module if isinstance(t, Teacher) else t for t in teachers])
    by_name = {t.name: t for t in loaded}
    specs = parse_hints(hints, list(by_name))
    ts = load_transfer_set(dataset)
    m = st.manifest
    if len(ts) != m.num_samples:
        raise ValueError(f"the transfer set has {len(ts)} samples, the store {st.url} {m.num_samples}")
    dev = resolve_device(device)
    writer = SidecarWriter(st)
    records: dict[str, dict[str, Any]] = dict(m.hints or {})
    for teacher_name in dict.fromkeys(h.teacher for h in specs):
        mine = [h for h in specs if h.teacher == teacher_name]
        module = by_name[teacher_name].module
        home = module_device(module)
        module.to(dev).eval()
        begun = False
        with _moved_back(module, home), capture_activations(module, [h.module for h in mine]) as found, \
                torch.inference_mode():
            for shard in m.shards:
                parts: dict[str, list[torch.Tensor]] = {h.module: [] for h in mine}
                for lo in range(shard.start, shard.stop, batch_size):
                    batch = ts.batch(range(lo, min(lo + batch_size, shard.stop)))
                    _check_keys(st, list(batch.keys), lo)
                    module(batch.x.to(dev))
                    for h in mine:
                        parts[h.module].append(found[h.module].float().cpu())
                if not begun:
                    for h in mine:
                        writer.begin(f"hint/{h.name}", parts[h.module][0].shape[1], dtype, "hint")
                    begun = True
                for h in mine:
                    writer.put(f"hint/{h.name}", shard.id, torch.cat(parts[h.module]).numpy())
        for h in mine:
            rec = writer.end(f"hint/{h.name}")
            records[h.name] = {"teacher": teacher_name, "module": h.module, **rec}
    return writer.commit(hints=records)
