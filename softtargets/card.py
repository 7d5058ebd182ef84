"""The dataset card: a human-readable ``README.md`` written beside every manifest."""

from __future__ import annotations

from .manifest import Manifest

_MEANING = {
    "per_teacher": "the logits of each of the K teachers, `[N, K, C]`: exact geometric and arithmetic "
    "ensemble targets at any temperature",
    "geometric": "the mean over teachers of their logits, `[N, C]`: the geometric-mean ensemble "
    "(renormalised) at any temperature T is `softmax(logits / T)`",
    "arithmetic": "`log mean_k softmax(v_k / T0)`, `[N, C]`: the arithmetic-mean ensemble, exact only at "
    "the recorded T0",
}


def dataset_card(m: Manifest, url: str) -> str:
    """Markdown describing store ``m`` at ``url``: what it is, how it was made, how to read it."""
    teachers = "\n".join(
        f"| {t['name']} | `{(t.get('sha256') or '-')[:16]}` | {t.get('num_params') or '-'} |" for t in m.teachers
    ) or "| (not recorded) | | |"
    t0 = f" at T0 = {m.temperature}" if m.content == "arithmetic" else ""
    ts = m.transfer_set or {}
    bf16 = " (stored as the raw uint16 bits of bfloat16)" if m.dtype == "bfloat16" else ""
    if m.layout == "zarr":
        plain = (
            "```python\nimport zarr\ng = zarr.open_group(URL, mode='r')\n"
            "logits, labels, keys = g['logits'][:1000], g['labels'][:1000], g['keys'][:1000]\n```"
        )
    else:
        plain = (
            "```python\nimport webdataset as wds\n"
            "for sample in wds.WebDataset(SHARD_URLS, shardshuffle=False).decode():\n"
            + ("    logits, labels, keys = sample['logits.npy'], sample['labels.npy'], sample['keys.npy']\n```"
               if m.sample_layout == "block" else
               "    logits, label, key = sample['logits.npy'], sample['label.cls'], sample['key.txt']\n```")
        )
    return f"""# Soft-target store

Made by softtargets {m.softtargets_version} on {m.created}. Layout: **{m.layout}**
{f"({m.sample_layout} samples)" if m.sample_layout else ""}; format version {m.format_version}.

- **{m.num_samples}** samples, **{m.num_classes}** classes, K = {m.num_teachers} teachers.
- Content: **{m.content}**{t0} — {_MEANING[m.content]}.
- Stored as {m.dtype}{bf16}; rows {"zero-meaned" if m.normalization == "zero_mean" else "as given"};
  labels {"present (-1 = unlabeled)" if m.has_labels else "absent (all -1)"}.
- Transfer set: {ts.get("name", "(not recorded)")} (fingerprint `{ts.get("fingerprint", "-")}`).
- {len(m.shards)} shards of up to {m.shard_rows} rows; {m.nbytes} bytes of data; every file's sha256 is in
  `manifest.json`.

| teacher | sha256 (prefix) | parameters |
|---|---|---|
{teachers}

## Read it with softtargets

```python
import softtargets as st
store = st.open_targets("{url}")
store[0:10]                                  # keys, logits, labels
store.probs([0, 1], temperature=4.0, rule="geometric")
```

## Read it without softtargets

{plain}
"""
