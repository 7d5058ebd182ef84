"""The transfer set: the inputs the teachers are run on, with a stable key per sample.

:class:`TransferSet` wraps any map-style ``torch.utils.data.Dataset`` and gives every
sample an index, a string key, an input tensor and an integer label (``-1`` where
unlabeled). Its :meth:`TransferSet.collate` turns a list of samples into a
:class:`Batch` for a ``DataLoader``::

    ts = TransferSet(dataset)
    check_unique_keys(ts.all_keys())
    for indices, keys, x, labels in DataLoader(ts, batch_size=256, collate_fn=ts.collate):
        ...  # indices int64 [B], keys list[str], x [B, ...], labels int64 [B]

Dataset items may be ``x``, ``(x,)``, ``(x, y)``, ``(x, y, ...)`` (extra fields ignored),
or a mapping with an input under ``"x"``/``"input"``/``"inputs"``/``"image"``/``"img"``/
``"data"``, an optional label under ``"y"``/``"label"``/``"target"``/``"cls"`` and an
optional key under ``"key"``/``"__key__"``. ``x`` is a tensor, a numpy array or a
number; ``y`` an integer (Python, numpy or a one-element integer tensor) or ``None``.

Keys, in order of precedence: ``keys=`` given to :class:`TransferSet`; the dataset's
``keys`` attribute (a sequence, or a method returning one, of length ``len(dataset)``);
its ``key(i)`` method; the items' own ``"key"``/``"__key__"`` (detected from item 0;
:meth:`TransferSet.all_keys` then reads every item); else the index, ``str(i)``.

WebDataset tar shards are read by :class:`WebDatasetSource`, a map-style dataset over an
index of the shards' members built once at construction (see its docstring).
"""

from __future__ import annotations

import copy
import hashlib
import io
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Number
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

__all__ = [
    "Batch",
    "Sample",
    "TransferSet",
    "WebDatasetSource",
    "as_transfer_set",
    "check_unique_keys",
    "keys_fingerprint",
]

X_FIELDS = ("x", "input", "inputs", "image", "img", "data")
Y_FIELDS = ("y", "label", "target", "cls")
KEY_FIELDS = ("key", "__key__")
UNLABELED = -1

Unpack = Callable[[Any], tuple[Any, Any, "str | None"]]


class Sample(NamedTuple):
    """One transfer-set sample: ``x`` is a tensor of the sample's own shape ``[...]``."""

    index: int  # type: ignore[assignment]  # public field name; shadows tuple.index by design
    key: str
    x: torch.Tensor
    label: int


class Batch(NamedTuple):
    """A collated batch: ``indices`` int64 [B], ``keys`` B strings, ``x`` [B, ...],
    ``labels`` int64 [B] (``-1`` where unlabeled)."""

    indices: torch.Tensor
    keys: list[str]
    x: torch.Tensor
    labels: torch.Tensor


# ---------------------------------------------------------------------------- item parsing


def _first_field(item: Mapping[str, Any], fields: Sequence[str]) -> Any:
    for name in fields:
        if name in item:
            return item[name]
    return None


def unpack_item(item: Any) -> tuple[Any, Any, str | None]:
    """Split a dataset item into ``(x, y or None, key or None)`` (forms: see module docstring)."""
    if isinstance(item, Mapping):
        x = _first_field(item, X_FIELDS)
        if x is None:
            raise ValueError(f"dataset item has none of the input fields {list(X_FIELDS)}; "
                             f"its fields are {sorted(map(str, item))}")
        key = _first_field(item, KEY_FIELDS)
        return x, _first_field(item, Y_FIELDS), None if key is None else str(key)
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("dataset item is an empty tuple")
        return item[0], item[1] if len(item) > 1 else None, None
    return item, None, None


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    if isinstance(x, Number) and not isinstance(x, bool):
        return torch.tensor(x)
    raise TypeError(f"input x must be a tensor, numpy array or number, got {type(x).__name__}; "
                    "convert it in the dataset (e.g. a torchvision transform)")


def _to_label(y: Any) -> int:
    """An integer class index, or ``-1`` for ``None``; anything else raises."""
    if y is None:
        return UNLABELED
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not (y.is_floating_point() or y.is_complex()
                                                                 or y.dtype == torch.bool):
        y = int(y.item())
    elif isinstance(y, np.ndarray) and y.size == 1 and np.issubdtype(y.dtype, np.integer):
        y = int(y.reshape(()))
    if isinstance(y, bool) or not isinstance(y, Integral):
        raise TypeError(f"label must be an integer class index or None, got {type(y).__name__} {y!r:.60}")
    if y < UNLABELED:
        raise ValueError(f"label must be >= 0, or -1 for unlabeled; got {int(y)}")
    return int(y)


# ---------------------------------------------------------------------------- keys


def check_unique_keys(keys: Sequence[str]) -> None:
    """Raise ``ValueError`` naming up to 5 duplicated keys and their indices."""
    first: dict[str, int] = {}
    dups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            dups.setdefault(key, [j]).append(i)
    if dups:
        shown = "; ".join(f"{k!r} at indices {idx[:5]}" for k, idx in list(dups.items())[:5])
        more = f" (and {len(dups) - 5} more keys)" if len(dups) > 5 else ""
        raise ValueError(f"transfer-set keys must be unique; {len(dups)} duplicated: {shown}{more}")


def keys_fingerprint(keys: Iterable[str], length: int) -> str:
    """sha256 hex digest over ``length`` and every key in order (length-prefixed UTF-8)."""
    hasher = hashlib.sha256(f"keys:{length}\n".encode())
    for key in keys:
        data = key.encode()
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    return hasher.hexdigest()


def _index_fingerprint(length: int) -> str:
    return hashlib.sha256(f"index:{length}".encode()).hexdigest()


def _dataset_keys(dataset: Any, length: int) -> list[str] | None:
    """The dataset's ``keys`` attribute (sequence or method returning one), as strings."""
    keys = getattr(dataset, "keys", None)
    if keys is None:
        return None
    if callable(keys):
        keys = keys()
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (Sequence, np.ndarray)):
        raise TypeError(f"{type(dataset).__name__}.keys must be a sequence of keys, got {type(keys).__name__}")
    if len(keys) != length:
        raise ValueError(f"{type(dataset).__name__}.keys has {len(keys)} entries for {length} samples; "
                         "pass keys= to TransferSet to override")
    return [str(k) for k in keys]


# ---------------------------------------------------------------------------- TransferSet


class TransferSet(Dataset):
    """A map-style dataset of :class:`Sample` over any map-style dataset (see module docstring).

    Args:
        dataset: map-style dataset (``__len__`` and ``__getitem__``).
        name: for the manifest; default the dataset's class name.
        fingerprint: for the manifest; default :func:`keys_fingerprint` over all keys,
            or sha256 of ``"index:N"`` when keys are indices (no items read).
        keys: explicit keys, overriding any the dataset has: a sequence of
            ``len(dataset)`` keys, or a function ``i -> key``.
        unpack: ``item -> (x, y or None, key or None)``, for item forms not covered by
            :func:`unpack_item`.
    """

    def __init__(self, dataset: Any, *, name: str | None = None, fingerprint: str | None = None,
                 keys: Sequence[Any] | Callable[[int], Any] | None = None,
                 unpack: Unpack | None = None) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(f"TransferSet needs a map-style dataset with __len__, got {type(dataset).__name__}")
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        self._unpack = unpack or unpack_item
        self._length = len(dataset)
        self._fingerprint = fingerprint
        self._key_list: list[str] | None = None
        self._key_fn: Callable[[int], Any] | None = None
        self._mode = self._detect_key_mode(keys)

    def _detect_key_mode(self, keys: Sequence[Any] | Callable[[int], Any] | None) -> str:
        """One of ``"list"``, ``"method"``, ``"item"``, ``"index"``."""
        if callable(keys):
            self._key_fn = keys
            return "method"
        if keys is not None:
            if len(keys) != self._length:
                raise ValueError(f"keys= has {len(keys)} entries for {self._length} samples")
            self._key_list = [str(k) for k in keys]
            return "list"
        self._key_list = _dataset_keys(self.dataset, self._length)
        if self._key_list is not None:
            return "list"
        if callable(getattr(self.dataset, "key", None)):
            self._key_fn = self.dataset.key
            return "method"
        if self._length and self._unpack(self.dataset[0])[2] is not None:
            return "item"
        return "index"

    @property
    def key_source(self) -> str:
        """Where keys come from: ``"list"``, ``"method"``, ``"item"`` or ``"index"``."""
        return self._mode

    def __len__(self) -> int:
        return self._length

    def _check_index(self, i: int) -> int:
        if not isinstance(i, Integral) or isinstance(i, bool):
            raise TypeError(f"index must be an integer, got {type(i).__name__}")
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for a transfer set of {self._length}")
        return int(i)

    def _check_indices(self, indices: Sequence[int]) -> range | list[int]:
        """``indices`` checked: a ``range`` by its ends (O(1)), anything else element by element."""
        if isinstance(indices, range):
            if indices and not (0 <= indices[0] < self._length and 0 <= indices[-1] < self._length):
                bad = indices[0] if not 0 <= indices[0] < self._length else indices[-1]
                raise IndexError(f"index {bad} out of range for a transfer set of {self._length}")
            return indices
        return [self._check_index(i) for i in indices]

    def _keys_of(self, idx: range | list[int]) -> list[str]:
        """Keys of checked indices (not for item keys, which need the items)."""
        if self._key_list is not None:
            if isinstance(idx, range) and idx.step == 1:
                return self._key_list[idx.start:idx.stop]
            return [self._key_list[i] for i in idx]
        if self._key_fn is not None:
            return [str(self._key_fn(i)) for i in idx]
        return list(map(str, idx))

    def key(self, i: int) -> str:
        """The key of sample ``i`` (reads item ``i`` when keys come from the items)."""
        i = self._check_index(i)
        if self._key_list is None and self._key_fn is None and self._mode == "item":
            return self[i].key
        return self._keys_of([i])[0]

    def all_keys(self) -> list[str]:
        """Every key in index order (reads every item when keys come from the items)."""
        if self._key_list is not None:
            return list(self._key_list)
        if self._mode == "item":
            self._key_list = [self.key(i) for i in range(self._length)]
            return list(self._key_list)
        return self._keys_of(range(self._length))

    @property
    def fingerprint(self) -> str:
        """The manifest's fingerprint of this transfer set (computed once, then cached)."""
        if self._fingerprint is None:
            if self._mode == "index":
                self._fingerprint = _index_fingerprint(self._length)
            else:
                self._fingerprint = keys_fingerprint(self.all_keys(), self._length)
        return self._fingerprint

    def info(self) -> dict[str, str]:
        """The manifest's ``transfer_set`` entry: ``{"name", "fingerprint"}``."""
        return {"name": self.name, "fingerprint": self.fingerprint}

    def __getitem__(self, i: int) -> Sample:
        i = self._check_index(i)
        return self._sample(i, self.dataset[i])

    def batch(self, indices: Sequence[int], copy: bool = True) -> Batch:
        """The :class:`Batch` of samples ``indices``: equal to ``collate([self[i] for i in indices])``.

        Fetched in one go where the dataset allows: a ``TensorDataset`` is sliced (integer labels
        checked as a whole), a dataset with ``__getitems__`` (torch's batched-read hook) is asked
        for all items at once; other datasets are read item by item. A ``range`` is bounds-checked
        by its ends, other index sequences element by element. ``copy=False`` lets ``x`` be a view
        of a ``TensorDataset``'s tensor (for a caller that only reads it in this process: sent to
        another process, a view would share the whole tensor).
        """
        idx = self._check_indices(indices)
        if not idx:
            raise ValueError("cannot collate an empty batch")
        fast = self._tensor_batch(idx, copy)
        if fast is not None:
            return fast
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(list(idx)) if callable(getitems) else [self.dataset[i] for i in idx]
        if len(items) != len(idx):
            raise ValueError(f"{type(self.dataset).__name__}.__getitems__ returned {len(items)} items for "
                             f"{len(idx)} indices")
        return self.collate([self._sample(i, item) for i, item in zip(idx, items, strict=True)])

    def _tensor_batch(self, idx: range | list[int], copy: bool = True) -> Batch | None:
        """``TensorDataset`` rows by tensor indexing (a run of rows is sliced, and cloned if ``copy``:
        one contiguous copy instead of a gather); ``None`` where the per-item path must decide."""
        if not isinstance(self.dataset, TensorDataset) or self._unpack is not unpack_item or self._mode == "item":
            return None
        tensors = self.dataset.tensors
        if isinstance(idx, range):
            rows = torch.arange(idx.start, idx.stop, idx.step, dtype=torch.int64)
        else:
            rows = torch.tensor(idx, dtype=torch.int64)
        run = slice(idx.start, idx.stop) if isinstance(idx, range) and idx.step == 1 else rows
        if len(tensors) == 1:
            labels = torch.full((len(idx),), UNLABELED, dtype=torch.int64)
        else:
            y = tensors[1]
            if (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim == 0
                    or y[:1].numel() != 1):
                return None  # not one integer per row: the per-item path raises the precise error
            labels = y[run].reshape(-1).to(torch.int64, copy=True)
            if bool((labels < UNLABELED).any()):
                return None
        keys = self._keys_of(idx)
        x = tensors[0][run]
        x = x.clone(memory_format=torch.contiguous_format) if copy and isinstance(run, slice) else x
        return Batch(indices=rows, keys=keys, x=x, labels=labels)

    def _sample(self, i: int, item: Any) -> Sample:
        """Sample ``i`` from its dataset ``item``."""
        x, y, item_key = self._unpack(item)
        if self._mode == "item":
            if item_key is None:
                raise ValueError(f"item {i} has no key, but item 0 had one; keys must be all or none")
            key = item_key
        else:
            key = self.key(i)
            if item_key is not None and item_key != key:
                raise ValueError(f"item {i} carries key {item_key!r} but the dataset's keys say {key!r}")
        try:
            return Sample(i, key, _to_tensor(x), _to_label(y))
        except TypeError as exc:  # name the item: the message alone does not say which one
            raise TypeError(f"item {i} (key {key!r}) of {type(self.dataset).__name__}: {exc}") from None

    @staticmethod
    def collate(samples: Sequence[Sample]) -> Batch:
        """``DataLoader`` ``collate_fn``: list of :class:`Sample` -> :class:`Batch`.

        ``x`` tensors must share shape and are stacked to ``[B, ...]``.
        """
        if not samples:
            raise ValueError("cannot collate an empty batch")
        shape = samples[0].x.shape
        for s in samples[1:]:
            if s.x.shape != shape:
                raise ValueError(f"inputs differ in shape within a batch: {samples[0].key!r} "
                                 f"{tuple(shape)} vs {s.key!r} {tuple(s.x.shape)}")
        return Batch(
            indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
            keys=[s.key for s in samples],
            x=torch.stack([s.x for s in samples]),
            labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        )


# ---------------------------------------------------------------------------- WebDataset

# webdataset's own conventions (webdataset.tariterators): key = path up to the first dot
# of the basename, extension = the rest, lower-cased; "__*__" metadata members skipped.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
X_EXTS = ("input.npy", "x.npy", "npy", "input.pth", "pth", "pt",
          "png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp")
Y_EXTS = ("cls", "label", "target", "y")
_IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif"})


@dataclass
class _Entry:
    """One sample of a shard: ``members`` maps extension -> (offset, size) or the bytes."""

    key: str
    shard: int
    members: dict[str, tuple[int, int] | bytes] = field(default_factory=dict)


def _open_binary(url: str) -> Any:
    if "://" in url and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def _is_plain_tar(f: Any) -> bool:
    """True if ``f`` starts with an uncompressed (ustar/pax/gnu) tar header; rewinds ``f``."""
    header = f.read(512)
    f.seek(0)
    return len(header) == 512 and header[257:262] == b"ustar"


def _index_shard(url: str, shard: int) -> list[_Entry]:
    """Group a shard's members into samples, webdataset-style (consecutive same-key members).

    Uncompressed shards are indexed by (offset, size); compressed ones are read into memory.
    """
    import tarfile

    entries: list[_Entry] = []
    with _open_binary(url) as f:
        plain = _is_plain_tar(f)
        with tarfile.open(fileobj=f, mode="r|" if plain else "r|*") as tar:
            for info in tar:
                tar.members = []  # type: ignore[attr-defined]  # typeshed omits TarFile.members; stream mode would otherwise keep every TarInfo
                if not info.isreg() or _META.match(info.name):
                    continue
                match = _KEY_EXT.match(info.name)
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not entries or entries[-1].key != key or entries[-1].shard != shard:
                    entries.append(_Entry(key, shard))
                if ext in entries[-1].members:
                    raise ValueError(f"{url}: sample {key!r} has two {ext!r} members")
                if plain:
                    entries[-1].members[ext] = (info.offset_data, info.size)
                else:
                    member = tar.extractfile(info)
                    assert member is not None  # info.isreg() was checked above
                    entries[-1].members[ext] = member.read()
    return entries


def _decode_image(data: bytes) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("decoding image members needs Pillow: pip install pillow") from exc
    with Image.open(io.BytesIO(data)) as img:
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        array = np.array(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def decode_input(ext: str, data: bytes) -> torch.Tensor:
    """Decode an input member by its last extension.

    ``npy`` -> its array (``allow_pickle=False``); ``pth``/``pt`` -> a tensor
    (``weights_only=True``); images -> float32 ``[C, H, W]`` in ``[0, 1]`` (C = 1 for
    grayscale, else 3).
    """
    last = ext.rpartition(".")[2]
    if last == "npy":
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    if last in ("pth", "pt"):
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f".{ext} member holds {type(value).__name__}, not a tensor")
        return value
    if last in _IMAGE_EXTS:
        return _decode_image(data)
    raise ValueError(f"no decoder for input member .{ext}; supported: npy, pth, pt, {sorted(_IMAGE_EXTS)}")


def decode_label(ext: str, data: bytes) -> int:
    """An integer label from a text member (``cls`` and friends), e.g. ``b"7"``."""
    try:
        return int(data.decode().strip())
    except ValueError as exc:
        raise ValueError(f"label member .{ext} is not an integer: {data[:40]!r}") from exc


class WebDatasetSource(Dataset):
    """Map-style dataset over WebDataset tar shards; items ``{"key", "x", "y"}``.

    At construction every shard is read once and each sample's members are indexed:
    uncompressed ``.tar`` shards by byte offset (items are read on demand, memory is
    about the index only: a few hundred bytes per sample); compressed shards are held in
    memory whole. Suits transfer sets up to ~10^7 samples; larger ones want a streaming
    source (not written yet). Local paths and fsspec URLs (``s3://``, ``https://``;
    uncompressed needs range reads) work; ``pipe:`` URLs do not.

    Args:
        urls: one URL string, brace- and ``::``-expanded as webdataset does
            (``"shards/train-{000..009}.tar"``), or a sequence of URLs.
        x_ext: the input member's extension; default the first of :data:`X_EXTS` a sample has.
        y_ext: the label member's extension; default the first of :data:`Y_EXTS` present.
            A sample without one is unlabeled (``y=None``).
        transform: applied to each decoded input tensor.

    ``keys`` (the webdataset ``__key__`` of each sample, in shard order) is an attribute,
    so :class:`TransferSet` uses it without reading items. Keys repeated across or within
    shards are kept; :func:`check_unique_keys` reports them.
    """

    def __init__(self, urls: str | Sequence[str], *, x_ext: str | None = None, y_ext: str | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        from webdataset.shardlists import expand_urls

        self.urls: list[str] = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        if not self.urls:
            raise ValueError("WebDatasetSource needs at least one shard URL")
        self.x_ext, self.y_ext, self.transform = x_ext, y_ext, transform
        self._entries = [e for shard, url in enumerate(self.urls) for e in _index_shard(url, shard)]
        self.keys: list[str] = [e.key for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def _pick(self, entry: _Entry, wanted: str | None, candidates: Sequence[str]) -> str | None:
        if wanted is not None:
            return wanted if wanted in entry.members else None
        return next((ext for ext in candidates if ext in entry.members), None)

    def _read(self, entry: _Entry, exts: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        pending = {e: entry.members[e] for e in exts}
        inline = {e: v for e, v in pending.items() if isinstance(v, bytes)}
        out.update(inline)
        if len(inline) < len(pending):
            with _open_binary(self.urls[entry.shard]) as f:
                for ext, where in pending.items():
                    if ext not in inline:
                        offset, size = where
                        f.seek(offset)
                        out[ext] = f.read(size)
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self._entries[i]
        x_ext = self._pick(entry, self.x_ext, X_EXTS)
        if x_ext is None:
            raise ValueError(f"sample {entry.key!r} in {self.urls[entry.shard]} has no input member "
                             f"({self.x_ext or X_EXTS}); its members: {sorted(entry.members)}")
        y_ext = self._pick(entry, self.y_ext, Y_EXTS)
        raw = self._read(entry, [x_ext] if y_ext is None else [x_ext, y_ext])
        x = decode_input(x_ext, raw[x_ext])
        if self.transform is not None:
            x = self.transform(x)
        y = None if y_ext is None else decode_label(y_ext, raw[y_ext])
        return {"key": entry.key, "x": x, "y": y}


def as_transfer_set(source: Any, *, name: str | None = None, fingerprint: str | None = None) -> TransferSet:
    """A :class:`TransferSet` from a TransferSet, a map-style dataset, or WebDataset URL(s).

    A string, or a list of strings, is taken as WebDataset shard URLs (:class:`WebDatasetSource`).
    """
    if isinstance(source, TransferSet):
        if name is None and fingerprint is None:
            return source
        renamed = copy.copy(source)
        renamed.name = name or source.name
        if fingerprint is not None:
            renamed._fingerprint = fingerprint
        return renamed
    if isinstance(source, str) or (isinstance(source, Sequence) and source
                                   and all(isinstance(u, str) for u in source)):
        source = WebDatasetSource(source)
    return TransferSet(source, name=name, fingerprint=fingerprint)
