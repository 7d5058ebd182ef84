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
    if m.compact is not None:
        return f"[{rows}, {m.compact['row_bytes']}]: packed records"
    return f"[{rows}, {m.num_teachers}, {m.num_classes}]" if m.per_teacher else f"[{rows}, {m.num_classes}]"


def _row_shape(m: Manifest) -> str:
    if m.compact is not None:
        return f"[{m.compact['row_bytes']}]: a packed record"
    return f"[{m.num_teachers}, {m.num_classes}]" if m.per_teacher else f"[{m.num_classes}]"


def _as_float(m: Manifest, expr: str) -> str:
    """numpy expression turning stored logits ``expr`` into float32 (bfloat16 is stored as uint16 bits)."""
    if m.dtype == "bfloat16":
        return f"({expr}.astype(np.uint32) << 16).view(np.float32)"
    return f"{expr}.astype(np.float32)"


def _record_dtype(m: Manifest) -> str:
    """numpy source of a compact store's record dtype (one structured item per stored row)."""
    assert m.compact is not None
    fields = ", ".join(f'("{f["name"]}", "{f["dtype"]}", {tuple(f["shape"])})' for f in m.compact["fields"])
    return f"np.dtype([{fields}])"


def _grid_index(m: Manifest) -> str:
    assert m.compact is not None
    temps = [float(t) for t in m.compact["temperatures"]]
    return (f"TEMPERATURES = {temps}  # the grid; its fields hold values at 1/T, from the largest T down\n"
            f"T = {temps[len(temps) // 2]!r}  # a grid temperature: exact there (between them: docs/compact.md)\n"
            "j = len(TEMPERATURES) - 1 - TEMPERATURES.index(T)\n")


def compact_recipe(m: Manifest, logits: str = "logits") -> str:
    """numpy lines decoding a compact store's records ``logits`` (uint8 ``[n, row_bytes]``) into ``rec`` and
    computing what its content gives at temperature ``T``."""
    c = m.compact
    assert c is not None
    lead = "[n, K, " if m.per_teacher else "[n, "
    out = (f"rec = np.ascontiguousarray({logits}).reshape(-1, {int(c['row_bytes'])}).view(\n"
           f"    {_record_dtype(m)})[:, 0]  # one record per row\n")
    if c["kind"] == "topk":
        return out + _grid_index(m) + (
            f"top = rec[\"values\"].astype(np.float64) / T            # {lead}k]: (z - z_max) / T of rec[\"ids\"]\n"
            "tail = rec[\"tail_logz\"][..., j].astype(np.float64)  # log sum of exp((z - z_max) / T), other ids\n"
            "logz = np.logaddexp(np.log(np.exp(top).sum(-1)), tail)\n"
            "p_top = np.exp(top - logz[..., None])  # the teacher's probabilities of rec[\"ids\"] at T\n"
            "p_tail = np.exp(tail - logz)           # the mass of every other id, together\n")
    if c["kind"] == "sampled":
        t0 = float(c["proposal_temperature"])
        return out + _grid_index(m) + (
            f"j0 = len(TEMPERATURES) - 1 - TEMPERATURES.index({t0!r})  # the proposal temperature T0\n"
            f"z = rec[\"values\"].astype(np.float64)                   # {lead}k]: z - z_max of rec[\"ids\"]\n"
            "log_p = z / T - rec[\"logz\"][..., j:j + 1]              # log p_T of each drawn id\n"
            f"log_p0 = z / {t0!r} - rec[\"logz\"][..., j0:j0 + 1]\n"
            f"weights = rec[\"counts\"] / {int(c['k'])} * np.exp(log_p - log_p0)  # sum_i weights_i f(id_i): "
            "unbiased for E_p_T[f]; count-0 slots weigh 0\n")
    files = c.get("head_files") or {}
    scale = ' * rec["scale"]' if c.get("quantization") == "int8" else ""
    bias = ' + np.load(URL + "/head/bias.npy")' if files.get("bias") else ""
    if m.per_teacher:
        logits_line = f'z = np.einsum("nkd,kcd->nkc", h, W){bias}  # [n, K, C]: every logit, exactly\n'
    else:
        logits_line = f"z = h @ W.T{bias}  # [n, C]: every logit, exactly\n"
    return out + (
        f"h = rec[\"hidden\"].astype(np.float32){scale}  # the teacher's last hidden state\n"
        'W = np.load(URL + "/head/weight.npy")  # float32 output head, stored once (fsspec.open for a remote URL)\n'
        + logits_line + _SOFTMAX + "T = 4.0\ntargets = softmax(z, T)\n")


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


def _stored(m: Manifest) -> str:
    """What the ``logits`` array holds, as the recipes' comments name it."""
    if m.compact is not None:
        return "uint8"
    return m.dtype if m.dtype != "bfloat16" else "uint16 bits of bfloat16"


def _decode(m: Manifest, indent: str = "") -> str:
    """numpy lines after ``logits`` is read: targets at T (dense), or the records' fields (compact)."""
    code = compact_recipe(m) if m.compact is not None else f"x = {_as_float(m, 'logits')}\n\n{targets_recipe(m)}"
    return "".join(indent + line if line.strip() else line for line in code.splitlines(keepends=True))


def zarr_recipe(m: Manifest, url: str) -> str:
    stored = _stored(m)
    return f'''```python
import numpy as np
import zarr

URL = "{url}"  # replace with where the store lives: a path, or an http(s):// / s3:// URL
g = zarr.open_group(URL, mode="r")
logits = g["logits"][:1000]    # {stored} {_shape(m)}
labels = g["labels"][:1000]    # int64 [n], -1 = unlabeled
keys = g["keys"][:1000]        # str [n]
{_decode(m)}```'''


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
    stored = _stored(m)
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
{_decode(m, "    ") if m.compact is not None else "    x = " + _as_float(m, "logits") + chr(10)}'''
    else:
        body = f'''for sample in wds.WebDataset(shards, shardshuffle=False):  # raw bytes per member
    logits = npy(sample["logits.npy"])      # {stored} {_row_shape(m)}
    label = int(sample["label.cls"])        # -1 = unlabeled
    key = sample["key.txt"].decode()        # str
    index = int(sample["__key__"]) # the row's number in the store
{_decode(m, "    ") if m.compact is not None else "    x = " + _as_float(m, "logits") + chr(10)}'''
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


_COMPACT = {
    "topk": "the k largest logits (minus the row's largest) and their ids, and the log-partition of the other "
    "ids with its derivative at a grid of temperatures: the top-k probabilities and the rest's mass together, "
    "exact at the grid's temperatures",
    "sampled": "ids drawn from `softmax(z / T0)` with their counts and logits, and the full log-partition with its "
    "derivative at a grid of temperatures: an unbiased estimate of the distillation loss at each of them",
    "hidden": "the teacher's last hidden state; the output head (`head/weight.npy`, `head/bias.npy`) is stored "
    "once: every logit is `h W^T + b`, at any temperature",
}


def _content_lines(m: Manifest, t0: str, bf16: str) -> str:
    """The card's bullets on what a row holds and how it is stored."""
    labels = "present (-1 = unlabeled)" if m.has_labels else "absent (all -1)"
    c = m.compact
    if c is None:
        return (f"- Content: **{m.content}**{t0}: {_MEANING[m.content]}.\n"
                f"- Stored as {m.dtype}{bf16}; rows {'zero-meaned' if m.normalization == 'zero_mean' else 'as given'}"
                f"\n  (softmax is shift invariant); labels {labels}.")
    of = f"each of the K = {m.num_teachers} teachers" if m.per_teacher else "the teachers' mean logits (geometric)"
    size = f"k = {c['k']}, " if c["kind"] != "hidden" else f"d = {c.get('hidden_size')}, {c.get('quantization')}, "
    low, high = c.get("temperature_range") or (0, 0)
    grid = "" if c["kind"] == "hidden" else f" Temperatures served: {low:g} to {high:g} (grid {c['temperatures']})."
    errors = "".join(f" Measured `{name}`: {c[name]:.3g}." for name in ("tail_error", "logit_error")
                     if c.get(name) is not None)
    fields = ", ".join(f"`{f['name']}` {f['dtype']} {f['shape']}" for f in c["fields"])
    return (f"- Content: **{c['kind']}** ({size}of {of}): {_COMPACT[c['kind']]}.{grid}{errors}\n"
            f"- Stored as packed records, `logits` uint8 `[N, {c['row_bytes']}]`, fields in order (little-endian): "
            f"{fields}; labels {labels}. Not logits: decode them as below.")


def _feature_lines(m: Manifest) -> str:
    """The card's bullets on sequences, views and arrays beside the logits."""
    lines = []
    if m.sequences:
        lines.append(f"- **Sequences**: the rows are the token positions of {m.sequences['count']} sequences (longest "
                     f"{m.sequences.get('max_length')}); row t holds the teacher's distribution of the token after "
                     "position t. `sequences/offsets.npy` (int64 `[S + 1]`: sequence s is rows `offsets[s]` to "
                     "`offsets[s + 1]`), `sequences/tokens.npy` (int32 `[N]`: the input token at each row), "
                     "`sequences/keys.npy` (str `[S]`).")
    if m.views:
        names = ", ".join(p["name"] for p in m.views.get("params", []))
        lines.append(f"- **Views**: {m.views['count']} augmented views of each of {m.views['samples']} samples, rows "
                     "view-major (row r: view `r // samples` of sample `r % samples`, key `sample#view`); each "
                     f"view's parameters ({names}) in `views/params-NNNNNN.npy`, one structured array per shard.")
    for name, kind in ((m.hints, "hints"), (m.specialists, "specialists")):
        if name:
            lines.append(f"- **{kind.capitalize()}**: arrays beside the logits ({', '.join(sorted(name))}); "
                         "their files, sizes and sha256 are in `manifest.json`.")
    return "".join("\n" + line for line in lines)


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
    if m.compact is not None:
        probs = ("fields = store.compact_fields([0, 1])  # the records' fields as tensors; losses: "
                 "st.compact_kd_loss (docs/compact.md)")
        if m.compact["kind"] == "hidden":
            probs += "\nstore.log_probs([0, 1], 4.0)          # every class, exactly"
    url = URL_PLACEHOLDER
    from . import layout_class  # the layouts import this module for its recipes

    plain = layout_class(m.layout).card_recipes(m, url)
    return f"""{front_matter(m)}

# Soft-target store{': ' + ts['name'] if ts.get('name') else ''}

Teacher outputs precomputed once, for knowledge distillation: a student trains on these
targets at any temperature without running the teachers.

## What it holds

- **{m.num_samples}** samples, **{m.num_classes}** classes{classes}, K = {m.num_teachers} teachers.
{_content_lines(m, t0, bf16)}
- Layout: **{m.layout}**{_SAMPLES.get(m.sample_layout or "", "")}, format version
  {m.format_version}; {len(m.shards)} shards of up to {m.shard_rows} rows, read in units of {m.block_rows} rows;
  {m.nbytes} bytes of data.{inputs}
- Transfer set: {ts.get("name", "(not recorded)")} (fingerprint `{ts.get("fingerprint", "-")}`).{_feature_lines(m)}

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
