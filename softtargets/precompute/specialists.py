"""Stage one for generalist + specialists (Hinton et al. 2015, §5).

A teacher entry that declares ``classes = [...]`` (its subset S, as class ids or the store's class names) is a
*specialist*: its head has ``|S| + 1`` outputs, the subset's classes in the order given, then the dustbin. An
optional ``oversample = f`` (how much more often its training stream held its subset than the transfer set
does, relative to the dustbin: :func:`softtargets.math.specialists.oversampling_factor`) adds ``log f`` to the
dustbin logit. The other teachers form the generalist (the store's logits).

:func:`add_specialists` runs the specialists over the transfer set after the store's logits are written, and
stores beside them, per shard:

* ``specialist/<name>``: each specialist's logits ``[N, |S| + 1]`` float32, dustbin already corrected;
* ``combined``: eq. 5's ``log q`` ``[N, C]`` float32, per row from the generalist's distribution (the store's
  ensemble at T = 1) and the specialists active for the row (their subset holds one of the generalist's
  ``top`` classes), solved batch by batch on the device by
  :func:`softtargets.math.specialists.combine_specialists` (EM; tolerance and the largest residual recorded).

The manifest's ``specialists`` records each specialist's class map (``classes``, ``oversample``), the
generalist's rule, ``top``, the solver, its tolerance and the measured residual.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..choices import Rule
from ..math.specialists import active_specialists, combine_specialists, dustbin_corrected, membership
from ..store import TargetStore, open_targets
from ..store.manifest import Manifest
from ..store.sidecars import SidecarWriter
from .hints import _check_keys
from .options import load_transfer_set, resolve_device
from .teachers import Teacher, TeacherSpec, load_teachers, module_device
from .transfer import TransferSet

__all__ = ["SPECIALIST_KEYS", "add_specialists", "class_ids", "split_specialists"]

SPECIALIST_KEYS = ("classes", "oversample")


def split_specialists(teachers: Sequence[TeacherSpec]) -> tuple[list[TeacherSpec], list[Mapping[str, Any]]]:
    """``(generalist teachers, specialist entries)``: entries with ``classes`` are specialists."""
    general: list[TeacherSpec] = []
    special: list[Mapping[str, Any]] = []
    for t in teachers:
        if isinstance(t, Mapping) and "classes" in t:
            special.append(t)
        elif isinstance(t, Mapping) and "oversample" in t:
            raise ValueError(f"teacher {t.get('name', '?')!r}: 'oversample' is for specialists; declare its "
                             "'classes' too")
        else:
            general.append(t)
    return general, special


def class_ids(classes: Sequence[int | str], num_classes: int, class_names: Sequence[str] | None,
              teacher: str) -> list[int]:
    """A specialist's subset as class ids, from ids or the store's class names.

    Raises:
        ValueError: an unknown class (id outside ``[0, C)`` or a name the store does not have), a repeat, or
            an empty subset, naming the teacher.
    """
    if isinstance(classes, (str, bytes)) or not len(classes):
        raise ValueError(f"specialist {teacher!r}: classes must be a non-empty list of class ids or names")
    names = {n: i for i, n in enumerate(class_names or [])}
    out = []
    for c in classes:
        if isinstance(c, str):
            if c not in names:
                raise ValueError(f"specialist {teacher!r}: unknown class {c!r}; the store's classes are "
                                 f"{list(names)[:20] or f'ids 0..{num_classes - 1} (it records no names)'}")
            out.append(names[c])
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= int(c) < num_classes:
            out.append(int(c))
        else:
            raise ValueError(f"specialist {teacher!r}: unknown class {c!r}; class ids lie in [0, {num_classes})")
    if len(set(out)) != len(out):
        raise ValueError(f"specialist {teacher!r}: a class is named twice in {list(classes)}")
    if len(out) >= num_classes:
        raise ValueError(f"specialist {teacher!r}: its subset holds all {num_classes} classes; a specialist's "
                         "dustbin needs at least one other")
    return out


def add_specialists(
    store: str | os.PathLike[str] | TargetStore,
    specialists: Sequence[Mapping[str, Any]],
    dataset: Any,
    *,
    top: int = 1,
    rule: Rule = "geometric",
    tol: float = 1e-6,
    max_iter: int = 2000,
    batch_size: int = 256,
    device: str = "auto",
) -> Manifest:
    """Run specialist teachers over a finished store's transfer set; store their logits and eq. 5's q.

    Args:
        store: the finished store (URL or open store) holding the generalist's logits.
        specialists: teacher entries (as for :func:`softtargets.precompute`: ``module``, ``factory``, ...) each
            with ``classes`` (ids or class names) and optionally ``oversample``.
        dataset: the transfer set the store was computed on (its keys are checked against the store's).
        top: a specialist is active for a row when its subset holds one of the generalist's ``top`` classes.
        rule: how the generalist's distribution is formed from the store's logits (at T = 1).
        tol: the solver stops when each row's residual ``max_j |q_j - EM(q)_j|`` is below this.
        max_iter: EM steps at most per batch (the manifest records the largest residual reached).
        batch_size: rows per forward pass and per solve.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ...

    Returns:
        The store's new manifest with ``specialists`` (see :mod:`softtargets.store.sidecars` for the arrays).

    Raises:
        ValueError: a subset naming an unknown class, a head whose width is not ``|S| + 1``, keys that differ
            from the store's.
    """
    st = store if isinstance(store, TargetStore) else open_targets(store)
    m = st.manifest
    c = m.num_classes
    if not specialists:
        raise ValueError("no specialists given (teacher entries with 'classes')")
    plain = [{k: v for k, v in s.items() if k not in SPECIALIST_KEYS} for s in specialists]
    loaded = load_teachers(plain)
    subsets = [class_ids(s["classes"], c, m.class_names, t.name) for s, t in zip(specialists, loaded, strict=True)]
    oversample = [s.get("oversample") for s in specialists]
    for t, f in zip(loaded, oversample, strict=True):
        if f is not None and not (isinstance(f, (int, float)) and f > 0):
            raise ValueError(f"specialist {t.name!r}: oversample must be a number > 0, got {f!r}")
    ts = load_transfer_set(dataset)
    if len(ts) != m.num_samples:
        raise ValueError(f"the transfer set has {len(ts)} samples, the store {st.url} {m.num_samples}")
    dev = resolve_device(device)
    homes = [module_device(s["module"]) if isinstance(s.get("module"), torch.nn.Module) else None
             for s in specialists]
    try:
        return _run(st, loaded, subsets, oversample, ts, dev, top, rule, tol, max_iter, batch_size)
    finally:
        for t, home in zip(loaded, homes, strict=True):
            if home is not None:
                t.module.to(home)


def _run(st: TargetStore, loaded: list[Teacher], subsets: list[list[int]], oversample: list[Any], ts: TransferSet,
         dev: torch.device, top: int, rule: Rule, tol: float, max_iter: int, batch_size: int) -> Manifest:
    m = st.manifest
    c = m.num_classes
    example = ts.batch(range(min(2, len(ts)))).x.to(dev)
    for t, subset in zip(loaded, subsets, strict=True):
        t.module.to(dev).eval()
        with torch.inference_mode():
            width = t.module(example).shape[-1]
        if width != len(subset) + 1:
            raise ValueError(f"specialist {t.name!r} has {width} outputs; its {len(subset)} classes need "
                             f"{len(subset) + 1} (its classes, then one dustbin)")
    member = membership(subsets, c, device=dev)
    # the solver takes a specialist's classes in ascending id order (member[m].nonzero()), dustbin last
    orders = [torch.tensor([*np.argsort(s, kind="stable").tolist(), len(s)], device=dev) for s in subsets]
    writer = SidecarWriter(st)
    names = [f"specialist/{t.name}" for t in loaded]
    for name, subset in zip(names, subsets, strict=True):
        writer.begin(name, len(subset) + 1, "float32", "logits")
    writer.begin("combined", c, "float32", "log_q")
    worst, steps = 0.0, 0
    with torch.inference_mode():
        for shard in m.shards:
            spec_parts: list[list[np.ndarray]] = [[] for _ in loaded]
            q_parts: list[np.ndarray] = []
            for lo in range(shard.start, shard.stop, batch_size):
                batch = ts.batch(range(lo, min(lo + batch_size, shard.stop)))
                _check_keys(st, list(batch.keys), lo)
                x = batch.x.to(dev)
                pg = st.probs(np.arange(lo, lo + len(batch.keys)), temperature=1.0, rule=rule,
                              dtype=torch.float64).to(dev)
                probs = []
                for k, (t, f) in enumerate(zip(loaded, oversample, strict=True)):
                    z = t.module(x).float()
                    if f is not None:
                        z = dustbin_corrected(z, f)
                    spec_parts[k].append(z.cpu().numpy())
                    probs.append(torch.softmax(z.double(), -1)[:, orders[k]])
                active = active_specialists(pg, member, top)
                sol = combine_specialists(pg, probs, member, active, tol=tol, max_iter=max_iter)
                worst = max(worst, float(sol.residual.max()))
                steps = max(steps, sol.iterations)
                q_parts.append(sol.log_q.cpu().numpy())
            for name, parts in zip(names, spec_parts, strict=True):
                writer.put(name, shard.id, np.concatenate(parts))
            writer.put("combined", shard.id, np.concatenate(q_parts))
    teachers = []
    for t, subset, f, name in zip(loaded, subsets, oversample, names, strict=True):
        teachers.append({**t.info(), "classes": subset, "oversample": None if f is None else float(f),
                         **writer.end(name)})
    combined = {"solver": "em", "tol": float(tol), "max_iter": int(max_iter), "max_residual": worst,
                "iterations": steps, **writer.end("combined")}
    return writer.commit(specialists={"generalist": {"rule": rule, "temperature": 1.0}, "top": int(top),
                                      "teachers": teachers, "combined": combined})
