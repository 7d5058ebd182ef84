"""The dataset card: a human-readable ``README.md`` written beside every manifest.

It says what the store is, how it was made (command, versions, lineage), how to check
it, and how to read it with softtargets and without it (plain zarr, ``dask.array``,
plain webdataset, and numpy for targets at a temperature). The recipes are tested by
running the card's code blocks against real stores.

The card is portable: it names the store by :data:`URL_PLACEHOLDER`, which a reader replaces
with where the store lives, and shows the producer's paths relative to the store (never the
producer's folders). Its YAML front matter holds the metadata dataset hubs read (Hugging Face
dataset cards: ``pretty_name``, ``license``, ``tags``, ``size_categories``, ``task_categories``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .manifest import Manifest

URL_PLACEHOLDER = "<store-url>"
# Hugging Face's size buckets: (upper bound, label), the first bound above the row count wins.
_SIZES = ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
          (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
          (10**11, "10B<n<100B"), (10**12, "100B<n<1T"))

_MEANING = {
    "per_teacher": "the logits of each of the K teachers, `[N, K, C]`: exact geometric and arithmetic "
    "ensemble targets at any temperature",
    "geometric": "the mean over teachers of their logits, `[N, C]`: the geometric-mean ensemble "
    "(renormalised) at any temperature T is `softmax(logits / T)`",
    "arithmetic": "`log mean_k softmax(v_k / T0)`, `[N, C]`: the arithmetic-mean ensemble, exact only at "
    "the recorded T0",
}

_SAMPLES = {"block": " (blocks of rows per tar sample)", "sample": " (one row per tar sample)"}
_SOFTMAX = '''def softmax(z, T=1.0):
    z = z / T
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)

'''


def _shape(m: Manifest, rows: str = "n") -> str:
    return f"[{rows}, {m.num_teachers}, {m.num_classes}]" if m.per_teacher else f"[{rows}, {m.num_classes}]"


def _row_shape(m: Manifest) -> str:
    return f"[{m.num_teachers}, {m.num_classes}]" if m.per_teacher else f"[{m.num_classes}]"


def _as_float(m: Manifest, expr: str) -> str:
    """numpy expression turning stored logits ``expr`` into float32 (bfloat16 is stored as uint16 bits)."""
    if m.dtype == "bfloat16":
        return f"({expr}.astype(np.uint32) << 16).view(np.float32)"
    return f"{expr}.astype(np.float32)"


def targets_recipe(m: Manifest) -> str:
    """numpy lines computing ``targets`` ``[n, C]`` at temperature ``T`` from float32 ``x``."""
    if m.content == "per_teacher":
        return (_SOFTMAX + "T = 4.0\n"
                "targets = softmax(x.mean(axis=1), T)         # geometric-mean ensemble at T\n"
                "arithmetic = softmax(x, T).mean(axis=1)      # arithmetic-mean ensemble at T\n")
    if m.content == "geometric":
        return _SOFTMAX + "T = 4.0\ntargets = softmax(x, T)                      # geometric-mean ensemble at T\n"
    return (_SOFTMAX + f"T0 = {m.temperature!r}\n"
            "targets = softmax(x)                         # arithmetic-mean ensemble, exact at T0 only\n")


def zarr_recipe(m: Manifest, url: str) -> str:
    stored = m.dtype if m.dtype != "bfloat16" else "uint16 bits of bfloat16"
    return f'''```python
import numpy as np
import zarr

URL = "{url}"  # replace with where the store lives: a path, or an http(s):// / s3:// URL
g = zarr.open_group(URL, mode="r")
logits = g["logits"][:1000]    # {stored} {_shape(m)}
labels = g["labels"][:1000]    # int64 [n], -1 = unlabeled
keys = g["keys"][:1000]        # str [n]
x = {_as_float(m, "logits")}

{targets_recipe(m)}```'''


def dask_recipe(m: Manifest, url: str) -> str:
    convert = ("\\\n    .map_blocks(lambda b: (b.astype(np.uint32) << 16).view(np.float32), dtype=np.float32)"
               if m.dtype == "bfloat16" else ".astype(np.float32)")
    return f'''```python
import dask.array as da
import numpy as np

URL = "{url}"  # replace with where the store lives
logits = da.from_zarr(URL, component="logits"){convert}  # lazy {_shape(m, "N")}
labels = da.from_zarr(URL, component="labels")           # lazy int64 [N]
mean_logits = logits.mean(axis=0).compute()              # e.g. a statistic over the whole store
```'''


def wds_recipe(m: Manifest, url: str) -> str:
    last = f"{max(len(m.shards) - 1, 0):06d}"
    stored = m.dtype if m.dtype != "bfloat16" else "uint16 bits of bfloat16"
    head = f'''```python
import io

import numpy as np
import webdataset as wds

URL = "{url}"  # replace with where the store lives
shards = URL + "/shard-{{000000..{last}}}.tar"

def npy(data: bytes) -> np.ndarray:  # arrays only: no .decode(), which would unpickle .pyd/.pkl members
    return np.load(io.BytesIO(data), allow_pickle=False)

'''
    if m.sample_layout == "block":
        body = f'''for block in wds.WebDataset(shards, shardshuffle=False):  # raw bytes per member
    logits = npy(block["logits.npy"])   # {stored} {_shape(m, "b")}, b <= {m.block_rows}
    labels = npy(block["labels.npy"])   # int64 [b], -1 = unlabeled
    keys = npy(block["keys.npy"])       # str [b]
    index = npy(block["index.npy"])     # int64 [b]: the rows' numbers in the store
    x = {_as_float(m, "logits")}
'''
    else:
        body = f'''for sample in wds.WebDataset(shards, shardshuffle=False):  # raw bytes per member
    logits = npy(sample["logits.npy"])      # {stored} {_row_shape(m)}
    label = int(sample["label.cls"])        # -1 = unlabeled
    key = sample["key.txt"].decode()        # str
    index = int(sample["__key__"]) # the row's number in the store
    x = {_as_float(m, "logits")}
'''
    return head + body + "```"


def _local_root(url: str) -> str | None:
    """The absolute local path of the store at ``url``, or None for a remote URL."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    return None if "://" in url else os.path.abspath(url)


def portable_path(value: str, root: str | None, cwd: str | None = None) -> str:
    """``value`` as the card shows it: the store itself as :data:`URL_PLACEHOLDER`, a path inside it as
    ``<store-url>/rel``, a local path near it relative to it (``../src.zarr``), a local path that shares
    only the filesystem's root with it as ``.../name``; anything else unchanged.

    Args:
        value: a path or URL as recorded (absolute, or relative to ``cwd``).
        root: the store's absolute local path (:func:`_local_root`), or None for a remote store.
        cwd: the folder relative paths were given in; None: relative values are left as they are.
    """
    if root is None or "://" in value or not value:
        return value
    if os.path.isabs(value):
        path = os.path.normpath(value)
    elif cwd is not None and os.path.exists(os.path.join(cwd, value)):
        path = os.path.normpath(os.path.join(cwd, value))
    else:
        return value
    if path == root:
        return URL_PLACEHOLDER
    if os.path.commonpath([path, root]) == root:
        return f"{URL_PLACEHOLDER}/{os.path.relpath(path, root)}"
    if os.path.dirname(os.path.commonpath([path, root])) == os.path.commonpath([path, root]):
        return f".../{os.path.basename(path)}"  # only the filesystem's root in common: no folders shown
    return os.path.relpath(path, root)


def portable_command(argv: Sequence[str], root: str | None, cwd: str | None = None) -> str:
    """A recorded command line (``sys.argv``) as the card shows it: the program by its name, every path
    argument (also ``--option=PATH``) through :func:`portable_path`."""
    if not argv:
        return "(not recorded)"
    shown = [os.path.basename(str(argv[0])) or str(argv[0])]
    for arg in map(str, argv[1:]):
        option, eq, value = arg.partition("=")
        if eq and option.startswith("-"):
            shown.append(f"{option}={portable_path(value, root, cwd)}")
        else:
            shown.append(portable_path(arg, root, cwd))
    return " ".join(shown)


def size_category(n: int) -> str:
    """The Hugging Face ``size_categories`` label of ``n`` rows."""
    return next((label for bound, label in _SIZES if n < bound), "n>1T")


def front_matter(m: Manifest) -> str:
    """The card's YAML front matter (between ``---`` lines): what dataset hubs index the store by."""
    name = (m.transfer_set or {}).get("name")
    pretty = f"Soft targets of {m.num_teachers} teacher(s){' on ' + name if name else ''}"
    tags = ["knowledge-distillation", "soft-targets", "teacher-logits", "softtargets", m.layout,
            m.content.replace("_", "-")]
    return "\n".join([
        "---",
        f"pretty_name: {json.dumps(pretty)}",
        "license: unknown  # the transfer set's and the teachers' licenses apply: set the one that holds",
        "tags:", *(f"- {t}" for t in tags),
        "size_categories:", f"- {json.dumps(size_category(m.num_samples))}",
        "task_categories:", "- other",
        "---",
    ])


def dataset_card(m: Manifest, url: str, cwd: str | None = None) -> str:
    """Markdown describing store ``m`` (written at ``url``): what it is, how it was made, how to read it.

    The card names the store by :data:`URL_PLACEHOLDER` and shows recorded paths relative to it
    (:func:`portable_path`); ``cwd``: the folder the recorded command ran in, where it is known.
    """
    root = _local_root(str(url))
    teachers = "\n".join(
        f"| {t['name']} | `{t.get('sha256') or '-'}` | {t.get('num_params') or '-'} |" for t in m.teachers
    ) or "| (not recorded) | | |"
    t0 = f" at T0 = {m.temperature}" if m.content == "arithmetic" else ""
    ts = m.transfer_set or {}
    bf16 = " (stored as the raw uint16 bits of bfloat16)" if m.dtype == "bfloat16" else ""
    names = m.class_names
    classes = f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ""
    prov = m.provenance or {}
    command = portable_command(prov.get("command") or [], root, cwd)
    versions = ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()) or "(not recorded)"
    lineage = "\n".join(
        f"- {e.get('operation')} of " + ", ".join(
            f"`{portable_path(str(s.get('url')), root)}` (manifest sha256 `{s.get('manifest_sha256')}`)"
            for s in e.get("sources", []))
        + f" on {e.get('time')}: `{json.dumps(e.get('parameters'), sort_keys=True)}`"
        for e in m.lineage
    ) or "- made directly from the teachers (no earlier store)"
    inputs = (f"\n- Inputs packed beside the targets (tar members): "
              f"{', '.join(f'`{k}` ({v})' for k, v in m.inputs.items())}." if m.inputs else "")
    probs = ("store.probs([0, 1], temperature=4.0, rule=\"geometric\")" if m.content != "arithmetic" else
             f"store.probs([0, 1], temperature={m.temperature!r}, rule=\"arithmetic\")  # exact at T0 only")
    url = URL_PLACEHOLDER
    from . import layout_class  # the layouts import this module for its recipes

    plain = layout_class(m.layout).card_recipes(m, url)
    return f"""{front_matter(m)}

# Soft-target store{': ' + ts['name'] if ts.get('name') else ''}

Teacher outputs precomputed once, for knowledge distillation: a student trains on these
targets at any temperature without running the teachers.

## What it holds

- **{m.num_samples}** samples, **{m.num_classes}** classes{classes}, K = {m.num_teachers} teachers.
- Content: **{m.content}**{t0}: {_MEANING[m.content]}.
- Stored as {m.dtype}{bf16}; rows {"zero-meaned" if m.normalization == "zero_mean" else "as given"}
  (softmax is shift invariant); labels {"present (-1 = unlabeled)" if m.has_labels else "absent (all -1)"}.
- Layout: **{m.layout}**{_SAMPLES.get(m.sample_layout or "", "")}, format version
  {m.format_version}; {len(m.shards)} shards of up to {m.shard_rows} rows, read in units of {m.block_rows} rows;
  {m.nbytes} bytes of data.{inputs}
- Transfer set: {ts.get("name", "(not recorded)")} (fingerprint `{ts.get("fingerprint", "-")}`).

| teacher | weights sha256 | parameters |
|---|---|---|
{teachers}

## How it was made

Begun {m.created} by softtargets {m.softtargets_version}.

- Command: `{command}`
- Versions: {versions}
{lineage}

Paths above are relative to the store; `{url}` stands for the store itself: replace it with
where the store lives now. Every data file's size and sha256 are in `manifest.json`. Check them
all with `softtargets verify {url}`.

## Read it with softtargets

```python
import softtargets as st
store = st.open_targets("{url}")
rows = store[0:10]              # {{"index", "key", "logits", "label"}}
{probs}
```

## Read it without softtargets

{chr(10).join(p + chr(10) for p in plain)}"""
