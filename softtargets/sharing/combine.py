"""Merge stores over disjoint parts of a transfer set, and cut a subset out of one store.

Both stream shard by shard through :class:`softtargets.sharing.convert.ShardSink` and copy the
stored bits exactly. ``merge`` first checks, in bounded memory, that no key is in two
stores (:mod:`softtargets.sharing.unique_keys`); ``subset`` by keys first finds the rows, so each
writes only once it knows the destination's size. Views stores: ``subset`` by sample keys keeps every view
of each sample, with its parameters; ``merge`` interleaves views stores view by view (rows stay view-major
over all their samples); a row range is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..store import TargetStore, open_targets
from ..store.manifest import Manifest
from ..store.views import VIEW_SEP, ViewParams, Views, split_view_key, views_of, write_params_files
from .convert import (
    ShardSink,
    carry_spec,
    carry_views,
    derive,
    encode_rows,
    lineage_entry,
    plan_layout,
    same_location,
    views_declaration,
)
from .unique_keys import KeyChecker, str_array

# Fields that must agree between merged stores (teachers are compared by name and sha256).
MERGE_FIELDS = ("num_classes", "class_names", "content", "temperature", "dtype", "normalization", "num_teachers")


def _teachers(m: Manifest) -> list[tuple[str, str | None]]:
    return [(t["name"], t.get("sha256")) for t in m.teachers]


def check_compatible(stores: Sequence[TargetStore]) -> None:
    """Refuse stores that differ in teachers, classes, content, dtype, temperature or normalisation.

    The error names every differing field and the stores that differ from the first.
    """
    first = stores[0]
    problems = []
    for field in (*MERGE_FIELDS, "teachers"):
        get = _teachers if field == "teachers" else (lambda m, f=field: getattr(m, f))
        want = get(first.manifest)
        for s in stores[1:]:
            got = get(s.manifest)
            if got != want:
                problems.append(f"{field}: {first.url} has {want!r}, {s.url} has {got!r}")
    if problems:
        raise ValueError("cannot merge stores that differ in " + "; ".join(problems))


def merged_transfer_set(manifests: Sequence[Manifest], num_samples: int) -> dict[str, Any] | None:
    """The transfer set of merged stores: the common one when all agree, else one naming its parts.

    For differing parts the fingerprint is sha256 over ``"merge:"`` and the parts' fingerprints in order.
    """
    sets = [m.transfer_set for m in manifests]
    if all(s is None for s in sets):
        return None
    if all(s == sets[0] for s in sets):
        return sets[0]
    parts = [s or {"name": "(not recorded)", "fingerprint": ""} for s in sets]
    digest = hashlib.sha256(("merge:" + "\n".join(p["fingerprint"] for p in parts)).encode()).hexdigest()
    names = list(dict.fromkeys(p["name"] for p in parts))
    return {"name": " + ".join(names), "fingerprint": digest, "num_samples": num_samples, "parts": parts}


def _shard_keys(store: TargetStore, shard_id: int) -> np.ndarray:
    return str_array(store._read_keys(shard_id))


def check_disjoint(stores: Sequence[TargetStore], *, tmpdir: str | None = None, progress: bool | None = None) -> None:
    """Refuse stores any two of which share a key (also catches a key repeated within one store)."""
    offsets = np.cumsum([0] + [len(s) for s in stores])
    with KeyChecker(int(offsets[-1]), tmpdir=tmpdir) as checker:
        for i, s in enumerate(stores):
            for shard in tqdm(s.shards, desc=f"keys {i + 1}/{len(stores)}", unit="shard",
                              disable=None if progress is None else not progress):
                checker.add(_shard_keys(s, shard.id), int(offsets[i]) + shard.start)

        def where(row: int) -> tuple[TargetStore, int]:
            i = int(np.searchsorted(offsets, row, side="right") - 1)
            return stores[i], row - int(offsets[i])

        def read_keys(rows: np.ndarray) -> list[str]:
            cache: dict[tuple[int, int], np.ndarray] = {}
            out = []
            for r in rows.tolist():
                store, local = where(r)
                sid = store.shard_of(local)
                if (id(store), sid) not in cache:
                    cache[id(store), sid] = _shard_keys(store, sid)
                out.append(cache[id(store), sid][local - store.shards[sid].start])
            return out

        dups = checker.duplicates(read_keys, limit=100)
    if dups:
        examples = []
        for key, rows in list(dups.groups.items())[:5]:
            examples.append(f"{key!r} in " + " and ".join(f"{where(r)[0].url} (row {where(r)[1]})" for r in rows[:3]))
        n = len(dups.groups) + dups.unconfirmed
        raise ValueError(f"cannot merge: {n}{'+' if dups.unconfirmed else ''} keys appear more than once, e.g. "
                         + "; ".join(examples))


def refuse_sequences(stores: Sequence[TargetStore], operation: str) -> None:
    """Sequence stores are refused by ``merge`` and ``subset``: their rows are cut into sequences by offsets that
    a concatenation or a choice of rows would have to rewrite."""
    for s in stores:
        seqs = s.manifest.sequences
        if seqs is not None:
            raise ValueError(f"{s.url} is a sequence store (rows are token positions of {seqs['count']} sequences): "
                             f"{operation} does not take sequence stores; convert keeps them whole")


def merge_stores(
    srcs: Sequence[str | os.PathLike[str]], dst: str | os.PathLike[str], *, layout: str | None = None,
    sample_layout: str | None = None, shard_rows: int | None = None, block_rows: int | None = None,
    compressor: str | None = None, drop_inputs: bool = False, overwrite: bool = False, tmpdir: str | None = None,
    progress: bool | None = None, storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Concatenate stores ``srcs`` (rows in the order given) into a new store at ``dst``.

    The stores must hold disjoint keys and agree in teachers (names and sha256), classes,
    content, dtype, temperature and normalisation. Layout arguments default to the first
    source's (see :func:`softtargets.sharing.convert.plan_layout`). Returns the new manifest.

    Views stores merge with views stores of the same views (count, seed, parameters, augmentation): the merged
    rows are view-major over all their samples (view ``v`` of each store's samples in turn, then view ``v + 1``),
    with their parameters; a views store and a store of one target per sample are refused.
    """
    urls = [os.fspath(u) for u in srcs]
    dst = os.fspath(dst)
    if len(urls) < 2:
        raise ValueError("merge needs at least two stores")
    for u in urls:
        if same_location(u, dst, storage_options):
            raise ValueError(f"{dst}: the destination is one of the sources; merge into a new store")
    stores = [open_targets(u, storage_options=storage_options) for u in urls]
    refuse_sequences(stores, "merge")
    views = merged_views(stores)
    check_compatible(stores)
    ms = [s.manifest for s in stores]
    first = ms[0]
    plan = plan_layout(first, dst, layout, sample_layout, shard_rows, block_rows, compressor)
    carry_inputs = plan["sample_layout"] == "sample" and all(m.inputs and m.inputs == first.inputs for m in ms)
    if any(m.inputs for m in ms) and not carry_inputs and not drop_inputs:
        raise ValueError("some stores pack inputs beside their targets; merge them into a wds store with "
                         "sample_layout='sample' (all with the same inputs), or pass drop_inputs=True")
    check_disjoint(stores, tmpdir=tmpdir, progress=progress)
    total = sum(len(s) for s in stores)
    entry = lineage_entry("merge", stores, {**plan, "inputs": "carried" if carry_inputs else None})
    for src_entry, m in zip(entry["sources"], ms, strict=True):
        if m.lineage:
            src_entry["lineage"] = m.lineage
    args = {
        **carry_spec(first), **plan, "content": first.content, "dtype": first.dtype, "temperature": first.temperature,
        "overflow": first.overflow, "num_samples": total, "inputs": first.inputs if carry_inputs else None,
        "transfer_set": merged_transfer_set(ms, total), "lineage": [entry], "views": views,
    }

    def fill(sink: ShardSink) -> None:
        if views is not None:
            _fill_views(sink, stores, carry_inputs, progress)
            return
        for i, store in enumerate(stores):
            for shard in tqdm(store.shards, desc=f"merge {i + 1}/{len(stores)}", unit="shard",
                              disable=None if progress is None else not progress):
                _copy_rows(sink, store, shard.id, None, carry_inputs)

    return derive(args, fill, dst, overwrite, storage_options)


def merged_views(stores: Sequence[TargetStore]) -> dict[str, Any] | None:
    """The ``views`` declaration of merged stores (their views, over all their samples); None when none holds views.

    Raises:
        ValueError: some stores hold views and others not, or their views differ in count, seed, parameters or
            augmentation.
    """
    views = [views_of(s.manifest) for s in stores]
    first = views[0]
    if first is None and all(v is None for v in views):
        return None
    if first is None or any(v is None for v in views):
        plain = [str(s.url) for s, v in zip(stores, views, strict=True) if v is None]
        raise ValueError(f"cannot merge views stores with stores of one target per sample ({', '.join(plain)})")
    problems = [f"{field}: {stores[0].url} has {getattr(first, field)!r}, {s.url} has {getattr(v, field)!r}"
                for s, v in zip(stores[1:], views[1:], strict=True) for field in ("count", "seed", "params", "augment")
                if v is not None and getattr(v, field) != getattr(first, field)]
    if problems:
        raise ValueError("cannot merge views stores whose views differ in " + "; ".join(problems))
    return first.declaration(sum(v.samples for v in views if v is not None))


def _fill_views(sink: ShardSink, stores: Sequence[TargetStore], inputs: bool, progress: bool | None) -> None:
    """Merged views stores, view-major over all their samples: view ``v`` of the first store's samples, of the
    second's, ..., then view ``v + 1``; then the parameter files of the merged rows."""
    views = [v for v in (views_of(s.manifest) for s in stores) if v is not None]  # all (merged_views checked)
    pieces: list[tuple[TargetStore, int, int]] = []  # (store, first source row, rows) in destination order
    for v in range(views[0].count):
        for store, vw in zip(stores, views, strict=True):
            a, b = vw.rows_of_view(v)
            pieces.append((store, a, b - a))
    quiet = None if progress is None else not progress
    for store, a, n in tqdm(pieces, desc="merge views", unit="part", disable=quiet):
        for shard in store.shards:
            lo, hi = max(a, shard.start), min(a + n, shard.stop)
            if lo < hi:
                _copy_rows(sink, store, shard.id, np.arange(lo, hi) - shard.start, inputs)
    params = {id(s): ViewParams(s) for s in stores}
    starts = np.cumsum([0] + [n for _, _, n in pieces])[:-1].tolist()  # each piece's first destination row

    def rows(a: int, b: int) -> np.ndarray:
        """Parameters of destination rows ``[a, b)``, from the pieces they fall in."""
        parts = [params[id(store)].rows(np.arange(max(a, lo), min(b, lo + n)) - lo + src)
                 for (store, src, n), lo in zip(pieces, starts, strict=True) if max(a, lo) < min(b, lo + n)]
        return np.concatenate(parts)

    write_params_files(sink.writer, rows)


def _copy_rows(sink: ShardSink, store: TargetStore, shard_id: int, local: np.ndarray | None, inputs: bool) -> None:
    """Append rows ``local`` (offsets within the shard; None = all) of one source shard, bits unchanged."""
    m = store.manifest
    shard = m.shards[shard_id]
    rows = store.rows(shard.start, shard.stop)
    keys, logits, labels = str_array(rows["key"]), rows["logits"], rows["label"].numpy()
    packed = store.read_shard(shard_id)["inputs"] if inputs else None
    if local is not None:
        keys, logits, labels = keys[local], logits[local], labels[local]
        packed = None if packed is None else [packed[i] for i in local.tolist()]
    sink.add(keys, encode_rows(logits, m, m.content, m.dtype, m.overflow, m.temperature), labels, packed)


def parse_range(text: str, n: int) -> tuple[int, int]:
    """``"A:B"`` (either end may be omitted) -> rows ``[A, B)`` within ``[0, n]``; refuses anything else."""
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else n
    except ValueError:
        raise ValueError(f"--range takes A:B (rows A to B-1), got {text!r}") from None
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"range {lo}:{hi} is not within the store's {n} rows (0 <= A <= B <= {n})")
    return lo, hi


def read_keys_file(path: str | os.PathLike[str]) -> list[str]:
    """Keys from a text file, one per line (surrounding whitespace and blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def subset_store(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, keys: Iterable[str] | None = None,
    row_range: tuple[int, int] | str | None = None, layout: str | None = None, sample_layout: str | None = None,
    shard_rows: int | None = None, block_rows: int | None = None, compressor: str | None = None,
    drop_inputs: bool = False, overwrite: bool = False, progress: bool | None = None,
    keys_source: str | None = None, storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Write rows of ``src`` chosen by ``keys`` (any order; rows keep the source's order) or by
    ``row_range`` ``(A, B)`` / ``"A:B"`` to a new store at ``dst``. Every key must exist.

    A views store is subset by sample keys (``"k"``, not a view's ``"k#v"``): every view of each chosen sample
    is kept, with its parameters, and the new store is a views store of those samples.

    ``keys_source`` (e.g. the keys file's path) is recorded in the lineage. Returns the new manifest.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if (keys is None) == (row_range is None):
        raise ValueError("subset needs exactly one of keys or row_range")
    if same_location(src, dst, storage_options):
        raise ValueError(f"{dst}: the destination is the source; write the subset elsewhere")
    store = open_targets(src, storage_options=storage_options)
    refuse_sequences([store], "subset")
    m = store.manifest
    views, samples = views_of(m), 0
    wanted = None if keys is None else np.unique(str_array(list(keys)))
    if wanted is None:
        assert row_range is not None  # exactly one of keys and row_range, checked above
        if views is not None:
            raise ValueError(f"{src} is a views store (rows view-major): subset it by sample keys, which keeps all "
                             f"{views.count} views of each sample; a row range would cut the views apart")
        lo, hi = parse_range(row_range, len(store)) if isinstance(row_range, str) else parse_range(
            f"{row_range[0]}:{row_range[1]}", len(store))
        picks = {s.id: np.arange(max(lo, s.start), min(hi, s.stop)) - s.start for s in m.shards
                 if max(lo, s.start) < min(hi, s.stop)}
        params: dict[str, Any] = {"range": [lo, hi]}
    else:
        if views is None:
            picks = _find_keys(store, wanted, progress)
        else:
            picks, samples = _find_samples(store, views, wanted)
        digest = hashlib.sha256("\n".join(wanted.tolist()).encode()).hexdigest()
        params = {"keys": int(wanted.size), "keys_sha256": digest, "keys_source": keys_source}
    n = int(sum(len(p) for p in picks.values()))
    plan = plan_layout(m, dst, layout, sample_layout, shard_rows, block_rows, compressor)
    carry_inputs = bool(m.inputs) and plan["sample_layout"] == "sample"
    if m.inputs and not carry_inputs and not drop_inputs:
        raise ValueError(f"{src} packs inputs {sorted(m.inputs)} beside its targets; only a wds store with "
                         "sample_layout='sample' can hold them: choose that, or pass drop_inputs=True")
    args = {
        **carry_spec(m), **plan, "content": m.content, "dtype": m.dtype, "temperature": m.temperature,
        "overflow": m.overflow, "num_samples": n, "inputs": m.inputs if carry_inputs else None,
        "lineage": [*m.lineage, lineage_entry("subset", [store], {**params, **plan})],
        "views": None if views is None else views_declaration(m, samples),
    }

    def fill(sink: ShardSink) -> None:
        for sid in tqdm(sorted(picks), desc="subset", unit="shard", disable=None if progress is None else not progress):
            _copy_rows(sink, store, sid, picks[sid], carry_inputs)
        if views is not None:
            carry_views(store, sink, np.concatenate([m.shards[sid].start + picks[sid] for sid in sorted(picks)]))

    return derive(args, fill, dst, overwrite, storage_options)


def _find_samples(store: TargetStore, views: Views, wanted: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """``(shard id -> row offsets, number of samples)`` of every view of the samples whose keys are in sorted
    ``wanted``, rows in the source's (view-major) order; refuses keys that are not sample keys."""
    a, b = views.rows_of_view(0)
    sample_keys = str_array([split_view_key(k)[0] for k in store.take(np.arange(a, b))["key"]])
    hit = np.isin(wanted, sample_keys)
    if not hit.all():
        missing = wanted[~hit]
        viewish = [k for k in missing[:5].tolist() if VIEW_SEP in k]
        hint = f" (views stores are subset by sample keys, not view keys like {viewish[0]!r})" if viewish else ""
        raise ValueError(f"{int(missing.size)} of {wanted.size} keys are not sample keys of {store.url}, e.g. "
                         f"{missing[:5].tolist()}{hint}")
    samples = np.flatnonzero(np.isin(sample_keys, wanted))
    rows = (np.arange(views.count)[:, None] * views.samples + samples[None, :]).reshape(-1)
    starts = np.array([s.start for s in store.shards], dtype=np.int64)
    sids = np.searchsorted(starts, rows, side="right") - 1
    picks = {int(sid): rows[sids == sid] - int(starts[sid]) for sid in np.unique(sids)}
    return picks, int(samples.size)


def _find_keys(store: TargetStore, wanted: np.ndarray, progress: bool | None) -> dict[int, np.ndarray]:
    """Shard id -> offsets of the rows whose keys are in sorted ``wanted``; refuses keys not found."""
    hit = np.zeros(wanted.size, dtype=bool)
    picks = {}
    for shard in tqdm(store.shards, desc="find keys", unit="shard", disable=None if progress is None else not progress):
        keys = _shard_keys(store, shard.id)
        mask = np.isin(keys, wanted)
        if mask.any():
            picks[shard.id] = np.flatnonzero(mask)
            hit[np.searchsorted(wanted, keys[mask])] = True
    if not hit.all():
        missing = wanted[~hit]
        raise ValueError(f"{int(missing.size)} of {wanted.size} keys are not in {store.url}, e.g. "
                         f"{missing[:5].tolist()}")
    return picks
